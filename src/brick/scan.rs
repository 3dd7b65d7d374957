//! A full copy's read of a partition, in the order of its keys' hashes and in bounded
//! memory. The source never lists a whole partition: one pass over its table keeps the
//! smallest hashes from the copy's position that fit `WINDOW_KEY_BYTES_MAX` (a bounded
//! heap), and chunks are served from that window until it is spent; the next chunk past
//! it scans again from there. A partition of `n` keys costs about `n` x key bytes /
//! `WINDOW_KEY_BYTES_MAX` passes, and memory never grows with it.
//!
//! Why a window may be older than the chunk it serves: a key written after the copy
//! started reaches the joining replica by the write itself (it is in the write's
//! group), so a window needs only the keys that existed when the copy started, and any
//! pass made since then has them; a key removed since is skipped when its value is
//! looked up. A window made before the copy started (by an abandoned copy) lacks keys
//! written in between, so a copy is served only from windows of its own: each reply
//! carries the window's token and the next request hands it back.

use std::collections::BinaryHeap;

use crate::proto::tx::ENTRY_HEADER_LEN;
use crate::proto::Chunk;

/// Key bytes a window holds at most, with `WINDOW_ENTRY_OVERHEAD` each.
pub const WINDOW_KEY_BYTES_MAX: usize = 2 << 20;
/// A window entry's hash and its boxed key's pointer.
const WINDOW_ENTRY_OVERHEAD: usize = 8 + 16;

/// The keys of one partition whose hashes lie in `from..end`, sorted by hash and key,
/// as one pass found them.
#[derive(Debug)]
pub struct CopyWindow {
    token: u64,
    from: u64,
    /// `None`: to the end of the hash space.
    end: Option<u64>,
    keys: Vec<(u64, Box<[u8]>)>,
}

/// Why a chunk could not be filled.
#[derive(Debug, PartialEq, Eq)]
pub enum FillError {
    /// An entry, or a run of keys sharing one hash, that does not fit one frame (its
    /// size in bytes).
    TooLarge(usize),
    /// A value could not be read back from the log (the core is stopping).
    Unreadable,
}

impl CopyWindow {
    /// One pass over a partition's keys (with their hashes): the smallest hashes from
    /// `from` whose keys fit `bytes_max`, ending before the first hash left out, so no
    /// hash is split between windows.
    pub fn scan<'a, I>(keys: I, from: u64, token: u64, bytes_max: usize) -> CopyWindow
    where
        I: Iterator<Item = (u64, &'a [u8])> + Clone,
    {
        let cost = |key: &[u8]| key.len() + WINDOW_ENTRY_OVERHEAD;
        let mut heap: BinaryHeap<(u64, &[u8])> = BinaryHeap::new();
        let (mut bytes, mut cut) = (0usize, None::<u64>);
        for (hash, key) in keys.clone() {
            if hash < from || cut.is_some_and(|c| hash >= c) {
                continue;
            }
            heap.push((hash, key));
            bytes += cost(key);
            // Every key seen with a hash in `from..cut` stays in the heap: a key popped
            // is the largest, and the cut only comes down.
            while bytes > bytes_max {
                let (hash, key) = heap.pop().expect("over the budget, so not empty");
                bytes -= cost(key);
                cut = Some(hash);
            }
        }
        let mut kept = heap.into_sorted_vec();
        let end = match cut {
            None => None,
            Some(c) => {
                kept.retain(|(h, _)| *h < c);
                if kept.is_empty() {
                    // Keys sharing one hash outgrow a window alone: all of them, however
                    // many (a chunk refuses them if they outgrow a frame).
                    kept = keys.filter(|(h, _)| *h == c).collect();
                    kept.sort_unstable();
                    c.checked_add(1)
                } else {
                    Some(c)
                }
            }
        };
        let window = CopyWindow { token, from, end, keys: kept.into_iter().map(|(h, k)| (h, Box::from(k))).collect() };
        assert!(window.keys.windows(2).all(|w| w[0] < w[1]), "a window is sorted and holds a key once");
        assert!(window.keys.iter().all(|(h, _)| *h >= from && window.end.is_none_or(|e| *h < e)), "a window's keys lie in its range");
        window
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether a request of the copy that holds `token`, reading from hash `from`, can be
    /// served from this window.
    pub fn serves(&self, from: u64, token: u64) -> bool {
        self.token == token && from >= self.from && self.end.is_none_or(|e| from < e)
    }

    /// Appends the entries from hash `from` on (`from` in this window) while they fit:
    /// at least one, then up to `chunk_bytes_max`, never past `frame_bytes_max`, and a
    /// chunk ends between two hashes. `value` gives a key's value now (`None`: removed
    /// since the pass, skipped; `Some(None)`: unreadable). Returns where the next chunk starts and whether the
    /// partition is done.
    pub fn fill<'v>(
        &self,
        from: u64,
        value: impl Fn(&[u8]) -> Option<Option<std::borrow::Cow<'v, [u8]>>>,
        entries: &mut Vec<u8>,
        chunk_bytes_max: usize,
        frame_bytes_max: usize,
    ) -> Result<(u64, bool), FillError> {
        let start = self.keys.partition_point(|(h, _)| *h < from);
        let mut last_hash = None;
        for (hash, key) in &self.keys[start..] {
            let Some(v) = value(key) else { continue };
            let Some(v) = v else { return Err(FillError::Unreadable) };
            let size = ENTRY_HEADER_LEN + key.len() + v.len();
            let boundary = last_hash != Some(*hash);
            if boundary && last_hash.is_some() && (entries.len() >= chunk_bytes_max || entries.len() + size > frame_bytes_max) {
                return Ok((*hash, false));
            }
            if entries.len() + size > frame_bytes_max {
                return Err(FillError::TooLarge(entries.len() + size));
            }
            Chunk::push_entry(entries, key, &v);
            last_hash = Some(*hash);
        }
        Ok(match self.end {
            Some(end) => (end, false),
            None => (u64::MAX, true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The keys of chunk entries `fill` appended.
    fn keys_in(entries: &[u8]) -> Vec<Vec<u8>> {
        let mut chunk = Vec::new();
        Chunk::start(&mut chunk, 0, 0, 0, false);
        chunk.extend_from_slice(entries);
        Chunk::decode(&chunk).expect("entries fill wrote").entries().map(|(k, _)| k.to_vec()).collect()
    }

    /// Reads a whole table as a copy does (a new pass whenever a window is spent) and
    /// returns the keys sent, in order, and the passes made.
    fn copy_all(table: &BTreeMap<Vec<u8>, (u64, Vec<u8>)>, bytes_max: usize, chunk_bytes_max: usize) -> (Vec<Vec<u8>>, usize) {
        let keys = || table.iter().map(|(k, (h, _))| (*h, &k[..]));
        let (mut sent, mut passes, mut from, mut window) = (Vec::new(), 0, 0u64, None::<CopyWindow>);
        for _ in 0..100_000 {
            if !window.as_ref().is_some_and(|w| w.serves(from, passes as u64)) {
                passes += 1;
                window = Some(CopyWindow::scan(keys(), from, passes as u64, bytes_max));
            }
            let w = window.as_ref().unwrap();
            let mut entries = Vec::new();
            let (next, done) = w.fill(from, |k| table.get(k).map(|(_, v)| Some(std::borrow::Cow::Borrowed(&v[..]))), &mut entries, chunk_bytes_max, 1 << 20).unwrap();
            sent.extend(keys_in(&entries));
            if done {
                return (sent, passes);
            }
            assert!(next > from, "a chunk moves the copy on");
            from = next;
        }
        panic!("the copy never finished");
    }

    proptest! {
        /// Every key goes exactly once, in hash order, through windows far smaller than
        /// the table, with few hashes (many shared) or many.
        #[test]
        fn a_copy_sends_every_key_once_in_bounded_windows(keys in prop::collection::btree_set(prop::collection::vec(any::<u8>(), 1..12), 0..300), hashes in 1u64..1000, window_keys in 1usize..40) {
            let table: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = keys.iter().map(|k| (k.clone(), (crate::map::key_hash(k) % hashes * (u64::MAX / hashes), vec![7; k.len()]))).collect();
            let bytes_max = window_keys * (12 + WINDOW_ENTRY_OVERHEAD);
            let (sent, _) = copy_all(&table, bytes_max, 64);
            let mut expected: Vec<(u64, Vec<u8>)> = table.iter().map(|(k, (h, _))| (*h, k.clone())).collect();
            expected.sort();
            prop_assert_eq!(sent, expected.into_iter().map(|(_, k)| k).collect::<Vec<_>>());
        }
    }

    #[test]
    fn passes_grow_with_the_keys_over_the_window_and_memory_does_not() {
        let table: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = (0..10_000u32).map(|i| {
            let k = i.to_le_bytes().to_vec();
            let h = crate::map::key_hash(&k);
            (k, (h, vec![1; 8]))
        }).collect();
        let per_key = 4 + WINDOW_ENTRY_OVERHEAD;
        let (sent, passes) = copy_all(&table, 1000 * per_key, 4096);
        assert_eq!(sent.len(), 10_000);
        assert!((10..=12).contains(&passes), "{passes} passes for 10 windows of keys");
        let w = CopyWindow::scan(table.iter().map(|(k, (h, _))| (*h, &k[..])), 0, 1, 1000 * per_key);
        assert!(w.keys.len() <= 1000, "a window holds {} keys", w.keys.len());
    }

    #[test]
    fn keys_removed_since_the_pass_are_skipped_and_a_stranger_token_is_not_served() {
        let mut table: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = (0..10u8).map(|i| (vec![i], (u64::from(i) * 10, vec![i]))).collect();
        let w = CopyWindow::scan(table.iter().map(|(k, (h, _))| (*h, &k[..])), 0, 5, 1 << 20);
        table.remove(&vec![3u8]);
        let mut entries = Vec::new();
        let (_, done) = w.fill(0, |k| table.get(k).map(|(_, v)| Some(std::borrow::Cow::Borrowed(&v[..]))), &mut entries, 1 << 20, 1 << 20).unwrap();
        assert!(done);
        assert_eq!(keys_in(&entries).len(), 9, "every key but the one removed");
        assert!(w.serves(40, 5) && !w.serves(40, 6), "only the copy that made the window reads from it");
    }

    #[test]
    fn an_entry_larger_than_a_frame_is_refused() {
        let table: BTreeMap<Vec<u8>, (u64, Vec<u8>)> = [(vec![1u8], (1u64, vec![0u8; 100]))].into_iter().collect();
        let w = CopyWindow::scan(table.iter().map(|(k, (h, _))| (*h, &k[..])), 0, 1, 1 << 20);
        let mut entries = Vec::new();
        assert_eq!(w.fill(0, |k| table.get(k).map(|(_, v)| Some(std::borrow::Cow::Borrowed(&v[..]))), &mut entries, 10, 50), Err(FillError::TooLarge(107)));
    }
}
