//! The doors between a core's durable state and the world: `Disk`, the directory its
//! log segments and checkpoint live in, and `DiskFile`, one open file. The brick runs on
//! `FsDisk` (the file system; writes and syncs as positioned syscalls on the calling
//! thread, or through io_uring: `LogIo`); the simulator runs the same `LogFile`,
//! checkpoint writer and recovery on its simulated disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

/// A directory of files that survive a crash once synced.
pub trait Disk {
    type File: DiskFile;
    /// Opens (creating) `path` for writing; returns it with its whole contents.
    fn open(&mut self, path: &Path) -> io::Result<(Self::File, Vec<u8>)>;
    /// The contents of `path`; `None` if there is no such file.
    fn read(&mut self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Removes `path` (a missing file is not an error).
    fn remove(&mut self, path: &Path) -> io::Result<()>;
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creations, renames and removals in `dir` durable.
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()>;
    /// The names of the files in `dir`.
    fn list(&mut self, dir: &Path) -> io::Result<Vec<String>>;
    /// Fills `buf` from `path` at `offset` (a value in a log segment); fewer bytes there
    /// is an error.
    fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The size of `path` in bytes.
    fn size(&mut self, path: &Path) -> io::Result<u64>;
}

/// One open file. Errors are final for the caller: a failed sync is never retried.
pub trait DiskFile {
    /// Writes `first` then `second` at `offset` (one vectored write); returns how many
    /// bytes of them were written (fewer: a short write, continued by the caller).
    fn write_at(&mut self, offset: u64, first: &[u8], second: &[u8]) -> io::Result<usize>;
    /// Makes every completed write durable (fdatasync).
    fn datasync(&mut self) -> io::Result<()>;
    /// Cuts the file to `len`, durably.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// How a log's writes and fdatasyncs reach the kernel. A core waits for each one
/// either way (group commit: the round's replies wait for its sync).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogIo {
    /// `pwritev` and `fdatasync` on the calling thread. The default: waited for at
    /// once, an io_uring fsync costs a hand-off to an io-wq worker and back; on the
    /// 2-CPU development VM syscalls gave replicated puts 8-27% more throughput (PERF.md,
    /// "Log I/O"). An authority member's raft log always uses this.
    #[default]
    Syscalls,
    /// One io_uring per file; every fsync runs on the ring's io-wq worker.
    Uring,
}

impl LogIo {
    /// Its name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            LogIo::Syscalls => "syscalls",
            LogIo::Uring => "uring",
        }
    }
}

/// The file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsDisk {
    pub io: LogIo,
}

impl FsDisk {
    pub fn new(io: LogIo) -> FsDisk {
        FsDisk { io }
    }
}

impl Disk for FsDisk {
    type File = FsFile;

    fn open(&mut self, path: &Path) -> io::Result<(FsFile, Vec<u8>)> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents)?;
        let ring = match self.io {
            LogIo::Syscalls => None,
            LogIo::Uring => Some(IoUring::new(RING_ENTRIES).map_err(|e| io::Error::new(e.kind(), format!("io_uring setup: {e}")))?),
        };
        Ok((FsFile { ring, file, path: path.to_path_buf() }, contents))
    }

    fn read(&mut self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        crate::durable::sync_dir(dir)
    }

    fn list(&mut self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // `read_exact_at` continues after a short read and an EINTR.
        File::open(path)?.read_exact_at(buf, offset)
    }

    fn size(&mut self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
}

/// Entries in the ring: one write or one sync is in flight at a time.
const RING_ENTRIES: u32 = 8;

/// A file on the file system, written and synced by syscalls or through its own
/// io_uring (`ring`).
pub struct FsFile {
    ring: Option<IoUring>,
    file: File,
    path: PathBuf,
}

impl FsFile {
    /// Runs one operation on the ring and returns its result (bytes for a write).
    fn run(ring: &mut IoUring, path: &Path, entry: io_uring::squeue::Entry) -> io::Result<u32> {
        // SAFETY: `entry` points into buffers the caller keeps borrowed until this
        // function returns, and this function does not return before the kernel has
        // completed the operation: it returns once the completion is consumed, with an
        // error only while the entry is still unsubmitted, and otherwise ends the process.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        // `submit_and_wait` returns once the entry is submitted, even when the wait was
        // cut short (a signal, SIGSTOP and SIGCONT, a spurious wake-up): a completion is
        // there only when the queue shows one. Bounded: each turn either consumes a
        // completion or blocks in the kernel until one can come.
        loop {
            let completed = ring.completion().next().map(|cqe| cqe.result());
            if let Some(result) = completed {
                if result < 0 {
                    return Err(io::Error::from_raw_os_error(-result));
                }
                return Ok(result as u32);
            }
            // Submits what is queued (nothing, after the first turn) and waits.
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if [Errno::EINTR, Errno::EAGAIN, Errno::EBUSY].iter().any(|n| e.raw_os_error() == Some(*n as i32)) => {}
                // Not submitted: nothing of the buffer is in the kernel's hands.
                Err(e) if !ring.submission().is_empty() => return Err(io::Error::new(e.kind(), format!("io_uring submit: {e}"))),
                // In flight and no way left to wait for it: returning would free a
                // buffer the kernel may still read. Fail-stop (the panic hook aborts).
                Err(e) => panic!("log {}: cannot wait for an io_uring completion: {e}", path.display()),
            }
        }
    }
}

impl DiskFile for FsFile {
    fn write_at(&mut self, offset: u64, first: &[u8], second: &[u8]) -> io::Result<usize> {
        let fd = types::Fd(self.file.as_raw_fd());
        let single = if first.is_empty() { Some(second) } else if second.is_empty() { Some(first) } else { None };
        let slices = [io::IoSlice::new(first), io::IoSlice::new(second)];
        let Some(ring) = self.ring.as_mut() else {
            // A signal (SIGSTOP and SIGCONT) may cut a write short or off: the caller
            // continues a short one; one that wrote nothing is simply made again.
            loop {
                let written = match single {
                    Some(bytes) => self.file.write_at(bytes, offset),
                    None => nix::sys::uio::pwritev(&self.file, &slices, offset as i64).map_err(io::Error::from),
                };
                match written {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            }
        };
        if let Some(bytes) = single {
            let len = bytes.len().min(1 << 30) as u32;
            return FsFile::run(ring, &self.path, opcode::Write::new(fd, bytes.as_ptr(), len).offset(offset).build()).map(|n| n as usize);
        }
        // `IoSlice` is ABI-compatible with `iovec` on Unix; `slices` and the buffers it
        // points into outlive the write (`run` returns only once it has completed).
        FsFile::run(ring, &self.path, opcode::Writev::new(fd, slices.as_ptr().cast(), 2).offset(offset).build()).map(|n| n as usize)
    }

    fn datasync(&mut self) -> io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        match self.ring.as_mut() {
            // Not retried, not even after EINTR: a failed sync is final.
            None => nix::unistd::fdatasync(self.file.as_raw_fd()).map_err(io::Error::from),
            Some(ring) => FsFile::run(ring, &self.path, opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build()).map(|_| ()),
        }
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }
}
