//! Durable bricks on the real binary: acknowledged writes survive SIGKILL, a torn tail is
//! dropped, corruption in the middle stops start-up with a message naming the file.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use dds::{ClientConfig, Outcome, Request};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 20;
const KEYS: u64 = 2_000;

/// What a key may hold after a crash: its last acknowledged value, or any value whose put
/// was in flight (unacknowledged) after it.
#[derive(Default, Clone)]
struct Expect {
    acked: Option<Vec<u8>>,
    maybe: Vec<Vec<u8>>,
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    survive_sigkill(&[], ROUNDS, "0.25", 0);
}

/// Values kept in the log with a 1 MiB cache (`--cache-mb 1`) and about 30 MB of them:
/// after each restart nearly every read goes to the disk, through locations that the
/// checkpoints (index snapshots) and the replay rebuilt.
#[test]
fn acknowledged_writes_survive_sigkill_with_values_in_the_log() {
    survive_sigkill(&["--cache-mb", "1"], ROUNDS, "4", 16 << 10);
}

/// The same through io_uring (`--log-io uring`), the other way a log reaches the disk.
#[test]
fn acknowledged_writes_survive_sigkill_with_the_log_on_io_uring() {
    // Fewer rounds, smaller segments: a checkpoint still runs under the kills.
    survive_sigkill(&["--log-io", "uring"], ROUNDS / 2, "0.05", 0);
}

/// `rounds` of SIGKILL under a writer of values of at least `value_bytes`.
fn survive_sigkill(extra: &[&str], rounds: usize, segment_mb: &str, value_bytes: usize) {
    // Small log segments, so checkpoints and log trimming happen under the kills too.
    let mut flags = vec!["--checkpoint-log-mb", segment_mb];
    flags.extend_from_slice(extra);
    let cluster = TestCluster::up_with(1, 2, &flags);
    let dir = cluster.dir_arg();
    let mut rng = SmallRng::seed_from_u64(0xDD5);
    let mut model: HashMap<Vec<u8>, Expect> = HashMap::new();
    let mut acked_total = 0u64;
    let mut checked_total = 0u64;
    for round in 0..rounds {
        let addrs = cluster.file().addrs();
        let kill_after = Duration::from_millis(rng.random_range(20..300));
        let killer = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                std::thread::sleep(kill_after);
                run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "0"]);
            })
        };
        // Short: after the kill, writes on the wire end `Unknown` at once and new ones fail
        // at their deadline.
        let config = ClientConfig { op_timeout: Duration::from_secs(1), ..cluster.file().client_config() };
        let mut client = dds::Client::connect(&addrs, config).unwrap();
        let mut in_flight: HashMap<u64, (Vec<u8>, Vec<u8>)> = HashMap::new();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seq = 0u64;
        'writing: while Instant::now() < deadline {
            while in_flight.len() < 8 {
                let key = format!("crash/{}", rng.random_range(0..KEYS)).into_bytes();
                let mut value = format!("{}:r{round}:s{seq}", String::from_utf8_lossy(&key)).into_bytes();
                value.resize(value.len().max(value_bytes), b'.');
                seq += 1;
                match client.submit(Request::Put(&key, &value)) {
                    Ok(token) => {
                        model.entry(key.clone()).or_default().maybe.push(value.clone());
                        in_flight.insert(token, (key, value));
                    }
                    Err(_) => break 'writing,
                }
            }
            done.clear();
            if client.poll(&mut done, Duration::from_millis(50)).is_err() {
                break;
            }
            let mut failed = false;
            for c in done.drain(..) {
                let (key, value) = in_flight.remove(&c.token).expect("known token");
                match c.result {
                    Ok(Outcome::Stored) => {
                        let e = model.get_mut(&key).unwrap();
                        // Replies on one connection come in order, so this put is later
                        // than every put of this key acknowledged before it.
                        let at = e.maybe.iter().position(|v| *v == value).expect("in flight");
                        e.maybe.drain(..=at);
                        e.acked = Some(value);
                        acked_total += 1;
                    }
                    Ok(other) => panic!("put answered {other:?}"),
                    Err(_) => failed = true,
                }
            }
            if failed {
                break;
            }
        }
        killer.join().unwrap();
        drop(client);
        // The brick may still be dying; restart waits until the old one is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "restart failed: {}", text(&out.stderr));
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut reader = cluster.client();
        for (key, e) in model.iter_mut() {
            let got = reader.get(key).unwrap();
            let ok = got == e.acked || got.as_ref().is_some_and(|v| e.maybe.contains(v));
            assert!(
                ok,
                "round {round}: {} holds {:?}; last acknowledged {:?}, unacknowledged {:?}",
                String::from_utf8_lossy(key),
                got.as_deref().map(String::from_utf8_lossy),
                e.acked.as_deref().map(String::from_utf8_lossy),
                e.maybe.iter().map(|v| String::from_utf8_lossy(v)).collect::<Vec<_>>()
            );
            if e.acked.is_some() {
                checked_total += 1;
            }
            // What survived is now the truth.
            e.acked = got;
            e.maybe.clear();
        }
    }
    assert!(cluster.brick_log(0).contains("checkpoint at lsn"), "no checkpoint ran during the crash test");
    // Every restart kept the log I/O the cluster was made with.
    let log_io = if extra.contains(&"uring") { "log I/O uring" } else { "log I/O syscalls" };
    let starts = cluster.brick_log(0).matches("serving on").count();
    assert_eq!(cluster.brick_log(0).matches(log_io).count(), starts, "a restart changed the log I/O: {}", cluster.brick_log(0));
    if extra.contains(&"--cache-mb") {
        assert_eq!(cluster.brick_log(0).matches("values in the log").count(), starts, "a restart kept values elsewhere");
        assert!(cluster.brick_log(0).contains("cleaned log segment"), "the cleaner never ran");
        // Disk use under overwrite churn: the log segments against the live values.
        let live: u64 = model.iter().filter_map(|(k, e)| e.acked.as_ref().map(|v| (k.len() + v.len()) as u64)).sum();
        let logs: u64 = std::fs::read_dir(cluster.path().join("brick-0"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log") && e.file_name().to_string_lossy().starts_with("core-"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        println!("values in the log: {} MB of log segments for {} MB of live values ({:.2}x)", logs / 1_000_000, live / 1_000_000, logs as f64 / live as f64);
        assert!(logs <= 4 * live + (64 << 20), "the log holds {logs} bytes for {live} live: the cleaner does not keep up");
    }
    println!("crash test ({extra:?}): {rounds} rounds of SIGKILL, {acked_total} acknowledged writes, {checked_total} key checks against the last acknowledged value");
    assert!(acked_total > 50 * rounds as u64, "too few writes were acknowledged to mean anything: {acked_total}");
}

/// Core 0's newest log segment.
/// Where a preallocated log's records end (zeros follow).
fn records_end(log: &[u8]) -> usize {
    match dds::log::record::scan(log, |_| {}) {
        Ok(dds::log::record::ScanEnd::Preallocated { offset }) => offset as usize,
        other => panic!("a sync durability brick's log is laid out ahead of its records: {other:?}"),
    }
}

fn log_path(cluster: &TestCluster) -> std::path::PathBuf {
    let dir = cluster.path().join("brick-0");
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("core-0-") && p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    segments.pop().expect("core 0 has a log segment")
}

/// One brick with keys `k0..k{n}` written, then stopped cleanly: its directory argument
/// and the log segment to damage.
fn stopped_with_log(n: u32) -> (TestCluster, String, std::path::PathBuf) {
    let cluster = TestCluster::up(1, 1);
    let mut c = cluster.client();
    for i in 0..n {
        c.put(format!("k{i}").as_bytes(), &[i as u8; 100]).unwrap();
    }
    drop(c);
    let dir = cluster.dir_arg();
    run_ok(&["cluster", "down", "--dir", &dir]);
    let path = log_path(&cluster);
    (cluster, dir, path)
}

#[test]
fn a_torn_tail_is_dropped_and_the_rest_recovered() {
    let (mut cluster, dir, path) = stopped_with_log(200);
    // Lose the end of the last record, as a crash in the middle of its write would: the
    // log is laid out in zeros ahead of its records (a sync durability brick), so what
    // a crash loses reads as zeros.
    let mut bytes = std::fs::read(&path).unwrap();
    let end = records_end(&bytes);
    bytes[end - dds::log::record::SYNC_POINT_LEN - 30..end].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
    assert!(cluster.brick_log(0).contains("dropping a torn tail"), "{}", cluster.brick_log(0));
    let mut c = cluster.client();
    for i in 0..199u32 {
        assert_eq!(c.get(format!("k{i}").as_bytes()).unwrap(), Some(vec![i as u8; 100]), "k{i}");
    }
    assert_eq!(c.get(b"k199").unwrap(), None, "the torn record came back");
    // New writes go after the cut, and survive another restart.
    c.put(b"after", b"cut").unwrap();
    drop(c);
    run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "0"]);
    run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
    assert_eq!(cluster.client().get(b"after").unwrap().as_deref(), Some(&b"cut"[..]));
    cluster.down();
}

#[test]
fn a_flipped_byte_in_the_middle_stops_start_up_naming_the_file() {
    let (mut cluster, dir, path) = stopped_with_log(200);
    let original = std::fs::read(&path).unwrap();
    let mut bad = original.clone();
    bad[records_end(&original) / 2] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let out = run(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
    assert!(!out.status.success(), "a corrupt log was accepted");
    let stderr = text(&out.stderr);
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name) && stderr.contains("corrupt record at offset"), "{stderr}");
    // Nothing was cut: the log is left for an operator.
    assert_eq!(std::fs::read(&path).unwrap(), bad);
    std::fs::write(&path, &original).unwrap();
    run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
    assert_eq!(cluster.client().get(b"k7").unwrap(), Some(vec![7u8; 100]));
    cluster.down();
}

#[test]
fn a_brick_directory_has_one_owner_and_one_shape() {
    let mut cluster = TestCluster::up(1, 1);
    let bdir = cluster.path().join("brick-0");
    let out = run(&["brick", "--dir", bdir.to_str().unwrap(), "--cores", "1"]);
    assert!(!out.status.success() && text(&out.stderr).contains("in use by another brick"), "{}", text(&out.stderr));
    cluster.down();
    let out = run(&["brick", "--dir", bdir.to_str().unwrap(), "--cores", "3"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--cores 1"), "{}", text(&out.stderr));
}

#[test]
fn checkpoints_bound_the_log_and_recover_with_it() {
    let mut cluster = TestCluster::up_with(1, 1, &["--checkpoint-log-mb", "0.1"]);
    let dir = cluster.dir_arg();
    let mut c = cluster.client();
    // About 2.5 MiB of writes over 500 keys: many times the log bound.
    for round in 0..5u32 {
        for i in 0..500u32 {
            c.put(format!("ck{i}").as_bytes(), format!("{round}:{}", "x".repeat(1000)).as_bytes()).unwrap();
        }
    }
    c.remove(b"ck7").unwrap();
    drop(c);
    let bdir = cluster.path().join("brick-0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log_bytes = || -> u64 {
        std::fs::read_dir(&bdir).unwrap().map(|e| e.unwrap()).filter(|e| e.path().extension().is_some_and(|x| x == "log")).map(|e| e.metadata().unwrap().len()).sum()
    };
    // The log stays within the bound or the bytes the core holds (about 0.5 MiB here),
    // whichever is more, plus a laid-out step.
    while log_bytes() > 1 << 20 {
        assert!(Instant::now() < deadline, "log not trimmed: {} bytes", log_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(bdir.join("core-0.ckpt").exists());
    assert!(cluster.brick_log(0).contains("checkpoint at lsn"), "{}", cluster.brick_log(0));
    run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "0"]);
    run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
    let mut c = cluster.client();
    for i in 0..500u32 {
        let want = if i == 7 { None } else { Some(format!("4:{}", "x".repeat(1000)).into_bytes()) };
        assert_eq!(c.get(format!("ck{i}").as_bytes()).unwrap(), want, "ck{i}");
    }
    drop(c);
    // A damaged checkpoint stops start-up and names itself.
    run_ok(&["cluster", "down", "--dir", &dir]);
    let ckpt = bdir.join("core-0.ckpt");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x08;
    std::fs::write(&ckpt, &bytes).unwrap();
    let out = run(&["cluster", "restart", "--dir", &dir, "--brick", "0"]);
    assert!(!out.status.success() && text(&out.stderr).contains("core-0.ckpt"), "{}", text(&out.stderr));
    cluster.down();
}

/// A tmpfs mounted for one test, unmounted on drop.
struct TinyFs(tempfile::TempDir);

impl TinyFs {
    fn mount(bytes: usize) -> TinyFs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", dir.path().to_str().unwrap()])
            .status()
            .expect("run mount");
        assert!(status.success(), "this test mounts a small tmpfs to fill a disk: it needs root (CI runs as root)");
        TinyFs(dir)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_failed_log_write_stops_the_brick() {
    // Room for the log's first two laid-out steps (1 MiB each), not the third.
    let fs = TinyFs::mount(5 << 19);
    let bdir = fs.0.path().join("brick");
    let log = fs.0.path().parent().unwrap().join(format!("dds-enospc-{}.log", std::process::id()));
    let mut brick = dds()
        .args(["brick", "--dir", bdir.to_str().unwrap(), "--cores", "1", "--listen", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let file = loop {
        if let Ok(f) = dds::brick::BrickFile::load(&bdir) {
            break f;
        }
        assert!(Instant::now() < deadline, "brick did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    let config = ClientConfig { op_timeout: Duration::from_secs(2), ..ClientConfig::default() };
    let mut client = dds::Client::connect(&file.addrs[..1], config).unwrap();
    let mut acked = 0;
    let failure = loop {
        match client.put(format!("fill{acked}").as_bytes(), &[7u8; 4096]) {
            Ok(()) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 1000, "2.5 MiB took 4 MiB of writes");
    };
    let status = brick.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(!status.success(), "the brick went on after a failed log write");
    assert!(stderr.contains("No space left on device") && stderr.contains("core 0 failed"), "{stderr}");
    // The brick died under the write: the client cannot know whether it was applied.
    assert!(matches!(failure, dds::ClientError::Unknown { .. } | dds::ClientError::Timeout { .. }), "{failure}");
    println!("disk full after {acked} acknowledged writes: the brick stopped with {status}");
}
