//! A watcher whose replica dies resumes on another from its last revision:
//! no gap, no duplicate, never back in time.

use std::collections::BTreeSet;

use crate::harness::*;
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_moves_to_another_replica_without_gap_or_duplicate() {
    use futures::StreamExt;

    let mut c = Cluster::start(5, 3, &[]).await;
    let leader = c.wait_leader().await;
    let watched = *[1, 2, 3].iter().find(|i| **i != leader).expect("follower");
    let other = *[1, 2, 3]
        .iter()
        .find(|i| **i != leader && **i != watched)
        .expect("other");
    let mut client = Client::new(vec![c.replicas[&leader].proxy.to_string()]);
    let mut acked = BTreeSet::new();
    let mut seen = Vec::new();

    let mut w = watch_services(&c.replicas[&watched].real.to_string(), 0).await;
    let first = w.next().await.expect("initial").expect("ok");
    assert!(first.initial);
    let mut last = first.revision;
    // `strait get -w` beside it, on the same replica first.
    let mut cli = CliWatch::start(&[c.replicas[&watched].real, c.replicas[&other].real]).await;
    write(&mut client, 0..10, &mut acked).await;
    follow(
        &mut w,
        *acked.iter().max().expect("acked"),
        &mut last,
        &mut seen,
    )
    .await;
    cli.added_until(&names(0..10)).await;
    // The watched replica dies; resume on another from the last revision.
    c.kill(watched);
    write(&mut client, 10..20, &mut acked).await;
    let mut w = watch_services(&c.replicas[&other].real.to_string(), last).await;
    follow(
        &mut w,
        *acked.iter().max().expect("acked"),
        &mut last,
        &mut seen,
    )
    .await;
    // The CLI moved to the other replica by itself.
    cli.added_until(&names(10..20)).await;
    let added = cli.added.len();
    let seen_set: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(seen_set.len(), seen.len(), "duplicate revisions: {seen:?}");
    assert_eq!(
        seen_set, acked,
        "watch revisions differ from acknowledged writes"
    );
    report::row(
        "watch failover",
        &format!(
            "watched replica killed after {} revisions, resumed on another",
            seen.len() / 2
        ),
        &format!(
            "{} revisions, none skipped, repeated or out of order; `strait get -w` showed each of the {added} Services once",
            seen.len()
        ),
    );
}

fn names(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|i| format!("w-{i}")).collect()
}

/// Applies Services `w-I` for I in `range`, recording acknowledged revisions.
async fn write(client: &mut Client, range: std::ops::Range<u64>, acked: &mut BTreeSet<u64>) {
    for i in range {
        if let Outcome::Ok(r) = client.apply(service(&format!("w-{i}"), i)).await {
            acked.insert(r);
        }
    }
}

/// Reads `w` until revision `until`, recording each revision with events in
/// `seen`; a revision not after the previous one fails the test.
async fn follow(
    w: &mut tonic::Streaming<strait_proto::v1::WatchResponse>,
    until: u64,
    last: &mut u64,
    seen: &mut Vec<u64>,
) {
    use futures::StreamExt;
    while *last < until {
        let r = tokio::time::timeout(DEADLINE, w.next())
            .await
            .expect("event")
            .expect("open")
            .expect("ok");
        if !r.events.is_empty() {
            assert!(
                r.revision > *last,
                "watch went back: {} after {last}",
                r.revision
            );
            seen.push(r.revision);
            *last = r.revision;
        }
    }
}
