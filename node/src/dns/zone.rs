//! The cluster zone as an index built once per [`NodeState`] snapshot: every
//! name the Kubernetes DNS schema (1.1.0) defines, with each answer already
//! encoded as wire bytes, so a query costs one hash lookup and a copy.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use tracing::debug;

use super::wire::{self, Request};
use crate::state::{NodeState, ServiceInfo};

/// The schema version `dns-version.<zone>` answers.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// What the zone is built with.
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local` (no trailing dot needed).
    pub domain: String,
    /// TTL of every record, and the negative-caching TTL in the SOA.
    pub ttl: u32,
}

/// Encoded records for one (name, type): owner names point at the question
/// (offset 12) of a reply whose question is this name.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub answers: Box<[u8]>,
    pub ancount: u16,
    pub additionals: Box<[u8]>,
    pub arcount: u16,
}

impl Prepared {
    pub fn sections(&self) -> wire::Sections<'_> {
        wire::Sections {
            answers: &self.answers,
            ancount: self.ancount,
            additionals: &self.additionals,
            arcount: self.arcount,
            ..wire::Sections::default()
        }
    }
}

/// Everything one name answers; no sets and no CNAME: an empty
/// non-terminal (NODATA, not NXDOMAIN).
#[derive(Debug, Default)]
struct NameEntry {
    cname: Option<Prepared>,
    sets: Vec<(u16, Prepared)>,
}

/// The answer to one question.
#[derive(Debug)]
pub enum Lookup<'z> {
    Found(&'z Prepared),
    /// The name exists, the type does not.
    NoData,
    NxDomain,
    /// In the zone, but no full state has arrived yet.
    NotSynced,
    /// Not this server's to answer: forward it.
    Outside,
}

/// One immutable index of the cluster zone and its reverse names.
#[derive(Debug)]
pub struct Zone {
    /// The cluster domain in lower-case wire form.
    origin: Box<[u8]>,
    names: HashMap<Box<[u8]>, NameEntry>,
    ttl: u32,
    serial: u32,
    synced: bool,
}

const IN_ADDR_ARPA: &[u8] = b"\x07in-addr\x04arpa\x00";
const IP6_ARPA: &[u8] = b"\x03ip6\x04arpa\x00";

impl Zone {
    /// Indexes a snapshot. Names that do not form valid DNS names (an odd
    /// hostname in a slice) are skipped with a debug line.
    pub fn build(state: &NodeState, cfg: &ZoneConfig) -> Zone {
        let domain = cfg.domain.trim_end_matches('.').to_ascii_lowercase();
        let origin: Box<[u8]> = wire::encode_name(&domain.split('.').collect::<Vec<_>>()).into();
        let serial = match u32::try_from(state.revision() % u64::from(u32::MAX)) {
            Ok(0) | Err(_) => 1,
            Ok(s) => s,
        };
        let mut b = Builder {
            domain,
            ttl: cfg.ttl,
            names: HashMap::new(),
        };
        if state.is_synced() {
            b.apex(serial);
            for svc in state.services() {
                b.service(svc);
            }
        }
        let mut names = HashMap::with_capacity(b.names.len() * 2);
        for (key, data) in b.names {
            names.insert(key, data.finish());
        }
        // Empty non-terminals between each name and the zone apex.
        let keys: Vec<Box<[u8]>> = names.keys().cloned().collect();
        for key in keys {
            if !key.ends_with(&origin) {
                continue;
            }
            let mut at = 0usize;
            while let Some(&len) = key.get(at) {
                at += usize::from(len) + 1;
                if key.len() - at <= origin.len() || len == 0 {
                    break;
                }
                names.entry(key[at..].into()).or_default();
            }
        }
        Zone {
            origin,
            names,
            ttl: cfg.ttl,
            serial,
            synced: state.is_synced(),
        }
    }

    /// Names in the index (for logs).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether the question is in the cluster zone.
    pub fn contains(&self, req: &Request<'_>) -> bool {
        req.is_under(&self.origin)
    }

    pub fn lookup(&self, req: &Request<'_>) -> Lookup<'_> {
        let in_zone = self.contains(req);
        if !in_zone && !req.is_under(IN_ADDR_ARPA) && !req.is_under(IP6_ARPA) {
            return Lookup::Outside;
        }
        if !self.synced {
            return if in_zone {
                Lookup::NotSynced
            } else {
                Lookup::Outside
            };
        }
        match self.names.get(req.name()) {
            Some(e) => {
                if let Some(c) = &e.cname {
                    return Lookup::Found(c);
                }
                match e.sets.iter().find(|(t, _)| *t == req.qtype) {
                    Some((_, p)) => Lookup::Found(p),
                    None if in_zone => Lookup::NoData,
                    None => Lookup::Outside,
                }
            }
            None if in_zone => Lookup::NxDomain,
            None => Lookup::Outside,
        }
    }

    /// The zone's SOA for the authority section of a negative answer to an
    /// in-zone question of `name_len` wire bytes; names point into the
    /// question.
    pub fn negative_soa(&self, name_len: usize) -> [u8; 54] {
        let origin_at = (wire::HEADER_LEN + name_len - self.origin.len()) as u16 | 0xC000;
        let ptr = origin_at.to_be_bytes();
        let mut out = [0u8; 54];
        let mut w = 0usize;
        let mut put = |bytes: &[u8]| {
            out[w..w + bytes.len()].copy_from_slice(bytes);
            w += bytes.len();
        };
        put(&ptr);
        put(&wire::TYPE_SOA.to_be_bytes());
        put(&wire::CLASS_IN.to_be_bytes());
        put(&self.ttl.to_be_bytes());
        put(&42u16.to_be_bytes());
        put(b"\x02ns\x03dns");
        put(&ptr);
        put(b"\x0ahostmaster");
        put(&ptr);
        put(&self.serial.to_be_bytes());
        put(&7200u32.to_be_bytes());
        put(&1800u32.to_be_bytes());
        put(&86400u32.to_be_bytes());
        put(&self.ttl.to_be_bytes());
        out
    }
}

#[derive(Debug, Default)]
struct NameData {
    name: Option<Name>,
    cname: Option<Record>,
    records: Vec<Record>,
    /// SRV targets' addresses, for the additional section.
    additionals: Vec<Record>,
}

impl NameData {
    fn finish(self) -> NameEntry {
        let Some(name) = self.name else {
            return NameEntry::default();
        };
        let mut entry = NameEntry::default();
        if let Some(c) = &self.cname {
            entry.cname = prepare(&name, &[c], &[]);
            return entry;
        }
        let mut types: Vec<u16> = self
            .records
            .iter()
            .map(|r| u16::from(r.record_type()))
            .collect();
        types.sort_unstable();
        types.dedup();
        for t in types {
            let answers: Vec<&Record> = self
                .records
                .iter()
                .filter(|r| u16::from(r.record_type()) == t)
                .collect();
            let extra: Vec<&Record> = if t == wire::TYPE_SRV {
                self.additionals.iter().collect()
            } else {
                Vec::new()
            };
            if let Some(p) = prepare(&name, &answers, &extra) {
                entry.sets.push((t, p));
            }
        }
        let all: Vec<&Record> = self.records.iter().collect();
        if let Some(p) = prepare(&name, &all, &[]) {
            entry.sets.push((wire::TYPE_ANY, p));
        }
        entry
    }
}

/// Encodes records as they follow a question for `name` at offset 12.
fn prepare(name: &Name, answers: &[&Record], additionals: &[&Record]) -> Option<Prepared> {
    let ancount = u16::try_from(answers.len()).ok()?;
    let arcount = u16::try_from(additionals.len()).ok()?;
    let mut buf = Vec::with_capacity(64 + 32 * (answers.len() + additionals.len()));
    let mut enc = BinEncoder::new(&mut buf);
    let encoded = (|| {
        enc.emit_vec(&[0; wire::HEADER_LEN])?;
        name.emit(&mut enc)?;
        enc.emit_u16(0)?;
        enc.emit_u16(0)?;
        let start = enc.offset();
        for r in answers {
            r.emit(&mut enc)?;
        }
        let mid = enc.offset();
        for r in additionals {
            r.emit(&mut enc)?;
        }
        Ok::<_, hickory_proto::ProtoError>((start, mid))
    })();
    let (start, mid) = match encoded {
        Ok(v) => v,
        Err(e) => {
            debug!(name = %name, error = %e, "records left out of the DNS index");
            return None;
        }
    };
    Some(Prepared {
        answers: buf.get(start..mid)?.into(),
        ancount,
        additionals: buf.get(mid..)?.into(),
        arcount,
    })
}

struct Builder {
    domain: String,
    ttl: u32,
    names: HashMap<Box<[u8]>, NameData>,
}

fn key(name: &Name) -> Box<[u8]> {
    let mut k = name.to_bytes().unwrap_or_default();
    k.make_ascii_lowercase();
    k.into()
}

fn parse_name(s: &str) -> Option<Name> {
    match Name::from_ascii(s.to_ascii_lowercase()) {
        Ok(n) => Some(n),
        Err(e) => {
            debug!(name = s, error = %e, "not a valid DNS name, left out");
            None
        }
    }
}

fn address_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(name, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name, ttl, RData::AAAA(AAAA(v6))),
    }
}

/// `d.c.b.a.in-addr.arpa.` or the nibble form under `ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0x0F, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

/// The label CoreDNS gives a headless endpoint without a hostname.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

impl Builder {
    fn entry(&mut self, name: &Name) -> &mut NameData {
        let e = self.names.entry(key(name)).or_default();
        if e.name.is_none() {
            e.name = Some(name.clone());
        }
        e
    }

    fn add(&mut self, record: Record) {
        let name = record.name.clone();
        let e = self.entry(&name);
        if !e.records.contains(&record) {
            e.records.push(record);
        }
    }

    fn apex(&mut self, serial: u32) {
        let (Some(apex), Some(mname), Some(rname), Some(version)) = (
            parse_name(&format!("{}.", self.domain)),
            parse_name(&format!("ns.dns.{}.", self.domain)),
            parse_name(&format!("hostmaster.{}.", self.domain)),
            parse_name(&format!("dns-version.{}.", self.domain)),
        ) else {
            return;
        };
        let ttl = self.ttl;
        let soa = SOA::new(mname, rname, serial, 7200, 1800, 86400, ttl);
        self.add(Record::from_rdata(apex, ttl, RData::SOA(soa)));
        let txt = TXT::new(vec![SCHEMA_VERSION.to_string()]);
        self.add(Record::from_rdata(version, ttl, RData::TXT(txt)));
    }

    fn service(&mut self, svc: &ServiceInfo) {
        let ttl = self.ttl;
        let base = format!(
            "{}.{}.svc.{}.",
            svc.key.name, svc.key.namespace, self.domain
        );
        let Some(svc_name) = parse_name(&base) else {
            return;
        };
        if let Some(target) = &svc.external_name {
            if let Some(target) = parse_name(&format!("{target}.")) {
                let e = self.entry(&svc_name);
                e.cname = Some(Record::from_rdata(
                    svc_name.clone(),
                    ttl,
                    RData::CNAME(CNAME(target)),
                ));
            }
            return;
        }
        if svc.headless {
            self.headless(svc, &svc_name, &base);
            return;
        }
        if svc.cluster_ips.is_empty() {
            return;
        }
        let addresses: Vec<Record> = svc
            .cluster_ips
            .iter()
            .map(|ip| address_record(svc_name.clone(), ttl, *ip))
            .collect();
        for r in &addresses {
            self.add(r.clone());
        }
        for ip in &svc.cluster_ips {
            if let Some(rev) = parse_name(&reverse_name(*ip)) {
                self.add(Record::from_rdata(
                    rev,
                    ttl,
                    RData::PTR(PTR(svc_name.clone())),
                ));
            }
        }
        for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            let srv = format!("_{}._{}.{base}", p.name, p.protocol.to_ascii_lowercase());
            let Some(srv_name) = parse_name(&srv) else {
                continue;
            };
            let rdata = SRV::new(0, 100, p.port, svc_name.clone());
            self.add(Record::from_rdata(srv_name.clone(), ttl, RData::SRV(rdata)));
            let e = self.entry(&srv_name);
            for r in &addresses {
                if !e.additionals.contains(r) {
                    e.additionals.push(r.clone());
                }
            }
        }
    }

    fn headless(&mut self, svc: &ServiceInfo, svc_name: &Name, base: &str) {
        let ttl = self.ttl;
        // Endpoint IP -> its DNS name, for ready endpoints.
        let mut hosts: HashMap<IpAddr, Name> = HashMap::new();
        for a in svc.addresses.iter().filter(|a| a.ready) {
            let label = a.hostname.clone().unwrap_or_else(|| dashed(a.ip));
            let Some(host) = parse_name(&format!("{label}.{base}")) else {
                continue;
            };
            self.add(address_record(svc_name.clone(), ttl, a.ip));
            self.add(address_record(host.clone(), ttl, a.ip));
            if let Some(rev) = parse_name(&reverse_name(a.ip)) {
                self.add(Record::from_rdata(rev, ttl, RData::PTR(PTR(host.clone()))));
            }
            hosts.insert(a.ip, host);
        }
        for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            let srv = format!("_{}._{}.{base}", p.name, p.protocol.to_ascii_lowercase());
            let Some(srv_name) = parse_name(&srv) else {
                continue;
            };
            let targets: Vec<(&Name, u16, IpAddr)> = p
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| Some((hosts.get(&e.addr.ip())?, e.addr.port(), e.addr.ip())))
                .collect();
            if targets.is_empty() {
                continue;
            }
            let weight = u16::try_from((100 / targets.len()).max(1)).unwrap_or(1);
            for (host, port, ip) in targets {
                let rdata = SRV::new(0, weight, port, host.clone());
                self.add(Record::from_rdata(srv_name.clone(), ttl, RData::SRV(rdata)));
                let extra = address_record(host.clone(), ttl, ip);
                let e = self.entry(&srv_name);
                if !e.additionals.contains(&extra) {
                    e.additionals.push(extra);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("10.96.0.10".parse().expect("ip")),
            "10.0.96.10.in-addr.arpa."
        );
        let v6 = reverse_name("2001:db8::1".parse().expect("ip"));
        assert!(v6.starts_with("1.0.0.0.0.0.0.0."), "{v6}");
        assert!(v6.ends_with(".8.b.d.0.1.0.0.2.ip6.arpa."), "{v6}");
        assert_eq!(dashed("10.1.0.1".parse().expect("ip")), "10-1-0-1");
    }
}
