//! Replacing a control member under load: a fresh replica joins as a
//! learner, is caught up by snapshot install and promoted; an old one is
//! removed. Nothing acknowledged is lost on the way. The membership changes
//! go to a follower, which passes them to the leader.

use std::collections::BTreeSet;

use crate::harness::*;
use crate::load::{Load, more_writes};
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replace_a_member_under_load() {
    let mut c = Cluster::start(3, 3, &["--snapshot-every", "20"]).await;
    let load = Load::start(&c, "m");
    more_writes(&load, &c, 60).await;
    let who = c.who();
    c.add_replica(4, None, who).await;
    let proxy4 = c.replicas[&4].proxy.to_string();
    let leader = c.wait_leader().await;
    let follower = [2u64, 3]
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let via = c.replicas[&follower].real.to_string();
    let out = std::process::Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .args(["cluster", "add-member", "--id", "4", "--address", &proxy4])
        .env("STRAIT_SERVER", &via)
        .output()
        .expect("add-member");
    assert!(
        out.status.success(),
        "add-member: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    more_writes(&load, &c, 10).await;
    eventually("replica 4 to install a snapshot", || async {
        c.replicas[&4]
            .log_contains("snapshot installed")
            .then_some(())
    })
    .await;

    let out = std::process::Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .args(["cluster", "remove-member", "--id", "1"])
        .env("STRAIT_SERVER", &via)
        .output()
        .expect("remove-member");
    assert!(
        out.status.success(),
        "remove-member: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    more_writes(&load, &c, 10).await;
    let done = load.finish().await;
    c.kill(1);
    let objects = c.converged().await;
    let checked = done.check(&objects);
    let status = status_of(&c.replicas[&2].real.to_string())
        .await
        .expect("status");
    let voters: BTreeSet<u64> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, BTreeSet::from([2, 3, 4]));
    report::row(
        "replace a member",
        "replica 4 added (caught up by snapshot), replica 1 removed, under writes, both sent to a follower",
        &format!("{checked}; voters {{2, 3, 4}}"),
    );
}
