//! `dds bench` and `dds demo`: the dds client as a `dds_bench::Target`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use dds_bench::echo::{EchoServer, EchoTarget};
use dds_bench::workload::key_for;
use dds_bench::{Done, OpKind, Progress, Report, RunConfig, Target, TargetError, Workload};
use indicatif::{ProgressBar, ProgressStyle};

use super::cluster::{self, ClusterFile, TransportKind, UpArgs};
use crate::client::{Client, ClientConfig, Completion, Request};
use crate::map::DEFAULT_PARTITION_BITS;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WorkloadArg {
    Read,
    Write,
    Mixed,
    YcsbA,
    YcsbB,
    YcsbC,
}

impl From<WorkloadArg> for Workload {
    fn from(w: WorkloadArg) -> Workload {
        match w {
            WorkloadArg::Read => Workload::Read,
            WorkloadArg::Write => Workload::Write,
            WorkloadArg::Mixed => Workload::Mixed,
            WorkloadArg::YcsbA => Workload::YcsbA,
            WorkloadArg::YcsbB => Workload::YcsbB,
            WorkloadArg::YcsbC => Workload::YcsbC,
        }
    }
}

#[derive(Args, Clone)]
pub struct LoadArgs {
    #[arg(long, value_enum, default_value_t = WorkloadArg::Read)]
    workload: WorkloadArg,
    /// Bytes per value written.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
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
    /// Operations in flight per client thread.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Stop after this many operations in all.
    #[arg(long, default_value_t = 100_000_000)]
    ops_max: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchTarget {
    /// The cluster named by --cluster.
    Dds,
    /// The floor: an in-process echo server on the same TCP transport, exchanging as many
    /// bytes per operation as dds does.
    Echo,
}

#[derive(Args)]
pub struct BenchArgs {
    /// A local cluster's directory (for --target dds).
    #[arg(long)]
    cluster: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BenchTarget::Dds)]
    target: BenchTarget,
    #[command(flatten)]
    load: LoadArgs,
    /// Open-loop target rate (ops/s) [not built yet: the load is closed-loop].
    #[arg(long)]
    rate: Option<f64>,
    /// Do not write the keys before a workload that reads them.
    #[arg(long)]
    no_preload: bool,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 2)]
    bricks: usize,
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Cores per brick [default: the machine's cores shared out among the bricks].
    #[arg(long)]
    cores: Option<usize>,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    depth: usize,
}

/// One client thread's view of the cluster for the load generator.
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
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {msg}").expect("valid template").progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Writes every key of the workload once, pipelined, with a progress bar.
fn preload(cluster: &ClusterFile, keys: u64, value_size: usize) -> anyhow::Result<()> {
    let mut client = cluster.connect()?;
    let bar = progress_bar(keys, "load");
    let value: Vec<u8> = (0..value_size).map(|i| (i % 251) as u8).collect();
    let mut key = Vec::new();
    let mut done = Vec::new();
    let (mut next, mut completed) = (0u64, 0u64);
    let depth = 64;
    while completed < keys {
        while next < keys && client.in_flight() < depth {
            key_for(next, &mut key);
            client.submit(Request::Put(&key, &value))?;
            next += 1;
        }
        done.clear();
        client.poll(&mut done, Duration::from_millis(100))?;
        for c in done.drain(..) {
            c.result.context("preload put")?;
            completed += 1;
        }
        bar.set_position(completed);
        bar.set_message(format!("{completed}/{keys} keys"));
    }
    bar.finish_and_clear();
    Ok(())
}

fn run_dds(cluster: &ClusterFile, load: &LoadArgs, workload: Workload) -> anyhow::Result<Report> {
    let addrs = cluster.addrs();
    run_load("dds", load, workload, |_| {
        let client = Client::connect(&addrs, ClientConfig::default()).map_err(|e| TargetError::new("connect", e))?;
        Ok(DdsTarget { client, completions: Vec::new(), errors_logged: 0 })
    })
}

fn run_load<T, M>(target: &str, load: &LoadArgs, workload: Workload, make_target: M) -> anyhow::Result<Report>
where
    T: Target,
    M: Fn(usize) -> Result<T, TargetError> + Sync + Send,
{
    if !(load.seconds > 0.0 && load.seconds <= 86_400.0 && (0.0..=3600.0).contains(&load.warmup)) {
        bail!("--seconds must be in (0, 86400] and --warmup in [0, 3600]");
    }
    if load.clients == 0 || load.depth == 0 || load.keys == 0 {
        bail!("--clients, --depth and --keys must be at least 1");
    }
    let config = RunConfig {
        target: target.into(),
        workload,
        clients: load.clients,
        depth: load.depth,
        value_size: load.value_size,
        keys: load.keys,
        duration: Duration::from_secs_f64(load.seconds),
        warmup: Duration::from_secs_f64(load.warmup),
        ops_max: load.ops_max,
        seed: load.seed,
    };
    let progress = Progress::default();
    let total = config.warmup + config.duration;
    let bar = progress_bar(total.as_millis() as u64, workload.name());
    let report = std::thread::scope(|scope| {
        let runner = scope.spawn(|| {
            dds_bench::run(&config, make_target, &progress)
        });
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

fn print_table(reports: &[Report]) {
    println!("{}", Report::table_header());
    for r in reports {
        for row in r.table_rows() {
            println!("{row}");
        }
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.rate.is_some() {
        bail!("--rate (open-loop load) is not built yet; this version runs closed-loop (--clients x --depth)");
    }
    let workload = Workload::from(args.load.workload);
    let report = match (args.target, &args.cluster) {
        (BenchTarget::Dds, Some(dir)) => {
            let cluster = ClusterFile::load(dir)?;
            if workload.needs_preload() && !args.no_preload {
                preload(&cluster, args.load.keys, args.load.value_size)?;
            }
            run_dds(&cluster, &args.load, workload)?
        }
        (BenchTarget::Dds, None) => bail!("--target dds needs --cluster DIR"),
        (BenchTarget::Echo, _) => {
            let server = EchoServer::start("127.0.0.1:0".parse().expect("literal address"), Duration::from_micros(50))
                .context("start the echo server")?;
            let value_size = args.load.value_size;
            run_load("echo", &args.load, workload, |_| EchoTarget::connect(server.addr, value_size))?
        }
    };
    print_table(std::slice::from_ref(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("write {}", path.display()))?;
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
        partition_bits: DEFAULT_PARTITION_BITS,
    };
    let cluster = cluster::up(&up)?;
    println!(
        "dds demo: {} brick(s) x {} core(s) on 127.0.0.1, {} keys of {} bytes, {} clients x depth {}, {} s per phase",
        cluster.bricks.len(),
        cluster.bricks[0].cores,
        args.keys,
        args.value_size,
        args.clients,
        args.depth,
        args.seconds
    );
    let result = (|| {
        preload(&cluster, args.keys, args.value_size)?;
        let mut reports = Vec::new();
        for workload in [Workload::Read, Workload::Write, Workload::Mixed] {
            let load = LoadArgs {
                workload: WorkloadArg::Read,
                value_size: args.value_size,
                keys: args.keys,
                seconds: args.seconds,
                warmup: 0.5,
                clients: args.clients,
                depth: args.depth,
                ops_max: 100_000_000,
                seed: 1,
            };
            reports.push(run_dds(&cluster, &load, workload)?);
        }
        println!();
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
    println!("\ncluster stopped; every brick exited");
    Ok(())
}
