//! The node agent's settings, gathered in one struct so the CLI parses flags
//! separately from building the agent and tests can start it with port-free
//! defaults.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// How a listener spreads new connections over a service port's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Least active connections among two endpoints chosen at random
    /// ("power of two random choices"): near-optimal spread without a
    /// global ordering, and robust to stale counters.
    #[default]
    LeastConn,
    /// Each endpoint in turn.
    RoundRobin,
}

/// Errors turning a policy name into an [`LbPolicy`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The name is neither `least-conn` nor `round-robin`.
    #[error("unknown load-balancing policy {0:?} (expected \"least-conn\" or \"round-robin\")")]
    UnknownPolicy(String),
}

impl std::str::FromStr for LbPolicy {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "least-conn" | "leastconn" | "p2c" => Ok(LbPolicy::LeastConn),
            "round-robin" | "roundrobin" | "rr" => Ok(LbPolicy::RoundRobin),
            _ => Err(ConfigError::UnknownPolicy(s.to_string())),
        }
    }
}

/// Everything a node agent is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name: the `Node` object it registers, and what
    /// `nodeName` of local endpoints equals (traffic policy Local).
    pub name: String,
    /// Control-plane replica addresses (`host:port`), tried in turn.
    pub control: Vec<String>,
    /// Where NodePorts are bound, and the address the Node registers.
    pub node_ip: IpAddr,
    /// Holds `state.pb`, the last state seen, so forwarding resumes at start
    /// while the control plane is unreachable.
    pub data_dir: PathBuf,
    /// Static mode: Services and EndpointSlices from this manifest file, no
    /// control plane and no persisted state.
    pub config_file: Option<PathBuf>,
    pub lb_policy: LbPolicy,
    /// Per attempt; a failed attempt moves on to another endpoint.
    pub connect_timeout: Duration,
    /// Close a forwarded connection after this long without a byte in either
    /// direction; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// The ClusterIP range, made local with a route unless it is already
    /// (needs CAP_NET_ADMIN unless it is in 127.0.0.0/8).
    pub service_cidr: Option<IpNet>,
    /// LoadBalancer address ranges, made local like the service CIDR.
    pub lb_pool: Vec<IpNet>,
    /// NodePorts listen on `node_ip` and on every address of this machine's
    /// interfaces inside these ranges (kube-proxy's `--nodeport-addresses`).
    pub nodeport_addresses: Vec<IpNet>,
    /// At shutdown, how long open connections may keep running after the
    /// listeners closed before they are cut.
    pub drain_timeout: Duration,
    /// Where cluster DNS listens (UDP and TCP); `None`: no DNS server. The
    /// CLI defaults it to port 53 on the node address.
    pub dns_listen: Option<SocketAddr>,
    /// The zone Service names live in (`<svc>.<ns>.svc.<zone>`).
    pub cluster_domain: String,
    /// Resolvers for names outside the cluster zone; empty: those are
    /// refused. The CLI defaults it to /etc/resolv.conf's nameservers.
    pub dns_upstream: Vec<SocketAddr>,
    /// TTL of cluster records and of negative answers. 5 s, CoreDNS'
    /// kubernetes-plugin default: short enough that clients which cache
    /// see endpoint changes quickly.
    pub dns_ttl: u32,
    /// mTLS towards the control plane (a node identity); `None`: plaintext,
    /// logged as a warning.
    pub tls: Option<strait_proto::tls::TlsFiles>,
    /// Static pods: Pod manifests registered as bound to this node.
    pub pods_dir: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/livez` are served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// `/healthz` answers 503 once a received change has waited this long
    /// to be programmed (kube-proxy: twice its sync period).
    pub healthz_timeout: Duration,
    /// Forwarding worker threads, each accepting and forwarding TCP on its
    /// own runtime ([`crate::workers`]).
    pub proxy_workers: NonZeroUsize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            control: vec!["127.0.0.1:7700".to_string()],
            node_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            data_dir: PathBuf::from("strait-data/node"),
            config_file: None,
            lb_policy: LbPolicy::LeastConn,
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Some(Duration::from_secs(3600)),
            service_cidr: None,
            lb_pool: Vec::new(),
            nodeport_addresses: Vec::new(),
            drain_timeout: Duration::from_secs(5),
            dns_listen: None,
            cluster_domain: "cluster.local".to_string(),
            dns_upstream: Vec::new(),
            dns_ttl: 5,
            tls: None,
            pods_dir: None,
            metrics_listen: None,
            healthz_timeout: crate::metrics::DEFAULT_HEALTH_TIMEOUT,
            proxy_workers: crate::workers::default_count(),
        }
    }
}

/// The kernel's hostname, as the kubelet defaults its node name.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names() {
        assert_eq!(
            "least-conn".parse::<LbPolicy>().expect("lc"),
            LbPolicy::LeastConn
        );
        assert_eq!(
            "round-robin".parse::<LbPolicy>().expect("rr"),
            LbPolicy::RoundRobin
        );
        assert!("random".parse::<LbPolicy>().is_err());
        assert!(!Config::default().name.is_empty());
    }
}
