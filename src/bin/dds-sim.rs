//! `dds-sim`: runs the deterministic simulator over many seeds (see `dds::sim` and
//! `ci/sim.sh`). Prints one line per failing seed with the command that replays it, and
//! `N passed, F failed` at the end.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use dds::mutation::Mutation;
use dds::sim::{run, Options};

#[derive(Parser, Debug)]
#[command(name = "dds-sim", about = "Deterministic simulation of a dds cluster under seeded faults")]
struct Args {
    /// How many seeds to run, from --start on [default: 100, or none with --regressions].
    #[arg(long)]
    seeds: Option<u64>,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    start: u64,
    /// Run this one seed and print its trace (what the failure line's command does).
    #[arg(long)]
    seed: Option<u64>,
    /// Plant a protocol bug: read-uncommitted, skip-sync, lost-commit, stale-lease,
    /// early-replies, skip-probe, read-past-prepared, checkpoint-forgets-decisions,
    /// uncommitted-map, keep-left-data, repair-keeps-removed, trim-live-segments or
    /// clean-moves-dead.
    #[arg(long)]
    mutation: Option<String>,
    /// Allow network partitions (outside the design's assumptions).
    #[arg(long)]
    partitions: bool,
    /// Let frames within a connection come twice or out of order (outside what TCP
    /// allows): shows what breaks.
    #[arg(long)]
    raw_network: bool,
    /// When bricks acknowledge writes: sync (after fdatasync) or memory (after the
    /// write reaches the kernel; crashes are then never power losses).
    #[arg(long, value_enum, default_value = "sync")]
    durability: dds::brick::Durability,
    /// With --seed: print every request on this key as the bricks execute it.
    #[arg(long)]
    watch: Option<String>,
    /// Run every seed twice and require equal digests.
    #[arg(long)]
    twice: bool,
    /// Stop at the first failure and exit 0 if there was one (for mutation checks).
    #[arg(long)]
    expect_failure: bool,
    /// Worker threads (each runs whole seeds).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Seeds to run (before any --seeds), from a file with one seed per line ('#' starts
    /// a comment).
    #[arg(long)]
    regressions: Option<std::path::PathBuf>,
}

fn replay_command(seed: u64, args: &Args) -> String {
    let mut cmd = format!("ci/sim.sh --seed {seed}");
    if let Some(m) = &args.mutation {
        cmd.push_str(&format!(" --mutation {m}"));
    }
    if args.partitions {
        cmd.push_str(" --partitions");
    }
    if args.raw_network {
        cmd.push_str(" --raw-network");
    }
    if args.durability == dds::brick::Durability::Memory {
        cmd.push_str(" --durability memory");
    }
    cmd
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mutation = match &args.mutation {
        Some(name) => Some(Mutation::parse(name).with_context(|| {
            format!("unknown mutation {name:?}; known: {}", Mutation::ALL.map(|m| m.name()).join(", "))
        })?),
        None => None,
    };
    let options = Options {
        partitions: args.partitions,
        raw_network: args.raw_network,
        mutation,
        trace: args.seed.is_some(),
        watch: args.watch.clone(),
        durability: args.durability,
    };
    if let Some(seed) = args.seed {
        let started = Instant::now();
        let report = run(seed, &options);
        eprintln!("seed {seed}: {}", report.shape);
        let [ok, unknown, failed] = report.outcomes;
        println!(
            "seed {seed}: {} operations checked ({ok} ok, {unknown} unknown, {failed} refused or timed out), {} windows of the liveness check ({} begun by a member's fault), slowest recovery {} ms, {} events, digest {:016x}, {:.2} s",
            report.ops,
            report.recoveries[0],
            report.recoveries[1],
            report.slowest_recovery_ms,
            report.events,
            report.digest,
            started.elapsed().as_secs_f64()
        );
        if args.twice {
            let again = run(seed, &Options { trace: false, ..options.clone() });
            if again.digest != report.digest {
                bail!("seed {seed} is not deterministic: digest {:016x} then {:016x}", report.digest, again.digest);
            }
            println!("seed {seed}: the same digest twice");
        }
        return match report.failure {
            Some(why) => {
                println!("seed {seed} FAILED: {why}");
                std::process::exit(1)
            }
            None => {
                println!("1 passed, 0 failed");
                Ok(())
            }
        };
    }
    let mut seeds: Vec<u64> = Vec::new();
    if let Some(path) = &args.regressions {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                seeds.push(line.parse().with_context(|| format!("{}: bad seed {line:?}", path.display()))?);
            }
        }
    }
    let count = args.seeds.unwrap_or(if args.regressions.is_some() { 0 } else { 100 });
    seeds.extend(args.start..args.start + count);
    let total = seeds.len();
    let next = AtomicUsize::new(0);
    let passed = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let ops = AtomicU64::new(0);
    let outcomes: [AtomicU64; 3] = Default::default();
    let recoveries: [AtomicU64; 2] = Default::default();
    // The slowest recovery (`sim::checks::RECOVERY_BOUND_MS`) and its seed.
    let slowest: Mutex<Option<(u64, u64)>> = Mutex::new(None);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| loop {
                if args.expect_failure && failed.load(Ordering::Relaxed) > 0 {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { return };
                let report = run(seed, &options);
                let mut failure = report.failure;
                if failure.is_none() && args.twice {
                    let again = run(seed, &options);
                    if again.digest != report.digest {
                        failure = Some(format!("not deterministic: digest {:016x} then {:016x}", report.digest, again.digest));
                    }
                }
                ops.fetch_add(report.ops as u64, Ordering::Relaxed);
                for (total, n) in outcomes.iter().zip(report.outcomes) {
                    total.fetch_add(n, Ordering::Relaxed);
                }
                for (total, n) in recoveries.iter().zip(report.recoveries) {
                    total.fetch_add(n, Ordering::Relaxed);
                }
                {
                    let mut slowest = slowest.lock().expect("not poisoned");
                    if slowest.is_none_or(|(ms, _)| report.slowest_recovery_ms > ms) {
                        *slowest = Some((report.slowest_recovery_ms, seed));
                    }
                }
                match failure {
                    None => {
                        passed.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(why) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let line = format!("seed {seed} FAILED: {why}\n  shape: {}\n  reproduce: {}", report.shape, replay_command(seed, &args));
                        println!("{line}");
                        failures.lock().expect("not poisoned").push(line);
                    }
                }
                let done = passed.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
                if done % 50 == 0 {
                    eprintln!("dds-sim: {done}/{total} seeds, {:.0} s", started.elapsed().as_secs_f64());
                }
            });
        }
    });
    let (passed, failed) = (passed.into_inner(), failed.into_inner());
    let [ok, unknown, failed_ops] = outcomes.map(AtomicU64::into_inner);
    let (slowest_ms, slowest_seed) = slowest.into_inner().expect("not poisoned").unwrap_or_default();
    let [windows, member_windows] = recoveries.map(AtomicU64::into_inner);
    eprintln!(
        "dds-sim: {} operations in the checked histories; client operations: {ok} ok, {unknown} unknown, {failed_ops} refused or timed out; {windows} windows of the liveness check ({member_windows} begun by a member's fault), slowest recovery {slowest_ms} ms (seed {slowest_seed}); {:.1} s",
        ops.into_inner(),
        started.elapsed().as_secs_f64()
    );
    println!("{passed} passed, {failed} failed");
    if args.expect_failure {
        if failed == 0 {
            bail!("expected the checkers to catch the planted bug, but {passed} seeds passed");
        }
        println!("caught, as expected: the planted bug failed the checkers");
        return Ok(());
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
