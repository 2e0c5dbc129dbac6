//! Wiring: builds the node agent from a [`Config`] and returns a [`Bound`]
//! handle with what tests and the CLI need (bound addresses, the state,
//! shutdown). The state source is a static manifest, or the persisted state
//! plus the control-plane watch; listeners start with the first full state.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::dns::{self, DnsConfig, DnsError, DnsServer};
use crate::drain::Drain;
use crate::listeners::{self, Listeners};
use crate::metrics::Metrics;
use crate::routes::{RouteCapture, RouteError};
use crate::service_health;
use crate::state::NodeState;
use crate::watch::{self as watcher, Registration, WatchError, Watcher};
use crate::workers::Workers;

/// Errors starting the node agent.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The data directory cannot be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The static manifest, the persisted state or the control addresses.
    #[error(transparent)]
    State(#[from] WatchError),
    /// The service CIDR or LB pool cannot be made local.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The TLS certificate, key or CA bundle cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] strait_proto::tls::TlsError),
    /// The DNS address cannot be bound.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// The metrics address cannot be bound.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A forwarding worker or the idle-reaper thread cannot be started.
    #[error("starting forwarding threads: {0}")]
    Threads(#[source] std::io::Error),
}

/// A running node agent.
pub struct Bound {
    state: watch::Receiver<Arc<NodeState>>,
    listeners: Listeners,
    drain: Drain,
    routes: Option<RouteCapture>,
    grace: std::time::Duration,
    dns: Option<DnsServer>,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    /// Kept until connections drained: dropping the workers ends their
    /// connections.
    workers: Option<Arc<Workers>>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("listeners", &self.listeners.bound())
            .field("revision", &self.state.borrow().revision())
            .finish_non_exhaustive()
    }
}

/// Starts the agent. Returns once the state source and listeners are set
/// up; listeners bind when the first full state is available.
pub async fn build(cfg: Config) -> Result<Bound, AppError> {
    info!(
        name = %cfg.name,
        control = ?cfg.control,
        node_ip = %cfg.node_ip,
        data_dir = %cfg.data_dir.display(),
        config_file = ?cfg.config_file,
        lb_policy = ?cfg.lb_policy,
        connect_timeout = ?cfg.connect_timeout,
        idle_timeout = ?cfg.idle_timeout,
        service_cidr = ?cfg.service_cidr,
        lb_pool = ?cfg.lb_pool,
        dns_listen = ?cfg.dns_listen,
        cluster_domain = %cfg.cluster_domain,
        dns_upstream = ?cfg.dns_upstream,
        dns_ttl = cfg.dns_ttl,
        metrics_listen = ?cfg.metrics_listen,
        healthz_timeout = ?cfg.healthz_timeout,
        proxy_workers = cfg.proxy_workers,
        "starting node agent"
    );
    let drain = Drain::new();
    let metrics = Arc::new(Metrics::new(cfg.healthz_timeout));
    let metrics_addr = match cfg.metrics_listen {
        Some(addr) => {
            let (bound, task) =
                crate::metrics::serve(addr, metrics.clone(), drain.stop_token().clone()).await?;
            drain.tracker().spawn(async move {
                let _ = task.await;
            });
            Some(bound)
        }
        None => None,
    };

    let routes = Some(RouteCapture::install(
        cfg.service_cidr.iter().chain(cfg.lb_pool.iter()),
        &cfg.data_dir,
    )?);

    let state = match state_source(&cfg, &drain, &metrics) {
        Ok(rx) => rx,
        Err(e) => {
            if let Some(mut r) = routes {
                r.remove();
            }
            return Err(e);
        }
    };
    let dns = match cfg.dns_listen {
        Some(listen) => {
            let dns_cfg = DnsConfig {
                listen,
                zone: dns::zone::ZoneConfig {
                    domain: cfg.cluster_domain.clone(),
                    ttl: cfg.dns_ttl,
                },
                upstreams: cfg.dns_upstream.clone(),
            };
            match dns::spawn(dns_cfg, state.clone(), &drain, metrics.clone()).await {
                Ok(server) => Some(server),
                Err(e) => {
                    drain.shutdown(std::time::Duration::ZERO).await;
                    if let Some(mut r) = routes {
                        r.remove();
                    }
                    return Err(e.into());
                }
            }
        }
        None => None,
    };
    let started = Workers::start(cfg.proxy_workers).and_then(|workers| {
        let listeners = listeners::spawn(
            &cfg,
            state.clone(),
            &drain,
            metrics.clone(),
            workers.clone(),
        )?;
        Ok((workers, listeners))
    });
    let (workers, listeners) = match started {
        Ok(w) => w,
        Err(e) => {
            drain.shutdown(std::time::Duration::ZERO).await;
            if let Some(mut r) = routes {
                r.remove();
            }
            return Err(AppError::Threads(e));
        }
    };
    service_health::spawn(
        cfg.name.clone(),
        listeners.node_port_ips().to_vec(),
        state.clone(),
        &drain,
        metrics.clone(),
    );
    Ok(Bound {
        state,
        listeners,
        drain,
        routes,
        grace: cfg.drain_timeout,
        dns,
        metrics,
        metrics_addr,
        workers: Some(workers),
    })
}

/// The state channel, fed by the static file or by the persisted state and
/// the watch (whose tasks are started here).
fn state_source(
    cfg: &Config,
    drain: &Drain,
    metrics: &Arc<Metrics>,
) -> Result<watch::Receiver<Arc<NodeState>>, AppError> {
    if let Some(path) = &cfg.config_file {
        let state = watcher::load_static(path)?;
        info!(file = %path.display(), services = state.services().count(), "static mode");
        let (_tx, rx) = watch::channel(Arc::new(state));
        return Ok(rx);
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| AppError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let initial = match watcher::load_persisted(&cfg.data_dir) {
        Ok(Some(s)) => {
            info!(
                revision = s.revision(),
                services = s.services().count(),
                "loaded the persisted state"
            );
            s
        }
        Ok(None) => NodeState::unsynced(),
        Err(e) => {
            warn!(error = %e, "ignoring the persisted state, waiting for the control plane");
            NodeState::unsynced()
        }
    };
    let (tx, rx) = watch::channel(Arc::new(initial));
    let transport = control_transport(cfg)?;
    let w = Watcher::new(
        &cfg.control,
        Registration {
            name: cfg.name.clone(),
            node_ip: cfg.node_ip,
        },
        tx,
        &transport,
    )?
    .with_metrics(metrics.clone());
    drain.tracker().spawn(w.run(drain.stop_token().clone()));
    drain.tracker().spawn(crate::heartbeat::run(
        cfg.name.clone(),
        cfg.control.clone(),
        transport.clone(),
        metrics.clone(),
        drain.stop_token().clone(),
    ));
    let prober = crate::health::Prober::new(
        cfg.name.clone(),
        cfg.node_ip,
        cfg.control.clone(),
        transport.clone(),
    )
    .with_metrics(metrics.clone());
    drain
        .tracker()
        .spawn(prober.run(drain.stop_token().clone()));
    if let Some(dir) = &cfg.pods_dir {
        let pods = crate::pods::StaticPods::new(
            dir.clone(),
            cfg.name.clone(),
            cfg.control.clone(),
            transport,
        );
        drain.tracker().spawn(pods.run(drain.stop_token().clone()));
    }
    drain.tracker().spawn(watcher::persist_loop(
        cfg.data_dir.clone(),
        rx.clone(),
        drain.stop_token().clone(),
    ));
    Ok(rx)
}

/// mTLS towards the control plane with the node's certificate, or
/// plaintext with a warning.
fn control_transport(cfg: &Config) -> Result<strait_proto::tls::Transport, AppError> {
    use strait_proto::tls::{Role, Transport};
    let Some(files) = &cfg.tls else {
        warn!(
            "TLS is off (--insecure): the control-plane connection is plaintext and unauthenticated"
        );
        return Ok(Transport::Insecure);
    };
    let tls = strait_proto::tls::client_tls(files.clone())?;
    let id = tls.identity();
    if id.role != Role::Node || id.name != cfg.name {
        warn!(identity = %id, node = %cfg.name, "the certificate is not this node's identity (spiffe://<trust-domain>/node/<--name>): the control plane will refuse its writes");
    }
    info!(identity = %id, "mTLS to the control plane");
    Ok(Transport::Tls(tls))
}

impl Bound {
    /// The addresses listening right now.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        self.listeners.bound()
    }

    /// Where cluster DNS answers (UDP and TCP), when enabled.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.map(|d| d.addr)
    }

    /// Where `/metrics`, `/healthz` and `/livez` answer, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The agent's metrics (applied revision, counters).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The latest state, and every later one.
    pub fn state(&self) -> watch::Receiver<Arc<NodeState>> {
        self.state.clone()
    }

    /// Stops accepting and watching, lets open connections finish for
    /// `drain_timeout`, then cuts them and removes captured routes.
    pub async fn shutdown(mut self) {
        info!("node agent shutting down");
        self.drain.shutdown(self.grace).await;
        self.workers.take();
        if let Some(r) = self.routes.as_mut() {
            r.remove();
        }
    }
}
