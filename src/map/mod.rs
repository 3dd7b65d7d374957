//! Where a key lives: key hash -> partition -> brick -> core.
//!
//! The paper's DP map is a trie over the bits of the key's 64-bit hash, walked from the
//! least significant bit, whose leaves are partitions. This module holds that addressing
//! for the layout a cluster starts with: a full trie of depth `partition_bits` (so the
//! partition is the low `partition_bits` bits of the hash) and one brick per partition,
//! assigned in contiguous blocks. Splits, merges, replica groups and epochs build on it.
//! Every lookup here is arithmetic: nothing allocates.
//!
//! `dp` and `cluster` hold the general form bricks and clients route with: a DP trie
//! that splits and merges, replica groups, bricks, and the epoch that versions them.
//! The fixed arithmetic below picks a key's core inside a brick (and the base layout).

pub mod cluster;
pub mod dp;

pub use cluster::{BrickAddr, BrickId, ClusterMap, MapError};
pub use dp::{DpMap, PartitionId};

use xxhash_rust::xxh3::xxh3_64;

/// Default partition count is `1 << DEFAULT_PARTITION_BITS`.
pub const DEFAULT_PARTITION_BITS: u8 = 8;

/// The 64-bit hash that places a key. Stable across processes, builds and machines:
/// changing it moves every key, so it is part of the on-disk and wire contract.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The leaf of a full DP trie of depth `bits`, walked from the least significant bit.
#[inline]
pub fn partition_of(hash: u64, bits: u8) -> u32 {
    assert!(bits <= 16, "partition bits {bits} out of range");
    (hash & ((1u64 << bits) - 1)) as u32
}

/// The core of a brick that owns `partition`.
#[inline]
pub fn core_of(partition: u32, cores: usize) -> usize {
    assert!(cores > 0);
    partition as usize % cores
}

/// The brick (index into the cluster's brick list) that holds `partition`: contiguous
/// blocks, so brick and core choice stay independent (`core_of` uses the low bits).
#[inline]
pub fn brick_of(partition: u32, bits: u8, bricks: usize) -> usize {
    assert!(bricks > 0);
    let partitions = 1usize << bits;
    partition as usize * bricks / partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // Pinned: a change here would move every stored key.
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
        assert_eq!(key_hash(b"dds"), xxh3_64(b"dds"));
    }

    #[test]
    fn every_brick_and_core_gets_partitions() {
        for bricks in 1..=8 {
            for cores in 1..=4 {
                let mut seen = vec![vec![0u32; cores]; bricks];
                for p in 0..256 {
                    seen[brick_of(p, 8, bricks)][core_of(p, cores)] += 1;
                }
                for (b, per_core) in seen.iter().enumerate() {
                    for (c, n) in per_core.iter().enumerate() {
                        assert!(*n > 0, "brick {b} core {c} of {bricks}x{cores} owns no partition");
                    }
                }
            }
        }
    }

    #[test]
    fn partition_uses_low_bits() {
        assert_eq!(partition_of(0xffff_0000_0000_0103, 8), 3);
        assert_eq!(partition_of(0xffff_0000_0000_0103, 0), 0);
    }
}
