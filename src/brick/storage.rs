//! A core's durable state: its log segments and checkpoint, and recovery from them at
//! start-up (checkpoint, then every record from its start lsn).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::log::record::{self, Mutation, ScanEnd};
use crate::log::{self, checkpoint, Disk, FsDisk, LogError, LogFile};

use super::values::{LogAt, LogValues, SegmentReader, ValuesIn};
use super::{Effects, Shard};

/// A core's durable state on `disk`: the active log segment and, while one is being
/// written, a checkpoint.
pub struct Storage<D: Disk = FsDisk> {
    disk: D,
    dir: PathBuf,
    core: usize,
    active: LogFile<D::File>,
    /// The first lsn of the active segment (its name).
    active_first: u64,
    /// Values are kept in the log: a segment a checkpoint covers stays while a value
    /// anyone may read is in it.
    values_in_log: bool,
    checkpoint: Option<checkpoint::Writer<D::File>>,
    /// Active segment size that starts a checkpoint (and a new segment), unless the
    /// core holds more bytes than this: then that many.
    checkpoint_log_bytes: u64,
    /// New segments are laid out ahead of their writes (`LogFile::open_preallocated`):
    /// for sync durability, where every round's fdatasync is on a reply's path.
    preallocate: bool,
    /// Checkpoints finished since start.
    checkpoints: u64,
    /// Segments before the active one (values in the log) and the bytes of each.
    sealed: BTreeMap<u64, u64>,
    /// The segment the cleaner is going through, if any.
    cleaning: Option<Cleaning>,
}

/// The cleaner's pass over one segment.
struct Cleaning {
    segment: u64,
    size: u64,
    /// Where the next read starts (a record boundary).
    offset: u64,
    /// Bytes the next read asks for (more when a record did not fit the last one).
    read_bytes: usize,
    moved: u64,
    moved_bytes: u64,
}

/// Bytes the cleaner reads between two rounds (more for one record that is larger).
const CLEAN_READ_BYTES: usize = 256 << 10;
/// A sealed segment whose live values are less than this share of its bytes is cleaned.
pub const CLEAN_LIVE_FRACTION: f64 = 0.5;

/// Bytes of entries a checkpoint copies per loop round (whole partitions, at least one).
const CHECKPOINT_CHUNK_BYTES: usize = 1 << 20;

fn read<D: Disk>(disk: &mut D, path: &Path) -> Result<Option<Vec<u8>>, LogError> {
    disk.read(path).map_err(|source| LogError::Io { op: "read", path: path.to_path_buf(), source })
}

fn remove<D: Disk>(disk: &mut D, path: &Path) -> Result<(), LogError> {
    disk.remove(path).map_err(|source| LogError::Io { op: "remove", path: path.to_path_buf(), source })
}

/// Opens (creating) a segment: laid out ahead of its records a step at a time (no more
/// than the segment's bound) when `preallocate`, else growing by appends.
fn open_segment<D: Disk>(disk: &mut D, path: &Path, preallocate: bool, checkpoint_log_bytes: u64) -> Result<(LogFile<D::File>, Vec<u8>), LogError> {
    if preallocate {
        LogFile::open_preallocated_on(disk, path, checkpoint_log_bytes)
    } else {
        LogFile::open_on(disk, path)
    }
}

/// Why one log segment cannot be replayed.
#[derive(Debug)]
enum SegmentError {
    Corrupt { offset: u64, error: record::RecordError },
    Gap { found: u64, expected: u64 },
}

/// Replays the records of one segment that starts at `first_lsn` into `shard`, those
/// from `start_lsn` on (older ones are in the checkpoint). Returns the lsn after the
/// last record, how many were replayed, and whether the segment ends in a torn tail.
fn replay_segment(contents: &[u8], first_lsn: u64, start_lsn: u64, shard: &mut Shard) -> Result<(u64, u64, ScanEnd), SegmentError> {
    let base = contents.as_ptr() as usize;
    let mut expected = first_lsn;
    let mut replayed = 0;
    let mut out_of_order = None;
    let end = record::scan(contents, |r| {
        if let Mutation::SyncPoint { .. } = r.mutation {
            return;
        }
        if r.lsn != expected && out_of_order.is_none() {
            out_of_order = Some((r.lsn, expected));
        }
        expected = r.lsn + 1;
        if r.lsn >= start_lsn {
            // Where the record's value is in the file (a subslice of `contents`).
            let offset = r.mutation.value().map_or(0, |v| (v.as_ptr() as usize - base) as u64);
            shard.replay(&r.mutation, LogAt { segment: first_lsn, offset });
            replayed += 1;
        }
    })
    .map_err(|error| SegmentError::Corrupt { offset: error.offset(), error })?;
    if let Some((found, expected)) = out_of_order {
        return Err(SegmentError::Gap { found, expected });
    }
    Ok((expected, replayed, end))
}

/// Loads this core's checkpoint from `disk` and replays its log segments into `shard`:
/// a torn tail of the last segment is cut off with a log line; a corrupt record, a
/// defective checkpoint or a missing segment stops start-up. With values in the log,
/// the checkpoint holds locations and the segments it covers stay (values are read from
/// them), except those nothing points into. Returns the storage and the next lsn.
pub fn recover<D: Disk + Clone + 'static>(
    mut disk: D,
    core: usize,
    dir: &Path,
    shard: &mut Shard,
    checkpoint_log_bytes: u64,
    preallocate: bool,
    values: ValuesIn,
) -> Result<(Storage<D>, u64), LogError> {
    let who = format_args!("core {core}").to_string();
    let started = std::time::Instant::now();
    let values_in_log = matches!(values, ValuesIn::Log { .. });
    if let ValuesIn::Log { cache_bytes } = values {
        let reader = Box::new(SegmentReader { disk: disk.clone(), dir: dir.to_path_buf(), core });
        shard.keep_values_in_log(LogValues::new(cache_bytes, reader, dir.to_path_buf(), core));
    }
    let ckpt_path = log::checkpoint_path(dir, core);
    let _ = disk.remove(&ckpt_path.with_extension("ckpt.tmp"));
    let mut start_lsn = 1;
    if let Some(bytes) = read(&mut disk, &ckpt_path)? {
        let mut keys = 0u64;
        let mut decided = Vec::new();
        let mut bad = None;
        start_lsn = checkpoint::load(
            &bytes,
            |key, stored| {
                if let Err(why) = shard.load_stored(key, stored) {
                    bad.get_or_insert(why);
                }
                keys += 1;
            },
            |decision| decided.push(decision),
        )
        .map_err(|error| LogError::CorruptCheckpoint { path: ckpt_path.clone(), error })?;
        if let Some(why) = bad {
            return Err(LogError::CorruptCheckpoint { path: ckpt_path.clone(), error: checkpoint::CheckpointError::Entry(why) });
        }
        for decision in &decided {
            shard.replay(decision, LogAt::default());
        }
        crate::log!(who, "{}: loaded {keys} keys, log from lsn {start_lsn}", ckpt_path.display());
    }
    let segments = log::segments(&mut disk, dir, core)?;
    let mut next_lsn = start_lsn;
    let mut replayed = 0u64;
    let mut active = None;
    let mut covered = Vec::new();
    let mut sealed = BTreeMap::new();
    for (i, (first_lsn, path)) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let next_first = segments.get(i + 1).map(|s| s.0);
        if next_first.is_some_and(|n| n <= start_lsn) {
            // Wholly covered by the checkpoint: not replayed. Its values are read from
            // it (values in the log), or it was left over from a crash before its delete.
            covered.push((*first_lsn, path));
            continue;
        }
        if *first_lsn > next_lsn {
            return Err(LogError::Gap { path: path.clone(), found: *first_lsn, expected: next_lsn });
        }
        let (file, contents) = if last {
            let (f, c) = open_segment(&mut disk, path, preallocate, checkpoint_log_bytes)?;
            (Some(f), c)
        } else {
            let missing = || LogError::Io { op: "read", path: path.clone(), source: std::io::ErrorKind::NotFound.into() };
            (None, read(&mut disk, path)?.ok_or_else(missing)?)
        };
        if !last {
            sealed.insert(*first_lsn, contents.len() as u64);
        }
        let (expected, n, end) = replay_segment(&contents, *first_lsn, start_lsn, shard).map_err(|e| match e {
            SegmentError::Corrupt { offset, error } => LogError::Corrupt { path: path.clone(), offset, error },
            SegmentError::Gap { found, expected } => LogError::Gap { path: path.clone(), found, expected },
        })?;
        replayed += n;
        next_lsn = next_lsn.max(expected);
        if let ScanEnd::TornTail { offset, error } = end {
            if !last {
                // Segments are synced before the next one starts: only the last can tear.
                return Err(LogError::Corrupt { path: path.clone(), offset, error });
            }
            crate::log!(warn: who, "{}: dropping a torn tail of {} bytes at offset {offset} ({error})", path.display(), contents.len() as u64 - offset);
        }
        if let Some(mut file) = file {
            match end {
                ScanEnd::TornTail { offset, .. } => file.truncate_to(offset)?,
                ScanEnd::Preallocated { offset } => file.resume_at(offset),
                ScanEnd::Clean => {}
            }
            // What was replayed will be served: make it durable first. After a process
            // crash the log's tail may still be only in the page cache, and a power loss
            // later would take back values this brick had served (the simulator found
            // it: a read of a value that a later read found gone).
            file.append(&[], true)?;
            active = Some((*first_lsn, file));
        }
    }
    let in_use = shard.segments_in_use();
    for (first_lsn, path) in covered {
        if !values_in_log || !in_use.contains(&first_lsn) {
            remove(&mut disk, path)?;
        } else {
            let size = disk.size(path).map_err(|source| LogError::Io { op: "stat", path: path.clone(), source })?;
            sealed.insert(first_lsn, size);
        }
    }
    if !values_in_log {
        sealed.clear();
    }
    let (active_first, active) = match active {
        Some(found) => found,
        None => {
            let (file, _) = open_segment(&mut disk, &log::segment_path(dir, core, next_lsn), preallocate, checkpoint_log_bytes)?;
            checkpoint::sync_dir(&mut disk, file.path())?;
            (next_lsn, file)
        }
    };
    if replayed > 0 || shard.stats.keys > 0 {
        crate::log!(who, "recovered {} keys in {} ms: {replayed} log records replayed{}", shard.stats.keys, started.elapsed().as_millis(), if values_in_log { ", values left in the log" } else { "" });
    }
    let storage = Storage { disk, dir: dir.to_path_buf(), core, active, active_first, values_in_log, checkpoint: None, checkpoint_log_bytes, preallocate, checkpoints: 0, sealed, cleaning: None };
    Ok((storage, next_lsn))
}

impl<D: Disk> Storage<D> {
    /// One group commit.
    pub fn commit(&mut self, batch: &[u8], sync: bool) -> Result<(), LogError> {
        self.active.append(batch, sync)
    }

    /// The round's group commit of a batch encoded for `at` (`position` when the round
    /// began): its values' locations hold only if it lands there.
    pub fn commit_batch(&mut self, batch: &[u8], sync: bool, at: LogAt) -> Result<(), LogError> {
        assert_eq!(at, self.position(), "core {}: a batch encoded for one place in the log is written at another", self.core);
        self.commit(batch, sync)
    }

    /// Where the next batch goes: the active segment and its end.
    pub fn position(&self) -> LogAt {
        LogAt { segment: self.active_first, offset: self.active.len() }
    }

    /// Checkpoints finished (and older segments trimmed) since start.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    /// Checkpoint work between rounds: start one when the active segment has grown past
    /// its bound, copy about a chunk of partitions, finish and trim when all are copied.
    /// Returns whether a checkpoint is still in progress.
    pub fn step(&mut self, shard: &Shard, next_lsn: &mut u64) -> Result<bool, LogError> {
        if self.checkpoint.is_none() {
            // A checkpoint writes all the core holds: waiting until the log is as large
            // keeps its cost within one byte written per byte logged, however much is
            // held (a fixed bound made a full copy into a large brick quadratic).
            if self.active.len() < self.checkpoint_log_bytes.max(shard.checkpoint_bytes()) {
                return Ok(false);
            }
            // A new segment from `next_lsn`: everything before it is in memory now and
            // will be in the checkpoint (or in the older segments until it is durable).
            self.active.append(&[], true)?;
            let start_lsn = *next_lsn;
            let path = log::segment_path(&self.dir, self.core, start_lsn);
            let (next, _) = open_segment(&mut self.disk, &path, self.preallocate, self.checkpoint_log_bytes)?;
            checkpoint::sync_dir(&mut self.disk, next.path())?;
            let sealed = std::mem::replace(&mut self.active, next);
            if self.values_in_log {
                self.sealed.insert(self.active_first, sealed.len());
            }
            self.active_first = start_lsn;
            // Undecided prepares go first into the new segment: the checkpoint holds
            // only applied state, and their decisions may come after it.
            let mut batch = Vec::new();
            for (key, body) in shard.prepared_records() {
                record::encode(&mut batch, *next_lsn, &Mutation::Prepare { key, body });
                *next_lsn += 1;
            }
            if !batch.is_empty() {
                self.active.append(&batch, true)?;
            }
            self.checkpoint = Some(checkpoint::Writer::start(&mut self.disk, &log::checkpoint_path(&self.dir, self.core), start_lsn)?);
        }
        let writer = self.checkpoint.as_mut().expect("in progress");
        let mut copied = 0usize;
        while writer.next_partition < shard.partitions() && copied < CHECKPOINT_CHUNK_BYTES {
            copied += writer.add(shard.partition_stored(writer.next_partition))?;
            writer.next_partition += 1;
        }
        if writer.next_partition < shard.partitions() {
            return Ok(true);
        }
        let mut writer = self.checkpoint.take().expect("in progress");
        if !crate::mutation::active(crate::mutation::Mutation::CheckpointForgetsDecisions) {
            writer.add_decisions(shard.outcome_records())?;
        }
        // Every record the checkpoint's entries point to (a write since its start, a
        // value the cleaner wrote again) is durable before the checkpoint is: a power
        // loss must not leave an entry pointing past the log's end (where later records
        // would take its place) or into a segment deleted below.
        self.active.append(&[], true)?;
        let started = writer.finish(&mut self.disk)?;
        let mut trimmed = 0;
        let in_use = shard.segments_in_use();
        let cleaning = self.cleaning.as_ref().map(|c| c.segment);
        for (first_lsn, path) in log::segments(&mut self.disk, &self.dir, self.core)? {
            // Before the checkpoint's start, and (values in the log) holding nothing
            // anyone may read: a checkpoint entry that still points into it is of a key
            // written since `started`, which the replay from there brings back.
            let keep = self.values_in_log && in_use.contains(&first_lsn) && !crate::mutation::active(crate::mutation::Mutation::TrimLiveSegments);
            if first_lsn < started && !keep && cleaning != Some(first_lsn) {
                self.sealed.remove(&first_lsn);
                remove(&mut self.disk, &path)?;
                trimmed += 1;
            }
        }
        checkpoint::sync_dir(&mut self.disk, self.active.path())?;
        self.checkpoints += 1;
        crate::log!(
            format_args!("core {}", self.core),
            "checkpoint at lsn {started}: {} keys; {trimmed} old log segment(s) removed",
            shard.stats.keys
        );
        Ok(false)
    }

    /// The cleaner's step between rounds (values in the log): picks the sealed segment
    /// with the smallest share of live values, if below `CLEAN_LIVE_FRACTION`, reads
    /// about `CLEAN_READ_BYTES` of it and has the shard write the live values in it
    /// again into this round's batch (`Shard::relocate`). Once nothing points into it,
    /// the next checkpoint deletes it. Returns whether a pass is in progress.
    pub fn clean(&mut self, shard: &mut Shard, fx: &mut Effects) -> Result<bool, LogError> {
        let Some(values) = shard.log_values().filter(|_| self.values_in_log) else { return Ok(false) };
        if self.cleaning.is_none() {
            let live = |segment: &u64| values.live.get(segment).copied().unwrap_or_default();
            // Share of a segment's bytes that is live values, for segments with some.
            let share = |(segment, size): (&u64, &u64)| (live(segment).values > 0).then(|| live(segment).bytes as f64 / (*size).max(1) as f64);
            let victim = self
                .sealed
                .iter()
                .filter_map(|s| share(s).filter(|&f| f < CLEAN_LIVE_FRACTION).map(|f| (f, s)))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, s)| s);
            let Some((&segment, &size)) = victim else { return Ok(false) };
            self.cleaning = Some(Cleaning { segment, size, offset: 0, read_bytes: CLEAN_READ_BYTES, moved: 0, moved_bytes: 0 });
        }
        let c = self.cleaning.as_mut().expect("a pass");
        let path = log::segment_path(&self.dir, self.core, c.segment);
        let len = (c.size - c.offset).min(c.read_bytes as u64) as usize;
        let mut bytes = vec![0u8; len];
        if crate::logging::failpoint_hit("cleaner-read") {
            return Err(LogError::Io { op: "read for the cleaner", path, source: std::io::Error::other("failpoint cleaner-read") });
        }
        self.disk.read_at(&path, c.offset, &mut bytes).map_err(|source| LogError::Io { op: "read for the cleaner", path: path.clone(), source })?;
        let done = shard.relocate(c.segment, c.offset, &bytes, fx);
        c.offset += done.consumed as u64;
        c.moved += done.moved;
        c.moved_bytes += done.moved_bytes;
        // Zeros where a record would start: a laid-out segment's end (a record's first
        // bytes, its length, are never zero; the rest must be read whole to tell).
        let rest = &bytes[done.consumed..];
        let reached_end = c.offset + rest.len() as u64 >= c.size;
        let at_end = c.offset >= c.size || (!rest.is_empty() && (rest.len() >= record::RECORD_HEADER_LEN || reached_end) && rest.iter().all(|&b| b == 0));
        if !at_end && done.consumed == 0 {
            // Not one whole record: one larger than the read, or corruption.
            if reached_end || len >= record::RECORD_HEADER_LEN + record::PAYLOAD_LEN_MAX {
                let error = record::decode(&bytes, c.offset).expect_err("relocate stops only where no record is");
                return Err(LogError::Corrupt { path, offset: c.offset, error });
            }
            c.read_bytes = (c.read_bytes * 2).min(record::RECORD_HEADER_LEN + record::PAYLOAD_LEN_MAX);
            return Ok(true);
        }
        c.read_bytes = CLEAN_READ_BYTES;
        if at_end {
            let c = self.cleaning.take().expect("a pass");
            crate::log!(
                format_args!("core {}", self.core),
                "cleaned log segment {}: {} live values ({} KiB) of {} KiB written again; it goes at the next checkpoint",
                path.display(),
                c.moved,
                c.moved_bytes >> 10,
                c.size >> 10
            );
        }
        Ok(true)
    }

    /// The directory and core whose log this is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether segment `first_lsn` is still on disk.
    pub fn holds_segment(&self, first_lsn: u64) -> bool {
        first_lsn == self.active_first || self.sealed.contains_key(&first_lsn)
    }

    /// Bytes of the log segments on disk with values in the log (what the cleaner
    /// bounds); 0 with values in memory.
    pub fn log_bytes(&self) -> u64 {
        if !self.values_in_log {
            return 0;
        }
        self.sealed.values().sum::<u64>() + self.active.len()
    }
}

