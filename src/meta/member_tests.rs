//! A group of authority members in one thread, each on its own in-memory disk, with
//! messages delivered in order: elections, a leader's crash, a member restarted from
//! its log, a majority lost and regained.

use std::net::SocketAddr;
use std::path::Path;

use crate::meta::authority::AuthorityConfig;
use crate::meta::member::{Member, MemberConfig, Output, Settled, TICK_MS};
use crate::meta::session::Session;
use crate::log::mem_disk::MemDisk;
use crate::map::{BrickAddr, ClusterMap};
use crate::proto::{decode_exact, encode, Frame, Kind, Op, Registration, Status};

struct Group {
    members: Vec<Option<Member<MemDisk>>>,
    disks: Vec<MemDisk>,
    config: Vec<(u64, SocketAddr)>,
    /// Messages in flight: (to, bytes).
    wire: Vec<(u64, Vec<u8>)>,
    now_ms: u64,
    /// Every map a member published: (member, epoch, map).
    published: Vec<(u64, u64, ClusterMap)>,
}

const DIR: &str = "/meta";

fn authority_config() -> AuthorityConfig {
    AuthorityConfig { bricks: 2, replicas: 2, base_bits: 2 }
}

impl Group {
    fn new(n: u64) -> Group {
        let config: Vec<(u64, SocketAddr)> = (1..=n).map(|id| (id, SocketAddr::from(([127, 0, 0, 1], 9000 + id as u16)))).collect();
        let mut g = Group { members: Vec::new(), disks: (0..n).map(|_| MemDisk::default()).collect(), config, wire: Vec::new(), now_ms: 0, published: Vec::new() };
        for i in 0..n as usize {
            let m = g.open(i);
            g.members.push(Some(m));
        }
        g
    }

    fn open(&self, i: usize) -> Member<MemDisk> {
        let config = MemberConfig { id: i as u64 + 1, members: self.config.clone(), authority: authority_config() };
        Member::open(config, self.disks[i].clone(), Path::new(DIR), 7 * i as u64 + 3, None).expect("opens")
    }

    fn take(&mut self, from: u64, out: Output) {
        self.wire.extend(out.messages);
        if out.published {
            let m = self.members[from as usize - 1].as_ref().expect("up");
            let map = m.published().expect("a published map").clone();
            self.published.push((from, map.epoch(), map));
        }
    }

    /// Delivers every message in flight (to members that are up), repeatedly.
    fn deliver(&mut self) {
        for _ in 0..100 {
            let wire = std::mem::take(&mut self.wire);
            if wire.is_empty() {
                return;
            }
            for (to, bytes) in wire {
                let now = self.now_ms;
                let Some(m) = self.members[to as usize - 1].as_mut() else { continue };
                // An `Op::Raft` frame, as the shells hand every frame to `on_frame`.
                let mut reply = Vec::new();
                let (_, out) = m.on_frame(&mut Session::new("peer".into()), now, &bytes, &mut reply).expect("a good message");
                assert!(reply.is_empty(), "a raft message gets no reply");
                self.take(to, out);
            }
        }
    }

    fn tick(&mut self) {
        self.now_ms += TICK_MS;
        for i in 0..self.members.len() {
            let now = self.now_ms;
            if let Some(m) = self.members[i].as_mut() {
                let out = m.tick(now).expect("ticks");
                self.take(i as u64 + 1, out);
            }
        }
        self.deliver();
    }

    fn leaders(&self) -> Vec<u64> {
        self.members.iter().flatten().filter(|m| m.is_leader()).map(|m| m.id()).collect()
    }

    /// Ticks until exactly one member leads; returns it and the ticks it took.
    fn elect(&mut self) -> (u64, u64) {
        for t in 1..=200 {
            self.tick();
            if let [one] = self.leaders()[..] {
                return (one, t);
            }
        }
        panic!("no single leader after 200 ticks: {:?}", self.leaders());
    }

    /// Sends `op` with `value` to member `id` on `session`; ticks until its reply may
    /// leave (or is lost); returns it.
    fn ask(&mut self, id: u64, session: &mut Session, op: Op, epoch: u64, value: &[u8]) -> Option<(Status, Vec<u8>)> {
        let mut frame = Vec::new();
        encode(&mut frame, &Frame { kind: Kind::Request(op), request_id: 1, epoch, key: &[], value });
        let mut reply = Vec::new();
        let now = self.now_ms;
        let m = self.members[id as usize - 1].as_mut().expect("up");
        let (ticket, out) = m.on_frame(session, now, &frame, &mut reply).expect("a good frame");
        self.take(id, out);
        self.deliver();
        for _ in 0..50 {
            match self.members[id as usize - 1].as_ref().expect("up").settle(ticket) {
                Settled::Send => {
                    let f = decode_exact(&reply).expect("a reply frame");
                    let Kind::Reply(_, status) = f.kind else { panic!("not a reply") };
                    return Some((status, f.value.to_vec()));
                }
                Settled::Lost => return None,
                Settled::Wait => self.tick(),
            }
        }
        panic!("a reply never settled");
    }

    fn register(&mut self, id: u64, session: &mut Session, brick: u16) -> Option<(Status, Vec<u8>)> {
        let reg = Registration { id: None, addr: BrickAddr::tcp(vec![SocketAddr::from(([127, 0, 0, 1], 7000 + brick))]) };
        self.ask(id, session, Op::Register, 0, &serde_json::to_vec(&reg).expect("serialises"))
    }

    /// Every published epoch names one map, on every member.
    fn one_map_per_epoch(&self) {
        for (a, epoch, map) in &self.published {
            for (b, e, other) in &self.published {
                assert!(epoch != e || map == other, "epoch {epoch}: member {a} and member {b} published different maps");
            }
        }
    }
}

#[test]
fn one_leader_serves_bricks_and_every_member_holds_the_committed_map() {
    let mut g = Group::new(3);
    let (leader, ticks) = g.elect();
    assert!(ticks * TICK_MS <= 2000, "the first election took {} ms", ticks * TICK_MS);
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    // A follower sends bricks to the leader.
    let mut s = Session::new("brick".into());
    let (status, hint) = g.register(follower, &mut s, 0).expect("answered");
    assert_eq!(status, Status::NotLeader);
    assert_eq!(String::from_utf8(hint).unwrap(), g.config[leader as usize - 1].1.to_string());
    // Two bricks register with the leader: the first map is committed before the
    // second's answer leaves, and then every member holds it.
    let mut sessions = [Session::new("b0".into()), Session::new("b1".into())];
    for (b, s) in sessions.iter_mut().enumerate() {
        let (status, _) = g.register(leader, s, b as u16).expect("answered");
        assert_eq!(status, Status::Ok);
    }
    for _ in 0..5 {
        g.tick();
    }
    let epoch = g.members[leader as usize - 1].as_ref().unwrap().published().expect("a map").epoch();
    for m in g.members.iter().flatten() {
        assert_eq!(m.published().map(|m| m.epoch()), Some(epoch), "member {}", m.id());
    }
    // Heartbeats: answered by the leader; a follower's map fetch gives the same map.
    let (status, _) = g.ask(leader, &mut sessions[0], Op::Heartbeat, epoch, &[]).expect("answered");
    assert_eq!(status, Status::Ok);
    let (status, map) = g.ask(follower, &mut Session::new("client".into()), Op::GetMap, 0, &[]).expect("answered");
    assert_eq!(status, Status::Ok);
    assert_eq!(ClusterMap::from_json(std::str::from_utf8(&map).unwrap()).unwrap().epoch(), epoch);
    g.one_map_per_epoch();
}

#[test]
fn a_dead_leader_is_replaced_and_restarts_as_a_follower_with_every_map() {
    let mut g = Group::new(3);
    let (leader, _) = g.elect();
    for b in 0..2 {
        g.register(leader, &mut Session::new(format!("b{b}")), b).expect("answered");
    }
    for _ in 0..3 {
        g.tick();
    }
    let before = g.members[leader as usize - 1].as_ref().unwrap().published().unwrap().clone();
    // The leader dies; the other two elect one of themselves within a few timeouts.
    g.members[leader as usize - 1] = None;
    let (next, ticks) = g.elect();
    assert_ne!(next, leader);
    assert!(ticks * TICK_MS <= 1500, "the election after a leader's death took {} ms", ticks * TICK_MS);
    let m = g.members[next as usize - 1].as_ref().unwrap();
    assert_eq!(m.published(), Some(&before), "the new leader starts from the newest committed map");
    assert!(m.term() > 1);
    // A third brick joins through the new leader: the epoch grows.
    let (status, _) = g.register(next, &mut Session::new("b2".into()), 2).expect("answered");
    assert_eq!(status, Status::Ok);
    for _ in 0..3 {
        g.tick();
    }
    let after = g.members[next as usize - 1].as_ref().unwrap().published().unwrap().epoch();
    assert!(after > before.epoch(), "{after} after {}", before.epoch());
    // The old leader comes back from its disk and catches up, as a follower.
    let back = g.open(leader as usize - 1);
    g.members[leader as usize - 1] = Some(back);
    for _ in 0..10 {
        g.tick();
    }
    assert_eq!(g.leaders(), vec![next], "a returning member does not disrupt the leader");
    let newest = g.members[next as usize - 1].as_ref().unwrap().published().unwrap().epoch();
    assert!(newest >= after);
    assert_eq!(g.members[leader as usize - 1].as_ref().unwrap().published().map(|m| m.epoch()), Some(newest));
    g.one_map_per_epoch();
}

#[test]
fn without_a_majority_nothing_changes_and_service_resumes_when_one_returns() {
    let mut g = Group::new(3);
    let (leader, _) = g.elect();
    for b in 0..2 {
        g.register(leader, &mut Session::new(format!("b{b}")), b).expect("answered");
    }
    let others: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    for &o in &others {
        g.members[o as usize - 1] = None;
    }
    // Alone, the leader steps down within two election timeouts (check-quorum), and
    // a registration gets no answer it could trust.
    for _ in 0..30 {
        g.tick();
    }
    assert!(g.leaders().is_empty(), "a member without a majority still leads");
    let mut s = Session::new("b2".into());
    let (status, _) = g.register(leader, &mut s, 2).expect("answered");
    assert_eq!(status, Status::NotLeader);
    // One member returns: a leader again, and the registration goes through.
    g.members[others[0] as usize - 1] = Some(g.open(others[0] as usize - 1));
    let (now, _) = g.elect();
    let (status, _) = g.register(now, &mut Session::new("b2".into()), 2).expect("answered");
    assert_eq!(status, Status::Ok);
    g.one_map_per_epoch();
}

#[test]
fn a_group_of_one_starts_from_the_map_an_earlier_authority_left() {
    let config = MemberConfig { id: 1, members: vec![(1, SocketAddr::from(([127, 0, 0, 1], 9001)))], authority: authority_config() };
    let bricks = [(crate::map::BrickId(0), BrickAddr::tcp(vec!["127.0.0.1:1".parse().unwrap()])), (crate::map::BrickId(1), BrickAddr::tcp(vec!["127.0.0.1:2".parse().unwrap()]))];
    let map = ClusterMap::initial(2, bricks.into_iter().collect(), 2).expect("map");
    let disk = MemDisk::default();
    let mut m = Member::open(config.clone(), disk.clone(), Path::new(DIR), 3, Some(map.clone())).expect("opens");
    for i in 1..5 {
        m.tick(i * TICK_MS).expect("ticks");
    }
    // The leader went on from it (splits, one epoch up), not from an empty map.
    let served = m.published().expect("a map is served").clone();
    assert!(served.epoch() > map.epoch() && served.bricks() == map.bricks(), "served epoch {}", served.epoch());
    // Once in the raft log, a restart takes it from there, whatever it is given.
    drop(m);
    let again = Member::open(config, disk, Path::new(DIR), 3, None).expect("reopens");
    assert_eq!(again.published(), Some(&served));
}

#[test]
fn a_leader_that_resumes_from_a_pause_grants_no_lease() {
    let mut g = Group::new(3);
    let (leader, _) = g.elect();
    let mut sessions = [Session::new("b0".into()), Session::new("b1".into())];
    for (b, s) in sessions.iter_mut().enumerate() {
        assert_eq!(g.register(leader, s, b as u16).expect("answered").0, Status::Ok);
    }
    for _ in 0..5 {
        g.tick();
    }
    let epoch = g.members[leader as usize - 1].as_ref().unwrap().published().unwrap().epoch();
    // The leader stops for 3 s; the others elect one of themselves.
    let paused = g.members[leader as usize - 1].take();
    for _ in 0..120 {
        g.tick();
    }
    assert_eq!(g.leaders().len(), 1);
    // It resumes, raft still calling it leader, and a brick's heartbeat comes first.
    g.members[leader as usize - 1] = paused;
    let mut frame = Vec::new();
    encode(&mut frame, &Frame { kind: Kind::Request(Op::Heartbeat), request_id: 1, epoch, key: &[], value: &[] });
    let mut reply = Vec::new();
    let now = g.now_ms;
    let m = g.members[leader as usize - 1].as_mut().unwrap();
    let (ticket, _) = m.on_frame(&mut sessions[0], now, &frame, &mut reply).unwrap();
    let f = decode_exact(&reply).unwrap();
    assert!(matches!(f.kind, Kind::Reply(Op::Heartbeat, Status::NotLeader)) || m.settle(ticket) != Settled::Send, "a deposed leader renewed a lease: {:?}", f.kind);
}
