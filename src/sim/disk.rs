//! The simulated disk under one brick core's log: what was written, and how much of it
//! is durable. A process crash keeps everything written (the kernel has it). A power
//! loss keeps the synced bytes; of the rest, a log that grows by appends keeps a prefix
//! in whole 512-byte sectors, the sector after it possibly torn (part new bytes, part
//! garbage), and a log laid out ahead of its records (sync durability) keeps any subset
//! of its sectors, each lost one reading as the zeros laid out before it, a torn one
//! part new, part zeros. Faults drawn per run: a sync that fails, a write that finds
//! the disk full, a byte read back wrong.

use rand::rngs::SmallRng;
use rand::Rng;

pub const SECTOR_BYTES: usize = 512;

#[derive(Default)]
pub(crate) struct SimDisk {
    /// The log file as the brick wrote it.
    pub bytes: Vec<u8>,
    /// How much of it is durable (synced).
    pub synced: usize,
    /// Laid out ahead of its records: it starts with a sync point and every write ends
    /// with one, as `LogFile` writes them (`log::record`'s module docs).
    pub preallocated: bool,
}

impl SimDisk {
    pub fn write(&mut self, batch: &[u8]) {
        if self.preallocated && self.bytes.is_empty() {
            crate::log::record::encode_sync_point(&mut self.bytes, 0);
            self.synced = self.bytes.len();
        }
        self.bytes.extend_from_slice(batch);
        if self.preallocated && !batch.is_empty() {
            crate::log::record::encode_sync_point(&mut self.bytes, self.synced as u64);
        }
    }

    pub fn sync(&mut self) {
        self.synced = self.bytes.len();
    }

    /// Power is lost: un-synced bytes survive only as a prefix of whole sectors, and
    /// the sector after that prefix may be torn.
    pub fn lose_power(&mut self, rng: &mut SmallRng) -> usize {
        let unsynced = self.bytes.len() - self.synced;
        if unsynced == 0 {
            return 0;
        }
        let first_sector = self.synced / SECTOR_BYTES;
        let last_sector = self.bytes.len().div_ceil(SECTOR_BYTES);
        if self.preallocated {
            let mut lost = 0;
            for sector in first_sector..last_sector {
                let from = (sector * SECTOR_BYTES).max(self.synced);
                let to = ((sector + 1) * SECTOR_BYTES).min(self.bytes.len());
                let kept = match rng.random_range(0..3) {
                    0 => to,
                    1 => from,
                    _ => rng.random_range(from..=to),
                };
                self.bytes[kept..to].fill(0);
                lost += to - kept;
            }
            self.synced = self.bytes.len();
            return lost;
        }
        let kept_sectors = rng.random_range(first_sector..=last_sector);
        let keep = (kept_sectors * SECTOR_BYTES).clamp(self.synced, self.bytes.len());
        let lost = self.bytes.len() - keep;
        if lost > 0 && rng.random_bool(0.5) {
            // A torn sector: some of its new bytes made it, the rest is garbage.
            let torn_end = (keep + SECTOR_BYTES).min(self.bytes.len());
            let cut = rng.random_range(keep..=torn_end);
            for byte in &mut self.bytes[cut..torn_end] {
                *byte = rng.random();
            }
            self.bytes.truncate(torn_end);
        } else {
            self.bytes.truncate(keep);
        }
        // What survived is on the platter now.
        self.synced = self.bytes.len();
        lost
    }
}
