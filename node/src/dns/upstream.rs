//! Forwarding of names outside the cluster zone to upstream resolvers, raw
//! packets in and out, with a small positive/negative cache. Every attempt
//! is bounded in time, so an unreachable upstream turns into SERVFAIL
//! rather than a client left waiting.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::debug;

use super::wire::{self, Request};

/// Time one upstream gets to answer one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Time all attempts of one query get together.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest time an upstream answer is cached.
const MAX_CACHE_TTL: u32 = 300;
const CACHE_ENTRIES: usize = 10_000;
/// Forwarded queries in flight at once; more are answered SERVFAIL.
const MAX_IN_FLIGHT: usize = 1024;

/// Why an upstream attempt produced no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No upstream resolvers are configured.
    #[error("no upstream resolvers")]
    NoUpstreams,
    /// Too many forwarded queries are in flight.
    #[error("too many queries in flight")]
    Busy,
    /// No upstream answered in time.
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    /// A socket error talking to an upstream.
    #[error("upstream {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    name: Box<[u8]>,
    qtype: u16,
    qclass: u16,
    edns: bool,
}

impl CacheKey {
    fn of(req: &Request<'_>) -> Self {
        CacheKey {
            name: req.name().into(),
            qtype: req.qtype,
            qclass: req.qclass,
            edns: req.edns.is_some(),
        }
    }
}

#[derive(Debug)]
struct Cached {
    reply: Box<[u8]>,
    /// Where the reply's TTLs are, to age them on every hit.
    ttls: Box<[usize]>,
    stored: Instant,
    expires: Instant,
}

/// The upstream resolvers and the cache of their answers.
#[derive(Debug)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    in_flight: Semaphore,
}

impl Upstreams {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Writes a cached answer to `req` into `out`, if there is a fresh
    /// one, its TTLs lowered by the time it has spent in the cache.
    pub fn cached(&self, req: &Request<'_>, out: &mut Vec<u8>) -> bool {
        self.cached_at(req, out, Instant::now())
    }

    fn cached_at(&self, req: &Request<'_>, out: &mut Vec<u8>, now: Instant) -> bool {
        let key = CacheKey::of(req);
        let Ok(cache) = self.cache.lock() else {
            return false;
        };
        let Some(hit) = cache.get(&key).filter(|c| c.expires > now) else {
            return false;
        };
        out.clear();
        out.extend_from_slice(&hit.reply);
        let age = u32::try_from(now.duration_since(hit.stored).as_secs()).unwrap_or(u32::MAX);
        wire::age_ttls(out, &hit.ttls, age);
        patch(out, req);
        true
    }

    /// Asks the upstreams in turn; `packet` is the client's query. The
    /// reply carries the client's id and question.
    pub async fn resolve(&self, packet: &[u8], tcp: bool) -> Result<Vec<u8>, UpstreamError> {
        let wire::Parsed::Query(req) = wire::parse(packet) else {
            return Err(UpstreamError::NoUpstreams);
        };
        if self.servers.is_empty() {
            return Err(UpstreamError::NoUpstreams);
        }
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| UpstreamError::Busy)?;
        let deadline = tokio::time::Instant::now() + TOTAL_TIMEOUT;
        let mut last = UpstreamError::Timeout(TOTAL_TIMEOUT);
        let mut query = packet.to_vec();
        for &server in &self.servers {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let budget = ATTEMPT_TIMEOUT.min(deadline - now);
            let id: u16 = rand::random();
            query[..2].copy_from_slice(&id.to_be_bytes());
            let attempt = async {
                let reply = exchange_udp(server, &query, id, &req).await?;
                // A truncated upstream answer is retried over TCP when the
                // client came over TCP; UDP clients get TC and retry themselves.
                if tcp && reply.get(2).is_some_and(|f| f & 0x02 != 0) {
                    exchange_tcp(server, &query, id, &req).await
                } else {
                    Ok(reply)
                }
            };
            match tokio::time::timeout(budget, attempt).await {
                Ok(Ok(mut reply)) => {
                    self.store(&req, &reply);
                    patch(&mut reply, &req);
                    return Ok(reply);
                }
                Ok(Err(e)) => {
                    debug!(upstream = %server, error = %e, "upstream attempt failed");
                    last = e;
                }
                Err(_) => {
                    debug!(upstream = %server, timeout = ?budget, "upstream did not answer");
                    last = UpstreamError::Timeout(budget);
                }
            }
        }
        Err(last)
    }

    fn store(&self, req: &Request<'_>, reply: &[u8]) {
        let (Some(ttl), Some(ttls)) = (cache_ttl(reply), wire::ttl_offsets(reply)) else {
            return;
        };
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let now = Instant::now();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            CacheKey::of(req),
            Cached {
                reply: reply.into(),
                ttls: ttls.into(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
            },
        );
    }
}

/// Puts the client's id and question (its letter case) into a reply whose
/// question was checked to be the same name.
fn patch(reply: &mut [u8], req: &Request<'_>) {
    if let Some(id) = reply.get_mut(..2) {
        id.copy_from_slice(&req.id.to_be_bytes());
    }
    let q = wire::HEADER_LEN..wire::HEADER_LEN + req.question.len();
    if let Some(question) = reply.get_mut(q) {
        question.copy_from_slice(req.question);
    }
}

/// Whether `reply` answers `req` (sent with `id`): same id, a response, and
/// the same question at the same place.
fn matches(reply: &[u8], id: u16, req: &Request<'_>) -> bool {
    let q = wire::HEADER_LEN..wire::HEADER_LEN + req.question.len();
    reply.len() >= wire::HEADER_LEN
        && reply[..2] == id.to_be_bytes()
        && reply[2] & 0x80 != 0
        && reply[4..6] == [0, 1]
        && reply
            .get(q)
            .is_some_and(|got| got.eq_ignore_ascii_case(req.question))
}

async fn exchange_udp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    req: &Request<'_>,
) -> Result<Vec<u8>, UpstreamError> {
    let io = |source| UpstreamError::Io {
        addr: server,
        source,
    };
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    sock.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        let reply = &buf[..n];
        // Anything else arriving on this port is ignored (spoofing, late answers).
        if matches(reply, id, req) {
            return Ok(reply.to_vec());
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    req: &Request<'_>,
) -> Result<Vec<u8>, UpstreamError> {
    let io = |source| UpstreamError::Io {
        addr: server,
        source,
    };
    let mut stream = TcpStream::connect(server).await.map_err(io)?;
    let len = u16::try_from(query.len()).map_err(|_| io(io::ErrorKind::InvalidInput.into()))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(io)?;
    let n = stream.read_u16().await.map_err(io)?;
    let mut reply = vec![0u8; usize::from(n)];
    stream.read_exact(&mut reply).await.map_err(io)?;
    if matches(&reply, id, req) {
        Ok(reply)
    } else {
        Err(io(io::ErrorKind::InvalidData.into()))
    }
}

/// How long an upstream reply may be cached: the smallest answer TTL, or
/// for a negative answer the SOA's negative TTL; `None` for errors,
/// truncated replies and TTL 0.
fn cache_ttl(reply: &[u8]) -> Option<u32> {
    let rcode = reply.get(3)? & 0x0F;
    if reply.get(2)? & 0x02 != 0 || !(rcode == 0 || rcode == 3) {
        return None;
    }
    let msg = Message::from_vec(reply).ok()?;
    let ttl = if msg.answers.is_empty() {
        msg.authorities
            .iter()
            .filter_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .min()?
    } else {
        msg.answers.iter().map(|r| r.ttl).min()?
    };
    Some(ttl.min(MAX_CACHE_TTL)).filter(|t| *t > 0)
}

/// The `nameserver` lines of a resolv.conf, on port 53, leaving out `skip`
/// (this server itself: forwarding to it would loop).
pub fn resolv_conf(path: &Path, skip: Option<SocketAddr>) -> io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|ip| ip.split('%').next()?.parse().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| Some(*a) != skip)
        .collect())
}

/// Parses an upstream: `IP`, `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, std::net::AddrParseError> {
    s.parse::<SocketAddr>().or_else(|_| {
        s.parse::<std::net::IpAddr>()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_carry_aged_ttls_and_keep_edns_flags() {
        use hickory_proto::op::{Edns, OpCode, Query};
        use hickory_proto::rr::{Name, Record, RecordType, rdata::A};
        use std::str::FromStr;

        let name = Name::from_str("example.org.").expect("name");
        let mut edns = Edns::new();
        edns.set_max_payload(1232).set_dnssec_ok(true);
        let mut q = Message::query();
        q.add_query(Query::query(name.clone(), RecordType::A));
        q.set_edns(edns.clone());
        let query = q.to_vec().expect("query");
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.add_query(Query::query(name.clone(), RecordType::A));
        r.add_answer(Record::from_rdata(
            name.clone(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        r.add_answer(Record::from_rdata(name, 90, RData::A(A::new(192, 0, 2, 2))));
        r.set_edns(edns);
        let reply = r.to_vec().expect("reply");

        let wire::Parsed::Query(req) = wire::parse(&query) else {
            panic!("query parses");
        };
        let up = Upstreams::new(Vec::new());
        up.store(&req, &reply);
        let mut out = Vec::new();
        let later = Instant::now() + Duration::from_secs(25);
        assert!(up.cached_at(&req, &mut out, later), "fresh entry");
        let m = Message::from_vec(&out).expect("cached reply decodes");
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, vec![35, 65]);
        let e = m.edns.expect("OPT kept");
        assert!(e.flags().dnssec_ok, "OPT flags untouched");
        assert_eq!(e.max_payload(), 1232);
        // Past the smallest TTL the entry is gone.
        let expired = Instant::now() + Duration::from_secs(61);
        assert!(!up.cached_at(&req, &mut out, expired));
    }

    #[test]
    fn reads_resolv_conf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver 127.0.0.1\n",
        )
        .expect("write");
        let got = resolv_conf(&path, Some("127.0.0.1:53".parse().expect("addr"))).expect("read");
        assert_eq!(
            got,
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().expect("addr"),
                "[fe80::1]:53".parse().expect("addr")
            ]
        );
        assert_eq!(
            parse_upstream("10.0.0.1").expect("ip"),
            "10.0.0.1:53".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(parse_upstream("127.0.0.1:5300").expect("addr").port(), 5300);
    }
}
