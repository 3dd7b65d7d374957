//! The deterministic simulator: a whole cluster (the map authority, bricks, clients) in
//! one thread, with a simulated network, disk and clock, all drawn from one seed. It
//! drives the same protocol code the `dds` binary runs: `Shard` (the brick's storage
//! and 2PC participant), `Authority` (maps, failures, recovery plans), `ClientCore`
//! (routing and the 2PC coordinator), the log record codec and replay. What it models
//! around them (the core loop's rounds and group commit, the heartbeat lease, the copy
//! driver) follows the real loops step by step; ARCHITECTURE.md lists the differences.
//!
//! A run: start the cluster, run the clients' workload while faults are injected, then
//! stop the faults, restart every brick, wait until the cluster is quiet (full strength,
//! nothing copying, nothing prepared), read every key, and check. After every core
//! round, replicas agree on every key nobody holds a prepared write for
//! (`check_replicas`); after every event, a cluster with at most one authority member
//! out and no other fault of the members serves again within a bound
//! (`recovery_step`); at the end:
//! - every key's history is linearizable (`crate::check`);
//! - every live replica of a partition holds the same entries, and they are what the
//!   final reads returned (so every acknowledged write that the history says survived
//!   is on every replica);
//! - the maps the authority published only grow in epoch, pass their invariants, and
//!   leave no partition without a readable replica on a live brick at the end.
//!
//! The same seed gives the same run: everything random comes from one `SmallRng`, time
//! is simulated, events at one instant run in insertion order, and protocol hash maps
//! use fixed keys in this build (`crate::hash`). `Report::digest` proves it.

mod authority;
mod brick;
mod checks;
mod client;
mod copy;
mod net;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::brick::Durability;
use crate::map::{BrickId, ClusterMap};
use crate::meta::authority::AuthorityConfig;
use crate::mutation::Mutation;

use authority::SimMember;
use brick::SimBrick;
use client::SimClient;
use net::{Endpoint, LinkId, Msg, Net};

/// Simulated time in microseconds since the start of the run.
pub type Micros = u64;

pub const MS: Micros = 1000;

/// How a run is set up besides its seed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Allow network partitions (beyond the design's assumptions: see ARCHITECTURE.md).
    pub partitions: bool,
    /// Let frames within one connection come twice or out of order (beyond what TCP
    /// allows, which the protocol relies on).
    pub raw_network: bool,
    /// A planted protocol bug the checkers must catch.
    pub mutation: Option<Mutation>,
    /// Print every fault and map change as it happens.
    pub trace: bool,
    /// Print every request on this key (with `trace`).
    pub watch: Option<String>,
    /// When bricks acknowledge writes. Under `memory` a crash is never a power loss:
    /// the mode promises to survive a process crash, not a machine's.
    pub durability: Durability,
}

/// What one seed did.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Client operations recorded in the history (final reads included).
    pub ops: usize,
    pub events: u64,
    /// A hash of the histories, the maps and the final contents: equal for equal runs.
    pub digest: u64,
    /// One line on the cluster and the faults drawn for this seed.
    pub shape: String,
    /// Why the run failed a check, if it did.
    pub failure: Option<String>,
    /// Client operations that succeeded, ended `Unknown`, or failed: what the faults
    /// cost in availability (the checks are about safety).
    pub outcomes: [u64; 3],
    /// How many windows the liveness check checked, and how many of them a member's
    /// fault began; the longest any took to serve (`checks::RECOVERY_BOUND_MS` bounds it).
    pub recoveries: [u64; 2],
    pub slowest_recovery_ms: u64,
}

/// The cluster's shape and fault rates, drawn per seed (swarm testing: each seed turns
/// some faults off and others up, so rare combinations get tried).
#[derive(Clone, Debug)]
pub struct Shape {
    pub bricks: usize,
    pub replicas: usize,
    pub cores: usize,
    pub base_bits: u8,
    pub clients: usize,
    pub ops_per_client: usize,
    pub depth: usize,
    pub keys: usize,
    /// Network: one-way delay and jitter, and the chance a message resets its link.
    pub delay_us: Micros,
    pub jitter_us: Micros,
    pub reset_p: f64,
    /// Mean time between node faults (crash, pause, restart); 0: none.
    pub fault_every_ms: u64,
    pub pause_max_ms: u64,
    /// Chance that a pause lasts past the authority's removal timeout: the brick comes
    /// back to find its partitions served by others (the stale-read case).
    pub pause_past_removal_p: f64,
    /// Every node fault is a pause (no crashes) of brick 0: paused past its removal, it
    /// is removed (no other fault holds its partitions' last replica).
    pub pauses_only: bool,
    /// How long clients wait on a brick before they suspect it and go elsewhere: long
    /// waits keep requests queued to a paused brick until it resumes.
    pub suspect_after_ms: u64,
    /// The last client only reads, seconds apart: idle through a map change, it routes
    /// by the map it had (the reads a brick paused past its removal must refuse).
    pub idle_reader: bool,
    /// A crash is a power loss (un-synced writes lost, the tail torn) with this chance;
    /// otherwise a process crash (the kernel keeps what was written).
    pub power_loss_p: f64,
    /// A power loss takes every brick at once (a rack or a building) with this chance:
    /// only what each replica synced survives, so a reply sent before its sync shows.
    pub outage_p: f64,
    /// Disk: latency of a write and of a sync, and the chance each fails.
    pub write_us: Micros,
    pub sync_us: Micros,
    pub sync_error_p: f64,
    pub disk_full_p: f64,
    /// Chance that a restart reads a corrupt byte in the middle of the log.
    pub read_corrupt_p: f64,
    /// A core's log segment that reaches this size starts a checkpoint (and a new
    /// segment): small, so that runs go through checkpoints.
    pub checkpoint_log_bytes: u64,
    /// A restarted brick listens on the ports it had, as `dds cluster restart` starts it
    /// (otherwise on new ones, as a brick started by hand on port 0).
    pub same_ports: bool,
    /// Chance of a network partition per fault (only with `Options::partitions`).
    pub partition_p: f64,
    pub durability: Durability,
    /// Members of the map authority's raft group (1, 3 or 5), drawn from a generator of
    /// their own (`member_rng`).
    pub members: usize,
    /// The authority's wait before it copies a removed brick's partitions elsewhere:
    /// `REREPLICATE_AFTER_MS`, or (a seed in four) shorter than many crashes last, so
    /// that bricks return after a very long absence, as it were (drawn from a generator
    /// of its own, so that every other draw of a seed stays as it was).
    pub rereplicate_after_ms: u64,
    /// Where the bricks keep values: in memory, or (a seed in two) in the log with a
    /// cache of 0, 512 B or 1 MiB, so reads go to the simulated disk (drawn from a
    /// generator of its own).
    pub values: crate::brick::ValuesIn,
    /// How long a read of a value from the log takes (values in the log).
    pub read_us: Micros,
}

impl Shape {
    fn draw(rng: &mut SmallRng, options: &Options) -> Shape {
        let bricks = rng.random_range(2..=4);
        let replicas = if rng.random_bool(0.25) { 1 } else { rng.random_range(2..=bricks.min(3)) };
        let pick = |rng: &mut SmallRng, choices: &[f64]| choices[rng.random_range(0..choices.len())];
        // The stale-read case as a fault-injection harness found it: pauses alone, some
        // past the brick's removal, and a reader idle through the map change.
        let pauses_only = rng.random_bool(0.25);
        Shape {
            bricks,
            replicas,
            cores: rng.random_range(1..=2),
            base_bits: rng.random_range(2..=4),
            clients: rng.random_range(2..=4),
            ops_per_client: rng.random_range(30..=150),
            depth: rng.random_range(1..=3),
            keys: rng.random_range(3..=8),
            delay_us: rng.random_range(20..=300),
            jitter_us: pick(rng, &[0.0, 100.0, 2000.0]) as Micros,
            reset_p: pick(rng, &[0.0, 0.001, 0.01]),
            fault_every_ms: if pauses_only { 1000 } else { pick(rng, &[0.0, 300.0, 1000.0]) as u64 },
            pause_max_ms: pick(rng, &[100.0, 800.0, 3000.0]) as u64,
            pause_past_removal_p: if pauses_only { 0.5 } else { pick(rng, &[0.0, 0.5]) },
            pauses_only,
            suspect_after_ms: pick(rng, if pauses_only { &[2000.0, 10_000.0] } else { &[300.0, 2000.0, 10_000.0] }) as u64,
            idle_reader: pauses_only || rng.random_bool(0.25),
            power_loss_p: if options.durability == Durability::Memory { 0.0 } else { pick(rng, &[0.0, 0.5, 1.0]) },
            outage_p: pick(rng, &[0.0, 0.3]),
            write_us: rng.random_range(5..=100),
            sync_us: pick(rng, &[20.0, 200.0, 2000.0]) as Micros,
            sync_error_p: pick(rng, &[0.0, 0.0, 0.002]),
            disk_full_p: pick(rng, &[0.0, 0.0, 0.001]),
            // A corrupt log stops its brick for good; with one replica that loses the
            // partitions it held (documented), so only replicated runs draw it.
            read_corrupt_p: if replicas > 1 { pick(rng, &[0.0, 0.2]) } else { 0.0 },
            partition_p: if options.partitions { 0.3 } else { 0.0 },
            durability: options.durability,
            checkpoint_log_bytes: pick(rng, &[4096.0, 32768.0, 1048576.0]) as u64,
            same_ports: rng.random_bool(0.5),
            members: 1,
            rereplicate_after_ms: crate::meta::authority::REREPLICATE_AFTER_MS,
            values: crate::brick::ValuesIn::Memory,
            read_us: 0,
        }
    }

    fn line(&self) -> String {
        format!(
            "{} bricks x {} cores, {} replicas, base bits {}; {} clients x {} ops (depth {}) on {} keys; net {}+{} us, reset {}; faults every {} ms (pauses to {} ms, past removal {}, pauses only {}, power loss {}, outage {}); clients suspect after {} ms, idle reader {}; disk write {} us, sync {} us, sync error {}, full {}, corrupt read {}, checkpoint at {} B; same ports on restart {}; partitions {}; durability {:?}; authority members {}; re-replication after {} ms; values {:?}, read {} us",
            self.bricks, self.cores, self.replicas, self.base_bits, self.clients, self.ops_per_client, self.depth, self.keys,
            self.delay_us, self.jitter_us, self.reset_p, self.fault_every_ms, self.pause_max_ms, self.pause_past_removal_p, self.pauses_only, self.power_loss_p, self.outage_p, self.suspect_after_ms, self.idle_reader,
            self.write_us, self.sync_us, self.sync_error_p, self.disk_full_p, self.read_corrupt_p, self.checkpoint_log_bytes, self.same_ports, self.partition_p,
            self.durability,
            self.members,
            self.rereplicate_after_ms,
            self.values,
            self.read_us
        )
    }
}

/// Something due at a time.
#[derive(Debug)]
enum Event {
    /// A message arrives at the end of its link.
    Deliver { link: LinkId, to: Endpoint, msg: Msg },
    /// A link broke: tell this end.
    LinkDown { link: LinkId, to: Endpoint },
    /// An authority member's clock tick (every `member::TICK_MS`, as `dds meta`).
    MemberTick { member: usize, life: u64 },
    RestartMember { member: usize },
    /// The copy driver's next step (of the member that drives it).
    CopyStep { member: usize },
    /// A brick's lease timer: its next beat, or its call's timeout (incarnation-tagged:
    /// a dead brick's timers are void).
    Lease { brick: usize, life: u64 },
    /// A brick core's loop round, or the end of its disk I/O.
    CoreRound { brick: usize, life: u64, core: usize },
    CoreTick { brick: usize, life: u64, core: usize },
    DiskDone { brick: usize, life: u64, core: usize },
    /// A read of a value from a core's log (a get that missed the cache) completes.
    ReadDone { brick: usize, life: u64, core: usize, read: crate::brick::ValueRead },
    Restart { brick: usize },
    /// A brick's process dies (`crash_later`).
    Crash { brick: usize, life: u64 },
    /// A crash of incarnation `life` that comes back at once (a joining brick mid-copy).
    CrashBack { brick: usize, life: u64 },
    ClientWake { client: usize },
    Fault,
    HealPartition,
    /// A member's isolation ends (`World::isolate`).
    HealIsolation,
    /// A clean window that began at `since` is `RECOVERY_BOUND_MS` old (`checks.rs`).
    RecoveryDeadline { since: Micros },
    EndFaults,
    QuietCheck,
}

/// Time to run the workload under faults; then faults stop and the cluster settles.
const FAULTS_FOR_MS: u64 = 8_000;
/// How long the cluster may take to become quiet once faults stop.
const SETTLE_MAX_MS: u64 = 60_000;
/// Events one run may take; a run that needs more is stuck in a loop (a failure).
const EVENTS_MAX: u64 = 20_000_000;

pub(crate) struct World {
    now: Micros,
    /// A real instant standing for time zero, for code that counts in `Instant`s.
    epoch_instant: Instant,
    seq: u64,
    queue: BTreeMap<(Micros, u64), Event>,
    rng: SmallRng,
    shape: Shape,
    options: Options,
    net: Net,
    /// The map authority's members (`authority.rs`).
    members: Vec<SimMember>,
    /// Draws the members' faults (and their number), apart from `rng`.
    member_rng: SmallRng,
    /// The membership change under way (`authority.rs`), and the members that joined
    /// later: (index, the group their log begins from, the members the leader named).
    change: Option<authority::Change>,
    #[allow(clippy::type_complexity)]
    joined: Vec<(usize, Vec<(u64, std::net::SocketAddr)>, Vec<(u64, std::net::SocketAddr)>)>,
    seed: u64,
    /// Every map the group published, in epoch order.
    maps: Vec<ClusterMap>,
    /// The leader of each term seen, and each member's last published epoch.
    leaders: BTreeMap<u64, usize>,
    member_epochs: BTreeMap<usize, u64>,
    bricks: Vec<SimBrick>,
    clients: Vec<SimClient>,
    faults_on: bool,
    /// A power outage waits for its worst moment (`outage_check`).
    outage_armed: bool,
    /// The key of the last write a client saw acknowledged (the idle reader reads it).
    last_written: Option<Vec<u8>>,
    /// Set when a check fails during the run.
    failure: Option<String>,
    /// The liveness check's window (`checks.rs`); how many windows it checked (and how
    /// many of them a member's fault began), and the longest any took to serve.
    recovery: Option<checks::Window>,
    recoveries: ([u64; 2], Micros),
    trace: Vec<String>,
    events: u64,
    next_client_id: u64,
}

impl World {
    fn schedule(&mut self, at: Micros, event: Event) {
        debug_assert!(at >= self.now);
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    fn after(&mut self, delay: Micros, event: Event) {
        self.schedule(self.now + delay, event);
    }

    pub(crate) fn instant(&self) -> Instant {
        self.epoch_instant + Duration::from_micros(self.now)
    }

    fn now_ms(&self) -> u64 {
        self.now / MS
    }

    fn note(&mut self, what: String) {
        if self.options.trace {
            eprintln!("[{:>9.3} ms] {what}", self.now as f64 / 1000.0);
        }
        if self.trace.len() < 10_000 {
            self.trace.push(format!("{} {what}", self.now));
        }
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.note(format!("FAILED: {why}"));
            self.failure = Some(why);
        }
    }

    fn authority_config(&self) -> AuthorityConfig {
        AuthorityConfig {
            bricks: self.shape.bricks,
            replicas: self.shape.replicas,
            base_bits: self.shape.base_bits,
            rereplicate_after_ms: self.shape.rereplicate_after_ms,
        }
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Deliver { link, to, msg } => {
                if !self.net.alive(link) {
                    return;
                }
                match to {
                    Endpoint::Member(m) => self.member_receive(m, link, msg),
                    Endpoint::Brick(b) => self.brick_receive(b, link, msg),
                    Endpoint::Client(c) => {
                        if let Some(at) = self.client_paused(c) {
                            return self.schedule(at, Event::Deliver { link, to, msg });
                        }
                        self.client_receive(c, link, msg);
                        self.outage_check();
                    }
                }
            }
            Event::LinkDown { link, to } => match to {
                Endpoint::Member(m) => self.member_link_down(m, link),
                Endpoint::Brick(b) => self.brick_link_down(b, link),
                Endpoint::Client(c) => match self.client_paused(c) {
                    Some(at) => self.schedule(at, Event::LinkDown { link, to }),
                    None => self.client_link_down(c, link),
                },
            },
            Event::MemberTick { member, life } => self.member_tick(member, life),
            Event::RestartMember { member } => self.restart_member(member),
            Event::CopyStep { member } => self.copy_step(member),
            Event::Lease { brick, life } => self.lease_timer(brick, life),
            Event::CoreRound { brick, life, core } => self.core_round(brick, life, core),
            Event::CoreTick { brick, life, core } => self.core_tick(brick, life, core),
            Event::DiskDone { brick, life, core } => self.disk_done(brick, life, core),
            Event::ReadDone { brick, life, core, read } => self.read_done(brick, life, core, read),
            Event::Restart { brick } => self.restart(brick),
            Event::Crash { brick, life } => self.crash_later(brick, life),
            Event::CrashBack { brick, life } => self.crash_back(brick, life),
            Event::ClientWake { client } => match self.client_paused(client) {
                Some(at) => self.schedule(at, Event::ClientWake { client }),
                None => self.client_wake(client),
            },
            Event::Fault => self.fault(),
            Event::HealPartition => {
                self.net.heal();
                self.note("network partition healed".into());
            }
            Event::HealIsolation => {
                if let Some(i) = self.net.isolation.take() {
                    self.note(format!("member {}'s isolation healed", i.member));
                }
            }
            Event::RecoveryDeadline { since } => self.recovery_deadline(since),
            Event::EndFaults => self.end_faults(),
            Event::QuietCheck => self.quiet_check(),
        }
    }

    /// One fault, then the next one's time.
    fn fault(&mut self) {
        if !self.faults_on {
            return;
        }
        if self.members.len() > 1 && self.member_rng.random_bool(0.25) {
            self.member_fault();
            let next = self.member_rng.random_range(50..=600);
            return self.after(next * MS, Event::Fault);
        }
        // Pauses alone strike one brick, so the rest can take its partitions over.
        let b = if self.shape.pauses_only { 0 } else { self.rng.random_range(0..self.bricks.len()) };
        let roll: f64 = self.rng.random();
        if roll < self.shape.partition_p {
            // Some bricks, and maybe the map authority, apart from the rest (clients
            // stay with the rest): messages across wait until it heals, as TCP's
            // retransmissions would deliver them.
            let side: Vec<usize> = (0..self.bricks.len()).filter(|_| self.rng.random_bool(0.5)).collect();
            let authority = self.rng.random_bool(0.3);
            let heal_ms = self.rng.random_range(100..=3000);
            self.note(format!("network partition: bricks {side:?}{} apart from the rest for {heal_ms} ms", if authority { " and the authority" } else { "" }));
            self.set_partition(&side, authority, self.now + heal_ms * MS);
            self.after(heal_ms * MS, Event::HealPartition);
        } else if !self.bricks[b].is_up() {
            self.restart(b);
        } else if roll < 0.1 && !self.shape.pauses_only {
            // A client process stops (a GC pause, a stalled VM) with its transactions
            // half done: prepared writes wait for its decision, or for their peers.
            let c = self.rng.random_range(0..self.clients.len());
            let ms = self.rng.random_range(10..=800);
            self.note(format!("client {c} pauses for {ms} ms"));
            self.clients[c].paused_until = self.clients[c].paused_until.max(self.now + ms * MS);
        } else if roll < 0.6 && !self.shape.pauses_only {
            let power_loss = self.rng.random_bool(self.shape.power_loss_p);
            if power_loss && self.rng.random_bool(self.shape.outage_p) {
                self.outage_armed = true;
            } else {
                self.crash(b, if power_loss { "power loss" } else { "process crash" }, power_loss);
                // Often a supervisor restarts it at once: back before the authority's
                // removal, it keeps its id, and what was sent to it meanwhile is lost.
                let down_ms = if self.rng.random_bool(0.4) { self.rng.random_range(20..=400) } else { self.rng.random_range(50..=4000) };
                self.after(down_ms * MS, Event::Restart { brick: b });
            }
        } else {
            let removal_ms = crate::proto::BRICK_TIMEOUT_MS;
            let ms = if self.rng.random_bool(self.shape.pause_past_removal_p) {
                self.rng.random_range(removal_ms..=removal_ms + 1500)
            } else {
                self.rng.random_range(10..=self.shape.pause_max_ms)
            };
            self.pause(b, ms * MS);
        }
        let every = self.shape.fault_every_ms;
        let next = self.rng.random_range(every / 2..=every * 3 / 2).max(1);
        self.after(next * MS, Event::Fault);
    }

    /// When paused client `c` resumes, if it is paused now.
    fn client_paused(&self, c: usize) -> Option<Micros> {
        let until = self.clients[c].paused_until;
        (until > self.now).then_some(until)
    }

    /// An armed outage strikes every brick at the worst moment: just as a client has an
    /// answer while some brick holds log bytes it has not synced.
    fn outage_check(&mut self) {
        if !self.outage_armed || !self.faults_on || !self.bricks.iter().any(|b| b.is_up() && b.unsynced()) {
            return;
        }
        self.outage_armed = false;
        for b in 0..self.bricks.len() {
            self.crash(b, "power outage (every brick)", true);
            let down_ms = self.rng.random_range(50..=4000);
            self.after(down_ms * MS, Event::Restart { brick: b });
        }
    }

    fn end_faults(&mut self) {
        self.faults_on = false;
        self.net.heal();
        self.net.isolation = None;
        self.net.reset_p = 0.0;
        self.note("faults stop; every brick restarts".into());
        for m in 0..self.members.len() {
            if !self.members[m].is_up() && !self.members[m].retired {
                self.members[m].down_until = 0;
                self.restart_member(m);
            }
        }
        for b in 0..self.bricks.len() {
            // A pause runs its course: what waits for the brick's threads comes when it
            // resumes (`quiet` waits for that); cutting it short here left events
            // deferred to its old end, so a write queued to a paused brick could land
            // after the final reads had been taken as the last word.
            if !self.bricks[b].is_up() {
                self.restart(b);
            }
        }
        self.after(100 * MS, Event::QuietCheck);
    }

    /// Whether the cluster has settled: every brick up and in the map, every partition
    /// at full strength with nothing joining or leaving, nothing prepared, no client
    /// operation open.
    fn quiet(&self) -> bool {
        let Some(map) = self.leader().and_then(|l| self.members[l].member.as_ref()?.published()) else { return false };
        let up: Vec<BrickId> = self.bricks.iter().filter(|b| b.serving()).filter_map(|b| b.id).collect();
        let want = self.shape.replicas.min(up.len());
        // Past every pause, and what a resumed thread does first (`deferred`).
        let resumed = self.bricks.iter().all(|b| b.paused_until + 200 * MS <= self.now);
        self.members.iter().filter(|m| !m.retired).all(|m| m.is_up() && m.copy.is_none() && m.paused_until <= self.now)
            && resumed
            && up.len() == self.bricks.len()
            && up.iter().all(|b| map.bricks().contains_key(b))
            && map.bricks().len() == up.len()
            && map.joining().is_empty()
            && map.leaving().is_empty()
            && map.groups().values().all(|g| g.len() == want)
            && self.bricks.iter().all(|b| b.settled(map.epoch()))
            && self.clients.iter().all(|c| c.idle())
    }

    fn quiet_check(&mut self) {
        if self.quiet() {
            self.note("quiet: final reads".into());
            self.final_reads();
            return;
        }
        if self.now > (FAULTS_FOR_MS + SETTLE_MAX_MS) * MS {
            let why = self.unsettled();
            self.fail(format!("the cluster did not settle within {SETTLE_MAX_MS} ms after the faults stopped: {why}"));
            return;
        }
        self.after(100 * MS, Event::QuietCheck);
    }

    fn unsettled(&self) -> String {
        let Some(map) = self.published() else { return "no map".into() };
        let mut why = Vec::new();
        for b in &self.bricks {
            if !b.serving() {
                why.push(format!("brick {:?} not serving ({})", b.id, b.state_name()));
            } else if !b.settled(map.epoch()) {
                why.push(format!("brick {:?} unsettled ({})", b.id, b.unsettled(map.epoch())));
            }
        }
        if self.members.iter().any(|m| m.copy.is_some()) {
            why.push("a copy is running".into());
        }
        let down = self.members.iter().filter(|m| !m.is_up()).count();
        match self.leader() {
            Some(l) => why.push(format!("member {l} leads ({down} of {} members down)", self.members.len())),
            None => why.push(format!("no leader ({down} of {} members down)", self.members.len())),
        }
        if !map.joining().is_empty() || !map.leaving().is_empty() {
            why.push(format!("joining {:?} leaving {:?}", map.joining().len(), map.leaving().len()));
        }
        for c in &self.clients {
            if !c.idle() {
                why.push(format!("client {} has {} operations open", c.id, c.core.in_flight()));
            }
        }
        why.push(format!("epoch {}, {} bricks in the map", map.epoch(), map.bricks().len()));
        why.join("; ")
    }

    fn run_to_end(&mut self) {
        while let Some(((at, _), event)) = self.queue.pop_first() {
            debug_assert!(at >= self.now, "time goes forward");
            self.now = at;
            self.events += 1;
            if self.events > EVENTS_MAX {
                self.fail(format!("more than {EVENTS_MAX} events: the run does not end"));
            }
            if self.failure.is_some() {
                return;
            }
            self.dispatch(event);
            self.recovery_step();
            // Done once the final reads are in and the cluster is quiet again (a move
            // the authority planned meanwhile has finished), so replicas can be compared.
            if self.clients.iter().all(|c| c.finished_final()) {
                if self.quiet() {
                    return;
                }
                if self.now > (FAULTS_FOR_MS + SETTLE_MAX_MS) * MS {
                    let why = self.unsettled();
                    return self.fail(format!("the cluster did not settle again after the final reads: {why}"));
                }
            }
        }
        if self.failure.is_none() && !self.clients.iter().all(|c| c.finished_final()) {
            self.fail("the simulation ran out of events before the final reads".into());
        }
    }
}

/// Runs one seed.
pub fn run(seed: u64, options: &Options) -> Report {
    crate::logging::set_quiet(!options.trace);
    crate::mutation::plant(options.mutation);
    let mut rng = SmallRng::seed_from_u64(seed);
    let shape = Shape::draw(&mut rng, options);
    let mut shape = shape;
    let mut member_rng = SmallRng::seed_from_u64(seed ^ 0x6d65_6d62_6572_7321);
    shape.members = [1, 1, 3, 3, 5][member_rng.random_range(0..5)];
    let mut absence_rng = SmallRng::seed_from_u64(seed ^ 0x6162_7365_6e63_6521);
    if absence_rng.random_bool(0.25) {
        shape.rereplicate_after_ms = absence_rng.random_range(200..=2000);
    }
    let mut values_rng = SmallRng::seed_from_u64(seed ^ 0x7661_6c75_6573_2121);
    if values_rng.random_bool(0.5) {
        shape.values = crate::brick::ValuesIn::Log { cache_bytes: [0, 512, 1 << 20][values_rng.random_range(0..3)] };
        shape.read_us = [20, 200, 2000][values_rng.random_range(0..3)];
    }
    let mut world = World {
        now: 0,
        epoch_instant: Instant::now(),
        seq: 0,
        queue: BTreeMap::new(),
        net: Net::new(shape.delay_us, shape.jitter_us, shape.reset_p),
        rng,
        options: options.clone(),
        members: (0..shape.members).map(|_| SimMember::new(shape.members)).collect(),
        change: None,
        joined: Vec::new(),
        member_rng,
        seed,
        maps: Vec::new(),
        leaders: BTreeMap::new(),
        member_epochs: BTreeMap::new(),
        bricks: (0..shape.bricks).map(|_| SimBrick::new(shape.cores, shape.members)).collect(),
        clients: Vec::new(),
        faults_on: true,
        outage_armed: false,
        last_written: None,
        failure: None,
        recovery: None,
        recoveries: ([0, 0], 0),
        trace: Vec::new(),
        events: 0,
        next_client_id: 1,
        shape,
    };
    world.note(format!("seed {seed}: {}", world.shape.line()));
    for b in 0..world.shape.bricks {
        world.start_brick(b);
    }
    for m in 0..world.shape.members {
        let config = world.authority_config();
        world.start_member(m, config);
    }
    for c in 0..world.shape.clients {
        world.add_client(c);
    }
    if world.shape.fault_every_ms > 0 {
        let first = world.rng.random_range(100..=1000);
        world.after(first * MS, Event::Fault);
    }
    world.after(FAULTS_FOR_MS * MS, Event::EndFaults);
    world.run_to_end();
    if world.failure.is_none() {
        if let Err(why) = world.check_end() {
            world.fail(why);
        }
    }
    let ops = world.clients.iter().map(|c| c.history.len()).sum();
    let mut outcomes = [0; 3];
    for c in &world.clients {
        for (total, n) in outcomes.iter_mut().zip(c.outcomes) {
            *total += n;
        }
    }
    let (recoveries, slowest_recovery_ms) = (world.recoveries.0, world.recoveries.1 / MS);
    Report { seed, ops, events: world.events, digest: world.digest(), shape: world.shape.line(), failure: world.failure.take(), outcomes, recoveries, slowest_recovery_ms }
}

/// The core address of `brick` for `core`, on the ports of its `life`-th incarnation
/// (0 for every incarnation when restarts keep their ports).
pub(crate) fn core_addr(brick: usize, life: u64, core: usize) -> SocketAddr {
    let port = 10_000 + (life as u16 % 1000) * 16 + core as u16;
    SocketAddr::from(([10, 0, 1, brick as u8 + 1], port))
}

/// Which brick, incarnation and core listen at `addr`.
pub(crate) fn addr_core(addr: SocketAddr) -> Option<(usize, u64, usize)> {
    let SocketAddr::V4(v4) = addr else { return None };
    let [10, 0, 1, b] = v4.ip().octets() else { return None };
    let port = v4.port().checked_sub(10_000)?;
    Some((b as usize - 1, (port / 16) as u64, (port % 16) as usize))
}

