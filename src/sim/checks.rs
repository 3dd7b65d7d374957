//! The checks during and at the end of a run, and the run's digest.

use std::hash::Hasher;

use crate::check::{self, Event as Seen};
use crate::map::key_hash;

use super::client::key_name;
use super::{Event, Micros, World, MS};

type Entries = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// How long after a window begins (`World::recovery_step`) the cluster must serve
/// (`World::serves`). A follower that hears no leader campaigns after 8 to 16 ticks
/// (`ELECTION_TICKS` of `TICK_MS`: at most 400 ms) and wins within a few round trips; a
/// brick whose leader went silent asks it until its beat times out (`LEASE_MS`, 500 ms),
/// registers with it once more until that times out too (500 ms), and is then sent on
/// to the new leader: about 1.5 s. The rest is margin for split votes (up to 400 ms
/// each). Longer than `LEASE_MS`, so a lease a brick holds at the deadline was granted
/// in the window.
pub(crate) const RECOVERY_BOUND_MS: u64 = 2500;

/// A window of the liveness check: since when; the member whose fault began it (if
/// one did) and the member out now; the bricks that were down, paused or cut off at
/// some moment in it (the check leaves them out); when the cluster first served in it;
/// whether its deadline has passed.
pub(crate) struct Window {
    began: Option<usize>,
    faulty: Option<usize>,
    since: Micros,
    bricks_out: Vec<bool>,
    served: Option<Micros>,
    checked: bool,
}


/// A replica's committed value of a key, if it holds one.
type Held<'a> = Option<std::borrow::Cow<'a, [u8]>>;
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
            let replicas: Vec<(crate::map::BrickId, &super::brick::SimBrick, Held<'_>, bool)> =
                group.iter().filter_map(|&id| self.bricks.iter().find(|b| b.id == Some(id) && b.is_up()).and_then(|b| b.lookup(&key).map(|(v, prepared)| (id, b, v, prepared)))).collect();
            if replicas.iter().any(|r| r.3) {
                continue;
            }
            let mut first: Option<(crate::map::BrickId, Held<'_>)> = None;
            for (id, brick, value, _) in replicas {
                let holds = map.is_readable(p, id) || copied.iter().any(|&(q, t, life)| q == p && t == id && life == brick.life);
                if !brick.serving() || !holds {
                    continue;
                }
                match first {
                    None => first = Some((id, value)),
                    Some((other, ref v)) if *v != value => {
                        let show = |v: &Held<'_>| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned());
                        return self.fail(format!("{} of partition {p}: {other} holds {:?} and {id} holds {:?}, with no write prepared", String::from_utf8_lossy(&key), show(v), show(&value)));
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// The liveness check's condition: the member out (down, paused or cut off from
    /// the other members), if one is, while at most one is out in a group of three or
    /// five (the voters any member up counts), the rest are up, running and connected to each other, and no partition is
    /// on (`None` otherwise). Faults of bricks (crashes, pauses, being cut off from the
    /// members with an isolated leader) only take those bricks out of the check; link
    /// resets and client pauses go on (neither keeps a leader from being elected or a
    /// brick from its lease).
    fn members_clean(&self) -> Option<Option<usize>> {
        if self.net.partitioned(self.now) {
            return None;
        }
        let isolated = self.net.isolation.as_ref().map(|i| i.member);
        // The group is the voters its members have committed (members come and go:
        // `World::change_step`): every one that any member up still counts.
        let mut voters: Vec<usize> = self.members.iter().filter_map(|sm| sm.member.as_ref()).flat_map(|x| x.members().members).map(|(id, _)| id as usize - 1).collect();
        voters.sort_unstable();
        voters.dedup();
        let mut out = voters.iter().copied().filter(|&m| !self.members[m].is_up() || self.members[m].paused_until > self.now || isolated == Some(m));
        let first = out.next();
        (out.next().is_none() && (first.is_none() || voters.len() >= 3)).then_some(first)
    }

    /// Whether the cluster serves: a member other than `faulty` leads and answers for
    /// the group (a majority answered it within `LEADER_LEASE_MS`), and every brick not
    /// in `out` holds a lease and asks a member other than `faulty`; or why not.
    fn serves(&self, faulty: Option<usize>, out: &[bool]) -> Result<(), String> {
        let now_ms = self.now_ms();
        let leads = (0..self.members.len()).any(|m| Some(m) != faulty && self.members[m].member.as_ref().is_some_and(|x| x.answers(now_ms)));
        let unleased: Vec<String> = (0..self.bricks.len())
            .filter(|&b| !out[b] && (!self.bricks[b].leased(now_ms) || self.bricks[b].asks() == faulty))
            .map(|b| format!("brick {b} ({}, asks member {:?})", self.bricks[b].state_name(), self.bricks[b].asks()))
            .collect();
        if !leads {
            let roles: Vec<String> = self.members.iter().enumerate().map(|(m, sm)| match &sm.member {
                Some(x) => format!("member {m}: term {}, leader id {}{}", x.term(), x.leader(), if x.is_leader() { ", leading without a majority's answer" } else { "" }),
                None => format!("member {m}: down"),
            }).collect();
            return Err(format!("no member answers for the group ({}); bricks without a lease: {unleased:?}", roles.join("; ")));
        }
        match unleased.is_empty() {
            true => Ok(()),
            false => Err(format!("a member answers for the group, but these bricks hold no lease or ask the member out: {}", unleased.join(", "))),
        }
    }

    /// The liveness check, after every event. A window begins when the run becomes
    /// clean (`members_clean`: at most one member out, no partition) or, while it is, a
    /// member goes out; it goes on when that member comes back, and ends at anything
    /// that makes the run unclean. If it is still on `RECOVERY_BOUND_MS` after it began
    /// (`recovery_deadline`), the cluster must serve then (`serves`): a member other
    /// than the one out leads and answers for the group, and every brick that was up,
    /// running and not cut off throughout the window holds a lease and asks a member
    /// other than the one out. Until then, this notes when it first served (how long
    /// recovery took).
    pub(crate) fn recovery_step(&mut self) {
        let Some(faulty) = self.members_clean() else {
            self.recovery = None;
            return;
        };
        if self.recovery.as_ref().is_none_or(|w| faulty.is_some() && w.faulty != faulty) {
            // Before the first map, which waits for every brick to register, one brick
            // out keeps the rest from serving: bricks are checked in windows that begin
            // with a map.
            let bricks_out = vec![self.published().is_none(); self.bricks.len()];
            self.recovery = Some(Window { began: faulty, faulty, since: self.now, bricks_out, served: None, checked: false });
            self.after(RECOVERY_BOUND_MS * MS, Event::RecoveryDeadline { since: self.now });
        }
        let cut_off = self.net.isolation.as_ref().map_or(&[][..], |i| &i.only_it[..]);
        let mut out = std::mem::take(&mut self.recovery.as_mut().expect("just set").bricks_out);
        for (b, brick) in self.bricks.iter().enumerate() {
            out[b] |= !brick.is_up() || brick.paused_until > self.now || cut_off.contains(&b);
        }
        let first = self.recovery.as_ref().is_some_and(|w| w.served.is_none()) && self.serves(faulty, &out).is_ok();
        let w = self.recovery.as_mut().expect("just set");
        w.faulty = faulty;
        w.bricks_out = out;
        if first {
            w.served = Some(self.now);
        }
    }

    /// The window that began at `since`, if it is still on, must serve now.
    pub(crate) fn recovery_deadline(&mut self, since: Micros) {
        let Some(w) = self.recovery.as_mut().filter(|w| w.since == since && !w.checked) else { return };
        w.checked = true;
        let (began, faulty, served, out) = (w.began, w.faulty, w.served, w.bricks_out.clone());
        if let Err(why) = self.serves(faulty, &out) {
            let fault = match began {
                Some(m) => format!("member {m} out, and no other member"),
                None => "no member out".to_string(),
            };
            let out: Vec<usize> = (0..out.len()).filter(|&b| out[b]).collect();
            return self.fail(format!(
                "seed {}: the cluster does not serve {RECOVERY_BOUND_MS} ms into a clean window ({fault}, no partition, from {:.3} ms to now, {:.3} ms; bricks left out: {out:?}): {why}",
                self.seed,
                since as f64 / 1000.0,
                self.now as f64 / 1000.0
            ));
        }
        let took = served.unwrap_or(self.now) - since;
        self.recoveries.0[0] += 1;
        self.recoveries.0[1] += began.is_some() as u64;
        self.recoveries.1 = self.recoveries.1.max(took);
        if let Some(m) = began {
            self.note(format!("served {} ms into a window that member {m}'s fault began", took / MS));
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
        // Space is given back: once quiet, a brick holds keys only of partitions it is a
        // replica of, so the keys over all bricks are keys x replicas.
        for brick in self.bricks.iter().filter(|b| b.serving()) {
            if let Some((me, n, p)) = brick.stray_keys() {
                return Err(format!("{me} still holds {n} keys of partitions it left (partition {p} among them)"));
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
