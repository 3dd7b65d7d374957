//! A per-key linearizability checker for recorded client histories (after Wing & Gong,
//! with Lowe's memoisation): each key is a register (absent or a value), operations are
//! puts, removes and gets with their invocation and completion times, and a write whose
//! outcome the client could not know may take effect at any time after its invocation,
//! or never.
//!
//! Keys are independent registers, so each key's history is checked alone. The search
//! is exponential only in how many operations on one key overlap in time.

use std::collections::{BTreeMap, HashSet};

/// What a recorded operation did, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A get that returned `Some(value)` or `None` (not found).
    Read(Option<Vec<u8>>),
    /// A put of `value` (`None`: a remove) that was acknowledged.
    Write(Option<Vec<u8>>),
    /// A put or remove whose outcome is unknown: it may have happened, or not.
    MaybeWrite(Option<Vec<u8>>),
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub key: Vec<u8>,
    pub event: Event,
    /// Times in any one clock shared by every client of the history (ns, µs...).
    pub invoke: u64,
    /// Ignored for `MaybeWrite` (it may complete at any time).
    pub complete: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("key {key:?}: no order of its {ops} operations explains what the clients saw (for example the operation invoked at {at})")]
    NotLinearizable { key: String, ops: usize, at: u64 },
    #[error("key {key:?}: search gave up after {states} states")]
    TooHard { key: String, states: usize },
}

/// Checks every key of `history`; returns how many operations were checked.
pub fn check(history: &[Operation]) -> Result<usize, CheckError> {
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut checked = 0;
    for (key, ops) in by_key {
        checked += ops.len();
        check_key(key, &ops)?;
    }
    Ok(checked)
}

/// States a search may visit per key before it gives up.
const STATES_MAX: usize = 2_000_000;

struct Op {
    invoke: u64,
    complete: u64,
    /// Value id after a write, or the id a read saw; 0 is "absent".
    value: u32,
    write: bool,
    required: bool,
}

fn check_key<'a>(key: &[u8], ops: &[&'a Operation]) -> Result<(), CheckError> {
    let mut ids: BTreeMap<Option<&'a [u8]>, u32> = BTreeMap::new();
    ids.insert(None, 0);
    let mut id = |v: Option<&'a [u8]>| -> u32 {
        let next = ids.len() as u32;
        *ids.entry(v).or_insert(next)
    };
    // A write of unknown outcome whose value no read returned can be taken as never
    // applied: had it taken effect, no read saw the register until the next write, so
    // dropping it changes no read's explanation. (Values are unique per write; a
    // remove's `None` can be read, so removes stay.) This keeps the search small when
    // faults leave many outcomes unknown.
    let read_values: HashSet<&[u8]> = ops.iter().filter_map(|o| match &o.event {
        Event::Read(Some(v)) => Some(&v[..]),
        _ => None,
    }).collect();
    let relevant = |o: &&&Operation| !matches!(&o.event, Event::MaybeWrite(Some(v)) if !read_values.contains(&v[..]));
    let mut list: Vec<Op> = ops
        .iter()
        .filter(relevant)
        .map(|o| match &o.event {
            Event::Read(v) => Op { invoke: o.invoke, complete: o.complete, value: id(v.as_deref()), write: false, required: true },
            Event::Write(v) => Op { invoke: o.invoke, complete: o.complete, value: id(v.as_deref()), write: true, required: true },
            Event::MaybeWrite(v) => Op { invoke: o.invoke, complete: u64::MAX, value: id(v.as_deref()), write: true, required: false },
        })
        .collect();
    list.sort_by_key(|o| o.invoke);
    let name = String::from_utf8_lossy(key).into_owned();
    let words = list.len().div_ceil(64);
    let mut seen: HashSet<(Vec<u64>, u32)> = HashSet::new();
    // Depth-first over (linearized set, register value), each step linearizing one
    // operation that no unlinearized required operation completed before.
    let mut stack: Vec<(Vec<u64>, u32)> = vec![(vec![0; words], 0)];
    let mut deepest = 0usize;
    while let Some((done, value)) = stack.pop() {
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        let first_open = (0..list.len()).find(|&i| !is_done(i));
        let pending_required = (0..list.len()).any(|i| !is_done(i) && list[i].required);
        if !pending_required {
            return Ok(());
        }
        let Some(first) = first_open else { return Ok(()) };
        deepest = deepest.max(first);
        let horizon = (first..list.len()).filter(|&i| !is_done(i)).map(|i| list[i].complete).min().unwrap_or(u64::MAX);
        for i in first..list.len() {
            if list[i].invoke > horizon {
                break;
            }
            if is_done(i) {
                continue;
            }
            let op = &list[i];
            let next_value = if op.write {
                op.value
            } else if op.value == value {
                value
            } else {
                continue;
            };
            let mut next = done.clone();
            next[i / 64] |= 1 << (i % 64);
            if seen.insert((next.clone(), next_value)) {
                if seen.len() > STATES_MAX {
                    return Err(CheckError::TooHard { key: name, states: seen.len() });
                }
                stack.push((next, next_value));
            }
        }
    }
    Err(CheckError::NotLinearizable { key: name, ops: list.len(), at: list[deepest.min(list.len() - 1)].invoke })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(event: Event, invoke: u64, complete: u64) -> Operation {
        Operation { key: b"k".to_vec(), event, invoke, complete }
    }

    fn v(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    #[test]
    fn sequential_and_concurrent_histories() {
        // w(a) then r(a): fine.
        assert!(check(&[op(Event::Write(v("a")), 0, 1), op(Event::Read(v("a")), 2, 3)]).is_ok());
        // A read before any write sees nothing.
        assert!(check(&[op(Event::Read(None), 0, 1), op(Event::Write(v("a")), 2, 3)]).is_ok());
        // Stale read after a completed write: not linearizable.
        let stale = [op(Event::Write(v("a")), 0, 1), op(Event::Write(v("b")), 2, 3), op(Event::Read(v("a")), 4, 5)];
        assert!(matches!(check(&stale), Err(CheckError::NotLinearizable { .. })));
        // The same read overlapping the second write: fine.
        assert!(check(&[op(Event::Write(v("a")), 0, 1), op(Event::Write(v("b")), 2, 5), op(Event::Read(v("a")), 3, 4)]).is_ok());
        // New then old, both overlapping the write: the second read went back in time.
        let back = [op(Event::Write(v("a")), 0, 1), op(Event::Write(v("b")), 2, 10), op(Event::Read(v("b")), 3, 4), op(Event::Read(v("a")), 5, 6)];
        assert!(check(&back).is_err());
        // A value nobody wrote.
        assert!(check(&[op(Event::Read(v("z")), 0, 1)]).is_err());
        // A remove.
        assert!(check(&[op(Event::Write(v("a")), 0, 1), op(Event::Write(None), 2, 3), op(Event::Read(None), 4, 5)]).is_ok());
    }

    #[test]
    fn unknown_writes_may_happen_late_or_never() {
        let late = [op(Event::MaybeWrite(v("a")), 0, 1), op(Event::Read(None), 2, 3), op(Event::Read(v("a")), 4, 5)];
        assert!(check(&late).is_ok());
        let never = [op(Event::MaybeWrite(v("a")), 0, 1), op(Event::Read(None), 2, 3)];
        assert!(check(&never).is_ok());
        // But once seen, it cannot be undone.
        let undone = [op(Event::MaybeWrite(v("a")), 0, 1), op(Event::Read(v("a")), 2, 3), op(Event::Read(None), 4, 5)];
        assert!(check(&undone).is_err());
    }

    #[test]
    fn long_histories_with_little_overlap_are_quick() {
        let mut h = Vec::new();
        for i in 0..2000u64 {
            let val = format!("v{i}");
            h.push(op(Event::Write(v(&val)), i * 10, i * 10 + 6));
            h.push(op(Event::Read(v(&val)), i * 10 + 7, i * 10 + 9));
            h.push(op(Event::Read(v(&val)), i * 10 + 5, i * 10 + 8));
        }
        assert_eq!(check(&h), Ok(6000));
    }
}
