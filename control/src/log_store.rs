//! Durable Raft log and vote storage on redb, so that a control-plane node that restarts or
//! crashes comes back with exactly the log, vote and commit point it had acknowledged.
//!
//! [`LogStore`] implements openraft's [`RaftLogStorage`] and [`RaftLogReader`] for any
//! [`RaftTypeConfig`]. Entries, votes and log ids are stored as JSON (serde) in two redb tables:
//!
//! - `raft_log`: log index (`u64`) to the serialized entry;
//! - `raft_meta`: the vote, the last committed log id, the last purged log id and the on-disk
//!   format version.
//!
//! Durability contract (see [`RaftLogStorage`]):
//!
//! - every mutation is one redb write transaction committed with [`Durability::Immediate`]
//!   (fsync) before the call returns, so `save_vote` is durable on return and `append` calls its
//!   [`IOFlushed`] callback only once the whole batch is on disk;
//! - `append` refuses a batch that would leave a hole or silently overwrite entries (openraft
//!   truncates conflicting entries before it appends);
//! - `truncate_after` never removes an entry at or below the persisted committed log id;
//! - `purge` removes entries and records `last_purged_log_id` in the same transaction, so the
//!   log state is consistent after a crash at any point.
//!
//! The blocking redb commits run on a blocking thread provided by the configured
//! [`openraft::AsyncRuntime`], never on the async executor thread. Reads are short redb read
//! transactions, each of which sees one consistent snapshot.

use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftTypeConfig;
use openraft::alias::LogIdOf;
use openraft::alias::VoteOf;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use openraft::type_config::TypeConfigExt;
use redb::Database;
use redb::Durability;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use redb::WriteTransaction;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Log entries: index -> JSON-encoded `C::Entry`.
const LOG_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft metadata: key -> JSON-encoded value.
const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const KEY_FORMAT_VERSION: &str = "format_version";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged_log_id";

/// Version of the on-disk layout written by this module. Bump it (and add a migration) whenever
/// the tables or the encoding change.
pub const FORMAT_VERSION: u64 = 1;

/// At most this many entries are returned by one `limited_get_log_entries` call.
const MAX_ENTRIES_PER_READ: usize = 4096;
/// `limited_get_log_entries` stops once it has read this many encoded bytes (it always returns at
/// least one entry when the range holds one).
const MAX_BYTES_PER_READ: usize = 8 * 1024 * 1024;

/// Errors raised by [`LogStore`].
///
/// Inside openraft's trait methods they are converted into [`io::Error`] (see the `From` impl),
/// keeping this error as the payload so its source chain stays visible.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The redb database file could not be created or opened.
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
        /// Underlying serde_json error.
        #[source]
        source: serde_json::Error,
    },

    /// A stored value could not be deserialized: the file is corrupt or was written with another
    /// `RaftTypeConfig`.
    #[error("raft log store: cannot decode stored {what}")]
    Decode {
        /// What was being decoded, e.g. `"log entry 42"` or `"vote"`.
        what: String,
        /// Underlying serde_json error.
        #[source]
        source: serde_json::Error,
    },

    /// The database was written with an on-disk format version this build does not understand.
    #[error(
        "raft log store: on-disk format version {found} is not supported (this build reads version {expected})"
    )]
    UnsupportedFormat {
        /// Version recorded in the database.
        found: u64,
        /// Version this build writes and reads ([`FORMAT_VERSION`]).
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

    /// A truncation would remove an entry at or below the persisted committed log id, which Raft
    /// never allows.
    #[error(
        "refusing to truncate the raft log from index {from}: entries up to the committed index {committed} must be kept"
    )]
    TruncateCommitted {
        /// First index the truncation would remove.
        from: u64,
        /// Index of the persisted committed log id.
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

    /// The blocking thread that runs a redb write could not be run or was lost.
    #[error("raft log store: the blocking task for {op} failed")]
    Background {
        /// The store operation that was running.
        op: &'static str,
        /// Error reported by the async runtime.
        #[source]
        source: io::Error,
    },
}

impl LogStoreError {
    fn redb(op: &'static str) -> impl FnOnce(redb::Error) -> Self {
        move |source| LogStoreError::Redb { op, source }
    }

    fn io_kind(&self) -> io::ErrorKind {
        match self {
            LogStoreError::NonContiguousAppend { .. }
            | LogStoreError::NonConsecutiveBatch { .. }
            | LogStoreError::TruncateCommitted { .. } => io::ErrorKind::InvalidInput,
            LogStoreError::Decode { .. }
            | LogStoreError::UnsupportedFormat { .. }
            | LogStoreError::Corrupt { .. } => io::ErrorKind::InvalidData,
            LogStoreError::Open { .. }
            | LogStoreError::Redb { .. }
            | LogStoreError::Encode { .. }
            | LogStoreError::Background { .. } => io::ErrorKind::Other,
        }
    }
}

impl From<LogStoreError> for io::Error {
    fn from(e: LogStoreError) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

/// Extension to attach the running operation to any redb error.
trait RedbResultExt<T> {
    fn op(self, op: &'static str) -> Result<T, LogStoreError>;
}

impl<T, E> RedbResultExt<T> for Result<T, E>
where
    E: Into<redb::Error>,
{
    fn op(self, op: &'static str) -> Result<T, LogStoreError> {
        self.map_err(|e| LogStoreError::redb(op)(e.into()))
    }
}

/// Durable Raft log + vote store backed by one redb database.
///
/// Cheap to clone: every clone shares the same database handle, so a clone is what
/// [`RaftLogStorage::get_log_reader`] hands to openraft's replication tasks.
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Inner>,
    _config: PhantomData<fn() -> C>,
}

struct Inner {
    db: Arc<Database>,
    path: Option<PathBuf>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _config: PhantomData,
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

impl<C: RaftTypeConfig> LogStore<C> {
    /// Opens (creating if absent) the redb database at `path` and prepares the log tables.
    ///
    /// redb allows one open handle per file: opening a path that is already open (for instance
    /// by a live clone of another `LogStore`) fails with [`LogStoreError::Open`].
    ///
    /// # Errors
    ///
    /// [`LogStoreError::Open`] if the file cannot be created or opened,
    /// [`LogStoreError::UnsupportedFormat`] if it was written by an incompatible build, and
    /// [`LogStoreError::Redb`] if the tables cannot be created.
    pub fn open(path: &Path) -> Result<LogStore<C>, LogStoreError> {
        let db = Database::create(path).map_err(|source| LogStoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Self::init(Arc::new(db), Some(path.to_path_buf()))?;
        tracing::info!(path = %path.display(), "raft log store opened");
        Ok(store)
    }

    /// Uses an already-open redb database, for instance one shared with the state machine.
    ///
    /// The log store only touches its own tables (`raft_log` and `raft_meta`).
    ///
    /// # Errors
    ///
    /// [`LogStoreError::UnsupportedFormat`] if the tables were written by an incompatible build,
    /// [`LogStoreError::Redb`] if they cannot be created.
    pub fn from_database(db: Arc<Database>) -> Result<LogStore<C>, LogStoreError> {
        Self::init(db, None)
    }

    /// The database file this store was opened from, if it was opened with [`LogStore::open`].
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Creates the tables and checks (or records) the on-disk format version.
    fn init(db: Arc<Database>, path: Option<PathBuf>) -> Result<LogStore<C>, LogStoreError> {
        const OP: &str = "initialise the log tables";
        write_durably(&db, OP, |txn| {
            txn.open_table(LOG_TABLE).op(OP)?;
            let mut meta = txn.open_table(META_TABLE).op(OP)?;
            let found = match meta.get(KEY_FORMAT_VERSION).op(OP)? {
                Some(v) => Some(decode::<u64>(v.value(), || "format version".to_string())?),
                None => None,
            };
            match found {
                Some(FORMAT_VERSION) => Ok(()),
                Some(found) => Err(LogStoreError::UnsupportedFormat {
                    found,
                    expected: FORMAT_VERSION,
                }),
                None => {
                    let bytes = encode(&FORMAT_VERSION, || "format version".to_string())?;
                    meta.insert(KEY_FORMAT_VERSION, bytes.as_slice()).op(OP)?;
                    Ok(())
                }
            }
        })?;
        Ok(LogStore {
            inner: Arc::new(Inner { db, path }),
            _config: PhantomData,
        })
    }

    /// Runs `f` (a durable redb write) on a blocking thread of the configured async runtime.
    async fn run_write<T, F>(&self, op: &'static str, f: F) -> Result<T, LogStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, LogStoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.inner.db);
        C::spawn_blocking(move || f(&db))
            .await
            .map_err(|source| LogStoreError::Background { op, source })?
    }

    /// Reads one metadata value in its own read transaction.
    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, LogStoreError> {
        const OP: &str = "read raft metadata";
        let txn = self.inner.db.begin_read().op(OP)?;
        let meta = txn.open_table(META_TABLE).op(OP)?;
        let value = meta.get(key).op(OP)?;
        value
            .map(|v| decode(v.value(), || key.to_string()))
            .transpose()
    }

    /// Writes one metadata value durably.
    async fn write_meta<T: Serialize>(
        &self,
        op: &'static str,
        key: &'static str,
        value: &T,
    ) -> Result<(), LogStoreError> {
        let bytes = encode(value, || key.to_string())?;
        self.run_write(op, move |db| {
            write_durably(db, op, |txn| {
                let mut meta = txn.open_table(META_TABLE).op(op)?;
                meta.insert(key, bytes.as_slice()).op(op)?;
                Ok(())
            })
        })
        .await
    }

    /// Reads the log state: last purged log id and last log id, from one read transaction.
    fn log_state(&self) -> Result<LogState<C>, LogStoreError> {
        const OP: &str = "read the log state";
        let txn = self.inner.db.begin_read().op(OP)?;
        let meta = txn.open_table(META_TABLE).op(OP)?;
        let last_purged: Option<LogIdOf<C>> = match meta.get(KEY_LAST_PURGED).op(OP)? {
            Some(v) => Some(decode(v.value(), || KEY_LAST_PURGED.to_string())?),
            None => None,
        };
        let log = txn.open_table(LOG_TABLE).op(OP)?;
        let last_log_id = match log.last().op(OP)? {
            Some((k, v)) => {
                let index = k.value();
                let entry: C::Entry = decode(v.value(), || format!("log entry {index}"))?;
                Some(entry.log_id())
            }
            None => last_purged.clone(),
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    /// Reads the entries in `[start, end)` (`end == None`: to the end of the log) from one read
    /// transaction, optionally stopping early at the per-read limits. Fails on a hole.
    fn read_entries(
        &self,
        start: u64,
        end: Option<u64>,
        limited: bool,
    ) -> Result<Vec<C::Entry>, LogStoreError> {
        const OP: &str = "read log entries";
        if end.is_some_and(|end| start >= end) {
            return Ok(Vec::new());
        }
        let txn = self.inner.db.begin_read().op(OP)?;
        let log = txn.open_table(LOG_TABLE).op(OP)?;
        let range = match end {
            Some(end) => log.range(start..end).op(OP)?,
            None => log.range(start..).op(OP)?,
        };

        let mut entries = Vec::new();
        let mut bytes_read = 0usize;
        let mut expected: Option<u64> = None;
        for item in range {
            let (k, v) = item.op(OP)?;
            let index = k.value();
            if let Some(expected) = expected
                && index != expected
            {
                return Err(LogStoreError::Corrupt {
                    expected,
                    found: index,
                });
            }
            let raw = v.value();
            let entry: C::Entry = decode(raw, || format!("log entry {index}"))?;
            if entry.index() != index {
                return Err(LogStoreError::Corrupt {
                    expected: index,
                    found: entry.index(),
                });
            }
            entries.push(entry);
            bytes_read = bytes_read.saturating_add(raw.len());
            if limited
                && (entries.len() >= MAX_ENTRIES_PER_READ || bytes_read >= MAX_BYTES_PER_READ)
            {
                break;
            }
            expected = index.checked_add(1);
        }
        Ok(entries)
    }
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C> {
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
        Ok(self.read_meta(KEY_VOTE)?)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, io::Error> {
        Ok(self.read_entries(start, Some(end), true)?)
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogStore<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        Ok(self.log_state()?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.write_meta("save the vote", KEY_VOTE, vote).await?;
        tracing::debug!(vote = %vote, "raft vote saved");
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        const OP: &str = "save the committed log id";
        let Some(committed) = committed else {
            // openraft never moves the commit point back to "nothing"; keep what is stored.
            return Ok(());
        };
        self.write_meta(OP, KEY_COMMITTED, &committed).await?;
        tracing::trace!(committed = %committed, "raft committed log id saved");
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.read_meta(KEY_COMMITTED)?)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encode on the caller's thread; the batch must be consecutive.
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        for entry in entries {
            let index = entry.index();
            if let Some(&(prev, _)) = batch.last()
                && prev.checked_add(1) != Some(index)
            {
                let err = LogStoreError::NonConsecutiveBatch { prev, got: index };
                return Err(fail_callback(callback, err));
            }
            match encode(&entry, || format!("log entry {index}")) {
                Ok(bytes) => batch.push((index, bytes)),
                Err(err) => return Err(fail_callback(callback, err)),
            }
        }
        let (Some(&(first, _)), Some(&(last, _))) = (batch.first(), batch.last()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let count = batch.len();

        let res = self
            .run_write("append log entries", move |db| append_batch::<C>(db, batch))
            .await;
        match res {
            Ok(()) => {
                tracing::debug!(first, last, count, "raft log entries appended");
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(err) => {
                tracing::error!(first, last, count, error = %err, "raft log append failed");
                Err(fail_callback(callback, err))
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        const OP: &str = "truncate the log";
        let from = match &last_log_id {
            Some(id) => id.index.saturating_add(1),
            None => 0,
        };
        self.run_write(OP, move |db| {
            write_durably(db, OP, |txn| {
                let meta = txn.open_table(META_TABLE).op(OP)?;
                let committed: Option<LogIdOf<C>> = match meta.get(KEY_COMMITTED).op(OP)? {
                    Some(v) => Some(decode(v.value(), || KEY_COMMITTED.to_string())?),
                    None => None,
                };
                if let Some(committed) = committed
                    && from <= committed.index
                {
                    return Err(LogStoreError::TruncateCommitted {
                        from,
                        committed: committed.index,
                    });
                }
                let mut log = txn.open_table(LOG_TABLE).op(OP)?;
                log.retain_in::<u64, _>(from.., |_, _| false).op(OP)?;
                Ok(())
            })
        })
        .await?;
        tracing::debug!(from, "raft log truncated");
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        const OP: &str = "purge the log";
        let upto = log_id.index;
        let bytes = encode(&log_id, || KEY_LAST_PURGED.to_string())?;
        let purged = self
            .run_write(OP, move |db| {
                write_durably(db, OP, |txn| {
                    let mut meta = txn.open_table(META_TABLE).op(OP)?;
                    let prev: Option<LogIdOf<C>> = match meta.get(KEY_LAST_PURGED).op(OP)? {
                        Some(v) => Some(decode(v.value(), || KEY_LAST_PURGED.to_string())?),
                        None => None,
                    };
                    if prev.is_some_and(|prev| prev.index >= upto) {
                        // Already purged at least this far: purging is idempotent and never
                        // moves back.
                        return Ok(false);
                    }
                    meta.insert(KEY_LAST_PURGED, bytes.as_slice()).op(OP)?;
                    let mut log = txn.open_table(LOG_TABLE).op(OP)?;
                    log.retain_in::<u64, _>(..=upto, |_, _| false).op(OP)?;
                    Ok(true)
                })
            })
            .await?;
        if purged {
            tracing::debug!(upto, "raft log purged");
        }
        Ok(())
    }
}

/// Writes a batch in one durable transaction, refusing anything that would not extend the log.
fn append_batch<C: RaftTypeConfig>(
    db: &Database,
    batch: Vec<(u64, Vec<u8>)>,
) -> Result<(), LogStoreError> {
    const OP: &str = "append log entries";
    let Some(&(first, _)) = batch.first() else {
        return Ok(());
    };
    write_durably(db, OP, |txn| {
        let mut log = txn.open_table(LOG_TABLE).op(OP)?;
        let last_index = log.last().op(OP)?.map(|(k, _)| k.value());
        let expected = match last_index {
            Some(last) => Some(last.saturating_add(1)),
            None => {
                let meta = txn.open_table(META_TABLE).op(OP)?;
                let purged: Option<LogIdOf<C>> = match meta.get(KEY_LAST_PURGED).op(OP)? {
                    Some(v) => Some(decode(v.value(), || KEY_LAST_PURGED.to_string())?),
                    None => None,
                };
                // An empty log that was never purged may start anywhere (openraft starts at 0,
                // a store seeded by tests may not).
                purged.map(|p| p.index.saturating_add(1))
            }
        };
        if let Some(expected) = expected
            && first != expected
        {
            return Err(LogStoreError::NonContiguousAppend {
                expected,
                got: first,
            });
        }
        for (index, bytes) in &batch {
            log.insert(*index, bytes.as_slice()).op(OP)?;
        }
        Ok(())
    })
}

/// Runs `f` in one write transaction committed with [`Durability::Immediate`]; aborts it if `f`
/// fails.
fn write_durably<T>(
    db: &Database,
    op: &'static str,
    f: impl FnOnce(&WriteTransaction) -> Result<T, LogStoreError>,
) -> Result<T, LogStoreError> {
    let mut txn = db.begin_write().op(op)?;
    txn.set_durability(Durability::Immediate).op(op)?;
    match f(&txn) {
        Ok(value) => {
            txn.commit().op(op)?;
            Ok(value)
        }
        Err(err) => {
            if let Err(abort_err) = txn.abort() {
                tracing::warn!(op, error = %abort_err, "aborting a failed raft log transaction failed");
            }
            Err(err)
        }
    }
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
    serde_json::to_vec(value).map_err(|source| LogStoreError::Encode {
        what: what(),
        source,
    })
}

fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, LogStoreError> {
    serde_json::from_slice(bytes).map_err(|source| LogStoreError::Decode {
        what: what(),
        source,
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
        dir.path().join("raft-log.redb")
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
        assert!(matches!(err, LogStoreError::Open { .. }), "{err:?}");
        drop(store);
        LogStore::<Tc>::open(&path).expect("open after close");
    }

    #[tokio::test]
    async fn unknown_format_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = db_path(&dir);
        let db = Arc::new(Database::create(&path).expect("create db"));
        let store = LogStore::<Tc>::from_database(Arc::clone(&db)).expect("from_database");
        assert_eq!(store.path(), None);
        drop(store);

        let txn = db.begin_write().expect("begin write");
        {
            let mut meta = txn.open_table(META_TABLE).expect("meta table");
            meta.insert(KEY_FORMAT_VERSION, b"99".as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");

        let err = LogStore::<Tc>::from_database(db).expect_err("must refuse");
        assert!(
            matches!(
                err,
                LogStoreError::UnsupportedFormat {
                    found: 99,
                    expected: FORMAT_VERSION
                }
            ),
            "{err:?}"
        );
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

    struct Builder;

    impl StoreBuilder<Tc, LogStore<Tc>, MemSm, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore<Tc>, MemSm), StorageError<Tc>> {
            let dir =
                tempfile::tempdir().map_err(|e| StorageError::read(Tc::err_from_error(&e)))?;
            let store = LogStore::open(&db_path(&dir))
                .map_err(|e| StorageError::read(Tc::err_from_error(&e)))?;
            Ok((dir, store, MemSm::default()))
        }
    }

    #[tokio::test]
    async fn openraft_storage_suite() {
        Suite::<Tc, LogStore<Tc>, MemSm, Builder, tempfile::TempDir>::test_all(Builder)
            .await
            .expect("openraft storage suite");
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
