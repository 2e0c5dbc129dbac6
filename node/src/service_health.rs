//! kube-proxy's service health checks: a LoadBalancer Service with
//! `externalTrafficPolicy: Local` gets an HTTP server on
//! `healthCheckNodePort` of every address its NodePorts listen on, which
//! answers 200 while this node has a ready endpoint of the Service and 503
//! otherwise, so an external load balancer only sends traffic to nodes that
//! can serve it locally.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::state::{NodeState, ServiceKey};

/// How often ports that failed to bind are retried.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// The health-check ports a state asks for, and whose they are.
pub fn wanted(state: &NodeState) -> BTreeMap<u16, ServiceKey> {
    state
        .services()
        .filter_map(|s| Some((s.health_check_node_port?, s.key.clone())))
        .collect()
}

/// Starts keeping one health-check server per wanted port on each of
/// `ips` (the NodePort addresses), reconciled to every new state, until
/// `drain` stops.
pub fn spawn(
    node_name: String,
    ips: Vec<IpAddr>,
    state: watch::Receiver<Arc<NodeState>>,
    drain: &Drain,
    metrics: Arc<Metrics>,
) {
    let r = Reconciler {
        node_name: Arc::from(node_name),
        ips,
        state,
        metrics,
        drain: drain.clone(),
        servers: HashMap::new(),
        failed: HashMap::new(),
    };
    drain.tracker().spawn(r.run());
}

struct Reconciler {
    node_name: Arc<str>,
    ips: Vec<IpAddr>,
    state: watch::Receiver<Arc<NodeState>>,
    metrics: Arc<Metrics>,
    drain: Drain,
    /// A port's servers, one per address, stopped together.
    servers: HashMap<u16, (ServiceKey, CancellationToken, Vec<JoinHandle<()>>)>,
    /// Ports that failed to bind, warned about once until they bind.
    failed: HashMap<u16, ServiceKey>,
}

impl Reconciler {
    async fn run(mut self) {
        let stop = self.drain.stop_token().clone();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = self.state.wait_for(|s| s.is_synced()) => if r.is_err() { return },
        }
        let mut source_open = true;
        loop {
            let wanted = wanted(&self.state.borrow_and_update());
            self.reconcile(wanted).await;
            let retry = async {
                if self.failed.is_empty() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(BIND_RETRY).await
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                r = self.state.changed(), if source_open => source_open = r.is_ok(),
                _ = retry => {}
            }
        }
        for (_, (_, token, handles)) in self.servers.drain() {
            token.cancel();
            futures::future::join_all(handles).await;
        }
    }

    async fn reconcile(&mut self, wanted: BTreeMap<u16, ServiceKey>) {
        let stale: Vec<u16> = self
            .servers
            .iter()
            .filter(|(port, (key, _, _))| wanted.get(port) != Some(key))
            .map(|(port, _)| *port)
            .collect();
        for port in stale {
            if let Some((key, token, handles)) = self.servers.remove(&port) {
                token.cancel();
                // The sockets must be closed before the port can be bound again.
                futures::future::join_all(handles).await;
                info!(port, service = %key, "service health check closed");
            }
        }
        self.failed
            .retain(|port, key| wanted.get(port) == Some(key));
        for (port, key) in wanted {
            if self.servers.contains_key(&port) {
                continue;
            }
            match self.bind_all(port).await {
                Ok(listeners) => {
                    self.failed.remove(&port);
                    let token = self.drain.stop_token().child_token();
                    let check = Check {
                        key: key.clone(),
                        node_name: self.node_name.clone(),
                        state: self.state.clone(),
                        metrics: self.metrics.clone(),
                    };
                    let handles = listeners
                        .into_iter()
                        .map(|listener| {
                            if let Ok(addr) = listener.local_addr() {
                                info!(%addr, service = %key, "service health check listening");
                            }
                            self.drain.tracker().spawn(serve(
                                listener,
                                check.clone(),
                                token.clone(),
                            ))
                        })
                        .collect();
                    self.servers.insert(port, (key, token, handles));
                }
                Err((addr, e)) => {
                    if self.failed.insert(port, key.clone()).is_none() {
                        warn!(%addr, service = %key, error = %e,
                            "cannot listen for the service health check; retrying");
                    }
                }
            }
        }
    }

    /// Binds `port` on every address, or on none: a port served on some
    /// addresses only would tell a load balancer probing the others that
    /// this node cannot serve.
    async fn bind_all(&self, port: u16) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
        let mut listeners = Vec::with_capacity(self.ips.len());
        for ip in &self.ips {
            let addr = SocketAddr::new(*ip, port);
            listeners.push(TcpListener::bind(addr).await.map_err(|e| (addr, e))?);
        }
        Ok(listeners)
    }
}

/// What one health-check server answers about.
#[derive(Clone)]
struct Check {
    key: ServiceKey,
    node_name: Arc<str>,
    state: watch::Receiver<Arc<NodeState>>,
    metrics: Arc<Metrics>,
}

async fn serve(listener: TcpListener, check: Check, stop: CancellationToken) {
    // Like kube-proxy, every path answers.
    let app = Router::new().fallback(answer).with_state(check);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "service health check server stopped");
    }
}

/// kube-proxy's response: 200 with a local ready endpoint and a healthy
/// proxy, 503 otherwise; the count also goes in a weight header.
async fn answer(AxumState(c): AxumState<Check>) -> impl IntoResponse {
    let local = c
        .state
        .borrow()
        .service(&c.key)
        .map(|s| s.local_ready_endpoints(&c.node_name))
        .unwrap_or(0);
    let healthy = c.metrics.health().healthy;
    let body = serde_json::json!({
        "service": {"namespace": c.key.namespace, "name": c.key.name},
        "localEndpoints": local,
        "serviceProxyHealthy": healthy,
    });
    let code = if local > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (
                HeaderName::from_static("x-load-balancing-endpoint-weight"),
                local.to_string(),
            ),
        ],
        body.to_string(),
    )
}
