//! Raft transport between replicas over tonic: the client side openraft
//! calls (`RaftNetworkFactory`/`RaftNetworkV2`, one lazily connected channel
//! per peer) and the `Raft` gRPC service that hands received messages to the
//! local openraft. Payloads are openraft's own serde types as postcard
//! (compact binary serde); the snapshot header is JSON.
//!
//! Replication is pipelined: openraft streams AppendEntries requests to each
//! follower over one long-lived gRPC stream (`StreamAppend`) and the follower
//! answers each in order once it is on disk, so the leader sends new entries
//! without waiting for the follower's previous fsync (etcd's raft transport
//! streams the same way).

use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use strait_proto::tls::Transport;
use strait_proto::v1::RaftPayload;
use strait_proto::v1::raft_client::RaftClient;
use strait_proto::v1::raft_server;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::raft::{Raft, Snapshot, SnapshotMeta, TypeConfig};
use crate::state::Command;

type Vote = openraft::alias::VoteOf<TypeConfig>;

/// Errors of the transport itself.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A peer address that is not a valid URI.
    #[error("invalid peer address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    /// The RPC failed on the wire or at the peer.
    #[error("rpc to {addr} failed: {status}")]
    Rpc { addr: String, status: Status },
    /// A payload that does not (de)serialize.
    #[error("bad raft payload: {0}")]
    Codec(#[from] postcard::Error),
    /// The peer did not answer in time (a leader whose traffic is dropped
    /// would otherwise hold the call until HTTP/2 keepalive gives up).
    #[error("{addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
}

/// How long a read waits for its read index: from the leader, on a follower;
/// from a quorum confirming the leadership, on the leader.
pub(crate) const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a follower waits for the leader's answer to a forwarded write:
/// the writer's own retry budget.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// A heartbeat relay not taken within this is dropped; the next one, a
/// relay interval later, carries newer heartbeats anyway.
const RELAY_TIMEOUT: Duration = Duration::from_secs(1);

/// One RPC to `addr`, bounded by `after`, its reply decoded.
async fn call<T: DeserializeOwned>(
    addr: &str,
    after: Duration,
    rpc: impl Future<Output = Result<tonic::Response<RaftPayload>, Status>>,
) -> Result<T, NetError> {
    let resp = tokio::time::timeout(after, rpc)
        .await
        .map_err(|_| NetError::Timeout {
            addr: addr.into(),
            after,
        })?
        .map_err(|status| NetError::Rpc {
            addr: addr.into(),
            status,
        })?;
    Ok(decode(resp.get_ref())?)
}

/// One lazily connected channel per peer address, shared by Raft
/// replication, write forwarding and read-index calls. Outbound connections
/// leave from `local_ip` when set, so peers (and fault-injecting proxies in
/// tests) see which replica is calling.
#[derive(Clone)]
pub struct Peers {
    local_ip: Option<IpAddr>,
    transport: Transport,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Default for Peers {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Peers {
    /// Plaintext peers; see [`Peers::with_transport`] for mTLS.
    pub fn new(local_ip: Option<IpAddr>) -> Self {
        Self {
            local_ip,
            transport: Transport::Insecure,
            channels: Arc::default(),
        }
    }

    /// Dials peers with `transport` (this replica's control certificate).
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// The channel to `addr` (`host:port` or URL), created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, NetError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let ep = strait_proto::tls::endpoint(addr).map_err(|source| NetError::Address {
            addr: addr.into(),
            source,
        })?;
        let ep = ep
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let ch = self.transport.lazy(ep, self.local_ip);
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Asks the leader at `addr` for a read index (see `Raft.ReadIndex`).
    pub async fn read_index(&self, addr: &str) -> Result<u64, NetError> {
        let mut client = RaftClient::new(self.channel(addr)?);
        call(
            addr,
            READ_INDEX_TIMEOUT,
            client.read_index(RaftPayload::default()),
        )
        .await
    }

    /// Passes node heartbeats this follower heard to the leader at `addr`.
    pub async fn relay_heartbeats(
        &self,
        addr: &str,
        heard: &[crate::liveness::Relayed],
    ) -> Result<(), NetError> {
        let mut client = RaftClient::new(self.channel(addr)?);
        let payload = encode(&heard)?;
        call(addr, RELAY_TIMEOUT, client.relay_heartbeats(payload)).await
    }

    /// Sends a write to the leader on behalf of a follower.
    pub async fn forward_write(
        &self,
        addr: &str,
        cmd: &Command,
    ) -> Result<crate::raft::Response, NetError> {
        let mut client = RaftClient::new(self.channel(addr)?);
        let payload = encode(cmd)?;
        call(addr, FORWARD_TIMEOUT, client.forward_write(payload)).await
    }
}

fn encode<T: Serialize>(v: &T) -> Result<RaftPayload, postcard::Error> {
    Ok(RaftPayload {
        data: postcard::to_allocvec(v)?,
    })
}

fn decode<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, postcard::Error> {
    postcard::from_bytes(&p.data)
}

/// Creates one client per peer.
#[derive(Clone, Default)]
pub struct Network {
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &openraft::BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: self.peers.channel(&node.addr).ok().map(RaftClient::new),
            peers: self.peers.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: u64,
    addr: String,
    client: Option<RaftClient<Channel>>,
    peers: Peers,
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, NetError> {
        match &self.client {
            Some(c) => Ok(c.clone()),
            None => self.peers.channel(&self.addr).map(RaftClient::new),
        }
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        timeout: Duration,
        f: F,
    ) -> Result<Resp, NetError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, Request<RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftPayload>, Status>>,
    {
        let mut request = Request::new(encode(req)?);
        request.set_timeout(timeout);
        let resp = f(self.client()?, request)
            .await
            .map_err(|status| NetError::Rpc {
                addr: self.addr.clone(),
                status,
            })?;
        Ok(decode(resp.get_ref())?)
    }
}

/// The least time an AppendEntries carrying entries gets (see
/// `append_entries`). A peer that is down still fails at once (connection
/// refused or reset); one that hangs is retried after this.
const APPEND_BATCH_TIMEOUT: Duration = Duration::from_secs(2);

fn rpc_error(e: NetError) -> RPCError<TypeConfig> {
    match e {
        NetError::Codec(_) => RPCError::Network(NetworkError::new(&e)),
        _ => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft gives every AppendEntries the heartbeat interval (50 ms)
        // as its deadline. A batch of entries must also be fsynced by the
        // follower, which on a loaded machine or a slow disk takes longer:
        // cut off at 50 ms, the same batch is resent and cut off forever and
        // the follower never catches up (a two-replica majority then cannot
        // commit). Batches get a floor; empty appends keep the short one.
        let ttl = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(APPEND_BATCH_TIMEOUT)
        };
        self.call(
            &rpc,
            ttl,
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
        .map_err(rpc_error)
    }

    /// Opens a `StreamAppend` call and hands openraft the follower's answers.
    /// Every request must be answered within [`APPEND_BATCH_TIMEOUT`] of the
    /// previous answer (or of being sent): a follower that hangs, or a
    /// partition that drops packets without a reset, ends the stream with
    /// Unreachable and openraft opens a new one after its back-off. An idle
    /// stream (nothing unanswered) waits for as long as it takes.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let mut client = self.client().map_err(rpc_error)?;
            let addr = self.addr.clone();
            let sent = Arc::new(AtomicU64::new(0));
            let counted = sent.clone();
            // Dropping the answers (openraft gave up on this stream) ends the requests too, so
            // the abandoned call stops taking new entries and is closed.
            let (abandon, abandoned) = tokio::sync::oneshot::channel::<()>();
            // A request that does not encode ends the stream: openraft sees the
            // follower's answers stop and starts over.
            let requests = input
                .map(|req| encode(&req))
                .take_while(|encoded| {
                    if let Err(e) = encoded {
                        tracing::error!(error = %e, "cannot encode an AppendEntries request");
                    }
                    std::future::ready(encoded.is_ok())
                })
                .filter_map(move |encoded| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    std::future::ready(encoded.ok())
                })
                .take_until(abandoned);
            let rpc_failed = |addr: &str, status| {
                rpc_error(NetError::Rpc {
                    addr: addr.to_string(),
                    status,
                })
            };
            let opened = tokio::time::timeout(
                APPEND_BATCH_TIMEOUT,
                client.stream_append(Request::new(requests)),
            )
            .await
            .map_err(|_| {
                let status = Status::deadline_exceeded(format!(
                    "StreamAppend not answered within {APPEND_BATCH_TIMEOUT:?}"
                ));
                rpc_failed(&addr, status)
            })?;
            let answers = opened
                .map_err(|status| rpc_failed(&addr, status))?
                .into_inner();
            let state = Answers {
                answers,
                sent,
                answered: 0,
                addr,
                done: false,
                _abandon: abandon,
            };
            let stream = futures::stream::unfold(state, |mut state| async move {
                let item = state.next().await?;
                Some((item, state))
            });
            Ok(Box::pin(stream) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, option.hard_ttl(), |mut c, r| async move {
            c.vote(r).await
        })
        .await
        .map_err(rpc_error)
    }

    /// A stopping leader's hand-off (see `app::Bound::shutdown`). A peer
    /// that does not know the call (an older version) answers Unimplemented:
    /// Unreachable to openraft, and that peer elects after its timeout.
    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&req, option.hard_ttl(), |mut c, r| async move {
            c.transfer_leader(r).await
        })
        .await
        .map_err(rpc_error)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = serde_json::to_vec(&(vote, snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let data = snapshot.snapshot.into_inner();
        let mut buf = Vec::with_capacity(8 + header.len() + data.len());
        buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&data);
        let mut client = self
            .client()
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let addr = self.addr.clone();
        let send = async move {
            client
                .install_snapshot(RaftPayload { data: buf })
                .await
                .map_err(|status| NetError::Rpc { addr, status })
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            resp = send => {
                let resp = resp.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
                decode(resp.get_ref()).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
            }
        }
    }
}

/// The follower's side of one `StreamAppend` call, as the leader reads it.
struct Answers {
    answers: tonic::Streaming<RaftPayload>,
    /// Requests handed to the call so far.
    sent: Arc<AtomicU64>,
    answered: u64,
    addr: String,
    done: bool,
    /// Dropped with the answers: ends the requests.
    _abandon: tokio::sync::oneshot::Sender<()>,
}

impl Answers {
    /// The next answer; `None` once the call has ended. An error is the last
    /// item.
    async fn next(
        &mut self,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        if self.done {
            return None;
        }
        let item = self.receive().await;
        self.done = !matches!(item, Some(Ok(_)));
        item
    }

    async fn receive(
        &mut self,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        // Overdue: something was unanswered at the last tick and nothing has
        // been answered since.
        let mut waiting_since_tick = false;
        loop {
            match tokio::time::timeout(APPEND_BATCH_TIMEOUT, self.answers.message()).await {
                Ok(Ok(Some(payload))) => {
                    self.answered += 1;
                    return Some(decode(&payload).map_err(|e| rpc_error(NetError::Codec(e))));
                }
                Ok(Ok(None)) => return None,
                Ok(Err(status)) => {
                    return Some(Err(rpc_error(NetError::Rpc {
                        addr: self.addr.clone(),
                        status,
                    })));
                }
                Err(_elapsed) => {
                    let unanswered = self.sent.load(Ordering::Relaxed) > self.answered;
                    if unanswered && waiting_since_tick {
                        let status = Status::deadline_exceeded(format!(
                            "no answer to an AppendEntries within {APPEND_BATCH_TIMEOUT:?}"
                        ));
                        return Some(Err(rpc_error(NetError::Rpc {
                            addr: self.addr.clone(),
                            status,
                        })));
                    }
                    waiting_since_tick = unanswered;
                }
            }
        }
    }
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerClient({}@{})", self.target, self.addr)
    }
}

/// The receiving side: hands peers' messages to the local Raft.
pub struct RaftService {
    raft: Arc<Raft>,
    writes: crate::api::Writer,
    heartbeats: crate::liveness::Heartbeats,
}

impl RaftService {
    pub fn new(
        raft: Arc<Raft>,
        writes: crate::api::Writer,
        heartbeats: crate::liveness::Heartbeats,
    ) -> Self {
        Self {
            raft,
            writes,
            heartbeats,
        }
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("bad raft payload: {e}"))
}

fn reply<T: Serialize>(v: &T) -> Result<tonic::Response<RaftPayload>, Status> {
    reply_payload(v).map(tonic::Response::new)
}

fn reply_payload<T: Serialize>(v: &T) -> Result<RaftPayload, Status> {
    encode(v).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref()).map_err(bad)?;
        let resp = self
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(&resp)
    }

    type StreamAppendStream = BoxStream<'static, Result<RaftPayload, Status>>;

    /// Feeds the leader's requests to openraft's pipelined append and sends
    /// back each answer as it comes, in order. A request that does not decode
    /// ends the call with InvalidArgument once the answers before it are out.
    async fn stream_append(
        &self,
        req: Request<tonic::Streaming<RaftPayload>>,
    ) -> Result<tonic::Response<Self::StreamAppendStream>, Status> {
        let bad_request = Arc::new(Mutex::new(None::<Status>));
        let noted = bad_request.clone();
        let requests = req
            .into_inner()
            .map(move |payload| {
                payload.and_then(|p| decode::<AppendEntriesRequest<TypeConfig>>(&p).map_err(bad))
            })
            .take_while(move |request| {
                if let Err(status) = request {
                    *noted.lock().unwrap_or_else(|e| e.into_inner()) = Some(status.clone());
                }
                std::future::ready(request.is_ok())
            })
            .filter_map(|request| std::future::ready(request.ok()));
        let answers = self
            .raft
            .stream_append(requests)
            .map(|answer| match answer {
                Ok(result) => reply_payload(&result),
                Err(fatal) => Err(Status::unavailable(fatal.to_string())),
            })
            .chain(
                futures::stream::once(async move {
                    bad_request.lock().unwrap_or_else(|e| e.into_inner()).take()
                })
                .filter_map(|status| std::future::ready(status.map(Err))),
            );
        Ok(tonic::Response::new(Box::pin(answers)))
    }

    async fn vote(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode(req.get_ref()).map_err(bad)?;
        let resp = self
            .raft
            .vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let data = req.into_inner().data;
        let truncated = || Status::invalid_argument("snapshot payload is truncated");
        let len = u64::from_le_bytes(
            data.get(..8)
                .ok_or_else(truncated)?
                .try_into()
                .map_err(|_| truncated())?,
        ) as usize;
        let header = data.get(8..8 + len).ok_or_else(truncated)?;
        let (vote, meta): (Vote, SnapshotMeta) = serde_json::from_slice(header).map_err(bad)?;
        let snapshot = Snapshot {
            meta,
            snapshot: Cursor::new(data[8 + len..].to_vec()),
        };
        let resp = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(&resp)
    }

    async fn read_index(
        &self,
        _req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        if let Some(silent) = crate::api::leader_cut_off(&self.raft) {
            return Err(Status::unavailable(format!(
                "read index: this replica leads but has not heard from a quorum for {silent:?}"
            )));
        }
        let (read_log_id, _) = self
            .raft
            .get_read_log_id(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| Status::unavailable(format!("read index: {e}")))?;
        reply(&read_log_id.index())
    }

    /// Recorded whatever this replica's role: a follower about to lead
    /// then already knows which nodes were alive.
    async fn relay_heartbeats(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let heard: Vec<crate::liveness::Relayed> = decode(req.get_ref()).map_err(bad)?;
        self.heartbeats.record_relayed(&heard);
        reply(&())
    }

    async fn transfer_leader(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let rpc: TransferLeaderRequest<TypeConfig> = decode(req.get_ref()).map_err(bad)?;
        let resp = self
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        reply(&resp)
    }

    async fn forward_write(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, Status> {
        let cmd: Command = decode(req.get_ref()).map_err(bad)?;
        let deadline = tokio::time::Instant::now() + crate::api::WRITE_DEADLINE;
        let resp = self.writes.write_local(cmd, deadline).await?;
        reply(&resp)
    }
}
