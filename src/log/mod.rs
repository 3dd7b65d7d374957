//! The redo log of a brick core: record format and scanning (`record`), the file
//! written with group commit (`file`) through the `Disk` doors (`disk`), checkpoints (`checkpoint`), and
//! the names of a core's files.
//!
//! A core's log is a series of segments `core-<i>-<first lsn>.log`; a checkpoint
//! `core-<i>.ckpt` covers everything before its start lsn, and segments wholly before it
//! are deleted once it is durable.

pub mod checkpoint;
pub mod disk;
pub mod file;
#[cfg(any(test, feature = "sim"))]
pub mod mem_disk;
pub mod record;

use std::path::{Path, PathBuf};

pub use disk::{Disk, DiskFile, FsDisk, LogIo};
pub use file::{LogError, LogFile};

pub fn segment_path(dir: &Path, core: usize, first_lsn: u64) -> PathBuf {
    dir.join(format!("core-{core}-{first_lsn:020}.log"))
}

pub fn checkpoint_path(dir: &Path, core: usize) -> PathBuf {
    dir.join(format!("core-{core}.ckpt"))
}

/// A core's log segments on `disk`, oldest first, with their first lsns.
pub fn segments<D: Disk>(disk: &mut D, dir: &Path, core: usize) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let prefix = format!("core-{core}-");
    let names = disk.list(dir).map_err(|source| LogError::Io { op: "list", path: dir.to_path_buf(), source })?;
    let mut found: Vec<(u64, PathBuf)> = names
        .iter()
        .filter_map(|name| name.strip_prefix(&prefix)?.strip_suffix(".log")?.parse::<u64>().ok().map(|lsn| (lsn, dir.join(name))))
        .collect();
    found.sort();
    Ok(found)
}
