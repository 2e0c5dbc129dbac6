//! `strait node`: flags for one node agent, turned into a
//! `strait_node::config::Config`, then run until SIGINT/SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use strait_node::config::{Config, LbPolicy};

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// This node's name (its Node object).
    #[arg(long, env = "STRAIT_NODE_NAME")]
    pub name: String,
    /// Control-plane replicas (comma-separated host:port).
    #[arg(long, env = "STRAIT_CONTROL", value_delimiter = ',')]
    pub control: Vec<String>,
    /// The node's address: NodePorts bind here; Pods without a podIP use it.
    #[arg(long, env = "STRAIT_NODE_IP")]
    pub node_ip: IpAddr,
    /// Where the last known state is kept for restarts without a control plane.
    #[arg(long, env = "STRAIT_DATA_DIR", default_value = "strait-node-data")]
    pub data_dir: PathBuf,
    /// Static mode: Services and EndpointSlices from this manifest file, no control plane.
    #[arg(long, env = "STRAIT_CONFIG_FILE", conflicts_with = "control")]
    pub config_file: Option<PathBuf>,
    /// least-conn (two random choices) or round-robin.
    #[arg(long, env = "STRAIT_LB_POLICY", default_value = "least-conn")]
    pub lb_policy: LbPolicy,
    /// Give up on an endpoint's connect after this long, e.g. 2s.
    #[arg(long, env = "STRAIT_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Close a proxied connection idle this long, e.g. 1h.
    #[arg(long, env = "STRAIT_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// The ClusterIP range (the control plane's --service-cidr): made local on this node with a route unless it is already (that needs CAP_NET_ADMIN).
    #[arg(long, env = "STRAIT_SERVICE_CIDR")]
    pub service_cidr: Option<ipnet::IpNet>,
    /// LoadBalancer ranges (CIDRs, comma-separated; the control plane's --lb-pool), made local like --service-cidr.
    #[arg(long, env = "STRAIT_LB_POOL", value_delimiter = ',')]
    pub lb_pool: Vec<ipnet::IpNet>,
    /// NodePorts also listen on every address of this machine's interfaces
    /// inside these ranges (CIDRs, comma-separated; kube-proxy's flag), read
    /// at startup. Default: --node-ip only.
    #[arg(long, env = "STRAIT_NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<ipnet::IpNet>,
    /// Static pods: register the Pod manifests in this directory, bound to
    /// this node; updated when files change, deleted when files go.
    #[arg(long, env = "STRAIT_PODS_DIR", conflicts_with = "config_file")]
    pub pods_dir: Option<PathBuf>,
    /// Cluster DNS address, UDP and TCP (default: port 53 on --node-ip; `off` disables; port 0 picks one).
    #[arg(long, env = "STRAIT_DNS_LISTEN", value_parser = parse_dns_listen)]
    pub dns_listen: Option<DnsListen>,
    /// The cluster domain: Services are `<svc>.<ns>.svc.<domain>`.
    #[arg(long, env = "STRAIT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Resolvers for other names (comma-separated IP[:port]; default: /etc/resolv.conf's nameservers; `none`: refuse them).
    #[arg(long, env = "STRAIT_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<String>,
    /// TTL in seconds of cluster records and negative answers.
    #[arg(long, env = "STRAIT_DNS_TTL", default_value_t = 5)]
    pub dns_ttl: u32,
    /// HTTP address for /metrics, /healthz and /livez (default 127.0.0.1:10249;
    /// `off` disables; port 0 picks one and prints `metrics on ADDR`).
    #[arg(long, env = "STRAIT_METRICS_LISTEN", value_parser = crate::control::parse_listen)]
    pub metrics_listen: Option<crate::control::Listen>,
    /// /healthz answers 503 once a received change has waited this long to
    /// be programmed (before the first full state: since start), e.g. 60s.
    #[arg(long, env = "STRAIT_HEALTHZ_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub healthz_timeout: Duration,
    /// Forwarding worker threads: each has its own SO_REUSEPORT socket on
    /// every TCP listener address and forwards the connections it accepts
    /// (default: one per CPU).
    #[arg(long, env = "STRAIT_PROXY_WORKERS")]
    pub proxy_workers: Option<std::num::NonZeroUsize>,
}

/// Default address of a node agent's metrics and health endpoints
/// (kube-proxy's metrics port).
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10249);

/// `--dns-listen`: an address, or off.
#[derive(Debug, Clone, Copy)]
pub enum DnsListen {
    Off,
    On(SocketAddr),
}

fn parse_dns_listen(s: &str) -> Result<DnsListen, String> {
    match s {
        "off" | "none" | "false" => Ok(DnsListen::Off),
        _ => s
            .parse()
            .map(DnsListen::On)
            .map_err(|e| format!("{e}: expected IP:PORT or off")),
    }
}

/// The DNS settings of a node agent: listen address, and the upstreams
/// (`--dns-upstream`, else /etc/resolv.conf without this server itself).
pub fn dns_settings(
    listen: Option<DnsListen>,
    node_ip: IpAddr,
    upstream: &[String],
) -> anyhow::Result<(Option<SocketAddr>, Vec<SocketAddr>)> {
    let listen = match listen {
        Some(DnsListen::Off) => None,
        Some(DnsListen::On(a)) => Some(a),
        None => Some(SocketAddr::new(node_ip, 53)),
    };
    let upstreams = if upstream.iter().any(|u| u == "none") {
        Vec::new()
    } else if upstream.is_empty() {
        let path = std::path::Path::new("/etc/resolv.conf");
        strait_node::dns::upstream::resolv_conf(path, listen).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no DNS upstreams: cannot read /etc/resolv.conf");
            Vec::new()
        })
    } else {
        upstream
            .iter()
            .map(|u| {
                strait_node::dns::upstream::parse_upstream(u)
                    .with_context(|| format!("--dns-upstream {u:?}: expected IP or IP:PORT"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    Ok((listen, upstreams))
}

impl NodeArgs {
    pub fn config(&self) -> anyhow::Result<Config> {
        let (dns_listen, dns_upstream) =
            dns_settings(self.dns_listen, self.node_ip, &self.dns_upstream)?;
        Ok(Config {
            name: self.name.clone(),
            control: self.control.clone(),
            node_ip: self.node_ip,
            data_dir: self.data_dir.clone(),
            config_file: self.config_file.clone(),
            lb_policy: self.lb_policy,
            connect_timeout: self.connect_timeout,
            idle_timeout: Some(self.idle_timeout),
            service_cidr: self.service_cidr,
            lb_pool: self.lb_pool.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            pods_dir: self.pods_dir.clone(),
            dns_listen,
            cluster_domain: self.cluster_domain.clone(),
            dns_upstream,
            dns_ttl: self.dns_ttl,
            metrics_listen: crate::control::metrics_address(
                self.metrics_listen,
                DEFAULT_METRICS_LISTEN,
            )
            .0,
            healthz_timeout: self.healthz_timeout,
            proxy_workers: self
                .proxy_workers
                .unwrap_or_else(strait_node::workers::default_count),
            ..Config::default()
        })
    }
}

pub async fn run(args: NodeArgs, tls: &crate::client::TlsArgs) -> anyhow::Result<()> {
    let mut cfg = args.config()?;
    if cfg.config_file.is_none() {
        cfg.tls = tls.files()?;
    }
    let (_, metrics_required) =
        crate::control::metrics_address(args.metrics_listen, DEFAULT_METRICS_LISTEN);
    tracing::info!(config = ?cfg, "starting node agent");
    let bound = match strait_node::app::build(cfg.clone()).await {
        Err(strait_node::AppError::Metrics(e)) if !metrics_required => {
            tracing::warn!(error = %e, "serving no metrics or health endpoints: the default port is taken (set --metrics-listen)");
            strait_node::app::build(Config {
                metrics_listen: None,
                ..cfg
            })
            .await
        }
        other => other,
    }
    .context("starting the node agent")?;
    // Tests and scripts starting on port 0 read the ports from here.
    let mut lines = String::new();
    if let Some(addr) = bound.dns_addr() {
        lines.push_str(&format!("dns listening on {addr}\n"));
    }
    if let Some(addr) = bound.metrics_addr() {
        lines.push_str(&format!("metrics on {addr}\n"));
    }
    crate::control::print_lines(&lines);
    let watchdog = tokio_util::sync::CancellationToken::new();
    crate::systemd::spawn_watchdog(watchdog.clone());
    crate::systemd::ready("node agent running");
    crate::control::shutdown_signal().await;
    tracing::info!("shutting down");
    crate::systemd::stopping();
    watchdog.cancel();
    bound.shutdown().await;
    Ok(())
}
