//! Partitions through the fault-injecting proxies: the leader alone (the
//! majority elects another, the isolated one neither commits nor serves a
//! linearizable read), a minority follower, and one direction only; cut
//! with resets and, for the leader, silently (packets dropped).

use std::time::Duration;

use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{ApplyRequest, GetRequest};

use crate::harness::*;
use crate::load::{Load, more_writes};
use crate::proxy::Cut;
use crate::report;

/// Cuts the leader off from the other `ids` and waits until they elect
/// another (observing `load`'s register meanwhile); returns the old leader.
async fn cut_off_the_leader(c: &Cluster, load: &Load, ids: &[u64], cut: Cut) -> u64 {
    let old = c.wait_leader().await;
    c.faults.cut_off(&[old], ids, cut);
    eventually("a leader on the majority side", || async {
        load.observe(c).await;
        c.statuses()
            .await
            .iter()
            .find(|(id, v)| v.0 == "leader" && **id != old)
            .map(|_| ())
    })
    .await;
    old
}

/// Runs the CLI's `apply` and `get` with replica `first` listed before
/// `then`: both must succeed, so the CLI moved past `first`.
async fn cli_moves_past(c: &Cluster, first: u64, then: u64, name: &str) {
    let servers = [c.replicas[&first].real, c.replicas[&then].real];
    let manifest = std::env::temp_dir().join(format!("strait-{name}-{}.yaml", std::process::id()));
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: None\n  ports: [{{port: 80}}]\n"
        ),
    )
    .expect("manifest");
    let out = cli_with_servers(
        &servers,
        &["apply", "-f", manifest.to_str().expect("utf-8")],
    )
    .await;
    let _ = std::fs::remove_file(&manifest);
    assert!(
        out.status.success(),
        "apply with replica {first} first: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli_with_servers(&servers, &["get", "svc", name]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(name),
        "get with replica {first} first: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_keep_one_leader_per_term_and_heal() {
    let c = Cluster::start(2, 3, &[]).await;
    let ids = [1, 2, 3];
    let load = Load::start(&c, "p");
    more_writes(&load, &c, 10).await;

    // The leader alone on one side: the majority elects another and goes on.
    let old = cut_off_the_leader(&c, &load, &ids, Cut::Reset).await;
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
    // Appended only on the isolated side, it is gone once that side took
    // the majority's log.
    let (_, objects) = list_local(&isolated).await.expect("list the old leader");
    assert!(
        objects.iter().all(|o| o.name() != "isolated-write"),
        "a write only the isolated minority took survived the heal"
    );

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

/// A leader behind a silent partition (nothing reset, nothing answered):
/// the majority elects another, which the cut-off leader cannot learn. Once
/// it has heard from no quorum for 3 s it refuses writes (not proposed) and
/// linearizable reads as Unavailable, instead of holding them until the
/// client gives up, so clients move on: the CLI given it first applies and
/// reads through the next replica. Healed, it rejoins, and every
/// acknowledged write is everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_behind_a_silent_partition_sends_clients_elsewhere() {
    let c = Cluster::start(16, 3, &[]).await;
    let ids = [1, 2, 3];
    let load = Load::start(&c, "q");
    more_writes(&load, &c, 10).await;
    let old = cut_off_the_leader(&c, &load, &ids, Cut::Silent).await;
    more_writes(&load, &c, 10).await;

    // Straight to the cut-off leader, with a client timeout far longer than
    // the server's own bounds, so every answer here is the server's.
    let isolated = c.replicas[&old].real.to_string();
    let patient = Duration::from_secs(60);
    let mut direct = ResourcesClient::new(channel(&isolated).await.expect("connect"));
    eventually(
        "the cut-off leader to refuse a read for want of a quorum",
        || {
            let mut direct = direct.clone();
            async move {
                let mut req = tonic::Request::new(GetRequest {
                    kind: "Service".into(),
                    namespace: "default".into(),
                    name: "reg".into(),
                    consistency: 0,
                });
                req.set_timeout(patient);
                match direct.get(req).await {
                    Err(s)
                        if s.code() == tonic::Code::Unavailable
                            && s.message().contains("not heard from a quorum") =>
                    {
                        Some(())
                    }
                    // Before the 3 s mark: its read index found no quorum in 5 s.
                    Err(s) if s.code() == tonic::Code::Unavailable => None,
                    other => panic!("a linearizable read on the cut-off leader: {other:?}"),
                }
            }
        },
    )
    .await;
    let mut req = tonic::Request::new(ApplyRequest {
        object: Some(service("isolated-write", 1)),
    });
    req.set_timeout(patient);
    let refused = direct
        .apply(req)
        .await
        .expect_err("a cut-off leader took a write");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("not proposed"), "{refused:?}");
    let other = *ids.iter().find(|i| **i != old).expect("other");
    cli_moves_past(&c, old, other, "past-silent-leader").await;

    c.faults.heal();
    c.caught_up().await;
    let (_, objects) = list_local(&isolated).await.expect("list the old leader");
    assert!(
        objects.iter().all(|o| o.name() != "isolated-write"),
        "a write the cut-off leader refused is stored"
    );
    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    report::row(
        "silent partition",
        "the leader cut off by dropped packets (no resets), then healed",
        &format!(
            "the cut-off leader refuses reads and writes as Unavailable after 3 s without a quorum; the CLI moves on; {checked}"
        ),
    );
}

/// A watcher on a replica cut off from the others is sent elsewhere: the
/// replica's state no longer moves, so after two progress ticks without a
/// leader it ends the watch with Unavailable and the client resumes on
/// another replica. The CLI, given that replica first, moves on too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_on_an_isolated_replica_is_sent_elsewhere() {
    use futures::StreamExt;

    let c = Cluster::start(13, 3, &[]).await;
    let ids = [1, 2, 3];
    let leader = c.wait_leader().await;
    let watched = *ids.iter().find(|i| **i != leader).expect("follower");
    let mut w = watch_services(&c.replicas[&watched].real.to_string(), 0).await;
    let first = w.next().await.expect("initial").expect("ok");
    assert!(first.initial);
    // The leader, idle but in touch with a quorum, keeps its watch: two
    // progress ticks go by (each would have ended it, had it been cut off).
    let mut on_leader = watch_services(&c.replicas[&leader].real.to_string(), 0).await;
    let leader_watch = tokio::spawn(async move {
        for _ in 0..3 {
            match on_leader.next().await {
                Some(Ok(_)) => {}
                other => return Err(format!("{other:?}")),
            }
        }
        Ok(())
    });

    c.faults.isolate(&[watched], &ids);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let status = loop {
        let next = tokio::time::timeout_at(deadline, w.next())
            .await
            .expect("the isolated replica to end the watch");
        match next {
            Some(Ok(bookmark)) => {
                assert!(bookmark.events.is_empty(), "changes from a cut-off replica");
            }
            Some(Err(status)) => break status,
            None => panic!("the watch ended without a status"),
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no leader") && status.message().contains("another replica"),
        "{status:?}"
    );
    // The CLI, given the isolated replica first, moves on to the next one
    // for a linearizable read and for a write.
    let other = *ids
        .iter()
        .find(|i| **i != watched && **i != leader)
        .expect("other");
    cli_moves_past(&c, watched, other, "moved").await;
    tokio::time::timeout(DEADLINE, leader_watch)
        .await
        .expect("the leader's bookmarks")
        .expect("task")
        .expect("the leader kept its watch");
    c.faults.heal();
    report::row(
        "watch on an isolated replica",
        "a follower cut off from the others while a client watches it",
        "the watch ends with Unavailable (resume elsewhere); the CLI's apply and get move to the next replica",
    );
}

/// A follower cut off while the others write on and compact their log
/// comes back behind the leader's purge point: it is caught up by snapshot
/// install, and ends with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_follower_is_caught_up_by_snapshot_install() {
    let c = Cluster::start(15, 3, &["--snapshot-every", "20"]).await;
    let ids = [1, 2, 3];
    let load = Load::start(&c, "s");
    more_writes(&load, &c, 10).await;
    let leader = c.wait_leader().await;
    let lagging = *ids.iter().find(|i| **i != leader).expect("follower");
    assert!(!c.replicas[&lagging].log_contains("snapshot installed"));
    c.faults.isolate(&[lagging], &ids);
    // Enough for the others to snapshot and purge past where it stopped
    // (20 entries are kept behind a snapshot).
    more_writes(&load, &c, 300).await;
    c.faults.heal();
    eventually("the lagging follower to install a snapshot", || async {
        c.replicas[&lagging]
            .log_contains("snapshot installed")
            .then_some(())
    })
    .await;
    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    report::row(
        "lagging follower",
        "a follower isolated while 300 writes and log compaction go on, then healed",
        &format!("caught up by snapshot install; {checked}"),
    );
}

/// Five replicas; the leader and one follower cut off together. The
/// follower still follows the old leader and forwards writes to it; the old
/// leader, hearing from two of five, refuses them as not proposed
/// (`UNAVAILABLE`: nothing was appended) instead of proposing entries that
/// can never commit and leaving the outcome unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_forwarded_to_a_cut_off_leader_is_refused() {
    let c = Cluster::start(18, 5, &[]).await;
    let ids = [1, 2, 3, 4, 5];
    let old = c.wait_leader().await;
    let follower = *ids.iter().find(|i| **i != old).expect("follower");
    c.faults.cut_off(&[old, follower], &ids, Cut::Reset);
    eventually("a leader among the other three", || async {
        c.statuses()
            .await
            .iter()
            .find(|(id, v)| v.0 == "leader" && **id != old && **id != follower)
            .map(|_| ())
    })
    .await;
    let addr = c.replicas[&follower].real.to_string();
    let direct = ResourcesClient::new(channel(&addr).await.expect("connect"));
    let mut attempt = 0;
    let refused = eventually("a forwarded write refused as not proposed", || {
        attempt += 1;
        let mut direct = direct.clone();
        let name = format!("forwarded-{attempt}");
        async move {
            let mut req = tonic::Request::new(ApplyRequest {
                object: Some(service(&name, 1)),
            });
            req.set_timeout(Duration::from_secs(60));
            match direct.apply(req).await {
                Err(s) if s.code() == tonic::Code::Unavailable => Some(s),
                // Proposed before the old leader's 3 s without a quorum ran
                // out, so never committed: an unknown outcome.
                Err(s) if s.code() == tonic::Code::DeadlineExceeded => None,
                other => panic!("a write through the cut-off side: {other:?}"),
            }
        }
    })
    .await;
    assert!(refused.message().contains("not proposed"), "{refused:?}");
    c.faults.heal();
    let objects = c.converged().await;
    assert!(
        objects.iter().all(|o| !o.name().starts_with("forwarded-")),
        "a write through the cut-off side survived the heal"
    );
    report::row(
        "forwarded to a cut-off leader",
        "five replicas; the leader and a follower cut off together; writes sent to that follower",
        "the old leader refuses them as not proposed (UNAVAILABLE); none survives the heal",
    );
}
