//! The redo log of a brick core: record format and scanning (`record`), the file
//! written through io_uring with group commit (`file`), checkpoints (`checkpoint`), and
//! the names of a core's files.
//!
//! A core's log is a series of segments `core-<i>-<first lsn>.log`; a checkpoint
//! `core-<i>.ckpt` covers everything before its start lsn, and segments wholly before it
//! are deleted once it is durable.

pub mod checkpoint;
pub mod file;
pub mod record;

use std::path::{Path, PathBuf};

pub use file::{LogError, LogFile};

pub fn segment_path(dir: &Path, core: usize, first_lsn: u64) -> PathBuf {
    dir.join(format!("core-{core}-{first_lsn:020}.log"))
}

pub fn checkpoint_path(dir: &Path, core: usize) -> PathBuf {
    dir.join(format!("core-{core}.ckpt"))
}

/// A core's log segments, oldest first, with their first lsns.
pub fn segments(dir: &Path, core: usize) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let prefix = format!("core-{core}-");
    let entries = std::fs::read_dir(dir).map_err(|source| LogError::Io { op: "list", path: dir.to_path_buf(), source })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LogError::Io { op: "list", path: dir.to_path_buf(), source })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(lsn) = name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".log")) else { continue };
        if let Ok(lsn) = lsn.parse::<u64>() {
            found.push((lsn, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}
