//! The request path end to end in memory: records for every kind of Service
//! decoded back with hickory, negative answers, truncation, and property
//! tests that feed random and mutated bytes to [`Handler::handle`].

use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use proptest::prelude::*;

use super::*;

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: prod
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: [10.1.0.1]
  hostname: db-0
- addresses: [10.1.0.2]
- addresses: [10.1.0.3]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: prod}
spec:
  clusterIP: None
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec:
  type: ExternalName
  externalName: mydb.example.com
"#;

static HANDLER: std::sync::LazyLock<Handler> = std::sync::LazyLock::new(handler);

fn handler() -> Handler {
    let state = NodeState::from_objects(
        strait_proto::manifest::parse(MANIFEST).expect("manifest"),
        42,
    );
    let zone = Zone::build(
        &state,
        &ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 5,
        },
    );
    Handler::new(zone, Vec::new())
}

fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0xBEEF;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).expect("name"), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

fn ask(h: &Handler, name: &str, rtype: RecordType) -> Message {
    let mut out = Vec::new();
    assert_eq!(
        h.handle(&query(name, rtype, true), false, &mut out),
        Outcome::Reply
    );
    let m = Message::from_vec(&out).expect("reply decodes");
    assert_eq!(m.metadata.id, 0xBEEF);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(m.edns.is_some(), "OPT echoed");
    m
}

fn rdata(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

#[test]
fn cluster_ip_service_records() {
    let h = handler();
    let m = ask(&h, "WEB.Default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(rdata(&m), ["10.96.0.10"]);
    assert_eq!(m.answers[0].ttl, 5);
    // The question keeps the client's case.
    let mut out = Vec::new();
    // (hickory lower-cases names it encodes: put the capitals in by hand.)
    let mut q = query("web.default.svc.cluster.local.", RecordType::A, false);
    q[13..16].copy_from_slice(b"WEB");
    h.handle(&q, false, &mut out);
    assert_eq!(&out[12..16], b"\x03WEB");

    let m = ask(
        &h,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(rdata(&m), ["0 100 80 web.default.svc.cluster.local."]);
    assert_eq!(m.additionals.len(), 1, "target address in additional");
    let m = ask(
        &h,
        "_dns._udp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(rdata(&m), ["0 100 53 web.default.svc.cluster.local."]);

    let m = ask(&h, "10.0.96.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&m), ["web.default.svc.cluster.local."]);

    let m = ask(&h, "dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(rdata(&m), ["1.1.0"]);

    let m = ask(&h, "cluster.local.", RecordType::SOA);
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn headless_and_external_name_records() {
    let h = handler();
    let m = ask(&h, "db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["10.1.0.1", "10.1.0.2"], "ready endpoints only");
    let m = ask(&h, "db-0.db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["10.1.0.1"]);
    let m = ask(&h, "10-1-0-2.db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["10.1.0.2"]);
    let m = ask(&h, "_pg._tcp.db.prod.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        rdata(&m),
        [
            "0 50 5432 10-1-0-2.db.prod.svc.cluster.local.",
            "0 50 5432 db-0.db.prod.svc.cluster.local."
        ]
    );
    let m = ask(&h, "1.0.1.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&m), ["db-0.db.prod.svc.cluster.local."]);

    let m = ask(&h, "empty.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    for t in [RecordType::A, RecordType::CNAME, RecordType::AAAA] {
        let m = ask(&h, "ext.default.svc.cluster.local.", t);
        assert_eq!(rdata(&m), ["mydb.example.com."]);
        assert!(matches!(m.answers[0].data, RData::CNAME(_)));
    }
}

#[test]
fn negative_answers_carry_the_soa() {
    let h = handler();
    let m = ask(&h, "nope.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    let RData::SOA(soa) = &m.authorities[0].data else {
        panic!("not an SOA: {:?}", m.authorities[0]);
    };
    assert_eq!(m.authorities[0].name.to_string(), "cluster.local.");
    assert_eq!(soa.mname.to_string(), "ns.dns.cluster.local.");
    assert_eq!(soa.serial, 42);
    assert_eq!(soa.minimum, 5);

    // The name exists, the type does not; and an empty non-terminal.
    for (name, t) in [
        ("web.default.svc.cluster.local.", RecordType::AAAA),
        ("default.svc.cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
    ] {
        let m = ask(&h, name, t);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty(), "{name}");
        assert_eq!(m.authorities.len(), 1, "{name}");
    }
    // Outside the zone with no upstream: refused.
    let m = ask(&h, "example.com.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn unsynced_state_answers_servfail() {
    let zone = Zone::build(
        &NodeState::unsynced(),
        &ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 5,
        },
    );
    let h = Handler::new(zone, Vec::new());
    let m = ask(&h, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn large_answers_truncate_over_udp_only() {
    let mut manifest = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec:\n  clusterIP: None\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  labels: {kubernetes.io/service-name: big}\naddressType: IPv4\nendpoints:\n",
    );
    for i in 0..100 {
        manifest.push_str(&format!("- addresses: [10.2.0.{i}]\n"));
    }
    let state = NodeState::from_objects(
        strait_proto::manifest::parse(&manifest).expect("manifest"),
        1,
    );
    let cfg = ZoneConfig {
        domain: "cluster.local".into(),
        ttl: 5,
    };
    let h = Handler::new(Zone::build(&state, &cfg), Vec::new());
    let q = query("big.default.svc.cluster.local.", RecordType::A, false);
    let mut out = Vec::new();
    h.handle(&q, false, &mut out);
    let m = Message::from_vec(&out).expect("decode");
    assert!(m.metadata.truncation);
    assert!(out.len() <= 512);
    h.handle(&q, true, &mut out);
    let m = Message::from_vec(&out).expect("decode");
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let h = handler();
    let mut out = Vec::new();
    assert_eq!(h.handle(&[1, 2, 3], false, &mut out), Outcome::Drop);
    let mut q = query("web.default.svc.cluster.local.", RecordType::A, false);
    q.truncate(20);
    assert_eq!(h.handle(&q, false, &mut out), Outcome::Reply);
    let m = Message::from_vec(&out).expect("decode");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let mut notify = query("web.default.svc.cluster.local.", RecordType::SOA, false);
    notify[2] = 4 << 3;
    h.handle(&notify, false, &mut out);
    let m = Message::from_vec(&out).expect("decode");
    assert_eq!(m.metadata.op_code, OpCode::Notify);
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
}

fn check_reply(out: &[u8], outcome: &Outcome) -> Result<(), TestCaseError> {
    if *outcome != Outcome::Drop {
        prop_assert!(out.len() >= wire::HEADER_LEN);
        prop_assert!(out[2] & 0x80 != 0, "reply has QR set");
        prop_assert!(Message::from_vec(out).is_ok(), "reply decodes: {out:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The fuzz target: arbitrary bytes on the request path never panic,
    /// and whatever is answered is a well-formed DNS message.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), tcp in any::<bool>()) {
        let mut out = Vec::new();
        let outcome = HANDLER.handle(&bytes, tcp, &mut out);
        check_reply(&out, &outcome)?;
    }

    /// Upstream replies are untrusted too: finding and aging their TTLs
    /// never panics and never touches bytes outside the message.
    #[test]
    fn random_replies_age_without_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..600), age in any::<u32>()) {
        let len = bytes.len();
        if let Some(offsets) = wire::ttl_offsets(&bytes) {
            prop_assert!(offsets.iter().all(|o| o + 4 <= len));
            wire::age_ttls(&mut bytes, &offsets, age);
        }
        prop_assert_eq!(bytes.len(), len);
    }

    /// Valid queries with bytes flipped or cut reach deeper into the parser.
    #[test]
    fn mutated_queries_never_panic(
        which in 0usize..6,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<Option<usize>>(),
    ) {
        let names = [
            ("web.default.svc.cluster.local.", RecordType::A),
            ("_pg._tcp.db.prod.svc.cluster.local.", RecordType::SRV),
            ("db.prod.svc.cluster.local.", RecordType::A),
            ("nope.cluster.local.", RecordType::AAAA),
            ("10.0.96.10.in-addr.arpa.", RecordType::PTR),
            ("ext.default.svc.cluster.local.", RecordType::ANY),
        ];
        let (name, t) = names[which];
        let mut q = query(name, t, which % 2 == 0);
        for (at, b) in edits {
            let len = q.len();
            q[at % len] = b;
        }
        if let Some(c) = cut {
            q.truncate(c % (q.len() + 1));
        }
        let mut out = Vec::new();
        let outcome = HANDLER.handle(&q, false, &mut out);
        check_reply(&out, &outcome)?;
    }
}
