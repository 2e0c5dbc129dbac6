//! Leader failover: find the leader, SIGKILL it, and time until the first
//! write acknowledged by a survivor. Every 20 ms one write is started at
//! each survivor (each with its own deadline, overlapping), the way the etcd
//! anchor measured it; the first acknowledgement ends the measurement. The
//! killed member is then restarted and the cluster must be healthy again
//! before the next kill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::Conn;
use crate::cluster::Cluster;

/// Time between two rounds of attempts (the measurement's resolution).
const TICK: Duration = Duration::from_millis(20);
/// Deadline of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// A kill not recovered from within this is recorded as a failure.
const RECOVERY_LIMIT: Duration = Duration::from_secs(15);
/// How long a restarted member may take to be healthy again.
const HEALTHY_LIMIT: Duration = Duration::from_secs(30);
const RPC_TIMEOUT: Duration = Duration::from_secs(1);

/// One kill.
#[derive(Debug, Clone)]
pub struct Kill {
    /// Member number (1-based) killed.
    pub killed: u64,
    /// Kill → first acknowledged write; `None`: not within the limit.
    pub recovery: Option<Duration>,
    /// Member number that acknowledged first.
    pub via: Option<u64>,
    /// Terms the election(s) took (new term − term before the kill).
    pub term_delta: Option<u64>,
}

/// Every kill of one run.
#[derive(Debug, Clone, Default)]
pub struct FailoverResult {
    pub kills: Vec<Kill>,
}

impl FailoverResult {
    /// Recovery times of the kills that recovered, sorted.
    pub fn sorted(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.kills.iter().filter_map(|k| k.recovery).collect();
        v.sort();
        v
    }

    /// Median (nearest rank, lower middle) of the recovered kills.
    pub fn p50(&self) -> Option<Duration> {
        let v = self.sorted();
        v.get(v.len().saturating_sub(1) / 2).copied()
    }

    pub fn max(&self) -> Option<Duration> {
        self.sorted().last().copied()
    }

    pub fn min(&self) -> Option<Duration> {
        self.sorted().first().copied()
    }

    pub fn failed(&self) -> usize {
        self.kills.iter().filter(|k| k.recovery.is_none()).count()
    }
}

/// Each member's id as the system reports leaders: Strait's `--id`, etcd's
/// member id (learned by asking each member once).
pub async fn member_ids(cluster: &Cluster) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for m in &cluster.members {
        let conn = Conn::connect(cluster.system, m.client_addr).await?;
        let id = conn.member_id(RPC_TIMEOUT).await?.unwrap_or(m.id);
        ids.push(id);
    }
    Ok(ids)
}

/// The index of the leader every member agrees on, with its term.
async fn agreed_leader(cluster: &Cluster, ids: &[u64]) -> Option<(usize, u64)> {
    let mut agreed = None;
    for m in &cluster.members {
        let conn = Conn::connect(cluster.system, m.client_addr).await.ok()?;
        let s = conn.status(RPC_TIMEOUT).await.ok()?;
        let leader = s.leader?;
        match agreed {
            None => agreed = Some((leader, s.term)),
            Some((l, _)) if l != leader => return None,
            Some(_) => {}
        }
    }
    let (leader, term) = agreed?;
    Some((ids.iter().position(|&i| i == leader)?, term))
}

/// Waits until all members agree on a leader and a write through each
/// member is acknowledged; returns the leader's index.
pub async fn wait_healthy(cluster: &mut Cluster, ids: &[u64]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + HEALTHY_LIMIT;
    let mut n = 0u64;
    loop {
        cluster.check_alive()?;
        if let Some((leader, _)) = agreed_leader(cluster, ids).await {
            let mut ok = true;
            for m in &cluster.members {
                n += 1;
                let conn = Conn::connect(cluster.system, m.client_addr).await;
                let put = match conn {
                    Ok(c) => c
                        .put(&format!("bench-health-{n}"), "ok", RPC_TIMEOUT)
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                ok &= put;
            }
            if ok {
                return Ok(leader);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} cluster not healthy within {HEALTHY_LIMIT:?}",
                cluster.system.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `kills` leader kills on `cluster`.
pub async fn run(
    cluster: &mut Cluster,
    kills: usize,
    settle: Duration,
    value: Arc<str>,
) -> anyhow::Result<FailoverResult> {
    let ids = member_ids(cluster).await?;
    let mut out = FailoverResult::default();
    for k in 0..kills {
        let leader = wait_healthy(cluster, &ids).await?;
        tokio::time::sleep(settle).await;
        let (leader, term) = agreed_leader(cluster, &ids)
            .await
            .filter(|(l, _)| *l == leader)
            .context("leader changed while settling")?;
        let killed = cluster.members.get(leader).context("leader index")?.id;

        // Connect to everyone before the kill, so no dial is timed.
        let leader_conn =
            Conn::connect(cluster.system, cluster.members[leader].client_addr).await?;
        let mut survivors = Vec::new();
        for (i, m) in cluster.members.iter().enumerate() {
            if i != leader {
                survivors.push((m.id, Conn::connect(cluster.system, m.client_addr).await?));
            }
        }
        // A write just before the kill: the followers have just heard from
        // the leader, so each measurement starts right after leader contact.
        leader_conn
            .put(&format!("bench-prekill-{k}"), &value, RPC_TIMEOUT)
            .await
            .context("write before the kill")?;

        let killed_at = cluster.kill(leader)?;
        let (recovery, via) = first_ack(&survivors, k, killed_at, &value).await;
        let mut term_delta = None;
        for (_, conn) in &survivors {
            if let Ok(s) = conn.status(RPC_TIMEOUT).await {
                term_delta = Some(s.term.saturating_sub(term));
                break;
            }
        }
        let secs = recovery.map(|d| format!("{:.3} s", d.as_secs_f64()));
        eprintln!(
            "  {} kill {}/{kills}: member {killed} → first ack after {}",
            cluster.system.name(),
            k + 1,
            secs.as_deref().unwrap_or("(none)")
        );
        out.kills.push(Kill {
            killed,
            recovery,
            via,
            term_delta,
        });
        cluster.restart(leader)?;
    }
    wait_healthy(cluster, &ids).await?;
    Ok(out)
}

/// Starts one write per survivor every `TICK` until one is acknowledged.
async fn first_ack(
    survivors: &[(u64, Conn)],
    kill: usize,
    killed_at: Instant,
    value: &Arc<str>,
) -> (Option<Duration>, Option<u64>) {
    let deadline = killed_at + RECOVERY_LIMIT;
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    let mut attempts = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() >= deadline {
                    return (None, None);
                }
                for (id, conn) in survivors {
                    attempts += 1;
                    let (id, conn, value) = (*id, conn.clone(), value.clone());
                    let key = format!("bench-failover-{kill}-{attempts}");
                    tasks.spawn(async move {
                        conn.put(&key, &value, ATTEMPT_TIMEOUT).await.map(|()| (Instant::now(), id))
                    });
                }
            }
            Some(done) = tasks.join_next() => {
                if let Ok(Ok((at, id))) = done {
                    return (Some(at.duration_since(killed_at)), Some(id));
                }
            }
        }
    }
}
