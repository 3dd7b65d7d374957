//! The hash maps of the protocol state. A normal build seeds each map's hasher at random
//! (no one can aim keys at one bucket); a `sim` build hashes with fixed keys, because
//! the simulator must replay a seed exactly and some loops walk maps in hash order.

#[cfg(not(feature = "sim"))]
pub type BuildHasher = hashbrown::DefaultHashBuilder;
#[cfg(feature = "sim")]
pub type BuildHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

pub type HashMap<K, V> = hashbrown::HashMap<K, V, BuildHasher>;
pub type HashSet<K> = hashbrown::HashSet<K, BuildHasher>;

/// A number no other process is likely to draw (client ids, brick directory tokens):
/// from the clock, the pid and std's random hasher keys. Never used by the simulator.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}
