//! The DP map: a binary trie over the bits of a key's 64-bit hash, walked from the least
//! significant bit, whose leaves are partitions. A leaf at depth `d` with prefix `p` holds
//! every hash `h` with `h & (2^d - 1) == p`.
//!
//! A leaf's id is its heap number `2^d | p`, so an id names its key range and needs no
//! allocator. Lookup goes through a table indexed by the hash's low `max_depth` bits: one
//! mask and one load, no allocation.

use serde::{Deserialize, Serialize};

/// Deepest the trie may grow: 2^16 partitions at most, a 256 KiB lookup table.
pub const DEPTH_MAX: u8 = 16;

/// A partition: a leaf of the DP trie, by heap number (`2^depth | prefix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionId(pub u32);

impl PartitionId {
    pub fn new(depth: u8, prefix: u32) -> PartitionId {
        assert!(depth <= DEPTH_MAX && (prefix as u64) < (1u64 << depth), "prefix {prefix} at depth {depth}");
        PartitionId((1u32 << depth) | prefix)
    }

    pub fn depth(self) -> u8 {
        (31 - self.0.leading_zeros()) as u8
    }

    pub fn prefix(self) -> u32 {
        self.0 & !(1u32 << self.depth())
    }

    /// Whether `hash` falls in this partition.
    pub fn contains(self, hash: u64) -> bool {
        hash & ((1u64 << self.depth()) - 1) == self.prefix() as u64
    }

    /// Whether the two share a hash: one is the other or lies inside it.
    pub fn overlaps(self, other: PartitionId) -> bool {
        let mask = (1u32 << self.depth().min(other.depth())) - 1;
        self.prefix() & mask == other.prefix() & mask
    }

    /// The two halves a split makes: the next hash bit 0, then 1.
    pub fn children(self) -> (PartitionId, PartitionId) {
        let d = self.depth();
        (PartitionId::new(d + 1, self.prefix()), PartitionId::new(d + 1, self.prefix() | (1 << d)))
    }

    /// The partition a merge with its sibling makes; `None` for the root.
    pub fn parent(self) -> Option<PartitionId> {
        let d = self.depth();
        (d > 0).then(|| PartitionId::new(d - 1, self.prefix() & ((1 << (d - 1)) - 1)))
    }

    pub fn sibling(self) -> Option<PartitionId> {
        let d = self.depth();
        (d > 0).then(|| PartitionId::new(d, self.prefix() ^ (1 << (d - 1))))
    }
}

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:0width$b}/{}", self.prefix(), self.depth(), width = self.depth() as usize)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DpError {
    #[error("partition {0} is not a leaf of the DP map")]
    NotALeaf(PartitionId),
    #[error("partition {0} is at the maximum depth {DEPTH_MAX}")]
    TooDeep(PartitionId),
    #[error("partition {0} has no sibling leaf to merge with")]
    NoSibling(PartitionId),
    #[error("partition bits {0} out of range 0..={DEPTH_MAX}")]
    Bits(u8),
}

/// The leaves, kept sorted; the lookup table is derived from them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<PartitionId>", into = "Vec<PartitionId>")]
pub struct DpMap {
    leaves: Vec<PartitionId>,
    /// `table[h & (2^max_depth - 1)]` is the leaf holding `h`.
    table: Vec<PartitionId>,
    max_depth: u8,
}

impl From<DpMap> for Vec<PartitionId> {
    fn from(map: DpMap) -> Vec<PartitionId> {
        map.leaves
    }
}

impl From<Vec<PartitionId>> for DpMap {
    /// Builds the table; `validate` says whether the leaves cover the hash space once.
    fn from(mut leaves: Vec<PartitionId>) -> DpMap {
        leaves.sort_unstable();
        let max_depth = leaves.iter().map(|l| l.depth()).max().unwrap_or(0).min(DEPTH_MAX);
        let mut table = vec![PartitionId(0); 1 << max_depth];
        for &leaf in &leaves {
            let (d, p) = (leaf.depth().min(max_depth), leaf.prefix() as usize);
            for high in 0..1usize << (max_depth - d) {
                table[p | (high << d)] = leaf;
            }
        }
        DpMap { leaves, table, max_depth }
    }
}

impl DpMap {
    /// A full trie of depth `bits`: `2^bits` equal partitions.
    pub fn uniform(bits: u8) -> Result<DpMap, DpError> {
        if bits > DEPTH_MAX {
            return Err(DpError::Bits(bits));
        }
        Ok(DpMap::from((0..1u32 << bits).map(|p| PartitionId::new(bits, p)).collect::<Vec<_>>()))
    }

    #[inline]
    pub fn lookup(&self, hash: u64) -> PartitionId {
        self.table[(hash & ((1u64 << self.max_depth) - 1)) as usize]
    }

    pub fn leaves(&self) -> &[PartitionId] {
        &self.leaves
    }

    pub fn is_leaf(&self, p: PartitionId) -> bool {
        self.leaves.binary_search(&p).is_ok()
    }

    /// Replaces leaf `p` by its two children.
    pub fn split(&mut self, p: PartitionId) -> Result<(PartitionId, PartitionId), DpError> {
        if !self.is_leaf(p) {
            return Err(DpError::NotALeaf(p));
        }
        if p.depth() >= DEPTH_MAX {
            return Err(DpError::TooDeep(p));
        }
        let (a, b) = p.children();
        let mut leaves: Vec<PartitionId> = self.leaves.iter().copied().filter(|&l| l != p).collect();
        leaves.extend([a, b]);
        *self = DpMap::from(leaves);
        Ok((a, b))
    }

    /// Replaces leaf `p` and its sibling leaf by their parent.
    pub fn merge(&mut self, p: PartitionId) -> Result<PartitionId, DpError> {
        let sibling = p.sibling().ok_or(DpError::NoSibling(p))?;
        if !self.is_leaf(p) {
            return Err(DpError::NotALeaf(p));
        }
        if !self.is_leaf(sibling) {
            return Err(DpError::NoSibling(p));
        }
        let parent = p.parent().expect("has a sibling, so not the root");
        let mut leaves: Vec<PartitionId> = self.leaves.iter().copied().filter(|&l| l != p && l != sibling).collect();
        leaves.push(parent);
        *self = DpMap::from(leaves);
        Ok(parent)
    }

    /// Whether the leaves cover every hash exactly once (a deserialised map must).
    pub fn validate(&self) -> Result<(), String> {
        if self.leaves.is_empty() {
            return Err("no leaves".into());
        }
        if let Some(l) = self.leaves.iter().find(|l| l.0 == 0 || l.depth() > DEPTH_MAX) {
            return Err(format!("invalid leaf id {}", l.0));
        }
        // Measure: each leaf covers 2^(max - depth) table slots; they must add up to the
        // table exactly, and every slot must point at a leaf that contains it.
        let covered: u64 = self.leaves.iter().map(|l| 1u64 << (self.max_depth - l.depth())).sum();
        if covered != 1u64 << self.max_depth {
            return Err(format!("leaves cover {covered} of {} slots", 1u64 << self.max_depth));
        }
        for (slot, leaf) in self.table.iter().enumerate() {
            if !leaf.contains(slot as u64) {
                return Err(format!("slot {slot} points at {leaf}, which does not hold it"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_name_their_range() {
        let p = PartitionId::new(3, 0b101);
        assert_eq!((p.depth(), p.prefix()), (3, 0b101));
        assert!(p.contains(0xff_fd) && !p.contains(0b100));
        let (a, b) = p.children();
        assert_eq!((a.prefix(), b.prefix()), (0b0101, 0b1101));
        assert_eq!(a.parent(), Some(p));
        assert_eq!(a.sibling(), Some(b));
        assert_eq!(PartitionId::new(0, 0).parent(), None);
        assert_eq!(p.to_string(), "101/3");
    }

    #[derive(Clone, Debug)]
    enum Change {
        Split(u16),
        Merge(u16),
    }

    proptest! {
        #[test]
        fn splits_and_merges_keep_one_leaf_per_hash(
            bits in 0u8..5,
            changes in prop::collection::vec(prop_oneof![any::<u16>().prop_map(Change::Split), any::<u16>().prop_map(Change::Merge)], 0..60),
            hashes in prop::collection::vec(any::<u64>(), 50),
        ) {
            let mut map = DpMap::uniform(bits).unwrap();
            for change in changes {
                let leaves = map.leaves().to_vec();
                let _ = match change {
                    Change::Split(i) => map.split(leaves[i as usize % leaves.len()]).map(|_| ()),
                    Change::Merge(i) => map.merge(leaves[i as usize % leaves.len()]).map(|_| ()),
                };
                prop_assert_eq!(map.validate(), Ok(()));
            }
            for h in hashes {
                let owners: Vec<_> = map.leaves().iter().filter(|l| l.contains(h)).collect();
                prop_assert_eq!(owners.len(), 1);
                prop_assert_eq!(*owners[0], map.lookup(h));
            }
            let json = serde_json::to_string(&map).unwrap();
            let back: DpMap = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, map);
        }
    }

    #[test]
    fn bad_leaf_sets_are_rejected() {
        let overlap = DpMap::from(vec![PartitionId::new(1, 0), PartitionId::new(1, 1), PartitionId::new(2, 1)]);
        assert!(overlap.validate().is_err());
        let gap = DpMap::from(vec![PartitionId::new(1, 0)]);
        assert!(gap.validate().is_err());
        assert!(DpMap::from(vec![]).validate().is_err());
        assert_eq!(DpMap::uniform(17), Err(DpError::Bits(17)));
    }
}
