//! A group of authority members in one thread, each on its own in-memory disk, with
//! messages delivered in order: elections, a leader's crash, a member restarted from
//! its log, a majority lost and regained.

use std::net::SocketAddr;
use std::path::Path;

use crate::meta::authority::AuthorityConfig;
use crate::meta::member::{Member, MemberConfig, MemberError, Output, Settled, TICK_MS};
use crate::meta::session::Session;
use crate::log::mem_disk::MemDisk;
use crate::map::{BrickAddr, ClusterMap};
use crate::proto::{decode_exact, encode, Frame, Kind, MemberList, MemberRequest, Op, Registration, Status};

struct Group {
    members: Vec<Option<Member<MemDisk>>>,
    disks: Vec<MemDisk>,
    config: Vec<(u64, SocketAddr)>,
    /// Messages in flight: (to, bytes).
    wire: Vec<(u64, Vec<u8>)>,
    now_ms: u64,
    /// Every map a member published: (member, epoch, map).
    published: Vec<(u64, u64, ClusterMap)>,
    /// Members that joined later: what the leader told them of the group.
    joined: Vec<(u64, Vec<(u64, SocketAddr)>)>,
}

const DIR: &str = "/meta";

fn authority_config() -> AuthorityConfig {
    AuthorityConfig { bricks: 2, replicas: 2, base_bits: 2, rereplicate_after_ms: crate::meta::authority::REREPLICATE_AFTER_MS }
}

impl Group {
    fn new(n: u64) -> Group {
        let config: Vec<(u64, SocketAddr)> = (1..=n).map(|id| (id, SocketAddr::from(([127, 0, 0, 1], 9000 + id as u16)))).collect();
        let mut g = Group { members: Vec::new(), disks: (0..n).map(|_| MemDisk::default()).collect(), config, wire: Vec::new(), now_ms: 0, published: Vec::new(), joined: Vec::new() };
        for i in 0..n as usize {
            let m = g.open(i);
            g.members.push(Some(m));
        }
        g
    }

    fn open(&self, i: usize) -> Member<MemDisk> {
        let id = i as u64 + 1;
        let known = self.joined.iter().find(|(j, _)| *j == id).map(|(_, k)| k.clone()).unwrap_or_default();
        let config = MemberConfig { id, members: self.config.clone(), known, authority: authority_config() };
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
                // A member not started yet (joining) or down misses it.
                let Some(m) = self.members.get_mut(to as usize - 1).and_then(|m| m.as_mut()) else { continue };
                // An `Op::Raft` frame, as the shells hand every frame to `on_frame`.
                let mut reply = Vec::new();
                let out = match m.on_frame(&mut Session::new("peer".into()), now, &bytes, &mut reply) {
                    Ok((_, out)) => out,
                    // From a member that left the group: its connection would close.
                    Err(MemberError::BadMessage(why)) if why.contains("not of this group") => continue,
                    Err(e) => panic!("a bad message: {e}"),
                };
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

    /// Asks member `id` for a membership change; the answer once it settles.
    fn members(&mut self, id: u64, request: &MemberRequest) -> Option<(Status, Vec<u8>)> {
        self.ask(id, &mut Session::new("cli".into()), Op::Members, 0, &serde_json::to_vec(request).expect("serialises"))
    }

    /// Member `id` joins at a new address through the leader, as `dds meta --join`
    /// does: asked first, then started on an empty disk with what the answer says.
    fn join(&mut self, leader: u64, id: u64) {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + id as u16));
        let (status, list) = self.members(leader, &MemberRequest::Add { id, addr }).expect("answered");
        assert_eq!(status, Status::Ok, "{}", String::from_utf8_lossy(&list));
        let list: MemberList = serde_json::from_slice(&list).unwrap();
        assert_eq!(list.boot, self.config);
        assert!(list.members.contains(&(id, addr)));
        self.joined.push((id, list.members));
        assert_eq!(self.members.len() as u64 + 1, id, "ids in order");
        self.disks.push(MemDisk::default());
        let m = self.open(id as usize - 1);
        self.members.push(Some(m));
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
    let config = MemberConfig { id: 1, members: vec![(1, SocketAddr::from(([127, 0, 0, 1], 9001)))], known: Vec::new(), authority: authority_config() };
    let bricks = [(crate::map::BrickId(0), BrickAddr::tcp(vec!["127.0.0.1:1".parse().unwrap()])), (crate::map::BrickId(1), BrickAddr::tcp(vec!["127.0.0.1:2".parse().unwrap()]))];
    let map = ClusterMap::initial(2, bricks.into_iter().collect(), 2).expect("map");
    let disk = MemDisk::default();
    let mut m = Member::open(config.clone(), disk.clone(), Path::new(DIR), 3, Some(map.clone())).expect("opens");
    m.tick(TICK_MS).expect("ticks");
    // Its bricks register again (the leader plans only once they have).
    for (id, addr) in map.bricks() {
        let reg = Registration { id: Some(id.0), addr: addr.clone() };
        let mut frame = Vec::new();
        encode(&mut frame, &Frame { kind: Kind::Request(Op::Register), request_id: 1, epoch: 0, key: &[], value: &serde_json::to_vec(&reg).unwrap() });
        m.on_frame(&mut Session::new(format!("{id}")), TICK_MS, &frame, &mut Vec::new()).expect("registers");
    }
    for i in 2..6 {
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

#[test]
fn members_join_and_leave_through_raft_and_a_restart_keeps_the_new_group() {
    let mut g = Group::new(3);
    let (leader, _) = g.elect();
    for b in 0..2 {
        g.register(leader, &mut Session::new(format!("b{b}")), b).expect("answered");
    }
    // A follower sends a change to the leader.
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let (status, _) = g.members(follower, &MemberRequest::Remove { id: leader }).expect("answered");
    assert_eq!(status, Status::NotLeader);
    // Member 4 joins: it catches up from the log and holds the committed map.
    g.join(leader, 4);
    for _ in 0..10 {
        g.tick();
    }
    let epoch = g.members[leader as usize - 1].as_ref().unwrap().published().unwrap().epoch();
    assert_eq!(g.members[3].as_ref().unwrap().published().map(|m| m.epoch()), Some(epoch));
    // A follower leaves; it learns so, and stops.
    let gone = (1..=3).find(|&i| i != leader && i != follower).unwrap();
    let (status, list) = g.members(leader, &MemberRequest::Remove { id: gone }).expect("answered");
    assert_eq!(status, Status::Ok, "{}", String::from_utf8_lossy(&list));
    let list: MemberList = serde_json::from_slice(&list).unwrap();
    assert_eq!(list.members.iter().map(|(id, _)| *id).collect::<Vec<_>>(), { let mut v = vec![leader, follower, 4]; v.sort(); v });
    assert!(list.next_id >= 5);
    g.members[gone as usize - 1] = None;
    // Its id is never given out again.
    let (status, _) = g.members(leader, &MemberRequest::Add { id: gone, addr: "127.0.0.1:9100".parse().unwrap() }).expect("answered");
    assert_eq!(status, Status::Conflict);
    // The group is {leader, follower, 4}: with the follower down too, the leader and
    // member 4 are a majority, and a brick still registers.
    g.members[follower as usize - 1] = None;
    for _ in 0..40 {
        g.tick();
    }
    let (now, _) = g.elect();
    let (status, _) = g.register(now, &mut Session::new("b2".into()), 2).expect("answered");
    assert_eq!(status, Status::Ok);
    // Restarted from their logs, with the old group as their flags would give it, the
    // members keep the new one: the old majority (two of 1, 2, 3) elects nobody alone.
    let ids: Vec<u64> = (1..=4).filter(|&i| i != gone && i != follower).collect();
    for &i in &ids {
        g.members[i as usize - 1] = Some(g.open(i as usize - 1));
    }
    let (again, _) = g.elect();
    assert!(ids.contains(&again));
    for &i in &ids {
        let m = g.members[i as usize - 1].as_ref().unwrap();
        let voters: Vec<u64> = m.members().members.iter().map(|(id, _)| *id).collect();
        assert_eq!(voters, { let mut v = vec![leader, follower, 4]; v.sort(); v }, "member {i}");
    }
    g.one_map_per_epoch();
}

#[test]
fn a_leader_asked_to_leave_hands_over_first() {
    let mut g = Group::new(3);
    let (leader, _) = g.elect();
    for b in 0..2 {
        g.register(leader, &mut Session::new(format!("b{b}")), b).expect("answered");
    }
    let (status, _) = g.members(leader, &MemberRequest::Remove { id: leader }).expect("answered");
    assert_eq!(status, Status::NotLeader, "the leader hands over rather than remove itself");
    let mut next = None;
    for _ in 0..40 {
        g.tick();
        if let [one] = g.leaders()[..] {
            if one != leader {
                next = Some(one);
                break;
            }
        }
    }
    let next = next.expect("leadership moved within 40 ticks");
    let (status, _) = g.members(next, &MemberRequest::Remove { id: leader }).expect("answered");
    assert_eq!(status, Status::Ok);
    // Left running (raft may never tell it the change is committed: `cluster meta
    // remove` stops it), the old member never leads again, and the two others serve.
    for _ in 0..40 {
        g.tick();
        assert!(!g.leaders().contains(&leader), "a removed member leads");
    }
    let (status, _) = g.register(next, &mut Session::new("b2".into()), 2).expect("answered");
    assert_eq!(status, Status::Ok);
}

#[test]
fn a_member_behind_takes_messages_from_one_it_has_not_learnt_of_and_another_members_log_is_refused() {
    let mut g = Group::new(3);
    let (leader, _) = g.elect();
    let behind = (1..=3).find(|&i| i != leader).unwrap();
    g.members[behind as usize - 1] = None;
    g.join(leader, 4);
    for _ in 0..5 {
        g.tick();
    }
    // Back from its disk, it has not applied member 4's addition: a message from 4 (a
    // leader, say) is still raft's to judge, not refused as from a stranger.
    let mut m = g.open(behind as usize - 1);
    let msg = raft::eraftpb::Message { from: 4, to: behind, term: m.term(), msg_type: raft::eraftpb::MessageType::MsgHeartbeat, ..Default::default() };
    let mut frame = Vec::new();
    encode(&mut frame, &Frame { kind: Kind::Request(Op::Raft), request_id: 0, epoch: 0, key: &[], value: &protobuf::Message::write_to_bytes(&msg).unwrap() });
    assert!(m.on_frame(&mut Session::new("peer".into()), g.now_ms, &frame, &mut Vec::new()).is_ok());
    g.members[behind as usize - 1] = Some(m);
    // Another member's log is refused under this id.
    let other = (1..=3).find(|&i| i != leader && i != behind).unwrap();
    let config = MemberConfig { id: leader, members: g.config.clone(), known: Vec::new(), authority: authority_config() };
    let err = Member::open(config, g.disks[other as usize - 1].clone(), Path::new(DIR), 1, None).err().expect("a foreign log is refused");
    assert!(err.to_string().contains("not member"), "{err}");
}
