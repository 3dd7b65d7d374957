//! Process pauses on the real binary (SIGSTOP, then SIGCONT): what a VM stall, a long
//! GC-like pause or a debugger does to a brick. A paused brick that the authority
//! removed must not answer, when it resumes, the reads that queued up meanwhile; a brick
//! paused under load either keeps serving correctly or exits, never lives on with a dead
//! core. Histories are checked by the project's linearizability checker.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{process_alive, run_ok, wait_exit, TestCluster};
use dds::check::{check, Event, Operation};
use dds::map::{key_hash, BrickId, ClusterMap};
use dds::proto::{decode, encode, Frame, Kind, Op, Status};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("{sig} to pid {pid}: {e}"));
}

/// The cluster index of the brick the map knows as `id` (by its core 0 address).
fn index_of(cluster: &TestCluster, map: &ClusterMap, id: BrickId) -> usize {
    let addr = map.bricks()[&id].cores[0];
    cluster.file().bricks.iter().position(|b| b.addr == addr).expect("the brick is in cluster.json")
}

/// The names of a process's threads.
fn threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks.flatten().filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok()).map(|s| s.trim().to_string()).collect()
}

fn get_frame(out: &mut Vec<u8>, id: u64, epoch: u64, key: &[u8]) {
    encode(out, &Frame { kind: Kind::Request(Op::Get), request_id: id, epoch, key, value: &[] });
}

/// Reads whole frames from `stream` until `n` came, it closes, or `deadline`.
fn read_replies(stream: &mut TcpStream, n: usize, deadline: Instant) -> Vec<(u64, Status, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while got.len() < n && Instant::now() < deadline {
        stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        }
        while let Ok(Some((frame, len))) = decode(&buf) {
            if let Kind::Reply(_, status) = frame.kind {
                got.push((frame.request_id, status, frame.value.to_vec()));
            }
            buf.drain(..len);
        }
    }
    got
}

const STALE_ROUNDS: usize = 50;

/// The fault-injection harness's stale read, as a test: reads at the old epoch queue up
/// at a brick that is paused, removed by the authority and resumed 1-40 ms after a new
/// value was acknowledged elsewhere. None of them may return the old value.
#[test]
fn a_paused_and_removed_brick_never_answers_queued_reads_with_old_values() {
    let cluster = TestCluster::up_with(3, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let mut writer = dds::Client::connect(&cluster.file().addrs(), cluster.file().client_config()).expect("connect");
    let start = Instant::now();
    let now = || start.elapsed().as_micros() as u64;
    let mut history = Vec::new();
    let (mut queued_served, mut refused) = (0usize, 0usize);
    for round in 0..STALE_ROUNDS {
        let key = format!("pause-{round}").into_bytes();
        let old = format!("old-{round}").into_bytes();
        let new = format!("new-{round}").into_bytes();
        let invoke = now();
        writer.put(&key, &old).expect("write the old value");
        history.push(Operation { key: key.clone(), event: Event::Write(Some(old.clone())), invoke, complete: now() });

        // A readable replica of the key, and its core's address, from a settled map.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (map, victim) = loop {
            let map = cluster.authority_map();
            let (p, group) = map.route(key_hash(&key));
            let readable: Vec<BrickId> = map.readable(p).collect();
            if group.len() == 2 && readable.len() == 2 {
                break (map.clone(), readable[round % 2]);
            }
            assert!(Instant::now() < deadline, "the cluster did not get back to two readable replicas");
            std::thread::sleep(Duration::from_millis(50));
        };
        let addr = &map.bricks()[&victim];
        let core_addr: SocketAddr = addr.cores[map.core_of(key_hash(&key), addr.cores.len())];
        let index = index_of(&cluster, &map, victim);
        let pid = cluster.file().bricks[index].pid;
        let mut conn = cluster.raw_connect(core_addr);
        conn.set_nodelay(true).unwrap();
        let mut out = Vec::new();
        // The brick may be a heartbeat behind the authority's map: ask until it serves.
        let serve_deadline = Instant::now() + Duration::from_secs(5);
        loop {
            out.clear();
            get_frame(&mut out, 1, map.epoch(), &key);
            conn.write_all(&out).unwrap();
            let first = read_replies(&mut conn, 1, Instant::now() + Duration::from_secs(5));
            match first.first() {
                Some((1, Status::Ok, v)) if *v == old => break,
                Some((1, Status::Behind, _)) if Instant::now() < serve_deadline => std::thread::sleep(Duration::from_millis(20)),
                other => panic!("the brick does not serve the key before the pause: {other:?}"),
            }
        }

        signal(pid, Signal::SIGSTOP);
        // Reads queued before the authority gives up on the brick.
        let mut sent = Vec::new();
        out.clear();
        for id in 2..4 {
            get_frame(&mut out, id, map.epoch(), &key);
            sent.push((id, now()));
        }
        conn.write_all(&out).unwrap();
        let removal_deadline = Instant::now() + Duration::from_secs(10);
        while cluster.authority_map().bricks().contains_key(&victim) {
            assert!(Instant::now() < removal_deadline, "the authority did not remove a brick paused for 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A new client writes the new value (the harness's scenario): its map is the
        // authority's, without the paused brick.
        let mut fresh = dds::Client::connect(&cluster.file().addrs(), cluster.file().client_config()).expect("connect");
        let invoke = now();
        fresh.put(&key, &new).expect("write the new value without the paused brick");
        history.push(Operation { key: key.clone(), event: Event::Write(Some(new.clone())), invoke, complete: now() });
        // Reads invoked after the new value was acknowledged, queued at the paused brick.
        out.clear();
        for id in 4..8 {
            get_frame(&mut out, id, map.epoch(), &key);
            sent.push((id, now()));
        }
        conn.write_all(&out).unwrap();
        std::thread::sleep(Duration::from_millis(1 + (round as u64 * 13) % 40));
        signal(pid, Signal::SIGCONT);
        let replies = read_replies(&mut conn, sent.len(), Instant::now() + Duration::from_secs(3));
        let resumed = now();
        for (id, status, value) in replies {
            let Some(&(_, invoked)) = sent.iter().find(|(i, _)| *i == id) else { continue };
            match status {
                Status::Ok => {
                    queued_served += 1;
                    history.push(Operation { key: key.clone(), event: Event::Read(Some(value)), invoke: invoked, complete: resumed });
                }
                _ => refused += 1,
            }
        }
        drop(conn);
        // The removed brick stops by itself; started again it rejoins as a new brick.
        assert!(wait_exit(pid, Duration::from_secs(10), Duration::from_millis(10)), "a brick removed while paused did not stop after it resumed");
        run_ok(&["cluster", "restart", "--dir", &dir, "--brick", &index.to_string()]);
    }
    println!("{STALE_ROUNDS} rounds: {queued_served} queued reads answered, {refused} refused; {} operations checked", history.len());
    check(&history).expect("no read returned a value older than one acknowledged before it was sent");
}

/// Load for the pause test: one client thread writing or reading a few keys, recording
/// its history.
fn load_thread(t: usize, addrs: Vec<SocketAddr>, base: dds::ClientConfig, start: Instant, stop: Arc<AtomicBool>) -> Vec<Operation> {
    let config = dds::ClientConfig { op_timeout: Duration::from_secs(3), ..base };
    let mut client = dds::Client::connect(&addrs, config).expect("connect");
    let now = || start.elapsed().as_micros() as u64;
    let mut history = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && history.len() < 200_000 {
        seq += 1;
        let key = format!("load-{}", (seq as usize * 5 + t) % 8).into_bytes();
        let value = (t < 2).then(|| format!("t{t}-{seq}").into_bytes());
        history.extend(common::recorded_op(&mut client, key, value, now));
        std::thread::sleep(Duration::from_micros(300));
    }
    history
}

const PAUSES: usize = 200;

/// Bricks paused and resumed under writers and readers, 200 times, from 5 ms to 2.5 s:
/// after each resume a brick either serves with every core alive or has exited and
/// been removed; never a live process with a dead core. The history is linearizable.
#[test]
fn bricks_paused_under_load_serve_correctly_or_exit() {
    let cluster = TestCluster::up_with(3, 2, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let addrs = cluster.file().addrs();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..3)
        .map(|t| {
            let (addrs, stop, base) = (addrs.clone(), Arc::clone(&stop), cluster.file().client_config());
            std::thread::spawn(move || load_thread(t, addrs, base, start, stop))
        })
        .collect();
    let (mut exited, mut long) = (0, 0);
    let budget = Instant::now() + Duration::from_secs(600);
    for i in 0..PAUSES {
        assert!(Instant::now() < budget, "the pause test ran past its time bound");
        let index = i % 3;
        let b = &cluster.file().bricks[index];
        let pid = b.pid;
        // Mostly short pauses, every tenth past the lease, some past the removal.
        let pause_ms = if i % 10 == 9 {
            long += 1;
            600 + (i as u64 * 197) % 1900
        } else {
            5 + (i as u64 * 37) % 200
        };
        signal(pid, Signal::SIGSTOP);
        std::thread::sleep(Duration::from_millis(pause_ms));
        signal(pid, Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(60));
        if process_alive(pid) {
            let cores = threads(pid).iter().filter(|n| n.starts_with("dds-core-")).count();
            if cores == b.cores {
                continue;
            }
            // Fewer cores: only a brick on its way out (removed while paused, its cores
            // stopped) may be seen so, and it must be gone soon.
            assert!(
                wait_exit(pid, Duration::from_secs(3), Duration::from_millis(5)),
                "brick {index} lives on after a {pause_ms} ms pause with {cores} of {} core threads",
                b.cores
            );
        }
        // It exited (removed while paused): the authority must not keep it in the map.
        exited += 1;
        assert!(cluster.authority_drops(b.addr, Duration::from_secs(5)), "brick {index} exited but the authority still holds it");
        run_ok(&["cluster", "restart", "--dir", &dir, "--brick", &index.to_string()]);
    }
    stop.store(true, Ordering::Relaxed);
    let history: Vec<Operation> = load.into_iter().flat_map(|t| t.join().expect("load thread")).collect();
    let writes = history.iter().filter(|o| matches!(o.event, Event::Write(_))).count();
    println!("{PAUSES} pauses ({long} long), {exited} exits; {} operations ({writes} acknowledged writes)", history.len());
    assert!(writes > 100, "too few writes to mean anything");
    check(&history).expect("the history under pauses is linearizable");
    // Every key is readable once the pauses are over.
    let mut client = cluster.client();
    for k in 0..8 {
        let key = format!("load-{k}").into_bytes();
        client.get(&key).unwrap_or_else(|e| panic!("load-{k} unreadable after the pauses: {e}"));
    }
}
