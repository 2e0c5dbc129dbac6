//! SIGSTOP of the leader for longer than the election timeout, then
//! SIGCONT: the others elect a new leader and go on; the resumed old leader
//! must neither serve a stale linearizable read nor commit in its old term.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::load::{Load, more_writes};
use crate::report;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_the_leader_then_resume_it() {
    let c = Cluster::start(7, 3, &[]).await;
    let load = Load::start(&c, "s");
    more_writes(&load, &c, 10).await;
    let mut client = Client::new(c.addrs());
    client.apply_until_ok(&service("fence", 1)).await;

    let old = c.wait_leader().await;
    let (_, old_term, _) = c.statuses().await[&old].clone();
    let t = Instant::now();
    c.replicas[&old].signal(libc::SIGSTOP);
    // Asked of the others only: the stopped one would hold every poll
    // for its full RPC timeout.
    let awake: Vec<(u64, String)> = c
        .replicas
        .values()
        .filter(|r| r.id != old)
        .map(|r| (r.id, r.real.to_string()))
        .collect();
    let new = eventually("a leader among the others", || async {
        for (id, addr) in &awake {
            let s = status_of(addr).await?;
            if s.members.iter().any(|m| m.id == *id && m.role == "leader") {
                return Some(*id);
            }
        }
        None
    })
    .await;
    let elected = t.elapsed();
    more_writes(&load, &c, 10).await;
    // The fence moves on while the old leader sleeps.
    let others: Vec<String> = c
        .replicas
        .values()
        .filter(|r| r.id != old)
        .map(|r| r.proxy.to_string())
        .collect();
    eventually("the fence written by the majority", || {
        let mut client = Client::new(others.clone());
        async move { matches!(client.apply(service("fence", 2)).await, Outcome::Ok(_)).then_some(()) }
    })
    .await;

    // The CLI given the stopped replica first: its connection accepts and
    // never answers, so the read moves on once HTTP/2 keepalive gives up.
    let cli_started = Instant::now();
    let out = cli_with_servers(
        &[c.replicas[&old].real, c.replicas[&new].real],
        &["get", "svc", "fence", "-o", "json"],
    )
    .await;
    let cli_took = cli_started.elapsed();
    assert!(
        out.status.success(),
        "get with the stopped replica first: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fence: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(fence["metadata"]["annotations"]["v"], "2", "{fence}");
    // `cluster status` too: answered by the next replica, which leads now,
    // with the stopped one shown unreachable.
    let out = cli_with_servers(
        &[c.replicas[&old].real, c.replicas[&new].real],
        &["cluster", "status"],
    )
    .await;
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cluster status with the stopped replica first: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.starts_with(&format!("leader: {new} ")), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&format!("{old} ")) && l.contains("unreachable")),
        "{status}"
    );

    c.replicas[&old].signal(libc::SIGCONT);
    // Straight after waking it still believes it leads: a linearizable
    // read there must see the new fence or fail, never the old one.
    let mut direct =
        Client::new(vec![c.replicas[&old].real.to_string()]).with_timeout(Duration::from_secs(3));
    let mut answered = 0;
    for _ in 0..20 {
        if let Some(v) = direct.read("fence").await {
            assert_eq!(
                v, 2,
                "invariant no-stale-read: the resumed leader served fence={v}"
            );
            answered += 1;
        }
    }
    // A write sent to it commits only through the new leader's term.
    let _ = direct.apply(service("after-resume", 1)).await;
    eventually("the old leader to step down", || async {
        load.observe(&c).await;
        let s = c.statuses().await;
        let (role, term, _) = s.get(&old)?;
        (role != "leader" && *term > old_term).then_some(())
    })
    .await;
    let done = load.finish().await;
    let objects = c.converged().await;
    let checked = done.check(&objects);
    report::row(
        "SIGSTOP leader",
        &format!(
            "new leader {new} after {} ms; the CLI's read, the stopped leader listed first, answered by the next replica after {} ms; {answered}/20 reads at the resumed leader answered, all current",
            elected.as_millis(),
            cli_took.as_millis()
        ),
        &format!("{checked}; old leader stepped down"),
    );
}
