//! The partitions one core owns, and the execution of one request against them: the
//! storage side of the protocol core, with no sockets, files or clocks inside. It takes
//! frames, map changes and ticks, and returns reply bytes, log records, deferred replies
//! and questions for peers (`Effects`); the core loop does the I/O.
//!
//! Two-phase commit, participant side: `Prepare` locks the key and logs the write,
//! `Commit` applies it, `Abort` drops it. A read of a prepared key waits for the
//! decision. A prepare held past `RESOLVE_AFTER_MS` is in doubt: the shard asks the
//! transaction's other participants and decides by the rule in ARCHITECTURE.md (any
//! commit: commit; any abort or never-prepared: abort; every live participant prepared:
//! commit).
//! Only the owning core's thread ever touches a shard: no locks.

use std::borrow::Cow;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use dds_transport::ConnId;
use crate::hash::{HashMap, HashSet};

use crate::log::record::{self, Mutation};
use crate::map::{core_of, key_hash, partition_of, BrickId, ClusterMap, PartitionId};
use crate::proto::catchup::{bucket_of, encode_digest_reply, entry_digest, BUCKETS_HEADER_LEN};
use crate::proto::tx::{CHUNK_HEADER_LEN, ENTRY_HEADER_LEN};
use super::scan::{CopyWindow, FillError, WINDOW_KEY_BYTES_MAX};
use super::table::{Put, Table};
use super::values::{value_hash, Loc, LogAt, LogValues, LOC_BYTES};
use crate::proto::{encode, Buckets, BrickInfo, Chunk, DiffRequest, DigestRequest, VALUE_LEN_MAX, CoreStats, Frame, Kind, Op, PrepareBody, SnapshotRequest, Status, TxId, TxState, WriteKind};

/// A request refused: the status and its message (or map) for the reply.
type Refusal = (Status, Vec<u8>);

/// A prepare older than this is in doubt and its participants are asked.
pub const RESOLVE_AFTER_MS: u64 = 1000;
/// How often an in-doubt prepare asks again while no rule decides it.
const RESOLVE_RETRY_MS: u64 = 250;
/// Reads parked on one prepared key before more are refused as busy.
const WAITERS_MAX: usize = 1024;
/// Decided transactions remembered for peers that ask (and to refuse late prepares).
const OUTCOMES_MAX: usize = 1 << 16;
/// Transaction numbers of one coordinator whose outcomes are kept (a byte each).
const WINDOW_SEQS: usize = 1 << 18;
/// Coordinators whose windows are kept.
const WINDOW_CLIENTS_MAX: usize = 256;
/// Entry bytes in one snapshot chunk.
pub const CHUNK_BYTES_MAX: usize = 256 << 10;
/// Partitions a core copies out at once with a window each (`scan`).
const COPY_WINDOWS_MAX: usize = 4;

/// A write locked by phase one, waiting for its decision.
struct Prepared {
    txid: TxId,
    kind: WriteKind,
    value: Box<[u8]>,
    /// Brick ids as on the wire (little-endian u32 each).
    participants: Box<[u8]>,
    /// Map epoch of the prepare.
    epoch: u64,
    since_ms: u64,
    /// Reads that wait for the decision: (connection, request id).
    waiters: Vec<(ConnId, u64)>,
    /// Answers from peers while in doubt, all given at map epoch `answers_epoch` or
    /// later: a map change drops them (an answer from before a participant left can be
    /// stale: that peer may since have aborted on the departed one's word).
    answers: Vec<(u32, TxState)>,
    answers_epoch: u64,
    asked_ms: Option<u64>,
    /// Where the prepare record put the value in this core's log (what a commit points
    /// the key to when values are kept in the log).
    at: LogAt,
}

impl Prepared {
    fn new(body: &PrepareBody<'_>, epoch: u64, since_ms: u64, at: LogAt) -> Prepared {
        Prepared {
            at,
            txid: body.txid,
            kind: body.kind,
            value: body.value.into(),
            participants: body.participants.into(),
            epoch,
            since_ms,
            waiters: Vec::new(),
            answers: Vec::new(),
            answers_epoch: 0,
            asked_ms: None,
        }
    }

    /// Drops the answers gathered at another map epoch (they may be stale); returns
    /// whether it did.
    fn answers_at(&mut self, epoch: u64) -> bool {
        if self.answers_epoch == epoch {
            return false;
        }
        self.answers.clear();
        self.answers_epoch = epoch;
        true
    }

    fn body(&self) -> PrepareBody<'_> {
        PrepareBody { txid: self.txid, kind: self.kind, participants: &self.participants, value: &self.value }
    }
}

/// A get whose value is read from the log: its connection, request and the map epoch
/// it was executed at, and where the value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueRead {
    pub conn: ConnId,
    pub request_id: u64,
    pub epoch: u64,
    pub loc: Loc,
}

/// Reads of values one round may start (a bound on what waits for the disk).
pub const READS_PER_ROUND_MAX: usize = 1024;

/// What one step of the cleaner did (`Shard::relocate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relocated {
    /// Bytes of whole records looked at.
    pub consumed: usize,
    /// Values written again at the log's head, and their bytes.
    pub moved: u64,
    pub moved_bytes: u64,
}

/// What executing a request or a tick produced besides the immediate reply.
#[derive(Default)]
pub struct Effects {
    /// Log records of this round, in order, and how many.
    pub batch: Vec<u8>,
    pub records: u64,
    pub next_lsn: u64,
    /// A record in `batch` must be durable before any reply leaves (under sync
    /// durability): writes, prepares, decisions and tombstones all are.
    pub must_sync: bool,
    /// Replies to requests that waited (parked reads): (connection, frame bytes).
    pub deferred: Vec<(ConnId, Vec<u8>)>,
    /// Questions for peers about in-doubt transactions.
    pub queries: Vec<Query>,
    /// A request carried a newer epoch than this core knows.
    pub behind: bool,
    /// Values to read from the log for gets (values in the log, not cached): each
    /// reply comes with its read (`Shard::read_done`).
    pub reads: Vec<ValueRead>,
    /// Where `batch` will be written (`Storage::position`): each value's place in the
    /// log is known as its record is encoded.
    pub log_at: LogAt,
}

impl Effects {
    pub fn new(next_lsn: u64) -> Effects {
        Effects { next_lsn, ..Effects::default() }
    }

    /// Encodes `mutation` into the batch; returns where its value (a put's, a
    /// prepare's) will be in the log.
    fn log(&mut self, mutation: &Mutation<'_>, durable_first: bool) -> LogAt {
        record::encode(&mut self.batch, self.next_lsn, mutation);
        // A record ends with its value.
        let value_len = mutation.value().map_or(0, <[u8]>::len);
        let at = LogAt { segment: self.log_at.segment, offset: self.log_at.offset + (self.batch.len() - value_len) as u64 };
        self.next_lsn += 1;
        self.records += 1;
        // The planted bug `skip-sync` (simulator builds only): replies go out before
        // the records they depend on are durable.
        self.must_sync |= durable_first && !crate::mutation::active(crate::mutation::Mutation::SkipSync);
        at
    }
}

/// Ask `brick` what it knows of `txid` (on `key`'s core).
#[derive(Clone, Debug)]
pub struct Query {
    pub brick: BrickId,
    pub key: Box<[u8]>,
    pub txid: TxId,
}

/// Bounded memory of decided transactions. The last `OUTCOMES_MAX`, with the key each
/// was for (a checkpoint writes them as decision records); and, per coordinator, the
/// outcome of each of its last `WINDOW_SEQS` transaction numbers, a byte each. A count
/// alone lasts 0.4 s at 150,000 decisions a second, less than the `RESOLVE_AFTER_MS` a
/// peer in doubt waits before it asks, and a commit forgotten would be answered "never
/// seen", that is "aborted" (the simulator shows it at once with a small count). A
/// coordinator's window slides only as it starts newer transactions: one that died
/// with a transaction in doubt starts none, and a live one decides its own.
#[derive(Default)]
struct Outcomes {
    state: HashMap<TxId, bool>,
    order: VecDeque<(TxId, Box<[u8]>)>,
    windows: HashMap<u64, Window>,
    /// Decisions recorded, as a clock for `Window::last`.
    recorded: u64,
}

/// One coordinator's outcomes: `states[i]` for transaction number `base + i`.
#[derive(Default)]
struct Window {
    base: u64,
    states: VecDeque<u8>,
    /// When its coordinator last decided (`Outcomes::recorded`).
    last: u64,
}

const UNKNOWN: u8 = 0;
const COMMITTED: u8 = 1;
const ABORTED: u8 = 2;

impl Outcomes {
    fn record(&mut self, txid: TxId, committed: bool, key: &[u8]) {
        if self.state.insert(txid, committed).is_none() {
            self.order.push_back((txid, key.into()));
            if self.order.len() > OUTCOMES_MAX {
                let (old, _) = self.order.pop_front().expect("non-empty");
                self.state.remove(&old);
            }
        }
        self.recorded += 1;
        if self.windows.len() >= WINDOW_CLIENTS_MAX && !self.windows.contains_key(&txid.client) {
            // Bounded: the coordinator that decided least recently is forgotten.
            if let Some(oldest) = self.windows.iter().min_by_key(|(_, w)| w.last).map(|(c, _)| *c) {
                self.windows.remove(&oldest);
            }
        }
        let window = self.windows.entry(txid.client).or_insert_with(|| Window { base: txid.seq, ..Window::default() });
        window.last = self.recorded;
        if txid.seq < window.base && window.states.len() + (window.base - txid.seq) as usize <= WINDOW_SEQS {
            // Decided out of order (a coordinator with several in flight): room below.
            for _ in txid.seq..window.base {
                window.states.push_front(UNKNOWN);
            }
            window.base = txid.seq;
        }
        if txid.seq >= window.base {
            let at = (txid.seq - window.base) as usize;
            if at >= window.states.len() {
                window.states.resize(at + 1, UNKNOWN);
            }
            window.states[at] = if committed { COMMITTED } else { ABORTED };
            while window.states.len() > WINDOW_SEQS {
                window.states.pop_front();
                window.base += 1;
            }
        }
    }

    /// What is remembered of `txid`: `Some(true)` committed, `Some(false)` aborted.
    fn get(&self, txid: TxId) -> Option<bool> {
        if let Some(c) = self.state.get(&txid) {
            return Some(*c);
        }
        let window = self.windows.get(&txid.client)?;
        match window.states.get(txid.seq.checked_sub(window.base)? as usize) {
            Some(&COMMITTED) => Some(true),
            Some(&ABORTED) => Some(false),
            _ => None,
        }
    }
}

pub struct Shard {
    core: usize,
    cores: usize,
    partition_bits: u8,
    /// Indexed by base partition; `Some` only for partitions this core owns.
    tables: Vec<Option<Table>>,
    pub stats: CoreStats,
    me: BrickId,
    map: Arc<ClusterMap>,
    /// The map as JSON, sent back with every `StaleEpoch`.
    map_json: Arc<[u8]>,
    prepared: HashMap<Box<[u8]>, Prepared>,
    outcomes: Outcomes,
    /// The windows of copies out (of a partition each, by raw id), by token (at most
    /// `COPY_WINDOWS_MAX`: two copies of one partition to two joining replicas keep a
    /// window each), and the passes made: this incarnation's tokens are
    /// `token_base + 1..=token_base + passes`.
    copy_windows: HashMap<u64, (u32, CopyWindow)>,
    passes: u64,
    token_base: u64,
    /// Partitions this brick is joining: the epoch of the join and the keys written
    /// since, which a copied entry must not overwrite.
    joining: HashMap<PartitionId, Joined>,
    now_ms: u64,
    /// No word from the map authority within the lease: serve nothing, the brick may
    /// have been removed.
    pub fenced: bool,
    /// The epoch of the map this core started with: copies planned before it are
    /// refused (this incarnation no longer knows which keys it wrote since the join).
    boot_epoch: u64,
    /// Whether a map has been installed since the start (the first sweeps every
    /// partition this brick is not in, whatever the log brought back).
    swept: bool,
    /// Partitions whose group this brick is not in but whose data it keeps: the group
    /// was short at the last map (`keeps`).
    dormant: Vec<PartitionId>,
    /// During a replay, writes prepared under an earlier id of this directory whose
    /// decision has not come yet; dropped at the first map.
    foreign: HashMap<Box<[u8]>, Prepared>,
    /// `Some` when values are kept in the log (`values`): the tables hold locations.
    log_values: Option<LogValues>,
}

/// A partition this core is joining.
#[derive(Default)]
struct Joined {
    /// The epoch of the map that made this brick join (or of its start, for a join
    /// it restarted into).
    epoch: u64,
    /// Keys written since the join, by writes prepared at `epoch` or later: newer than
    /// any copied entry.
    written: HashSet<Box<[u8]>>,
}

fn reply_frame(out: &mut Vec<u8>, op: Op, request_id: u64, epoch: u64, status: Status, value: &[u8]) {
    encode(out, &Frame { kind: Kind::Reply(op, status), request_id, epoch, key: &[], value });
}

impl Shard {
    pub fn new(core: usize, cores: usize, partition_bits: u8, me: BrickId, map: Arc<ClusterMap>) -> Shard {
        assert!(core < cores);
        assert_eq!(map.base_bits(), partition_bits, "map and brick disagree on the base partition bits");
        let partitions = 1u32 << partition_bits;
        let tables = (0..partitions).map(|p| (core_of(p, cores) == core).then(Table::default)).collect();
        let map_json: Arc<[u8]> = map.to_json().into_bytes().into();
        let boot_epoch = map.epoch();
        Shard {
            core,
            cores,
            partition_bits,
            tables,
            stats: CoreStats::default(),
            me,
            map,
            map_json,
            prepared: HashMap::default(),
            outcomes: Outcomes::default(),
            copy_windows: HashMap::default(),
            passes: 0,
            token_base: 0,
            joining: HashMap::default(),
            now_ms: 0,
            fenced: false,
            boot_epoch,
            swept: false,
            dormant: Vec::new(),
            foreign: HashMap::default(),
            log_values: None,
        }
    }

    /// Values are kept in the log from now on: called before anything is stored.
    pub fn keep_values_in_log(&mut self, values: LogValues) {
        assert_eq!(self.stats.keys, 0, "values move to the log before anything is stored");
        self.log_values = Some(values);
    }

    pub fn log_values(&self) -> Option<&LogValues> {
        self.log_values.as_ref()
    }

    /// The first read of a value from the log that failed, if any: the core must stop.
    pub fn take_failure(&mut self) -> Option<crate::log::LogError> {
        self.log_values.as_mut()?.take_failure()
    }

    /// Between rounds: the value cache back within its bound.
    pub fn trim_cache(&mut self) {
        if let Some(lv) = self.log_values.as_mut() {
            lv.trim();
        }
    }

    /// What a table stores for a value written at `at`: the value, or its location.
    fn location(&self, stored: &[u8]) -> Option<Loc> {
        self.log_values.as_ref().map(|_| Loc::decode(stored).expect("a table entry holds a location"))
    }

    /// The value a table entry stores: itself, or read back through the cache (`None`:
    /// the read failed and the core is stopping, `take_failure`).
    fn value_of<'a>(&'a self, stored: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self.location(stored) {
            None => Some(Cow::Borrowed(stored)),
            Some(loc) => self.log_values.as_ref().expect("log values").read(&loc),
        }
    }

    /// The length of the value a table entry stores.
    fn value_len(&self, stored: &[u8]) -> usize {
        self.location(stored).map_or(stored.len(), |loc| loc.len as usize)
    }

    /// The hash of the value a table entry stores (catch-up digests).
    fn stored_hash(&self, stored: &[u8]) -> u64 {
        self.location(stored).map_or_else(|| value_hash(stored), |loc| loc.hash)
    }

    /// The log segments a value anyone may still read is in: those table entries point
    /// into and those of undecided prepares. The others may go once a checkpoint covers
    /// them.
    pub fn segments_in_use(&self) -> BTreeSet<u64> {
        let Some(lv) = self.log_values.as_ref() else { return BTreeSet::new() };
        let prepared = self.prepared.values().chain(self.foreign.values()).filter(|p| p.kind == WriteKind::Put).map(|p| p.at.segment);
        lv.live.keys().chain(lv.reading.keys()).copied().chain(prepared).collect()
    }

    /// The bytes a checkpoint of this core writes: keys and values, or keys and
    /// locations.
    pub fn checkpoint_bytes(&self) -> u64 {
        match self.log_values.as_ref() {
            None => self.stats.bytes,
            Some(lv) => self.stats.bytes - lv.live_bytes() + self.stats.keys * LOC_BYTES as u64,
        }
    }

    /// The cleaner's work on `bytes`, read from log segment `segment` at offset `base`:
    /// every put or prepare record in it whose value a key still points to is written
    /// again at the log's head (a put of the same value, so a replay gives the same
    /// state), and the key points there. Stops at the first bytes that are not a whole
    /// record (the caller tells a record cut by the end of its read from a segment's
    /// end or corruption).
    pub fn relocate(&mut self, segment: u64, base: u64, bytes: &[u8], fx: &mut Effects) -> Relocated {
        let mut done = Relocated::default();
        while done.consumed < bytes.len() {
            let Ok((r, len)) = record::decode(&bytes[done.consumed..], base + done.consumed as u64) else {
                return done;
            };
            if let Some(value) = r.mutation.value().filter(|_| matches!(r.mutation, Mutation::Put { .. }) || matches!(r.mutation, Mutation::Prepare { body, .. } if body.kind == WriteKind::Put)) {
                let offset = base + (value.as_ptr() as usize - bytes.as_ptr() as usize) as u64;
                let key = r.mutation.key();
                let live = self.tables.get(self.base_of(key) as usize).and_then(|t| t.as_ref()).and_then(|t| t.get(key)).and_then(Loc::decode).is_some_and(|loc| loc.segment == segment && loc.offset == offset);
                if live || crate::mutation::active(crate::mutation::Mutation::CleanMovesDead) {
                    let at = fx.log(&Mutation::Put { key, value }, false);
                    self.mutate(key, Some((value, at)));
                    self.stats.values_moved += 1;
                    done.moved += 1;
                    done.moved_bytes += value.len() as u64;
                }
            }
            done.consumed += len;
        }
        done
    }

    /// A get's read could not start (too many wait for the disk, its segment could not be
    /// opened): it answers `Unavailable` and the core goes on.
    pub fn read_refused(&mut self, read: &ValueRead, why: &crate::log::LogError, out: &mut Vec<u8>) {
        self.log_values.as_mut().expect("values in the log").read_abandoned(&read.loc);
        reply_frame(out, Op::Get, read.request_id, read.epoch, Status::Unavailable, format!("the value's read could not start: {why}").as_bytes());
        self.stats.statuses[Status::Unavailable as usize] += 1;
    }

    /// A get's value came back from the log (or did not): its reply, to `out`. A value
    /// whose hash does not match, or a failed read, answers `Unavailable` and stops the
    /// core (`take_failure`).
    pub fn read_done(&mut self, read: &ValueRead, result: Result<Vec<u8>, crate::log::LogError>, out: &mut Vec<u8>) {
        let lv = self.log_values.as_mut().expect("values in the log");
        let status = match lv.read_finished(&read.loc, result) {
            Some(value) => {
                reply_frame(out, Op::Get, read.request_id, read.epoch, Status::Ok, &value);
                Status::Ok
            }
            None => {
                reply_frame(out, Op::Get, read.request_id, read.epoch, Status::Unavailable, b"the value could not be read from the log: the brick is stopping");
                Status::Unavailable
            }
        };
        self.stats.statuses[status as usize] += 1;
    }

    /// Loads one checkpoint entry: a key and what its table stored.
    pub fn load_stored(&mut self, key: &[u8], stored: &[u8]) -> Result<(), &'static str> {
        let partition = self.base_of(key);
        let table = self.tables[partition as usize].as_mut().ok_or("an entry of a partition this core does not own")?;
        let value_len = match self.log_values.as_mut() {
            None => stored.len(),
            Some(lv) => {
                let loc = Loc::decode(stored).ok_or("an entry that is not a location")?;
                lv.loaded(&loc);
                loc.len as usize
            }
        };
        match table.put(key, stored) {
            Put::Inserted => {
                self.stats.keys += 1;
                self.stats.bytes += (key.len() + value_len) as u64;
                Ok(())
            }
            Put::Replaced(_) => Err("a key twice"),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.map.epoch()
    }

    pub fn map(&self) -> &Arc<ClusterMap> {
        &self.map
    }

    fn base_of(&self, key: &[u8]) -> u32 {
        partition_of(key_hash(key), self.partition_bits)
    }

    /// Applies a mutation to an owned partition: a put of a value written to the log at
    /// `at`, or a remove. Returns whether anything changed.
    fn mutate(&mut self, key: &[u8], put: Option<(&[u8], LogAt)>) -> bool {
        let partition = self.base_of(key);
        let table = self.tables[partition as usize].as_mut().expect("mutate on an owned partition");
        if let Some(lv) = self.log_values.as_mut() {
            let old = table.get(key).map(|stored| Loc::decode(stored).expect("a table entry holds a location"));
            if let Some(old) = &old {
                lv.dropped(old);
                self.stats.bytes -= u64::from(old.len);
            }
            return match put {
                Some((value, at)) => {
                    let loc = Loc::of(at.segment, at.offset, value);
                    table.put(key, &loc.encode());
                    lv.stored(&loc, value);
                    self.stats.bytes += value.len() as u64;
                    if old.is_none() {
                        self.stats.keys += 1;
                        self.stats.bytes += key.len() as u64;
                    }
                    true
                }
                None if old.is_some() => {
                    table.remove(key);
                    self.stats.keys -= 1;
                    self.stats.bytes -= key.len() as u64;
                    true
                }
                None => false,
            };
        }
        match put {
            Some((value, _)) => {
                match table.put(key, value) {
                    Put::Replaced(old_len) => {
                        self.stats.bytes -= old_len as u64;
                        self.stats.bytes += value.len() as u64;
                    }
                    Put::Inserted => {
                        self.stats.keys += 1;
                        self.stats.bytes += (key.len() + value.len()) as u64;
                    }
                }
                true
            }
            None => match table.remove(key) {
                Some(value_len) => {
                    self.stats.keys -= 1;
                    self.stats.bytes -= (key.len() + value_len) as u64;
                    true
                }
                None => false,
            },
        }
    }

    /// Re-applies a logged record at start-up, whose value (if any) is at `at` in the
    /// log. It came from this core's own log, so its partition must be one this core owns.
    pub fn replay(&mut self, mutation: &Mutation<'_>, at: LogAt) {
        if let Mutation::SyncPoint { .. } = mutation {
            return; // Not a change of state.
        }
        if let Mutation::Forget { partition } = *mutation {
            let p = PartitionId(partition);
            assert!(self.tables[base_partition(p, self.partition_bits) as usize].is_some(), "core {} log forgets partition {p} it does not own", self.core);
            self.forget(p);
            return;
        }
        let partition = self.base_of(mutation.key());
        assert!(self.tables[partition as usize].is_some(), "core {} log holds partition {partition} it does not own", self.core);
        match *mutation {
            Mutation::Put { key, value } => {
                self.mutate(key, Some((value, at)));
            }
            Mutation::Remove { key } => {
                self.mutate(key, None);
            }
            Mutation::Prepare { key, body } => {
                if body.participants().all(|b| b != self.me.0) {
                    // Prepared under an earlier id of this directory (the brick was
                    // removed and came back as a new brick): not this brick's to decide.
                    // Resolving it here would apply a write no other replica shares.
                    // Its decision, if the log holds one, is applied (a committed write
                    // is data to catch up from); undecided, it is dropped at the start.
                    self.foreign.insert(key.into(), Prepared::new(&body, 0, 0, at));
                    return;
                }
                // Epoch 0 and time 0: undecided after replay, it is in doubt at once.
                self.prepared.insert(key.into(), Prepared::new(&body, 0, 0, at));
            }
            Mutation::SyncPoint { .. } | Mutation::Forget { .. } => {}
            Mutation::Decide { key, txid, commit } => {
                let mine = self.prepared.get(key).is_some_and(|p| p.txid == txid);
                let earlier_id = !mine && self.foreign.get(key).is_some_and(|p| p.txid == txid);
                if mine || earlier_id {
                    let p = if mine { self.prepared.remove(key) } else { self.foreign.remove(key) }.expect("present");
                    if commit {
                        self.mutate(key, (p.kind == WriteKind::Put).then_some((&p.value[..], p.at)));
                    }
                }
                self.outcomes.record(txid, commit, key);
            }
        }
    }

    /// Writes prepared here and not yet decided.
    pub fn prepared_len(&self) -> usize {
        self.prepared.len()
    }

    pub fn partitions(&self) -> usize {
        self.tables.len()
    }

    /// `key`'s committed value here, and whether a write to it is prepared and undecided.
    /// (A value that cannot be read back is missing here; the core stops at the end of
    /// the round.)
    pub fn lookup(&self, key: &[u8]) -> (Option<Cow<'_, [u8]>>, bool) {
        let stored = self.tables.get(self.base_of(key) as usize).and_then(|t| t.as_ref()).and_then(|t| t.get(key));
        (stored.and_then(|s| self.value_of(s)), self.prepared.contains_key(key))
    }

    /// Keys of base partition `partition` and what its table stores for each (values,
    /// or their locations): what a checkpoint holds. Empty for one this core does not own.
    pub fn partition_stored(&self, partition: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.tables[partition].iter().flat_map(|t| t.iter())
    }

    /// Every key this core holds, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.tables.iter().flatten().flat_map(|t| t.keys())
    }

    /// Every key and value this core holds, read back where they are in the log (tests
    /// and the simulator's checks). A value that does not read back is left out, and
    /// the failure is kept for `take_failure`.
    #[cfg(any(test, feature = "sim"))]
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let stored = self.tables.iter().flatten().flat_map(|t| t.iter());
        stored.filter_map(|(k, s)| Some((k.to_vec(), self.value_of(s)?.into_owned()))).collect()
    }

    /// The decided transactions this core remembers, oldest first, as decision records
    /// fields: a checkpoint keeps them, for a peer still in doubt may ask after the log
    /// that held them is gone, and "never seen" would answer it "aborted".
    pub fn outcome_records(&self) -> impl Iterator<Item = (&[u8], TxId, bool)> {
        self.outcomes.order.iter().filter_map(|(txid, key)| self.outcomes.state.get(txid).map(|c| (&key[..], *txid, *c)))
    }

    /// Writes prepared and undecided, as prepare records: a new log segment starts with
    /// them so a checkpoint never cuts a prepare off from its decision.
    pub fn prepared_records(&self) -> impl Iterator<Item = (&[u8], PrepareBody<'_>)> {
        self.prepared.iter().map(|(k, p)| (&k[..], p.body()))
    }

    /// A new map: remember it, and for every partition this brick has just started
    /// joining, drop what it held there (stale since it left) and start tracking writes.
    pub fn install_map(&mut self, map: Arc<ClusterMap>, fx: &mut Effects) {
        assert!(map.epoch() >= self.map.epoch(), "maps only move forward");
        let me = self.me;
        // Partitions this brick has left (a move's last map, or a group it is not in
        // while its log held them, on its first map): forget what it held there, in
        // memory now and in its files at the next checkpoint; unless the group is short
        // of replicas, when the brick keeps it (dormant) to catch up from if it joins
        // again.
        if map.bricks().contains_key(&me) && !crate::mutation::active(crate::mutation::Mutation::KeepLeftData) {
            let mut dormant = Vec::new();
            for p in self.left_partitions(&map) {
                self.refuse_parked_reads(p, map.epoch(), "it left the partition's group", fx);
                if map.is_short(p) {
                    dormant.push(p);
                    continue;
                }
                let dropped = self.forget(p);
                if dropped > 0 {
                    fx.log(&Mutation::Forget { partition: p.0 }, true);
                    crate::log!(format_args!("core {}", self.core), "left partition {p}: dropped {dropped} keys");
                }
            }
            self.dormant = dormant;
            self.swept = true;
            self.foreign = HashMap::default();
        }
        let mut joined = Vec::new();
        for (&p, joining) in map.joining() {
            if joining.contains(&me) && !self.joining.contains_key(&p) && self.owns_partition(&map, p) {
                joined.push(p);
            }
        }
        for p in joined {
            // What this brick holds there stays: it is from an earlier stay, stale but
            // all of it committed, and the copy makes it equal to a readable replica's
            // (a catch-up: only buckets that differ move) before it serves a read.
            // Writes prepared here before the partition left: this replica voted, so
            // they stay undecided (and answer `Prepared` when asked) until decided; a
            // commit is applied but is older than the join (`note_joining_write`), and
            // the copy starts only once none is pending (the driver's probe).
            self.refuse_parked_reads(p, map.epoch(), "it left and is joining again", fx);
            let held = self.count_keys(p);
            crate::log!(format_args!("core {}", self.core), "joining partition {p}: holds {held} keys from an earlier stay");
            self.joining.insert(p, Joined { epoch: map.epoch(), written: HashSet::default() });
        }
        self.joining.retain(|p, _| map.is_joining(*p, me));
        self.map_json = map.to_json().into_bytes().into();
        self.map = map;
    }

    /// DP leaves of `map` stored on this core whose group this brick is not in but whose
    /// keys it may hold: it was in the group of an overlapping leaf of the map before, or
    /// this is the first map since the start (a replayed log may hold any partition).
    fn left_partitions(&self, map: &ClusterMap) -> Vec<PartitionId> {
        let held_before: Vec<PartitionId> = self.map.partitions_of(self.me).chain(self.dormant.iter().copied()).collect();
        map.groups()
            .iter()
            .filter(|(p, group)| !group.contains(&self.me) && self.owns_partition(map, **p))
            .filter(|(p, _)| !self.swept || held_before.iter().any(|q| q.overlaps(**p)))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Whether this brick keeps what it holds of partition `p` under `map`: it is in
    /// the group, or the group is short and this brick may be asked to join it again
    /// and catch up from its data.
    fn keeps(&self, map: &ClusterMap, p: PartitionId) -> bool {
        map.groups().get(&p).is_some_and(|g| g.contains(&self.me)) || map.is_short(p)
    }

    /// Refuses the reads parked on writes prepared in partition `p`: they were admitted
    /// while this replica served `p`, and the data they would read is gone now. They go
    /// elsewhere; the writes stay prepared until decided.
    fn refuse_parked_reads(&mut self, p: PartitionId, epoch: u64, why: &str, fx: &mut Effects) {
        for (_, prepared) in self.prepared.iter_mut().filter(|(k, _)| p.contains(key_hash(k))) {
            for (conn, id) in prepared.waiters.drain(..) {
                let mut out = Vec::new();
                let why = format!("{} no longer serves reads of partition {p}: {why}", self.me);
                reply_frame(&mut out, Op::Get, id, epoch, Status::Unavailable, why.as_bytes());
                fx.deferred.push((conn, out));
            }
        }
    }

    /// Where this incarnation's copy tokens start (below 2^63): a number no earlier
    /// incarnation drew, so that a copy read from before a restart is refused, not
    /// resumed (the restart may have left older-epoch writes in doubt that the copy's
    /// probe never saw). The brick draws it at random, the simulator from the
    /// incarnation.
    pub fn set_token_base(&mut self, base: u64) {
        assert!(base < 1 << 63, "a token base leaves room for the passes");
        self.token_base = base;
    }

    /// Keys written since this brick joined partition `p` (0 when not joining it).
    pub fn joined_writes(&self, p: PartitionId) -> usize {
        self.joining.get(&p).map_or(0, |j| j.written.len())
    }

    /// Keys of DP leaf `p` held here.
    fn count_keys(&self, p: PartitionId) -> usize {
        self.keys_of(p).count()
    }

    /// The keys of DP leaf `p` held here (none for a partition this core does not own).
    fn keys_of(&self, p: PartitionId) -> impl Iterator<Item = &[u8]> + Clone {
        let base = base_partition(p, self.partition_bits);
        self.tables[base as usize].iter().flat_map(|t| t.keys()).filter(move |k| p.contains(key_hash(k)))
    }

    /// The digests of DP leaf `p`'s buckets `from..from + count` among `2^log2`
    /// (`proto::catchup`).
    fn bucket_digests(&self, p: PartitionId, log2: u8, from: u32, count: u32) -> Vec<u64> {
        let base = base_partition(p, self.partition_bits);
        let table = self.tables[base as usize].as_ref().expect("digests of an owned partition");
        let mut digests = vec![0u64; count as usize];
        for (k, stored) in table.iter() {
            let hash = key_hash(k);
            if !p.contains(hash) {
                continue;
            }
            let at = bucket_of(hash, log2).wrapping_sub(from);
            if at < count {
                digests[at as usize] = digests[at as usize].wrapping_add(entry_digest(hash, self.stored_hash(stored)));
            }
        }
        digests
    }

    /// Drops every key of DP leaf `p` from memory; returns how many there were.
    fn forget(&mut self, p: PartitionId) -> usize {
        let base = base_partition(p, self.partition_bits);
        let table = self.tables[base as usize].as_mut().expect("forget on an owned partition");
        // The table rebuilds itself to what is left: the memory of the leaf goes back
        // to the kernel now.
        let mut log_values = self.log_values.as_mut();
        let mut bytes = 0u64;
        let (dropped, _) = table.retain(|k, stored| {
            let keep = !p.contains(key_hash(k));
            if !keep {
                let value_len = match log_values.as_deref_mut() {
                    None => stored.len(),
                    Some(lv) => {
                        let loc = Loc::decode(stored).expect("a table entry holds a location");
                        lv.dropped(&loc);
                        loc.len as usize
                    }
                };
                bytes += (k.len() + value_len) as u64;
            }
            keep
        });
        self.stats.keys -= dropped as u64;
        self.stats.bytes -= bytes;
        self.copy_windows.retain(|_, (partition, _)| *partition != p.0);
        dropped
    }

    /// Whether partition `p` (a DP leaf) is stored on this core.
    fn owns_partition(&self, map: &ClusterMap, p: PartitionId) -> bool {
        let base = base_partition(p, map.base_bits());
        core_of(base, self.cores) == self.core
    }

    /// Checks a data request's epoch and this brick's place for the key. `Err` carries
    /// the refusal to send.
    fn admit(&self, epoch: u64, hash: u64, read: bool, fx: &mut Effects) -> Result<&[BrickId], Refusal> {
        if self.fenced {
            return Err((Status::Unavailable, format!("{} lost touch with the map authority: fenced", self.me).into_bytes()));
        }
        if epoch < self.map.epoch() {
            return Err((Status::StaleEpoch, self.map_json.to_vec()));
        }
        if epoch > self.map.epoch() {
            fx.behind = true;
            return Err((Status::Behind, format!("brick is at epoch {}, request at {epoch}", self.map.epoch()).into_bytes()));
        }
        let (p, group) = self.map.route(hash);
        let core = self.map.core_of(hash, self.cores);
        if core != self.core {
            return Err((Status::WrongShard, format!("partition {p} is stored on core {core} of this brick, not core {}", self.core).into_bytes()));
        }
        if !group.contains(&self.me) {
            return Err((Status::WrongShard, format!("{} holds no replica of partition {p} at epoch {}", self.me, self.map.epoch()).into_bytes()));
        }
        if read && !self.map.is_readable(p, self.me) {
            return Err((Status::Unavailable, format!("{} serves no reads of partition {p} (copying or leaving)", self.me).into_bytes()));
        }
        Ok(group)
    }

    fn count_in_doubt(&mut self, commit: bool) {
        if commit {
            self.stats.in_doubt_commits += 1;
        } else {
            self.stats.in_doubt_aborts += 1;
        }
    }

    /// Executes one request from `conn` and appends its immediate reply to `out` (a
    /// parked read replies later through `fx.deferred`). `info` answers `Hello`.
    pub fn execute(&mut self, conn: ConnId, request: &Frame<'_>, info: &BrickInfo, out: &mut Vec<u8>, fx: &mut Effects) {
        let Kind::Request(op) = request.kind else {
            unreachable!("the core loop passes requests only")
        };
        self.stats.requests += 1;
        let id = request.request_id;
        let epoch = self.map.epoch();
        let mut reply = |status: Status, value: &[u8]| reply_frame(out, op, id, epoch, status, value);
        match op {
            Op::Get | Op::Put | Op::Remove | Op::Prepare => {
                let hash = key_hash(request.key);
                let group_len = match self.admit(request.epoch, hash, op == Op::Get, fx) {
                    Ok(group) => group.len(),
                    Err((status, msg)) => return reply(status, &msg),
                };
                match op {
                    Op::Get => {
                        if crate::mutation::active(crate::mutation::Mutation::ReadUncommitted) {
                            // The planted bug `read-uncommitted`: a prepared value is
                            // served before its transaction is decided.
                            if let Some(p) = self.prepared.get(request.key).filter(|p| p.kind == WriteKind::Put) {
                                return reply(Status::Ok, &p.value);
                            }
                        }
                        let past = crate::mutation::active(crate::mutation::Mutation::ReadPastPrepared);
                        if let Some(p) = self.prepared.get_mut(request.key).filter(|_| !past) {
                            if p.waiters.len() >= WAITERS_MAX {
                                return reply(Status::Unavailable, b"too many reads wait for this key's pending write");
                            }
                            p.waiters.push((conn, id));
                            return;
                        }
                        let table = self.tables[self.base_of(request.key) as usize].as_ref().expect("admitted");
                        let Some(stored) = table.get(request.key) else { return reply(Status::NotFound, &[]) };
                        let Some(loc) = self.location(stored) else { return reply(Status::Ok, stored) };
                        let lv = self.log_values.as_mut().expect("values in the log");
                        if let Some(value) = lv.cached(&loc) {
                            return reply(Status::Ok, value);
                        }
                        if fx.reads.len() >= READS_PER_ROUND_MAX {
                            return reply(Status::Unavailable, b"too many reads of values from the log at once");
                        }
                        // Read from the log while the core goes on (`read_done`): the value
                        // is the key's as of now, whatever is written after.
                        lv.read_started(&loc);
                        fx.reads.push(ValueRead { conn, request_id: id, epoch, loc });
                    }
                    Op::Put | Op::Remove => {
                        // One phase: allowed only where this brick is the whole group.
                        if group_len != 1 {
                            return reply(Status::WrongShard, b"this partition has several replicas: write with two-phase commit");
                        }
                        if self.prepared.contains_key(request.key) {
                            return reply(Status::Conflict, b"a write to this key is pending");
                        }
                        let status = self.write(request.key, op == Op::Put, request.value, fx);
                        reply(status, &[]);
                    }
                    Op::Prepare => {
                        let status = self.prepare(request.key, request.value, request.epoch, fx);
                        match status {
                            Ok(existed) => reply(Status::Ok, &[existed as u8]),
                            Err(why) => reply(Status::Conflict, why.as_bytes()),
                        }
                    }
                    _ => unreachable!(),
                }
            }
            Op::Commit | Op::Abort => {
                let Ok(txid) = TxId::decode(request.value) else {
                    return reply(Status::Conflict, b"malformed txid");
                };
                if self.tables[self.base_of(request.key) as usize].is_none() {
                    return reply(Status::WrongShard, b"key stored on another core");
                }
                if op == Op::Abort {
                    if let Some(gone) = self.prepared.get(request.key).filter(|p| p.txid == txid).and_then(|p| self.departed_participant(p)) {
                        // A participant left the map, so the live ones may already have
                        // committed this write among themselves (all of them prepared:
                        // the rule in ARCHITECTURE.md), whatever the departed one voted.
                        // The coordinator's abort would split them: it asks them instead.
                        let why = format!("{txid} stays prepared on {}: participant {gone} left the map, the live participants decide it", self.me);
                        return reply(Status::Conflict, why.as_bytes());
                    }
                }
                let found = self.decide(request.key, txid, op == Op::Commit, fx);
                reply(if found { Status::Ok } else { Status::NotFound }, &[]);
            }
            Op::Resolve => {
                let Ok(txid) = TxId::decode(request.value) else {
                    return reply(Status::Conflict, b"malformed txid");
                };
                if self.fenced {
                    // A fenced brick may already be out of the map: an "aborted" from it
                    // (a tombstone no one else will ever see) must not decide anything.
                    return reply(Status::Unavailable, b"fenced: ask again later");
                }
                if request.epoch > self.map.epoch() {
                    // The asker counts this answer only if it holds at its epoch: a
                    // replica that has not seen a participant's removal could still
                    // abort on that participant's word after answering "prepared".
                    fx.behind = true;
                    return reply(Status::Behind, b"behind the asker's map");
                }
                let state = self.tx_state(request.key, txid, fx);
                reply(Status::Ok, &[state as u8]);
            }
            Op::SnapshotChunk => {
                let mut value = Vec::new();
                let status = self.snapshot_chunk(request.epoch, request.value, &mut value, fx);
                reply(status, &value);
            }
            Op::Install => match self.install(request.epoch, request.value, fx) {
                Ok(n) => reply(Status::Ok, &(n as u64).to_le_bytes()),
                Err((status, msg)) => reply(status, msg.as_bytes()),
            },
            Op::Repair => match self.repair(request.epoch, request.value, fx) {
                Ok(n) => reply(Status::Ok, &(n as u64).to_le_bytes()),
                Err((status, msg)) => reply(status, msg.as_bytes()),
            },
            Op::Digests | Op::Diff => {
                let mut value = Vec::new();
                let answered = match op {
                    Op::Digests => self.digests(request.epoch, request.value, &mut value, fx),
                    _ => self.diff(request.epoch, request.value, &mut value, fx),
                };
                match answered {
                    Ok(()) => reply(Status::Ok, &value),
                    Err((status, msg)) => reply(status, msg.as_bytes()),
                }
            }
            Op::GetMap => {
                if request.epoch < self.map.epoch() {
                    reply(Status::Ok, &self.map_json)
                } else {
                    reply(Status::Ok, &[])
                }
            }
            Op::Hello => {
                let mut payload = Vec::new();
                info.encode(&mut payload);
                reply(Status::Ok, &payload);
            }
            Op::Stats => {
                if let Some(lv) = self.log_values.as_ref() {
                    let cache = lv.cache();
                    (self.stats.cache_hits, self.stats.cache_misses, self.stats.cache_bytes) = (cache.hits, cache.misses, cache.bytes());
                }
                let mut payload = Vec::new();
                self.stats.encode(&mut payload);
                reply(Status::Ok, &payload);
            }
            Op::Register | Op::Heartbeat | Op::Raft | Op::Members => reply(Status::WrongShard, b"this is a brick, not the map authority"),
        }
    }

    /// A one-phase write; logged before its reply may leave.
    fn write(&mut self, key: &[u8], put: bool, value: &[u8], fx: &mut Effects) -> Status {
        self.note_joining_write(key, self.map.epoch());
        if put {
            let at = fx.log(&Mutation::Put { key, value }, true);
            self.mutate(key, Some((value, at)));
            return Status::Ok;
        }
        if self.mutate(key, None) {
            fx.log(&Mutation::Remove { key }, true);
            Status::Ok
        } else {
            Status::NotFound
        }
    }

    /// A write to `key`, prepared (or, one-phase, made) at `epoch`, was applied. If this
    /// brick is joining the key's partition and the write is of the join or later, no
    /// copied entry may overwrite it. One prepared before the join is not marked: it may
    /// be older than what the copy brings (the copy starts once no such write is
    /// pending here, `pending_older`).
    fn note_joining_write(&mut self, key: &[u8], epoch: u64) {
        if self.joining.is_empty() {
            return;
        }
        let hash = key_hash(key);
        if let Some(joined) = self.joining.iter_mut().find(|(p, _)| p.contains(hash)).map(|(_, j)| j) {
            if epoch >= joined.epoch {
                joined.written.insert(key.into());
            }
        }
    }

    /// Whether `key` is in a partition this brick is joining and was not written since
    /// the join: what this brick holds for it is not yet its source's.
    fn unverified(&self, key: &[u8]) -> bool {
        let hash = key_hash(key);
        self.joining.iter().any(|(p, j)| p.contains(hash) && !j.written.contains(key))
    }

    /// Phase one; `Ok` says whether the key exists now (a remove reports it).
    fn prepare(&mut self, key: &[u8], body: &[u8], epoch: u64, fx: &mut Effects) -> Result<bool, String> {
        let body = PrepareBody::decode(body).map_err(|e| e.to_string())?;
        if body.participants().all(|b| b != self.me.0) {
            return Err(format!("{} is not among the transaction's participants", self.me));
        }
        // A joining replica's data is not yet its source's: its word on whether the key
        // exists does not count (a readable member's does; the client takes any "yes").
        let existed = !self.unverified(key) && self.tables[self.base_of(key) as usize].as_ref().is_some_and(|t| t.contains_key(key));
        match self.outcomes.get(body.txid) {
            Some(true) => return Ok(existed),
            Some(false) => return Err(format!("{} was already aborted here", body.txid)),
            None => {}
        }
        if let Some(p) = self.prepared.get(key) {
            return if p.txid == body.txid { Ok(existed) } else { Err(format!("key locked by {}", p.txid)) };
        }
        let at = fx.log(&Mutation::Prepare { key, body }, true);
        self.prepared.insert(key.into(), Prepared::new(&body, epoch, self.now_ms, at));
        Ok(existed)
    }

    /// Applies or drops the prepared write `txid` on `key`; returns whether it was here.
    ///
    /// The decision's record is durable before any reply leaves. Without that, a replica
    /// that loses power after acknowledging a commit comes back in doubt, and if its
    /// peer did the same, the rule asks peers that no longer know either (the simulator
    /// found this losing an acknowledged write).
    fn decide(&mut self, key: &[u8], txid: TxId, commit: bool, fx: &mut Effects) -> bool {
        if self.prepared.get(key).is_none_or(|p| p.txid != txid) {
            // Already decided (a repeated message), or never prepared: remember the abort
            // so a late prepare is refused.
            if !commit && self.outcomes.get(txid).is_none() {
                self.outcomes.record(txid, false, key);
                fx.log(&Mutation::Decide { key, txid, commit: false }, true);
            }
            return self.outcomes.get(txid) == Some(commit);
        }
        let p = self.prepared.remove(key).expect("present");
        // The planted bug of the `mutation-lost-commit` build (a test proves it is caught).
        let lose = (cfg!(feature = "mutation-lost-commit") || crate::mutation::active(crate::mutation::Mutation::LostCommit)) && self.me.0 % 2 == 1;
        if commit && !lose {
            self.mutate(key, (p.kind == WriteKind::Put).then_some((&p.value[..], p.at)));
            self.note_joining_write(key, p.epoch);
        }
        fx.log(&Mutation::Decide { key, txid, commit }, true);
        // Decided after this brick left the partition: the write is let go again at once,
        // by a record of its own, so that memory stays what a replay of the log gives.
        // Kept (the group is short), the partition is dormant now, to be dropped once
        // the group is full like any other.
        let (partition, group) = self.map.route(key_hash(key));
        if commit && !group.contains(&self.me) && self.map.bricks().contains_key(&self.me) {
            if self.keeps(&self.map, partition) {
                if !self.dormant.contains(&partition) {
                    self.dormant.push(partition);
                }
            } else if self.forget(partition) > 0 {
                fx.log(&Mutation::Forget { partition: partition.0 }, true);
            }
        }
        self.outcomes.record(txid, commit, key);
        self.answer_waiters(key, p.waiters, fx);
        true
    }

    fn answer_waiters(&mut self, key: &[u8], waiters: Vec<(ConnId, u64)>, fx: &mut Effects) {
        if waiters.is_empty() {
            return;
        }
        let stored = self.tables[self.base_of(key) as usize].as_ref().and_then(|t| t.get(key));
        let value = stored.map(|s| self.value_of(s));
        for (conn, id) in waiters {
            let mut out = Vec::new();
            match &value {
                Some(Some(v)) => reply_frame(&mut out, Op::Get, id, self.map.epoch(), Status::Ok, v),
                Some(None) => reply_frame(&mut out, Op::Get, id, self.map.epoch(), Status::Unavailable, b"the value could not be read from the log: the brick is stopping"),
                None => reply_frame(&mut out, Op::Get, id, self.map.epoch(), Status::NotFound, &[]),
            }
            fx.deferred.push((conn, out));
        }
    }

    /// What this replica knows of `txid`; a transaction never seen is aborted here and
    /// now, so that a prepare arriving late is refused.
    fn tx_state(&mut self, key: &[u8], txid: TxId, fx: &mut Effects) -> TxState {
        if self.prepared.get(key).is_some_and(|p| p.txid == txid) {
            return TxState::Prepared;
        }
        match self.outcomes.get(txid) {
            Some(true) => TxState::Committed,
            Some(false) => TxState::Aborted,
            None => {
                // The answer decides the asker's abort: it must hold after a crash too,
                // or a late prepare would be taken after all. Durable before the reply.
                self.outcomes.record(txid, false, key);
                fx.log(&Mutation::Decide { key, txid, commit: false }, true);
                TxState::Aborted
            }
        }
    }

    /// A participant of `p` that is no longer in the map (dead), if any.
    fn departed_participant(&self, p: &Prepared) -> Option<BrickId> {
        p.body().participants().map(BrickId).find(|b| !self.map.bricks().contains_key(b))
    }

    /// Time passes: in-doubt prepares ask their peers.
    pub fn tick(&mut self, now_ms: u64, fx: &mut Effects) {
        self.now_ms = now_ms;
        let mut decided = Vec::new();
        let epoch = self.map.epoch();
        for (key, p) in self.prepared.iter_mut() {
            if now_ms.saturating_sub(p.since_ms) < RESOLVE_AFTER_MS {
                continue;
            }
            if p.answers_at(epoch) {
                p.asked_ms = None;
            }
            if let Some(commit) = resolve_rule(&self.map, self.me, p) {
                decided.push((key.clone(), p.txid, commit));
                continue;
            }
            if p.asked_ms.is_some_and(|t| now_ms.saturating_sub(t) < RESOLVE_RETRY_MS) {
                continue;
            }
            p.asked_ms = Some(now_ms);
            p.answers.clear();
            for b in p.body().participants() {
                let brick = BrickId(b);
                if brick != self.me && self.map.bricks().contains_key(&brick) {
                    fx.queries.push(Query { brick, key: key.clone(), txid: p.txid });
                }
            }
        }
        for (key, txid, commit) in decided {
            crate::log!(format_args!("core {}", self.core), "in-doubt {txid} resolved: {}", if commit { "commit" } else { "abort" });
            self.count_in_doubt(commit);
            self.decide(&key, txid, commit, fx);
        }
    }

    /// A peer's answer to a `Query`, given at the peer's map epoch `answered_epoch`.
    pub fn on_answer(&mut self, key: &[u8], txid: TxId, from: BrickId, state: TxState, answered_epoch: u64, fx: &mut Effects) {
        let Some(p) = self.prepared.get_mut(key).filter(|p| p.txid == txid) else { return };
        // Only answers given at this replica's epoch or later count, and only from
        // members: a peer that had not yet seen a participant's removal could still abort
        // on that participant's word after answering "prepared", and a departed peer's
        // "aborted" may have raced with its removal.
        p.answers_at(self.map.epoch());
        if answered_epoch < self.map.epoch() || !self.map.bricks().contains_key(&from) {
            return;
        }
        p.answers.retain(|(b, _)| *b != from.0);
        p.answers.push((from.0, state));
        if let Some(commit) = resolve_rule(&self.map, self.me, p) {
            crate::log!(format_args!("core {}", self.core), "in-doubt {txid} resolved by peers: {}", if commit { "commit" } else { "abort" });
            self.count_in_doubt(commit);
            self.decide(key, txid, commit, fx);
        }
    }

    /// Whether a write prepared under an epoch older than `epoch` is undecided here on
    /// partition `p` (what a copy's probe and its first read wait out).
    pub fn pending_older(&self, p: PartitionId, epoch: u64) -> bool {
        self.prepared.iter().any(|(k, w)| w.epoch < epoch && p.contains(key_hash(k)))
    }

    /// The next chunk of partition `p`'s entries for a joining replica. Refused while a
    /// write prepared under an older epoch is pending on the partition: such a write
    /// does not reach the joining replica, so the copy must start after it.
    fn snapshot_chunk(&mut self, epoch: u64, body: &[u8], out: &mut Vec<u8>, fx: &mut Effects) -> Status {
        let req = match SnapshotRequest::decode(body) {
            Ok(req) => req,
            Err(e) => {
                out.extend_from_slice(e.to_string().as_bytes());
                return Status::Conflict;
            }
        };
        let p = PartitionId(req.partition);
        if epoch > self.map.epoch() {
            fx.behind = true;
            out.extend_from_slice(b"brick has not seen that epoch yet");
            return Status::Behind;
        }
        if req.is_probe() {
            // A probe from the copy driver, to every member of the group: a write
            // prepared under an older epoch on any member (not only the source) must be
            // decided before the copy starts, or it could commit where the copy never
            // sees it.
            let member = self.map.dp().is_leaf(p) && self.map.groups().get(&p).is_some_and(|g| g.contains(&self.me)) && self.owns_partition(&self.map, p);
            if !member {
                out.extend_from_slice(format!("{} core {} is not a member of partition {p}", self.me, self.core).as_bytes());
                return Status::WrongShard;
            }
            if self.pending_older(p, epoch) {
                out.extend_from_slice(b"writes from an older epoch are still pending on this partition");
                return Status::Behind;
            }
            return Status::Ok;
        }
        if !self.map.dp().is_leaf(p) || !self.map.readable(p).any(|b| b == self.me) || !self.owns_partition(&self.map, p) {
            out.extend_from_slice(format!("{} core {} serves no copy of partition {p}", self.me, self.core).as_bytes());
            return Status::WrongShard;
        }
        if req.token == 0 && self.pending_older(p, epoch) {
            out.extend_from_slice(b"writes from an older epoch are still pending on this partition");
            return Status::Behind;
        }
        // A token this incarnation never issued: the copy started before a restart.
        if req.token != 0 && !(req.token > self.token_base && req.token <= self.token_base + self.passes) {
            out.extend_from_slice(format!("{} restarted since this copy of partition {p} started: copy again", self.me).as_bytes());
            return Status::Conflict;
        }
        // A copy's first read (token 0), its window spent, or gone: a new pass (`scan`).
        let mut token = req.token;
        if !self.copy_windows.get(&token).is_some_and(|(partition, w)| *partition == req.partition && w.serves(req.from, token)) {
            self.copy_windows.remove(&token);
            self.passes += 1;
            token = self.token_base + self.passes;
            let window = CopyWindow::scan(self.keys_of(p).map(|k| (key_hash(k), k)), req.from, token, WINDOW_KEY_BYTES_MAX);
            if self.copy_windows.len() >= COPY_WINDOWS_MAX {
                // The oldest window belongs to a copy that has likely been abandoned; if
                // not, its next read makes a new pass.
                let oldest = *self.copy_windows.keys().min().expect("windows is full");
                self.copy_windows.remove(&oldest);
            }
            self.copy_windows.insert(token, (req.partition, window));
        }
        let (_, window) = &self.copy_windows[&token];
        let table = self.tables[base_partition(p, self.partition_bits) as usize].as_ref().expect("owned");
        let mut entries = Vec::new();
        let value = |k: &[u8]| table.get(k).map(|stored| self.value_of(stored));
        match window.fill(req.from, value, &mut entries, CHUNK_BYTES_MAX, VALUE_LEN_MAX - CHUNK_HEADER_LEN) {
            Ok((next, done)) => {
                Chunk::start(out, req.partition, next, window.token(), done);
                out.extend_from_slice(&entries);
                if done {
                    self.copy_windows.remove(&token);
                }
                Status::Ok
            }
            Err(FillError::Unreadable) => {
                out.extend_from_slice(b"a value could not be read from the log: the brick is stopping");
                Status::Unavailable
            }
            Err(FillError::TooLarge(size)) => {
                out.extend_from_slice(format!("entries of {size} bytes in partition {p} (one entry, or keys of one hash) do not fit one frame: they cannot be copied").as_bytes());
                Status::Conflict
            }
        }
    }

    /// Copied entries for a partition this brick is joining; keys written since the
    /// join are newer and stay. Returns how many entries were stored.
    fn install(&mut self, epoch: u64, body: &[u8], fx: &mut Effects) -> Result<usize, (Status, String)> {
        let chunk = Chunk::decode(body).map_err(|e| (Status::Conflict, e.to_string()))?;
        let p = PartitionId(chunk.partition);
        self.check_joining(p, epoch, fx)?;
        let mut stored = 0;
        for (key, value) in chunk.entries() {
            if !p.contains(key_hash(key)) {
                return Err((Status::Conflict, format!("copied key outside partition {p}")));
            }
            if self.joining[&p].written.contains(key) {
                continue;
            }
            let at = fx.log(&Mutation::Put { key, value }, true);
            self.mutate(key, Some((value, at)));
            stored += 1;
        }
        Ok(stored)
    }

    /// Checks a copy's or a catch-up's request at a joining replica of `p`: the epoch,
    /// the join, and that the copy was planned in this incarnation.
    fn check_joining(&self, p: PartitionId, epoch: u64, fx: &mut Effects) -> Result<(), (Status, String)> {
        if epoch > self.map.epoch() {
            fx.behind = true;
            return Err((Status::Behind, "brick has not seen that epoch yet".into()));
        }
        if !self.joining.contains_key(&p) {
            return Err((Status::WrongShard, format!("{} core {} is not joining partition {p}", self.me, self.core)));
        }
        if epoch < self.boot_epoch {
            // Read from its source before this brick restarted: it may be older than a
            // write this brick took since the join and no longer tracks as one (the
            // simulator found a removed key brought back).
            return Err((Status::Conflict, format!("{} restarted after this copy was planned (epoch {epoch}, started at {}): copy again", self.me, self.boot_epoch)));
        }
        Ok(())
    }

    /// A joining replica's key count in a partition and its bucket digests.
    fn digests(&mut self, epoch: u64, body: &[u8], out: &mut Vec<u8>, fx: &mut Effects) -> Result<(), (Status, String)> {
        let req = DigestRequest::decode(body).map_err(|e| (Status::Conflict, e.to_string()))?;
        let p = PartitionId(req.partition);
        self.check_joining(p, epoch, fx)?;
        let digests = self.bucket_digests(p, req.log2, req.from, req.count);
        // The keys it holds from an earlier stay (not those written since the join): none
        // asks for a full copy.
        let written = &self.joining[&p].written;
        let earlier = self.keys_of(p).filter(|k| !written.contains(*k)).count();
        encode_digest_reply(out, earlier as u64, &digests);
        Ok(())
    }

    /// A readable replica's entries of the buckets whose digests differ from a joining
    /// replica's, whole buckets in order until about `CHUNK_BYTES_MAX`. Refused while a
    /// write prepared under an older epoch is pending on the partition (as a snapshot).
    fn diff(&mut self, epoch: u64, body: &[u8], out: &mut Vec<u8>, fx: &mut Effects) -> Result<(), (Status, String)> {
        let req = DiffRequest::decode(body).map_err(|e| (Status::Conflict, e.to_string()))?;
        let p = PartitionId(req.partition);
        if epoch > self.map.epoch() {
            fx.behind = true;
            return Err((Status::Behind, "brick has not seen that epoch yet".into()));
        }
        if !self.map.dp().is_leaf(p) || !self.map.readable(p).any(|b| b == self.me) || !self.owns_partition(&self.map, p) {
            return Err((Status::WrongShard, format!("{} core {} serves no copy of partition {p}", self.me, self.core)));
        }
        if self.pending_older(p, epoch) {
            return Err((Status::Behind, "writes from an older epoch are still pending on this partition".into()));
        }
        let (from, count) = (req.from, req.digests.len() as u32);
        let mine = self.bucket_digests(p, req.log2, from, count);
        let differ: Vec<bool> = mine.iter().zip(&req.digests).map(|(a, b)| a != b).collect();
        let table = self.tables[base_partition(p, self.partition_bits) as usize].as_ref().expect("owned");
        let mut found: Vec<(u32, &[u8], &[u8])> = table
            .iter()
            .filter_map(|(k, v)| {
                let hash = key_hash(k);
                let at = bucket_of(hash, req.log2).wrapping_sub(from);
                (p.contains(hash) && at < count && differ[at as usize]).then(|| (at + from, k, v))
            })
            .collect();
        found.sort_unstable_by_key(|e| e.0);
        // A reply is one frame, and a bucket goes whole or not at all.
        let budget = VALUE_LEN_MAX - BUCKETS_HEADER_LEN - 4 * count as usize;
        let (mut buckets, mut entries, mut next, mut i) = (Vec::new(), Vec::new(), from + count, 0);
        for bucket in (from..from + count).filter(|b| differ[(b - from) as usize]) {
            let end = i + found[i..].iter().take_while(|e| e.0 == bucket).count();
            let size: usize = found[i..end].iter().map(|(_, k, s)| ENTRY_HEADER_LEN + k.len() + self.value_len(s)).sum();
            if entries.len() >= CHUNK_BYTES_MAX || entries.len() + size > budget {
                if buckets.is_empty() {
                    return Err((Status::Conflict, format!("bucket {bucket} of partition {p} holds {size} bytes, more than a frame: compare with more buckets")));
                }
                next = bucket;
                break;
            }
            buckets.push(bucket);
            for &(_, key, stored) in &found[i..end] {
                let Some(value) = self.value_of(stored) else {
                    return Err((Status::Unavailable, "a value could not be read from the log: the brick is stopping".into()));
                };
                Chunk::push_entry(&mut entries, key, &value);
            }
            i = end;
        }
        Buckets::encode(out, p.0, req.log2, next, &buckets, &entries);
        Ok(())
    }

    /// Makes the listed buckets of a partition this brick is joining equal to the
    /// entries a readable replica gave for them: keys here it does not hold are removed,
    /// the others written; keys written since the join are newer and stay. Returns how
    /// many keys changed.
    fn repair(&mut self, epoch: u64, body: &[u8], fx: &mut Effects) -> Result<usize, (Status, String)> {
        let msg = Buckets::decode(body).map_err(|e| (Status::Conflict, e.to_string()))?;
        let p = PartitionId(msg.partition);
        self.check_joining(p, epoch, fx)?;
        let listed: HashSet<u32> = msg.buckets().collect();
        let mut given: HashSet<&[u8]> = HashSet::default();
        for (key, _) in msg.entries() {
            let hash = key_hash(key);
            if !p.contains(hash) || !listed.contains(&bucket_of(hash, msg.log2)) {
                return Err((Status::Conflict, format!("repair entry outside partition {p}'s listed buckets")));
            }
            given.insert(key);
        }
        let since_join = &self.joining[&p].written;
        let stale: Vec<Box<[u8]>> = if crate::mutation::active(crate::mutation::Mutation::RepairKeepsRemoved) {
            Vec::new()
        } else {
            self.keys_of(p)
                .filter(|k| listed.contains(&bucket_of(key_hash(k), msg.log2)) && !given.contains(k) && !since_join.contains(*k))
                .map(Box::from)
                .collect()
        };
        let mut changed = 0;
        for key in &stale {
            self.mutate(key, None);
            fx.log(&Mutation::Remove { key }, true);
            changed += 1;
        }
        for (key, value) in msg.entries() {
            let same = self.lookup(key).0.is_some_and(|v| *v == *value);
            if same || self.joining[&p].written.contains(key) {
                continue;
            }
            let at = fx.log(&Mutation::Put { key, value }, true);
            self.mutate(key, Some((value, at)));
            changed += 1;
        }
        Ok(changed)
    }
}

/// The base partition (storage table) that holds DP leaf `p`: its low `bits` bits.
fn base_partition(p: PartitionId, bits: u8) -> u32 {
    p.prefix() & ((1u32 << bits) - 1)
}

/// The decision an in-doubt participant may take on what it knows: any commit, commit;
/// any abort (or never prepared), abort; every participant still in the map prepared
/// (those removed are dead, fail-stop), commit; otherwise wait.
fn resolve_rule(map: &ClusterMap, me: BrickId, p: &Prepared) -> Option<bool> {
    if p.answers.iter().any(|(_, s)| *s == TxState::Committed) {
        return Some(true);
    }
    if p.answers.iter().any(|(_, s)| *s == TxState::Aborted) {
        return Some(false);
    }
    let all_prepared = p.body().participants().all(|b| {
        b == me.0 || !map.bricks().contains_key(&BrickId(b)) || p.answers.iter().any(|(x, s)| *x == b && *s == TxState::Prepared)
    });
    all_prepared.then_some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{BrickAddr, ClusterMap};
    use crate::proto::decode;
    use std::collections::{BTreeMap, BTreeSet};

    pub fn solo_map(bits: u8) -> Arc<ClusterMap> {
        let bricks = BTreeMap::from([(BrickId(0), BrickAddr::tcp(vec![]))]);
        Arc::new(ClusterMap::initial(bits, bricks, 1).unwrap())
    }

    const CONN: ConnId = ConnId { slot: 0, generation: 0 };

    fn run(shard: &mut Shard, op: Op, key: &[u8], value: &[u8]) -> (Status, Vec<u8>) {
        let info = BrickInfo { partition_bits: 8, core: 0, ports: vec![1] };
        let mut out = Vec::new();
        let mut fx = Effects::new(1);
        shard.execute(CONN, &Frame { kind: Kind::Request(op), request_id: 9, epoch: shard.epoch(), key, value }, &info, &mut out, &mut fx);
        let (frame, len) = decode(&out).unwrap().unwrap();
        assert_eq!(len, out.len());
        assert_eq!(frame.request_id, 9);
        match frame.kind {
            Kind::Reply(o, status) => {
                assert_eq!(o, op);
                (status, frame.value.to_vec())
            }
            Kind::Request(_) => panic!("a request came back"),
        }
    }

    #[test]
    fn put_get_remove_and_counters() {
        let mut shard = Shard::new(0, 1, 8, BrickId(0), solo_map(8));
        assert_eq!(run(&mut shard, Op::Get, b"a", b"").0, Status::NotFound);
        assert_eq!(run(&mut shard, Op::Put, b"a", b"one").0, Status::Ok);
        assert_eq!(run(&mut shard, Op::Put, b"a", b"three").0, Status::Ok);
        assert_eq!(run(&mut shard, Op::Get, b"a", b""), (Status::Ok, b"three".to_vec()));
        assert_eq!((shard.stats.keys, shard.stats.bytes), (1, 6));
        assert_eq!(run(&mut shard, Op::Remove, b"a", b"").0, Status::Ok);
        assert_eq!(run(&mut shard, Op::Remove, b"a", b"").0, Status::NotFound);
        assert_eq!((shard.stats.keys, shard.stats.bytes), (0, 0));
    }

    #[test]
    fn keys_of_other_cores_are_refused() {
        let map = solo_map(8);
        let mut shards = [Shard::new(0, 2, 8, BrickId(0), map.clone()), Shard::new(1, 2, 8, BrickId(0), map)];
        let key = b"some key";
        let owner = core_of(partition_of(key_hash(key), 8), 2);
        assert_eq!(run(&mut shards[owner], Op::Put, key, b"v").0, Status::Ok);
        let (status, msg) = run(&mut shards[1 - owner], Op::Get, key, b"");
        assert_eq!(status, Status::WrongShard);
        assert!(String::from_utf8(msg).unwrap().contains("stored on core"));
    }

    #[test]
    fn stale_and_future_epochs_are_refused_with_the_map_or_a_retry() {
        let mut shard = Shard::new(0, 1, 8, BrickId(0), solo_map(8));
        let info = BrickInfo { partition_bits: 8, core: 0, ports: vec![1] };
        for (epoch, want) in [(0, Status::StaleEpoch), (2, Status::Behind)] {
            let mut out = Vec::new();
            let mut fx = Effects::new(1);
            shard.execute(CONN, &Frame { kind: Kind::Request(Op::Get), request_id: 1, epoch, key: b"k", value: b"" }, &info, &mut out, &mut fx);
            let (frame, _) = decode(&out).unwrap().unwrap();
            assert_eq!(frame.kind, Kind::Reply(Op::Get, want));
            if want == Status::StaleEpoch {
                let map = ClusterMap::from_json(std::str::from_utf8(frame.value).unwrap()).unwrap();
                assert_eq!(map.epoch(), 1);
            } else {
                assert!(fx.behind);
            }
        }
    }

    fn prepare(shard: &mut Shard, key: &[u8], txid: TxId, value: &[u8], parts: &[u32]) -> Status {
        let mut body = Vec::new();
        PrepareBody::encode(txid, WriteKind::Put, parts, value, &mut body);
        run(shard, Op::Prepare, key, &body).0
    }

    #[test]
    fn prepare_locks_reads_wait_and_commit_applies() {
        let mut shard = Shard::new(0, 1, 8, BrickId(0), solo_map(8));
        let (t1, t2) = (TxId { client: 1, seq: 1 }, TxId { client: 2, seq: 1 });
        assert_eq!(prepare(&mut shard, b"k", t1, b"v1", &[0]), Status::Ok);
        assert_eq!(prepare(&mut shard, b"k", t2, b"v2", &[0]), Status::Conflict, "one lock per key");
        let info = BrickInfo { partition_bits: 8, core: 0, ports: vec![1] };
        let mut out = Vec::new();
        let mut fx = Effects::new(1);
        shard.execute(CONN, &Frame { kind: Kind::Request(Op::Get), request_id: 5, epoch: 1, key: b"k", value: b"" }, &info, &mut out, &mut fx);
        assert!(out.is_empty(), "a read of a prepared key waits");
        let mut fx = Effects::new(1);
        assert!(shard.decide(b"k", t1, true, &mut fx));
        assert_eq!(fx.deferred.len(), 1);
        let (frame, _) = decode(&fx.deferred[0].1).unwrap().unwrap();
        assert_eq!((frame.kind, frame.request_id, frame.value), (Kind::Reply(Op::Get, Status::Ok), 5, &b"v1"[..]));
        assert!(fx.must_sync, "a decision is durable before replies");
        assert_eq!(run(&mut shard, Op::Resolve, b"k", &t1.to_bytes()), (Status::Ok, vec![TxState::Committed as u8]));
        // Asked about a transaction it never saw, a replica aborts it for good.
        assert_eq!(run(&mut shard, Op::Resolve, b"k", &t2.to_bytes()), (Status::Ok, vec![TxState::Aborted as u8]));
        assert_eq!(prepare(&mut shard, b"k", t2, b"v2", &[0]), Status::Conflict);
    }

    #[test]
    fn a_joining_core_refuses_chunks_of_copies_planned_before_it_started() {
        // Brick 1 joins a partition at epoch 3; the copy is planned then. Brick 1
        // restarts and boots with a map of epoch 4 (the authority moved it): the old
        // copy's chunk may be older than writes it took since the join, so it is refused;
        // a copy planned at epoch 4 is taken.
        let bricks: BTreeMap<_, _> = (0..2).map(|i| (BrickId(i), BrickAddr::tcp(vec![]))).collect();
        let one = ClusterMap::initial(0, bricks.iter().take(1).map(|(b, a)| (*b, a.clone())).collect(), 1).unwrap();
        let two = one.add_brick(BrickId(1), bricks[&BrickId(1)].clone()).unwrap();
        let p = *two.groups().keys().next().unwrap();
        let joining = two.begin_join(&[(p, BrickId(1))]).unwrap();
        let rebooted = Arc::new(joining.move_brick(BrickId(1), bricks[&BrickId(1)].clone()).unwrap());
        let mut shard = Shard::new(0, 1, 0, BrickId(1), Arc::clone(&rebooted));
        let mut fx = Effects::new(1);
        shard.install_map(rebooted, &mut fx);
        let mut chunk = Vec::new();
        Chunk::start(&mut chunk, p.0, 0, 0, true);
        Chunk::push_entry(&mut chunk, b"k", b"old");
        let mut fx = Effects::new(1);
        let refused = shard.install(joining.epoch(), &chunk, &mut fx);
        assert!(matches!(refused, Err((Status::Conflict, _))), "{refused:?}");
        assert_eq!(shard.lookup(b"k").0, None);
        assert_eq!(shard.install(joining.epoch() + 1, &chunk, &mut fx), Ok(1));
    }

    #[test]
    fn a_partition_left_and_joined_again_keeps_nothing_of_its_first_stay_across_a_replay() {
        // Brick 0 holds partition p with brick 1, then moves it to brick 2 (its keys are
        // dropped from memory), learns of a write prepared before the move only after it
        // (not kept), joins p again, takes a copy that no longer has that key, and
        // restarts: the replay of its log must not bring the key back.
        let bricks: BTreeMap<_, _> = (0..3).map(|i| (BrickId(i), BrickAddr::tcp(vec![]))).collect();
        let two = ClusterMap::initial(0, bricks.iter().take(2).map(|(b, a)| (*b, a.clone())).collect(), 2).unwrap();
        let p = *two.groups().keys().next().unwrap();
        let three = two.add_brick(BrickId(2), bricks[&BrickId(2)].clone()).unwrap();
        let moving = three.begin_join(&[(p, BrickId(2))]).unwrap();
        let leaving = moving.finish_join(&[(p, BrickId(2))], &[(p, BrickId(0))]).unwrap();
        let left = Arc::new(leaving.drop_leaving(&[(p, BrickId(0))]).unwrap());
        let back = Arc::new(left.begin_join(&[(p, BrickId(0))]).unwrap());
        let readable = Arc::new(back.finish_join(&[(p, BrickId(0))], &[]).unwrap());

        let mut shard = Shard::new(0, 1, 0, BrickId(0), Arc::new(two.clone()));
        let (mut log, mut next_lsn) = (Vec::new(), 1);
        let mut step = |shard: &mut Shard, f: &mut dyn FnMut(&mut Shard, &mut Effects)| {
            let mut fx = Effects::new(next_lsn);
            f(shard, &mut fx);
            log.extend_from_slice(&fx.batch);
            next_lsn = fx.next_lsn;
        };
        let prepare = |s: &mut Shard, fx: &mut Effects, key: &[u8], txid: TxId, value: &[u8]| {
            let mut body = Vec::new();
            PrepareBody::encode(txid, WriteKind::Put, &[0, 1], value, &mut body);
            let info = BrickInfo { partition_bits: 0, core: 0, ports: vec![1] };
            let mut out = Vec::new();
            s.execute(CONN, &Frame { kind: Kind::Request(Op::Prepare), request_id: 1, epoch: s.epoch(), key, value: &body }, &info, &mut out, fx);
            assert_eq!(decode(&out).unwrap().unwrap().0.kind, Kind::Reply(Op::Prepare, Status::Ok));
        };
        let (t1, t2) = (TxId { client: 1, seq: 1 }, TxId { client: 1, seq: 2 });
        step(&mut shard, &mut |s, fx| s.install_map(Arc::new(two.clone()), fx));
        step(&mut shard, &mut |s, fx| prepare(s, fx, b"kept", t1, b"v1"));
        step(&mut shard, &mut |s, fx| assert!(s.decide(b"kept", t1, true, fx)));
        step(&mut shard, &mut |s, fx| prepare(s, fx, b"late", t2, b"v2"));
        // A read parked on the prepared write while this replica served the partition.
        let info = BrickInfo { partition_bits: 0, core: 0, ports: vec![1] };
        let mut out = Vec::new();
        shard.execute(CONN, &Frame { kind: Kind::Request(Op::Get), request_id: 7, epoch: shard.epoch(), key: b"late", value: b"" }, &info, &mut out, &mut Effects::new(1));
        assert!(out.is_empty(), "a read of a prepared key waits");
        let mut refused = Vec::new();
        for m in [Arc::new(three), Arc::new(moving), Arc::new(leaving), Arc::clone(&left)] {
            step(&mut shard, &mut |s, fx| {
                s.install_map(Arc::clone(&m), fx);
                refused.append(&mut fx.deferred);
            });
        }
        assert_eq!(refused.len(), 1, "the parked read is answered at the leave");
        let (frame, _) = decode(&refused[0].1).unwrap().unwrap();
        assert_eq!((frame.kind, frame.request_id), (Kind::Reply(Op::Get, Status::Unavailable), 7), "refused, never answered from data that is gone");
        assert_eq!((shard.stats.keys, shard.lookup(b"kept").0), (0, None), "a left partition's keys are dropped");
        step(&mut shard, &mut |s, fx| assert!(s.decide(b"late", t2, true, fx)));
        assert_eq!(shard.lookup(b"late").0, None, "a write decided after the leave is not kept");
        step(&mut shard, &mut |s, fx| s.install_map(Arc::clone(&back), fx));
        let mut chunk = Vec::new();
        Chunk::start(&mut chunk, p.0, 0, 0, true);
        Chunk::push_entry(&mut chunk, b"kept", b"v3");
        step(&mut shard, &mut |s, fx| assert_eq!(s.install(back.epoch(), &chunk, fx), Ok(1)));
        step(&mut shard, &mut |s, fx| s.install_map(Arc::clone(&readable), fx));
        let live: BTreeMap<Vec<u8>, Vec<u8>> = shard.entries().into_iter().collect();

        // The restart: replay every logged record, then the map the brick starts with.
        let mut again = Shard::new(0, 1, 0, BrickId(0), Arc::clone(&readable));
        let mut lsn = 0;
        crate::log::record::scan(&log, |r| {
            lsn += 1;
            again.replay(&r.mutation, LogAt::default());
        })
        .unwrap();
        assert!(lsn > 0);
        again.install_map(Arc::clone(&readable), &mut Effects::new(1));
        let replayed: BTreeMap<Vec<u8>, Vec<u8>> = again.entries().into_iter().collect();
        assert_eq!(replayed, live);
        assert_eq!(replayed, BTreeMap::from([(b"kept".to_vec(), b"v3".to_vec())]));
        assert_eq!(again.stats.keys, 1);
    }

    #[test]
    fn two_copies_of_one_partition_interleave_and_each_gets_every_key_once() {
        // Partition p on brick 0, joining bricks 1 and 2 at once (two lanes of the copy
        // driver): their reads interleave on one core, each by its own window.
        let bricks: BTreeMap<_, _> = (0..3).map(|i| (BrickId(i), BrickAddr::tcp(vec![]))).collect();
        let one = ClusterMap::initial(0, bricks.iter().take(1).map(|(b, a)| (*b, a.clone())).collect(), 1).unwrap();
        let three = one.add_brick(BrickId(1), bricks[&BrickId(1)].clone()).unwrap().add_brick(BrickId(2), bricks[&BrickId(2)].clone()).unwrap();
        let p = *three.groups().keys().next().unwrap();
        let joining = Arc::new(three.begin_join(&[(p, BrickId(1)), (p, BrickId(2))]).unwrap());
        let mut source = Shard::new(0, 1, 0, BrickId(0), Arc::clone(&joining));
        let key = |i: usize| format!("key {i}").into_bytes();
        for i in 0..600 {
            source.mutate(&key(i), Some((&[7u8; 1024], LogAt::default())));
        }
        // Removed during the copies, before either reached it: sent to neither.
        let last = (0..600).max_by_key(|&i| key_hash(&key(i))).unwrap();
        let (epoch, mut fx) = (joining.epoch(), Effects::new(1));
        let mut read = |source: &mut Shard, from: u64, token: u64| {
            let mut out = Vec::new();
            let status = source.snapshot_chunk(epoch, &SnapshotRequest::read(p.0, from, token).to_bytes(), &mut out, &mut fx);
            assert_eq!(status, Status::Ok, "{}", String::from_utf8_lossy(&out));
            let c = Chunk::decode(&out).unwrap();
            (c.entries().map(|(k, _)| k.to_vec()).collect::<Vec<_>>(), c.next, c.token, c.done)
        };
        let (mut got, mut at, mut done) = ([Vec::new(), Vec::new()], [(0u64, 0u64); 2], [false; 2]);
        let mut chunks = 0;
        while !(done[0] && done[1]) {
            for c in 0..2 {
                if done[c] {
                    continue;
                }
                let (keys, next, token, last_chunk) = read(&mut source, at[c].0, at[c].1);
                got[c].extend(keys);
                at[c] = (next, token);
                done[c] = last_chunk;
                chunks += 1;
            }
            if chunks == 2 {
                source.mutate(&key(last), None);
            }
            assert!(chunks < 100, "the copies never finished");
        }
        assert!(chunks >= 6, "600 KiB in chunks of at most 256 KiB, twice: {chunks} chunks");
        for keys in &mut got {
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), keys.len(), "a key sent twice");
            let want: BTreeSet<Vec<u8>> = (0..600).filter(|&i| i != last).map(key).collect();
            assert_eq!(sorted.into_iter().collect::<BTreeSet<_>>(), want);
        }
        assert!(source.copy_windows.is_empty(), "finished copies leave no window behind");
        // A copy that read from an earlier incarnation of the source is refused, not
        // resumed: its probe saw what that incarnation had pending, not this one.
        let mut restarted = Shard::new(0, 1, 0, BrickId(0), Arc::clone(&joining));
        restarted.set_token_base(1 << 40);
        let mut out = Vec::new();
        let status = restarted.snapshot_chunk(epoch, &SnapshotRequest::read(p.0, at[0].0 / 2, at[0].1).to_bytes(), &mut out, &mut Effects::new(1));
        assert_eq!(status, Status::Conflict, "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn a_catch_up_moves_only_differing_buckets_and_carries_removals() {
        // Brick 1 held partition p with brick 0, left, and joins again with its old data:
        // 200 keys, of which the source has since changed 10, removed 5 and added 5.
        let bricks: BTreeMap<_, _> = (0..2).map(|i| (BrickId(i), BrickAddr::tcp(vec![]))).collect();
        let one = ClusterMap::initial(0, bricks.iter().take(1).map(|(b, a)| (*b, a.clone())).collect(), 1).unwrap();
        let two = one.add_brick(BrickId(1), bricks[&BrickId(1)].clone()).unwrap();
        let p = *two.groups().keys().next().unwrap();
        let joining = Arc::new(two.begin_join(&[(p, BrickId(1))]).unwrap());
        let key = |i: usize| format!("key {i}").into_bytes();
        let mut source = Shard::new(0, 1, 0, BrickId(0), Arc::clone(&joining));
        let mut target = Shard::new(0, 1, 0, BrickId(1), Arc::new(two.clone()));
        for i in 0..200 {
            source.mutate(&key(i), Some((b"old", LogAt::default())));
            target.mutate(&key(i), Some((b"old", LogAt::default())));
        }
        for i in 0..10 {
            source.mutate(&key(i), Some((b"new", LogAt::default())));
        }
        for i in 10..15 {
            source.mutate(&key(i), None);
        }
        for i in 200..205 {
            source.mutate(&key(i), Some((b"added", LogAt::default())));
        }
        let mut fx = Effects::new(1);
        target.install_map(Arc::clone(&joining), &mut fx);
        assert_eq!(target.stats.keys, 200, "a joining brick keeps its earlier data");
        // A write since the join: the repair must leave it, even where the source differs.
        let epoch_of_join = joining.epoch();
        target.mutate(&key(0), Some((b"since the join", LogAt::default())));
        target.note_joining_write(&key(0), epoch_of_join);
        let epoch = joining.epoch();
        let mut out = Vec::new();
        target.digests(epoch, &DigestRequest { partition: p.0, log2: 0, from: 0, count: 0 }.to_bytes(), &mut out, &mut fx).unwrap();
        let (held, _) = crate::proto::catchup::decode_digest_reply(&out).unwrap();
        let log2 = crate::proto::catchup::buckets_log2_for(held);
        let (mut from, mut sent_keys, mut changed) = (0u32, 0usize, 0usize);
        while u64::from(from) < 1u64 << log2 {
            let count = ((1u64 << log2) - u64::from(from)).min(8192) as u32;
            let mut out = Vec::new();
            target.digests(epoch, &DigestRequest { partition: p.0, log2, from, count }.to_bytes(), &mut out, &mut fx).unwrap();
            let (_, digests) = crate::proto::catchup::decode_digest_reply(&out).unwrap();
            let mut msg = Vec::new();
            source.diff(epoch, &DiffRequest { partition: p.0, log2, from, digests }.to_bytes(), &mut msg, &mut fx).unwrap();
            let b = Buckets::decode(&msg).unwrap();
            assert_eq!(b.next, from + count, "one reply holds the whole range");
            sent_keys += b.entries().count();
            changed += target.repair(epoch, &msg, &mut fx).unwrap();
            from += count;
        }
        let want: BTreeMap<Vec<u8>, Vec<u8>> =
            source.entries().into_iter().map(|(k, v)| (k.clone(), if k == key(0) { b"since the join".to_vec() } else { v })).collect();
        let got: BTreeMap<Vec<u8>, Vec<u8>> = target.entries().into_iter().collect();
        assert_eq!(got, want);
        // 19 keys differ (key 0 among them, kept); with about one key a bucket, the
        // buckets that differ bring about as many others again.
        assert_eq!(changed, 9 + 5 + 5);
        assert!(sent_keys < 3 * 20, "{sent_keys} keys sent for 20 that differ");
    }

    #[test]
    fn a_diff_reply_fits_one_frame_or_asks_for_more_buckets() {
        let map = solo_map(0);
        let p = *map.groups().keys().next().unwrap();
        let mut source = Shard::new(0, 1, 0, BrickId(0), Arc::clone(&map));
        for i in 0..3u8 {
            source.mutate(&[b'k', i], Some((&vec![i; 3 << 20], LogAt::default())));
        }
        let mut fx = Effects::new(1);
        let whole = DiffRequest { partition: p.0, log2: 0, from: 0, digests: vec![0] };
        let refused = source.diff(map.epoch(), &whole.to_bytes(), &mut Vec::new(), &mut fx);
        assert!(matches!(&refused, Err((Status::Conflict, why)) if why.contains("more than a frame")), "{refused:?}");
        // With 16 buckets every reply fits a frame, and following `next` brings all.
        let (mut from, mut got) = (0u32, 0);
        while from < 16 {
            let req = DiffRequest { partition: p.0, log2: 4, from, digests: vec![0; (16 - from) as usize] };
            let mut out = Vec::new();
            source.diff(map.epoch(), &req.to_bytes(), &mut out, &mut fx).unwrap();
            assert!(out.len() <= VALUE_LEN_MAX);
            let b = Buckets::decode(&out).unwrap();
            got += b.entries().count();
            assert!(b.next > from);
            from = b.next;
        }
        assert_eq!(got, 3);
    }

    #[test]
    fn a_commit_is_remembered_after_many_more_decisions_of_other_coordinators() {
        let mut outcomes = Outcomes::default();
        let early = TxId { client: 1, seq: 7 };
        outcomes.record(early, true, b"k");
        outcomes.record(TxId { client: 1, seq: 5 }, false, b"k");
        // A busy coordinator decides far more than the keyed memory holds.
        for seq in 1..=(OUTCOMES_MAX as u64 * 2) {
            outcomes.record(TxId { client: 2, seq }, true, b"j");
        }
        assert!(!outcomes.state.contains_key(&early), "gone from the keyed memory");
        assert_eq!(outcomes.get(early), Some(true), "still in its coordinator's window");
        assert_eq!(outcomes.get(TxId { client: 1, seq: 5 }), Some(false), "decided out of order");
        assert_eq!(outcomes.get(TxId { client: 1, seq: 6 }), None, "never seen");
        // The busy coordinator's own window slides: its oldest are forgotten.
        assert_eq!(outcomes.get(TxId { client: 2, seq: 1 }), if OUTCOMES_MAX * 2 > WINDOW_SEQS { None } else { Some(true) });
        assert_eq!(outcomes.get(TxId { client: 2, seq: OUTCOMES_MAX as u64 * 2 }), Some(true));
        // Coordinators beyond the bound push out the one that decided least recently.
        for client in 3..(3 + WINDOW_CLIENTS_MAX as u64) {
            outcomes.record(TxId { client, seq: 1 }, true, b"c");
        }
        assert_eq!(outcomes.windows.len(), WINDOW_CLIENTS_MAX);
        assert!(!outcomes.windows.contains_key(&1) && !outcomes.windows.contains_key(&2));
    }

    #[test]
    fn in_doubt_rule() {
        let bricks: BTreeMap<_, _> = (0..3).map(|i| (BrickId(i), BrickAddr::tcp(vec![]))).collect();
        let map = ClusterMap::initial(2, bricks, 3).unwrap();
        let p = |answers: Vec<(u32, TxState)>| Prepared {
            txid: TxId { client: 1, seq: 1 },
            kind: WriteKind::Put,
            value: Box::new([]),
            participants: [0u32, 1, 2].iter().flat_map(|b| b.to_le_bytes()).collect(),
            epoch: 1,
            since_ms: 0,
            waiters: vec![],
            answers,
            answers_epoch: 1,
            asked_ms: None,
            at: LogAt::default(),
        };
        let me = BrickId(0);
        assert_eq!(resolve_rule(&map, me, &p(vec![])), None);
        assert_eq!(resolve_rule(&map, me, &p(vec![(1, TxState::Prepared)])), None);
        assert_eq!(resolve_rule(&map, me, &p(vec![(1, TxState::Prepared), (2, TxState::Prepared)])), Some(true));
        assert_eq!(resolve_rule(&map, me, &p(vec![(1, TxState::Prepared), (2, TxState::Aborted)])), Some(false));
        assert_eq!(resolve_rule(&map, me, &p(vec![(2, TxState::Committed)])), Some(true));
        let without_2 = map.remove_brick(BrickId(2)).unwrap();
        assert_eq!(resolve_rule(&without_2, me, &p(vec![(1, TxState::Prepared)])), Some(true), "a removed participant is dead");
    }
}
