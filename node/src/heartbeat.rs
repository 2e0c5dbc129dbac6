//! Heartbeats to every control replica, so the leader knows this node is
//! alive (a node silent for the control plane's `--node-grace` is marked
//! Ready=False and its endpoints unready). Sent to all replicas so a newly
//! elected leader already has recent ones.

use std::sync::Arc;
use std::time::Duration;

use strait_proto::tls::Transport;
use strait_proto::v1::HeartbeatRequest;
use strait_proto::v1::nodes_client::NodesClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::debug;

use crate::metrics::Metrics;

/// How often a heartbeat is sent.
pub const INTERVAL: Duration = Duration::from_secs(1);

fn client(addr: &str, transport: &Transport) -> Option<NodesClient<Channel>> {
    let ep = crate::control::endpoint(addr).ok()?;
    Some(NodesClient::new(transport.lazy(ep, None)))
}

/// Sends `name`'s heartbeat to every address until `stop`, with the
/// revision `metrics` last saw programmed.
pub async fn run(
    name: String,
    control: Vec<String>,
    transport: Transport,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let clients: Vec<(String, NodesClient<Channel>)> = control
        .iter()
        .filter_map(|a| client(a, &transport).map(|c| (a.clone(), c)))
        .collect();
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (addr, c) in &clients {
            let mut c = c.clone();
            let mut req = tonic::Request::new(HeartbeatRequest {
                node_name: name.clone(),
                applied_revision: metrics.applied_revision(),
            });
            req.set_timeout(INTERVAL);
            let addr = addr.clone();
            // One slow replica must not delay the others.
            tokio::spawn(async move {
                if let Err(e) = c.heartbeat(req).await {
                    debug!(control = %addr, error = %e, "heartbeat not delivered");
                }
            });
        }
    }
}
