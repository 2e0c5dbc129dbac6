//! The whole control plane down for minutes under client traffic: no
//! failed connection to healthy endpoints; the node agent restarted in the
//! middle of the outage forwards again from its persisted state; when the
//! replicas return the agent catches up to the leader's revision.
//! `CHAOS_OUTAGE_SECS` sets the outage (default 120).

use std::time::{Duration, Instant};

use crate::dataplane::{
    DataPlane, Net, Traffic, cluster_for, nodes_converged, persisted_revision, who,
};
use crate::report;

fn outage() -> Duration {
    let secs = std::env::var("CHAOS_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_down_for_minutes() {
    let net = Net::new(33);
    let mut c = cluster_for(8, &net, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dp = DataPlane::start(&c, &net, dir.path());
    // The agent persists at most once a second: wait for the file to hold
    // the revision it forwards from.
    let programmed = nodes_converged(&c).await;
    crate::dp::eventually("the agent to persist its state", || {
        (persisted_revision(dir.path()) >= programmed).then_some(())
    });
    let traffic = Traffic::start(&dp.addr);
    traffic.more(10).await;

    let outage = outage();
    let t = Instant::now();
    for id in [1, 2, 3] {
        c.kill(id);
    }
    // First half: the running agent forwards on its own.
    while t.elapsed() < outage / 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        traffic.failed(),
        0,
        "invariant zero-failed-connections: with the control plane down"
    );
    // The agent restarts mid-outage: connections fail only until it has
    // loaded its persisted state and bound again.
    let restart = Instant::now();
    dp.node.restart();
    crate::dp::eventually("the restarted agent to forward", || who(&dp.addr).ok());
    let rebound = restart.elapsed();
    let during_restart = traffic.failed();
    while t.elapsed() < outage {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        traffic.failed(),
        during_restart,
        "invariant zero-failed-connections: after the agent forwarded again"
    );
    for id in [1, 2, 3] {
        c.restart(id);
    }
    let revision = nodes_converged(&c).await;
    traffic.more(10).await;
    let (ok, failed) = traffic.finish();
    assert_eq!(
        failed.len(),
        during_restart,
        "failures after the control plane returned: {failed:?}"
    );
    report::row(
        "control plane down",
        &format!(
            "{} s outage, agent restarted mid-way (forwarding again after {} ms); {ok} client connections, {} failed, all while the agent was down",
            outage.as_secs(),
            rebound.as_millis(),
            failed.len()
        ),
        &format!("zero failures with the agent up; node at the leader's revision {revision} after"),
    );
}
