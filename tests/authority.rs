//! The map authority as a raft group, on the real binary: its leader killed again and
//! again under clients that write and read, a majority of its members lost and
//! regained, a brick killed with the leader (the next leader removes it and copies its
//! partitions). Histories are checked by the project's linearizability checker.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{get_on, recorded_op, run_ok, TestCluster};
use dds::check::{check, Event, Operation};
use dds::proto::MemberStatus;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const KILLS: usize = 20;
const CLIENTS: usize = 4;
const KEYS: usize = 8;
/// The longest a leader's death may stop writes (the bound).
const WRITE_STALL_MAX: Duration = Duration::from_millis(1500);

/// Each member's status, by its index in `cluster.json` (`None`: not answering).
fn statuses(cluster: &TestCluster) -> Vec<Option<MemberStatus>> {
    let file = cluster.file();
    file.metas.iter().map(|m| dds::rpc::member_status(m.addr, Duration::from_millis(300), file.secret.as_deref()).ok()).collect()
}

/// The index of the member that leads, waiting up to 10 s for one that all answering
/// members agree on.
fn leader(cluster: &TestCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = statuses(cluster);
        let leaders: Vec<usize> = all.iter().enumerate().filter(|(_, s)| s.is_some_and(|s| s.leader == s.id)).map(|(i, _)| i).collect();
        if let [one] = leaders[..] {
            return one;
        }
        assert!(Instant::now() < deadline, "no single leader within 10 s: {all:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A completed operation's end, in µs since the start, and whether it was a
/// successful write (else a successful read).
type Done = (u64, bool);

/// The longest time in `[from, until]` without a completion of the kind asked, counting
/// from the last one before `from`.
fn longest_gap(done: &[Done], writes: bool, from: u64, until: u64) -> u64 {
    let mut times: Vec<u64> = done.iter().filter(|d| d.1 == writes).map(|d| d.0).collect();
    times.sort_unstable();
    let mut last = times.iter().rev().find(|&&t| t <= from).copied().unwrap_or(from);
    let mut longest = 0;
    for &t in times.iter().filter(|&&t| t > from && t <= until) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(until.saturating_sub(last))
}

#[test]
fn killing_the_authority_leader_twenty_times_loses_no_write_and_stalls_writes_briefly() {
    let mut cluster = TestCluster::up_with(3, 1, &["--replicas", "2"]);
    let file = cluster.file();
    assert_eq!(file.metas.len(), 3, "cluster up starts three authority members");
    let dir = cluster.dir_arg();
    let start = Instant::now();
    let now = move || start.elapsed().as_micros() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let done = Arc::new(Mutex::new(Vec::<Done>::new()));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, history, done, file) = (Arc::clone(&stop), Arc::clone(&history), Arc::clone(&done), file.clone());
            std::thread::spawn(move || {
                let mut client = dds::Client::connect(&file.addrs(), file.client_config()).expect("connect");
                for i in 0..1_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("key-{}", (i as usize * 7 + c) % KEYS).into_bytes();
                    let value = (i % 2 == 0).then(|| format!("c{c}-{i}").into_bytes());
                    let Some(op) = recorded_op(&mut client, key, value, now) else { continue };
                    match op.event {
                        Event::Write(_) => done.lock().unwrap().push((op.complete, true)),
                        Event::Read(_) => done.lock().unwrap().push((op.complete, false)),
                        Event::MaybeWrite(_) => {}
                    }
                    history.lock().unwrap().push(op);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut kills = Vec::new();
    for round in 0..KILLS {
        let l = leader(&cluster);
        let victim = cluster.file().metas[l].clone();
        kills.push(now());
        kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).unwrap();
        // Another member takes over; the dead one starts again and follows it.
        let next = leader(&cluster);
        assert_ne!(next, l, "round {round}: the killed member still leads");
        run_ok(&["cluster", "restart", "--dir", &dir, "--meta"]);
        std::thread::sleep(Duration::from_millis(700));
    }
    std::thread::sleep(Duration::from_millis(500));
    let end = now();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a client thread");
    }
    // Every key read once more on a quiet cluster: the last word for the checker.
    let mut client = cluster.client();
    let mut history = std::mem::take(&mut *history.lock().unwrap());
    for k in 0..KEYS {
        history.push(recorded_op(&mut client, format!("key-{k}").into_bytes(), None, now).expect("a final read"));
    }
    let checked = check(&history).unwrap_or_else(|e| panic!("linearizability: {e}"));
    let done = done.lock().unwrap().clone();
    let (writes, reads) = (done.iter().filter(|d| d.1).count(), done.iter().filter(|d| !d.1).count());
    println!("{checked} operations checked: {writes} writes and {reads} reads acknowledged, {KILLS} leaders killed");
    let mut worst = (0, 0);
    for (k, &at) in kills.iter().enumerate() {
        // Until the next kill (at least 700 ms later), or the end of the workload.
        let until = kills.get(k + 1).copied().unwrap_or(end);
        let (w, r) = (longest_gap(&done, true, at, until), longest_gap(&done, false, at, until));
        println!("kill {k:>2}: writes stalled {:>5} ms, reads {:>5} ms", w / 1000, r / 1000);
        worst = (worst.0.max(w), worst.1.max(r));
    }
    println!("longest stall after a leader's death: writes {} ms, reads {} ms", worst.0 / 1000, worst.1 / 1000);
    assert!(worst.0 <= WRITE_STALL_MAX.as_micros() as u64, "writes stopped for {} ms after a leader's death", worst.0 / 1000);
    // Reads stop only where an election outlasts a brick's lease (500 ms from its last
    // answered heartbeat): never longer than writes may.
    assert!(worst.1 <= WRITE_STALL_MAX.as_micros() as u64, "reads stopped for {} ms after a leader's death", worst.1 / 1000);
    cluster.down();
}

#[test]
fn without_a_majority_bricks_fence_and_service_resumes_when_a_member_returns() {
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    run_ok(&["put", "k", "before", "--cluster", &dir]);
    let file = cluster.file();
    // Two of three members die: no map can change, so no brick may serve past its lease.
    for m in &file.metas[..2] {
        kill(Pid::from_raw(m.pid as i32), Signal::SIGKILL).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let mut raw = dds::rpc::Rpc::connect(file.bricks[0].addr, Duration::from_secs(1), file.secret.as_deref()).expect("connect");
    let epoch = cluster.authority_map().epoch();
    let (status, why) = raw.call(dds::proto::Op::Get, epoch, b"k", b"", Duration::from_secs(1)).expect("answered");
    assert_eq!(status, dds::proto::Status::Unavailable, "{}", String::from_utf8_lossy(&why));
    assert!(String::from_utf8_lossy(&why).contains("fenced"), "{}", String::from_utf8_lossy(&why));
    // One returns: a majority again, and reads and writes resume by themselves.
    run_ok(&["cluster", "restart", "--dir", &dir, "--meta"]);
    let back = Instant::now();
    let mut client = cluster.client();
    let deadline = back + Duration::from_secs(10);
    loop {
        if client.put(b"k", b"after").is_ok() && client.get(b"k").ok().flatten().as_deref() == Some(&b"after"[..]) {
            break;
        }
        assert!(Instant::now() < deadline, "service did not resume within 10 s of a majority's return");
    }
    let resumed = back.elapsed();
    println!("reads and writes resumed {} ms after the members came back", resumed.as_millis());
    assert!(resumed <= Duration::from_secs(2), "resumed only after {resumed:?}");
    cluster.down();
}


/// The map as the member at `addr` serves it (`None`: it does not answer).
fn map_of(cluster: &TestCluster, addr: std::net::SocketAddr) -> Option<dds::map::ClusterMap> {
    dds::rpc::fetch_map(&[addr], Duration::from_millis(500), cluster.file().secret.as_deref()).ok()
}

#[test]
fn a_brick_killed_with_the_authority_leader_is_removed_and_re_replicated_by_the_next_leader_losing_no_write() {
    use common::{check_all, key, value, write_all};
    const BEFORE: usize = 300;
    /// The writer's bounds: this many writes at most, for this long at most.
    const DURING_MAX: usize = 2_000;
    const WRITING_MAX: Duration = Duration::from_secs(25);
    let mut cluster = TestCluster::up_with(3, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let file = cluster.file();
    assert_eq!((file.metas.len(), file.bricks.len()), (3, 3));
    let mut client = cluster.client();
    write_all(&mut client, "before", BEFORE);

    let victim = &file.bricks[1];
    let start_map = cluster.authority_map();
    let dead = *start_map.bricks().iter().find(|(_, a)| a.cores[0] == victim.addr).expect("the victim is in the map").0;
    assert!(start_map.groups().values().all(|g| g.len() == 2));
    assert!(start_map.partitions_of(dead).count() > 0, "the victim holds replicas");

    // A writer through the whole failure and recovery, on keys of its own (one write
    // each): a failed write may or may not have landed, an acknowledged one must stay.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, file) = (Arc::clone(&stop), file.clone());
        std::thread::spawn(move || {
            let config = dds::ClientConfig { op_timeout: Duration::from_secs(4), ..file.client_config() };
            let mut client = dds::Client::connect(&file.addrs(), config).expect("connect");
            let began = Instant::now();
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            for i in 0..DURING_MAX {
                if stop.load(Ordering::Relaxed) || began.elapsed() > WRITING_MAX {
                    break;
                }
                let at = began.elapsed();
                match client.put(&key("during", i), &value("during", i)) {
                    Ok(()) => acked.push((i, at, began.elapsed())),
                    Err(e) => failed.push((i, e.to_string())),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (began, acked, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Brick first, then the leader, back to back. This is the harder order: the leader
    // sees the brick's session close at once and would remove it 550 ms later
    // (CLOSED_REMOVAL_MS), but it dies first, so the one member that knew of the death
    // takes that knowledge with it (nothing of it is in the replicated state). The next
    // leader must find the brick dead from its silence alone, starting from a full
    // timeout of its own, while the writes of the partitions the brick held wait on a
    // participant that no one is about to remove. (Leader first, the brick dies while
    // no one leads and simply never registers with the next leader: the next leader's
    // ordinary path.)
    let old = leader(&cluster);
    let killed = Instant::now();
    kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(file.metas[old].pid as i32), Signal::SIGKILL).unwrap();
    let gap = killed.elapsed();

    let next = leader(&cluster);
    let elected = killed.elapsed();
    assert_ne!(next, old, "the killed member still leads");
    let leader_addr = file.metas[next].addr;
    // The dead brick leaves the map, then every partition is back to 2 readable replicas.
    let deadline = killed + Duration::from_secs(25);
    let mut removed = None;
    let settled = loop {
        let map = map_of(&cluster, leader_addr);
        if let Some(map) = &map {
            if removed.is_none() && !map.bricks().contains_key(&dead) {
                removed = Some((killed.elapsed(), map.epoch()));
            }
            let full = map.groups().values().all(|g| g.len() == 2) && map.joining().is_empty() && map.leaving().is_empty();
            if removed.is_some() && full {
                break map.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "25 s after the kill: dead brick {dead} {}; map: {map:?}\nauthority logs:\n{}",
            if removed.is_some() { "removed" } else { "still in the map" },
            cluster.meta_logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let rereplicated = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (began, acked, failed) = writer.join().expect("the writer");
    let (removed, removal_epoch) = removed.expect("removed");
    assert!(settled.is_retired(dead) && settled.partitions_of(dead).count() == 0, "{settled:?}");
    let kill_at = killed - began;
    let (before_kill, after) = (acked.iter().filter(|a| a.2 < kill_at).count(), acked.iter().filter(|a| a.1 > kill_at + removed).count());
    // The longest time without an acknowledged write, from the kill on.
    let mut stall = Duration::ZERO;
    let mut last = kill_at;
    for &(_, _, done) in acked.iter().filter(|a| a.2 > kill_at) {
        stall = stall.max(done - last);
        last = done;
    }
    let log = cluster.meta_logs();
    let removal_line = log.lines().find(|l| l.contains(&format!("{dead} removed"))).unwrap_or("(no removal line)").to_string();
    println!("{dead} and leader member {} killed {} µs apart", file.metas[old].id, gap.as_micros());
    println!("new leader (member {}) elected {} ms after the kill", file.metas[next].id, elected.as_millis());
    println!("{dead} removed (epoch {removal_epoch}) {} ms after the kill: {removal_line}", removed.as_millis());
    println!("every partition back to 2 replicas (epoch {}) {} ms after the kill", settled.epoch(), rereplicated.as_millis());
    println!(
        "writer: {} acknowledged ({before_kill} before the kill, {after} begun after the removal), {} failed; longest stall after the kill {} ms",
        acked.len(),
        failed.len(),
        stall.as_millis()
    );
    for (i, why) in failed.iter().take(5) {
        println!("  write {i} failed: {why}");
    }
    assert!(acked.len() > 100 && after > 0, "too few acknowledged writes to mean anything");
    assert!(removed < Duration::from_secs(5), "removed only {removed:?} after the kill");
    // The old leader died long before it would have removed the brick: the new one did,
    // from the brick's silence (a full BRICK_TIMEOUT_MS from its election).
    assert!(removal_line.contains("silent past the timeout"), "{removal_line}");
    assert!(log.contains("start copying") && log.contains("copied partition(s) now serve reads"), "{log}");

    // Every acknowledged write, through a client, then on each replica of its partition.
    let mut client = cluster.client();
    check_all(&mut client, "before", BEFORE);
    for &(i, _, _) in &acked {
        assert_eq!(client.get(&key("during", i)).unwrap(), Some(value("during", i)), "acknowledged write {i} lost");
    }
    let secret = file.secret.as_deref();
    let all = (0..BEFORE).map(|i| (key("before", i), value("before", i))).chain(acked.iter().map(|&(i, _, _)| (key("during", i), value("during", i))));
    let mut replica_reads = 0;
    for (k, v) in all {
        let (_, group) = settled.route(dds::map::key_hash(&k));
        assert_eq!(group.len(), 2);
        for &b in group {
            assert_eq!(get_on(&settled, secret, b, &k), (dds::proto::Status::Ok, v.clone()), "{} on replica {b}", String::from_utf8_lossy(&k));
            replica_reads += 1;
        }
    }
    println!("{} acknowledged writes read back through a client and on both replicas ({replica_reads} replica reads)", BEFORE + acked.len());

    // The dead member comes back and follows.
    run_ok(&["cluster", "restart", "--dir", &dir, "--meta"]);
    let back = Instant::now();
    loop {
        let all = statuses(&cluster);
        let leaders: Vec<Option<u64>> = all.iter().map(|s| s.map(|s| s.leader)).collect();
        if leaders[0].is_some_and(|l| l != 0) && leaders.iter().all(|l| *l == leaders[0]) {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(10), "the restarted member does not follow: {all:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.down();
}
