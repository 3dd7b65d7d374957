//! A simulated brick: the real `CoreRound` and `Storage` per core, driven the way
//! `brick::core_loop` and `brick::control` drive them: rounds that execute every queued
//! frame, log the round's records in one write (and one sync when a record must be
//! durable first) and only then release the round's replies, with checkpoint work
//! between rounds; in-doubt questions to peers; the lease's calls on the session.
//! Start-up registers, then recovers each core through `brick::recover` on the
//! brick's simulated disk, as the real brick does.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use dds_transport::ConnId;
use rand::Rng;

use crate::brick::lease::{self, Answer, Lease, Step};
use crate::proto::LEASE_MS;
use crate::brick::round::{lease_expired, TICK_MS};
use crate::brick::{recover, Control, CoreRound, Durability, Shard, Storage};
use crate::hash::HashMap;
use crate::log::Disk as _;
use crate::log::mem_disk::MemDisk;
use crate::log::LogError;
use crate::map::{key_hash, BrickAddr, BrickId, ClusterMap, PartitionId};
use crate::proto::{decode_exact, BrickInfo, Buckets, Chunk, Kind, Op, SnapshotRequest, Status};

use super::authority::{member_addr, member_of};
use super::net::{Call, Endpoint, LinkId, Msg};
use crate::brick::control::Authorities;
use super::{core_addr, Event, Micros, World, MS};

/// Frames one core takes from one link per round: the transport's fairness bound
/// (`TcpConfig::reads_per_round_max`), one frame per read, the fewest a read holds.
fn frames_per_link_max() -> usize {
    dds_transport::TcpConfig::default().reads_per_round_max
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Down,
    /// Registered or registering, waiting for the authority's answer or first map.
    Starting,
    Up,
    /// Stopped on an error it must not retry (failed sync, full disk) or refused to
    /// start (corrupt log): stays down until restarted (a corrupt one, wiped).
    Stopped(String),
}

pub(crate) struct SimCore {
    /// The core's round: the same state machine the core thread drives.
    round: CoreRound,
    /// Its log segments and checkpoint, on the brick's simulated disk.
    storage: Storage<MemDisk>,
    inbox: VecDeque<(LinkId, Vec<u8>)>,
    /// A round's log write (and sync) is under way; frames wait in the inbox.
    busy: bool,
    round_due: bool,
    sync_pending: bool,
    /// Checkpoints its storage had finished at the last round's end (one more is a
    /// worst moment: `checkpoint_done`).
    checkpoints: u64,
}

/// What a core reads of its brick's control plane, as of the simulated now: the
/// lease by the clock of the moment the request executes (`Shared::is_fenced`).
struct SimControl {
    fenced: bool,
    map: Option<Arc<ClusterMap>>,
}

impl Control for SimControl {
    fn fenced(&self) -> bool {
        self.fenced
    }

    fn newer_map(&self, epoch: u64) -> Option<Arc<ClusterMap>> {
        self.map.clone().filter(|m| m.epoch() > epoch)
    }
}

pub(crate) struct SimBrick {
    cores_n: usize,
    /// The id the authority gave (kept across restarts, as `identity.json`).
    pub id: Option<BrickId>,
    /// Incarnation: bumped at every start, so a dead brick's timers are void.
    pub life: u64,
    pub state: State,
    /// Its directory: every core's log and checkpoint.
    disk: MemDisk,
    cores: Vec<SimCore>,
    map: Option<Arc<ClusterMap>>,
    /// The brick's lease: the machine the control thread drives.
    lease: Lease,
    session_link: Option<LinkId>,
    /// The lease's call on the wire, and the step that made it.
    lease_call: Option<(Call, Step)>,
    /// The id of the next request on the session.
    next_call_id: u64,
    /// The authority's members and the one it asks (`control::Authorities`, as the
    /// control thread keeps them).
    meta: Authorities,
    pub paused_until: Micros,
    /// How much later than the cores its control thread runs again after a pause.
    control_lag: Micros,
    /// Down until then: no restart (not even when the faults stop) comes earlier.
    down_until: Micros,
}

/// Which of a paused brick's threads an event waits for (`World::deferred`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waker {
    /// A message to a core: delivered on resume, in order.
    Message,
    /// A core's own timer.
    Timer,
    /// The control thread: its session's messages and its timers.
    Control,
}

/// Where a simulated brick keeps its files (each brick has a disk of its own).
const BRICK_DIR: &str = "/brick";

/// The token brick `b`'s directory drew when it was made (`control::load_or_make_token`):
/// its directory never changes, so neither does the token.
fn dir_token(b: usize) -> u64 {
    b as u64 + 1
}

impl SimBrick {
    pub fn new(cores_n: usize, members: usize) -> SimBrick {
        SimBrick {
            cores_n,
            id: None,
            life: 0,
            state: State::Down,
            disk: MemDisk::default(),
            cores: Vec::new(),
            map: None,
            lease: Lease::starting(None, 0),
            session_link: None,
            lease_call: None,
            next_call_id: 1,
            meta: Authorities::new(&(0..members).map(member_addr).collect::<Vec<_>>()),
            paused_until: 0,
            control_lag: 0,
            down_until: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up | State::Starting)
    }

    pub fn serving(&self) -> bool {
        self.state == State::Up && !self.lease.fenced()
    }

    /// Up with a lease that has not run out by `now_ms` (what its cores check).
    pub fn leased(&self, now_ms: u64) -> bool {
        self.serving() && !lease_expired(self.lease.lease_from_ms(), now_ms, LEASE_MS)
    }

    /// The member its control thread asks for leases.
    pub fn asks(&self) -> Option<usize> {
        member_of(self.meta.current())
    }

    pub fn state_name(&self) -> String {
        format!("{:?}{}", self.state, if self.lease.fenced() { ", fenced" } else { "" })
    }

    /// Some core's log holds bytes it has not synced.
    pub fn unsynced(&self) -> bool {
        self.disk.unsynced()
    }

    /// Runs `epoch` everywhere, holds nothing prepared, has no work queued.
    pub fn settled(&self, epoch: u64) -> bool {
        self.cores.iter().all(|c| c.round.shard().epoch() == epoch && c.round.shard().prepared_len() == 0 && c.inbox.is_empty() && !c.busy)
    }

    pub fn unsettled(&self, epoch: u64) -> String {
        self.cores
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let io = if c.busy { ", writing its log" } else { "" };
                format!("core {i}: epoch {}/{epoch}, {} prepared, {} queued{io}", c.round.shard().epoch(), c.round.shard().prepared_len(), c.inbox.len())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every entry this brick's cores hold whose key hashes into `p`.
    pub fn entries_of(&self, p: PartitionId) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        self.cores.iter().flat_map(|c| c.round.shard().entries()).filter(|(k, _)| p.contains(key_hash(k))).collect()
    }

    /// `key`'s committed value on the core that owns it, and whether a write to it is
    /// prepared there (`None`: no core of this brick owns it).
    pub fn lookup(&self, key: &[u8]) -> Option<(Option<std::borrow::Cow<'_, [u8]>>, bool)> {
        let map = self.map.as_ref()?;
        self.cores.get(map.core_of(key_hash(key), self.cores.len().max(1))).map(|c| c.round.shard().lookup(key))
    }

    /// Keys a core holds of partitions whose group, in that core's own map, does not
    /// include this brick and is not short (a partition it left whose data stayed): how
    /// many, and one of those partitions. A core whose map no longer has the brick is skipped: the brick
    /// is stopping.
    pub fn stray_keys(&self) -> Option<(BrickId, usize, PartitionId)> {
        let me = self.id?;
        let (mut n, mut some) = (0, None);
        for c in &self.cores {
            let shard = c.round.shard();
            let map = shard.map();
            if !map.bricks().contains_key(&me) {
                continue;
            }
            for k in shard.keys() {
                let (p, group) = map.route(key_hash(k));
                // A short group's data is kept to catch up from (`Shard::keeps`).
                if !group.contains(&me) && !map.is_short(p) {
                    n += 1;
                    some = Some(p);
                }
            }
        }
        some.map(|p| (me, n, p))
    }

    /// Digest input: every entry, in key order.
    pub fn all_entries(&self) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        self.cores.iter().flat_map(|c| c.round.shard().entries()).collect()
    }
}

fn conn_of(link: LinkId) -> ConnId {
    ConnId { slot: link.0 as u32, generation: (link.0 >> 32) as u32 }
}

fn link_of(conn: ConnId) -> LinkId {
    LinkId(conn.slot as u64 | (conn.generation as u64) << 32)
}

impl World {
    pub(crate) fn start_brick(&mut self, b: usize) {
        let now_ms = self.now_ms();
        let brick = &mut self.bricks[b];
        brick.life += 1;
        brick.state = State::Starting;
        brick.cores.clear();
        brick.map = None;
        brick.lease = Lease::starting(brick.id, now_ms);
        brick.lease_call = None;
        let (life, id) = (brick.life, brick.id);
        self.note(format!("brick {b} (id {id:?}) starts, incarnation {life}"));
        self.lease_step(b, false);
    }

    pub(crate) fn restart(&mut self, b: usize) {
        let until = self.bricks[b].down_until;
        if self.now < until {
            return self.schedule(until, Event::Restart { brick: b });
        }
        match &self.bricks[b].state {
            State::Up | State::Starting => {}
            _ => self.start_brick(b),
        }
    }

    /// The process dies (`power_loss`: the machine, with un-synced writes).
    pub(crate) fn crash(&mut self, b: usize, why: &str, power_loss: bool) {
        let brick = &mut self.bricks[b];
        if !brick.is_up() {
            return;
        }
        brick.state = State::Down;
        brick.cores.clear();
        brick.map = None;
        brick.session_link = None;
        let mut lost = 0;
        if power_loss {
            lost = brick.disk.lose_power(&mut self.rng);
        }
        self.note(format!("brick {b}: {why}{}", if power_loss { format!(" ({lost} un-synced log bytes lost)") } else { String::new() }));
        self.break_links_of(Endpoint::Brick(b), !power_loss);
    }

    /// Stops the brick for good on an error the design says must never be retried.
    fn stop_brick(&mut self, b: usize, why: String) {
        self.crash(b, &why, false);
        self.bricks[b].state = State::Stopped(why);
        // Its supervisor starts it again.
        let down_ms = self.rng.random_range(100..=2000);
        self.after(down_ms * MS, Event::Restart { brick: b });
    }

    pub(crate) fn pause(&mut self, b: usize, micros: Micros) {
        self.note(format!("brick {b} pauses for {} ms", micros / MS));
        let brick = &mut self.bricks[b];
        brick.paused_until = brick.paused_until.max(self.now + micros);
        // After a stop, the threads run again in any order: the control thread (which
        // may hold the authority's refusal) can come back well after the cores.
        brick.control_lag = self.rng.random_range(0..=100) * MS;
    }

    /// Events for a paused brick wait until it resumes. Messages keep their order; the
    /// cores' timers land among them in random order, as threads do after a stop; the
    /// control thread's messages and timers come `control_lag` later.
    fn deferred(&mut self, b: usize, waker: Waker) -> Option<Micros> {
        let until = self.bricks[b].paused_until;
        if until <= self.now {
            return None;
        }
        Some(match waker {
            Waker::Message => until,
            Waker::Timer => until + self.rng.random_range(0..=500),
            Waker::Control => until + self.bricks[b].control_lag,
        })
    }

    pub(crate) fn brick_receive(&mut self, b: usize, link: LinkId, bytes: Msg) {
        let waker = if self.bricks[b].session_link == Some(link) { Waker::Control } else { Waker::Message };
        if let Some(at) = self.deferred(b, waker) {
            return self.schedule(at, Event::Deliver { link, to: Endpoint::Brick(b), msg: bytes });
        }
        if self.bricks[b].session_link == Some(link) {
            return self.lease_reply(b, link, &bytes);
        }
        if self.net.opener(link) == Some(Endpoint::Brick(b)) {
            // A frame on a link this brick opened: an answer from a peer.
            return self.peer_answer(b, link, bytes);
        }
        let Some((life, core)) = self.net.target_core(link) else { return };
        if life != self.bricks[b].life || self.bricks[b].state != State::Up {
            return self.break_link(link, true);
        }
        let c = &mut self.bricks[b].cores[core];
        c.inbox.push_back((link, bytes));
        self.wake_core(b, core);
    }

    /// Registration answered with a map: recover every core's log and checkpoint
    /// (`storage::recover`, as the brick does), then serve.
    fn boot(&mut self, b: usize, map: ClusterMap) {
        let brick = &mut self.bricks[b];
        let me = brick.id.expect("registered");
        let map = Arc::new(map);
        let mut cores = Vec::new();
        let mut failure = None;
        let mut intact_refused = false;
        let preallocate = self.shape.durability == Durability::Sync;
        for c in 0..brick.cores_n {
            // A read error (a flipped bit between disk and memory): this start must stop
            // cleanly, or drop the record as a torn tail if nothing valid follows it.
            // The fault is in the reading, not on the platter, so the next start reads
            // the log intact: a wiped replica would be a second failure of its group.
            let intact = (self.faults_on && self.rng.random_bool(self.shape.read_corrupt_p)).then(|| {
                brick.disk.misread_next(self.rng.random());
                brick.disk.snapshot()
            });
            let mut shard = Shard::new(c, brick.cores_n, map.base_bits(), me, Arc::clone(&map));
            shard.set_token_base(brick.life << 40);
            let recovered = recover(brick.disk.clone(), c, Path::new(BRICK_DIR), &mut shard, self.shape.checkpoint_log_bytes, preallocate, self.shape.values);
            let misread = brick.disk.take_misread();
            match recovered {
                // Dropping a good record for a misread one (as a torn tail) would lose an
                // acknowledged write; a real brick cannot tell. Outside the fault model:
                // counted as a stop, and the disk is as it was before the start.
                Ok(_) if misread => {
                    brick.disk.restore(intact.expect("armed"));
                    failure = Some(format!("core {c}: misread the last record; stopped"));
                    break;
                }
                Ok((storage, next_lsn)) => {
                    let info = BrickInfo { partition_bits: map.base_bits(), core: c as u16, ports: Vec::new() };
                    let mut round = CoreRound::new(shard, info, self.shape.durability, next_lsn, storage.position());
                    round.begin(&SimControl { fenced: false, map: None });
                    cores.push(SimCore { round, storage, inbox: VecDeque::new(), busy: false, round_due: false, sync_pending: false, checkpoints: 0 });
                }
                Err(e) => {
                    // Only a misread corrupts a log here: one that crashes left as they
                    // leave it must start.
                    intact_refused = !misread && matches!(e, LogError::Corrupt { .. } | LogError::CorruptCheckpoint { .. });
                    failure = Some(format!("core {c}: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = failure {
            if intact_refused {
                return self.fail(format!("brick {b}: a log that only crashes touched was called corrupt: {why}"));
            }
            self.note(format!("brick {b}: {why}"));
            self.crash(b, "refused to start", false);
            self.bricks[b].state = State::Stopped(why);
            if self.faults_on {
                let down_ms = self.rng.random_range(100..=2000);
                self.after(down_ms * MS, Event::Restart { brick: b });
            }
            return;
        }
        let brick = &mut self.bricks[b];
        brick.cores = cores;
        brick.map = Some(map);
        brick.state = State::Up;
        let life = brick.life;
        self.note(format!("brick {b} is up as {me}"));
        for core in 0..self.bricks[b].cores_n {
            self.after(TICK_MS * MS, Event::CoreTick { brick: b, life, core });
        }
        // A core writes the records its first map made (stale keys of joined partitions).
        self.wake_cores(b);
    }

    fn wake_cores(&mut self, b: usize) {
        for c in 0..self.bricks[b].cores.len() {
            self.wake_core(b, c);
        }
    }

    fn wake_core(&mut self, b: usize, c: usize) {
        let core = &mut self.bricks[b].cores[c];
        if !core.busy && !core.round_due {
            core.round_due = true;
            let life = self.bricks[b].life;
            self.after(0, Event::CoreRound { brick: b, life, core: c });
        }
    }

    /// A core's loop wakes at least every `TICK_MS`, work or not (its poll timeout).
    pub(crate) fn core_tick(&mut self, b: usize, life: u64, c: usize) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        self.wake_core(b, c);
        self.after(TICK_MS * MS, Event::CoreTick { brick: b, life, core: c });
    }

    /// The control thread's timer (`control::heartbeat_loop`'s sleep).
    pub(crate) fn lease_timer(&mut self, b: usize, life: u64) {
        if self.bricks[b].life != life || !self.bricks[b].is_up() {
            return;
        }
        if let Some(at) = self.deferred(b, Waker::Control) {
            return self.schedule(at, Event::Lease { brick: b, life });
        }
        self.lease_step(b, false);
    }

    /// A frame from the authority on the session: the answer to the lease's call, if
    /// one is still out (`control::call`); a malformed one loses the session.
    fn lease_reply(&mut self, b: usize, link: LinkId, bytes: &[u8]) {
        let now_ms = self.now_ms();
        let brick = &mut self.bricks[b];
        if !brick.is_up() {
            return;
        }
        let Some((call, step)) = brick.lease_call.take() else { return };
        let reply = call.reply(bytes);
        brick.meta.after_call(matches!(step, Step::Register { .. }), reply.as_ref().ok().map(|(status, value)| (*status, &value[..])));
        if reply.is_err() {
            self.break_link(link, true);
        }
        self.bricks[b].lease.answer(lease::answer_of(&step, reply), now_ms);
        self.lease_step(b, false);
    }

    /// Drives brick `b`'s lease until it waits: for an answer, or for its next beat.
    /// `refresh`: a core saw a request from a newer epoch.
    pub(crate) fn lease_step(&mut self, b: usize, refresh: bool) {
        loop {
            let now_ms = self.now_ms();
            let brick = &mut self.bricks[b];
            if !brick.is_up() {
                return;
            }
            if let Some((call, step)) = &brick.lease_call {
                if self.now < call.sent + LEASE_MS * MS {
                    return;
                }
                // The call timed out (`LEASE_MS`, as the control thread's rpc does).
                brick.meta.after_call(matches!(step, Step::Register { .. }), None);
                brick.lease_call = None;
                brick.lease.answer(Answer::Lost("timed out".into()), now_ms);
                continue;
            }
            let life = brick.life;
            match brick.lease.poll(now_ms, refresh) {
                step @ Step::Register { .. } => {
                    if let Some(old) = brick.session_link.take() {
                        self.break_link(old, true);
                    }
                    let member = member_of(self.bricks[b].meta.current()).expect("a member's address");
                    let link = self.open_link(Endpoint::Brick(b), Endpoint::Member(member), None);
                    self.bricks[b].session_link = Some(link);
                    return self.lease_call(b, link, step);
                }
                step @ Step::Beat { .. } => match brick.session_link.filter(|l| self.net.alive(*l)) {
                    Some(link) => return self.lease_call(b, link, step),
                    None => brick.lease.answer(Answer::Lost("the session closed".into()), now_ms),
                },
                Step::HangUp => {
                    if let Some(link) = brick.session_link.take() {
                        self.break_link(link, true);
                    }
                }
                Step::Keep(id) => brick.id = Some(id),
                Step::Boot(map) => self.boot(b, map),
                Step::Install(map) => {
                    brick.map = Some(Arc::new(map));
                    self.wake_cores(b);
                }
                Step::Idle { until_ms } => {
                    if until_ms != u64::MAX {
                        self.schedule(until_ms * MS, Event::Lease { brick: b, life });
                    }
                    return;
                }
                Step::Note(note) => self.note(format!("brick {b}: {note}")),
                Step::Stop(why) => return self.stop_brick(b, why),
            }
        }
    }

    /// Sends the lease's call (`control::call`) on the session `link`.
    fn lease_call(&mut self, b: usize, link: LinkId, step: Step) {
        let ports = self.ports_life(b);
        let brick = &mut self.bricks[b];
        let (life, id) = (brick.life, brick.next_call_id);
        brick.next_call_id += 1;
        let addr = BrickAddr { cores: (0..brick.cores_n).map(|c| core_addr(b, ports, c)).collect(), rdma: Vec::new(), token: dir_token(b) };
        let (op, epoch, value) = lease::request(&step, &addr);
        let call = self.call(link, Endpoint::Brick(b), op, epoch, &value, id);
        self.bricks[b].lease_call = Some((call, step));
        self.after(LEASE_MS * MS, Event::Lease { brick: b, life });
    }

    pub(crate) fn brick_link_down(&mut self, b: usize, link: LinkId) {
        let waker = if self.bricks[b].session_link == Some(link) { Waker::Control } else { Waker::Message };
        if let Some(at) = self.deferred(b, waker) {
            return self.schedule(at, Event::LinkDown { link, to: Endpoint::Brick(b) });
        }
        let brick = &mut self.bricks[b];
        if brick.session_link == Some(link) {
            // The control thread's call on it fails; without one out, the next does.
            brick.session_link = None;
            if let Some((_, step)) = brick.lease_call.take() {
                brick.meta.after_call(matches!(step, Step::Register { .. }), None);
                let now_ms = self.now_ms();
                self.bricks[b].lease.answer(Answer::Lost("the session closed".into()), now_ms);
                self.lease_step(b, false);
            }
            return;
        }
        for core in &mut brick.cores {
            core.round.on_close(conn_of(link));
        }
    }

    /// What brick `b`'s cores read of its control plane now.
    fn control_of(&self, b: usize) -> SimControl {
        let brick = &self.bricks[b];
        // `Shared::is_fenced`: fenced, or the lease ran out by the clock of this moment.
        SimControl { fenced: brick.lease.fenced() || lease_expired(brick.lease.lease_from_ms(), self.now_ms(), LEASE_MS), map: brick.map.clone() }
    }

    /// One round of a core's loop (`core_loop::run`): the frames that came since the
    /// last round (its top, `begin`, ran when the last round ended: the core then
    /// waited in the kernel, where a pause may land), the tick, and the group commit.
    pub(crate) fn core_round(&mut self, b: usize, life: u64, c: usize) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        if let Some(at) = self.deferred(b, Waker::Timer) {
            return self.schedule(at, Event::CoreRound { brick: b, life, core: c });
        }
        let now_ms = self.now_ms();
        let control = self.control_of(b);
        // `dds-sim --seed N --watch KEY` prints every request on that key.
        let watch = self.options.watch.clone();
        let brick = &mut self.bricks[b];
        let map_id = brick.id.map(|i| i.0).unwrap_or(u32::MAX);
        let core = &mut brick.cores[c];
        core.round_due = false;
        let mut sent = Vec::new();
        let mut bad_links = Vec::new();
        let mut taken: HashMap<LinkId, usize> = HashMap::default();
        let mut later = VecDeque::new();
        let mut served = Vec::new();
        let mut installed = Vec::new();
        let per_link_max = frames_per_link_max();
        while let Some((link, bytes)) = core.inbox.pop_front() {
            let n = taken.entry(link).or_insert(0);
            if *n >= per_link_max || bad_links.contains(&link) {
                later.push_back((link, bytes));
                continue;
            }
            *n += 1;
            let mut out = Vec::new();
            if let Err(why) = core.round.on_frame(&control, conn_of(link), &bytes, &mut out) {
                self.trace.push(format!("{} brick {b} core {c}: closing a link: {why}", self.now));
                bad_links.push(link);
                continue;
            }
            if let Some(copied) = snapshot_done(&bytes, core.round.last_reply()) {
                served.push(copied);
            }
            if let Some(p) = chunk_taken(&bytes, core.round.last_reply()) {
                installed.push(p);
            }
            if let Some(w) = watch.as_deref() {
                if let Ok(frame) = decode_exact(&bytes) {
                    let in_chunk = frame.kind == Kind::Request(Op::Install) && frame.value.windows(w.len()).any(|x| x == w.as_bytes());
                    if w.as_bytes() == frame.key || in_chunk {
                        let reply = decode_exact(core.round.last_reply()).ok().map(|r| (r.kind, String::from_utf8_lossy(r.value).into_owned()));
                        eprintln!("[{:>9.3} ms] watch: brick {b} ({}) core {c} epoch {}: {:?} epoch {} value {:?} -> {reply:?}", now_ms as f64, map_id, core.round.shard().epoch(), frame.kind, frame.epoch, String::from_utf8_lossy(frame.value));
                    }
                }
            }
            if !out.is_empty() {
                sent.push((link, out));
            }
        }
        // Frames of a link that closed go with it.
        later.retain(|(l, _)| !bad_links.contains(l));
        core.inbox = later;
        let queries = core.round.tick(now_ms);
        let behind = core.round.take_behind();
        let failure = core.round.take_failure();
        let reads = core.round.take_reads();
        let at = core.round.log_at();
        let batch = core.round.batch().map(|(bytes, sync)| (bytes.to_vec(), sync));
        for (link, bytes) in sent {
            self.send(link, Endpoint::Brick(b), bytes);
        }
        for link in bad_links {
            self.break_link(link, true);
        }
        self.ask_peers(b, c, queries);
        for (p, epoch) in served {
            self.source_served(b, p, epoch);
        }
        for p in installed {
            self.target_installed(b, p);
        }
        if behind {
            // A request from a newer epoch: ask the authority now.
            self.lease_step(b, true);
        }
        if let Some(e) = failure {
            // The simulated disk never fails a read: a value that does not read back was
            // lost by the brick (a segment deleted under it, a wrong location).
            return self.fail(format!("brick {b} core {c}: a value did not read back: {e}"));
        }
        for read in reads {
            // The disk reads while the core goes on (`core_loop`'s ring of value reads).
            self.after(self.shape.read_us, Event::ReadDone { brick: b, life, core: c, read });
        }
        let Some((batch, must_sync)) = batch else { return self.end_round(b, c) };
        // Group commit: one write, and one sync if a record must be durable first.
        if self.faults_on && self.rng.random_bool(self.shape.disk_full_p) {
            return self.stop_brick(b, format!("core {c}: log write failed: no space left on device; brick stopped"));
        }
        let (write_us, sync_us) = (self.shape.write_us, self.shape.sync_us);
        // Written now, synced when the disk is done: `Storage::commit(batch, true)` in two
        // calls, so a power loss meanwhile finds the batch written but not synced.
        if let Err(e) = self.bricks[b].cores[c].storage.commit_batch(&batch, false, at) {
            return self.storage_failed(b, c, e);
        }
        let core_busy_us = write_us + if must_sync { sync_us } else { 0 };
        let core = &mut self.bricks[b].cores[c];
        core.busy = true;
        core.sync_pending = must_sync;
        self.after(core_busy_us, Event::DiskDone { brick: b, life, core: c });
    }

    /// A get's read of its value from the log completed: the simulated disk gives the
    /// bytes there now (a value's place is never written twice), and the reply leaves.
    pub(crate) fn read_done(&mut self, b: usize, life: u64, c: usize, read: crate::brick::ValueRead) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        if let Some(at) = self.deferred(b, Waker::Timer) {
            return self.schedule(at, Event::ReadDone { brick: b, life, core: c, read });
        }
        let path = crate::log::segment_path(Path::new(BRICK_DIR), c, read.loc.segment);
        let mut value = vec![0u8; read.loc.len as usize];
        let result = self.bricks[b].disk.read_at(&path, read.loc.offset, &mut value).map(|()| value).map_err(|source| LogError::Io { op: "read value", path, source });
        let mut out = Vec::new();
        let core = &mut self.bricks[b].cores[c];
        core.round.on_read(&read, result, &mut out);
        if let Some(e) = core.round.take_failure() {
            return self.fail(format!("brick {b} core {c}: a value did not read back: {e}"));
        }
        self.send(link_of(read.conn), Endpoint::Brick(b), out);
    }

    /// The round's log write (and sync) completed: its replies may leave.
    pub(crate) fn disk_done(&mut self, b: usize, life: u64, c: usize) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        if let Some(at) = self.deferred(b, Waker::Timer) {
            return self.schedule(at, Event::DiskDone { brick: b, life, core: c });
        }
        if self.bricks[b].cores[c].sync_pending {
            if self.faults_on && self.rng.random_bool(self.shape.sync_error_p) {
                return self.stop_brick(b, format!("core {c}: fdatasync failed (EIO); brick stopped, never retried"));
            }
            if let Err(e) = self.bricks[b].cores[c].storage.commit(&[], true) {
                return self.storage_failed(b, c, e);
            }
        }
        let core = &mut self.bricks[b].cores[c];
        core.busy = false;
        core.sync_pending = false;
        self.end_round(b, c);
    }

    /// The end of a round: the replies it held leave, and the next round's top reads
    /// the fence and the map before the core waits for more.
    fn end_round(&mut self, b: usize, c: usize) {
        let control = self.control_of(b);
        let mut released = Vec::new();
        let core = &mut self.bricks[b].cores[c];
        core.round.committed(|conn, bytes| released.push((link_of(conn), bytes.to_vec())));
        // Checkpoint work between rounds, as `core_loop::run` does it; while one is in
        // progress the core keeps going round.
        let (shard, next_lsn) = core.round.shard_and_lsn();
        let checkpointing = core.storage.step(shard, next_lsn);
        core.round.set_log_at(core.storage.position());
        core.round.begin(&control);
        // The cleaner's step, as `core_loop::run` takes it: into the round's batch.
        let (shard, fx) = core.round.shard_and_effects();
        let cleaning = core.storage.clean(shard, fx);
        let more = !core.inbox.is_empty() || checkpointing.as_ref().is_ok_and(|busy| *busy) || cleaning.as_ref().is_ok_and(|busy| *busy);
        let finished = core.storage.checkpoints() > core.checkpoints;
        core.checkpoints = core.storage.checkpoints();
        for (link, bytes) in released {
            self.send(link, Endpoint::Brick(b), bytes);
        }
        if let Err(e) = checkpointing.and(cleaning) {
            return self.storage_failed(b, c, e);
        }
        self.check_replicas();
        if finished {
            return self.checkpoint_done(b, c);
        }
        if more {
            self.wake_core(b, c);
        }
    }

    /// Core `c` of brick `b` finished a checkpoint (and trimmed the log before it). If
    /// another brick may be in doubt (it holds an undecided prepare, or is down and may
    /// come back with one), this one dies at the worst moment and comes back at once: the
    /// peer asks it about a transaction it knew the outcome of only through that log.
    fn checkpoint_done(&mut self, b: usize, c: usize) {
        let in_doubt = |brick: &SimBrick| brick.state != State::Up || brick.cores.iter().any(|c| c.round.shard().prepared_len() > 0);
        let in_doubt = self.bricks.iter().enumerate().any(|(x, brick)| x != b && in_doubt(brick));
        if !self.faults_on || !in_doubt || !self.rng.random_bool(0.5) {
            return self.wake_core(b, c);
        }
        self.crash(b, &format!("process crash (core {c} just finished a checkpoint, a peer in doubt)"), false);
        let down_ms = self.rng.random_range(20..=300);
        self.after(down_ms * MS, Event::Restart { brick: b });
    }

    /// Sends in-doubt questions to the peer cores that store their keys
    /// (`core_loop::ask_peers`).
    fn ask_peers(&mut self, b: usize, c: usize, queries: Vec<crate::brick::Query>) {
        for q in queries {
            let Some((peer, at)) = self.bricks[b].cores[c].round.peer_of(&q) else { continue };
            let existing = self.bricks[b].cores[c].round.peer_conn(peer).map(link_of).filter(|l| self.net.alive(*l));
            let Some(link) = existing.or_else(|| self.connect(Endpoint::Brick(b), at)) else { continue };
            let mut bytes = Vec::new();
            self.bricks[b].cores[c].round.ask(q, peer, conn_of(link), &mut bytes);
            self.send(link, Endpoint::Brick(b), bytes);
        }
    }

    /// A peer's answer to an in-doubt question: to the inbox of the core that asked
    /// it, as the transport hands it to the core that opened the connection. An answer
    /// nobody waits for any more goes to core 0, which drops it as any core would.
    fn peer_answer(&mut self, b: usize, link: LinkId, bytes: Vec<u8>) {
        if self.bricks[b].state != State::Up {
            return;
        }
        let request_id = decode_exact(&bytes).map(|f| f.request_id).unwrap_or(0);
        let c = self.bricks[b].cores.iter().position(|core| core.round.asked_on(request_id, conn_of(link))).unwrap_or(0);
        self.bricks[b].cores[c].inbox.push_back((link, bytes));
        self.wake_core(b, c);
    }

    /// Brick `b` has served the last chunk of partition `p`'s copy at `epoch`. If a
    /// write prepared under an older epoch is undecided on another member (the state
    /// the copy driver's probe rules out), the source dies at the worst moment: just
    /// after its chunk has left, for long enough to be removed, so the write may commit
    /// in doubt on the others, where the copy never saw it.
    fn source_served(&mut self, b: usize, p: PartitionId, epoch: u64) {
        let Some(map) = self.published() else { return };
        let (group, joining) = (map.groups().get(&p).cloned().unwrap_or_default(), map.joining().get(&p).cloned().unwrap_or_default());
        let up = |brick: &SimBrick, among: &[BrickId]| brick.state == State::Up && brick.id.is_some_and(|id| among.contains(&id));
        let pending = |brick: &SimBrick| up(brick, &group) && brick.cores.iter().any(|c| c.round.shard().pending_older(p, epoch));
        // Only while a joining replica is there to receive the chunk.
        let receiving = self.bricks.iter().any(|brick| up(brick, &joining));
        if !self.faults_on || !receiving || !self.bricks.iter().enumerate().any(|(x, brick)| x != b && pending(brick)) {
            return;
        }
        let life = self.bricks[b].life;
        self.note(format!("brick {b} served partition {p}'s copy while an older-epoch write is pending on another member"));
        self.after(5 * MS, Event::Crash { brick: b, life });
    }

    /// A crash scheduled for incarnation `life` of brick `b`; it stays down past the
    /// authority's removal timeout.
    pub(crate) fn crash_later(&mut self, b: usize, life: u64) {
        if self.bricks[b].life != life {
            return;
        }
        self.crash(b, "process crash (a copy's source, at the worst moment)", false);
        let down_ms = crate::proto::BRICK_TIMEOUT_MS + self.rng.random_range(200..=2000);
        self.bricks[b].down_until = self.now + down_ms * MS;
        self.after(down_ms * MS, Event::Restart { brick: b });
    }

    /// A joining brick just took a chunk of a copy (or a catch-up's repair) of a
    /// partition it has also taken writes for since the join. Now is the worst moment to
    /// die and come back at once, before the authority would remove it: the copy's next
    /// chunk was read before the restart, which no longer knows those writes were newer.
    fn target_installed(&mut self, b: usize, p: PartitionId) {
        let wrote = self.bricks[b].cores.iter().any(|c| c.round.shard().joined_writes(p) > 0);
        if !self.faults_on || !wrote || !self.rng.random_bool(0.3) {
            return;
        }
        let life = self.bricks[b].life;
        self.note(format!("brick {b} took a chunk of partition {p}'s copy after writes since its join"));
        self.after(MS, Event::CrashBack { brick: b, life });
    }

    pub(crate) fn crash_back(&mut self, b: usize, life: u64) {
        if self.bricks[b].life != life {
            return;
        }
        self.crash(b, "process crash (a joining brick mid-copy, at the worst moment)", false);
        let down_ms = self.rng.random_range(20..=300);
        self.after(down_ms * MS, Event::Restart { brick: b });
    }

    /// Which incarnation's ports brick `b` listens on (`core_addr`): 0 for all of them
    /// when restarts keep their ports.
    fn ports_life(&self, b: usize) -> u64 {
        if self.shape.same_ports { 0 } else { self.bricks[b].life % 1000 }
    }

    /// A core's storage failed (a log write, a sync, a checkpoint): the brick stops.
    fn storage_failed(&mut self, b: usize, c: usize, e: LogError) {
        self.stop_brick(b, format!("core {c}: {e}; brick stopped"));
    }

    /// Opens a link from `from` to the brick core listening at `at`, if one listens
    /// (else the connection is refused: `None`).
    pub(crate) fn connect(&mut self, from: Endpoint, at: std::net::SocketAddr) -> Option<LinkId> {
        let (b, ports, c) = super::addr_core(at)?;
        let brick = self.bricks.get(b)?;
        if self.ports_life(b) != ports || brick.state != State::Up || c >= brick.cores_n {
            return None;
        }
        let life = brick.life;
        Some(self.open_link(from, Endpoint::Brick(b), Some((life, c))))
    }
}

/// The partition and epoch of a copy's read (not a probe) whose reply ends the snapshot.
/// The partition of a copy's chunk (`Install`) or a catch-up's repair (`Repair`) that a
/// joining brick took.
fn chunk_taken(request: &[u8], reply: &[u8]) -> Option<PartitionId> {
    let frame = decode_exact(request).ok()?;
    decode_exact(reply).ok().filter(|r| matches!(r.kind, Kind::Reply(_, Status::Ok)))?;
    match frame.kind {
        Kind::Request(Op::Install) => Chunk::decode(frame.value).ok().map(|c| PartitionId(c.partition)),
        Kind::Request(Op::Repair) => Buckets::decode(frame.value).ok().map(|b| PartitionId(b.partition)),
        _ => None,
    }
}

fn snapshot_done(request: &[u8], reply: &[u8]) -> Option<(PartitionId, u64)> {
    let frame = decode_exact(request).ok()?;
    let reply = decode_exact(reply).ok().filter(|r| matches!(r.kind, Kind::Reply(_, Status::Ok)))?;
    match frame.kind {
        Kind::Request(Op::SnapshotChunk) => {
            let req = SnapshotRequest::decode(frame.value).ok().filter(|r| !r.is_probe())?;
            Chunk::decode(reply.value).ok().filter(|c| c.done).map(|_| (PartitionId(req.partition), frame.epoch))
        }
        // A catch-up's last diff: every bucket compared.
        Kind::Request(Op::Diff) => {
            let b = Buckets::decode(reply.value).ok()?;
            (u64::from(b.next) == 1u64 << b.log2).then_some((PartitionId(b.partition), frame.epoch))
        }
        _ => None,
    }
}
