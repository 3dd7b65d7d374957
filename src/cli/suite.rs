//! `dds suite`: the same workloads against dds, Redis, memcached and the echo floor in
//! one run, repetitions interleaved, medians and spreads, ratios, JSON and plots.

use super::{out, out_part};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use dds_bench::plot::{self, Series};
use dds_bench::{Report, RunConfig, Workload};
use serde::Serialize;

use super::bench::{measure, System};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Seconds in all: keeps the harness from rotting (ci/test.sh).
    Smoke,
    /// Under 5 minutes: one repetition of 2 s per shape.
    Quick,
    /// Three repetitions of 5 s per shape.
    Full,
}

#[derive(Args)]
pub struct SuiteArgs {
    /// The dds cluster to measure (one brick, one replica for the peer comparison).
    #[arg(long)]
    cluster: PathBuf,
    /// A Redis server to set beside dds.
    #[arg(long)]
    redis: Option<SocketAddr>,
    /// A memcached server to set beside dds.
    #[arg(long)]
    memcached: Option<SocketAddr>,
    /// How much to run: smoke (seconds), quick (under 5 minutes) or full.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    mode: Mode,
    /// Repetitions [default: by mode].
    #[arg(long)]
    reps: Option<usize>,
    /// Measured seconds per run [default: by mode].
    #[arg(long)]
    seconds: Option<f64>,
    /// Where the JSON and plots go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Clone, Copy, Serialize)]
struct Shape {
    name: &'static str,
    workload: Workload,
    clients: usize,
    depth: usize,
    value_size: usize,
}

const fn shape(name: &'static str, workload: Workload, clients: usize, depth: usize, value_size: usize) -> Shape {
    Shape { name, workload, clients, depth, value_size }
}

/// The load sweep (gets at rising load) first, then sets, then the paper's workloads.
const SHAPES: [Shape; 9] = [
    shape("get 1x1", Workload::Read, 1, 1, 64),
    shape("get 4x1", Workload::Read, 4, 1, 64),
    shape("get 16x1", Workload::Read, 16, 1, 64),
    shape("get 50x1", Workload::Read, 50, 1, 64),
    shape("get 50x16", Workload::Read, 50, 16, 64),
    shape("set 50x1", Workload::Write, 50, 1, 64),
    shape("set 50x16", Workload::Write, 50, 16, 64),
    shape("paper-read 1x100", Workload::PaperRead, 1, 100, 150),
    shape("paper-write 1x100", Workload::PaperWrite, 1, 100, 150),
];
const SMOKE_SHAPES: [Shape; 2] = [shape("get 1x1", Workload::Read, 1, 1, 64), shape("set 4x4", Workload::Write, 4, 4, 64)];
/// Shapes whose gets make the throughput-vs-latency curve.
const SWEEP: [&str; 5] = ["get 1x1", "get 4x1", "get 16x1", "get 50x1", "get 50x16"];

/// The paper's in-core figures: 128 bricks, 2 replicas, 150-byte values.
const PAPER_READS_PER_SEC: f64 = 61_432.0;
const PAPER_WRITES_PER_SEC: f64 = 13_582.0;
const PAPER_BRICKS: f64 = 128.0;

#[derive(Serialize)]
struct Run<'a> {
    shape: &'a str,
    system: &'a str,
    rep: usize,
    report: &'a Report,
}

#[derive(Serialize)]
struct ResultsFile<'a> {
    started_unix: u64,
    mode: Mode,
    reps: usize,
    seconds: f64,
    machine: Machine,
    shapes: &'a [Shape],
    runs: Vec<Run<'a>>,
}

#[derive(Serialize)]
struct Machine {
    cores: usize,
    kernel: String,
    cpu: String,
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    Machine { cores: super::available_cores(), kernel, cpu }
}

/// `YYYY-MM-DDTHH-MM-SS` in UTC (days-from-civil, inverted).
fn stamp(unix: u64) -> String {
    let (year, month, day, hour, minute, second) = crate::logging::civil(unix);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}-{minute:02}-{second:02}")
}

fn median(mut xs: Vec<f64>) -> f64 {
    assert!(!xs.is_empty());
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// `median (min–max)`, or the value alone for one repetition.
fn spread(xs: &[f64], decimals: usize) -> String {
    let m = median(xs.to_vec());
    if xs.len() == 1 {
        return format!("{m:.decimals$}");
    }
    let lo = xs.iter().copied().fold(f64::MAX, f64::min);
    let hi = xs.iter().copied().fold(f64::MIN, f64::max);
    format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

pub fn suite(args: SuiteArgs) -> anyhow::Result<()> {
    let (reps_default, seconds_default, warmup, keys, shapes): (usize, f64, f64, u64, &[Shape]) = match args.mode {
        Mode::Smoke => (1, 0.3, 0.1, 1_000, &SMOKE_SHAPES),
        Mode::Quick => (1, 2.0, 0.5, 10_000, &SHAPES),
        Mode::Full => (3, 5.0, 1.0, 10_000, &SHAPES),
    };
    let reps = args.reps.unwrap_or(reps_default);
    let seconds = args.seconds.unwrap_or(seconds_default);
    if reps == 0 || seconds.is_nan() || seconds <= 0.0 {
        bail!("--reps and --seconds must be positive");
    }
    let mut systems = vec![System::Dds(args.cluster.clone(), None)];
    systems.extend(args.redis.map(System::Redis));
    systems.extend(args.memcached.map(System::Memcached));
    systems.push(System::Echo);
    let names: Vec<&str> = systems.iter().map(System::name).collect();
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();

    // reports[shape][system] = one per repetition.
    let mut reports: BTreeMap<(usize, usize), Vec<Report>> = BTreeMap::new();
    let mut loaded: HashSet<(usize, usize)> = HashSet::new();
    let total = reps * shapes.len() * systems.len();
    let mut n = 0;
    for rep in 0..reps {
        for (si, s) in shapes.iter().enumerate() {
            for (yi, system) in systems.iter().enumerate() {
                n += 1;
                eprintln!("[{n}/{total}] rep {} {:<18} {}", rep + 1, s.name, system.name());
                let config = RunConfig {
                    target: system.name().into(),
                    workload: s.workload,
                    clients: s.clients,
                    depth: s.depth,
                    value_size: s.value_size,
                    keys,
                    duration: std::time::Duration::from_secs_f64(seconds),
                    warmup: std::time::Duration::from_secs_f64(warmup),
                    ops_max: 1_000_000_000,
                    seed: 1 + rep as u64,
                    rate: None,
                };
                // Load each system once per value size, before the first shape that reads.
                let preload = s.workload.needs_preload() && loaded.insert((yi, s.value_size));
                let report = measure(system, &config, preload)?;
                if report.errors > 0 {
                    bail!("{} on {}: {} operations failed", system.name(), s.name, report.errors);
                }
                reports.entry((si, yi)).or_default().push(report);
            }
        }
    }

    let cell = |si: usize, yi: usize, f: &dyn Fn(&Report) -> f64| -> Vec<f64> {
        reports.get(&(si, yi)).map(|rs| rs.iter().map(f).collect()).unwrap_or_default()
    };
    let ops = |r: &Report| r.total.ops_per_sec;
    let p50 = |r: &Report| r.total.p50_us;
    let p99 = |r: &Report| r.total.p99_us;
    let ratio = |a: &[f64], b: &[f64]| -> String {
        if a.is_empty() || b.is_empty() {
            return "–".into();
        }
        format!("{:.2}", median(a.iter().zip(b).map(|(x, y)| x / y).collect()))
    };
    let echo = systems.len() - 1;

    out!("\n## Throughput (ops/s): median (min–max) of {reps} run(s) of {seconds} s\n");
    out_part!("| shape |");
    for n in &names {
        out_part!(" {n} |");
    }
    for n in &names[1..] {
        out_part!(" dds ÷ {n} |");
    }
    out!();
    out!("|---|{}", "---|".repeat(2 * names.len() - 1));
    for (si, s) in shapes.iter().enumerate() {
        out_part!("| {} |", s.name);
        for yi in 0..systems.len() {
            out_part!(" {} |", spread(&cell(si, yi, &ops), 0));
        }
        for yi in 1..systems.len() {
            out_part!(" {} |", ratio(&cell(si, 0, &ops), &cell(si, yi, &ops)));
        }
        out!();
    }

    out!("\n## Latency (µs): p50 / p99, medians of {reps} run(s)\n");
    out_part!("| shape |");
    for n in &names {
        out_part!(" {n} p50 | {n} p99 |");
    }
    out!(" dds p50 ÷ echo p50 |");
    out!("|---|{}---|", "---|---|".repeat(names.len()));
    for (si, s) in shapes.iter().enumerate() {
        out_part!("| {} |", s.name);
        for yi in 0..systems.len() {
            out_part!(" {} | {} |", spread(&cell(si, yi, &p50), 1), spread(&cell(si, yi, &p99), 1));
        }
        out!(" {} |", ratio(&cell(si, 0, &p50), &cell(si, echo, &p50)));
    }

    for (si, s) in shapes.iter().enumerate() {
        let (paper, what) = match s.workload {
            Workload::PaperRead => (PAPER_READS_PER_SEC, "reads/s"),
            Workload::PaperWrite => (PAPER_WRITES_PER_SEC, "writes/s"),
            _ => continue,
        };
        let dds = median(cell(si, 0, &ops));
        out!(
            "\n{}: dds {dds:.0} {what} = {:.2} x the paper's {paper:.0} on {PAPER_BRICKS} bricks, {:.1} x its {:.0} per brick",
            s.name,
            dds / paper,
            dds / (paper / PAPER_BRICKS),
            paper / PAPER_BRICKS
        );
    }

    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let base = args.out.join(stamp(started_unix));
    let names = &names;
    let runs = reports
        .iter()
        .flat_map(|(&(si, yi), rs)| {
            rs.iter().enumerate().map(move |(rep, report)| Run { shape: shapes[si].name, system: names[yi], rep, report })
        })
        .collect();
    let file = ResultsFile { started_unix, mode: args.mode, reps, seconds, machine: machine(), shapes, runs };
    let json = base.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(&file)?).with_context(|| format!("write {}", json.display()))?;
    out!("\nresults: {}", json.display());
    for path in plots(&base, shapes, &systems, &reports)? {
        out!("plot: {}", path.display());
    }
    Ok(())
}

/// The report of a cell whose throughput is the median one (a real run, not a blend).
fn median_run(rs: &[Report]) -> &Report {
    let mut sorted: Vec<&Report> = rs.iter().collect();
    sorted.sort_by(|a, b| a.total.ops_per_sec.total_cmp(&b.total.ops_per_sec));
    sorted[sorted.len() / 2]
}

fn plots(
    base: &Path,
    shapes: &[Shape],
    systems: &[System],
    reports: &BTreeMap<(usize, usize), Vec<Report>>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let stem = |what: &str| PathBuf::from(format!("{}-{what}", base.display()));
    if let Some(si) = shapes.iter().position(|s| s.name == "get 50x1").or(Some(0)) {
        let rs: Vec<&Report> = (0..systems.len()).filter_map(|yi| reports.get(&(si, yi)).map(|r| median_run(r))).collect();
        written.extend(plot::chart(
            &stem("latency-percentiles"),
            &format!("Latency by percentile: {}, 64 B values", shapes[si].name),
            "percentile, in nines (1 = p90, 2 = p99, 3 = p99.9)",
            "latency (us, log)",
            &plot::percentile_series(&rs),
        )?);
    }
    for (what, pick) in [("p50", (|r: &Report| r.total.p50_us) as fn(&Report) -> f64), ("p99", |r: &Report| r.total.p99_us)] {
        let series: Vec<Series> = systems
            .iter()
            .enumerate()
            .map(|(yi, system)| Series {
                label: system.name().to_string(),
                points: SWEEP
                    .iter()
                    .filter_map(|name| shapes.iter().position(|s| s.name == *name))
                    .filter_map(|si| reports.get(&(si, yi)))
                    .map(|rs| (median(rs.iter().map(|r| r.total.ops_per_sec).collect()).log10(), median(rs.iter().map(pick).collect())))
                    .collect(),
            })
            .filter(|s| s.points.len() > 1)
            .collect();
        if !series.is_empty() {
            written.extend(plot::chart(
                &stem(&format!("throughput-vs-{what}")),
                &format!("Gets: {what} latency against throughput (1, 4, 16, 50 clients; 50 x depth 16)"),
                "throughput, log10 ops/s (4 = 10k, 5 = 100k, 6 = 1M)",
                &format!("{what} latency (us, log)"),
                &series,
            )?);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_dates() {
        assert_eq!(stamp(0), "1970-01-01T00-00-00");
        assert_eq!(stamp(1_795_737_600 + 3_723), "2026-11-27T01-02-03");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(spread(&[1.0, 3.0, 2.0], 0), "2 (1–3)");
    }
}
