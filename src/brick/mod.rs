//! A brick: one worker thread per core, each pinned, each owning its partitions and its
//! own listener, so a request is served start to finish by the core that owns its key.

pub mod control;
mod core_loop;
pub mod lease;
#[cfg(test)]
mod model_tests;
mod reads;
pub mod round;
mod scan;
mod table;
mod shard;
mod storage;
pub mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dds_transport::auth::Secret;
use dds_transport::{MixedTransport, TcpConfig, Transport, TransportError};
use serde::{Deserialize, Serialize};

use crate::map::BrickAddr;
use crate::proto::{BrickInfo, DdsFraming};

pub use round::{Control, CoreRound};
pub use storage::{recover, Storage};
pub use shard::{Effects, Query, Relocated, Shard, ValueRead};
pub use values::ValuesIn;

/// When a write is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After its log record is written and fdatasync'd (group commit): survives a crash
    /// of the process and of the machine.
    #[default]
    Sync,
    /// After it is applied in memory and its record handed to the kernel: survives a
    /// crash of the process, not of the machine. For users who rely on replication.
    Memory,
}

impl Durability {
    /// Its name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Memory => "memory",
        }
    }
}

/// Addresses as a log line shows them: `127.0.0.1:4000, 127.0.0.1:4001`.
fn addr_list(addrs: &[std::net::SocketAddr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

/// `<dir>/layout.json`: the shape a brick's logs were written for. A core's log holds
/// only the partitions that core owns, so a brick must restart with the same shape.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layout {
    pub cores: usize,
    pub partition_bits: u8,
    /// Values are kept in the log (its checkpoints hold locations, not values).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub values_in_log: bool,
}

pub const LAYOUT_FILE: &str = "layout.json";
const LOCK_FILE: &str = "LOCK";

#[derive(Clone, Debug)]
pub struct BrickConfig {
    /// Holds `brick.json` (and, later, the log and checkpoints).
    pub dir: PathBuf,
    /// Core 0 listens here; core `i` on the next ports (or each on a free port if 0).
    pub listen: SocketAddr,
    pub cores: usize,
    pub partition_bits: u8,
    /// After the last request, poll without sleeping for this long before parking.
    pub spin_us: u64,
    /// Never park: for dedicated hardware.
    pub busy_poll: bool,
    /// The CPUs the brick is given: core `i` is pinned to `cpus[i % len]` (and with
    /// `LogIo::Uring` its log's io_uring workers follow it). `None` leaves placement to the kernel, which wins on
    /// a machine the brick shares (see ARCHITECTURE.md, "Placement").
    pub cpus: Option<Vec<usize>>,
    pub durability: Durability,
    /// How each core's log reaches the disk.
    pub log_io: crate::log::LogIo,
    /// One port per core, overriding `listen`'s port (a restart keeps its ports).
    pub ports: Option<Vec<u16>>,
    /// A core's active log segment past this size starts a checkpoint.
    pub checkpoint_log_bytes: u64,
    /// Where values live: beside their keys in memory, or in the log with a cache.
    pub values: ValuesIn,
    /// The map authority's members (any of them: the brick finds the leader); none runs
    /// the brick alone (one brick, one replica).
    pub meta: Vec<SocketAddr>,
    /// The id to ask the authority for (a new brick otherwise gets the next free one).
    pub id: Option<u32>,
    /// Serve RDMA beside TCP (each core on a second, free port) when a verbs device
    /// opens; without one the brick says why in one line and serves TCP only.
    pub rdma: bool,
    /// Serve Prometheus metrics over HTTP here (`/metrics`).
    pub metrics: Option<SocketAddr>,
    /// The cluster's secret: every connection to a core (TCP and RDMA's control
    /// channel) and to the authority proves it first. `None`: open to anyone.
    pub secret: Option<Arc<Secret>>,
}

/// What a running brick writes to `<dir>/brick.json` once every core serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrickFile {
    pub pid: u32,
    pub cores: usize,
    /// The CPU each core is pinned to; absent when the kernel places them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<usize>>,
    pub partition_bits: u8,
    /// One address per core.
    pub addrs: Vec<SocketAddr>,
    /// One RDMA listener per core; empty when the brick serves TCP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rdma: Vec<SocketAddr>,
    /// Where its Prometheus metrics are served, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

pub const BRICK_FILE: &str = "brick.json";

/// The CPU of each of `cores` cores given `cpus` (core `i` on `cpus[i % len]`); `None`
/// when the kernel places them.
fn core_cpus(cores: usize, cpus: Option<&[usize]>) -> Option<Vec<usize>> {
    cpus.filter(|c| !c.is_empty()).map(|c| (0..cores).map(|i| c[i % c.len()]).collect())
}

/// How a brick's cores are placed, for its start-up line.
fn placement_line(core_cpus: Option<&[usize]>) -> String {
    match core_cpus {
        Some(c) => c.iter().enumerate().map(|(i, cpu)| format!("core {i} on CPU {cpu}")).collect::<Vec<_>>().join(", "),
        None => "placement left to the kernel".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrickError {
    #[error("brick: --cores must be at least 1")]
    NoCores,
    #[error("brick: core {core} cannot listen: {source}")]
    Listen {
        core: usize,
        #[source]
        source: TransportError,
    },
    #[error("brick: {op} {path}: {source}")]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("brick: core {core} failed: {source}")]
    Core {
        core: usize,
        #[source]
        source: core_loop::CoreError,
    },
    #[error("brick: {dir} is in use by another brick process")]
    Locked { dir: PathBuf },
    #[error(
        "brick: {dir} holds logs written by {found_cores} core(s) with {found_bits} partition bits; \
         start it with --cores {found_cores} --partition-bits {found_bits} (a brick's logs cannot be re-partitioned)"
    )]
    LayoutMismatch { dir: PathBuf, found_cores: usize, found_bits: u8 },
    #[error(
        "brick: {dir} keeps its values {found}, not {wanted}: start it {hint} (a directory's checkpoints hold either values or their places in the log)"
    )]
    ValuesMismatch { dir: PathBuf, found: &'static str, wanted: &'static str, hint: &'static str },
    #[error("brick: {id} was removed from the cluster (declared dead) while it ran; it stopped. Start it again to rejoin as a new brick")]
    Removed { id: crate::map::BrickId },
    #[error("brick: --ports lists {given} port(s) for {cores} core(s)")]
    Ports { given: usize, cores: usize },
    #[error("brick: {0}")]
    Control(#[from] control::ControlError),
    #[error("brick: {0}")]
    Metrics(String),
    #[error("brick: cannot start the {thread} thread: {source}")]
    Spawn {
        thread: String,
        #[source]
        source: std::io::Error,
    },
    #[error("brick: a thread panicked")]
    Panicked,
}

impl BrickFile {
    pub fn load(dir: &Path) -> Result<BrickFile, BrickError> {
        let path = dir.join(BRICK_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| BrickError::File { op: "read", path: path.clone(), source })?;
        serde_json::from_str(&text).map_err(|e| BrickError::File { op: "parse", path, source: e.into() })
    }

    /// Written by `durable::write_file`, so a reader sees all of it or nothing.
    fn store(&self, dir: &Path) -> Result<(), BrickError> {
        let text = serde_json::to_string_pretty(self).expect("brick file serialises");
        crate::durable::write_file(dir, BRICK_FILE, text.as_bytes())
            .map_err(|source| BrickError::File { op: "store", path: dir.join(BRICK_FILE), source })
    }
}

/// Takes the directory for this process (released when the returned lock drops).
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, BrickError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| BrickError::File { op: "open", path: path.clone(), source })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| BrickError::Locked { dir: dir.to_path_buf() })
}

/// Checks the directory's layout against the configuration, recording it the first time.
fn check_layout(config: &BrickConfig) -> Result<(), BrickError> {
    let path = config.dir.join(LAYOUT_FILE);
    let values_in_log = matches!(config.values, ValuesIn::Log { .. });
    let want = Layout { cores: config.cores, partition_bits: config.partition_bits, values_in_log };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found: Layout = serde_json::from_str(&text)
                .map_err(|e| BrickError::File { op: "parse", path: path.clone(), source: e.into() })?;
            if found.values_in_log != want.values_in_log {
                let (found, wanted, hint) = if found.values_in_log {
                    ("in its log", "in memory", "with --cache-mb")
                } else {
                    ("in memory", "in its log", "without --cache-mb")
                };
                return Err(BrickError::ValuesMismatch { dir: config.dir.clone(), found, wanted, hint });
            }
            if found != want {
                return Err(BrickError::LayoutMismatch {
                    dir: config.dir.clone(),
                    found_cores: found.cores,
                    found_bits: found.partition_bits,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(&want).expect("layout serialises");
            crate::durable::write_file(&config.dir, LAYOUT_FILE, text.as_bytes())
                .map_err(|source| BrickError::File { op: "store", path, source })
        }
        Err(source) => Err(BrickError::File { op: "read", path, source }),
    }
}

/// With `--transport rdma|auto`: opens the verbs device on every core and listens for
/// RDMA on a free port beside each TCP one. Without a usable device, one line says why
/// and the brick serves TCP only (the fallback); a device that opens but cannot listen
/// is an error.
fn listen_rdma(config: &BrickConfig, transports: &mut [MixedTransport<DdsFraming>]) -> Result<Vec<SocketAddr>, BrickError> {
    if !config.rdma {
        return Ok(Vec::new());
    }
    for t in transports.iter_mut() {
        if let Err(why) = t.enable_rdma() {
            crate::log!(warn: "brick", "RDMA unavailable: {why}; serving over TCP only");
            return Ok(Vec::new());
        }
    }
    let mut rdma = Vec::with_capacity(transports.len());
    for (core, t) in transports.iter_mut().enumerate() {
        let addr = SocketAddr::new(config.listen.ip(), 0);
        rdma.push(t.listen_rdma(addr).map_err(|source| BrickError::Listen { core, source })?);
    }
    Ok(rdma)
}

/// Runs a brick until `stop` is set (the binary sets it on SIGTERM or SIGINT).
pub fn run(config: &BrickConfig, stop: Arc<AtomicBool>) -> Result<(), BrickError> {
    use control::Shared;
    if config.cores == 0 {
        return Err(BrickError::NoCores);
    }
    std::fs::create_dir_all(&config.dir)
        .map_err(|source| BrickError::File { op: "create", path: config.dir.clone(), source })?;
    let _lock = lock_dir(&config.dir)?;
    check_layout(config)?;
    if let Some(ports) = &config.ports {
        if ports.len() != config.cores {
            return Err(BrickError::Ports { given: ports.len(), cores: config.cores });
        }
    }
    // Every core binds before any serves, so `Hello` can name all the ports.
    let mut transports = Vec::with_capacity(config.cores);
    let mut addrs = Vec::with_capacity(config.cores);
    for core in 0..config.cores {
        let mut addr = config.listen;
        if let Some(ports) = &config.ports {
            addr.set_port(ports[core]);
        } else if addr.port() != 0 {
            let port = addr.port() as usize + core;
            let port = u16::try_from(port).map_err(|_| BrickError::Listen {
                core,
                source: TransportError::Io { op: "listen", addr, source: std::io::ErrorKind::InvalidInput.into() },
            })?;
            addr.set_port(port);
        }
        let mut transport =
            MixedTransport::new(DdsFraming, TcpConfig { secret: config.secret.clone(), ..TcpConfig::default() }).map_err(|source| BrickError::Listen { core, source })?;
        let bound = transport.listen(addr).map_err(|source| BrickError::Listen { core, source })?;
        transports.push(transport);
        addrs.push(bound);
    }
    let rdma_addrs = listen_rdma(config, &mut transports)?;
    let metrics = match config.metrics {
        Some(addr) => Some(crate::metrics::listen(addr).map_err(|e| BrickError::Metrics(e.to_string()))?),
        None => None,
    };
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    let token = control::load_or_make_token(&config.dir)
        .map_err(|source| BrickError::File { op: "write", path: config.dir.join("token"), source })?;
    let brick_addr = BrickAddr { cores: addrs.clone(), rdma: rdma_addrs.clone(), token };
    let ports: Vec<u16> = addrs.iter().map(|a| a.port()).collect();
    // The map first: from the authority (which may wait for the rest of the cluster),
    // or this brick's own when it runs alone.
    if let (Some(id), None) = (config.id, control::load_identity(&config.dir)) {
        control::store_identity(&config.dir, id)
            .map_err(|source| BrickError::File { op: "write", path: config.dir.join("identity.json"), source })?;
    }
    let started = std::time::Instant::now();
    let (shared, session) = match config.meta.is_empty() {
        false => {
            let (me, map, session) = control::register(&config.meta, &config.dir, &brick_addr, config.secret.clone(), started, &stop)?;
            crate::log!("brick", "registered with the map authority at {} as {me}; map epoch {}", session.leader(), map.epoch());
            let shared = Shared::new(me, map, started, Arc::clone(&stop));
            // The cores start before the control thread: they serve by this lease.
            shared.publish(&session.lease);
            (shared, Some(session))
        }
        true => (Shared::new(crate::map::BrickId(0), control::standalone_map(config.partition_bits, &brick_addr), started, Arc::clone(&stop)), None),
    };
    if shared.map().base_bits() != config.partition_bits {
        return Err(BrickError::LayoutMismatch { dir: config.dir.clone(), found_cores: config.cores, found_bits: shared.map().base_bits() });
    }
    let shared = &shared;
    let cpus = core_cpus(config.cores, config.cpus.as_deref());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<usize>();
    let results: Vec<Result<(), BrickError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = transports
            .into_iter()
            .enumerate()
            .map(|(core, transport)| {
                let info = BrickInfo { partition_bits: config.partition_bits, core: core as u16, ports: ports.clone() };
                let cpu = cpus.as_ref().map(|c| core_affinity::CoreId { id: c[core] });
                let stop = Arc::clone(&stop);
                let ready = ready_tx.clone();
                let map = shared.map();
                let loop_config = core_loop::LoopConfig {
                    spin: Duration::from_micros(config.spin_us),
                    busy_poll: config.busy_poll,
                    park: Duration::from_millis(50),
                };
                std::thread::Builder::new()
                    .name(format!("dds-core-{core}"))
                    .spawn_scoped(scope, move || {
                        // Before the log's ring exists: its io_uring workers take this
                        // thread's CPU mask when they are created.
                        if let Some(cpu) = cpu {
                            if !core_affinity::set_for_current(cpu) {
                                crate::log!(warn: format_args!("core {core}"), "cannot pin to CPU {}: placement left to the kernel", cpu.id);
                            }
                        }
                        let fail = |source: core_loop::CoreError| BrickError::Core { core, source };
                        let mut shard = Shard::new(core, config.cores, config.partition_bits, shared.me, map);
                        shard.set_token_base(crate::hash::random_u64() >> 1);
                        let (storage, next_lsn) =
                            match storage::recover(
                                crate::log::FsDisk::new(config.log_io),
                                core,
                                &config.dir,
                                &mut shard,
                                config.checkpoint_log_bytes,
                                config.durability == Durability::Sync,
                                config.values,
                            ) {
                            Ok(recovered) => recovered,
                            Err(e) => {
                                stop.store(true, Ordering::SeqCst);
                                return Err(fail(e.into()));
                            }
                        };
                        let _ = ready.send(core);
                        drop(ready);
                        let round = CoreRound::new(shard, info, config.durability, next_lsn, storage.position());
                        let result = core_loop::run(transport, round, storage, loop_config, shared);
                        // One core stopping stops the brick: it serves all its partitions or none.
                        stop.store(true, Ordering::SeqCst);
                        result.map_err(fail)
                    })
                    .map_err(|source| BrickError::Spawn { thread: format!("core {core}"), source })
            })
            .collect();
        drop(ready_tx);
        let mut spawned = Ok(());
        if let Some(session) = session {
            let brick_addr = brick_addr.clone();
            spawned = std::thread::Builder::new()
                .name("dds-control".into())
                .spawn_scoped(scope, move || control::heartbeat_loop(shared, &brick_addr, session))
                .map(|_| ())
                .map_err(|source| BrickError::Spawn { thread: "control".into(), source });
        }
        if let (Some(listener), Ok(())) = (metrics, &spawned) {
            let (stop, addrs) = (Arc::clone(&stop), addrs.clone());
            spawned = std::thread::Builder::new()
                .name("dds-metrics".into())
                .spawn_scoped(scope, move || crate::metrics::serve(listener, &stop, config.secret.as_deref(), || samples(shared, &addrs, config.secret.as_deref())))
                .map(|_| ())
                .map_err(|source| BrickError::Spawn { thread: "metrics".into(), source });
        }
        if spawned.is_err() || handles.iter().any(|h| h.is_err()) {
            // A brick serves with every core and its control plane, or not at all.
            stop.store(true, Ordering::SeqCst);
        }
        // brick.json says "serving": only once every core has replayed its log.
        let all_ready = ready_rx.iter().take(config.cores).count() == config.cores;
        let stored = if all_ready {
            let file = BrickFile {
                pid: std::process::id(),
                cores: config.cores,
                cpus: cpus.clone(),
                partition_bits: config.partition_bits,
                addrs: addrs.clone(),
                rdma: rdma_addrs.clone(),
                metrics: metrics_addr,
            };
            let stored = file.store(&config.dir);
            if stored.is_ok() {
                crate::log!(
                    "brick",
                    "serving on {} core(s): {}{} (pid {}, {}, durability {}, log I/O {}, values {})",
                    config.cores,
                    addr_list(&addrs),
                    if rdma_addrs.is_empty() { String::new() } else { format!(", RDMA {}", addr_list(&rdma_addrs)) },
                    file.pid,
                    placement_line(cpus.as_deref()),
                    config.durability.name(),
                    config.log_io.name(),
                    config.values.describe()
                );
                if let Some(addr) = metrics_addr {
                    crate::log!("brick", "metrics on http://{addr}/metrics");
                }
            }
            stored
        } else {
            Ok(())
        };
        if !all_ready || stored.is_err() {
            stop.store(true, Ordering::SeqCst);
        }
        // A panic ends the process (fail-stop), so a join that fails is a bug.
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<(), BrickError>>| h.join().unwrap_or(Err(BrickError::Panicked));
        let mut results: Vec<_> = handles.into_iter().map(|h| h.and_then(joined)).collect();
        results.insert(0, stored);
        results.insert(0, spawned);
        results
    });
    if shared.removed.load(Ordering::SeqCst) {
        return Err(BrickError::Removed { id: shared.me });
    }
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    crate::log!("brick", "stopped");
    Ok(())
}

/// What a scrape of the brick's metrics reports: each core's counters (asked of the
/// core itself, as `cluster status` does, so nothing is shared with the data path) and
/// the control plane's view.
fn samples(shared: &control::Shared, cores: &[SocketAddr], secret: Option<&Secret>) -> Vec<crate::metrics::Sample> {
    use crate::metrics::{Sample, Value};
    use crate::proto::{CoreStats, Op, Status};
    // Every core at once, each within 300 ms, so a stuck core costs the scrape its own
    // series only (and the scrape stays within a Prometheus timeout of a second).
    let ask = |addr: SocketAddr| crate::rpc::core_stats(addr, Duration::from_millis(300), secret).ok();
    let answers: Vec<Option<CoreStats>> = std::thread::scope(|scope| {
        let asks: Vec<_> = cores.iter().map(|&addr| std::thread::Builder::new().name("dds-metrics-ask".into()).spawn_scoped(scope, move || ask(addr))).collect();
        asks.into_iter().map(|h| h.ok().and_then(|h| h.join().ok().flatten())).collect()
    });
    let stats: Vec<(String, CoreStats)> = answers.into_iter().enumerate().filter_map(|(core, s)| Some((core.to_string(), s?))).collect();
    let per_core = |f: fn(&CoreStats) -> u64| stats.iter().map(|(c, s)| (vec![("core", c.clone())], f(s))).collect::<Vec<_>>();
    let gauge_per_core = |f: fn(&CoreStats) -> u64| stats.iter().map(|(c, s)| (vec![("core", c.clone())], f(s) as i64)).collect::<Vec<_>>();
    let by_op = |f: &dyn Fn(&CoreStats, usize) -> u64| {
        stats
            .iter()
            .flat_map(|(c, s)| Op::ALL.iter().enumerate().filter(|&(i, _)| f(s, i) > 0).map(move |(i, op)| (vec![("core", c.clone()), ("op", op.name().to_string())], f(s, i))))
            .collect::<Vec<_>>()
    };
    let by_status = stats
        .iter()
        .flat_map(|(c, s)| Status::ALL.iter().enumerate().map(move |(i, st)| (vec![("core", c.clone()), ("status", st.name().to_string())], s.statuses[i])))
        .collect();
    let latency = stats
        .iter()
        .flat_map(|(c, s)| Op::ALL.iter().enumerate().filter(|&(i, _)| s.ops[i] > 0).map(move |(i, op)| (vec![("core", c.clone()), ("op", op.name().to_string())], s.latency[i])))
        .collect();
    let in_doubt = stats
        .iter()
        .flat_map(|(c, s)| [("commit", s.in_doubt_commits), ("abort", s.in_doubt_aborts)].map(|(o, n)| (vec![("core", c.clone()), ("outcome", o.to_string())], n)))
        .collect();
    let map = shared.map();
    vec![
        Sample { name: "brick_id", help: "This brick's id in the cluster map", value: Value::Gauge(vec![(vec![], i64::from(shared.me.0))]) },
        Sample { name: "map_epoch", help: "Epoch of the newest cluster map this brick holds", value: Value::Gauge(vec![(vec![], map.epoch() as i64)]) },
        Sample { name: "fenced", help: "1 while the brick serves nothing (no word from the map authority within its lease)", value: Value::Gauge(vec![(vec![], i64::from(shared.is_fenced()))]) },
        Sample { name: "cores_answering", help: "Cores that answered this scrape", value: Value::Gauge(vec![(vec![], stats.len() as i64)]) },
        Sample { name: "keys", help: "Keys stored", value: Value::Gauge(gauge_per_core(|s| s.keys)) },
        Sample { name: "stored_bytes", help: "Key and value bytes stored", value: Value::Gauge(gauge_per_core(|s| s.bytes)) },
        Sample { name: "connections", help: "Connections open", value: Value::Gauge(gauge_per_core(|s| s.connections_open)) },
        Sample { name: "connections_closed_bad_input", help: "Connections closed for a malformed frame", value: Value::Counter(per_core(|s| s.connections_closed_bad_input)) },
        Sample { name: "requests", help: "Requests executed, by op", value: Value::Counter(by_op(&|s, i| s.ops[i])) },
        Sample { name: "rdma_requests", help: "Requests that came over RDMA", value: Value::Counter(per_core(|s| s.rdma_requests)) },
        Sample { name: "replies", help: "Replies, by status (conflict: a prepare's no vote)", value: Value::Counter(by_status) },
        Sample { name: "request_seconds", help: "Server-side latency: from the start of the loop round that executed a request until its reply went to the transport (after the round's log sync, if it waited for one)", value: Value::Histogram(latency) },
        Sample { name: "log_writes", help: "Group commits written to the redo log", value: Value::Counter(per_core(|s| s.log_writes)) },
        Sample { name: "log_bytes", help: "Bytes written to the redo log", value: Value::Counter(per_core(|s| s.log_bytes)) },
        Sample { name: "log_sync_seconds", help: "Group commits that waited for fdatasync: the write and its sync", value: Value::Histogram(stats.iter().map(|(c, s)| (vec![("core", c.clone())], s.syncs)).collect()) },
        Sample { name: "log_batch_records", help: "Log records per group commit (how many writes share one log write and sync)", value: Value::Counts(stats.iter().map(|(c, s)| (vec![("core", c.clone())], s.batch_records)).collect()) },
        Sample { name: "value_cache_hits", help: "Gets served from the value cache (values in the log)", value: Value::Counter(per_core(|s| s.cache_hits)) },
        Sample { name: "value_cache_misses", help: "Gets whose value was read from the log (values in the log)", value: Value::Counter(per_core(|s| s.cache_misses)) },
        Sample { name: "value_cache_bytes", help: "Bytes of values cached (values in the log)", value: Value::Gauge(gauge_per_core(|s| s.cache_bytes)) },
        Sample { name: "values_moved", help: "Live values the cleaner wrote again at the log's head", value: Value::Counter(per_core(|s| s.values_moved)) },
        Sample { name: "log_disk_bytes", help: "Bytes of log segments on disk (values in the log)", value: Value::Gauge(gauge_per_core(|s| s.log_disk_bytes)) },
        Sample { name: "in_doubt_resolved", help: "In-doubt transactions resolved with peers, by outcome", value: Value::Counter(in_doubt) },
    ]
}
