//! `ctlbench`: Strait's control plane against etcd on one machine, same run,
//! same load generator. For each system it starts a 3-member cluster on
//! loopback (each member its own process, fsync on), runs the write
//! workloads (sequential, 16 connections × 1 and × 4 in flight) against the
//! leader, then kills the leader `--kills` times and times the first
//! acknowledged write after each kill. The markdown report goes to stdout
//! and `--out`.

mod client;
mod cluster;
mod failover;
mod load;
mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::cluster::Cluster;
use crate::load::{Timing, WORKLOADS};
use crate::report::SystemResult;

#[derive(Parser, Debug)]
#[command(
    about = "Control-plane write throughput, latency and failover: Strait vs etcd",
    args_override_self = true
)]
struct Args {
    /// The `strait` binary (a release build).
    #[arg(long, default_value = "target/release/strait")]
    strait: PathBuf,
    /// The `etcd` server binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Measured time of each workload.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded load before each measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Members per cluster (3 for the reference table; 1 shows the cost
    /// of replication, 5 the cost of a larger quorum).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    replicas: u16,
    /// Leader kills per system (skipped with one member).
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Pause after the cluster is healthy again, before the next kill.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Size of the value in every write, in bytes.
    #[arg(long, default_value_t = 300)]
    value_size: usize,
    /// Ports: Strait on BASE+1.., etcd clients on BASE+11.., etcd peers on BASE+21...
    #[arg(long, default_value_t = 27100)]
    base_port: u16,
    /// Where to write the markdown report.
    #[arg(long, default_value = "bench/control/results.md")]
    out: PathBuf,
    /// Data directories go under this directory (default: a new temp dir, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// What the `strait` binary was built from, for the report (default:
    /// `git describe` of the current directory, right when run.sh built it).
    #[arg(long)]
    label: Option<String>,
    /// Only these systems (repeatable: strait, etcd); default both.
    #[arg(long = "only", value_parser = ["strait", "etcd"])]
    only: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("ctlbench-")
        .tempdir_in(args.work_dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let value: Arc<str> = load::value(args.value_size).into();
    let timing = Timing {
        warmup: args.warmup,
        duration: args.duration,
        op_timeout: Duration::from_secs(5),
    };
    let load_before = loadavg();
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);

    let mut strait = SystemResult::default();
    let mut etcd = SystemResult::default();
    if wanted("strait") {
        let dir = tmp.path().join("strait");
        std::fs::create_dir_all(&dir)?;
        let cluster = Cluster::strait(&args.strait, &dir, args.base_port, args.replicas)?;
        strait = bench_system(cluster, &args, timing, value.clone()).await?;
    }
    if wanted("etcd") {
        let dir = tmp.path().join("etcd");
        std::fs::create_dir_all(&dir)?;
        let cluster = Cluster::etcd(&args.etcd, &dir, args.base_port, args.replicas)?;
        etcd = bench_system(cluster, &args, timing, value.clone()).await?;
    }

    let report = report::markdown(
        &header(&args, tmp.path(), &load_before),
        args.replicas,
        &strait,
        &etcd,
    );
    println!("{report}");
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("report written to {}", args.out.display());
    Ok(())
}

/// Workloads, then failover, on one freshly started cluster.
async fn bench_system(
    mut cluster: Cluster,
    args: &Args,
    timing: Timing,
    value: Arc<str>,
) -> anyhow::Result<SystemResult> {
    let name = cluster.system.name();
    eprintln!(
        "{name}: starting {} members in {}",
        cluster.members.len(),
        cluster.dir.display()
    );
    let ids = wait_started(&mut cluster).await?;
    let mut out = SystemResult::default();
    for wl in WORKLOADS {
        let leader = failover::wait_healthy(&mut cluster, &ids).await?;
        eprintln!(
            "{name}: {} for {:?} (leader: member {})",
            wl.name,
            timing.duration,
            leader + 1
        );
        let r = load::run(&cluster, leader, wl, timing, value.clone()).await?;
        eprintln!(
            "  {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            r.throughput(),
            r.ms(0.5),
            r.ms(0.99),
            r.errors
        );
        cluster.check_alive()?;
        out.loads.push(r);
    }
    if cluster.members.len() > 1 {
        eprintln!("{name}: {} leader kills", args.kills);
        out.failover = failover::run(&mut cluster, args.kills, args.settle, value).await?;
    }
    Ok(out)
}

/// Waits (bounded) until every member answers, returning their ids.
async fn wait_started(cluster: &mut Cluster) -> anyhow::Result<Vec<u64>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        cluster.check_alive()?;
        match failover::member_ids(cluster).await {
            Ok(ids) => return Ok(ids),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "{} did not start; see {}",
                        cluster.system.name(),
                        cluster
                            .log(0)
                            .map(Path::display)
                            .map(|d| d.to_string())
                            .unwrap_or_default()
                    )
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One shell command's first output line, or "?".
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

/// The 1-, 5- and 15-minute load averages: other work on the machine
/// skews every figure, so the report says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// The machine and versions, for the report.
fn header(args: &Args, dir: &Path, load_before: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = first_line("sh", &["-c", "free -g | awk '/Mem:/ {print $2 \" GiB\"}'"]);
    let fs = first_line(
        "sh",
        &[
            "-c",
            &format!(
                "df -T {} | awk 'NR==2 {{print $2\" on \"$1}}'",
                dir.display()
            ),
        ],
    );
    format!(
        "## ctlbench results\n\n\
         - date (UTC): {} · kernel {} · {cpu} × {cores} vCPU · {mem} · data dirs on {fs}\n\
         - `{}` ({}), `{}`\n\
         - every member is its own process on 127.0.0.1, sharing the cores with the load generator (no pinning); \
         values {} B, distinct keys; {} warm-up + {} measured per workload; {} kills per system, {} settle between kills\n\
         - load average before the run {load_before}, after {}",
        first_line("date", &["-u", "+%Y-%m-%d %H:%M:%S"]),
        first_line("uname", &["-r"]),
        args.strait.display(),
        args.label
            .clone()
            .unwrap_or_else(|| first_line("git", &["describe", "--always", "--dirty"])),
        first_line(&args.etcd.display().to_string(), &["--version"]),
        args.value_size,
        humantime::format_duration(args.warmup),
        humantime::format_duration(args.duration),
        args.kills,
        humantime::format_duration(args.settle),
        loadavg(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_with_defaults() {
        let a = Args::try_parse_from(["ctlbench", "--only", "etcd", "--duration", "3s"]);
        assert!(a.is_ok_and(|a| a.duration == Duration::from_secs(3) && a.kills == 10));
    }

    #[test]
    fn proc_stat_parses_own_cpu_time() {
        assert!(cluster::proc_cpu("/proc/self/stat").is_some());
    }
}
