//! Failpoints in the real binary's I/O paths (`--features failpoints`; `ci/test.sh` runs
//! this file so): a panic in a core thread ends the brick process at once and the
//! authority removes it; a failed fsync or log write stops the brick with the error; lost
//! heartbeats fence it and get it removed; lost copy chunks are retried by the
//! authority's copy driver and the new replica ends with every value. The brick processes inherit `FAILPOINTS` from
//! `dds cluster up` / `restart`.
#![cfg(feature = "failpoints")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{process_alive, run_ok, text, wait_exit, TestCluster};
use dds::map::key_hash;

fn dds_with(failpoints: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dds")).args(args).env("FAILPOINTS", failpoints).output().expect("run dds");
    assert!(out.status.success(), "dds {args:?}: {}\n{}", text(&out.stdout), text(&out.stderr));
    out
}

/// Kills brick `index` and starts it again with `failpoints` armed; returns its entry.
fn restart_armed(cluster: &TestCluster, index: usize, failpoints: &str) -> dds::cli::cluster::ClusterBrick {
    let (dir, i) = (cluster.dir_arg(), index.to_string());
    common::run_ok(&["cluster", "kill", "--dir", &dir, "--brick", &i]);
    dds_with(failpoints, &["cluster", "restart", "--dir", &dir, "--brick", &i]);
    cluster.file().bricks[index].clone()
}

#[test]
fn a_panicking_core_ends_its_brick_process_at_once_and_the_authority_removes_it() {
    let cluster = TestCluster::up_with(3, 2, &["--replicas", "2"]);
    // Brick 1 again, with the failpoint armed: a request for "boom" panics its core.
    let b = restart_armed(&cluster, 1, "core-panic-on-key=return(boom)");
    let victim = b.pid;
    // Wait until the restarted brick is readable for some key, then ask it for "boom"
    // directly on the core that stores it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let core_addr = loop {
        let map = cluster.authority_map();
        if let Some((&id, addr)) = map.bricks().iter().find(|(_, a)| a.cores[0] == b.addr) {
            if map.partitions_of(id).all(|p| map.is_readable(p, id)) && map.partitions_of(id).count() > 0 {
                break addr.cores[map.core_of(key_hash(b"boom"), addr.cores.len())];
            }
        }
        assert!(Instant::now() < deadline, "the restarted brick never became readable");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = Vec::new();
    dds::proto::encode(
        &mut out,
        &dds::proto::Frame { kind: dds::proto::Kind::Request(dds::proto::Op::Get), request_id: 1, epoch: 0, key: b"boom", value: &[] },
    );
    let mut conn = cluster.raw_connect(core_addr);
    std::io::Write::write_all(&mut conn, &out).unwrap();
    let sent = Instant::now();
    while process_alive(victim) {
        assert!(sent.elapsed() < Duration::from_secs(2), "the brick with a panicked core is still alive");
        std::thread::sleep(Duration::from_millis(1));
    }
    let exit_ms = sent.elapsed().as_millis();
    println!("brick process gone {exit_ms} ms after the request that panicked its core");
    assert!(exit_ms <= 100, "the brick took {exit_ms} ms to exit after a core panicked");
    let log = cluster.brick_log(1);
    assert!(log.contains("fail-stop") && log.contains("core-panic-on-key"), "the panic is in the brick log:\n{log}");
    assert!(cluster.authority_drops(b.addr, Duration::from_secs(5)), "the authority still holds a brick whose process ended");
    // The rest of the cluster serves every key.
    let mut client = cluster.client();
    client.put(b"after", b"the panic").expect("write after the panic");
    assert_eq!(client.get(b"after").unwrap().as_deref(), Some(&b"the panic"[..]));
}

#[test]
fn a_failed_fsync_stops_the_brick_with_the_error() {
    let dir = tempfile::Builder::new().prefix("dds-fp-").tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    // Every fdatasync through the log fails after the one that lays out the new
    // segment at start-up: the first write's does.
    dds_with("log-fsync=1*off->return", &["cluster", "up", "--dir", &d, "--bricks", "1", "--cores", "1"]);
    let cluster = TestCluster { dir, down: false };
    let pid = cluster.file().bricks[0].pid;
    let mut client = cluster.client();
    assert!(client.put(b"k", b"v").is_err(), "a write whose fsync failed was acknowledged");
    assert!(wait_exit(pid, Duration::from_secs(5), Duration::from_millis(10)), "a brick whose fsync failed kept running");
    let log = cluster.brick_log(0);
    assert!(log.contains("fdatasync") && log.contains("failpoint log-fsync"), "the brick log names the failed fsync:\n{log}");
}

/// Values kept in the log: a value that cannot be read back, and a cleaner's read that
/// fails, each stop the brick with the error in its log (never a wrong answer); started
/// again unarmed, it reads back every value.
#[test]
fn a_failed_read_of_a_value_or_by_the_cleaner_stops_the_brick_and_loses_nothing() {
    let cluster = TestCluster::up_with(1, 1, &["--cache-mb", "0", "--checkpoint-log-mb", "0.25"]);
    let mut client = cluster.client();
    let value = |k: u32, round: u32| format!("{k}:{round}:{}", ".".repeat(900)).into_bytes();
    // Overwrites: old segments fall below half live, and the cleaner has work.
    for round in 0..4 {
        for k in 0..500u32 {
            client.put(format!("k{k}").as_bytes(), &value(k, round)).expect("put");
        }
    }
    drop(client);
    for (failpoint, what) in [("value-read=return", "failpoint value-read"), ("cleaner-read=return", "failpoint cleaner-read")] {
        let b = if failpoint.starts_with("value-read") {
            restart_armed(&cluster, 0, failpoint)
        } else {
            // Stopped by the last failpoint already.
            dds_with(failpoint, &["cluster", "restart", "--dir", &cluster.dir_arg(), "--brick", "0"]);
            cluster.file().bricks[0].clone()
        };
        if failpoint.starts_with("value-read") {
            let mut client = cluster.client();
            let got = client.get(b"k7");
            assert!(got.is_err(), "a value that could not be read was answered: {got:?}");
        } else {
            // The cleaner starts on its own; writes give it more to do.
            let mut client = cluster.client();
            for k in 0..500u32 {
                if client.put(format!("k{k}").as_bytes(), &value(k, 4)).is_err() {
                    break;
                }
            }
        }
        assert!(wait_exit(b.pid, Duration::from_secs(10), Duration::from_millis(10)), "a brick whose read failed ({failpoint}) kept running");
        let log = cluster.brick_log(0);
        assert!(log.contains(what), "the brick log names the failed read:\n{log}");
    }
    run_ok(&["cluster", "restart", "--dir", &cluster.dir_arg(), "--brick", "0"]);
    let mut client = cluster.client();
    for k in 0..500u32 {
        let got = client.get(format!("k{k}").as_bytes()).expect("get").expect("present");
        assert!(got == value(k, 3) || got == value(k, 4), "k{k} holds {:?}", String::from_utf8_lossy(&got[..12]));
    }
}

#[test]
fn lost_heartbeats_fence_a_brick_and_get_it_removed() {
    let cluster = TestCluster::up_with(3, 1, &["--replicas", "2"]);
    // After 40 heartbeats (about 2 s) every one is lost.
    let b = restart_armed(&cluster, 2, "rpc-heartbeat=40*off->return");
    assert!(wait_exit(b.pid, Duration::from_secs(20), Duration::from_millis(20)), "a brick that lost every heartbeat kept running");
    let log = cluster.brick_log(2);
    assert!(log.contains("fenced"), "the brick fenced itself before it was removed:\n{log}");
    // Its closed session removes it once its lease has surely run out (550 ms after
    // the last heartbeat the authority heard, `CLOSED_REMOVAL_MS`).
    assert!(cluster.authority_drops(b.addr, Duration::from_secs(3)), "the authority still holds the silent brick 3 s after it exited");
    let mut client = cluster.client();
    client.put(b"k", b"v").expect("the rest of the cluster takes writes");
}

#[test]
fn lost_copy_chunks_are_retried_and_the_new_replica_holds_every_value() {
    let dir = tempfile::Builder::new().prefix("dds-fp-").tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    // The authority's first three snapshot requests (probes or chunks) are lost.
    dds_with("rpc-snapshot-chunk=3*return->off", &["cluster", "up", "--dir", &d, "--bricks", "3", "--cores", "1", "--replicas", "2"]);
    let cluster = TestCluster { dir, down: false };
    let mut client = cluster.client();
    common::write_all(&mut client, "copy", 500);
    // Brick 1 dies, is removed, and comes back under a new id: its partitions are copied
    // to it. (Back before its removal, it would keep its id and its data.)
    let gone = cluster.file().bricks[1].addr;
    common::run_ok(&["cluster", "kill", "--dir", &d, "--brick", "1"]);
    assert!(cluster.authority_drops(gone, Duration::from_secs(10)), "the authority did not remove a killed brick");
    common::run_ok(&["cluster", "restart", "--dir", &d, "--brick", "1"]);
    let back = cluster.file().bricks[1].addr;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map = cluster.authority_map();
        let id = map.bricks().iter().find(|(_, a)| a.cores[0] == back).map(|(id, _)| *id);
        if id.is_some_and(|id| map.partitions_of(id).count() > 0) && map.joining().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the copy to the restarted brick never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let meta_log = cluster.meta_logs();
    assert!(meta_log.contains("failpoint") && meta_log.contains("retrying"), "the lost chunks were not retried:\n{meta_log}");
    // Brick 0 dies: what it shared with brick 1 is now served by the copy alone.
    common::run_ok(&["cluster", "kill", "--dir", &d, "--brick", "0"]);
    let mut client = cluster.client();
    common::check_all(&mut client, "copy", 500);
}
