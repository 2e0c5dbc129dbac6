//! Readiness probes for the Pods bound to this node (tcpSocket, httpGet,
//! exec, with Kubernetes' timing and thresholds). Only transitions are
//! written to the control plane — the Pod's Ready condition, with its
//! resourceVersion so an operator's concurrent edit is never overwritten —
//! and the control plane updates the EndpointSlices in the same revision.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use strait_proto::tls::Transport;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{
    ApplyRequest, Condition, EventType, Object, Pod, Probe, WatchRequest, int_or_string, object,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

/// What one probe attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure(String),
}

/// Where a Pod is probed: its podIP, else the node's address.
fn pod_host(pod: &Pod, node_ip: IpAddr) -> IpAddr {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.parse().ok())
        .unwrap_or(node_ip)
}

/// A probe port: a number, or a container port name.
fn resolve_port(pod: &Pod, port: Option<&strait_proto::v1::IntOrString>) -> Option<u16> {
    match port?.value.as_ref()? {
        int_or_string::Value::IntVal(v) => u16::try_from(*v).ok(),
        int_or_string::Value::StrVal(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .find(|p| p.name == *name)
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs one probe attempt, bounded by the probe's timeout.
pub async fn probe_once(pod: &Pod, probe: &Probe, node_ip: IpAddr) -> Verdict {
    let timeout = Duration::from_secs(u64::try_from(probe.timeout_seconds.max(1)).unwrap_or(1));
    match tokio::time::timeout(timeout, attempt(pod, probe, node_ip)).await {
        Ok(v) => v,
        Err(_) => Verdict::Failure(format!("timed out after {timeout:?}")),
    }
}

async fn attempt(pod: &Pod, probe: &Probe, node_ip: IpAddr) -> Verdict {
    let host = |h: &str| {
        h.parse::<IpAddr>()
            .unwrap_or_else(|_| pod_host(pod, node_ip))
    };
    if let Some(t) = &probe.tcp_socket {
        let Some(port) = resolve_port(pod, t.port.as_ref()) else {
            return Verdict::Failure("tcpSocket port does not resolve".into());
        };
        return match TcpStream::connect(SocketAddr::new(host(&t.host), port)).await {
            Ok(_) => Verdict::Success,
            Err(e) => Verdict::Failure(format!("dial tcp: {e}")),
        };
    }
    if let Some(h) = &probe.http_get {
        let Some(port) = resolve_port(pod, h.port.as_ref()) else {
            return Verdict::Failure("httpGet port does not resolve".into());
        };
        let addr = SocketAddr::new(host(&h.host), port);
        return http_get(addr, if h.path.is_empty() { "/" } else { &h.path }).await;
    }
    if let Some(e) = &probe.exec {
        let Some((cmd, args)) = e.command.split_first() else {
            return Verdict::Failure("exec command is empty".into());
        };
        return match tokio::process::Command::new(cmd)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
        {
            Ok(s) if s.success() => Verdict::Success,
            Ok(s) => Verdict::Failure(format!("command exited with {s}")),
            Err(e) => Verdict::Failure(format!("command failed to start: {e}")),
        };
    }
    Verdict::Failure("probe has no handler".into())
}

/// HTTP/1.1 GET; 200–399 is success, as for the kubelet.
async fn http_get(addr: SocketAddr, path: &str) -> Verdict {
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Verdict::Failure(format!("dial tcp {addr}: {e}")),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: strait-probe\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return Verdict::Failure(format!("write: {e}"));
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Verdict::Failure(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(c) if (200..400).contains(&c) => Verdict::Success,
        Some(c) => Verdict::Failure(format!("HTTP probe failed with statuscode: {c}")),
        None => Verdict::Failure("malformed HTTP response".into()),
    }
}

/// Success/failure counting with Kubernetes' thresholds.
#[derive(Debug, Clone)]
pub struct Tracker {
    ready: bool,
    successes: i32,
    failures: i32,
}

impl Tracker {
    /// Probed Pods start not ready.
    pub fn new() -> Self {
        Self {
            ready: false,
            successes: 0,
            failures: 0,
        }
    }

    /// Records a result; returns the new readiness when it changed.
    pub fn record(&mut self, probe: &Probe, v: &Verdict) -> Option<bool> {
        match v {
            Verdict::Success => {
                self.successes += 1;
                self.failures = 0;
                if !self.ready && self.successes >= probe.success_threshold.max(1) {
                    self.ready = true;
                    return Some(true);
                }
            }
            Verdict::Failure(_) => {
                self.failures += 1;
                self.successes = 0;
                if self.ready && self.failures >= probe.failure_threshold.max(1) {
                    self.ready = false;
                    return Some(false);
                }
            }
        }
        None
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

fn readiness_probe(pod: &Pod) -> Option<Probe> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find_map(|c| c.readiness_probe.clone())
}

fn pod_ready(pod: &Pod) -> Option<bool> {
    pod.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .map(|c| c.status == "True")
}

type Key = (String, String);

fn key(pod: &Pod) -> Key {
    let m = pod.metadata.clone().unwrap_or_default();
    (m.namespace, m.name)
}

/// The handler a probe uses, as a metric label.
fn probe_kind(probe: &Probe) -> &'static str {
    if probe.tcp_socket.is_some() {
        "tcp"
    } else if probe.http_get.is_some() {
        "http"
    } else if probe.exec.is_some() {
        "exec"
    } else {
        "none"
    }
}

/// The probing side of the agent.
pub struct Prober {
    node: String,
    node_ip: IpAddr,
    /// One lazily connected client per `--control` replica, kept for the
    /// agent's life, so a status write reuses a connection.
    clients: Vec<(String, ResourcesClient<Channel>)>,
    /// The replica the last status write went through: the next starts
    /// there instead of waiting on a dead first replica every time.
    preferred: AtomicUsize,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The latest stored version of each Pod bound to this node.
type Pods = Arc<Mutex<BTreeMap<Key, Pod>>>;

impl Prober {
    /// Addresses that do not parse are left out (the watch client reports
    /// them at startup).
    pub fn new(node: String, node_ip: IpAddr, control: Vec<String>, transport: Transport) -> Self {
        let clients = control
            .into_iter()
            .filter_map(|addr| {
                let ep = crate::control::endpoint(&addr).ok()?;
                Some((addr, ResourcesClient::new(transport.lazy(ep, None))))
            })
            .collect();
        Self {
            node,
            node_ip,
            clients,
            preferred: AtomicUsize::new(0),
            metrics: Arc::default(),
        }
    }

    /// Counts probe results into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Follows this node's Pods and keeps one probe task per probed Pod.
    pub async fn run(self, stop: CancellationToken) {
        let pods: Pods = Arc::default();
        let this = Arc::new(self);
        let mut tasks: HashMap<Key, (Probe, CancellationToken)> = HashMap::new();
        let mut attempt = 0usize;
        let mut backoff = Duration::from_millis(200);
        while !stop.is_cancelled() {
            let Some((addr, client)) = this.clients.get(attempt % this.clients.len().max(1)) else {
                return;
            };
            let (addr, mut client) = (addr.clone(), client.clone());
            attempt += 1;
            let stream = tokio::time::timeout(
                crate::watch::WATCH_SILENCE,
                client.watch(WatchRequest {
                    kinds: vec!["Pod".into()],
                    revision: 0,
                }),
            )
            .await;
            let mut stream = match stream {
                Ok(Ok(s)) => s.into_inner(),
                Err(_) => {
                    debug!(control = %addr, "pod watch got no answer; moving on");
                    continue;
                }
                Ok(Err(e)) => {
                    debug!(control = %addr, error = %e, "pod watch failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = tokio::time::timeout(crate::watch::WATCH_SILENCE, stream.next()) => m,
                };
                let Ok(Some(Ok(resp))) = msg else {
                    debug!(control = %addr, "pod watch ended or went silent; moving on");
                    break;
                };
                {
                    let mut map = pods.lock().await;
                    if resp.initial {
                        map.clear();
                    }
                    for e in resp.events {
                        let Some(Object {
                            kind: Some(object::Kind::Pod(p)),
                        }) = e.object
                        else {
                            continue;
                        };
                        let mine = p.spec.as_ref().is_some_and(|s| s.node_name == this.node);
                        if e.r#type == EventType::Deleted as i32 || !mine {
                            map.remove(&key(&p));
                        } else {
                            map.insert(key(&p), p);
                        }
                    }
                    // Start, restart (probe changed) or stop probe tasks.
                    let wanted: HashMap<Key, Probe> = map
                        .iter()
                        .filter_map(|(k, p)| readiness_probe(p).map(|pr| (k.clone(), pr)))
                        .collect();
                    tasks.retain(|k, (probe, token)| {
                        let keep = wanted.get(k) == Some(probe);
                        if !keep {
                            token.cancel();
                        }
                        keep
                    });
                    for (k, probe) in wanted {
                        if tasks.contains_key(&k) {
                            continue;
                        }
                        let token = stop.child_token();
                        tasks.insert(k.clone(), (probe.clone(), token.clone()));
                        tokio::spawn(probe_loop(this.clone(), pods.clone(), k, probe, token));
                    }
                }
            }
        }
    }

    /// Writes the Pod's Ready condition; false when it must be retried.
    async fn write_ready(&self, pod: &Pod, ready: bool, why: &str) -> bool {
        let mut p = pod.clone();
        let status = p.status.get_or_insert_default();
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        status.conditions.retain(|c| c.r#type != "Ready");
        status.conditions.push(Condition {
            r#type: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            last_transition_time: now,
            reason: if ready {
                "ProbeSucceeded"
            } else {
                "ProbeFailed"
            }
            .into(),
            message: why.into(),
            ..Default::default()
        });
        let first = self.preferred.load(Ordering::Relaxed);
        for i in (0..self.clients.len()).map(|k| (first + k) % self.clients.len()) {
            let (addr, mut c) = (&self.clients[i].0, self.clients[i].1.clone());
            let mut req = tonic::Request::new(ApplyRequest {
                object: Some(p.clone().into()),
            });
            req.set_timeout(Duration::from_secs(5));
            match c.apply(req).await {
                Ok(_) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return true;
                }
                // Someone changed the Pod: the watch brings the new version.
                Err(s) if s.code() == tonic::Code::Aborted => return false,
                Err(s) if s.code() == tonic::Code::NotFound => return true,
                Err(e) => debug!(control = %addr, error = %e, "pod status write failed"),
            }
        }
        false
    }
}

async fn probe_loop(
    prober: Arc<Prober>,
    pods: Pods,
    k: Key,
    probe: Probe,
    stop: CancellationToken,
) {
    let period = Duration::from_secs(u64::try_from(probe.period_seconds.max(1)).unwrap_or(1));
    let delay = Duration::from_secs(u64::try_from(probe.initial_delay_seconds.max(0)).unwrap_or(0));
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(delay) => {}
    }
    let mut tracker = Tracker::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(pod) = pods.lock().await.get(&k).cloned() else {
            return;
        };
        let verdict = probe_once(&pod, &probe, prober.node_ip).await;
        prober
            .metrics
            .probe_result(probe_kind(&probe), verdict == Verdict::Success);
        let changed = tracker.record(&probe, &verdict);
        // Write on a transition, or when the stored condition disagrees
        // (a write lost to a conflict, or a restarted agent).
        let want = tracker.ready;
        let stored = pod_ready(&pod);
        let counted = tracker.successes >= probe.success_threshold.max(1)
            || tracker.failures >= probe.failure_threshold.max(1);
        if changed.is_some() || (counted && stored != Some(want)) {
            let why = match &verdict {
                Verdict::Success => "readiness probe succeeded".to_string(),
                Verdict::Failure(e) => format!("readiness probe failed: {e}"),
            };
            if prober.write_ready(&pod, want, &why).await {
                info!(pod = %k.1, namespace = %k.0, ready = want, reason = %why, "pod readiness changed");
            } else {
                warn!(pod = %k.1, "pod readiness not written yet; retrying next period");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(success: i32, failure: i32) -> Probe {
        Probe {
            success_threshold: success,
            failure_threshold: failure,
            ..Default::default()
        }
    }

    #[test]
    fn thresholds() {
        let p = probe(2, 3);
        let mut t = Tracker::new();
        assert_eq!(t.record(&p, &Verdict::Success), None);
        assert_eq!(t.record(&p, &Verdict::Success), Some(true));
        assert_eq!(t.record(&p, &Verdict::Failure("x".into())), None);
        assert_eq!(t.record(&p, &Verdict::Failure("x".into())), None);
        assert_eq!(t.record(&p, &Verdict::Failure("x".into())), Some(false));
    }

    #[tokio::test]
    async fn tcp_http_and_exec_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            }
        });
        let pod = Pod {
            status: Some(strait_proto::v1::PodStatus {
                pod_ip: "127.0.0.1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ip = IpAddr::from([127, 0, 0, 1]);
        let port_ref = Some(strait_proto::v1::IntOrString::int(i32::from(port)));
        let tcp = Probe {
            tcp_socket: Some(strait_proto::v1::TcpSocketAction {
                port: port_ref.clone(),
                host: String::new(),
            }),
            timeout_seconds: 5,
            ..Default::default()
        };
        assert_eq!(probe_once(&pod, &tcp, ip).await, Verdict::Success);
        let http = Probe {
            http_get: Some(strait_proto::v1::HttpGetAction {
                path: "/healthz".into(),
                port: port_ref,
                ..Default::default()
            }),
            timeout_seconds: 5,
            ..Default::default()
        };
        assert_eq!(probe_once(&pod, &http, ip).await, Verdict::Success);
        let exec_ok = Probe {
            exec: Some(strait_proto::v1::ExecAction {
                command: vec!["true".into()],
            }),
            timeout_seconds: 5,
            ..Default::default()
        };
        assert_eq!(probe_once(&pod, &exec_ok, ip).await, Verdict::Success);
        let exec_bad = Probe {
            exec: Some(strait_proto::v1::ExecAction {
                command: vec!["false".into()],
            }),
            timeout_seconds: 5,
            ..Default::default()
        };
        assert!(matches!(
            probe_once(&pod, &exec_bad, ip).await,
            Verdict::Failure(_)
        ));
        // A closed port fails.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let cport = closed.local_addr().expect("addr").port();
        drop(closed);
        let tcp_closed = Probe {
            tcp_socket: Some(strait_proto::v1::TcpSocketAction {
                port: Some(strait_proto::v1::IntOrString::int(i32::from(cport))),
                host: String::new(),
            }),
            timeout_seconds: 5,
            ..Default::default()
        };
        assert!(matches!(
            probe_once(&pod, &tcp_closed, ip).await,
            Verdict::Failure(_)
        ));
    }
}
