//! The single writer of the node's state. It follows the control plane's
//! Watch stream (a full state, then every change), resumes from the last
//! revision after a disconnect and re-lists when that revision was
//! compacted, registers this node, and persists each new state so the agent
//! forwards from the last known state while the control plane is down.
//! Static mode reads a manifest file once instead.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use rand::Rng;
use strait_proto::tls::Transport;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{
    ApplyRequest, Condition, Consistency, GetRequest, ListResponse, Node, NodeAddress, NodeStatus,
    Object, ObjectMeta, WatchRequest, object,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::state::{NodeState, StateError};

/// The file, under the data directory, holding the last state.
pub const STATE_FILE: &str = "state.pb";
/// Largest message accepted from the control plane (a full state).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a watch stream may carry nothing before its replica is taken as
/// gone and the next one tried. Every replica sends progress at least every
/// 5 s, so this is four missed in a row: a replica whose packets are dropped
/// (its machine powered off, a silent partition) fails no call and resets
/// no connection, and without this bound the agent would wait on it forever
/// while the Services change elsewhere.
pub const WATCH_SILENCE: Duration = Duration::from_secs(20);
/// At most one state write per this interval; the latest state always wins.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Errors reading or following the node's state.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The static manifest cannot be read.
    #[error("reading {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The static manifest does not parse.
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: strait_proto::manifest::ManifestError,
    },
    /// The persisted state cannot be read or written.
    #[error("state file {path}: {source}")]
    StateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The persisted state is not a valid `ListResponse`.
    #[error("state file {path} is corrupt: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    /// A control address that is not a valid URI authority.
    #[error("control address {addr:?}: {source}")]
    Address {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// No control address was given.
    #[error("no control-plane address and no static config file")]
    NoControl,
    /// The control plane answered with an error.
    #[error("watch on {addr}: {status}")]
    Rpc { addr: String, status: tonic::Status },
    /// The stream ended.
    #[error("watch on {addr}: stream closed by the server")]
    Closed { addr: String },
    /// The stream carried nothing, not even progress, for too long.
    #[error("watch on {addr}: nothing received for {after:?}")]
    Silent { addr: String, after: Duration },
    /// The stream carried a change that cannot be applied.
    #[error("watch on {addr}: {source}")]
    State {
        addr: String,
        #[source]
        source: StateError,
    },
}

/// Static mode: the Services and EndpointSlices of a manifest file.
pub fn load_static(path: &Path) -> Result<NodeState, WatchError> {
    let text = std::fs::read_to_string(path).map_err(|source| WatchError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let objects = strait_proto::manifest::parse(&text).map_err(|source| WatchError::Manifest {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(NodeState::from_objects(objects, 0))
}

/// The state persisted in `data_dir`, if there is one.
pub fn load_persisted(data_dir: &Path) -> Result<Option<NodeState>, WatchError> {
    let path = data_dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(WatchError::StateFile { path, source }),
    };
    let list = ListResponse::decode(bytes.as_slice())
        .map_err(|source| WatchError::Decode { path, source })?;
    Ok(Some(NodeState::from_objects(list.items, list.revision)))
}

/// Writes `state` to `data_dir/state.pb` atomically: a reader (the next
/// start) sees the old file or the new one, never a torn one.
pub fn persist(data_dir: &Path, state: &NodeState) -> Result<(), WatchError> {
    let path = data_dir.join(STATE_FILE);
    let bytes = state.to_list_response().encode_to_vec();
    crate::fsutil::write_atomically(&path, &bytes)
        .map_err(|source| WatchError::StateFile { path, source })
}

/// Persists every new synced state, at most once per [`PERSIST_EVERY`], and
/// once more at stop if something is still unwritten.
pub async fn persist_loop(
    data_dir: PathBuf,
    mut state: watch::Receiver<Arc<NodeState>>,
    stop: CancellationToken,
) {
    state.mark_unchanged();
    loop {
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            r = state.changed() => r.is_err(),
        };
        if stopped && !state.has_changed().unwrap_or(true) {
            break;
        }
        let snap = state.borrow_and_update().clone();
        if snap.is_synced() {
            let dir = data_dir.clone();
            let revision = snap.revision();
            let r = tokio::task::spawn_blocking(move || persist(&dir, &snap)).await;
            match r {
                Ok(Ok(())) => debug!(revision, "state persisted"),
                Ok(Err(e)) => warn!(error = %e, "cannot persist the node state"),
                Err(e) => warn!(error = %e, "state persistence task failed"),
            }
        }
        if stopped {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(PERSIST_EVERY) => {}
        }
    }
}

/// What the node registers itself with.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub node_ip: IpAddr,
}

/// Follows the control plane and publishes each new state.
pub struct Watcher {
    addrs: Vec<String>,
    clients: Vec<ResourcesClient<Channel>>,
    registration: Registration,
    tx: watch::Sender<Arc<NodeState>>,
    metrics: Arc<Metrics>,
}

impl Watcher {
    /// One lazily connected channel per replica, reused across reconnects.
    pub fn new(
        addrs: &[String],
        registration: Registration,
        tx: watch::Sender<Arc<NodeState>>,
        transport: &Transport,
    ) -> Result<Self, WatchError> {
        if addrs.is_empty() {
            return Err(WatchError::NoControl);
        }
        let clients = addrs
            .iter()
            .map(|addr| {
                let ep = crate::control::endpoint(addr).map_err(|source| WatchError::Address {
                    addr: addr.clone(),
                    source,
                })?;
                Ok(ResourcesClient::new(transport.lazy(ep, None))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES))
            })
            .collect::<Result<Vec<_>, WatchError>>()?;
        Ok(Self {
            addrs: addrs.to_vec(),
            clients,
            registration,
            tx,
            metrics: Arc::default(),
        })
    }

    /// Reports reconnects and received revisions to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs until `stop`: each replica in turn, capped exponential backoff
    /// with jitter between failures, reset once a stream delivered.
    pub async fn run(self, stop: CancellationToken) {
        // Always start with a full list: the persisted state keeps serving
        // until it arrives, and a rebuilt control plane may reuse revisions.
        let mut resume: Option<u64> = None;
        let mut backoff = BACKOFF_MIN;
        let mut i = 0usize;
        loop {
            let idx = i % self.addrs.len();
            let addr = &self.addrs[idx];
            let mut progressed = false;
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.follow(idx, &mut resume, &mut progressed) => r,
            };
            if progressed {
                backoff = BACKOFF_MIN;
            }
            let err = match result {
                Ok(()) => continue,
                Err(e) => e,
            };
            if let WatchError::Rpc { status, .. } = &err
                && status.code() == tonic::Code::FailedPrecondition
                && status.message().starts_with("compacted")
            {
                info!(%addr, revision = ?resume, "watch history compacted, re-listing");
                resume = None;
                continue;
            }
            self.metrics.watch_reconnect();
            let delay = jitter(backoff);
            warn!(
                %addr,
                error = %err,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "control plane unreachable or watch failed; forwarding continues from the last state. \
                 Check that a control replica is running at this address"
            );
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            i = i.wrapping_add(1);
        }
    }

    /// One watch stream from one replica, until it fails or ends.
    async fn follow(
        &self,
        idx: usize,
        resume: &mut Option<u64>,
        progressed: &mut bool,
    ) -> Result<(), WatchError> {
        let addr = &self.addrs[idx];
        let mut client = self.clients[idx].clone();
        let rpc = |status| WatchError::Rpc {
            addr: addr.clone(),
            status,
        };
        let req = WatchRequest {
            kinds: vec!["Service".into(), "EndpointSlice".into()],
            revision: resume.unwrap_or(0),
        };
        // Bounded like the stream: a cached connection to a replica gone
        // silent would never bring the response headers.
        let opened = tokio::time::timeout(WATCH_SILENCE, client.watch(req))
            .await
            .map_err(|_| WatchError::Silent {
                addr: addr.clone(),
                after: WATCH_SILENCE,
            })?;
        let mut stream = opened.map_err(rpc)?.into_inner();
        info!(%addr, revision = resume.unwrap_or(0), "watching the control plane");
        tokio::spawn(register(client, addr.clone(), self.registration.clone()));
        loop {
            let next = tokio::time::timeout(WATCH_SILENCE, stream.message())
                .await
                .map_err(|_| WatchError::Silent {
                    addr: addr.clone(),
                    after: WATCH_SILENCE,
                })?;
            let Some(resp) = next.map_err(rpc)? else {
                return Err(WatchError::Closed { addr: addr.clone() });
            };
            *progressed = true;
            let current = self.tx.borrow().clone();
            if !resp.initial && current.is_synced() && resp.revision <= current.revision() {
                debug!(
                    revision = resp.revision,
                    "skipping a revision already applied"
                );
                continue;
            }
            let commit_lag_ms = (resp.commit_time_unix_nanos > 0).then(|| {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                now.saturating_sub(resp.commit_time_unix_nanos).max(0) / 1_000_000
            });
            let span = tracing::info_span!(
                "watch.apply",
                strait.revision = resp.revision,
                strait.events = resp.events.len(),
                strait.initial = resp.initial,
                strait.commit_lag_ms = commit_lag_ms,
            );
            let _entered = span.enter();
            let next = current.apply(&resp).map_err(|source| WatchError::State {
                addr: addr.clone(),
                source,
            })?;
            if resp.initial {
                info!(%addr, revision = resp.revision, services = next.services().count(), "full state received");
            } else {
                debug!(
                    revision = resp.revision,
                    events = resp.events.len(),
                    "changes applied"
                );
            }
            *resume = Some(next.revision());
            // Recorded before publishing, so the listeners cannot report
            // the revision programmed before it counts as received.
            self.metrics
                .received(next.revision(), resp.commit_time_unix_nanos);
            self.tx.send_replace(Arc::new(next));
        }
    }
}

/// Applies this node's `Node` object (address and Ready condition). As the
/// kubelet does, `lastTransitionTime` moves only when the condition's status
/// does: an agent that reconnects to a Node already Ready keeps its time.
async fn register(mut client: ResourcesClient<Channel>, addr: String, reg: Registration) {
    let now = rfc3339(SystemTime::now());
    let since = match tokio::time::timeout(REGISTER_TIMEOUT, ready_since(&mut client, &reg.name))
        .await
    {
        Ok(Ok(since)) => since,
        Ok(Err(status)) => {
            warn!(%addr, node = %reg.name, %status, "cannot read the node before registering it; its Ready time restarts");
            None
        }
        Err(_) => {
            warn!(%addr, node = %reg.name, "reading the node before registering it timed out; its Ready time restarts");
            None
        }
    };
    let node = Node {
        api_version: "v1".into(),
        kind: "Node".into(),
        metadata: Some(ObjectMeta {
            name: reg.name.clone(),
            ..ObjectMeta::default()
        }),
        spec: None,
        status: Some(NodeStatus {
            addresses: vec![NodeAddress {
                r#type: "InternalIP".into(),
                address: reg.node_ip.to_string(),
            }],
            conditions: vec![Condition {
                r#type: "Ready".into(),
                status: "True".into(),
                last_transition_time: since.unwrap_or_else(|| now.clone()),
                last_heartbeat_time: now,
                reason: "StraitAgentReady".into(),
                message: "strait node agent is watching the control plane".into(),
            }],
        }),
    };
    let req = ApplyRequest {
        object: Some(Object::from(node)),
    };
    match tokio::time::timeout(REGISTER_TIMEOUT, client.apply(req)).await {
        Ok(Ok(resp)) => {
            info!(%addr, node = %reg.name, result = %resp.get_ref().result, "node registered")
        }
        Ok(Err(status)) => warn!(%addr, node = %reg.name, %status, "cannot register the node"),
        Err(_) => warn!(%addr, node = %reg.name, "node registration timed out"),
    }
}

/// When the stored Node `name` turned Ready, if it is Ready now. Read from
/// the replica this agent talks to (serializable): registration must not
/// wait for a leader, and that replica has at least what it served before.
async fn ready_since(
    client: &mut ResourcesClient<Channel>,
    name: &str,
) -> Result<Option<String>, tonic::Status> {
    let req = GetRequest {
        kind: "Node".into(),
        name: name.into(),
        consistency: Consistency::Serializable.into(),
        ..GetRequest::default()
    };
    let node = match client.get(req).await {
        Ok(resp) => resp.into_inner().object,
        Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
        Err(status) => return Err(status),
    };
    Ok(match node.and_then(|o| o.kind) {
        Some(object::Kind::Node(n)) => n
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.r#type == "Ready"))
            .filter(|c| c.status == "True" && !c.last_transition_time.is_empty())
            .map(|c| c.last_transition_time),
        _ => None,
    })
}

/// A delay in [backoff/2, backoff], so agents restarted together do not
/// reconnect in lockstep.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// `t` as RFC 3339 UTC with second precision (Kubernetes' metav1.Time).
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(2));
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(2));
        }
    }

    #[test]
    fn persist_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_persisted(dir.path()).expect("empty").is_none());
        let objects = strait_proto::manifest::parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
        )
        .expect("manifest");
        let s = NodeState::from_objects(objects, 42);
        persist(dir.path(), &s).expect("persist");
        let back = load_persisted(dir.path()).expect("load").expect("present");
        assert_eq!(back.revision(), 42);
        assert_eq!(back.services().count(), 1);
        std::fs::write(dir.path().join(STATE_FILE), b"\xff\xff\xff").expect("write");
        assert!(matches!(
            load_persisted(dir.path()),
            Err(WatchError::Decode { .. })
        ));
    }

    #[test]
    fn failed_persist_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A non-empty directory where the state file goes: the rename fails.
        let blocker = dir.path().join(STATE_FILE);
        std::fs::create_dir(&blocker).expect("mkdir");
        std::fs::write(blocker.join("x"), b"x").expect("write");
        let err = persist(dir.path(), &NodeState::default()).expect_err("rename must fail");
        assert!(matches!(err, WatchError::StateFile { .. }), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(STATE_FILE)]);
    }
}
