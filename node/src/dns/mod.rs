//! Cluster DNS on the node agent: answers the Kubernetes DNS schema for the
//! cluster domain from the node's watched state (no control-plane round
//! trip), forwards other names to upstream resolvers, over UDP and TCP.
//!
//! The index ([`zone::Zone`]) is rebuilt once per new [`NodeState`] and
//! swapped in whole; a query parses the question ([`wire`]), looks the name
//! up and copies precomputed record bytes into the reply.

pub mod upstream;
pub mod wire;
pub mod zone;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::drain::Drain;
use crate::state::NodeState;
use upstream::Upstreams;
use wire::{Flags, Parsed, Rcode, Sections};
use zone::{Lookup, Zone, ZoneConfig};

/// Largest UDP datagram accepted; longer ones are dropped unread.
const MAX_UDP_QUERY: usize = 4096;
/// A TCP connection idle this long between queries is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
const MAX_TCP_CONNECTIONS: usize = 512;
const UDP_RECV_BUFFER: usize = 4 << 20;

/// Errors starting the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The UDP or TCP socket cannot be bound.
    #[error("binding DNS on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What the DNS server is started with.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    pub zone: ZoneConfig,
    pub upstreams: Vec<SocketAddr>,
}

/// A running DNS server.
#[derive(Debug, Clone, Copy)]
pub struct DnsServer {
    /// The bound address (UDP and TCP share the port).
    pub addr: SocketAddr,
}

/// What to do with a datagram after [`Handler::handle`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the reply in `out`.
    Reply,
    /// Send nothing.
    Drop,
    /// Forward upstream; `out` holds the SERVFAIL to send if that fails.
    Forward,
}

/// Answers queries from the current zone index.
#[derive(Debug)]
pub struct Handler {
    zone: RwLock<Arc<Zone>>,
    upstreams: Upstreams,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Handler {
    pub fn new(zone: Zone, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            zone: RwLock::new(Arc::new(zone)),
            upstreams: Upstreams::new(upstreams),
            metrics: Arc::default(),
        }
    }

    /// Counts answered queries into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn count(&self, reply: &[u8]) {
        let (qtype, rcode) = classify(reply);
        self.metrics.dns_query(qtype, rcode);
    }

    fn zone(&self) -> Arc<Zone> {
        match self.zone.read() {
            Ok(z) => z.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a new index; queries in progress finish on the old one.
    pub fn set_zone(&self, zone: Zone) {
        let zone = Arc::new(zone);
        match self.zone.write() {
            Ok(mut z) => *z = zone,
            Err(poisoned) => *poisoned.into_inner() = zone,
        }
    }

    /// The request path: parses `packet` and writes the reply into `out`.
    /// Total over arbitrary bytes — never panics. Replies are counted by
    /// question type and rcode (forwarded ones in [`Self::forward`]).
    pub fn handle(&self, packet: &[u8], tcp: bool, out: &mut Vec<u8>) -> Outcome {
        let outcome = self.answer(packet, tcp, out);
        if outcome == Outcome::Reply {
            self.count(out);
        }
        outcome
    }

    fn answer(&self, packet: &[u8], tcp: bool, out: &mut Vec<u8>) -> Outcome {
        let req = match wire::parse(packet) {
            Parsed::Query(req) => req,
            Parsed::Drop => return Outcome::Drop,
            Parsed::Error {
                id,
                opcode,
                rd,
                question,
                rcode,
            } => {
                wire::error(id, opcode, rd, question, rcode, out);
                return Outcome::Reply;
            }
        };
        if req.edns.is_some_and(|e| e.version > 0) {
            wire::bad_version(&req, out);
            return Outcome::Reply;
        }
        let limit = if tcp {
            usize::from(u16::MAX)
        } else {
            req.udp_limit()
        };
        let ra = !self.upstreams.is_empty();
        let zone = self.zone();
        let flags = |authoritative, rcode| Flags {
            authoritative,
            recursion_available: ra,
            rcode,
        };
        if req.qclass != wire::CLASS_IN && req.qclass != wire::CLASS_ANY && zone.contains(&req) {
            wire::respond(
                &req,
                flags(false, Rcode::Refused),
                Sections::default(),
                limit,
                out,
            );
            return Outcome::Reply;
        }
        match zone.lookup(&req) {
            Lookup::Found(p) => {
                wire::respond(&req, flags(true, Rcode::NoError), p.sections(), limit, out);
            }
            l @ (Lookup::NoData | Lookup::NxDomain) => {
                let soa = zone.negative_soa(req.name_len());
                let rcode = if matches!(l, Lookup::NxDomain) {
                    Rcode::NxDomain
                } else {
                    Rcode::NoError
                };
                let s = Sections {
                    authority: &soa,
                    nscount: 1,
                    ..Sections::default()
                };
                wire::respond(&req, flags(true, rcode), s, limit, out);
            }
            Lookup::NotSynced => {
                wire::respond(
                    &req,
                    flags(false, Rcode::ServFail),
                    Sections::default(),
                    limit,
                    out,
                );
            }
            Lookup::Outside => {
                if self.upstreams.is_empty() {
                    wire::respond(
                        &req,
                        flags(false, Rcode::Refused),
                        Sections::default(),
                        limit,
                        out,
                    );
                    return Outcome::Reply;
                }
                if self.upstreams.cached(&req, out) {
                    if out.len() > limit {
                        wire::truncated(&req, ra, out);
                    }
                    return Outcome::Reply;
                }
                wire::respond(
                    &req,
                    flags(false, Rcode::ServFail),
                    Sections::default(),
                    limit,
                    out,
                );
                return Outcome::Forward;
            }
        }
        Outcome::Reply
    }

    /// Forwards `packet` upstream; the SERVFAIL in `fallback` if that fails.
    async fn forward(&self, packet: &[u8], tcp: bool, fallback: Vec<u8>) -> Vec<u8> {
        let reply = match self.upstreams.resolve(packet, tcp).await {
            Ok(reply) => reply,
            Err(e) => {
                debug!(error = %e, "forwarding failed, answering SERVFAIL");
                fallback
            }
        };
        self.count(&reply);
        reply
    }
}

/// A reply's question type and response code, as bounded metric labels.
fn classify(reply: &[u8]) -> (&'static str, &'static str) {
    let rcode = match reply.get(3).map(|b| b & 0x0f) {
        Some(0) => "NOERROR",
        Some(1) => "FORMERR",
        Some(2) => "SERVFAIL",
        Some(3) => "NXDOMAIN",
        Some(4) => "NOTIMP",
        Some(5) => "REFUSED",
        _ => "other",
    };
    let qdcount = reply.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]));
    if qdcount.is_none_or(|n| n == 0) {
        return ("none", rcode);
    }
    // The question name: labels up to the root, or a compression pointer.
    let mut i = 12;
    let qtype_at = loop {
        match reply.get(i) {
            Some(0) => break i + 1,
            Some(&len) if len & 0xc0 == 0xc0 => break i + 2,
            Some(&len) => i += usize::from(len) + 1,
            None => return ("other", rcode),
        }
    };
    let qtype = match reply
        .get(qtype_at..qtype_at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
    {
        Some(1) => "A",
        Some(2) => "NS",
        Some(5) => "CNAME",
        Some(6) => "SOA",
        Some(12) => "PTR",
        Some(15) => "MX",
        Some(16) => "TXT",
        Some(28) => "AAAA",
        Some(33) => "SRV",
        Some(64) => "SVCB",
        Some(65) => "HTTPS",
        Some(255) => "ANY",
        _ => "other",
    };
    (qtype, rcode)
}

/// Binds UDP and TCP on `cfg.listen`, builds the first index from the
/// current state, and keeps the index in step with every new state.
pub async fn spawn(
    cfg: DnsConfig,
    mut state: watch::Receiver<Arc<NodeState>>,
    drain: &Drain,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<DnsServer, DnsError> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    let (udp, tcp, addr) = bind(cfg.listen, workers)?;
    let first = state.borrow_and_update().clone();
    let handler = Arc::new(
        Handler::new(Zone::build(&first, &cfg.zone), cfg.upstreams.clone()).with_metrics(metrics),
    );
    info!(
        %addr,
        domain = %cfg.zone.domain,
        ttl = cfg.zone.ttl,
        upstreams = ?cfg.upstreams,
        udp_sockets = udp.len(),
        "dns listening"
    );
    let stop = drain.stop_token().clone();
    drain.tracker().spawn(index_loop(
        state,
        handler.clone(),
        cfg.zone.clone(),
        stop.clone(),
    ));
    for sock in udp {
        drain.tracker().spawn(serve_udp(
            Arc::new(sock),
            handler.clone(),
            stop.clone(),
            drain.clone(),
        ));
    }
    drain
        .tracker()
        .spawn(serve_tcp(tcp, handler, stop, drain.clone()));
    Ok(DnsServer { addr })
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    // A bigger buffer absorbs bursts; the kernel caps it at rmem_max.
    if let Err(e) = sock.set_recv_buffer_size(UDP_RECV_BUFFER) {
        debug!(error = %e, "keeping the default UDP receive buffer");
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// One UDP socket per worker (SO_REUSEPORT) and a TCP listener, all on the
/// same port; port 0 picks one free for both.
fn bind(
    addr: SocketAddr,
    workers: usize,
) -> Result<(Vec<UdpSocket>, TcpListener, SocketAddr), DnsError> {
    let err = |addr, source| DnsError::Bind { addr, source };
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let first = udp_socket(addr, workers > 1).map_err(|e| err(addr, e))?;
        let bound = first.local_addr().map_err(|e| err(addr, e))?;
        let tcp = match std::net::TcpListener::bind(bound)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(TcpListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                last = Some(err(bound, e));
                continue;
            }
        };
        let mut udp = vec![first];
        for _ in 1..workers {
            udp.push(udp_socket(bound, true).map_err(|e| err(bound, e))?);
        }
        return Ok((udp, tcp, bound));
    }
    Err(last.unwrap_or_else(|| err(addr, io::ErrorKind::AddrInUse.into())))
}

async fn index_loop(
    mut state: watch::Receiver<Arc<NodeState>>,
    handler: Arc<Handler>,
    cfg: ZoneConfig,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = state.changed() => {
                if changed.is_err() {
                    // The state source is gone (static mode): the index stays.
                    return;
                }
            }
        }
        let snapshot = state.borrow_and_update().clone();
        let started = Instant::now();
        let cfg = cfg.clone();
        let built = tokio::task::spawn_blocking(move || Zone::build(&snapshot, &cfg)).await;
        match built {
            Ok(zone) => {
                debug!(
                    names = zone.len(),
                    build_us = started.elapsed().as_micros() as u64,
                    "dns index rebuilt"
                );
                handler.set_zone(zone);
            }
            Err(e) => warn!(error = %e, "building the dns index failed, keeping the previous one"),
        }
    }
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    handler: Arc<Handler>,
    stop: CancellationToken,
    drain: Drain,
) {
    let mut buf = vec![0u8; MAX_UDP_QUERY + 1];
    let mut out = Vec::with_capacity(MAX_UDP_QUERY);
    stop.run_until_cancelled(async {
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(v) => v,
                Err(e) => {
                    debug!(error = %e, "dns udp receive");
                    continue;
                }
            };
            if n > MAX_UDP_QUERY {
                continue;
            }
            let packet = &buf[..n];
            match handler.handle(packet, false, &mut out) {
                Outcome::Reply => {
                    if let Err(e) = sock.send_to(&out, peer).await {
                        debug!(%peer, error = %e, "dns udp send");
                    }
                }
                Outcome::Drop => {}
                Outcome::Forward => {
                    let packet = packet.to_vec();
                    let fallback = out.clone();
                    let (sock, handler) = (sock.clone(), handler.clone());
                    drain.tracker().spawn(async move {
                        let reply = handler.forward(&packet, false, fallback).await;
                        if let Err(e) = sock.send_to(&reply, peer).await {
                            debug!(%peer, error = %e, "dns udp send");
                        }
                    });
                }
            }
        }
    })
    .await;
}

async fn serve_tcp(
    listener: TcpListener,
    handler: Arc<Handler>,
    stop: CancellationToken,
    drain: Drain,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    stop.clone()
        .run_until_cancelled(async {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        debug!(error = %e, "dns tcp accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "too many dns tcp connections, closing");
                    continue;
                };
                let (handler, stop) = (handler.clone(), stop.clone());
                drain.tracker().spawn(async move {
                    stop.run_until_cancelled(tcp_connection(stream, &handler))
                        .await;
                    drop(slot);
                });
            }
        })
        .await;
}

/// Length-prefixed queries, answered in order, until EOF, an error or
/// `TCP_IDLE` of silence.
async fn tcp_connection(mut stream: TcpStream, handler: &Handler) {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        buf.resize(len, 0);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let reply = match handler.handle(&buf, true, &mut out) {
            Outcome::Reply => std::mem::take(&mut out),
            Outcome::Drop => return,
            Outcome::Forward => {
                let fallback = std::mem::take(&mut out);
                handler.forward(&buf, true, fallback).await
            }
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
        out = reply;
    }
}

#[cfg(test)]
mod tests;
