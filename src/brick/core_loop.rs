//! One core's run-to-completion loop: poll the network, execute, queue replies; the
//! transport writes each connection's replies once per round.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, MixedTransport, Transport, TransportError};
use hashbrown::HashMap;

use std::path::{Path, PathBuf};

use crate::log::record::{self, Mutation, ScanEnd};
use crate::log::{self, checkpoint, LogError, LogFile};
use crate::map::{key_hash, BrickId};
use crate::proto::{decode_exact, encode, BrickInfo, DdsFraming, Frame, Kind, Op, Status, TxId, TxState};

use super::control::Shared;
use super::shard::{Effects, Query};
use super::{Durability, Shard};

#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    pub spin: Duration,
    pub busy_poll: bool,
    /// Longest sleep in the kernel while idle; bounds how late a stop is seen.
    pub park: Duration,
}

/// How often in-doubt prepares are looked at.
const TICK_MS: u64 = 100;
/// How long a core waits to connect to a peer it must ask about a transaction.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// A question to a peer: the key, the transaction, whom, and on which connection.
type Asked = (Box<[u8]>, TxId, BrickId, ConnId);

struct Core {
    core: usize,
    shard: Shard,
    info: BrickInfo,
    durability: Durability,
    fx: Effects,
    /// Replies that must wait for the group commit (sync durability): their bytes, and
    /// for each, its connection and where it starts in `held`.
    held: Vec<u8>,
    held_at: Vec<(ConnId, usize)>,
    scratch: Vec<u8>,
    /// Questions to peers in flight, by request id, with the connection they went on.
    asked: HashMap<u64, Asked>,
    next_ask_id: u64,
    /// Connections this core opened to peer cores: (brick, core).
    peers: HashMap<(BrickId, usize), ConnId>,
}

impl Core {
    /// Whether replies must wait for this round's group commit: under sync durability,
    /// once the round logged something that must be durable before anyone sees it.
    fn holding(&self) -> bool {
        self.durability == Durability::Sync && self.fx.must_sync
    }

    fn hold(&mut self, conn: ConnId, bytes: &[u8]) {
        self.held_at.push((conn, self.held.len()));
        self.held.extend_from_slice(bytes);
    }
}

impl Handler for Core {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // The transport cut the frame with the same header rules, so this only fails on
        // a bug; it is still a per-connection error, never a crash.
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        match frame.kind {
            Kind::Request(_) => {
                if conn.is_rdma() {
                    self.shard.stats.rdma_requests += 1;
                }
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                self.shard.execute(conn, &frame, &self.info, &mut scratch, &mut self.fx);
                if self.holding() {
                    self.hold(conn, &scratch);
                } else {
                    out.extend_from_slice(&scratch);
                }
                self.scratch = scratch;
                Ok(())
            }
            Kind::Reply(Op::Resolve, status) => {
                let Some((key, txid, from, _)) = self.asked.remove(&frame.request_id) else {
                    return Ok(()); // an answer that came after its connection was given up
                };
                match (status, frame.value.first().and_then(|&b| TxState::from_u8(b))) {
                    (Status::Ok, Some(state)) if frame.value.len() == 1 => {
                        self.shard.on_answer(&key, txid, from, state, frame.epoch, &mut self.fx);
                        Ok(())
                    }
                    // Fenced, or behind this core's map: asked again on a later tick.
                    (Status::Unavailable | Status::Behind, _) => Ok(()),
                    _ => Err(format!("bad resolve answer from {from}: {status:?}")),
                }
            }
            Kind::Reply(op, _) => Err(format!("unexpected {} reply sent to a brick", op.name())),
        }
    }

    fn on_accept(&mut self, _conn: ConnId, _peer: SocketAddr) {
        self.shard.stats.connections_open += 1;
    }

    fn on_close(&mut self, conn: ConnId, peer: SocketAddr, reason: &CloseReason) {
        // Our own connection to a peer: its questions are asked again on the next retry.
        self.asked.retain(|_, q| q.3 != conn);
        self.peers.retain(|_, c| *c != conn);
        self.shard.stats.connections_open = self.shard.stats.connections_open.saturating_sub(1);
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

/// Why one log segment cannot be replayed.
#[derive(Debug)]
pub enum SegmentError {
    Corrupt { offset: u64, error: record::RecordError },
    Gap { found: u64, expected: u64 },
}

/// Replays the records of one segment that starts at `first_lsn` into `shard`, those
/// from `start_lsn` on (older ones are in the checkpoint). Returns the lsn after the
/// last record, how many were replayed, and whether the segment ends in a torn tail.
/// Pure: the simulator replays its simulated disk through it too.
pub fn replay_segment(contents: &[u8], first_lsn: u64, start_lsn: u64, shard: &mut Shard) -> Result<(u64, u64, ScanEnd), SegmentError> {
    let mut expected = first_lsn;
    let mut replayed = 0;
    let mut out_of_order = None;
    let end = record::scan(contents, |r| {
        if r.lsn != expected && out_of_order.is_none() {
            out_of_order = Some((r.lsn, expected));
        }
        expected = r.lsn + 1;
        if r.lsn >= start_lsn {
            shard.replay(&r.mutation);
            replayed += 1;
        }
    })
    .map_err(|error| SegmentError::Corrupt { offset: error.offset(), error })?;
    if let Some((found, expected)) = out_of_order {
        return Err(SegmentError::Gap { found, expected });
    }
    Ok((expected, replayed, end))
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
            crate::log!(who, "{}: dropping a torn tail of {} bytes at offset {offset} ({error})", path.display(), contents.len() as u64 - offset);
        }
        if let Some(mut file) = file {
            if let ScanEnd::TornTail { offset, .. } = end {
                file.truncate_to(offset)?;
            }
            // What was replayed will be served: make it durable first. After a process
            // crash the log's tail may still be only in the page cache, and a power loss
            // later would take back values this brick had served (the simulator found
            // it: a read of a value that a later read found gone).
            file.append(&[], true)?;
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
    fn step(&mut self, shard: &Shard, next_lsn: &mut u64) -> Result<bool, LogError> {
        if self.checkpoint.is_none() {
            if self.active.len() < self.checkpoint_log_bytes {
                return Ok(false);
            }
            // A new segment from `next_lsn`: everything before it is in memory now and
            // will be in the checkpoint (or in the older segments until it is durable).
            self.active.append(&[], true)?;
            let start_lsn = *next_lsn;
            let (next, _) = LogFile::open(&log::segment_path(&self.dir, self.core, start_lsn))?;
            checkpoint::sync_dir(next.path())?;
            self.active = next;
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
            self.checkpoint = Some(checkpoint::Writer::start(&log::checkpoint_path(&self.dir, self.core), start_lsn)?);
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

/// Sends each question to the peer core that stores its key, connecting on first use.
/// A peer that cannot be reached is skipped: the question is asked again later, and a
/// dead peer leaves the map.
fn ask_peers(transport: &mut MixedTransport<DdsFraming>, handler: &mut Core, queries: Vec<Query>) {
    let map = Arc::clone(handler.shard.map());
    for q in queries {
        let Some(addr) = map.bricks.get(&q.brick) else { continue };
        if addr.cores.is_empty() {
            continue;
        }
        let core = map.core_of(key_hash(&q.key), addr.cores.len());
        let conn = match handler.peers.get(&(q.brick, core)).filter(|c| transport.peer(**c).is_some()) {
            Some(&c) => c,
            None => match transport.connect(addr.cores[core], PEER_CONNECT_TIMEOUT) {
                Ok(c) => {
                    handler.peers.insert((q.brick, core), c);
                    c
                }
                Err(e) => {
                    crate::log!(format_args!("core {}", handler.core), "cannot ask {} about {}: {e}", q.brick, q.txid);
                    continue;
                }
            },
        };
        let id = handler.next_ask_id;
        handler.next_ask_id += 1;
        if let Ok(out) = transport.outbox(conn) {
            encode(out, &Frame { kind: Kind::Request(Op::Resolve), request_id: id, epoch: map.epoch, key: &q.key, value: &q.txid.to_bytes() });
            handler.asked.insert(id, (q.key, q.txid, q.brick, conn));
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    core: usize,
    mut transport: MixedTransport<DdsFraming>,
    shard: Shard,
    mut storage: Storage,
    next_lsn: u64,
    durability: Durability,
    info: BrickInfo,
    config: LoopConfig,
    shared: &Shared,
) -> Result<(), CoreError> {
    let mut handler = Core {
        core,
        shard,
        info,
        durability,
        fx: Effects::new(next_lsn),
        held: Vec::new(),
        held_at: Vec::new(),
        scratch: Vec::new(),
        asked: HashMap::new(),
        next_ask_id: 1,
        peers: HashMap::new(),
    };
    // The map the brick started with may already make this core join partitions.
    handler.shard.install_map(shared.map(), &mut handler.fx);
    let mut last_work = Instant::now();
    let started = Instant::now();
    let mut last_tick_ms = 0;
    let mut checkpointing = false;
    while !shared.stop.load(Ordering::Relaxed) {
        // Fence first: the control thread unfences only after installing the map that
        // came with the authority's answer, so an unfenced core sees that map too.
        handler.shard.fenced = shared.is_fenced();
        if shared.epoch.load(Ordering::Acquire) != handler.shard.epoch() {
            let map = shared.map();
            if map.epoch > handler.shard.epoch() {
                handler.shard.install_map(map, &mut handler.fx);
            }
        }
        // Adaptive polling: spin while requests keep coming, then sleep in the kernel
        // so bricks and clients sharing a small machine do not starve each other.
        let busy = config.busy_poll || checkpointing || last_work.elapsed() < config.spin;
        let timeout = if busy { Duration::ZERO } else { config.park.min(Duration::from_millis(TICK_MS)) };
        if transport.poll(Some(timeout), &mut handler)? > 0 {
            last_work = Instant::now();
        }
        let now_ms = started.elapsed().as_millis() as u64;
        if now_ms >= last_tick_ms + TICK_MS {
            last_tick_ms = now_ms;
            handler.shard.tick(now_ms, &mut handler.fx);
            let queries = std::mem::take(&mut handler.fx.queries);
            if !queries.is_empty() {
                ask_peers(&mut transport, &mut handler, queries);
            }
        }
        if handler.fx.behind {
            handler.fx.behind = false;
            shared.refresh.store(true, Ordering::Relaxed);
        }
        if !handler.fx.batch.is_empty() {
            // Group commit: every record of the round in one write and, when one must be
            // durable before its reply, one fdatasync. An error here ends the brick;
            // nothing is retried.
            storage.commit(&handler.fx.batch, durability == Durability::Sync && handler.fx.must_sync)?;
            handler.fx.batch.clear();
        }
        handler.fx.must_sync = false;
        for (conn, bytes) in std::mem::take(&mut handler.fx.deferred) {
            handler.hold(conn, &bytes);
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
        checkpointing = storage.step(&handler.shard, &mut handler.fx.next_lsn)?;
    }
    if durability == Durability::Memory {
        // A clean stop leaves nothing unsynced.
        storage.commit(&[], true)?;
    }
    Ok(())
}
