//! The data plane through the real binary: `strait control` and `strait
//! node` processes on loopback, backends as plain TCP servers in the test.
//! Every test has its own address ranges (`Net::new(n)`) so tests run in
//! parallel, and waits by polling, never by sleeping.

mod harness;
mod outside;
mod routes;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;

use harness::*;

/// Starts a control plane and `node-1` in `dir`.
fn cluster(dir: &std::path::Path, net: &Net) -> (Control, Node) {
    let control = Control::start(&dir.join("control"), net);
    let node = Node::start("node-1", net, &control.addr, &dir.join("node"));
    (control, node)
}

/// Waits until a new connection through `addr` reaches one of `names`.
fn wait_forwarding(addr: &str, names: &[&str]) {
    eventually(&format!("{addr} to forward to one of {names:?}"), || {
        who(addr).ok().filter(|n| names.contains(&n.as_str()))
    });
}

#[test]
fn three_backends_get_a_balanced_share_on_every_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(1);
    let (control, _node) = cluster(dir.path(), &net);
    let backends: Vec<Backend> = ["b1", "b2", "b3"].map(Backend::greeter).into();
    let mut yaml = service("web", "LoadBalancer", "app: web");
    for b in &backends {
        yaml.push_str(&pod(b, "app: web"));
    }
    control.apply(&yaml);

    let svc = control.service("web");
    let node_port = svc["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    let lb_ip = svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .expect("LB IP");
    let addrs = [
        cluster_addr(&control, "web"),
        format!("{}:{node_port}", net.node_ip),
        format!("{lb_ip}:8080"),
    ];
    for addr in &addrs {
        // Wait until all three endpoints are known to the agent.
        let mut seen = std::collections::BTreeSet::new();
        eventually(&format!("{addr} to reach every backend"), || {
            seen.extend(who(addr).ok());
            (seen.len() == 3).then_some(())
        });
        // Sequential short connections: expected a third each. A share
        // under a fifth would be a broken balancer, not bad luck (over 5
        // standard deviations).
        let total = 300;
        let mut share: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..total {
            let name = who(addr).expect("connection through the service");
            *share.entry(name).or_default() += 1;
        }
        assert_eq!(share.len(), 3, "{addr}: {share:?}");
        assert!(
            share.values().all(|&n| n * 5 >= total),
            "{addr}: unbalanced {share:?}"
        );
        // Held connections: least-connections spreads them evenly.
        let held: Vec<_> = (0..30)
            .map(|_| greeting(addr).expect("held connection"))
            .collect();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, name) in &held {
            *per.entry(name.as_str()).or_default() += 1;
        }
        assert!(per.values().all(|&n| n >= 5), "{addr}: held {per:?}");
    }
}

#[test]
fn a_killed_backend_fails_no_client_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(2);
    let (control, _node) = cluster(dir.path(), &net);
    let mut backends: Vec<Backend> = ["k1", "k2", "k3"].map(Backend::greeter).into();
    let mut yaml = service("web", "ClusterIP", "app: web");
    for b in &backends {
        yaml.push_str(&pod(b, "app: web"));
    }
    control.apply(&yaml);
    let addr = cluster_addr(&control, "web");
    let mut seen = std::collections::BTreeSet::new();
    eventually("every backend to be reached", || {
        seen.extend(who(&addr).ok());
        (seen.len() == 3).then_some(())
    });

    // Crash one backend; the control plane is not told (its Pod stays
    // ready), so only the agent's retries stand between it and clients.
    backends[0].kill();
    for i in 0..100 {
        let name = who(&addr).unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        assert_ne!(name, "k1", "connection {i} reached the dead backend");
    }
}

#[test]
fn a_service_edit_moves_new_connections_and_keeps_old_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(3);
    let (control, _node) = cluster(dir.path(), &net);
    let (old, new) = (Backend::greeter("v1"), Backend::greeter("v2"));
    control.apply(&format!(
        "{}{}{}",
        service("web", "ClusterIP", "app: web, version: v1"),
        pod(&old, "app: web, version: v1"),
        pod(&new, "app: web, version: v2"),
    ));
    let addr = cluster_addr(&control, "web");
    wait_forwarding(&addr, &["v1"]);
    let (mut kept, name) = greeting(&addr).expect("connection before the edit");
    assert_eq!(name, "v1");
    echo(&mut kept, b"before").expect("echo before the edit");

    control.apply(&service("web", "ClusterIP", "app: web, version: v2"));
    assert_eq!(cluster_addr(&control, "web"), addr, "the ClusterIP stays");
    wait_forwarding(&addr, &["v2"]);
    for i in 0..30 {
        assert_eq!(
            who(&addr).expect("connection after the edit"),
            "v2",
            "new connection {i} after the edit"
        );
    }
    // The connection made before the edit still runs, to its old backend.
    echo(&mut kept, b"after the edit").expect("old connection still forwards");
}

/// xorshift64*: a deterministic pseudo-random byte stream.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_exact_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            word.copy_from_slice(&self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// Sends `total` pattern bytes to a sink through `addr`, half-closes, and
/// returns what the sink reported next to what was sent.
fn send_to_sink(addr: &str, total: usize) -> std::io::Result<(String, String)> {
    let mut s = connect(addr)?;
    let mut pattern = Pattern(0x5eed);
    let mut hash = Hash::default();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut sent = 0usize;
    while sent < total {
        let n = chunk.len().min(total - sent);
        pattern.fill(&mut chunk[..n]);
        hash.update(&chunk[..n]);
        s.write_all(&chunk[..n])?;
        sent += n;
    }
    // The sink only answers once it saw end-of-stream, which the agent must
    // pass on while keeping the way back open.
    s.shutdown(Shutdown::Write)?;
    let report = read_line(&mut s)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    assert!(rest.is_empty(), "unexpected bytes after the report");
    Ok((report, format!("{total} {:016x}", hash.finish())))
}

#[test]
fn one_gib_arrives_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(4);
    let (control, _node) = cluster(dir.path(), &net);
    let sink = Backend::sink("sink");
    control.apply(&format!(
        "{}{}",
        service("bulk", "ClusterIP", "app: bulk"),
        pod(&sink, "app: bulk")
    ));
    let addr = cluster_addr(&control, "bulk");
    eventually("the sink to be reachable", || {
        let (got, want) = send_to_sink(&addr, 0).ok()?;
        (got == want).then_some(())
    });
    let (got, want) = send_to_sink(&addr, 1 << 30).expect("1 GiB through the service");
    assert_eq!(got, want, "the sink saw other bytes than were sent");
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(5);
    let (control, _node) = cluster(dir.path(), &net);
    let (sink, greeter) = (Backend::sink("sink"), Backend::greeter("echo"));
    control.apply(&format!(
        "{}{}{}{}",
        service("sink", "ClusterIP", "app: sink"),
        pod(&sink, "app: sink"),
        service("echo", "ClusterIP", "app: echo"),
        pod(&greeter, "app: echo"),
    ));
    // Client half-closes first: the reply still arrives.
    let addr = cluster_addr(&control, "sink");
    eventually("the sink to be reachable", || {
        connect(&addr).ok().and_then(|mut s| {
            s.shutdown(Shutdown::Write).ok()?;
            read_line(&mut s).ok()
        })
    });
    let (got, want) = send_to_sink(&addr, 3 << 20).expect("3 MiB through the service");
    assert_eq!(got, want);

    // Client half-closes after data in flight: everything sent before the
    // FIN is echoed, then the server's FIN arrives.
    let addr = cluster_addr(&control, "echo");
    wait_forwarding(&addr, &["echo"]);
    let (mut s, _) = greeting(&addr).expect("connect");
    let msg = vec![b'x'; 1 << 20];
    let writer = {
        let mut w = s.try_clone().expect("clone");
        let msg = msg.clone();
        std::thread::spawn(move || {
            w.write_all(&msg).expect("send");
            w.shutdown(Shutdown::Write).expect("half-close");
        })
    };
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read to end");
    writer.join().expect("writer");
    assert!(back == msg, "echoed {} of {} bytes", back.len(), msg.len());
}

/// How many ready endpoints the agent's persisted state (`data_dir/state.pb`)
/// holds for Service `service`. The agent persists at most once a second,
/// so an early file may hold the Service before its endpoints.
fn persisted_ready_endpoints(data_dir: &std::path::Path, service: &str) -> usize {
    use prost::Message;
    use strait_proto::v1::{ListResponse, object::Kind};
    let Ok(bytes) = std::fs::read(data_dir.join("state.pb")) else {
        return 0;
    };
    let list = ListResponse::decode(bytes.as_slice()).expect("state.pb decodes");
    list.items
        .iter()
        .filter_map(|o| match &o.kind {
            Some(Kind::EndpointSlice(s)) => Some(s),
            _ => None,
        })
        .filter(|s| {
            s.metadata
                .as_ref()
                .and_then(|m| m.labels.get("kubernetes.io/service-name"))
                == Some(&service.to_string())
        })
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count()
}

#[test]
fn control_plane_outage_and_agent_restart_keep_traffic_flowing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(6);
    let node_dir = dir.path().join("node");
    let (mut control, mut node) = cluster(dir.path(), &net);
    let backends: Vec<Backend> = ["o1", "o2"].map(Backend::greeter).into();
    control.apply(&format!(
        "{}{}{}",
        service("steady", "ClusterIP", "app: steady"),
        pod(&backends[0], "app: steady"),
        pod(&backends[1], "app: steady"),
    ));
    let addr = cluster_addr(&control, "steady");
    wait_forwarding(&addr, &["o1", "o2"]);
    let (mut kept, _) = greeting(&addr).expect("long-lived connection");
    eventually("the agent to persist both endpoints", || {
        (persisted_ready_endpoints(&node_dir, "steady") == 2).then_some(())
    });

    // Control plane down: open connections and new ones keep working.
    control.kill();
    echo(&mut kept, b"during the outage").expect("open connection survives");
    for i in 0..20 {
        who(&addr).unwrap_or_else(|e| panic!("new connection {i} during the outage: {e}"));
    }

    // The agent restarts while the control plane is still down: it
    // forwards again from its persisted state.
    node.restart();
    wait_forwarding(&addr, &["o1", "o2"]);
    for i in 0..20 {
        who(&addr).unwrap_or_else(|e| panic!("connection {i} after the agent restart: {e}"));
    }

    // Control plane back: the watch resumes and a new Service shows up.
    control.restart();
    let late = Backend::greeter("late");
    control.apply(&format!(
        "{}{}",
        service("late", "ClusterIP", "app: late"),
        pod(&late, "app: late"),
    ));
    wait_forwarding(&cluster_addr(&control, "late"), &["late"]);
    wait_forwarding(&addr, &["o1", "o2"]);
}

/// Status code and body of `GET /` on `addr`.
fn http_get(addr: &str) -> std::io::Result<(u16, serde_json::Value)> {
    let mut s = connect(addr)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {raw:?}")))?;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = serde_json::from_str(body)
        .map_err(|e| std::io::Error::other(format!("body {body:?}: {e}")))?;
    Ok((code, json))
}

/// Which backend a new connection through `addr` from source `src` reaches.
fn who_from(addr: &str, src: &str) -> std::io::Result<String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let src: std::net::SocketAddr = format!("{src}:0").parse().expect("source address");
    sock.bind(&src.into())?;
    let dst: std::net::SocketAddr = addr.parse().expect("address");
    sock.connect_timeout(&dst.into(), std::time::Duration::from_secs(10))?;
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    read_line(&mut s)
}

#[test]
fn external_local_health_check_and_source_ranges_follow_kube_proxy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(7);
    let (control, _node) = cluster(dir.path(), &net);
    let local = Backend::greeter("local");
    let elsewhere = Backend::greeter("elsewhere");
    let svc = service("edge", "LoadBalancer", "app: edge").replace(
        "  ports:",
        "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [127.0.0.1/32]\n  ports:",
    );
    control.apply(&format!(
        "{svc}{}{}",
        pod(&local, "app: edge"),
        pod(&elsewhere, "app: edge").replace("nodeName: node-1", "nodeName: node-2"),
    ));
    let spec = control.service("edge");
    let hc_port = spec["spec"]["healthCheckNodePort"]
        .as_i64()
        .expect("healthCheckNodePort allocated");
    let lb_ip = spec["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .expect("LB IP");
    let hc = format!("{}:{hc_port}", net.node_ip);
    let lb = format!("{lb_ip}:8080");

    // One local ready endpoint (the other is on node-2): 200, count 1.
    let body = eventually("the health check to answer 200", || {
        http_get(&hc)
            .ok()
            .filter(|(c, _)| *c == 200)
            .map(|(_, b)| b)
    });
    assert_eq!(body["service"]["name"], "edge", "{body}");
    assert_eq!(body["service"]["namespace"], "default", "{body}");
    assert_eq!(body["localEndpoints"], 1, "{body}");
    assert_eq!(body["serviceProxyHealthy"], true, "{body}");

    // Source ranges: 127.0.0.1 is inside, 127.0.0.2 is not. (Loopback
    // clients are the node itself, so the Local policy does not narrow
    // their endpoints: `outside::external_local_serves_outside_clients_…`.)
    for i in 0..10 {
        let got = who_from(&lb, "127.0.0.1").unwrap_or_else(|e| panic!("allowed client {i}: {e}"));
        assert!(["local", "elsewhere"].contains(&got.as_str()), "{got}");
        assert!(
            who_from(&lb, "127.0.0.2").is_err(),
            "client outside loadBalancerSourceRanges got through"
        );
    }

    // The local Pod goes away (terminating, so not ready): 503, count 0.
    let out = control.cli(&["delete", "pod", "local"]);
    assert!(out.status.success(), "{out:?}");
    let body = eventually("the health check to answer 503", || {
        http_get(&hc)
            .ok()
            .filter(|(c, _)| *c == 503)
            .map(|(_, b)| b)
    });
    assert_eq!(body["localEndpoints"], 0, "{body}");

    // Cluster policy: no health check port any more.
    control.apply(&service("edge", "LoadBalancer", "app: edge"));
    eventually("the health check port to close", || {
        connect(&hc).is_err().then_some(())
    });
}

/// A UDP backend answering each datagram with `name:payload`; dropped, it
/// closes its socket (later datagrams get ICMP port unreachable).
struct UdpBackend {
    name: String,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpBackend {
    fn start(name: &str) -> UdpBackend {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp backend");
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .expect("timeout");
        let port = socket.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (n, s) = (name.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let mut reply = format!("{n}:").into_bytes();
                    reply.extend_from_slice(&buf[..len]);
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        UdpBackend {
            name: name.to_string(),
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn pod(&self, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n\
             spec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports: [{{name: dns, containerPort: {port}, protocol: UDP}}]\n\
             status: {{podIP: 127.0.0.1}}\n---\n",
            name = self.name,
            port = self.port,
        )
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client socket connected to `addr` (so only replies from `addr` count).
fn udp_client(addr: &str) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind client");
    s.connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .expect("timeout");
    s
}

/// Sends `payload` and returns the backend name of the reply, if one came.
fn udp_ask(s: &std::net::UdpSocket, payload: &str) -> Option<String> {
    s.send(payload.as_bytes()).ok()?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).ok()?;
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    let (name, echoed) = reply.split_once(':')?;
    (echoed == payload).then(|| name.to_string())
}

#[test]
fn udp_services_balance_flows_and_move_off_a_dead_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(8);
    let (control, _node) = cluster(dir.path(), &net);
    let u1 = UdpBackend::start("u1");
    let mut u2 = Some(UdpBackend::start("u2"));
    let u2_pod = u2.as_ref().expect("u2").pod("app: resolver");
    control.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: resolver}}\n\
         spec:\n  type: NodePort\n  selector: {{app: resolver}}\n  ports: [{{name: dns, port: 8053, protocol: UDP, targetPort: dns}}]\n---\n{}{u2_pod}",
        u1.pod("app: resolver"),
    ));
    let svc = control.service("resolver");
    let ip = svc["spec"]["clusterIP"].as_str().expect("clusterIP");
    let node_port = svc["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    let vip = format!("{ip}:8053");

    // Every flow reaches a backend; flows (client ports) spread over both;
    // a flow sticks to its backend.
    let mut seen = std::collections::BTreeSet::new();
    eventually(
        "UDP flows through the ClusterIP to reach both backends",
        || {
            let c = udp_client(&vip);
            let first = udp_ask(&c, "q0")?;
            for i in 1..5 {
                assert_eq!(
                    udp_ask(&c, &format!("q{i}")).as_deref(),
                    Some(first.as_str()),
                    "flow moved"
                );
            }
            seen.insert(first);
            (seen.len() == 2).then_some(())
        },
    );
    let np = format!("{}:{node_port}", net.node_ip);
    eventually("the NodePort to answer over UDP", || {
        udp_ask(&udp_client(&np), "np")
    });

    // A flow on u2, then u2 dies: the client's retries move to u1.
    let c = eventually("a flow on u2", || {
        let c = udp_client(&vip);
        (udp_ask(&c, "hello")? == "u2").then_some(c)
    });
    u2.take();
    eventually("the flow to move to u1 after u2 closed", || {
        (udp_ask(&c, "retry")? == "u1").then_some(())
    });
}
