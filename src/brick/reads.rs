//! Reads of values from the log for a core's gets (values in the log): one io_uring per
//! core, so the core goes on serving while they are in flight. The round hands over the
//! reads it started (`CoreRound::take_reads`); each completion goes back to it
//! (`CoreRound::on_read`), which checks the bytes against the value's hash. The one
//! `unsafe` here hands the kernel a buffer that stays in `slots` until its completion
//! is reaped.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use nix::errno::Errno;

use crate::hash::HashMap;
use crate::log::{self, LogError};

use super::ValueRead;

/// Reads in the ring at once; more wait in `queued`.
const IN_FLIGHT_MAX: usize = 256;
/// Reads waiting for room in the ring.
const QUEUED_MAX: usize = 8192;
/// Open segment files kept (closed when their segment is deleted, `retain_files`).
const FILES_MAX: usize = 4096;

struct InFlight {
    read: ValueRead,
    buf: Vec<u8>,
    started: Instant,
}

pub struct UringReads {
    ring: IoUring,
    files: HashMap<u64, File>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    queued: VecDeque<(ValueRead, Instant)>,
    in_flight: usize,
}

/// A read that could not even start: its reply says so at once.
pub type Refused = (ValueRead, LogError);

impl UringReads {
    pub fn new() -> std::io::Result<UringReads> {
        let ring = IoUring::new(IN_FLIGHT_MAX as u32).map_err(|e| std::io::Error::new(e.kind(), format!("io_uring setup for value reads: {e}")))?;
        Ok(UringReads { ring, files: HashMap::default(), slots: Vec::new(), free: Vec::new(), queued: VecDeque::new(), in_flight: 0 })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight + self.queued.len()
    }

    /// Queues `reads` and submits what fits in the ring. A read that cannot queue, or
    /// whose segment cannot be opened, comes back refused.
    pub fn submit(&mut self, dir: &Path, core: usize, reads: Vec<ValueRead>, refused: &mut Vec<Refused>) {
        let now = Instant::now();
        for read in reads {
            if self.queued.len() >= QUEUED_MAX {
                let path = log::segment_path(dir, core, read.loc.segment);
                refused.push((read, LogError::Io { op: "queue a value read", path, source: std::io::Error::other("too many reads wait for the disk") }));
            } else {
                self.queued.push_back((read, now));
            }
        }
        while self.in_flight < IN_FLIGHT_MAX {
            let Some((read, started)) = self.queued.pop_front() else { break };
            if let Err(e) = self.push(dir, core, read, started) {
                refused.push((read, e));
            }
        }
        if self.in_flight > 0 {
            // Submission errors other than a full completion queue (EBUSY: reaped next
            // turn) are the ring failing: fail-stop.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(Errno::EBUSY as i32) && e.raw_os_error() != Some(Errno::EINTR as i32) {
                    panic!("core {core}: io_uring submit for value reads: {e}");
                }
            }
        }
    }

    fn push(&mut self, dir: &Path, core: usize, read: ValueRead, started: Instant) -> Result<(), LogError> {
        let path = log::segment_path(dir, core, read.loc.segment);
        if !self.files.contains_key(&read.loc.segment) {
            if self.files.len() >= FILES_MAX && self.in_flight == 0 {
                self.files.clear();
            }
            let file = File::open(&path).map_err(|source| LogError::Io { op: "open for value reads", path: path.clone(), source })?;
            // Gets read values at random: read-ahead would fetch pages no one asked for
            // (a hint; a kernel that ignores it only reads more).
            let _ = nix::fcntl::posix_fadvise(file.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
            self.files.insert(read.loc.segment, file);
        }
        let fd = types::Fd(self.files[&read.loc.segment].as_raw_fd());
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut buf = vec![0u8; read.loc.len as usize];
        let entry = opcode::Read::new(fd, buf.as_mut_ptr(), read.loc.len).offset(read.loc.offset).build().user_data(slot as u64);
        // SAFETY: `buf` moves into `slots[slot]` below and stays there (its heap block
        // does not move) until the completion with this `user_data` is reaped; `Drop`
        // waits for every read in flight before the slots are freed. The file stays
        // open in `files` while a read of it is in flight (`retain_files` closes only
        // files of deleted segments, which no read uses; the bound on `files` clears
        // them only when no read is in flight).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err(LogError::Io { op: "submit a value read", path, source: std::io::Error::other("io_uring submission queue full") });
        }
        self.slots[slot] = Some(InFlight { read, buf, started });
        self.in_flight += 1;
        Ok(())
    }

    /// Hands every completed read to `done` with its bytes (or the error) and when it
    /// was started.
    pub fn reap(&mut self, dir: &Path, core: usize, mut done: impl FnMut(ValueRead, Result<Vec<u8>, LogError>, Instant)) {
        let completed: Vec<(u64, i32)> = self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (slot, result) in completed {
            let f = self.slots[slot as usize].take().expect("a completion for a read in flight");
            self.free.push(slot as usize);
            self.in_flight -= 1;
            let path = || log::segment_path(dir, core, f.read.loc.segment);
            let bytes = match result {
                _ if crate::logging::failpoint_hit("value-read") => Err(LogError::Io { op: "read value", path: path(), source: std::io::Error::other("failpoint value-read") }),
                n if n < 0 => Err(LogError::Io { op: "read value", path: path(), source: std::io::Error::from_raw_os_error(-n) }),
                n if n as usize != f.buf.len() => Err(LogError::Io { op: "read value", path: path(), source: std::io::ErrorKind::UnexpectedEof.into() }),
                _ => Ok(f.buf),
            };
            done(f.read, bytes, f.started);
        }
    }

    /// Closes the files of segments `keep` says are gone (none is being read: a
    /// segment with a read in flight is never deleted).
    pub fn retain_files(&mut self, keep: impl Fn(u64) -> bool) {
        self.files.retain(|segment, _| keep(*segment));
    }
}

impl Drop for UringReads {
    fn drop(&mut self) {
        // The kernel may still write into buffers in flight: wait for every one.
        while self.in_flight > 0 {
            let n = self.ring.completion().count();
            self.in_flight -= n.min(self.in_flight);
            if self.in_flight > 0 {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if [Errno::EINTR, Errno::EAGAIN, Errno::EBUSY].iter().any(|x| e.raw_os_error() == Some(*x as i32)) => {}
                    Err(e) => panic!("value reads: cannot wait for an io_uring completion: {e}"),
                }
            }
        }
    }
}
