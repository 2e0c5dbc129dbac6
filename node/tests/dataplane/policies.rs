//! Endpoint choice through the agent's public API, one rule at a time:
//! ClientIP session affinity and its timeout, round-robin,
//! `internalTrafficPolicy: Local`, the fallback to serving-terminating
//! endpoints, retry past an endpoint that never answers the connect, the
//! idle timeout, and no listener for an ExternalName Service.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strait_node::{Config, LbPolicy};
use tokio::io::AsyncReadExt;

use crate::helpers::{Echo, closed_without_data, connect_echo, roundtrip, within};
use crate::{static_config, wait_bound};

/// A Service at `vip:9090` with `spec` lines added, and one slice per
/// endpoint with its conditions and node.
fn service(name: &str, vip: &str, spec: &str, endpoints: &[(SocketAddr, &str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n{spec}  ports:\n  - {{name: echo, port: 9090, protocol: TCP}}\n"
    );
    for (i, (ep, conditions, node)) in endpoints.iter().enumerate() {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-{i}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{name: echo, port: {}, protocol: TCP}}]\n\
             endpoints:\n- addresses: [\"{}\"]\n  conditions: {conditions}\n  nodeName: {node}\n",
            ep.port(),
            ep.ip()
        ));
    }
    y.push_str("---\n");
    y
}

const READY: &str = "{ready: true}";

fn counts(backends: &[Echo]) -> Vec<usize> {
    backends.iter().map(Echo::accepted).collect()
}

/// The backend whose count went up since `before`.
fn which(backends: &[Echo], before: &[usize]) -> usize {
    let now = counts(backends);
    let moved: Vec<usize> = (0..now.len()).filter(|&i| now[i] != before[i]).collect();
    assert_eq!(moved.len(), 1, "{before:?} → {now:?}");
    moved[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_holds_until_its_timeout() {
    // Connection counts are per endpoint, across Services: each Service
    // gets backends of its own.
    let (a, b) = (three().await, three().await);
    let eps = |bs: &[Echo; 3]| -> Vec<(SocketAddr, &'static str, &'static str)> {
        bs.iter().map(|e| (e.addr, READY, "test-node")).collect()
    };
    let yaml = format!(
        "{}{}",
        service(
            "sticky",
            "127.77.1.1",
            "  sessionAffinity: ClientIP\n",
            &eps(&a)
        ),
        service(
            "brief",
            "127.77.1.2",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
            &eps(&b)
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = strait_node::build(static_config(dir.path(), &yaml))
        .await
        .expect("build");
    let (sticky, brief): (SocketAddr, SocketAddr) = (
        "127.77.1.1:9090".parse().expect("addr"),
        "127.77.1.2:9090".parse().expect("addr"),
    );
    wait_bound(|| agent.listeners(), sticky).await;
    wait_bound(|| agent.listeners(), brief).await;

    // Held open, so least-connections alone would spread them: affinity
    // keeps every one on the first connection's endpoint.
    let before = counts(&a);
    let mut held = vec![connect_echo(sticky).await];
    let first = which(&a, &before);
    for _ in 0..5 {
        held.push(connect_echo(sticky).await);
    }
    assert_eq!(counts(&a)[first] - before[first], 6, "{:?}", counts(&a));

    // A 1 s timeout: once no new connection came for that long, the next
    // one is placed afresh, and least-connections over two distinct random
    // choices never picks the endpoint still holding a connection.
    let before = counts(&b);
    let kept = connect_echo(brief).await;
    let pinned = which(&b, &before);
    let quiet = Instant::now();
    // Waiting out the timeout is the point here; a slow machine only waits
    // longer, which the rule allows.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(quiet.elapsed() >= Duration::from_secs(1));
    let before = counts(&b);
    let _next = connect_echo(brief).await;
    assert_ne!(which(&b, &before), pinned, "affinity outlived its timeout");
    drop((held, kept));
    agent.shutdown().await;
}

async fn three() -> [Echo; 3] {
    [
        Echo::start().await,
        Echo::start().await,
        Echo::start().await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_takes_each_endpoint_in_turn() {
    let backends = [
        Echo::start().await,
        Echo::start().await,
        Echo::start().await,
    ];
    let eps: Vec<(SocketAddr, &str, &str)> = backends
        .iter()
        .map(|b| (b.addr, READY, "test-node"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        lb_policy: LbPolicy::RoundRobin,
        ..static_config(dir.path(), &service("rr", "127.77.1.3", "", &eps))
    };
    let agent = strait_node::build(cfg).await.expect("build");
    let vip: SocketAddr = "127.77.1.3:9090".parse().expect("addr");
    wait_bound(|| agent.listeners(), vip).await;
    // Closed one by one, so least-connections would see three idle
    // endpoints every time; round-robin still cycles through them.
    let mut order = Vec::new();
    for _ in 0..9 {
        let before = counts(&backends);
        drop(connect_echo(vip).await);
        order.push(which(&backends, &before));
    }
    let cycle = &order[..3];
    let mut distinct = cycle.to_vec();
    distinct.sort_unstable();
    assert_eq!(distinct, [0, 1, 2], "{order:?}");
    assert_eq!(order, cycle.repeat(3), "not in turn: {order:?}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_local_policy_and_terminating_fallback() {
    let here = Echo::start().await;
    let there = Echo::start().await;
    let draining = Echo::start().await;
    let gone = Echo::start().await;
    let yaml = format!(
        "{}{}{}",
        service(
            "local",
            "127.77.1.4",
            "  internalTrafficPolicy: Local\n",
            &[
                (here.addr, READY, "test-node"),
                (there.addr, READY, "other-node")
            ],
        ),
        service(
            "remote-only",
            "127.77.1.5",
            "  internalTrafficPolicy: Local\n",
            &[(there.addr, READY, "other-node")],
        ),
        // Nothing ready: the serving one of the terminating endpoints
        // takes the traffic, the one that stopped serving does not.
        service(
            "terminating",
            "127.77.1.6",
            "",
            &[
                (
                    draining.addr,
                    "{ready: false, serving: true, terminating: true}",
                    "test-node"
                ),
                (
                    gone.addr,
                    "{ready: false, serving: false, terminating: true}",
                    "test-node"
                ),
            ],
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = strait_node::build(static_config(dir.path(), &yaml))
        .await
        .expect("build");
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    for a in ["127.77.1.4:9090", "127.77.1.5:9090", "127.77.1.6:9090"] {
        wait_bound(|| agent.listeners(), addr(a)).await;
    }
    for _ in 0..10 {
        drop(connect_echo(addr("127.77.1.4:9090")).await);
        drop(connect_echo(addr("127.77.1.6:9090")).await);
    }
    assert_eq!((here.accepted(), there.accepted()), (10, 0));
    assert_eq!((draining.accepted(), gone.accepted()), (10, 0));
    assert!(
        closed_without_data(addr("127.77.1.5:9090")).await,
        "internalTrafficPolicy: Local used another node's endpoint"
    );
    agent.shutdown().await;
}

/// A listener that never completes a handshake: its accept queue (length
/// 0) is full with one connection nobody accepts, so the kernel drops
/// further SYNs and a connect to it waits until it times out.
fn black_hole() -> (socket2::Socket, std::net::TcpStream) {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    s.listen(0).expect("listen");
    let addr = s.local_addr().expect("addr").as_socket().expect("inet");
    let filler = std::net::TcpStream::connect(addr).expect("filler connection");
    (s, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_times_out_moves_on_to_another_endpoint() {
    let live = Echo::start().await;
    let (hole, _filler) = black_hole();
    let hole_addr = hole.local_addr().expect("addr").as_socket().expect("inet");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        connect_timeout: Duration::from_millis(200),
        ..static_config(
            dir.path(),
            &service(
                "hole",
                "127.77.1.7",
                "",
                &[
                    (hole_addr, READY, "test-node"),
                    (live.addr, READY, "test-node"),
                ],
            ),
        )
    };
    let agent = strait_node::build(cfg).await.expect("build");
    let vip: SocketAddr = "127.77.1.7:9090".parse().expect("addr");
    wait_bound(|| agent.listeners(), vip).await;
    // Every client connection gets through, whichever endpoint it tried
    // first.
    for _ in 0..10 {
        let mut s = connect_echo(vip).await;
        roundtrip(&mut s, b"through\n").await;
    }
    assert_eq!(live.accepted(), 10);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_external_names_get_no_listener() {
    let backend = Echo::start().await;
    let yaml = format!(
        "{}apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: default}}\n\
         spec:\n  type: ExternalName\n  externalName: db.example.com\n  ports: [{{port: 5432}}]\n",
        service(
            "idle",
            "127.77.1.8",
            "",
            &[(backend.addr, READY, "test-node")]
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        idle_timeout: Some(Duration::from_secs(1)),
        ..static_config(dir.path(), &yaml)
    };
    let agent = strait_node::build(cfg).await.expect("build");
    let vip: SocketAddr = "127.77.1.8:9090".parse().expect("addr");
    wait_bound(|| agent.listeners(), vip).await;
    assert_eq!(agent.listeners(), [vip], "ExternalName got a listener");

    // Taken before the connection's last data moved, so the time from here
    // to the close is at least its idle time: a close sooner than the
    // timeout after this instant is a close before the timeout.
    let quiet = Instant::now();
    let mut s = connect_echo(vip).await;
    let mut buf = [0u8; 16];
    let end = within("the idle connection to be closed", s.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(0)) || end.is_err(),
        "data on an idle connection: {end:?}"
    );
    assert!(
        quiet.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before the idle timeout",
        quiet.elapsed()
    );
    agent.shutdown().await;
}
