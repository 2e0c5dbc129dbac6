//! The data plane beside a replicated control plane: node agents and
//! greeter backends from the data-plane suite's harness, a Service over
//! them, and a client loop through its ClusterIP counting failed
//! connections while the control plane is being hurt.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_proto::v1::NodeStatusRequest;
use strait_proto::v1::cluster_client::ClusterClient;

pub use crate::dp::{Backend, Net, Node, pod, service, who};
use crate::harness::{BIN, Cluster, channel, eventually};

/// Starts 3 replicas on 127.60.`cluster_net`.x that allocate from `net`'s
/// ranges, with `extra` flags.
pub async fn cluster_for(cluster_net: u8, net: &Net, extra: &[&str]) -> Cluster {
    let mut flags = vec![
        "--service-cidr",
        net.service_cidr.as_str(),
        "--lb-pool",
        net.lb_pool.as_str(),
    ];
    flags.extend_from_slice(extra);
    Cluster::start(cluster_net, 3, &flags).await
}

/// Runs `strait ARGS` against every replica of `cluster`, expecting success.
pub fn cli(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .env("STRAIT_SERVER", cluster.addrs().join(","))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn strait");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("strait");
    assert!(
        out.status.success(),
        "strait {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One node agent named `node-1` in front of two greeters behind Service
/// `web`, reached through its ClusterIP.
pub struct DataPlane {
    pub node: Node,
    /// Kept alive as long as the data plane.
    _backends: Vec<Backend>,
    pub addr: String,
}

impl DataPlane {
    pub fn start(cluster: &Cluster, net: &Net, dir: &Path) -> DataPlane {
        let node = Node::start("node-1", net, &cluster.addrs().join(","), dir);
        let backends: Vec<Backend> = ["g1", "g2"].map(Backend::greeter).into();
        let yaml = format!(
            "{}{}{}",
            service("web", "ClusterIP", "app: web"),
            pod(&backends[0], "app: web"),
            pod(&backends[1], "app: web")
        );
        cli(cluster, &["apply", "-f", "-"], Some(&yaml));
        let svc: serde_json::Value =
            serde_json::from_str(&cli(cluster, &["get", "svc", "web", "-o", "json"], None))
                .expect("service json");
        let ip = svc["spec"]["clusterIP"].as_str().expect("clusterIP");
        let addr = format!("{ip}:8080");
        crate::dp::eventually("the ClusterIP to forward", || who(&addr).ok());
        DataPlane {
            node,
            _backends: backends,
            addr,
        }
    }
}

/// Waits until the leader reports every node agent at its own revision:
/// the node converged to the leader's state.
pub async fn nodes_converged(cluster: &Cluster) -> u64 {
    let leader = cluster.wait_leader().await;
    let addr = cluster.replicas[&leader].real.to_string();
    eventually("node agents at the leader's revision", || async {
        let mut c = ClusterClient::new(channel(&addr).await?);
        let s = c.node_status(NodeStatusRequest {}).await.ok()?.into_inner();
        (!s.nodes.is_empty() && s.nodes.iter().all(|n| n.applied_revision == s.revision))
            .then_some(s.revision)
    })
    .await
}

/// A revision every node agent has applied, for a cluster still taking
/// writes (where [`nodes_converged`]'s "all at the leader's revision" may
/// never hold at one instant): the leader's revision now, once every agent
/// has reached it.
pub async fn nodes_reached(cluster: &Cluster) -> u64 {
    let leader = cluster.wait_leader().await;
    let addr = cluster.replicas[&leader].real.to_string();
    let target = eventually("the leader's revision", || async {
        let mut c = ClusterClient::new(channel(&addr).await?);
        let s = c.node_status(NodeStatusRequest {}).await.ok()?.into_inner();
        (!s.nodes.is_empty()).then_some(s.revision)
    })
    .await;
    eventually("node agents at or past the leader's revision", || async {
        let mut c = ClusterClient::new(channel(&addr).await?);
        let s = c.node_status(NodeStatusRequest {}).await.ok()?.into_inner();
        s.nodes
            .iter()
            .all(|n| n.applied_revision >= target)
            .then_some(target)
    })
    .await
}

/// The revision of the state a node agent persisted in `data_dir`.
pub fn persisted_revision(data_dir: &Path) -> u64 {
    use prost::Message;
    std::fs::read(data_dir.join("state.pb"))
        .ok()
        .and_then(|b| strait_proto::v1::ListResponse::decode(b.as_slice()).ok())
        .map_or(0, |l| l.revision)
}

/// A client opening a new connection through the ClusterIP every 10 ms
/// (at most 100,000 times), counting the ones that did not reach a backend.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(addr: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, f, addr) = (stop.clone(), ok.clone(), failures.clone(), addr.to_string());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                match who(&addr) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => f
                        .lock()
                        .expect("lock")
                        .push(format!("at {:?}: {e}", t0.elapsed())),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Traffic {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    /// Connections that reached a backend so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failed connections so far.
    pub fn failed(&self) -> usize {
        self.failures.lock().expect("lock").len()
    }

    /// Waits until `n` more connections got through.
    pub async fn more(&self, n: u64) {
        let base = self.ok();
        eventually("client connections through the ClusterIP", || async {
            (self.ok() >= base + n).then_some(())
        })
        .await;
    }

    /// Stops; returns (ok, failure descriptions).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.ok(), self.failures.lock().expect("lock").clone())
    }

    /// Stops, asserting invariant zero-failed-connections; returns how many
    /// connections succeeded.
    pub fn finish_without_failures(self) -> u64 {
        let (ok, failed) = self.finish();
        assert!(
            failed.is_empty(),
            "invariant zero-failed-connections: {failed:?}"
        );
        ok
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
