//! Graceful stops (SIGTERM, as `docker stop` and `systemctl stop` send it)
//! of the leader and then of a follower, under a write load, client traffic
//! through a node agent and an open watch: each process ends on its own,
//! leadership moves, no Node ever turns NotReady (the stopping leader ends
//! its liveness duty before it stops taking heartbeats), the watch is ended
//! by the server and resumes on another replica without a gap, and writes
//! keep succeeding. A single replica (as `strait dev` runs) stops the same
//! way.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{WatchRequest, WatchResponse, object};
use tokio::sync::watch;

use crate::dataplane::{DataPlane, Net, Traffic, cluster_for, nodes_converged, nodes_reached};
use crate::harness::{Cluster, DEADLINE, channel, eventually};
use crate::load::{Load, more_writes};
use crate::report;

/// How long a stopping replica may take before the test calls it hung:
/// generous (the shutdown's own steps are bounded at a few seconds each).
const EXIT_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_stop_of_the_leader_then_a_follower() {
    let net = Net::new(37);
    // A short node grace: a stopping leader that kept judging nodes after
    // it stopped taking heartbeats would mark node-1 NotReady within it.
    let mut c = cluster_for(10, &net, &["--node-grace", "2s"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = DataPlane::start(&c, &net, dir.path());
    let traffic = Traffic::start(&dp.addr);
    let load = Load::start(&c, "gs");
    more_writes(&load, &c, 10).await;
    let from = nodes_reached(&c).await;

    // The leader, with a watch open on it.
    let leader = c.wait_leader().await;
    let others: Vec<String> = c
        .replicas
        .values()
        .filter(|r| r.id != leader)
        .map(|r| r.real.to_string())
        .collect();
    let (until_tx, until) = watch::channel(u64::MAX);
    let watcher = tokio::spawn(follow_and_resume(
        c.replicas[&leader].real.to_string(),
        others,
        until,
    ));
    more_writes(&load, &c, 5).await;

    let (status, leader_took) = c
        .replicas
        .get_mut(&leader)
        .expect("leader")
        .stop_gracefully(EXIT_WITHIN)
        .await;
    assert!(status.success(), "leader {leader} exited with {status}");
    let handed_off = c.replicas[&leader].log_contains("leadership handed off");
    let next = c.wait_leader().await;
    assert_ne!(next, leader, "a stopped replica cannot lead");
    more_writes(&load, &c, 10).await;
    // Traffic for longer than the node grace with the old leader gone.
    traffic.more(300).await;

    c.replicas.get_mut(&leader).expect("leader").start();
    c.wait_leader().await;
    more_writes(&load, &c, 5).await;
    c.caught_up().await;

    // A follower stops the same way: one not stopped before, if it can be.
    let leader_now = c.wait_leader().await;
    let follower = *c
        .replicas
        .keys()
        .filter(|id| **id != leader_now)
        .max_by_key(|id| **id != leader)
        .expect("a follower");
    let (status, follower_took) = c
        .replicas
        .get_mut(&follower)
        .expect("follower")
        .stop_gracefully(EXIT_WITHIN)
        .await;
    assert!(status.success(), "follower {follower} exited with {status}");
    more_writes(&load, &c, 5).await;
    c.replicas.get_mut(&follower).expect("follower").start();
    c.wait_leader().await;
    more_writes(&load, &c, 5).await;

    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    let revision = nodes_converged(&c).await;
    let ok = traffic.finish_without_failures();

    // The watcher: ended by the stopping leader, resumed without a gap.
    until_tx.send_replace(revision);
    let Followed { ended, seen, names } = tokio::time::timeout(DEADLINE, watcher)
        .await
        .expect("watcher to reach the final revision")
        .expect("watcher task");
    assert_eq!(
        ended.code(),
        tonic::Code::Unavailable,
        "invariant watch-ended-by-server: {ended:?}"
    );
    assert!(
        ended.message().contains("shutting down"),
        "invariant watch-ended-by-server: {ended:?}"
    );
    let missed: Vec<&String> = done.acked.keys().filter(|n| !names.contains(*n)).collect();
    assert!(
        missed.is_empty(),
        "invariant watch-no-gap: acknowledged objects the watcher never got: {missed:?}"
    );

    // Read from a replica that was never stopped: its history reaches back.
    let untouched = *c
        .replicas
        .keys()
        .find(|id| **id != leader && **id != follower)
        .expect("a replica never stopped");
    let not_ready = node_not_ready_since(&c, untouched, from, revision).await;
    assert!(
        not_ready.is_empty(),
        "invariant no-node-not-ready: {not_ready:?}"
    );

    report::row(
        "graceful leader stop",
        &format!(
            "SIGTERM to leader {leader}: exited 0 after {} ms (leadership handed off: {}), new leader {next}; then follower {follower}: exited 0 after {} ms; {ok} client connections, 0 failed",
            leader_took.as_millis(),
            if handed_off { "yes" } else { "no, election" },
            follower_took.as_millis()
        ),
        &format!(
            "{checked}; watch ended by the server (Unavailable), resumed elsewhere: {} revisions, none skipped or repeated; no Node NotReady; node at the leader's revision {revision}",
            seen.len()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_of_a_single_replica() {
    let mut c = Cluster::start(11, 1, &[]).await;
    let addr = c.replicas[&1].real.to_string();
    let ch = channel(&addr).await.expect("channel");
    let mut w = ResourcesClient::new(ch)
        .watch(WatchRequest {
            kinds: vec![],
            revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let initial = w.next().await.expect("initial").expect("ok");
    assert!(initial.initial);
    let (status, _) = c
        .replicas
        .get_mut(&1)
        .expect("replica")
        .stop_gracefully(EXIT_WITHIN)
        .await;
    assert!(status.success(), "exited with {status}");
    let ended = loop {
        match w.next().await {
            Some(Ok(_)) => continue,
            Some(Err(s)) => break s,
            None => panic!("watch closed without a status"),
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
}

/// What a watcher that moved between replicas saw.
struct Followed {
    /// How its first stream ended.
    ended: tonic::Status,
    /// Every revision with events, in order.
    seen: Vec<u64>,
    /// Every Service name in the initial state or in an event.
    names: BTreeSet<String>,
}

/// Watches Services on `first` from the full state; when that stream ends,
/// resumes from the last revision on the first of `others` that accepts,
/// until a revision at or past `until`. Asserts every revision with events
/// comes after the one before.
async fn follow_and_resume(
    first: String,
    others: Vec<String>,
    mut until: watch::Receiver<u64>,
) -> Followed {
    let mut out = Followed {
        ended: tonic::Status::ok(""),
        seen: Vec::new(),
        names: BTreeSet::new(),
    };
    let mut last = 0u64;
    let mut ended = None;
    let mut addrs = std::iter::once(first).chain(others.into_iter().cycle());
    loop {
        let addr = addrs.next().expect("an address");
        let req = WatchRequest {
            kinds: vec!["Service".into()],
            revision: last,
        };
        let stream = match channel(&addr).await {
            Some(ch) => ResourcesClient::new(ch).watch(req).await.ok(),
            None => None,
        };
        let Some(mut stream) = stream.map(|r| r.into_inner()) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            if last >= *until.borrow() {
                out.ended = ended.expect("the first stream ended");
                return out;
            }
            let next = tokio::select! {
                n = stream.next() => n,
                changed = until.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return out,
                },
            };
            match next {
                Some(Ok(r)) => record(&r, &mut last, &mut out),
                Some(Err(s)) => {
                    ended.get_or_insert(s);
                    break;
                }
                None => {
                    ended.get_or_insert(tonic::Status::unknown("stream closed without a status"));
                    break;
                }
            }
        }
    }
}

fn record(r: &WatchResponse, last: &mut u64, out: &mut Followed) {
    out.names.extend(
        r.events
            .iter()
            .filter_map(|e| e.object.as_ref())
            .map(|o| o.name().to_string()),
    );
    if r.initial {
        *last = r.revision;
        return;
    }
    if !r.events.is_empty() {
        assert!(
            r.revision > *last,
            "invariant watch-in-order: revision {} after {last}",
            r.revision
        );
        out.seen.push(r.revision);
    }
    *last = (*last).max(r.revision);
}

/// Every Node change from revision `from` to `to` (read from a running
/// replica's watch history) that set Ready=False: (revision, node).
async fn node_not_ready_since(c: &Cluster, id: u64, from: u64, to: u64) -> Vec<(u64, String)> {
    let addr = c.replicas[&id].real.to_string();
    let mut stream = eventually("a Node watch from the history", || async {
        let ch = channel(&addr).await?;
        ResourcesClient::new(ch)
            .watch(WatchRequest {
                kinds: vec!["Node".into()],
                revision: from,
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    })
    .await;
    let mut out = Vec::new();
    loop {
        let r = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("Node watch answers")
            .expect("Node watch open")
            .expect("Node watch ok");
        for e in &r.events {
            if let Some(object::Kind::Node(n)) = e.object.as_ref().and_then(|o| o.kind.as_ref())
                && n.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.r#type == "Ready" && c.status == "False")
                })
            {
                let name = n
                    .metadata
                    .as_ref()
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                out.push((r.revision, name));
            }
        }
        if r.revision >= to {
            return out;
        }
    }
}
