//! One connection to a map authority member, sans-I/O: a brick's session (after
//! `Register`) or anyone asking for the map. `member::Member` drives it for every frame
//! that is not a raft message (`meta::serve` over a thread per connection, the simulator
//! over simulated links): `on_frame` takes a request frame and writes the reply frame,
//! `on_close` ends the session when the connection does.

use std::net::SocketAddr;

use crate::map::{BrickId, ClusterMap};
use crate::proto::{decode_exact, encode, Frame, Kind, Op, Registered, Registration, Status};

use super::authority::{Actions, Authority};

pub struct Session {
    /// Who is on the other end, for the log.
    peer: String,
    /// The brick this connection registered, the authority's session serial, and the
    /// leader's term it registered in (a later leader, even this member again, runs a
    /// new authority that does not know the serial).
    brick: Option<(BrickId, u64, u64)>,
}

impl Session {
    pub fn new(peer: String) -> Session {
        Session { peer, brick: None }
    }

    /// One request: its reply goes to `out` (a frame). `leading`: the leader's authority
    /// and its term, or `None` on a member that does not lead (it answers `Register` and
    /// `Heartbeat` with `NotLeader` and `leader`'s address, as it answers a heartbeat of
    /// a session registered in another term); `published`: the committed map, the only one
    /// a reply carries. Returns what the authority asks its caller to do, and whether
    /// the reply must wait for the commit of what the authority changed so far (a
    /// registration's answer); or why the connection must close (a malformed frame, a
    /// reply where a request belongs).
    pub fn on_frame(
        &mut self,
        leading: Option<(&mut Authority, u64)>,
        published: Option<&ClusterMap>,
        leader: Option<SocketAddr>,
        now_ms: u64,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(Actions, bool), String> {
        let frame = decode_exact(bytes).map_err(|e| format!("closing {}: malformed frame: {e}", self.peer))?;
        let Kind::Request(op) = frame.kind else { return Err(format!("closing {}: it sent a reply", self.peer)) };
        let mut actions = Actions::default();
        let mut waits = false;
        let epoch = published.map_or(0, |m| m.epoch());
        let newer_map = match published {
            Some(m) if m.epoch() > frame.epoch => m.to_json().into_bytes(),
            _ => Vec::new(),
        };
        let not_leader = || (Status::NotLeader, leader.map(|a| a.to_string()).unwrap_or_default().into_bytes());
        let term = leading.as_ref().map_or(0, |l| l.1);
        let (status, value) = match (op, leading.map(|l| l.0)) {
            (Op::Register | Op::Heartbeat, None) => not_leader(),
            (Op::Register, Some(authority)) => match serde_json::from_slice::<Registration>(frame.value) {
                Ok(reg) => match authority.register_at(reg.id, reg.addr, now_ms) {
                    Ok((id, serial, registered)) => {
                        self.brick = Some((id, serial, term));
                        actions = registered;
                        waits = true;
                        actions.notes.insert(0, format!("{id} registered from {} (map epoch {epoch})", self.peer));
                        (Status::Ok, serde_json::to_vec(&Registered { id: id.0 }).expect("serialises"))
                    }
                    Err(e) => (Status::Conflict, e.to_string().into_bytes()),
                },
                Err(e) => (Status::Conflict, format!("bad registration: {e}").into_bytes()),
            },
            (Op::Heartbeat, Some(authority)) => match self.brick {
                Some((_, _, t)) if t != term => not_leader(),
                Some((id, serial, _)) if authority.heartbeat(id, serial, frame.epoch, now_ms) => (Status::Ok, newer_map),
                Some((id, _, _)) => {
                    // The brick stops on this answer: only once its removal is committed.
                    waits = true;
                    (Status::Conflict, format!("{id}'s session has ended (it was removed): register again").into_bytes())
                }
                None => (Status::Conflict, b"heartbeat before register".to_vec()),
            },
            (Op::GetMap, _) => (Status::Ok, newer_map),
            _ => (Status::WrongShard, format!("the map authority does not serve {}", op.name()).into_bytes()),
        };
        out.clear();
        encode(out, &Frame { kind: Kind::Reply(op, status), request_id: frame.request_id, epoch: 0, key: &[], value: &value });
        Ok((actions, waits))
    }

    /// The connection closed: a brick's session ends (the authority removes the brick
    /// unless it registers again in time).
    pub fn on_close(&self, authority: &mut Authority, now_ms: u64) -> Actions {
        match self.brick {
            Some((id, serial, _)) => authority.disconnected(id, serial, now_ms),
            None => Actions::default(),
        }
    }

    /// Whether a brick registered on this connection with the leader of `term`.
    pub fn registered_in(&self, term: u64) -> bool {
        self.brick.is_some_and(|(_, _, t)| t == term)
    }

    /// Whether a brick registered on this connection (its end is then worth a log line).
    pub fn is_brick(&self) -> bool {
        self.brick.is_some()
    }
}
