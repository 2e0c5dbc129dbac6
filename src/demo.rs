//! `strait demo`: the two workloads a demo or test cluster needs when the
//! `strait` binary is the only program around (a `FROM scratch` image):
//! `backend`, an HTTP responder that names itself, and `probe`, a client
//! that sends requests through a Service address — optionally resolving
//! the name through a node agent's cluster DNS — and prints what answered,
//! latency figures and every failure. `strait dev` runs the same backend.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Mutex;

#[derive(Subcommand, Debug)]
pub enum DemoCommand {
    /// An HTTP responder answering every request with `hello from NAME`.
    Backend {
        /// Address(es) to listen on (comma-separated IP:PORT).
        #[arg(
            long,
            env = "STRAIT_DEMO_LISTEN",
            value_delimiter = ',',
            required = true
        )]
        listen: Vec<SocketAddr>,
        /// The name it answers with.
        #[arg(long, env = "STRAIT_DEMO_NAME")]
        name: String,
    },
    /// Send HTTP requests to HOST:PORT and report who answered; exits
    /// non-zero if any attempt failed.
    Probe(ProbeArgs),
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// HOST:PORT; HOST is an IP address, or a name resolved through --dns.
    pub target: String,
    /// DNS server for a HOST name, IP[:PORT] (e.g. a node agent's cluster
    /// DNS); the name is resolved again for every attempt.
    #[arg(long, env = "STRAIT_DEMO_DNS")]
    pub dns: Option<String>,
    /// Attempts in all; 0 probes until SIGINT/SIGTERM.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Attempts in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Pause between one worker's attempts, e.g. 50ms.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Give up on an attempt (resolve, connect, response) after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print running figures this often (0s: only at the end).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub report_every: Duration,
    /// Print only failures and figures, not every response.
    #[arg(short, long)]
    pub quiet: bool,
}

pub async fn run(cmd: DemoCommand) -> anyhow::Result<()> {
    match cmd {
        DemoCommand::Backend { listen, name } => {
            for addr in listen {
                spawn_backend(addr, name.clone()).await?;
                println!("demo backend {name} listening on {addr}");
            }
            crate::control::shutdown_signal().await;
            Ok(())
        }
        DemoCommand::Probe(args) => probe(args).await,
    }
}

/// Serves `hello from WHO` as an HTTP response on `addr`, so `curl`, `nc`
/// and `strait demo probe` all show which workload answered.
pub async fn spawn_backend(addr: SocketAddr, who: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding demo backend {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let who = who.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
                let body = format!("hello from {who}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(())
}

/// Figures shared by the probe workers.
#[derive(Default)]
struct Figures {
    ok: u64,
    failed: u64,
    /// Latency of successful attempts, microseconds.
    latencies: Vec<u64>,
    responders: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl Figures {
    fn line(&self, target: &str) -> String {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        let pct = |p: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() - 1) as f64 * p).round() as usize;
            l[i.min(l.len() - 1)] as f64 / 1000.0
        };
        let responders: Vec<String> = self
            .responders
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        format!(
            "probe {target}: attempts={} ok={} failed={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} responders={}",
            self.ok + self.failed,
            self.ok,
            self.failed,
            pct(0.50),
            pct(0.99),
            pct(1.0),
            if responders.is_empty() {
                "-".to_string()
            } else {
                responders.join(",")
            }
        )
    }
}

/// Splits `HOST:PORT` (`[v6]:PORT` too).
fn split_target(target: &str) -> anyhow::Result<(String, u16)> {
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok((a.ip().to_string(), a.port()));
    }
    let (host, port) = target
        .rsplit_once(':')
        .with_context(|| format!("target {target:?} is not HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("target {target:?}: bad port"))?;
    Ok((host.to_string(), port))
}

fn parse_dns_server(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .with_context(|| format!("--dns {s:?}: expected IP or IP:PORT"))
}

async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let (host, port) = split_target(&args.target)?;
    let dns = args.dns.as_deref().map(parse_dns_server).transpose()?;
    let fixed_ip = host.parse::<IpAddr>().ok();
    if fixed_ip.is_none() && dns.is_none() {
        bail!("{host:?} is a name: pass --dns IP[:PORT] to resolve it (e.g. a node agent's DNS)");
    }
    let figures = Arc::new(Mutex::new(Figures::default()));
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (figures, next, stop, host) =
            (figures.clone(), next.clone(), stop.clone(), host.clone());
        let (count, interval, timeout, quiet) =
            (args.count, args.interval, args.timeout, args.quiet);
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if count != 0 && n >= count {
                    break;
                }
                let start = Instant::now();
                let result = tokio::time::timeout(timeout, async {
                    let ip = match fixed_ip {
                        Some(ip) => ip,
                        None => match dns {
                            Some(server) => resolve(&host, server).await?,
                            None => bail!("no DNS server"),
                        },
                    };
                    request(SocketAddr::new(ip, port)).await
                })
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {timeout:?}")));
                let mut f = figures.lock().await;
                match result {
                    Ok(who) => {
                        f.ok += 1;
                        f.latencies.push(start.elapsed().as_micros() as u64);
                        if !quiet {
                            println!("{who}");
                        }
                        *f.responders.entry(who).or_default() += 1;
                    }
                    Err(e) => {
                        f.failed += 1;
                        let msg = format!("{e:#}");
                        eprintln!("attempt {n} failed after {:?}: {msg}", start.elapsed());
                        *f.errors.entry(msg).or_default() += 1;
                    }
                }
                drop(f);
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            }
        });
    }
    // SIGINT/SIGTERM: workers finish the attempt in hand, then figures.
    let on_signal = tokio::spawn({
        let stop = stop.clone();
        async move {
            crate::control::shutdown_signal().await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    let report = (!args.report_every.is_zero()).then(|| {
        let (figures, target, every) = (figures.clone(), args.target.clone(), args.report_every);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                println!("{}", figures.lock().await.line(&target));
            }
        })
    });
    while workers.join_next().await.is_some() {}
    on_signal.abort();
    if let Some(r) = report {
        r.abort();
    }
    let f = figures.lock().await;
    println!("{}", f.line(&args.target));
    for (e, n) in &f.errors {
        println!("  {n} x {e}");
    }
    if f.failed > 0 {
        bail!("{} of {} attempts failed", f.failed, f.ok + f.failed);
    }
    Ok(())
}

/// One HTTP/1.0 GET; returns the response body's first line.
async fn request(addr: SocketAddr) -> anyhow::Result<String> {
    let mut sock = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    sock.write_all(b"GET / HTTP/1.0\r\nHost: strait-probe\r\n\r\n")
        .await
        .with_context(|| format!("writing to {addr}"))?;
    let mut resp = Vec::new();
    sock.read_to_end(&mut resp)
        .await
        .with_context(|| format!("reading from {addr}"))?;
    let text = String::from_utf8_lossy(&resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}: incomplete response ({} bytes)", resp.len());
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "{addr}: {}",
            head.lines().next().unwrap_or("empty status line")
        );
    }
    let line = body.lines().next().unwrap_or_default();
    Ok(line.strip_prefix("hello from ").unwrap_or(line).to_string())
}

/// The first A/AAAA address of `name` from `server`, one UDP query.
async fn resolve(name: &str, server: SocketAddr) -> anyhow::Result<IpAddr> {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let fqdn = Name::from_ascii(name).with_context(|| format!("{name:?} is not a DNS name"))?;
    let mut q = Message::query();
    q.metadata.id = rand::random();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(fqdn, RecordType::A));
    let packet = q.to_vec().context("encoding the DNS query")?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let sock = UdpSocket::bind(bind).await.context("DNS socket")?;
    sock.connect(server)
        .await
        .with_context(|| format!("DNS server {server}"))?;
    sock.send(&packet)
        .await
        .with_context(|| format!("DNS query to {server}"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .with_context(|| format!("DNS reply from {server}"))?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if reply.metadata.id != q.metadata.id {
            continue;
        }
        if reply.metadata.response_code != ResponseCode::NoError {
            bail!(
                "resolving {name} at {server}: {}",
                reply.metadata.response_code
            );
        }
        return reply
            .answers
            .iter()
            .find_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .with_context(|| format!("resolving {name} at {server}: no address"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split() {
        assert_eq!(
            split_target("10.96.0.10:80").expect("ip"),
            ("10.96.0.10".into(), 80)
        );
        assert_eq!(
            split_target("[::1]:8080").expect("v6"),
            ("::1".into(), 8080)
        );
        assert_eq!(
            split_target("web.default.svc.cluster.local:80").expect("name"),
            ("web.default.svc.cluster.local".into(), 80)
        );
        assert!(split_target("nope").is_err());
        assert!(split_target("host:port").is_err());
        assert_eq!(
            parse_dns_server("10.0.0.1").expect("ip"),
            "10.0.0.1:53".parse().expect("addr")
        );
    }

    #[tokio::test]
    async fn probe_reaches_a_backend() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        spawn_backend(addr, "unit".into()).await.expect("backend");
        assert_eq!(request(addr).await.expect("request"), "unit");
    }
}
