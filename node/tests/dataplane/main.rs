//! The node agent's data plane end to end on loopback: static-mode state,
//! listeners, endpoint choice, retries and connection lifetime across
//! state changes; plus the watch client against a scripted control plane.

mod fake_control;
mod helpers;
mod policies;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use helpers::{
    Echo, closed_without_data, connect_echo, dead_port, eventually, manifest, roundtrip,
};
use strait_node::drain::Drain;
use strait_node::workers::Workers;
use strait_node::{Config, NodeState, listeners};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

fn static_config(dir: &Path, yaml: &str) -> Config {
    let file = dir.join("services.yaml");
    std::fs::write(&file, yaml).expect("write manifest");
    Config {
        name: "test-node".into(),
        control: vec![],
        data_dir: dir.join("data"),
        config_file: Some(file),
        connect_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_millis(100),
        ..Config::default()
    }
}

async fn wait_bound(listeners: impl Fn() -> Vec<SocketAddr>, addr: SocketAddr) {
    eventually(&format!("listener on {addr}"), || {
        let bound = listeners();
        async move { bound.contains(&addr) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_mode_balances_over_every_backend() {
    let backends = [
        Echo::start().await,
        Echo::start().await,
        Echo::start().await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = static_config(dir.path(), &manifest("echo", "127.77.0.10", 9090, &addrs));
    let vip: SocketAddr = "127.77.0.10:9090".parse().expect("vip");

    let agent = strait_node::build(cfg).await.expect("build");
    wait_bound(|| agent.listeners(), vip).await;

    // Held open at once, least-connections spreads them over all three.
    let mut conns = Vec::new();
    for _ in 0..30 {
        conns.push(connect_echo(vip).await);
    }
    let counts: Vec<usize> = backends.iter().map(Echo::accepted).collect();
    assert_eq!(counts.iter().sum::<usize>(), 30, "{counts:?}");
    assert!(counts.iter().all(|c| *c > 0), "unbalanced: {counts:?}");
    for c in &mut conns {
        roundtrip(c, b"still there\n").await;
    }
    drop(conns);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_backend_costs_no_client_connection() {
    let live = [Echo::start().await, Echo::start().await];
    let closing = Echo::start().await;
    let dead = dead_port().await;
    let addrs = [live[0].addr, live[1].addr, closing.addr, dead];
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = static_config(dir.path(), &manifest("retry", "127.77.0.11", 9090, &addrs));
    let vip: SocketAddr = "127.77.0.11:9090".parse().expect("vip");

    let agent = strait_node::build(cfg).await.expect("build");
    wait_bound(|| agent.listeners(), vip).await;
    let mut kept = connect_echo(vip).await;
    closing.close_listener().await;

    // Two of four endpoints refuse; every client connection still works.
    for _ in 0..40 {
        let mut s = connect_echo(vip).await;
        roundtrip(&mut s, b"again\n").await;
    }
    assert!(live.iter().all(|b| b.accepted() > 0));
    roundtrip(&mut kept, b"kept\n").await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_closes_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = dead_port().await;
    let yaml = format!(
        "{}---\n{}",
        manifest("empty", "127.77.0.12", 9090, &[]),
        manifest("dead", "127.77.0.13", 9090, &[dead])
    );
    let cfg = static_config(dir.path(), &yaml);
    let agent = strait_node::build(cfg).await.expect("build");
    for vip in ["127.77.0.12:9090", "127.77.0.13:9090"] {
        let vip: SocketAddr = vip.parse().expect("vip");
        wait_bound(|| agent.listeners(), vip).await;
        assert!(closed_without_data(vip).await, "{vip} answered");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_never_cut_open_connections() {
    let a = Echo::start().await;
    let b = Echo::start().await;
    let vip: SocketAddr = "127.77.0.14:9090".parse().expect("vip");
    let state_of = |eps: &[SocketAddr]| {
        let objects = strait_proto::manifest::parse(&manifest("drain", "127.77.0.14", 9090, eps))
            .expect("manifest");
        Arc::new(NodeState::from_objects(objects, 1))
    };
    let cfg = Config {
        name: "test-node".into(),
        ..Config::default()
    };
    let (tx, rx) = watch::channel(Arc::new(NodeState::unsynced()));
    let drain = Drain::new();
    // Two workers: the listener is two SO_REUSEPORT sockets, and state
    // changes must reach both.
    let workers = Workers::start(NonZeroUsize::new(2).expect("2")).expect("workers");
    let ls = listeners::spawn(&cfg, rx, &drain, Default::default(), workers).expect("listeners");
    assert!(ls.bound().is_empty(), "bound before the first full state");

    tx.send_replace(state_of(&[a.addr]));
    wait_bound(|| ls.bound(), vip).await;
    let mut on_a = connect_echo(vip).await;
    assert_eq!(a.accepted(), 1);

    // Endpoint a removed: new connections go to b, the open one stays.
    tx.send_replace(state_of(&[b.addr]));
    eventually("new connections reaching b", || async {
        connect_echo(vip).await;
        b.accepted() > 0
    })
    .await;
    roundtrip(&mut on_a, b"after endpoint removal\n").await;

    // No endpoints at all: new connections are refused, the open one stays.
    tx.send_replace(state_of(&[]));
    eventually("connections refused", || closed_without_data(vip)).await;
    roundtrip(&mut on_a, b"after last endpoint removal\n").await;

    // Service gone: the listener closes, the open connection stays.
    tx.send_replace(Arc::new(NodeState::from_objects(vec![], 2)));
    eventually("listener closed", || {
        let bound = ls.bound();
        async move { !bound.contains(&vip) }
    })
    .await;
    roundtrip(&mut on_a, b"after listener removal\n").await;

    // And it comes back on the same address.
    tx.send_replace(state_of(&[a.addr]));
    wait_bound(|| ls.bound(), vip).await;
    connect_echo(vip).await;
    roundtrip(&mut on_a, b"after rebind\n").await;

    drop(on_a);
    drain.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_resumes_relists_and_persists() {
    let a = Echo::start().await;
    let b = Echo::start().await;
    let vip: SocketAddr = "127.77.0.15:9090".parse().expect("vip");
    let objects = |eps: &[SocketAddr]| {
        strait_proto::manifest::parse(&manifest("watched", "127.77.0.15", 9090, eps))
            .expect("manifest")
    };
    let control = fake_control::FakeControl::start().await;
    // 1st watch: the full state at revision 5, then the stream breaks.
    control.script_initial(5, objects(&[a.addr]), false);
    // 2nd (resume from 5): history compacted.
    control.script_compacted();
    // 3rd (re-list): the full state at 9 with endpoint b, kept open.
    control.script_initial(9, objects(&[b.addr]), true);

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        name: "test-node".into(),
        control: vec![control.addr.to_string()],
        data_dir: dir.path().join("data"),
        connect_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_millis(100),
        ..Config::default()
    };
    let agent = strait_node::build(cfg.clone()).await.expect("build");
    let state = agent.state();
    eventually("revision 9", || {
        let rev = state.borrow().revision();
        async move { rev == 9 }
    })
    .await;
    assert_eq!(control.watch_revisions(), [0, 5, 0]);
    wait_bound(|| agent.listeners(), vip).await;
    connect_echo(vip).await;
    assert_eq!(b.accepted(), 1);
    eventually("node registered", || {
        let nodes = control.registered_nodes();
        async move { nodes.contains(&"test-node".to_string()) }
    })
    .await;
    let data_dir = cfg.data_dir.clone();
    eventually("state persisted at revision 9", || {
        let persisted = strait_node::watch::load_persisted(&data_dir)
            .ok()
            .flatten()
            .map(|s| s.revision());
        async move { persisted == Some(9) }
    })
    .await;
    agent.shutdown().await;
    control.stop().await;

    // Static stability: with the control plane gone, a restarted agent
    // forwards from the persisted state.
    let gone = dead_port().await;
    let restarted = strait_node::build(Config {
        control: vec![gone.to_string()],
        ..cfg
    })
    .await
    .expect("rebuild");
    wait_bound(|| restarted.listeners(), vip).await;
    connect_echo(vip).await;
    assert_eq!(b.accepted(), 2);
    let seen: HashSet<u64> = [restarted.state().borrow().revision()].into();
    assert_eq!(seen, [9].into());
    restarted.shutdown().await;
}

fn lb_service(
    name: &str,
    vip: &str,
    node_port: u16,
    lb_ip: &str,
    policy: &str,
    ep: SocketAddr,
    ep_node: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: {vip}\n  externalTrafficPolicy: {policy}\n\
         \x20 ports:\n  - {{name: echo, port: 9090, nodePort: {node_port}}}\n\
         status:\n  loadBalancer:\n    ingress: [{{ip: {lb_ip}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: echo, port: {}}}]\n\
         endpoints:\n- addresses: [\"{}\"]\n  nodeName: {ep_node}\n---\n",
        ep.port(),
        ep.ip()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_lb_ips_and_external_traffic_policy() {
    let backend = Echo::start().await;
    // Ports nothing listens on, so the NodePorts can be bound on 127.0.0.1.
    let (np_cluster, np_local) = (dead_port().await.port(), dead_port().await.port());
    let yaml = format!(
        "{}{}",
        lb_service(
            "lb",
            "127.77.0.16",
            np_cluster,
            "127.77.0.17",
            "Cluster",
            backend.addr,
            "other-node"
        ),
        lb_service(
            "lb-local",
            "127.77.0.18",
            np_local,
            "127.77.0.19",
            "Local",
            backend.addr,
            "other-node"
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = static_config(dir.path(), &yaml);
    let agent = strait_node::build(cfg).await.expect("build");
    let addr = |s: String| s.parse::<SocketAddr>().expect("addr");

    // Cluster policy: ClusterIP, NodePort and LB IP all lead to the backend.
    for a in [
        addr("127.77.0.16:9090".into()),
        addr(format!("127.0.0.1:{np_cluster}")),
        addr("127.77.0.17:9090".into()),
    ] {
        wait_bound(|| agent.listeners(), a).await;
        connect_echo(a).await;
    }
    // Local policy with the only endpoint on another node: still reached
    // from the node itself (every client here is on loopback), which gets
    // Cluster semantics as under kube-proxy; outside clients are refused
    // (tests/dataplane's `external_local_refuses_outside_clients`, which
    // needs a network namespace).
    for a in [
        addr("127.77.0.18:9090".into()),
        addr(format!("127.0.0.1:{np_local}")),
        addr("127.77.0.19:9090".into()),
    ] {
        wait_bound(|| agent.listeners(), a).await;
        connect_echo(a).await;
    }
    agent.shutdown().await;
}

/// `--nodeport-addresses`: a NodePort, and the health check of an
/// `externalTrafficPolicy: Local` Service, listen on `--node-ip` and on
/// every interface address inside the ranges (here 127.0.0.1, the address
/// of `lo`, for 127.0.0.0/8; the node IP is another loopback address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_listen_on_every_address_in_nodeport_addresses() {
    let backend = Echo::start().await;
    let node_port = dead_port().await.port();
    let health_port = dead_port().await.port();
    let yaml = lb_service(
        "np",
        "127.77.0.20",
        node_port,
        "127.77.0.21",
        "Local",
        backend.addr,
        "test-node",
    )
    .replace(
        "externalTrafficPolicy: Local",
        &format!("externalTrafficPolicy: Local\n  healthCheckNodePort: {health_port}"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        node_ip: "127.77.2.1".parse().expect("ip"),
        nodeport_addresses: vec!["127.0.0.0/8".parse().expect("cidr")],
        ..static_config(dir.path(), &yaml)
    };
    let agent = strait_node::build(cfg).await.expect("build");
    for ip in ["127.77.2.1", "127.0.0.1"] {
        let a: SocketAddr = format!("{ip}:{node_port}").parse().expect("addr");
        wait_bound(|| agent.listeners(), a).await;
        connect_echo(a).await;
        let hc: SocketAddr = format!("{ip}:{health_port}").parse().expect("addr");
        eventually("the health check to answer 200", || async move {
            http_get(hc)
                .await
                .is_some_and(|answer| answer.starts_with("HTTP/1.1 200"))
        })
        .await;
    }
    agent.shutdown().await;
}

/// One HTTP/1.1 GET of `/` to `addr`: the whole answer, or None when the
/// connection fails.
async fn http_get(addr: SocketAddr) -> Option<String> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.ok()?;
    Some(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_connections_finish_then_cuts_the_rest() {
    let backend = Echo::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        drain_timeout: Duration::from_secs(2),
        proxy_workers: NonZeroUsize::new(2).expect("2"),
        ..static_config(
            dir.path(),
            &manifest("cut", "127.77.0.20", 9090, &[backend.addr]),
        )
    };
    let vip: SocketAddr = "127.77.0.20:9090".parse().expect("vip");
    let agent = strait_node::build(cfg).await.expect("build");
    wait_bound(|| agent.listeners(), vip).await;
    let mut open = connect_echo(vip).await;
    roundtrip(&mut open, b"before shutdown\n").await;

    // The open connection keeps working through the grace period, is cut
    // at its end (the client reads end-of-stream), and shutdown returns.
    let shutdown = tokio::spawn(agent.shutdown());
    roundtrip(&mut open, b"during the grace period\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), open.read(&mut buf))
        .await
        .expect("cut within the deadline")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection cut at the end of the grace period");
    tokio::time::timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("shutdown returns")
        .expect("shutdown task");
}
