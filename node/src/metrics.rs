//! The node agent's Prometheus metrics and its HTTP endpoints: `/metrics`
//! (text format), `/healthz` and `/livez` with kube-proxy's semantics.
//!
//! Health follows kube-proxy's `ProxierHealthServer`: the agent is healthy
//! unless a change it received has waited longer than the health timeout to
//! be programmed into the listeners (before the first full state, the wait
//! counts from start). An unreachable control plane is not unhealthy: the
//! agent keeps forwarding its last state. Strait does not watch its Node
//! object, so node deletion plays no part and `/livez` answers as `/healthz`.
//!
//! Per-connection counters live behind pre-resolved handles, one set per
//! (service port, endpoint) and one per service port, cached so the
//! forwarding path does a map lookup and a few atomic adds per connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::ServiceKey;

/// The content type of the Prometheus text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// kube-proxy's health timeout is twice its 30 s sync period.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Pending commit times kept for the programming-latency histogram.
const MAX_PENDING: usize = 10_000;

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
struct PortLabels {
    namespace: String,
    service: String,
    port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    namespace: String,
    service: String,
    port: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    namespace: String,
    service: String,
    port: String,
    endpoint: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    r#type: &'static str,
    rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: &'static str,
    result: &'static str,
}

/// A service port: Service, port number, and whether it is UDP (a TCP and
/// a UDP port may share a number).
pub type PortKey = (ServiceKey, u16, bool);

/// Counters of one service port, and the handles of its endpoints.
#[derive(Debug)]
pub struct PortHandles {
    labels: PortLabels,
    /// Extra connect attempts after a failed one.
    pub retries: Counter,
    /// Connections reset because no endpoint was usable or every attempt failed.
    pub refused: Counter,
    /// Connections to a LoadBalancer IP reset: client outside
    /// `loadBalancerSourceRanges`.
    pub denied: Counter,
    endpoints: DashMap<SocketAddr, Arc<EndpointHandles>>,
    families: Arc<EndpointFamilies>,
}

/// Counters of one endpoint of one service port.
#[derive(Debug)]
pub struct EndpointHandles {
    pub opened: Counter,
    pub closed: Counter,
    pub active: Gauge,
    pub bytes_to_endpoint: Counter,
    pub bytes_to_client: Counter,
    pub connect_failures: Counter,
    pub ejections: Counter,
}

/// Counts a connection closed and no longer active when dropped, however
/// the connection ended (including a cut at shutdown).
#[derive(Debug)]
pub struct OpenConnection(Arc<EndpointHandles>);

impl OpenConnection {
    pub fn new(h: Arc<EndpointHandles>) -> Self {
        h.opened.inc();
        h.active.inc();
        Self(h)
    }

    /// Adds bytes moved (counted when the connection ends).
    pub fn transferred(&self, to_endpoint: u64, to_client: u64) {
        self.0.bytes_to_endpoint.inc_by(to_endpoint);
        self.0.bytes_to_client.inc_by(to_client);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.closed.inc();
        self.0.active.dec();
    }
}

#[derive(Debug, Default)]
struct EndpointFamilies {
    opened: Family<EndpointLabels, Counter>,
    closed: Family<EndpointLabels, Counter>,
    active: Family<EndpointLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    connect_failures: Family<EndpointLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
}

impl EndpointFamilies {
    fn bytes_labels(l: &EndpointLabels, direction: &'static str) -> BytesLabels {
        BytesLabels {
            namespace: l.namespace.clone(),
            service: l.service.clone(),
            port: l.port.clone(),
            endpoint: l.endpoint.clone(),
            direction,
        }
    }

    fn remove(&self, l: &EndpointLabels) {
        self.opened.remove(l);
        self.closed.remove(l);
        self.active.remove(l);
        self.connect_failures.remove(l);
        self.ejections.remove(l);
        for d in ["to_endpoint", "to_client"] {
            self.bytes.remove(&Self::bytes_labels(l, d));
        }
    }
}

/// Proxy families and the handle caches in front of them.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    families: Arc<EndpointFamilies>,
    retries: Family<PortLabels, Counter>,
    refused: Family<PortLabels, Counter>,
    denied: Family<PortLabels, Counter>,
    ports: DashMap<PortKey, Arc<PortHandles>>,
}

impl PortHandles {
    /// The counters of one endpoint of this service port.
    pub fn endpoint(&self, ep: SocketAddr) -> Arc<EndpointHandles> {
        if let Some(h) = self.endpoints.get(&ep) {
            return h.clone();
        }
        let l = self.endpoint_labels(ep);
        let f = &self.families;
        // One statement per family lookup: `get_or_create` returns a read
        // guard, and a second lookup creating a series in the same family
        // while it lives would deadlock.
        let handles = || {
            let opened = f.opened.get_or_create(&l).clone();
            let closed = f.closed.get_or_create(&l).clone();
            let active = f.active.get_or_create(&l).clone();
            let to_endpoint = EndpointFamilies::bytes_labels(&l, "to_endpoint");
            let bytes_to_endpoint = f.bytes.get_or_create(&to_endpoint).clone();
            let to_client = EndpointFamilies::bytes_labels(&l, "to_client");
            let bytes_to_client = f.bytes.get_or_create(&to_client).clone();
            let connect_failures = f.connect_failures.get_or_create(&l).clone();
            let ejections = f.ejections.get_or_create(&l).clone();
            Arc::new(EndpointHandles {
                opened,
                closed,
                active,
                bytes_to_endpoint,
                bytes_to_client,
                connect_failures,
                ejections,
            })
        };
        self.endpoints.entry(ep).or_insert_with(handles).clone()
    }

    fn endpoint_labels(&self, ep: SocketAddr) -> EndpointLabels {
        EndpointLabels {
            namespace: self.labels.namespace.clone(),
            service: self.labels.service.clone(),
            port: self.labels.port.clone(),
            endpoint: ep.to_string(),
        }
    }
}

impl ProxyMetrics {
    /// The counters of a service port; `name` (the port's name, or its
    /// number when unnamed) labels it the first time.
    pub fn port(&self, key: &PortKey, name: impl FnOnce() -> String) -> Arc<PortHandles> {
        if let Some(h) = self.ports.get(key) {
            return h.clone();
        }
        let labels = PortLabels {
            namespace: key.0.namespace.clone(),
            service: key.0.name.clone(),
            port: name(),
        };
        self.ports
            .entry(key.clone())
            .or_insert_with(|| {
                let retries = self.retries.get_or_create(&labels).clone();
                let refused = self.refused.get_or_create(&labels).clone();
                let denied = self.denied.get_or_create(&labels).clone();
                Arc::new(PortHandles {
                    retries,
                    refused,
                    denied,
                    labels,
                    endpoints: DashMap::new(),
                    families: self.families.clone(),
                })
            })
            .clone()
    }

    /// Forgets series of service ports and endpoints no longer in the
    /// state (keeping endpoints with open connections), so churn does not
    /// grow the label sets without bound. `live(port, None)` says whether
    /// a service port still exists, `live(port, Some(ep))` an endpoint.
    pub fn retain(&self, live: impl Fn(&PortKey, Option<SocketAddr>) -> bool) {
        self.ports.retain(|key, port| {
            port.endpoints.retain(|ep, h| {
                let keep = live(key, Some(*ep)) || h.active.get() > 0;
                if !keep {
                    self.families.remove(&port.endpoint_labels(*ep));
                }
                keep
            });
            let keep = live(key, None) || !port.endpoints.is_empty();
            if !keep {
                self.retries.remove(&port.labels);
                self.refused.remove(&port.labels);
                self.denied.remove(&port.labels);
            }
            keep
        });
    }
}

/// Where programming stands, for `/healthz` and the latency histogram.
#[derive(Debug)]
struct Programming {
    /// Changes received and not yet programmed: (revision, commit time).
    pending: VecDeque<(u64, i64)>,
    /// When the oldest change not yet programmed arrived (local clock).
    oldest_pending: Option<Instant>,
    last_updated: Option<SystemTime>,
    applied_revision: u64,
}

/// Every metric of one node agent.
pub struct Metrics {
    registry: Registry,
    pub proxy: ProxyMetrics,
    listeners: Gauge,
    dns: Family<DnsLabels, Counter>,
    probes: Family<ProbeLabels, Counter>,
    watch_reconnects: Counter,
    applied_revision: Gauge,
    programming_duration: Histogram,
    programming: Mutex<Programming>,
    health_timeout: Duration,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(DEFAULT_HEALTH_TIMEOUT)
    }
}

fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Metrics {
    /// `health_timeout`: how long a received change may wait to be
    /// programmed before `/healthz` answers 503.
    pub fn new(health_timeout: Duration) -> Self {
        let mut registry = Registry::default();
        let proxy = ProxyMetrics::default();
        let f = &proxy.families;
        registry.register(
            "strait_proxy_connections_opened",
            "Connections forwarded to an endpoint",
            f.opened.clone(),
        );
        registry.register(
            "strait_proxy_connections_closed",
            "Forwarded connections that ended",
            f.closed.clone(),
        );
        registry.register(
            "strait_proxy_connections_active",
            "Forwarded connections open now",
            f.active.clone(),
        );
        registry.register(
            "strait_proxy_bytes",
            "Bytes forwarded, by direction (to_endpoint, to_client), counted when a connection ends",
            f.bytes.clone(),
        );
        registry.register(
            "strait_proxy_connect_failures",
            "Failed connect attempts to an endpoint",
            f.connect_failures.clone(),
        );
        registry.register(
            "strait_proxy_endpoint_ejections",
            "Times an endpoint was ejected after consecutive connect failures",
            f.ejections.clone(),
        );
        registry.register(
            "strait_proxy_connect_retries",
            "Connect attempts on another endpoint after a failed one",
            proxy.retries.clone(),
        );
        registry.register(
            "strait_proxy_connections_refused",
            "Accepted connections reset: no usable endpoint, or every attempt failed",
            proxy.refused.clone(),
        );
        registry.register(
            "strait_proxy_connections_denied",
            "Connections to a LoadBalancer IP reset: client outside loadBalancerSourceRanges",
            proxy.denied.clone(),
        );
        let m = Self {
            registry: Registry::default(),
            proxy,
            listeners: Gauge::default(),
            dns: Family::default(),
            probes: Family::default(),
            watch_reconnects: Counter::default(),
            applied_revision: Gauge::default(),
            programming_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
            ),
            programming: Mutex::new(Programming {
                pending: VecDeque::new(),
                oldest_pending: Some(Instant::now()),
                last_updated: None,
                applied_revision: 0,
            }),
            health_timeout,
        };
        registry.register(
            "strait_listeners",
            "Addresses this agent listens on for Services",
            m.listeners.clone(),
        );
        registry.register(
            "strait_dns_queries",
            "DNS queries answered, by question type and response code",
            m.dns.clone(),
        );
        registry.register(
            "strait_probe_results",
            "Readiness probe attempts, by probe kind (tcp, http, exec) and result",
            m.probes.clone(),
        );
        registry.register(
            "strait_watch_reconnects",
            "Times the control-plane watch failed and was re-established",
            m.watch_reconnects.clone(),
        );
        registry.register(
            "strait_applied_revision",
            "Revision of the state programmed into the listeners",
            m.applied_revision.clone(),
        );
        registry.register(
            "strait_network_programming_duration_seconds",
            "From the leader's commit of a change to this node's listeners and endpoints reflecting it",
            m.programming_duration.clone(),
        );
        Self { registry, ..m }
    }

    pub fn set_listeners(&self, n: usize) {
        self.listeners.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one DNS query with its question type and response code.
    pub fn dns_query(&self, qtype: &'static str, rcode: &'static str) {
        self.dns
            .get_or_create(&DnsLabels {
                r#type: qtype,
                rcode,
            })
            .inc();
    }

    /// Counts one probe attempt.
    pub fn probe_result(&self, probe: &'static str, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.probes
            .get_or_create(&ProbeLabels { probe, result })
            .inc();
    }

    pub fn watch_reconnect(&self) {
        self.watch_reconnects.inc();
    }

    fn programming(&self) -> std::sync::MutexGuard<'_, Programming> {
        self.programming.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watch published the state of `revision`, committed at
    /// `commit_unix_nanos` (0 when unknown: a full state).
    pub fn received(&self, revision: u64, commit_unix_nanos: i64) {
        let mut p = self.programming();
        if p.oldest_pending.is_none() {
            p.oldest_pending = Some(Instant::now());
        }
        if commit_unix_nanos > 0 {
            if p.pending.len() >= MAX_PENDING {
                p.pending.pop_front();
            }
            p.pending.push_back((revision, commit_unix_nanos));
        }
    }

    /// The listeners now reflect the state of `revision`: observes the
    /// commit-to-programmed latency of every change up to it.
    pub fn programmed(&self, revision: u64) {
        let now = now_unix_nanos();
        let mut p = self.programming();
        while let Some(&(rev, commit)) = p.pending.front() {
            if rev > revision {
                break;
            }
            p.pending.pop_front();
            let secs = now.saturating_sub(commit).max(0) as f64 / 1e9;
            self.programming_duration.observe(secs);
        }
        if p.pending.is_empty() {
            p.oldest_pending = None;
        }
        p.last_updated = Some(SystemTime::now());
        p.applied_revision = p.applied_revision.max(revision);
        self.applied_revision
            .set(i64::try_from(p.applied_revision).unwrap_or(i64::MAX));
    }

    /// The revision last programmed (0 before the first state).
    pub fn applied_revision(&self) -> u64 {
        self.programming().applied_revision
    }

    /// kube-proxy's verdict: healthy unless a change has waited longer
    /// than the timeout to be programmed.
    pub fn health(&self) -> Health {
        let p = self.programming();
        let stale = p
            .oldest_pending
            .is_some_and(|t| t.elapsed() >= self.health_timeout);
        Health {
            healthy: !stale,
            last_updated: p.last_updated,
            applied_revision: p.applied_revision,
        }
    }

    /// Renders the text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `/healthz` reports.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
    pub applied_revision: u64,
}

fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_default()
}

async fn healthz(AxumState(m): AxumState<Arc<Metrics>>) -> impl IntoResponse {
    let h = m.health();
    let body = serde_json::json!({
        "lastUpdated": rfc3339(h.last_updated),
        "currentTime": rfc3339(Some(SystemTime::now())),
        "appliedRevision": h.applied_revision,
        "healthy": h.healthy,
    });
    let code = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics_handler(AxumState(m): AxumState<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], m.render())
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/livez` until
/// `stop`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state(metrics);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_pending_changes() {
        let m = Metrics::new(Duration::from_millis(50));
        // Before the first state the wait counts from start.
        assert!(m.health().healthy);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!m.health().healthy);
        m.received(5, now_unix_nanos());
        m.programmed(5);
        let h = m.health();
        assert!(h.healthy);
        assert_eq!(h.applied_revision, 5);
        assert!(h.last_updated.is_some());
        // A change received and not programmed in time turns it unhealthy.
        m.received(6, now_unix_nanos());
        assert!(m.health().healthy);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!m.health().healthy);
        m.programmed(6);
        assert!(m.health().healthy);
        assert_eq!(m.applied_revision(), 6);
    }

    #[test]
    fn programming_latency_counts_each_revision_once() {
        let m = Metrics::default();
        let t = now_unix_nanos() - 20_000_000;
        m.received(1, t);
        m.received(2, t);
        m.received(3, 0); // a full state: no commit time
        m.programmed(2);
        let text = m.render();
        assert!(
            text.contains("strait_network_programming_duration_seconds_count 2"),
            "{text}"
        );
        m.programmed(3);
        assert!(m.render().contains("strait_applied_revision 3"));
    }

    #[test]
    fn proxy_series_are_forgotten_with_their_endpoints() {
        let m = Metrics::default();
        let key: PortKey = (ServiceKey::new("default", "web"), 80, false);
        let ep: SocketAddr = ([10, 0, 0, 1], 80).into();
        {
            let port = m.proxy.port(&key, || "http".into());
            let c = OpenConnection::new(port.endpoint(ep));
            c.transferred(10, 20);
            m.proxy.retain(|_, _| false);
            // Still open: kept.
            assert!(m.render().contains("strait_proxy_connections_active{"));
        }
        let text = m.render();
        assert!(text.contains(r#"strait_proxy_bytes_total{namespace="default",service="web",port="http",endpoint="10.0.0.1:80",direction="to_client"} 20"#), "{text}");
        m.proxy.retain(|_, _| false);
        assert!(!m.render().contains("endpoint=\"10.0.0.1:80\""));
    }
}
