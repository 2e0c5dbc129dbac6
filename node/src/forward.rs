//! What happens to one accepted connection: pick an endpoint of its service
//! port (traffic policy, readiness with the KEP-1669 terminating fallback,
//! ClientIP affinity, least-connections over two random choices or
//! round-robin), connect with retries on other endpoints so a dead backend
//! costs the client nothing, eject endpoints that keep failing, then splice
//! bytes both ways until the connection ends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::config::{Config, LbPolicy};
use crate::conns::Connections;
use crate::metrics::{EndpointHandles, Metrics, OpenConnection, PortKey};
use crate::splice::{self, ForwardOptions};
use crate::state::{Endpoint, NodeState, ServiceInfo, ServiceKey};

/// Connect attempts per accepted connection, each to a different endpoint.
pub const MAX_ATTEMPTS: usize = 3;
/// Consecutive connect failures after which an endpoint is ejected.
const EJECT_AFTER: u32 = 2;
/// First ejection period; doubles with each further failure.
const EJECT_BASE: Duration = Duration::from_secs(5);
const EJECT_MAX: Duration = Duration::from_secs(60);
/// Keepalive on both sockets, so dead peers of idle connections are noticed.
pub const KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a connection was not forwarded, or how forwarding ended.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The service port has no usable endpoint (none ready or serving, or
    /// none on this node under a Local traffic policy).
    #[error("no usable endpoint for {service} port {port}")]
    NoEndpoints { service: ServiceKey, port: u16 },
    /// Every attempt failed to connect.
    #[error("connecting to an endpoint of {service} failed {attempts} times, last to {addr}")]
    Connect {
        service: ServiceKey,
        attempts: usize,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The connection failed while forwarding.
    #[error(transparent)]
    Forward(#[from] splice::ForwardError),
}

/// Where an accepted connection is headed: a port of a Service, reached
/// through a ClusterIP (internal) or a NodePort/LB address (external).
#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<ServiceInfo>,
    /// Index into `service.ports`.
    pub port: usize,
    pub via: Via,
    /// The listener's address: where this route's connections come in.
    pub addr: SocketAddr,
}

/// Which of a Service's addresses a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl Via {
    /// NodePort and LoadBalancer traffic follows externalTrafficPolicy;
    /// ClusterIP traffic follows internalTrafficPolicy.
    pub fn is_external(self) -> bool {
        self != Via::ClusterIp
    }
}

impl Route {
    /// Whether `client` is this node itself, or one of its Pods, which
    /// share its network: a connection to one of the node's own addresses
    /// leaves from that address (or from a loopback one), so it is not an
    /// outside client.
    pub fn from_this_node(&self, client: IpAddr) -> bool {
        client.is_loopback() || client == self.addr.ip()
    }

    /// The endpoints new connections from `client` may go to, by
    /// Kubernetes' rules. `externalTrafficPolicy: Local` holds for outside
    /// clients only: traffic from the node itself to a NodePort or LB IP
    /// gets Cluster semantics, as kube-proxy gives it (a Pod on a node
    /// without local endpoints still reaches the Service).
    pub fn usable_endpoints<'a>(&'a self, node_name: &str, client: IpAddr) -> Vec<&'a Endpoint> {
        let local_only = if self.via.is_external() {
            self.service.external_local && !self.from_this_node(client)
        } else {
            self.service.internal_local
        };
        let Some(port) = self.service.ports.get(self.port) else {
            return Vec::new();
        };
        let candidates = port
            .endpoints
            .iter()
            .filter(|e| !local_only || e.node_name.as_deref() == Some(node_name));
        let ready: Vec<&Endpoint> = candidates.clone().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        // KEP-1669: when nothing is ready, serving endpoints that are
        // terminating still take traffic.
        candidates.filter(|e| e.serving && e.terminating).collect()
    }

    /// The port's name for metrics, its number when it has none.
    fn port_label(&self) -> String {
        match self.service.ports.get(self.port) {
            Some(p) if !p.name.is_empty() => p.name.clone(),
            Some(p) => p.port.to_string(),
            None => String::new(),
        }
    }

    fn port_number(&self) -> u16 {
        self.service
            .ports
            .get(self.port)
            .map(|p| p.port)
            .unwrap_or(0)
    }

    /// The key of this service port for load balancing and metrics.
    fn port_key(&self) -> PortKey {
        let udp = self
            .service
            .ports
            .get(self.port)
            .is_some_and(|p| p.protocol == "UDP");
        (self.service.key.clone(), self.port_number(), udp)
    }
}

/// Per-backend counters shared by every listener.
#[derive(Debug, Default)]
struct EndpointStats {
    active: AtomicU64,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl EndpointStats {
    fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| t > now)
    }

    /// Records a failed connect; true when it ejected the endpoint.
    fn failed(&self, addr: SocketAddr) -> bool {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= EJECT_AFTER {
            let doublings = (n - EJECT_AFTER).min(8);
            let period = EJECT_BASE.saturating_mul(1 << doublings).min(EJECT_MAX);
            *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + period);
            debug!(endpoint = %addr, failures = n, eject_secs = period.as_secs(), "endpoint ejected");
            return true;
        }
        false
    }

    fn succeeded(&self) {
        if self.failures.swap(0, Ordering::Relaxed) != 0 {
            *self.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// Decrements an endpoint's active count when the connection ends.
struct ActiveGuard(Arc<EndpointStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A UDP flow's endpoint, counted as one active connection (for
/// least-connections and metrics) until dropped.
pub struct FlowLease {
    pub addr: SocketAddr,
    conn: OpenConnection,
    handles: Arc<EndpointHandles>,
    active: ActiveGuard,
}

impl FlowLease {
    /// Records the flow's bytes; called once, when it ends.
    pub fn transferred(&self, to_endpoint: u64, to_client: u64) {
        self.conn.transferred(to_endpoint, to_client);
    }

    /// The endpoint refused the flow (ICMP port unreachable): a connect
    /// failure, towards ejection like a refused TCP connect.
    pub fn refused(&self) {
        self.handles.connect_failures.inc();
        if self.active.0.failed(self.addr) {
            self.handles.ejections.inc();
        }
    }

    /// The endpoint answered: clears its failure count.
    pub fn answered(&self) {
        self.active.0.succeeded();
    }
}

/// Picks endpoints and forwards connections; one per agent, shared by all
/// listeners so load and health are per backend, not per listener.
#[derive(Debug)]
pub struct Forwarder {
    node_name: String,
    policy: LbPolicy,
    connect_timeout: Duration,
    opts: ForwardOptions,
    stats: DashMap<SocketAddr, Arc<EndpointStats>>,
    round_robin: DashMap<PortKey, usize>,
    affinity: DashMap<(PortKey, IpAddr), (SocketAddr, Instant)>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// A forwarder with `cfg`'s policy and timeouts; with an idle timeout,
    /// this starts its [`Connections`] sweeper thread.
    pub fn new(cfg: &Config) -> io::Result<Self> {
        Ok(Self {
            node_name: cfg.name.clone(),
            policy: cfg.lb_policy,
            connect_timeout: cfg.connect_timeout,
            opts: ForwardOptions {
                conns: Some(Connections::start(cfg.idle_timeout)?),
                ..ForwardOptions::default()
            },
            stats: DashMap::new(),
            round_robin: DashMap::new(),
            affinity: DashMap::new(),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Counts connections into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Shuts down every forwarded connection, and every one that finishes
    /// connecting from now on (the end of a shutdown's grace period).
    pub fn cut_all(&self) {
        if let Some(conns) = &self.opts.conns {
            conns.cut_all();
        }
    }

    /// Forwards `client` to an endpoint of `route`. Without a usable
    /// endpoint the client is reset at once rather than left hanging.
    ///
    /// `client` should come from a listener prepared by
    /// [`crate::listeners`], whose accepted sockets inherit `TCP_NODELAY`
    /// and keepalive; only the upstream socket is tuned here.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores by-value arguments twice (rust-lang/rust#62958)"
    )]
    pub fn handle<'a>(
        &'a self,
        client: TcpStream,
        peer: SocketAddr,
        route: &'a Route,
    ) -> impl Future<Output = Result<splice::Transferred, ProxyError>> + 'a {
        // A block rather than an `async fn`: see [`splice::forward`].
        async move {
            let (upstream, stats, counters) = match self.connect_any(peer, route).await {
                Ok(c) => c,
                Err(e) => {
                    reset(&client);
                    return Err(e);
                }
            };
            stats.active.fetch_add(1, Ordering::Relaxed);
            let _guard = ActiveGuard(stats);
            let conn = OpenConnection::new(counters);
            if let Err(e) = splice::tune_stream(&upstream, Some(KEEPALIVE)) {
                debug!(error = %e, "cannot tune socket");
            }
            let result = splice::forward(client, upstream, &self.opts).await;
            let t = match &result {
                Ok(t) => *t,
                Err(e) => e.transferred(),
            };
            conn.transferred(t.client_to_upstream, t.upstream_to_client);
            Ok(result?)
        }
    }

    /// Counts a connection reset for coming from outside the Service's
    /// `loadBalancerSourceRanges`.
    pub fn denied_by_source_range(&self, route: &Route) {
        let pkey = route.port_key();
        self.metrics
            .proxy
            .port(&pkey, || route.port_label())
            .denied
            .inc();
    }

    /// Whether new traffic of `route` may still go to `addr` (a UDP flow
    /// checks its endpoint when the Service's endpoints change).
    pub fn still_usable(&self, route: &Route, client: IpAddr, addr: SocketAddr) -> bool {
        route
            .usable_endpoints(&self.node_name, client)
            .iter()
            .any(|e| e.addr == addr)
    }

    /// Chooses the endpoint of a new UDP flow from `peer`, by the same
    /// rules as a TCP connection, skipping `avoid` (endpoints that just
    /// refused this client). `None` when no endpoint is usable; the drop
    /// is counted as refused.
    pub fn lease_flow(
        &self,
        route: &Route,
        peer: SocketAddr,
        avoid: &[SocketAddr],
    ) -> Option<FlowLease> {
        let pkey = route.port_key();
        let counters = self.metrics.proxy.port(&pkey, || route.port_label());
        let endpoints = route.usable_endpoints(&self.node_name, peer.ip());
        let Some(addr) = self.pick(&pkey, route.service.affinity, &endpoints, avoid, peer.ip())
        else {
            counters.refused.inc();
            return None;
        };
        if route.service.affinity.is_some() {
            self.affinity
                .insert((pkey, peer.ip()), (addr, Instant::now()));
        }
        let stats = self.stats_for(addr);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let handles = counters.endpoint(addr);
        Some(FlowLease {
            addr,
            conn: OpenConnection::new(handles.clone()),
            handles,
            active: ActiveGuard(stats),
        })
    }

    /// Connects to an endpoint of `route`, trying up to [`MAX_ATTEMPTS`]
    /// different ones. Everything it allocates is gone before forwarding
    /// starts, so a long-lived connection keeps only what it needs.
    async fn connect_any(
        &self,
        peer: SocketAddr,
        route: &Route,
    ) -> Result<(TcpStream, Arc<EndpointStats>, Arc<EndpointHandles>), ProxyError> {
        let service = &route.service.key;
        let port = route.port_number();
        let endpoints = route.usable_endpoints(&self.node_name, peer.ip());
        let pkey = route.port_key();
        let counters = self.metrics.proxy.port(&pkey, || route.port_label());
        let mut tried: Vec<SocketAddr> = Vec::with_capacity(MAX_ATTEMPTS);
        let mut last_err = None;
        while tried.len() < MAX_ATTEMPTS {
            let Some(addr) =
                self.pick(&pkey, route.service.affinity, &endpoints, &tried, peer.ip())
            else {
                break;
            };
            if !tried.is_empty() {
                counters.retries.inc();
            }
            tried.push(addr);
            let stats = self.stats_for(addr);
            let ep_counters = counters.endpoint(addr);
            match self.connect(addr).await {
                Ok(upstream) => {
                    stats.succeeded();
                    if route.service.affinity.is_some() {
                        self.affinity
                            .insert((pkey, peer.ip()), (addr, Instant::now()));
                    }
                    tracing::Span::current().record("upstream", tracing::field::display(addr));
                    return Ok((upstream, stats, ep_counters));
                }
                Err(e) => {
                    debug!(endpoint = %addr, error = %e, attempt = tried.len(), "connect failed");
                    ep_counters.connect_failures.inc();
                    if stats.failed(addr) {
                        ep_counters.ejections.inc();
                    }
                    last_err = Some((addr, e));
                }
            }
        }
        counters.refused.inc();
        let service = service.clone();
        Err(match last_err {
            Some((addr, source)) => ProxyError::Connect {
                service,
                attempts: tried.len(),
                addr,
                source,
            },
            None => ProxyError::NoEndpoints { service, port },
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.connect_timeout),
            )),
        }
    }

    fn stats_for(&self, addr: SocketAddr) -> Arc<EndpointStats> {
        self.stats.entry(addr).or_default().clone()
    }

    fn active(&self, addr: SocketAddr) -> u64 {
        self.stats
            .get(&addr)
            .map(|s| s.active.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The next endpoint to try, skipping those already tried. Ejected
    /// endpoints are used only when nothing else is left.
    fn pick(
        &self,
        pkey: &PortKey,
        affinity: Option<Duration>,
        endpoints: &[&Endpoint],
        tried: &[SocketAddr],
        client_ip: IpAddr,
    ) -> Option<SocketAddr> {
        let now = Instant::now();
        let untried: Vec<SocketAddr> = endpoints
            .iter()
            .map(|e| e.addr)
            .filter(|a| !tried.contains(a))
            .collect();
        let healthy: Vec<SocketAddr> = untried
            .iter()
            .copied()
            .filter(|a| self.stats.get(a).is_none_or(|s| !s.is_ejected(now)))
            .collect();
        let pool = if healthy.is_empty() { untried } else { healthy };
        if pool.is_empty() {
            return None;
        }
        if let Some(timeout) = affinity {
            let akey = (pkey.clone(), client_ip);
            if let Some(entry) = self.affinity.get(&akey) {
                let (addr, last) = *entry;
                drop(entry);
                if now.duration_since(last) < timeout && pool.contains(&addr) {
                    return Some(addr);
                }
            }
        }
        let n = pool.len();
        let idx = match self.policy {
            LbPolicy::RoundRobin => {
                let mut next = self.round_robin.entry(pkey.clone()).or_insert(0);
                let i = *next % n;
                *next = next.wrapping_add(1);
                i
            }
            LbPolicy::LeastConn if n == 1 => 0,
            LbPolicy::LeastConn => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                match self.active(pool[a]).cmp(&self.active(pool[b])) {
                    std::cmp::Ordering::Less => a,
                    std::cmp::Ordering::Greater => b,
                    std::cmp::Ordering::Equal => a,
                }
            }
        };
        pool.get(idx).copied()
    }

    /// Drops bookkeeping for backends no longer in `state` and expired
    /// affinity entries.
    pub fn gc(&self, state: &NodeState) {
        let live: std::collections::HashSet<SocketAddr> = state
            .services()
            .flat_map(|s| s.ports.iter())
            .flat_map(|p| p.endpoints.iter().map(|e| e.addr))
            .collect();
        self.stats
            .retain(|a, s| live.contains(a) || s.active.load(Ordering::Relaxed) > 0);
        let now = Instant::now();
        self.affinity.retain(|((key, _, _), _), (addr, last)| {
            let timeout = state.service(key).and_then(|s| s.affinity);
            live.contains(addr) && timeout.is_some_and(|t| now.duration_since(*last) < t)
        });
        self.round_robin
            .retain(|(key, _, _), _| state.service(key).is_some());
        self.metrics.proxy.retain(|(key, port, udp), ep| {
            state.service(key).is_some_and(|s| {
                s.ports
                    .iter()
                    .filter(|p| p.port == *port && (p.protocol == "UDP") == *udp)
                    .any(|p| ep.is_none_or(|a| p.endpoints.iter().any(|e| e.addr == a)))
            })
        });
    }
}

/// Closes `s` with RST (SO_LINGER 0) so the client fails fast instead of
/// seeing an orderly end of a stream that never began.
pub fn reset(s: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)) {
        debug!(error = %e, "cannot set SO_LINGER 0");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PortInfo;

    fn ep(i: u8, ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, i], 80)),
            ready,
            serving,
            terminating,
            node_name: Some(node.to_string()),
        }
    }

    fn route(endpoints: Vec<Endpoint>, external: bool, local: bool) -> Route {
        Route {
            service: Arc::new(ServiceInfo {
                key: ServiceKey::new("default", "web"),
                service_type: "NodePort".into(),
                cluster_ip: None,
                lb_ips: vec![],
                ports: vec![PortInfo {
                    name: String::new(),
                    protocol: "TCP".into(),
                    port: 80,
                    node_port: Some(30080),
                    endpoints: endpoints.into(),
                }],
                affinity: None,
                external_local: local,
                internal_local: false,
                cluster_ips: vec![],
                headless: false,
                external_name: None,
                addresses: Arc::new([]),
                source_ranges: None,
                health_check_node_port: None,
            }),
            port: 0,
            via: if external {
                Via::NodePort
            } else {
                Via::ClusterIp
            },
            addr: SocketAddr::from(([192, 0, 2, 10], 30080)),
        }
    }

    /// A client outside the node.
    const OUTSIDE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));

    fn addrs(v: Vec<&Endpoint>) -> Vec<u8> {
        v.iter()
            .map(|e| match e.addr.ip() {
                IpAddr::V4(ip) => ip.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn readiness_and_terminating_fallback() {
        let r = route(
            vec![ep(1, true, true, false, "a"), ep(2, false, true, true, "a")],
            false,
            false,
        );
        assert_eq!(addrs(r.usable_endpoints("a", OUTSIDE)), [1]);
        let r = route(
            vec![
                ep(1, false, false, true, "a"),
                ep(2, false, true, true, "a"),
                ep(3, false, false, false, "a"),
            ],
            false,
            false,
        );
        assert_eq!(addrs(r.usable_endpoints("a", OUTSIDE)), [2]);
    }

    #[test]
    fn external_local_policy() {
        let eps = vec![ep(1, true, true, false, "a"), ep(2, true, true, false, "b")];
        assert_eq!(
            addrs(route(eps.clone(), true, true).usable_endpoints("b", OUTSIDE)),
            [2]
        );
        assert!(
            route(eps.clone(), true, true)
                .usable_endpoints("c", OUTSIDE)
                .is_empty()
        );
        // From the node itself (its address, or loopback): Cluster semantics.
        for me in [IpAddr::from([192, 0, 2, 10]), IpAddr::from([127, 0, 0, 1])] {
            assert_eq!(
                addrs(route(eps.clone(), true, true).usable_endpoints("c", me)),
                [1, 2]
            );
        }
        // ClusterIP traffic ignores externalTrafficPolicy.
        assert_eq!(
            addrs(route(eps, false, true).usable_endpoints("c", OUTSIDE)),
            [1, 2]
        );
    }

    #[test]
    fn pick_prefers_fewer_connections_and_skips_ejected() {
        let fwd = Forwarder::new(&Config::default()).expect("forwarder");
        let eps = [ep(1, true, true, false, "a"), ep(2, true, true, false, "a")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let key = (ServiceKey::new("default", "web"), 80, false);
        let client: IpAddr = [127, 0, 0, 1].into();
        fwd.stats_for(eps[0].addr)
            .active
            .store(5, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(fwd.pick(&key, None, &refs, &[], client), Some(eps[1].addr));
        }
        let s = fwd.stats_for(eps[1].addr);
        s.failed(eps[1].addr);
        s.failed(eps[1].addr);
        assert_eq!(fwd.pick(&key, None, &refs, &[], client), Some(eps[0].addr));
        // With everything else tried, an ejected endpoint is still a last resort.
        assert_eq!(
            fwd.pick(&key, None, &refs, &[eps[0].addr], client),
            Some(eps[1].addr)
        );
        assert_eq!(
            fwd.pick(&key, None, &refs, &[eps[0].addr, eps[1].addr], client),
            None
        );
    }

    #[test]
    fn round_robin_and_affinity() {
        let cfg = Config {
            lb_policy: LbPolicy::RoundRobin,
            ..Config::default()
        };
        let fwd = Forwarder::new(&cfg).expect("forwarder");
        let eps = [ep(1, true, true, false, "a"), ep(2, true, true, false, "a")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let key = (ServiceKey::new("default", "web"), 80, false);
        let client: IpAddr = [127, 0, 0, 1].into();
        let seq: Vec<_> = (0..4)
            .map(|_| fwd.pick(&key, None, &refs, &[], client).expect("pick"))
            .collect();
        assert_eq!(seq, [eps[0].addr, eps[1].addr, eps[0].addr, eps[1].addr]);
        fwd.affinity
            .insert((key.clone(), client), (eps[1].addr, Instant::now()));
        let hour = Some(Duration::from_secs(3600));
        for _ in 0..4 {
            assert_eq!(fwd.pick(&key, hour, &refs, &[], client), Some(eps[1].addr));
        }
    }
}
