//! The checks during and at the end of a run, and the run's digest.

use std::hash::Hasher;

use crate::check::{self, Event as Seen};
use crate::map::key_hash;

use super::client::key_name;

type Entries = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;
use super::World;

impl World {
    /// Between rounds, on every key no up replica holds a prepared write for, the
    /// replicas that hold the partition (readable ones, and joining ones whose copy of
    /// it finished in their present incarnation) hold one value: a decision reaches a
    /// replica that holds the prepare, so a replica without either has lost a write. The
    /// end-of-run comparison sees such a loss only if no later write covered it.
    pub(crate) fn check_replicas(&mut self) {
        let Some(map) = self.published() else { return };
        let copied: Vec<_> = self.members.iter().filter_map(|m| m.copy.as_ref()).flat_map(|c| c.copied.iter().copied()).collect();
        for k in 0..self.shape.keys {
            let key = key_name(k);
            let (p, group) = map.route(key_hash(&key));
            let replicas: Vec<(crate::map::BrickId, &super::brick::SimBrick, Option<&[u8]>, bool)> =
                group.iter().filter_map(|&id| self.bricks.iter().find(|b| b.id == Some(id) && b.is_up()).and_then(|b| b.lookup(&key).map(|(v, prepared)| (id, b, v, prepared)))).collect();
            if replicas.iter().any(|r| r.3) {
                continue;
            }
            let mut first: Option<(crate::map::BrickId, Option<&[u8]>)> = None;
            for (id, brick, value, _) in replicas {
                let holds = map.is_readable(p, id) || copied.iter().any(|&(q, t, life)| q == p && t == id && life == brick.life);
                if !brick.serving() || !holds {
                    continue;
                }
                match first {
                    None => first = Some((id, value)),
                    Some((other, v)) if v != value => {
                        let show = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
                        return self.fail(format!("{} of partition {p}: {other} holds {:?} and {id} holds {:?}, with no write prepared", String::from_utf8_lossy(&key), show(v), show(value)));
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// Linearizability of every key's history; replicas identical and equal to what the
    /// final reads returned; every partition readable on a live brick.
    pub(crate) fn check_end(&self) -> Result<(), String> {
        let history: Vec<check::Operation> = self.clients.iter().flat_map(|c| c.history.iter().cloned()).collect();
        if let Err(e) = check::check(&history) {
            if self.options.trace {
                let (check::CheckError::NotLinearizable { key, .. } | check::CheckError::TooHard { key, .. }) = &e;
                let mut ops: Vec<(u64, usize, &check::Operation)> = Vec::new();
                for (i, c) in self.clients.iter().enumerate() {
                    ops.extend(c.history.iter().filter(|o| String::from_utf8_lossy(&o.key) == *key).map(|o| (o.invoke, i, o)));
                }
                ops.sort_by_key(|(t, i, _)| (*t, *i));
                for (_, i, o) in ops {
                    eprintln!("  client {i}: [{:>9.3} .. {:>9.3} ms] {:?}", o.invoke as f64 / 1000.0, o.complete as f64 / 1000.0, o.event);
                }
            }
            return Err(format!("linearizability: {e}"));
        }
        let map = self.published().ok_or("no map at the end")?;
        // What the final reads saw, by key.
        let finals = &self.clients[0].history;
        for k in 0..self.shape.keys {
            let key = key_name(k);
            let seen = finals.iter().rev().find(|o| o.key == key && matches!(o.event, Seen::Read(_)));
            let Some(check::Operation { event: Seen::Read(value), .. }) = seen else {
                return Err(format!("no final read of {}", String::from_utf8_lossy(&key)));
            };
            let (p, group) = map.route(key_hash(&key));
            for brick_id in group {
                let brick = self.bricks.iter().find(|b| b.id == Some(*brick_id)).ok_or(format!("{brick_id} of partition {p} is not a simulated brick"))?;
                if !brick.serving() {
                    return Err(format!("{brick_id}, a replica of partition {p}, is not serving at the end"));
                }
                let held = brick.entries_of(p).remove(&key);
                if held != *value {
                    return Err(format!(
                        "replica {brick_id} of partition {p} holds {:?} for {} but the final read returned {:?}",
                        held.map(|v| String::from_utf8_lossy(&v).into_owned()),
                        String::from_utf8_lossy(&key),
                        value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())
                    ));
                }
            }
        }
        for (&p, group) in map.groups() {
            let mut first: Option<(crate::map::BrickId, Entries)> = None;
            for brick_id in group {
                let brick = self.bricks.iter().find(|b| b.id == Some(*brick_id)).ok_or(format!("{brick_id} is not a simulated brick"))?;
                let entries = brick.entries_of(p);
                match &first {
                    None => first = Some((*brick_id, entries)),
                    Some((other, theirs)) if *theirs != entries => {
                        return Err(format!("replicas {other} and {brick_id} of partition {p} differ once quiet ({} and {} entries)", theirs.len(), entries.len()));
                    }
                    Some(_) => {}
                }
            }
            if !map.readable(p).any(|b| self.bricks.iter().any(|s| s.id == Some(b) && s.serving())) {
                return Err(format!("partition {p} has no readable replica on a live brick"));
            }
        }
        Ok(())
    }

    /// A hash of everything a run produced that another run of the seed must repeat:
    /// each client's history, every map's epoch and groups, every brick's entries.
    pub(crate) fn digest(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for c in &self.clients {
            for op in &c.history {
                h.write(&op.key);
                h.write(format!("{:?}", op.event).as_bytes());
                h.write_u64(op.invoke);
                h.write_u64(op.complete);
            }
        }
        for m in &self.maps {
            h.write_u64(m.epoch());
            h.write(format!("{:?}", m.groups()).as_bytes());
        }
        for b in &self.bricks {
            for (k, v) in b.all_entries() {
                h.write(&k);
                h.write(&v);
            }
        }
        h.write_u64(self.events);
        h.finish()
    }
}
