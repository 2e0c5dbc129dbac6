//! One load-generator connection to either system, over the same tonic
//! stack: a write is Strait's `Resources.Apply` of a Service, or etcd's
//! `KV.Put` of the same value; cluster status is `Cluster.Status` or
//! `Maintenance.Status`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use strait_proto::v1::{
    ApplyRequest, ClusterStatusRequest, Object, ObjectMeta, Service, ServicePort, ServiceSpec,
    cluster_client::ClusterClient, object, resources_client::ResourcesClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::cluster::System;

/// Generated client for the slice of etcd's API in `proto/`.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

use etcdserverpb::{
    PutRequest, StatusRequest, kv_client::KvClient, maintenance_client::MaintenanceClient,
};

/// The annotation carrying the value in a Strait write.
const VALUE_ANNOTATION: &str = "bench.strait.dev/value";

/// One HTTP/2 connection to one member; clones share the connection.
#[derive(Clone)]
pub struct Conn {
    system: System,
    channel: Channel,
}

/// What a member says about the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The leader as this member knows it: Strait's replica id, or etcd's
    /// member id (translate with the ids from [`Conn::member_id`]).
    pub leader: Option<u64>,
    pub term: u64,
}

impl Conn {
    /// Connects now (not lazily), so connection setup is never timed.
    pub async fn connect(system: System, addr: SocketAddr) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {} at {addr}", system.name()))?;
        Ok(Self { system, channel })
    }

    /// Writes `value` under the unique `key` (a DNS-1035 label) and waits
    /// for the acknowledgement.
    pub async fn put(
        &self,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        match self.system {
            System::Strait => {
                let mut req = tonic::Request::new(ApplyRequest {
                    object: Some(service(key, value)),
                });
                req.set_timeout(timeout);
                ResourcesClient::new(self.channel.clone())
                    .apply(req)
                    .await
                    .map(drop)
            }
            System::Etcd => {
                let mut req = tonic::Request::new(PutRequest {
                    key: format!("/bench/{key}").into_bytes(),
                    value: value.as_bytes().to_vec(),
                    ..Default::default()
                });
                req.set_timeout(timeout);
                KvClient::new(self.channel.clone()).put(req).await.map(drop)
            }
        }
    }

    /// The member's view of leader and term.
    pub async fn status(&self, timeout: Duration) -> Result<Status, tonic::Status> {
        match self.system {
            System::Strait => {
                let mut req = tonic::Request::new(ClusterStatusRequest {});
                req.set_timeout(timeout);
                let resp = ClusterClient::new(self.channel.clone())
                    .status(req)
                    .await?
                    .into_inner();
                let term = resp.members.iter().map(|m| m.term).max().unwrap_or(0);
                Ok(Status {
                    leader: Some(resp.leader_id).filter(|&l| l != 0),
                    term,
                })
            }
            System::Etcd => {
                let resp = self.etcd_status(timeout).await?;
                Ok(Status {
                    leader: Some(resp.leader).filter(|&l| l != 0),
                    term: resp.raft_term,
                })
            }
        }
    }

    /// etcd's id of the member this connection reaches (Strait: `None`,
    /// its ids are the `--id` flags).
    pub async fn member_id(&self, timeout: Duration) -> Result<Option<u64>, tonic::Status> {
        match self.system {
            System::Strait => Ok(None),
            System::Etcd => Ok(self.etcd_status(timeout).await?.header.map(|h| h.member_id)),
        }
    }

    async fn etcd_status(
        &self,
        timeout: Duration,
    ) -> Result<etcdserverpb::StatusResponse, tonic::Status> {
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(timeout);
        Ok(MaintenanceClient::new(self.channel.clone())
            .status(req)
            .await?
            .into_inner())
    }
}

/// A minimal valid ClusterIP Service named `name`, carrying `value`: no
/// selector, so the write allocates a ClusterIP but derives no EndpointSlice.
fn service(name: &str, value: &str) -> Object {
    Object {
        kind: Some(object::Kind::Service(Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                annotations: BTreeMap::from([(VALUE_ANNOTATION.into(), value.into())]),
                ..Default::default()
            }),
            spec: Some(ServiceSpec {
                ports: vec![ServicePort {
                    protocol: "TCP".into(),
                    port: 80,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        })),
    }
}
