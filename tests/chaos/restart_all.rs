//! Every control replica killed at once and started again: the state is
//! identical after, the node agent forwards throughout and converges to
//! the leader's revision.

use std::time::Instant;

use crate::dataplane::{DataPlane, Net, Traffic, cluster_for, nodes_converged};
use crate::harness::*;
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_every_replica_at_once() {
    let net = Net::new(34);
    let mut c = cluster_for(4, &net, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = DataPlane::start(&c, &net, dir.path());
    let traffic = Traffic::start(&dp.addr);
    let mut client = Client::new(c.addrs());
    for i in 0..30 {
        client.apply_until_ok(&service(&format!("r-{i}"), i)).await;
    }
    let before = c.converged().await;
    let t = Instant::now();
    for id in [1, 2, 3] {
        c.kill(id);
    }
    for id in [1, 2, 3] {
        c.restart(id);
    }
    c.wait_leader().await;
    let back = t.elapsed();
    let after = c.converged().await;
    // The node agent registers its Node again whenever it reconnects (a new
    // write with fresh timestamps, made after the restart, racing this
    // read): Nodes are compared by presence, everything else exactly.
    let (before_nodes, before) = split_nodes(before);
    let (after_nodes, after) = split_nodes(after);
    assert_eq!(
        before, after,
        "invariant state-identical: the restart changed the state"
    );
    assert_eq!(
        before_nodes, after_nodes,
        "invariant state-identical: the restart lost a Node"
    );
    let revision = nodes_converged(&c).await;
    traffic.more(20).await;
    let ok = traffic.finish_without_failures();
    report::row(
        "restart every replica",
        &format!(
            "3 replicas killed and restarted: leader again after {} ms; {ok} client connections, 0 failed",
            back.as_millis()
        ),
        &format!(
            "{} objects identical before and after; node at the leader's revision {revision}",
            after.len()
        ),
    );
}

/// The names of the Nodes in `objects`, and every other object.
fn split_nodes(
    objects: Vec<strait_proto::v1::Object>,
) -> (Vec<String>, Vec<strait_proto::v1::Object>) {
    let (nodes, rest): (Vec<_>, Vec<_>) = objects
        .into_iter()
        .partition(|o| matches!(o.kind, Some(strait_proto::v1::object::Kind::Node(_))));
    (nodes.iter().map(|o| o.name().to_string()).collect(), rest)
}
