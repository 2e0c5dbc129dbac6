//! Openraft wiring: the type config, and the state machine that feeds
//! committed commands to `State::apply` and persists snapshots. The state
//! itself lives in memory; durability comes from the fsynced log and
//! snapshots (openraft re-applies the committed log after a restart).

use std::fmt;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::service::Allocators;
use crate::state::{ApiError, Command, Outcome, State};
use crate::watch::{self, Shared};

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Apply { object, .. } => write!(f, "apply({} bytes)", object.len()),
            Command::Delete {
                kind,
                namespace,
                name,
                ..
            } => write!(f, "delete({kind} {namespace}/{name})"),
        }
    }
}

/// The state machine's answer to one command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response(pub Result<Outcome, ApiError>);

openraft::declare_raft_types!(
    /// Strait's Raft types: node ids are u64, nodes carry their address.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

/// What a snapshot file holds besides the state bytes.
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    last_log_id: Option<LogId>,
    last_membership: StoredMembership,
}

/// The replicated state machine of one replica.
pub struct StateMachine {
    shared: Shared,
    alloc: Allocators,
    dir: PathBuf,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    current: Option<(SnapshotMeta, Vec<u8>)>,
}

fn io_err(what: &str, e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Writes `bytes` to `path` crash-safely: temp file, fsync, rename, fsync dir.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn encode_snapshot(meta: &SnapshotMeta, data: &[u8]) -> io::Result<Vec<u8>> {
    let header = SnapshotHeader {
        last_log_id: meta.last_log_id,
        last_membership: meta.last_membership.clone(),
    };
    let h = serde_json::to_vec(&header).map_err(|e| io_err("encode snapshot header", e))?;
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    Ok(out)
}

fn decode_snapshot(bytes: &[u8]) -> io::Result<(SnapshotMeta, Vec<u8>)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "snapshot file is truncated");
    let len = bytes.get(..8).ok_or_else(bad)?;
    let len = u64::from_le_bytes(len.try_into().map_err(|_| bad())?) as usize;
    let h = bytes.get(8..8 + len).ok_or_else(bad)?;
    let header: SnapshotHeader =
        serde_json::from_slice(h).map_err(|e| io_err("decode snapshot header", e))?;
    let meta = SnapshotMeta {
        last_log_id: header.last_log_id,
        last_membership: header.last_membership,
    };
    Ok((meta, bytes[8 + len..].to_vec()))
}

impl StateMachine {
    const SNAPSHOT_FILE: &'static str = "snapshot.bin";

    /// Opens the state machine; a snapshot found in `dir` is offered to
    /// openraft through `get_current_snapshot` and installed at start-up.
    pub fn open(dir: &Path, alloc: Allocators, shared: Shared) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(Self::SNAPSHOT_FILE);
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(decode_snapshot(&bytes)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            shared,
            alloc,
            dir: dir.to_path_buf(),
            last_applied: None,
            last_membership: StoredMembership::default(),
            current,
        })
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// Builds a snapshot from a point-in-time copy of the state.
pub struct SnapshotBuilder {
    bytes: Vec<u8>,
    meta: SnapshotMeta,
    dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, bytes) = (self.meta.clone(), std::mem::take(&mut self.bytes));
        let path = self.dir.join(StateMachine::SNAPSHOT_FILE);
        // Framing and the fsync'd write of a large state take long enough to
        // stall the runtime's few workers (and every write waiting on them):
        // done on the blocking pool.
        let bytes = tokio::task::spawn_blocking(move || {
            let file = encode_snapshot(&meta, &bytes)?;
            write_atomically(&path, &file)?;
            Ok::<_, io::Error>(bytes)
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?self.meta.last_log_id, bytes = bytes.len(), "snapshot built");
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Cursor::new(bytes),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            let response = match entry.payload {
                EntryPayload::Blank => Response(Err(ApiError::BadRequest("blank entry".into()))),
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Response(Err(ApiError::BadRequest("membership entry".into())))
                }
                EntryPayload::Normal(cmd) => {
                    let now = match &cmd {
                        Command::Apply { now_unix_nanos, .. }
                        | Command::Delete { now_unix_nanos, .. } => *now_unix_nanos,
                    };
                    let span = tracing::info_span!(
                        "state_machine.apply",
                        strait.revision = index,
                        strait.changes = tracing::field::Empty,
                    );
                    let _entered = span.enter();
                    let mut store = watch::write(&self.shared);
                    let applied = store.state_mut().apply(&cmd, index);
                    span.record("strait.changes", applied.changes.len());
                    store.publish(applied.changes, index, now);
                    Response(applied.outcome)
                }
            };
            self.last_applied = Some(entry.log_id);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let bytes = watch::read(&self.shared).state().encode();
        SnapshotBuilder {
            bytes,
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.last_membership.clone(),
            },
            dir: self.dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let bytes = snapshot.into_inner();
        let state =
            State::decode(&bytes, self.alloc.clone()).map_err(|e| io_err("decode snapshot", e))?;
        let file = encode_snapshot(meta, &bytes)?;
        write_atomically(&self.dir.join(Self::SNAPSHOT_FILE), &file)?;
        tracing::info!(last_log_id = ?meta.last_log_id, revision = state.revision(), "snapshot installed");
        watch::write(&self.shared).replace(state);
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.current = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if let Ok(bytes) = std::fs::read(self.dir.join(Self::SNAPSHOT_FILE)) {
            self.current = Some(decode_snapshot(&bytes)?);
        }
        Ok(self.current.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Cursor::new(data.clone()),
        }))
    }
}

/// Shared handle type re-exported for the API layer.
pub type RaftHandle = Arc<Raft>;
