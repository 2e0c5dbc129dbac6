//! Openraft wiring: the type config, and the state machine that feeds
//! committed commands to `State::apply` and persists snapshots. The state
//! itself lives in memory; durability comes from the fsynced log and
//! snapshots (openraft re-applies the committed log after a restart).

use std::fmt;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::commit_point::Written;
use crate::service::Allocators;
use crate::state::{ApiError, Command, Objects, Outcome, State};
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

/// Who leads, as this replica's Raft metrics say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    /// No leader is known (an election is on, or this replica is cut off).
    Unknown,
    /// This replica (`id`) leads.
    Me { id: u64 },
    /// Another replica leads; its address, when the membership has it.
    Other { id: u64, addr: Option<String> },
}

/// Reads the metrics in place: cloning them (membership, replication map)
/// per call is not free on the write path.
pub fn leader(raft: &Raft) -> Leader {
    let rx = raft.metrics();
    let m = openraft::async_runtime::WatchReceiver::borrow_watched(&rx);
    match m.current_leader {
        None => Leader::Unknown,
        Some(id) if id == m.id => Leader::Me { id },
        Some(id) => Leader::Other {
            id,
            addr: m
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone()),
        },
    }
}
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;

/// What a snapshot file holds besides the state bytes.
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    last_log_id: Option<LogId>,
    last_membership: StoredMembership,
}

/// When a replica snapshots: after at least `every` entries, and only once
/// the log written since the last snapshot outweighs that snapshot. A
/// snapshot copies the whole state, so tying it to the log's growth keeps
/// its cost a bounded share of the write volume however large the state
/// grows (the compaction rule of log-structured stores); a small state still
/// snapshots every `every` entries. openraft's own policy counts entries
/// only, so it is off and [`run_snapshot_trigger`] asks for snapshots.
pub struct SnapshotPolicy {
    pub every: u64,
    /// Signalled when a snapshot is due.
    pub due: Arc<tokio::sync::Notify>,
}

/// What the log has grown by since the last snapshot.
#[derive(Debug, Default)]
struct SinceSnapshot {
    entries: u64,
    bytes: u64,
    /// `entries` when a snapshot was last asked for (0: not asked).
    asked_at: u64,
}

impl SinceSnapshot {
    /// Whether to ask for a snapshot now (see [`SnapshotPolicy`]), given
    /// the size of the last one; when one was asked for and has not started,
    /// asks again only after another `every` entries.
    fn ask(&mut self, every: u64, last_snapshot_bytes: u64) -> bool {
        let every = every.max(1);
        let due = self.entries >= every
            && self.bytes >= last_snapshot_bytes
            && (self.asked_at == 0 || self.entries >= self.asked_at + every);
        if due {
            self.asked_at = self.entries;
        }
        due
    }
}

/// The replicated state machine of one replica.
pub struct StateMachine {
    shared: Shared,
    alloc: Allocators,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    current: Option<(SnapshotMeta, Vec<u8>)>,
    file: SnapshotFile,
    policy: SnapshotPolicy,
    since: SinceSnapshot,
    /// Encoded size of the latest snapshot, set by its builder.
    snapshot_bytes: Arc<AtomicU64>,
    /// How far the log's commit point file reaches: an entry is applied only once it is
    /// covered, so a replica never serves a state it could not restart with.
    written: Written,
}

/// Asks `raft` for a snapshot whenever the state machine says one is due,
/// until the Raft instance is gone or shut down.
pub async fn run_snapshot_trigger(raft: Weak<Raft>, due: Arc<tokio::sync::Notify>) {
    loop {
        due.notified().await;
        let Some(raft) = raft.upgrade() else { return };
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::debug!(error = %e, "snapshot trigger stops: raft is shut down");
            return;
        }
    }
}

fn io_err(what: &str, e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Writes `parts`, one after another, to `path` crash-safely: temp file,
/// fsync, rename, fsync dir; a failed write removes the temp file.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|f| {
            let mut f = std::io::BufWriter::new(f);
            for part in parts {
                f.write_all(part)?;
            }
            f.into_inner()
                .map_err(io::IntoInnerError::into_error)?
                .sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Leave no partial temp file behind (a full disk would keep it).
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The snapshot file's framing, written before the state bytes: the
/// header's length (u64, little-endian), then the header as JSON.
fn snapshot_prefix(meta: &SnapshotMeta) -> io::Result<Vec<u8>> {
    let header = SnapshotHeader {
        last_log_id: meta.last_log_id,
        last_membership: meta.last_membership.clone(),
    };
    let h = serde_json::to_vec(&header).map_err(|e| io_err("encode snapshot header", e))?;
    let mut out = Vec::with_capacity(8 + h.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    Ok(out)
}

/// Writes a snapshot file: framing, then the state bytes.
fn write_snapshot(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    write_atomically(path, &[&snapshot_prefix(meta)?, data])
}

/// The snapshot file, written by a build (on the blocking pool) and by an
/// install from the leader (on the state machine's task), which openraft
/// may run at the same time. One writer at a time, and never backwards: a
/// build that finishes after a later snapshot was installed leaves the file
/// alone, since openraft may already have purged the log up to the
/// installed one and a replica restarting from the older file could not
/// catch up from its own log.
#[derive(Clone)]
struct SnapshotFile {
    path: PathBuf,
    /// The last log id of the snapshot in the file.
    newest: Arc<tokio::sync::Mutex<Option<LogId>>>,
}

impl SnapshotFile {
    fn new(path: PathBuf, newest: Option<LogId>) -> Self {
        Self {
            path,
            newest: Arc::new(tokio::sync::Mutex::new(newest)),
        }
    }

    /// Writes the snapshot unless the file holds one as new or newer;
    /// returns whether it wrote. From a blocking thread.
    fn write_blocking(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<bool> {
        let mut newest = self.newest.blocking_lock();
        Self::write_locked(&self.path, &mut newest, meta, data)
    }

    /// As [`Self::write_blocking`], from the runtime.
    async fn write(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<bool> {
        let mut newest = self.newest.lock().await;
        Self::write_locked(&self.path, &mut newest, meta, data)
    }

    fn write_locked(
        path: &Path,
        newest: &mut Option<LogId>,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> io::Result<bool> {
        if newest.is_some() && *newest >= meta.last_log_id {
            return Ok(false);
        }
        write_snapshot(path, meta, data)?;
        *newest = meta.last_log_id;
        Ok(true)
    }
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
    /// `written` is the log store's [`crate::log_store::LogStore::written`].
    pub fn open(
        dir: &Path,
        alloc: Allocators,
        shared: Shared,
        policy: SnapshotPolicy,
        written: Written,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(Self::SNAPSHOT_FILE);
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(decode_snapshot(&bytes)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let snapshot_bytes = current.as_ref().map_or(0, |(_, data)| data.len() as u64);
        let file = SnapshotFile::new(
            path,
            current.as_ref().and_then(|(meta, _)| meta.last_log_id),
        );
        Ok(Self {
            shared,
            alloc,
            last_applied: None,
            last_membership: StoredMembership::default(),
            current,
            file,
            policy,
            since: SinceSnapshot::default(),
            snapshot_bytes: Arc::new(AtomicU64::new(snapshot_bytes)),
            written,
        })
    }

    /// Counts an applied entry of about `bytes` toward the next snapshot.
    fn grew(&mut self, bytes: u64) {
        self.since.entries += 1;
        self.since.bytes += bytes;
    }

    /// Signals a due snapshot.
    fn ask_for_snapshot_if_due(&mut self) {
        let last = self.snapshot_bytes.load(Ordering::Relaxed);
        if self.since.ask(self.policy.every, last) {
            self.policy.due.notify_one();
        }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// Builds a snapshot from a point-in-time copy of the state: an O(1) copy
/// of the persistent object maps, taken on the state machine's task, and
/// encoded and written on the blocking pool while applies go on.
pub struct SnapshotBuilder {
    objects: Objects,
    revision: u64,
    meta: SnapshotMeta,
    file: SnapshotFile,
    /// Where the encoded size goes, for the next snapshot's [`SnapshotPolicy`].
    size: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, objects, revision) = (
            self.meta.clone(),
            std::mem::take(&mut self.objects),
            self.revision,
        );
        let file = self.file.clone();
        // Encoding, framing and the fsync'd write of a large state take long
        // enough to stall the runtime's few workers (and every write waiting
        // on them): done on the blocking pool.
        let size = self.size.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let bytes = objects.encode(revision);
            size.store(bytes.len() as u64, Ordering::Relaxed);
            let written = file.write_blocking(&meta, &bytes)?;
            Ok::<_, io::Error>((bytes, written))
        })
        .await
        .map_err(io::Error::other)??;
        let (bytes, written) = bytes;
        if written {
            tracing::info!(last_log_id = ?self.meta.last_log_id, bytes = bytes.len(), "snapshot built");
        } else {
            tracing::info!(last_log_id = ?self.meta.last_log_id, "snapshot built, but a later one was installed meanwhile: not written");
        }
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
            self.written.wait_for(index).await?;
            // About what the entry takes in the log: its object, or a small
            // fixed size for everything else.
            self.grew(match &entry.payload {
                EntryPayload::Normal(Command::Apply { object, .. }) => object.len() as u64 + 32,
                _ => 64,
            });
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
        self.ask_for_snapshot_if_due();
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let (objects, revision) = watch::read(&self.shared).state().snapshot();
        self.since = SinceSnapshot::default();
        SnapshotBuilder {
            objects,
            revision,
            size: self.snapshot_bytes.clone(),
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.last_membership.clone(),
            },
            file: self.file.clone(),
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
        self.file.write(meta, &bytes).await?;
        tracing::info!(last_log_id = ?meta.last_log_id, revision = state.revision(), "snapshot installed");
        watch::write(&self.shared).replace(state);
        self.snapshot_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        self.since = SinceSnapshot::default();
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.current = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if let Ok(bytes) = std::fs::read(&self.file.path) {
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

#[cfg(test)]
mod tests {
    use super::{
        LogId, SinceSnapshot, SnapshotFile, SnapshotMeta, decode_snapshot, write_atomically,
    };

    fn meta(index: u64) -> SnapshotMeta {
        let id: LogId = openraft::testing::log_id::<super::TypeConfig>(1, 1, index);
        SnapshotMeta {
            last_log_id: Some(id),
            last_membership: Default::default(),
        }
    }

    /// A build that finishes after a later snapshot was installed must not
    /// put the older one back: the log before the installed one may be gone.
    #[tokio::test]
    async fn the_snapshot_file_never_goes_back_to_an_older_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot.bin");
        let file = SnapshotFile::new(path.clone(), None);
        let in_file = || {
            let (m, data) = decode_snapshot(&std::fs::read(&path).expect("read")).expect("decode");
            (m.last_log_id.map(|l| l.index), data)
        };
        assert!(file.write(&meta(10), b"ten").await.expect("install"));
        let late = file.clone();
        let wrote = tokio::task::spawn_blocking(move || late.write_blocking(&meta(5), b"five"))
            .await
            .expect("join")
            .expect("build");
        assert!(!wrote);
        assert_eq!(in_file(), (Some(10), b"ten".to_vec()));
        assert!(file.write(&meta(11), b"eleven").await.expect("install"));
        assert_eq!(in_file(), (Some(11), b"eleven".to_vec()));
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A non-empty directory where the file goes: the rename fails.
        let path = dir.path().join("snapshot.bin");
        std::fs::create_dir(&path).expect("mkdir");
        std::fs::write(path.join("x"), b"x").expect("write");
        write_atomically(&path, &[b"a", b"b"]).expect_err("rename must fail");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("snapshot.bin")]);

        std::fs::remove_dir_all(&path).expect("rm");
        write_atomically(&path, &[b"a", b"b"]).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"ab");
    }

    fn grown(entries: u64, bytes: u64) -> SinceSnapshot {
        SinceSnapshot {
            entries,
            bytes,
            asked_at: 0,
        }
    }

    #[test]
    fn a_small_state_snapshots_every_n_entries() {
        assert!(!grown(99, 99_000).ask(100, 1_000));
        assert!(grown(100, 100_000).ask(100, 1_000));
    }

    #[test]
    fn a_large_state_waits_until_the_log_outweighs_its_last_snapshot() {
        let mut since = grown(5_000, 1_000_000);
        assert!(!since.ask(100, 40_000_000), "log smaller than the snapshot");
        since = grown(120_000, 40_000_000);
        assert!(since.ask(100, 40_000_000));
    }

    #[test]
    fn asks_again_only_after_another_interval() {
        let mut since = grown(100, 10_000);
        assert!(since.ask(100, 0));
        since.entries = 150;
        assert!(!since.ask(100, 0), "asked 50 entries ago");
        since.entries = 200;
        assert!(since.ask(100, 0));
    }
}
