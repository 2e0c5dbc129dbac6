//! `propagation`: how fast a committed change reaches node agents.
//!
//! 1. Fan-out: a control plane of 3 replicas (in this process, on
//!    loopback), `--watchers` simulated node agents (one gRPC connection and
//!    one Watch stream each, spread over the replicas), and a stream of
//!    endpoint changes (a Pod re-applied with a new address, so its
//!    Service's derived EndpointSlice changes). For every delivered revision
//!    it records the leader's commit time → the watcher receiving it.
//! 2. Programming: a real node agent (`strait_node::build`) in front of a
//!    ClusterIP Service whose only Pod moves to a new backend each round;
//!    it records `strait apply` returning → the first new connection
//!    through the ClusterIP reaching the new backend.
//!
//! Everything shares one host clock, so timestamps compare directly. The
//! commit time of a revision is when the first replica (the leader) applied
//! it, read from the replicas' watch history after the run; the time the
//! write carries (`commit_time_unix_nanos`, stamped when the write was
//! accepted, before the Raft round) is reported alongside. The simulated
//! watchers decode only a response's revision and times, skipping the
//! events, since they share the cores with the replicas. Prints a Markdown
//! table.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{ApplyRequest, WatchRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "Commit → watcher and apply → forwarding propagation benchmark")]
struct Args {
    /// Simulated node watchers.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Endpoint changes written during the fan-out phase.
    #[arg(long, default_value_t = 300)]
    changes: usize,
    /// Endpoint changes per second during the fan-out phase.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Rounds of the apply → forwarding phase.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// Watchers decode every response whole, objects included, as a node
    /// agent does (by default they skip the events).
    #[arg(long)]
    full_decode: bool,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // Microseconds, up to 60 s.
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn row(name: &str, h: &Histogram<u64>, goal: &str) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {goal} |",
        h.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    )
}

fn pod(name: &str, app: &str, ip: &str, port: u16) -> strait_proto::v1::Object {
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\n\
         spec:\n  nodeName: bench-node\n  containers:\n  - name: c\n    ports: [{{name: app, containerPort: {port}}}]\n\
         status: {{podIP: {ip}}}\n"
    );
    strait_proto::manifest::parse(&yaml)
        .ok()
        .and_then(|v| v.into_iter().next())
        .unwrap_or_default()
}

fn service(name: &str) -> anyhow::Result<strait_proto::v1::Object> {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{name: app, port: 8080, targetPort: app}}]\n"
    );
    strait_proto::manifest::parse(&yaml)?
        .into_iter()
        .next()
        .context("service manifest")
}

async fn apply(
    c: &mut ResourcesClient<Channel>,
    o: strait_proto::v1::Object,
) -> anyhow::Result<()> {
    c.apply(ApplyRequest { object: Some(o) })
        .await
        .map_err(|s| anyhow::anyhow!("apply: {s}"))?;
    Ok(())
}

async fn client(addr: &str) -> anyhow::Result<ResourcesClient<Channel>> {
    let ch = strait_proto::tls::endpoint(addr)?.connect().await?;
    Ok(ResourcesClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

/// Starts 3 replicas on loopback; returns their addresses and handles.
async fn control_plane(
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<String>, Vec<strait_control::app::Bound>)> {
    let ports = [free_port()?, free_port()?, free_port()?];
    let peers: BTreeMap<u64, String> = (1..=3u64)
        .map(|id| (id, format!("127.0.0.1:{}", ports[id as usize - 1])))
        .collect();
    let mut bound = Vec::new();
    for (id, addr) in &peers {
        let cfg = strait_control::app::Config {
            id: *id,
            data_dir: dir.join(format!("c{id}")),
            listen: addr.parse()?,
            peers: peers.clone(),
            service_cidr: "127.130.0.0/16".parse()?,
            watch_history: 100_000,
            ..Default::default()
        };
        bound.push(strait_control::app::build(cfg).await?);
    }
    for b in &bound {
        strait_control::app::wait_for_leader(&b.raft, Duration::from_secs(30))
            .await
            .context("no leader elected")?;
    }
    Ok((peers.into_values().collect(), bound))
}

/// The fields of a `WatchResponse` a simulated watcher reads; the events
/// (field 2) are skipped undecoded.
#[derive(Clone, PartialEq, prost::Message)]
struct WatchHead {
    #[prost(uint64, tag = "1")]
    revision: u64,
    #[prost(bool, tag = "3")]
    initial: bool,
    #[prost(int64, tag = "4")]
    commit_time_unix_nanos: i64,
}

/// What a watcher needs from a response, however much of it was decoded.
trait Head: prost::Message + Default + Send + 'static {
    fn head(&self) -> WatchHead;
}

impl Head for WatchHead {
    fn head(&self) -> WatchHead {
        self.clone()
    }
}

impl Head for strait_proto::v1::WatchResponse {
    fn head(&self) -> WatchHead {
        WatchHead {
            revision: self.revision,
            initial: self.initial,
            commit_time_unix_nanos: self.commit_time_unix_nanos,
        }
    }
}

/// One delivered revision: (revision, time the write carries, received).
type Sample = (u64, i64, i64);

/// `Resources.Watch`, decoding responses as `M`.
async fn watch_as<M: Head>(addr: &str, req: WatchRequest) -> anyhow::Result<tonic::Streaming<M>> {
    let ch = strait_proto::tls::endpoint(addr)?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| anyhow::anyhow!("watch channel to {addr}: {e}"))?;
    let path = PathAndQuery::from_static("/strait.v1.Resources/Watch");
    let codec = tonic_prost::ProstCodec::<WatchRequest, M>::default();
    Ok(grpc
        .server_streaming(tonic::Request::new(req), path, codec)
        .await?
        .into_inner())
}

/// One simulated node: watches and records every revision it receives.
async fn watcher<M: Head>(
    addr: String,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Vec<Sample>> {
    let req = WatchRequest {
        kinds: vec!["Service".into(), "EndpointSlice".into()],
        revision: 0,
    };
    let mut stream = watch_as::<M>(&addr, req).await?;
    match stream.message().await?.map(|m| m.head()) {
        Some(first) if first.initial => {}
        _ => bail!("watch did not start with the initial state"),
    }
    // The receiver goes away once every watcher is ready.
    let _ = ready.send(()).await;
    let mut samples = Vec::new();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = stream.message() => m?,
        };
        let Some(resp) = msg.map(|m| m.head()) else {
            break;
        };
        // Progress bookmarks carry no commit time.
        if resp.commit_time_unix_nanos > 0 {
            samples.push((resp.revision, resp.commit_time_unix_nanos, now_nanos()));
        }
    }
    Ok(samples)
}

/// Latencies of the fan-out phase: from the leader's commit, and from the
/// stamp the write carries.
struct FanOut {
    from_commit: Histogram<u64>,
    from_stamp: Histogram<u64>,
}

fn record(h: &mut Histogram<u64>, nanos: i64) -> anyhow::Result<()> {
    let us = u64::try_from(nanos / 1000).unwrap_or(0).max(1);
    h.record(us)?;
    Ok(())
}

async fn fan_out(
    args: &Args,
    addrs: &[String],
    replicas: &[strait_control::app::Bound],
) -> anyhow::Result<FanOut> {
    let (ready, mut ready_rx) = tokio::sync::mpsc::channel(args.watchers.max(1));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.watchers {
        let addr = addrs[i % addrs.len()].clone();
        if args.full_decode {
            tasks.spawn(watcher::<strait_proto::v1::WatchResponse>(
                addr,
                ready.clone(),
                stop.clone(),
            ));
        } else {
            tasks.spawn(watcher::<WatchHead>(addr, ready.clone(), stop.clone()));
        }
    }
    // Every watcher has its initial state; one that failed first (a refused
    // connection, say) ends the run with its error instead of a hang.
    for _ in 0..args.watchers {
        tokio::select! {
            r = ready_rx.recv() => r.context("watchers gone")?,
            Some(r) = tasks.join_next() => {
                r??;
                bail!("a watcher ended before the changes began");
            }
        }
    }
    drop(ready_rx);
    eprintln!(
        "{} watchers connected; writing {} changes",
        args.watchers, args.changes
    );
    let mut c = client(&addrs[0]).await?;
    apply(&mut c, service("fan")?).await?;
    let every = Duration::from_secs_f64(1.0 / args.rate.max(0.1));
    let mut tick = tokio::time::interval(every);
    for i in 0..args.changes {
        tick.tick().await;
        let ip = format!("10.{}.{}.{}", 1 + i / 65_536 % 200, i / 256 % 256, i % 256);
        apply(&mut c, pod("fan-0", "fan", &ip, 8080)).await?;
    }
    // Let the last revisions arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut samples = Vec::new();
    while let Some(r) = tasks.join_next().await {
        samples.extend(r??);
    }
    // The leader applies a revision first; followers learn of the commit
    // later. A revision no replica retains any more is not counted.
    let committed = |revision: u64| {
        replicas
            .iter()
            .filter_map(|b| strait_control::watch::read(&b.shared).applied_at(revision))
            .min()
    };
    let mut commit_times = BTreeMap::new();
    let mut out = FanOut {
        from_commit: histogram()?,
        from_stamp: histogram()?,
    };
    for (revision, stamp, received) in samples {
        let commit = *commit_times
            .entry(revision)
            .or_insert_with(|| committed(revision));
        if let Some(commit) = commit {
            record(&mut out.from_commit, received - commit)?;
        }
        record(&mut out.from_stamp, received - stamp)?;
    }
    Ok(out)
}

/// A backend answering every connection with `id\n`.
async fn backend(id: usize) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(format!("{id}\n").as_bytes()).await;
        }
    });
    Ok((port, task))
}

async fn who(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf).trim().to_string())
}

async fn programming(
    args: &Args,
    addrs: &[String],
    dir: &std::path::Path,
) -> anyhow::Result<Histogram<u64>> {
    let node = strait_node::build(strait_node::Config {
        name: "bench-node".into(),
        control: addrs.to_vec(),
        node_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        data_dir: dir.join("node"),
        ..Default::default()
    })
    .await?;
    let mut c = client(&addrs[0]).await?;
    let resp = c
        .apply(ApplyRequest {
            object: Some(service("fwd")?),
        })
        .await?
        .into_inner();
    let ip = match resp.object.and_then(|o| o.kind) {
        Some(strait_proto::v1::object::Kind::Service(s)) => s
            .spec
            .map(|s| s.cluster_ip)
            .context("service without spec")?,
        _ => bail!("apply answered no Service"),
    };
    let vip = SocketAddr::new(ip.parse()?, 8080);
    let mut h = histogram()?;
    let mut previous = None;
    for round in 0..=args.rounds {
        let (port, task) = backend(round).await?;
        let started = Instant::now();
        apply(&mut c, pod("fwd-0", "fwd", "127.0.0.1", port)).await?;
        let want = round.to_string();
        let deadline = started + Duration::from_secs(30);
        loop {
            if who(vip).await.as_deref() == Some(want.as_str()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("round {round}: the node never forwarded to the new endpoint");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Round 0 also waits for the listener itself: not counted.
        if round > 0 {
            h.record(
                u64::try_from(started.elapsed().as_micros())
                    .unwrap_or(1)
                    .max(1),
            )?;
        }
        if let Some(t) = previous.replace(task) {
            let t: tokio::task::JoinHandle<()> = t;
            t.abort();
        }
    }
    node.shutdown().await;
    Ok(h)
}

/// CPU time this process has used (user + system), from `/proc/self/stat`
/// (in clock ticks of 1/100 s, the fixed USER_HZ of that file).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (addrs, replicas) = control_plane(dir.path()).await?;
    let load_before = load_average();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let fan = fan_out(&args, &addrs, &replicas).await?;
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| format!("{:.1}", after - before))
        .unwrap_or_else(|| "unknown".into());
    let wall = started.elapsed().as_secs_f64();
    let load_after = load_average();
    let prog = programming(&args, &addrs, dir.path()).await?;
    println!(
        "{} watchers over 3 replicas ({}), {} endpoint changes at {}/s; {} apply → forwarding rounds; \
         load average {load_before} before the fan-out, {load_after} after; \
         the fan-out took {wall:.1} s and {cpu} CPU-seconds (replicas, watchers and writer)\n",
        args.watchers,
        if args.full_decode {
            "decoding whole responses"
        } else {
            "decoding revision and times only"
        },
        args.changes,
        args.rate,
        args.rounds
    );
    println!("| path | samples | p50 ms | p90 ms | p99 ms | max ms | goal |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "{}",
        row(
            "leader commit → delivered to a watcher",
            &fan.from_commit,
            "p99 ≤ 100 ms"
        )
    );
    println!(
        "{}",
        row(
            "write accepted (commit_time_unix_nanos) → delivered to a watcher",
            &fan.from_stamp,
            "—"
        )
    );
    println!(
        "{}",
        row(
            "apply → node forwarding to the new endpoint",
            &prog,
            "p99 ≤ 250 ms"
        )
    );
    for r in replicas {
        r.shutdown().await;
    }
    Ok(())
}
