//! One connection to the map authority, sans-I/O: a brick's session (after `Register`)
//! or anyone asking for the map. `meta::serve` (a thread per connection) and the
//! simulator (simulated links) both drive it: `on_frame` takes a request frame and
//! writes the reply frame, `on_close` ends the session when the connection does.

use crate::map::BrickId;
use crate::proto::{decode_exact, encode, Frame, Kind, Op, Registered, Registration, Status};

use super::authority::{Actions, Authority};

pub struct Session {
    /// Who is on the other end, for the log.
    peer: String,
    /// The brick this connection registered, and the authority's session serial.
    brick: Option<(BrickId, u64)>,
}

impl Session {
    pub fn new(peer: String) -> Session {
        Session { peer, brick: None }
    }

    /// One request: its reply goes to `out` (a frame). Returns what the authority asks
    /// its caller to do, to be carried out before the reply leaves; or why the
    /// connection must close (a malformed frame, a reply where a request belongs).
    pub fn on_frame(&mut self, authority: &mut Authority, now_ms: u64, bytes: &[u8], out: &mut Vec<u8>) -> Result<Actions, String> {
        let frame = decode_exact(bytes).map_err(|e| format!("closing {}: malformed frame: {e}", self.peer))?;
        let Kind::Request(op) = frame.kind else { return Err(format!("closing {}: it sent a reply", self.peer)) };
        let mut actions = Actions::default();
        let epoch = authority.map().map_or(0, |m| m.epoch());
        let newer_map = |authority: &Authority| match authority.map() {
            Some(m) if m.epoch() > frame.epoch => m.to_json().into_bytes(),
            _ => Vec::new(),
        };
        let (status, value) = match op {
            Op::Register => match serde_json::from_slice::<Registration>(frame.value) {
                Ok(reg) => match authority.register_at(reg.id, reg.addr, now_ms) {
                    Ok((id, serial, registered)) => {
                        self.brick = Some((id, serial));
                        actions = registered;
                        actions.notes.insert(0, format!("{id} registered from {} (map epoch {epoch})", self.peer));
                        (Status::Ok, serde_json::to_vec(&Registered { id: id.0 }).expect("serialises"))
                    }
                    Err(e) => (Status::Conflict, e.to_string().into_bytes()),
                },
                Err(e) => (Status::Conflict, format!("bad registration: {e}").into_bytes()),
            },
            Op::Heartbeat => match self.brick {
                Some((id, serial)) if authority.heartbeat(id, serial, frame.epoch, now_ms) => (Status::Ok, newer_map(authority)),
                Some((id, _)) => (Status::Conflict, format!("{id}'s session has ended (it was removed): register again").into_bytes()),
                None => (Status::Conflict, b"heartbeat before register".to_vec()),
            },
            Op::GetMap => (Status::Ok, newer_map(authority)),
            _ => (Status::WrongShard, format!("the map authority does not serve {}", op.name()).into_bytes()),
        };
        out.clear();
        encode(out, &Frame { kind: Kind::Reply(op, status), request_id: frame.request_id, epoch: 0, key: &[], value: &value });
        Ok(actions)
    }

    /// The connection closed: a brick's session ends (the authority removes the brick
    /// unless it registers again in time).
    pub fn on_close(&self, authority: &mut Authority, now_ms: u64) -> Actions {
        match self.brick {
            Some((id, serial)) => authority.disconnected(id, serial, now_ms),
            None => Actions::default(),
        }
    }

    /// Whether a brick registered on this connection (its end is then worth a log line).
    pub fn is_brick(&self) -> bool {
        self.brick.is_some()
    }
}
