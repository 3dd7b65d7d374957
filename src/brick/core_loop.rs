//! One core's run-to-completion loop: poll the network, execute, queue replies; the
//! transport writes each connection's replies once per round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpTransport, Transport, TransportError};

use crate::log::record::{self, Mutation, ScanEnd};
use crate::log::{LogError, LogFile};
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

/// Opens this core's log and replays it into `shard`: a torn tail is cut off with a log
/// line, a corrupt record stops start-up. Returns the log and the next lsn.
pub fn recover(core: usize, path: &std::path::Path, shard: &mut Shard) -> Result<(LogFile, u64), LogError> {
    let (mut log, contents) = LogFile::open(path)?;
    let mut last_lsn = 0;
    let mut records = 0u64;
    let end = record::scan(&contents, |r| {
        shard.replay(&r.mutation);
        last_lsn = r.lsn;
        records += 1;
    })
    .map_err(|error| LogError::Corrupt { path: path.to_path_buf(), offset: error.offset(), error })?;
    if let ScanEnd::TornTail { offset, error } = end {
        crate::log!(
            format_args!("core {core}"),
            "{}: dropping a torn tail of {} bytes at offset {offset} ({error})",
            path.display(),
            contents.len() as u64 - offset
        );
        log.truncate_to(offset)?;
    }
    if records > 0 {
        crate::log!(format_args!("core {core}"), "{}: replayed {records} records, {} keys", path.display(), shard.stats.keys);
    }
    Ok((log, last_lsn + 1))
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
    mut log: LogFile,
    next_lsn: u64,
    durability: Durability,
    info: BrickInfo,
    config: LoopConfig,
    stop: &AtomicBool,
) -> Result<(), CoreError> {
    let mut handler =
        Core { core, shard, info, durability, batch: Vec::new(), next_lsn, held: Vec::new(), held_at: Vec::new() };
    let mut last_work = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Adaptive polling: spin while requests keep coming, then sleep in the kernel
        // so bricks and clients sharing a small machine do not starve each other.
        let timeout = if config.busy_poll || last_work.elapsed() < config.spin { Duration::ZERO } else { config.park };
        if transport.poll(Some(timeout), &mut handler)? > 0 {
            last_work = Instant::now();
        }
        if !handler.batch.is_empty() {
            // Group commit: every mutation of the round in one write and one fdatasync.
            // An error here ends the brick; nothing is retried.
            log.append(&handler.batch, durability == Durability::Sync)?;
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
    }
    if durability == Durability::Memory {
        // A clean stop leaves nothing unsynced.
        log.append(&[], true)?;
    }
    Ok(())
}
