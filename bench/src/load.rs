//! The closed-loop write generator shared by both systems: `conns` HTTP/2
//! connections to one member, each with `inflight` writers that issue the
//! next write as soon as the previous one is acknowledged. Writes during the
//! warm-up are not recorded; the measured window ends at a fixed deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::client::Conn;
use crate::cluster::{Cluster, proc_cpu};

/// One load shape.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub conns: usize,
    pub inflight: usize,
}

impl Workload {
    /// The key prefix of its writes (part of a DNS-1035 name).
    fn tag(&self) -> String {
        format!("c{}x{}", self.conns, self.inflight)
    }
}

/// The shapes the benchmark runs, in order.
pub const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "sequential (1 conn × 1)",
        conns: 1,
        inflight: 1,
    },
    Workload {
        name: "16 conns × 1 in flight",
        conns: 16,
        inflight: 1,
    },
    Workload {
        name: "16 conns × 4 in flight",
        conns: 16,
        inflight: 4,
    },
];

/// Timing of one run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
    /// Deadline of one write; a write past it counts as an error.
    pub op_timeout: Duration,
}

/// What one workload measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub workload: Workload,
    pub ops: u64,
    pub errors: u64,
    pub window: Duration,
    pub hist: Histogram<u64>,
    /// CPU all members used in the window, per acknowledged write.
    pub server_cpu_per_op: Duration,
    /// Cores the members kept busy on average in the window.
    pub server_cores: f64,
    /// Cores the generator itself kept busy.
    pub client_cores: f64,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

fn new_hist() -> anyhow::Result<Histogram<u64>> {
    // Microseconds, 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

/// A `len`-byte value (printable, so it fits a Kubernetes annotation too).
pub fn value(len: usize) -> String {
    "0123456789abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(len)
        .collect()
}

/// Runs `wl` against the member `target` of `cluster`.
pub async fn run(
    cluster: &Cluster,
    target: usize,
    wl: Workload,
    timing: Timing,
    value: Arc<str>,
) -> anyhow::Result<LoadResult> {
    let addr = cluster
        .members
        .get(target)
        .context("no such member")?
        .client_addr;
    let mut conns = Vec::with_capacity(wl.conns);
    for _ in 0..wl.conns {
        conns.push(Conn::connect(cluster.system, addr).await?);
    }
    let start = Instant::now();
    let measure_from = start + timing.warmup;
    let end = measure_from + timing.duration;
    let next_key = Arc::new(AtomicU64::new(0));
    let tag = Arc::<str>::from(wl.tag());

    let mut tasks = tokio::task::JoinSet::new();
    for conn in &conns {
        for _ in 0..wl.inflight {
            let conn = conn.clone();
            let (next_key, tag, value) = (next_key.clone(), tag.clone(), value.clone());
            let mut hist = new_hist()?;
            tasks.spawn(async move {
                let mut errors = 0u64;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let key = format!("bench-{tag}-{}", next_key.fetch_add(1, Ordering::Relaxed));
                    let ok = conn.put(&key, &value, timing.op_timeout).await.is_ok();
                    if t0 >= measure_from {
                        if ok {
                            let us = t0.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
                            hist.saturating_record(us);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (hist, errors)
            });
        }
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let (server0, client0, t0) = (cluster.cpu_time(), self_cpu(), Instant::now());
    tokio::time::sleep_until(end.into()).await;
    let (server1, client1, window) = (cluster.cpu_time(), self_cpu(), t0.elapsed());

    let mut hist = new_hist()?;
    let mut errors = 0;
    // Every writer stops at `end` after at most one more write.
    let joined = tokio::time::timeout(timing.op_timeout + Duration::from_secs(5), async {
        while let Some(r) = tasks.join_next().await {
            let (h, e) = r.context("writer task")?;
            hist.add(&h).context("merging histograms")?;
            errors += e;
        }
        anyhow::Ok(())
    })
    .await;
    joined.context("writers did not stop")??;

    let ops = hist.len();
    let server = server1.saturating_sub(server0);
    Ok(LoadResult {
        workload: wl,
        ops,
        errors,
        window,
        server_cpu_per_op: server
            .checked_div(ops.try_into().unwrap_or(u32::MAX))
            .unwrap_or_default(),
        server_cores: server.as_secs_f64() / window.as_secs_f64(),
        client_cores: client1.saturating_sub(client0).as_secs_f64() / window.as_secs_f64(),
        hist,
    })
}

fn self_cpu() -> Duration {
    proc_cpu("/proc/self/stat").unwrap_or_default()
}
