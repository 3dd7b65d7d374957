//! Where a core's values live (issue 18). In memory (`ValuesIn::Memory`, the default):
//! a partition's table holds each value beside its key. In the log (`ValuesIn::Log`):
//! the table holds, beside each key, the value's `Loc`: the log segment and offset of
//! the record that wrote it (a put, or the prepare a commit applied), its length and a
//! hash of its bytes. The redo log is the store; a bounded cache (`--cache-mb`) keeps
//! recently written and read values, and a miss reads the value back from its segment
//! through the `Disk` door, checked against the hash before it is served.
//!
//! A location never changes its bytes (a log is only appended to), so the cache is
//! keyed by location and never goes stale: a new write makes a new location. A segment
//! may be deleted only once nothing points into it (`LogValues::live`, the locations of
//! undecided prepares, `LogValues::reading`) and a checkpoint covers it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hash::HashMap;
use crate::log::{self, Disk, LogError};

/// Where values live; recorded in the brick's layout (a directory's checkpoints are
/// of one kind or the other).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "in")]
pub enum ValuesIn {
    /// Beside their keys in memory; checkpoints hold them.
    #[default]
    Memory,
    /// In the log segments, with a cache of `cache_bytes`; checkpoints hold locations.
    Log { cache_bytes: u64 },
}

impl ValuesIn {
    /// As a start-up line says it.
    pub fn describe(&self) -> String {
        match self {
            ValuesIn::Memory => "in memory".into(),
            ValuesIn::Log { cache_bytes } => format!("in the log, a cache of {:.1} MiB", *cache_bytes as f64 / (1u64 << 20) as f64),
        }
    }
}

/// Bytes a `Loc` takes in a table entry.
pub const LOC_BYTES: usize = 8 + 8 + 4 + 8;

/// A value's place in a core's log: the segment (by its first lsn), the byte offset of
/// the value in that file, its length and its `value_hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub hash: u64,
}

/// The hash a `Loc` keeps of its value: checked on every read back, and what catch-up
/// digests are made of (so a replica whose values are in its log compares without
/// reading them).
pub fn value_hash(value: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(value)
}

impl Loc {
    pub fn of(segment: u64, offset: u64, value: &[u8]) -> Loc {
        let len = u32::try_from(value.len()).expect("values are at most VALUE_LEN_MAX bytes");
        Loc { segment, offset, len, hash: value_hash(value) }
    }

    pub fn encode(&self) -> [u8; LOC_BYTES] {
        let mut b = [0u8; LOC_BYTES];
        b[..8].copy_from_slice(&self.segment.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..].copy_from_slice(&self.hash.to_le_bytes());
        b
    }

    /// A table entry's or a checkpoint's location; `None` if it is not one.
    pub fn decode(b: &[u8]) -> Option<Loc> {
        if b.len() != LOC_BYTES {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Some(Loc { segment: u64_at(0), offset: u64_at(8), len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")), hash: u64_at(20) })
    }

    /// The cache's key: the place and the value's hash, so a hit is of the very value
    /// the location names.
    fn key(&self) -> (u64, u64, u64) {
        (self.segment, self.offset, self.hash)
    }
}

/// Where the round's batch will be written: the active segment (its first lsn) and the
/// offset its first byte will have. `Storage::commit` checks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogAt {
    pub segment: u64,
    pub offset: u64,
}

/// Reads a value's bytes back from the log: the door to the disk for values.
pub trait ReadValue {
    fn read(&mut self, loc: &Loc) -> Result<Vec<u8>, LogError>;
}

/// Values read from core `core`'s segments in `dir` on `disk`.
pub struct SegmentReader<D: Disk> {
    pub disk: D,
    pub dir: PathBuf,
    pub core: usize,
}

impl<D: Disk> ReadValue for SegmentReader<D> {
    fn read(&mut self, loc: &Loc) -> Result<Vec<u8>, LogError> {
        let path = log::segment_path(&self.dir, self.core, loc.segment);
        let mut value = vec![0u8; loc.len as usize];
        if crate::logging::failpoint_hit("value-read") {
            return Err(LogError::Io { op: "read value", path, source: std::io::Error::other("failpoint value-read") });
        }
        self.disk.read_at(&path, loc.offset, &mut value).map_err(|source| LogError::Io { op: "read value", path: path.clone(), source })?;
        if value_hash(&value) != loc.hash {
            return Err(LogError::ValueChecksum { path, offset: loc.offset, len: loc.len });
        }
        Ok(value)
    }
}

/// One cached value.
struct Cached {
    at: (u64, u64, u64),
    value: Box<[u8]>,
    /// Read since the clock hand last passed.
    used: bool,
}

/// Values by location, at most `cap_bytes` of them between rounds: CLOCK eviction over a
/// ring of slots (a value read since the hand last passed gets a second chance). Nothing is evicted within a round (`trim` runs between
/// rounds), so a value written in a round is served from here until its record has
/// been written.
pub struct ValueCache {
    slots: Vec<Option<Cached>>,
    /// Empty slots, reused before the ring grows.
    free: Vec<usize>,
    by_loc: HashMap<(u64, u64, u64), usize>,
    bytes: u64,
    cap_bytes: u64,
    hand: usize,
    pub hits: u64,
    pub misses: u64,
}

impl ValueCache {
    pub fn new(cap_bytes: u64) -> ValueCache {
        ValueCache { slots: Vec::new(), free: Vec::new(), by_loc: HashMap::default(), bytes: 0, cap_bytes, hand: 0, hits: 0, misses: 0 }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The value at `loc`, without counting it as used (a copy's or a check's read:
    /// a scan must not push out what gets use).
    fn peek(&self, loc: &Loc) -> Option<&[u8]> {
        let &i = self.by_loc.get(&loc.key())?;
        self.slots[i].as_ref().map(|c| &c.value[..])
    }

    fn get(&mut self, loc: &Loc) -> Option<&[u8]> {
        let &i = self.by_loc.get(&loc.key())?;
        let slot = self.slots[i].as_mut().expect("an indexed slot holds a value");
        slot.used = true;
        Some(&slot.value)
    }

    fn insert(&mut self, loc: &Loc, value: &[u8]) {
        if self.by_loc.contains_key(&loc.key()) {
            return;
        }
        // Unmarked: it lives until the hand comes round (an empty slot is behind the
        // hand, where the last eviction was), and stays if used by then.
        let cached = Cached { at: loc.key(), value: value.into(), used: false };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(cached);
                i
            }
            None => {
                self.slots.push(Some(cached));
                self.slots.len() - 1
            }
        };
        self.by_loc.insert(loc.key(), i);
        self.bytes += value.len() as u64;
    }

    fn remove(&mut self, loc: &Loc) {
        if let Some(i) = self.by_loc.remove(&loc.key()) {
            self.empty_slot(i);
        }
    }

    /// Empties slot `i` (already out of `by_loc`).
    fn empty_slot(&mut self, i: usize) {
        let gone = self.slots[i].take().expect("a slot in use");
        self.bytes -= gone.value.len() as u64;
        self.free.push(i);
    }

    /// Evicts until at most `cap_bytes` are cached: the hand clears the mark of a used
    /// value and evicts one unused since it last passed. Bounded: two turns of the ring.
    pub fn trim(&mut self) {
        let mut steps = 2 * self.slots.len() + 1;
        while self.bytes > self.cap_bytes && steps > 0 {
            steps -= 1;
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            match self.slots[i].as_mut() {
                None => {}
                Some(slot) if slot.used => slot.used = false,
                Some(slot) => {
                    let at = slot.at;
                    self.by_loc.remove(&at);
                    self.empty_slot(i);
                }
            }
        }
        if self.by_loc.is_empty() {
            // Nothing cached: the ring starts again small.
            self.slots.clear();
            self.free.clear();
            self.hand = 0;
        }
    }
}

/// What the tables point to in one segment: values (some may be empty) and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub values: u64,
    pub bytes: u64,
}

/// A core's values in the log: the cache, the door to read misses, and how many bytes
/// of values each segment holds that a table entry points to.
pub struct LogValues {
    cache: ValueCache,
    reader: RefCell<Box<dyn ReadValue>>,
    /// Bytes of values the tables point to, by segment: a segment out of here (and out
    /// of every undecided prepare) holds nothing anyone will read.
    pub live: BTreeMap<u64, Live>,
    /// The sum of `live`.
    live_bytes: u64,
    /// Reads in flight (`cached` missed), by segment: a segment being read stays.
    pub reading: BTreeMap<u64, u64>,
    /// Where the core's segments are (for messages).
    dir: PathBuf,
    core: usize,
    /// The first read that failed: the core stops (fail-stop, never retried).
    failed: RefCell<Option<LogError>>,
}

impl LogValues {
    pub fn new(cache_bytes: u64, reader: Box<dyn ReadValue>, dir: PathBuf, core: usize) -> LogValues {
        LogValues {
            cache: ValueCache::new(cache_bytes),
            reader: RefCell::new(reader),
            live: BTreeMap::new(),
            live_bytes: 0,
            reading: BTreeMap::new(),
            dir,
            core,
            failed: RefCell::new(None),
        }
    }

    /// The value at `loc` if it is cached (a hit is counted; a miss is counted by
    /// `read_finished`).
    pub fn cached(&mut self, loc: &Loc) -> Option<&[u8]> {
        let cache = &mut self.cache;
        cache.get(loc)?;
        cache.hits += 1;
        cache.peek(loc)
    }

    /// A read of `loc` was handed to the disk.
    pub fn read_started(&mut self, loc: &Loc) {
        *self.reading.entry(loc.segment).or_default() += 1;
    }

    /// A read of `loc` that was handed over never started.
    pub fn read_abandoned(&mut self, loc: &Loc) {
        let n = self.reading.get_mut(&loc.segment).expect("a read in flight");
        *n -= 1;
        if *n == 0 {
            self.reading.remove(&loc.segment);
        }
    }

    /// A read of `loc` came back: the value if it is whole and matches its hash (then
    /// cached); otherwise the failure is kept (`take_failure`) and `None`.
    pub fn read_finished(&mut self, loc: &Loc, result: Result<Vec<u8>, LogError>) -> Option<Vec<u8>> {
        self.read_abandoned(loc);
        let path = || log::segment_path(&self.dir, self.core, loc.segment);
        let checked = result.and_then(|v| {
            if v.len() == loc.len as usize && value_hash(&v) == loc.hash {
                Ok(v)
            } else {
                Err(LogError::ValueChecksum { path: path(), offset: loc.offset, len: loc.len })
            }
        });
        match checked {
            Ok(v) => {
                let cache = &mut self.cache;
                cache.misses += 1;
                cache.insert(loc, &v);
                Some(v)
            }
            Err(e) => {
                self.failed.get_mut().get_or_insert(e);
                None
            }
        }
    }

    /// The value at `loc`, from the cache or read back at once (copies, catch-ups,
    /// reads parked on a decision: neither cached nor counted, so a scan of a partition
    /// does not push out what gets use). `None` if the read failed: the error is kept
    /// for `take_failure`.
    pub fn read(&self, loc: &Loc) -> Option<Cow<'_, [u8]>> {
        if let Some(v) = self.cache.peek(loc) {
            return Some(Cow::Borrowed(v));
        }
        match self.reader.borrow_mut().read(loc) {
            Ok(v) => Some(Cow::Owned(v)),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                None
            }
        }
    }

    /// A table entry now points to `loc`, whose value is `value` (cached: just written).
    pub fn stored(&mut self, loc: &Loc, value: &[u8]) {
        self.loaded(loc);
        self.cache.insert(loc, value);
    }

    /// A table entry now points to `loc` (loaded from a checkpoint: not cached).
    pub fn loaded(&mut self, loc: &Loc) {
        let live = self.live.entry(loc.segment).or_default();
        live.values += 1;
        live.bytes += u64::from(loc.len);
        self.live_bytes += u64::from(loc.len);
    }

    /// Bytes of values the tables point to.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// A table entry pointed to `loc` and no longer does.
    pub fn dropped(&mut self, loc: &Loc) {
        let live = self.live.get_mut(&loc.segment).expect("a dropped location was live");
        live.values -= 1;
        live.bytes -= u64::from(loc.len);
        self.live_bytes -= u64::from(loc.len);
        if live.values == 0 {
            self.live.remove(&loc.segment);
        }
        self.cache.remove(loc);
    }

    pub fn trim(&mut self) {
        self.cache.trim();
    }

    pub fn cache(&self) -> &ValueCache {
        &self.cache
    }

    pub fn take_failure(&mut self) -> Option<LogError> {
        self.failed.get_mut().take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(offset: u64, value: &[u8]) -> Loc {
        Loc::of(1, offset, value)
    }

    #[test]
    fn locations_read_back_from_their_bytes() {
        let l = Loc::of(7, 1 << 40, b"hello");
        assert_eq!(Loc::decode(&l.encode()), Some(l));
        assert_eq!(Loc::decode(&l.encode()[1..]), None);
    }

    #[test]
    fn the_cache_keeps_within_its_bound_between_rounds_and_prefers_used_values() {
        let mut c = ValueCache::new(300);
        for i in 0..10u64 {
            c.insert(&loc(i * 100, &[i as u8; 100]), &[i as u8; 100]);
        }
        assert_eq!(c.bytes(), 1000, "nothing is evicted within a round");
        assert!(c.get(&loc(900, &[9; 100])).is_some());
        c.trim();
        assert!(c.bytes() <= 300);
        assert!(c.get(&loc(900, &[9; 100])).is_some(), "a used value outlives unused ones");
        c.remove(&loc(900, &[9; 100]));
        assert!(c.get(&loc(900, &[9; 100])).is_none());
        c.trim();
        assert_eq!(c.by_loc.len(), c.slots.iter().flatten().count());
    }

    #[test]
    fn a_value_read_every_round_stays_while_a_stream_of_others_passes_through() {
        let mut c = ValueCache::new(1000);
        let hot = loc(0, &[1; 100]);
        c.insert(&hot, &[1; 100]);
        for round in 1..1000u64 {
            assert!(c.get(&hot).is_some(), "round {round}: the hot value was evicted");
            for j in 0..3 {
                let l = loc(round * 1000 + j * 100, &[2; 100]);
                c.insert(&l, &[2; 100]);
            }
            c.trim();
            assert!(c.bytes() <= 1000);
        }
        assert!(c.slots.len() <= 20, "the ring reuses its slots: {}", c.slots.len());
    }
}
