//! A multi-process control-plane cluster for tests: each replica is a real
//! `strait control` process on its own loopback address, reached by peers
//! and clients through a fault-injecting proxy; a client that moves between
//! replicas; and polling helpers with generous deadlines.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_proto::v1::cluster_client::ClusterClient;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{
    ApplyRequest, ClusterStatusRequest, Consistency, GetRequest, ListRequest, Object, ObjectMeta,
    Service, ServicePort, ServiceSpec, object,
};
use tonic::transport::{Channel, Endpoint};

use crate::proxy::Faults;

pub const BIN: &str = env!("CARGO_BIN_EXE_strait");
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Polls `f` until Some, panicking after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Replica {
    pub id: u64,
    pub real: SocketAddr,
    pub proxy: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Replica {
    fn spawn(&mut self) {
        // Appended: a restarted replica keeps its earlier runs' logs.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = Command::new(BIN)
            .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
            .args(&self.args)
            .env(
                "STRAIT_LOG",
                std::env::var("CHAOS_REPLICA_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn strait control");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("listening line");
        assert!(
            line.starts_with("listening on"),
            "replica {} did not start: {line:?} (log {})",
            self.id,
            self.log.display()
        );
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the running process.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            let pid = i32::try_from(c.id()).expect("pid");
            // SAFETY: kill(2) has no memory effects; `pid` is our child,
            // not yet reaped, so it cannot name another process.
            let rc = unsafe { libc::kill(pid, signal) };
            assert_eq!(rc, 0, "kill({pid}, {signal})");
        }
    }

    /// Sends SIGTERM (what `docker stop` and `systemctl stop` send) and
    /// waits for the process to exit, polling up to `within`; panics if it
    /// does not. Returns its exit status and how long it took.
    pub async fn stop_gracefully(
        &mut self,
        within: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("replica running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait for replica") {
                return (status, start.elapsed());
            }
            if start.elapsed() >= within {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "replica {} still running {within:?} after SIGTERM (log {})",
                    self.id,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a stopped replica again with the same flags and data.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "replica {} is running", self.id);
        self.spawn();
    }

    /// The exit status, once the process has ended on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("wait for replica")?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|s| s.contains(needle))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub replicas: BTreeMap<u64, Replica>,
    pub faults: Faults,
    net: u8,
    extra: Vec<String>,
    /// Data and logs; kept (and named) when a test fails.
    dir: Option<tempfile::TempDir>,
}

fn real_ip(net: u8, id: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 60, net, 10 + id as u8)
}

fn proxy_ip(net: u8, id: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 60, net, 100 + id as u8)
}

impl Cluster {
    /// Starts `n` voters on 127.60.`net`.x; `net` must be unique per test.
    pub async fn start(net: u8, n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = Faults::new();
        let mut c = Cluster {
            replicas: BTreeMap::new(),
            faults,
            net,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: Some(dir),
        };
        let peers: Vec<String> = (1..=n)
            .map(|id| format!("{id}={}:7000", proxy_ip(net, id)))
            .collect();
        for id in 1..=n {
            c.add_replica(id, Some(peers.join(",")), c.who()).await;
        }
        c.wait_leader().await;
        c
    }

    /// Starts replica `id`: bootstrapping with `peers`, or joining (None).
    pub async fn add_replica(
        &mut self,
        id: u64,
        peers: Option<String>,
        who: Arc<dyn Fn(IpAddr) -> Option<u64> + Send + Sync>,
    ) {
        let real = SocketAddr::new(real_ip(self.net, id).into(), 7000);
        let proxy = SocketAddr::new(proxy_ip(self.net, id).into(), 7000);
        self.faults.spawn(id, proxy, real, who).await;
        let data = self.data_dir(id);
        let mut args: Vec<String> = vec![
            "control".into(),
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            real.to_string(),
            "--advertise".into(),
            proxy.to_string(),
        ];
        match peers {
            Some(p) => args.extend(["--peers".into(), p]),
            None => args.push("--join".into()),
        }
        args.extend(self.extra.iter().cloned());
        let mut r = Replica {
            id,
            real,
            proxy,
            log: self.dir().join(format!("r{id}.log")),
            child: None,
            args,
        };
        r.spawn();
        self.replicas.insert(id, r);
    }

    /// Which replica a source address is (its real address), for the proxies.
    pub fn who(&self) -> Arc<dyn Fn(IpAddr) -> Option<u64> + Send + Sync> {
        let net = self.net;
        Arc::new(move |ip: IpAddr| match ip {
            IpAddr::V4(v4)
                if v4.octets()[..3] == [127, 60, net]
                    && v4.octets()[3] > 10
                    && v4.octets()[3] < 100 =>
            {
                Some(u64::from(v4.octets()[3] - 10))
            }
            _ => None,
        })
    }

    /// Replica `id`'s `--data-dir`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir().join(format!("r{id}"))
    }

    fn dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("cluster dir").path()
    }

    pub fn restart(&mut self, id: u64) {
        let r = self.replicas.get_mut(&id).expect("replica");
        r.kill();
        r.spawn();
    }

    pub fn kill(&mut self, id: u64) {
        self.replicas.get_mut(&id).expect("replica").kill();
    }

    pub fn addrs(&self) -> Vec<String> {
        self.replicas
            .values()
            .map(|r| r.proxy.to_string())
            .collect()
    }

    /// Every running replica's self-reported (role, term, applied).
    pub async fn statuses(&self) -> BTreeMap<u64, (String, u64, u64)> {
        let mut out = BTreeMap::new();
        for r in self.replicas.values().filter(|r| r.is_running()) {
            if let Some(s) = status_of(&r.real.to_string()).await
                && let Some(me) = s.members.iter().find(|m| m.id == r.id)
            {
                out.insert(r.id, (me.role.clone(), me.term, me.applied_index));
            }
        }
        out
    }

    /// The leader all running replicas that answer agree on.
    pub async fn wait_leader(&self) -> u64 {
        eventually("a leader", || async {
            let s = self.statuses().await;
            let leaders: Vec<(u64, u64)> = s
                .iter()
                .filter(|(_, v)| v.0 == "leader")
                .map(|(id, v)| (*id, v.1))
                .collect();
            match leaders.as_slice() {
                [(id, term)]
                    if s.values().filter(|v| v.1 == *term).count() * 2 > self.replicas.len() =>
                {
                    Some(*id)
                }
                _ => None,
            }
        })
        .await
    }

    /// Waits until every running replica (a restarted one included) has
    /// applied at least what the most advanced one had applied when this
    /// was called. Unlike [`converged`](Self::converged) it holds under a
    /// running load, whose writes keep replicas from ever being equal at
    /// one instant.
    pub async fn caught_up(&self) {
        let running = self.replicas.values().filter(|r| r.is_running()).count();
        let target = eventually("every running replica's status", || async {
            let s = self.statuses().await;
            (s.len() == running).then(|| s.values().map(|v| v.2).max().unwrap_or(0))
        })
        .await;
        eventually("replicas to catch up", || async {
            let s = self.statuses().await;
            (s.len() == running && s.values().all(|v| v.2 >= target)).then_some(())
        })
        .await;
    }

    /// Waits until every running replica has applied the same index and
    /// holds the same objects; returns those objects. Needs writes stopped.
    pub async fn converged(&self) -> Vec<Object> {
        eventually("replicas to converge", || async {
            let mut lists = Vec::new();
            for r in self.replicas.values().filter(|r| r.is_running()) {
                lists.push(list_local(&r.real.to_string()).await?);
            }
            let first = lists.first()?.clone();
            lists.iter().all(|l| *l == first).then_some(first.1)
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            for r in self.replicas.values_mut() {
                r.kill();
            }
            eprintln!("replica data and logs kept in {}", dir.keep().display());
        }
    }
}

pub async fn status_of(addr: &str) -> Option<strait_proto::v1::ClusterStatusResponse> {
    let ch = channel(addr).await?;
    let mut req = tonic::Request::new(ClusterStatusRequest {});
    req.set_timeout(Duration::from_secs(2));
    ClusterClient::new(ch)
        .status(req)
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The replica's own state: (revision, objects), serializable.
pub async fn list_local(addr: &str) -> Option<(u64, Vec<Object>)> {
    let ch = channel(addr).await?;
    let mut req = tonic::Request::new(ListRequest {
        kind: String::new(),
        namespace: String::new(),
        consistency: Consistency::Serializable as i32,
    });
    req.set_timeout(Duration::from_secs(5));
    let r = ResourcesClient::new(ch).list(req).await.ok()?.into_inner();
    Some((r.revision, r.items))
}

/// A watch of Services on the replica at `addr` from `revision` (0: the
/// full state first); panics when the replica cannot be reached.
pub async fn watch_services(
    addr: &str,
    revision: u64,
) -> tonic::Streaming<strait_proto::v1::WatchResponse> {
    let ch = channel(addr).await.expect("channel");
    ResourcesClient::new(ch)
        .watch(strait_proto::v1::WatchRequest {
            kinds: vec!["Service".into()],
            revision,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Runs the `strait` CLI with `args` against `servers`, in that order,
/// without holding up a runtime worker (the proxies run on it).
pub async fn cli_with_servers(servers: &[SocketAddr], args: &[&str]) -> std::process::Output {
    let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
    tokio::process::Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .env("STRAIT_SERVER", servers.join(","))
        .args(args)
        .output()
        .await
        .expect("run strait")
}

pub async fn channel(addr: &str) -> Option<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

/// A headless Service carrying `value` in annotation `v`. Headless, because
/// a load writes thousands of unique Services, more than the ClusterIPs a
/// test's /24 service CIDR holds (every apply after that would be refused
/// with "range is full").
pub fn service(name: &str, value: u64) -> Object {
    Service {
        metadata: Some(ObjectMeta {
            name: name.into(),
            annotations: BTreeMap::from([("v".to_string(), value.to_string())]),
            ..Default::default()
        }),
        spec: Some(ServiceSpec {
            cluster_ip: "None".into(),
            ports: vec![ServicePort {
                port: 80,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
    .into()
}

/// Outcome of one client operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok(u64),
    /// It may or may not have happened.
    Unknown,
}

/// A client that moves to another replica when one fails.
pub struct Client {
    addrs: Vec<String>,
    next: usize,
    timeout: Duration,
}

impl Client {
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            next: 0,
            timeout: Duration::from_secs(5),
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    async fn resources(&mut self) -> Option<ResourcesClient<Channel>> {
        for _ in 0..self.addrs.len() {
            let addr = self.addrs[self.next % self.addrs.len()].clone();
            if let Some(ch) = channel(&addr).await {
                return Some(ResourcesClient::new(ch));
            }
            self.next += 1;
        }
        None
    }

    /// One attempt to apply; returns the revision, or Unknown.
    pub async fn apply(&mut self, o: Object) -> Outcome {
        let Some(mut c) = self.resources().await else {
            return Outcome::Unknown;
        };
        let mut req = tonic::Request::new(ApplyRequest { object: Some(o) });
        req.set_timeout(self.timeout);
        match c.apply(req).await {
            Ok(r) => Outcome::Ok(r.into_inner().revision),
            Err(_) => {
                self.next += 1;
                Outcome::Unknown
            }
        }
    }

    /// Applies `o` until it is acknowledged, through elections (applying
    /// the same object again is harmless); panics after `DEADLINE`.
    pub async fn apply_until_ok(&mut self, o: &Object) -> u64 {
        let start = Instant::now();
        loop {
            if let Outcome::Ok(rev) = self.apply(o.clone()).await {
                return rev;
            }
            assert!(start.elapsed() < DEADLINE, "a write never acknowledged");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Linearizable read of annotation `v` of Service `name` (0 = absent).
    pub async fn read(&mut self, name: &str) -> Option<u64> {
        let mut c = self.resources().await?;
        let mut req = tonic::Request::new(GetRequest {
            kind: "Service".into(),
            namespace: "default".into(),
            name: name.into(),
            consistency: 0,
        });
        req.set_timeout(self.timeout);
        match c.get(req).await {
            Ok(r) => Some(value_of(r.into_inner().object.as_ref())),
            Err(s) if s.code() == tonic::Code::NotFound => Some(0),
            Err(_) => {
                self.next += 1;
                None
            }
        }
    }
}

pub fn value_of(o: Option<&Object>) -> u64 {
    match o.and_then(|o| o.kind.as_ref()) {
        Some(object::Kind::Service(s)) => s
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.get("v"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

pub fn names(objs: &[Object]) -> std::collections::BTreeSet<String> {
    objs.iter()
        .filter(|o| o.kind() == Some(strait_proto::Kind::Service))
        .map(|o| o.name().to_string())
        .collect()
}

/// `strait get svc -w --output-watch-events` against `servers`, in order.
pub struct CliWatch {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Names shown as ADDED, in order.
    pub added: Vec<String>,
}

impl CliWatch {
    pub async fn start(servers: &[std::net::SocketAddr]) -> CliWatch {
        use tokio::io::AsyncBufReadExt;
        let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
        let mut child = tokio::process::Command::new(BIN)
            .env("STRAIT_INSECURE", "1")
            .env("STRAIT_SERVER", servers.join(","))
            .args(["get", "svc", "-w", "--output-watch-events"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn strait get -w");
        let stdout = child.stdout.take().expect("stdout");
        let mut w = CliWatch {
            _child: child,
            lines: tokio::io::BufReader::new(stdout).lines(),
            added: Vec::new(),
        };
        // The header once the list is done (rows for what exists follow).
        let header = w.line().await;
        assert!(header.starts_with("EVENT"), "{header}");
        w
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("strait get -w printed nothing before the deadline")
            .expect("read stdout")
            .expect("strait get -w ended")
    }

    /// Reads rows until every name in `want` was shown as ADDED; a name
    /// shown twice fails the test.
    pub async fn added_until(&mut self, want: &[String]) {
        while !want.iter().all(|n| self.added.contains(n)) {
            let line = self.line().await;
            let mut cells = line.split_whitespace();
            let (event, name) = (cells.next(), cells.next().unwrap_or_default().to_string());
            assert_eq!(event, Some("ADDED"), "{line}");
            assert!(!self.added.contains(&name), "{name} shown twice: {line}");
            self.added.push(name);
        }
    }
}
