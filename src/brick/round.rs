//! A core's round, sans-I/O: the state between the transport and the shard that both
//! the core thread (`core_loop`) and the simulator drive. A round is:
//!
//! 1. `begin`: the fence and the newest map, read at the top of the round;
//! 2. `on_frame` for every frame the transport cut: requests are executed (each after
//!    its own fresh read of the lease), answers to in-doubt questions are taken in;
//! 3. `tick` when due: questions for peers about in-doubt prepares;
//! 4. `batch`: the round's log records, one write (and one sync when a record must be
//!    durable before its reply);
//! 5. `committed` once that write is done: the replies it held back leave.
//!
//! The shell owns the clock, the transport and the disk; this owns no I/O at all.

use std::net::SocketAddr;
use std::sync::Arc;

use dds_transport::ConnId;

use crate::hash::HashMap;
use crate::map::{key_hash, BrickId, ClusterMap};
use crate::mutation::{self, Mutation};
use crate::proto::{decode_exact, encode, BrickInfo, Frame, Kind, Op, Status, TxId, TxState};

use super::shard::{Effects, Query, Shard};
use super::values::LogAt;
use super::Durability;

/// How often in-doubt prepares are looked at (a core's loop wakes at least this often).
pub const TICK_MS: u64 = 100;

/// What a round reads of the brick's control plane. Each call is a fresh look: `fenced`
/// reads the clock, so a lease that ran out while the process was paused is seen as
/// soon as it resumes, by the first request it executes.
pub trait Control {
    /// Whether the brick must serve nothing now: fenced by its control plane, or its
    /// lease ran out (by a clock read made in this call).
    fn fenced(&self) -> bool;
    /// The brick's map, if newer than `epoch`.
    fn newer_map(&self, epoch: u64) -> Option<Arc<ClusterMap>>;
}

/// Whether a lease last renewed at `renewed_ms` has run out at `now_ms`.
pub fn lease_expired(renewed_ms: u64, now_ms: u64, lease_ms: u64) -> bool {
    now_ms > renewed_ms.saturating_add(lease_ms)
}

/// A question to a peer: the key, the transaction, whom, and on which connection.
type Asked = (Box<[u8]>, TxId, BrickId, ConnId);

pub struct CoreRound {
    pub core: usize,
    shard: Shard,
    info: BrickInfo,
    durability: Durability,
    fx: Effects,
    /// Replies that must wait for the round's log write (sync durability): their bytes,
    /// and for each, its connection and where it starts in `held`.
    held: Vec<u8>,
    held_at: Vec<(ConnId, usize)>,
    /// The last request's reply, before it went out or was held.
    scratch: Vec<u8>,
    /// Questions to peers in flight, by request id, with the connection they went on.
    asked: HashMap<u64, Asked>,
    next_ask_id: u64,
    /// Connections this core opened to peer cores: (brick, core).
    peers: HashMap<(BrickId, usize), ConnId>,
    last_tick_ms: u64,
    /// The fence as read at the top of the round. Only the planted bug `stale-lease`
    /// serves by it; every request reads the lease again.
    fenced_at_begin: bool,
    /// The length of the batch `batch` handed out, until `committed`.
    batch_out: usize,
}

impl CoreRound {
    /// A core's rounds over `shard`, whose log goes on at lsn `next_lsn` and at `at`
    /// (`Storage::position`).
    pub fn new(shard: Shard, info: BrickInfo, durability: Durability, next_lsn: u64, at: LogAt) -> CoreRound {
        let mut round = CoreRound {
            core: info.core as usize,
            shard,
            info,
            durability,
            fx: Effects { log_at: at, ..Effects::new(next_lsn) },
            held: Vec::new(),
            held_at: Vec::new(),
            scratch: Vec::new(),
            asked: HashMap::default(),
            next_ask_id: 1,
            peers: HashMap::default(),
            last_tick_ms: 0,
            fenced_at_begin: false,
            batch_out: 0,
        };
        // The map the brick started with may already make this core join partitions.
        let map = Arc::clone(round.shard.map());
        round.shard.install_map(map, &mut round.fx);
        round
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The shard and the round's effects, for the cleaner between rounds
    /// (`Storage::clean`): what it writes goes into this round's batch.
    pub fn shard_and_effects(&mut self) -> (&mut Shard, &mut Effects) {
        (&mut self.shard, &mut self.fx)
    }

    /// The next lsn this core will log (a checkpoint logs prepares at a new segment's
    /// head through it).
    pub fn shard_and_lsn(&mut self) -> (&Shard, &mut u64) {
        (&self.shard, &mut self.fx.next_lsn)
    }

    /// Between rounds: where the next round's batch will be written
    /// (`Storage::position`, which a checkpoint moves to a new segment).
    pub fn set_log_at(&mut self, at: LogAt) {
        // A batch may already hold records (the first map's `Forget`s, logged when the
        // round was made) as long as the place it was encoded for stays.
        assert!(self.fx.batch.is_empty() || self.fx.log_at == at, "core {}: the log's place changed under a batch", self.core);
        self.fx.log_at = at;
    }

    /// Where the round's batch goes, as its records were encoded for.
    pub fn log_at(&self) -> LogAt {
        self.fx.log_at
    }

    /// A value could not be read back from the log this round: the core must stop
    /// (fail-stop; the requests it touched were answered `Unavailable`).
    pub fn take_failure(&mut self) -> Option<crate::log::LogError> {
        self.shard.take_failure()
    }

    /// The top of a round: the value cache back within its bound, the fence (the
    /// control plane unfences only after it installed the map that came with the
    /// authority's answer, so an unfenced core sees that map too), then the map.
    pub fn begin(&mut self, control: &impl Control) {
        self.shard.trim_cache();
        self.fenced_at_begin = control.fenced();
        self.shard.fenced = self.fenced_at_begin;
        self.install_newer(control);
    }

    fn install_newer(&mut self, control: &impl Control) {
        if let Some(map) = control.newer_map(self.shard.epoch()) {
            if map.epoch() > self.shard.epoch() {
                self.shard.install_map(map, &mut self.fx);
            }
        }
    }

    /// Whether replies must wait for this round's log write: under sync durability,
    /// once the round logged something that must be durable before anyone sees it.
    fn holding(&self) -> bool {
        self.durability == Durability::Sync && self.fx.must_sync && !mutation::active(Mutation::EarlyReplies)
    }

    fn hold(&mut self, conn: ConnId, bytes: &[u8]) {
        self.held_at.push((conn, self.held.len()));
        self.held.extend_from_slice(bytes);
    }

    /// One frame from `conn`. A request's reply goes to `out` (that connection's
    /// outbox) or is held for the round's log write. An error closes that connection
    /// only: a frame no request could be, or a malformed answer from a peer.
    pub fn on_frame(&mut self, control: &impl Control, conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        match frame.kind {
            Kind::Request(_) => {
                // The lease by a clock read taken after this request arrived: the
                // process may have been paused since the top of the round, for longer
                // than the authority waits before it gives this brick's partitions to
                // others. The planted bug `stale-lease` trusts the top of the round.
                let fenced = if mutation::active(Mutation::StaleLease) { self.fenced_at_begin } else { control.fenced() };
                self.shard.fenced = fenced;
                if !fenced {
                    self.install_newer(control);
                }
                if conn.is_rdma() {
                    self.shard.stats.rdma_requests += 1;
                }
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                self.shard.execute(conn, &frame, &self.info, &mut scratch, &mut self.fx);
                let stats = &mut self.shard.stats;
                if let Kind::Request(op) = frame.kind {
                    stats.ops[op.slot()] += 1;
                }
                if let Some((_, status)) = crate::proto::peek_reply(&scratch) {
                    stats.statuses[status as usize] += 1;
                }
                if scratch.is_empty() {
                    // Parked (a read of a prepared key): its reply comes with the decision.
                } else if self.holding() {
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

    /// The reads of values from the log that this round's gets started: the shell
    /// hands them to the disk and each completion to `on_read`.
    pub fn take_reads(&mut self) -> Vec<super::ValueRead> {
        std::mem::take(&mut self.fx.reads)
    }

    /// A read refused before it started: `Unavailable`, and the core goes on.
    pub fn on_read_refused(&mut self, read: &super::ValueRead, why: &crate::log::LogError, out: &mut Vec<u8>) {
        self.shard.read_refused(read, why, out);
    }

    /// A get's value came back from the log (or its read failed): its reply goes to
    /// `out`, the outbox of its connection. It waits for no log write: the value's
    /// record was written in an earlier round.
    pub fn on_read(&mut self, read: &super::ValueRead, result: Result<Vec<u8>, crate::log::LogError>, out: &mut Vec<u8>) {
        self.shard.read_done(read, result, out);
    }

    /// The reply the last request produced (whether it went out or was held).
    pub fn last_reply(&self) -> &[u8] {
        &self.scratch
    }

    /// Whether `request_id` is a question this core asked on `conn`.
    pub fn asked_on(&self, request_id: u64, conn: ConnId) -> bool {
        self.asked.get(&request_id).is_some_and(|q| q.3 == conn)
    }

    /// A connection closed: questions asked on it are asked again on a later tick.
    pub fn on_close(&mut self, conn: ConnId) {
        self.asked.retain(|_, q| q.3 != conn);
        self.peers.retain(|_, c| *c != conn);
    }

    /// In-doubt prepares are looked at every `TICK_MS`; returns the questions to ask.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Query> {
        if now_ms >= self.last_tick_ms + TICK_MS {
            self.last_tick_ms = now_ms;
            self.shard.tick(now_ms, &mut self.fx);
        }
        std::mem::take(&mut self.fx.queries)
    }

    /// A request carried a newer epoch than this core knows: the control plane should
    /// fetch the map now. Reported once.
    pub fn take_behind(&mut self) -> bool {
        std::mem::take(&mut self.fx.behind)
    }

    /// Where `q` must be asked: the peer core that stores its key, and its address.
    pub fn peer_of(&self, q: &Query) -> Option<((BrickId, usize), SocketAddr)> {
        let map = self.shard.map();
        let addr = map.bricks().get(&q.brick)?;
        if addr.cores.is_empty() {
            return None;
        }
        let core = map.core_of(key_hash(&q.key), addr.cores.len());
        Some(((q.brick, core), addr.cores[core]))
    }

    /// The connection this core holds to a peer core, if any.
    pub fn peer_conn(&self, peer: (BrickId, usize)) -> Option<ConnId> {
        self.peers.get(&peer).copied()
    }

    /// Asks `q` on `conn` (to `peer`): the question's frame goes to `out`.
    pub fn ask(&mut self, q: Query, peer: (BrickId, usize), conn: ConnId, out: &mut Vec<u8>) {
        self.peers.insert(peer, conn);
        let id = self.next_ask_id;
        self.next_ask_id += 1;
        let epoch = self.shard.epoch();
        encode(out, &Frame { kind: Kind::Request(Op::Resolve), request_id: id, epoch, key: &q.key, value: &q.txid.to_bytes() });
        self.asked.insert(id, (q.key, q.txid, q.brick, conn));
    }

    /// The round's group commit, if it logged anything: every record in one write and,
    /// when one must be durable before its reply (sync durability), one fdatasync.
    /// Nothing may reach the round between this and `committed`.
    pub fn batch(&mut self) -> Option<(&[u8], bool)> {
        self.batch_out = self.fx.batch.len();
        (!self.fx.batch.is_empty()).then(|| (&self.fx.batch[..], self.durability == Durability::Sync && self.fx.must_sync))
    }

    /// The round's log write is done (or there was none): the replies it held back, and
    /// those of reads that waited for a decision, leave through `release`.
    pub fn committed(&mut self, mut release: impl FnMut(ConnId, &[u8])) {
        // Records logged after `batch` would be dropped here with their lsns taken: a
        // gap that makes the log unreadable.
        assert_eq!(self.fx.batch.len(), self.batch_out, "core {}: records logged while the round's write was in flight", self.core);
        self.batch_out = 0;
        self.fx.batch.clear();
        self.fx.records = 0;
        self.fx.must_sync = false;
        for (conn, bytes) in std::mem::take(&mut self.fx.deferred) {
            if let Some((_, status)) = crate::proto::peek_reply(&bytes) {
                self.shard.stats.statuses[status as usize] += 1;
            }
            self.hold(conn, &bytes);
        }
        for (i, &(conn, start)) in self.held_at.iter().enumerate() {
            let end = self.held_at.get(i + 1).map_or(self.held.len(), |&(_, next)| next);
            release(conn, &self.held[start..end]);
        }
        self.held.clear();
        self.held_at.clear();
    }

    /// Log records in the batch `batch` handed out.
    pub fn batch_records(&self) -> u64 {
        self.fx.records
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    pub fn stats_mut(&mut self) -> &mut crate::proto::CoreStats {
        &mut self.shard.stats
    }
}
