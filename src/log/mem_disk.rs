//! An in-memory `log::Disk` with what a crash leaves of each file: the disk of the
//! simulator's bricks and of the storage engine's model test, under the real `Storage`
//! (log segments, checkpoints, recovery). A
//! process crash keeps everything written (the kernel has it). A power loss keeps what
//! was synced; of the rest, a file that grew keeps a prefix of its new bytes in whole
//! 512-byte sectors, the sector after it possibly torn (part new bytes, part garbage),
//! and each synced sector overwritten since (a laid-out log's zeros) keeps its new
//! bytes, its old ones, or is torn between them. Creations, renames and removals are
//! durable at once. A start-up can be made to read one byte wrong (`misread_next`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Disk, DiskFile};

pub const SECTOR_BYTES: usize = 512;

#[derive(Clone, Default)]
struct FileData {
    bytes: Vec<u8>,
    /// The length as of the last sync: a power loss cannot shorten the file below it.
    durable_len: usize,
    /// Synced sectors overwritten since the last sync, with what they held.
    overwritten: BTreeMap<usize, Vec<u8>>,
    /// Where the last write that was not all zeros ended.
    data_end: usize,
}

impl FileData {
    fn write_at(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        for sector in offset / SECTOR_BYTES..end.div_ceil(SECTOR_BYTES) {
            let from = sector * SECTOR_BYTES;
            if from < self.durable_len {
                let to = ((sector + 1) * SECTOR_BYTES).min(self.durable_len);
                self.overwritten.entry(sector).or_insert_with(|| self.bytes[from..to].to_vec());
            }
        }
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        self.bytes[offset..end].copy_from_slice(data);
        if data.iter().any(|b| *b != 0) {
            self.data_end = self.data_end.max(end);
        }
    }

    fn sync(&mut self) {
        self.durable_len = self.bytes.len();
        self.overwritten.clear();
    }

    fn unsynced(&self) -> bool {
        self.bytes.len() > self.durable_len || !self.overwritten.is_empty()
    }

    /// Power is lost; returns how many bytes went back to what the platter held.
    fn lose_power(&mut self, rng: &mut SmallRng) -> usize {
        let mut lost = 0;
        for (sector, old) in std::mem::take(&mut self.overwritten) {
            let from = sector * SECTOR_BYTES;
            let kept = match rng.random_range(0..3) {
                0 => from + old.len(),
                1 => from,
                _ => rng.random_range(from..=from + old.len()),
            };
            self.bytes[kept..from + old.len()].copy_from_slice(&old[kept - from..]);
            lost += from + old.len() - kept;
        }
        if self.bytes.len() > self.durable_len {
            let first_sector = self.durable_len / SECTOR_BYTES;
            let kept_sectors = rng.random_range(first_sector..=self.bytes.len().div_ceil(SECTOR_BYTES));
            let keep = (kept_sectors * SECTOR_BYTES).clamp(self.durable_len, self.bytes.len());
            lost += self.bytes.len() - keep;
            if keep < self.bytes.len() && rng.random_bool(0.5) {
                // A torn sector: some of its new bytes made it, the rest is garbage.
                let torn_end = (keep + SECTOR_BYTES).min(self.bytes.len());
                let cut = rng.random_range(keep..=torn_end);
                self.bytes[cut..torn_end].iter_mut().for_each(|b| *b = rng.random());
                self.bytes.truncate(torn_end);
            } else {
                self.bytes.truncate(keep);
            }
        }
        self.sync();
        lost
    }
}

#[derive(Default)]
struct Dir {
    files: BTreeMap<PathBuf, FileData>,
    /// The next read of a file with data in it flips one bit (a seed for where).
    misread: Option<u64>,
    misread_done: bool,
}

impl Dir {
    fn contents(&mut self, path: &Path) -> Option<Vec<u8>> {
        let file = self.files.get(path)?;
        let mut bytes = file.bytes.clone();
        if file.data_end >= 64 {
            if let Some(seed) = self.misread.take() {
                let mut rng = SmallRng::seed_from_u64(seed);
                let at = rng.random_range(0..file.data_end / 2);
                bytes[at] ^= 1 << rng.random_range(0..8);
                self.misread_done = true;
            }
        }
        Some(bytes)
    }
}

/// One brick's directory, shared by its cores' `Storage`s and kept across its restarts.
#[derive(Clone, Default)]
pub struct MemDisk(Rc<RefCell<Dir>>);

impl MemDisk {
    /// Some file holds bytes that are not synced.
    pub fn unsynced(&self) -> bool {
        self.0.borrow().files.values().any(FileData::unsynced)
    }

    /// Power is lost: every file keeps what a disk may keep of it. Returns the bytes lost.
    pub fn lose_power(&self, rng: &mut SmallRng) -> usize {
        self.0.borrow_mut().files.values_mut().map(|f| f.lose_power(rng)).sum()
    }

    /// The next read of a file with data reads one bit wrong (chosen by `seed`): a
    /// flipped bit between the platter and memory, not on the platter.
    pub fn misread_next(&self, seed: u64) {
        let mut dir = self.0.borrow_mut();
        dir.misread = Some(seed);
        dir.misread_done = false;
    }

    /// What every file holds now, to put back with `restore`.
    pub fn snapshot(&self) -> MemDiskImage {
        MemDiskImage(self.0.borrow().files.clone())
    }

    /// Puts every file back as `snapshot` found it.
    pub fn restore(&self, image: MemDiskImage) {
        self.0.borrow_mut().files = image.0;
    }

    /// Whether a read since `misread_next` came back wrong; cancels one not yet made.
    pub fn take_misread(&self) -> bool {
        let mut dir = self.0.borrow_mut();
        dir.misread = None;
        std::mem::take(&mut dir.misread_done)
    }
}

/// A copy of a simulated disk's files (`MemDisk::snapshot`).
pub struct MemDiskImage(BTreeMap<PathBuf, FileData>);

pub struct MemFile {
    dir: Rc<RefCell<Dir>>,
    path: PathBuf,
}

impl MemFile {
    fn with<T>(&self, f: impl FnOnce(&mut FileData) -> T) -> io::Result<T> {
        let mut dir = self.dir.borrow_mut();
        let file = dir.files.get_mut(&self.path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(f(file))
    }
}

impl DiskFile for MemFile {
    fn write_at(&mut self, offset: u64, first: &[u8], second: &[u8]) -> io::Result<usize> {
        self.with(|f| {
            f.write_at(offset as usize, first);
            f.write_at(offset as usize + first.len(), second);
            first.len() + second.len()
        })
    }

    fn datasync(&mut self) -> io::Result<()> {
        self.with(FileData::sync)
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.with(|f| {
            f.bytes.truncate(len as usize);
            f.data_end = f.data_end.min(len as usize);
            f.sync();
        })
    }
}

impl Disk for MemDisk {
    type File = MemFile;

    fn open(&mut self, path: &Path) -> io::Result<(MemFile, Vec<u8>)> {
        let mut dir = self.0.borrow_mut();
        let contents = dir.contents(path).unwrap_or_default();
        dir.files.entry(path.to_path_buf()).or_default();
        Ok((MemFile { dir: Rc::clone(&self.0), path: path.to_path_buf() }, contents))
    }

    fn read(&mut self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(self.0.borrow_mut().contents(path))
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        self.0.borrow_mut().files.remove(path);
        Ok(())
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        let mut dir = self.0.borrow_mut();
        let file = dir.files.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        dir.files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn sync_dir(&mut self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&mut self, dir: &Path) -> io::Result<Vec<String>> {
        let files = &self.0.borrow().files;
        Ok(files.keys().filter(|p| p.parent() == Some(dir)).filter_map(|p| p.file_name()?.to_str().map(String::from)).collect())
    }

    fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let dir = self.0.borrow();
        let file = dir.files.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let from = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let bytes = file.bytes.get(from..from + buf.len()).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn size(&mut self, path: &Path) -> io::Result<u64> {
        let dir = self.0.borrow();
        Ok(dir.files.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?.bytes.len() as u64)
    }
}

