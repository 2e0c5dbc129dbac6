//! The CLI's connection to the control plane: a list of replicas, tried in
//! turn, so one replica being down does not stop an operator.

use std::time::Duration;

use anyhow::{Context, anyhow};
use strait_proto::v1::cluster_client::ClusterClient;
use strait_proto::v1::resources_client::ResourcesClient;
use tonic::transport::{Channel, Endpoint};

/// Replica addresses; see the module doc.
pub struct Client {
    servers: Vec<String>,
}

const MAX_MESSAGE_BYTES: usize = 256 << 20;

impl Client {
    pub fn new(servers: Vec<String>) -> Self {
        Self { servers }
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut last = None;
        for s in &self.servers {
            let uri = if s.contains("://") {
                s.clone()
            } else {
                format!("http://{s}")
            };
            let ep = Endpoint::from_shared(uri.clone())
                .with_context(|| format!("invalid server address {s:?}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30));
            match ep.connect().await {
                Ok(ch) => return Ok(ch),
                Err(e) => last = Some(anyhow!("{s}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no server given")))
            .context("cannot reach any control-plane replica (set --server or STRAIT_SERVER)")
    }

    pub async fn resources(&self) -> anyhow::Result<ResourcesClient<Channel>> {
        Ok(ResourcesClient::new(self.channel().await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    pub async fn cluster(&self) -> anyhow::Result<ClusterClient<Channel>> {
        Ok(ClusterClient::new(self.channel().await?))
    }
}

/// kubectl's reason words for a gRPC status.
pub fn reason(status: &tonic::Status) -> &'static str {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument => "Invalid",
        Code::Aborted => "Conflict",
        Code::NotFound => "NotFound",
        Code::PermissionDenied => "Forbidden",
        Code::OutOfRange => "RequestEntityTooLarge",
        Code::AlreadyExists => "AlreadyExists",
        Code::Unavailable => "ServiceUnavailable",
        Code::FailedPrecondition => "Expired",
        _ => "InternalError",
    }
}

/// An RPC error for the operator: `Error from server (Invalid): ...`.
pub fn server_error(status: tonic::Status) -> anyhow::Error {
    anyhow!(
        "Error from server ({}): {}",
        reason(&status),
        status.message()
    )
}
