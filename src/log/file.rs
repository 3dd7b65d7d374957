//! One core's log file, written through io_uring: a group commit is one write of the
//! whole batch (resubmitted from where a short write stopped) and, only once every
//! byte of it has completed, one fdatasync. Any error stops the caller for good: a
//! failed fsync is never retried (the kernel may have dropped the dirty pages).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};
use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log {path}: corrupt record at offset {offset}: {error}; refusing to start (the log is left as it is)")]
    Corrupt { path: PathBuf, offset: u64, error: super::record::RecordError },
    #[error("checkpoint {path}: {error}; refusing to start (the file is left as it is)")]
    CorruptCheckpoint { path: PathBuf, error: super::checkpoint::CheckpointError },
    #[error("log {path}: starts at lsn {found}, {expected} expected: a segment is missing; refusing to start")]
    Gap { path: PathBuf, found: u64, expected: u64 },
}

pub struct LogFile {
    ring: IoUring,
    file: File,
    path: PathBuf,
    /// Where the next write goes: the length of the valid log.
    end: u64,
}

/// Entries in the ring: one write or one sync is in flight at a time.
const RING_ENTRIES: u32 = 8;

impl LogFile {
    /// Opens (creating) the log at `path` and returns it with its whole contents, for
    /// replay. Appends go after `valid_len` once `truncate_to` has been called, or after
    /// the contents otherwise.
    pub fn open(path: &Path) -> Result<(LogFile, Vec<u8>), LogError> {
        let io = |op| move |source| LogError::Io { op, path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io("open"))?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).map_err(io("read"))?;
        let ring = IoUring::new(RING_ENTRIES).map_err(io("io_uring setup"))?;
        let end = contents.len() as u64;
        Ok((LogFile { ring, file, path: path.to_path_buf(), end }, contents))
    }

    fn err(&self, op: &'static str, source: std::io::Error) -> LogError {
        LogError::Io { op, path: self.path.clone(), source }
    }

    /// Cuts a torn tail off, durably, before anything is appended.
    pub fn truncate_to(&mut self, len: u64) -> Result<(), LogError> {
        assert!(len <= self.end, "truncate past the end");
        self.file.set_len(len).map_err(|e| self.err("truncate", e))?;
        self.file.sync_all().map_err(|e| self.err("fsync after truncate", e))?;
        self.end = len;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.end
    }

    pub fn is_empty(&self) -> bool {
        self.end == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one operation and returns its result (bytes for a write).
    fn run(&mut self, entry: io_uring::squeue::Entry, op: &'static str) -> Result<u32, LogError> {
        // SAFETY: `entry` points into a buffer the caller keeps borrowed until this
        // function returns, and this function does not return before the kernel has
        // completed the operation: it returns once the completion is consumed, with an
        // error only while the entry is still unsubmitted, and otherwise ends the process.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return Err(self.err(op, std::io::Error::other("io_uring submission queue full")));
        }
        // `submit_and_wait` returns once the entry is submitted, even when the wait was
        // cut short (a signal, SIGSTOP and SIGCONT, a spurious wake-up): a completion is
        // there only when the queue shows one. Bounded: each turn either consumes a
        // completion or blocks in the kernel until one can come.
        loop {
            let completed = self.ring.completion().next().map(|cqe| cqe.result());
            if let Some(result) = completed {
                if result < 0 {
                    return Err(self.err(op, std::io::Error::from_raw_os_error(-result)));
                }
                return Ok(result as u32);
            }
            // Submits what is queued (nothing, after the first turn) and waits.
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if [Errno::EINTR, Errno::EAGAIN, Errno::EBUSY].iter().any(|n| e.raw_os_error() == Some(*n as i32)) => {}
                // Not submitted: nothing of the buffer is in the kernel's hands.
                Err(e) if !self.ring.submission().is_empty() => return Err(self.err("io_uring submit", e)),
                // In flight and no way left to wait for it: returning would free a
                // buffer the kernel may still read. Fail-stop (the panic hook aborts).
                Err(e) => panic!("log {}: {op}: cannot wait for an io_uring completion: {e}", self.path.display()),
            }
        }
    }

    /// Writes all of `bytes` at `offset`, resubmitting from where a short write stopped
    /// (disk full, a signal).
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
        crate::failpoint!("log-write", |_| Err(self.err("write", std::io::Error::other("failpoint log-write"))));
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0usize;
        while done < bytes.len() {
            let rest = &bytes[done..];
            let len = rest.len().min(1 << 30) as u32;
            let entry = opcode::Write::new(fd, rest.as_ptr(), len).offset(offset + done as u64).build();
            match self.run(entry, "write")? {
                0 => return Err(self.err("write", std::io::ErrorKind::WriteZero.into())),
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Overwrites bytes already in the file (a checkpoint's header), without syncing.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
        assert!(offset + bytes.len() as u64 <= self.end, "write_at past the end");
        self.write_all_at(offset, bytes)
    }

    /// Appends `batch` and makes it durable (`sync`) or just written (`!sync`).
    pub fn append(&mut self, batch: &[u8], sync: bool) -> Result<(), LogError> {
        self.write_all_at(self.end, batch)?;
        if sync {
            // Submitted only once every byte of the batch has completed.
            crate::failpoint!("log-fsync", |_| Err(self.err("fdatasync", std::io::Error::other("failpoint log-fsync"))));
            let fd = types::Fd(self.file.as_raw_fd());
            let entry = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
            self.run(entry, "fdatasync")?;
        }
        self.end += batch.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::{encode, scan, Mutation, ScanEnd};

    #[test]
    fn appended_batches_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.log");
        let (mut log, contents) = LogFile::open(&path).unwrap();
        assert!(contents.is_empty());
        let mut batch = Vec::new();
        for lsn in 1..=100u64 {
            encode(&mut batch, lsn, &Mutation::Put { key: &lsn.to_le_bytes(), value: &[lsn as u8; 100] });
            if lsn % 10 == 0 {
                log.append(&batch, lsn % 20 == 0).unwrap();
                batch.clear();
            }
        }
        drop(log);
        let (_, contents) = LogFile::open(&path).unwrap();
        let mut lsns = Vec::new();
        assert_eq!(scan(&contents, |r| lsns.push(r.lsn)), Ok(ScanEnd::Clean));
        assert_eq!(lsns, (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn truncate_drops_a_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.log");
        let (mut log, _) = LogFile::open(&path).unwrap();
        log.append(b"0123456789", true).unwrap();
        log.truncate_to(4).unwrap();
        log.append(b"ab", true).unwrap();
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), b"0123ab");
    }
}
