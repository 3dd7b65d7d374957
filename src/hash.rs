//! The hash maps of the protocol state. A normal build seeds each map's hasher at random
//! (no one can aim keys at one bucket); a `sim` build hashes with fixed keys, because
//! the simulator must replay a seed exactly and some loops walk maps in hash order.

#[cfg(not(feature = "sim"))]
pub type BuildHasher = hashbrown::DefaultHashBuilder;
#[cfg(feature = "sim")]
pub type BuildHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

pub type HashMap<K, V> = hashbrown::HashMap<K, V, BuildHasher>;
pub type HashSet<K> = hashbrown::HashSet<K, BuildHasher>;
