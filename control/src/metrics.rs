//! Prometheus metrics of a control replica and its HTTP endpoints:
//! `/metrics` (text format), `/livez` (the process serves) and `/readyz`
//! (a leader is known and this replica has applied what it knows
//! committed). Raft and state gauges are read at scrape time; counters and
//! histograms are bumped on the write and watch paths.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use openraft::async_runtime::WatchReceiver;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use strait_proto::Kind;
use tokio::net::TcpListener;

use crate::raft::Raft;
use crate::watch::{self, Shared};

/// The content type of the Prometheus text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors serving the HTTP endpoints.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics address cannot be bound.
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllocatorLabels {
    allocator: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    op: &'static str,
    result: &'static str,
}

/// Buckets for control-plane latencies: 0.5 ms to ~16 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)
}

/// Every metric of one replica.
pub struct Metrics {
    registry: Registry,
    term: Gauge,
    is_leader: Gauge,
    leader_id: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    revision: Gauge,
    objects: Family<KindLabels, Gauge>,
    allocator_used: Family<AllocatorLabels, Gauge<f64, AtomicU64>>,
    allocator_size: Family<AllocatorLabels, Gauge<f64, AtomicU64>>,
    watchers: Gauge,
    writes: Family<WriteLabels, Counter>,
    apply_duration: Histogram,
    watch_delivery: Histogram,
    proposal_batch: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            term: Gauge::default(),
            is_leader: Gauge::default(),
            leader_id: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            revision: Gauge::default(),
            objects: Family::default(),
            allocator_used: Family::default(),
            allocator_size: Family::default(),
            watchers: Gauge::default(),
            writes: Family::default(),
            apply_duration: Histogram::new(latency_buckets()),
            watch_delivery: Histogram::new(latency_buckets()),
            // 1, 2, 4, ... 256: the proposer's largest batch.
            proposal_batch: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9),
            ),
            registry: Registry::default(),
        };
        registry.register("strait_raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "strait_raft_is_leader",
            "1 when this replica is the Raft leader",
            m.is_leader.clone(),
        );
        registry.register(
            "strait_raft_leader_id",
            "Id of the leader this replica knows, 0 when none",
            m.leader_id.clone(),
        );
        registry.register(
            "strait_raft_commit_index",
            "Highest log index this replica knows committed",
            m.commit_index.clone(),
        );
        registry.register(
            "strait_raft_applied_index",
            "Highest log index applied to this replica's state machine",
            m.applied_index.clone(),
        );
        registry.register(
            "strait_raft_last_log_index",
            "Last index in this replica's log",
            m.last_log_index.clone(),
        );
        registry.register(
            "strait_revision",
            "Revision of the last change in this replica's state",
            m.revision.clone(),
        );
        registry.register(
            "strait_objects",
            "Objects stored, by kind",
            m.objects.clone(),
        );
        registry.register(
            "strait_allocator_used",
            "Addresses or ports allocated, by allocator (cluster_ip, node_port, lb_ip)",
            m.allocator_used.clone(),
        );
        registry.register(
            "strait_allocator_size",
            "Addresses or ports an allocator holds in all",
            m.allocator_size.clone(),
        );
        registry.register(
            "strait_watchers",
            "Watch streams open on this replica",
            m.watchers.clone(),
        );
        registry.register(
            "strait_writes",
            "Writes received by this replica, by operation (apply, delete) and result",
            m.writes.clone(),
        );
        registry.register(
            "strait_apply_duration_seconds",
            "Write latency seen by the API: request received to committed and applied (forwarding to the leader included)",
            m.apply_duration.clone(),
        );
        registry.register(
            "strait_watch_delivery_duration_seconds",
            "From the leader's commit time of a revision to its hand-off to a watcher's stream on this replica",
            m.watch_delivery.clone(),
        );
        registry.register(
            "strait_raft_proposal_batch_size",
            "Writes the leader proposed to Raft in one message (writes that arrive together are batched)",
            m.proposal_batch.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one finished write and its latency.
    pub fn write_done(&self, op: &'static str, result: &'static str, took: Duration) {
        self.writes.get_or_create(&WriteLabels { op, result }).inc();
        self.apply_duration.observe(took.as_secs_f64());
    }

    /// The leader proposed `writes` writes in one message to Raft.
    pub fn proposed(&self, writes: usize) {
        self.proposal_batch.observe(writes as f64);
    }

    /// A watch stream opened; the guard counts it closed when dropped.
    pub fn watcher_opened(self: &Arc<Self>) -> WatcherGuard {
        self.watchers.inc();
        WatcherGuard(self.clone())
    }

    /// A revision committed at `commit_unix_nanos` was handed to a watcher.
    pub fn delivered(&self, commit_unix_nanos: i64) {
        if commit_unix_nanos > 0 {
            let now = crate::state::now_unix_nanos();
            let secs = now.saturating_sub(commit_unix_nanos).max(0) as f64 / 1e9;
            self.watch_delivery.observe(secs);
        }
    }

    /// Reads Raft and state gauges, then renders the text format.
    pub fn render(&self, raft: &Raft, shared: &Shared) -> String {
        let m = raft.metrics().borrow_watched().clone();
        self.term
            .set(i64::try_from(m.current_term).unwrap_or(i64::MAX));
        self.is_leader
            .set(i64::from(m.current_leader == Some(m.id)));
        self.leader_id.set(
            m.current_leader
                .and_then(|l| i64::try_from(l).ok())
                .unwrap_or(0),
        );
        let idx = |l: Option<u64>| l.and_then(|i| i64::try_from(i).ok()).unwrap_or(0);
        self.commit_index.set(idx(m
            .local_committed
            .max(m.cluster_committed)
            .map(|l| l.index)));
        self.applied_index.set(idx(m.last_applied.map(|l| l.index)));
        self.last_log_index.set(idx(m.last_log_index));
        {
            let store = watch::read(shared);
            let state = store.state();
            self.revision.set(idx(Some(state.revision())));
            for kind in Kind::ALL {
                self.objects
                    .get_or_create(&KindLabels {
                        kind: kind.to_string(),
                    })
                    .set(i64::try_from(state.count(kind)).unwrap_or(i64::MAX));
            }
            let a = state.allocators();
            let set = |name, used: f64, size: f64| {
                let l = AllocatorLabels { allocator: name };
                self.allocator_used.get_or_create(&l).set(used);
                self.allocator_size.get_or_create(&l).set(size);
            };
            set(
                "cluster_ip",
                a.cluster_ips.used() as f64,
                a.cluster_ips.size() as f64,
            );
            set(
                "node_port",
                a.node_ports.used() as f64,
                a.node_ports.size() as f64,
            );
            set("lb_ip", a.lb_ips.used() as f64, a.lb_ips.size() as f64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the open-watchers gauge when a watch stream ends.
pub struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

/// How far this replica's applied index may trail the cluster's commit
/// index and still be ready (a busy replica always trails a little).
pub const READY_MAX_LAG: u64 = 1000;

/// Why this replica is not ready, if it is not: Raft stopped, no leader
/// known, or applied index more than [`READY_MAX_LAG`] behind.
pub fn not_ready(raft: &Raft) -> Option<String> {
    let m = raft.metrics().borrow_watched().clone();
    if m.running_state.is_err() {
        return Some("raft stopped".into());
    }
    if m.current_leader.is_none() {
        return Some("no leader known".into());
    }
    let committed = m
        .local_committed
        .max(m.cluster_committed)
        .map(|l| l.index)
        .unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    if committed.saturating_sub(applied) > READY_MAX_LAG {
        return Some(format!(
            "applied index {applied} is more than {READY_MAX_LAG} entries behind commit index {committed}"
        ));
    }
    None
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    raft: Arc<Raft>,
    shared: Shared,
}

async fn metrics_handler(AxumState(h): AxumState<Http>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, TEXT_FORMAT)],
        h.metrics.render(&h.raft, &h.shared),
    )
}

async fn readyz(AxumState(h): AxumState<Http>) -> impl IntoResponse {
    match not_ready(&h.raft) {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds the metrics address (done first, so a taken port fails the start
/// before anything else is set up).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Serves `/metrics`, `/livez` and `/readyz` on `listener` until
/// `shutdown` resolves.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    raft: Arc<Raft>,
    shared: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Http {
            metrics,
            raft,
            shared,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
}
