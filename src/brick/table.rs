//! One base partition's keys and values: every entry in one anonymous memory mapping
//! of the partition's own (an arena), found through a hash table of offsets into it.
//! Dropping a partition, or compacting it after a DP leaf left, unmaps memory that
//! held nothing else, so the kernel takes the pages back at once; values boxed one by
//! one in the process heap lie among those of other partitions, and their pages stay
//! resident after they are freed (issue 17: a brick that gave replicas away kept its
//! resident memory).
//!
//! An entry is `key_len: u16 | value_len: u32 | key | value`. A put of a value as long
//! as the old one writes over it; any other put appends, and the old entry, like a
//! removed one, becomes garbage. The arena is rebuilt with only live entries when an
//! append does not fit (into a mapping twice what is live) or when garbage outgrows
//! what is live: a rebuild copies the partition's live bytes once, so its cost is
//! paid for by the garbage or the growth that called for it, and touched memory stays
//! within about twice the live bytes.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use memmap2::MmapMut;

use crate::hash::BuildHasher;

const ENTRY_HEADER_LEN: usize = 2 + 4;
/// The smallest mapping (one page).
const ARENA_BYTES_MIN: usize = 4096;
/// Garbage below this never starts a rebuild on its own.
const GARBAGE_BYTES_MIN: usize = 64 << 10;

/// Where an entry lives, and its key's hash in `Table::hasher` (kept, so the index
/// grows and shrinks without reading keys back).
#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: u64,
    at: usize,
}

pub struct Table {
    index: HashTable<Slot>,
    hasher: BuildHasher,
    /// `None` until the first entry.
    arena: Option<MmapMut>,
    /// Bytes of the arena written (entries, live or not).
    used: usize,
    /// Bytes of live entries, headers included.
    live: usize,
}

/// What a put found.
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    Inserted,
    /// The key held a value of this many bytes.
    Replaced(usize),
}

fn entry_len(key: &[u8], value: &[u8]) -> usize {
    ENTRY_HEADER_LEN + key.len() + value.len()
}

/// The key and value of the entry at `at`.
fn entry_at(arena: &[u8], at: usize) -> (&[u8], &[u8]) {
    let key_len = u16::from_le_bytes([arena[at], arena[at + 1]]) as usize;
    let value_len = u32::from_le_bytes(arena[at + 2..at + 6].try_into().expect("4 bytes")) as usize;
    let key_at = at + ENTRY_HEADER_LEN;
    (&arena[key_at..key_at + key_len], &arena[key_at + key_len..key_at + key_len + value_len])
}

/// Whether `slot` is the entry of `key`, whose hash is `hash`.
fn holds(arena: &[u8], slot: &Slot, hash: u64, key: &[u8]) -> bool {
    slot.hash == hash && entry_at(arena, slot.at).0 == key
}

fn write_entry(arena: &mut [u8], at: usize, key: &[u8], value: &[u8]) {
    let key_len = u16::try_from(key.len()).expect("keys are at most KEY_LEN_MAX bytes");
    let value_len = u32::try_from(value.len()).expect("values are at most VALUE_LEN_MAX bytes");
    arena[at..at + 2].copy_from_slice(&key_len.to_le_bytes());
    arena[at + 2..at + 6].copy_from_slice(&value_len.to_le_bytes());
    let key_at = at + ENTRY_HEADER_LEN;
    arena[key_at..key_at + key.len()].copy_from_slice(key);
    arena[key_at + key.len()..key_at + key.len() + value.len()].copy_from_slice(value);
}

/// A new anonymous mapping. Out of memory is the end of the process, as for any
/// allocation (fail-stop), with what could not be mapped.
fn map(bytes: usize) -> MmapMut {
    match MmapMut::map_anon(bytes) {
        Ok(map) => map,
        Err(e) => panic!("out of memory: cannot map {bytes} bytes for a partition's entries: {e}"),
    }
}

impl Default for Table {
    fn default() -> Table {
        Table::new()
    }
}

impl Table {
    pub fn new() -> Table {
        Table { index: HashTable::new(), hasher: BuildHasher::default(), arena: None, used: 0, live: 0 }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes mapped for entries (resident once touched; the arena is touched up to
    /// `used`).
    pub fn mapped_bytes(&self) -> usize {
        self.arena.as_ref().map_or(0, |a| a.len())
    }

    fn arena(&self) -> &[u8] {
        self.arena.as_deref().unwrap_or(&[])
    }

    fn find(&self, key: &[u8]) -> Option<Slot> {
        let hash = self.hasher.hash_one(key);
        let arena = self.arena();
        self.index.find(hash, |s| holds(arena, s, hash, key)).copied()
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key).map(|s| entry_at(self.arena(), s.at).1)
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.find(key).is_some()
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Put {
        let hash = self.hasher.hash_one(key);
        let arena = self.arena.as_deref().unwrap_or(&[]);
        let outcome = match self.index.find_entry(hash, |s| holds(arena, s, hash, key)) {
            Ok(entry) => {
                let at = entry.get().at;
                let old_len = entry_at(arena, at).1.len();
                if old_len == value.len() {
                    let value_at = at + ENTRY_HEADER_LEN + key.len();
                    self.arena.as_mut().expect("an entry is mapped")[value_at..value_at + old_len].copy_from_slice(value);
                    return Put::Replaced(old_len);
                }
                // Out of the index before the append, which may rebuild the arena
                // with only what the index holds.
                entry.remove();
                self.live -= ENTRY_HEADER_LEN + key.len() + old_len;
                Put::Replaced(old_len)
            }
            Err(_) => Put::Inserted,
        };
        let at = self.append(key, value);
        self.index.insert_unique(hash, Slot { hash, at }, |s| s.hash);
        self.compact_if_wasteful();
        outcome
    }

    /// Writes a new entry at the arena's end (rebuilding it first if it does not fit);
    /// returns where.
    fn append(&mut self, key: &[u8], value: &[u8]) -> usize {
        let len = entry_len(key, value);
        if self.used + len > self.mapped_bytes() {
            self.rebuild((self.live + len) * 2);
        }
        let at = self.used;
        write_entry(self.arena.as_mut().expect("mapped by rebuild"), at, key, value);
        self.used += len;
        self.live += len;
        at
    }

    /// Removes `key`; returns its value's length if it was there.
    pub fn remove(&mut self, key: &[u8]) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        let arena = self.arena.as_deref().unwrap_or(&[]);
        let entry = self.index.find_entry(hash, |s| holds(arena, s, hash, key)).ok()?;
        let value_len = entry_at(arena, entry.get().at).1.len();
        entry.remove();
        self.live -= ENTRY_HEADER_LEN + key.len() + value_len;
        self.compact_if_wasteful();
        Some(value_len)
    }

    /// Every entry, in the index's order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        let arena = self.arena();
        self.index.iter().map(move |s| entry_at(arena, s.at))
    }

    pub fn keys(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.iter().map(|(k, _)| k)
    }

    /// Keeps the entries `keep` says to, then rebuilds the arena and the index to fit
    /// what is left (the memory of what left goes back to the kernel). Returns the
    /// entries and bytes (keys and values) removed.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) -> (usize, u64) {
        let arena = self.arena.as_deref().unwrap_or(&[]);
        let (mut removed, mut bytes, mut live) = (0usize, 0u64, self.live);
        self.index.retain(|s| {
            let (k, v) = entry_at(arena, s.at);
            let kept = keep(k, v);
            if !kept {
                removed += 1;
                bytes += (k.len() + v.len()) as u64;
                live -= entry_len(k, v);
            }
            kept
        });
        self.live = live;
        if removed > 0 {
            self.index.shrink_to_fit(|s| s.hash);
            self.rebuild(self.live * 2);
        }
        (removed, bytes)
    }

    fn compact_if_wasteful(&mut self) {
        let garbage = self.used - self.live;
        if garbage > self.live && garbage >= GARBAGE_BYTES_MIN {
            self.rebuild(self.live * 2);
        }
    }

    /// Copies the live entries into a new mapping of at least `bytes` (nothing mapped
    /// when there are none and `bytes` is 0), in the index's order, and drops the old.
    fn rebuild(&mut self, bytes: usize) {
        if self.index.is_empty() && bytes == 0 {
            self.arena = None;
            self.used = 0;
            return;
        }
        let mut fresh = map(bytes.max(ARENA_BYTES_MIN).next_multiple_of(ARENA_BYTES_MIN));
        let old = self.arena.as_deref().unwrap_or(&[]);
        let mut at = 0;
        for slot in self.index.iter_mut() {
            let (k, v) = entry_at(old, slot.at);
            let len = entry_len(k, v);
            fresh[at..at + len].copy_from_slice(&old[slot.at..slot.at + len]);
            slot.at = at;
            at += len;
        }
        assert_eq!(at, self.live, "a rebuild copies every live byte and only those");
        self.arena = Some(fresh);
        self.used = at;
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("len", &self.len()).field("used", &self.used).field("live", &self.live).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Step {
        Put(u8, usize),
        Remove(u8),
        /// Drops the keys whose first byte is odd (a DP leaf leaving).
        RetainEven,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (any::<u8>(), 0usize..600).prop_map(|(k, n)| Step::Put(k, n)),
            3 => any::<u8>().prop_map(Step::Remove),
            1 => Just(Step::RetainEven),
        ]
    }

    fn key(k: u8) -> Vec<u8> {
        // Keys of different lengths, some empty.
        vec![k; (k % 7) as usize]
    }

    proptest! {
        /// Whatever puts, removes and leaves happen, the table holds what a map holds,
        /// and the arena's touched bytes stay within its bound.
        #[test]
        fn holds_what_a_model_holds(steps in proptest::collection::vec(step(), 1..300)) {
            let mut table = Table::new();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (i, s) in steps.into_iter().enumerate() {
                match s {
                    Step::Put(k, n) => {
                        let (key, value) = (key(k), vec![i as u8; n]);
                        let want = model.insert(key.clone(), value.clone()).map_or(Put::Inserted, |v| Put::Replaced(v.len()));
                        prop_assert_eq!(table.put(&key, &value), want);
                    }
                    Step::Remove(k) => {
                        prop_assert_eq!(table.remove(&key(k)), model.remove(&key(k)).map(|v| v.len()));
                    }
                    Step::RetainEven => {
                        let gone: Vec<_> = model.keys().filter(|k| k.first().is_some_and(|b| b % 2 == 1)).cloned().collect();
                        let bytes: u64 = gone.iter().map(|k| (k.len() + model[k].len()) as u64).sum();
                        for k in &gone {
                            model.remove(k);
                        }
                        prop_assert_eq!(table.retain(|k, _| k.first().is_none_or(|b| b % 2 == 0)), (gone.len(), bytes));
                        prop_assert!(gone.is_empty() || table.used == table.live, "a leave compacts");
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                let live: usize = model.iter().map(|(k, v)| entry_len(k, v)).sum();
                prop_assert_eq!(table.live, live);
                prop_assert!(table.used - table.live <= table.live.max(GARBAGE_BYTES_MIN), "garbage is bounded");
            }
            let held: BTreeMap<Vec<u8>, Vec<u8>> = table.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            prop_assert_eq!(&held, &model);
            for (k, v) in &model {
                prop_assert_eq!(table.get(k), Some(&v[..]));
            }
        }
    }

    #[test]
    fn a_partition_that_empties_unmaps_its_arena() {
        let mut table = Table::new();
        for i in 0..10_000u32 {
            table.put(&i.to_le_bytes(), &[7; 100]);
        }
        assert!(table.mapped_bytes() >= 10_000 * 110);
        assert_eq!(table.retain(|_, _| false).0, 10_000);
        assert_eq!(table.mapped_bytes(), 0);
        assert!(table.is_empty());
    }

    #[test]
    fn overwrites_of_one_length_stay_in_place_and_churn_stays_bounded() {
        let mut table = Table::new();
        for i in 0..1_000u32 {
            table.put(&i.to_le_bytes(), &[1; 150]);
        }
        let used = table.used;
        for round in 0..10u8 {
            for i in 0..1_000u32 {
                table.put(&i.to_le_bytes(), &[round; 150]);
            }
        }
        assert_eq!(table.used, used, "same-length overwrites write in place");
        for round in 0..50usize {
            for i in 0..1_000u32 {
                table.put(&i.to_le_bytes(), &vec![1; 100 + round % 2 * 50]);
            }
        }
        assert!(table.used <= 2 * table.live + GARBAGE_BYTES_MIN, "used {} live {}", table.used, table.live);
        assert!(table.mapped_bytes() <= 4 * table.live + GARBAGE_BYTES_MIN, "mapped {} live {}", table.mapped_bytes(), table.live);
    }
}
