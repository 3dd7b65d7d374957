//! The map authority in the simulator: a raft group of 1, 3 or 5 `meta::member::Member`s,
//! each on its own simulated disk, driven as `meta::run` drives one: ticks, frames on
//! links (bricks' sessions, clients' map fetches, other members' raft messages as
//! `Op::Raft` frames), held replies released when they settle, the leader's copy
//! driver. Members crash (their raft log on disk survives), restart and pause, and are
//! replaced: one removed through the leader (raft's configuration change, as `dds
//! members --remove` asks it), then a new one added and started on a new disk, as `dds
//! meta --join` does. After every step: one map per epoch across the group, epochs only
//! grow on each member, one leader per term.

use std::net::SocketAddr;
use std::path::Path;

use rand::Rng;

use crate::hash::HashMap;
use crate::log::mem_disk::MemDisk;
use crate::map::ClusterMap;
use crate::meta::authority::AuthorityConfig;
use crate::meta::member::{Member, MemberConfig, MemberError, Output, Settled, Ticket, TICK_MS};
use crate::meta::raft_log::RaftLogError;
use crate::proto::{decode_exact, encode, Frame, Kind, MemberRequest, Op, Status};
use crate::meta::session::Session;

use super::copy::SimCopy;
use super::net::{Endpoint, Isolation, LinkId, Msg};
use super::{Event, Micros, World, MS};

pub(crate) struct SimMember {
    /// `None` while its process is down.
    pub member: Option<Member<MemDisk>>,
    disk: MemDisk,
    /// Incarnation: a dead member's timers are void.
    pub life: u64,
    pub paused_until: Micros,
    /// Its end of every connection to it.
    sessions: HashMap<LinkId, Session>,
    /// Replies waiting for what they depend on to be committed: (link, ticket, frame).
    held: Vec<(LinkId, Ticket, Vec<u8>)>,
    /// Its connection to each other member (by index), for raft messages.
    peers: Vec<Option<LinkId>>,
    /// The copy it drives, while it leads.
    pub copy: Option<SimCopy>,
    /// Down until then: no restart comes earlier.
    pub down_until: Micros,
    /// Removed from the group and stopped for good (`World::change_step`).
    pub retired: bool,
}

/// A membership change the simulator asked of the leader (as `dds members` and `dds
/// meta --join` do), its reply held until it settles.
pub(crate) struct Change {
    /// The member asked, the reply's ticket and frame.
    at: usize,
    ticket: Ticket,
    reply: Vec<u8>,
    what: ChangeStep,
}

#[derive(Clone, Debug)]
enum ChangeStep {
    /// Member (index) leaves; then a new one is added.
    Remove(usize),
    /// Member (index) joins, started once the leader answers, with the group its log
    /// begins from and the members the leader named when asked.
    Add(usize, Vec<(u64, SocketAddr)>, Vec<(u64, SocketAddr)>),
}

/// Members replaced in one run, at most.
const REPLACEMENTS_MAX: usize = 2;

/// Where member `m` (index) listens.
pub(crate) fn member_addr(m: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, m as u8 + 1], 7000))
}

/// The member that listens at `addr`.
pub(crate) fn member_of(addr: SocketAddr) -> Option<usize> {
    let SocketAddr::V4(v4) = addr else { return None };
    let [10, 0, 0, m] = v4.ip().octets() else { return None };
    (v4.port() == 7000 && m > 0).then(|| m as usize - 1)
}

impl SimMember {
    pub fn new(members: usize) -> SimMember {
        SimMember { member: None, disk: MemDisk::default(), life: 0, paused_until: 0, sessions: Default::default(), held: Vec::new(), peers: vec![None; members], copy: None, down_until: 0, retired: false }
    }

    pub fn is_up(&self) -> bool {
        self.member.is_some()
    }
}

impl World {
    /// Every member's raft id and address.
    fn membership(&self) -> Vec<(u64, SocketAddr)> {
        (0..self.members.len()).map(|m| (m as u64 + 1, member_addr(m))).collect()
    }

    /// The newest map the group has committed (a member that is up may lag behind it).
    pub(crate) fn published(&self) -> Option<&ClusterMap> {
        self.maps.last()
    }

    /// The member that leads with its authority running, if one does.
    pub(crate) fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| m.member.as_ref().is_some_and(|x| x.is_leader()))
    }

    /// Starts member `m` from its disk (a member that joined later: with the group its
    /// log begins from and the members the leader named, as `dds meta --join` does).
    pub(crate) fn start_member(&mut self, m: usize, config: AuthorityConfig) {
        let seed = self.seed ^ ((m as u64 + 1) << 40) ^ (self.members[m].life << 48);
        let (members, known) = match self.joined.iter().find(|(j, _, _)| *j == m) {
            Some((_, boot, known)) => (boot.clone(), known.clone()),
            None => (self.membership(), Vec::new()),
        };
        let member_config = MemberConfig { id: m as u64 + 1, members, known, authority: config };
        // A restarted member replays its log: its epochs grow again from its first.
        self.member_epochs.remove(&m);
        let sm = &mut self.members[m];
        sm.life += 1;
        match Member::open(member_config, sm.disk.clone(), Path::new("/meta"), seed, None) {
            Ok(member) => sm.member = Some(member),
            // Its removal committed though its asker never heard (`change_step`): it
            // refuses to start again, as `dds meta` does.
            Err(e @ RaftLogError::Removed { .. }) => {
                sm.retired = true;
                return self.note(format!("member {m}: {e}"));
            }
            Err(e) => return self.fail(format!("member {m} cannot open its raft log: {e}")),
        }
        let life = sm.life;
        if self.members.len() > 1 {
            self.note(format!("member {m} starts, incarnation {life}"));
        }
        self.after(if life == 1 { 50 * MS } else { TICK_MS * MS }, Event::MemberTick { member: m, life });
    }

    /// Member `m`'s process dies; it comes back after `down_ms`.
    pub(crate) fn crash_member(&mut self, m: usize, down_ms: u64) {
        let sm = &mut self.members[m];
        if sm.member.take().is_none() {
            return;
        }
        sm.sessions.clear();
        sm.held.clear();
        sm.copy = None;
        sm.peers.iter_mut().for_each(|p| *p = None);
        sm.down_until = self.now + down_ms * MS;
        self.note(format!("member {m} crashes for {down_ms} ms"));
        self.break_links_of(Endpoint::Member(m), true);
        self.after(down_ms * MS, Event::RestartMember { member: m });
    }

    pub(crate) fn restart_member(&mut self, m: usize) {
        let sm = &self.members[m];
        if sm.is_up() || sm.retired || self.now < sm.down_until {
            return;
        }
        let config = self.authority_config();
        self.start_member(m, config);
    }

    pub(crate) fn pause_member(&mut self, m: usize, micros: Micros) {
        self.note(format!("member {m} pauses for {} ms", micros / MS));
        let sm = &mut self.members[m];
        sm.paused_until = sm.paused_until.max(self.now + micros);
    }

    /// When paused member `m` resumes, if it is paused now.
    fn member_paused(&self, m: usize) -> Option<Micros> {
        let until = self.members[m].paused_until;
        (until > self.now).then_some(until)
    }

    pub(crate) fn member_tick(&mut self, m: usize, life: u64) {
        if self.members[m].life != life || !self.members[m].is_up() {
            return;
        }
        if let Some(at) = self.member_paused(m) {
            return self.schedule(at, Event::MemberTick { member: m, life });
        }
        let now_ms = self.now_ms();
        let step = self.members[m].member.as_mut().expect("up").tick(now_ms).map_err(|e| e.to_string());
        self.member_apply(m, step);
        self.after(TICK_MS * MS, Event::MemberTick { member: m, life });
    }

    /// A frame for member `m`: a copy's answer on a link it opened, else a request, a
    /// brick's session frame or another member's raft message (`Member::on_frame`).
    pub(crate) fn member_receive(&mut self, m: usize, link: LinkId, bytes: Msg) {
        if !self.members[m].is_up() {
            // Nobody listens: the connection is refused.
            return self.break_link(link, true);
        }
        if let Some(at) = self.member_paused(m) {
            return self.schedule(at, Event::Deliver { link, to: Endpoint::Member(m), msg: bytes });
        }
        if self.net.opener(link) == Some(Endpoint::Member(m)) {
            return self.copy_receive(m, link, bytes);
        }
        let now_ms = self.now_ms();
        let sm = &mut self.members[m];
        let session = sm.sessions.entry(link).or_insert_with(|| Session::new(format!("link {}", link.0)));
        let mut out = Vec::new();
        match sm.member.as_mut().expect("up").on_frame(session, now_ms, &bytes, &mut out) {
            Ok((ticket, step)) => {
                if !out.is_empty() {
                    sm.held.push((link, ticket, out));
                }
                self.member_apply(m, Ok(step));
            }
            Err(MemberError::Log(e)) => self.member_apply(m, Err(e.to_string())),
            Err(why) => {
                self.note(format!("member {m}: {why}"));
                self.break_link(link, true);
            }
        }
    }

    /// A link of member `m` broke: a brick's session ends, a copy's link or a peer's is
    /// lost.
    pub(crate) fn member_link_down(&mut self, m: usize, link: LinkId) {
        if let Some(at) = self.member_paused(m) {
            return self.schedule(at, Event::LinkDown { link, to: Endpoint::Member(m) });
        }
        let now_ms = self.now_ms();
        let sm = &mut self.members[m];
        sm.held.retain(|(l, _, _)| *l != link);
        sm.peers.iter_mut().filter(|p| **p == Some(link)).for_each(|p| *p = None);
        if let (Some(session), Some(member)) = (sm.sessions.remove(&link), sm.member.as_mut()) {
            let step = member.on_close(&session, now_ms).map_err(|e| e.to_string());
            self.member_apply(m, step);
        }
        self.copy_link_down(m, link);
    }

    /// Carries out what a step of member `m` asked for, and checks the group: raft
    /// messages to their members, a newly committed map recorded and checked, a copy
    /// started, replies released.
    pub(crate) fn member_apply(&mut self, m: usize, step: Result<Output, String>) {
        let out = match step {
            Ok(out) => out,
            Err(why) => return self.fail(format!("member {m} stopped: {why}")),
        };
        for n in &out.notes {
            self.note(format!("member {m}: {n}"));
        }
        let member = self.members[m].member.as_ref().expect("a member that stepped is up");
        match (out.published, member.published().cloned()) {
            (true, Some(map)) => self.record_map(m, map),
            (true, None) => return self.fail(format!("member {m} published no map after one")),
            _ => {}
        }
        if out.proposed && self.members.len() > 1 && self.faults_on && self.member_rng.random_bool(0.05) {
            // The leader dies at the worst moment: a change proposed, its messages not
            // yet sent (what it made public of it, its successor never saw).
            let down_ms = self.member_rng.random_range(50..=2000);
            return self.crash_member(m, down_ms);
        }
        for (to, frame) in out.messages {
            self.send_raft(m, to as usize - 1, frame);
        }
        if let Some(term) = self.members[m].member.as_ref().filter(|x| x.is_leader()).map(|x| x.term()) {
            match self.leaders.get(&term) {
                Some(&other) if other != m => return self.fail(format!("term {term} has two leaders: members {other} and {m}")),
                _ => {
                    self.leaders.insert(term, m);
                }
            }
        }
        if let Some(plan) = out.copy {
            let lives = self.bricks.iter().filter_map(|b| b.id.map(|id| (id, b.life))).collect();
            self.members[m].copy = Some(SimCopy::new(plan, self.now_ms(), lives));
            self.after(0, Event::CopyStep { member: m });
        }
        self.change_step(m);
        let held = std::mem::take(&mut self.members[m].held);
        for (link, ticket, reply) in held {
            match self.members[m].member.as_ref().expect("up").settle(ticket) {
                Settled::Send => self.send_back(link, reply),
                Settled::Wait => self.members[m].held.push((link, ticket, reply)),
                Settled::Lost => self.break_link(link, true),
            }
        }
    }

    /// A map member `m` has just committed: valid, newer than the last it published in
    /// this incarnation, and the same map any member published for that epoch.
    fn record_map(&mut self, m: usize, map: ClusterMap) {
        if let Err(e) = map.validate() {
            return self.fail(format!("member {m} published an invalid map at epoch {}: {e}", map.epoch()));
        }
        if let Some(&last) = self.member_epochs.get(&m) {
            if map.epoch() <= last {
                return self.fail(format!("member {m}'s map epoch went from {last} to {}", map.epoch()));
            }
        }
        self.member_epochs.insert(m, map.epoch());
        match self.maps.binary_search_by_key(&map.epoch(), |x| x.epoch()) {
            Ok(i) if self.maps[i] != map => self.fail(format!("two maps of epoch {}: member {m}'s differs from one published before", map.epoch())),
            Ok(_) => {}
            Err(i) => self.maps.insert(i, map),
        }
    }

    /// A raft message (an `Op::Raft` frame) from member `m` to member `to`, on the link
    /// `m` keeps to it.
    fn send_raft(&mut self, m: usize, to: usize, frame: Vec<u8>) {
        let link = match self.members[m].peers[to].filter(|l| self.net.alive(*l)) {
            Some(l) => l,
            None => {
                let l = self.open_link(Endpoint::Member(m), Endpoint::Member(to), None);
                self.members[m].peers[to] = Some(l);
                l
            }
        };
        self.send(link, Endpoint::Member(m), frame);
    }

    /// Asks member `at` (the leader, or it says who is) for a membership change, as
    /// the CLI does over a connection of its own.
    fn ask_change(&mut self, at: usize, what: ChangeStep) {
        let request = match &what {
            ChangeStep::Remove(m) => MemberRequest::Remove { id: *m as u64 + 1 },
            ChangeStep::Add(m, ..) => MemberRequest::Add { id: *m as u64 + 1, addr: member_addr(*m) },
        };
        let mut frame = Vec::new();
        encode(&mut frame, &Frame { kind: Kind::Request(Op::Members), request_id: 1, epoch: 0, key: &[], value: &serde_json::to_vec(&request).expect("serialises") });
        let now_ms = self.now_ms();
        let mut reply = Vec::new();
        if !self.members[at].is_up() {
            return;
        }
        self.note(format!("member {at} asked: {request:?}"));
        if matches!(what, ChangeStep::Remove(m) if m == at) {
            // A leader asked to remove itself hands over first and answers for the group
            // no more: its going out begins a window of the liveness check, as a
            // member's fault does (a handover whose message is lost lasts until raft
            // gives it up, an election timeout).
            self.recovery = None;
        }
        let member = self.members[at].member.as_mut().expect("up");
        match member.on_frame(&mut Session::new("admin".into()), now_ms, &frame, &mut reply) {
            Ok((ticket, step)) => {
                self.change = Some(Change { at, ticket, reply, what });
                self.member_apply(at, Ok(step));
            }
            Err(MemberError::Log(e)) => self.member_apply(at, Err(e.to_string())),
            Err(why) => self.fail(format!("member {at} refused a well-formed membership request: {why}")),
        }
    }

    /// The membership change asked of member `m`, once its reply may leave: a removal
    /// answered stops the removed member for good and asks for a new one; an addition
    /// answered (or lost: it may still commit) starts the new member.
    fn change_step(&mut self, m: usize) {
        let Some(change) = self.change.as_ref().filter(|c| c.at == m) else { return };
        let settled = match self.members[m].member.as_ref() {
            Some(member) => member.settle(change.ticket),
            None => Settled::Lost,
        };
        let status = match settled {
            Settled::Wait => return,
            Settled::Lost => None,
            Settled::Send => match decode_exact(&change.reply) {
                Ok(Frame { kind: Kind::Reply(Op::Members, status), .. }) => Some(status),
                other => return self.fail(format!("member {m} answered a membership request with {other:?}")),
            },
        };
        let what = self.change.take().expect("checked").what;
        self.note(format!("membership change {what:?} asked of member {m}: {}", status.map_or("no answer", |s| s.name())));
        match (what, status) {
            (ChangeStep::Remove(gone), Some(Status::Ok)) => {
                self.members[gone].retired = true;
                self.crash_member(gone, 0);
                let new = self.members.len();
                for sm in &mut self.members {
                    sm.peers.push(None);
                }
                self.members.push(SimMember::new(new + 1));
                self.members[new].retired = true;
                let Some(leader) = self.leader() else { return };
                let list = self.members[leader].member.as_ref().expect("leads").members();
                let mut known = list.members;
                known.push((new as u64 + 1, member_addr(new)));
                self.ask_change(leader, ChangeStep::Add(new, list.boot, known));
            }
            // Without an answer the addition may yet commit: the new member starts
            // either way, as `dds meta --join` would be run again.
            (ChangeStep::Add(new, boot, known), Some(Status::Ok) | None) => {
                self.joined.push((new, boot, known));
                self.members[new].retired = false;
                let config = self.authority_config();
                self.start_member(new, config);
            }
            _ => {}
        }
    }

    /// One member fault (only in groups of three or five): a crash, a restart of one
    /// that is down, a replacement, a pause, or (with `--partitions`) the leader's
    /// isolation. Drawn from the members' own generator, so seeds of groups of one run
    /// as they did before the group existed.
    pub(crate) fn member_fault(&mut self) {
        if self.options.partitions && self.member_rng.random_bool(0.3) && self.net.isolation.is_none() {
            if let Some(leader) = self.leader() {
                return self.isolate(leader);
            }
        }
        let m = self.member_rng.random_range(0..self.members.len());
        if !self.members[m].is_up() {
            return self.restart_member(m);
        }
        let replaced = self.members.len() - self.shape.members;
        if self.change.is_none() && replaced < REPLACEMENTS_MAX && self.member_rng.random_bool(0.1) {
            // Replace member `m`: the leader removes it (a leader asked to remove
            // itself hands over instead, and the change ends there).
            if let Some(leader) = self.leader() {
                return self.ask_change(leader, ChangeStep::Remove(m));
            }
        }
        if self.member_rng.random_bool(0.6) {
            let down_ms = self.member_rng.random_range(50..=3000);
            self.crash_member(m, down_ms);
        } else {
            let ms = self.member_rng.random_range(10..=1500);
            self.pause_member(m, ms * MS);
        }
    }

    /// Cuts the leader off from the other members for a drawn time. Each brick still
    /// reaches both sides, or only the leader, or only the rest: a brick that reaches
    /// only the leader keeps asking it for leases while the new leader, which the
    /// others follow, removes it and serves the writes to its partitions elsewhere,
    /// the case the leader's lease (`member::LEADER_LEASE_MS`) is for. Sometimes the
    /// leader is cut off from everyone.
    fn isolate(&mut self, leader: usize) {
        let alone = self.member_rng.random_bool(0.25);
        let (mut only_it, mut not_it) = (Vec::new(), Vec::new());
        for b in 0..self.bricks.len() {
            match self.member_rng.random_range(0..3) {
                _ if alone => not_it.push(b),
                0 => only_it.push(b),
                1 => not_it.push(b),
                _ => {}
            }
        }
        let heal_ms = self.member_rng.random_range(100..=4000);
        let whom = if alone { "everyone".to_string() } else { format!("the other members (bricks {only_it:?} reach only it, {not_it:?} only them)") };
        self.note(format!("member {leader}, the leader, cut off from {whom} for {heal_ms} ms"));
        self.set_isolation(Isolation { member: leader, only_it, not_it, clients: alone }, self.now + heal_ms * MS);
        self.after(heal_ms * MS, Event::HealIsolation);
    }
}
