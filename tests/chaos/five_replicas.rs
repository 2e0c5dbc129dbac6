//! Five replicas under a write load: two killed at once (the most a
//! five-member quorum survives), a new leader among the other three, writes
//! go on; both restarted, the five converge with every acknowledged write.
//! `strait cluster status` through the binary shows the five members, one
//! leader, and the two that were killed as unreachable.

use crate::harness::*;
use crate::load::{Load, more_writes};
use crate::report;

/// `strait cluster status` rows as (id, role); panics on a failed command.
fn status_rows(servers: &str) -> (u64, Vec<(u64, String)>) {
    let out = std::process::Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .env("STRAIT_SERVER", servers)
        .args(["cluster", "status"])
        .output()
        .expect("run strait");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "cluster status: {out:?}");
    let mut lines = text.lines();
    let leader = lines
        .next()
        .and_then(|l| l.strip_prefix("leader: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no leader line in {text}"));
    let rows = lines
        .skip(1) // the column header
        .map(|l| {
            let mut cols = l.split_whitespace();
            let id = cols.next().and_then(|c| c.parse().ok()).expect("id");
            let role = cols.nth(1).expect("role").to_string();
            (id, role)
        })
        .collect();
    (leader, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_replicas_lose_two_and_keep_every_acknowledged_write() {
    let mut c = Cluster::start(14, 5, &[]).await;
    let load = Load::start(&c, "f");
    more_writes(&load, &c, 20).await;

    let leader = c.wait_leader().await;
    let servers = c.addrs().join(",");
    // Every member reports its own term once it heard from the leader.
    let (said, rows) = eventually("every member in `cluster status`", || async {
        let (said, rows) = status_rows(&servers);
        rows.iter()
            .all(|r| r.1 != "unreachable")
            .then_some((said, rows))
    })
    .await;
    assert_eq!(said, leader);
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let leaders: Vec<u64> = rows
        .iter()
        .filter(|r| r.1 == "leader")
        .map(|r| r.0)
        .collect();
    assert_eq!(leaders, [leader], "{rows:?}");
    assert!(
        rows.iter().all(|r| r.1 == "leader" || r.1 == "follower"),
        "{rows:?}"
    );

    // The leader and one follower at once.
    let follower = (1..=5).find(|i| *i != leader).expect("a follower");
    c.kill(leader);
    c.kill(follower);
    let new = eventually("a leader among the other three", || async {
        load.observe(&c).await;
        c.statuses()
            .await
            .iter()
            .find(|(id, v)| v.0 == "leader" && **id != leader && **id != follower)
            .map(|(id, _)| *id)
    })
    .await;
    more_writes(&load, &c, 20).await;
    let survivor = c.replicas[&new].real.to_string();
    let (_, rows) = status_rows(&survivor);
    let unreachable: Vec<u64> = rows
        .iter()
        .filter(|r| r.1 == "unreachable")
        .map(|r| r.0)
        .collect();
    let mut killed = vec![leader, follower];
    killed.sort_unstable();
    assert_eq!(unreachable, killed, "{rows:?}");

    c.restart(leader);
    c.restart(follower);
    c.caught_up().await;
    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    report::row(
        "five replicas, two killed",
        "leader and a follower SIGKILLed together under writes, then restarted",
        &format!("new leader {new}; {checked}"),
    );
}
