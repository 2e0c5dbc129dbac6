//! The raft log of builds before the write-ahead log (a redb database, `raft-log.redb`), read
//! once so that a replica upgraded in place keeps its log, vote and commit point.
//!
//! The values in the database are already encoded the way the write-ahead log stores them
//! (postcard), so they are copied as they are: the vote, the commit point, the purge point,
//! then every entry. The new log is written in a directory of its own and renamed into place
//! only once it is complete and on disk; the database is removed after that. A crash at any
//! point leaves either the database (imported again on the next start) or the new log.

use std::fs;
use std::path::Path;

use openraft::RaftTypeConfig;
use openraft::alias::LogIdOf;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::log_store::LogStoreError;
use crate::wal::{Record, Wal, WalError};

/// Log entries: index -> postcard-encoded `C::Entry`.
pub(crate) const LOG_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft metadata: key -> postcard-encoded value (the format version: JSON text).
pub(crate) const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

pub(crate) const KEY_FORMAT_VERSION: &str = "format_version";
pub(crate) const KEY_VOTE: &str = "vote";
pub(crate) const KEY_COMMITTED: &str = "committed";
pub(crate) const KEY_LAST_PURGED: &str = "last_purged_log_id";

/// The only version of the database layout that can be imported (postcard values).
pub const FORMAT_VERSION: u64 = 2;

/// Entries copied per write.
const ENTRIES_PER_WRITE: usize = 1024;

fn redb_err<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> LogStoreError {
    move |e| LogStoreError::Redb {
        op,
        source: e.into(),
    }
}

/// Moves the log in the redb database at `db_path` into a new write-ahead log at `wal_dir`
/// (which must not exist), then removes the database.
pub fn import<C: RaftTypeConfig>(
    db_path: &Path,
    wal_dir: &Path,
    segment_bytes: u64,
) -> Result<(), LogStoreError> {
    const OP: &str = "import the raft log of an earlier build";
    let db = Database::open(db_path).map_err(|source| LogStoreError::Open {
        path: db_path.to_path_buf(),
        source,
    })?;
    let txn = db.begin_read().map_err(redb_err(OP))?;
    let meta = match txn.open_table(META_TABLE) {
        Ok(meta) => Some(meta),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(redb_err(OP)(e)),
    };
    let get = |key: &str| -> Result<Option<Vec<u8>>, LogStoreError> {
        let Some(meta) = &meta else { return Ok(None) };
        Ok(meta
            .get(key)
            .map_err(redb_err(OP))?
            .map(|v| v.value().to_vec()))
    };
    if let Some(version) = get(KEY_FORMAT_VERSION)? {
        let found: u64 = serde_json::from_slice(&version).map_err(|e| LogStoreError::Decode {
            what: "format version".into(),
            reason: e.to_string(),
        })?;
        if found != FORMAT_VERSION {
            return Err(LogStoreError::UnsupportedFormat {
                found,
                expected: FORMAT_VERSION,
            });
        }
    }
    let vote = get(KEY_VOTE)?;
    let committed = get(KEY_COMMITTED)?;
    let purged = match get(KEY_LAST_PURGED)? {
        Some(bytes) => {
            let id: LogIdOf<C> =
                postcard::from_bytes(&bytes).map_err(|e| LogStoreError::Decode {
                    what: "purged log id".into(),
                    reason: e.to_string(),
                })?;
            Some((id.index(), bytes))
        }
        None => None,
    };

    let staging = wal_dir.with_extension("importing");
    if staging.exists() {
        // What an earlier, interrupted import left.
        fs::remove_dir_all(&staging).map_err(wal_io("cannot remove", &staging))?;
    }
    let (wal, mut writer, _) = Wal::open(&staging, segment_bytes).map_err(wal_err(OP))?;
    let mut head = Vec::new();
    if let Some(vote) = &vote {
        head.push(Record::Vote(vote));
    }
    if let Some(committed) = &committed {
        head.push(Record::Committed(committed));
    }
    if let Some((upto, bytes)) = &purged {
        head.push(Record::Purge { upto: *upto, bytes });
    }
    writer.write(&head).map_err(wal_err(OP))?;

    let mut entries = 0u64;
    match txn.open_table(LOG_TABLE) {
        Ok(log) => {
            let mut chunk: Vec<(u64, Vec<u8>)> = Vec::with_capacity(ENTRIES_PER_WRITE);
            for item in log.iter().map_err(redb_err(OP))? {
                let (k, v) = item.map_err(redb_err(OP))?;
                chunk.push((k.value(), v.value().to_vec()));
                if chunk.len() == ENTRIES_PER_WRITE {
                    write_entries(&mut writer, &chunk)?;
                    entries += chunk.len() as u64;
                    chunk.clear();
                }
            }
            write_entries(&mut writer, &chunk)?;
            entries += chunk.len() as u64;
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(redb_err(OP)(e)),
    }
    drop(writer);
    drop(wal);
    drop(txn);
    drop(db);

    fs::rename(&staging, wal_dir).map_err(wal_io("cannot rename into place", &staging))?;
    crate::wal::sync_parent(wal_dir).map_err(wal_err(OP))?;
    fs::remove_file(db_path).map_err(wal_io("cannot remove", db_path))?;
    tracing::info!(
        from = %db_path.display(),
        to = %wal_dir.display(),
        entries,
        "imported the raft log of an earlier build"
    );
    Ok(())
}

fn write_entries(
    writer: &mut crate::wal::WalWriter,
    chunk: &[(u64, Vec<u8>)],
) -> Result<(), LogStoreError> {
    if chunk.is_empty() {
        return Ok(());
    }
    let records: Vec<Record<'_>> = chunk
        .iter()
        .map(|(index, bytes)| Record::Entry {
            index: *index,
            bytes,
        })
        .collect();
    writer
        .write(&records)
        .map_err(wal_err("import the raft log of an earlier build"))
}

fn wal_err(op: &'static str) -> impl FnOnce(WalError) -> LogStoreError {
    move |source| LogStoreError::Wal { op, source }
}

fn wal_io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogStoreError {
    let path = path.to_path_buf();
    move |source| LogStoreError::Wal {
        op: "import the raft log of an earlier build",
        source: WalError::Io {
            op: what,
            path,
            source,
        },
    }
}
