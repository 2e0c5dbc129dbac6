//! `strait control`: flags for one control-plane replica, turned into a
//! `strait_control::app::Config`, then serve until SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use strait_control::app::{self, Config};

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// This replica's id (unique for the cluster's lifetime, never reused).
    #[arg(long, env = "STRAIT_ID", default_value_t = 1)]
    pub id: u64,
    /// Where the Raft log, vote and snapshots are kept.
    #[arg(long, env = "STRAIT_DATA_DIR", default_value = "strait-data")]
    pub data_dir: PathBuf,
    /// Address to serve gRPC (clients, node agents and peers) on.
    #[arg(long, env = "STRAIT_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Address peers and clients reach this replica at (default: --listen).
    #[arg(long, env = "STRAIT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Voters of a new cluster, this one included: `1=host:port,2=host:port,3=host:port`.
    /// Empty: a single-replica cluster. Used only to bootstrap a new cluster.
    #[arg(long, env = "STRAIT_PEERS", default_value = "")]
    pub peers: String,
    /// Join an existing cluster instead of bootstrapping one: start empty and
    /// wait for `strait cluster add-member --id ID --address ADDR`.
    #[arg(long, env = "STRAIT_JOIN", conflicts_with = "peers")]
    pub join: bool,
    /// The range ClusterIPs are allocated from.
    #[arg(long, env = "STRAIT_SERVICE_CIDR", default_value = "10.96.0.0/12")]
    pub service_cidr: ipnet::IpNet,
    /// The range NodePorts are allocated from.
    #[arg(long, env = "STRAIT_NODE_PORT_RANGE", default_value = "30000-32767")]
    pub node_port_range: String,
    /// LoadBalancer address pool: CIDRs and FIRST-LAST ranges, comma-separated.
    #[arg(long, env = "STRAIT_LB_POOL", default_value = "")]
    pub lb_pool: String,
    /// Revisions of change history kept for watchers to resume from.
    #[arg(long, env = "STRAIT_WATCH_HISTORY", default_value_t = 10_000)]
    pub watch_history: usize,
    /// A node agent silent this long is marked Ready=False and its Pods unready.
    #[arg(long, env = "STRAIT_NODE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub node_grace: std::time::Duration,
    /// Fewest log entries between snapshots (older entries are then
    /// purged); a snapshot also waits until the log written since the last
    /// one is at least as large as it, so a large state is not copied often.
    #[arg(long, env = "STRAIT_SNAPSHOT_EVERY", default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// HTTP address for /metrics, /livez and /readyz (default 127.0.0.1:9701;
    /// `off` disables; port 0 picks one and prints `metrics on ADDR`).
    #[arg(long, env = "STRAIT_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<Listen>,
}

/// Default address of a control replica's metrics endpoint.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9701);

/// An optional listen address: `IP:PORT` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    On(SocketAddr),
}

/// Parses `IP:PORT`, or `off`/`none`/`false`.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    match s {
        "off" | "none" | "false" => Ok(Listen::Off),
        _ => s
            .parse()
            .map(Listen::On)
            .map_err(|e| format!("{e}: expected IP:PORT or off")),
    }
}

/// The metrics address to use and whether failing to bind it is fatal:
/// an address given explicitly must work; a taken default port only
/// costs the metrics endpoint (several processes on one host).
pub fn metrics_address(flag: Option<Listen>, default: SocketAddr) -> (Option<SocketAddr>, bool) {
    match flag {
        None => (Some(default), false),
        Some(Listen::Off) => (None, true),
        Some(Listen::On(a)) => (Some(a), true),
    }
}

/// Parses `1=a:1,2=b:2`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("--peers entry {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("--peers entry {part:?}: id is not a number"))?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            bail!("--peers names id {id} twice");
        }
    }
    Ok(out)
}

impl ControlArgs {
    pub fn config(&self, tls: &crate::client::TlsArgs) -> anyhow::Result<Config> {
        Ok(Config {
            tls: tls.files()?,
            id: self.id,
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            advertise: self.advertise.clone(),
            peers: parse_peers(&self.peers)?,
            join: self.join,
            service_cidr: self.service_cidr,
            node_port_range: self.node_port_range.clone(),
            lb_pool: self.lb_pool.clone(),
            watch_history: self.watch_history,
            snapshot_every: self.snapshot_every,
            node_grace: self.node_grace,
            metrics_listen: metrics_address(self.metrics_listen, DEFAULT_METRICS_LISTEN).0,
            ..Config::default()
        })
    }
}

pub async fn run(args: ControlArgs, tls: &crate::client::TlsArgs) -> anyhow::Result<()> {
    let cfg = args.config(tls)?;
    let (_, metrics_required) = metrics_address(args.metrics_listen, DEFAULT_METRICS_LISTEN);
    tracing::info!(config = ?cfg, "starting control replica");
    let mut bound = match app::build(cfg.clone()).await {
        Err(app::StartError::Metrics(e)) if !metrics_required => {
            tracing::warn!(error = %e, "serving no metrics: the default metrics port is taken (set --metrics-listen)");
            app::build(Config {
                metrics_listen: None,
                ..cfg
            })
            .await
        }
        other => other,
    }
    .context("starting the control plane")?;
    // Printed for scripts and tests that start on port 0.
    let mut lines = format!("listening on {}\n", bound.addr);
    if let Some(addr) = bound.metrics_addr {
        lines.push_str(&format!("metrics on {addr}\n"));
    }
    print_lines(&lines);
    let watchdog = tokio_util::sync::CancellationToken::new();
    crate::systemd::spawn_watchdog(watchdog.clone());
    crate::systemd::ready(&format!("serving on {}", bound.addr));
    let _stop_watchdog = watchdog.drop_guard();
    tokio::select! {
        reason = bound.wait() => {
            tracing::error!(reason, "the control replica cannot go on; exiting");
            Err(anyhow::anyhow!(reason).context("the control replica stopped"))
        }
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            crate::systemd::stopping();
            // Each step of the shutdown is bounded; a second signal ends
            // the process at once all the same.
            tokio::select! {
                () = bound.shutdown() => {}
                _ = shutdown_signal() => tracing::warn!("second signal: exiting without finishing the shutdown"),
            }
            Ok(())
        }
    }
}

/// Writes `lines` to stdout at once, ignoring a reader that went away
/// after the first line (a closed pipe must not stop the process).
pub fn print_lines(lines: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(lines.as_bytes()).and_then(|()| out.flush());
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
