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
//! - Membership changes are raft's own (`ConfChange`, one voter added or removed at a
//!   time, its address in the entry's context): `Op::Members` asks the leader. A member
//!   starts from the group its log begins with (`raft_log::Boot`) and the changes its
//!   committed entries hold; a leader asked to remove itself hands leadership over first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole, Storage as _};
use serde::{Deserialize, Serialize};

use crate::hash::HashMap;
use crate::log::{Disk, LogError};
use crate::map::ClusterMap;
use crate::proto::{decode_exact, encode, Frame, Kind, MemberList, MemberRequest, Op, Status};

use super::authority::{Actions, Authority, AuthorityConfig, Join};
use super::raft_log::{Boot, RaftLog, RaftLogError};
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
    /// The group its raft log begins from: every member's raft id and address (for a
    /// group started together, this one's included). A log that recorded its own
    /// (`raft_log::Boot`) overrides it.
    pub members: Vec<(u64, SocketAddr)>,
    /// Other members' addresses known beyond those (a joining member's: the group as
    /// the leader answered it).
    pub known: Vec<(u64, SocketAddr)>,
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
    /// The group's members changed (committed): the shell's senders follow `peers`.
    pub members_changed: bool,
    /// This member was removed from the group: it stops.
    pub removed: bool,
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
    /// Copy reports that came during a handover (`copied`), in order: a copy planned
    /// again (its brick restarted) runs beside the one it replaces, so two can.
    deferred_copied: Vec<Vec<Join>>,
}

pub struct Member<D: Disk> {
    config: MemberConfig,
    /// Where each member serves (voters, and those a joining member was told of).
    addrs: BTreeMap<u64, SocketAddr>,
    /// Ids that left the group: never given out again (raft keys its state by id).
    retired: BTreeSet<u64>,
    /// The group the log begins from (what a joining member is told).
    boot: Vec<(u64, SocketAddr)>,
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
        let mem = MemStorage::new();
        let (mut log, boot) = RaftLog::open(&mut disk, dir, &mem)?;
        let boot = match boot {
            Some(boot) => boot,
            None => {
                let boot = Boot { id: config.id, voters: config.members.clone(), known: config.known.clone() };
                log.write_boot(&boot)?;
                boot
            }
        };
        // A log written as another member's (a wrong --id or --dir) would vote twice.
        if boot.id != 0 && boot.id != config.id {
            return Err(RaftLogError::NotMine { id: config.id, owner: boot.id });
        }
        // The group and the state as of the last committed entry: raft starts from that
        // configuration (a member must never campaign in one its log has left behind).
        let hs = mem.initial_state().map_err(|e| RaftLogError::Replay { index: 0, what: e.to_string() })?.hard_state;
        let mut members = Membership::new(&boot);
        let mut state = Replicated::default();
        let committed = if hs.commit == 0 { Vec::new() } else {
            mem.entries(1, hs.commit + 1, None, raft::GetEntriesContext::empty(false)).map_err(|e| RaftLogError::Replay { index: hs.commit, what: e.to_string() })?
        };
        for entry in &committed {
            let bad = |what: String| RaftLogError::Replay { index: entry.index, what };
            match entry.get_entry_type() {
                EntryType::EntryConfChange => members.change(&ConfChange::parse_from_bytes(&entry.data).map_err(|e| bad(e.to_string()))?),
                EntryType::EntryNormal if !entry.data.is_empty() => state = Replicated::decode(&entry.data).map_err(bad)?,
                _ => {}
            }
        }
        if members.retired.contains(&config.id) {
            return Err(RaftLogError::Removed { id: config.id });
        }
        if !members.voters.contains(&config.id) && boot.known.is_empty() {
            return Err(RaftLogError::Foreign { id: config.id, voters: members.voters.iter().copied().collect() });
        }
        mem.wl().set_conf_state(ConfState::from((members.voters.iter().copied().collect::<Vec<_>>(), vec![])));
        let applied = hs.commit;
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
        let lone = members.voters.len() == 1 && members.voters.contains(&config.id);
        let mut stash = Output { published: state.map.is_some(), ..Output::default() };
        if !members.voters.contains(&config.id) {
            stash.notes.push(format!("member {}: not a voter of the group its log holds yet (joining, or removed)", config.id));
        }
        let mut member = Member {
            config,
            addrs: members.addrs,
            retired: members.retired,
            boot: boot.voters,
            node,
            mem,
            log,
            state,
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
        if lone {
            // A group of one need not wait out an election timeout to lead.
            member.node.campaign().expect("a lone voter campaigns");
            member.ready(0, &mut stash)?;
        }
        member.stash = stash;
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

    /// Leading, and answering for the group (granting leases): a majority answered it
    /// within `LEADER_LEASE_MS` of `now_ms`.
    pub fn answers(&self, now_ms: u64) -> bool {
        self.is_leader() && self.leases(now_ms)
    }

    /// The address of member `id`.
    pub fn addr_of(&self, id: u64) -> Option<SocketAddr> {
        self.addrs.get(&id).copied()
    }

    /// The other members this one sends to, with their addresses.
    pub fn peers(&self) -> Vec<(u64, SocketAddr)> {
        self.addrs.iter().filter(|(id, _)| **id != self.config.id).map(|(id, a)| (*id, *a)).collect()
    }

    /// The group's voters as this member has them committed, with their addresses.
    pub fn members(&self) -> MemberList {
        let voters = self.node.raft.prs().conf().voters().ids();
        let mut members: Vec<(u64, SocketAddr)> = voters.iter().filter_map(|id| self.addrs.get(&id).map(|a| (id, *a))).collect();
        members.sort_unstable();
        let most = self.addrs.keys().chain(self.retired.iter()).chain(self.boot.iter().map(|(id, _)| id)).max().copied().unwrap_or(0);
        MemberList { members, boot: self.boot.clone(), next_id: most.max(self.config.id) + 1 }
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
        // Raft drops proposals while leadership is handed over: the authority waits (a
        // copy's report with it) until the handover ends, here or elsewhere.
        let handing_over = self.handing_over();
        while let Some(leading) = self.leading.as_mut().filter(|l| !handing_over && l.authority.is_some() && !l.deferred_copied.is_empty()) {
            let done = leading.deferred_copied.remove(0);
            let actions = Self::copy_report(leading.authority.as_mut().expect("checked"), &done);
            self.take_actions(actions, &mut out);
        }
        if let Some(authority) = self.leading.as_mut().and_then(|l| l.authority.as_mut()).filter(|_| authority_due && !handing_over) {
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
        // From a member this one does not know yet (one added by an entry it has not
        // applied: it learns the address then) raft's message is taken; from one that
        // left the group, never.
        if self.retired.contains(&msg.from) || msg.from == 0 || msg.to != self.config.id {
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
            Ok(Frame { kind: Kind::Request(Op::Members), request_id, value, .. }) => {
                let request: MemberRequest = serde_json::from_slice(value).map_err(|e| MemberError::Frame(format!("bad membership request: {e}")))?;
                let mut out = std::mem::take(&mut self.stash);
                let (ticket, status, value) = self.on_members(request, now_ms, &mut out)?;
                encode(reply, &Frame { kind: Kind::Reply(Op::Members, status), request_id, epoch: 0, key: &[], value: &value });
                return Ok((ticket, out));
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
        // During a handover the authority is left alone (raft drops proposals): a brick
        // that is gone is removed by its silence instead.
        let handing_over = self.handing_over();
        if let Some(l) = self.leading.as_mut().filter(|l| session.registered_in(l.term) && !handing_over) {
            let actions = session.on_close(l.authority.as_mut().expect("a session registers with a running authority"), now_ms);
            self.take_actions(actions, &mut out);
        }
        self.ready(now_ms, &mut out)?;
        Ok(out)
    }

    /// A membership request: the list from anyone; a change from the leader only,
    /// one at a time, answered once committed.
    fn on_members(&mut self, request: MemberRequest, now_ms: u64, out: &mut Output) -> Result<(Ticket, Status, Vec<u8>), LogError> {
        let list = |m: &Member<D>, change: Option<&MemberRequest>| {
            let mut list = m.members();
            match change {
                Some(MemberRequest::Add { id, addr }) if !list.members.iter().any(|(m, _)| m == id) => list.members.push((*id, *addr)),
                Some(MemberRequest::Remove { id }) => list.members.retain(|(m, _)| m != id),
                _ => {}
            }
            list.members.sort_unstable();
            serde_json::to_vec(&list).expect("serialises")
        };
        let refuse = |status: Status, why: String| Ok((Ticket::NOW, status, why.into_bytes()));
        if request == MemberRequest::List {
            return Ok((Ticket::NOW, Status::Ok, list(self, None)));
        }
        if !self.is_leader() || !self.leases(now_ms) {
            let leader = self.addr_of(self.leader()).filter(|_| self.leader() != self.config.id);
            return refuse(Status::NotLeader, leader.map(|a| a.to_string()).unwrap_or_default());
        }
        let voters: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
        let change = match request {
            MemberRequest::List => unreachable!("answered above"),
            MemberRequest::Add { id, addr } => {
                if self.retired.contains(&id) || id == 0 {
                    return refuse(Status::Conflict, format!("member id {id} cannot be given out (ids start at 1 and are never reused); ask for the list's next_id"));
                }
                match self.addrs.get(&id) {
                    Some(a) if voters.contains(&id) && *a == addr => return Ok((Ticket::NOW, Status::Ok, list(self, None))),
                    Some(a) if voters.contains(&id) => return refuse(Status::Conflict, format!("member id {id} is in use at {a}")),
                    _ => {}
                }
                ConfChange { change_type: ConfChangeType::AddNode, node_id: id, context: addr.to_string().into_bytes().into(), ..ConfChange::default() }
            }
            MemberRequest::Remove { id } => {
                if !voters.contains(&id) {
                    return Ok((Ticket::NOW, Status::Ok, list(self, None)));
                }
                if voters.len() == 1 {
                    return refuse(Status::Conflict, format!("member {id} is the group's last: it cannot leave"));
                }
                if id == self.config.id {
                    // A leader that removed itself would go on sending heartbeats that
                    // hold off its successor's election: it hands over first.
                    // To the most up to date of those that answered lately (not a dead one).
                    let term = self.node.raft.term;
                    let lately = |m: &u64| self.heard.get(m).is_some_and(|(t, at)| *t == term && now_ms.saturating_sub(*at) <= LEADER_LEASE_MS);
                    let to = self.node.raft.prs().iter().filter(|(m, _)| **m != id && voters.contains(m) && lately(m)).max_by_key(|(_, p)| p.matched).map(|(m, _)| *m);
                    if let Some(to) = to {
                        out.notes.push(format!("member {id}: asked to leave the group; handing leadership to member {to}"));
                        // No lease from here on counts an answer from before the handover.
                        self.heard.clear();
                        self.node.transfer_leader(to);
                        self.ready(now_ms, out)?;
                    }
                    return refuse(Status::NotLeader, String::new());
                }
                ConfChange { change_type: ConfChangeType::RemoveNode, node_id: id, ..ConfChange::default() }
            }
        };
        if self.node.raft.has_pending_conf() {
            return refuse(Status::Unavailable, "a membership change is under way: ask again once it is committed".into());
        }
        let asked = match change.change_type {
            ConfChangeType::AddNode => MemberRequest::Add { id: change.node_id, addr: String::from_utf8_lossy(&change.context).parse().expect("formatted above") },
            _ => MemberRequest::Remove { id: change.node_id },
        };
        if let Err(e) = self.node.propose_conf_change(Vec::new(), change) {
            return refuse(Status::Unavailable, format!("the leader cannot propose it now ({e}): ask again"));
        }
        let index = self.node.raft.raft_log.last_index();
        out.notes.push(format!("member {}: proposed {asked:?} at index {index}", self.config.id));
        self.ready(now_ms, out)?;
        Ok((Ticket { index, term: self.node.raft.term }, Status::Ok, list(self, Some(&asked))))
    }

    /// Whether a majority of the group's voters (this member among them) was heard
    /// from in the current term within `LEADER_LEASE_MS` of `now_ms`.
    fn leases(&self, now_ms: u64) -> bool {
        let term = self.node.raft.term;
        let voters = self.node.raft.prs().conf().voters().ids();
        // A leader handing over stops at once: its successor is elected without waiting
        // out an election timeout.
        if !voters.contains(self.config.id) || self.handing_over() {
            return false;
        }
        let fresh = voters.iter().filter(|id| *id != self.config.id && self.heard.get(id).is_some_and(|(t, at)| *t == term && now_ms.saturating_sub(*at) <= LEADER_LEASE_MS)).count();
        (fresh + 1) * 2 > voters.len()
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

    /// Whether this member leads in `term`: a copy planned in another term is abandoned
    /// (its report would be dropped, and its map may be long stale).
    pub fn leads_in(&self, term: u64) -> bool {
        self.leading.as_ref().is_some_and(|l| l.term == term)
    }

    /// Whether this leader is handing leadership over (raft drops proposals meanwhile).
    fn handing_over(&self) -> bool {
        self.node.raft.lead_transferee.is_some()
    }

    /// The copy this leader planned in `term` finished: `done` were copied (none: it
    /// failed). A report from an earlier term is dropped: that leader's successor plans
    /// its own copies.
    pub fn copied(&mut self, term: u64, done: &[Join], now_ms: u64) -> Result<Output, LogError> {
        let mut out = std::mem::take(&mut self.stash);
        let handing_over = self.handing_over();
        if let Some(leading) = self.leading.as_mut().filter(|l| l.term == term && l.authority.is_some()) {
            if handing_over {
                // Taken at the first tick after the handover ends.
                leading.deferred_copied.push(done.to_vec());
            } else {
                let actions = Self::copy_report(leading.authority.as_mut().expect("checked"), done);
                self.take_actions(actions, &mut out);
            }
        }
        self.ready(now_ms, &mut out)?;
        Ok(out)
    }

    /// The authority takes a copy's report: `done` copied (none: it failed).
    fn copy_report(authority: &mut Authority, done: &[Join]) -> Actions {
        if done.is_empty() {
            authority.copy_failed();
            return Actions::default();
        }
        authority.copied(done)
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

    /// Applies committed entries: each non-empty one is the whole new state, or a
    /// membership change.
    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) {
        for entry in entries {
            if entry.get_entry_type() == EntryType::EntryConfChange {
                // Written by a leader of this group and committed: unreadable is a bug.
                let cc = ConfChange::parse_from_bytes(&entry.data).unwrap_or_else(|e| panic!("member {}: committed conf change {} unreadable: {e}", self.config.id, entry.index));
                self.apply_conf_change(entry.index, &cc, out);
                continue;
            }
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

    /// A committed membership change: raft's configuration, the addresses, the senders.
    fn apply_conf_change(&mut self, index: u64, cc: &ConfChange, out: &mut Output) {
        let id = self.config.id;
        match self.node.apply_conf_change(cc) {
            Ok(cs) => {
                self.mem.wl().set_conf_state(cs);
                let mut members = Membership { voters: BTreeSet::new(), addrs: std::mem::take(&mut self.addrs), retired: std::mem::take(&mut self.retired) };
                members.change(cc);
                (self.addrs, self.retired) = (members.addrs, members.retired);
                let now: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
                let what = match cc.get_change_type() {
                    ConfChangeType::RemoveNode => format!("member {} removed", cc.node_id),
                    _ => format!("member {} added at {}", cc.node_id, String::from_utf8_lossy(&cc.context)),
                };
                out.notes.push(format!("member {id}: {what} (entry {index}); the group is now {now:?}"));
                out.members_changed = true;
                if cc.get_change_type() == ConfChangeType::RemoveNode && cc.node_id == id {
                    out.removed = true;
                    self.leading = None;
                }
            }
            // Refused alike by every member (it holds the same configuration).
            Err(e) => out.notes.push(format!("member {id}: membership change at entry {index} refused by raft: {e}")),
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
            self.leading = Some(Leading { term, start_index, authority: None, proposed: 0, proposed_state: None, copy_after: None, deferred_copied: Vec::new() });
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

/// The group as the committed entries change it, one voter at a time (raft's simple
/// changes: a voter added or removed).
struct Membership {
    voters: BTreeSet<u64>,
    addrs: BTreeMap<u64, SocketAddr>,
    retired: BTreeSet<u64>,
}

impl Membership {
    fn new(boot: &Boot) -> Membership {
        let addrs = boot.voters.iter().chain(&boot.known).copied().collect();
        Membership { voters: boot.voters.iter().map(|(id, _)| *id).collect(), addrs, retired: BTreeSet::new() }
    }

    /// As raft's `Changer::simple` takes it (the last voter is never removed: the leader
    /// refuses to propose that).
    fn change(&mut self, cc: &ConfChange) {
        match cc.get_change_type() {
            ConfChangeType::RemoveNode if self.voters.len() == 1 && self.voters.contains(&cc.node_id) => {}
            ConfChangeType::RemoveNode => {
                self.voters.remove(&cc.node_id);
                self.addrs.remove(&cc.node_id);
                self.retired.insert(cc.node_id);
            }
            _ => {
                self.voters.insert(cc.node_id);
                if let Ok(addr) = String::from_utf8_lossy(&cc.context).parse() {
                    self.addrs.insert(cc.node_id, addr);
                }
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
