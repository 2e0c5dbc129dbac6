//! The two clusters under test, each member its own OS process on loopback:
//! `strait control` replicas or `etcd` members (three for the reference run). A member can be
//! killed with SIGKILL and restarted on the same data directory and ports;
//! every child is killed when the cluster is dropped.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Which system a cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Strait,
    Etcd,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Strait => "Strait",
            System::Etcd => "etcd",
        }
    }
}

/// One member: how to start it and, while it runs, its process.
#[derive(Debug)]
pub struct Member {
    /// Strait's replica id, or etcd's 1-based member number (`m1`…).
    pub id: u64,
    /// Where clients (and, for Strait, peers) reach it.
    pub client_addr: SocketAddr,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("STRAIT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The running process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    pub system: System,
    pub members: Vec<Member>,
    pub dir: PathBuf,
}

/// Fails unless every port is free on 127.0.0.1 (a leftover process from an
/// earlier run would otherwise be benchmarked instead).
fn check_free(ports: &[u16]) -> anyhow::Result<()> {
    for &p in ports {
        TcpListener::bind(("127.0.0.1", p))
            .with_context(|| format!("port 127.0.0.1:{p} is in use (pick another --base-port)"))?;
    }
    Ok(())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Cluster {
    /// `replicas` `strait control` replicas on `base+1..`.
    pub fn strait(bin: &Path, dir: &Path, base: u16, replicas: u16) -> anyhow::Result<Self> {
        let ports: Vec<u16> = (1..=replicas).map(|i| base + i).collect();
        check_free(&ports)?;
        let peers = ports
            .iter()
            .zip(1u64..)
            .map(|(p, id)| format!("{id}={}", loopback(*p)))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .zip(1u64..)
            .map(|(&p, id)| {
                let data = dir.join(format!("strait-{id}"));
                Member {
                    id,
                    client_addr: loopback(p),
                    program: bin.to_path_buf(),
                    args: vec![
                        "control".into(),
                        // Plaintext, as etcd is run here: the comparison is
                        // of replication, not of TLS.
                        "--insecure".into(),
                        "--id".into(),
                        id.to_string(),
                        "--data-dir".into(),
                        data.display().to_string(),
                        "--listen".into(),
                        loopback(p).to_string(),
                        "--peers".into(),
                        peers.clone(),
                    ],
                    log: dir.join(format!("strait-{id}.log")),
                    child: None,
                }
            })
            .collect();
        Self::launch(System::Strait, dir, members)
    }

    /// `replicas` etcd members: clients on `base+11..`, peers on `base+21..`,
    /// otherwise etcd's defaults (fsync on, heartbeat 100 ms, election 1 s).
    pub fn etcd(bin: &Path, dir: &Path, base: u16, replicas: u16) -> anyhow::Result<Self> {
        let client: Vec<u16> = (1..=replicas).map(|i| base + 10 + i).collect();
        let peer: Vec<u16> = (1..=replicas).map(|i| base + 20 + i).collect();
        check_free(&client)?;
        check_free(&peer)?;
        let initial = peer
            .iter()
            .zip(1u64..)
            .map(|(p, id)| format!("m{id}=http://{}", loopback(*p)))
            .collect::<Vec<_>>()
            .join(",");
        let members = client
            .iter()
            .zip(&peer)
            .zip(1u64..)
            .map(|((&c, &p), id)| {
                let curl = format!("http://{}", loopback(c));
                let purl = format!("http://{}", loopback(p));
                Member {
                    id,
                    client_addr: loopback(c),
                    program: bin.to_path_buf(),
                    args: vec![
                        format!("--name=m{id}"),
                        format!("--data-dir={}", dir.join(format!("etcd-{id}")).display()),
                        format!("--listen-client-urls={curl}"),
                        format!("--advertise-client-urls={curl}"),
                        format!("--listen-peer-urls={purl}"),
                        format!("--initial-advertise-peer-urls={purl}"),
                        format!("--initial-cluster={initial}"),
                        "--initial-cluster-token=ctlbench".into(),
                        "--initial-cluster-state=new".into(),
                    ],
                    log: dir.join(format!("etcd-{id}.log")),
                    child: None,
                }
            })
            .collect();
        Self::launch(System::Etcd, dir, members)
    }

    fn launch(system: System, dir: &Path, members: Vec<Member>) -> anyhow::Result<Self> {
        let mut c = Cluster {
            system,
            members,
            dir: dir.to_path_buf(),
        };
        for m in &mut c.members {
            m.start()?;
        }
        Ok(c)
    }

    /// SIGKILLs member `idx` and reaps it; returns the instant just before
    /// the signal was sent.
    pub fn kill(&mut self, idx: usize) -> anyhow::Result<Instant> {
        let m = self.members.get_mut(idx).context("no such member")?;
        let mut child = m.child.take().context("member is not running")?;
        let at = Instant::now();
        child.kill().context("kill -9")?;
        child.wait().context("reaping the killed member")?;
        Ok(at)
    }

    /// Starts member `idx` again on its data directory.
    pub fn restart(&mut self, idx: usize) -> anyhow::Result<()> {
        let m = self.members.get_mut(idx).context("no such member")?;
        if m.child.is_some() {
            bail!("member {} is still running", m.id);
        }
        m.start()
    }

    /// Fails if a member process exited on its own (its log says why).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for m in &mut self.members {
            if let Some(c) = &mut m.child
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "{} member {} exited ({status}); see {}",
                    self.system.name(),
                    m.id,
                    m.log.display()
                );
            }
        }
        Ok(())
    }

    /// CPU time (user + system) all running members have used so far.
    pub fn cpu_time(&self) -> Duration {
        self.members
            .iter()
            .filter_map(Member::pid)
            .filter_map(|pid| proc_cpu(&format!("/proc/{pid}/stat")))
            .sum()
    }

    /// The member's log file, for error messages.
    pub fn log(&self, idx: usize) -> Option<&Path> {
        self.members.get(idx).map(|m| m.log.as_path())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// utime + stime from a `/proc/PID/stat` file. Linux reports them in
/// USER_HZ ticks, which is 100 on every architecture Linux exposes to user
/// space.
pub fn proc_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields after it are
    // plain numbers. utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}
