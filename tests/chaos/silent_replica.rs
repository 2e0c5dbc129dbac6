//! A control replica gone silent for a node agent — its packets dropped, as
//! when its machine loses power: no call fails and no connection resets,
//! so nothing but the agent's own bound on a quiet watch can notice. The
//! agent moves to the next replica and follows the changes made meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::dataplane::{Backend, Net, Node, cli, cluster_for, pod, service, who};
use crate::proxy::{Cut, Faults};
use crate::report;

/// The agent's caller id at its private proxy.
const AGENT: u64 = 0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_agent_moves_off_a_replica_gone_silent() {
    let net = Net::new(45);
    let c = cluster_for(17, &net, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Replica 1 through a proxy of the agent's own, listed first: the agent
    // watches there until something makes it move.
    let link = Faults::new();
    let proxied: SocketAddr = "127.61.17.1:7001".parse().expect("address");
    link.spawn(1, proxied, c.replicas[&1].real, Arc::new(|_| Some(AGENT)))
        .await;
    let control = [proxied, c.replicas[&2].real, c.replicas[&3].real]
        .map(|a| a.to_string())
        .join(",");
    let _node = Node::start("node-1", &net, &control, &dir.path().join("n1"));
    let g1 = Backend::greeter("g1");
    let yaml = format!(
        "{}{}",
        service("web", "ClusterIP", "app: web"),
        pod(&g1, "app: web")
    );
    cli(&c, &["apply", "-f", "-"], Some(&yaml));
    let cluster_ip = |name: &str| {
        let svc: serde_json::Value =
            serde_json::from_str(&cli(&c, &["get", "svc", name, "-o", "json"], None))
                .expect("service json");
        format!(
            "{}:8080",
            svc["spec"]["clusterIP"].as_str().expect("clusterIP")
        )
    };
    let web = cluster_ip("web");
    crate::dp::eventually("web to forward", || who(&web).ok());

    link.cut_off(&[AGENT], &[AGENT, 1], Cut::Silent);
    let cut = Instant::now();
    cli(
        &c,
        &["apply", "-f", "-"],
        Some(&service("late", "ClusterIP", "app: web")),
    );
    let late = cluster_ip("late");
    crate::dp::eventually("the Service created after the cut to forward", || {
        who(&late).ok()
    });
    let moved_after = cut.elapsed();
    assert_eq!(
        who(&web).ok().as_deref(),
        Some("g1"),
        "web stopped forwarding"
    );
    report::row(
        "replica gone silent",
        &format!(
            "the node agent's replica cut off by dropped packets; a Service created meanwhile forwarded after {} ms",
            moved_after.as_millis()
        ),
        "the agent's quiet watch (nothing for 20 s, progress is every 5 s) moved to another replica; forwarding never stopped",
    );
}
