//! A rolling restart of every control replica (kill -9, start, wait until
//! the cluster converges) under a write load and client traffic.

use crate::dataplane::{DataPlane, Net, Traffic, cluster_for, nodes_converged};
use crate::load::{Load, more_writes};
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_of_every_replica_under_load() {
    let net = Net::new(35);
    let mut c = cluster_for(6, &net, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = DataPlane::start(&c, &net, dir.path());
    let traffic = Traffic::start(&dp.addr);
    let load = Load::start(&c, "rr");
    more_writes(&load, &c, 10).await;
    for id in [1, 2, 3] {
        c.restart(id);
        c.wait_leader().await;
        more_writes(&load, &c, 5).await;
        c.caught_up().await;
    }
    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    let revision = nodes_converged(&c).await;
    let ok = traffic.finish_without_failures();
    report::row(
        "rolling restart",
        &format!(
            "replicas 1, 2, 3 restarted in turn under writes; {ok} client connections, 0 failed"
        ),
        &format!("{checked}; node at the leader's revision {revision}"),
    );
}
