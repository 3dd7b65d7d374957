//! `dds bench`, `dds suite` and `dds demo`: the dds client as a `dds_bench::Target`,
//! beside Redis, memcached and the echo floor driven by the same load generator.

use super::out;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dds_bench::echo::{Echo, EchoServer};
use dds_bench::stream::{Memcached, Resp, StreamTarget};
use dds_bench::{Done, OpKind, Progress, Report, RunConfig, Target, TargetError, Workload};
use indicatif::{ProgressBar, ProgressStyle};

use super::cluster::{self, ClusterFile, TransportKind, UpArgs};
use crate::brick::Durability;
use crate::client::{Client, Completion, Request};
use crate::map::DEFAULT_PARTITION_BITS;

/// A system to measure.
#[derive(Clone, Debug)]
pub(super) enum System {
    /// A dds cluster, by its directory, and how its clients connect (the cluster's
    /// transport when `None`).
    Dds(PathBuf, Option<TransportKind>),
    /// A dds cluster that is not local, by its bricks' (or authority's) addresses.
    DdsAt(Vec<SocketAddr>, Option<TransportKind>, Option<PathBuf>),
    /// The floor: an in-process echo server on the same TCP transport.
    Echo,
    Redis(SocketAddr),
    Memcached(SocketAddr),
}

impl System {
    fn parse(target: &str, cluster: Option<&PathBuf>, addrs: &[SocketAddr], transport: Option<TransportKind>, secret_file: Option<&PathBuf>) -> anyhow::Result<System> {
        let addr = |rest: &str| -> anyhow::Result<SocketAddr> {
            rest.trim_end_matches('/').parse().with_context(|| format!("--target {target}: expected HOST:PORT with an IP"))
        };
        Ok(match target {
            "dds" if !addrs.is_empty() => System::DdsAt(addrs.to_vec(), transport, secret_file.cloned()),
            "dds" => System::Dds(cluster.cloned().context("--target dds needs --cluster DIR (or --addr ADDR)")?, transport),
            "echo" => System::Echo,
            t if t.starts_with("redis://") => System::Redis(addr(&t["redis://".len()..])?),
            t if t.starts_with("memcached://") => System::Memcached(addr(&t["memcached://".len()..])?),
            t => bail!("--target {t}: expected dds, echo, redis://HOST:PORT or memcached://HOST:PORT"),
        })
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            System::Dds(..) | System::DdsAt(..) => "dds",
            System::Echo => "echo",
            System::Redis(_) => "redis",
            System::Memcached(_) => "memcached",
        }
    }
}

#[derive(Args, Clone)]
pub struct LoadArgs {
    /// What the clients do: gets, puts, a mix, or the paper's shapes.
    #[arg(long, value_enum, default_value_t = Workload::Read)]
    workload: Workload,
    /// Bytes per value written [default: 64; 150 for the paper's workloads].
    #[arg(long)]
    value_size: Option<usize>,
    /// Distinct keys the workload draws from.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured seconds before.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Client threads, each with its own connections.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Operations in flight per client thread [default: 1; 100 for the paper's workloads].
    #[arg(long)]
    depth: Option<usize>,
    /// Open loop: operations per second in all, on a fixed schedule, latency counted from
    /// when each was due (coordinated-omission correction); --depth caps in-flight ones.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many operations in all.
    #[arg(long, default_value_t = 100_000_000)]
    ops_max: u64,
    /// Seed of the keys and values drawn (the same seed, the same operations).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl LoadArgs {
    fn config(&self, target: &str) -> anyhow::Result<RunConfig> {
        let workload = self.workload;
        if !(self.seconds > 0.0 && self.seconds <= 86_400.0 && (0.0..=3600.0).contains(&self.warmup)) {
            bail!("--seconds must be in (0, 86400] and --warmup in [0, 3600]");
        }
        let (value_default, depth_default) =
            if workload.is_paper() { (Workload::PAPER_VALUE_SIZE, Workload::PAPER_DEPTH) } else { (64, 1) };
        let config = RunConfig {
            target: target.into(),
            workload,
            clients: self.clients,
            depth: self.depth.unwrap_or(depth_default),
            value_size: self.value_size.unwrap_or(value_default),
            keys: self.keys,
            duration: Duration::from_secs_f64(self.seconds),
            warmup: Duration::from_secs_f64(self.warmup),
            ops_max: self.ops_max,
            seed: self.seed,
            rate: self.rate,
        };
        if config.clients == 0 || config.depth == 0 || config.keys == 0 {
            bail!("--clients, --depth and --keys must be at least 1");
        }
        if config.value_size > crate::proto::VALUE_LEN_MAX {
            bail!("--value-size {} is over the limit of {}", config.value_size, crate::proto::VALUE_LEN_MAX);
        }
        if let Some(rate) = config.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number of operations per second");
            }
        }
        Ok(config)
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure: dds (the cluster in --cluster), echo (the transport floor),
    /// redis://HOST:PORT or memcached://HOST:PORT.
    #[arg(long, default_value = "dds")]
    target: String,
    /// Where the dds cluster is (for --target dds).
    #[command(flatten)]
    at: super::kv::Target,
    #[command(flatten)]
    load: LoadArgs,
    /// Do not write the keys before a workload that reads them.
    #[arg(long)]
    no_preload: bool,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot latency by percentile to STEM.svg and STEM.png.
    #[arg(long, value_name = "STEM")]
    plot: Option<PathBuf>,
    /// How dds clients connect [default: as the cluster was started]: tcp on an RDMA
    /// cluster measures TCP against the same bricks.
    #[arg(long, value_enum)]
    transport: Option<TransportKind>,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Brick processes in the demo's cluster.
    #[arg(long, default_value_t = 2)]
    bricks: usize,
    /// Replicas per partition (writes go to every one by two-phase commit).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Cores per brick [default: the machine's cores shared out among the bricks].
    #[arg(long)]
    cores: Option<usize>,
    /// Distinct keys, all written before the first phase.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// Client threads, each with its own connections.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Operations in flight per client thread.
    #[arg(long, default_value_t = 4)]
    depth: usize,
}

/// One client thread's view of a dds cluster for the load generator.
struct DdsTarget {
    client: Client,
    completions: Vec<Completion>,
    errors_logged: u32,
}

impl Target for DdsTarget {
    fn submit(&mut self, op: OpKind, key: &[u8], value: &[u8]) -> Result<u64, TargetError> {
        let request = match op {
            OpKind::Get => Request::Get(key),
            OpKind::Put => Request::Put(key, value),
        };
        self.client.submit(request).map_err(|e| TargetError::new("submit", e))
    }

    fn poll(&mut self, done: &mut Vec<Done>, timeout: Duration) -> Result<(), TargetError> {
        self.completions.clear();
        self.client.poll(&mut self.completions, timeout).map_err(|e| TargetError::new("poll", e))?;
        for c in &self.completions {
            if let Err(e) = &c.result {
                // Counted in the report; the first few are named so a failing run says why.
                if self.errors_logged < 3 {
                    self.errors_logged += 1;
                    eprintln!("dds bench: operation failed: {e}");
                }
            }
            done.push(Done { token: c.token, ok: c.result.is_ok() });
        }
        Ok(())
    }
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {msg}").expect("valid template").progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Opens a target of `system` and hands it to `f` (targets differ in type, so the
/// caller's work is generic over them).
trait WithTarget {
    type Out;
    fn call<T: Target, M: Fn(usize) -> Result<T, TargetError> + Sync + Send>(self, make: M) -> anyhow::Result<Self::Out>;
}

/// Hands `w` dds clients of the cluster at `addrs` (over RDMA if `transport` asks).
fn with_dds<W: WithTarget>(addrs: Vec<SocketAddr>, mut config: crate::ClientConfig, transport: Option<&TransportKind>, w: W) -> anyhow::Result<W::Out> {
    if let Some(t) = transport {
        config.rdma = *t != TransportKind::Tcp;
    }
    w.call(move |_| {
        let client = Client::connect(&addrs, config.clone()).map_err(|e| TargetError::new("connect", e))?;
        cluster::say_client_fallback(&client);
        Ok(DdsTarget { client, completions: Vec::new(), errors_logged: 0 })
    })
}

fn with_target<W: WithTarget>(system: &System, value_size: usize, w: W) -> anyhow::Result<W::Out> {
    match system {
        System::Dds(dir, transport) => {
            let cluster = ClusterFile::load(dir)?;
            cluster.check_secret()?;
            with_dds(cluster.addrs(), cluster.client_config(), transport.as_ref(), w)
        }
        System::DdsAt(addrs, transport, secret_file) => {
            let config = crate::ClientConfig { secret: super::load_secret(secret_file.as_deref())?, ..crate::ClientConfig::default() };
            with_dds(addrs.clone(), config, transport.as_ref(), w)
        }
        System::Echo => {
            // Polls like a brick: spin 50 us after the last request, then sleep.
            let server = EchoServer::start("127.0.0.1:0".parse().expect("literal address"), Duration::from_micros(50))
                .context("start the echo server")?;
            let addr = server.addr;
            w.call(move |_| StreamTarget::connect(Echo { value_size }, addr))
        }
        System::Redis(addr) => w.call(|_| StreamTarget::connect(Resp, *addr)),
        System::Memcached(addr) => w.call(|_| StreamTarget::connect(Memcached, *addr)),
    }
}

/// Writes every key of the workload once, with a progress bar.
struct Preload {
    keys: u64,
    value_size: usize,
}

impl WithTarget for Preload {
    type Out = ();
    fn call<T: Target, M: Fn(usize) -> Result<T, TargetError> + Sync + Send>(self, make: M) -> anyhow::Result<()> {
        let mut target = make(0)?;
        let bar = progress_bar(self.keys, "load");
        dds_bench::preload(&mut target, self.keys, self.value_size, 64, |n| {
            bar.set_position(n);
            bar.set_message(format!("{n}/{} keys", self.keys));
        })?;
        bar.finish_and_clear();
        Ok(())
    }
}

/// Runs the load with a live progress line.
struct Measure<'a> {
    config: &'a RunConfig,
}

impl WithTarget for Measure<'_> {
    type Out = Report;
    fn call<T: Target, M: Fn(usize) -> Result<T, TargetError> + Sync + Send>(self, make: M) -> anyhow::Result<Report> {
        let config = self.config;
        let progress = Progress::default();
        let total = config.warmup + config.duration;
        let bar = progress_bar(total.as_millis() as u64, &format!("{} {}", config.target, config.workload.name()));
        let report = std::thread::scope(|scope| {
            let runner = scope.spawn(|| dds_bench::run(config, make, &progress));
            let started = Instant::now();
            let mut last = (started, 0u64);
            while !runner.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
                let now = Instant::now();
                let ops = progress.ops.load(Ordering::Relaxed);
                let rate = (ops - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, ops);
                let phase = if now.duration_since(started) < config.warmup { "warm-up" } else { "measuring" };
                bar.set_position(now.duration_since(started).as_millis().min(total.as_millis()) as u64);
                bar.set_message(format!("{phase}: {ops} ops, {rate:.0} ops/s, {} errors", progress.errors.load(Ordering::Relaxed)));
            }
            bar.finish_and_clear();
            runner.join().expect("bench runner panicked")
        })?;
        Ok(report)
    }
}

/// Preloads (when the workload reads) and measures one system.
pub(super) fn measure(system: &System, config: &RunConfig, preload: bool) -> anyhow::Result<Report> {
    if preload && config.workload.needs_preload() {
        with_target(system, config.value_size, Preload { keys: config.keys, value_size: config.value_size })
            .with_context(|| format!("preload {}", system.name()))?;
    }
    with_target(system, config.value_size, Measure { config }).with_context(|| format!("measure {}", system.name()))
}

fn print_table(reports: &[Report]) {
    out!("{}", Report::table_header());
    for r in reports {
        for row in r.table_rows() {
            out!("{row}");
        }
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let at = &args.at;
    let system = System::parse(&args.target, at.cluster.as_ref(), &at.addr, args.transport, at.secret_file.as_ref())?;
    let config = args.load.config(system.name())?;
    let report = measure(&system, &config, !args.no_preload)?;
    print_table(std::slice::from_ref(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(stem) = &args.plot {
        let title = format!(
            "{} {}: {} clients x depth {}, {} B values",
            report.target, report.workload, report.clients, report.depth, report.value_size
        );
        let series = dds_bench::plot::percentile_series(&[&report]);
        for path in dds_bench::plot::chart(stem, &title, "percentile, in nines (2 = p99)", "latency (us, log)", &series)? {
            out!("plot: {}", path.display());
        }
    }
    if report.errors > 0 {
        bail!("{} operations failed", report.errors);
    }
    Ok(())
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("dds-demo-").tempdir().context("create a temporary directory")?;
    let up = UpArgs {
        dir: dir.path().to_path_buf(),
        bricks: args.bricks,
        replicas: args.replicas,
        cores: args.cores,
        transport: TransportKind::Tcp,
        busy_poll: false,
        placement: cluster::Placement::Kernel,
        log_io: crate::log::LogIo::default(),
        partition_bits: DEFAULT_PARTITION_BITS,
        durability: Durability::Sync,
        checkpoint_log_mb: 64.0,
        cache_mb: None,
        metrics: false,
        secret_file: None,
        meta_replicas: 3,
    };
    let cluster = cluster::up(&up)?;
    out!(
        "dds demo: {} brick(s) x {} core(s) on 127.0.0.1, {} replica(s) per partition, durability sync (a put is acknowledged once every replica has it on disk: fdatasync), every connection authenticated (the cluster's secret), a map authority of {} raft members, {} keys of {} bytes, {} clients x depth {}, {} s per phase",
        cluster.bricks.len(),
        cluster.bricks[0].cores,
        cluster.replicas,
        cluster.metas.len(),
        args.keys,
        args.value_size,
        args.clients,
        args.depth,
        args.seconds
    );
    let system = System::Dds(dir.path().to_path_buf(), None);
    let result = (|| {
        let mut reports = Vec::new();
        for (i, workload) in [Workload::Read, Workload::Write, Workload::Mixed].into_iter().enumerate() {
            let load = LoadArgs {
                workload,
                value_size: Some(args.value_size),
                keys: args.keys,
                seconds: args.seconds,
                warmup: 0.5,
                clients: args.clients,
                depth: Some(args.depth),
                rate: None,
                ops_max: 100_000_000,
                seed: 1,
            };
            reports.push(measure(&system, &load.config("dds")?, i == 0)?);
        }
        out!();
        print_table(&reports);
        let errors: u64 = reports.iter().map(|r| r.errors).sum();
        if errors > 0 {
            bail!("{errors} operations failed");
        }
        anyhow::Ok(())
    })();
    let stopped = cluster::down(dir.path());
    result?;
    stopped?;
    out!("\ncluster stopped; every brick exited");
    Ok(())
}

