//! Crash-safe file replacement for the agent's small state files: a reader
//! sees the old contents or the new, never a torn write, even after a kill
//! or a power loss.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`: writes a temp file beside it, fsyncs it,
/// renames it over `path` and fsyncs the directory. A failed write leaves
/// `path` as it was and no temp file behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Leave no partial temp file behind (a full disk would keep it).
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}
