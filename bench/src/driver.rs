//! The closed-loop driver: `clients` threads, each keeping `depth` operations in flight
//! against its own [`Target`], for a bounded time and count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::report::{OpReport, Report};
use crate::workload::{key_for, OpGen, OpKind, Workload};

#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct TargetError {
    pub context: String,
    pub message: String,
}

impl TargetError {
    pub fn new(context: impl Into<String>, message: impl ToString) -> TargetError {
        TargetError { context: context.into(), message: message.to_string() }
    }
}

/// A completed operation. `ok` is false for operation errors (the run counts them and
/// goes on); a missing key on a get is not an error.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub token: u64,
    pub ok: bool,
}

/// A system under test, as one client thread sees it.
pub trait Target {
    /// Starts an operation; returns a token that its `Done` will carry.
    fn submit(&mut self, op: OpKind, key: &[u8], value: &[u8]) -> Result<u64, TargetError>;
    /// Waits at most `timeout` and appends what completed to `done`.
    fn poll(&mut self, done: &mut Vec<Done>, timeout: Duration) -> Result<(), TargetError>;
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub target: String,
    pub workload: Workload,
    pub clients: usize,
    pub depth: usize,
    pub value_size: usize,
    pub keys: u64,
    pub duration: Duration,
    /// Operations before this point are not recorded.
    pub warmup: Duration,
    /// Stop after this many operations in all (bounds a run on a fast machine).
    pub ops_max: u64,
    pub seed: u64,
}

/// Live counters for a progress line, shared with the caller.
#[derive(Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    pub stop: AtomicBool,
}

/// Slowest latency a histogram records exactly; slower ones are clamped to it.
const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// How long a thread waits for its last operations after the run's end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

struct ThreadResult {
    get: Histogram<u64>,
    put: Histogram<u64>,
    errors: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Runs the load. `make_target(i)` builds client thread `i`'s target on that thread.
pub fn run<T, M>(config: &RunConfig, make_target: M, progress: &Progress) -> Result<Report, TargetError>
where
    T: Target,
    M: Fn(usize) -> Result<T, TargetError> + Sync,
{
    assert!(config.clients > 0 && config.depth > 0, "clients and depth must be at least 1");
    let started = Instant::now();
    let results: Vec<Result<ThreadResult, TargetError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..config.clients)
            .map(|i| {
                let make_target = &make_target;
                scope.spawn(move || client_thread(i, config, make_target(i)?, progress, started))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench client thread panicked")).collect()
    });
    let elapsed = started.elapsed().saturating_sub(config.warmup);
    let mut get = histogram();
    let mut put = histogram();
    let mut errors = 0;
    for r in results {
        let r = r?;
        get.add(&r.get).expect("same bounds");
        put.add(&r.put).expect("same bounds");
        errors += r.errors;
    }
    let mut all = get.clone();
    all.add(&put).expect("same bounds");
    Ok(Report::new(config, elapsed, &all, errors, OpReport::from_histogram(&get, elapsed), OpReport::from_histogram(&put, elapsed)))
}

fn client_thread<T: Target>(
    index: usize,
    config: &RunConfig,
    mut target: T,
    progress: &Progress,
    started: Instant,
) -> Result<ThreadResult, TargetError> {
    let mut rng = SmallRng::seed_from_u64(config.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let gen = OpGen::new(config.workload, config.keys);
    let value: Vec<u8> = (0..config.value_size).map(|i| (i % 251) as u8).collect();
    let mut key = Vec::with_capacity(32);
    let mut in_flight: Vec<(u64, OpKind, Instant)> = Vec::with_capacity(config.depth);
    let mut done = Vec::with_capacity(config.depth);
    let mut result = ThreadResult { get: histogram(), put: histogram(), errors: 0 };
    let deadline = started + config.warmup + config.duration;
    let record_from = started + config.warmup;
    let ops_share = config.ops_max.div_ceil(config.clients as u64);
    let mut submitted = 0u64;
    loop {
        let now = Instant::now();
        let running = now < deadline && submitted < ops_share && !progress.stop.load(Ordering::Relaxed);
        if !running && in_flight.is_empty() {
            break;
        }
        if !running && now > deadline + DRAIN_TIMEOUT {
            return Err(TargetError::new(
                format!("client {index}"),
                format!("{} operations still in flight {DRAIN_TIMEOUT:?} after the run ended", in_flight.len()),
            ));
        }
        while running && in_flight.len() < config.depth && submitted < ops_share {
            let (op, k) = gen.next(&mut rng);
            key_for(k, &mut key);
            let token = target.submit(op, &key, if op == OpKind::Put { &value } else { &[] })?;
            in_flight.push((token, op, Instant::now()));
            submitted += 1;
        }
        done.clear();
        target.poll(&mut done, Duration::from_millis(10))?;
        let now = Instant::now();
        let mut errors = 0;
        for d in &done {
            let at = in_flight.iter().position(|(t, ..)| *t == d.token).ok_or_else(|| {
                TargetError::new(format!("client {index}"), format!("completion for unknown token {}", d.token))
            })?;
            let (_, op, start) = in_flight.swap_remove(at);
            if !d.ok {
                errors += 1;
            }
            if start >= record_from {
                let ns = (now - start).as_nanos().clamp(1, LATENCY_NS_MAX as u128) as u64;
                let h = if op == OpKind::Get { &mut result.get } else { &mut result.put };
                h.record(ns).expect("clamped into the histogram's range");
            }
        }
        result.errors += errors;
        progress.ops.fetch_add(done.len() as u64, Ordering::Relaxed);
        progress.errors.fetch_add(errors, Ordering::Relaxed);
    }
    Ok(result)
}
