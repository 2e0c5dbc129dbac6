//! The commit point file: the last committed log id, written without an
//! fsync once every entry it covers is on disk, so that committing never
//! waits for a disk flush of its own.
//!
//! Raft does not need the commit point to be durable (the paper keeps it
//! volatile); a replica saves it so that after a restart it can re-apply its
//! log up to where it was instead of waiting for a leader. That only needs
//! the point to survive the *process*: a plain `pwrite` is in the kernel's
//! page cache the moment it returns, and a SIGKILL, panic or OOM kill cannot
//! take it back. Only a machine crash can lose it, and then the replica comes
//! back with an older commit point and catches up from the leader — the
//! same trade etcd makes (its raft `HardState.Commit` is written to the WAL
//! but not synced on its own).
//!
//! Two rules keep the file honest:
//! - it is written only after every log entry up to the point it names is
//!   durable (at once when they are, as they usually are by the time the
//!   point moves; otherwise the log writer writes it behind the operations
//!   queued before it), so it never names an entry the log could lose;
//! - the state machine applies an entry only once the file covers it
//!   ([`Written::wait_for`]), so a replica killed at any moment restarts with
//!   at least the state it had served.
//!
//! The file holds one record, rewritten in place: the payload's length
//! (u32, little-endian), its CRC-32 (u32, little-endian), then the payload.
//! A record that does not check out (a machine crash mid-write) is ignored.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tokio::sync::watch;

/// The commit point file of one log store.
#[derive(Debug)]
pub struct CommitFile {
    file: File,
    path: PathBuf,
}

impl CommitFile {
    /// Opens (creating if absent) the file at `path`, and returns the
    /// payload of its record if it holds a valid one.
    pub fn open(path: &Path) -> io::Result<(CommitFile, Option<Vec<u8>>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut record = Vec::new();
        io::Read::read_to_end(&mut &file, &mut record)?;
        let payload = decode(&record);
        if payload.is_none() && !record.is_empty() {
            tracing::warn!(
                path = %path.display(),
                bytes = record.len(),
                "the commit point file holds no valid record (a crash mid-write?); ignoring it"
            );
        }
        Ok((
            CommitFile {
                file,
                path: path.to_path_buf(),
            },
            payload,
        ))
    }

    /// Replaces the record with `payload`. No fsync: see the module docs.
    pub fn write(&self, payload: &[u8]) -> io::Result<()> {
        self.file
            .write_all_at(&encode(payload), 0)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of `record`, if its length and checksum check out. Bytes
/// after the record are ignored: a shorter record may overwrite a longer one.
fn decode(record: &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_le_bytes(record.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(record.get(4..8)?.try_into().ok()?);
    let payload = record.get(8..8usize.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then(|| payload.to_vec())
}

/// How far the commit point file reaches, as the log writer reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// The file covers every entry up to this index (`None`: none yet).
    Upto(Option<u64>),
    /// The log writer failed; nothing more will be written.
    Failed(String),
}

/// The log writer's side of [`Written`].
pub type Reporter = watch::Sender<Reach>;

/// What the state machine waits on before applying an entry.
#[derive(Debug, Clone)]
pub struct Written(watch::Receiver<Reach>);

impl Written {
    /// A reporter starting at `upto`, and its receiver.
    pub fn channel(upto: Option<u64>) -> (Reporter, Written) {
        let (tx, rx) = watch::channel(Reach::Upto(upto));
        (tx, Written(rx))
    }

    /// Waits until the commit point file covers `index`.
    ///
    /// # Errors
    ///
    /// When the log writer failed or is gone: the entry may never be covered.
    pub async fn wait_for(&mut self, index: u64) -> io::Result<()> {
        let covered = |r: &Reach| match r {
            Reach::Upto(upto) => upto.is_some_and(|u| u >= index),
            Reach::Failed(_) => true,
        };
        let reach = self
            .0
            .wait_for(covered)
            .await
            .map_err(|_| io::Error::other("the raft log writer is gone"))?;
        match &*reach {
            Reach::Upto(_) => Ok(()),
            Reach::Failed(reason) => Err(io::Error::other(format!(
                "the raft log writer failed, so log index {index} cannot be applied: {reason}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_shorter_one_overwrites_a_longer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("commit");
        {
            let (f, found) = CommitFile::open(&path).expect("open");
            assert_eq!(found, None, "a new file holds no record");
            f.write(b"a longer first payload").expect("write");
            f.write(b"short").expect("write");
        }
        let (_, found) = CommitFile::open(&path).expect("reopen");
        assert_eq!(found.as_deref(), Some(&b"short"[..]));
    }

    #[test]
    fn a_torn_or_corrupt_record_is_ignored() {
        let record = encode(b"payload");
        assert_eq!(decode(&record).as_deref(), Some(&b"payload"[..]));
        assert_eq!(decode(&record[..record.len() - 1]), None, "torn");
        let mut flipped = record.clone();
        flipped[9] ^= 1;
        assert_eq!(decode(&flipped), None, "corrupt");
        assert_eq!(decode(&[]), None, "empty");
    }

    #[tokio::test]
    async fn waiters_wake_when_the_file_covers_their_entry_or_the_writer_fails() {
        let (tx, mut written) = Written::channel(Some(3));
        written.wait_for(3).await.expect("already covered");
        let mut w = written.clone();
        let waiter = tokio::spawn(async move { w.wait_for(5).await });
        tx.send_replace(Reach::Upto(Some(4)));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "4 does not cover 5");
        tx.send_replace(Reach::Upto(Some(5)));
        waiter.await.expect("join").expect("covered");

        tx.send_replace(Reach::Failed("disk on fire".into()));
        let err = written.wait_for(6).await.expect_err("writer failed");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        drop(tx);
        assert!(written.wait_for(7).await.is_err(), "writer gone");
    }
}
