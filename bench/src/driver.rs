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
    /// Open loop: this many operations per second in all, on a fixed schedule; latency
    /// counts from when an operation was due, not when it was sent (coordinated-omission
    /// correction). `depth` still caps what one client has in flight. `None`: closed loop.
    pub rate: Option<f64>,
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

/// Puts every key of a workload once (`depth` in flight), calling `on_progress` with the
/// count done. Any failed put fails the preload.
pub fn preload<T: Target>(
    target: &mut T,
    keys: u64,
    value_size: usize,
    depth: usize,
    mut on_progress: impl FnMut(u64),
) -> Result<(), TargetError> {
    let value: Vec<u8> = (0..value_size).map(|i| (i % 251) as u8).collect();
    let mut key = Vec::new();
    let mut done = Vec::new();
    let (mut next, mut completed, mut in_flight) = (0u64, 0u64, 0usize);
    let deadline = Instant::now() + Duration::from_secs(600);
    while completed < keys {
        if Instant::now() > deadline {
            return Err(TargetError::new("preload", format!("only {completed} of {keys} keys written in 600 s")));
        }
        while next < keys && in_flight < depth.max(1) {
            key_for(next, &mut key);
            target.submit(OpKind::Put, &key, &value)?;
            next += 1;
            in_flight += 1;
        }
        done.clear();
        target.poll(&mut done, Duration::from_millis(100))?;
        for d in &done {
            if !d.ok {
                return Err(TargetError::new("preload", "a put failed"));
            }
        }
        completed += done.len() as u64;
        in_flight -= done.len();
        on_progress(completed);
    }
    Ok(())
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
    // Written values follow the seed (the preload's are seed 0's), so a run with
    // another seed changes every key it writes.
    let value: Vec<u8> = (0..config.value_size).map(|i| ((i as u64).wrapping_add(config.seed) % 251) as u8).collect();
    let mut key = Vec::with_capacity(32);
    let mut in_flight: Vec<(u64, OpKind, Instant)> = Vec::with_capacity(config.depth);
    let mut done = Vec::with_capacity(config.depth);
    let mut result = ThreadResult { get: histogram(), put: histogram(), errors: 0 };
    let deadline = started + config.warmup + config.duration;
    let record_from = started + config.warmup;
    let ops_share = config.ops_max.div_ceil(config.clients as u64);
    let mut submitted = 0u64;
    // Open loop: each client keeps its share of the rate on its own schedule.
    let interval = config.rate.map(|rate| Duration::from_secs_f64(config.clients as f64 / rate));
    let mut next_due = Instant::now();
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
            let due = match interval {
                None => Instant::now(),
                Some(_) if next_due > now => break,
                Some(interval) => {
                    let due = next_due;
                    next_due += interval;
                    due
                }
            };
            let (op, k) = gen.next(&mut rng);
            key_for(k, &mut key);
            let token = target.submit(op, &key, if op == OpKind::Put { &value } else { &[] })?;
            in_flight.push((token, op, due));
            submitted += 1;
        }
        done.clear();
        let wait = match interval {
            Some(_) if running => next_due.saturating_duration_since(Instant::now()).min(Duration::from_millis(10)),
            _ => Duration::from_millis(10),
        };
        target.poll(&mut done, wait)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Completes each operation `service` after it was submitted, except that nothing
    /// completes before `stall_until` (a server pause).
    struct Fake {
        service: Duration,
        stall_until: Instant,
        pending: std::collections::VecDeque<(u64, Instant)>,
        next: u64,
    }

    impl Target for Fake {
        fn submit(&mut self, _op: OpKind, _key: &[u8], _value: &[u8]) -> Result<u64, TargetError> {
            self.next += 1;
            self.pending.push_back((self.next, Instant::now() + self.service));
            Ok(self.next)
        }

        fn poll(&mut self, done: &mut Vec<Done>, timeout: Duration) -> Result<(), TargetError> {
            std::thread::sleep(timeout.min(Duration::from_micros(200)));
            let now = Instant::now();
            while let Some(&(token, at)) = self.pending.front() {
                if at > now || now < self.stall_until {
                    break;
                }
                self.pending.pop_front();
                done.push(Done { token, ok: true });
            }
            Ok(())
        }
    }

    fn config(rate: Option<f64>, depth: usize) -> RunConfig {
        RunConfig {
            target: "fake".into(),
            workload: Workload::Mixed,
            clients: 2,
            depth,
            value_size: 8,
            keys: 100,
            duration: Duration::from_millis(600),
            warmup: Duration::ZERO,
            ops_max: 1_000_000,
            seed: 7,
            rate,
        }
    }

    fn fake(stall: Duration) -> Fake {
        Fake { service: Duration::from_micros(100), stall_until: Instant::now() + stall, pending: Default::default(), next: 0 }
    }

    #[test]
    fn open_loop_keeps_its_rate() {
        let report = run(&config(Some(2000.0), 64), |_| Ok(fake(Duration::ZERO)), &Progress::default()).unwrap();
        // 2000 ops/s for 0.6 s, give or take the schedule's edges.
        assert!((1000..=1300).contains(&report.total.ops), "{} ops", report.total.ops);
        assert_eq!(report.errors, 0);
    }

    #[test]
    fn open_loop_counts_a_stall_against_every_operation_it_delayed() {
        // A 200 ms stall at the start: closed loop with depth 1 records about one slow
        // operation per client; open loop records every operation that was due during it.
        let stall = Duration::from_millis(200);
        let closed = run(&config(None, 1), |_| Ok(fake(stall)), &Progress::default()).unwrap();
        let open = run(&config(Some(2000.0), 1000), |_| Ok(fake(stall)), &Progress::default()).unwrap();
        assert!(closed.total.p50_us < 10_000.0, "closed-loop p50 {} us", closed.total.p50_us);
        // A third of the open-loop run was due inside the stall: its p99 sees it.
        assert!(open.total.p99_us > 100_000.0, "open-loop p99 {} us hides the stall", open.total.p99_us);
        assert!(open.total.max_us >= 190_000.0, "open-loop max {} us", open.total.max_us);
    }

    #[test]
    fn closed_loop_is_bounded_by_ops_max() {
        let mut c = config(None, 4);
        c.ops_max = 500;
        let report = run(&c, |_| Ok(fake(Duration::ZERO)), &Progress::default()).unwrap();
        assert_eq!(report.total.ops, 500);
    }
}
