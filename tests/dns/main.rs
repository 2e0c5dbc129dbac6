//! Cluster DNS through the real binary and the real `dig`: every record kind
//! of the Kubernetes DNS schema, short names through a search domain, a
//! watched update, truncation and the TCP retry, forwarding with a cache,
//! upstream failure, and garbage on the wire.

mod harness;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use harness::*;

const STATIC: &str = r#"
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
metadata: {name: lonely, namespace: prod}
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

/// Runs of whitespace as one space (dig aligns with tabs).
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Static {
    _dir: tempfile::TempDir,
    node: Proc,
}

fn static_node(manifest: &str, extra: &[&str]) -> Static {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("services.yaml");
    std::fs::write(&file, manifest).expect("write manifest");
    let mut args = vec!["--config-file", file.to_str().expect("path")];
    args.extend_from_slice(extra);
    let node = node(&dir.path().join("node"), &args);
    Static { _dir: dir, node }
}

#[test]
fn every_record_kind_answers_from_a_static_state() {
    let s = static_node(STATIC, &["--dns-upstream", "none", "--dns-ttl", "7"]);
    let ns = s.node.addr.as_str();

    // ClusterIP: A, case-insensitive, the configured TTL, authoritative.
    let out = dig(ns, &["WEB.Default.SVC.cluster.local", "A"]);
    assert_eq!(status(&out), "NOERROR");
    assert!(flags(&out).contains("aa"), "{out}");
    assert!(
        squash(&out).contains("WEB.Default.SVC.cluster.local. 7 IN A 10.96.0.10"),
        "{out}"
    );
    assert_eq!(
        answers(ns, &["web.default.svc.cluster.local", "A"]),
        ["web.default.svc.cluster.local. A 10.96.0.10"]
    );
    // SRV for every named port.
    assert_eq!(
        answers(ns, &["_http._tcp.web.default.svc.cluster.local", "SRV"]),
        ["_http._tcp.web.default.svc.cluster.local. SRV 0 100 80 web.default.svc.cluster.local."]
    );
    assert_eq!(
        answers(ns, &["_dns._udp.web.default.svc.cluster.local", "SRV"]),
        ["_dns._udp.web.default.svc.cluster.local. SRV 0 100 53 web.default.svc.cluster.local."]
    );
    // PTR for the ClusterIP.
    assert_eq!(
        answers(ns, &["-x", "10.96.0.10"]),
        ["10.0.96.10.in-addr.arpa. PTR web.default.svc.cluster.local."]
    );

    // Headless: one A per ready endpoint, hostnames (or dashed IPs), SRV per endpoint, PTR.
    assert_eq!(
        answers(ns, &["db.prod.svc.cluster.local", "A"]),
        [
            "db.prod.svc.cluster.local. A 10.1.0.1",
            "db.prod.svc.cluster.local. A 10.1.0.2"
        ]
    );
    assert_eq!(
        answers(ns, &["db-0.db.prod.svc.cluster.local", "A"]),
        ["db-0.db.prod.svc.cluster.local. A 10.1.0.1"]
    );
    assert_eq!(
        answers(ns, &["10-1-0-2.db.prod.svc.cluster.local", "A"]),
        ["10-1-0-2.db.prod.svc.cluster.local. A 10.1.0.2"]
    );
    assert_eq!(
        answers(ns, &["_pg._tcp.db.prod.svc.cluster.local", "SRV"]),
        [
            "_pg._tcp.db.prod.svc.cluster.local. SRV 0 50 5432 10-1-0-2.db.prod.svc.cluster.local.",
            "_pg._tcp.db.prod.svc.cluster.local. SRV 0 50 5432 db-0.db.prod.svc.cluster.local."
        ]
    );
    assert_eq!(
        answers(ns, &["-x", "10.1.0.1"]),
        ["1.0.1.10.in-addr.arpa. PTR db-0.db.prod.svc.cluster.local."]
    );
    // The not-ready endpoint has no name, and a headless Service without
    // ready endpoints is NXDOMAIN.
    let out = dig(ns, &["10-1-0-3.db.prod.svc.cluster.local", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let out = dig(ns, &["lonely.prod.svc.cluster.local", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");

    // ExternalName: a CNAME to the external name.
    assert_eq!(
        answers(ns, &["ext.default.svc.cluster.local", "A"]),
        ["ext.default.svc.cluster.local. CNAME mydb.example.com."]
    );
    assert_eq!(
        answers(ns, &["ext.default.svc.cluster.local", "CNAME"]),
        ["ext.default.svc.cluster.local. CNAME mydb.example.com."]
    );

    // The schema version.
    assert_eq!(
        answers(ns, &["dns-version.cluster.local", "TXT"]),
        ["dns-version.cluster.local. TXT \"1.1.0\""]
    );

    // NXDOMAIN and NODATA carry the zone SOA in the authority section.
    let out = dig(ns, &["nope.default.svc.cluster.local", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(out.contains("AUTHORITY: 1"), "{out}");
    assert!(
        squash(&out)
            .contains("cluster.local. 7 IN SOA ns.dns.cluster.local. hostmaster.cluster.local."),
        "{out}"
    );
    for name in ["web.default.svc.cluster.local", "default.svc.cluster.local"] {
        let out = dig(ns, &[name, "AAAA"]);
        assert_eq!(status(&out), "NOERROR", "{out}");
        assert!(out.contains("ANSWER: 0, AUTHORITY: 1"), "{out}");
    }
    // Outside the zone, with forwarding off.
    let out = dig(ns, &["example.com", "A"]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    // The same answers over TCP.
    assert_eq!(
        answers(ns, &["+tcp", "db.prod.svc.cluster.local", "A"]),
        [
            "db.prod.svc.cluster.local. A 10.1.0.1",
            "db.prod.svc.cluster.local. A 10.1.0.2"
        ]
    );
}

#[test]
fn short_names_resolve_through_the_pod_search_list() {
    let s = static_node(STATIC, &["--dns-upstream", "none"]);
    let ns = s.node.addr.as_str();
    // A Pod in `default` searches default.svc.cluster.local, svc.cluster.local,
    // cluster.local; dig takes one search domain at a time (+domain).
    for (name, domain) in [
        ("web", "default.svc.cluster.local"),
        ("web.default", "svc.cluster.local"),
        ("web.default.svc", "cluster.local"),
    ] {
        let got = answers(
            ns,
            &["+search", "+ndots=5", &format!("+domain={domain}"), name],
        );
        assert_eq!(
            got,
            ["web.default.svc.cluster.local. A 10.96.0.10"],
            "{name}"
        );
    }
    let got = answers(
        ns,
        &[
            "+search",
            "+ndots=5",
            "+domain=prod.svc.cluster.local",
            "db-0.db",
        ],
    );
    assert_eq!(got, ["db-0.db.prod.svc.cluster.local. A 10.1.0.1"]);
}

#[test]
fn deleting_a_service_turns_its_name_into_nxdomain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = control(&dir.path().join("control"));
    let n = node(
        &dir.path().join("node"),
        &["--control", &c.addr, "--dns-upstream", "none"],
    );
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{name: http, port: 80}]\n";
    ok(cli(&c.addr, &["apply", "-f", "-"], Some(svc)));
    let ip = eventually("the Service in DNS", || {
        answers(&n.addr, &["api.default.svc.cluster.local", "A"])
            .first()
            .and_then(|l| l.strip_prefix("api.default.svc.cluster.local. A "))
            .map(str::to_string)
    });
    assert!(ip.starts_with("10."), "{ip}");
    assert_eq!(
        answers(
            &n.addr,
            &["_http._tcp.api.default.svc.cluster.local", "SRV"]
        ),
        ["_http._tcp.api.default.svc.cluster.local. SRV 0 100 80 api.default.svc.cluster.local."]
    );
    ok(cli(&c.addr, &["delete", "svc", "api"], None));
    eventually("NXDOMAIN after the delete", || {
        (status(&dig(&n.addr, &["api.default.svc.cluster.local", "A"])) == "NXDOMAIN").then_some(())
    });
    let out = dig(
        &n.addr,
        &["_http._tcp.api.default.svc.cluster.local", "SRV"],
    );
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
}

#[test]
fn large_headless_answers_truncate_over_udp_and_retry_over_tcp() {
    let mut manifest = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec:\n  clusterIP: None\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  labels: {kubernetes.io/service-name: big}\naddressType: IPv4\nendpoints:\n",
    );
    for i in 1..=100 {
        manifest.push_str(&format!("- addresses: [10.3.0.{i}]\n"));
    }
    let s = static_node(&manifest, &["--dns-upstream", "none"]);
    let ns = s.node.addr.as_str();
    // +ignore: take the truncated UDP answer as it is.
    let out = dig(ns, &["+ignore", "big.default.svc.cluster.local", "A"]);
    assert!(flags(&out).contains("tc"), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    // By default dig retries over TCP and gets everything.
    let out = dig(ns, &["big.default.svc.cluster.local", "A"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 100"), "{out}");
    assert!(out.contains("(TCP)"), "{out}");
}

/// A fake upstream on loopback: answers every A query with 192.0.2.7
/// (TTL 60) and counts what it got.
fn fake_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind fake upstream");
    let addr = sock.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            seen.fetch_add(1, Ordering::SeqCst);
            let q = &buf[..n];
            // Echo header + question, then one A record pointing at it.
            let mut qend = 12;
            while qend < n && q[qend] != 0 {
                qend += usize::from(q[qend]) + 1;
            }
            qend += 5;
            if qend > n {
                continue;
            }
            let mut r = q[..qend].to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
            let _ = sock.send_to(&r, peer);
        }
    });
    (addr, count)
}

#[test]
fn other_names_are_forwarded_and_cached() {
    let (upstream, count) = fake_upstream();
    let up = upstream.to_string();
    let s = static_node(STATIC, &["--dns-upstream", &up]);
    let ns = s.node.addr.as_str();
    let out = dig(ns, &["Example.ORG", "A"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(flags(&out).contains("ra"), "{out}");
    assert_eq!(
        answers(ns, &["example.org", "A"]),
        ["example.org. A 192.0.2.7"]
    );
    // The second answer came from the cache.
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Cluster names never go upstream.
    assert_eq!(
        answers(ns, &["web.default.svc.cluster.local", "A"]),
        ["web.default.svc.cluster.local. A 10.96.0.10"]
    );
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn an_upstream_that_never_answers_gives_servfail() {
    // Bound but never read: queries vanish.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let up = silent.local_addr().expect("addr").to_string();
    let s = static_node(STATIC, &["--dns-upstream", &up]);
    let ns = s.node.addr.as_str();
    // dig waits far longer than the server's upstream budget: the SERVFAIL
    // is the server's answer, not a client timeout.
    let out = dig(ns, &["+tries=1", "+timeout=30", "nowhere.example", "A"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    // Cluster names still answer.
    assert_eq!(
        answers(ns, &["web.default.svc.cluster.local", "A"]),
        ["web.default.svc.cluster.local. A 10.96.0.10"]
    );
}

#[test]
fn garbage_on_the_wire_does_not_stop_the_server() {
    let s = static_node(STATIC, &["--dns-upstream", "none"]);
    let ns = s.node.addr.as_str();
    let addr: SocketAddr = ns.parse().expect("addr");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A header claiming one question but carrying none: FORMERR.
    sock.send_to(&[0xAB, 0xCD, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0], addr)
        .expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).expect("FORMERR reply");
    assert!(n >= 12);
    assert_eq!(&buf[..2], &[0xAB, 0xCD]);
    assert_eq!(buf[3] & 0x0F, 1, "FORMERR");
    // Random and oversized datagrams, and junk over TCP.
    let mut x: u32 = 12345;
    for len in [0usize, 1, 11, 13, 100, 511, 4000, 9000] {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let _ = sock.send_to(&junk, addr);
    }
    if let Ok(mut t) = TcpStream::connect(addr) {
        let _ = t.write_all(&[0xFF, 0xFF, 1, 2, 3]);
    }
    if let Ok(mut t) = TcpStream::connect(addr) {
        let _ = t.write_all(&[0, 3, 1, 2, 3]);
    }
    assert_eq!(
        answers(ns, &["web.default.svc.cluster.local", "A"]),
        ["web.default.svc.cluster.local. A 10.96.0.10"]
    );
}
