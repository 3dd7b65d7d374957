//! The copy driver, sans-I/O: brings each joining replica up to date, chunk by chunk
//! from a readable replica, while writes go on to both. The authority's copy thread
//! (`meta::copy_thread`, blocking rpcs) and the simulator (simulated links and timers)
//! both drive it: `poll` says what to do next, `answer` takes the reply to the last
//! `Step::Call`. It owns the per-partition deadline, the older-epoch probe of every
//! member before a copy starts, retries and their pauses; it never touches a socket,
//! a clock or the authority (its shell hands `Step::Finished` to `Authority::copied`).

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
/// The pause before a new attempt after a lost connection or a refusing source.
const RETRY_MS: u64 = 50;
/// The pause before asking again a brick that answered `Behind` or `Unavailable`.
const BEHIND_WAIT_MS: u64 = 2;

/// One of the driver's connections. The shell keeps at most one open per line, opens
/// it at the first `Call` on it, and closes it at `HangUp` or when a call on it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// To the member being probed for older-epoch writes.
    Probe = 0,
    /// To the replica read from.
    Source = 1,
    /// To the joining replica.
    Target = 2,
}

pub const LINES: [Line; 3] = [Line::Probe, Line::Source, Line::Target];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send a request on `line` (connecting to `addr` first if it is not open) and
    /// hand the reply, or why there is none, to `answer`.
    Call { line: Line, addr: SocketAddr, op: Op, epoch: u64, value: Vec<u8> },
    /// Close `line` if it is open.
    HangUp(Line),
    /// Poll again after this long.
    Wait { ms: u64 },
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
    /// Start the next join, or finish.
    Next,
    /// A new attempt at the current join: check it still stands, pick a source.
    Attempt,
    /// Probing `members[at]`; the copy from `source` starts after the last.
    Probe { source: BrickId, members: Vec<BrickId>, at: usize },
    /// Reading from `source` at `cursor`.
    Read { source: BrickId, cursor: u32 },
    /// Installing the chunk read; then `next` (or done if `last`).
    Install { source: BrickId, chunk: Vec<u8>, next: u32, last: bool },
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
    Finished,
}

pub struct CopyDriver {
    joins: Vec<Join>,
    epoch: u64,
    at: usize,
    done: Vec<Join>,
    phase: Phase,
    /// Steps made by `answer` (notes, hang-ups, waits), handed out by `poll` first.
    out: VecDeque<Step>,
    /// A call is out: `poll` must not be called before its `answer`.
    asked: bool,
    started_ms: u64,
    partition_started_ms: u64,
    deadline_ms: u64,
    attempt_started_ms: u64,
    /// How long this attempt's start waited for older-epoch writes to drain.
    drain_ms: u64,
    drain_max_ms: u64,
    keys: u64,
    keys_total: u64,
    /// Chunk bytes installed (keys, values and their framing), this partition and all.
    bytes: u64,
    bytes_total: u64,
    /// Catch-up digests read from joining replicas, this partition and all.
    digest_bytes: u64,
    digest_bytes_total: u64,
    /// Partitions caught up (the others were copied whole).
    caught_up: usize,
}

impl CopyDriver {
    pub fn new(joins: Vec<Join>, epoch: u64, now_ms: u64) -> CopyDriver {
        CopyDriver {
            joins,
            epoch,
            at: 0,
            done: Vec::new(),
            phase: Phase::Next,
            out: VecDeque::new(),
            asked: false,
            started_ms: now_ms,
            partition_started_ms: now_ms,
            deadline_ms: now_ms,
            attempt_started_ms: now_ms,
            drain_ms: 0,
            drain_max_ms: 0,
            keys: 0,
            keys_total: 0,
            bytes: 0,
            bytes_total: 0,
            digest_bytes: 0,
            digest_bytes_total: 0,
            caught_up: 0,
        }
    }

    fn join(&self) -> Join {
        self.joins[self.at]
    }

    /// The current join failed: log why and go on with the next.
    fn give_up(&mut self, why: String) {
        let (p, target) = self.join();
        self.out.push_back(Step::Note(format!("copy of partition {p} to {target} failed: {why}")));
        self.hang_up();
        self.at += 1;
        self.phase = Phase::Next;
    }

    /// This attempt failed on the way (a lost connection, a refusing source): a new
    /// attempt at the same join, from the start, after a pause.
    fn retry(&mut self, why: String) {
        let (p, _) = self.join();
        self.out.push_back(Step::Note(format!("copy of {p}: {why}; retrying")));
        self.hang_up();
        self.out.push_back(Step::Wait { ms: RETRY_MS });
        self.phase = Phase::Attempt;
    }

    fn hang_up(&mut self) {
        self.out.extend(LINES.map(Step::HangUp));
    }

    /// The next step. `map` is the authority's map now.
    pub fn poll(&mut self, map: Option<&ClusterMap>, now_ms: u64) -> Step {
        assert!(!self.asked, "the copy driver was polled while its call was out");
        loop {
            if let Some(step) = self.out.pop_front() {
                return step;
            }
            match self.phase.clone() {
                Phase::Finished => return Step::Finished(self.done.clone()),
                Phase::Next => {
                    if self.at >= self.joins.len() {
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
                        self.phase = Phase::Finished;
                        continue;
                    }
                    self.partition_started_ms = now_ms;
                    self.deadline_ms = now_ms + COPY_DEADLINE_MS;
                    self.keys = 0;
                    self.bytes = 0;
                    self.digest_bytes = 0;
                    self.phase = Phase::Attempt;
                }
                Phase::Attempt => {
                    let (p, target) = self.join();
                    if now_ms > self.deadline_ms {
                        self.give_up("deadline passed".into());
                        continue;
                    }
                    let Some(map) = map else {
                        self.give_up("no map".into());
                        continue;
                    };
                    if !map.is_joining(p, target) {
                        self.give_up(format!("{target} is no longer joining {p}"));
                        continue;
                    }
                    let Some(source) = map.readable(p).next() else {
                        self.give_up("no readable replica".into());
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
                    self.attempt_started_ms = now_ms;
                    self.phase = Phase::Probe { source, members, at: 0 };
                }
                Phase::Probe { source, members, at } => {
                    let Some(&member) = members.get(at) else {
                        self.drain_ms = now_ms - self.attempt_started_ms;
                        self.phase = Phase::Count { source };
                        continue;
                    };
                    if now_ms > self.deadline_ms {
                        self.give_up(format!("{member} still holds writes of older epochs"));
                        continue;
                    }
                    let (p, _) = self.join();
                    let Some(addr) = map.and_then(|m| core_addr(m, member, p)) else {
                        self.retry(format!("probe {member}: not in the map"));
                        continue;
                    };
                    return self.call(Line::Probe, addr, Op::SnapshotChunk, SnapshotRequest::probe(p.0).to_bytes().to_vec());
                }
                Phase::Read { source, cursor } => {
                    let (p, _) = self.join();
                    let Some(addr) = map.and_then(|m| core_addr(m, source, p)) else {
                        self.retry(format!("{source} is not in the map"));
                        continue;
                    };
                    return self.call(Line::Source, addr, Op::SnapshotChunk, SnapshotRequest { partition: p.0, cursor }.to_bytes().to_vec());
                }
                Phase::Install { chunk, .. } => {
                    let Some(addr) = self.target_addr(map) else { continue };
                    return self.call(Line::Target, addr, Op::Install, chunk);
                }
                Phase::Count { .. } => {
                    let Some(addr) = self.target_addr(map) else { continue };
                    let (p, _) = self.join();
                    return self.call(Line::Target, addr, Op::Digests, DigestRequest { partition: p.0, log2: 0, from: 0, count: 0 }.to_bytes());
                }
                Phase::Digest { source, log2, from } => {
                    let buckets = 1u64 << log2;
                    if u64::from(from) >= buckets {
                        self.partition_done(source, now_ms);
                        continue;
                    }
                    let Some(addr) = self.target_addr(map) else { continue };
                    let (p, _) = self.join();
                    let count = (buckets - u64::from(from)).min(u64::from(DIGESTS_PER_CALL)) as u32;
                    return self.call(Line::Target, addr, Op::Digests, DigestRequest { partition: p.0, log2, from, count }.to_bytes());
                }
                Phase::Diff { source, log2, from, digests } => {
                    let (p, _) = self.join();
                    let Some(addr) = map.and_then(|m| core_addr(m, source, p)) else {
                        self.retry(format!("{source} is not in the map"));
                        continue;
                    };
                    return self.call(Line::Source, addr, Op::Diff, DiffRequest { partition: p.0, log2, from, digests }.to_bytes());
                }
                Phase::Repair { msg, .. } => {
                    let Some(addr) = self.target_addr(map) else { continue };
                    return self.call(Line::Target, addr, Op::Repair, msg);
                }
            }
        }
    }

    /// The joining replica's address for the current join; `None` (the join given up)
    /// if it is no longer in the map.
    fn target_addr(&mut self, map: Option<&ClusterMap>) -> Option<SocketAddr> {
        let (p, target) = self.join();
        let addr = map.and_then(|m| core_addr(m, target, p));
        if addr.is_none() {
            self.give_up(format!("{target} is not in the map"));
        }
        addr
    }

    /// The current join is complete: note it and go on with the next.
    fn partition_done(&mut self, source: BrickId, now_ms: u64) {
        let (p, target) = self.join();
        self.keys_total += self.keys;
        self.bytes_total += self.bytes;
        self.digest_bytes_total += self.digest_bytes;
        self.drain_max_ms = self.drain_max_ms.max(self.drain_ms);
        let ms = now_ms - self.partition_started_ms;
        let how = match self.digest_bytes {
            0 => format!("copied partition {p} to {target} from {source}: {} keys", self.keys),
            d => {
                self.caught_up += 1;
                format!("caught up partition {p} on {target} from {source}: {} keys changed, {} of digests", self.keys, mib(d))
            }
        };
        self.out.push_back(Step::Note(format!(
            "{how}, {} in {ms} ms ({}); writes never blocked, copy start waited {} ms for older writes",
            mib(self.bytes),
            rate(self.bytes, ms),
            self.drain_ms
        )));
        self.done.push((p, target));
        self.hang_up();
        self.at += 1;
        self.phase = Phase::Next;
    }

    fn call(&mut self, line: Line, addr: SocketAddr, op: Op, value: Vec<u8>) -> Step {
        self.asked = true;
        Step::Call { line, addr, op, epoch: self.epoch, value }
    }

    /// The joins copied so far, in order.
    pub fn done(&self) -> &[Join] {
        &self.done
    }

    /// The reply to the last `Step::Call` (or why there is none).
    pub fn answer(&mut self, answer: Answer, now_ms: u64) {
        assert!(self.asked, "the copy driver got an answer it did not ask for");
        self.asked = false;
        let (p, target) = self.join();
        let behind_wait = |d: &mut CopyDriver| d.out.push_back(Step::Wait { ms: BEHIND_WAIT_MS });
        match (self.phase.clone(), answer) {
            (Phase::Probe { members, at, .. }, answer) => match answer {
                Answer::Reply(Status::Behind | Status::Unavailable, _) => behind_wait(self),
                // Ok: nothing pending there; anything else: no longer a member at its
                // epoch. Either way, the next member, on a connection of its own.
                Answer::Reply(..) => {
                    self.out.push_back(Step::HangUp(Line::Probe));
                    if let Phase::Probe { at: a, .. } = &mut self.phase {
                        *a = at + 1;
                    }
                }
                Answer::Lost(why) => self.retry(format!("probe {}: {why}", members[at])),
            },
            (Phase::Read { source, cursor }, answer) => match answer {
                Answer::Reply(Status::Ok, chunk) => match Chunk::decode(&chunk) {
                    Ok(parsed) => {
                        let (next, last) = (parsed.cursor, parsed.done);
                        self.phase = Phase::Install { source, chunk, next, last };
                    }
                    Err(e) => self.give_up(format!("bad chunk from {source}: {e}")),
                },
                Answer::Reply(Status::Behind | Status::Unavailable, _) if now_ms < self.deadline_ms => {
                    if cursor == 0 {
                        self.drain_ms = now_ms - self.attempt_started_ms;
                    }
                    behind_wait(self);
                }
                Answer::Reply(status, why) => self.retry(format!("{source}: {}: {}", status.name(), String::from_utf8_lossy(&why))),
                Answer::Lost(why) => self.retry(format!("{source}: {why}")),
            },
            (Phase::Install { source, next, last, chunk }, answer) => match answer {
                Answer::Reply(Status::Ok, n) if n.len() == 8 => {
                    self.keys += u64::from_le_bytes(n[..8].try_into().expect("8 bytes"));
                    self.bytes += chunk.len() as u64;
                    if !last {
                        self.phase = Phase::Read { source, cursor: next };
                        return;
                    }
                    self.partition_done(source, now_ms);
                }
                answer => self.target_failed(answer, now_ms),
            },
            (Phase::Count { source }, answer) => match answer {
                Answer::Reply(Status::Ok, reply) => match decode_digest_reply(&reply) {
                    Ok((0, _)) => self.phase = Phase::Read { source, cursor: 0 },
                    Ok((keys, _)) => self.phase = Phase::Digest { source, log2: buckets_log2_for(keys), from: 0 },
                    Err(e) => self.give_up(format!("bad digests from {target}: {e}")),
                },
                answer => self.target_failed(answer, now_ms),
            },
            (Phase::Digest { source, log2, from }, answer) => match answer {
                Answer::Reply(Status::Ok, reply) => {
                    let asked = ((1u64 << log2) - u64::from(from)).min(u64::from(DIGESTS_PER_CALL)) as usize;
                    match decode_digest_reply(&reply) {
                        Ok((_, digests)) if digests.len() == asked => {
                            self.digest_bytes += reply.len() as u64;
                            self.phase = Phase::Diff { source, log2, from, digests };
                        }
                        Ok((_, digests)) => self.give_up(format!("{target} sent {} digests for {asked} buckets", digests.len())),
                        Err(e) => self.give_up(format!("bad digests from {target}: {e}")),
                    }
                }
                answer => self.target_failed(answer, now_ms),
            },
            (Phase::Diff { source, log2, from, digests }, answer) => match answer {
                Answer::Reply(Status::Ok, msg) => {
                    let end = from + digests.len() as u32;
                    match Buckets::decode(&msg) {
                        Ok(b) if b.partition == p.0 && b.log2 == log2 && b.next > from && b.next <= end && b.buckets().all(|x| x >= from && x < b.next) => {
                            let (next, rest) = (b.next, digests[(b.next - from) as usize..].to_vec());
                            self.phase = Phase::Repair { source, log2, msg, next, end, rest };
                        }
                        Ok(_) => self.give_up(format!("{source} answered a diff of partition {p} outside what was asked")),
                        Err(e) => self.give_up(format!("bad diff from {source}: {e}")),
                    }
                }
                Answer::Reply(Status::Behind | Status::Unavailable, _) if now_ms < self.deadline_ms => behind_wait(self),
                // A bucket of the source's holds more than a frame: compare again, from
                // the start, with twice the buckets.
                Answer::Reply(Status::Conflict, why) if log2 < BUCKETS_LOG2_MAX => {
                    self.out.push_back(Step::Note(format!("catch-up of {p}: {}; {} buckets now", String::from_utf8_lossy(&why), 1u64 << (log2 + 1))));
                    self.phase = Phase::Digest { source, log2: log2 + 1, from: 0 };
                }
                Answer::Reply(status, why) => self.retry(format!("{source}: {}: {}", status.name(), String::from_utf8_lossy(&why))),
                Answer::Lost(why) => self.retry(format!("{source}: {why}")),
            },
            (Phase::Repair { source, log2, msg, next, end, rest }, answer) => match answer {
                Answer::Reply(Status::Ok, n) if n.len() == 8 => {
                    self.keys += u64::from_le_bytes(n[..8].try_into().expect("8 bytes"));
                    self.bytes += msg.len() as u64;
                    self.phase = match next < end {
                        true => Phase::Diff { source, log2, from: next, digests: rest },
                        false => Phase::Digest { source, log2, from: end },
                    };
                }
                answer => self.target_failed(answer, now_ms),
            },
            (phase, _) => unreachable!("an answer in phase {phase:?}"),
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

impl CopyDriver {
    /// The joining replica did not do what was asked: wait if it is behind, else give up
    /// the join (the authority plans it again).
    fn target_failed(&mut self, answer: Answer, now_ms: u64) {
        let (_, target) = self.join();
        match answer {
            Answer::Reply(Status::Behind, _) if now_ms < self.deadline_ms => self.out.push_back(Step::Wait { ms: BEHIND_WAIT_MS }),
            Answer::Reply(status, why) => self.give_up(format!("{target} refused the copy: {}: {}", status.name(), String::from_utf8_lossy(&why))),
            Answer::Lost(why) => self.give_up(format!("{target}: {why}")),
        }
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

    #[test]
    fn every_other_member_is_probed_before_the_copy_reads_and_then_it_finishes() {
        let bricks = (0..3).map(|b| (BrickId(b), BrickAddr::tcp(vec![addr(b)]))).collect();
        let map = ClusterMap::initial(0, bricks, 2).expect("map");
        let p = *map.groups().keys().next().expect("a partition");
        let group = map.groups()[&p].clone();
        let target = (0..3).map(BrickId).find(|b| !group.contains(b)).expect("a brick outside the group");
        let map = map.begin_join(&[(p, target)]).expect("join");
        let mut driver = CopyDriver::new(vec![(p, target)], map.epoch(), 0);
        let mut probed = Vec::new();
        loop {
            match driver.poll(Some(&map), 1) {
                Step::Call { line: Line::Probe, addr, op: Op::SnapshotChunk, value, .. } => {
                    assert!(SnapshotRequest::decode(&value).expect("request").is_probe());
                    probed.push(addr);
                    // The first member still holds an older write once.
                    let status = if probed.len() == 1 { Status::Behind } else { Status::Ok };
                    driver.answer(Answer::Reply(status, Vec::new()), 1);
                }
                Step::Call { line: Line::Source, value, .. } => {
                    // Every member and the joining brick, one of them twice.
                    assert_eq!(probed.len(), group.len() + 2, "the source was read before every member said nothing older is pending");
                    let req = SnapshotRequest::decode(&value).expect("request");
                    let mut chunk = Vec::new();
                    Chunk::start(&mut chunk, req.partition, 0, true);
                    driver.answer(Answer::Reply(Status::Ok, chunk), 1);
                }
                Step::Call { line: Line::Target, op: Op::Install, .. } => driver.answer(Answer::Reply(Status::Ok, 0u64.to_le_bytes().to_vec()), 1),
                // The joining replica holds nothing of the partition: a full copy.
                Step::Call { line: Line::Target, op: Op::Digests, value, .. } => {
                    assert_eq!(DigestRequest::decode(&value).expect("request").count, 0);
                    driver.answer(Answer::Reply(Status::Ok, 0u64.to_le_bytes().to_vec()), 1);
                }
                Step::Finished(done) => {
                    assert_eq!(done, vec![(p, target)]);
                    break;
                }
                Step::Call { .. } => panic!("an unexpected call"),
                Step::HangUp(_) | Step::Wait { .. } | Step::Note(_) => {}
            }
        }
    }
}
