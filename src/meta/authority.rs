//! The map authority as a state machine: registrations, heartbeats, lost sessions and
//! clock ticks in; new maps and copy tasks out. No sockets, files or clocks inside (the
//! caller passes `now_ms`), so a simulator can drive it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::map::{BrickAddr, BrickId, ClusterMap, MapError, PartitionId};
use crate::proto::{BRICK_TIMEOUT_MS, HEARTBEAT_MS, LEASE_MS};

/// After a brick is removed, its partitions wait this long for it (or a new brick) to
/// come back before they are copied to the survivors: a brick that restarts takes its
/// share back instead of leaving the others to carry it.
pub const REREPLICATE_AFTER_MS: u64 = 10_000;
/// Fewer partitions than this per live brick cannot spread evenly: every one splits.
pub const PARTITIONS_PER_BRICK_MIN: usize = 16;

#[derive(Clone, Debug)]
pub struct AuthorityConfig {
    /// Bricks to wait for before the first map.
    pub bricks: usize,
    pub replicas: usize,
    pub base_bits: u8,
    /// How long after a removal the authority waits for the brick to return before it
    /// copies the partitions left short elsewhere (`REREPLICATE_AFTER_MS`; the
    /// simulator shortens it, so that bricks come back after their partitions moved).
    pub rereplicate_after_ms: u64,
}

/// Copy `partition` to `brick` (a joining replica) at or after `epoch`.
pub type Join = (PartitionId, BrickId);

/// What a step asks the caller to do.
#[derive(Debug, Default, PartialEq)]
pub struct Actions {
    /// A new map: persist it before anyone sees it.
    pub map_changed: bool,
    /// Start copying these joins (the map that made them joining is the current one).
    pub copy: Vec<Join>,
    /// Why the map changed, for the log.
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    at_ms: u64,
    session: u64,
    epoch: u64,
    /// Its session closed: it is removed once its lease has surely run out.
    closed: bool,
}

/// A brick whose session closed is removed this long after its last heartbeat arrived:
/// its lease runs from when that heartbeat was sent, which is earlier, so it has fenced
/// itself by then even if the close was a reset it has not noticed (one heartbeat more
/// for clocks that run at slightly different rates).
pub const CLOSED_REMOVAL_MS: u64 = LEASE_MS + HEARTBEAT_MS;

pub struct Authority {
    config: AuthorityConfig,
    map: Option<ClusterMap>,
    /// Bricks seen before the first map, by id.
    gathering: BTreeMap<BrickId, BrickAddr>,
    /// Each brick's last heartbeat (ms), session serial and the epoch it reported.
    seen: BTreeMap<BrickId, Seen>,
    next_session: u64,
    /// Joins being copied now; a new plan waits until they finish.
    copying: Vec<Join>,
    /// Replicas that leave once their move's copy is done: (partition, brick).
    drop_after: Vec<Join>,
    /// Leaving replicas to drop once every live brick has reported this epoch.
    pending_drop: Option<(u64, Vec<Join>)>,
    last_removal_ms: Option<u64>,
    last_join_ms: Option<u64>,
    /// Bricks that restarted (same id, new addresses) while joining partitions in the
    /// running copy: a restarted brick no longer knows which keys of the partitions it
    /// is joining it wrote since the join, so their copies, even finished ones, are done
    /// again (a catch-up, from what they brought).
    restarted: std::collections::BTreeSet<BrickId>,
    /// Ids below this were given out by this authority (the map keeps the same mark
    /// once it exists; before the first map, only this does): never given again.
    next_fresh: u32,
}

impl Authority {
    pub fn new(config: AuthorityConfig, map: Option<ClusterMap>, now_ms: u64) -> Authority {
        // After a restart every known brick gets a full timeout to come back.
        let seen = map.iter().flat_map(|m| m.bricks().keys()).map(|&b| (b, Seen { at_ms: now_ms, session: 0, epoch: 0, closed: false })).collect();
        Authority {
            config,
            map,
            gathering: BTreeMap::new(),
            seen,
            next_session: 1,
            copying: Vec::new(),
            drop_after: Vec::new(),
            pending_drop: None,
            last_removal_ms: None,
            last_join_ms: None,
            restarted: std::collections::BTreeSet::new(),
            next_fresh: 0,
        }
    }

    pub fn map(&self) -> Option<&ClusterMap> {
        self.map.as_ref()
    }

    /// Ids below this have been given out (before the first map, only this says so).
    pub fn next_fresh(&self) -> u32 {
        self.next_fresh
    }

    /// Continues from a predecessor that gave out every id below `next_fresh` (a new
    /// leader of the authority group, from the replicated state).
    pub fn with_next_fresh(mut self, next_fresh: u32) -> Authority {
        self.next_fresh = self.next_fresh.max(next_fresh);
        self
    }

    fn set_map(&mut self, map: ClusterMap, why: String, actions: &mut Actions) {
        actions.notes.push(format!("epoch {}: {why}", map.epoch()));
        self.map = Some(map);
        actions.map_changed = true;
    }

    fn next_id(&self) -> BrickId {
        let known = self.map.iter().flat_map(|m| m.bricks().keys()).chain(self.gathering.keys()).chain(self.seen.keys());
        let floor = self.map.as_ref().map_or(0, |m| m.fresh_brick_id().0).max(self.next_fresh);
        BrickId(known.map(|b| b.0 + 1).max().unwrap_or(0).max(floor))
    }

    /// A brick says it is here. Returns its id and the session serial that its later
    /// heartbeats and its disconnection carry.
    pub fn register(&mut self, id: Option<u32>, cores: Vec<SocketAddr>, now_ms: u64) -> Result<(BrickId, u64, Actions), MapError> {
        self.register_at(id, BrickAddr::tcp(cores), now_ms)
    }

    /// `register` for a brick that may serve RDMA too (`addr.rdma`).
    pub fn register_at(&mut self, id: Option<u32>, addr: BrickAddr, now_ms: u64) -> Result<(BrickId, u64, Actions), MapError> {
        let mut actions = Actions::default();
        // A brick removed from the map was declared dead: if it comes back it is a new
        // brick with a new id (it rejoins empty and is copied to, like any newcomer).
        // A brick with no id whose addresses are a known brick's is that brick asking
        // again (the answer to its first registration was lost): same id.
        let same_addrs = |known: &BrickAddr| known.same_brick(&addr);
        let asked_before = self
            .map
            .iter()
            .flat_map(|m| m.bricks().iter())
            .chain(self.gathering.iter())
            .find(|(_, a)| same_addrs(a))
            .map(|(&b, _)| b);
        let id = match id.map(BrickId) {
            Some(old) if self.map.as_ref().is_some_and(|m| m.is_retired(old)) => self.next_id(),
            Some(id) => id,
            None => asked_before.unwrap_or_else(|| self.next_id()),
        };
        self.next_fresh = self.next_fresh.max(id.0 + 1);
        let session = self.next_session;
        self.next_session += 1;
        // Liveness is heard in heartbeats only: a brick that registers again and again
        // but never gets a heartbeat through is still removed on time.
        let at_ms = self.seen.get(&id).map_or(now_ms, |s| s.at_ms);
        self.seen.insert(id, Seen { at_ms, session, epoch: 0, closed: false });
        let joining = self.map.as_ref().is_some_and(|m| m.joining().values().any(|j| j.contains(&id)));
        match &self.map {
            None => {
                self.gathering.insert(id, addr);
                if self.gathering.len() >= self.config.bricks {
                    let map = ClusterMap::initial(self.config.base_bits, self.gathering.clone(), self.config.replicas)?.reserving_ids_below(self.next_fresh);
                    let n = map.bricks().len();
                    self.set_map(map, format!("first map: {n} bricks, {} replicas", self.config.replicas), &mut actions);
                }
            }
            Some(map) if map.bricks().get(&id) == Some(&addr) && !joining => {}
            Some(map) if map.bricks().contains_key(&id) => {
                // Same brick, new addresses (it restarted before anyone noticed, with its
                // state intact: it replayed its log), or a joining brick registering
                // again. A joining brick that restarted keeps what its copies brought,
                // but no longer knows which keys it took writes for since the join: its
                // copies start over, and the new map is newer than every copy planned
                // before, whose chunks it refuses (`Shard::install`).
                if joining {
                    self.restarted.insert(id);
                }
                let next = map.move_brick(id, addr)?;
                self.set_map(next, format!("{id} moved"), &mut actions);
            }
            Some(map) => {
                let next = map.add_brick(id, addr)?;
                self.last_join_ms = Some(now_ms);
                self.set_map(next, format!("{id} joined"), &mut actions);
            }
        }
        Ok((id, session, actions))
    }

    /// A heartbeat from `id`, which runs with map `epoch`. Returns `false` when the
    /// session is no longer known (the brick was removed, say after a long pause while
    /// its connection stayed open): the brick must fence and register again, or it
    /// would serve on, outside the map, forever.
    #[must_use]
    pub fn heartbeat(&mut self, id: BrickId, session: u64, epoch: u64, now_ms: u64) -> bool {
        match self.seen.get_mut(&id) {
            Some(seen) if seen.session == session => {
                seen.at_ms = now_ms;
                seen.epoch = epoch;
                true
            }
            _ => false,
        }
    }

    /// A brick's session closed: its process died, or a reset cut the connection under
    /// a brick that still serves. It is removed once its lease has surely run out
    /// (`CLOSED_REMOVAL_MS` after its last heartbeat), unless it registers again first.
    pub fn disconnected(&mut self, id: BrickId, session: u64, now_ms: u64) -> Actions {
        let mut actions = Actions::default();
        if let Some(seen) = self.seen.get_mut(&id).filter(|s| s.session == session) {
            // Not at once: a reset, not a death, may have closed it, and the brick serves
            // until its lease runs out. (A session the authority ended by refusing a
            // heartbeat has no `seen` entry left: its brick was removed already.)
            seen.closed = true;
            if now_ms.saturating_sub(seen.at_ms) > CLOSED_REMOVAL_MS {
                self.remove(id, "its session closed", now_ms, &mut actions);
            }
        }
        actions
    }

    fn remove(&mut self, id: BrickId, why: &str, now_ms: u64, actions: &mut Actions) {
        let Some(map) = &self.map else {
            self.seen.remove(&id);
            self.gathering.remove(&id);
            return;
        };
        if !map.bricks().contains_key(&id) {
            self.seen.remove(&id);
            return;
        }
        match map.remove_brick(id) {
            Ok(next) => {
                // A copy under way stays planned until its driver reports: copies to a
                // removed brick fail there at once, and no second plan may overlap it.
                self.seen.remove(&id);
                self.last_removal_ms = Some(now_ms);
                self.set_map(next, format!("{id} removed: {why}"), actions);
            }
            // It holds the last replica of a partition: it stays in the map (and its
            // session stays known) so that it serves again as soon as it answers.
            Err(e) => {
                if let Some(seen) = self.seen.get_mut(&id) {
                    // Try again (and say so) only after another timeout.
                    seen.at_ms = now_ms;
                    seen.closed = false;
                }
                actions.notes.push(format!("cannot remove {id} ({why}): {e}"));
            }
        }
    }

    /// Time passes: remove silent bricks, and plan copies for partitions short of
    /// replicas.
    pub fn tick(&mut self, now_ms: u64) -> Actions {
        let mut actions = Actions::default();
        let closed: Vec<BrickId> =
            self.seen.iter().filter(|(_, s)| s.closed && now_ms.saturating_sub(s.at_ms) > CLOSED_REMOVAL_MS).map(|(&b, _)| b).collect();
        for id in closed {
            self.remove(id, "its session closed", now_ms, &mut actions);
        }
        let silent: Vec<BrickId> =
            self.seen.iter().filter(|(_, s)| now_ms.saturating_sub(s.at_ms) > BRICK_TIMEOUT_MS).map(|(&b, _)| b).collect();
        for id in silent {
            self.remove(id, "silent past the timeout", now_ms, &mut actions);
        }
        // Copy when a brick has come (back) since the last failure, or once the failed
        // brick has had its chance to return.
        let joined_since = match (self.last_join_ms, self.last_removal_ms) {
            (Some(j), Some(r)) => j >= r,
            (_, None) => true,
            (None, Some(_)) => false,
        };
        let waited = self.last_removal_ms.is_none_or(|r| now_ms.saturating_sub(r) >= self.config.rereplicate_after_ms);
        // After a start (a new leader of the group, a restart) the map's bricks register
        // again: planned before they have, a copy would see a joining brick register and
        // take it for a restart, and redo its copies. Each registers or is removed
        // within `BRICK_TIMEOUT_MS`.
        let all_registered = self.seen.values().all(|s| s.session != 0);
        self.drop_when_seen(&mut actions);
        if self.copying.is_empty() && self.pending_drop.is_none() && all_registered && (joined_since || waited) {
            self.plan(&mut actions);
        }
        actions
    }

    /// One step of the plan, first that applies: split every partition while there are
    /// too few per brick; give each partition short of replicas one more on the least
    /// loaded live brick outside its group; move replicas from the fullest brick to the
    /// emptiest.
    fn plan(&mut self, actions: &mut Actions) {
        let Some(map) = &self.map else { return };
        // Joining replicas whose copy failed (a source lost mid-copy, a link reset)
        // take writes but would never serve reads: copy them again before anything else.
        let orphans: Vec<Join> = map.joining().iter().flat_map(|(&p, bs)| bs.iter().map(move |&b| (p, b))).filter(|(_, b)| self.seen.contains_key(b)).collect();
        if !orphans.is_empty() {
            actions.notes.push(format!("{} joining replica(s) whose copy failed are copied again", orphans.len()));
            self.restarted.clear();
            self.copying = orphans.clone();
            actions.copy = orphans;
            return;
        }
        // A move whose planner is gone (an earlier leader of the authority group, or this
        // process before a restart) left its group a replica too many once its copy was
        // redone: the replica on the fullest brick leaves (dropped once every brick has
        // seen it serve no reads).
        let extra = over_replicated(map, self.config.replicas);
        if !extra.is_empty() {
            match map.finish_join(&[], &extra) {
                Ok(next) => {
                    let epoch = next.epoch();
                    self.set_map(next, format!("{} replica(s) beyond {} per partition stop serving reads", extra.len(), self.config.replicas), actions);
                    self.pending_drop = Some((epoch, extra));
                }
                Err(e) => actions.notes.push(format!("cannot shed extra replicas: {e}")),
            }
            return;
        }
        let live = map.bricks().keys().filter(|b| self.seen.contains_key(b)).count();
        let leaves = map.dp().leaves();
        if leaves.len() < PARTITIONS_PER_BRICK_MIN * live && leaves.iter().all(|l| l.depth() < crate::map::dp::DEPTH_MAX) {
            match map.split_many(leaves) {
                Ok(next) => {
                    let why = format!("{} partitions for {live} bricks: each splits in two", leaves.len());
                    self.set_map(next, why, actions);
                }
                Err(e) => actions.notes.push(format!("cannot split: {e}")),
            }
            return;
        }
        let mut load: BTreeMap<BrickId, usize> =
            map.bricks().keys().filter(|b| self.seen.contains_key(b)).map(|&b| (b, 0)).collect();
        for group in map.groups().values() {
            for b in group {
                if let Some(n) = load.get_mut(b) {
                    *n += 1;
                }
            }
        }
        let mut joins = Vec::new();
        for (&p, group) in map.groups() {
            if group.len() >= self.config.replicas {
                continue;
            }
            let pick = load.iter().filter(|(b, _)| !group.contains(b)).min_by_key(|(b, n)| (**n, b.0)).map(|(&b, _)| b);
            if let Some(b) = pick {
                *load.get_mut(&b).expect("listed") += 1;
                joins.push((p, b));
            }
        }
        let mut drops = Vec::new();
        if joins.is_empty() {
            (joins, drops) = rebalance(map, &load);
        }
        if joins.is_empty() {
            return;
        }
        match map.begin_join(&joins) {
            Ok(next) => {
                let why = format!("{} partition(s) short of replicas start copying", joins.len());
                self.set_map(next, why, actions);
                self.restarted.clear();
                self.copying = joins.clone();
                self.drop_after = drops;
                actions.copy = joins;
            }
            Err(e) => actions.notes.push(format!("cannot plan copies: {e}")),
        }
    }

    /// The copies of `joins` are complete: those replicas serve reads from now on.
    pub fn copied(&mut self, joins: &[Join]) -> Actions {
        let mut actions = Actions::default();
        let Some(map) = &self.map else { return actions };
        let restarted = std::mem::take(&mut self.restarted);
        let live: Vec<Join> = joins.iter().copied().filter(|(p, b)| map.is_joining(*p, *b) && !restarted.contains(b)).collect();
        if !restarted.is_empty() {
            let names: Vec<String> = restarted.iter().map(|b| b.to_string()).collect();
            actions.notes.push(format!("{} restarted while copying: their partitions are copied again", names.join(", ")));
        }
        self.copying.clear();
        // A moved replica leaves only where its replacement was copied; moves whose copy
        // failed wait for it to be copied again (or are forgotten if it stopped joining).
        let (leaves, later): (Vec<Join>, Vec<Join>) =
            std::mem::take(&mut self.drop_after).into_iter().partition(|(p, _)| live.iter().any(|(q, _)| q == p));
        self.drop_after = later.into_iter().filter(|(p, _)| map.joining().contains_key(p)).collect();
        if live.is_empty() {
            return actions;
        }
        match map.finish_join(&live, &leaves) {
            Ok(next) => {
                let epoch = next.epoch();
                let why = format!("{} copied partition(s) now serve reads; {} moved replica(s) stop serving reads", live.len(), leaves.len());
                self.set_map(next, why, &mut actions);
                if !leaves.is_empty() {
                    self.pending_drop = Some((epoch, leaves));
                }
            }
            Err(e) => actions.notes.push(format!("cannot finish copies: {e}")),
        }
        actions
    }

    /// A copy gave up (its source or target failed); the next tick plans again.
    pub fn copy_failed(&mut self) {
        self.copying.clear();
        let map = &self.map;
        self.drop_after.retain(|(p, _)| map.as_ref().is_some_and(|m| m.joining().contains_key(p)));
    }

    /// Drops leaving replicas once every live brick runs a map in which they serve no
    /// reads: no client can then be answered by one from a copy that stopped taking
    /// writes.
    fn drop_when_seen(&mut self, actions: &mut Actions) {
        // Replicas a predecessor (a leader before this one, this process before a
        // restart) marked leaving and did not live to drop: they serve no reads in the
        // current map, so they go once every live brick has seen it.
        if let (None, true, Some(map)) = (&self.pending_drop, self.copying.is_empty(), &self.map) {
            let leaving: Vec<Join> = map.leaving().iter().flat_map(|(&p, bs)| bs.iter().map(move |&b| (p, b))).collect();
            if !leaving.is_empty() {
                self.pending_drop = Some((map.epoch(), leaving));
            }
        }
        let (Some((epoch, _)), Some(map)) = (&self.pending_drop, &self.map) else { return };
        let behind = map.bricks().keys().any(|b| self.seen.get(b).is_none_or(|s| s.epoch < *epoch));
        if behind {
            return;
        }
        let (_, leaves) = self.pending_drop.take().expect("checked");
        match map.drop_leaving(&leaves) {
            Ok(next) => self.set_map(next, format!("{} moved replica(s) left their groups", leaves.len()), actions),
            Err(e) => actions.notes.push(format!("cannot drop moved replicas: {e}")),
        }
    }
}

/// For each partition with more readable members than `replicas` and nothing joining or
/// leaving, the member on the brick holding the most replicas (the highest id on a tie).
fn over_replicated(map: &ClusterMap, replicas: usize) -> Vec<Join> {
    let mut load: BTreeMap<BrickId, usize> = BTreeMap::new();
    for group in map.groups().values() {
        for &b in group {
            *load.entry(b).or_default() += 1;
        }
    }
    map.groups()
        .iter()
        .filter(|(p, g)| g.len() > replicas && !map.joining().contains_key(p) && !map.leaving().contains_key(p))
        .filter_map(|(&p, g)| g.iter().max_by_key(|b| (load[b], b.0)).map(|&b| (p, b)))
        .collect()
}

/// Moves that even out replicas per live brick: while the fullest holds two more than
/// the emptiest, one partition's replica moves from the fullest to the emptiest (the
/// emptiest joins; the fullest leaves after the copy).
fn rebalance(map: &ClusterMap, load: &BTreeMap<BrickId, usize>) -> (Vec<Join>, Vec<Join>) {
    let mut load = load.clone();
    let mut joins = Vec::new();
    let mut drops = Vec::new();
    let mut moved: std::collections::BTreeSet<PartitionId> = std::collections::BTreeSet::new();
    while let (Some((&full, &hi)), Some((&empty, &lo))) =
        (load.iter().max_by_key(|(b, n)| (**n, std::cmp::Reverse(b.0))), load.iter().min_by_key(|(b, n)| (**n, b.0)))
    {
        if hi < lo + 2 {
            break;
        }
        let pick = map.groups().iter().find(|(p, g)| {
            g.contains(&full) && !g.contains(&empty) && !moved.contains(p) && map.is_readable(**p, full)
        });
        let Some((&p, _)) = pick else { break };
        moved.insert(p);
        joins.push((p, empty));
        drops.push((p, full));
        *load.get_mut(&full).expect("listed") -= 1;
        *load.get_mut(&empty).expect("listed") += 1;
    }
    (joins, drops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> Vec<SocketAddr> {
        vec![SocketAddr::from(([127, 0, 0, 1], 7000 + i))]
    }

    #[test]
    fn gathers_then_removes_dead_bricks_and_restores_replicas() {
        let mut a = Authority::new(AuthorityConfig { bricks: 3, replicas: 2, base_bits: 6, rereplicate_after_ms: REREPLICATE_AFTER_MS }, None, 0);
        let mut sessions = Vec::new();
        for i in 0..3 {
            let (id, s, actions) = a.register(Some(i), addr(i as u16), 0).unwrap();
            assert_eq!(id, BrickId(i));
            assert_eq!(actions.map_changed, i == 2, "the first map waits for every brick");
            sessions.push(s);
        }
        assert_eq!(a.map().unwrap().epoch(), 1);
        // A closed session from an older connection changes nothing.
        assert!(!a.disconnected(BrickId(1), 999, 0).map_changed);
        // A closed session removes its brick once its lease has surely run out.
        assert!(!a.disconnected(BrickId(1), sessions[1], 0).map_changed, "removed while its lease may still run");
        assert!(!a.tick(CLOSED_REMOVAL_MS).map_changed);
        let actions = a.tick(CLOSED_REMOVAL_MS + 1);
        assert!(actions.map_changed);
        let map = a.map().unwrap().clone();
        assert!(!map.bricks().contains_key(&BrickId(1)));
        assert!(map.groups().values().all(|g| !g.contains(&BrickId(1))));
        // Short partitions wait for the failed brick to come back.
        assert!(a.tick(600).copy.is_empty());
        // Brick 1 comes back: it was declared dead, so it joins empty under a new id, and
        // every short partition is copied to the least loaded brick outside its group,
        // the newcomer first.
        let short = a.map().unwrap().groups().values().filter(|g| g.len() < 2).count();
        let (again, session3, actions) = a.register(Some(1), addr(1), 700).unwrap();
        assert_eq!(again, BrickId(3), "a removed brick's id is never given again");
        assert!(actions.map_changed);
        let actions = a.tick(800);
        assert_eq!(actions.copy.len(), short);
        assert!(actions.copy.iter().filter(|(_, b)| *b == BrickId(3)).count() >= short / 2);
        let joining = a.map().unwrap().clone();
        assert!(actions.copy.iter().all(|(p, b)| joining.is_joining(*p, *b)));
        assert!(a.tick(900).copy.is_empty(), "one plan at a time");
        let done = a.copied(&actions.copy);
        assert!(done.map_changed);
        let map = a.map().unwrap();
        assert!(map.joining().is_empty());
        assert!(map.groups().values().all(|g| g.len() == 2));
        // A heartbeat on the removed brick's old session is refused: it must stop.
        assert!(!a.heartbeat(BrickId(1), sessions[1], 9, 1000));
        // Silence past the timeout removes a brick too.
        assert!(a.heartbeat(BrickId(0), sessions[0], 9, 2000));
        assert!(a.heartbeat(BrickId(3), session3, 9, 2000));
        let actions = a.tick(2000);
        assert!(actions.notes.iter().any(|n| n.contains("brick 2 removed")), "{actions:?}");
    }

    #[test]
    fn a_brick_whose_registration_answer_was_lost_keeps_its_id() {
        let mut a = Authority::new(AuthorityConfig { bricks: 2, replicas: 1, base_bits: 2, rereplicate_after_ms: REREPLICATE_AFTER_MS }, None, 0);
        let (first, _, _) = a.register(None, addr(0), 0).unwrap();
        let (again, _, _) = a.register(None, addr(0), 10).unwrap();
        assert_eq!(first, again, "same addresses, same brick");
        let (other, _, _) = a.register(None, addr(1), 20).unwrap();
        assert_ne!(first, other);
        // The first map exists now: the same directory on new ports is still that brick.
        let with_token = |ports: u16, token: u64| BrickAddr { cores: addr(ports), rdma: Vec::new(), token };
        let (tokened, _, _) = a.register_at(None, with_token(5, 42), 30).unwrap();
        let (moved, _, actions) = a.register_at(None, with_token(6, 42), 40).unwrap();
        assert_eq!(tokened, moved, "same directory token, same brick");
        assert!(actions.notes.iter().any(|n| n.contains("moved")), "{actions:?}");
        let (stranger, _, _) = a.register_at(None, with_token(7, 43), 50).unwrap();
        assert_ne!(stranger, moved);
    }

    #[test]
    fn too_few_partitions_split_until_every_brick_can_hold_its_share() {
        let mut a = Authority::new(AuthorityConfig { bricks: 2, replicas: 2, base_bits: 2, rereplicate_after_ms: REREPLICATE_AFTER_MS }, None, 0);
        for i in 0..2 {
            a.register(Some(i), addr(i as u16), 0).unwrap();
        }
        assert_eq!(a.map().unwrap().dp().leaves().len(), 4);
        for t in 1..10 {
            a.tick(t * 10);
        }
        let map = a.map().unwrap();
        assert_eq!(map.dp().leaves().len(), 32, "16 per brick");
        assert!(map.groups().values().all(|g| g.len() == 2));
        assert_eq!(map.base_bits(), 2, "splits never change where a brick stores a key");
    }
}
