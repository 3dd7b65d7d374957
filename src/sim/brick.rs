//! A simulated brick: the real `Shard` per core, driven the way `brick::core_loop` and
//! `brick::control` drive it: rounds that execute every queued frame, log the round's
//! records in one write (and one sync when a record must be durable first) and only
//! then release the round's replies; in-doubt questions to peers; a heartbeat every
//! 50 ms whose answers renew a 500 ms lease, and a fence when the lease runs out or the
//! session breaks. Start-up registers, then replays each core's simulated log through
//! `brick::replay_segment`, as the real brick does. Also here: the copy driver, as in
//! `meta::copy_driver`.

use std::collections::VecDeque;
use std::sync::Arc;

use dds_transport::ConnId;
use rand::Rng;

use crate::proto::{HEARTBEAT_MS, LEASE_MS};
use crate::brick::round::{lease_expired, TICK_MS};
use crate::brick::{replay_segment, Control, CoreRound, SegmentError, Shard};
use crate::hash::HashMap;
use crate::log::record::ScanEnd;
use crate::map::{key_hash, BrickId, ClusterMap, PartitionId};
use crate::proto::{decode_exact, encode, BrickInfo, Chunk, Frame, Kind, Op, Status};

use super::disk::SimDisk;
use super::net::{Endpoint, LinkId, Msg};
use super::{core_addr, Event, Joins, Micros, World, MS};

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
    inbox: VecDeque<(LinkId, Vec<u8>)>,
    /// A round's log write (and sync) is under way; frames wait in the inbox.
    busy: bool,
    round_due: bool,
    sync_pending: bool,
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
        self.map.clone().filter(|m| m.epoch > epoch)
    }
}

pub(crate) struct SimBrick {
    cores_n: usize,
    /// The id the authority gave (kept across restarts, as `identity.json`).
    pub id: Option<BrickId>,
    /// Incarnation: bumped at every start, so a dead brick's timers are void.
    pub life: u64,
    pub state: State,
    disks: Vec<SimDisk>,
    cores: Vec<SimCore>,
    map: Option<Arc<ClusterMap>>,
    session_link: Option<LinkId>,
    last_ok: Micros,
    fenced: bool,
    hb_sent: Option<Micros>,
    pub paused_until: Micros,
}

/// The token brick `b`'s directory drew when it was made (`control::load_or_make_token`):
/// its directory never changes, so neither does the token.
fn dir_token(b: usize) -> u64 {
    b as u64 + 1
}

impl SimBrick {
    pub fn new(cores_n: usize) -> SimBrick {
        SimBrick {
            cores_n,
            id: None,
            life: 0,
            state: State::Down,
            disks: (0..cores_n).map(|_| SimDisk::default()).collect(),
            cores: Vec::new(),
            map: None,
            session_link: None,
            last_ok: 0,
            fenced: false,
            hb_sent: None,
            paused_until: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up | State::Starting)
    }

    pub fn serving(&self) -> bool {
        self.state == State::Up && !self.fenced
    }

    pub fn state_name(&self) -> String {
        format!("{:?}{}", self.state, if self.fenced { ", fenced" } else { "" })
    }

    /// Runs `epoch` everywhere, holds nothing prepared, has no work queued.
    pub fn settled(&self, epoch: u64) -> bool {
        self.cores.iter().all(|c| c.round.shard().epoch() == epoch && c.round.shard().prepared_len() == 0 && c.inbox.is_empty() && !c.busy)
    }

    pub fn unsettled(&self, epoch: u64) -> String {
        self.cores
            .iter()
            .enumerate()
            .map(|(i, c)| format!("core {i}: epoch {}/{epoch}, {} prepared, {} queued", c.round.shard().epoch(), c.round.shard().prepared_len(), c.inbox.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every entry this brick's cores hold whose key hashes into `p`.
    pub fn entries_of(&self, p: PartitionId) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        self.cores.iter().flat_map(|c| c.round.shard().entries()).filter(|(k, _)| p.contains(key_hash(k))).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    /// Digest input: every entry, in key order.
    pub fn all_entries(&self) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        self.cores.iter().flat_map(|c| c.round.shard().entries()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
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
        let brick = &mut self.bricks[b];
        brick.life += 1;
        brick.state = State::Starting;
        brick.cores.clear();
        brick.map = None;
        brick.fenced = false;
        brick.hb_sent = None;
        let (life, id, cores_n) = (brick.life, brick.id, brick.cores_n);
        let cores = (0..cores_n).map(|c| core_addr(b, life, c)).collect();
        let link = self.open_link(Endpoint::Brick(b), Endpoint::Authority, None);
        self.bricks[b].session_link = Some(link);
        self.note(format!("brick {b} (id {id:?}) starts, incarnation {life}"));
        self.send(link, Endpoint::Brick(b), Msg::Register { id: id.map(|i| i.0), cores, token: dir_token(b) });
    }

    pub(crate) fn restart(&mut self, b: usize) {
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
            for d in 0..brick.disks.len() {
                lost += brick.disks[d].lose_power(&mut self.rng);
            }
        }
        self.note(format!("brick {b}: {why}{}", if power_loss { format!(" ({lost} un-synced log bytes lost)") } else { String::new() }));
        self.break_links_of(b, !power_loss);
    }

    /// `control::stop_removed`: the authority removed this brick while it ran; it stops
    /// and, started again, rejoins under a new id.
    fn removed_while_running(&mut self, b: usize) {
        let why = format!("removed from the cluster while running ({:?}): stopped", self.bricks[b].id);
        self.stop_brick(b, why);
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
        self.bricks[b].paused_until = self.now + micros;
    }

    /// Events for a paused brick wait until it resumes. Messages keep their order; the
    /// brick's own timers land among them in random order, as threads do after a stop.
    fn deferred(&mut self, b: usize, timer: bool) -> Option<Micros> {
        let until = self.bricks[b].paused_until;
        if until <= self.now {
            return None;
        }
        Some(if timer { until + self.rng.random_range(0..=500) } else { until })
    }

    pub(crate) fn brick_receive(&mut self, b: usize, link: LinkId, msg: Msg) {
        if let Some(at) = self.deferred(b, false) {
            self.schedule(at, Event::Deliver { link, to: Endpoint::Brick(b), msg });
            return;
        }
        match msg {
            Msg::Registered { id, map } => {
                let brick = &mut self.bricks[b];
                if brick.state == State::Up && brick.id != Some(BrickId(id)) {
                    // Registered again and given a new id: it had been removed.
                    return self.removed_while_running(b);
                }
                brick.id = Some(BrickId(id));
                match brick.state {
                    State::Starting => self.first_map(b, link, map),
                    State::Up => {
                        // Registered again after a broken session: beat at once.
                        let epoch = self.bricks[b].map.as_ref().map_or(0, |m| m.epoch);
                        self.bricks[b].hb_sent = Some(self.now);
                        self.send(link, Endpoint::Brick(b), Msg::Heartbeat { epoch });
                    }
                    _ => {}
                }
            }
            Msg::MapReply { map } => match self.bricks[b].state {
                State::Starting => self.first_map(b, link, map),
                State::Up => {
                    let brick = &mut self.bricks[b];
                    brick.hb_sent = None;
                    brick.last_ok = self.now;
                    if let Some(map) = map {
                        if brick.map.as_ref().is_none_or(|m| map.epoch > m.epoch) {
                            brick.map = Some(Arc::new(map));
                        }
                    }
                    if brick.fenced {
                        brick.fenced = false;
                        self.note(format!("brick {b}: in touch with the authority again"));
                    }
                    self.wake_cores(b);
                }
                _ => {}
            },
            Msg::SessionEnded => {
                // `heartbeat_loop`: a refused heartbeat fences the brick and drops the
                // session; the next beat registers again.
                let brick = &mut self.bricks[b];
                brick.hb_sent = None;
                if brick.state == State::Starting {
                    // Removed while it waited for the first map: register anew.
                    let life = brick.life;
                    self.reregister(b, life);
                } else if brick.state == State::Up {
                    self.removed_while_running(b);
                }
            }
            Msg::Frame(bytes) => {
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
            other => unreachable!("a brick got {other:?}"),
        }
    }

    /// A starting brick's answer from the authority: with the first map it boots;
    /// without (the authority still gathers bricks) it asks again soon.
    fn first_map(&mut self, b: usize, link: LinkId, map: Option<ClusterMap>) {
        match map {
            Some(map) => self.boot(b, map),
            None => {
                let life = self.bricks[b].life;
                self.after(HEARTBEAT_MS * MS, Event::StartPoll { brick: b, life, link });
            }
        }
    }

    /// Registration answered with a map: recover every core's log, then serve.
    fn boot(&mut self, b: usize, map: ClusterMap) {
        let brick = &mut self.bricks[b];
        let me = brick.id.expect("registered");
        let map = Arc::new(map);
        let corrupt_p = self.shape.read_corrupt_p;
        let mut cores = Vec::new();
        let mut failure = None;
        for c in 0..brick.cores_n {
            // A read error (a flipped bit between disk and memory): this start must stop
            // cleanly, or drop the record as a torn tail if nothing valid follows it.
            // The fault is in the reading, not on the platter, so the next start reads
            // the log intact: a wiped replica would be a second failure of its group.
            let mut bytes = std::borrow::Cow::Borrowed(&brick.disks[c].bytes[..]);
            if self.faults_on && self.rng.random_bool(corrupt_p) && bytes.len() >= 64 {
                let at = self.rng.random_range(0..bytes.len() / 2);
                bytes.to_mut()[at] ^= 1 << self.rng.random_range(0..8);
                self.trace.push(format!("{} brick {b} core {c}: byte {at} of the log reads back corrupt", self.now));
            }
            let mut shard = Shard::new(c, brick.cores_n, map.base_bits, me, Arc::clone(&map));
            let replayed = replay_segment(&bytes, 1, 1, &mut shard);
            let read_corrupt = matches!(bytes, std::borrow::Cow::Owned(_));
            drop(bytes);
            let disk = &mut brick.disks[c];
            if read_corrupt && replayed.as_ref().is_ok_and(|(_, _, end)| matches!(end, ScanEnd::TornTail { .. })) {
                // Dropping a good record for a misread one would lose an acknowledged
                // write; a real brick cannot tell. Count it as a stop, not a recovery.
                failure = Some(format!("core {c}: misread the last record; stopped"));
                break;
            }
            match replayed {
                Ok((next_lsn, _, end)) => {
                    if let ScanEnd::TornTail { offset, .. } = end {
                        disk.bytes.truncate(offset as usize);
                    }
                    // `core_loop::recover` syncs the log before the core serves.
                    disk.sync();
                    let info = BrickInfo { partition_bits: map.base_bits, core: c as u16, ports: Vec::new() };
                    let mut round = CoreRound::new(shard, info, self.shape.durability, next_lsn);
                    round.begin(&SimControl { fenced: false, map: None });
                    cores.push(SimCore { round, inbox: VecDeque::new(), busy: false, round_due: false, sync_pending: false });
                }
                Err(SegmentError::Corrupt { offset, error }) => {
                    failure = Some(format!("core {c}: corrupt record at offset {offset}: {error}; refusing to start"));
                    break;
                }
                Err(SegmentError::Gap { found, expected }) => {
                    failure = Some(format!("core {c}: lsn {found} where {expected} was expected; refusing to start"));
                    break;
                }
            }
        }
        if let Some(why) = failure {
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
        brick.last_ok = self.now;
        let life = brick.life;
        self.note(format!("brick {b} is up as {me}"));
        self.after(HEARTBEAT_MS * MS, Event::Heartbeat { brick: b, life });
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

    /// A starting brick asks for the first map again (`control::register`'s loop).
    pub(crate) fn start_poll(&mut self, b: usize, life: u64, link: LinkId) {
        let brick = &self.bricks[b];
        if brick.life == life && brick.state == State::Starting && brick.session_link == Some(link) {
            self.send(link, Endpoint::Brick(b), Msg::Heartbeat { epoch: 0 });
        }
    }

    /// A starting brick registers again on a new connection.
    pub(crate) fn reregister(&mut self, b: usize, life: u64) {
        let brick = &self.bricks[b];
        if brick.life != life || brick.state != State::Starting {
            return;
        }
        if let Some(old) = brick.session_link {
            self.break_link(old, true);
        }
        let brick = &self.bricks[b];
        let id = brick.id.map(|i| i.0);
        let cores = (0..brick.cores_n).map(|c| core_addr(b, life, c)).collect();
        let link = self.open_link(Endpoint::Brick(b), Endpoint::Authority, None);
        self.bricks[b].session_link = Some(link);
        self.send(link, Endpoint::Brick(b), Msg::Register { id, cores, token: dir_token(b) });
    }

    /// A core's loop wakes at least every `TICK_MS`, work or not (its poll timeout).
    pub(crate) fn core_tick(&mut self, b: usize, life: u64, c: usize) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        self.wake_core(b, c);
        self.after(TICK_MS * MS, Event::CoreTick { brick: b, life, core: c });
    }

    /// The control thread's beat (`control::heartbeat_loop`).
    pub(crate) fn heartbeat(&mut self, b: usize, life: u64) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        if let Some(at) = self.deferred(b, true) {
            return self.schedule(at, Event::Heartbeat { brick: b, life });
        }
        let lease = LEASE_MS * MS;
        let brick = &mut self.bricks[b];
        if brick.hb_sent.is_some_and(|sent| self.now - sent >= lease) {
            // The call timed out: fence before dropping the session (the authority takes
            // a closed session for a dead brick).
            brick.hb_sent = None;
            brick.fenced = true;
            if let Some(link) = brick.session_link.take() {
                self.note(format!("brick {b}: heartbeat timed out; fenced, session dropped"));
                self.break_link(link, true);
            }
        }
        let brick = &mut self.bricks[b];
        if brick.hb_sent.is_none() {
            match brick.session_link {
                Some(link) => {
                    let epoch = brick.map.as_ref().map_or(0, |m| m.epoch);
                    brick.hb_sent = Some(self.now);
                    self.send(link, Endpoint::Brick(b), Msg::Heartbeat { epoch });
                }
                None => {
                    // Reconnect and register again with the same id.
                    let cores = (0..brick.cores_n).map(|c| core_addr(b, life, c)).collect();
                    let id = brick.id.map(|i| i.0);
                    brick.hb_sent = Some(self.now);
                    let link = self.open_link(Endpoint::Brick(b), Endpoint::Authority, None);
                    self.bricks[b].session_link = Some(link);
                    self.send(link, Endpoint::Brick(b), Msg::Register { id, cores, token: dir_token(b) });
                }
            }
        }
        let brick = &mut self.bricks[b];
        if self.now - brick.last_ok > lease && !brick.fenced {
            brick.fenced = true;
            self.note(format!("brick {b}: no word from the authority for {LEASE_MS} ms: fenced"));
        }
        self.after(HEARTBEAT_MS * MS, Event::Heartbeat { brick: b, life });
    }

    pub(crate) fn brick_link_down(&mut self, b: usize, link: LinkId) {
        if let Some(at) = self.deferred(b, false) {
            return self.schedule(at, Event::LinkDown { link, to: Endpoint::Brick(b) });
        }
        let brick = &mut self.bricks[b];
        if brick.session_link == Some(link) && brick.state == State::Starting {
            // `control::register` retries every 100 ms until it is answered.
            let life = brick.life;
            brick.session_link = None;
            self.after(100 * MS, Event::Reregister { brick: b, life });
            return;
        }
        if brick.session_link == Some(link) {
            brick.session_link = None;
            brick.hb_sent = None;
            if brick.state == State::Up && !brick.fenced {
                brick.fenced = true;
                self.note(format!("brick {b}: lost its session: fenced"));
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
        SimControl { fenced: brick.fenced || lease_expired(brick.last_ok, self.now, LEASE_MS * MS), map: brick.map.clone() }
    }

    /// One round of a core's loop (`core_loop::run`): the frames that came since the
    /// last round (its top, `begin`, ran when the last round ended: the core then
    /// waited in the kernel, where a pause may land), the tick, and the group commit.
    pub(crate) fn core_round(&mut self, b: usize, life: u64, c: usize) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        if let Some(at) = self.deferred(b, true) {
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
        let batch = core.round.batch().map(|(bytes, sync)| (bytes.to_vec(), sync));
        for (link, bytes) in sent {
            self.send(link, Endpoint::Brick(b), Msg::Frame(bytes));
        }
        for link in bad_links {
            self.break_link(link, true);
        }
        self.ask_peers(b, c, queries);
        if behind && self.bricks[b].hb_sent.is_none() {
            // A request from a newer epoch: ask the authority now.
            if let Some(link) = self.bricks[b].session_link {
                self.bricks[b].hb_sent = Some(self.now);
                let epoch = self.bricks[b].map.as_ref().map_or(0, |m| m.epoch);
                self.send(link, Endpoint::Brick(b), Msg::Heartbeat { epoch });
            }
        }
        let Some((batch, must_sync)) = batch else { return self.end_round(b, c) };
        // Group commit: one write, and one sync if a record must be durable first.
        if self.faults_on && self.rng.random_bool(self.shape.disk_full_p) {
            return self.stop_brick(b, format!("core {c}: log write failed: no space left on device; brick stopped"));
        }
        let (write_us, sync_us) = (self.shape.write_us, self.shape.sync_us);
        self.bricks[b].disks[c].write(&batch);
        let core_busy_us = write_us + if must_sync { sync_us } else { 0 };
        let core = &mut self.bricks[b].cores[c];
        core.busy = true;
        core.sync_pending = must_sync;
        self.after(core_busy_us, Event::DiskDone { brick: b, life, core: c });
    }

    /// The round's log write (and sync) completed: its replies may leave.
    pub(crate) fn disk_done(&mut self, b: usize, life: u64, c: usize) {
        if self.bricks[b].life != life || self.bricks[b].state != State::Up {
            return;
        }
        if let Some(at) = self.deferred(b, true) {
            return self.schedule(at, Event::DiskDone { brick: b, life, core: c });
        }
        if self.bricks[b].cores[c].sync_pending {
            if self.faults_on && self.rng.random_bool(self.shape.sync_error_p) {
                return self.stop_brick(b, format!("core {c}: fdatasync failed (EIO); brick stopped, never retried"));
            }
            self.bricks[b].disks[c].sync();
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
        core.round.begin(&control);
        let more = !core.inbox.is_empty();
        for (link, bytes) in released {
            self.send(link, Endpoint::Brick(b), Msg::Frame(bytes));
        }
        if more {
            self.wake_core(b, c);
        }
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
            self.send(link, Endpoint::Brick(b), Msg::Frame(bytes));
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

    /// Opens a link from `from` to the brick core listening at `at`, if one listens
    /// (else the connection is refused: `None`).
    pub(crate) fn connect(&mut self, from: Endpoint, at: std::net::SocketAddr) -> Option<LinkId> {
        let (b, life, c) = super::addr_core(at)?;
        let brick = self.bricks.get(b)?;
        if brick.life % 1000 != life || brick.state != State::Up || c >= brick.cores_n {
            return None;
        }
        let life = brick.life;
        Some(self.open_link(from, Endpoint::Brick(b), Some((life, c))))
    }
}

/// The copy driver (`meta::copy_driver`): each join in turn, chunk by chunk from a
/// readable replica to the joining brick, then `Authority::copied` for those done.
pub(crate) struct CopyJob {
    joins: Joins,
    epoch: u64,
    at: usize,
    cursor: u32,
    done: Joins,
    /// The request on the wire: its link and whether it is the install.
    waiting: Option<(LinkId, bool, Micros)>,
    /// The chunk read from the source, to install next.
    chunk: Option<Vec<u8>>,
    deadline: Micros,
    next_id: u64,
    /// This attempt's connections, held for all its chunks as the real driver holds
    /// them: a target that restarts mid-copy breaks its connection and fails the join.
    src_link: Option<LinkId>,
    dst_link: Option<LinkId>,
    /// Members still to probe for older-epoch writes before this attempt copies
    /// (`None`: not listed yet), and the probe on the wire.
    probes: Option<Vec<BrickId>>,
    probe_wait: Option<(LinkId, Micros)>,
}

/// A copy that has not finished in this long gives up (`meta::COPY_DEADLINE`).
const COPY_DEADLINE_MS: u64 = 120_000;
/// A copy request unanswered this long is lost (`meta::COPY_RPC_TIMEOUT`).
const COPY_RPC_TIMEOUT_MS: u64 = 5_000;

impl CopyJob {
    pub fn new(joins: Joins, epoch: u64, now: Micros) -> CopyJob {
        CopyJob {
            joins,
            epoch,
            at: 0,
            cursor: 0,
            done: Vec::new(),
            waiting: None,
            chunk: None,
            deadline: now + COPY_DEADLINE_MS * MS,
            next_id: 1,
            src_link: None,
            dst_link: None,
            probes: None,
            probe_wait: None,
        }
    }
}

impl World {
    /// Drops this attempt's connections.
    fn copy_hang_up(&mut self) {
        let Some(job) = &mut self.copy else { return };
        job.probes = None;
        let links = [job.src_link.take(), job.dst_link.take(), job.probe_wait.take().map(|(l, _)| l)];
        for link in links.into_iter().flatten() {
            self.break_link(link, false);
        }
    }

    /// The source failed: a new attempt at this partition, from the start.
    fn copy_retry(&mut self, delay_ms: u64) {
        self.copy_hang_up();
        if let Some(job) = &mut self.copy {
            job.waiting = None;
            job.cursor = 0;
            job.chunk = None;
        }
        self.after(delay_ms * MS, Event::CopyStep);
    }

    /// The current join failed: go on with the next.
    fn copy_skip(&mut self, why: String) {
        self.note(format!("copy: {why}"));
        self.copy_hang_up();
        if let Some(job) = &mut self.copy {
            job.at += 1;
            job.cursor = 0;
            job.chunk = None;
            job.waiting = None;
        }
        self.after(0, Event::CopyStep);
    }

    pub(crate) fn copy_step(&mut self) {
        let Some(job) = &self.copy else { return };
        if let Some((link, sent)) = job.probe_wait {
            if self.now >= sent + COPY_RPC_TIMEOUT_MS * MS {
                self.break_link(link, false);
                self.copy_retry(50);
            }
            return;
        }
        if let Some((link, _, sent)) = job.waiting {
            if self.now >= sent + COPY_RPC_TIMEOUT_MS * MS {
                // The call timed out, as `Rpc::call` does: the link is as good as lost.
                self.break_link(link, false);
                self.copy_link_down(link);
            }
            return;
        }
        if job.at >= job.joins.len() {
            let job = self.copy.take().expect("present");
            self.note(format!("copy: {}/{} partition(s) copied", job.done.len(), job.joins.len()));
            let actions = if job.done.is_empty() {
                self.authority.copy_failed();
                Default::default()
            } else {
                self.authority.copied(&job.done)
            };
            return self.apply(actions);
        }
        if self.now > job.deadline {
            return self.copy_skip("deadline passed".into());
        }
        let (p, target) = job.joins[job.at];
        let (epoch, cursor) = (job.epoch, job.cursor);
        let Some(map) = self.authority.map().cloned() else { return };
        if !map.is_joining(p, target) {
            return self.copy_skip(format!("{target} is no longer joining {p}"));
        }
        let hash = p.prefix() as u64;
        let addr_of = |bk: BrickId| map.bricks.get(&bk).map(|a| a.cores[map.core_of(hash, a.cores.len())]);
        // `meta::copy_partition`: probe every other member for older-epoch writes first.
        if cursor == 0 && self.copy.as_ref().is_some_and(|j| j.chunk.is_none()) {
            let job = self.copy.as_mut().expect("present");
            let probes = job.probes.get_or_insert_with(|| map.groups.get(&p).map_or(Vec::new(), |g| g.iter().copied().filter(|b| *b != target).collect()));
            if let Some(&member) = probes.first() {
                let Some(link) = addr_of(member).and_then(|a| self.connect(Endpoint::Authority, a)) else {
                    return self.copy_retry(50);
                };
                let mut req = Vec::with_capacity(8);
                req.extend_from_slice(&p.0.to_le_bytes());
                req.extend_from_slice(&crate::proto::PROBE_CURSOR.to_le_bytes());
                let job = self.copy.as_mut().expect("present");
                let id = job.next_id;
                job.next_id += 1;
                job.probe_wait = Some((link, self.now));
                let mut bytes = Vec::new();
                encode(&mut bytes, &Frame { kind: Kind::Request(Op::SnapshotChunk), request_id: id, epoch, key: &[], value: &req });
                self.send(link, Endpoint::Authority, Msg::Frame(bytes));
                self.after(COPY_RPC_TIMEOUT_MS * MS, Event::CopyStep);
                return;
            }
        }
        let (kind_install, to, op, value) = match self.copy.as_ref().and_then(|j| j.chunk.clone()) {
            Some(chunk) => (true, addr_of(target), Op::Install, chunk),
            None => {
                let Some(source) = map.readable(p).next() else { return self.copy_skip("no readable replica".into()) };
                if cursor == 0 && self.options.trace {
                    self.note(format!("copy {p} from {source} to {target} at epoch {epoch}, group {:?}", map.groups.get(&p)));
                }
                let mut req = Vec::with_capacity(8);
                req.extend_from_slice(&p.0.to_le_bytes());
                req.extend_from_slice(&cursor.to_le_bytes());
                (false, addr_of(source), Op::SnapshotChunk, req)
            }
        };
        let held = self.copy.as_ref().and_then(|j| if kind_install { j.dst_link } else { j.src_link });
        let link = match held {
            Some(l) if self.net.alive(l) => l,
            Some(_) if kind_install => return self.copy_skip(format!("{target}: connection lost")),
            Some(_) => return self.copy_retry(50),
            None => match to.and_then(|a| self.connect(Endpoint::Authority, a)) {
                Some(l) => {
                    let job = self.copy.as_mut().expect("present");
                    if kind_install {
                        job.dst_link = Some(l);
                    } else {
                        job.src_link = Some(l);
                    }
                    l
                }
                None if kind_install => return self.copy_skip(format!("{target} cannot be reached")),
                None => return self.copy_retry(50),
            },
        };
        let job = self.copy.as_mut().expect("present");
        let id = job.next_id;
        job.next_id += 1;
        job.waiting = Some((link, kind_install, self.now));
        let mut bytes = Vec::new();
        encode(&mut bytes, &Frame { kind: Kind::Request(op), request_id: id, epoch, key: &[], value: &value });
        self.send(link, Endpoint::Authority, Msg::Frame(bytes));
        self.after(COPY_RPC_TIMEOUT_MS * MS, Event::CopyStep);
    }

    pub(crate) fn copy_receive(&mut self, link: LinkId, bytes: Vec<u8>) {
        let Some(job) = &self.copy else { return };
        if job.probe_wait.is_some_and(|(l, _)| l == link) {
            let status = decode_exact(&bytes).ok().and_then(|f| match f.kind {
                Kind::Reply(_, status) => Some(status),
                Kind::Request(_) => None,
            });
            let job = self.copy.as_mut().expect("present");
            job.probe_wait = None;
            self.break_link(link, false);
            match status {
                Some(Status::Behind | Status::Unavailable) => self.after(2 * MS, Event::CopyStep),
                Some(_) => {
                    // Nothing pending there (or no longer a member): next member.
                    if let Some(probes) = &mut self.copy.as_mut().expect("present").probes {
                        if !probes.is_empty() {
                            probes.remove(0);
                        }
                    }
                    self.after(0, Event::CopyStep);
                }
                None => self.copy_retry(50),
            }
            return;
        }
        let Some((_, install, _)) = job.waiting.filter(|(l, _, _)| *l == link) else { return };
        let Ok(frame) = decode_exact(&bytes) else { return self.copy_retry(50) };
        let Kind::Reply(_, status) = frame.kind else { return self.copy_retry(50) };
        if install {
            match status {
                Status::Ok => {
                    let job = self.copy.as_mut().expect("present");
                    let chunk = Chunk::decode(job.chunk.as_deref().expect("installing")).expect("the source's chunk decoded before");
                    let (next, finished) = (chunk.cursor, chunk.done);
                    job.chunk = None;
                    job.waiting = None;
                    if finished {
                        let join = job.joins[job.at];
                        job.done.push(join);
                        job.at += 1;
                        job.cursor = 0;
                        self.copy_hang_up();
                    } else {
                        job.cursor = next;
                    }
                    self.after(0, Event::CopyStep);
                }
                Status::Behind => {
                    if let Some(job) = &mut self.copy {
                        job.waiting = None;
                    }
                    self.after(2 * MS, Event::CopyStep);
                }
                other => self.copy_skip(format!("the target refused the copy: {other:?}: {}", String::from_utf8_lossy(frame.value))),
            }
            return;
        }
        match status {
            Status::Ok => match Chunk::decode(frame.value) {
                Ok(_) => {
                    let job = self.copy.as_mut().expect("present");
                    job.chunk = Some(frame.value.to_vec());
                    job.waiting = None;
                    self.after(0, Event::CopyStep);
                }
                Err(e) => self.copy_skip(format!("bad chunk: {e}")),
            },
            Status::Behind | Status::Unavailable => {
                if let Some(job) = &mut self.copy {
                    job.waiting = None;
                }
                self.after(2 * MS, Event::CopyStep);
            }
            _ => self.copy_retry(50),
        }
    }

    pub(crate) fn copy_link_down(&mut self, link: LinkId) {
        let Some(job) = &self.copy else { return };
        if job.probe_wait.is_some_and(|(l, _)| l == link) {
            self.copy_retry(50);
        } else if job.dst_link == Some(link) {
            let target = job.joins.get(job.at).map(|j| j.1);
            self.copy_skip(format!("{target:?}: connection lost during the copy"));
        } else if job.src_link == Some(link) {
            self.copy_retry(50);
        }
    }
}
