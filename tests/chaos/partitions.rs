//! Partitions through the fault-injecting proxies: the leader alone (the
//! majority elects another, the isolated one neither commits nor serves a
//! linearizable read), a minority follower, and one direction only.

use std::time::Duration;

use crate::harness::*;
use crate::load::{Load, more_writes};
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_keep_one_leader_per_term_and_heal() {
    let c = Cluster::start(2, 3, &[]).await;
    let ids = [1, 2, 3];
    let load = Load::start(&c, "p");
    more_writes(&load, &c, 10).await;

    // The leader alone on one side: the majority elects another and goes on.
    let old = c.wait_leader().await;
    c.faults.isolate(&[old], &ids);
    eventually("a leader on the majority side", || async {
        load.observe(&c).await;
        c.statuses()
            .await
            .iter()
            .find(|(id, v)| v.0 == "leader" && **id != old)
            .map(|_| ())
    })
    .await;
    more_writes(&load, &c, 10).await;
    // The isolated replica cannot commit: a write sent to it directly fails.
    let isolated = c.replicas[&old].real.to_string();
    let mut direct = Client::new(vec![isolated.clone()]).with_timeout(Duration::from_secs(3));
    assert_eq!(
        direct.apply(service("isolated-write", 1)).await,
        Outcome::Unknown
    );
    assert!(
        direct.read("reg").await.is_none(),
        "an isolated replica served a linearizable read"
    );
    c.faults.heal();
    c.caught_up().await;

    // A minority follower: the rest keep accepting writes.
    let leader = c.wait_leader().await;
    let follower = *ids.iter().find(|i| **i != leader).expect("follower");
    c.faults.isolate(&[follower], &ids);
    more_writes(&load, &c, 10).await;
    c.faults.heal();
    c.caught_up().await;

    // One direction only: the leader cannot reach one follower.
    let leader = c.wait_leader().await;
    let follower = *ids.iter().find(|i| **i != leader).expect("follower");
    c.faults.block_one_way(leader, follower);
    more_writes(&load, &c, 10).await;
    c.faults.heal();

    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    report::row(
        "partitions",
        "leader isolated, a follower isolated, leader → follower cut one way; each healed",
        &checked,
    );
}
