//! The client's protocol state, sans-I/O: operations in flight, messages on the wire,
//! the map, timers. It is given the time, the frames that arrive and the links that
//! break; it hands out frames to send (by brick core address) and asks for a map fetch.
//! `Client` (mod.rs) drives it over TCP; the simulator (`sim/`) drives the same code over
//! a simulated network.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hash::HashMap;
use crate::map::{BrickId, ClusterMap};
use crate::proto::{decode_exact, encode, Frame, Kind, Op, Status, KEY_LEN_MAX, VALUE_LEN_MAX};

use super::coordinator::{ClientStats, OpState};
use super::{ClientConfig, ClientError, Completion, Request};

/// Frames queued per send round before the shell must drain them.
const OUT_FRAMES_MAX: usize = 1 << 20;
/// How long a commit decision waits for a later frame to the replicas to ride ahead of
/// (so the replica logs it in the same round, and the same sync, as the next prepare)
/// before it goes out alone.
pub const DECISION_DELAY: Duration = Duration::from_micros(200);

/// Frames to send, back to back, and where each starts with its destination.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    at: Vec<(SocketAddr, usize)>,
}

impl Outbox {
    fn push(&mut self, at: SocketAddr, frame: &Frame<'_>) {
        assert!(self.at.len() < OUT_FRAMES_MAX, "the driver never drains the client's frames");
        self.at.push((at, self.bytes.len()));
        encode(&mut self.bytes, frame);
    }

    fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Hands each frame to `send`; a link whose send fails goes in `broken` and gets
    /// nothing more. Keeps the buffers' capacity.
    fn drain(&mut self, send: &mut impl FnMut(SocketAddr, &[u8]) -> bool, broken: &mut Vec<SocketAddr>) {
        for (i, &(addr, start)) in self.at.iter().enumerate() {
            let end = self.at.get(i + 1).map_or(self.bytes.len(), |&(_, next)| next);
            if !broken.contains(&addr) && !send(addr, &self.bytes[start..end]) {
                broken.push(addr);
            }
        }
        self.bytes.clear();
        self.at.clear();
    }
}

/// A message on the wire, waiting for its reply.
pub(crate) struct Msg {
    pub addr: SocketAddr,
    pub op: Op,
    pub token: u64,
    pub brick: BrickId,
    pub sent: Instant,
    pub suspected: bool,
}

/// A reply (or the loss of one) for the coordinator.
pub(crate) struct Reply {
    pub token: u64,
    pub brick: BrickId,
    pub op: Op,
    /// `None`: the link broke before the reply came.
    pub status: Option<Status>,
    pub value: Vec<u8>,
}

pub struct ClientCore {
    pub(crate) msgs: HashMap<u64, Msg>,
    replies: VecDeque<Reply>,
    pub(crate) map: Arc<ClusterMap>,
    pub(crate) ops: HashMap<u64, OpState>,
    ready: VecDeque<Completion>,
    next_token: u64,
    next_msg: u64,
    /// Names this client's transactions.
    pub(crate) client_id: u64,
    pub(crate) next_seq: u64,
    pub(crate) config: ClientConfig,
    /// The time, as the driver last said.
    pub(crate) now: Instant,
    last_scan: Instant,
    last_fetch: Option<Instant>,
    map_wanted: bool,
    /// Frames to send.
    out: Outbox,
    /// Commit decisions of writes already reported: nothing waits for their replies.
    /// They leave ahead of the next frames, or once `decisions_due` has passed.
    decisions: Outbox,
    decisions_due: Option<Instant>,
    pub(crate) stats: ClientStats,
}

impl ClientCore {
    /// A core that starts from `map` (even an old one: it repairs itself on first use).
    /// `client_id` names its transactions and must be unique among live clients.
    pub fn new(map: ClusterMap, config: ClientConfig, client_id: u64, now: Instant) -> ClientCore {
        ClientCore {
            msgs: HashMap::default(),
            replies: VecDeque::new(),
            map: Arc::new(map),
            ops: HashMap::default(),
            ready: VecDeque::new(),
            next_token: 1,
            next_msg: 1,
            client_id,
            next_seq: 1,
            config,
            now,
            last_scan: now,
            last_fetch: None,
            map_wanted: false,
            out: Outbox::default(),
            decisions: Outbox::default(),
            decisions_due: None,
            stats: ClientStats::default(),
        }
    }

    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Operations submitted and not yet taken by `take_completions`, plus one while
    /// commit decisions wait to be sent: a driver keeps running the core (its timers
    /// included) until this is 0.
    pub fn in_flight(&self) -> usize {
        self.ops.len() + self.ready.len() + usize::from(self.decisions_pending())
    }

    /// The driver's clock moves on (it never goes back).
    pub fn set_now(&mut self, now: Instant) {
        debug_assert!(now >= self.now, "time went back");
        self.now = self.now.max(now);
    }

    /// Installs `map` if it is newer; returns whether it was.
    pub fn install(&mut self, map: ClusterMap) -> bool {
        if map.epoch() <= self.map.epoch() {
            return false;
        }
        self.map = Arc::new(map);
        self.stats.maps_installed += 1;
        true
    }

    /// A map the driver fetched because `take_map_wanted` asked for one.
    pub fn install_fetched(&mut self, map: ClusterMap) {
        if self.install(map) {
            self.stats.maps_fetched += 1;
        }
    }

    /// Asks the driver for a newer map, at most every 50 ms.
    pub(crate) fn fetch_map(&mut self) {
        if self.last_fetch.is_some_and(|t| self.now.duration_since(t) < Duration::from_millis(50)) {
            return;
        }
        self.last_fetch = Some(self.now);
        self.map_wanted = true;
    }

    /// Whether the coordinator wants a newer map (once per request).
    pub fn take_map_wanted(&mut self) -> bool {
        std::mem::take(&mut self.map_wanted)
    }

    /// The address of the core of `brick` that stores `key`.
    fn core_addr(&self, brick: BrickId, key: &[u8]) -> Result<SocketAddr, ClientError> {
        let addr = self.map.bricks().get(&brick).ok_or_else(|| ClientError::Protocol { brick, what: "not in the map".into() })?;
        if addr.cores.is_empty() {
            return Err(ClientError::Protocol { brick, what: "no cores in the map".into() });
        }
        Ok(addr.cores[self.map.core_of(crate::map::key_hash(key), addr.cores.len())])
    }

    fn next_request_id(&mut self) -> u64 {
        let id = self.next_msg;
        self.next_msg += 1;
        id
    }

    /// Queues one message about `token` to the core of `brick` that stores `key`.
    pub(crate) fn send(&mut self, token: u64, brick: BrickId, op: Op, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        let at = self.core_addr(brick, key)?;
        let id = self.next_request_id();
        self.out.push(at, &Frame { kind: Kind::Request(op), request_id: id, epoch: self.map.epoch(), key, value });
        self.msgs.insert(id, Msg { addr: at, op, token, brick, sent: self.now, suspected: false });
        Ok(())
    }

    /// Queues the commit of `txid` to the core of `brick` that stores `key`, for a write
    /// already reported: no operation waits for its reply (a late reply is dropped as
    /// any is), and if it never arrives the replica decides in doubt (all prepared).
    pub(crate) fn send_decision(&mut self, brick: BrickId, key: &[u8], txid: &[u8]) {
        let Ok(at) = self.core_addr(brick, key) else { return };
        let id = self.next_request_id();
        self.decisions.push(at, &Frame { kind: Kind::Request(Op::Commit), request_id: id, epoch: self.map.epoch(), key, value: txid });
        self.decisions_due.get_or_insert(self.now + DECISION_DELAY);
    }

    /// Makes pending decisions due now: the next `drain_out` sends them.
    pub fn release_decisions(&mut self) {
        if self.decisions_pending() {
            self.decisions_due = Some(self.now);
        }
    }

    /// Commit decisions not yet handed to the driver.
    pub fn decisions_pending(&self) -> bool {
        !self.decisions.is_empty()
    }

    /// Hands each queued frame to `send(address, frame bytes)`, in order; a `false`
    /// return means the link cannot be made: its messages are lost. Pending decisions
    /// go first, with any other frame or once they are due.
    pub fn drain_out(&mut self, mut send: impl FnMut(SocketAddr, &[u8]) -> bool) {
        let mut broken: Vec<SocketAddr> = Vec::new();
        if !self.decisions.is_empty() && (!self.out.is_empty() || self.decisions_due.is_some_and(|t| t <= self.now)) {
            self.decisions.drain(&mut send, &mut broken);
            self.decisions_due = None;
        }
        self.out.drain(&mut send, &mut broken);
        for addr in broken {
            self.link_lost(addr);
        }
    }

    /// A frame arrived from the brick core at `from`. `Err`: it is malformed or was not
    /// asked for on that link; the driver closes the link.
    pub fn on_frame(&mut self, from: SocketAddr, frame: &[u8]) -> Result<(), String> {
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        let Kind::Reply(op, status) = frame.kind else { return Err("a brick sent a request".into()) };
        // Ids are never reused, so a reply to a message already given up is just late.
        let Some(msg) = self.msgs.remove(&frame.request_id) else { return Ok(()) };
        if msg.addr != from || msg.op != op {
            return Err(format!("reply to request {} came on the wrong connection or op", frame.request_id));
        }
        self.replies.push_back(Reply { token: msg.token, brick: msg.brick, op, status: Some(status), value: frame.value.to_vec() });
        Ok(())
    }

    /// The link to `addr` broke: every message on it is lost.
    pub fn link_lost(&mut self, addr: SocketAddr) {
        let mut ids: Vec<u64> = self.msgs.iter().filter(|(_, m)| m.addr == addr).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        for id in ids {
            let m = self.msgs.remove(&id).expect("listed");
            self.replies.push_back(Reply { token: m.token, brick: m.brick, op: m.op, status: None, value: Vec::new() });
        }
    }

    /// Starts an operation; its completion carries the returned token.
    pub fn submit(&mut self, request: Request<'_>) -> Result<u64, ClientError> {
        let (key, value) = match request {
            Request::Get(k) | Request::Remove(k) => (k, &[][..]),
            Request::Put(k, v) => (k, v),
        };
        if key.len() > KEY_LEN_MAX {
            return Err(ClientError::KeyTooLong { len: key.len() });
        }
        if value.len() > VALUE_LEN_MAX {
            return Err(ClientError::ValueTooLong { len: value.len() });
        }
        let token = self.next_token;
        self.next_token += 1;
        let op = OpState::new(request, self.now + self.config.op_timeout);
        self.ops.insert(token, op);
        self.start(token);
        Ok(token)
    }

    /// Feeds replies to their operations, then runs timers (retries, suspicions,
    /// deadlines).
    pub fn process(&mut self) {
        while let Some(reply) = self.replies.pop_front() {
            self.on_reply(reply);
        }
        let now = self.now;
        if now.duration_since(self.last_scan) < Duration::from_millis(1) {
            return;
        }
        self.last_scan = now;
        let suspect = self.config.suspect_after;
        let mut silent: Vec<(u64, u64, BrickId)> = Vec::new();
        for (&id, m) in self.msgs.iter_mut() {
            if !m.suspected && now.duration_since(m.sent) > suspect {
                m.suspected = true;
                silent.push((id, m.token, m.brick));
            }
        }
        // Hash order is not the same from run to run: sort, so a simulation replays.
        silent.sort_unstable();
        for (_, token, brick) in silent {
            self.on_silent(token, brick);
        }
        let mut due: Vec<u64> = self.ops.iter().filter(|(_, o)| o.timer_due(now)).map(|(&t, _)| t).collect();
        due.sort_unstable();
        for token in due {
            self.on_timer(token);
        }
    }

    /// How long until the next timer (at most 10 ms while operations are open, so
    /// suspicions are noticed).
    pub fn next_timer(&self) -> Duration {
        let now = self.now;
        let ops = self.ops.values().filter_map(|o| o.next_timer());
        ops.chain(self.decisions_due).map(|t| t.saturating_duration_since(now)).min().unwrap_or(Duration::from_millis(10)).min(Duration::from_millis(10))
    }

    pub(crate) fn complete(&mut self, token: u64, result: Result<crate::client::Outcome, ClientError>) {
        if self.ops.remove(&token).is_some() {
            // Drop messages of this operation still on the wire: their replies are late.
            self.msgs.retain(|_, m| m.token != token);
            self.ready.push_back(Completion { token, result });
        }
    }

    /// Whether a completion is ready.
    pub fn has_completions(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Moves every ready completion to `out`; returns how many.
    pub fn take_completions(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    /// Takes the completion of `token` if it is ready.
    pub fn take_completion(&mut self, token: u64) -> Option<Completion> {
        let at = self.ready.iter().position(|c| c.token == token)?;
        self.ready.remove(at)
    }
}
