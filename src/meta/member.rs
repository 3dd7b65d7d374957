//! One member of the map authority group, sans-I/O: a raft node (raft-rs `RawNode`)
//! whose log holds every change of the authority's durable state, and, while it leads,
//! the `Authority` that decides those changes. Peer messages, clock ticks and request
//! frames come in; raft messages for the other members, replies (released once what
//! they depend on is committed), copy plans and log lines go out. `meta::run` drives it
//! over TCP and threads; the simulator (`sim/authority.rs`) drives the same code over
//! simulated links, in groups of 1, 3 and 5.
//!
//! - The replicated state (`Replicated`) is the published map and the ids given out.
//!   Each entry is the whole new state, so a follower applies it by taking it.
//! - Only the leader runs an `Authority`, built from the committed state once its own
//!   first entry of the term is committed (so it starts from the newest committed map).
//!   It is built as after a restart: every known brick gets a full timeout from then on,
//!   so a leader change removes no live brick.
//! - A change the leader's authority makes is proposed, and nothing depends on it until
//!   it is committed: the map a heartbeat or map fetch carries is always the committed
//!   one, a registration's answer waits for the commit of everything proposed before it,
//!   and a copy starts only once the map that made its replicas joining is committed.
//! - Bricks' leases are granted by heartbeat answers, which only a leader gives
//!   (followers answer `NotLeader` with the leader's address), and only while a majority
//!   has answered it within `LEADER_LEASE_MS` by its own clock (raft's check-quorum
//!   counts ticks, which stop while the process is paused); ARCHITECTURE.md gives the
//!   timing argument.

use std::net::SocketAddr;
use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{Entry, Message};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole, Storage as _};
use serde::{Deserialize, Serialize};

use crate::hash::HashMap;
use crate::log::{Disk, LogError};
use crate::map::ClusterMap;
use crate::proto::{decode_exact, encode, Frame, Kind, Op, Status};

use super::authority::{Actions, Authority, AuthorityConfig, Join};
use super::raft_log::{RaftLog, RaftLogError};
use super::session::Session;

/// How often the shell ticks a member: raft's logical clock.
pub const TICK_MS: u64 = 25;
/// How often the leader's authority ticks (removals, plans), as a lone `dds meta` did.
pub const AUTHORITY_TICK_MS: u64 = 50;
/// A leader sends heartbeats every tick.
const HEARTBEAT_TICKS: usize = 1;
/// A leader answers for the group only while a majority has answered it this recently
/// (by its own clock): a new leader is elected only after a majority heard nothing from
/// the old one for an election timeout (`ELECTION_TICKS` ticks, at least 200 ms), so a
/// lease the old one grants after that ends by the time it is `LEASE_MS` old.
pub const LEADER_LEASE_MS: u64 = 200;
/// A follower that hears no leader for 8 to 16 ticks (200-400 ms) campaigns: a new
/// leader is usually in office before a brick's lease (`LEASE_MS`, 500 ms) runs out.
pub const ELECTION_TICKS: usize = 8;

#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub id: u64,
    /// Every member's raft id and address, this one's included (a fixed membership).
    pub members: Vec<(u64, SocketAddr)>,
    pub authority: AuthorityConfig,
}

/// The authority's durable state: what every member holds once committed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replicated {
    pub map: Option<ClusterMap>,
    /// Brick ids below this were given out.
    pub next_fresh: u32,
}

/// A raft entry's data: the whole new `Replicated` (the map as its JSON, so that
/// reading it back goes through the map's validating parser).
#[derive(Serialize, Deserialize)]
struct Change {
    map: Option<String>,
    next_fresh: u32,
}

impl Replicated {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&Change { map: self.map.as_ref().map(|m| m.to_json()), next_fresh: self.next_fresh }).expect("serialises")
    }

    fn decode(bytes: &[u8]) -> Result<Replicated, String> {
        let change: Change = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let map = change.map.map(|m| ClusterMap::from_json(&m)).transpose().map_err(|e| e.to_string())?;
        Ok(Replicated { map, next_fresh: change.next_fresh })
    }
}

/// Copy these joins (this leader's, in `term`): the map that made them joining, of
/// `epoch`, is committed.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyPlan {
    pub term: u64,
    pub joins: Vec<Join>,
    pub epoch: u64,
}

/// What a step asks the shell to do.
#[derive(Debug, Default)]
pub struct Output {
    /// Raft messages, each a whole `Op::Raft` frame: (member id, frame), in order per
    /// member.
    pub messages: Vec<(u64, Vec<u8>)>,
    pub copy: Option<CopyPlan>,
    /// Lines for the log (elections, map changes).
    pub notes: Vec<String>,
    /// The committed map changed.
    pub published: bool,
    /// This leader proposed a change (its append messages are in `messages`).
    pub proposed: bool,
}

/// When a reply may leave: once entry `index` of `term` is committed (0: at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    index: u64,
    term: u64,
}

impl Ticket {
    pub const NOW: Ticket = Ticket { index: 0, term: 0 };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Send the reply.
    Send,
    /// Not yet committed: ask again after the next step.
    Wait,
    /// It may never be: this member stopped leading. Close the connection instead (its
    /// peer asks again, and finds the leader).
    Lost,
}

/// The leader's own state, for its term.
struct Leading {
    term: u64,
    /// The entry that opened the term; the authority starts once it is applied.
    start_index: u64,
    authority: Option<Authority>,
    /// The last entry this leader proposed, and the state it proposed.
    proposed: u64,
    proposed_state: Option<Replicated>,
    /// A copy to start once entry `.0` is committed.
    copy_after: Option<(u64, Vec<Join>)>,
}

pub struct Member<D: Disk> {
    config: MemberConfig,
    node: RawNode<MemStorage>,
    mem: MemStorage,
    log: RaftLog<D>,
    state: Replicated,
    leading: Option<Leading>,
    /// The leader this member last knew, and in which term.
    known_leader: (u64, u64),
    /// Draws the election timeouts (`tick_raft`): splitmix64's state.
    rng: u64,
    /// Ticks to hold back before this member's election timer may fire, and the timer,
    /// term and role at the last tick (a lower reading or another term or role means the
    /// timer restarted).
    hold_ticks: usize,
    last_timer: (usize, u64, StateRole),
    /// A map to start from if the group has never committed one (`open`'s `initial`).
    seed: Option<ClusterMap>,
    /// When (`now_ms`) each other member was last heard from in the current term, and
    /// that term: what the leader's lease counts (`leases`).
    heard: HashMap<u64, (u64, u64)>,
    /// What `open` produced, handed out with the next step's output.
    stash: Output,
    /// When the leader's authority last ticked.
    authority_tick_ms: u64,
}

/// Spreads a seed's bits over all 64 (members' seeds differ in a few high bits only).
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl<D: Disk> Member<D> {
    /// Opens member `config.id`'s raft log in `dir` on `disk` and replays it. `seed`
    /// draws its election timeouts. `initial`: a map the group starts from if it has
    /// committed none (one an authority of an earlier version left in its directory);
    /// the first leader proposes it.
    pub fn open(config: MemberConfig, mut disk: D, dir: &Path, seed: u64, initial: Option<ClusterMap>) -> Result<Member<D>, RaftLogError> {
        assert!(config.members.iter().any(|(id, _)| *id == config.id), "member {} is not in its own membership", config.id);
        let mem = MemStorage::new();
        let (log, _held) = RaftLog::open(&mut disk, dir, &mem)?;
        mem.wl().set_conf_state(raft::eraftpb::ConfState::from((config.members.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![])));
        let applied = 0;
        let raft_config = Config {
            id: config.id,
            heartbeat_tick: HEARTBEAT_TICKS,
            election_tick: ELECTION_TICKS,
            check_quorum: true,
            pre_vote: true,
            // raft-rs draws from this range with the thread's generator: one value, so
            // its draw is fixed; `tick_raft` spreads the timeouts with a seeded one.
            min_election_tick: ELECTION_TICKS,
            max_election_tick: ELECTION_TICKS + 1,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 64,
            ..Config::default()
        };
        let node = RawNode::new(&raft_config, mem.clone(), &logger()).expect("a valid raft configuration");
        let mut member = Member {
            config,
            node,
            mem,
            log,
            state: Replicated::default(),
            leading: None,
            known_leader: (0, 0),
            rng: splitmix64(seed),
            hold_ticks: 0,
            last_timer: (usize::MAX, 0, StateRole::Follower),
            seed: initial,
            heard: HashMap::default(),
            stash: Output::default(),
            authority_tick_ms: 0,
        };
        if member.config.members.len() == 1 {
            // A group of one need not wait out an election timeout to lead.
            member.node.campaign().expect("a lone voter campaigns");
            let mut stash = Output::default();
            member.ready(0, &mut stash)?;
            member.stash = stash;
        }
        Ok(member)
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The map every member holds committed.
    pub fn published(&self) -> Option<&ClusterMap> {
        self.state.map.as_ref()
    }

    pub fn replicated(&self) -> &Replicated {
        &self.state
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// The leader's id as this member knows it (0: none).
    pub fn leader(&self) -> u64 {
        self.node.raft.leader_id
    }

    /// Leading, with its authority running.
    pub fn is_leader(&self) -> bool {
        self.leading.as_ref().is_some_and(|l| l.authority.is_some())
    }

    /// The address of member `id`.
    pub fn addr_of(&self, id: u64) -> Option<SocketAddr> {
        self.config.members.iter().find(|(m, _)| *m == id).map(|(_, a)| *a)
    }

    /// The running authority, while this member leads.
    pub fn authority(&self) -> Option<&Authority> {
        self.leading.as_ref().and_then(|l| l.authority.as_ref())
    }

    /// A draw from this member's generator (splitmix64), below `n`.
    fn draw(&mut self, n: u64) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.rng) % n
    }

    /// Ticks raft, holding back the tick that would start an election for the ticks
    /// drawn when its election timer last restarted: raft's own timeout is always
    /// `ELECTION_TICKS` (its range allows one value: it draws from the thread's generator,
    /// which a seeded simulation cannot repeat), so this member's generator spreads the
    /// members' timeouts over `ELECTION_TICKS` to twice that.
    fn tick_raft(&mut self) {
        let raft = &self.node.raft;
        let seen = (raft.election_elapsed, raft.term, raft.state);
        if seen.0 < self.last_timer.0 || (seen.1, seen.2) != (self.last_timer.1, self.last_timer.2) {
            self.hold_ticks = self.draw(ELECTION_TICKS as u64) as usize;
        }
        let raft = &self.node.raft;
        let due = raft.state != StateRole::Leader && raft.election_elapsed + 1 >= raft.randomized_election_timeout();
        if due && self.hold_ticks > 0 {
            self.hold_ticks -= 1;
        } else {
            self.node.tick();
        }
        let raft = &self.node.raft;
        self.last_timer = (raft.election_elapsed, raft.term, raft.state);
    }

    /// One tick of the clock (every `TICK_MS`): raft's, and the leader's authority's
    /// every `AUTHORITY_TICK_MS`.
    pub fn tick(&mut self, now_ms: u64) -> Result<Output, LogError> {
        let mut out = std::mem::take(&mut self.stash);
        self.tick_raft();
        // A tick may have ended this leadership (check-quorum): drop it before the
        // authority plans.
        self.follow_role(now_ms, &mut out);
        let authority_due = now_ms >= self.authority_tick_ms + AUTHORITY_TICK_MS;
        if authority_due {
            self.authority_tick_ms = now_ms;
        }
        if let Some(authority) = self.leading.as_mut().and_then(|l| l.authority.as_mut()).filter(|_| authority_due) {
            let actions = authority.tick(now_ms);
            self.take_actions(actions, &mut out);
        }
        self.ready(now_ms, &mut out)?;
        Ok(out)
    }

    /// A raft message from another member. A malformed one is refused (the shell
    /// closes that connection).
    fn on_message(&mut self, bytes: &[u8], now_ms: u64) -> Result<Output, MemberError> {
        let msg = Message::parse_from_bytes(bytes).map_err(|e| MemberError::BadMessage(e.to_string()))?;
        if !self.config.members.iter().any(|(id, _)| *id == msg.from) || msg.to != self.config.id {
            return Err(MemberError::BadMessage(format!("from {} to {}: not of this group", msg.from, msg.to)));
        }
        let (from, term) = (msg.from, msg.term);
        // A step error is raft refusing a message it cannot use (a stale one); nothing
        // of this member's changes.
        let _ = self.node.step(msg);
        if term == self.node.raft.term {
            self.heard.insert(from, (term, now_ms));
        }
        let mut out = std::mem::take(&mut self.stash);
        self.ready(now_ms, &mut out)?;
        Ok(out)
    }

    /// A request frame on `session`'s connection; its reply goes to `out`, to leave when
    /// `settle` says so. `Err`: close the connection (a malformed frame).
    pub fn on_frame(&mut self, session: &mut Session, now_ms: u64, bytes: &[u8], reply: &mut Vec<u8>) -> Result<(Ticket, Output), MemberError> {
        reply.clear();
        match decode_exact(bytes) {
            // From another member, on a connection that proved the cluster's secret.
            Ok(Frame { kind: Kind::Request(Op::Raft), value, .. }) => return Ok((Ticket::NOW, self.on_message(value, now_ms)?)),
            Ok(Frame { kind: Kind::Request(Op::Stats), request_id, .. }) => {
                let status = crate::proto::MemberStatus { id: self.id(), term: self.term(), leader: self.leader(), epoch: self.published().map_or(0, |m| m.epoch()) };
                let value = serde_json::to_vec(&status).expect("serialises");
                encode(reply, &Frame { kind: Kind::Reply(Op::Stats, Status::Ok), request_id, epoch: 0, key: &[], value: &value });
                return Ok((Ticket::NOW, std::mem::take(&mut self.stash)));
            }
            _ => {}
        }
        let leader_addr = self.addr_of(self.leader());
        let published = self.state.map.clone();
        // Only a leader that a majority has answered within `LEADER_LEASE_MS`, by this
        // clock, answers for the group (grants a brick's lease, registers it); one that
        // was paused, or cut off, does not, whatever its raft state says.
        let leases = self.leases(now_ms);
        let leading = self.leading.as_mut().filter(|l| l.authority.is_some() && leases);
        let term = self.node.raft.term;
        let (actions, waits) = match leading {
            Some(l) => session.on_frame(l.authority.as_mut().map(|a| (a, l.term)), published.as_ref(), leader_addr, now_ms, bytes, reply)?,
            None => session.on_frame(None, published.as_ref(), leader_addr, now_ms, bytes, reply)?,
        };
        let mut out = std::mem::take(&mut self.stash);
        self.take_actions(actions, &mut out);
        self.ready(now_ms, &mut out)?;
        let ticket = match &self.leading {
            Some(l) if waits && l.proposed > 0 => Ticket { index: l.proposed, term },
            _ => Ticket::NOW,
        };
        Ok((ticket, out))
    }

    /// `session`'s connection closed.
    pub fn on_close(&mut self, session: &Session, now_ms: u64) -> Result<Output, LogError> {
        let mut out = std::mem::take(&mut self.stash);
        if let Some(l) = self.leading.as_mut().filter(|l| session.registered_in(l.term)) {
            let actions = session.on_close(l.authority.as_mut().expect("a session registers with a running authority"), now_ms);
            self.take_actions(actions, &mut out);
        }
        self.ready(now_ms, &mut out)?;
        Ok(out)
    }

    /// Whether a majority of the group (this member included) was heard from in the
    /// current term within `LEADER_LEASE_MS` of `now_ms`.
    fn leases(&self, now_ms: u64) -> bool {
        let term = self.node.raft.term;
        let fresh = self.heard.iter().filter(|(id, (t, at))| **id != self.config.id && *t == term && now_ms.saturating_sub(*at) <= LEADER_LEASE_MS).count();
        (fresh + 1) * 2 > self.config.members.len()
    }

    /// Whether a reply held by `ticket` may leave.
    pub fn settle(&self, ticket: Ticket) -> Settled {
        if ticket.index == 0 {
            return Settled::Send;
        }
        if self.leading.as_ref().is_none_or(|l| l.term != ticket.term) {
            return Settled::Lost;
        }
        if self.node.raft.raft_log.applied < ticket.index {
            return Settled::Wait;
        }
        match self.mem.term(ticket.index) {
            Ok(t) if t == ticket.term => Settled::Send,
            _ => Settled::Lost,
        }
    }

    /// The copy this leader planned in `term` finished: `done` were copied (none: it
    /// failed). A report from an earlier term is dropped: that leader's successor plans
    /// its own copies.
    pub fn copied(&mut self, term: u64, done: &[Join], now_ms: u64) -> Result<Output, LogError> {
        let mut out = std::mem::take(&mut self.stash);
        if let Some(authority) = self.leading.as_mut().filter(|l| l.term == term).and_then(|l| l.authority.as_mut()) {
            let actions = if done.is_empty() {
                authority.copy_failed();
                Actions::default()
            } else {
                authority.copied(done)
            };
            self.take_actions(actions, &mut out);
        }
        self.ready(now_ms, &mut out)?;
        Ok(out)
    }

    /// Proposes what the authority changed, if anything, and remembers a copy to start.
    fn take_actions(&mut self, actions: Actions, out: &mut Output) {
        out.notes.extend(actions.notes);
        let Some(leading) = self.leading.as_mut() else { return };
        let Some(authority) = &leading.authority else { return };
        let last_proposed = leading.proposed.max(1);
        // Against what this leader last proposed (committed or not), so that a change
        // waiting for its commit is not proposed again at every step. The map is copied
        // only for a change (not for every heartbeat).
        let base = leading.proposed_state.as_ref().unwrap_or(&self.state);
        let changed = (actions.map_changed || authority.next_fresh() != base.next_fresh)
            && (authority.next_fresh() != base.next_fresh || authority.map() != base.map.as_ref());
        let next = changed.then(|| Replicated { map: authority.map().cloned(), next_fresh: authority.next_fresh() });
        if let Some(next) = next {
            // The planted bug `uncommitted-map` serves the leader's change before raft
            // has it on a majority.
            if crate::mutation::active(crate::mutation::Mutation::UncommittedMap) {
                out.published |= next.map.is_some() && next.map != self.state.map;
                self.state = next.clone();
            }
            if let Err(e) = self.node.propose(Vec::new(), next.encode()) {
                // raft refuses proposals only while it has no leader or hands over:
                // this leadership is over, and replies waiting on it are lost.
                out.notes.push(format!("member {}: proposal refused ({e}): leading no more", self.config.id));
                self.leading = None;
                return;
            }
            leading.proposed = self.node.raft.raft_log.last_index();
            leading.proposed_state = Some(next);
            out.proposed = true;
        }
        if !actions.copy.is_empty() {
            let at = if changed { leading.proposed } else { last_proposed };
            leading.copy_after = Some((at, actions.copy));
        }
    }

    /// Hands raft's ready state to the log, the wire and the state machine.
    fn ready(&mut self, now_ms: u64, out: &mut Output) -> Result<(), LogError> {
        while self.node.has_ready() {
            let mut rd = self.node.ready();
            // A leader's messages may leave before its own append is durable (raft
            // counts its own vote only once it is).
            self.send(rd.take_messages(), out);
            assert!(rd.snapshot().is_empty(), "member {}: raft sent a snapshot, and logs are never compacted", self.config.id);
            let committed = rd.take_committed_entries();
            self.apply(committed, out);
            self.log.persist(&self.mem, rd.entries(), rd.hs())?;
            self.send(rd.take_persisted_messages(), out);
            let mut light = self.node.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.log.commit_to(&self.mem, commit)?;
            }
            self.send(light.take_messages(), out);
            let committed = light.take_committed_entries();
            self.apply(committed, out);
            self.node.advance_apply();
        }
        self.follow_role(now_ms, out);
        self.release_copy(out);
        Ok(())
    }

    fn send(&self, messages: Vec<Message>, out: &mut Output) {
        for m in messages {
            let message = m.write_to_bytes().expect("a message encodes");
            let mut frame = Vec::with_capacity(message.len() + crate::proto::HEADER_LEN);
            encode(&mut frame, &Frame { kind: Kind::Request(Op::Raft), request_id: 0, epoch: 0, key: &[], value: &message });
            out.messages.push((m.to, frame));
        }
    }

    /// Applies committed entries: each non-empty one is the whole new state.
    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) {
        for entry in entries {
            if entry.data.is_empty() {
                continue;
            }
            // Written by a leader of this group and committed: unreadable is a bug.
            let next = Replicated::decode(&entry.data).unwrap_or_else(|e| panic!("member {}: committed entry {} unreadable: {e}", self.config.id, entry.index));
            let (old, new) = (self.state.map.as_ref().map_or(0, |m| m.epoch()), next.map.as_ref().map_or(0, |m| m.epoch()));
            let same_map = next.map == self.state.map;
            // Epochs only grow, across leaders: one map per epoch.
            // (The planted bug `uncommitted-map` breaks this on purpose: the simulator's
            // checks, not this assertion, must catch it.)
            let planted = crate::mutation::active(crate::mutation::Mutation::UncommittedMap);
            assert!(new > old || (same_map && new == old) || planted,
                "member {}: entry {} takes the map from epoch {old} to {new}", self.config.id, entry.index);
            assert!(next.next_fresh >= self.state.next_fresh || planted, "member {}: entry {} gives ids out again", self.config.id, entry.index);
            out.published |= !same_map;
            self.state = next;
        }
    }

    /// Hands out the copy the leader planned once the map it needs is committed.
    fn release_copy(&mut self, out: &mut Output) {
        let applied = self.node.raft.raft_log.applied;
        let Some(leading) = self.leading.as_mut() else { return };
        if leading.copy_after.as_ref().is_some_and(|(at, _)| applied >= *at) {
            let (_, joins) = leading.copy_after.take().expect("checked");
            let epoch = self.state.map.as_ref().map_or(0, |m| m.epoch());
            out.copy = Some(CopyPlan { term: leading.term, joins, epoch });
        }
    }

    /// Starts or ends this member's leadership as raft's role says.
    fn follow_role(&mut self, now_ms: u64, out: &mut Output) {
        let raft = &self.node.raft;
        let (term, leader) = (raft.term, raft.leader_id);
        if (term, leader) != self.known_leader && leader != 0 {
            self.known_leader = (term, leader);
            out.notes.push(match leader == self.config.id {
                true => format!("member {} elected leader for term {term}", self.config.id),
                false => format!("member {} follows member {leader} in term {term}", self.config.id),
            });
        }
        if raft.state != StateRole::Leader {
            if let Some(l) = self.leading.take() {
                out.notes.push(format!("member {} no longer leads (term {} over)", self.config.id, l.term));
            }
            return;
        }
        if self.leading.as_ref().is_none_or(|l| l.term != term) {
            let start_index = raft.raft_log.last_index();
            self.leading = Some(Leading { term, start_index, authority: None, proposed: 0, proposed_state: None, copy_after: None });
        }
        let applied = raft.raft_log.applied;
        let leading = self.leading.as_mut().expect("just set");
        if leading.authority.is_none() && applied >= leading.start_index {
            let seeded = self.state.map.is_none().then(|| self.seed.take()).flatten();
            let map = self.state.map.clone().or_else(|| seeded.clone());
            let authority = Authority::new(self.config.authority.clone(), map, now_ms).with_next_fresh(self.state.next_fresh);
            leading.authority = Some(authority);
            // Partitions short of replicas are planned at the next tick, as after a restart.
            if let Some(map) = &seeded {
                out.notes.push(format!("member {}: the map of epoch {} an earlier authority left seeds the raft log", self.config.id, map.epoch()));
                self.take_actions(Actions { map_changed: true, ..Actions::default() }, out);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("malformed raft message: {0}")]
    BadMessage(String),
    #[error("{0}")]
    Frame(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<String> for MemberError {
    fn from(why: String) -> MemberError {
        MemberError::Frame(why)
    }
}

#[cfg(test)]
#[path = "member_tests.rs"]
mod tests;
