//! The versioned cluster map: the DP map, the RG map (partition -> replica group) and
//! the bricks, under one epoch. Every change makes a new map with the next epoch; a map
//! that fails `validate` is never built by these methods and is refused when decoded.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::dp::{DpError, DpMap, PartitionId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BrickId(pub u32);

impl std::fmt::Display for BrickId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "brick {}", self.0)
    }
}

/// Where a brick serves: one address per core, over TCP, and, when the brick serves
/// RDMA too, one RDMA listener (its control channel) per core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickAddr {
    pub cores: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rdma: Vec<SocketAddr>,
    /// A number the brick's directory drew when it was made (0: none): a brick that
    /// registers again without its id, because the answer to its first registration
    /// was lost, is known by it even on new ports.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl BrickAddr {
    /// A brick that serves TCP only.
    pub fn tcp(cores: Vec<SocketAddr>) -> BrickAddr {
        BrickAddr { cores, rdma: Vec::new(), token: 0 }
    }

    /// Whether a registration from `other` is this brick asking again: the same
    /// directory token, or the same addresses.
    pub fn same_brick(&self, other: &BrickAddr) -> bool {
        (self.token != 0 && self.token == other.token) || self.cores == other.cores
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error(transparent)]
    Dp(#[from] DpError),
    #[error("{0} is not in the map")]
    UnknownBrick(BrickId),
    #[error("{0} is already in the map")]
    DuplicateBrick(BrickId),
    #[error("removing {brick} would leave partition {partition} with no replica")]
    LastReplica { brick: BrickId, partition: PartitionId },
    #[error("partitions {a} and {b} have different replica groups; move replicas before merging")]
    GroupsDiffer { a: PartitionId, b: PartitionId },
    #[error("{replicas} replicas asked of {bricks} brick(s)")]
    TooFewBricks { replicas: usize, bricks: usize },
    #[error("{brick} already holds partition {partition}")]
    AlreadyReplica { brick: BrickId, partition: PartitionId },
    #[error("invalid map: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Grows by one with every change; bricks fence requests from older epochs.
    epoch: u64,
    /// Depth of the trie the cluster started with. Leaves never merge above it, and the
    /// core of a brick that stores a key is chosen from these low hash bits alone, so a
    /// brick core's log always holds the same keys whatever splits happen.
    base_bits: u8,
    dp: DpMap,
    /// The replica group of every DP leaf, in no order of preference: every write goes
    /// to all of them (two-phase commit).
    groups: BTreeMap<PartitionId, Vec<BrickId>>,
    /// Members of a group that are still copying the partition: they take writes but
    /// serve no reads until the copy is done.
    #[serde(default)]
    joining: BTreeMap<PartitionId, Vec<BrickId>>,
    /// Members about to leave a group (a replica moved elsewhere): they still take
    /// writes, so their copy stays current for a client whose map is older, but serve no
    /// reads; once every brick has seen that, a later map drops them.
    #[serde(default)]
    leaving: BTreeMap<PartitionId, Vec<BrickId>>,
    bricks: BTreeMap<BrickId, BrickAddr>,
    /// Every brick id below this has been given out. A removed brick's id is never given
    /// again: a brick declared dead stays dead (fail-stop), and what other bricks
    /// remember about it (votes, in-doubt answers) can never be confused with a newcomer.
    #[serde(default)]
    next_brick_id: u32,
    /// Replicas per partition the cluster keeps. A group with fewer is short: a brick
    /// outside it that holds its data from an earlier stay keeps it, to catch up from
    /// it if asked to join again. 0 in a map from before the field: none is short.
    #[serde(default)]
    replicas: usize,
}

impl ClusterMap {
    // Read-only views: every change makes a new map through a validating constructor.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn base_bits(&self) -> u8 {
        self.base_bits
    }

    pub fn dp(&self) -> &DpMap {
        &self.dp
    }

    pub fn groups(&self) -> &BTreeMap<PartitionId, Vec<BrickId>> {
        &self.groups
    }

    pub fn joining(&self) -> &BTreeMap<PartitionId, Vec<BrickId>> {
        &self.joining
    }

    pub fn leaving(&self) -> &BTreeMap<PartitionId, Vec<BrickId>> {
        &self.leaving
    }

    pub fn bricks(&self) -> &BTreeMap<BrickId, BrickAddr> {
        &self.bricks
    }

    /// Replicas per partition the cluster keeps (0: not recorded, an older map).
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Whether partition `p`'s group has fewer members than the cluster keeps.
    pub fn is_short(&self, p: PartitionId) -> bool {
        self.groups.get(&p).is_some_and(|g| g.len() < self.replicas)
    }

    pub fn next_brick_id(&self) -> u32 {
        self.next_brick_id
    }

    /// The same map, with no brick id below `n` given out again (ids an authority gave
    /// before it had a map).
    pub fn reserving_ids_below(mut self, n: u32) -> ClusterMap {
        self.next_brick_id = self.next_brick_id.max(n);
        self
    }

    /// The same map at epoch 0: a stand-in that any fetched map replaces (a client that
    /// has not fetched one yet).
    pub fn placeholder(mut self) -> ClusterMap {
        self.epoch = 0;
        self
    }
}

impl ClusterMap {
    /// Epoch 1: `2^bits` partitions, each on `replicas` consecutive bricks of the ring.
    pub fn initial(bits: u8, bricks: BTreeMap<BrickId, BrickAddr>, replicas: usize) -> Result<ClusterMap, MapError> {
        if replicas == 0 || replicas > bricks.len() {
            return Err(MapError::TooFewBricks { replicas, bricks: bricks.len() });
        }
        let dp = DpMap::uniform(bits)?;
        let ids: Vec<BrickId> = bricks.keys().copied().collect();
        let groups = dp
            .leaves()
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, (0..replicas).map(|k| ids[(i + k) % ids.len()]).collect()))
            .collect();
        let next_brick_id = bricks.keys().map(|b| b.0 + 1).max().unwrap_or(0);
        let map = ClusterMap { epoch: 1, base_bits: bits, dp, groups, joining: BTreeMap::new(), leaving: BTreeMap::new(), bricks, next_brick_id, replicas };
        map.validate().map_err(MapError::Invalid)?;
        Ok(map)
    }

    /// The partition of `hash` and its replica group. No allocation.
    #[inline]
    pub fn route(&self, hash: u64) -> (PartitionId, &[BrickId]) {
        let p = self.dp.lookup(hash);
        (p, self.groups.get(&p).map_or(&[], |g| &g[..]))
    }

    /// The core of a brick with `cores` cores that stores `hash`: from the low
    /// `base_bits` bits only (see `base_bits`).
    #[inline]
    pub fn core_of(&self, hash: u64, cores: usize) -> usize {
        assert!(cores > 0);
        super::core_of(super::partition_of(hash, self.base_bits), cores)
    }

    /// Whether `brick` is in `p`'s group but still copying it (no reads yet).
    pub fn is_joining(&self, p: PartitionId, brick: BrickId) -> bool {
        self.joining.get(&p).is_some_and(|j| j.contains(&brick))
    }

    pub fn is_leaving(&self, p: PartitionId, brick: BrickId) -> bool {
        self.leaving.get(&p).is_some_and(|j| j.contains(&brick))
    }

    /// Whether `brick` serves reads of `p`: a member neither joining nor leaving.
    pub fn is_readable(&self, p: PartitionId, brick: BrickId) -> bool {
        self.groups.get(&p).is_some_and(|g| g.contains(&brick)) && !self.is_joining(p, brick) && !self.is_leaving(p, brick)
    }

    /// The members of `p`'s group that serve reads.
    pub fn readable(&self, p: PartitionId) -> impl Iterator<Item = BrickId> + '_ {
        self.groups.get(&p).into_iter().flatten().copied().filter(move |&b| self.is_readable(p, b))
    }

    /// Partitions whose group includes `brick`.
    pub fn partitions_of(&self, brick: BrickId) -> impl Iterator<Item = PartitionId> + '_ {
        self.groups.iter().filter(move |(_, g)| g.contains(&brick)).map(|(&p, _)| p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a map serialises")
    }

    /// Every invariant a map must hold: one leaf per hash, a non-empty group of known,
    /// distinct bricks for every leaf and no group for anything else, an epoch of 1 or
    /// more.
    pub fn validate(&self) -> Result<(), String> {
        if self.epoch == 0 {
            return Err("epoch 0".into());
        }
        self.dp.validate()?;
        if let Some(l) = self.dp.leaves().iter().find(|l| l.depth() < self.base_bits) {
            return Err(format!("partition {l} is shallower than the base depth {}", self.base_bits));
        }
        for (what, lists) in [("joining", &self.joining), ("leaving", &self.leaving)] {
            for (p, list) in lists {
                let group = self.groups.get(p).ok_or_else(|| format!("{what} list for unknown partition {p}"))?;
                if list.is_empty() || list.iter().any(|b| !group.contains(b)) {
                    return Err(format!("partition {p}: {what} bricks {list:?} not all in its group {group:?}"));
                }
            }
        }
        for (p, list) in &self.leaving {
            if let Some(b) = list.iter().find(|b| self.is_joining(*p, **b)) {
                return Err(format!("partition {p}: {b} both joining and leaving"));
            }
        }
        for &p in self.dp.leaves() {
            if self.readable(p).next().is_none() {
                return Err(format!("partition {p} has no readable replica"));
            }
        }
        if self.groups.len() != self.dp.leaves().len() {
            return Err(format!("{} groups for {} partitions", self.groups.len(), self.dp.leaves().len()));
        }
        for &p in self.dp.leaves() {
            let group = self.groups.get(&p).ok_or_else(|| format!("partition {p} has no group"))?;
            if group.is_empty() {
                return Err(format!("partition {p} has an empty group"));
            }
            for (i, b) in group.iter().enumerate() {
                if !self.bricks.contains_key(b) {
                    return Err(format!("partition {p} names unknown {b}"));
                }
                if group[..i].contains(b) {
                    return Err(format!("partition {p} names {b} twice"));
                }
            }
        }
        Ok(())
    }

    fn next(&self, change: impl FnOnce(&mut ClusterMap) -> Result<(), MapError>) -> Result<ClusterMap, MapError> {
        let mut map = self.clone();
        change(&mut map)?;
        map.epoch = self.epoch + 1;
        map.validate().map_err(MapError::Invalid)?;
        Ok(map)
    }

    /// A brick that restarted with its state intact, on new addresses.
    pub fn move_brick(&self, id: BrickId, addr: BrickAddr) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            if m.bricks.insert(id, addr).is_none() {
                return Err(MapError::UnknownBrick(id));
            }
            Ok(())
        })
    }

    /// Splits a partition; both halves keep its replica group (the keys stay where they
    /// are; moving a half is a separate change).
    pub fn split(&self, p: PartitionId) -> Result<ClusterMap, MapError> {
        self.split_many(&[p])
    }

    /// Splits each of `parts` in one map change. Keys need not move: a brick stores a
    /// key by its base partition, and both halves keep the group.
    pub fn split_many(&self, parts: &[PartitionId]) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            for &p in parts {
                let (a, b) = m.dp.split(p)?;
                let group = m.groups.remove(&p).expect("leaf has a group");
                m.groups.insert(a, group.clone());
                m.groups.insert(b, group);
                for lists in [&mut m.joining, &mut m.leaving] {
                    if let Some(list) = lists.remove(&p) {
                        lists.insert(a, list.clone());
                        lists.insert(b, list);
                    }
                }
            }
            Ok(())
        })
    }

    /// Merges a partition with its sibling; both must have the same group.
    pub fn merge(&self, p: PartitionId) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            if p.depth() <= m.base_bits {
                return Err(MapError::Invalid(format!("partition {p} is at the base depth {}: it does not merge", m.base_bits)));
            }
            let moving = |q: PartitionId| m.joining.contains_key(&q) || m.leaving.contains_key(&q);
            if moving(p) || p.sibling().is_some_and(moving) {
                return Err(MapError::Invalid(format!("partition {p} or its sibling has a replica moving")));
            }
            let sibling = p.sibling().ok_or(DpError::NoSibling(p))?;
            let (ga, gb) = (m.groups.get(&p), m.groups.get(&sibling));
            let same = match (ga, gb) {
                (Some(a), Some(b)) => a.iter().all(|x| b.contains(x)) && a.len() == b.len(),
                _ => false,
            };
            let parent = m.dp.merge(p)?;
            if !same {
                return Err(MapError::GroupsDiffer { a: p, b: sibling });
            }
            let group = m.groups.remove(&p).expect("leaf has a group");
            m.groups.remove(&sibling);
            m.groups.insert(parent, group);
            Ok(())
        })
    }

    pub fn add_brick(&self, id: BrickId, addr: BrickAddr) -> Result<ClusterMap, MapError> {
        self.next(|m| match m.bricks.insert(id, addr) {
            Some(_) => Err(MapError::DuplicateBrick(id)),
            None => {
                m.next_brick_id = m.next_brick_id.max(id.0 + 1);
                Ok(())
            }
        })
    }

    /// The lowest id never given out.
    pub fn fresh_brick_id(&self) -> BrickId {
        BrickId(self.bricks.keys().map(|b| b.0 + 1).max().unwrap_or(0).max(self.next_brick_id))
    }

    /// Whether `id` was given out once and has since been removed.
    pub fn is_retired(&self, id: BrickId) -> bool {
        id.0 < self.next_brick_id && !self.bricks.contains_key(&id)
    }

    /// Takes a failed brick out of every group and out of the map (fail-stop).
    pub fn remove_brick(&self, brick: BrickId) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            m.bricks.remove(&brick).ok_or(MapError::UnknownBrick(brick))?;
            for lists in [&mut m.joining, &mut m.leaving] {
                for list in lists.values_mut() {
                    list.retain(|&b| b != brick);
                }
                lists.retain(|_, l| !l.is_empty());
            }
            for group in m.groups.values_mut() {
                group.retain(|&b| b != brick);
            }
            match m.dp.leaves().iter().find(|&&p| m.readable(p).next().is_none()) {
                Some(&partition) => Err(MapError::LastReplica { brick, partition }),
                None => Ok(()),
            }
        })
    }

    /// Adds `brick` to the group of `p` (after it has copied the partition).
    pub fn add_replica(&self, p: PartitionId, brick: BrickId) -> Result<ClusterMap, MapError> {
        self.next(|m| m.push_member(p, brick))
    }

    /// Appends a known brick to `p`'s group, once.
    fn push_member(&mut self, p: PartitionId, brick: BrickId) -> Result<(), MapError> {
        if !self.bricks.contains_key(&brick) {
            return Err(MapError::UnknownBrick(brick));
        }
        let group = self.groups.get_mut(&p).ok_or(DpError::NotALeaf(p))?;
        if group.contains(&brick) {
            return Err(MapError::AlreadyReplica { brick, partition: p });
        }
        group.push(brick);
        Ok(())
    }

    /// Adds each `(partition, brick)` to the group as a joining (write-only) replica.
    pub fn begin_join(&self, joins: &[(PartitionId, BrickId)]) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            for &(p, brick) in joins {
                m.push_member(p, brick)?;
                m.joining.entry(p).or_default().push(brick);
            }
            Ok(())
        })
    }

    /// Marks joining replicas as copied: they serve reads from now on. Pairs no longer
    /// joining (their brick was removed meanwhile) are skipped. In the same map, each
    /// `leaves` member stops serving reads (it still takes writes) until `drop_leaving`.
    pub fn finish_join(&self, joins: &[(PartitionId, BrickId)], leaves: &[(PartitionId, BrickId)]) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            for &(p, brick) in leaves {
                if m.groups.get(&p).is_some_and(|g| g.contains(&brick)) && !m.is_leaving(p, brick) {
                    m.leaving.entry(p).or_default().push(brick);
                }
            }
            for &(p, brick) in joins {
                if let Some(j) = m.joining.get_mut(&p) {
                    j.retain(|&b| b != brick);
                    if j.is_empty() {
                        m.joining.remove(&p);
                    }
                }
            }
            Ok(())
        })
    }

    /// Takes leaving members out of their groups.
    pub fn drop_leaving(&self, leaves: &[(PartitionId, BrickId)]) -> Result<ClusterMap, MapError> {
        self.next(|m| {
            for &(p, brick) in leaves {
                if let Some(l) = m.leaving.get_mut(&p) {
                    if l.contains(&brick) {
                        l.retain(|&b| b != brick);
                        if l.is_empty() {
                            m.leaving.remove(&p);
                        }
                        m.groups.get_mut(&p).expect("a leaving member's group").retain(|&b| b != brick);
                    }
                }
            }
            Ok(())
        })
    }

    /// Decodes a map and refuses one that breaks an invariant.
    pub fn from_json(text: &str) -> Result<ClusterMap, MapError> {
        let map: ClusterMap = serde_json::from_str(text).map_err(|e| MapError::Invalid(e.to_string()))?;
        map.validate().map_err(MapError::Invalid)?;
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bricks(n: u32) -> BTreeMap<BrickId, BrickAddr> {
        (0..n).map(|i| (BrickId(i), BrickAddr::tcp(vec![SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))]))).collect()
    }

    #[test]
    fn initial_maps_spread_replicas() {
        let map = ClusterMap::initial(4, bricks(3), 2).unwrap();
        assert_eq!(map.epoch, 1);
        let mut load = BTreeMap::new();
        for g in map.groups.values() {
            assert_eq!(g.len(), 2);
            for b in g {
                *load.entry(*b).or_insert(0) += 1;
            }
        }
        assert!(load.values().all(|&n| (10..=11).contains(&n)), "{load:?}");
        assert_eq!(ClusterMap::initial(4, bricks(1), 2), Err(MapError::TooFewBricks { replicas: 2, bricks: 1 }));
    }

    #[test]
    fn removing_the_last_replica_is_refused() {
        let map = ClusterMap::initial(2, bricks(2), 1).unwrap();
        assert!(matches!(map.remove_brick(BrickId(0)), Err(MapError::LastReplica { .. })));
        let map = ClusterMap::initial(2, bricks(2), 2).unwrap();
        let after = map.remove_brick(BrickId(0)).unwrap();
        assert_eq!(after.epoch, 2);
        assert!(after.groups.values().all(|g| g == &vec![BrickId(1)]));
    }

    #[test]
    fn decoding_refuses_broken_maps() {
        let map = ClusterMap::initial(2, bricks(2), 1).unwrap();
        let mut text = serde_json::to_value(&map).unwrap();
        text["groups"].as_object_mut().expect("groups is an object").clear();
        assert!(ClusterMap::from_json(&text.to_string()).is_err());
        assert_eq!(ClusterMap::from_json(&serde_json::to_string(&map).unwrap()).unwrap(), map);
    }

    #[derive(Clone, Debug)]
    enum Change {
        Split(u16),
        Merge(u16),
        Remove(u8),
        Add(u8),
        Replica(u16, u8),
        Join(u16, u8),
        Finish(u16),
        Leave(u16, u8),
        Drop(u16),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            any::<u16>().prop_map(Change::Split),
            any::<u16>().prop_map(Change::Merge),
            any::<u8>().prop_map(Change::Remove),
            any::<u8>().prop_map(Change::Add),
            (any::<u16>(), any::<u8>()).prop_map(|(p, b)| Change::Replica(p, b)),
            (any::<u16>(), any::<u8>()).prop_map(|(p, b)| Change::Join(p, b)),
            any::<u16>().prop_map(Change::Finish),
            (any::<u16>(), any::<u8>()).prop_map(|(p, b)| Change::Leave(p, b)),
            any::<u16>().prop_map(Change::Drop),
        ]
    }

    proptest! {
        #[test]
        fn every_change_keeps_the_invariants_and_grows_the_epoch(changes in prop::collection::vec(change(), 0..50), hashes in prop::collection::vec(any::<u64>(), 20)) {
            let mut map = ClusterMap::initial(3, bricks(4), 2).unwrap();
            for c in changes {
                let leaves = map.dp.leaves().to_vec();
                let ids: Vec<BrickId> = map.bricks.keys().copied().collect();
                let next = match c {
                    Change::Split(i) => map.split(leaves[i as usize % leaves.len()]),
                    Change::Merge(i) => map.merge(leaves[i as usize % leaves.len()]),
                    Change::Remove(i) => map.remove_brick(ids[i as usize % ids.len()]),
                    Change::Add(i) => map.add_brick(BrickId(100 + i as u32), BrickAddr::tcp(vec![])),
                    Change::Replica(p, b) => map.add_replica(leaves[p as usize % leaves.len()], ids[b as usize % ids.len()]),
                    Change::Join(p, b) => map.begin_join(&[(leaves[p as usize % leaves.len()], ids[b as usize % ids.len()])]),
                    Change::Finish(p) => {
                        let p = leaves[p as usize % leaves.len()];
                        let joins: Vec<_> = map.joining.get(&p).into_iter().flatten().map(|&b| (p, b)).collect();
                        map.finish_join(&joins, &[])
                    }
                    Change::Leave(p, b) => map.finish_join(&[], &[(leaves[p as usize % leaves.len()], ids[b as usize % ids.len()])]),
                    Change::Drop(p) => {
                        let p = leaves[p as usize % leaves.len()];
                        let gone: Vec<_> = map.leaving.get(&p).into_iter().flatten().map(|&b| (p, b)).collect();
                        map.drop_leaving(&gone)
                    }
                };
                match next {
                    Ok(next) => {
                        prop_assert_eq!(next.epoch, map.epoch + 1);
                        prop_assert_eq!(next.validate(), Ok(()));
                        map = next;
                    }
                    // A refused change leaves the map as it was.
                    Err(_) => prop_assert_eq!(map.validate(), Ok(())),
                }
            }
            for h in hashes {
                let (p, group) = map.route(h);
                prop_assert!(p.contains(h));
                prop_assert!(!group.is_empty());
                prop_assert!(map.readable(p).count() > 0);
            }
            prop_assert_eq!(ClusterMap::from_json(&serde_json::to_string(&map).unwrap()).unwrap(), map);
        }
    }
}
