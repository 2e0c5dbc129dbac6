//! The leader gone silent for a node agent and a `strait get -w` — its
//! packets dropped, as when its machine loses power: no call fails and no
//! connection resets, so only their own bounds (HTTP/2 keepalive, a quiet
//! watch) can notice. Both move to the next replica and follow the changes
//! made meanwhile; static Pods still register; and the node, whose
//! heartbeats now reach only the followers, stays Ready.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::dataplane::{Backend, Net, Node, cli, cluster_for, pod, service, who};
use crate::harness::CliWatch;
use crate::proxy::{Cut, Faults};
use crate::report;

/// The agent's caller id at its private proxy.
const AGENT: u64 = 0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_agent_moves_off_a_replica_gone_silent() {
    let net = Net::new(45);
    let c = cluster_for(17, &net, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The leader through a proxy of the agent's own, listed first: the agent
    // watches there until something makes it move.
    let leader = c.wait_leader().await;
    let followers: Vec<SocketAddr> = [1, 2, 3]
        .into_iter()
        .filter(|i| *i != leader)
        .map(|i| c.replicas[&i].real)
        .collect();
    let link = Faults::new();
    let proxied: SocketAddr = "127.61.17.1:7001".parse().expect("address");
    link.spawn(
        leader,
        proxied,
        c.replicas[&leader].real,
        Arc::new(|_| Some(AGENT)),
    )
    .await;
    let servers = [proxied, followers[0], followers[1]];
    let control = servers.map(|a| a.to_string()).join(",");
    let pods_dir = dir.path().join("pods");
    std::fs::create_dir(&pods_dir).expect("pods dir");
    let _node = Node::start_with(
        "node-1",
        &net,
        &control,
        &dir.path().join("n1"),
        &["--pods-dir", pods_dir.to_str().expect("utf-8 path")],
    );
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
    // `strait get -w` through the same proxy, listed first as well.
    let mut watch = CliWatch::start(&servers).await;
    watch.added_until(&["web".to_string()]).await;

    link.cut_off(&[AGENT], &[AGENT, leader], Cut::Silent);
    let cut = Instant::now();
    cli(
        &c,
        &["apply", "-f", "-"],
        Some(&service("late", "ClusterIP", "app: web")),
    );
    let late = cluster_ip("late");
    // The CLI's watch moves first: its HTTP/2 keepalive PINGs go unanswered.
    watch.added_until(&["late".to_string()]).await;
    let cli_after = cut.elapsed();
    crate::dp::eventually("the Service created after the cut to forward", || {
        who(&late).ok()
    });
    let moved_after = cut.elapsed();
    // A static Pod whose file appears now is registered through another
    // replica too.
    let static_pod = Instant::now();
    std::fs::write(
        pods_dir.join("late.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late-static}\nspec:\n  containers: [{name: c}]\n",
    )
    .expect("write static pod");
    crate::dp::eventually("the static Pod written after the cut to register", || {
        cli(&c, &["get", "pods", "-o", "json"], None)
            .contains("late-static")
            .then_some(())
    });
    let registered_after = static_pod.elapsed();
    // Well past the 10 s node grace period since the cut (the steps above
    // take longer; this waits only if they did not), with no heartbeat of
    // the node's own reaching the leader: the followers relayed theirs, so
    // the node is still Ready.
    tokio::time::sleep_until((cut + std::time::Duration::from_secs(15)).into()).await;
    let nodes = cli(&c, &["get", "nodes"], None);
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("node-1") && l.contains(" Ready ")),
        "node-1 is not Ready:\n{nodes}"
    );
    assert_eq!(
        who(&web).ok().as_deref(),
        Some("g1"),
        "web stopped forwarding"
    );
    report::row(
        "replica gone silent",
        &format!(
            "the node agent's and `strait get -w`'s replica (the leader) cut off by dropped packets; `get -w` showed a Service created meanwhile after {} ms, and it forwarded after {} ms; a static Pod written then registered {} ms later",
            cli_after.as_millis(),
            moved_after.as_millis(),
            registered_after.as_millis()
        ),
        "the agent's and the CLI's connections (unanswered keepalive PINGs) moved to another replica; forwarding never stopped; the node stayed Ready on relayed heartbeats",
    );
}
