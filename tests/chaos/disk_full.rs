//! A follower's disk fills up under a write load: its log cannot grow, the
//! replica exits (rather than staying up unable to write, answering only
//! errors) while the other two go on acknowledging writes; once space is
//! freed it starts again, catches up, and no acknowledged write is lost.
//! Needs root: the follower's data dir is a size-limited tmpfs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_proto::v1::object;

use crate::harness::*;
use crate::load::{Load, more_writes};
use crate::report;

/// Room on the follower's tmpfs: its first log segment (64 MiB, allocated
/// in full when it is created) and 16 MiB for everything else, not a second
/// segment.
const SMALL: &str = "size=80m";
/// Each filler write carries this much, so the log fills in a few thousand
/// entries while the state stays small (the fillers overwrite three objects).
const PAD: usize = 48 * 1024;

/// A tmpfs mounted over a directory, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Tmpfs {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "strait-disk-full"])
            .arg(at));
        Tmpfs(at.to_path_buf())
    }

    fn remount(&self, options: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed (this scenario mounts a tmpfs: run the suite as root, as .ci/run does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Service `name` whose annotation `v` is `value`, padded to [`PAD`].
fn padded(name: &str, value: u64) -> strait_proto::v1::Object {
    let mut o = service(name, value);
    if let Some(object::Kind::Service(s)) = o.kind.as_mut()
        && let Some(m) = s.metadata.as_mut()
    {
        m.annotations
            .insert("pad".into(), format!("{value:08}").repeat(PAD / 8));
    }
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_a_follower_and_loses_no_write() {
    let mut c = Cluster::start(12, 3, &[]).await;
    let leader = c.wait_leader().await;
    let victim = (1..=3).find(|id| *id != leader).expect("a follower");

    // Move the follower's data onto a small tmpfs, segment allocated in full.
    c.kill(victim);
    let data = c.data_dir(victim);
    let before = data.with_extension("before");
    std::fs::rename(&data, &before).expect("move the data dir aside");
    std::fs::create_dir(&data).expect("data dir");
    let disk = Tmpfs::mount(&data, SMALL);
    run(Command::new("cp")
        .args(["-a", "--sparse=never"])
        .arg(before.join("."))
        .arg(&data));
    c.restart(victim);
    c.caught_up().await;

    let load = Load::start(&c, "d");
    more_writes(&load, &c, 10).await;
    // Fillers: three writers, each overwriting its own object.
    let stop = Arc::new(AtomicBool::new(false));
    let last_acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let fillers: Vec<_> = (0..3)
        .map(|k| {
            let (stop, last_acked, addrs) = (stop.clone(), last_acked.clone(), c.addrs());
            tokio::spawn(async move {
                let mut client = Client::new(addrs);
                let name = format!("fill-{k}");
                for v in 1..=20_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Outcome::Ok(_) = client.apply(padded(&name, v)).await {
                        last_acked.lock().expect("lock").insert(name.clone(), v);
                    }
                }
            })
        })
        .collect();

    let waiting = Instant::now();
    let status = loop {
        load.observe(&c).await;
        if let Some(status) = c.replicas.get_mut(&victim).expect("replica").exited() {
            break status;
        }
        assert!(
            waiting.elapsed() < DEADLINE,
            "timed out waiting for the follower with the full disk to exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !status.success(),
        "invariant exits-on-storage-failure: exited with {status}"
    );
    let replica = &c.replicas[&victim];
    assert!(
        replica.log_contains("No space left on device") && replica.log_contains("raft stopped"),
        "invariant exits-on-storage-failure: the log of replica {victim} does not name the cause ({})",
        replica.log.display()
    );
    // The majority goes on.
    more_writes(&load, &c, 20).await;

    // Space is freed; the follower starts again and catches up.
    disk.remount("size=1g");
    c.restart(victim);
    more_writes(&load, &c, 10).await;
    stop.store(true, Ordering::Relaxed);
    for f in fillers {
        f.await.expect("filler");
    }
    let finished = load.finish().await;
    c.caught_up().await;
    let objects = c.converged().await;
    let checked = finished.check(&objects);
    let last_acked = last_acked.lock().expect("lock").clone();
    for (name, acked) in &last_acked {
        let o = objects.iter().find(|o| o.name() == name);
        assert!(
            value_of(o) >= *acked,
            "invariant no-acked-write-lost: {name} holds {} after {acked} was acknowledged",
            value_of(o)
        );
    }
    let filled: u64 = last_acked.values().sum();
    report::row(
        "disk full on a follower",
        &format!(
            "its log could not grow after about {} MiB of writes: it exited ({status}) naming the cause; writes went on through the majority",
            (filled * PAD as u64) >> 20
        ),
        &format!("{checked}; after space was freed it caught up, replicas identical"),
    );
    for id in 1..=3 {
        c.kill(id);
    }
    drop(disk);
}
