//! Background control-plane load: unique creates (every acknowledged one
//! must survive) plus a register written and read by two clients (its
//! history must be linearizable), and the leaders seen per term.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::linearizable::{self, Op};

/// Background load: unique creates plus a register written and read by two
/// clients; records what was acknowledged and the register history.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
    history: Arc<Mutex<Vec<Op>>>,
    terms: Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn micros(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

impl Load {
    pub fn start(cluster: &Cluster, prefix: &str) -> Load {
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
    pub async fn observe(&self, cluster: &Cluster) {
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

    pub async fn finish(mut self) -> Finished {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        Finished {
            acked: self.acked.lock().expect("lock").clone(),
            history: self.history.lock().expect("lock").clone(),
            terms: self.terms.lock().expect("lock").clone(),
        }
    }
}

/// Waits until `n` more writes are acknowledged.
pub async fn more_writes(load: &Load, cluster: &Cluster, n: usize) {
    let base = load.acked.lock().expect("lock").len();
    eventually("writes to be acknowledged", || async {
        load.observe(cluster).await;
        (load.acked.lock().expect("lock").len() >= base + n).then_some(())
    })
    .await;
}

/// What a load recorded.
pub struct Finished {
    /// Unique names acknowledged, with their revisions.
    pub acked: BTreeMap<String, u64>,
    /// The register's writes and reads.
    pub history: Vec<Op>,
    /// Leaders seen per term.
    pub terms: BTreeMap<u64, BTreeSet<u64>>,
}

impl Finished {
    /// Asserts the named invariants against the converged `objects`:
    /// no acknowledged write lost, a linearizable register history, at most
    /// one leader per term. Returns what was checked, for the report.
    pub fn check(&self, objects: &[strait_proto::v1::Object]) -> String {
        let present = names(objects);
        let lost: Vec<&String> = self
            .acked
            .keys()
            .filter(|n| !present.contains(*n))
            .collect();
        assert!(
            lost.is_empty(),
            "invariant no-acked-write-lost: lost {lost:?}"
        );
        if let Some(v) = linearizable::check(&self.history) {
            panic!("invariant linearizable: register history is not: {v}");
        }
        for (term, leaders) in &self.terms {
            assert!(
                leaders.len() <= 1,
                "invariant one-leader-per-term: term {term} had leaders {leaders:?}"
            );
        }
        format!(
            "{} acked writes kept, {} register ops linearizable, {} terms ≤ 1 leader",
            self.acked.len(),
            self.history.len(),
            self.terms.len()
        )
    }
}
