//! Durable Raft log and vote storage, so that a control-plane node that restarts or crashes
//! comes back with exactly the log, vote and commit point it had acknowledged.
//!
//! [`LogStore`] implements openraft's [`RaftLogStorage`] and [`RaftLogReader`] for any
//! [`RaftTypeConfig`] on an append-only write-ahead log ([`crate::wal`]): entries, the vote, the
//! commit point, truncations and purges are records, postcard-encoded (serde, binary).
//!
//! Writes go through one writer thread per store that takes every operation queued since its
//! last write and writes them with one `pwrite` and one `fdatasync` (group commit). The tail of
//! the log is also kept in memory, decoded, so that replication and apply read recent entries
//! without touching the disk or decoding anything.
//!
//! The commit point also goes to a file of its own beside the log (see
//! [`crate::commit_point`]), without an fsync and only once the entries it covers are on disk:
//! by `save_committed` itself when they already are (the usual case: a replica acknowledges an
//! entry only once it is on disk, and the leader learns the commit from those acknowledgements),
//! otherwise by the writer thread behind the operations queued before it. Committing never
//! waits for a flush of its own, and the state machine applies an entry only once that file
//! covers it ([`LogStore::written`]).
//!
//! Durability contract (see [`RaftLogStorage`]):
//!
//! - `append` returns once the batch is queued (openraft's "submitted": readers see it at once,
//!   from memory) and calls its [`IOFlushed`] callback only once the write holding the whole
//!   batch is on disk;
//! - `save_vote`, `truncate_after` and `purge` return only once their record is on disk; the
//!   queue is written in order, so they are also behind every append submitted before them;
//! - `save_committed` returns once the commit point is in its file (when every entry it covers
//!   is on disk already) or queued (the writer writes it to the file behind every operation
//!   queued before it); the writer also writes it to the log with the next group; a store opened
//!   again takes the later of the two;
//! - `append` refuses a batch that would leave a hole or silently overwrite entries (openraft
//!   truncates conflicting entries before it appends);
//! - `truncate_after` never removes an entry at or below the saved committed log id;
//! - `purge` records the purged log id; the segments holding only purged entries are deleted
//!   once the record is on disk.
//!
//! Reads of entries that have left the in-memory tail are `pread`s of the segment files; entries
//! leave the tail only once they are on disk. A log written by earlier builds (a redb database,
//! `raft-log.redb`) is imported once, on the first open ([`crate::log_import`]).

use std::collections::VecDeque;
use std::fmt;
use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::mpsc;
use std::thread::JoinHandle;

use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftTypeConfig;
use openraft::alias::LogIdOf;
use openraft::alias::VoteOf;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::commit_point::{CommitFile, Reach, Reporter, Written};
use crate::wal::{Record, Recovered, Wal, WalError, WalWriter};

/// Segments are preallocated to this size; a full one is followed by the next.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// At most this many entries are returned by one `limited_get_log_entries` call.
const MAX_ENTRIES_PER_READ: usize = 4096;
/// `limited_get_log_entries` stops once it has read this many encoded bytes (it always returns at
/// least one entry when the range holds one).
const MAX_BYTES_PER_READ: usize = 8 * 1024 * 1024;
/// Entries kept in memory once they are on disk: enough for every follower within a snapshot
/// interval's reach under load to be served without a disk read.
const TAIL_ENTRIES: usize = 8192;
/// ... and at most this many encoded bytes of them (objects may be up to 1 MiB).
const TAIL_BYTES: usize = 64 * 1024 * 1024;
/// At most this many queued operations go into one write.
const MAX_GROUP: usize = 1024;

/// Errors raised by [`LogStore`].
///
/// Inside openraft's trait methods they are converted into [`io::Error`] (see the `From` impl),
/// keeping this error as the payload so its source chain stays visible.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The write-ahead log failed: it cannot be opened, read or written, or it is corrupt.
    #[error("raft log store: cannot {op}")]
    Wal {
        /// The store operation that was running, e.g. `"open the log"`.
        op: &'static str,
        /// What the log said.
        #[source]
        source: WalError,
    },

    /// The redb database of an earlier build could not be opened for import.
    #[error("cannot open the raft log database at {path}")]
    Open {
        /// Path of the database file.
        path: PathBuf,
        /// Underlying redb error.
        #[source]
        source: redb::DatabaseError,
    },

    /// A redb transaction, table or commit operation failed.
    #[error("raft log store: redb failed while trying to {op}")]
    Redb {
        /// The store operation that was running, e.g. `"append log entries"`.
        op: &'static str,
        /// Underlying redb error.
        #[source]
        source: redb::Error,
    },

    /// A value could not be serialized before it was written.
    #[error("raft log store: cannot encode {what}")]
    Encode {
        /// What was being encoded, e.g. `"log entry 42"`.
        what: String,
        /// Underlying postcard error.
        #[source]
        source: postcard::Error,
    },

    /// A stored value could not be deserialized: the file is corrupt or was written with another
    /// `RaftTypeConfig`.
    #[error("raft log store: cannot decode stored {what}: {reason}")]
    Decode {
        /// What was being decoded, e.g. `"log entry 42"` or `"vote"`.
        what: String,
        /// What the decoder said.
        reason: String,
    },

    /// The redb database of an earlier build has a format version this build cannot import.
    #[error(
        "raft log store: on-disk format version {found} is not supported (this build reads version {expected})"
    )]
    UnsupportedFormat {
        /// Version recorded in the database.
        found: u64,
        /// Version this build imports ([`crate::log_import::FORMAT_VERSION`]).
        expected: u64,
    },

    /// An appended batch does not continue the stored log: it would leave a hole, overwrite
    /// entries that were not truncated first, or write into the purged prefix.
    #[error("raft log append must start at index {expected}, but the batch starts at {got}")]
    NonContiguousAppend {
        /// The only index the batch may start at.
        expected: u64,
        /// The index the batch starts at.
        got: u64,
    },

    /// The entries of one appended batch do not have consecutive indexes.
    #[error("raft log append batch is not consecutive: index {got} follows index {prev}")]
    NonConsecutiveBatch {
        /// Index of the previous entry in the batch.
        prev: u64,
        /// Index of the entry that should have been `prev + 1`.
        got: u64,
    },

    /// A truncation would remove an entry at or below the saved committed log id, which Raft
    /// never allows.
    #[error(
        "refusing to truncate the raft log from index {from}: entries up to the committed index {committed} must be kept"
    )]
    TruncateCommitted {
        /// First index the truncation would remove.
        from: u64,
        /// Index of the saved committed log id.
        committed: u64,
    },

    /// A read found a hole in the log, or an entry stored under the wrong index.
    #[error("raft log is corrupt: expected an entry with index {expected}, found index {found}")]
    Corrupt {
        /// Index that should have been present.
        expected: u64,
        /// Index that was found instead.
        found: u64,
    },

    /// The commit point file could not be opened.
    #[error("cannot open the raft commit point file at {path}")]
    CommitFile {
        /// Path of the file.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The writer thread could not be started, or is gone (a previous write failed fatally).
    #[error("raft log store: the writer thread is not running ({op})")]
    Writer {
        /// The store operation that was running.
        op: &'static str,
    },

    /// A group write failed; every operation in it gets this error.
    #[error("raft log store: the write of a group holding {op} failed: {reason}")]
    Group {
        /// The store operation that was queued.
        op: &'static str,
        /// The error of the write.
        reason: String,
    },
}

impl LogStoreError {
    fn wal(op: &'static str) -> impl FnOnce(WalError) -> Self {
        move |source| LogStoreError::Wal { op, source }
    }

    fn io_kind(&self) -> io::ErrorKind {
        match self {
            LogStoreError::NonContiguousAppend { .. }
            | LogStoreError::NonConsecutiveBatch { .. }
            | LogStoreError::TruncateCommitted { .. } => io::ErrorKind::InvalidInput,
            LogStoreError::Decode { .. }
            | LogStoreError::UnsupportedFormat { .. }
            | LogStoreError::Corrupt { .. }
            | LogStoreError::Wal {
                source: WalError::Corrupt { .. } | WalError::Format { .. },
                ..
            } => io::ErrorKind::InvalidData,
            LogStoreError::Open { .. }
            | LogStoreError::Wal { .. }
            | LogStoreError::CommitFile { .. }
            | LogStoreError::Redb { .. }
            | LogStoreError::Encode { .. }
            | LogStoreError::Writer { .. }
            | LogStoreError::Group { .. } => io::ErrorKind::Other,
        }
    }
}

impl From<LogStoreError> for io::Error {
    fn from(e: LogStoreError) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

/// Durable Raft log + vote store backed by one write-ahead log.
///
/// Cheap to clone: every clone shares the same log, in-memory tail and writer thread, so a clone
/// is what [`RaftLogStorage::get_log_reader`] hands to openraft's replication tasks. The writer
/// thread stops (and the log can be opened again) once the last clone is dropped.
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Inner<C>>,
}

struct Inner<C: RaftTypeConfig> {
    wal: Arc<Wal>,
    path: PathBuf,
    tail: Arc<Mutex<Tail<C>>>,
    commit: Arc<CommitSink>,
    written: Written,
    writer: Mutex<Option<mpsc::Sender<Op<C>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<C: RaftTypeConfig> Drop for Inner<C> {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what is queued.
        drop(lock(&self.writer).take());
        if let Some(thread) = lock(&self.thread).take()
            && thread.join().is_err()
        {
            tracing::error!("the raft log writer thread panicked");
        }
    }
}

/// The log as submitted, in memory: the last entries (consecutive), and what appends, truncation
/// and purges must be checked against without reading the disk.
struct Tail<C: RaftTypeConfig> {
    /// Consecutive entries ending at the last submitted one, each with its encoded size;
    /// those before them are on disk.
    entries: VecDeque<(C::Entry, usize)>,
    /// Index of `entries[0]` (or where it would be).
    first: u64,
    /// The only index the next append may start at; `None`: an empty, never purged log, which
    /// may start anywhere.
    next: Option<u64>,
    /// Encoded size of `entries`.
    bytes: usize,
    /// The last log id saved as committed (queued, maybe not yet written).
    committed: Option<LogIdOf<C>>,
    /// The last purged log id.
    purged: Option<LogIdOf<C>>,
    /// The vote as last saved (on disk).
    vote: Option<VoteOf<C>>,
    /// Bumped by every truncation: the writer evicts entries only while no truncation was
    /// submitted after what it just wrote.
    generation: u64,
    /// Every entry up to this index is on disk and will not be truncated by anything already
    /// submitted: a commit point within it may go to its file at once (`save_committed`).
    durable: Option<u64>,
}

impl<C: RaftTypeConfig> Tail<C> {
    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
            self.first += 1;
        }
    }

    /// Keeps the first `keep` entries.
    fn truncate(&mut self, keep: usize) {
        for (_, size) in self.entries.drain(keep.min(self.entries.len())..) {
            self.bytes -= size;
        }
    }
}

impl<C: RaftTypeConfig> Tail<C>
where
    C::Entry: Clone,
{
    /// Clones the entries in `[start, end)` that are in memory, if `start` is: at most `limit`
    /// of them, stopping once `max_bytes` encoded bytes are taken (always at least one).
    fn get(
        &self,
        start: u64,
        end: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Option<Vec<C::Entry>> {
        if start < self.first {
            return None;
        }
        let from = usize::try_from(start - self.first).ok()?;
        let to = match end {
            Some(end) => usize::try_from(end.saturating_sub(self.first))
                .unwrap_or(usize::MAX)
                .min(self.entries.len()),
            None => self.entries.len(),
        };
        if from >= to {
            return Some(Vec::new());
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (entry, size) in self.entries.range(from..to.min(from.saturating_add(limit))) {
            if !out.is_empty() && bytes.saturating_add(*size) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(*size);
            out.push(entry.clone());
        }
        Some(out)
    }
}

/// One queued write.
enum Op<C: RaftTypeConfig> {
    Append {
        batch: Vec<(u64, Vec<u8>)>,
        generation: u64,
        callback: IOFlushed<C>,
    },
    Vote {
        bytes: Vec<u8>,
        done: Done,
    },
    Truncate {
        from: u64,
        done: Done,
    },
    Purge {
        upto: u64,
        bytes: Vec<u8>,
        done: Done,
    },
    /// Nobody waits for it: the state machine waits on [`Written`] instead.
    Commit {
        index: u64,
        bytes: Vec<u8>,
    },
}

type Done = tokio::sync::oneshot::Sender<Result<(), String>>;

impl<C: RaftTypeConfig> Op<C> {
    fn name(&self) -> &'static str {
        match self {
            Op::Append { .. } => "append log entries",
            Op::Vote { .. } => "save the vote",
            Op::Truncate { .. } => "truncate the log",
            Op::Purge { .. } => "purge the log",
            Op::Commit { .. } => "save the committed log id",
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> LogStore<C>
where
    C::Entry: Clone,
{
    /// Opens (creating if absent) the log in the directory `path`, replays it and starts the
    /// writer thread. A redb database of an earlier build beside it (`path` with the extension
    /// `redb`) is imported first when the directory does not exist yet.
    ///
    /// The log allows one open handle: opening a path that is already open (for instance by a
    /// live clone of another `LogStore`) fails with [`WalError::Locked`].
    ///
    /// # Errors
    ///
    /// [`LogStoreError::Wal`] if the log cannot be opened or is corrupt, the import's errors
    /// (see [`crate::log_import`]), and [`LogStoreError::CommitFile`].
    ///
    /// The commit point file is `path` with the extension `commit`.
    pub fn open(path: &Path) -> Result<LogStore<C>, LogStoreError> {
        Self::open_sized(path, SEGMENT_BYTES)
    }

    /// [`LogStore::open`] with segments of `segment_bytes`.
    fn open_sized(path: &Path, segment_bytes: u64) -> Result<LogStore<C>, LogStoreError> {
        let legacy = path.with_extension("redb");
        if !path.exists() && legacy.exists() {
            crate::log_import::import::<C>(&legacy, path, segment_bytes)?;
        }
        let (wal, writer, recovered) =
            Wal::open(path, segment_bytes).map_err(LogStoreError::wal("open the log"))?;
        let store = Self::init(wal, writer, recovered, path)?;
        tracing::info!(path = %path.display(), "raft log store opened");
        Ok(store)
    }

    /// The log directory this store was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How far the commit point file reaches: the state machine applies an entry only once it
    /// is covered, so a replica killed at any moment restarts with at least the state it served.
    pub fn written(&self) -> Written {
        self.inner.written.clone()
    }

    /// Loads the log state from what replay found and starts the writer thread.
    fn init(
        wal: Arc<Wal>,
        writer: WalWriter,
        recovered: Recovered,
        path: &Path,
    ) -> Result<LogStore<C>, LogStoreError> {
        let commit_path = path.with_extension("commit");
        let (file, found) =
            CommitFile::open(&commit_path).map_err(|source| LogStoreError::CommitFile {
                path: commit_path.clone(),
                source,
            })?;
        let found = match found.map(|bytes| decode::<LogIdOf<C>>(&bytes, || "commit point".into()))
        {
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                tracing::warn!(path = %commit_path.display(), error = %e, "ignoring the commit point file");
                None
            }
            None => None,
        };
        let tail = load_tail::<C>(&recovered, found)?;
        let committed = tail.committed.as_ref().map(|c| c.index());
        let (report, written) = Written::channel(committed);
        let tail = Arc::new(Mutex::new(tail));
        let (tx, rx) = mpsc::channel();
        let writer_tail = Arc::clone(&tail);
        let commit = Arc::new(CommitSink::new(file, report, committed));
        let writer_commit = Arc::clone(&commit);
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || run_writer::<C>(writer, &writer_tail, rx, &writer_commit))
            .map_err(|_| LogStoreError::Writer { op: "start" })?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                wal,
                path: path.to_path_buf(),
                tail,
                commit,
                written,
                writer: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    fn tail(&self) -> MutexGuard<'_, Tail<C>> {
        lock(&self.inner.tail)
    }

    /// Queues `op` for the writer thread.
    fn submit(&self, op: Op<C>) -> Result<(), LogStoreError> {
        let name = op.name();
        let writer = lock(&self.inner.writer);
        let sent = writer.as_ref().map(|tx| tx.send(op));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(LogStoreError::Writer { op: name }),
        }
    }

    /// Queues `op` (built around a completion sender) and waits until it is on disk.
    async fn write_and_wait(
        &self,
        op: &'static str,
        make: impl FnOnce(Done) -> Op<C>,
    ) -> Result<(), LogStoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(make(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(LogStoreError::Group { op, reason }),
            Err(_) => Err(LogStoreError::Writer { op }),
        }
    }

    /// Reads the log state from memory (the last entry from disk when none is in memory).
    fn log_state(&self) -> Result<LogState<C>, LogStoreError> {
        let (purged, on_disk) = {
            let tail = self.tail();
            if let Some((e, _)) = tail.entries.back() {
                return Ok(LogState {
                    last_purged_log_id: tail.purged.clone(),
                    last_log_id: Some(e.log_id()),
                });
            }
            let purged_index = tail.purged.as_ref().map(|p| p.index());
            let on_disk = tail
                .first
                .checked_sub(1)
                .filter(|&i| purged_index.is_none_or(|p| p < i));
            (tail.purged.clone(), on_disk)
        };
        let last = match on_disk {
            Some(index) => self.read_disk(index, Some(index + 1), false)?.pop(),
            None => None,
        };
        Ok(LogState {
            last_log_id: last.map(|e| e.log_id()).or_else(|| purged.clone()),
            last_purged_log_id: purged,
        })
    }

    /// Reads the entries in `[start, end)` (`end == None`: to the end of the log): from memory
    /// what is there, the rest from disk. `limited` stops early at the
    /// per-read limits. Fails on a hole.
    fn read_entries(
        &self,
        start: u64,
        end: Option<u64>,
        limited: bool,
    ) -> Result<Vec<C::Entry>, LogStoreError> {
        let (limit, max_bytes) = if limited {
            (MAX_ENTRIES_PER_READ, MAX_BYTES_PER_READ)
        } else {
            (usize::MAX, usize::MAX)
        };
        let mut out = Vec::new();
        let mut cursor = start;
        while end.is_none_or(|e| cursor < e) && out.len() < limit {
            let first = {
                let tail = self.tail();
                if let Some(entries) = tail.get(cursor, end, limit - out.len(), max_bytes) {
                    out.extend(entries);
                    break;
                }
                tail.first
            };
            // Before the tail everything is on disk. The tail may move on meanwhile (entries
            // leave it once written), so the rest is looked up again.
            let disk_end = end.map_or(first, |e| e.min(first));
            // The log may also start after `cursor` (nothing on disk before the tail).
            let entries = self.read_disk(cursor, Some(disk_end), limited)?;
            let reaches_tail = entries
                .last()
                .is_none_or(|e| e.index().checked_add(1) == Some(disk_end));
            let read_some = !entries.is_empty();
            out.extend(entries);
            if !reaches_tail || (limited && read_some) {
                break;
            }
            cursor = disk_end;
        }
        Ok(out)
    }

    /// Reads `[start, end)` from disk.
    fn read_disk(
        &self,
        start: u64,
        end: Option<u64>,
        limited: bool,
    ) -> Result<Vec<C::Entry>, LogStoreError> {
        if end.is_some_and(|end| start >= end) {
            return Ok(Vec::new());
        }
        let (limit, max_bytes) = if limited {
            (MAX_ENTRIES_PER_READ, MAX_BYTES_PER_READ)
        } else {
            (usize::MAX, usize::MAX)
        };
        let raw = self
            .inner
            .wal
            .read(start, end, limit, max_bytes)
            .map_err(LogStoreError::wal("read log entries"))?;
        raw.into_iter()
            .map(|(index, bytes)| {
                let entry: C::Entry = decode(&bytes, || format!("log entry {index}"))?;
                if entry.index() != index {
                    return Err(LogStoreError::Corrupt {
                        expected: index,
                        found: entry.index(),
                    });
                }
                Ok(entry)
            })
            .collect()
    }
}

/// The log state of a store just opened, from what replay found; `from_file` is the commit point
/// file's, which is used when it is later than the log's and within the log.
fn load_tail<C: RaftTypeConfig>(
    recovered: &Recovered,
    from_file: Option<LogIdOf<C>>,
) -> Result<Tail<C>, LogStoreError> {
    let purged: Option<LogIdOf<C>> = recovered
        .purged
        .as_ref()
        .map(|(_, bytes)| decode(bytes, || "purged log id".into()))
        .transpose()?;
    let mut committed: Option<LogIdOf<C>> = recovered
        .committed
        .as_deref()
        .map(|bytes| decode(bytes, || "commit point".into()))
        .transpose()?;
    let vote: Option<VoteOf<C>> = recovered
        .vote
        .as_deref()
        .map(|bytes| decode(bytes, || "vote".into()))
        .transpose()?;
    let last = recovered.last;
    if let Some(file) = from_file
        && committed.as_ref().is_none_or(|c| c.index() < file.index())
    {
        // The file is written only once the entries it covers are on disk, so a point past the
        // log (its last entry, or the last purged one when none is left) means the file does
        // not belong to this log (a log replaced by hand).
        let end = last.or(purged.as_ref().map(|p| p.index()));
        if end.is_some_and(|end| file.index() <= end) {
            committed = Some(file);
        } else {
            tracing::warn!(
                committed = %file,
                last_index = ?last,
                "the commit point file is past the end of the log; ignoring it"
            );
        }
    }
    let purged_index = purged.as_ref().map(|p| p.index());
    let next = match last {
        Some(last) => Some(last.saturating_add(1)),
        // An empty log that was never purged may start anywhere (openraft starts at 0, a store
        // seeded by tests may not).
        None => purged.as_ref().map(|p| p.index().saturating_add(1)),
    };
    Ok(Tail {
        entries: VecDeque::new(),
        first: next.unwrap_or(0),
        next,
        bytes: 0,
        committed,
        purged,
        vote,
        generation: 0,
        durable: last.or(purged_index),
    })
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C>
where
    C::Entry: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        let Some((start, end)) = half_open(&range) else {
            return Ok(Vec::new());
        };
        Ok(self.read_entries(start, end, false)?)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.tail().vote.clone())
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, io::Error> {
        Ok(self.read_entries(start, Some(end), true)?)
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C>
where
    C::Entry: Clone,
{
    type LogReader = LogStore<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        Ok(self.log_state()?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        const OP: &str = "save the vote";
        let bytes = encode(vote, || "vote".to_string())?;
        self.write_and_wait(OP, |done| Op::Vote { bytes, done })
            .await?;
        self.tail().vote = Some(vote.clone());
        tracing::debug!(vote = %vote, "raft vote saved");
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let Some(committed) = committed else {
            // openraft never moves the commit point back to "nothing"; keep what is stored.
            return Ok(());
        };
        let bytes = encode(&committed, || "commit point".to_string())?;
        let index = committed.index();
        let on_disk = {
            let mut tail = self.tail();
            tail.committed = Some(committed.clone());
            tail.durable.is_some_and(|d| d >= index)
        };
        if on_disk {
            // What it covers is on disk, and committed entries are never truncated: write it
            // now, so the state machine need not wait for the writer to finish what it is
            // writing (usually newer appends and their fsync).
            self.inner.commit.advance(index, &bytes);
        }
        // The writer writes it behind everything queued before it when it was not written
        // above, and carries it into the log with its next write. The state machine waits
        // for the file before applying (see `LogStore::written`).
        self.submit(Op::Commit { index, bytes })?;
        tracing::trace!(committed = %committed, "raft committed log id queued");
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.tail().committed.clone())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encode on the caller's thread; the batch must be consecutive and continue the log.
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut decoded = Vec::new();
        for entry in entries {
            let index = entry.index();
            if let Some(&(prev, _)) = batch.last()
                && prev.checked_add(1) != Some(index)
            {
                let err = LogStoreError::NonConsecutiveBatch { prev, got: index };
                return Err(fail_callback(callback, err));
            }
            match encode(&entry, || format!("log entry {index}")) {
                Ok(bytes) => {
                    decoded.push((entry, bytes.len()));
                    batch.push((index, bytes));
                }
                Err(err) => return Err(fail_callback(callback, err)),
            }
        }
        let (Some(&(first, _)), Some(&(last, _))) = (batch.first(), batch.last()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let generation = {
            let mut tail = self.tail();
            if let Some(expected) = tail.next
                && first != expected
            {
                drop(tail);
                let err = LogStoreError::NonContiguousAppend {
                    expected,
                    got: first,
                };
                return Err(fail_callback(callback, err));
            }
            if tail.entries.is_empty() {
                tail.first = first;
            }
            tail.bytes += decoded.iter().map(|(_, size)| size).sum::<usize>();
            tail.entries.extend(decoded);
            tail.next = Some(last.saturating_add(1));
            tail.generation
        };
        tracing::trace!(first, last, "raft log entries submitted");
        if let Err(err) = self.submit(Op::Append {
            batch,
            generation,
            callback,
        }) {
            // The callback went down with the queue; openraft stops on this error.
            return Err(err.into());
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        const OP: &str = "truncate the log";
        let from = match &last_log_id {
            Some(id) => id.index().saturating_add(1),
            None => 0,
        };
        {
            let mut tail = self.tail();
            if let Some(committed) = &tail.committed
                && from <= committed.index()
            {
                return Err(LogStoreError::TruncateCommitted {
                    from,
                    committed: committed.index(),
                }
                .into());
            }
            tail.generation += 1;
            tail.durable = match (tail.durable, from.checked_sub(1)) {
                (Some(durable), Some(kept)) => Some(durable.min(kept)),
                _ => None,
            };
            if from < tail.first {
                tail.truncate(0);
                tail.first = from;
            } else {
                let keep = usize::try_from(from - tail.first).unwrap_or(usize::MAX);
                tail.truncate(keep);
            }
            tail.next = match (&last_log_id, tail.next) {
                (_, None) => None,
                (Some(_), Some(next)) => Some(from.min(next)),
                (None, Some(_)) => tail.purged.as_ref().map(|p| p.index().saturating_add(1)),
            };
        }
        self.write_and_wait(OP, |done| Op::Truncate { from, done })
            .await?;
        tracing::debug!(from, "raft log truncated");
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        const OP: &str = "purge the log";
        let upto = log_id.index();
        let bytes = encode(&log_id, || "purged log id".to_string())?;
        {
            let mut tail = self.tail();
            if tail.purged.as_ref().is_some_and(|p| p.index() >= upto) {
                // Already purged at least this far: purging is idempotent and never moves back.
                return Ok(());
            }
            tail.purged = Some(log_id.clone());
            while tail.entries.front().is_some_and(|(e, _)| e.index() <= upto) {
                tail.pop_front();
            }
            if tail.first <= upto {
                tail.first = upto + 1;
            }
            tail.next = Some(tail.next.unwrap_or(0).max(upto.saturating_add(1)));
        }
        self.write_and_wait(OP, |done| Op::Purge { upto, bytes, done })
            .await?;
        tracing::debug!(upto, "raft log purged");
        Ok(())
    }
}

/// The commit point file and the report of how far it reaches, shared by `save_committed` (a
/// point whose entries are on disk already) and the writer thread (the others). The file only
/// moves forward, one write at a time.
struct CommitSink {
    /// The file, and the index of the point it holds.
    file: Mutex<(CommitFile, Option<u64>)>,
    report: Reporter,
}

/// The last commit point in `ops`: its index and encoded log id.
fn last_commit<C: RaftTypeConfig>(ops: &[Op<C>]) -> Option<(u64, &[u8])> {
    ops.iter().rev().find_map(|op| match op {
        Op::Commit { index, bytes } => Some((*index, bytes.as_slice())),
        _ => None,
    })
}

impl CommitSink {
    /// `file` holds the point at `index`.
    fn new(file: CommitFile, report: Reporter, index: Option<u64>) -> Self {
        Self {
            file: Mutex::new((file, index)),
            report,
        }
    }

    /// Writes the point at `index` (`bytes`, its encoded log id) and reports it, unless the file
    /// holds that point or a later one already. Every entry up to `index` must be on disk.
    fn advance(&self, index: u64, bytes: &[u8]) {
        let mut file = lock(&self.file);
        if file.1.is_some_and(|held| held >= index) {
            return;
        }
        match file.0.write(bytes) {
            Ok(()) => {
                file.1 = Some(index);
                self.report.send_if_modified(|reach| match reach {
                    Reach::Upto(upto) if upto.is_none_or(|u| u < index) => {
                        *upto = Some(index);
                        true
                    }
                    _ => false,
                });
            }
            Err(e) => self.fail(&format!("writing the commit point failed: {e}")),
        }
    }

    /// Writes the last commit point in `ops`, if any (see [`CommitSink::advance`]).
    fn write_last<C: RaftTypeConfig>(&self, ops: &[Op<C>]) {
        if let Some((index, bytes)) = last_commit(ops) {
            self.advance(index, bytes);
        }
    }

    fn fail(&self, reason: &str) {
        tracing::error!(
            reason,
            "the raft commit point cannot be written; no entry is applied past it"
        );
        self.report.send_replace(Reach::Failed(reason.to_string()));
    }
}

/// The writer thread: writes every queued operation, in order, a group per write. Commit
/// points at the front of a group are written to their file before the group's write
/// (what they cover is on disk already), the others after it; a group of commit points alone
/// is not written to the log, and the next write carries the last of them there.
///
/// After a failed group nothing more is written (fail-stop): writing the appends queued behind
/// it would leave a hole in the log, and a commit point past the hole would name entries that
/// cannot be read back. openraft stops on the failed callbacks.
fn run_writer<C: RaftTypeConfig>(
    mut wal: WalWriter,
    tail: &Mutex<Tail<C>>,
    rx: mpsc::Receiver<Op<C>>,
    commit: &CommitSink,
) {
    // The last commit point written to the file but not yet to the log.
    let mut unsaved: Option<Vec<u8>> = None;
    // Why an earlier group failed.
    let mut broken: Option<String> = None;
    while let Ok(op) = rx.recv() {
        let mut group = vec![op];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let lead = group
            .iter()
            .take_while(|op| matches!(op, Op::Commit { .. }))
            .count();
        let result = if let Some(reason) = &broken {
            Err(format!("not written, an earlier write failed: {reason}"))
        } else if lead == group.len() {
            commit.write_last(&group);
            unsaved = last_commit(&group).map(|(_, bytes)| bytes.to_vec());
            Ok(())
        } else {
            commit.write_last(&group[..lead]);
            let result =
                write_group(&mut wal, &group, unsaved.as_deref()).map_err(|e| with_sources(&e));
            match &result {
                Ok(()) => {
                    unsaved = None;
                    commit.write_last(&group[lead..]);
                }
                Err(err) => {
                    tracing::error!(ops = group.len(), error = %err, "raft log write failed");
                    commit.fail(err);
                    broken = Some(err.clone());
                    // Nothing counts as on disk any more: no commit point is written at once.
                    lock(tail).durable = None;
                }
            }
            result
        };
        // Entries this group wrote may leave memory, unless a truncation was submitted after
        // them (what is in memory past that point is not what is on disk).
        if result.is_ok()
            && let Some((written, generation)) = group.iter().rev().find_map(|op| match op {
                Op::Append {
                    batch, generation, ..
                } => batch.last().map(|(i, _)| (*i, *generation)),
                _ => None,
            })
        {
            let mut tail = lock(tail);
            if tail.generation == generation {
                tail.durable = Some(tail.durable.map_or(written, |d| d.max(written)));
                while (tail.entries.len() > TAIL_ENTRIES || tail.bytes > TAIL_BYTES)
                    && tail
                        .entries
                        .front()
                        .is_some_and(|(e, _)| e.index() <= written)
                {
                    tail.pop_front();
                }
            }
        }
        let failed = |op: &'static str| match &result {
            Ok(()) => Ok(()),
            Err(reason) => Err(LogStoreError::Group {
                op,
                reason: reason.clone(),
            }),
        };
        for op in group {
            let name = op.name();
            match op {
                Op::Append { callback, .. } => callback.io_completed(
                    failed(name).map_err(|e| io::Error::new(e.io_kind(), e.to_string())),
                ),
                Op::Vote { done, .. } | Op::Truncate { done, .. } | Op::Purge { done, .. } => {
                    let _ = done.send(failed(name).map_err(|e| e.to_string()));
                }
                Op::Commit { .. } => {}
            }
        }
    }
}

/// Writes a group of operations in one durable write, and `unsaved`, a commit point queued
/// before them, first.
fn write_group<C: RaftTypeConfig>(
    wal: &mut WalWriter,
    group: &[Op<C>],
    unsaved: Option<&[u8]>,
) -> Result<(), LogStoreError> {
    let mut records = Vec::with_capacity(group.len() + 1);
    if let Some(bytes) = unsaved {
        records.push(Record::Committed(bytes));
    }
    for op in group {
        match op {
            Op::Append { batch, .. } => {
                records.extend(batch.iter().map(|(index, bytes)| Record::Entry {
                    index: *index,
                    bytes,
                }));
            }
            Op::Vote { bytes, .. } => records.push(Record::Vote(bytes)),
            Op::Truncate { from, .. } => records.push(Record::Truncate { from: *from }),
            Op::Purge { upto, bytes, .. } => records.push(Record::Purge { upto: *upto, bytes }),
            Op::Commit { bytes, .. } => records.push(Record::Committed(bytes)),
        }
    }
    wal.write(&records)
        .map_err(LogStoreError::wal("write a group of log operations"))
}

/// `err` and every error under it, for a message that goes on without its source chain.
fn with_sources(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Reports `err` through the append callback and returns it as an [`io::Error`].
fn fail_callback<C: RaftTypeConfig>(callback: IOFlushed<C>, err: LogStoreError) -> io::Error {
    let err = io::Error::from(err);
    callback.io_completed(Err(io::Error::new(err.kind(), err.to_string())));
    err
}

fn encode<T: Serialize + ?Sized>(
    value: &T,
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>, LogStoreError> {
    postcard::to_allocvec(value).map_err(|source| LogStoreError::Encode {
        what: what(),
        source,
    })
}

fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, LogStoreError> {
    postcard::from_bytes(bytes).map_err(|e| LogStoreError::Decode {
        what: what(),
        reason: e.to_string(),
    })
}

/// Converts a range into `[start, end)` with `end == None` meaning unbounded; `None` if empty.
fn half_open<RB: RangeBounds<u64>>(range: &RB) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if start >= end => None,
        _ => Some((start, end)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::collections::BTreeSet;
    use std::io::Cursor;

    use futures::Stream;
    use futures::StreamExt;
    use openraft::EntryPayload;
    use openraft::Membership;
    use openraft::RaftSnapshotBuilder;
    use openraft::StorageError;
    use openraft::StoredMembership;
    use openraft::alias::SnapshotMetaOf;
    use openraft::alias::SnapshotOf;
    use openraft::alias::StoredMembershipOf;
    use openraft::storage::EntryResponder;
    use openraft::storage::RaftLogStorageExt;
    use openraft::storage::RaftStateMachine;
    use openraft::storage::SnapshotMeta;
    use openraft::testing::log::StoreBuilder;
    use openraft::testing::log::Suite;
    use openraft::type_config::TypeConfigExt;

    use super::*;

    openraft::declare_raft_types!(
        /// Type config for the log store tests.
        pub TestConfig:
            D = String,
            R = String,
    );

    type Tc = TestConfig;

    fn log_id(term: u64, node: u64, index: u64) -> LogIdOf<Tc> {
        openraft::testing::log_id::<Tc>(term, node, index)
    }

    fn blank(term: u64, index: u64) -> openraft::alias::EntryOf<Tc> {
        openraft::alias::EntryOf::<Tc>::new_blank(log_id(term, 1, index))
    }

    fn normal(term: u64, index: u64, data: &str) -> openraft::alias::EntryOf<Tc> {
        openraft::alias::EntryOf::<Tc>::new_normal(log_id(term, 1, index), data.to_string())
    }

    fn membership(term: u64, index: u64) -> openraft::alias::EntryOf<Tc> {
        let voters: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
        let m = Membership::new_with_defaults(vec![voters], []);
        openraft::alias::EntryOf::<Tc>::new_membership(log_id(term, 1, index), m)
    }

    fn db_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("raft-log")
    }

    async fn all_entries(store: &mut LogStore<Tc>) -> Vec<openraft::alias::EntryOf<Tc>> {
        store
            .try_get_log_entries(..)
            .await
            .expect("read all entries")
    }

    #[tokio::test]
    async fn reopen_after_append_vote_and_commit_recovers_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let vote = VoteOf::<Tc>::new_committed(3, 2);
        let written = vec![
            blank(1, 0),
            membership(1, 1),
            normal(2, 2, "a"),
            normal(2, 3, "b"),
        ];
        {
            let mut store = LogStore::<Tc>::open(&path).expect("open");
            store
                .blocking_append(written.clone())
                .await
                .expect("append");
            store.save_vote(&vote).await.expect("save vote");
            store
                .save_committed(Some(log_id(2, 1, 2)))
                .await
                .expect("save committed");
        }

        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(store.read_vote().await.expect("read vote"), Some(vote));
        assert_eq!(
            store.read_committed().await.expect("read committed"),
            Some(log_id(2, 1, 2))
        );
        let state = store.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, None);
        assert_eq!(state.last_log_id, Some(log_id(2, 1, 3)));
        let got = all_entries(&mut store).await;
        assert_eq!(got, written);
        match &got[2].payload {
            EntryPayload::Normal(data) => assert_eq!(data, "a"),
            other => panic!("unexpected payload {other:?}"),
        }
        assert!(got[1].get_membership().is_some());
    }

    /// The commit point as the log holds it (the file aside), for a store that is closed.
    fn committed_in_log(path: &Path) -> Option<LogIdOf<Tc>> {
        let (_wal, _writer, recovered) = Wal::open(path, SEGMENT_BYTES).expect("open the log");
        recovered
            .committed
            .map(|bytes| decode(&bytes, || "commit point".into()).expect("decode"))
    }

    async fn commit(store: &mut LogStore<Tc>, index: u64) {
        store
            .save_committed(Some(log_id(1, 1, index)))
            .await
            .expect("save committed");
    }

    async fn committed(store: &mut LogStore<Tc>) -> Option<u64> {
        let id = store.read_committed().await.expect("read committed");
        id.map(|id| id.index())
    }

    /// A store at `path` holding entries 0 to 2 (term 1), all on disk.
    async fn store_of_three(path: &Path) -> LogStore<Tc> {
        let mut store = LogStore::<Tc>::open(path).expect("open");
        let entries = vec![blank(1, 0), normal(1, 1, "a"), normal(1, 2, "b")];
        store.blocking_append(entries).await.expect("append");
        store
    }

    #[tokio::test]
    async fn the_commit_point_reaches_its_file_without_a_log_write_and_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        {
            let mut store = store_of_three(&path).await;
            let mut written = store.written();
            for index in [1, 2] {
                commit(&mut store, index).await;
                written.wait_for(index).await.expect("covered");
            }
        }
        // A group of commit points alone is not written to the log: it has none, the file has it.
        assert_eq!(committed_in_log(&path), None);
        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(committed(&mut store).await, Some(2));
        let mut written = store.written();
        let loaded = written.wait_for(2).await;
        loaded.expect("a reopened store reports what it loaded");

        // The next write carries the commit point into the log too.
        commit(&mut store, 2).await;
        let entries = vec![normal(1, 3, "c")];
        store.blocking_append(entries).await.expect("append");
        drop(store);
        assert_eq!(committed_in_log(&path), Some(log_id(1, 1, 2)));
    }

    /// What `save_committed` may write to the file at once: every entry up to this index is on
    /// disk and nothing submitted since truncates it.
    fn durable(store: &LogStore<Tc>) -> Option<u64> {
        store.tail().durable
    }

    #[tokio::test]
    async fn a_commit_point_over_entries_on_disk_is_in_its_file_when_saved() {
        use futures::FutureExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let mut store = LogStore::<Tc>::open(&path).expect("open");
        let mut written = store.written();
        assert_eq!(durable(&store), None, "an empty log has nothing on disk");
        let entries = vec![blank(1, 0), normal(1, 1, "a"), normal(1, 2, "b")];
        store.blocking_append(entries).await.expect("append");
        assert_eq!(durable(&store), Some(2), "a flushed append is on disk");
        commit(&mut store, 1).await;
        // No waiting on the writer: the file covers the point when save_committed returns.
        let covered = written.wait_for(1).now_or_never();
        assert!(matches!(covered, Some(Ok(()))), "{covered:?}");

        // A truncation takes back what it removes, before anything is rewritten.
        let entries = vec![normal(1, 3, "c"), normal(1, 4, "d")];
        store.blocking_append(entries).await.expect("append");
        assert_eq!(durable(&store), Some(4));
        store
            .truncate_after(Some(log_id(1, 1, 2)))
            .await
            .expect("truncate");
        assert_eq!(durable(&store), Some(2));
        store
            .blocking_append(vec![normal(2, 3, "c2")])
            .await
            .expect("append after the truncation");
        assert_eq!(durable(&store), Some(3));
        store
            .save_committed(Some(log_id(2, 1, 3)))
            .await
            .expect("save committed");
        let covered = written.wait_for(3).now_or_never();
        assert!(matches!(covered, Some(Ok(()))), "{covered:?}");
        drop(store);

        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(committed(&mut store).await, Some(3));
        assert_eq!(
            durable(&store),
            Some(3),
            "what a reopened store holds is on disk"
        );
        let got = all_entries(&mut store).await;
        assert_eq!(got.last().map(|e| e.log_id()), Some(log_id(2, 1, 3)));
    }

    // Two workers: a save_committed that wrongly blocks on the held file blocks one of them,
    // and the timeout below still fires.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_point_past_what_is_on_disk_is_left_to_the_writer() {
        use futures::FutureExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let store = store_of_three(&path).await;
        let mut written = store.written();
        // As if entries 1 and 2 were still being written.
        store.tail().durable = Some(0);
        // The file stays as it is while another thread holds it.
        let sink = Arc::clone(&store.inner.commit);
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _file = lock(&sink.file);
            let _ = hold.send(());
            let _ = released.recv();
        });
        held.recv().expect("the file is held");
        // save_committed must not write the file itself: it returns while the file is held.
        let mut saving = store.clone();
        let saved = tokio::spawn(async move { commit(&mut saving, 2).await });
        tokio::time::timeout(std::time::Duration::from_secs(60), saved)
            .await
            .expect("save_committed waited for the file: it tried to write it itself")
            .expect("join");
        let covered = written.wait_for(2).now_or_never();
        assert!(
            covered.is_none(),
            "reported before it was written: {covered:?}"
        );
        release.send(()).expect("release the file");
        holder.join().expect("holder");
        written.wait_for(2).await.expect("the writer writes it");
    }

    #[tokio::test]
    async fn the_commit_point_file_counts_for_a_log_purged_to_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        {
            let mut store = store_of_three(&path).await;
            store.purge(log_id(1, 1, 2)).await.expect("purge");
            commit(&mut store, 2).await;
        }
        assert_eq!(committed_in_log(&path), None);
        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(committed(&mut store).await, Some(2));
    }

    #[tokio::test]
    async fn a_bad_commit_point_file_falls_back_to_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let commit_path = path.with_extension("commit");
        {
            let mut store = store_of_three(&path).await;
            commit(&mut store, 1).await;
            let entries = vec![normal(1, 3, "c")];
            store.blocking_append(entries).await.expect("append");
            commit(&mut store, 2).await;
        }
        assert_eq!(committed_in_log(&path), Some(log_id(1, 1, 1)));

        // Corrupt: the checksum fails, the log's value is used.
        let mut bytes = std::fs::read(&commit_path).expect("read commit file");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&commit_path, &bytes).expect("write commit file");
        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(committed(&mut store).await, Some(1));
        drop(store);

        // Valid but past the end of the log (not this log's): ignored.
        let past = encode(&log_id(1, 1, 9), || "commit point".into()).expect("encode");
        let (file, _) = CommitFile::open(&commit_path).expect("open commit file");
        file.write(&past).expect("write");
        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(committed(&mut store).await, Some(1));
    }

    #[tokio::test]
    async fn reopen_after_truncate_recovers_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        {
            let mut store = LogStore::<Tc>::open(&path).expect("open");
            store
                .blocking_append((0..10).map(|i| blank(1, i)))
                .await
                .expect("append");
            store
                .truncate_after(Some(log_id(1, 1, 5)))
                .await
                .expect("truncate");
            // The conflicting suffix is replaced by entries of a newer term.
            store
                .blocking_append([blank(2, 6), blank(2, 7)])
                .await
                .expect("append after truncate");
        }

        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        let state = store.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id, Some(log_id(2, 1, 7)));
        let got = all_entries(&mut store).await;
        let want: Vec<_> = (0..=5)
            .map(|i| blank(1, i))
            .chain([blank(2, 6), blank(2, 7)])
            .collect();
        assert_eq!(got, want);

        store.truncate_after(None).await.expect("truncate all");
        drop(store);
        let mut store = LogStore::<Tc>::open(&path).expect("reopen after truncating all");
        assert!(all_entries(&mut store).await.is_empty());
        assert_eq!(
            store.get_log_state().await.expect("log state").last_log_id,
            None
        );
    }

    #[tokio::test]
    async fn reopen_after_purge_recovers_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        {
            let mut store = LogStore::<Tc>::open(&path).expect("open");
            store
                .blocking_append((0..10).map(|i| blank(1, i)))
                .await
                .expect("append");
            store.purge(log_id(1, 1, 4)).await.expect("purge");
            // Purging backwards is a no-op.
            store.purge(log_id(1, 1, 2)).await.expect("purge older");
        }

        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        let state = store.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 9)));
        let got = all_entries(&mut store).await;
        assert_eq!(got, (5..10).map(|i| blank(1, i)).collect::<Vec<_>>());

        // Purge past the end of the log (as after installing a snapshot): the log is empty and
        // the last log id falls back to the purged one; the next append continues after it.
        store
            .purge(log_id(3, 1, 20))
            .await
            .expect("purge past the end");
        drop(store);
        let mut store = LogStore::<Tc>::open(&path).expect("reopen after purge past end");
        let state = store.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, Some(log_id(3, 1, 20)));
        assert_eq!(state.last_log_id, Some(log_id(3, 1, 20)));
        assert!(all_entries(&mut store).await.is_empty());
        store
            .blocking_append([blank(3, 21)])
            .await
            .expect("append after snapshot");
        drop(store);
        let mut store = LogStore::<Tc>::open(&path).expect("reopen after append");
        assert_eq!(all_entries(&mut store).await, vec![blank(3, 21)]);
    }

    #[tokio::test]
    async fn append_refuses_holes_and_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::<Tc>::open(&db_path(&dir)).expect("open");
        store
            .blocking_append([blank(1, 0), blank(1, 1)])
            .await
            .expect("append");

        let gap = store.blocking_append([blank(1, 3)]).await;
        assert!(gap.is_err(), "a gap must be refused");
        let overwrite = store.blocking_append([blank(2, 1)]).await;
        assert!(
            overwrite.is_err(),
            "an overwrite without truncation must be refused"
        );
        let unordered = store.blocking_append([blank(1, 2), blank(1, 4)]).await;
        assert!(
            unordered.is_err(),
            "a non-consecutive batch must be refused"
        );

        assert_eq!(
            all_entries(&mut store).await,
            vec![blank(1, 0), blank(1, 1)]
        );
    }

    #[tokio::test]
    async fn truncate_refuses_committed_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::<Tc>::open(&db_path(&dir)).expect("open");
        store
            .blocking_append((0..5).map(|i| blank(1, i)))
            .await
            .expect("append");
        store
            .save_committed(Some(log_id(1, 1, 3)))
            .await
            .expect("save committed");

        let err = store
            .truncate_after(Some(log_id(1, 1, 2)))
            .await
            .expect_err("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        store
            .truncate_after(Some(log_id(1, 1, 3)))
            .await
            .expect("truncating after committed is fine");
        assert_eq!(all_entries(&mut store).await.len(), 4);
    }

    #[tokio::test]
    async fn reader_sees_appends_and_limits_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::<Tc>::open(&db_path(&dir)).expect("open");
        let mut reader = store.get_log_reader().await;
        store
            .blocking_append((0..5).map(|i| blank(1, i)))
            .await
            .expect("append");
        assert_eq!(
            reader.try_get_log_entries(1..=3).await.expect("read").len(),
            3
        );
        assert_eq!(
            reader
                .limited_get_log_entries(2, 100)
                .await
                .expect("read")
                .len(),
            3
        );
        assert!(
            reader
                .try_get_log_entries((Bound::Included(4), Bound::Excluded(2)))
                .await
                .expect("read")
                .is_empty()
        );
        assert!(
            reader
                .try_get_log_entries(5..)
                .await
                .expect("read")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn second_open_of_same_file_fails_while_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let store = LogStore::<Tc>::open(&path).expect("open");
        let err = LogStore::<Tc>::open(&path).expect_err("second open must fail");
        assert!(
            matches!(
                err,
                LogStoreError::Wal {
                    source: WalError::Locked { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        drop(store);
        LogStore::<Tc>::open(&path).expect("open after close");
    }

    #[tokio::test]
    async fn unknown_format_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let store = LogStore::<Tc>::open(&path).expect("open");
        assert_eq!(store.path(), path);
        drop(store);

        // A segment whose Format record carries version 99.
        let mut body = vec![1u8];
        body.extend_from_slice(&99u64.to_le_bytes());
        let mut record = (body.len() as u32).to_le_bytes().to_vec();
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);
        std::fs::write(path.join("0000000000000002.wal"), &record).expect("write segment");

        let err = LogStore::<Tc>::open(&path).expect_err("must refuse");
        assert!(
            matches!(
                err,
                LogStoreError::Wal {
                    source: WalError::Format { found: 99, .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// A redb database laid out as builds before the write-ahead log wrote it.
    fn write_redb_log(
        path: &Path,
        version: &str,
        meta: &[(&str, Vec<u8>)],
        entries: &[openraft::alias::EntryOf<Tc>],
    ) {
        use crate::log_import::{KEY_FORMAT_VERSION, LOG_TABLE, META_TABLE};
        let db = redb::Database::create(path).expect("create db");
        let txn = db.begin_write().expect("begin write");
        {
            let mut table = txn.open_table(META_TABLE).expect("meta table");
            table
                .insert(KEY_FORMAT_VERSION, version.as_bytes())
                .expect("insert");
            for (key, bytes) in meta {
                table.insert(*key, bytes.as_slice()).expect("insert");
            }
            let mut log = txn.open_table(LOG_TABLE).expect("log table");
            for e in entries {
                let bytes = postcard::to_allocvec(e).expect("encode");
                log.insert(e.index(), bytes.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn a_redb_log_of_an_earlier_build_is_imported_once() {
        use crate::log_import::{KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let legacy = path.with_extension("redb");
        let vote = VoteOf::<Tc>::new_committed(4, 2);
        let entries = vec![normal(2, 3, "c"), membership(2, 4), normal(3, 5, "e")];
        let meta = [
            (KEY_VOTE, postcard::to_allocvec(&vote).expect("encode")),
            (
                KEY_COMMITTED,
                postcard::to_allocvec(&log_id(2, 1, 4)).expect("encode"),
            ),
            (
                KEY_LAST_PURGED,
                postcard::to_allocvec(&log_id(2, 1, 2)).expect("encode"),
            ),
        ];
        write_redb_log(&legacy, "2", &meta, &entries);

        {
            let mut store = LogStore::<Tc>::open(&path).expect("open imports");
            assert!(!legacy.exists(), "the database is removed once imported");
            assert_eq!(store.read_vote().await.expect("vote"), Some(vote));
            assert_eq!(committed(&mut store).await, Some(4));
            let state = store.get_log_state().await.expect("state");
            assert_eq!(state.last_purged_log_id, Some(log_id(2, 1, 2)));
            assert_eq!(state.last_log_id, Some(log_id(3, 1, 5)));
            assert_eq!(all_entries(&mut store).await, entries);
            store
                .blocking_append(vec![normal(3, 6, "f")])
                .await
                .expect("append after import");
        }
        let mut store = LogStore::<Tc>::open(&path).expect("reopen");
        assert_eq!(all_entries(&mut store).await.len(), 4);
        assert_eq!(store.read_vote().await.expect("vote"), Some(vote));
    }

    #[tokio::test]
    async fn a_redb_log_of_an_unknown_format_is_not_imported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let legacy = path.with_extension("redb");
        write_redb_log(&legacy, "99", &[], &[]);
        let err = LogStore::<Tc>::open(&path).expect_err("must refuse");
        assert!(
            matches!(
                err,
                LogStoreError::UnsupportedFormat {
                    found: 99,
                    expected: crate::log_import::FORMAT_VERSION
                }
            ),
            "{err:?}"
        );
        assert!(
            legacy.exists(),
            "a database that is not imported is left alone"
        );
        assert!(!path.exists(), "and no log is made in its place");
    }

    // ---- openraft's storage conformance suite ----------------------------------------------
    //
    // The suite also exercises a state machine; this minimal in-memory one exists only to drive
    // it.

    #[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
    struct MemSmState {
        last_applied: Option<LogIdOf<Tc>>,
        last_membership: StoredMembershipOf<Tc>,
        data: BTreeMap<u64, String>,
    }

    type SnapshotSlot = Arc<std::sync::Mutex<Option<(SnapshotMetaOf<Tc>, Vec<u8>)>>>;

    #[derive(Default)]
    struct MemSm {
        state: MemSmState,
        /// The current snapshot, shared with builders so a built snapshot becomes current.
        current: SnapshotSlot,
    }

    struct MemSnapshotBuilder {
        state: MemSmState,
        current: SnapshotSlot,
    }

    impl RaftSnapshotBuilder<Tc> for MemSnapshotBuilder {
        type SnapshotData = Cursor<Vec<u8>>;

        async fn build_snapshot(
            &mut self,
        ) -> Result<SnapshotOf<Tc, Self::SnapshotData>, io::Error> {
            let bytes = serde_json::to_vec(&self.state).map_err(io::Error::other)?;
            let meta = SnapshotMeta {
                last_log_id: self.state.last_applied,
                last_membership: self.state.last_membership.clone(),
            };
            *self.current.lock().expect("snapshot slot") = Some((meta.clone(), bytes.clone()));
            Ok(SnapshotOf::<Tc, _> {
                meta,
                snapshot: Cursor::new(bytes),
            })
        }
    }

    impl RaftStateMachine<Tc> for MemSm {
        type SnapshotData = Cursor<Vec<u8>>;
        type SnapshotBuilder = MemSnapshotBuilder;

        async fn applied_state(
            &mut self,
        ) -> Result<(Option<LogIdOf<Tc>>, StoredMembershipOf<Tc>), io::Error> {
            Ok((self.state.last_applied, self.state.last_membership.clone()))
        }

        async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
        where
            Strm: Stream<Item = Result<EntryResponder<Tc>, io::Error>> + Unpin + OptionalSend,
        {
            while let Some(item) = entries.next().await {
                let (entry, responder) = item?;
                let id = entry.log_id();
                match &entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(data) => {
                        self.state.data.insert(id.index, data.clone());
                    }
                    EntryPayload::Membership(m) => {
                        self.state.last_membership = StoredMembership::new(Some(id), m.clone());
                    }
                }
                self.state.last_applied = Some(id);
                if let Some(responder) = responder {
                    responder.send(String::new());
                }
            }
            Ok(())
        }

        async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
            MemSnapshotBuilder {
                state: self.state.clone(),
                current: Arc::clone(&self.current),
            }
        }

        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMetaOf<Tc>,
            snapshot: Self::SnapshotData,
        ) -> Result<(), io::Error> {
            let bytes = snapshot.into_inner();
            self.state = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
            *self.current.lock().expect("snapshot slot") = Some((meta.clone(), bytes));
            Ok(())
        }

        async fn get_current_snapshot(
            &mut self,
        ) -> Result<Option<SnapshotOf<Tc, Self::SnapshotData>>, io::Error> {
            let current = self.current.lock().expect("snapshot slot");
            Ok(current.as_ref().map(|(meta, bytes)| SnapshotOf::<Tc, _> {
                meta: meta.clone(),
                snapshot: Cursor::new(bytes.clone()),
            }))
        }
    }

    /// Builds stores whose segments hold `segment_bytes`.
    struct Builder {
        segment_bytes: u64,
    }

    impl StoreBuilder<Tc, LogStore<Tc>, MemSm, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore<Tc>, MemSm), StorageError<Tc>> {
            let dir =
                tempfile::tempdir().map_err(|e| StorageError::read(Tc::err_from_error(&e)))?;
            let store = LogStore::open_sized(&db_path(&dir), self.segment_bytes)
                .map_err(|e| StorageError::read(Tc::err_from_error(&e)))?;
            Ok((dir, store, MemSm::default()))
        }
    }

    #[tokio::test]
    async fn openraft_storage_suite() {
        let builder = Builder {
            segment_bytes: SEGMENT_BYTES,
        };
        Suite::<Tc, LogStore<Tc>, MemSm, Builder, tempfile::TempDir>::test_all(builder)
            .await
            .expect("openraft storage suite");
    }

    /// The suite again with segments of a few entries each, so that appends, truncations and
    /// purges cross segment boundaries and whole segments are deleted.
    #[tokio::test]
    async fn openraft_storage_suite_on_small_segments() {
        let builder = Builder { segment_bytes: 256 };
        Suite::<Tc, LogStore<Tc>, MemSm, Builder, tempfile::TempDir>::test_all(builder)
            .await
            .expect("openraft storage suite");
    }

    #[tokio::test]
    async fn a_log_across_many_segments_survives_truncation_purge_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let segments = |path: &Path| {
            std::fs::read_dir(path)
                .expect("list")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
                })
                .count()
        };
        {
            let mut store = LogStore::<Tc>::open_sized(&path, 512).expect("open");
            for i in 0..40 {
                let entries = vec![normal(1, i, &format!("entry {i:04} {}", "x".repeat(40)))];
                store.blocking_append(entries).await.expect("append");
            }
            assert!(segments(&path) > 5, "{} segments", segments(&path));
            store
                .truncate_after(Some(log_id(1, 1, 29)))
                .await
                .expect("truncate");
            let entries: Vec<_> = (30..35).map(|i| normal(2, i, "again")).collect();
            store.blocking_append(entries).await.expect("append");
            commit(&mut store, 20).await;
            let written = segments(&path);
            store.purge(log_id(1, 1, 24)).await.expect("purge");
            let left = segments(&path);
            assert!(
                left < written,
                "purged segments are deleted: {written} → {left}"
            );
            store
                .save_vote(&VoteOf::<Tc>::new_committed(2, 1))
                .await
                .expect("vote");
        }
        let mut store = LogStore::<Tc>::open_sized(&path, 512).expect("reopen");
        let got = all_entries(&mut store).await;
        let indexes: Vec<u64> = got.iter().map(|e| e.index()).collect();
        assert_eq!(indexes, (25..35).collect::<Vec<_>>());
        assert_eq!(
            got[5].log_id(),
            log_id(2, 1, 30),
            "the truncated entries are gone"
        );
        assert_eq!(got[4].log_id(), log_id(1, 1, 29));
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 24)));
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(VoteOf::<Tc>::new_committed(2, 1))
        );
        assert!(committed(&mut store).await >= Some(20));
    }

    // ---- a real single-node Raft over the store ----------------------------------------------

    struct NoNetwork;
    struct NoConnection;

    impl openraft::RaftNetworkFactory<Tc> for NoNetwork {
        type Network = NoConnection;

        async fn new_client(&mut self, _target: u64, _node: &openraft::BasicNode) -> NoConnection {
            NoConnection
        }
    }

    fn unreachable() -> openraft::errors::Unreachable<Tc> {
        openraft::errors::Unreachable::from_string("single-node test has no network")
    }

    impl openraft::RaftNetworkV2<Tc> for NoConnection {
        type SnapshotData = Cursor<Vec<u8>>;

        async fn append_entries(
            &mut self,
            _rpc: openraft::raft::AppendEntriesRequest<Tc>,
            _option: openraft::network::RPCOption,
        ) -> Result<openraft::raft::AppendEntriesResponse<Tc>, openraft::errors::RPCError<Tc>>
        {
            Err(unreachable().into())
        }

        async fn vote(
            &mut self,
            _rpc: openraft::raft::VoteRequest<Tc>,
            _option: openraft::network::RPCOption,
        ) -> Result<openraft::raft::VoteResponse<Tc>, openraft::errors::RPCError<Tc>> {
            Err(unreachable().into())
        }

        async fn full_snapshot(
            &mut self,
            _vote: VoteOf<Tc>,
            _snapshot: SnapshotOf<Tc, Self::SnapshotData>,
            _cancel: impl std::future::Future<Output = openraft::errors::ReplicationClosed>
            + OptionalSend
            + 'static,
            _option: openraft::network::RPCOption,
        ) -> Result<openraft::raft::SnapshotResponse<Tc>, openraft::errors::StreamingError<Tc>>
        {
            Err(unreachable().into())
        }
    }

    #[tokio::test]
    async fn single_node_raft_commits_and_recovers_after_restart() {
        use openraft::async_runtime::WatchReceiver;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let config = Arc::new(
            openraft::Config::default()
                .validate()
                .expect("valid config"),
        );
        let timeout = Some(std::time::Duration::from_secs(10));

        let written = {
            let store = LogStore::<Tc>::open(&path).expect("open");
            let raft = openraft::Raft::<Tc, MemSm>::new(
                1,
                Arc::clone(&config),
                NoNetwork,
                store,
                MemSm::default(),
            )
            .await
            .expect("raft");
            let members = BTreeMap::from([(1u64, openraft::BasicNode::new("local"))]);
            raft.initialize(members).await.expect("initialize");
            raft.wait(timeout)
                .state(openraft::ServerState::Leader, "single node becomes leader")
                .await
                .expect("leader");
            let resp = raft
                .client_write("hello".to_string())
                .await
                .expect("client_write");
            assert_eq!(raft.metrics().borrow_watched().current_leader, Some(1));
            raft.shutdown().await.expect("shutdown");
            resp.log_id
        };

        // Every clone of the store must be gone once the node has shut down: the file reopens.
        let mut store = LogStore::<Tc>::open(&path).expect("reopen after shutdown");
        let state = store.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id, Some(written));
        assert!(store.read_vote().await.expect("vote").is_some());

        // A fresh (empty) state machine is rebuilt from the durable log.
        let raft = openraft::Raft::<Tc, MemSm>::new(1, config, NoNetwork, store, MemSm::default())
            .await
            .expect("raft after restart");
        raft.wait(timeout)
            .applied_index_at_least(Some(written.index), "re-applied after restart")
            .await
            .expect("re-applied");
        let data = raft
            .with_state_machine(|sm: &mut MemSm| {
                let values: Vec<String> = sm.state.data.values().cloned().collect();
                Box::pin(async move { values })
            })
            .await
            .expect("read state machine");
        assert_eq!(data, vec!["hello".to_string()]);
        raft.shutdown().await.expect("shutdown after restart");
    }
}
