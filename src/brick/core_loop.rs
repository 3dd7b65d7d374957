//! One core's thread: the shell around its `CoreRound`. It polls the network, hands the
//! round its frames, writes the round's batch to the log, releases the replies and
//! asks peers about in-doubt transactions on connections of its own.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, MixedTransport, Transport, TransportError};

use crate::log::LogError;
use crate::proto::{DdsFraming, Op};

use super::control::Shared;
use super::reads::UringReads;
use super::round::{CoreRound, TICK_MS};
use super::shard::Query;
use super::storage::Storage;
use super::Durability;

#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    pub spin: Duration,
    pub busy_poll: bool,
    /// Longest sleep in the kernel while idle; bounds how late a stop is seen.
    pub park: Duration,
}

/// How long a core waits to connect to a peer it must ask about a transaction.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// The transport's view of a core: its round, and the control plane it reads.
struct Shell<'a> {
    round: CoreRound,
    shared: &'a Shared,
    /// When this round's first frame came: what its requests' latency counts from.
    round_start: Option<Instant>,
    /// Replies of this round sent at once, by op, not yet counted (`count_sent`).
    sent: [u64; Op::ALL.len()],
}

impl Shell<'_> {
    /// The replies sent at once during the poll have left with its flush: their
    /// latency, one clock read for all of them.
    fn count_sent(&mut self) {
        let sent = std::mem::take(&mut self.sent);
        for (op, n) in Op::ALL.into_iter().zip(sent).filter(|(_, n)| *n > 0) {
            self.count_replies(op, n);
        }
    }

    /// `n` replies of `op` went to the transport now: their latency, from the round's
    /// start. A read parked on a prepared key is timed from the round that released
    /// it (0 if that round took no frame), not from its own: the histogram counts
    /// every reply but under-reports those reads.
    fn count_replies(&mut self, op: Op, n: u64) {
        let us = self.round_start.map_or(0, |start| start.elapsed().as_micros() as u64);
        self.round.stats_mut().latency[op.slot()].record(us, n);
    }
}

impl Handler for Shell<'_> {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // `FAILPOINTS=core-panic-on-key=return(KEY)` (failpoints builds): a request for
        // KEY panics this core thread, which must end the whole process (fail-stop).
        if let Some(key) = crate::logging::failpoint_arg("core-panic-on-key") {
            if crate::proto::decode_exact(frame).is_ok_and(|f| f.key == key.as_bytes()) {
                panic!("failpoint core-panic-on-key: a request for {key:?}");
            }
        }
        self.round_start.get_or_insert_with(Instant::now);
        let before = out.len();
        let result = self.round.on_frame(self.shared, conn, frame, out);
        // Sent at once (it waits for nothing): it leaves with the poll's flush.
        if let Some((op, _)) = out.get(before..).and_then(crate::proto::peek_reply) {
            self.sent[op.slot()] += 1;
        }
        result
    }

    fn on_accept(&mut self, _conn: ConnId, _peer: SocketAddr) {
        self.round.stats_mut().connections_open += 1;
    }

    fn on_close(&mut self, conn: ConnId, peer: SocketAddr, reason: &CloseReason) {
        self.round.on_close(conn);
        let stats = self.round.stats_mut();
        stats.connections_open = stats.connections_open.saturating_sub(1);
        if reason.is_bad_input() {
            stats.connections_closed_bad_input += 1;
        }
        if !matches!(reason, CloseReason::PeerClosed) {
            crate::log!(warn: format_args!("core {}", self.round.core), "closed connection from {peer}: {reason}");
        }
    }

    fn on_refused(&mut self, peer: SocketAddr, open: usize) {
        crate::log!(warn: format_args!("core {}", self.round.core), "refused connection from {peer}: {open} already open");
    }

    fn on_unauthenticated(&mut self, peer: SocketAddr, why: &str) {
        self.round.stats_mut().connections_closed_bad_input += 1;
        crate::log!(warn: format_args!("core {}", self.round.core), "refused RDMA connection from {peer}: not authenticated: {why}");
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
fn ask_peers(transport: &mut MixedTransport<DdsFraming>, round: &mut CoreRound, queries: Vec<Query>) {
    for q in queries {
        let Some((peer, addr)) = round.peer_of(&q) else { continue };
        let conn = match round.peer_conn(peer).filter(|c| transport.peer(*c).is_some()) {
            Some(c) => c,
            None => match transport.connect(addr, PEER_CONNECT_TIMEOUT) {
                Ok(c) => c,
                Err(e) => {
                    crate::log!(warn: format_args!("core {}", round.core), "cannot ask {} about {}: {e}", q.brick, q.txid);
                    continue;
                }
            },
        };
        if let Ok(out) = transport.outbox(conn) {
            round.ask(q, peer, conn, out);
        }
    }
}

/// Runs a core until the brick stops. An error (the transport, the log) ends it and,
/// through the caller, the whole brick: nothing is retried.
pub fn run(
    mut transport: MixedTransport<DdsFraming>,
    round: CoreRound,
    mut storage: Storage,
    config: LoopConfig,
    shared: &Shared,
) -> Result<(), CoreError> {
    let mut shell = Shell { round, shared, round_start: None, sent: [0; Op::ALL.len()] };
    let mut last_work = Instant::now();
    let started = Instant::now();
    let mut checkpointing = false;
    let core = shell.round.core;
    let dir = storage.dir().to_path_buf();
    // Values in the log: gets that miss the cache read through a ring of their own.
    let mut value_reads = match shell.round.shard().log_values() {
        None => None,
        Some(_) => Some(UringReads::new().map_err(|source| LogError::Io { op: "set up value reads", path: dir.clone(), source })?),
    };
    let mut refused = Vec::new();
    let mut checkpoints = storage.checkpoints();
    while !shared.stop.load(Ordering::Relaxed) {
        shell.round.set_log_at(storage.position());
        shell.round.begin(shared);
        // The cleaner's step: what it writes again joins this round's batch.
        let (shard, fx) = shell.round.shard_and_effects();
        let cleaning = storage.clean(shard, fx)?;
        // Adaptive polling: spin while requests keep coming, then sleep in the kernel
        // so bricks and clients sharing a small machine do not starve each other.
        let reading = value_reads.as_ref().is_some_and(|r| r.in_flight() > 0);
        let busy = config.busy_poll || checkpointing || cleaning || reading || last_work.elapsed() < config.spin;
        let timeout = if busy { Duration::ZERO } else { config.park.min(Duration::from_millis(TICK_MS)) };
        if transport.poll(Some(timeout), &mut shell)? > 0 {
            last_work = Instant::now();
            shell.count_sent();
        }
        if let Some(reads) = value_reads.as_mut() {
            // The reads this round's gets started go to the disk; those done reply.
            reads.submit(&dir, core, shell.round.take_reads(), &mut refused);
            let mut replied = false;
            for (read, e) in refused.drain(..) {
                // Answered even when its connection closed: the read is let go either way.
                let mut out = Vec::new();
                shell.round.on_read_refused(&read, &e, &mut out);
                if let Ok(outbox) = transport.outbox(read.conn) {
                    outbox.extend_from_slice(&out);
                    replied = true;
                }
            }
            reads.reap(&dir, core, |read, result, read_started| {
                // A connection that closed meanwhile just misses its reply.
                let mut out = Vec::new();
                shell.round.on_read(&read, result, &mut out);
                if let Ok(outbox) = transport.outbox(read.conn) {
                    outbox.extend_from_slice(&out);
                    replied = true;
                }
                shell.round.stats_mut().latency[Op::Get.slot()].record(read_started.elapsed().as_micros() as u64, 1);
            });
            if replied {
                last_work = Instant::now();
                transport.flush(&mut shell);
            }
        }
        let queries = shell.round.tick(started.elapsed().as_millis() as u64);
        if !queries.is_empty() {
            ask_peers(&mut transport, &mut shell.round, queries);
        }
        if shell.round.take_behind() {
            shared.refresh.store(true, Ordering::Relaxed);
        }
        if let Some(e) = shell.round.take_failure() {
            return Err(e.into());
        }
        let records = shell.round.batch_records();
        let at = shell.round.log_at();
        if let Some((batch, sync)) = shell.round.batch() {
            // Group commit. An error here ends the brick; nothing is retried.
            let (started, len) = (Instant::now(), batch.len() as u64);
            storage.commit_batch(batch, sync, at)?;
            let stats = shell.round.stats_mut();
            stats.log_writes += 1;
            stats.log_bytes += len;
            stats.batch_records.record(records, 1);
            if sync {
                stats.syncs.record(started.elapsed().as_micros() as u64, 1);
            }
        }
        let mut released = false;
        let mut by_op = [0u64; Op::ALL.len()];
        shell.round.committed(|conn, bytes| {
            if let Some((op, _)) = crate::proto::peek_reply(bytes) {
                by_op[op.slot()] += 1;
            }
            // A connection that closed meanwhile just misses its reply.
            if let Ok(out) = transport.outbox(conn) {
                out.extend_from_slice(bytes);
                released = true;
            }
        });
        for (op, n) in Op::ALL.into_iter().zip(by_op).filter(|(_, n)| *n > 0) {
            shell.count_replies(op, n);
        }
        shell.round_start = None;
        if released {
            transport.flush(&mut shell);
        }
        let (shard, next_lsn) = shell.round.shard_and_lsn();
        checkpointing = storage.step(shard, next_lsn)?;
        shell.round.stats_mut().log_disk_bytes = storage.log_bytes();
        if storage.checkpoints() != checkpoints {
            checkpoints = storage.checkpoints();
            // Segments the checkpoint deleted: their files close.
            if let Some(reads) = value_reads.as_mut() {
                reads.retain_files(|segment| storage.holds_segment(segment));
            }
        }
    }
    if shell.round.durability() == Durability::Memory {
        // A clean stop leaves nothing unsynced.
        storage.commit(&[], true)?;
    }
    Ok(())
}
