//! One core's log file, on a `Disk` (`FsDisk`: syscalls or io_uring, `LogIo`): a
//! group commit is one write of the
//! whole batch (resubmitted from where a short write stopped) and, only once every
//! byte of it has completed, one fdatasync. Any error stops the caller for good: a
//! failed fsync is never retried (the kernel may have dropped the dirty pages).

use std::path::{Path, PathBuf};

use super::disk::{Disk, DiskFile, FsDisk, FsFile};
use super::record::{self, SYNC_POINT_LEN};

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
    #[error("log {path}: the value of {len} bytes at offset {offset} does not match its hash; stopping (the log is left as it is)")]
    ValueChecksum { path: PathBuf, offset: u64, len: u32 },
}

pub struct LogFile<F: DiskFile = FsFile> {
    file: F,
    path: PathBuf,
    /// Where the next write goes: the length of the valid log.
    end: u64,
    /// Whether the file's space is laid out in zeros ahead of the writes, so that an
    /// fdatasync need not change its size (`record`'s module docs give the format).
    preallocated: bool,
    /// The file's size: where the laid-out zeros end.
    allocated: u64,
    /// How much of the log is known durable: the end at the last completed sync.
    durable: u64,
    /// How much is laid out at a time (`PREALLOC_BYTES` at most).
    step_bytes: u64,
    /// The failpoints of its writes and syncs (failpoints builds): `log-write` and
    /// `log-fsync` for a brick core's log, others for other logs (`with_failpoints`).
    failpoints: (&'static str, &'static str),
}

/// A preallocated log grows by at most this much at a time, zeros written ahead of the
/// records. Laid out, a small append and its fdatasync cost 85-105 us on the development VM's
/// ext4 against 125-140 us growing the file (the journal commits each size change).
pub const PREALLOC_BYTES: u64 = 1 << 20;

impl LogFile {
    /// `open_on` the file system.
    pub fn open(path: &Path) -> Result<(LogFile, Vec<u8>), LogError> {
        LogFile::open_on(&mut FsDisk::default(), path)
    }

    /// `open_preallocated_on` the file system.
    pub fn open_preallocated(path: &Path, step_bytes: u64) -> Result<(LogFile, Vec<u8>), LogError> {
        LogFile::open_preallocated_on(&mut FsDisk::default(), path, step_bytes)
    }
}

impl<F: DiskFile> LogFile<F> {
    /// Opens (creating) the log at `path` on `disk` and returns it with its whole
    /// contents, for replay. Appends go where `truncate_to` or `resume_at` says, or
    /// after the contents otherwise. A new file grows by appends.
    pub fn open_on<D: Disk<File = F>>(disk: &mut D, path: &Path) -> Result<(LogFile<F>, Vec<u8>), LogError> {
        let (file, contents) = disk.open(path).map_err(|source| LogError::Io { op: "open", path: path.to_path_buf(), source })?;
        let end = contents.len() as u64;
        // A file laid out ahead of its records stays so, whoever opens it.
        let preallocated = record::starts_preallocated(&contents);
        let log = LogFile { file, path: path.to_path_buf(), end, preallocated, allocated: end, durable: end, step_bytes: PREALLOC_BYTES, failpoints: ("log-write", "log-fsync") };
        Ok((log, contents))
    }

    /// Opens (creating) a log whose space is laid out ahead of its writes. A new file
    /// starts with a sync point and zeros, durably; it grows `step_bytes` at a time
    /// (whole pages, `PREALLOC_BYTES` at most: a small segment bound lays out less). An
    /// existing file keeps the format it was written in (a log that grows by appends
    /// stays so). After replay, `resume_at` or `truncate_to` says where its records end.
    pub fn open_preallocated_on<D: Disk<File = F>>(disk: &mut D, path: &Path, step_bytes: u64) -> Result<(LogFile<F>, Vec<u8>), LogError> {
        let (mut log, contents) = LogFile::open_on(disk, path)?;
        log.step_bytes = step_bytes.next_multiple_of(4096).clamp(4096, PREALLOC_BYTES);
        if contents.is_empty() {
            let mut start = Vec::with_capacity(SYNC_POINT_LEN);
            record::encode_sync_point(&mut start, 0);
            log.preallocated = true;
            log.extend_to(log.step_bytes)?;
            log.write_all_at(0, &start)?;
            log.end = start.len() as u64;
            log.append(&[], true)?;
        }
        Ok((log, contents))
    }

    /// Lays zeros out up to `len` (not synced here: the next sync covers them).
    fn extend_to(&mut self, len: u64) -> Result<(), LogError> {
        const ZEROS_BYTES: usize = 1 << 16;
        let zeros = vec![0u8; ZEROS_BYTES];
        while self.allocated < len {
            let n = (len - self.allocated).min(ZEROS_BYTES as u64) as usize;
            self.write_all_at(self.allocated, &zeros[..n])?;
            self.allocated += n as u64;
        }
        Ok(())
    }

    /// Names its write and sync failpoints (a log that is not a brick core's, so that a
    /// test arming `log-fsync` for the bricks does not fail it too).
    pub fn with_failpoints(mut self, write: &'static str, fsync: &'static str) -> Self {
        self.failpoints = (write, fsync);
        self
    }

    /// Appends continue at `offset`: the log's records end there and only laid-out
    /// zeros follow (`ScanEnd::Preallocated`).
    pub fn resume_at(&mut self, offset: u64) {
        assert!(self.preallocated && offset <= self.allocated, "resume past the laid-out space");
        self.end = offset;
        self.durable = offset;
    }

    fn err(&self, op: &'static str, source: std::io::Error) -> LogError {
        LogError::Io { op, path: self.path.clone(), source }
    }

    /// Cuts a torn tail off, durably, before anything is appended.
    pub fn truncate_to(&mut self, len: u64) -> Result<(), LogError> {
        assert!(len <= self.end, "truncate past the end");
        self.file.truncate(len).map_err(|e| self.err("truncate", e))?;
        self.end = len;
        self.allocated = len;
        self.durable = len;
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

    /// Writes all of `bytes` at `offset`, resubmitting from where a short write stopped
    /// (disk full, a signal).
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
        self.write_two_at(offset, bytes, &[])
    }

    /// Writes `first` then `second` at `offset` in one vectored write, and the rest of
    /// them after a short write.
    fn write_two_at(&mut self, offset: u64, first: &[u8], second: &[u8]) -> Result<(), LogError> {
        if crate::logging::failpoint_hit(self.failpoints.0) {
            return Err(self.err("write", std::io::Error::other(format!("failpoint {}", self.failpoints.0))));
        }
        let total = first.len() + second.len();
        let mut done = 0usize;
        while done < total {
            let (a, b) = if done < first.len() { (&first[done..], second) } else { (&second[done - first.len()..], &[][..]) };
            let n = self.file.write_at(offset + done as u64, a, b).map_err(|e| self.err("write", e))?;
            if n == 0 {
                return Err(self.err("write", std::io::ErrorKind::WriteZero.into()));
            }
            done += n;
        }
        Ok(())
    }

    /// Overwrites bytes already in the file (a checkpoint's header), without syncing.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
        assert!(offset + bytes.len() as u64 <= self.end, "write_at past the end");
        self.write_all_at(offset, bytes)
    }

    /// Appends `batch` and makes it durable (`sync`) or just written (`!sync`). In a
    /// preallocated log the batch ends with a sync point, in the same write.
    pub fn append(&mut self, batch: &[u8], sync: bool) -> Result<(), LogError> {
        let mut sync_point = Vec::new();
        if self.preallocated && !batch.is_empty() {
            record::encode_sync_point(&mut sync_point, self.durable);
            let needed = self.end + (batch.len() + sync_point.len()) as u64;
            if needed > self.allocated {
                self.extend_to(needed.next_multiple_of(self.step_bytes))?;
            }
        }
        self.write_two_at(self.end, batch, &sync_point)?;
        if sync {
            // Submitted only once every byte of the batch has completed.
            if crate::logging::failpoint_hit(self.failpoints.1) {
                return Err(self.err("fdatasync", std::io::Error::other(format!("failpoint {}", self.failpoints.1))));
            }
            self.file.datasync().map_err(|e| self.err("fdatasync", e))?;
        }
        self.end += (batch.len() + sync_point.len()) as u64;
        if sync {
            self.durable = self.end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::{encode, scan, Mutation, ScanEnd};
    use crate::log::LogIo;

    #[test]
    fn appended_batches_read_back_after_reopen() {
        for io in [LogIo::Syscalls, LogIo::Uring] {
            appended_batches_read_back_after_reopen_on(FsDisk::new(io));
        }
    }

    fn appended_batches_read_back_after_reopen_on(mut disk: FsDisk) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.log");
        let (mut log, contents) = LogFile::open_on(&mut disk, &path).unwrap();
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
        let (_, contents) = LogFile::open_on(&mut disk, &path).unwrap();
        let mut lsns = Vec::new();
        assert_eq!(scan(&contents, |r| lsns.push(r.lsn)), Ok(ScanEnd::Clean));
        assert_eq!(lsns, (1..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_preallocated_log_grows_in_laid_out_steps_and_resumes_where_its_records_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0-1.log");
        let (mut log, contents) = LogFile::open_preallocated(&path, PREALLOC_BYTES).unwrap();
        assert!(contents.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOC_BYTES, "laid out at creation");
        let value = vec![7u8; 4000];
        let mut lsn = 1;
        // Past the first laid-out step: the file grows by whole steps.
        while log.len() < PREALLOC_BYTES + 1000 {
            let mut batch = Vec::new();
            encode(&mut batch, lsn, &Mutation::Put { key: b"k", value: &value });
            lsn += 1;
            log.append(&batch, lsn % 3 == 0).unwrap();
        }
        let end = log.len();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * PREALLOC_BYTES);
        drop(log);
        let (mut log, contents) = LogFile::open_preallocated(&path, PREALLOC_BYTES).unwrap();
        let mut replayed = 0;
        let scanned = scan(&contents, |r| replayed += u64::from(r.lsn != 0)).unwrap();
        assert_eq!(scanned, ScanEnd::Preallocated { offset: end });
        assert_eq!(replayed, lsn - 1);
        log.resume_at(end);
        let mut batch = Vec::new();
        encode(&mut batch, lsn, &Mutation::Remove { key: b"k" });
        log.append(&batch, true).unwrap();
        let (_, contents) = LogFile::open_preallocated(&path, PREALLOC_BYTES).unwrap();
        let mut last = 0;
        assert!(matches!(scan(&contents, |r| if r.lsn != 0 { last = r.lsn }), Ok(ScanEnd::Preallocated { .. })));
        assert_eq!(last, lsn);
    }

    #[test]
    fn a_log_that_grew_by_appends_stays_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0-1.log");
        let (mut log, _) = LogFile::open(&path).unwrap();
        let mut batch = Vec::new();
        encode(&mut batch, 1, &Mutation::Put { key: b"k", value: b"v" });
        log.append(&batch, true).unwrap();
        drop(log);
        let (mut log, contents) = LogFile::open_preallocated(&path, PREALLOC_BYTES).unwrap();
        assert_eq!(contents, batch);
        log.append(&batch, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * batch.len() as u64, "no sync point, no zeros");
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
