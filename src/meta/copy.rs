//! The copy driver, sans-I/O: brings each joining replica up to date, chunk by chunk
//! from a readable replica, while writes go on to both. The authority's copy thread
//! (`meta::copy_driver`, a blocking rpc worker per lane) and the simulator (simulated
//! links and timers) both drive it: `poll` says what to do next, `answer` takes the
//! reply to a lane's `Step::Call`. Up to `COPY_LANES` partitions are copied at once,
//! one a lane, each with calls of its own, so a copy is not one round trip after
//! another. It owns the per-partition deadline, the older-epoch probe of every member
//! before a copy starts, retries and their pauses; it never touches a socket, a clock
//! or the authority (its shell hands `Step::Finished` to `Authority::copied`).

use std::collections::VecDeque;
use std::net::SocketAddr;

use crate::map::{BrickId, ClusterMap, PartitionId};
use crate::mutation::{self, Mutation};
use crate::proto::catchup::{buckets_log2_for, decode_digest_reply, BUCKETS_LOG2_MAX, DIGESTS_PER_CALL};
use crate::proto::{Buckets, Chunk, DiffRequest, DigestRequest, Op, SnapshotRequest, Status};

use super::authority::Join;

/// A copy request unanswered this long is lost (the shell's rpc timeout).
pub const COPY_RPC_TIMEOUT_MS: u64 = 5_000;
/// A partition whose copy has not finished in this long gives up; the authority plans
/// again at its next tick.
pub const COPY_DEADLINE_MS: u64 = 120_000;
/// Partitions copied at once (a lane each, with a call out at most and three lines).
pub const COPY_LANES: usize = 4;
/// The pause before a new attempt after a lost connection or a refusing source.
const RETRY_MS: u64 = 50;
/// The pause before asking again a brick that answered `Behind` or `Unavailable`.
const BEHIND_WAIT_MS: u64 = 2;

/// One of a lane's connections. The shell keeps at most one open per lane and line,
/// opens it at the first `Call` on it, closes it at `HangUp`, when a call on it fails,
/// or when a call on it goes to another address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// To the `i`th member of the group probed for older-epoch writes (the last line
    /// serves the members past `PROBE_LINES`), so a lane's probes of the next partition
    /// of the same group find their connections open.
    Probe(usize),
    /// To the replica read from.
    Source,
    /// To the joining replica.
    Target,
}

/// Probe lines a lane keeps (a group's members and its joining replicas).
pub const PROBE_LINES: usize = 4;
/// Lines a lane keeps.
pub const LINE_COUNT: usize = PROBE_LINES + 2;

impl Line {
    /// Where the line sits in a lane's `LINE_COUNT`.
    pub fn index(self) -> usize {
        match self {
            Line::Probe(i) => i.min(PROBE_LINES - 1),
            Line::Source => PROBE_LINES,
            Line::Target => PROBE_LINES + 1,
        }
    }

    pub fn all() -> impl Iterator<Item = Line> {
        (0..PROBE_LINES).map(Line::Probe).chain([Line::Source, Line::Target])
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send a request on `line` of `lane` (connecting to `addr` first if it is not
    /// open there) and hand the reply, or why there is none, to `answer`.
    Call { lane: usize, line: Line, addr: SocketAddr, op: Op, epoch: u64, value: Vec<u8> },
    /// Close `line` of `lane` if it is open.
    HangUp { lane: usize, line: Line },
    /// Nothing to do before an answer arrives or (`Some`) this many ms pass.
    Wait { ms: Option<u64> },
    /// A line for the authority's log.
    Note(String),
    /// Every join was tried: these finished (`Authority::copied`; none: `copy_failed`).
    Finished(Vec<Join>),
}

/// What became of a `Step::Call`.
#[derive(Clone, Debug)]
pub enum Answer {
    Reply(Status, Vec<u8>),
    /// Refused, timed out, closed or malformed: the line is closed.
    Lost(String),
}

#[derive(Clone, Debug)]
enum Phase {
    /// No join: take the next one, if any.
    Idle,
    /// A new attempt at the current join: check it still stands, pick a source.
    Attempt,
    /// Probing `members[at]`; the copy from `source` starts after the last.
    Probe { source: BrickId, members: Vec<BrickId>, at: usize },
    /// Reading from `source` the keys whose hashes are `from` or more, by the source's
    /// window `token` (0: none yet).
    Read { source: BrickId, from: u64, token: u64 },
    /// Installing the chunk read; then on from `next` (or done if `last`).
    Install { source: BrickId, chunk: Vec<u8>, next: u64, token: u64, last: bool },
    /// Asking the joining replica how many keys of the partition it holds from an
    /// earlier stay: none, a full copy (`Read`); some, a catch-up (`Digest`).
    Count { source: BrickId },
    /// Catch-up: asking the joining replica for its digests of buckets `from..`.
    Digest { source: BrickId, log2: u8, from: u32 },
    /// Catch-up: asking the source for the buckets of `from..` whose digests differ.
    Diff { source: BrickId, log2: u8, from: u32, digests: Vec<u64> },
    /// Catch-up: repairing the joining replica with the source's buckets; then the
    /// range's rest from `next` (its digests `rest`), or the next range at `end`.
    Repair { source: BrickId, log2: u8, msg: Vec<u8>, next: u32, end: u32, rest: Vec<u64> },
}

/// One partition's copy at a time.
struct Lane {
    /// The join copied (an index into `joins`), if any.
    at: Option<usize>,
    phase: Phase,
    /// A call is out: nothing more on this lane before its `answer`.
    asked: bool,
    /// A pause: nothing on this lane before.
    wake_at_ms: u64,
    partition_started_ms: u64,
    deadline_ms: u64,
    attempt_started_ms: u64,
    /// How long this attempt's start waited for older-epoch writes to drain.
    drain_ms: u64,
    keys: u64,
    /// Chunk bytes installed (keys, values and their framing).
    bytes: u64,
    /// Catch-up digests read from the joining replica.
    digest_bytes: u64,
}

impl Lane {
    fn new() -> Lane {
        Lane { at: None, phase: Phase::Idle, asked: false, wake_at_ms: 0, partition_started_ms: 0, deadline_ms: 0, attempt_started_ms: 0, drain_ms: 0, keys: 0, bytes: 0, digest_bytes: 0 }
    }
}

pub struct CopyDriver {
    joins: Vec<Join>,
    epoch: u64,
    /// The next join a free lane takes.
    next: usize,
    done: Vec<Join>,
    lanes: Vec<Lane>,
    /// Steps made but not yet handed out by `poll` (in order: a lane's hang-ups come
    /// before its next call).
    out: VecDeque<Step>,
    finished: bool,
    started_ms: u64,
    drain_max_ms: u64,
    keys_total: u64,
    bytes_total: u64,
    digest_bytes_total: u64,
    /// Partitions caught up (the others were copied whole).
    caught_up: usize,
}

impl CopyDriver {
    pub fn new(joins: Vec<Join>, epoch: u64, now_ms: u64) -> CopyDriver {
        CopyDriver {
            joins,
            epoch,
            next: 0,
            done: Vec::new(),
            lanes: (0..COPY_LANES).map(|_| Lane::new()).collect(),
            out: VecDeque::new(),
            finished: false,
            started_ms: now_ms,
            drain_max_ms: 0,
            keys_total: 0,
            bytes_total: 0,
            digest_bytes_total: 0,
            caught_up: 0,
        }
    }

    fn join(&self, lane: usize) -> Join {
        self.joins[self.lanes[lane].at.expect("a lane at work has a join")]
    }

    /// The lane's join failed: log why and go on with the next.
    fn give_up(&mut self, lane: usize, why: String) {
        let (p, target) = self.join(lane);
        self.out.push_back(Step::Note(format!("copy of partition {p} to {target} failed: {why}")));
        self.hang_up(lane);
        self.lanes[lane].at = None;
        self.lanes[lane].phase = Phase::Idle;
    }

    /// This attempt failed on the way (a lost connection, a refusing source): a new
    /// attempt at the same join, from the start, after a pause.
    fn retry(&mut self, lane: usize, why: String, now_ms: u64) {
        let (p, _) = self.join(lane);
        self.out.push_back(Step::Note(format!("copy of {p}: {why}; retrying")));
        self.hang_up(lane);
        self.pause(lane, RETRY_MS, now_ms);
        self.lanes[lane].phase = Phase::Attempt;
    }

    fn pause(&mut self, lane: usize, ms: u64, now_ms: u64) {
        self.lanes[lane].wake_at_ms = now_ms + ms;
    }

    fn hang_up(&mut self, lane: usize) {
        self.out.extend(Line::all().map(|line| Step::HangUp { lane, line }));
    }

    /// The next step. `map` is the authority's map now.
    pub fn poll(&mut self, map: Option<&ClusterMap>, now_ms: u64) -> Step {
        loop {
            if let Some(step) = self.out.pop_front() {
                if let Step::Call { lane, .. } = step {
                    self.lanes[lane].asked = true;
                }
                return step;
            }
            if self.finished {
                return Step::Finished(self.done.clone());
            }
            // Each lane that is free to act, until one has made a step.
            for lane in 0..self.lanes.len() {
                if self.out.is_empty() && !self.lanes[lane].asked && self.lanes[lane].wake_at_ms <= now_ms {
                    self.lane_poll(lane, map, now_ms);
                }
            }
            if !self.out.is_empty() {
                continue;
            }
            let joins_left = self.next < self.joins.len();
            if !joins_left && self.lanes.iter().all(|l| l.at.is_none()) {
                let ms = now_ms - self.started_ms;
                self.out.push_back(Step::Note(format!(
                    "recovery: {}/{} partition(s) copied ({} caught up from the joining replica's own data), {} keys, {} in {ms} ms ({}), {} of digests; longest wait for older writes {} ms",
                    self.done.len(),
                    self.joins.len(),
                    self.caught_up,
                    self.keys_total,
                    mib(self.bytes_total),
                    rate(self.bytes_total, ms),
                    mib(self.digest_bytes_total),
                    self.drain_max_ms
                )));
                self.finished = true;
                continue;
            }
            let paused = self.lanes.iter().filter(|l| !l.asked && (l.at.is_some() || joins_left)).map(|l| l.wake_at_ms.saturating_sub(now_ms)).min();
            return Step::Wait { ms: paused };
        }
    }

    /// Moves `lane` on until it has made a step (into `out`), paused, or found no join
    /// left.
    fn lane_poll(&mut self, lane: usize, map: Option<&ClusterMap>, now_ms: u64) {
        loop {
            if !self.out.is_empty() || self.lanes[lane].wake_at_ms > now_ms {
                return;
            }
            match self.lanes[lane].phase.clone() {
                Phase::Idle => {
                    if self.next >= self.joins.len() {
                        return;
                    }
                    let l = &mut self.lanes[lane];
                    *l = Lane::new();
                    l.at = Some(self.next);
                    l.partition_started_ms = now_ms;
                    l.deadline_ms = now_ms + COPY_DEADLINE_MS;
                    l.phase = Phase::Attempt;
                    self.next += 1;
                }
                Phase::Attempt => {
                    let (p, target) = self.join(lane);
                    if now_ms > self.lanes[lane].deadline_ms {
                        self.give_up(lane, "deadline passed".into());
                        continue;
                    }
                    let Some(map) = map else {
                        self.give_up(lane, "no map".into());
                        continue;
                    };
                    if !map.is_joining(p, target) {
                        self.give_up(lane, format!("{target} is no longer joining {p}"));
                        continue;
                    }
                    let Some(source) = map.readable(p).next() else {
                        self.give_up(lane, "no readable replica".into());
                        continue;
                    };
                    // Every member first (not only the source): a write prepared under
                    // an older epoch on any of them must be decided before the copy
                    // starts, or it commits where the copy never sees it; on the
                    // joining brick itself (from an earlier stay), or it lands after the
                    // copy passed its key and stays, older than the source's.
                    let members = if mutation::active(Mutation::SkipProbe) {
                        Vec::new()
                    } else {
                        map.groups().get(&p).map_or(Vec::new(), |g| g.iter().copied().filter(|b| map.bricks().contains_key(b)).collect())
                    };
                    self.lanes[lane].attempt_started_ms = now_ms;
                    self.lanes[lane].phase = Phase::Probe { source, members, at: 0 };
                }
                Phase::Probe { source, members, at } => {
                    let Some(&member) = members.get(at) else {
                        let l = &mut self.lanes[lane];
                        l.drain_ms = now_ms - l.attempt_started_ms;
                        l.phase = Phase::Count { source };
                        continue;
                    };
                    if now_ms > self.lanes[lane].deadline_ms {
                        self.give_up(lane, format!("{member} still holds writes of older epochs"));
                        continue;
                    }
                    let (p, _) = self.join(lane);
                    let Some(addr) = map.and_then(|m| core_addr(m, member, p)) else {
                        self.retry(lane, format!("probe {member}: not in the map"), now_ms);
                        continue;
                    };
                    return self.call(lane, Line::Probe(at), addr, Op::SnapshotChunk, SnapshotRequest::probe(p.0).to_bytes().to_vec());
                }
                Phase::Read { source, from, token } => {
                    let (p, _) = self.join(lane);
                    let Some(addr) = map.and_then(|m| core_addr(m, source, p)) else {
                        self.retry(lane, format!("{source} is not in the map"), now_ms);
                        continue;
                    };
                    return self.call(lane, Line::Source, addr, Op::SnapshotChunk, SnapshotRequest::read(p.0, from, token).to_bytes().to_vec());
                }
                Phase::Install { chunk, .. } => {
                    let Some(addr) = self.target_addr(lane, map) else { continue };
                    return self.call(lane, Line::Target, addr, Op::Install, chunk);
                }
                Phase::Count { .. } => {
                    let Some(addr) = self.target_addr(lane, map) else { continue };
                    let (p, _) = self.join(lane);
                    return self.call(lane, Line::Target, addr, Op::Digests, DigestRequest { partition: p.0, log2: 0, from: 0, count: 0 }.to_bytes());
                }
                Phase::Digest { source, log2, from } => {
                    let buckets = 1u64 << log2;
                    if u64::from(from) >= buckets {
                        self.partition_done(lane, source, now_ms);
                        continue;
                    }
                    let Some(addr) = self.target_addr(lane, map) else { continue };
                    let (p, _) = self.join(lane);
                    let count = (buckets - u64::from(from)).min(u64::from(DIGESTS_PER_CALL)) as u32;
                    return self.call(lane, Line::Target, addr, Op::Digests, DigestRequest { partition: p.0, log2, from, count }.to_bytes());
                }
                Phase::Diff { source, log2, from, digests } => {
                    let (p, _) = self.join(lane);
                    let Some(addr) = map.and_then(|m| core_addr(m, source, p)) else {
                        self.retry(lane, format!("{source} is not in the map"), now_ms);
                        continue;
                    };
                    return self.call(lane, Line::Source, addr, Op::Diff, DiffRequest { partition: p.0, log2, from, digests }.to_bytes());
                }
                Phase::Repair { msg, .. } => {
                    let Some(addr) = self.target_addr(lane, map) else { continue };
                    return self.call(lane, Line::Target, addr, Op::Repair, msg);
                }
            }
        }
    }

    /// The joining replica's address for the lane's join; `None` (the join given up)
    /// if it is no longer in the map.
    fn target_addr(&mut self, lane: usize, map: Option<&ClusterMap>) -> Option<SocketAddr> {
        let (p, target) = self.join(lane);
        let addr = map.and_then(|m| core_addr(m, target, p));
        if addr.is_none() {
            self.give_up(lane, format!("{target} is not in the map"));
        }
        addr
    }

    /// The lane's join is complete: note it and go on with the next.
    fn partition_done(&mut self, lane: usize, source: BrickId, now_ms: u64) {
        let (p, target) = self.join(lane);
        let l = &self.lanes[lane];
        let (keys, bytes, digest_bytes, drain_ms) = (l.keys, l.bytes, l.digest_bytes, l.drain_ms);
        let ms = now_ms - l.partition_started_ms;
        self.keys_total += keys;
        self.bytes_total += bytes;
        self.digest_bytes_total += digest_bytes;
        self.drain_max_ms = self.drain_max_ms.max(drain_ms);
        let how = match digest_bytes {
            0 => format!("copied partition {p} to {target} from {source}: {keys} keys"),
            d => {
                self.caught_up += 1;
                format!("caught up partition {p} on {target} from {source}: {keys} keys changed, {} of digests", mib(d))
            }
        };
        self.out.push_back(Step::Note(format!(
            "{how}, {} in {ms} ms ({}); writes never blocked, copy start waited {drain_ms} ms for older writes",
            mib(bytes),
            rate(bytes, ms)
        )));
        self.done.push((p, target));
        // The lines stay open: the lane's next partition likely reads from and writes
        // to the same cores (the shell reconnects where the address differs).
        self.lanes[lane].at = None;
        self.lanes[lane].phase = Phase::Idle;
    }

    fn call(&mut self, lane: usize, line: Line, addr: SocketAddr, op: Op, value: Vec<u8>) {
        self.out.push_back(Step::Call { lane, line, addr, op, epoch: self.epoch, value });
    }

    /// The joins copied so far, in the order they finished.
    pub fn done(&self) -> &[Join] {
        &self.done
    }

    /// The reply to `lane`'s last `Step::Call` (or why there is none).
    pub fn answer(&mut self, lane: usize, answer: Answer, now_ms: u64) {
        assert!(self.lanes[lane].asked, "the copy driver got an answer on lane {lane}, which asked nothing");
        self.lanes[lane].asked = false;
        let (p, target) = self.join(lane);
        let deadline_ms = self.lanes[lane].deadline_ms;
        let set = |d: &mut CopyDriver, phase: Phase| d.lanes[lane].phase = phase;
        match (self.lanes[lane].phase.clone(), answer) {
            (Phase::Probe { members, at, .. }, answer) => match answer {
                Answer::Reply(Status::Behind | Status::Unavailable, _) => self.pause(lane, BEHIND_WAIT_MS, now_ms),
                // Ok: nothing pending there; anything else: no longer a member at its
                // epoch. Either way, the next member.
                Answer::Reply(..) => {
                    if let Phase::Probe { at: a, .. } = &mut self.lanes[lane].phase {
                        *a = at + 1;
                    }
                }
                Answer::Lost(why) => self.retry(lane, format!("probe {}: {why}", members[at]), now_ms),
            },
            (Phase::Read { source, from, token }, answer) => match answer {
                Answer::Reply(Status::Ok, chunk) => match Chunk::decode(&chunk) {
                    Ok(c) if c.partition == p.0 && (c.done || c.next > from) => {
                        let (next, token, last) = (c.next, c.token, c.done);
                        set(self, Phase::Install { source, chunk, next, token, last });
                    }
                    Ok(_) => self.give_up(lane, format!("{source} sent a chunk of partition {p} that does not move the copy on")),
                    Err(e) => self.give_up(lane, format!("bad chunk from {source}: {e}")),
                },
                Answer::Reply(Status::Behind | Status::Unavailable, _) if now_ms < deadline_ms => {
                    if token == 0 {
                        self.lanes[lane].drain_ms = now_ms - self.lanes[lane].attempt_started_ms;
                    }
                    self.pause(lane, BEHIND_WAIT_MS, now_ms);
                }
                Answer::Reply(status, why) => self.retry(lane, format!("{source}: {}: {}", status.name(), String::from_utf8_lossy(&why)), now_ms),
                Answer::Lost(why) => self.retry(lane, format!("{source}: {why}"), now_ms),
            },
            (Phase::Install { source, next, token, last, chunk }, answer) => match answer {
                Answer::Reply(Status::Ok, n) if n.len() == 8 => {
                    self.lanes[lane].keys += u64::from_le_bytes(n[..8].try_into().expect("8 bytes"));
                    self.lanes[lane].bytes += chunk.len() as u64;
                    if !last {
                        set(self, Phase::Read { source, from: next, token });
                        return;
                    }
                    self.partition_done(lane, source, now_ms);
                }
                answer => self.target_failed(lane, answer, now_ms),
            },
            (Phase::Count { source }, answer) => match answer {
                Answer::Reply(Status::Ok, reply) => match decode_digest_reply(&reply) {
                    Ok((0, _)) => set(self, Phase::Read { source, from: 0, token: 0 }),
                    Ok((keys, _)) => set(self, Phase::Digest { source, log2: buckets_log2_for(keys), from: 0 }),
                    Err(e) => self.give_up(lane, format!("bad digests from {target}: {e}")),
                },
                answer => self.target_failed(lane, answer, now_ms),
            },
            (Phase::Digest { source, log2, from }, answer) => match answer {
                Answer::Reply(Status::Ok, reply) => {
                    let asked = ((1u64 << log2) - u64::from(from)).min(u64::from(DIGESTS_PER_CALL)) as usize;
                    match decode_digest_reply(&reply) {
                        Ok((_, digests)) if digests.len() == asked => {
                            self.lanes[lane].digest_bytes += reply.len() as u64;
                            set(self, Phase::Diff { source, log2, from, digests });
                        }
                        Ok((_, digests)) => self.give_up(lane, format!("{target} sent {} digests for {asked} buckets", digests.len())),
                        Err(e) => self.give_up(lane, format!("bad digests from {target}: {e}")),
                    }
                }
                answer => self.target_failed(lane, answer, now_ms),
            },
            (Phase::Diff { source, log2, from, digests }, answer) => match answer {
                Answer::Reply(Status::Ok, msg) => {
                    let end = from + digests.len() as u32;
                    match Buckets::decode(&msg) {
                        Ok(b) if b.partition == p.0 && b.log2 == log2 && b.next > from && b.next <= end && b.buckets().all(|x| x >= from && x < b.next) => {
                            let (next, rest) = (b.next, digests[(b.next - from) as usize..].to_vec());
                            set(self, Phase::Repair { source, log2, msg, next, end, rest });
                        }
                        Ok(_) => self.give_up(lane, format!("{source} answered a diff of partition {p} outside what was asked")),
                        Err(e) => self.give_up(lane, format!("bad diff from {source}: {e}")),
                    }
                }
                Answer::Reply(Status::Behind | Status::Unavailable, _) if now_ms < deadline_ms => self.pause(lane, BEHIND_WAIT_MS, now_ms),
                // A bucket of the source's holds more than a frame: compare again, from
                // the start, with twice the buckets.
                Answer::Reply(Status::Conflict, why) if log2 < BUCKETS_LOG2_MAX => {
                    self.out.push_back(Step::Note(format!("catch-up of {p}: {}; {} buckets now", String::from_utf8_lossy(&why), 1u64 << (log2 + 1))));
                    set(self, Phase::Digest { source, log2: log2 + 1, from: 0 });
                }
                Answer::Reply(status, why) => self.retry(lane, format!("{source}: {}: {}", status.name(), String::from_utf8_lossy(&why)), now_ms),
                Answer::Lost(why) => self.retry(lane, format!("{source}: {why}"), now_ms),
            },
            (Phase::Repair { source, log2, msg, next, end, rest }, answer) => match answer {
                Answer::Reply(Status::Ok, n) if n.len() == 8 => {
                    self.lanes[lane].keys += u64::from_le_bytes(n[..8].try_into().expect("8 bytes"));
                    self.lanes[lane].bytes += msg.len() as u64;
                    set(
                        self,
                        match next < end {
                            true => Phase::Diff { source, log2, from: next, digests: rest },
                            false => Phase::Digest { source, log2, from: end },
                        },
                    );
                }
                answer => self.target_failed(lane, answer, now_ms),
            },
            (phase, _) => unreachable!("an answer on lane {lane} in phase {phase:?}"),
        }
    }

    /// The joining replica did not do what was asked: wait if it is behind, else give up
    /// the join (the authority plans it again).
    fn target_failed(&mut self, lane: usize, answer: Answer, now_ms: u64) {
        let (_, target) = self.join(lane);
        match answer {
            Answer::Reply(Status::Behind, _) if now_ms < self.lanes[lane].deadline_ms => self.pause(lane, BEHIND_WAIT_MS, now_ms),
            Answer::Reply(status, why) => self.give_up(lane, format!("{target} refused the copy: {}: {}", status.name(), String::from_utf8_lossy(&why))),
            // A lost line (one kept from the lane's last partition may have closed while
            // idle): a new attempt. A target that died is removed from the map, and the
            // attempt then gives up; one that restarted refuses the copy.
            Answer::Lost(why) => self.retry(lane, format!("{target}: {why}"), now_ms),
        }
    }
}

/// A byte count for people: B, KiB or MiB.
fn mib(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1048576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64),
    }
}

/// Bytes over milliseconds as MiB/s (`-` for a copy too short to time).
fn rate(bytes: u64, ms: u64) -> String {
    match ms {
        0 => "- MiB/s".into(),
        _ => format!("{:.1} MiB/s", bytes as f64 / (1u64 << 20) as f64 / (ms as f64 / 1000.0)),
    }
}

/// The address of the core of `brick` that owns partition `p`.
fn core_addr(map: &ClusterMap, brick: BrickId, p: PartitionId) -> Option<SocketAddr> {
    let cores = &map.bricks().get(&brick)?.cores;
    cores.get(map.core_of(p.prefix() as u64, cores.len())).copied()
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::BrickAddr;

    fn addr(b: u32) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 2000 + b as u16))
    }

    /// A cluster of three bricks, two replicas, with the third brick of each of `count`
    /// partitions joining it.
    fn joining(count: usize) -> (ClusterMap, Vec<Join>) {
        let bricks = (0..3).map(|b| (BrickId(b), BrickAddr::tcp(vec![addr(b)]))).collect();
        let map = ClusterMap::initial(4, bricks, 2).expect("map");
        let outside = |g: &[BrickId]| (0..3).map(BrickId).find(|b| !g.contains(b)).expect("a brick outside the group");
        let joins: Vec<Join> = map.groups().iter().take(count).map(|(p, g)| (*p, outside(g))).collect();
        assert_eq!(joins.len(), count);
        let map = map.begin_join(&joins).expect("join");
        (map, joins)
    }

    /// Answers a read with one chunk that ends the partition, and everything else with
    /// success (a joining replica holding nothing: a full copy).
    fn reply(op: Op, value: &[u8]) -> Answer {
        match op {
            Op::SnapshotChunk if !SnapshotRequest::decode(value).expect("request").is_probe() => {
                let req = SnapshotRequest::decode(value).expect("request");
                let mut chunk = Vec::new();
                Chunk::start(&mut chunk, req.partition, 0, 1, true);
                Answer::Reply(Status::Ok, chunk)
            }
            Op::SnapshotChunk => Answer::Reply(Status::Ok, Vec::new()),
            _ => Answer::Reply(Status::Ok, 0u64.to_le_bytes().to_vec()),
        }
    }

    #[test]
    fn every_other_member_is_probed_before_the_copy_reads_and_then_it_finishes() {
        let (map, joins) = joining(1);
        let (p, _) = joins[0];
        let group = map.groups()[&p].clone();
        let mut driver = CopyDriver::new(joins.clone(), map.epoch(), 0);
        let (mut probed, mut now) = (Vec::new(), 1);
        for _ in 0..1000 {
            match driver.poll(Some(&map), now) {
                Step::Call { lane, line: Line::Probe(_), addr, op: Op::SnapshotChunk, value, .. } => {
                    assert!(SnapshotRequest::decode(&value).expect("request").is_probe());
                    probed.push(addr);
                    // The first member still holds an older write once.
                    let status = if probed.len() == 1 { Status::Behind } else { Status::Ok };
                    driver.answer(lane, Answer::Reply(status, Vec::new()), now);
                }
                Step::Call { lane, line: Line::Source, op, value, .. } => {
                    // Every member, the joining brick among them, one of them twice.
                    assert_eq!(probed.len(), group.len() + 1, "the source was read before every member said nothing older is pending");
                    driver.answer(lane, reply(op, &value), now);
                }
                Step::Call { lane, line: Line::Target, op, value, .. } => {
                    if op == Op::Digests {
                        assert_eq!(DigestRequest::decode(&value).expect("request").count, 0);
                    }
                    driver.answer(lane, reply(op, &value), now);
                }
                Step::Finished(done) => {
                    assert_eq!(done, joins);
                    return;
                }
                Step::Wait { ms } => now += ms.expect("a pause, with no call out"),
                Step::Call { .. } => panic!("an unexpected call"),
                Step::HangUp { .. } | Step::Note(_) => {}
            }
        }
        panic!("the copy never finished");
    }

    #[test]
    fn lanes_copy_partitions_at_once_and_every_join_finishes() {
        let (map, joins) = joining(10);
        let mut driver = CopyDriver::new(joins.clone(), map.epoch(), 0);
        let mut out: VecDeque<(usize, Op, Vec<u8>)> = VecDeque::new();
        let (mut most_out, mut notes) = (0, Vec::new());
        for _ in 0..10_000 {
            match driver.poll(Some(&map), 1) {
                Step::Call { lane, op, value, .. } => {
                    assert!(out.iter().all(|(l, _, _)| *l != lane), "lane {lane} has two calls out");
                    out.push_back((lane, op, value));
                    most_out = most_out.max(out.len());
                }
                // Nothing more to send: the oldest call is answered.
                Step::Wait { ms: None } => {
                    let (lane, op, value) = out.pop_front().expect("a wait for an answer has a call out");
                    driver.answer(lane, reply(op, &value), 1);
                }
                Step::Finished(mut done) => {
                    assert!(out.is_empty());
                    done.sort();
                    let mut all = joins.clone();
                    all.sort();
                    assert_eq!(done, all, "every join finished once");
                    assert_eq!(most_out, COPY_LANES, "every lane had a call out at once");
                    assert_eq!(notes.iter().filter(|n: &&String| n.starts_with("recovery: 10/10")).count(), 1, "one summary: {notes:?}");
                    return;
                }
                Step::Note(n) => notes.push(n),
                Step::Wait { ms: Some(_) } => panic!("a pause with nothing refused"),
                Step::HangUp { .. } => {}
            }
        }
        panic!("the copy never finished");
    }
}
