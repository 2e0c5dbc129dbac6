//! Workloads dying under client traffic: a backend killed (passive health
//! moves new connections at once), then a whole node agent killed (its
//! Pods unready after the node grace, traffic kept on the live node).

use std::time::Instant;

use crate::dataplane::{Backend, Net, Node, Traffic, cli, cluster_for, pod, service, who};
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_a_backend_then_a_node_agent() {
    let net = Net::new(36);
    let c = cluster_for(9, &net, &["--node-grace", "2s"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let control = c.addrs().join(",");
    let _n1 = Node::start("node-1", &net, &control, &dir.path().join("n1"));
    let net2 = Net {
        node_ip: "127.122.36.2".into(),
        ..net.clone()
    };
    let mut n2 = Node::start("node-2", &net2, &control, &dir.path().join("n2"));
    let (g1, mut g3) = (Backend::greeter("g1"), Backend::greeter("g3"));
    let g2 = Backend::greeter("g2");
    let yaml = format!(
        "{}{}{}{}",
        service("web", "NodePort", "app: web"),
        pod(&g1, "app: web"),
        pod(&g3, "app: web"),
        pod(&g2, "app: web").replace("nodeName: node-1", "nodeName: node-2"),
    );
    cli(&c, &["apply", "-f", "-"], Some(&yaml));
    let svc: serde_json::Value =
        serde_json::from_str(&cli(&c, &["get", "svc", "web", "-o", "json"], None)).expect("json");
    let node_port = svc["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    // Through node-1's own NodePort: only node-1's agent serves it.
    let addr = format!("{}:{node_port}", net.node_ip);
    let mut seen = std::collections::BTreeSet::new();
    crate::dp::eventually("every backend reached", || {
        seen.extend(who(&addr).ok());
        (seen.len() == 3).then_some(())
    });
    let traffic = Traffic::start(&addr);
    traffic.more(10).await;

    // A backend dies: refused connects move on to another endpoint.
    g3.kill();
    traffic.more(50).await;
    assert_eq!(
        traffic.failed(),
        0,
        "invariant zero-failed-connections: backend killed"
    );

    // node-2's agent dies: after the grace its Pod is unready everywhere
    // and node-1 sends everything to g1.
    let t = Instant::now();
    n2.kill();
    crate::dp::eventually("g2 to leave the rotation", || {
        let sample: Vec<String> = (0..20).filter_map(|_| who(&addr).ok()).collect();
        (sample.len() == 20 && sample.iter().all(|s| s == "g1")).then_some(())
    });
    let unready = t.elapsed();
    traffic.more(20).await;
    let ok = traffic.finish_without_failures();
    report::row(
        "kill a backend, then a node agent",
        &format!(
            "node agent killed → its endpoint out of rotation after {} ms (node grace 2 s); {ok} client connections, 0 failed",
            unready.as_millis()
        ),
        "no failed connection across both kills",
    );
}
