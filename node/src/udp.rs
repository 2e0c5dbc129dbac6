//! UDP Services, proxied in userspace: each client address gets a flow, a
//! socket connected to one endpoint (chosen like a TCP connection) that
//! lives while packets pass and for [`FLOW_IDLE_TIMEOUT`] after, as
//! conntrack keeps kube-proxy's UDP entries. Replies leave through the
//! Service's own socket, so the client sees them come from the address it
//! sent to. A flow whose endpoint left the usable set moves to another one
//! at the next packet, as kube-proxy clears stale UDP conntrack entries;
//! a Service address that goes away ends its flows (there is no connection
//! to let finish).

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::drain::Drain;
use crate::forward::{FlowLease, Forwarder, Via};
use crate::listeners::{Proto, RouteTable};
use crate::state::ServiceInfo;

/// How long a flow lives without a packet either way.
pub const FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// One receive buffer per runtime thread: a datagram is read and sent
    /// on without an await in between, so flows need no buffer of their own.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// Binds a UDP socket for a Service address.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// What the listener and a flow's reply task share.
#[derive(Debug)]
struct FlowShared {
    start: Instant,
    /// Milliseconds since `start` of the last packet either way.
    last: AtomicU64,
    to_endpoint: AtomicU64,
    /// Set when the reply task has ended (idle, refused, stopped).
    done: AtomicBool,
    /// The endpoint answered with ICMP port unreachable.
    refused: AtomicBool,
}

impl FlowShared {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            to_endpoint: AtomicU64::new(0),
            done: AtomicBool::new(false),
            refused: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// When the flow expires if nothing else passes.
    fn deadline(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + FLOW_IDLE_TIMEOUT
    }
}

/// One client's flow, as the listener keeps it.
struct Flow {
    upstream: Arc<UdpSocket>,
    endpoint: SocketAddr,
    /// The Service snapshot the endpoint was checked against; a newer one
    /// means the endpoints changed and the choice is checked again.
    service: Arc<ServiceInfo>,
    shared: Arc<FlowShared>,
    cancel: CancellationToken,
}

/// Receives on a Service's UDP address until `stop`, relaying each
/// client's datagrams over its flow.
pub async fn serve(
    socket: UdpSocket,
    addr: SocketAddr,
    stop: CancellationToken,
    routes: watch::Receiver<Arc<RouteTable>>,
    forwarder: Arc<Forwarder>,
    drain: Drain,
) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(FLOW_IDLE_TIMEOUT);
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled() => break,
            _ = sweep.tick() => {
                flows.retain(|_, f| !f.shared.done.load(Ordering::Relaxed));
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    debug!(%addr, error = %e, "udp receive failed");
                    continue;
                }
            },
        };
        let route = routes.borrow().get(&(Proto::Udp, addr)).cloned();
        let Some(route) = route else { continue };
        if route.via == Via::LoadBalancer && !route.service.allows_source(client.ip()) {
            forwarder.denied_by_source_range(&route);
            continue;
        }
        let mut avoid = Vec::new();
        if let Some(f) = flows.get_mut(&client) {
            let keep = if f.shared.done.load(Ordering::Relaxed) || f.cancel.is_cancelled() {
                if f.shared.refused.load(Ordering::Relaxed) {
                    avoid.push(f.endpoint);
                }
                false
            } else if Arc::ptr_eq(&f.service, &route.service) {
                true
            } else if forwarder.still_usable(&route, client.ip(), f.endpoint) {
                f.service = route.service.clone();
                true
            } else {
                debug!(%client, endpoint = %f.endpoint, "endpoint no longer usable, moving the flow");
                false
            };
            if !keep && let Some(old) = flows.remove(&client) {
                old.cancel.cancel();
            }
        }
        let flow = match flows.entry(client) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let Some(lease) = forwarder.lease_flow(&route, client, &avoid) else {
                    debug!(%client, service = %route.service.key, "no usable endpoint, datagram dropped");
                    continue;
                };
                match open(lease, client, route.service.clone(), &socket, &stop, &drain).await {
                    Ok(flow) => v.insert(flow),
                    Err(e) => {
                        debug!(%client, error = %e, "cannot open a udp flow");
                        continue;
                    }
                }
            }
        };
        flow.shared.touch();
        match flow.upstream.send(&buf[..n]).await {
            Ok(sent) => {
                flow.shared
                    .to_endpoint
                    .fetch_add(sent as u64, Ordering::Relaxed);
            }
            Err(e) => {
                debug!(%client, endpoint = %flow.endpoint, error = %e, "udp send failed");
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    flow.shared.refused.store(true, Ordering::Relaxed);
                }
                flow.cancel.cancel();
            }
        }
    }
    for (_, f) in flows {
        f.cancel.cancel();
    }
}

/// Connects a socket to the leased endpoint and starts relaying its
/// replies to `client`.
async fn open(
    lease: FlowLease,
    client: SocketAddr,
    service: Arc<ServiceInfo>,
    listener: &Arc<UdpSocket>,
    stop: &CancellationToken,
    drain: &Drain,
) -> io::Result<Flow> {
    let local: SocketAddr = if lease.addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = UdpSocket::bind(local).await?;
    upstream.connect(lease.addr).await?;
    let upstream = Arc::new(upstream);
    let shared = Arc::new(FlowShared::new());
    let cancel = stop.child_token();
    debug!(%client, endpoint = %lease.addr, "udp flow opened");
    let flow = Flow {
        upstream: upstream.clone(),
        endpoint: lease.addr,
        service,
        shared: shared.clone(),
        cancel: cancel.clone(),
    };
    drain.tracker().spawn(relay_replies(
        upstream,
        listener.clone(),
        client,
        lease,
        shared,
        cancel,
    ));
    Ok(flow)
}

/// Sends the endpoint's datagrams back to `client` until the flow idles
/// out, the endpoint refuses, or the flow is cancelled.
async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    lease: FlowLease,
    shared: Arc<FlowShared>,
    cancel: CancellationToken,
) {
    let mut to_client = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(shared.deadline()) => {
                if Instant::now() >= shared.deadline() {
                    debug!(%client, endpoint = %lease.addr, "udp flow idle");
                    break;
                }
            }
            r = upstream.readable() => {
                if let Err(e) = r {
                    debug!(%client, error = %e, "udp flow socket failed");
                    break;
                }
                match relay_one(&upstream, &listener, client).await {
                    Ok(Some(n)) => {
                        to_client += n as u64;
                        shared.touch();
                        lease.answered();
                    }
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        debug!(%client, endpoint = %lease.addr, "endpoint refused the udp flow");
                        shared.refused.store(true, Ordering::Relaxed);
                        lease.refused();
                        break;
                    }
                    Err(e) => debug!(%client, error = %e, "udp relay failed"),
                }
            }
        }
    }
    shared.done.store(true, Ordering::Relaxed);
    lease.transferred(shared.to_endpoint.load(Ordering::Relaxed), to_client);
}

/// Moves one datagram from the endpoint to the client, if one is waiting;
/// returns its size.
async fn relay_one(
    upstream: &UdpSocket,
    listener: &UdpSocket,
    client: SocketAddr,
) -> io::Result<Option<usize>> {
    enum Step {
        Nothing,
        Sent(usize),
        /// The send buffer was full: the datagram, to send with an await.
        Pending(Vec<u8>),
    }
    // Receive and try to send without an await, in the thread's buffer.
    let step = BUF.with_borrow_mut(|buf| -> io::Result<Step> {
        let n = match upstream.try_recv(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Nothing),
            Err(e) => return Err(e),
        };
        match listener.try_send_to(&buf[..n], client) {
            Ok(sent) => Ok(Step::Sent(sent)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::Pending(buf[..n].to_vec())),
            Err(e) => Err(e),
        }
    })?;
    match step {
        Step::Nothing => Ok(None),
        Step::Sent(n) => Ok(Some(n)),
        Step::Pending(d) => listener.send_to(&d, client).await.map(Some),
    }
}
