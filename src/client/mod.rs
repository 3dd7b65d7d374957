//! The client library: routes each key by the cluster map to the brick cores that hold
//! it, coordinates two-phase commit for writes, repairs its map lazily, and keeps many
//! operations in flight on one thread.
//!
//! A `Client` holds one connection per brick core it talks to (shard-aware) and is used
//! from one thread; make one per thread. `get`, `put` and `remove` wait for their
//! answer; `submit` and `poll` are the pipelined form, where completions come back as
//! they arrive.
//!
//! - Reads go to one readable replica, spread over the group.
//! - Writes to a one-replica group go straight to it; otherwise the client is the 2PC
//!   coordinator: prepare on every replica, commit if every one voted yes (or has left
//!   the map, dead), else abort and retry with a new transaction.
//! - A reply `StaleEpoch` carries the brick's map: the client installs it and retries.
//!   A lost or silent brick makes the client fetch the map until the authority has
//!   removed the brick, then the operation goes on with the others.

mod coordinator;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpConfig, TcpTransport, Transport, TransportError};
use hashbrown::HashMap;

use crate::map::{BrickId, ClusterMap};
use crate::proto::{decode_exact, encode, DdsFraming, Frame, Kind, Op, Status, KEY_LEN_MAX, VALUE_LEN_MAX};

pub use coordinator::ClientStats;
use coordinator::OpState;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long an operation may take, retries included.
    pub op_timeout: Duration,
    pub connect_timeout: Duration,
    /// A brick silent this long on one message is suspected: the client looks for a
    /// newer map (in which a dead brick is gone).
    pub suspect_after: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            op_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            suspect_after: Duration::from_millis(300),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no bricks to connect to")]
    NoBricks,
    #[error("fetch the cluster map from {seeds}: {why}")]
    NoMap { seeds: String, why: String },
    #[error("connect to {brick} core {core}: {source}")]
    Connect {
        brick: BrickId,
        core: usize,
        #[source]
        source: TransportError,
    },
    #[error("key of {len} bytes is longer than the limit of {KEY_LEN_MAX}")]
    KeyTooLong { len: usize },
    #[error("value of {len} bytes is longer than the limit of {VALUE_LEN_MAX}")]
    ValueTooLong { len: usize },
    #[error("{op} timed out after {timeout_ms} ms ({why})")]
    Timeout { op: &'static str, timeout_ms: u64, why: String },
    /// The write may or may not have taken effect: every replica had prepared it when the
    /// client gave up, so the replicas will decide it among themselves.
    #[error("{op} outcome unknown after {timeout_ms} ms: {why}")]
    Unknown { op: &'static str, timeout_ms: u64, why: String },
    #[error("{op} refused by {brick}: {status:?}: {message}")]
    Refused { op: &'static str, brick: BrickId, status: Status, message: String },
    #[error("protocol error from {brick}: {what}")]
    Protocol { brick: BrickId, what: String },
    #[error("poll: {0}")]
    Poll(#[source] TransportError),
}

/// One operation, borrowing its key and value.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    Get(&'a [u8]),
    Put(&'a [u8], &'a [u8]),
    Remove(&'a [u8]),
}

/// What a successful operation returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Value(Vec<u8>),
    NotFound,
    Stored,
    Removed,
}

#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    pub result: Result<Outcome, ClientError>,
}

/// A message on the wire, waiting for its reply.
struct Msg {
    conn: ConnId,
    op: Op,
    token: u64,
    brick: BrickId,
    sent: Instant,
    suspected: bool,
}

/// A reply (or the loss of one) for the coordinator.
pub(crate) struct Reply {
    pub token: u64,
    pub brick: BrickId,
    pub op: Op,
    /// `None`: the connection was lost before the reply came.
    pub status: Option<Status>,
    pub value: Vec<u8>,
}

/// The part the transport calls back into (kept apart from the transport to borrow both).
struct State {
    msgs: HashMap<u64, Msg>,
    replies: VecDeque<Reply>,
}

impl Handler for State {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        let Kind::Reply(op, status) = frame.kind else { return Err("a brick sent a request".into()) };
        // Ids are never reused, so a reply to a message already given up is just late.
        let Some(msg) = self.msgs.remove(&frame.request_id) else { return Ok(()) };
        if msg.conn != conn || msg.op != op {
            return Err(format!("reply to request {} came on the wrong connection or op", frame.request_id));
        }
        self.replies.push_back(Reply { token: msg.token, brick: msg.brick, op, status: Some(status), value: frame.value.to_vec() });
        Ok(())
    }

    fn on_close(&mut self, conn: ConnId, _peer: SocketAddr, _reason: &CloseReason) {
        let ids: Vec<u64> = self.msgs.iter().filter(|(_, m)| m.conn == conn).map(|(id, _)| *id).collect();
        for id in ids {
            let m = self.msgs.remove(&id).expect("listed");
            self.replies.push_back(Reply { token: m.token, brick: m.brick, op: m.op, status: None, value: Vec::new() });
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

pub struct Client {
    transport: TcpTransport<DdsFraming>,
    state: State,
    map: Arc<ClusterMap>,
    /// Where to ask for a map when bricks cannot tell: the seeds given to `connect`.
    seeds: Vec<SocketAddr>,
    conns: HashMap<SocketAddr, ConnId>,
    ops: HashMap<u64, OpState>,
    ready: VecDeque<Completion>,
    next_token: u64,
    next_msg: u64,
    /// Names this client's transactions.
    client_id: u64,
    next_seq: u64,
    config: ClientConfig,
    last_scan: Instant,
    last_fetch: Option<Instant>,
    pub(crate) stats: ClientStats,
}

impl Client {
    /// Connects to a cluster through any of `seeds` (bricks or the map authority): fetches
    /// the map, then opens connections as operations need them.
    pub fn connect(seeds: &[SocketAddr], config: ClientConfig) -> Result<Client, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::NoBricks);
        }
        let map = crate::meta::fetch_map(seeds, config.connect_timeout.max(Duration::from_millis(500)))
            .map_err(|why| ClientError::NoMap { seeds: format!("{seeds:?}"), why })?;
        Ok(Self::with_map(seeds, map, config))
    }

    /// A client that starts from `map` as it is (even an old one: it repairs itself on
    /// first use) and asks `seeds` for newer maps.
    pub fn with_map(seeds: &[SocketAddr], map: ClusterMap, config: ClientConfig) -> Client {
        Client {
            transport: TcpTransport::new(DdsFraming, TcpConfig::default()).expect("an epoll instance"),
            state: State { msgs: HashMap::new(), replies: VecDeque::new() },
            map: Arc::new(map),
            seeds: seeds.to_vec(),
            conns: HashMap::new(),
            ops: HashMap::new(),
            ready: VecDeque::new(),
            next_token: 1,
            next_msg: 1,
            client_id: random_u64(),
            next_seq: 1,
            config,
            last_scan: Instant::now(),
            last_fetch: None,
            stats: ClientStats::default(),
        }
    }

    /// The map this client routes by now.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Operations submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.ops.len() + self.ready.len()
    }

    /// Installs `map` if it is newer; returns whether it was.
    pub(crate) fn install(&mut self, map: ClusterMap) -> bool {
        if map.epoch <= self.map.epoch {
            return false;
        }
        self.map = Arc::new(map);
        self.stats.maps_installed += 1;
        true
    }

    /// Asks the seeds and the bricks for a newer map, at most every 50 ms.
    pub(crate) fn fetch_map(&mut self) {
        if self.last_fetch.is_some_and(|t| t.elapsed() < Duration::from_millis(50)) {
            return;
        }
        self.last_fetch = Some(Instant::now());
        let mut seeds = self.seeds.clone();
        seeds.extend(self.map.bricks.values().filter_map(|b| b.cores.first().copied()));
        if let Ok(map) = crate::meta::fetch_map(&seeds, Duration::from_millis(200)) {
            if self.install(map) {
                self.stats.maps_fetched += 1;
            }
        }
    }

    /// Sends one message about `token` to the core of `brick` that stores `key`.
    pub(crate) fn send(&mut self, token: u64, brick: BrickId, op: Op, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        let addr = self.map.bricks.get(&brick).ok_or_else(|| ClientError::Protocol { brick, what: "not in the map".into() })?;
        if addr.cores.is_empty() {
            return Err(ClientError::Protocol { brick, what: "no cores in the map".into() });
        }
        let core = self.map.core_of(crate::map::key_hash(key), addr.cores.len());
        let at = addr.cores[core];
        let conn = match self.conns.get(&at).filter(|c| self.transport.peer(**c).is_some()) {
            Some(&c) => c,
            None => {
                let c = self.transport.connect(at, self.config.connect_timeout).map_err(|source| ClientError::Connect { brick, core, source })?;
                self.conns.insert(at, c);
                c
            }
        };
        let id = self.next_msg;
        self.next_msg += 1;
        let out = self.transport.outbox(conn).map_err(|source| ClientError::Connect { brick, core, source })?;
        encode(out, &Frame { kind: Kind::Request(op), request_id: id, epoch: self.map.epoch, key, value });
        self.state.msgs.insert(id, Msg { conn, op, token, brick, sent: Instant::now(), suspected: false });
        Ok(())
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
        let op = OpState::new(request, Instant::now() + self.config.op_timeout);
        self.ops.insert(token, op);
        self.start(token);
        Ok(token)
    }

    /// Sends what was submitted, waits at most `timeout` for replies, and appends every
    /// completion that is ready to `out`. Returns how many it appended.
    pub fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<usize, ClientError> {
        if self.ready.is_empty() {
            let timeout = if self.ops.is_empty() { Duration::ZERO } else { timeout.min(self.next_timer()) };
            self.transport.poll(Some(timeout), &mut self.state).map_err(ClientError::Poll)?;
            self.process();
        } else {
            // Completions are waiting: return them at once, but send what was submitted.
            self.transport.flush(&mut self.state);
        }
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        Ok(n)
    }

    /// Feeds replies to their operations, then runs timers (retries, suspicions,
    /// deadlines).
    fn process(&mut self) {
        while let Some(reply) = self.state.replies.pop_front() {
            self.on_reply(reply);
        }
        let now = Instant::now();
        if now.duration_since(self.last_scan) < Duration::from_millis(1) {
            return;
        }
        self.last_scan = now;
        let suspect = self.config.suspect_after;
        let mut silent: Vec<(u64, BrickId)> = Vec::new();
        for m in self.state.msgs.values_mut() {
            if !m.suspected && now.duration_since(m.sent) > suspect {
                m.suspected = true;
                silent.push((m.token, m.brick));
            }
        }
        for (token, brick) in silent {
            self.on_silent(token, brick);
        }
        let due: Vec<u64> = self.ops.iter().filter(|(_, o)| o.timer_due(now)).map(|(&t, _)| t).collect();
        for token in due {
            self.on_timer(token);
        }
        self.transport.flush(&mut self.state);
    }

    /// How long until the next timer (at most 10 ms while operations are open, so
    /// suspicions are noticed).
    fn next_timer(&self) -> Duration {
        let now = Instant::now();
        self.ops.values().filter_map(|o| o.next_timer()).map(|t| t.saturating_duration_since(now)).min().unwrap_or(Duration::from_millis(10)).min(Duration::from_millis(10))
    }

    pub(crate) fn complete(&mut self, token: u64, result: Result<Outcome, ClientError>) {
        if self.ops.remove(&token).is_some() {
            // Drop messages of this operation still on the wire: their replies are late.
            self.state.msgs.retain(|_, m| m.token != token);
            self.ready.push_back(Completion { token, result });
        }
    }

    /// Waits for the completion of `token`; other completions stay queued for `poll`.
    fn wait(&mut self, token: u64) -> Result<Outcome, ClientError> {
        loop {
            if let Some(at) = self.ready.iter().position(|c| c.token == token) {
                return self.ready.remove(at).expect("found").result;
            }
            let timeout = self.next_timer();
            self.transport.poll(Some(timeout), &mut self.state).map_err(ClientError::Poll)?;
            self.process();
        }
    }

    /// Counters of every core of `brick`, asked on each core's own connection.
    pub fn brick_stats(&mut self, brick: BrickId) -> Result<Vec<crate::proto::CoreStats>, ClientError> {
        let cores = self.map.bricks.get(&brick).map(|b| b.cores.clone()).unwrap_or_default();
        let timeout = self.config.connect_timeout;
        cores
            .into_iter()
            .map(|addr| {
                let bad = |what: String| ClientError::Protocol { brick, what };
                let (status, value) = crate::meta::rpc::Rpc::connect(addr, timeout)
                    .and_then(|mut r| r.call(Op::Stats, 0, &[], &[], timeout))
                    .map_err(|e| bad(e.to_string()))?;
                if status != Status::Ok {
                    return Err(bad(format!("stats answered {status:?}")));
                }
                crate::proto::CoreStats::decode(&value).map_err(|e| bad(e.to_string()))
            })
            .collect()
    }

    /// The value stored under `key`, or `None`.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let token = self.submit(Request::Get(key))?;
        match self.wait(token)? {
            Outcome::Value(v) => Ok(Some(v)),
            Outcome::NotFound => Ok(None),
            other => unreachable!("get answered {other:?}"),
        }
    }

    /// Stores `value` under `key`, replacing what was there.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        let token = self.submit(Request::Put(key, value))?;
        self.wait(token).map(|_| ())
    }

    /// Removes `key`; returns whether it was there.
    pub fn remove(&mut self, key: &[u8]) -> Result<bool, ClientError> {
        let token = self.submit(Request::Remove(key))?;
        Ok(self.wait(token)? == Outcome::Removed)
    }
}
