//! The replicated control plane under failure, through real processes:
//! leader kills under load, partitions (minority, leader, one direction),
//! membership changes with snapshot install, whole-cluster restart, and a
//! watch moving between replicas. Invariants: no acknowledged write lost,
//! linearizable register history, at most one leader per term, convergence.

mod harness;
mod linearizable;
mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use linearizable::Op;

/// Background load: unique creates plus a register written and read by two
/// clients; records what was acknowledged and the register history.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    history: Arc<Mutex<Vec<Op>>>,
    terms: Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn micros(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

impl Load {
    fn start(cluster: &Cluster, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let history = Arc::new(Mutex::new(Vec::new()));
        let terms = Arc::new(Mutex::new(BTreeMap::new()));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        {
            let (stop, acked, addrs, prefix) = (
                stop.clone(),
                acked.clone(),
                cluster.addrs(),
                prefix.to_string(),
            );
            tasks.push(tokio::spawn(async move {
                let mut c = Client::new(addrs);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 100_000 {
                    i += 1;
                    let name = format!("{prefix}-{i}");
                    if let Outcome::Ok(rev) = c.apply(service(&name, i)).await {
                        acked.lock().expect("lock").insert(name, rev);
                    }
                }
            }));
        }
        for k in 0..2u64 {
            let (stop, history, addrs) = (stop.clone(), history.clone(), cluster.addrs());
            tasks.push(tokio::spawn(async move {
                let mut c = Client::new(addrs).with_timeout(Duration::from_secs(3));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    n += 1;
                    let start = micros(t0);
                    if n.is_multiple_of(2) {
                        let value = k * 1_000_000 + n;
                        let out = c.apply(service("reg", value)).await;
                        let end = match out {
                            Outcome::Ok(_) => micros(t0),
                            Outcome::Unknown => u64::MAX,
                        };
                        history.lock().expect("lock").push(Op {
                            start,
                            end,
                            write: true,
                            value,
                        });
                    } else if let Some(value) = c.read("reg").await {
                        history.lock().expect("lock").push(Op {
                            start,
                            end: micros(t0),
                            write: false,
                            value,
                        });
                    }
                }
            }));
        }
        Load {
            stop,
            acked,
            history,
            terms,
            tasks,
        }
    }

    /// Records every replica's (term, leader) view while the test runs.
    async fn observe(&self, cluster: &Cluster) {
        for (id, (role, term, _)) in cluster.statuses().await {
            if role == "leader" {
                self.terms
                    .lock()
                    .expect("lock")
                    .entry(term)
                    .or_default()
                    .insert(id);
            }
        }
    }

    async fn finish(mut self) -> (BTreeMap<String, u64>, Vec<Op>, BTreeMap<u64, BTreeSet<u64>>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let acked = self.acked.lock().expect("lock").clone();
        let history = self.history.lock().expect("lock").clone();
        let terms = self.terms.lock().expect("lock").clone();
        (acked, history, terms)
    }
}

/// Waits until `n` more writes are acknowledged.
async fn more_writes(load: &Load, cluster: &Cluster, n: usize) {
    let base = load.acked.lock().expect("lock").len();
    eventually("writes to be acknowledged", || async {
        load.observe(cluster).await;
        (load.acked.lock().expect("lock").len() >= base + n).then_some(())
    })
    .await;
}

fn assert_invariants(
    objects: &[strait_proto::v1::Object],
    acked: &BTreeMap<String, u64>,
    history: &[Op],
    terms: &BTreeMap<u64, BTreeSet<u64>>,
) {
    let present = names(objects);
    let lost: Vec<&String> = acked.keys().filter(|n| !present.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    if let Some(v) = linearizable::check(history) {
        panic!("register history is not linearizable: {v}");
    }
    for (term, leaders) in terms {
        assert!(leaders.len() <= 1, "term {term} had leaders {leaders:?}");
    }
    println!(
        "checked: {} acknowledged writes, {} register ops, {} terms",
        acked.len(),
        history.len(),
        terms.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_the_leader_under_load_loses_nothing() {
    let mut c = Cluster::start(1, 3, &[]).await;
    let load = Load::start(&c, "k");
    more_writes(&load, &c, 20).await;
    let mut failovers = Vec::new();
    for _ in 0..3 {
        let leader = c.wait_leader().await;
        let t = Instant::now();
        c.kill(leader);
        let new = eventually("a new leader", || async {
            load.observe(&c).await;
            let s = c.statuses().await;
            s.iter()
                .find(|(id, v)| v.0 == "leader" && **id != leader)
                .map(|(id, _)| *id)
        })
        .await;
        more_writes(&load, &c, 5).await;
        failovers.push(t.elapsed());
        assert_ne!(new, leader);
        c.restart(leader);
        c.converged().await;
    }
    let (acked, history, terms) = load.finish().await;
    let objects = c.converged().await;
    assert_invariants(&objects, &acked, &history, &terms);
    println!("failover (kill -9 → new leader and 5 acknowledged writes): {failovers:?}");
}

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
    c.converged().await;

    // A minority follower: the rest keep accepting writes.
    let leader = c.wait_leader().await;
    let follower = *ids.iter().find(|i| **i != leader).expect("follower");
    c.faults.isolate(&[follower], &ids);
    more_writes(&load, &c, 10).await;
    c.faults.heal();
    c.converged().await;

    // One direction only: the leader cannot reach one follower.
    let leader = c.wait_leader().await;
    let follower = *ids.iter().find(|i| **i != leader).expect("follower");
    c.faults.block_one_way(leader, follower);
    more_writes(&load, &c, 10).await;
    c.faults.heal();

    let (acked, history, terms) = load.finish().await;
    let objects = c.converged().await;
    assert_invariants(&objects, &acked, &history, &terms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_join_by_snapshot_and_leave_under_load() {
    let mut c = Cluster::start(3, 3, &["--snapshot-every", "20"]).await;
    let load = Load::start(&c, "m");
    more_writes(&load, &c, 60).await;
    let who = c.who();
    c.add_replica(4, None, who).await;
    let proxy4 = c.replicas[&4].proxy.to_string();
    let out = std::process::Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .args(["cluster", "add-member", "--id", "4", "--address", &proxy4])
        .env("STRAIT_SERVER", c.addrs().join(","))
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
        .env("STRAIT_SERVER", c.addrs().join(","))
        .output()
        .expect("remove-member");
    assert!(
        out.status.success(),
        "remove-member: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    more_writes(&load, &c, 10).await;
    let (acked, history, terms) = load.finish().await;
    c.kill(1);
    let objects = c.converged().await;
    assert_invariants(&objects, &acked, &history, &terms);
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_state() {
    let mut c = Cluster::start(4, 3, &[]).await;
    let mut client = Client::new(c.addrs());
    for i in 0..30 {
        assert!(matches!(
            client.apply(service(&format!("r-{i}"), i)).await,
            Outcome::Ok(_)
        ));
    }
    let before = c.converged().await;
    for id in [1, 2, 3] {
        c.kill(id);
    }
    for id in [1, 2, 3] {
        c.restart(id);
    }
    c.wait_leader().await;
    let after = c.converged().await;
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_moves_to_another_replica_without_gap_or_duplicate() {
    use futures::StreamExt;
    use strait_proto::v1::WatchRequest;
    use strait_proto::v1::resources_client::ResourcesClient;

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

    let ch = channel(&c.replicas[&watched].real.to_string())
        .await
        .expect("channel");
    let mut w = ResourcesClient::new(ch)
        .watch(WatchRequest {
            kinds: vec!["Service".into()],
            revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = w.next().await.expect("initial").expect("ok");
    assert!(first.initial);
    let mut last = first.revision;
    for i in 0..10 {
        if let Outcome::Ok(r) = client.apply(service(&format!("w-{i}"), i)).await {
            acked.insert(r);
        }
    }
    while last < *acked.iter().max().expect("acked") {
        let r = tokio::time::timeout(DEADLINE, w.next())
            .await
            .expect("event")
            .expect("open")
            .expect("ok");
        if !r.events.is_empty() {
            seen.push(r.revision);
            last = r.revision;
        }
    }
    // The watched replica dies; resume on another from the last revision.
    c.kill(watched);
    for i in 10..20 {
        if let Outcome::Ok(r) = client.apply(service(&format!("w-{i}"), i)).await {
            acked.insert(r);
        }
    }
    let ch = channel(&c.replicas[&other].real.to_string())
        .await
        .expect("channel");
    let mut w = ResourcesClient::new(ch)
        .watch(WatchRequest {
            kinds: vec!["Service".into()],
            revision: last,
        })
        .await
        .expect("resume")
        .into_inner();
    while last < *acked.iter().max().expect("acked") {
        let r = tokio::time::timeout(DEADLINE, w.next())
            .await
            .expect("event")
            .expect("open")
            .expect("ok");
        if !r.events.is_empty() {
            assert!(
                r.revision > last,
                "watch went back: {} after {last}",
                r.revision
            );
            seen.push(r.revision);
            last = r.revision;
        }
    }
    let seen_set: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(seen_set.len(), seen.len(), "duplicate revisions: {seen:?}");
    assert_eq!(
        seen_set, acked,
        "watch revisions differ from acknowledged writes"
    );
}
