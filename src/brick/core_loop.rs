//! One core's run-to-completion loop: poll the network, execute, queue replies; the
//! transport writes each connection's replies once per round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpTransport, Transport, TransportError};

use std::path::{Path, PathBuf};

use crate::log::record::{self, Mutation, ScanEnd};
use crate::log::{self, checkpoint, LogError, LogFile};
use crate::proto::{decode_exact, BrickInfo, DdsFraming, Kind, Op};

use super::{Durability, Shard};

#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    pub spin: Duration,
    pub busy_poll: bool,
    /// Longest sleep in the kernel while idle; bounds how late a stop is seen.
    pub park: Duration,
}

struct Core {
    core: usize,
    shard: Shard,
    info: BrickInfo,
    durability: Durability,
    /// Log records of this round's mutations: one group commit at the round's end.
    batch: Vec<u8>,
    next_lsn: u64,
    /// Replies that must wait for the group commit (sync durability): their bytes, and
    /// for each, its connection and where it starts in `held`.
    held: Vec<u8>,
    held_at: Vec<(ConnId, usize)>,
}

impl Handler for Core {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // The transport cut the frame with the same header rules, so this only fails on
        // a bug; it is still a per-connection error, never a crash.
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        match frame.kind {
            Kind::Request(op) => {
                // Under sync durability a write's reply waits for its fsync, and so does
                // every reply after the round's first write: a read must not show a value
                // that a crash before the sync would take back.
                let hold = self.durability == Durability::Sync
                    && (!self.batch.is_empty() || matches!(op, Op::Put | Op::Remove));
                let changed = if hold {
                    self.held_at.push((conn, self.held.len()));
                    self.shard.execute(&frame, &self.info, &mut self.held)
                } else {
                    self.shard.execute(&frame, &self.info, out)
                };
                if changed {
                    let mutation = match op {
                        Op::Put => Mutation::Put { key: frame.key, value: frame.value },
                        Op::Remove => Mutation::Remove { key: frame.key },
                        _ => unreachable!("only puts and removes change a shard"),
                    };
                    record::encode(&mut self.batch, self.next_lsn, &mutation);
                    self.next_lsn += 1;
                }
                Ok(())
            }
            Kind::Reply(op, _) => Err(format!("unexpected {} reply sent to a brick", op.name())),
        }
    }

    fn on_accept(&mut self, _conn: ConnId, _peer: SocketAddr) {
        self.shard.stats.connections_open += 1;
    }

    fn on_close(&mut self, _conn: ConnId, peer: SocketAddr, reason: &CloseReason) {
        self.shard.stats.connections_open -= 1;
        if reason.is_bad_input() {
            self.shard.stats.connections_closed_bad_input += 1;
        }
        if !matches!(reason, CloseReason::PeerClosed) {
            crate::log!(format_args!("core {}", self.core), "closed connection from {peer}: {reason}");
        }
    }

    fn on_refused(&mut self, peer: SocketAddr, open: usize) {
        crate::log!(format_args!("core {}", self.core), "refused connection from {peer}: {open} already open");
    }
}

/// A core's durable state on disk: the active log segment and, while one is being
/// written, a checkpoint.
pub struct Storage {
    dir: PathBuf,
    core: usize,
    active: LogFile,
    checkpoint: Option<checkpoint::Writer>,
    /// Active segment size that starts a checkpoint (and a new segment).
    checkpoint_log_bytes: u64,
}

/// Bytes of entries a checkpoint copies per loop round (whole partitions, at least one).
const CHECKPOINT_CHUNK_BYTES: usize = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>, LogError> {
    std::fs::read(path).map_err(|source| LogError::Io { op: "read", path: path.to_path_buf(), source })
}

/// Loads this core's checkpoint and replays its log segments into `shard`: a torn tail
/// of the last segment is cut off with a log line; a corrupt record, a defective
/// checkpoint or a missing segment stops start-up. Returns the storage and the next lsn.
pub fn recover(core: usize, dir: &Path, shard: &mut Shard, checkpoint_log_bytes: u64) -> Result<(Storage, u64), LogError> {
    let who = format_args!("core {core}").to_string();
    let ckpt_path = log::checkpoint_path(dir, core);
    let _ = std::fs::remove_file(ckpt_path.with_extension("ckpt.tmp"));
    let mut start_lsn = 1;
    if ckpt_path.exists() {
        let bytes = read(&ckpt_path)?;
        let mut keys = 0u64;
        start_lsn = checkpoint::load(&bytes, |key, value| {
            shard.replay(&Mutation::Put { key, value });
            keys += 1;
        })
        .map_err(|error| LogError::CorruptCheckpoint { path: ckpt_path.clone(), error })?;
        crate::log!(who, "{}: loaded {keys} keys, log from lsn {start_lsn}", ckpt_path.display());
    }
    let segments = log::segments(dir, core)?;
    let mut next_lsn = start_lsn;
    let mut replayed = 0u64;
    let mut active = None;
    for (i, (first_lsn, path)) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let next_first = segments.get(i + 1).map(|s| s.0);
        if next_first.is_some_and(|n| n <= start_lsn) {
            // Wholly covered by the checkpoint: left over from a crash before its delete.
            std::fs::remove_file(path).map_err(|source| LogError::Io { op: "remove", path: path.clone(), source })?;
            continue;
        }
        if *first_lsn > next_lsn {
            return Err(LogError::Gap { path: path.clone(), found: *first_lsn, expected: next_lsn });
        }
        let (file, contents) = if last { let (f, c) = LogFile::open(path)?; (Some(f), c) } else { (None, read(path)?) };
        let mut expected = *first_lsn;
        let mut out_of_order = None;
        let end = record::scan(&contents, |r| {
            if r.lsn != expected && out_of_order.is_none() {
                out_of_order = Some((r.lsn, expected));
            }
            expected = r.lsn + 1;
            if r.lsn >= start_lsn {
                shard.replay(&r.mutation);
                replayed += 1;
            }
        })
        .map_err(|error| LogError::Corrupt { path: path.clone(), offset: error.offset(), error })?;
        if let Some((found, expected)) = out_of_order {
            return Err(LogError::Gap { path: path.clone(), found, expected });
        }
        next_lsn = next_lsn.max(expected);
        if let ScanEnd::TornTail { offset, error } = end {
            if !last {
                // Segments are synced before the next one starts: only the last can tear.
                return Err(LogError::Corrupt { path: path.clone(), offset, error });
            }
            crate::log!(who, "{}: dropping a torn tail of {} bytes at offset {offset} ({error})", path.display(), contents.len() as u64 - offset);
        }
        if let Some(mut file) = file {
            if let ScanEnd::TornTail { offset, .. } = end {
                file.truncate_to(offset)?;
            }
            active = Some(file);
        }
    }
    let active = match active {
        Some(file) => file,
        None => {
            let (file, _) = LogFile::open(&log::segment_path(dir, core, next_lsn))?;
            checkpoint::sync_dir(file.path())?;
            file
        }
    };
    if replayed > 0 {
        crate::log!(who, "replayed {replayed} log records; {} keys", shard.stats.keys);
    }
    let storage = Storage { dir: dir.to_path_buf(), core, active, checkpoint: None, checkpoint_log_bytes };
    Ok((storage, next_lsn))
}

impl Storage {
    /// One group commit.
    fn commit(&mut self, batch: &[u8], sync: bool) -> Result<(), LogError> {
        self.active.append(batch, sync)
    }

    /// Checkpoint work between rounds: start one when the active segment has grown past
    /// its bound, copy about a chunk of partitions, finish and trim when all are copied.
    /// Returns whether a checkpoint is still in progress.
    fn step(&mut self, shard: &Shard, next_lsn: u64) -> Result<bool, LogError> {
        if self.checkpoint.is_none() {
            if self.active.len() < self.checkpoint_log_bytes {
                return Ok(false);
            }
            // A new segment from `next_lsn`: everything before it is in memory now and
            // will be in the checkpoint (or in the older segments until it is durable).
            self.active.append(&[], true)?;
            let (next, _) = LogFile::open(&log::segment_path(&self.dir, self.core, next_lsn))?;
            checkpoint::sync_dir(next.path())?;
            self.active = next;
            self.checkpoint = Some(checkpoint::Writer::start(&log::checkpoint_path(&self.dir, self.core), next_lsn)?);
        }
        let writer = self.checkpoint.as_mut().expect("in progress");
        let mut copied = 0usize;
        while writer.next_partition < shard.partitions() && copied < CHECKPOINT_CHUNK_BYTES {
            copied += writer.add(shard.partition_entries(writer.next_partition))?;
            writer.next_partition += 1;
        }
        if writer.next_partition < shard.partitions() {
            return Ok(true);
        }
        let started = self.checkpoint.take().expect("in progress").finish()?;
        let mut trimmed = 0;
        for (first_lsn, path) in log::segments(&self.dir, self.core)? {
            if first_lsn < started {
                std::fs::remove_file(&path).map_err(|source| LogError::Io { op: "remove", path: path.clone(), source })?;
                trimmed += 1;
            }
        }
        checkpoint::sync_dir(self.active.path())?;
        crate::log!(
            format_args!("core {}", self.core),
            "checkpoint at lsn {started}: {} keys; {trimmed} old log segment(s) removed",
            shard.stats.keys
        );
        Ok(false)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Log(#[from] LogError),
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    core: usize,
    mut transport: TcpTransport<DdsFraming>,
    shard: Shard,
    mut storage: Storage,
    next_lsn: u64,
    durability: Durability,
    info: BrickInfo,
    config: LoopConfig,
    stop: &AtomicBool,
) -> Result<(), CoreError> {
    let mut handler =
        Core { core, shard, info, durability, batch: Vec::new(), next_lsn, held: Vec::new(), held_at: Vec::new() };
    let mut last_work = Instant::now();
    let mut checkpointing = false;
    while !stop.load(Ordering::Relaxed) {
        // Adaptive polling: spin while requests keep coming, then sleep in the kernel
        // so bricks and clients sharing a small machine do not starve each other.
        let busy = config.busy_poll || checkpointing || last_work.elapsed() < config.spin;
        let timeout = if busy { Duration::ZERO } else { config.park };
        if transport.poll(Some(timeout), &mut handler)? > 0 {
            last_work = Instant::now();
        }
        if !handler.batch.is_empty() {
            // Group commit: every mutation of the round in one write and one fdatasync.
            // An error here ends the brick; nothing is retried.
            storage.commit(&handler.batch, durability == Durability::Sync)?;
            handler.batch.clear();
        }
        if !handler.held_at.is_empty() {
            let Core { held, held_at, .. } = &mut handler;
            for (i, &(conn, start)) in held_at.iter().enumerate() {
                let end = held_at.get(i + 1).map_or(held.len(), |&(_, next)| next);
                // A connection that closed meanwhile just misses its reply.
                if let Ok(out) = transport.outbox(conn) {
                    out.extend_from_slice(&held[start..end]);
                }
            }
            held.clear();
            held_at.clear();
            transport.flush(&mut handler);
        }
        checkpointing = storage.step(&handler.shard, handler.next_lsn)?;
    }
    if durability == Durability::Memory {
        // A clean stop leaves nothing unsynced.
        storage.commit(&[], true)?;
    }
    Ok(())
}
