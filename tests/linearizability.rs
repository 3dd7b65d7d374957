//! Concurrent clients on a few keys while a brick is killed and recovered; the recorded
//! history (invoke and completion of every operation) is checked for per-key
//! linearizability. Built with `--features mutation-lost-commit` (a replica that
//! acknowledges commits without applying them), the same test must find the violation.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_all, get_on, key, run_ok, text, write_all, TestCluster};
use dds::check::{check, Event, Operation};

const THREADS: usize = 4;
const KEYS: usize = 6;
const OPS_PER_THREAD_MAX: usize = 4000;
/// Between one thread's operations, so the history spans the kill and the recovery.
const PAUSE: Duration = Duration::from_micros(500);

fn client_thread(t: usize, addrs: Vec<std::net::SocketAddr>, base: dds::ClientConfig, start: Instant, stop: Arc<AtomicBool>) -> Vec<Operation> {
    let config = dds::ClientConfig { op_timeout: Duration::from_secs(3), ..base };
    let mut client = dds::Client::connect(&addrs, config).expect("connect");
    let mut history = Vec::new();
    let now = || start.elapsed().as_micros() as u64;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && history.len() < OPS_PER_THREAD_MAX {
        seq += 1;
        // A fixed, thread-varied pattern: no randomness needed to interleave.
        let key = format!("lin-{}", (seq as usize * 7 + t * 3) % KEYS).into_bytes();
        let value = ((seq + t as u64) % 3 == 0).then(|| format!("t{t}-s{seq}").into_bytes());
        history.extend(common::recorded_op(&mut client, key, value, now));
        std::thread::sleep(PAUSE);
    }
    history
}

#[test]
fn concurrent_history_through_a_kill_and_recovery_is_linearizable() {
    through_a_kill_and_recovery(&["--replicas", "2"]);
}

/// The same with values in the log and no cache: every read that is not of a value
/// written in its round goes to the disk (an io_uring read the core does not wait for).
#[test]
fn concurrent_history_through_a_kill_and_recovery_is_linearizable_with_values_in_the_log() {
    through_a_kill_and_recovery(&["--replicas", "2", "--cache-mb", "0"]);
}

fn through_a_kill_and_recovery(flags: &[&str]) {
    let mut cluster = TestCluster::up_with(3, 1, flags);
    let dir = cluster.dir_arg();
    let addrs = cluster.file().addrs();
    // Data in most partitions, so the restarted brick catches up from its own.
    write_all(&mut cluster.client(), "pre", 300);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (addrs, stop, base) = (addrs.clone(), Arc::clone(&stop), cluster.file().client_config());
            std::thread::spawn(move || client_thread(t, addrs, base, start, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "1"]);
    let killed_us = start.elapsed().as_micros() as u64;
    std::thread::sleep(Duration::from_millis(700));
    let out = run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "1"]);
    let recovered_us = start.elapsed().as_micros() as u64;
    println!("{}", text(&out.stdout));
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let history: Vec<Operation> = threads.into_iter().flat_map(|t| t.join().expect("client thread")).collect();
    let writes = history.iter().filter(|o| matches!(o.event, Event::Write(_))).count();
    let unknown = history.iter().filter(|o| matches!(o.event, Event::MaybeWrite(_))).count();
    let checked = check(&history);
    println!(
        "history: {} operations ({writes} acknowledged writes, {unknown} of unknown outcome, the rest reads) on {KEYS} keys: {checked:?}",
        history.len()
    );
    assert!(history.len() > 500, "too short a history to mean anything");
    for (what, at) in [("the kill", killed_us), ("the recovery", recovered_us)] {
        assert!(history.iter().any(|o| o.invoke > at), "no operation after {what}: the history does not span it");
    }
    if cfg!(feature = "mutation-lost-commit") {
        assert!(checked.is_err(), "the broken build (lost commits) passed the checker");
    } else {
        checked.expect("the history is linearizable");
        let said = text(&out.stdout);
        let caught_up: usize = said.split("copied (").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(caught_up > 0, "the restarted brick caught up no partition from its own data: {said}");
        // Once quiet, every replica of every key holds what a client reads.
        let mut client = cluster.client();
        check_all(&mut client, "pre", 300);
        let map = client.map().clone();
        let keys: Vec<Vec<u8>> = (0..KEYS).map(|k| format!("lin-{k}").into_bytes()).chain((0..300).map(|i| key("pre", i))).collect();
        for k in &keys {
            let read = client.get(k).expect("a read once quiet");
            let (_, group) = map.route(dds::map::key_hash(k));
            for &b in group {
                let (status, value) = get_on(&map, cluster.file().secret.as_deref(), b, k);
                let held = (status == dds::proto::Status::Ok).then_some(value);
                assert_eq!(held, read, "{} on replica {b}", String::from_utf8_lossy(k));
            }
        }
        println!("{} keys read back alike from every replica", keys.len());
    }
    cluster.down();
}
