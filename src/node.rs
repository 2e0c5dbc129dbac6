//! `strait node`: flags for one node agent, turned into a
//! `strait_node::config::Config`, then run until SIGINT/SIGTERM.

use std::net::IpAddr;
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
    /// The ClusterIP range, made local on this node when --capture-routes.
    #[arg(long, env = "STRAIT_SERVICE_CIDR")]
    pub service_cidr: Option<ipnet::IpNet>,
    /// LoadBalancer ranges (CIDRs, comma-separated), made local when --capture-routes.
    #[arg(long, env = "STRAIT_LB_POOL", value_delimiter = ',')]
    pub lb_pool: Vec<ipnet::IpNet>,
    /// Add `local` routes for the service CIDR and LB pool (needs root).
    #[arg(long, env = "STRAIT_CAPTURE_ROUTES")]
    pub capture_routes: bool,
}

impl NodeArgs {
    pub fn config(&self) -> Config {
        Config {
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
            capture_routes: self.capture_routes,
            ..Config::default()
        }
    }
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let cfg = args.config();
    tracing::info!(config = ?cfg, "starting node agent");
    let bound = strait_node::app::build(cfg)
        .await
        .context("starting the node agent")?;
    crate::control::shutdown_signal().await;
    tracing::info!("shutting down");
    bound.shutdown().await;
    Ok(())
}
