//! `dds cluster`: a local cluster of brick processes on 127.0.0.1, its state kept in a
//! directory (`cluster.json` plus one `brick-<i>/` per brick with its log).

use super::out;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dds_transport::auth::Secret;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::brick::{BrickFile, Durability, BRICK_FILE};
use crate::client::{Client, ClientConfig};
use crate::map::{BrickId, ClusterMap, DEFAULT_PARTITION_BITS};
use crate::log::LogIo;
use crate::meta::{MetaFile, META_FILE};
use crate::proto::CoreStats;

pub const CLUSTER_FILE: &str = "cluster.json";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Tcp,
    Rdma,
    Auto,
}

/// Where a local cluster's brick cores run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Unpinned: the kernel moves each core to where its wake-ups come from (the
    /// disk's and the network's interrupts, its clients), which wins when bricks and
    /// clients share a few CPUs.
    #[default]
    Kernel,
    /// Each brick core pinned to a CPU of its own, bricks spread over the CPUs in turn.
    Spread,
}

/// The CPUs brick `index` of `cores` cores is pinned to under `placement`.
fn brick_cpus(placement: Placement, index: usize, cores: usize) -> Option<Vec<usize>> {
    let cpus = super::allowed_cpus();
    match placement {
        Placement::Kernel => None,
        Placement::Spread if cpus.is_empty() => None,
        Placement::Spread => Some((0..cores).map(|c| cpus[(index * cores + c) % cpus.len()]).collect()),
    }
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Start bricks in the background and return once every one serves.
    Up(UpArgs),
    /// Print bricks, their partitions, keys and liveness.
    Status(DirArgs),
    /// Stop every brick (SIGTERM, then SIGKILL after 10 s) and wait until they are gone.
    Down(DirArgs),
    /// SIGKILL one brick (fault injection).
    Kill(BrickSel),
    /// Start a stopped brick again on its directory and ports (it rejoins and copies
    /// back the partitions it is given), or the map authority's members (`--meta`):
    /// those that are down, or, if none is, each in turn.
    Restart(RestartArgs),
    /// Start one more brick; replicas move to it until load evens out.
    Add(DirArgs),
    /// Change the map authority group's members (raft configuration changes).
    #[command(subcommand)]
    Meta(MetaCommand),
}

#[derive(Subcommand)]
pub enum MetaCommand {
    /// Start one more member (a new id, directory and port); it joins the group.
    Add(DirArgs),
    /// Take member --id out of the group (once raft has committed that), then stop it.
    /// Its directory is left as it was.
    Remove(MemberSel),
}

#[derive(Args)]
pub struct MemberSel {
    /// The cluster's directory (as given to `cluster up`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Which member: its id (`cluster status` lists them).
    #[arg(long)]
    pub id: u64,
}

#[derive(Args)]
pub struct DirArgs {
    /// The cluster's directory (as given to `cluster up`).
    #[arg(long)]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct RestartArgs {
    /// The cluster's directory (as given to `cluster up`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Which brick: its index in the cluster (the first column of `cluster status`).
    #[arg(long, required_unless_present = "meta", conflicts_with = "meta")]
    pub brick: Option<usize>,
    /// Restart the map authority's members instead (same directories and ports): those
    /// that are down, or every one in turn.
    #[arg(long)]
    pub meta: bool,
}

#[derive(Args)]
pub struct BrickSel {
    /// The cluster's directory (as given to `cluster up`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Which brick: its index in the cluster (the first column of `cluster status`).
    #[arg(long)]
    pub brick: usize,
}

#[derive(Args, Clone)]
pub struct UpArgs {
    /// A directory for the cluster: each brick's log and the map authority's state.
    #[arg(long)]
    pub dir: PathBuf,
    /// Brick processes to start.
    #[arg(long, default_value_t = 1)]
    pub bricks: usize,
    /// Replicas per partition: every write goes to all of them (two-phase commit).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Cores per brick [default: the machine's cores shared out among the bricks].
    #[arg(long)]
    pub cores: Option<usize>,
    /// tcp, or rdma beside it (rdma: when this machine has a usable verbs device, else
    /// one line says why and the cluster runs on TCP; auto: the same).
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    pub transport: TransportKind,
    /// Bricks never sleep in the kernel between requests (dedicated cores only: on a
    /// shared machine this starves everything else).
    #[arg(long)]
    pub busy_poll: bool,
    /// Where brick cores run: left to the kernel, or pinned and spread over the CPUs.
    #[arg(long, value_enum, default_value_t = Placement::Kernel)]
    pub placement: Placement,
    /// How brick logs reach the disk: syscalls on each core's thread, or io_uring.
    #[arg(long, value_enum, default_value_t = LogIo::Syscalls)]
    pub log_io: LogIo,
    /// The map starts with 2^bits partitions (more split off as bricks join).
    #[arg(long, default_value_t = DEFAULT_PARTITION_BITS, value_parser = clap::value_parser!(u8).range(0..=16))]
    pub partition_bits: u8,
    /// When a write is acknowledged: after fdatasync (sync) or once in memory (memory).
    #[arg(long, value_enum, default_value_t = Durability::Sync)]
    pub durability: Durability,
    /// A core's log past this many MiB, or past the bytes the core holds if more,
    /// starts a checkpoint.
    #[arg(long, default_value_t = 64.0)]
    pub checkpoint_log_mb: f64,
    /// Every brick keeps its values in its log with a cache of this many MiB (`dds
    /// brick --cache-mb`); without it, in memory.
    #[arg(long)]
    pub cache_mb: Option<f64>,
    /// Every brick and the map authority serve Prometheus metrics over HTTP, each on a
    /// free loopback port (`cluster status` lists them).
    #[arg(long)]
    pub metrics: bool,
    /// The cluster's secret, which every connection proves [default: <dir>/secret,
    /// made (mode 0600) when there is none].
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Members of the map authority, a raft group: with 3, any one may fail (or be
    /// restarted) and the cluster serves on; with 5, any two; 1 is one process.
    #[arg(long, default_value_t = 3, value_parser = meta_replicas)]
    pub meta_replicas: usize,
}

/// `--meta-replicas`: an odd number of members, a majority of which must run.
fn meta_replicas(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err(format!("{text}: the authority runs 1, 3 or 5 members")),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterBrick {
    pub index: usize,
    pub dir: PathBuf,
    pub pid: u32,
    /// Core 0's address; the brick tells clients the others.
    pub addr: SocketAddr,
    pub cores: usize,
    /// Every core's port, kept so a restart serves where clients look.
    pub ports: Vec<u16>,
    /// The CPU each core is pinned to, as the brick reported it; absent when unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<usize>>,
    /// Where it serves its metrics (`cluster up --metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// A member of a local cluster's map authority group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// Its raft id (1 for the one member of a cluster made before the authority was a
    /// group).
    #[serde(default = "first_member")]
    pub id: u64,
    pub pid: u32,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// Where it serves its metrics (`cluster up --metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

fn first_member() -> u64 {
    1
}

/// The authority group's members: a list, or the one object a cluster made before the
/// authority was a group has under `meta`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ClusterMeta>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(ClusterMeta),
        Many(Vec<ClusterMeta>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(m) => vec![m],
        OneOrMany::Many(ms) => ms,
    })
}

fn log_io_before_the_option() -> LogIo {
    LogIo::Uring
}

/// `<dir>/cluster.json`: what a client needs to find the bricks, and what `down` stops.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The map authority's members (one or more: a raft group).
    #[serde(alias = "meta", deserialize_with = "one_or_many")]
    pub metas: Vec<ClusterMeta>,
    pub partition_bits: u8,
    pub replicas: usize,
    pub durability: Durability,
    pub checkpoint_log_mb: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_mb: Option<f64>,
    pub transport: TransportKind,
    #[serde(default)]
    pub busy_poll: bool,
    #[serde(default)]
    pub placement: Placement,
    /// Absent in a `cluster.json` from before the option: its bricks ran on io_uring.
    #[serde(default = "log_io_before_the_option")]
    pub log_io: LogIo,
    /// Bricks and the authority serve metrics (kept on through restarts).
    #[serde(default)]
    pub metrics: bool,
    /// The secret every process and client of the cluster proves (absent: a cluster
    /// made before authentication, open to anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    pub bricks: Vec<ClusterBrick>,
    #[serde(skip)]
    pub secret: Option<Arc<Secret>>,
    /// Why `secret_file` could not be read: commands that talk to the cluster fail
    /// with it; `down`, `kill` and the rest, which only signal processes, go on.
    #[serde(skip)]
    pub secret_error: Option<String>,
}

impl ClusterFile {
    /// The cluster in `dir`, with what its processes say of themselves where they were
    /// started again outside `cluster` (a `dds meta` or `dds brick` run by hand on the
    /// same directory writes its own pid there): `cluster.json` stays true whoever
    /// restarts what.
    pub fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
        let path = dir.join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no cluster in {}: cannot read {}", dir.display(), path.display()))?;
        let mut cluster: ClusterFile = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        if let Some(file) = &cluster.secret_file {
            match Secret::load(file) {
                Ok(s) => cluster.secret = Some(Arc::new(s)),
                Err(e) => cluster.secret_error = Some(e.to_string()),
            }
        }
        cluster.adopt_restarted();
        Ok(cluster)
    }

    fn adopt_restarted(&mut self) {
        for member in &mut self.metas {
            let meta = std::fs::read_to_string(member.dir.join(META_FILE)).ok().and_then(|t| serde_json::from_str::<MetaFile>(&t).ok());
            if let Some(m) = meta.filter(|m| m.pid != member.pid && runs_as(m.pid, "meta", &member.dir)) {
                (member.pid, member.addr, member.metrics) = (m.pid, m.addr, m.metrics);
            }
        }
        for b in &mut self.bricks {
            if let Some(f) = BrickFile::load(&b.dir).ok().filter(|f| f.pid != b.pid && !f.addrs.is_empty() && runs_as(f.pid, "brick", &b.dir)) {
                (b.pid, b.addr, b.cpus, b.metrics) = (f.pid, f.addrs[0], f.cpus.clone(), f.metrics);
                b.ports = f.addrs.iter().map(|a| a.port()).collect();
            }
        }
    }

    fn store(&self, dir: &Path) -> anyhow::Result<()> {
        crate::durable::write_file(dir, CLUSTER_FILE, serde_json::to_string_pretty(self)?.as_bytes())
            .with_context(|| format!("store {}", dir.join(CLUSTER_FILE).display()))
    }

    /// Where a client can learn the map: the authority's members, then every brick.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.meta_addrs().into_iter().chain(self.bricks.iter().map(|b| b.addr)).collect()
    }

    /// The authority's members' addresses.
    pub fn meta_addrs(&self) -> Vec<SocketAddr> {
        self.metas.iter().map(|m| m.addr).collect()
    }

    /// The group as `dds meta --member` takes it (empty for a group of one).
    fn group(&self) -> Vec<(u64, SocketAddr)> {
        match self.metas.len() {
            1 => Vec::new(),
            _ => self.metas.iter().map(|m| (m.id, m.addr)).collect(),
        }
    }

    /// The authority members' logs (a leader's decisions are in its own).
    pub fn meta_logs(&self) -> Vec<PathBuf> {
        self.metas.iter().map(|m| m.dir.join("meta.log")).collect()
    }

    /// How a client of this cluster connects: over RDMA to bricks that serve it when
    /// the cluster was started with RDMA.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig { rdma: self.transport != TransportKind::Tcp, secret: self.secret.clone(), ..ClientConfig::default() }
    }

    /// Fails if the cluster's secret could not be read.
    pub fn check_secret(&self) -> anyhow::Result<()> {
        match &self.secret_error {
            Some(why) => bail!("the cluster's secret: {why}"),
            None => Ok(()),
        }
    }

    pub fn connect(&self) -> anyhow::Result<Client> {
        self.check_secret()?;
        let client = Client::connect(&self.addrs(), self.client_config()).context("connect to the cluster")?;
        say_client_fallback(&client);
        Ok(client)
    }
}

/// Says once per process, on stderr, why a client asked for RDMA uses TCP.
pub fn say_client_fallback(client: &Client) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Some(why) = client.rdma_unavailable() {
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("dds: client: {why}; falling back to TCP");
        }
    }
}

pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Up(args) => {
            let cluster = up(&args)?;
            out!(
                "cluster up in {}: {} brick(s) x {} core(s), transport {}",
                args.dir.display(),
                cluster.bricks.len(),
                cluster.bricks[0].cores,
                value_name(cluster.transport)
            );
            for b in &cluster.bricks {
                out!("  brick {} pid {} at {}", b.index, b.pid, b.addr);
            }
            Ok(())
        }
        ClusterCommand::Status(args) => status(&args.dir),
        ClusterCommand::Down(args) => {
            let stopped = down(&args.dir)?;
            out!("cluster in {} is down ({stopped} brick(s) stopped)", args.dir.display());
            Ok(())
        }
        ClusterCommand::Kill(sel) => {
            let cluster = ClusterFile::load(&sel.dir)?;
            let Some(b) = cluster.bricks.get(sel.brick) else {
                bail!("no brick {} in {} (it has {})", sel.brick, sel.dir.display(), cluster.bricks.len())
            };
            if !is_brick_process(b) {
                bail!("brick {} (pid {}) is not running", b.index, b.pid);
            }
            stop_brick(b, Signal::SIGKILL, Duration::ZERO)?;
            out!("brick {} (pid {}) killed", b.index, b.pid);
            Ok(())
        }
        ClusterCommand::Add(args) => {
            let started = Instant::now();
            let b = add(&args.dir)?;
            out!("brick {} added: pid {} at {}", b.index, b.pid, b.addr);
            let cluster = ClusterFile::load(&args.dir)?;
            let map = wait_for_replicas(&cluster, brick_id(&b), true)?;
            let mut load: std::collections::BTreeMap<BrickId, usize> = map.bricks().keys().map(|&id| (id, 0)).collect();
            for g in map.groups().values() {
                for id in g {
                    *load.entry(*id).or_default() += 1;
                }
            }
            let loads: Vec<String> = load.iter().map(|(id, n)| format!("{}: {n}", id.0)).collect();
            let (least, most) = (load.values().min().copied().unwrap_or(0), load.values().max().copied().unwrap_or(0));
            let even = if most - least <= 1 { "even" } else { "not even yet: the map authority goes on moving replicas to the new brick" };
            out!(
                "every partition at full strength at epoch {} after {} ms; partitions per brick (map id: count): {} ({even})",
                map.epoch(),
                started.elapsed().as_millis(),
                loads.join(", ")
            );
            Ok(())
        }
        ClusterCommand::Meta(MetaCommand::Add(args)) => {
            let started = Instant::now();
            let (m, list) = meta_add(&args.dir)?;
            out!("member {} added: pid {} at {} (raft log in {}), in {} ms", m.id, m.pid, m.addr, m.dir.display(), started.elapsed().as_millis());
            out!("  the group is now {}", member_ids(&list.members));
            Ok(())
        }
        ClusterCommand::Meta(MetaCommand::Remove(sel)) => {
            let list = meta_remove(&sel.dir, sel.id)?;
            out!("member {} removed and stopped; the group is now {}", sel.id, member_ids(&list.members));
            Ok(())
        }
        ClusterCommand::Restart(RestartArgs { dir, meta: true, .. }) => {
            let mut cluster = ClusterFile::load(&dir)?;
            let down: Vec<usize> = (0..cluster.metas.len()).filter(|&i| !meta_alive(&cluster.metas[i])).collect();
            // Members that are down start again; if none is, each restarts in turn (a
            // group of three or more keeps a majority throughout).
            let which = if down.is_empty() { (0..cluster.metas.len()).collect() } else { down };
            for i in which {
                let m = &cluster.metas[i];
                if meta_alive(m) {
                    stop_process("a map authority member", m.pid, Signal::SIGTERM, STOP_TIMEOUT)?;
                }
                ensure_meta(&mut cluster)?;
                cluster.store(&dir)?;
                let m = &cluster.metas[i];
                out!("map authority restarted: member {} pid {} at {} (its raft log in {})", m.id, m.pid, m.addr, m.dir.display());
            }
            Ok(())
        }
        ClusterCommand::Restart(RestartArgs { dir, brick, .. }) => {
            let sel = BrickSel { dir, brick: brick.context("say which: --brick INDEX or --meta")? };
            let started = Instant::now();
            // The authority's log so far: a recovery line from an earlier copy is not this one's.
            let meta_logs = ClusterFile::load(&sel.dir)?.meta_logs();
            let log_starts: Vec<usize> = meta_logs.iter().map(|l| std::fs::metadata(l).map_or(0, |m| m.len() as usize)).collect();
            let b = restart(&sel.dir, sel.brick)?;
            out!("brick {} restarted: pid {} at {}", b.index, b.pid, b.addr);
            let cluster = ClusterFile::load(&sel.dir)?;
            let id = brick_id(&b);
            let map = wait_for_replicas(&cluster, id, false)?;
            let held = map.partitions_of(id).count();
            out!(
                "brick {} rejoined (map id {}) at epoch {}: holds {held} partition(s), every partition at full strength after {} ms",
                b.index,
                id.0,
                map.epoch(),
                started.elapsed().as_millis()
            );
            // The authority's account of the copy (per partition lines are in its log).
            let log: String = meta_logs
                .iter()
                .zip(&log_starts)
                .map(|(l, &start)| String::from_utf8_lossy(std::fs::read(l).unwrap_or_default().get(start..).unwrap_or_default()).into_owned())
                .collect();
            if let Some(line) = log.lines().rev().find(|l| l.contains("meta: recovery:")) {
                out!("  {}", line.split_once("meta: ").map_or(line, |(_, r)| r));
            }
            Ok(())
        }
    }
}

/// Starts `dds brick` in the background on `bdir`, its output appended to `brick.log`.
/// How bricks of one cluster are started.
struct BrickShape {
    cores: usize,
    partition_bits: u8,
    durability: Durability,
    checkpoint_log_mb: f64,
    cache_mb: Option<f64>,
    /// The authority's members.
    meta: Vec<SocketAddr>,
    /// Serve RDMA beside TCP (`--transport rdma`).
    rdma: bool,
    busy_poll: bool,
    placement: Placement,
    log_io: LogIo,
    metrics: bool,
    secret_file: Option<PathBuf>,
}

/// `--secret-file FILE`, when the cluster has one.
fn secret_args(file: Option<&Path>) -> Vec<std::ffi::OsString> {
    file.map(|f| vec!["--secret-file".into(), f.as_os_str().to_owned()]).unwrap_or_default()
}

/// How a cluster's authority members are started.
struct MetaShape<'a> {
    bricks: usize,
    replicas: usize,
    bits: u8,
    secret_file: Option<&'a Path>,
    /// Every member (`--member`); empty for a group of one.
    group: Vec<(u64, SocketAddr)>,
    /// Members to join through (`--join`), for a member that is new to the group.
    join: Vec<SocketAddr>,
}

/// Starts authority member `id` of `shape` in the background on `mdir` (`port` 0: any
/// free port), serving metrics on `metrics` (a port; 0: any free one) if given.
fn spawn_meta(exe: &Path, mdir: &Path, id: u64, port: u16, shape: &MetaShape<'_>, metrics: Option<u16>) -> anyhow::Result<Child> {
    let (bricks, replicas, bits, secret_file) = (shape.bricks, shape.replicas, shape.bits, shape.secret_file);
    let group: Vec<String> = shape.group.iter().flat_map(|(m, a)| ["--member".to_string(), format!("{m}={a}")]).collect();
    let join: Vec<String> = shape.join.iter().flat_map(|a| ["--join".to_string(), a.to_string()]).collect();
    let id_args = vec!["--id".to_string(), id.to_string()];
    std::fs::create_dir_all(mdir).with_context(|| format!("create {}", mdir.display()))?;
    let _ = std::fs::remove_file(mdir.join(META_FILE));
    let log_path = mdir.join("meta.log");
    let log = OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("open {}", log_path.display()))?;
    Command::new(exe)
        .arg("meta")
        .arg("--dir")
        .arg(mdir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--bricks", &bricks.to_string(), "--replicas", &replicas.to_string()])
        .args(["--partition-bits", &bits.to_string()])
        .args(id_args)
        .args(if join.is_empty() { group } else { join })
        .args(metrics.map(|p| vec!["--metrics".to_string(), format!("127.0.0.1:{p}")]).unwrap_or_default())
        .args(secret_args(secret_file))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start the map authority on {}", mdir.display()))
}

fn wait_for_meta(mdir: &Path, child: &mut Child) -> anyhow::Result<MetaFile> {
    let load = || std::fs::read_to_string(mdir.join(META_FILE)).ok().and_then(|t| serde_json::from_str::<MetaFile>(&t).ok());
    wait_for_start(child, &mdir.join("meta.log"), || load().map(|f| (f.pid, f))).context("the map authority did not start")
}

fn meta_alive(m: &ClusterMeta) -> bool {
    runs_as(m.pid, "meta", &m.dir)
}

/// Starts every member of the cluster's authority that is not running again (same
/// directory and port).
fn ensure_meta(cluster: &mut ClusterFile) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locate the dds binary")?;
    let shape = MetaShape { bricks: cluster.bricks.len(), replicas: cluster.replicas, bits: cluster.partition_bits, secret_file: cluster.secret_file.as_deref(), group: cluster.group(), join: Vec::new() };
    let mut started = Vec::new();
    for (i, m) in cluster.metas.iter().enumerate().filter(|(_, m)| !meta_alive(m)) {
        // The same ports as before, metrics too, so a scrape configuration keeps working.
        let metrics = cluster.metrics.then(|| m.metrics.map_or(0, |a| a.port()));
        let mut child = spawn_meta(&exe, &m.dir, m.id, m.addr.port(), &shape, metrics)?;
        started.push((i, wait_for_meta(&m.dir, &mut child)?));
    }
    for (i, file) in started {
        cluster.metas[i].pid = file.pid;
        cluster.metas[i].metrics = file.metrics;
    }
    Ok(())
}

/// How long a membership change may take (an election included).
const MEMBER_CHANGE_MAX: Duration = Duration::from_secs(15);

fn member_ids(members: &[(u64, SocketAddr)]) -> String {
    let all: Vec<String> = members.iter().map(|(id, a)| format!("{id} at {a}")).collect();
    format!("{} member(s): {}", members.len(), all.join(", "))
}

/// Starts a new member of the authority group (it asks the leader to add it, then
/// catches up from the raft log) and records it in `cluster.json`.
fn meta_add(dir: &Path) -> anyhow::Result<(ClusterMeta, crate::proto::MemberList)> {
    let mut cluster = ClusterFile::load(dir)?;
    cluster.check_secret()?;
    let secret = cluster.secret.clone();
    let seeds: Vec<SocketAddr> = cluster.metas.iter().filter(|m| meta_alive(m)).map(|m| m.addr).collect();
    if seeds.is_empty() {
        bail!("no member of the map authority runs (start them with `dds cluster restart --dir {} --meta`)", dir.display());
    }
    let list = crate::rpc::ask_members(&seeds, &crate::proto::MemberRequest::List, secret.as_deref(), MEMBER_CHANGE_MAX).map_err(|e| anyhow::anyhow!("listing the members: {e}"))?;
    // Never an id the group had (raft keys what it knows of a member by id).
    let id = list.next_id.max(cluster.metas.iter().map(|m| m.id + 1).max().unwrap_or(1));
    let mdir = dir.join(format!("meta-{id}"));
    if mdir.join(crate::meta::raft_log::RAFT_LOG_FILE).exists() {
        bail!("{} already holds a raft log: it is not a new member's directory", mdir.display());
    }
    let port = free_ports(1)?[0];
    let exe = std::env::current_exe().context("locate the dds binary")?;
    let shape = MetaShape { bricks: cluster.bricks.len(), replicas: cluster.replicas, bits: cluster.partition_bits, secret_file: cluster.secret_file.as_deref(), group: Vec::new(), join: seeds.clone() };
    let mut child = spawn_meta(&exe, &mdir, id, port, &shape, cluster.metrics.then_some(0))?;
    let file = wait_for_meta(&mdir, &mut child).with_context(|| format!("member {id} did not join"))?;
    let m = ClusterMeta { id, pid: file.pid, addr: file.addr, dir: mdir, metrics: file.metrics };
    cluster.metas.push(m.clone());
    cluster.store(dir)?;
    // Done once the new member holds its own addition (it catches up from the log).
    let deadline = Instant::now() + MEMBER_CHANGE_MAX;
    loop {
        let list = crate::rpc::ask_members(&[m.addr], &crate::proto::MemberRequest::List, secret.as_deref(), MEMBER_CHANGE_MAX).map_err(|e| anyhow::anyhow!("member {id} joined but does not answer: {e}"))?;
        if list.members.iter().any(|(i, _)| *i == id) {
            return Ok((m, list));
        }
        if Instant::now() > deadline {
            bail!("member {id} was added but has not caught up with the group's log within {MEMBER_CHANGE_MAX:?}; see {}", m.dir.join("meta.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes member `id` out of the authority group, then stops it and forgets it in
/// `cluster.json`.
fn meta_remove(dir: &Path, id: u64) -> anyhow::Result<crate::proto::MemberList> {
    let mut cluster = ClusterFile::load(dir)?;
    cluster.check_secret()?;
    let Some(m) = cluster.metas.iter().find(|m| m.id == id).cloned() else {
        bail!("no member {id} in {} (members: {})", dir.display(), cluster.metas.iter().map(|m| m.id.to_string()).collect::<Vec<_>>().join(", "))
    };
    let seeds: Vec<SocketAddr> = cluster.metas.iter().filter(|m| meta_alive(m)).map(|m| m.addr).collect();
    if seeds.is_empty() {
        bail!("no member of the map authority runs: a change needs a majority");
    }
    let request = crate::proto::MemberRequest::Remove { id };
    let list = crate::rpc::ask_members(&seeds, &request, cluster.secret.as_deref(), MEMBER_CHANGE_MAX).map_err(|e| anyhow::anyhow!("removing member {id}: {e}"))?;
    if meta_alive(&m) {
        stop_process("a map authority member", m.pid, Signal::SIGTERM, STOP_TIMEOUT)?;
    }
    cluster.metas.retain(|m| m.id != id);
    cluster.store(dir)?;
    Ok(list)
}

/// The map as the authority has it now.
pub fn current_map(cluster: &ClusterFile) -> anyhow::Result<ClusterMap> {
    cluster.check_secret()?;
    crate::rpc::fetch_map(&cluster.addrs(), Duration::from_millis(500), cluster.secret.as_deref()).map_err(|e| anyhow::anyhow!("fetch the cluster map: {e}"))
}

/// `ask_id`: a brick of the first map asks for its index as its id; a brick added
/// later takes the id the authority gives (ids of removed bricks are never reused).
/// `metrics_port`: where it serves metrics when the cluster has them (0: any free port;
/// a restart keeps the one it had).
fn spawn_brick(exe: &Path, bdir: &Path, index: usize, ask_id: bool, shape: &BrickShape, ports: Option<&[u16]>, metrics_port: u16) -> anyhow::Result<Child> {
    std::fs::create_dir_all(bdir).with_context(|| format!("create {}", bdir.display()))?;
    let _ = std::fs::remove_file(bdir.join(BRICK_FILE));
    let log_path = bdir.join("brick.log");
    let log = OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("open {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("brick")
        .arg("--dir")
        .arg(bdir)
        .args(["--listen", "127.0.0.1:0", "--cores", &shape.cores.to_string()])
        .args(["--partition-bits", &shape.partition_bits.to_string()])
        .args(["--durability", &value_name(shape.durability)])
        .args(["--checkpoint-log-mb", &shape.checkpoint_log_mb.to_string()])
        .args(shape.cache_mb.iter().flat_map(|mb| ["--cache-mb".to_string(), mb.to_string()]))
        .args(shape.meta.iter().flat_map(|a| ["--meta".to_string(), a.to_string()]))
        .args(secret_args(shape.secret_file.as_deref()));
    if ask_id {
        cmd.args(["--id", &index.to_string()]);
    }
    if let Some(ports) = ports {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        cmd.args(["--ports", &list.join(",")]);
    }
    if shape.rdma {
        cmd.args(["--transport", "rdma"]);
    }
    if shape.busy_poll {
        cmd.arg("--busy-poll");
    }
    cmd.args(["--log-io", shape.log_io.name()]);
    if shape.metrics {
        cmd.args(["--metrics", &format!("127.0.0.1:{metrics_port}")]);
    }
    match brick_cpus(shape.placement, index, shape.cores) {
        None => cmd.arg("--no-pin"),
        Some(cpus) => cmd.args(["--cpus", &cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")]),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for `cluster up` or `demo` must not
        // reach the bricks behind our back.
        .process_group(0)
        .spawn()
        .with_context(|| format!("start a brick on {}", bdir.display()))?;
    Ok(child)
}


/// Starts brick `index` again with its directory, cores and ports.
pub fn restart(dir: &Path, index: usize) -> anyhow::Result<ClusterBrick> {
    let mut cluster = ClusterFile::load(dir)?;
    let Some(b) = cluster.bricks.get(index).cloned() else {
        bail!("no brick {index} in {} (it has {})", dir.display(), cluster.bricks.len())
    };
    if is_brick_process(&b) {
        bail!("brick {index} (pid {}) is still running; `dds cluster kill` or `down` it first", b.pid);
    }
    // A brick that is still exiting holds its directory's lock until it is gone.
    let deadline = Instant::now() + STOP_TIMEOUT;
    while pid_alive(b.pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    ensure_meta(&mut cluster)?;
    cluster.store(dir)?;
    let file = start_brick(&cluster, index, false, &b.dir, b.cores, Some(&b.ports), b.metrics.map_or(0, |a| a.port())).with_context(|| format!("brick {index} did not restart"))?;
    cluster.bricks[index].pid = file.pid;
    cluster.bricks[index].addr = file.addrs[0];
    cluster.bricks[index].cpus = file.cpus;
    cluster.bricks[index].metrics = file.metrics;
    cluster.store(dir)?;
    Ok(cluster.bricks[index].clone())
}

/// Starts brick `index` of `cluster` on `bdir` and waits until it serves.
fn start_brick(cluster: &ClusterFile, index: usize, ask_id: bool, bdir: &Path, cores: usize, ports: Option<&[u16]>, metrics_port: u16) -> anyhow::Result<BrickFile> {
    let exe = std::env::current_exe().context("locate the dds binary")?;
    let shape = BrickShape {
        cores,
        partition_bits: cluster.partition_bits,
        durability: cluster.durability,
        checkpoint_log_mb: cluster.checkpoint_log_mb,
        cache_mb: cluster.cache_mb,
        meta: cluster.meta_addrs(),
        rdma: cluster.transport != TransportKind::Tcp,
        busy_poll: cluster.busy_poll,
        placement: cluster.placement,
        log_io: cluster.log_io,
        metrics: cluster.metrics,
        secret_file: cluster.secret_file.clone(),
    };
    let mut child = spawn_brick(&exe, bdir, index, ask_id, &shape, ports, metrics_port)?;
    wait_for_brick(bdir, &mut child).inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })
}

/// Starts a new brick in the cluster; the authority then moves replicas to it.
pub fn add(dir: &Path) -> anyhow::Result<ClusterBrick> {
    let mut cluster = ClusterFile::load(dir)?;
    ensure_meta(&mut cluster)?;
    cluster.store(dir)?;
    let index = cluster.bricks.len();
    let bdir = dir.canonicalize().with_context(|| format!("resolve {}", dir.display()))?.join(format!("brick-{index}"));
    let cores = cluster.bricks.first().map_or(1, |b| b.cores);
    let file = start_brick(&cluster, index, false, &bdir, cores, None, 0).with_context(|| format!("brick {index} did not start"))?;
    let ports = file.addrs.iter().map(|a| a.port()).collect();
    cluster.bricks.push(ClusterBrick { index, dir: bdir, pid: file.pid, addr: file.addrs[0], cores: file.cores, ports, cpus: file.cpus.clone(), metrics: file.metrics });
    cluster.store(dir)?;
    Ok(cluster.bricks[index].clone())
}

/// The id the map authority gave brick `b` (its directory's `identity.json`): a brick
/// that was removed and started again has a new one.
fn brick_id(b: &ClusterBrick) -> BrickId {
    BrickId(crate::brick::control::load_identity(&b.dir).unwrap_or(b.index as u32))
}

/// Waits until `brick` is in the map and no partition is short of replicas (as far as
/// the live bricks allow) or being copied.
/// With `holding`, also until `brick` holds a partition (a new brick gets its share).
fn wait_for_replicas(cluster: &ClusterFile, brick: BrickId, holding: bool) -> anyhow::Result<ClusterMap> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(map) = current_map(cluster) {
            let want = cluster.replicas.min(map.bricks().len());
            let settled = map.joining().is_empty() && map.leaving().is_empty();
            if map.bricks().contains_key(&brick) && settled && map.groups().values().all(|g| g.len() >= want) && (!holding || map.partitions_of(brick).next().is_some()) {
                return Ok(map);
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not get back to {} replicas per partition within 120 s; see the authority's logs in {}", cluster.replicas, cluster.metas[0].dir.parent().unwrap_or(&cluster.metas[0].dir).display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The RDMA device this machine's bricks would use, or why there is none (one line,
/// for the fallback message).
#[cfg(feature = "rdma")]
fn rdma_device() -> Result<String, String> {
    dds_transport::rdma::probe().map(|d| d.name).map_err(|e| e.to_string())
}

#[cfg(not(feature = "rdma"))]
fn rdma_device() -> Result<String, String> {
    Err("this build has no RDMA transport (build with --features rdma)".into())
}

/// The command-line spelling of a value, as clap parses it.
fn value_name<T: ValueEnum>(value: T) -> String {
    value.to_possible_value().expect("no variant is skipped").get_name().to_string()
}

/// Starts the bricks and returns once each one answers.
pub fn up(args: &UpArgs) -> anyhow::Result<ClusterFile> {
    if args.bricks == 0 {
        bail!("--bricks must be at least 1");
    }
    if args.replicas == 0 || args.replicas > args.bricks {
        bail!("--replicas {} needs at least that many bricks (--bricks {})", args.replicas, args.bricks);
    }
    let transport = match (args.transport, rdma_device()) {
        (TransportKind::Tcp, _) => TransportKind::Tcp,
        (_, Ok(device)) => {
            eprintln!("dds: --transport {}: bricks serve RDMA on {device} beside TCP", value_name(args.transport));
            TransportKind::Rdma
        }
        (asked, Err(why)) => {
            eprintln!("dds: --transport {}: {why}; falling back to TCP", value_name(asked));
            TransportKind::Tcp
        }
    };
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize().with_context(|| format!("resolve {}", args.dir.display()))?;
    if let Ok(old) = ClusterFile::load(&dir) {
        if let Some(b) = old.bricks.iter().find(|b| is_brick_process(b)) {
            bail!(
                "a cluster is already up in {} (brick {} pid {}); run `dds cluster down --dir {}` first",
                dir.display(),
                b.index,
                b.pid,
                dir.display()
            );
        }
    }
    let cores = args.cores.unwrap_or_else(|| (super::available_cores() / args.bricks).max(1));
    super::mib_to_bytes(args.checkpoint_log_mb)?;
    super::values_in(args.cache_mb)?;
    let exe = std::env::current_exe().context("locate the dds binary")?;
    let (secret_file, secret) = cluster_secret(&dir, args.secret_file.as_deref())?;
    if args.metrics {
        write_metrics_token(&dir, &secret)?;
    }
    // Members of a group listen where the others were told they would: ports picked
    // free now. A group of one takes any free port.
    let n = args.meta_replicas;
    let ports = if n == 1 { vec![0] } else { free_ports(n)? };
    let group: Vec<(u64, SocketAddr)> = if n == 1 { Vec::new() } else { (1..=n as u64).zip(&ports).map(|(id, &p)| (id, SocketAddr::from(([127, 0, 0, 1], p)))).collect() };
    let meta_shape = MetaShape { bricks: args.bricks, replicas: args.replicas, bits: args.partition_bits, secret_file: Some(&secret_file), group, join: Vec::new() };
    let mut meta_children: Vec<Child> = Vec::new();
    let mut metas = Vec::new();
    let spawned = (|| {
        for (i, &port) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let mdir = if n == 1 { dir.join("meta") } else { dir.join(format!("meta-{id}")) };
            meta_children.push(spawn_meta(&exe, &mdir, id, port, &meta_shape, args.metrics.then_some(0))?);
            metas.push((id, mdir));
        }
        let mut started = Vec::new();
        for ((id, mdir), child) in metas.iter().zip(meta_children.iter_mut()) {
            let f = wait_for_meta(mdir, child)?;
            started.push(ClusterMeta { id: *id, pid: f.pid, addr: f.addr, dir: mdir.clone(), metrics: f.metrics });
        }
        anyhow::Ok(started)
    })();
    let metas = match spawned {
        Ok(m) => m,
        Err(e) => {
            for child in &mut meta_children {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(e);
        }
    };
    let shape = BrickShape {
        cores,
        partition_bits: args.partition_bits,
        durability: args.durability,
        checkpoint_log_mb: args.checkpoint_log_mb,
        cache_mb: args.cache_mb,
        meta: metas.iter().map(|m| m.addr).collect(),
        rdma: transport != TransportKind::Tcp,
        busy_poll: args.busy_poll,
        placement: args.placement,
        log_io: args.log_io,
        metrics: args.metrics,
        secret_file: Some(secret_file.clone()),
    };
    let mut children: Vec<(PathBuf, Child)> = Vec::new();
    let started = (|| {
        for index in 0..args.bricks {
            let bdir = dir.join(format!("brick-{index}"));
            let child = spawn_brick(&exe, &bdir, index, true, &shape, None, 0)
                .with_context(|| format!("start brick {index}"))?;
            children.push((bdir, child));
        }
        let mut bricks = Vec::new();
        for (index, (bdir, child)) in children.iter_mut().enumerate() {
            let file = wait_for_brick(bdir, child).with_context(|| format!("brick {index} did not start"))?;
            let ports = file.addrs.iter().map(|a| a.port()).collect();
            bricks.push(ClusterBrick { index, dir: bdir.clone(), pid: file.pid, addr: file.addrs[0], cores: file.cores, ports, cpus: file.cpus.clone(), metrics: file.metrics });
        }
        let cluster = ClusterFile {
            metas,
            partition_bits: args.partition_bits,
            replicas: args.replicas,
            durability: args.durability,
            checkpoint_log_mb: args.checkpoint_log_mb,
            cache_mb: args.cache_mb,
            transport,
            busy_poll: args.busy_poll,
            placement: args.placement,
            log_io: args.log_io,
            metrics: args.metrics,
            secret_file: Some(secret_file),
            bricks,
            secret: Some(secret),
            secret_error: None,
        };
        cluster.store(&dir)?;
        cluster.connect()?;
        anyhow::Ok(cluster)
    })();
    if started.is_err() {
        for child in children.iter_mut().map(|(_, c)| c).chain(meta_children.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    started
}

/// `n` loopback ports free now (bound, then let go: a member started right after takes
/// its port).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>().context("find free ports for the authority's members")?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The secret a new cluster in `dir` uses: `given`, or `<dir>/secret` (made, mode
/// 0600, if there is none yet: a cluster brought up again keeps its secret).
fn cluster_secret(dir: &Path, given: Option<&Path>) -> anyhow::Result<(PathBuf, Arc<Secret>)> {
    let path = match given {
        Some(p) => p.canonicalize().with_context(|| format!("--secret-file {}", p.display()))?,
        None => dir.join("secret"),
    };
    let secret = if given.is_none() && !path.exists() { Secret::create(&path)? } else { Secret::load(&path)? };
    Ok((path, Arc::new(secret)))
}

/// Where `cluster up --metrics` writes the bearer token a scrape presents.
pub const METRICS_TOKEN_FILE: &str = "metrics.token";

/// Writes `<dir>/metrics.token` (mode 0600), for Prometheus's `credentials_file`.
fn write_metrics_token(dir: &Path, secret: &Secret) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(METRICS_TOKEN_FILE);
    // Made anew, so its mode is 0600 whatever an older file's was.
    let _ = std::fs::remove_file(&path);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).with_context(|| format!("write {}", path.display()))?;
    file.write_all(secret.metrics_token().as_bytes()).and_then(|()| file.sync_all()).with_context(|| format!("write {}", path.display()))
}

fn wait_for_brick(bdir: &Path, child: &mut Child) -> anyhow::Result<BrickFile> {
    wait_for_start(child, &bdir.join("brick.log"), || BrickFile::load(bdir).ok().map(|f| (f.pid, f)))
}

/// Waits until `ready` finds the file the started process writes once it serves, naming
/// that process's pid; fails with the tail of its log if it exits or takes too long.
fn wait_for_start<T>(child: &mut Child, log: &Path, ready: impl Fn() -> Option<(u32, T)>) -> anyhow::Result<T> {
    let deadline = Instant::now() + START_TIMEOUT;
    let log_tail = || tail(&std::fs::read_to_string(log).unwrap_or_default());
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("it exited with {status}; its log {} ends:\n{}", log.display(), log_tail());
        }
        if let Some((pid, file)) = ready() {
            if pid == child.id() {
                return Ok(file);
            }
        }
        if Instant::now() > deadline {
            bail!("not serving after {START_TIMEOUT:?}; its log ends:\n{}", log_tail());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Whether process `pid` exists and has not yet exited (a zombie has).
fn pid_alive(pid: u32) -> bool {
    // Reap it if it is our child (the demo starts bricks in-process).
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Whether `b.pid` is alive and is this brick (not a stranger that got its pid).
pub fn is_brick_process(b: &ClusterBrick) -> bool {
    runs_as(b.pid, "brick", &b.dir)
}

/// Whether `pid` is alive and runs `dds ROLE` on `dir` (its `--dir`, however spelled:
/// `--dir D` or `--dir=D`, relative to the process's working directory, or through
/// links; or, when the directory came from a `--config` file, as the pid file in
/// `dir` says of it).
fn runs_as(pid: u32, role: &str, dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    if !pid_alive(pid) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&c| c == 0).collect();
    if !args.contains(&role.as_bytes()) {
        return false;
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let want = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let dirs = args.windows(2).filter(|w| w[0] == b"--dir").map(|w| w[1]).chain(args.iter().filter_map(|a| a.strip_prefix(b"--dir=")));
    let named = dirs.clone().any(|d| {
        let given = cwd.join(Path::new(std::ffi::OsStr::from_bytes(d)));
        given.canonicalize().unwrap_or(given) == want
    });
    let from_config = dirs.count() == 0 && args.iter().any(|a| *a == b"--config" || a.starts_with(b"--config="));
    named || (from_config && pid_file_names(dir, pid))
}

/// Whether the state file a brick or authority writes in `dir` once it serves
/// (`brick.json`, `meta.json`) names `pid`.
fn pid_file_names(dir: &Path, pid: u32) -> bool {
    let named = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v.get("pid")?.as_u64()) == Some(u64::from(pid))
    };
    named(BRICK_FILE) || named(META_FILE)
}

/// Signals a brick the caller has identified, and waits until its process is gone (not
/// only until it stops looking like a brick: an exiting process loses its command line
/// before it is done).
fn stop_brick(b: &ClusterBrick, signal: Signal, grace: Duration) -> anyhow::Result<()> {
    stop_process(&format!("brick {}", b.index), b.pid, signal, grace)
}

fn stop_process(what: &str, pid: u32, signal: Signal, grace: Duration) -> anyhow::Result<()> {
    let _ = kill(Pid::from_raw(pid as i32), signal);
    let deadline = Instant::now() + grace;
    while pid_alive(pid) {
        if Instant::now() > deadline {
            if signal != Signal::SIGKILL {
                eprintln!("dds: {what} (pid {pid}) ignored {signal} for {grace:?}; sending SIGKILL");
                return stop_process(what, pid, Signal::SIGKILL, STOP_TIMEOUT);
            }
            if Instant::now() > deadline + STOP_TIMEOUT {
                bail!("{what} (pid {pid}) is still alive after SIGKILL");
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Stops every running brick; returns how many were running.
pub fn down(dir: &Path) -> anyhow::Result<usize> {
    let cluster = ClusterFile::load(dir)?;
    // The authority first: bricks that stop must not be taken for failures and removed.
    for m in cluster.metas.iter().filter(|m| meta_alive(m)) {
        let _ = kill(Pid::from_raw(m.pid as i32), Signal::SIGTERM);
    }
    for m in cluster.metas.iter().filter(|m| meta_alive(m)) {
        stop_process("a map authority member", m.pid, Signal::SIGTERM, STOP_TIMEOUT)?;
    }
    let running: Vec<&ClusterBrick> = cluster.bricks.iter().filter(|b| is_brick_process(b)).collect();
    for b in &running {
        let _ = kill(Pid::from_raw(b.pid as i32), Signal::SIGTERM);
    }
    for b in &running {
        stop_brick(b, Signal::SIGTERM, STOP_TIMEOUT)?;
    }
    Ok(running.len())
}

/// Counters of every core of a brick, asked on each core's own port.
fn brick_stats(b: &ClusterBrick, secret: Option<&Secret>) -> Result<Vec<CoreStats>, String> {
    b.ports
        .iter()
        .map(|&port| crate::rpc::core_stats(SocketAddr::new(b.addr.ip(), port), Duration::from_millis(500), secret))
        .collect()
}

fn status(dir: &Path) -> anyhow::Result<()> {
    let cluster = ClusterFile::load(dir)?;
    let map = current_map(&cluster);
    out!("cluster {}", dir.display());
    let members_up = cluster.metas.iter().filter(|m| meta_alive(m)).count();
    let meta_state = if members_up * 2 > cluster.metas.len() { "up" } else { "down" };
    for m in &cluster.metas {
        let alive = if meta_alive(m) { "up" } else { "down" };
        let role = match crate::rpc::member_status(m.addr, Duration::from_millis(500), cluster.secret.as_deref()) {
            Ok(s) => s.role(),
            Err(_) => "not answering".to_string(),
        };
        out!("  map authority member {} at {} (pid {}, {alive}): {role}", m.id, m.addr, m.pid);
    }
    out!(
        "  map authority: {} ({members_up} of {} members running); transport {}, durability {}, {} brick(s), {} replica(s) asked",
        if meta_state == "up" { "a majority runs" } else { "no majority" },
        cluster.metas.len(),
        value_name(cluster.transport),
        value_name(cluster.durability),
        cluster.bricks.len(),
        cluster.replicas
    );
    match (&cluster.secret_file, &cluster.secret) {
        (Some(file), Some(s)) => out!("  cluster {:016x}: every connection proves the secret in {}", s.cluster_id(), file.display()),
        (Some(_), None) => out!("  the cluster's secret cannot be read: {}", cluster.secret_error.as_deref().unwrap_or("?")),
        _ => out!("  no secret: open to anyone who reaches its ports (a cluster made before authentication)"),
    }
    match &map {
        Ok(m) => out!(
            "  epoch {}, {} partitions (base {} bits), {} copying",
            m.epoch(),
            m.dp().leaves().len(),
            m.base_bits(),
            m.joining().values().map(|j| j.len()).sum::<usize>()
        ),
        Err(e) => out!("  map unavailable: {e}"),
    }
    if cluster.metrics {
        let bricks: Vec<String> = cluster.bricks.iter().map(|b| b.metrics.map_or("-".to_string(), |a| format!("http://{a}/metrics"))).collect();
        let metas: Vec<String> = cluster.metas.iter().map(|m| m.metrics.map_or("-".to_string(), |a| format!("http://{a}/metrics"))).collect();
        out!("  metrics: map authority {}; bricks (by index) {}", metas.join(" "), bricks.join(" "));
        if cluster.secret.is_some() {
            out!("  metrics need the bearer token in {}", dir.join(METRICS_TOKEN_FILE).display());
        }
    }
    if let Ok(m) = &map {
        let rdma = m.bricks().values().filter(|a| !a.rdma.is_empty()).count();
        out!("  bricks serving RDMA beside TCP: {rdma} of {} in the map", m.bricks().len());
    }
    out!(
        "{:<6} {:<4} {:<8} {:<6} {:<5} {:<22} {:>5} {:>10} {:>8} {:>10} {:>12} {:>6} {:>10} {:>10}  cpus",
        "brick", "id", "pid", "state", "net", "addr", "cores", "partitions", "copying", "keys", "bytes", "conns", "requests", "over rdma"
    );
    let mut down = 0;
    for b in &cluster.bricks {
        let id = brick_id(b);
        let (held, copying, member) = match &map {
            Ok(m) => (m.partitions_of(id).count(), m.joining().values().filter(|j| j.contains(&id)).count(), m.bricks().contains_key(&id)),
            Err(_) => (0, 0, false),
        };
        // What the brick registered: RDMA listeners beside its TCP ones, or TCP only.
        let net = match map.as_ref().ok().and_then(|m| m.bricks().get(&id)) {
            Some(a) if !a.rdma.is_empty() => "rdma",
            Some(_) => "tcp",
            None => "-",
        };
        let stats = if is_brick_process(b) { brick_stats(b, cluster.secret.as_deref()) } else { Err("not running".to_string()) };
        // Each core's CPU, or `kernel` where the kernel places them.
        let cpus = b.cpus.as_ref().map_or("kernel".to_string(), |c| c.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
        let state = match (&stats, member) {
            (Ok(_), true) => "up",
            (Ok(_), false) => "out",
            (Err(_), _) => "down",
        };
        match stats {
            Ok(cores) => {
                let sum = |f: fn(&CoreStats) -> u64| cores.iter().map(f).sum::<u64>();
                let (keys, bytes, conns) = (sum(|s| s.keys), sum(|s| s.bytes), sum(|s| s.connections_open));
                let (requests, rdma_requests) = (sum(|s| s.requests), sum(|s| s.rdma_requests));
                out!(
                    "{:<6} {:<4} {:<8} {:<6} {:<5} {:<22} {:>5} {:>10} {:>8} {:>10} {:>12} {:>6} {:>10} {:>10}  {cpus}",
                    b.index, id.0, b.pid, state, net, b.addr, b.cores, held, copying, keys, bytes, conns, requests, rdma_requests
                );
                let (hits, misses, disk) = (sum(|s| s.cache_hits), sum(|s| s.cache_misses), sum(|s| s.log_disk_bytes));
                if hits + misses > 0 || disk > 0 {
                    out!(
                        "         values in the log: {} of {} gets from the cache ({:.1}%), {} MiB cached, {} MiB of log on disk, {} values moved by the cleaner",
                        hits,
                        hits + misses,
                        100.0 * hits as f64 / (hits + misses).max(1) as f64,
                        sum(|s| s.cache_bytes) >> 20,
                        disk >> 20,
                        sum(|s| s.values_moved)
                    );
                }
            }
            Err(why) => {
                down += 1;
                out!("{:<6} {:<4} {:<8} {:<6} {:<5} {:<22} {:>5} {:>10} {:>8}   ({why})", b.index, id.0, b.pid, state, net, b.addr, b.cores, held, copying);
            }
        }
    }
    if let Ok(m) = &map {
        // Replica groups, each with how many partitions it holds.
        let mut groups: std::collections::BTreeMap<Vec<u32>, usize> = std::collections::BTreeMap::new();
        for g in m.groups().values() {
            let mut ids: Vec<u32> = g.iter().map(|b| b.0).collect();
            ids.sort_unstable();
            *groups.entry(ids).or_default() += 1;
        }
        out!("replica groups (bricks: partitions):");
        for (ids, n) in groups {
            let names: Vec<String> = ids.iter().map(u32::to_string).collect();
            out!("  [{}]: {n}", names.join(","));
        }
        let short = m.groups().values().filter(|g| g.len() < cluster.replicas).count();
        if short > 0 {
            out!(
                "{short} partition(s) have fewer than {} replicas: the map authority copies them to other bricks {} s after it removed a brick, unless the brick comes back first",
                cluster.replicas,
                crate::meta::authority::REREPLICATE_AFTER_MS / 1000
            );
        }
    }
    if down > 0 {
        out!("{down} brick(s) down");
    }
    if meta_state == "down" || down == cluster.bricks.len() {
        let what = if meta_state == "down" { "the map authority is down (no majority of its members runs)" } else { "no brick is running" };
        return Err(crate::cli::ExitCode(3, format!("cluster {} is down: {what}", dir.display())).into());
    }
    Ok(())
}
