//! Keeps one listener per address a Service is reachable at on this node
//! (ClusterIP:port, node IP:nodePort, LB ingress IP:port; a TCP listener or
//! a UDP socket as the port's protocol says), reconciled to every new
//! state. Listeners resolve their route at accept time from the latest
//! route table, so endpoint changes need no rebinding, and removing
//! a listener only stops accepting: connections it accepted keep running.
//! A TCP address gets one `SO_REUSEPORT` socket per forwarding worker
//! ([`crate::workers`]); the kernel spreads connections over them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::config::Config;
use crate::drain::Drain;
use crate::forward::{self, Forwarder, ProxyError, Route, Via};
use crate::metrics::Metrics;
use crate::state::NodeState;
use crate::udp;
use crate::workers::Workers;

/// How often addresses that failed to bind are retried.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Pause after an accept error (typically EMFILE) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const BACKLOG: i32 = 1024;

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// The transport of a listener. SCTP ports get none (not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A listener: its transport and address.
pub type ListenKey = (Proto, SocketAddr);

/// Listener addresses and where each leads.
/// Shared routes: a connection's task holds an `Arc` (8 bytes), not a copy.
pub type RouteTable = BTreeMap<ListenKey, Arc<Route>>;

/// Errors binding a listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address cannot be bound (not local, in use, no permission).
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The addresses a state asks this node to listen on: every TCP and UDP
/// port of every Service with a ClusterIP; NodePort and LoadBalancer
/// Services also on each of `node_port_ips` (the node's addresses that take
/// NodePorts); LoadBalancer Services on each ingress IP.
pub fn route_table(state: &NodeState, node_port_ips: &[IpAddr]) -> RouteTable {
    let mut table = RouteTable::new();
    for svc in state.services() {
        let Some(cluster_ip) = svc.cluster_ip else {
            continue;
        };
        for (i, port) in svc.ports.iter().enumerate() {
            let proto = match port.protocol.as_str() {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                _ => continue,
            };
            let mut add = |addr: SocketAddr, via: Via| {
                let route = Route {
                    service: svc.clone(),
                    port: i,
                    via,
                    addr,
                };
                let addr = (proto, addr);
                if let Some(other) = table.get(&addr) {
                    warn!(
                        addr = %addr.1,
                        protocol = ?addr.0,
                        service = %svc.key,
                        owner = %other.service.key,
                        "address claimed by two services, keeping the first"
                    );
                } else {
                    table.insert(addr, Arc::new(route));
                }
            };
            add(SocketAddr::new(cluster_ip, port.port), Via::ClusterIp);
            if svc.has_node_ports()
                && let Some(np) = port.node_port
            {
                for ip in node_port_ips {
                    add(SocketAddr::new(*ip, np), Via::NodePort);
                }
            }
            for ip in &svc.lb_ips {
                add(SocketAddr::new(*ip, port.port), Via::LoadBalancer);
            }
        }
    }
    table
}

/// Handle on the running listener set.
#[derive(Debug, Clone)]
pub struct Listeners {
    bound: watch::Receiver<Arc<BTreeSet<ListenKey>>>,
    node_port_ips: Vec<IpAddr>,
}

impl Listeners {
    /// The addresses NodePorts listen on: `--node-ip`, then the interface
    /// addresses inside `--nodeport-addresses`, as read at startup.
    pub fn node_port_ips(&self) -> &[IpAddr] {
        &self.node_port_ips
    }

    /// The addresses with a TCP listener right now.
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.bound
            .borrow()
            .iter()
            .filter(|(p, _)| *p == Proto::Tcp)
            .map(|(_, a)| *a)
            .collect()
    }
}

/// Starts reconciling listeners to `state`. Nothing is bound before the
/// first synced state; the task ends when `drain` stops. Each reconciled
/// revision is reported to `metrics` as programmed. Fails only when the
/// forwarder's idle-reaper thread cannot be started.
pub fn spawn(
    cfg: &Config,
    state: watch::Receiver<Arc<NodeState>>,
    drain: &Drain,
    metrics: Arc<Metrics>,
    workers: Arc<Workers>,
) -> io::Result<Listeners> {
    let (bound_tx, bound) = watch::channel(Arc::new(BTreeSet::new()));
    let (routes_tx, _) = watch::channel(Arc::new(RouteTable::new()));
    let forwarder = Arc::new(Forwarder::new(cfg)?.with_metrics(metrics.clone()));
    // Connections still open when the grace period ends are cut through the
    // forwarder's registry: their tasks carry no cancellation of their own.
    // Not a tracked task, so that it doesn't hold the grace period open.
    let (cut, tracker, fwd) = (
        drain.cut_token().clone(),
        drain.tracker().clone(),
        forwarder.clone(),
    );
    tokio::spawn(async move {
        tokio::select! {
            () = cut.cancelled() => fwd.cut_all(),
            () = tracker.wait() => {}
        }
    });
    let node_port_ips = node_port_ips(cfg.node_ip, &cfg.nodeport_addresses)?;
    if node_port_ips.len() > 1 {
        info!(addresses = ?node_port_ips, "NodePorts listen on these addresses");
    }
    let r = Reconciler {
        node_port_ips: node_port_ips.clone(),
        forwarder,
        metrics,
        state,
        routes_tx,
        bound_tx,
        drain: drain.clone(),
        workers,
        active: HashMap::new(),
        failed: HashSet::new(),
    };
    drain.tracker().spawn(r.run());
    Ok(Listeners {
        bound,
        node_port_ips,
    })
}

/// How often the forwarder's bookkeeping (expired ClientIP affinity, stats
/// of endpoints gone) is swept between state changes.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// `node_ip`, then every interface address inside `ranges`.
fn node_port_ips(node_ip: IpAddr, ranges: &[ipnet::IpNet]) -> io::Result<Vec<IpAddr>> {
    let mut ips = vec![node_ip];
    if ranges.is_empty() {
        return Ok(ips);
    }
    for iface in if_addrs::get_if_addrs()? {
        let ip = iface.ip();
        if ranges.iter().any(|r| r.contains(&ip)) && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

struct Reconciler {
    /// The node's addresses that take NodePorts, `--node-ip` first.
    node_port_ips: Vec<IpAddr>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    state: watch::Receiver<Arc<NodeState>>,
    routes_tx: watch::Sender<Arc<RouteTable>>,
    bound_tx: watch::Sender<Arc<BTreeSet<ListenKey>>>,
    drain: Drain,
    workers: Arc<Workers>,
    /// Each listener's stop token and its tasks (one per worker for TCP).
    active: HashMap<ListenKey, (CancellationToken, Vec<JoinHandle<()>>)>,
    /// Addresses that failed to bind, warned about once until they bind.
    failed: HashSet<ListenKey>,
}

impl Reconciler {
    async fn run(mut self) {
        let stop = self.drain.stop_token().clone();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = self.state.wait_for(|s| s.is_synced()) => if r.is_err() { return },
        }
        // A static source drops its sender after the one state it has.
        let mut source_open = true;
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'states: loop {
            let snapshot = self.state.borrow_and_update().clone();
            self.reconcile(&snapshot).await;
            loop {
                let retry = async {
                    if self.failed.is_empty() {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(BIND_RETRY).await
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => break 'states,
                    r = self.state.changed(), if source_open => {
                        source_open = r.is_ok();
                        break;
                    }
                    _ = retry => break,
                    // Expired affinity entries go even when the state
                    // stays put (many client addresses would pile up).
                    _ = sweep.tick() => {
                        let state = self.state.borrow().clone();
                        self.forwarder.gc(&state);
                    }
                }
            }
        }
        for (_, (token, _)) in self.active.drain() {
            token.cancel();
        }
    }

    async fn reconcile(&mut self, state: &NodeState) {
        let table = Arc::new(route_table(state, &self.node_port_ips));
        // Publish routes first: a listener kept across the change serves the
        // new endpoints from its next accept on.
        self.routes_tx.send_replace(table.clone());
        self.forwarder.gc(state);

        let gone: Vec<ListenKey> = self
            .active
            .keys()
            .filter(|a| !table.contains_key(a))
            .copied()
            .collect();
        for key in gone {
            if let Some((token, handles)) = self.active.remove(&key) {
                token.cancel();
                // The sockets must be closed before the address can be bound again.
                for handle in handles {
                    let _ = handle.await;
                }
                info!(addr = %key.1, protocol = ?key.0, "listener closed");
            }
        }
        self.failed.retain(|a| table.contains_key(a));

        for (key, route) in table.iter() {
            if self.active.contains_key(key) {
                continue;
            }
            let (proto, addr) = *key;
            let token = self.drain.stop_token().child_token();
            let routes = self.routes_tx.subscribe();
            let (forwarder, drain) = (self.forwarder.clone(), self.drain.clone());
            let started = match proto {
                Proto::Tcp => bind(addr, self.workers.count()).map(|sockets| {
                    let tracker = self.drain.tracker();
                    sockets
                        .into_iter()
                        .zip(self.workers.handles())
                        .map(|(socket, rt)| {
                            let serve = accept_loop(
                                socket,
                                addr,
                                token.clone(),
                                routes.clone(),
                                forwarder.clone(),
                                drain.clone(),
                            );
                            tracker.spawn_on(serve, rt)
                        })
                        .collect()
                }),
                Proto::Udp => udp::bind(addr)
                    .map_err(|source| ListenError::Bind { addr, source })
                    .map(|socket| {
                        let serve =
                            udp::serve(socket, addr, token.clone(), routes, forwarder, drain);
                        vec![self.drain.tracker().spawn(serve)]
                    }),
            };
            match started {
                Ok(handles) => {
                    self.failed.remove(key);
                    info!(%addr, protocol = ?proto, service = %route.service.key, via = ?route.via, "listener bound");
                    self.active.insert(*key, (token, handles));
                }
                Err(e) => {
                    if self.failed.insert(*key) {
                        warn!(
                            %addr,
                            protocol = ?proto,
                            service = %route.service.key,
                            error = %e,
                            "cannot listen; is the address local on this node (route capture)? retrying"
                        );
                    }
                }
            }
        }
        let bound: BTreeSet<ListenKey> = self.active.keys().copied().collect();
        self.metrics.set_listeners(bound.len());
        self.metrics.programmed(state.revision());
        self.bound_tx.send_if_modified(|cur| {
            if **cur == bound {
                false
            } else {
                *cur = Arc::new(bound);
                true
            }
        });
    }
}

/// Binds `count` listening sockets on `addr`, sharing it with
/// `SO_REUSEPORT` when there is more than one. The sockets are not yet
/// registered with a runtime: each worker does that for its own.
fn bind(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, ListenError> {
    let err = |source| ListenError::Bind { addr, source };
    (0..count.max(1))
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(err)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true).map_err(err)?;
            }
            socket.set_reuse_address(true).map_err(err)?;
            if count > 1 {
                socket.set_reuse_port(true).map_err(err)?;
            }
            socket.set_nonblocking(true).map_err(err)?;
            // Accepted sockets inherit these, so connections need no setsockopt.
            crate::splice::tune_stream(&socket, Some(forward::KEEPALIVE)).map_err(err)?;
            socket.bind(&addr.into()).map_err(err)?;
            socket.listen(BACKLOG).map_err(err)?;
            Ok(socket.into())
        })
        .collect()
}

/// Accepts on one worker's socket until `stop`; every connection is
/// forwarded by a task on this worker's runtime.
async fn accept_loop(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    stop: CancellationToken,
    routes: watch::Receiver<Arc<RouteTable>>,
    forwarder: Arc<Forwarder>,
    drain: Drain,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot register the listener with its worker");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(%addr, error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let route = routes.borrow().get(&(Proto::Tcp, addr)).cloned();
        let Some(route) = route else {
            forward::reset(&stream);
            continue;
        };
        if route.via == Via::LoadBalancer && !route.service.allows_source(peer.ip()) {
            // kube-proxy drops such packets; past accept, a reset is the
            // closest a userspace proxy gets.
            debug!(client = %peer, listener = %addr, service = %route.service.key,
                "client outside loadBalancerSourceRanges");
            forwarder.denied_by_source_range(&route);
            forward::reset(&stream);
            continue;
        }
        let span = tracing::debug_span!(
            "conn",
            id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
            client = %peer,
            listener = %addr,
            service = %route.service.key,
            upstream = tracing::field::Empty,
        );
        drain
            .tracker()
            .spawn(serve(forwarder.clone(), stream, peer, route).instrument(span));
    }
}

/// Forwards one accepted connection and logs how it ended. A block rather
/// than an `async fn`: see [`crate::splice::forward`].
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores by-value arguments twice (rust-lang/rust#62958)"
)]
fn serve(
    forwarder: Arc<Forwarder>,
    stream: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
) -> impl Future<Output = ()> {
    async move {
        let start = Instant::now();
        let result = forwarder.handle(stream, peer, &route).await;
        let duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(t) => debug!(
                bytes_in = t.client_to_upstream,
                bytes_out = t.upstream_to_client,
                duration_ms,
                "connection closed"
            ),
            Err(ProxyError::Forward(e)) => {
                let t = e.transferred();
                debug!(
                    bytes_in = t.client_to_upstream,
                    bytes_out = t.upstream_to_client,
                    duration_ms,
                    error = %e,
                    "connection closed"
                )
            }
            Err(e) => debug!(duration_ms, error = %e, "connection refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1)
            .expect("bind")
            .pop()
            .expect("one socket");
        let listener = TcpListener::from_std(socket).expect("register");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("keepidle"),
            forward::KEEPALIVE
        );
    }

    #[tokio::test]
    async fn workers_share_an_address_and_each_accepts() {
        // A free port on an address no other test uses.
        let ip = std::net::Ipv4Addr::new(127, 61, 0, 1);
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = SocketAddr::from((ip, port));
        let listeners: Vec<TcpListener> = bind(addr, 2)
            .expect("two sockets on one address")
            .into_iter()
            .map(|s| TcpListener::from_std(s).expect("register"))
            .collect();
        assert!(listeners.iter().all(|l| l.local_addr().ok() == Some(addr)));
        // The kernel hashes connections over the sockets: from enough client
        // ports, each socket gets some.
        let mut clients = Vec::new();
        let mut accepted = [0usize; 2];
        for _ in 0..64 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            for (i, l) in listeners.iter().enumerate() {
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(20), l.accept()).await
                {
                    accepted[i] += 1;
                }
            }
            if accepted.iter().all(|&n| n > 0) {
                break;
            }
        }
        assert!(
            accepted.iter().all(|&n| n > 0),
            "accepted per socket: {accepted:?}"
        );
        assert!(
            bind(addr, 1).is_err(),
            "an exclusive bind must not join the group"
        );
    }
}
