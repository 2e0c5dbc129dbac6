//! The Raft log on disk: an append-only write-ahead log in preallocated segment files, so that
//! a group of appends costs one `pwrite` and one `fdatasync` (etcd's WAL design) instead of a
//! copy-on-write B-tree transaction.
//!
//! A segment is a file named after its sequence number (`0000000000000001.wal`), preallocated
//! to [`Wal::open`]'s segment size and filled with records from the start:
//!
//! ```text
//! record  = len: u32 LE | crc: u32 LE | kind: u8 | payload      (len and crc cover kind|payload)
//! payload = Entry: index u64 LE | entry bytes   Vote: bytes   Committed: bytes
//!           Truncate: from u64 LE   Purge: upto u64 LE | log id bytes   Format: version u64 LE
//! ```
//!
//! The rest of a segment is zeros (a zero length ends it). Every segment begins with a Format
//! record and the latest vote, commit point and purge point, so that older segments can be
//! deleted once no live entry is in them: replay needs only the segments from the one holding the
//! first live entry. Replay applies the records in order: an entry, a truncation or a purge moves
//! the set of live entries exactly as it did when written.
//!
//! A crash mid-write leaves a record that does not check out (or zeros followed by some of the
//! write) at the end of the last segment. Replay stops there and zeroes the rest of the file, so
//! the next write starts from what was durable and nothing of the torn one can be read back. A
//! record that does not check out anywhere else is corruption, and the log refuses to open. A new
//! segment is written and synced under a staging name and then renamed, so a segment is never
//! seen without its header records; and since only a prefix of the segments is ever deleted,
//! segments before a gap (deletions a crash took back) are dead and are not replayed.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Version of the record layout; a Format record carrying another is refused.
pub const WAL_FORMAT: u64 = 1;

/// Bytes of the record header: length and checksum.
const HEADER: usize = 8;

const KIND_FORMAT: u8 = 1;
const KIND_ENTRY: u8 = 2;
const KIND_VOTE: u8 = 3;
const KIND_COMMITTED: u8 = 4;
const KIND_TRUNCATE: u8 = 5;
const KIND_PURGE: u8 = 6;

/// One thing written to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A log entry (encoded by the caller) at `index`.
    Entry { index: u64, bytes: &'a [u8] },
    /// The vote (encoded).
    Vote(&'a [u8]),
    /// The commit point (encoded log id).
    Committed(&'a [u8]),
    /// Entries from `from` on are gone.
    Truncate { from: u64 },
    /// Entries up to `upto` are gone; `bytes` is the encoded purged log id.
    Purge { upto: u64, bytes: &'a [u8] },
}

/// Errors of the write-ahead log, each naming the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process (or store) has the log open.
    #[error("the raft log at {path} is in use by another process")]
    Locked { path: PathBuf },
    /// A segment was written by a build with another record layout.
    #[error(
        "{path}: WAL format version {found} is not supported (this build reads version {expected})"
    )]
    Format {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// A record that does not check out before the end of the log, or records that contradict
    /// each other.
    #[error("the raft log is corrupt: {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// What replay found: the metadata as last written, and the live entries.
#[derive(Debug, Default)]
pub struct Recovered {
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
    /// The last purge: up to which index, and the encoded log id.
    pub purged: Option<(u64, Vec<u8>)>,
    /// The last live entry's index.
    pub last: Option<u64>,
}

/// Where one entry's bytes are.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

/// The live entries (consecutive, from `first`) and the open segment files.
#[derive(Debug, Default)]
struct Index {
    first: u64,
    locs: VecDeque<Loc>,
    files: BTreeMap<u64, Arc<File>>,
}

impl Index {
    fn next(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    fn last(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.next() - 1)
    }

    /// Entries from `from` on are gone.
    fn truncate(&mut self, from: u64) {
        let keep = from.saturating_sub(self.first);
        self.locs
            .truncate(usize::try_from(keep).unwrap_or(usize::MAX));
    }

    fn purge(&mut self, upto: u64) {
        while self.first <= upto && !self.locs.is_empty() {
            self.locs.pop_front();
            self.first += 1;
        }
        if self.locs.is_empty() {
            self.first = self.first.max(upto.saturating_add(1));
        }
    }

    /// Adds the entry at `index`; one at or before the end replaces what is there (and after).
    /// `Err(next)`: it would leave a hole after `next - 1`.
    fn push(&mut self, index: u64, loc: Loc) -> Result<(), u64> {
        if self.locs.is_empty() || index < self.first {
            self.locs.clear();
            self.first = index;
        } else if index > self.next() {
            return Err(self.next());
        } else {
            self.truncate(index);
        }
        self.locs.push_back(loc);
        Ok(())
    }

    /// The segment holding the first live entry: every older one can go.
    fn oldest_needed(&self, current: u64) -> u64 {
        self.locs
            .front()
            .map_or(current, |l| l.segment.min(current))
    }
}

/// The log's shared, read side; [`WalWriter`] is its one writer.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    index: Mutex<Index>,
    /// Held (flock) for as long as the log is open.
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WalError {
    let path = path.to_path_buf();
    move |source| WalError::Io { op, path, source }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

/// The sequence numbers of the segments in `dir`, in order.
fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else {
            continue;
        };
        if let Ok(seq) = u64::from_str_radix(stem, 16) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync the directory", dir))
}

/// Syncs the directory holding `path`, so that a name just created or renamed there is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<(), WalError> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Reserves `bytes` for `file` so that appends within them do not grow it (and `fdatasync` has
/// no size to record). File systems without `fallocate` get a sparse file instead.
fn preallocate(file: &File, path: &Path, bytes: u64) -> Result<(), WalError> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, bytes) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => file
            .set_len(bytes)
            .map_err(io_err("cannot size the segment", path)),
        Err(e) => Err(io_err("cannot preallocate", path)(e.into())),
    }
}

/// Appends `record` (header included) to `buf`; returns where its payload's bytes after the
/// kind-specific prefix start, relative to `buf`'s start, and their length (for entries).
fn encode(buf: &mut Vec<u8>, record: &Record<'_>) -> (usize, u32) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    let mut body_at = 0;
    let mut body_len = 0;
    match *record {
        Record::Entry { index, bytes } => {
            buf.push(KIND_ENTRY);
            buf.extend_from_slice(&index.to_le_bytes());
            body_at = buf.len();
            body_len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            buf.extend_from_slice(bytes);
        }
        Record::Vote(bytes) => {
            buf.push(KIND_VOTE);
            buf.extend_from_slice(bytes);
        }
        Record::Committed(bytes) => {
            buf.push(KIND_COMMITTED);
            buf.extend_from_slice(bytes);
        }
        Record::Truncate { from } => {
            buf.push(KIND_TRUNCATE);
            buf.extend_from_slice(&from.to_le_bytes());
        }
        Record::Purge { upto, bytes } => {
            buf.push(KIND_PURGE);
            buf.extend_from_slice(&upto.to_le_bytes());
            buf.extend_from_slice(bytes);
        }
    }
    finish(buf, start);
    (body_at, body_len)
}

fn encode_format(buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf.push(KIND_FORMAT);
    buf.extend_from_slice(&WAL_FORMAT.to_le_bytes());
    finish(buf, start);
}

/// Fills in the header of the record starting at `start`.
fn finish(buf: &mut [u8], start: usize) {
    let body = &buf[start + HEADER..];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// One record as read back: its kind, its payload and where the payload starts in the file.
struct Parsed<'a> {
    kind: u8,
    payload: &'a [u8],
    payload_at: u64,
}

/// The record at `offset` of `data`: `Ok(None)` at the end (zeros or the end of the file),
/// `Err(reason)` if it does not check out.
fn parse(data: &[u8], offset: usize) -> Result<Option<(Parsed<'_>, usize)>, String> {
    let Some(header) = data.get(offset..offset + HEADER) else {
        return if data[offset.min(data.len())..].iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err("a record header is cut off".into())
        };
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 {
        return if crc == 0 {
            Ok(None)
        } else {
            Err("a record of length 0".into())
        };
    }
    let body = data
        .get(offset + HEADER..offset + HEADER + len)
        .ok_or_else(|| format!("a record of {len} bytes is cut off"))?;
    if crc32fast::hash(body) != crc {
        return Err("a record's checksum does not match".into());
    }
    let parsed = Parsed {
        kind: body[0],
        payload: &body[1..],
        payload_at: (offset + HEADER + 1) as u64,
    };
    Ok(Some((parsed, offset + HEADER + len)))
}

fn read_u64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

impl Wal {
    /// Opens the log in `dir` (creating it), replays it, and returns the read side, the writer
    /// and what replay found. Segments are preallocated to `segment_bytes`.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(Arc<Wal>, WalWriter, Recovered), WalError> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
            sync_parent(dir)?;
        }
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("cannot open", &lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(WalError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path)(e)),
        }

        remove_staged(dir)?;
        let mut seqs = list_segments(dir)?;
        // Segments are numbered one after another and only a prefix is ever deleted, so anything
        // before a gap is a dead segment whose deletion a crash took back: never replay it.
        if let Some(gap) = seqs.windows(2).rposition(|w| w[0] + 1 != w[1]) {
            for &stale in &seqs[..=gap] {
                let path = segment_path(dir, stale);
                tracing::warn!(path = %path.display(), "removing a dead raft log segment left behind a gap");
                fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
            }
            seqs.drain(..=gap);
        }
        let mut index = Index::default();
        let mut recovered = Recovered::default();
        let mut tail_end = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let is_last = i + 1 == seqs.len();
            let end = replay(dir, seq, is_last, &mut index, &mut recovered)?;
            if is_last {
                tail_end = Some((seq, end));
            }
        }
        recovered.last = index.last();

        let (seq, offset, header_end, file) = match tail_end {
            Some((seq, end)) => {
                let path = segment_path(dir, seq);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err("cannot open", &path))?;
                (seq, end, 0, file)
            }
            None => {
                let seq = 1;
                let file = create_segment(dir, seq, segment_bytes, &recovered)?;
                let offset = header_bytes(&recovered).len() as u64;
                (seq, offset, offset, file)
            }
        };
        let file = Arc::new(file);
        for &s in &seqs {
            if s == seq {
                continue;
            }
            let path = segment_path(dir, s);
            let f = File::open(&path).map_err(io_err("cannot open", &path))?;
            index.files.insert(s, Arc::new(f));
        }
        index.files.insert(seq, Arc::clone(&file));
        let wal = Arc::new(Wal {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            _lock: lock_file,
        });
        let writer = WalWriter {
            wal: Arc::clone(&wal),
            seq,
            file,
            offset,
            header_end,
            segment_bytes,
            vote: recovered.vote.clone(),
            committed: recovered.committed.clone(),
            purged: recovered.purged.clone(),
            buf: Vec::new(),
        };
        writer.remove_dead_segments();
        Ok((wal, writer, recovered))
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live entries' index range: `(first, last)`, `None` when there are none.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let index = lock(&self.index);
        index.last().map(|last| (index.first, last))
    }

    /// Reads the live entries in `[start, end)` (`end == None`: to the last), at most `limit`
    /// of them and stopping once `max_bytes` are read (at least one is read when one is there).
    /// What is returned is consecutive, from the first live entry at or after `start`.
    pub fn read(
        &self,
        start: u64,
        end: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        let mut wanted = Vec::new();
        {
            let index = lock(&self.index);
            let start = start.max(index.first);
            let end = end.map_or(index.next(), |e| e.min(index.next()));
            let mut bytes = 0usize;
            let mut i = start;
            while i < end && wanted.len() < limit {
                let loc = index.locs[(i - index.first) as usize];
                if !wanted.is_empty() && bytes.saturating_add(loc.len as usize) > max_bytes {
                    break;
                }
                bytes = bytes.saturating_add(loc.len as usize);
                let Some(file) = index.files.get(&loc.segment) else {
                    return Err(WalError::Corrupt {
                        path: segment_path(&self.dir, loc.segment),
                        offset: loc.offset,
                        reason: format!("the segment holding entry {i} is gone"),
                    });
                };
                wanted.push((i, loc, Arc::clone(file)));
                i += 1;
            }
        }
        wanted
            .into_iter()
            .map(|(i, loc, file)| {
                let mut bytes = vec![0; loc.len as usize];
                file.read_exact_at(&mut bytes, loc.offset)
                    .map_err(|e| io_err("cannot read", &segment_path(&self.dir, loc.segment))(e))?;
                Ok((i, bytes))
            })
            .collect()
    }
}

/// Replays segment `seq` into `index` and `recovered`; returns where its records end. A record
/// that does not check out ends the last segment (the file is cut back there) and is corruption
/// in any other.
fn replay(
    dir: &Path,
    seq: u64,
    is_last: bool,
    index: &mut Index,
    recovered: &mut Recovered,
) -> Result<u64, WalError> {
    let path = segment_path(dir, seq);
    let data = fs::read(&path).map_err(io_err("cannot read", &path))?;
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        path: path.clone(),
        offset: offset as u64,
        reason,
    };
    let mut offset = 0;
    loop {
        let (record, next) = match parse(&data, offset) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                if is_last && data[offset..].iter().any(|&b| b != 0) {
                    // A write whose first page never reached the disk but whose later ones did:
                    // what follows the end must not be read as records once newer ones are
                    // written before it.
                    tracing::warn!(
                        path = %path.display(),
                        offset,
                        "the raft log ends before bytes of a write that was not completely written (a crash mid-write); zeroing them"
                    );
                    cut_back(&path, offset as u64, data.len() as u64)?;
                }
                break;
            }
            Err(reason) if is_last => {
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    reason,
                    "the raft log ends in a record that was not completely written (a crash mid-write); cutting it off"
                );
                cut_back(&path, offset as u64, data.len() as u64)?;
                break;
            }
            Err(reason) => return Err(corrupt(offset, reason)),
        };
        if offset == 0 && record.kind != KIND_FORMAT {
            return Err(corrupt(
                0,
                "the segment does not start with its format".into(),
            ));
        }
        let payload = record.payload;
        let short = || corrupt(offset, "a record is too short for its kind".into());
        match record.kind {
            KIND_FORMAT => {
                let found = read_u64(payload).ok_or_else(short)?;
                if found != WAL_FORMAT {
                    return Err(WalError::Format {
                        path,
                        found,
                        expected: WAL_FORMAT,
                    });
                }
            }
            KIND_ENTRY => {
                let entry = read_u64(payload).ok_or_else(short)?;
                let loc = Loc {
                    segment: seq,
                    offset: record.payload_at + 8,
                    len: (payload.len() - 8) as u32,
                };
                index.push(entry, loc).map_err(|next| {
                    corrupt(
                        offset,
                        format!("entry {entry} follows the last entry, {}", next - 1),
                    )
                })?;
            }
            KIND_VOTE => recovered.vote = Some(payload.to_vec()),
            KIND_COMMITTED => recovered.committed = Some(payload.to_vec()),
            KIND_TRUNCATE => index.truncate(read_u64(payload).ok_or_else(short)?),
            KIND_PURGE => {
                let upto = read_u64(payload).ok_or_else(short)?;
                index.purge(upto);
                recovered.purged = Some((upto, payload[8..].to_vec()));
            }
            kind => return Err(corrupt(offset, format!("unknown record kind {kind}"))),
        }
        offset = next;
    }
    if offset == 0 {
        return Err(corrupt(0, "the segment holds no records".into()));
    }
    Ok(offset as u64)
}

/// Cuts the segment at `path` back to `end` and zeroes what follows, up to `len`, so that nothing
/// of the incomplete record can be read as a record once newer ones are written before it.
fn cut_back(path: &Path, end: u64, len: u64) -> Result<(), WalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("cannot open", path))?;
    file.set_len(end).map_err(io_err("cannot cut back", path))?;
    preallocate(&file, path, len.max(end))?;
    file.sync_all().map_err(io_err("cannot sync", path))
}

/// The records every segment starts with: the format, then the metadata as it stands.
fn header_bytes(meta: &Recovered) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_format(&mut buf);
    if let Some(vote) = &meta.vote {
        encode(&mut buf, &Record::Vote(vote));
    }
    if let Some(committed) = &meta.committed {
        encode(&mut buf, &Record::Committed(committed));
    }
    if let Some((upto, bytes)) = &meta.purged {
        encode(&mut buf, &Record::Purge { upto: *upto, bytes });
    }
    buf
}

/// Creates segment `seq` holding its header records, durably: written and synced under a
/// staging name, then renamed, so that a segment is never seen without its whole header.
fn create_segment(
    dir: &Path,
    seq: u64,
    segment_bytes: u64,
    meta: &Recovered,
) -> Result<File, WalError> {
    let path = segment_path(dir, seq);
    let staged = path.with_extension(STAGED);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&staged)
        .map_err(io_err("cannot create", &staged))?;
    preallocate(&file, &staged, segment_bytes)?;
    file.write_all_at(&header_bytes(meta), 0)
        .map_err(io_err("cannot write", &staged))?;
    file.sync_all().map_err(io_err("cannot sync", &staged))?;
    fs::rename(&staged, &path).map_err(io_err("cannot rename", &staged))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Extension of a segment being created.
const STAGED: &str = "staged";

/// Removes segments whose creation a crash interrupted.
fn remove_staged(dir: &Path) -> Result<(), WalError> {
    for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let path = entry.map_err(io_err("cannot list", dir))?.path();
        if path.extension().is_some_and(|e| e == STAGED) {
            fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        }
    }
    Ok(())
}

/// The one writer of a [`Wal`].
#[derive(Debug)]
pub struct WalWriter {
    wal: Arc<Wal>,
    seq: u64,
    file: Arc<File>,
    /// Where the next record goes in the current segment.
    offset: u64,
    /// Where the current segment's header records end (0: a segment found on opening).
    header_end: u64,
    segment_bytes: u64,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<(u64, Vec<u8>)>,
    buf: Vec<u8>,
}

impl WalWriter {
    /// Writes `records`, in order, durably: one write and one `fdatasync` (a few more syncs when
    /// the current segment is full and a new one starts). Readers see the entries once it
    /// returns. After an error part of the records may be on disk: the caller must stop writing
    /// (a restart replays what is complete and cuts the rest off).
    pub fn write(&mut self, records: &[Record<'_>]) -> Result<(), WalError> {
        self.check(records)?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut entries = Vec::new();
        for record in records {
            let at = buf.len();
            let (body_at, body_len) = encode(&mut buf, record);
            if let Record::Entry { index, .. } = record {
                entries.push((*index, at, body_at, body_len));
            }
        }
        let fresh = self.offset <= self.header_end;
        if self.offset + buf.len() as u64 > self.segment_bytes && !fresh {
            self.rotate()?;
        }
        let path = segment_path(&self.wal.dir, self.seq);
        let base = self.offset;
        let written = self
            .file
            .write_all_at(&buf, base)
            .and_then(|()| self.file.sync_data())
            .map_err(io_err("cannot write", &path));
        self.buf = buf;
        written?;
        self.offset += self.buf.len() as u64;

        let mut purged = false;
        {
            let mut index = lock(&self.wal.index);
            let mut entries = entries.into_iter().peekable();
            for record in records {
                match *record {
                    Record::Entry { index: entry, .. } => {
                        let Some((_, _, body_at, len)) = entries.next() else {
                            continue;
                        };
                        let loc = Loc {
                            segment: self.seq,
                            offset: base + body_at as u64,
                            len,
                        };
                        // `check` has made sure it continues the log.
                        let _ = index.push(entry, loc);
                    }
                    Record::Vote(bytes) => self.vote = Some(bytes.to_vec()),
                    Record::Committed(bytes) => self.committed = Some(bytes.to_vec()),
                    Record::Truncate { from } => index.truncate(from),
                    Record::Purge { upto, bytes } => {
                        index.purge(upto);
                        self.purged = Some((upto, bytes.to_vec()));
                        purged = true;
                    }
                }
            }
        }
        if purged {
            self.remove_dead_segments();
        }
        Ok(())
    }

    /// Refuses records whose entries would not continue the log (replay would refuse them).
    fn check(&self, records: &[Record<'_>]) -> Result<(), WalError> {
        let index = lock(&self.wal.index);
        // (first, next, empty) as the records would leave them.
        let (mut first, mut next, mut empty) = (index.first, index.next(), index.locs.is_empty());
        for record in records {
            match *record {
                Record::Entry { index: entry, .. } => {
                    if !empty && entry > next {
                        return Err(WalError::Corrupt {
                            path: segment_path(&self.wal.dir, self.seq),
                            offset: self.offset,
                            reason: format!(
                                "refusing to write entry {entry} after the last entry, {}",
                                next - 1
                            ),
                        });
                    }
                    if empty || entry < first {
                        first = entry;
                    }
                    next = entry + 1;
                    empty = false;
                }
                Record::Truncate { from } => {
                    next = next.min(from.max(first));
                    empty = next == first;
                }
                Record::Purge { upto, .. } => {
                    let after = upto.saturating_add(1);
                    first = first.max(after);
                    if empty || after >= next {
                        next = first;
                        empty = true;
                    }
                }
                Record::Vote(_) | Record::Committed(_) => {}
            }
        }
        Ok(())
    }

    fn meta(&self) -> Recovered {
        Recovered {
            vote: self.vote.clone(),
            committed: self.committed.clone(),
            purged: self.purged.clone(),
            last: None,
        }
    }

    /// Starts the next segment; the full one stays until no live entry is in it.
    fn rotate(&mut self) -> Result<(), WalError> {
        let seq = self.seq + 1;
        let meta = self.meta();
        let file = Arc::new(create_segment(
            &self.wal.dir,
            seq,
            self.segment_bytes,
            &meta,
        )?);
        lock(&self.wal.index).files.insert(seq, Arc::clone(&file));
        self.seq = seq;
        self.file = file;
        self.offset = header_bytes(&meta).len() as u64;
        self.header_end = self.offset;
        tracing::debug!(segment = seq, "raft log segment started");
        self.remove_dead_segments();
        Ok(())
    }

    /// Deletes the segments before the one holding the first live entry: the current segment's
    /// header carries the metadata they held. A failure is only logged, and leaves the segment
    /// and those after it for the next purge. A deletion that a crash takes back leaves a gap
    /// before the live segments, and replay starts after it.
    fn remove_dead_segments(&self) {
        let dead: Vec<u64> = {
            let index = lock(&self.wal.index);
            let keep = index.oldest_needed(self.seq);
            index.files.range(..keep).map(|(&s, _)| s).collect()
        };
        // Oldest first, stopping at a failure: what is left is always a contiguous run.
        for seq in dead {
            let path = segment_path(&self.wal.dir, seq);
            match fs::remove_file(&path) {
                Ok(()) => {
                    lock(&self.wal.index).files.remove(&seq);
                    tracing::debug!(path = %path.display(), "raft log segment removed");
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    lock(&self.wal.index).files.remove(&seq);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a raft log segment; it is retried after the next purge");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: u64 = 4096;

    fn entries(wal: &Wal) -> Vec<(u64, Vec<u8>)> {
        match wal.bounds() {
            Some((first, _)) => wal.read(first, None, usize::MAX, usize::MAX).expect("read"),
            None => Vec::new(),
        }
    }

    fn entry(index: u64, bytes: &[u8]) -> Record<'_> {
        Record::Entry { index, bytes }
    }

    #[test]
    fn replay_gives_back_entries_truncations_purges_and_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (_wal, mut w, rec) = Wal::open(dir.path(), SMALL).expect("open");
            assert_eq!(rec.last, None);
            w.write(&[entry(1, b"a"), entry(2, b"b"), entry(3, b"c")])
                .expect("write");
            w.write(&[Record::Vote(b"v1"), Record::Truncate { from: 3 }])
                .expect("write");
            w.write(&[entry(3, b"C"), Record::Committed(b"c2")])
                .expect("write");
            w.write(&[Record::Purge {
                upto: 1,
                bytes: b"p1",
            }])
            .expect("write");
        }
        let (wal, _w, rec) = Wal::open(dir.path(), SMALL).expect("reopen");
        assert_eq!(rec.vote.as_deref(), Some(&b"v1"[..]));
        assert_eq!(rec.committed.as_deref(), Some(&b"c2"[..]));
        assert_eq!(rec.purged, Some((1, b"p1".to_vec())));
        assert_eq!(rec.last, Some(3));
        assert_eq!(entries(&wal), vec![(2, b"b".to_vec()), (3, b"C".to_vec())]);
    }

    #[test]
    fn segments_rotate_and_those_without_live_entries_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let value = vec![7u8; 1000];
        {
            let (wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
            w.write(&[Record::Vote(b"vote")]).expect("vote");
            for i in 1..=20 {
                w.write(&[entry(i, &value)]).expect("write");
            }
            let segments = list_segments(dir.path()).expect("list");
            assert!(segments.len() >= 5, "{segments:?}");
            w.write(&[Record::Purge {
                upto: 15,
                bytes: b"p15",
            }])
            .expect("purge");
            let left = list_segments(dir.path()).expect("list");
            assert!(left.len() <= 3, "purged segments stay: {left:?}");
            assert_eq!(wal.bounds(), Some((16, 20)));
        }
        let (wal, _w, rec) = Wal::open(dir.path(), SMALL).expect("reopen");
        assert_eq!(
            rec.vote.as_deref(),
            Some(&b"vote"[..]),
            "carried by headers"
        );
        assert_eq!(rec.purged, Some((15, b"p15".to_vec())));
        let got = entries(&wal);
        assert_eq!(
            got.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (16..=20).collect::<Vec<_>>()
        );
        assert!(got.iter().all(|(_, b)| *b == value));
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_writing_goes_on_from_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let end = {
            let (_wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
            w.write(&[entry(1, b"one"), entry(2, b"two")])
                .expect("write");
            w.offset
        };
        // Half of a third record, as a crash mid-write leaves it.
        let path = segment_path(dir.path(), 1);
        let mut torn = Vec::new();
        encode(&mut torn, &entry(3, &[9u8; 100]));
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&torn[..60], end).expect("write");
        drop(file);

        {
            let (wal, mut w, rec) = Wal::open(dir.path(), SMALL).expect("reopen");
            assert_eq!(rec.last, Some(2));
            assert_eq!(w.offset, end);
            // A shorter record over the torn one must not let its remains be read back.
            w.write(&[entry(3, b"3")]).expect("write");
            assert_eq!(entries(&wal).len(), 3);
        }
        let (wal, _w, rec) = Wal::open(dir.path(), SMALL).expect("reopen again");
        assert_eq!(rec.last, Some(3));
        assert_eq!(entries(&wal)[2], (3, b"3".to_vec()));
    }

    #[test]
    fn bytes_after_a_zeroed_end_are_zeroed_before_writing_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let end = {
            let (_wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
            w.write(&[entry(1, b"one")]).expect("write");
            w.offset
        };
        // A write whose first page never reached the disk but whose later bytes did: zeros, then
        // a complete record.
        let mut late = Vec::new();
        encode(&mut late, &entry(7, b"stale"));
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&late, end + 64).expect("write");
        drop(file);

        {
            let (_wal, mut w, rec) = Wal::open(dir.path(), SMALL).expect("reopen");
            assert_eq!(rec.last, Some(1));
            let data = fs::read(&path).expect("read");
            assert!(data[end as usize..].iter().all(|&b| b == 0), "not zeroed");
            // 64 bytes of records end exactly where the stale one began.
            w.write(&[entry(2, &[2u8; 64 - HEADER - 9])])
                .expect("write");
        }
        let (wal, _w, rec) = Wal::open(dir.path(), SMALL).expect("reopen again");
        assert_eq!(rec.last, Some(2), "the stale record is not replayed");
        assert_eq!(entries(&wal).len(), 2);
    }

    #[test]
    fn a_dead_segment_left_behind_a_gap_is_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let value = vec![3u8; 1000];
        let first = segment_path(dir.path(), 1);
        let stale = {
            let (_wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
            for i in 1..=20 {
                w.write(&[entry(i, &value)]).expect("write");
            }
            let stale = fs::read(&first).expect("read");
            w.write(&[Record::Purge {
                upto: 15,
                bytes: b"p15",
            }])
            .expect("purge");
            stale
        };
        let left = list_segments(dir.path()).expect("list");
        assert!(left[0] > 2, "{left:?}");
        // A deletion that a crash took back for the first segment only.
        fs::write(&first, stale).expect("write");
        let (wal, _w, rec) = Wal::open(dir.path(), SMALL).expect("reopen");
        assert!(!first.exists(), "the stale segment is removed");
        assert_eq!(rec.purged, Some((15, b"p15".to_vec())));
        assert_eq!(wal.bounds(), Some((16, 20)));
    }

    #[test]
    fn a_segment_whose_creation_was_interrupted_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (_wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
            w.write(&[entry(1, b"one")]).expect("write");
        }
        let staged = segment_path(dir.path(), 2).with_extension(STAGED);
        fs::write(&staged, b"partial header").expect("write");
        let (wal, _w, rec) = Wal::open(dir.path(), SMALL).expect("reopen");
        assert!(!staged.exists());
        assert_eq!(rec.last, Some(1));
        assert_eq!(entries(&wal).len(), 1);
    }

    #[test]
    fn a_bad_record_before_the_last_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (_wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
            for i in 1..=10 {
                w.write(&[entry(i, &[1u8; 1000])]).expect("write");
            }
        }
        let first = list_segments(dir.path()).expect("list")[0];
        let path = segment_path(dir.path(), first);
        let mut data = fs::read(&path).expect("read");
        let at = header_bytes(&Recovered::default()).len() + HEADER + 20;
        data[at] ^= 0xff;
        fs::write(&path, data).expect("write");
        let err = Wal::open(dir.path(), SMALL).expect_err("corrupt");
        assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn a_second_open_fails_while_the_first_holds_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Wal::open(dir.path(), SMALL).expect("open");
        let err = Wal::open(dir.path(), SMALL).expect_err("locked");
        assert!(matches!(err, WalError::Locked { .. }), "{err}");
        drop(first);
        Wal::open(dir.path(), SMALL).expect("open after close");
    }

    #[test]
    fn reads_stop_at_limits_and_give_only_live_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, mut w, _) = Wal::open(dir.path(), SMALL).expect("open");
        w.write(&[entry(5, b"aaaa"), entry(6, b"bbbb"), entry(7, b"cccc")])
            .expect("write");
        assert_eq!(wal.read(5, None, 2, usize::MAX).expect("read").len(), 2);
        assert_eq!(wal.read(5, None, 10, 6).expect("read").len(), 1);
        assert_eq!(
            wal.read(5, None, 10, 1).expect("read").len(),
            1,
            "at least one"
        );
        assert_eq!(
            wal.read(6, Some(7), 10, usize::MAX).expect("read"),
            vec![(6, b"bbbb".to_vec())]
        );
        assert_eq!(
            wal.read(4, Some(6), 10, usize::MAX).expect("read"),
            vec![(5, b"aaaa".to_vec())]
        );
        assert!(wal.read(8, None, 10, usize::MAX).expect("read").is_empty());
    }
}
