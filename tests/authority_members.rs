//! The map authority group's membership changed on the real binary while clients write
//! and read: `cluster meta add` twice, `cluster meta remove` of the leader and of a
//! follower, then every member restarted. The history is checked for linearizability,
//! and the group that remains is the one the changes asked for, on every member.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{recorded_op, run, run_ok, text, TestCluster};
use dds::check::{check, Operation};
use dds::proto::{MemberList, MemberRequest};

const CLIENTS: usize = 3;
const KEYS: usize = 8;

/// The group as member `addr` has it committed.
fn members_of(cluster: &TestCluster, addr: std::net::SocketAddr) -> MemberList {
    let file = cluster.file();
    dds::rpc::ask_members(&[addr], &MemberRequest::List, file.secret.as_deref(), Duration::from_secs(5)).expect("a member answers")
}

/// The leader's id, as every running member agrees, waiting up to 10 s.
fn leader(cluster: &TestCluster) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let file = cluster.file();
        let said: Vec<u64> = file.metas.iter().filter_map(|m| dds::rpc::member_status(m.addr, Duration::from_millis(300), file.secret.as_deref()).ok()).map(|s| s.leader).collect();
        if said.len() == file.metas.len() && said.iter().all(|&l| l != 0 && l == said[0]) {
            return said[0];
        }
        assert!(Instant::now() < deadline, "no agreed leader within 10 s: {said:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn members_added_and_removed_under_load_lose_no_write() {
    let mut cluster = TestCluster::up_with(3, 1, &["--replicas", "2"]);
    let dir = cluster.dir_arg();
    let file = cluster.file();
    let start = Instant::now();
    let now = move || start.elapsed().as_micros() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, history, file) = (Arc::clone(&stop), Arc::clone(&history), file.clone());
            std::thread::spawn(move || {
                let mut client = dds::Client::connect(&file.addrs(), file.client_config()).expect("connect");
                for i in 0..1_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("key-{}", (i as usize * 5 + c) % KEYS).into_bytes();
                    let value = (i % 2 == 0).then(|| format!("c{c}-{i}").into_bytes());
                    if let Some(op) = recorded_op(&mut client, key, value, now) {
                        history.lock().unwrap().push(op);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Two members join: five.
    for expect in [4, 5] {
        let out = text(&run_ok(&["cluster", "meta", "add", "--dir", &dir]).stdout);
        println!("{}", out.trim());
        assert!(out.contains(&format!("member {expect} added")), "{out}");
        assert!(out.contains(&format!("{expect} member(s)")), "{out}");
    }
    // The leader leaves (it hands over first), then a follower.
    let first = leader(&cluster);
    let out = text(&run_ok(&["cluster", "meta", "remove", "--dir", &dir, "--id", &first.to_string()]).stdout);
    println!("{}", out.trim());
    let next = leader(&cluster);
    assert_ne!(next, first, "the removed leader still leads");
    let follower = cluster.file().metas.iter().map(|m| m.id).find(|&id| id != next).expect("a follower");
    let out = text(&run_ok(&["cluster", "meta", "remove", "--dir", &dir, "--id", &follower.to_string()]).stdout);
    println!("{}", out.trim());
    // A removed id is never given out again.
    let file = cluster.file();
    let refused = dds::rpc::ask_members(&file.meta_addrs(), &MemberRequest::Add { id: first, addr: "127.0.0.1:1".parse().unwrap() }, file.secret.as_deref(), Duration::from_secs(5));
    assert!(refused.as_ref().is_err_and(|e| e.contains("never reused")), "{refused:?}");
    // Every member restarts in turn from its raft log (flags name the group cluster.json
    // has; the log's own group wins).
    run_ok(&["cluster", "restart", "--dir", &dir, "--meta"]);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a client thread");
    }
    let file = cluster.file();
    let ids: Vec<u64> = file.metas.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(!ids.contains(&first) && !ids.contains(&follower), "{ids:?}");
    for m in &file.metas {
        let list = members_of(&cluster, m.addr);
        assert_eq!(list.members.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids, "member {}'s group", m.id);
    }
    leader(&cluster);
    let mut client = cluster.client();
    let mut history = std::mem::take(&mut *history.lock().unwrap());
    for k in 0..KEYS {
        history.push(recorded_op(&mut client, format!("key-{k}").into_bytes(), None, now).expect("a final read"));
    }
    let checked = check(&history).unwrap_or_else(|e| panic!("linearizability: {e}"));
    println!("{checked} operations checked across 2 joins and 2 removals (the leader's among them) and a rolling restart");
    let status = text(&run(&["cluster", "status", "--dir", &dir]).stdout);
    assert!(status.contains("leader, term"), "{status}");
    cluster.down();
}
