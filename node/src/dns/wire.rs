//! DNS wire format on the request path: a strict, allocation-free parser for
//! queries (header, one question, EDNS) and the writer that assembles a
//! response from precomputed record bytes. Everything here reads bytes a
//! peer controls: it bounds-checks every read and never panics.

/// Bytes in a DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest domain name in wire form.
pub const MAX_NAME: usize = 255;
/// The UDP payload size this server advertises and honours at most
/// (DNS flag day 2020: avoids IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// A UDP reply without EDNS is at most this long.
pub const CLASSIC_UDP_LIMIT: usize = 512;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

/// Response codes this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// EDNS(0) as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A well-formed query: one question, optional EDNS.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub id: u16,
    /// Recursion desired and checking disabled, copied into the reply.
    pub rd: bool,
    pub cd: bool,
    /// The question exactly as sent (name, type, class): replies echo it,
    /// preserving the client's letter case.
    pub question: &'a [u8],
    /// The question name in wire form, lower-cased.
    lower: [u8; MAX_NAME],
    name_len: usize,
    /// Offsets in the name where a label starts (its length byte).
    label_starts: [u8; 128],
    labels: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

/// What the parser made of a datagram.
#[derive(Debug)]
pub enum Parsed<'a> {
    Query(Box<Request<'a>>),
    /// Answer with this error; the question is echoed when it parsed.
    Error {
        id: u16,
        opcode: u8,
        rd: bool,
        question: Option<&'a [u8]>,
        rcode: Rcode,
    },
    /// Not worth an answer: shorter than a header, or itself a response
    /// (answering those invites reflection loops).
    Drop,
}

impl<'a> Request<'a> {
    /// The question name, lower-cased, in wire form (ends with the root label).
    pub fn name(&self) -> &[u8] {
        &self.lower[..self.name_len]
    }

    /// The name length in wire form.
    pub fn name_len(&self) -> usize {
        self.name_len
    }

    /// Whether the question name is `suffix` or below it, on a label
    /// boundary. `suffix` is lower-case wire form.
    pub fn is_under(&self, suffix: &[u8]) -> bool {
        let name = self.name();
        if !name.ends_with(suffix) {
            return false;
        }
        let start = name.len() - suffix.len();
        self.label_starts[..self.labels]
            .iter()
            .any(|s| usize::from(*s) == start)
            || start == name.len() - 1 && suffix == [0]
    }

    /// The labels of the name, leftmost first, lower-cased, without the root.
    pub fn labels(&self) -> impl Iterator<Item = &[u8]> {
        self.label_starts[..self.labels].iter().filter_map(|s| {
            let s = usize::from(*s);
            let len = usize::from(*self.lower.get(s)?);
            self.lower.get(s + 1..s + 1 + len)
        })
    }

    /// The largest reply this client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => usize::from(e.payload.clamp(CLASSIC_UDP_LIMIT as u16, MAX_UDP_PAYLOAD)),
            None => CLASSIC_UDP_LIMIT,
        }
    }
}

fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

fn u32_at(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *p.get(at)?,
        *p.get(at + 1)?,
        *p.get(at + 2)?,
        *p.get(at + 3)?,
    ]))
}

/// Skips a possibly compressed name in a record; returns the offset after it.
fn skip_name(p: &[u8], mut at: usize) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let len = *p.get(at)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => {
                total += usize::from(len) + 1;
                if total > MAX_NAME {
                    return None;
                }
                at += usize::from(len) + 1;
            }
            0xC0 => {
                p.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// The offsets of the TTL fields of every record in a reply (answer,
/// authority and additional sections; not the OPT pseudo-record, whose TTL
/// field holds EDNS flags). `None` when the message does not parse.
pub fn ttl_offsets(p: &[u8]) -> Option<Vec<usize>> {
    let count = |at| u16_at(p, at).map(usize::from);
    let questions = count(4)?;
    let records = count(6)? + count(8)? + count(10)?;
    let mut at = HEADER_LEN;
    for _ in 0..questions {
        at = skip_name(p, at)? + 4;
    }
    let mut offsets = Vec::with_capacity(records);
    for _ in 0..records {
        at = skip_name(p, at)?;
        let rtype = u16_at(p, at)?;
        let rdlen = usize::from(u16_at(p, at + 8)?);
        if rtype != TYPE_OPT {
            offsets.push(at + 4);
        }
        at += 10 + rdlen;
        if at > p.len() {
            return None;
        }
    }
    Some(offsets)
}

/// Lowers every TTL at `offsets` (from [`ttl_offsets`]) by `elapsed`
/// seconds, stopping at zero.
pub fn age_ttls(p: &mut [u8], offsets: &[usize], elapsed: u32) {
    for &at in offsets {
        if let (Some(ttl), Some(field)) = (u32_at(p, at), p.get_mut(at..at + 4)) {
            field.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
        }
    }
}

/// Parses a query. Never panics, whatever the bytes.
pub fn parse(p: &[u8]) -> Parsed<'_> {
    if p.len() < HEADER_LEN {
        return Parsed::Drop;
    }
    let id = u16::from_be_bytes([p[0], p[1]]);
    let flags = p[2];
    if flags & 0x80 != 0 {
        return Parsed::Drop;
    }
    let opcode = (flags >> 3) & 0x0F;
    let rd = flags & 0x01 != 0;
    let cd = p[3] & 0x10 != 0;
    let error = |question, rcode| Parsed::Error {
        id,
        opcode,
        rd,
        question,
        rcode,
    };
    if opcode != 0 {
        return error(None, Rcode::NotImp);
    }
    let qdcount = u16::from_be_bytes([p[4], p[5]]);
    let ancount = u16::from_be_bytes([p[6], p[7]]);
    let nscount = u16::from_be_bytes([p[8], p[9]]);
    let arcount = u16::from_be_bytes([p[10], p[11]]);
    if qdcount != 1 {
        return error(None, Rcode::FormErr);
    }

    // The question name: plain labels only (nothing precedes it to point at).
    let mut lower = [0u8; MAX_NAME];
    let mut label_starts = [0u8; 128];
    let mut labels = 0usize;
    let mut at = HEADER_LEN;
    let mut name_len = 0usize;
    loop {
        let Some(&len) = p.get(at) else {
            return error(None, Rcode::FormErr);
        };
        if len & 0xC0 != 0 {
            return error(None, Rcode::FormErr);
        }
        let len = usize::from(len);
        if name_len + len + 1 > MAX_NAME {
            return error(None, Rcode::FormErr);
        }
        let Some(label) = p.get(at..at + len + 1) else {
            return error(None, Rcode::FormErr);
        };
        if len == 0 {
            lower[name_len] = 0;
            name_len += 1;
            at += 1;
            break;
        }
        // name_len < 255 and every label takes at least 2 bytes: fits in u8 and 128 slots.
        label_starts[labels] = name_len as u8;
        labels += 1;
        lower[name_len..name_len + len + 1].copy_from_slice(label);
        lower[name_len + 1..name_len + len + 1].make_ascii_lowercase();
        name_len += len + 1;
        at += len + 1;
    }
    let (Some(qtype), Some(qclass)) = (u16_at(p, at), u16_at(p, at + 2)) else {
        return error(None, Rcode::FormErr);
    };
    at += 4;
    let question = &p[HEADER_LEN..at];

    // Answer and authority records have no business in a query, but are
    // skipped rather than refused; the additional section may carry OPT.
    let mut edns = None;
    let others = usize::from(ancount) + usize::from(nscount);
    for i in 0..others + usize::from(arcount) {
        let Some(name_end) = skip_name(p, at) else {
            return error(Some(question), Rcode::FormErr);
        };
        let (Some(rtype), Some(class), Some(ttl), Some(rdlen)) = (
            u16_at(p, name_end),
            u16_at(p, name_end + 2),
            u32_at(p, name_end + 4),
            u16_at(p, name_end + 8),
        ) else {
            return error(Some(question), Rcode::FormErr);
        };
        let end = name_end + 10 + usize::from(rdlen);
        if end > p.len() {
            return error(Some(question), Rcode::FormErr);
        }
        if i >= others && rtype == TYPE_OPT {
            if edns.is_some() || name_end != at + 1 {
                // Two OPT records, or an OPT not owned by the root.
                return error(Some(question), Rcode::FormErr);
            }
            edns = Some(Edns {
                payload: class,
                version: (ttl >> 16) as u8,
                dnssec_ok: ttl & 0x8000 != 0,
            });
        }
        at = end;
    }
    Parsed::Query(Box::new(Request {
        id,
        rd,
        cd,
        question,
        lower,
        name_len,
        label_starts,
        labels,
        qtype,
        qclass,
        edns,
    }))
}

/// Header flags of a reply.
#[derive(Debug, Clone, Copy)]
pub struct Flags {
    pub authoritative: bool,
    pub recursion_available: bool,
    pub rcode: Rcode,
}

/// Record bytes already encoded for one question name: owner names and
/// name suffixes may point into the question at offset 12.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sections<'z> {
    pub answers: &'z [u8],
    pub ancount: u16,
    pub authority: &'z [u8],
    pub nscount: u16,
    /// Dropped first when the reply does not fit.
    pub additionals: &'z [u8],
    pub arcount: u16,
}

fn header(
    out: &mut Vec<u8>,
    id: u16,
    opcode: u8,
    rd: bool,
    cd: bool,
    flags: Flags,
    counts: [u16; 4],
) {
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x80 | (opcode << 3) | if flags.authoritative { 0x04 } else { 0 } | u8::from(rd));
    out.push(
        if flags.recursion_available { 0x80 } else { 0 }
            | if cd { 0x10 } else { 0 }
            | flags.rcode as u8,
    );
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

fn opt(out: &mut Vec<u8>, edns: &Edns, extended_rcode: u8) {
    out.push(0); // root owner
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
    out.push(extended_rcode);
    out.push(0); // version 0
    out.push(if edns.dnssec_ok { 0x80 } else { 0 });
    out.push(0);
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Bytes of the OPT record [`respond`] appends when the client sent EDNS.
pub const OPT_LEN: usize = 11;

/// Writes a reply to `req` into `out` (cleared first). Over `limit` bytes,
/// the additional section goes first; if the answer still does not fit the
/// reply carries only the question and TC, so the client retries over TCP.
pub fn respond(req: &Request<'_>, flags: Flags, s: Sections<'_>, limit: usize, out: &mut Vec<u8>) {
    out.clear();
    let opt_len = if req.edns.is_some() { OPT_LEN } else { 0 };
    let base = HEADER_LEN + req.question.len() + opt_len;
    let core = base + s.answers.len() + s.authority.len();
    let (sections, truncated) = if core + s.additionals.len() <= limit {
        (s, false)
    } else if core <= limit {
        (
            Sections {
                additionals: &[],
                arcount: 0,
                ..s
            },
            false,
        )
    } else {
        (Sections::default(), true)
    };
    let arcount = sections.arcount + u16::from(req.edns.is_some());
    header(
        out,
        req.id,
        0,
        req.rd,
        req.cd,
        flags,
        [1, sections.ancount, sections.nscount, arcount],
    );
    if truncated {
        out[2] |= 0x02;
    }
    out.extend_from_slice(req.question);
    out.extend_from_slice(sections.answers);
    out.extend_from_slice(sections.authority);
    out.extend_from_slice(sections.additionals);
    if let Some(e) = &req.edns {
        opt(out, e, 0);
    }
}

/// A reply with only the question and TC set: the answer does not fit.
pub fn truncated(req: &Request<'_>, recursion_available: bool, out: &mut Vec<u8>) {
    let flags = Flags {
        authoritative: false,
        recursion_available,
        rcode: Rcode::NoError,
    };
    respond(req, flags, Sections::default(), 0, out);
}

/// A reply to an EDNS version this server does not speak (RFC 6891 BADVERS).
pub fn bad_version(req: &Request<'_>, out: &mut Vec<u8>) {
    out.clear();
    let flags = Flags {
        authoritative: false,
        recursion_available: false,
        rcode: Rcode::NoError,
    };
    header(out, req.id, 0, req.rd, req.cd, flags, [1, 0, 0, 1]);
    out.extend_from_slice(req.question);
    // BADVERS = 16: upper eight bits of the twelve-bit rcode.
    let edns = req.edns.unwrap_or(Edns {
        payload: 512,
        version: 0,
        dnssec_ok: false,
    });
    opt(out, &edns, 1);
}

/// An error reply from what could be parsed.
pub fn error(
    id: u16,
    opcode: u8,
    rd: bool,
    question: Option<&[u8]>,
    rcode: Rcode,
    out: &mut Vec<u8>,
) {
    out.clear();
    let flags = Flags {
        authoritative: false,
        recursion_available: false,
        rcode,
    };
    let qd = u16::from(question.is_some());
    header(out, id, opcode, rd, false, flags, [qd, 0, 0, 0]);
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
}

/// Appends `name` (lower-case wire form) as a DNS name for `labels`.
pub fn encode_name(labels: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in labels {
        let l = l.as_bytes();
        out.push(l.len().min(63) as u8);
        out.extend(l.iter().take(63).map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[&str], qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut p = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(edns.is_some()),
        ];
        p.extend(
            name.iter()
                .flat_map(|l| std::iter::once(l.len() as u8).chain(l.bytes())),
        );
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            p.extend_from_slice(&[0, 0, 41]);
            p.extend_from_slice(&size.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
        }
        p
    }

    #[test]
    fn parses_a_query_with_edns() {
        let p = query(
            &["Web", "default", "svc", "Cluster", "local"],
            TYPE_A,
            Some(4096),
        );
        let Parsed::Query(r) = parse(&p) else {
            panic!("not a query");
        };
        assert_eq!(r.id, 0x1234);
        assert!(r.rd);
        assert_eq!(r.qtype, TYPE_A);
        assert_eq!(
            r.name(),
            encode_name(&["web", "default", "svc", "cluster", "local"])
        );
        assert!(r.is_under(&encode_name(&["cluster", "local"])));
        assert!(!r.is_under(&encode_name(&["luster", "local"])));
        assert_eq!(r.edns.map(|e| (e.payload, e.dnssec_ok)), Some((4096, true)));
        assert_eq!(r.udp_limit(), usize::from(MAX_UDP_PAYLOAD));
        let labels: Vec<&[u8]> = r.labels().collect();
        assert_eq!(labels[0], b"web");
        assert_eq!(labels.len(), 5);
    }

    #[test]
    fn rejects_what_it_must() {
        assert!(matches!(parse(&[0; 5]), Parsed::Drop));
        let mut resp = query(&["a"], TYPE_A, None);
        resp[2] |= 0x80;
        assert!(matches!(parse(&resp), Parsed::Drop));
        let mut two = query(&["a"], TYPE_A, None);
        two[5] = 2;
        assert!(matches!(
            parse(&two),
            Parsed::Error {
                rcode: Rcode::FormErr,
                ..
            }
        ));
        let mut short = query(&["abc"], TYPE_A, None);
        short.truncate(short.len() - 3);
        assert!(matches!(
            parse(&short),
            Parsed::Error {
                rcode: Rcode::FormErr,
                ..
            }
        ));
        let mut notify = query(&["a"], TYPE_A, None);
        notify[2] |= 4 << 3;
        assert!(matches!(
            parse(&notify),
            Parsed::Error {
                rcode: Rcode::NotImp,
                ..
            }
        ));
        let mut pointer = query(&["a"], TYPE_A, None);
        pointer[12] = 0xC0;
        assert!(matches!(
            parse(&pointer),
            Parsed::Error {
                rcode: Rcode::FormErr,
                ..
            }
        ));
    }

    #[test]
    fn truncates_when_the_answer_does_not_fit() {
        let p = query(&["a"], TYPE_A, None);
        let Parsed::Query(r) = parse(&p) else {
            panic!("not a query");
        };
        let answers = vec![0u8; 600];
        let mut out = Vec::new();
        let flags = Flags {
            authoritative: true,
            recursion_available: false,
            rcode: Rcode::NoError,
        };
        let s = Sections {
            answers: &answers,
            ancount: 30,
            ..Sections::default()
        };
        respond(&r, flags, s, r.udp_limit(), &mut out);
        assert_eq!(out[2] & 0x02, 0x02);
        assert_eq!(out.len(), HEADER_LEN + r.question.len());
        respond(&r, flags, s, 65535, &mut out);
        assert_eq!(out[2] & 0x02, 0);
        assert_eq!(out.len(), HEADER_LEN + r.question.len() + 600);
    }
}
