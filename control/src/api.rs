//! The client-facing gRPC services: resource CRUD and watch (`Resources`)
//! and cluster administration (`Cluster`). Writes become Raft commands; a
//! follower forwards them to the leader. `ApiError`s become `tonic::Status`
//! here and nowhere else.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openraft::async_runtime::WatchReceiver;

use crate::raft::Leader;
use openraft::error::ClientWriteError;
use prost::Message;
use strait_proto::Kind;
use strait_proto::fanout::resources_server;
use strait_proto::frame::WatchFrame;
use strait_proto::v1::{
    AddMemberRequest, ApplyRequest, ApplyResponse, ClusterStatusRequest, ClusterStatusResponse,
    Consistency, DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListRequest, ListResponse,
    MemberStatus, MembershipResponse, NodeHeartbeat, NodeStatusRequest, NodeStatusResponse, Object,
    RemoveMemberRequest, WatchRequest, WatchResponse, cluster_server,
};
use tokio::sync::broadcast::{self, error::RecvError};
use tonic::{Request, Response, Status};
use tracing::{Instrument, field};

use crate::authz::{self, Caller};
use crate::liveness::Heartbeats;
use crate::metrics::{Metrics, WatcherGuard};
use crate::propose::{ProposeError, Proposer};
use crate::raft::{Raft, Response as RaftResponse};
use crate::raft_net;
use crate::state::{ApiError, Command, Outcome, State, now_unix_nanos, plural};
use crate::watch::{self, Shared, WatchError};

/// Converts an `ApiError` to the gRPC status a client sees.
pub fn status(e: ApiError) -> Status {
    let msg = e.to_string();
    match e {
        ApiError::Invalid { .. } | ApiError::BadRequest(_) => Status::invalid_argument(msg),
        ApiError::TooLarge { .. } => Status::out_of_range(msg),
        ApiError::Conflict { .. } => Status::aborted(msg),
        ApiError::NotFound { .. } => Status::not_found(msg),
        ApiError::Forbidden { .. } => Status::permission_denied(msg),
    }
}

/// The write path shared by the API and the Raft forwarding endpoint.
#[derive(Clone)]
pub struct Writer {
    raft: Arc<Raft>,
    proposer: Proposer,
    shared: Shared,
    peers: raft_net::Peers,
}

impl Writer {
    /// Starts the proposer task, so it must run inside the runtime.
    pub fn new(
        raft: Arc<Raft>,
        shared: Shared,
        peers: raft_net::Peers,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            proposer: Proposer::spawn(raft.clone(), metrics),
            raft,
            shared,
            peers,
        }
    }

    /// Proposes `cmd` through this replica's Raft (must be the leader) and
    /// waits until `deadline` for it to commit, for a client of this replica
    /// or a follower forwarding one.
    pub async fn write_local(
        &self,
        cmd: Command,
        deadline: tokio::time::Instant,
    ) -> Result<RaftResponse, Status> {
        // A dry run against the current state refuses most bad writes
        // without spending a log entry; the state machine checks again.
        if let Err(e) = watch::read(&self.shared).state().check(&cmd) {
            return Ok(RaftResponse(Err(e)));
        }
        if let Some(silent) = leader_cut_off(&self.raft) {
            // Not proposed: another replica may do better, and this one will
            // not learn of a new leader while cut off, so waiting here would
            // only use up the client's time.
            return Err(Status::unavailable(format!(
                "this replica leads but has not heard from a quorum for {silent:?}; \
                 the write was not proposed: send it to another replica"
            )));
        }
        let proposed = tokio::time::timeout_at(deadline, self.proposer.propose(cmd)).await;
        let Ok(proposed) = proposed else {
            return Err(outcome_unknown(&"not committed in time"));
        };
        match proposed {
            Ok(resp) => Ok(resp),
            // Refused before it was appended: nothing happened, so the
            // caller may retry it with the next leader.
            Err(ProposeError::Write(ClientWriteError::ForwardToLeader(f))) => {
                Err(Status::unavailable(format!(
                    "not the leader (leader: {})",
                    f.leader_node
                        .map(|n| n.addr)
                        .unwrap_or_else(|| "unknown".into())
                )))
            }
            // Appended, then the leader changed or stopped: the entry may
            // still commit through another leader.
            Err(e) => Err(outcome_unknown(&e)),
        }
    }

    /// Proposes `cmd`, forwarding to the leader when this replica is not it.
    /// Traced as `raft.commit`: from proposal to committed and applied on
    /// the leader.
    pub async fn write(&self, cmd: Command) -> Result<Outcome, Status> {
        let span = tracing::info_span!(
            "raft.commit",
            strait.forwarded = field::Empty,
            strait.leader = field::Empty,
            strait.revision = field::Empty,
        );
        let out = self.write_inner(cmd).instrument(span.clone()).await;
        if let Ok(o) = &out {
            span.record("strait.revision", o.revision);
        }
        out
    }

    async fn write_inner(&self, cmd: Command) -> Result<Outcome, Status> {
        let span = tracing::Span::current();
        let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
        loop {
            let resp = match crate::raft::leader(&self.raft) {
                Leader::Me { id } => {
                    span.record("strait.leader", id);
                    span.record("strait.forwarded", false);
                    self.write_local(cmd.clone(), deadline).await
                }
                Leader::Other { id, addr } => {
                    span.record("strait.leader", id);
                    span.record("strait.forwarded", true);
                    match addr {
                        Some(addr) => self
                            .peers
                            .forward_write(&addr, &cmd)
                            .await
                            .map_err(forward_failure),
                        None => Err(Status::unavailable("leader address unknown")),
                    }
                }
                Leader::Unknown => Err(Status::unavailable("no leader elected yet")),
            };
            match resp {
                Ok(r) => return r.0.map_err(status),
                // `Unavailable` only ever means the write was not appended
                // (no leader, not the leader, the leader unreachable): wait
                // for the next leader and try again. A write that may have
                // been appended is never retried here: a second copy could
                // land after another client's write and undo it, or answer
                // a conflict for a write that succeeded. A leader cut off
                // from its quorum will not learn of the next one: its
                // refusal goes straight back, so the client moves on.
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline
                        && leader_cut_off(&self.raft).is_none() =>
                {
                    let mut rx = self.raft.metrics();
                    let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
                }
                Err(s) => return Err(s),
            }
        }
    }
}

/// How long a write may wait for a leader and for its commit before the
/// client is answered.
pub(crate) const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// The answer for a write that may or may not have been applied: gRPC's
/// `DEADLINE_EXCEEDED` ("may be returned even if the operation has completed
/// successfully"), kubectl's `Timeout`.
fn outcome_unknown(cause: &dyn std::fmt::Display) -> Status {
    Status::deadline_exceeded(format!(
        "the leader changed or failed before answering; the write may or may not have been \
         applied ({cause}); read the object before retrying"
    ))
}

/// What a failed forward to the leader means for the write. The leader's own
/// answer (a status with no transport cause) is passed on as it is; a
/// connection that could not be made carried nothing, so it is
/// `Unavailable`; a connection lost after the write went out leaves its
/// outcome unknown.
fn forward_failure(e: raft_net::NetError) -> Status {
    use std::error::Error;
    match e {
        raft_net::NetError::Rpc { status, .. } if status.source().is_none() => status,
        raft_net::NetError::Rpc { addr, status } if strait_proto::tls::connect_failed(&status) => {
            Status::unavailable(format!(
                "leader at {addr} unreachable: {}",
                status.message()
            ))
        }
        e @ raft_net::NetError::Address { .. } => Status::unavailable(e.to_string()),
        e => outcome_unknown(&e),
    }
}

/// `Resources` service.
#[derive(Clone)]
pub struct ResourcesApi {
    writer: Writer,
    raft: Arc<Raft>,
    shared: Shared,
    metrics: Arc<Metrics>,
    /// Turns true when the replica starts shutting down: open watches end
    /// and new ones are refused, so their clients resume on another replica.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl ResourcesApi {
    pub fn new(writer: Writer, raft: Arc<Raft>, shared: Shared, metrics: Arc<Metrics>) -> Self {
        Self {
            writer,
            raft,
            shared,
            metrics,
            stopping: tokio::sync::watch::channel(false).1,
        }
    }

    /// Ends every watch when `stopping` turns true (see `app::Bound::shutdown`).
    pub fn with_shutdown(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }

    /// Counts a finished write and records its outcome on the request span.
    fn finish_write<T>(
        &self,
        op: &'static str,
        started: std::time::Instant,
        out: &Result<(String, u64), Status>,
        value: T,
    ) -> T {
        let span = tracing::Span::current();
        let result = match out {
            Ok((result, revision)) => {
                span.record("strait.result", result.as_str());
                span.record("strait.revision", *revision);
                match result.as_str() {
                    "created" => "created",
                    "configured" => "configured",
                    "unchanged" => "unchanged",
                    "deleted" => "deleted",
                    _ => "ok",
                }
            }
            Err(status) => {
                span.record("strait.result", "error");
                span.record("strait.error", status.message());
                "error"
            }
        };
        self.metrics.write_done(op, result, started.elapsed());
        value
    }

    /// Waits until this replica has applied everything committed before the
    /// call (read index through the leader), unless serializable is asked.
    async fn read_barrier(&self, consistency: i32) -> Result<(), Status> {
        if consistency == Consistency::Serializable as i32 {
            return Ok(());
        }
        let leader = crate::raft::leader(&self.raft);
        let unavailable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("linearizable read failed: {e}"))
        };
        if let Leader::Me { .. } = leader {
            if let Some(silent) = leader_cut_off(&self.raft) {
                return Err(unavailable(&format_args!(
                    "this replica leads but has not heard from a quorum for {silent:?}"
                )));
            }
            let confirmed = self
                .raft
                .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex);
            return match tokio::time::timeout(raft_net::READ_INDEX_TIMEOUT, confirmed).await {
                Ok(r) => r.map(|_| ()).map_err(|e| unavailable(&e)),
                Err(_) => Err(unavailable(&format_args!(
                    "no quorum confirmed this replica's leadership within {:?}",
                    raft_net::READ_INDEX_TIMEOUT
                ))),
            };
        }
        // A follower asks the leader for the commit index to catch up to
        // (the read-index protocol), then serves from its own state.
        let Leader::Other {
            addr: Some(addr), ..
        } = leader
        else {
            return Err(unavailable(&"no leader known"));
        };
        let index = self
            .writer
            .peers
            .read_index(&addr)
            .await
            .map_err(|e| unavailable(&e))?;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }
}

/// Authorization of writes (see `authz`). A node's write is checked against
/// the stored object read at a linearizable point, and pinned to that
/// object's resourceVersion, so it cannot land on an object that changed
/// (was re-bound, say) between the check and the commit.
impl ResourcesApi {
    fn stored(&self, kind: Kind, namespace: &str, name: &str) -> Option<Object> {
        let ns = match (kind.namespaced(), namespace.is_empty()) {
            (false, _) => "",
            (true, true) => "default",
            (true, false) => namespace,
        };
        watch::read(&self.shared)
            .state()
            .get(kind, ns, name)
            .cloned()
    }

    async fn authorize_apply(&self, caller: &Caller, object: &mut Object) -> Result<(), Status> {
        const METHOD: &str = "Resources.Apply";
        let stored = match (caller.node(), object.kind()) {
            (Some(_), Some(kind)) => {
                self.read_barrier(Consistency::Linearizable as i32).await?;
                self.stored(kind, object.namespace(), object.name())
            }
            _ => None,
        };
        authz::apply(caller, object, stored.as_ref()).map_err(|d| d.status(METHOD))?;
        if let (Some(old), Some(meta)) = (&stored, object.metadata_mut()) {
            let old_rv = old
                .metadata()
                .map(|m| m.resource_version.clone())
                .unwrap_or_default();
            pin_version(&mut meta.resource_version, old_rv, &meta.name)?;
        }
        Ok(())
    }

    async fn authorize_delete(
        &self,
        caller: &Caller,
        kind: Kind,
        req: &mut DeleteRequest,
    ) -> Result<(), Status> {
        const METHOD: &str = "Resources.Delete";
        let stored = match caller.node() {
            Some(_) => {
                self.read_barrier(Consistency::Linearizable as i32).await?;
                self.stored(kind, &req.namespace, &req.name)
            }
            None => None,
        };
        authz::delete(caller, kind, &req.namespace, &req.name, stored.as_ref())
            .map_err(|d| d.status(METHOD))?;
        if let Some(old) = &stored {
            let old_rv = old
                .metadata()
                .map(|m| m.resource_version.clone())
                .unwrap_or_default();
            pin_version(&mut req.resource_version, old_rv, &req.name)?;
        }
        Ok(())
    }
}

/// Sets a write's resourceVersion precondition to the version authorized;
/// a different one the caller sent is a conflict.
fn pin_version(rv: &mut String, authorized: String, name: &str) -> Result<(), Status> {
    if !rv.is_empty() && *rv != authorized {
        return Err(Status::aborted(format!(
            "Operation cannot be fulfilled on {name:?}: the object has been modified; please apply your changes to the latest version and try again"
        )));
    }
    *rv = authorized;
    Ok(())
}

fn parse_kind(k: &str) -> Result<Kind, Status> {
    k.parse()
        .map_err(|e: strait_proto::UnknownKind| Status::invalid_argument(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<Object, Status> {
    Object::decode(bytes).map_err(|e| Status::internal(format!("stored object undecodable: {e}")))
}

/// The write handlers behind the traced, counted trait methods.
impl ResourcesApi {
    async fn apply_inner(
        &self,
        req: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut object = req
            .into_inner()
            .object
            .ok_or_else(|| Status::invalid_argument("object is required"))?;
        let span = tracing::Span::current();
        span.record(
            "strait.kind",
            object.kind().map(|k| k.to_string()).unwrap_or_default(),
        );
        let namespaced = object.kind().is_some_and(|k| k.namespaced());
        span.record(
            "strait.namespace",
            match object.namespace() {
                "" if namespaced => "default",
                ns => ns,
            },
        );
        span.record("strait.name", object.name());
        self.authorize_apply(&caller, &mut object).await?;
        State::admit(&object).map_err(status)?;
        let cmd = Command::Apply {
            object: object.encode_to_vec(),
            now_unix_nanos: now_unix_nanos(),
        };
        let out = self.writer.write(cmd).await?;
        Ok(Response::new(ApplyResponse {
            object: Some(decode(&out.object)?),
            result: out.result,
            revision: out.revision,
        }))
    }

    async fn delete_inner(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        self.authorize_delete(&caller, kind, &mut req).await?;
        let cmd = Command::Delete {
            kind: req.kind,
            namespace: req.namespace,
            name: req.name,
            resource_version: req.resource_version,
            now_unix_nanos: now_unix_nanos(),
            grace_seconds: req.grace_period_seconds,
        };
        let out = self.writer.write(cmd).await?;
        Ok(Response::new(DeleteResponse {
            object: Some(decode(&out.object)?),
            revision: out.revision,
        }))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchFrame, Status>> + Send>>;

#[tonic::async_trait]
impl resources_server::Resources for ResourcesApi {
    #[tracing::instrument(
        name = "Resources.Apply",
        skip_all,
        fields(
            otel.kind = "server",
            strait.kind = field::Empty,
            strait.namespace = field::Empty,
            strait.name = field::Empty,
            strait.result = field::Empty,
            strait.revision = field::Empty,
            strait.error = field::Empty,
        )
    )]
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let started = std::time::Instant::now();
        let out = self.apply_inner(req).await;
        let summary = out.as_ref().map(|r| {
            let r = r.get_ref();
            (r.result.clone(), r.revision)
        });
        let summary = summary.map_err(Clone::clone);
        self.finish_write("apply", started, &summary, out)
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        self.read_barrier(req.consistency).await?;
        let ns = if kind.namespaced() && req.namespace.is_empty() {
            "default"
        } else {
            req.namespace.as_str()
        };
        let ns = if kind.namespaced() { ns } else { "" };
        let store = watch::read(&self.shared);
        let object = store
            .state()
            .get(kind, ns, &req.name)
            .cloned()
            .ok_or_else(|| {
                status(ApiError::NotFound {
                    resource: plural(kind).into(),
                    name: req.name.clone(),
                })
            })?;
        Ok(Response::new(GetResponse {
            object: Some(object),
            revision: store.state().revision(),
        }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let req = req.into_inner();
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(parse_kind(&req.kind)?)
        };
        self.read_barrier(req.consistency).await?;
        let store = watch::read(&self.shared);
        let items = store.state().list(kind, &req.namespace).cloned().collect();
        Ok(Response::new(ListResponse {
            items,
            revision: store.state().revision(),
        }))
    }

    #[tracing::instrument(
        name = "Resources.Delete",
        skip_all,
        fields(
            otel.kind = "server",
            strait.kind = %req.get_ref().kind,
            strait.namespace = %req.get_ref().namespace,
            strait.name = %req.get_ref().name,
            strait.result = field::Empty,
            strait.revision = field::Empty,
            strait.error = field::Empty,
        )
    )]
    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let started = std::time::Instant::now();
        let out = self.delete_inner(req).await;
        let summary = out
            .as_ref()
            .map(|r| ("deleted".to_string(), r.get_ref().revision))
            .map_err(Clone::clone);
        self.finish_write("delete", started, &summary, out)
    }
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = req.into_inner();
        if *self.stopping.borrow() {
            return Err(shutting_down(req.revision));
        }
        let kinds = req
            .kinds
            .iter()
            .map(|k| parse_kind(k))
            .collect::<Result<Vec<_>, _>>()?;
        let start = watch::read(&self.shared)
            .subscribe(req.revision)
            .map_err(|e| match e {
                WatchError::Compacted { .. } => Status::failed_precondition(e.to_string()),
            })?;
        let watcher = Watcher::new(
            start,
            req.revision,
            kinds,
            self.shared.clone(),
            self.metrics.clone(),
            self.stopping.clone(),
        )
        .with_contact(raft_contact(self.raft.clone()));
        Ok(Response::new(Box::pin(watcher.into_stream())))
    }
}

/// Resolves once `stopping` is true; never, if nobody can set it any more.
pub(crate) async fn until_stopping(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What a watcher gets when this replica stops: Unavailable, which watch
/// clients take as "resume from your revision on another replica".
fn shutting_down(revision: u64) -> Status {
    Status::unavailable(format!(
        "control replica shutting down; resume from revision {revision} on another replica"
    ))
}

/// Whether this replica still hears from a leader (`Err` says why not): a
/// replica cut off from the others keeps serving its state, which no longer
/// moves, so its watchers should resume on another replica.
pub type Contact = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// How long a leader may go without hearing from a quorum before it is taken
/// as cut off (openraft's leader lease is far shorter).
const QUORUM_SILENCE: Duration = Duration::from_secs(3);

/// The [`Contact`] of a Raft replica: a follower or candidate that knows no
/// leader is cut off; so is a leader of several voters that has not heard
/// from a quorum for [`QUORUM_SILENCE`].
pub fn raft_contact(raft: Arc<Raft>) -> Contact {
    Arc::new(move || {
        if raft.metrics().borrow_watched().current_leader.is_none() {
            return Err("this replica has no leader".into());
        }
        match leader_cut_off(&raft) {
            Some(silent) => Err(format!(
                "this replica leads but has not heard from a quorum for {silent:?}"
            )),
            None => Ok(()),
        }
    })
}

/// How long this replica has led without hearing from a quorum, once that is
/// over [`QUORUM_SILENCE`]. `None` for a follower, a lone voter, a leader in
/// touch, and a new leader not yet acknowledged. A leader cut off from the
/// others never learns that they elected another, so it refuses new writes
/// and linearizable reads instead of holding them until they time out, and
/// sends its watchers elsewhere (the role etcd's check-quorum plays).
pub(crate) fn leader_cut_off(raft: &Raft) -> Option<Duration> {
    use openraft::Instant as _;
    let rx = raft.metrics();
    let m = rx.borrow_watched();
    if m.current_leader != Some(m.id) || m.membership_config.membership().voter_ids().count() <= 1 {
        return None;
    }
    let silent = m.last_quorum_acked.as_ref()?.elapsed();
    (silent > QUORUM_SILENCE).then_some(silent)
}

/// One watcher's stream: initial state or backlog, then live revisions, each
/// cut from the bytes encoded once per revision; periodic progress responses
/// (no events) tell an idle watcher how far it is current. Polled directly by
/// the connection's response task: no task or channel of its own.
struct Watcher {
    /// Initial state and backlog not sent yet.
    pending: VecDeque<watch::Revision>,
    live: broadcast::Receiver<watch::Revision>,
    kinds: Vec<Kind>,
    /// The last revision this watcher is current to.
    last: u64,
    progress: tokio::time::Interval,
    shared: Shared,
    metrics: Arc<Metrics>,
    /// True once the replica is shutting down.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// A lagged watcher gets its error, then the stream ends.
    ended: bool,
    /// Checked at each progress tick; out of contact at two ticks in a row
    /// ends the watch (one could be a moment of election).
    contact: Contact,
    out_of_contact: bool,
    _open: WatcherGuard,
}

/// How often an idle watcher hears how far it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Watcher {
    /// `from`: the revision the client is current to (0: none). A replica
    /// that has not applied it yet (a follower a little behind the one the
    /// client left) must not send it the revisions up to it again.
    fn new(
        start: watch::Start,
        from: u64,
        kinds: Vec<Kind>,
        shared: Shared,
        metrics: Arc<Metrics>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let watch::Start {
            initial,
            backlog,
            live,
        } = start;
        Self {
            pending: initial.into_iter().chain(backlog).collect(),
            live,
            kinds,
            last: from,
            progress: tokio::time::interval_at(
                tokio::time::Instant::now() + PROGRESS_EVERY,
                PROGRESS_EVERY,
            ),
            shared,
            _open: metrics.watcher_opened(),
            metrics,
            stopping,
            ended: false,
            contact: Arc::new(|| Ok(())),
            out_of_contact: false,
        }
    }

    /// Ends the watch when `contact` fails at two progress ticks in a row.
    fn with_contact(mut self, contact: Contact) -> Self {
        self.contact = contact;
        self
    }

    fn into_stream(self) -> impl Stream<Item = Result<WatchFrame, Status>> + Send {
        futures::stream::unfold(self, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        })
    }

    /// This watcher's part of a revision, if any.
    fn frame(&self, resp: &watch::Revision) -> Option<WatchFrame> {
        let span = tracing::debug_span!(
            "watch.send",
            strait.revision = resp.revision(),
            strait.events = field::Empty,
        );
        let _entered = span.enter();
        let frame = resp.frame(&self.kinds)?;
        span.record("strait.events", frame.events());
        Some(frame)
    }

    async fn next(&mut self) -> Option<Result<WatchFrame, Status>> {
        if self.ended {
            return None;
        }
        if *self.stopping.borrow() {
            self.ended = true;
            return Some(Err(shutting_down(self.last)));
        }
        while let Some(resp) = self.pending.pop_front() {
            self.last = resp.revision();
            if let Some(frame) = self.frame(&resp) {
                return Some(Ok(frame));
            }
        }
        loop {
            tokio::select! {
                () = until_stopping(&mut self.stopping) => {
                    self.ended = true;
                    return Some(Err(shutting_down(self.last)));
                }
                msg = self.live.recv() => match msg {
                    Ok(resp) => {
                        if resp.revision() <= self.last && !resp.initial() {
                            continue;
                        }
                        if resp.initial() && resp.revision() < self.last {
                            // A snapshot from the leader put this replica
                            // behind what the client already has: its full
                            // state would take the client back in time.
                            self.ended = true;
                            return Some(Err(Status::unavailable(format!(
                                "this replica is at revision {}, behind the watch; resume from \
                                 revision {} on another replica",
                                resp.revision(),
                                self.last
                            ))));
                        }
                        self.last = resp.revision();
                        if let Some(frame) = self.frame(&resp) {
                            self.metrics.delivered(resp.commit_time_unix_nanos());
                            return Some(Ok(frame));
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        self.ended = true;
                        return Some(Err(Status::resource_exhausted(format!(
                            "watcher fell {n} revisions behind; resume from revision {}",
                            self.last
                        ))));
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = self.progress.tick() => {
                    match (self.contact)() {
                        Ok(()) => self.out_of_contact = false,
                        Err(why) if self.out_of_contact => {
                            self.ended = true;
                            return Some(Err(Status::unavailable(format!(
                                "{why}, so its state may be stale; resume from revision {} on \
                                 another replica",
                                self.last
                            ))));
                        }
                        Err(_) => self.out_of_contact = true,
                    }
                    // Revisions with nothing of interest: say so. Only when
                    // none is still queued for this watcher: publishing
                    // holds the write lock, so under the read lock an empty
                    // receiver means every revision up to the current one
                    // has been seen.
                    {
                        let store = watch::read(&self.shared);
                        if self.live.is_empty() {
                            self.last = self.last.max(store.state().revision());
                        }
                    }
                    let bookmark = WatchResponse { revision: self.last, ..Default::default() };
                    return Some(Ok(WatchFrame::from(&bookmark)));
                }
            }
        }
    }
}

/// `Cluster` service.
#[derive(Clone)]
pub struct ClusterApi {
    raft: Arc<Raft>,
    shared: Shared,
    heartbeats: Heartbeats,
    peers: raft_net::Peers,
}

/// Marks a membership change one replica passed to the leader, so it is not
/// passed on again (two replicas that each think the other leads).
const FORWARDED: &str = "strait-forwarded";

impl ClusterApi {
    pub fn new(
        raft: Arc<Raft>,
        shared: Shared,
        heartbeats: Heartbeats,
        peers: raft_net::Peers,
    ) -> Self {
        Self {
            raft,
            shared,
            heartbeats,
            peers,
        }
    }

    /// Only the leader changes the membership: the leader's Cluster service
    /// when another replica leads (`None` when this one does), refused when
    /// there is no leader or the request was already passed on once.
    fn leader<T>(
        &self,
        req: &Request<T>,
    ) -> Result<
        Option<strait_proto::v1::cluster_client::ClusterClient<tonic::transport::Channel>>,
        Status,
    > {
        let addr = match crate::raft::leader(&self.raft) {
            Leader::Me { .. } => return Ok(None),
            Leader::Other {
                addr: Some(addr), ..
            } => addr,
            Leader::Other { id, addr: None } => {
                return Err(Status::unavailable(format!(
                    "leader {id}'s address unknown"
                )));
            }
            Leader::Unknown => return Err(Status::unavailable("no leader elected yet")),
        };
        if req.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable(format!(
                "not the leader (leader: {addr}), and the request was already forwarded once"
            )));
        }
        let channel = self
            .peers
            .channel(&addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Some(strait_proto::v1::cluster_client::ClusterClient::new(
            channel,
        )))
    }
}

/// `msg` as a request marked as passed on to the leader.
fn forwarded<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req
}

fn membership_status(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(format!("membership change failed: {e}"))
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterApi {
    async fn status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let mut members = BTreeMap::new();
        for (id, node) in membership.nodes() {
            let is_self = *id == m.id;
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map(|l| l.index);
            members.insert(
                *id,
                MemberStatus {
                    id: *id,
                    address: node.addr.clone(),
                    role: if is_self {
                        format!("{:?}", m.state).to_lowercase()
                    } else if Some(*id) == m.current_leader {
                        "leader".into()
                    } else if voters.contains(id) {
                        "follower".into()
                    } else {
                        "learner".into()
                    },
                    term: if is_self { m.current_term } else { 0 },
                    last_log_index: if is_self {
                        m.last_log_index.unwrap_or(0)
                    } else {
                        matched.unwrap_or(0)
                    },
                    applied_index: if is_self {
                        m.last_applied.as_ref().map(|l| l.index).unwrap_or(0)
                    } else {
                        0
                    },
                    voter: voters.contains(id),
                    reachable: is_self || matched.is_some(),
                },
            );
        }
        Ok(Response::new(ClusterStatusResponse {
            leader_id: m.current_leader.unwrap_or(0),
            members: members.into_values().collect(),
            revision: watch::read(&self.shared).state().revision(),
        }))
    }

    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let nodes = self
            .heartbeats
            .all()
            .into_iter()
            .map(|(node_name, at, applied_revision)| NodeHeartbeat {
                node_name,
                applied_revision,
                millis_since_heartbeat: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        Ok(Response::new(NodeStatusResponse {
            nodes,
            revision: watch::read(&self.shared).state().revision(),
        }))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        authz::membership(&Caller::of(&req)?).map_err(|d| d.status("Cluster.AddMember"))?;
        if let Some(mut leader) = self.leader(&req)? {
            return leader.add_member(forwarded(req.into_inner())).await;
        }
        let req = req.into_inner();
        let node = openraft::BasicNode {
            addr: req.address.clone(),
        };
        self.raft
            .add_learner(req.id, node, true)
            .await
            .map_err(membership_status)?;
        let mut voters: std::collections::BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(req.id);
        let resp = self
            .raft
            .change_membership(voters.clone(), false)
            .await
            .map_err(membership_status)?;
        let _ = resp;
        Ok(Response::new(MembershipResponse {
            voters: voters.into_iter().collect(),
        }))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        authz::membership(&Caller::of(&req)?).map_err(|d| d.status("Cluster.RemoveMember"))?;
        if let Some(mut leader) = self.leader(&req)? {
            return leader.remove_member(forwarded(req.into_inner())).await;
        }
        let id = req.into_inner().id;
        let mut voters: std::collections::BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if !voters.remove(&id) {
            return Err(Status::not_found(format!("member {id} is not a voter")));
        }
        self.raft
            .change_membership(voters.clone(), false)
            .await
            .map_err(membership_status)?;
        Ok(Response::new(MembershipResponse {
            voters: voters.into_iter().collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use super::*;
    use crate::watch::tests::{apply_pod, store};

    /// A Pod watcher on `shared` for a client current to `from`, on a
    /// replica that is not shutting down (with no sender left, `stopping`
    /// never turns true).
    fn pod_watcher(shared: &Shared, from: u64) -> Watcher {
        let start = watch::read(shared).subscribe(from).expect("subscribe");
        let (_, stopping) = tokio::sync::watch::channel(false);
        Watcher::new(
            start,
            from,
            vec![Kind::Pod],
            shared.clone(),
            Arc::new(Metrics::new()),
            stopping,
        )
    }

    fn forward(addr: std::net::SocketAddr) -> impl std::future::Future<Output = Status> {
        let peers = raft_net::Peers::new(None);
        let cmd = Command::Delete {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "web".into(),
            resource_version: String::new(),
            now_unix_nanos: 0,
            grace_seconds: None,
        };
        async move {
            let e = peers
                .forward_write(&addr.to_string(), &cmd)
                .await
                .expect_err("nothing answers");
            forward_failure(e)
        }
    }

    /// A leader that cannot be reached got nothing: the write is retried.
    #[tokio::test]
    async fn a_forward_that_cannot_connect_is_retryable() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let s = forward(addr).await;
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    }

    /// A leader whose traffic vanishes (it accepts the connection, then
    /// never answers) does not hold a follower's call for long.
    #[tokio::test]
    async fn a_silent_leader_fails_the_call_after_its_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.expect("accept");
            std::future::pending::<()>().await;
            drop(conn);
        });
        let err = raft_net::Peers::new(None)
            .read_index(&addr.to_string())
            .await
            .expect_err("nothing answers");
        assert!(matches!(err, raft_net::NetError::Timeout { .. }), "{err}");
        held.abort();
    }

    /// A leader that took the write and went away may have applied it: the
    /// write is not retried and the caller is told the outcome is unknown.
    #[tokio::test]
    async fn a_forward_lost_after_sending_has_an_unknown_outcome() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Reads the request's first bytes, then the "leader" dies.
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf).await;
        });
        let s = forward(addr).await;
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
        assert!(
            s.message().contains("may or may not have been applied"),
            "{s:?}"
        );
    }

    /// A progress tick due while a revision is still queued for the watcher
    /// must not announce that revision as seen (and so skip it). `select!`
    /// picks a ready branch at random, hence the rounds.
    #[tokio::test(start_paused = true)]
    async fn a_progress_bookmark_never_skips_a_queued_revision() {
        for round in 0..32 {
            let shared: Shared = Arc::new(RwLock::new(store(100)));
            let mut w = pod_watcher(&shared, 0);
            let initial = w.next().await.expect("open").expect("initial state");
            assert_eq!(initial.events(), 0);
            apply_pod(&mut watch::write(&shared), 1, "10.0.0.1");
            tokio::time::advance(PROGRESS_EVERY).await;
            let mut seen = Vec::new();
            for _ in 0..2 {
                let frame = w.next().await.expect("open").expect("frame");
                let resp = WatchResponse::decode(frame.to_vec().as_slice()).expect("decodes");
                seen.push((resp.revision, resp.events.len()));
            }
            assert!(seen.contains(&(1, 1)), "round {round}: {seen:?}");
        }
    }

    /// A replica that starts shutting down ends an idle watch with
    /// Unavailable (the client resumes elsewhere), then the stream ends.
    #[tokio::test]
    async fn shutdown_ends_an_open_watch() {
        let shared: Shared = Arc::new(RwLock::new(store(100)));
        apply_pod(&mut watch::write(&shared), 1, "10.0.0.1");
        let start = watch::read(&shared).subscribe(0).expect("subscribe");
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut w = Watcher::new(
            start,
            0,
            vec![Kind::Pod],
            shared,
            Arc::new(Metrics::new()),
            stopping,
        );
        w.next().await.expect("open").expect("initial state");
        let waiting = tokio::spawn(async move {
            let end = w.next().await;
            (end, w.next().await.is_none())
        });
        stop.send_replace(true);
        let (end, then_closed) = waiting.await.expect("watcher task");
        let status = end.expect("an answer").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("revision 1"), "{status:?}");
        assert!(then_closed);
    }

    /// A replica out of contact with the leader at two progress ticks in a
    /// row ends its watches with Unavailable; one tick is forgiven.
    #[tokio::test(start_paused = true)]
    async fn a_replica_cut_off_from_the_leader_sends_its_watchers_elsewhere() {
        let shared: Shared = Arc::new(RwLock::new(store(100)));
        apply_pod(&mut watch::write(&shared), 1, "10.0.0.1");
        let cut_off = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = cut_off.clone();
        let mut w = pod_watcher(&shared, 0).with_contact(Arc::new(move || {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                Err("this replica has no leader".into())
            } else {
                Ok(())
            }
        }));
        w.next().await.expect("open").expect("initial state");
        // Out of contact once, back, out again: bookmarks all along.
        for out in [true, false, true] {
            cut_off.store(out, std::sync::atomic::Ordering::SeqCst);
            tokio::time::advance(PROGRESS_EVERY).await;
            let frame = w.next().await.expect("open").expect("a bookmark");
            assert_eq!(frame.events(), 0);
        }
        // Out at a second tick in a row: the watch ends.
        tokio::time::advance(PROGRESS_EVERY).await;
        let status = w.next().await.expect("an answer").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("no leader") && status.message().contains("revision 1"),
            "{status:?}"
        );
        assert!(w.next().await.is_none());
    }

    /// A watch resumed from revision 5 on a replica that then installs a
    /// snapshot at revision 3 is sent elsewhere, not taken back in time by
    /// the snapshot's full state.
    #[tokio::test]
    async fn a_snapshot_behind_the_watch_sends_it_elsewhere() {
        let shared: Shared = Arc::new(RwLock::new(store(100)));
        apply_pod(&mut watch::write(&shared), 1, "10.0.0.1");
        let mut w = pod_watcher(&shared, 5);
        let mut leader = store(100);
        for (i, ip) in ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().enumerate() {
            apply_pod(&mut leader, i as u64 + 1, ip);
        }
        watch::write(&shared).replace(leader.state().clone());
        let status = w.next().await.expect("an answer").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("at revision 3") && status.message().contains("revision 5"),
            "{status:?}"
        );
    }

    /// A watch resumed from revision 2 on a replica that has applied only
    /// revision 1 gets revision 3 first, not revision 2 again.
    #[tokio::test]
    async fn resuming_on_a_replica_behind_skips_what_the_client_has() {
        let shared: Shared = Arc::new(RwLock::new(store(100)));
        apply_pod(&mut watch::write(&shared), 1, "10.0.0.1");
        let mut w = pod_watcher(&shared, 2);
        apply_pod(&mut watch::write(&shared), 2, "10.0.0.2");
        apply_pod(&mut watch::write(&shared), 3, "10.0.0.3");
        let frame = w.next().await.expect("open").expect("frame");
        let resp = WatchResponse::decode(frame.to_vec().as_slice()).expect("decodes");
        assert_eq!(resp.revision, 3);
    }
}
