//! Replication end to end on the real binary: 3 bricks, 2 replicas; bricks killed and
//! recovered under load; a client with an old map repairs itself.

mod common;

use std::time::{Duration, Instant};

use common::{check_all, check_all_with, get_on, key, run_ok, text, value, write_all, write_all_with, TestCluster};
use dds::Client;

/// The id the authority gave the brick in `<dir>/brick-<index>`.
fn brick_id(dir: &str, index: usize) -> dds::map::BrickId {
    let id = dds::brick::control::load_identity(&std::path::Path::new(dir).join(format!("brick-{index}")));
    dds::map::BrickId(id.expect("the brick registered"))
}

fn status(cluster: &TestCluster) -> String {
    text(&run_ok(&["cluster", "status", "--dir", &cluster.dir_arg()]).stdout)
}

#[test]
fn bricks_killed_and_recovered_lose_nothing() {
    let mut cluster = TestCluster::up_with(3, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let mut client = cluster.client();
    write_all(&mut client, "first", 10_000);
    // A client whose map will be three changes old when it is next used.
    let mut stale = cluster.client();
    let stale_epoch = stale.map().epoch();
    let before = status(&cluster);
    assert!(before.contains("epoch 1,") && before.contains("[0,1]") && before.contains("[1,2]"), "{before}");

    run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "1"]);
    let killed = Instant::now();
    let mut writer = cluster.client();
    loop {
        match writer.put(b"after-kill", b"accepted") {
            Ok(()) => break,
            Err(e) => assert!(killed.elapsed() < Duration::from_secs(2), "no write accepted 2 s after the kill: {e}"),
        }
    }
    let to_first_write = killed.elapsed();
    assert!(to_first_write < Duration::from_secs(2), "first write after the kill took {to_first_write:?}");
    println!("first write accepted {} ms after the kill", to_first_write.as_millis());
    check_all(&mut client, "first", 10_000);
    write_all(&mut client, "while-down", 2_000);
    let down = status(&cluster);
    assert!(down.contains("down"), "{down}");

    let out = run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "1"]);
    let said = text(&out.stdout);
    println!("{said}");
    assert!(said.contains("rejoined") && said.contains("recovery:"), "{said}");
    let after = status(&cluster);
    println!("{after}");
    // The authority declared brick 1 dead: it rejoins under a new id, empty, and is copied to.
    let rejoined = brick_id(&dir, 1);
    assert_ne!(rejoined, dds::map::BrickId(1), "a removed brick's id is never given again");
    let held = cluster.client().map().partitions_of(rejoined).count();
    assert!(held > 0, "brick 1 holds partitions again as {rejoined}:\n{after}");

    // Growth: a fourth brick takes its share of replicas.
    let out = run_ok(&["cluster", "add", "--dir", &dir]);
    println!("{}", text(&out.stdout));
    assert!(cluster.client().map().partitions_of(brick_id(&dir, 3)).count() > 0);

    // The stale client: epoch 1 against a map changed by a kill, a restart and an add:
    // the first brick it asks returns the map (lazy repair).
    check_all(&mut stale, "while-down", 200);
    stale.put(b"from-the-stale-client", b"ok").unwrap();
    let stats = stale.stats().clone();
    println!("stale client: map epoch {stale_epoch} -> {}; {stats:?}", stale.map().epoch());
    assert!(stale.map().epoch() >= stale_epoch + 3);
    assert!(stats.stale_replies >= 1 && stats.maps_installed >= 1, "{stats:?}");

    let mut stale_again = cluster.client();
    run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "0"]);
    check_all(&mut client, "first", 10_000);
    check_all(&mut client, "while-down", 2_000);
    assert_eq!(client.get(b"after-kill").unwrap().as_deref(), Some(&b"accepted"[..]));

    assert_eq!(client.get(b"from-the-stale-client").unwrap().as_deref(), Some(&b"ok"[..]));
    // A client whose map still names the killed brick finds the new map by itself.
    check_all(&mut stale_again, "first", 1000);
    println!("client from before the second kill: {:?}", stale_again.stats());
    assert!(stale_again.stats().maps_installed >= 1);
    cluster.down();
}

#[test]
fn requests_from_a_wrong_epoch_get_the_map_or_a_retry_never_a_wrong_answer() {
    use dds::proto::{Op, Status};
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2"]);
    let mut client = cluster.client();
    client.put(b"k", b"v").unwrap();
    let addr = client.map().bricks().values().next().unwrap().cores[0];
    let mut rpc = dds::rpc::Rpc::connect(addr, Duration::from_secs(1), cluster.file().secret.as_deref()).unwrap();
    let epoch = client.map().epoch();
    // Older epoch: refused with the brick's map.
    let (status, value) = rpc.call(Op::Get, epoch - 1, b"k", b"", Duration::from_secs(1)).unwrap();
    assert_eq!(status, Status::StaleEpoch);
    assert_eq!(dds::map::ClusterMap::from_json(std::str::from_utf8(&value).unwrap()).unwrap().epoch(), epoch);
    // Newer epoch than the brick knows: retry later.
    let (status, _) = rpc.call(Op::Get, epoch + 5, b"k", b"", Duration::from_secs(1)).unwrap();
    assert_eq!(status, Status::Behind);
    // A one-phase put on a replicated partition is refused: it would skip a replica.
    let (status, _) = rpc.call(Op::Put, epoch, b"k", b"x", Duration::from_secs(1)).unwrap();
    assert_eq!(status, Status::WrongShard);
    // A malformed prepare is a "no" vote, not a crash.
    let (status, _) = rpc.call(Op::Prepare, epoch, b"k", b"garbage", Duration::from_secs(1)).unwrap();
    assert_eq!(status, Status::Conflict);
    assert_eq!(client.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    // A partition that is not a leaf of the map: refused, nothing copied out.
    let bogus = dds::proto::SnapshotRequest::read(u32::MAX, 0, 0).to_bytes();
    let (status, _) = rpc.call(Op::SnapshotChunk, epoch, b"", &bogus, Duration::from_secs(1)).unwrap();
    assert_eq!(status, Status::WrongShard);
    // Without the map authority a brick fences itself within its lease: it answers
    // nothing from its data rather than risk a stale answer.
    // (Every member of it: one alone would leave a majority that serves on.)
    for m in cluster.file().metas {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (status, why) = rpc.call(Op::Get, epoch, b"k", b"", Duration::from_secs(1)).unwrap();
    assert_eq!(status, Status::Unavailable, "{}", String::from_utf8_lossy(&why));
    assert!(String::from_utf8_lossy(&why).contains("fenced"));
    cluster.down();
}

#[test]
fn adding_a_brick_moves_replicas_while_reads_go_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let mut client = cluster.client();
    write_all(&mut client, "grow", 5_000);
    let mut stale = cluster.client();
    // A reader through the whole change: every read succeeds with the right value.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (addrs, stop, config) = (cluster.file().addrs(), Arc::clone(&stop), cluster.file().client_config());
        std::thread::spawn(move || {
            let mut c = Client::connect(&addrs, config).unwrap();
            let mut reads = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = reads * 7 % 5_000;
                assert_eq!(c.get(&key("grow", i)).unwrap(), Some(value("grow", i)), "read {i} during the move");
                reads += 1;
            }
            reads
        })
    };
    let out = run_ok(&["cluster", "add", "--dir", &dir]);
    let said = text(&out.stdout);
    println!("{said}");
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw every value");
    println!("{reads} reads during the move, all correct");
    assert!(said.contains("every partition at full strength"), "{said}");
    let map = cluster.client().map().clone();
    let loads: Vec<usize> = map.bricks().keys().map(|&b| map.partitions_of(b).count()).collect();
    assert_eq!(loads.len(), 3);
    assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1, "replicas per brick: {loads:?}");
    assert!(map.groups().values().all(|g| g.len() == 2) && map.joining().is_empty() && map.leaving().is_empty());
    check_all(&mut client, "grow", 5_000);
    // A client from before the change still reads and writes (lazy repair).
    check_all(&mut stale, "grow", 500);
    stale.put(b"after-growth", b"ok").unwrap();
    assert_eq!(client.get(b"after-growth").unwrap().as_deref(), Some(&b"ok"[..]));
    println!("client from before the add: {:?}", stale.stats());
    assert!(stale.stats().stale_replies >= 1);
    cluster.down();
}

/// Keys and bytes each brick holds, by the `keys` and `bytes` columns of `cluster
/// status` (bricks up only).
fn held_by_brick(cluster: &TestCluster) -> Vec<(u64, u64)> {
    status(cluster)
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() > 10 && cols[0].parse::<usize>().is_ok() && cols[3] == "up").then(|| (cols[9].parse().expect("a key count"), cols[10].parse().expect("a byte count")))
        })
        .collect()
}

fn keys_by_brick(cluster: &TestCluster) -> Vec<u64> {
    held_by_brick(cluster).into_iter().map(|(k, _)| k).collect()
}

/// A process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the brick runs");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).expect("a number").parse().expect("KiB")
}

#[test]
fn bricks_that_gave_replicas_away_free_their_memory_and_keys_add_up() {
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let mut client = cluster.client();
    let n = 20_000;
    let big = |i: usize| format!("{i:08}").repeat(256).into_bytes();
    write_all_with(&mut client, "free", n, big);
    drop(client); // It sends the decisions of its last writes.
    let settled = Instant::now() + Duration::from_secs(10);
    while keys_by_brick(&cluster) != vec![n as u64; 2] {
        assert!(Instant::now() < settled, "each of 2 bricks holds every key: {:?}", keys_by_brick(&cluster));
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids: Vec<u32> = cluster.file().bricks.iter().map(|b| b.pid).collect();
    let before: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    let bytes_before: Vec<u64> = held_by_brick(&cluster).into_iter().map(|(_, b)| b).collect();
    let out = run_ok(&["cluster", "add", "--dir", &dir]);
    println!("{}", text(&out.stdout));
    // Quiet: nothing joining or leaving, and the keys add up to keys x replicas.
    let deadline = Instant::now() + Duration::from_secs(60);
    let keys = loop {
        let map = cluster.client().map().clone();
        let keys = keys_by_brick(&cluster);
        if map.joining().is_empty() && map.leaving().is_empty() && keys.len() == 3 && keys.iter().sum::<u64>() == 2 * n as u64 {
            break keys;
        }
        assert!(Instant::now() < deadline, "keys never added up to {} x 2: {keys:?}\n{}", n, status(&cluster));
        std::thread::sleep(Duration::from_millis(200));
    };
    let after: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    let bytes_after: Vec<u64> = held_by_brick(&cluster).into_iter().map(|(_, b)| b).collect();
    println!("keys per brick once quiet: {keys:?} (sum {}, {n} keys x 2 replicas)", keys.iter().sum::<u64>());
    for i in 0..2 {
        println!(
            "brick {i}: data held {} -> {} KiB; resident memory {} -> {} KiB",
            bytes_before[i] / 1024,
            bytes_after[i] / 1024,
            before[i],
            after[i]
        );
        // A third of its replicas moved: what it holds drops by about as much, and so
        // does its resident memory, by at least half the bytes it dropped (a base
        // partition's entries live in a mapping of its own, rebuilt when a leaf leaves:
        // ARCHITECTURE.md, "Space after moves").
        assert!(bytes_after[i] * 4 < bytes_before[i] * 3, "brick {i} gave replicas away but holds {} of {} bytes", bytes_after[i], bytes_before[i]);
        let dropped_kib = (bytes_before[i] - bytes_after[i]) / 1024;
        assert!(after[i] + dropped_kib / 2 < before[i], "brick {i} dropped {dropped_kib} KiB of data but its resident memory went {} -> {} KiB", before[i], after[i]);
    }
    for i in 0..2 {
        assert!(cluster.brick_log(i).contains("dropped"), "brick {i} logs what it dropped");
    }
    check_all_with(&mut cluster.client(), "free", n, big);
    cluster.down();
}

#[test]
fn small_clusters_split_partitions_and_keep_every_key() {
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2", "--partition-bits", "2"]);
    let dir = cluster.dir_arg();
    let mut client = cluster.client();
    write_all(&mut client, "split", 2_000);
    let out = run_ok(&["cluster", "add", "--dir", &dir]);
    println!("{}", text(&out.stdout));
    let map = cluster.client().map().clone();
    println!("epoch {}: {} partitions on base {} bits", map.epoch(), map.dp().leaves().len(), map.base_bits());
    assert!(map.dp().leaves().len() >= 48, "3 bricks need at least 48 partitions: {}", map.dp().leaves().len());
    assert!(map.partitions_of(brick_id(&dir, 2)).count() > 0);
    check_all(&mut client, "split", 2_000);
    write_all(&mut client, "after-split", 500);
    check_all(&mut client, "after-split", 500);
    cluster.down();
}

/// Sends a prepare for `key` to `brick`'s core that stores it, as a coordinator would.
fn prepare_on(map: &dds::map::ClusterMap, secret: Option<&dds::Secret>, brick: dds::map::BrickId, key: &[u8], txid: dds::proto::TxId, value: &[u8]) -> dds::proto::Status {
    use dds::proto::{Op, PrepareBody, WriteKind};
    let hash = dds::map::key_hash(key);
    let (_, group) = map.route(hash);
    let ids: Vec<u32> = group.iter().map(|b| b.0).collect();
    let mut body = Vec::new();
    PrepareBody::encode(txid, WriteKind::Put, &ids, value, &mut body);
    let cores = &map.bricks()[&brick].cores;
    let mut rpc = dds::rpc::Rpc::connect(cores[map.core_of(hash, cores.len())], Duration::from_secs(1), secret).unwrap();
    rpc.call(Op::Prepare, map.epoch(), key, &body, Duration::from_secs(1)).unwrap().0
}

#[test]
fn replicas_decide_a_transaction_whose_coordinator_vanished() {
    use dds::proto::{Status, TxId};
    let mut cluster = TestCluster::up_with(2, 1, &["--replicas", "2"]);
    let mut client = cluster.client();
    let map = client.map().clone();
    // Prepared on every replica, then the coordinator is gone: the replicas find all
    // participants prepared and commit. A read waits for that decision.
    let (_, group) = map.route(dds::map::key_hash(b"orphan-all"));
    for &b in group {
        assert_eq!(prepare_on(&map, cluster.file().secret.as_deref(), b, b"orphan-all", TxId { client: 7, seq: 1 }, b"decided"), Status::Ok);
    }
    let asked = Instant::now();
    assert_eq!(client.get(b"orphan-all").unwrap().as_deref(), Some(&b"decided"[..]));
    println!("read of an orphaned, fully prepared write answered after {} ms (resolution after 1 s)", asked.elapsed().as_millis());
    // Prepared on one replica only: the other never saw it, so it is aborted, and the
    // key's lock is released for the next writer.
    let (_, group) = map.route(dds::map::key_hash(b"orphan-one"));
    assert_eq!(prepare_on(&map, cluster.file().secret.as_deref(), group[0], b"orphan-one", TxId { client: 7, seq: 2 }, b"never"), Status::Ok);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(client.get(b"orphan-one").unwrap(), None);
    client.put(b"orphan-one", b"later").unwrap();
    assert_eq!(client.get(b"orphan-one").unwrap().as_deref(), Some(&b"later"[..]));
    let logs = cluster.brick_log(0) + &cluster.brick_log(1);
    assert!(logs.contains("resolved by peers: commit") && logs.contains("resolved by peers: abort"), "{logs}");
    cluster.down();
}


#[test]
fn a_joining_brick_restarted_mid_copy_on_its_ports_ends_with_every_key_on_every_replica() {
    let cluster = TestCluster::up_with(2, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let mut client = cluster.client();
    let n = 20_000;
    write_all(&mut client, "joining", n);
    let adder = {
        let dir = dir.clone();
        std::thread::spawn(move || text(&run_ok(&["cluster", "add", "--dir", &dir]).stdout))
    };
    // Killed once the new brick (id 2) holds a copied partition and restarted at once,
    // on the same ports, before the authority would remove it: it keeps its id.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.meta_logs().contains("to brick 2 from") {
        assert!(Instant::now() < deadline, "no partition was copied to the new brick");
        std::thread::sleep(Duration::from_millis(2));
    }
    run_ok(&["cluster", "kill", "--dir", &dir, "--brick", "2"]);
    let said = text(&run_ok(&["cluster", "restart", "--dir", &dir, "--brick", "2"]).stdout);
    println!("{said}");
    println!("{}", adder.join().expect("cluster add finished"));
    assert_eq!(brick_id(&dir, 2), dds::map::BrickId(2), "restarted in time to keep its id");
    let map = cluster.authority_map();
    assert!(map.joining().is_empty() && map.groups().values().all(|g| g.len() == 2), "not settled");
    let log = cluster.meta_logs();
    assert!(log.contains("restarted while copying"), "the authority saw the restart:\n{log}");
    for i in 0..n {
        let k = key("joining", i);
        let (_, group) = map.route(dds::map::key_hash(&k));
        for &b in group {
            assert_eq!(get_on(&map, cluster.file().secret.as_deref(), b, &k), (dds::proto::Status::Ok, value("joining", i)), "key {i} on replica {b}");
        }
    }
}
