//! The client library: routes each key to the brick core that owns it and keeps many
//! requests in flight on one thread.
//!
//! A `Client` holds one connection per brick core (shard-aware) and is used from one
//! thread; make one per thread. `get`, `put` and `remove` wait for their answer; `submit`
//! and `poll` are the pipelined form, where completions come back as they arrive.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpConfig, TcpTransport, Transport, TransportError};
use hashbrown::HashMap;

use crate::map::{brick_of, core_of, key_hash, partition_of};
use crate::proto::{decode_exact, encode, BrickInfo, CoreStats, DdsFraming, Frame, Kind, Op, Status, KEY_LEN_MAX, VALUE_LEN_MAX};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long an operation may wait for its reply.
    pub op_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { op_timeout: Duration::from_secs(10), connect_timeout: Duration::from_secs(5) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no bricks to connect to")]
    NoBricks,
    #[error("connect to brick {brick} core {core}: {source}")]
    Connect {
        brick: usize,
        core: usize,
        #[source]
        source: TransportError,
    },
    #[error("key of {len} bytes is longer than the limit of {KEY_LEN_MAX}")]
    KeyTooLong { len: usize },
    #[error("value of {len} bytes is longer than the limit of {VALUE_LEN_MAX}")]
    ValueTooLong { len: usize },
    #[error("{op} timed out after {timeout_ms} ms waiting for brick {brick} core {core}")]
    Timeout { op: &'static str, brick: usize, core: usize, timeout_ms: u64 },
    #[error("{op}: connection to brick {brick} core {core} lost: {reason}")]
    ConnectionLost { op: &'static str, brick: usize, core: usize, reason: String },
    #[error("{op} refused by brick {brick}: {status:?}: {message}")]
    Refused { op: &'static str, brick: usize, status: Status, message: String },
    #[error("protocol error from brick {brick} core {core}: {what}")]
    Protocol { brick: usize, core: usize, what: String },
    #[error("bricks disagree on the layout: {what}")]
    Layout { what: String },
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

impl Request<'_> {
    fn op(&self) -> Op {
        match self {
            Request::Get(_) => Op::Get,
            Request::Put(..) => Op::Put,
            Request::Remove(_) => Op::Remove,
        }
    }

    fn key(&self) -> &[u8] {
        match self {
            Request::Get(k) | Request::Put(k, _) | Request::Remove(k) => k,
        }
    }
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

struct InFlight {
    conn: ConnId,
    op: Op,
    brick: usize,
    core: usize,
    deadline: Instant,
}

/// Where each brick core is and which connection reaches it.
struct BrickRoute {
    addrs: Vec<SocketAddr>,
    conns: Vec<Option<ConnId>>,
}

/// The part the transport calls back into (kept apart from the transport to borrow both).
struct State {
    in_flight: HashMap<u64, InFlight>,
    ready: VecDeque<Completion>,
}

impl Handler for State {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        let Kind::Reply(op, status) = frame.kind else { return Err("a brick sent a request".into()) };
        let Some(req) = self.in_flight.remove(&frame.request_id) else {
            return Err(format!("reply to unknown request {}", frame.request_id));
        };
        if req.conn != conn || req.op != op {
            return Err(format!("reply to request {} came on the wrong connection or op", frame.request_id));
        }
        let result = match (op, status) {
            (Op::Get, Status::Ok) => Ok(Outcome::Value(frame.value.to_vec())),
            (Op::Put, Status::Ok) => Ok(Outcome::Stored),
            (Op::Remove, Status::Ok) => Ok(Outcome::Removed),
            (Op::Get | Op::Remove, Status::NotFound) => Ok(Outcome::NotFound),
            (Op::Hello | Op::Stats, Status::Ok) => Ok(Outcome::Value(frame.value.to_vec())),
            (_, status) => Err(ClientError::Refused {
                op: op.name(),
                brick: req.brick,
                status,
                message: String::from_utf8_lossy(frame.value).into_owned(),
            }),
        };
        self.ready.push_back(Completion { token: frame.request_id, result });
        Ok(())
    }

    fn on_close(&mut self, conn: ConnId, _peer: SocketAddr, reason: &CloseReason) {
        let reason = reason.to_string();
        self.fail_conn(conn, |r| ClientError::ConnectionLost { op: r.op.name(), brick: r.brick, core: r.core, reason: reason.clone() });
    }
}

impl State {
    /// Completes every operation in flight on `conn` with the error `error` makes for it.
    fn fail_conn(&mut self, conn: ConnId, error: impl Fn(&InFlight) -> ClientError) {
        let ids: Vec<u64> = self.in_flight.iter().filter(|(_, r)| r.conn == conn).map(|(id, _)| *id).collect();
        for id in ids {
            let r = self.in_flight.remove(&id).expect("listed");
            self.ready.push_back(Completion { token: id, result: Err(error(&r)) });
        }
    }
}

pub struct Client {
    transport: TcpTransport<DdsFraming>,
    state: State,
    bricks: Vec<BrickRoute>,
    partition_bits: u8,
    next_id: u64,
    config: ClientConfig,
    last_timeout_scan: Instant,
}

impl Client {
    /// Connects to the bricks of a cluster, given in cluster order (each by its first
    /// core's address); learns each brick's cores from it.
    pub fn connect(bricks: &[SocketAddr], config: ClientConfig) -> Result<Client, ClientError> {
        if bricks.is_empty() {
            return Err(ClientError::NoBricks);
        }
        let transport = TcpTransport::new(DdsFraming, TcpConfig::default()).map_err(ClientError::Poll)?;
        let mut client = Client {
            transport,
            state: State { in_flight: HashMap::new(), ready: VecDeque::new() },
            bricks: bricks.iter().map(|&a| BrickRoute { addrs: vec![a], conns: vec![None] }).collect(),
            partition_bits: 0,
            next_id: 1,
            config,
            last_timeout_scan: Instant::now(),
        };
        for (brick, &dialled) in bricks.iter().enumerate() {
            let payload = client.call(brick, 0, Op::Hello)?;
            let info = BrickInfo::decode(&payload)
                .map_err(|e| ClientError::Protocol { brick, core: 0, what: e.to_string() })?;
            if brick == 0 {
                client.partition_bits = info.partition_bits;
            } else if info.partition_bits != client.partition_bits {
                return Err(ClientError::Layout {
                    what: format!("brick 0 has {} partition bits, brick {brick} has {}", client.partition_bits, info.partition_bits),
                });
            }
            let ip = dialled.ip();
            let route = &mut client.bricks[brick];
            route.addrs = info.ports.iter().map(|&port| SocketAddr::new(ip, port)).collect();
            let first = route.conns[0];
            route.conns = vec![None; route.addrs.len()];
            // The connection `Hello` went over is core 0's when the brick listed the
            // address we dialled first.
            if route.addrs[0] == dialled {
                route.conns[0] = first;
            }
        }
        Ok(client)
    }

    pub fn bricks(&self) -> usize {
        self.bricks.len()
    }

    /// Cores of `brick`.
    pub fn cores(&self, brick: usize) -> usize {
        self.bricks[brick].addrs.len()
    }

    /// Operations submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.len() + self.state.ready.len()
    }

    fn conn(&mut self, brick: usize, core: usize) -> Result<ConnId, ClientError> {
        if let Some(conn) = self.bricks[brick].conns[core] {
            if self.transport.peer(conn).is_some() {
                return Ok(conn);
            }
        }
        let addr = self.bricks[brick].addrs[core];
        let conn = self
            .transport
            .connect(addr, self.config.connect_timeout)
            .map_err(|source| ClientError::Connect { brick, core, source })?;
        self.bricks[brick].conns[core] = Some(conn);
        Ok(conn)
    }

    fn send(&mut self, brick: usize, core: usize, op: Op, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        let conn = self.conn(brick, core)?;
        let id = self.next_id;
        self.next_id += 1;
        let out = self.transport.outbox(conn).map_err(|source| ClientError::Connect { brick, core, source })?;
        encode(out, &Frame { kind: Kind::Request(op), request_id: id, epoch: 0, key, value });
        let deadline = Instant::now() + self.config.op_timeout;
        self.state.in_flight.insert(id, InFlight { conn, op, brick, core, deadline });
        Ok(id)
    }

    /// Starts an operation; its completion carries the returned token.
    pub fn submit(&mut self, request: Request<'_>) -> Result<u64, ClientError> {
        let key = request.key();
        if key.len() > KEY_LEN_MAX {
            return Err(ClientError::KeyTooLong { len: key.len() });
        }
        let value: &[u8] = match request {
            Request::Put(_, v) if v.len() > VALUE_LEN_MAX => return Err(ClientError::ValueTooLong { len: v.len() }),
            Request::Put(_, v) => v,
            _ => &[],
        };
        let partition = partition_of(key_hash(key), self.partition_bits);
        let brick = brick_of(partition, self.partition_bits, self.bricks.len());
        let core = core_of(partition, self.bricks[brick].addrs.len());
        self.send(brick, core, request.op(), key, value)
    }

    /// Sends what was submitted, waits at most `timeout` for replies, and appends every
    /// completion that is ready to `out`. Returns how many it appended.
    pub fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<usize, ClientError> {
        if self.state.ready.is_empty() {
            let timeout = if self.state.in_flight.is_empty() { Duration::ZERO } else { timeout };
            self.transport.poll(Some(timeout), &mut self.state).map_err(ClientError::Poll)?;
            self.expire();
        } else {
            // Completions are waiting: return them at once, but send what was submitted.
            self.transport.flush(&mut self.state);
        }
        let n = self.state.ready.len();
        out.extend(self.state.ready.drain(..));
        Ok(n)
    }

    /// Fails operations past their deadline. Their connection is closed: a reply that
    /// came late would otherwise be taken for another's.
    fn expire(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_timeout_scan) < Duration::from_millis(1) {
            return;
        }
        self.last_timeout_scan = now;
        let mut late: Vec<ConnId> = self.state.in_flight.values().filter(|r| r.deadline <= now).map(|r| r.conn).collect();
        late.sort_unstable();
        late.dedup();
        let timeout_ms = self.config.op_timeout.as_millis() as u64;
        for conn in late {
            self.state.fail_conn(conn, |r| ClientError::Timeout { op: r.op.name(), brick: r.brick, core: r.core, timeout_ms });
            self.transport.close(conn, CloseReason::Local, &mut self.state);
        }
    }

    /// Waits for the completion of `token`; other completions stay queued for `poll`.
    fn wait(&mut self, token: u64) -> Result<Outcome, ClientError> {
        loop {
            if let Some(at) = self.state.ready.iter().position(|c| c.token == token) {
                return self.state.ready.remove(at).expect("found").result;
            }
            self.transport.poll(Some(Duration::from_millis(100)), &mut self.state).map_err(ClientError::Poll)?;
            self.expire();
        }
    }

    fn call(&mut self, brick: usize, core: usize, op: Op) -> Result<Vec<u8>, ClientError> {
        let token = self.send(brick, core, op, &[], &[])?;
        match self.wait(token)? {
            Outcome::Value(v) => Ok(v),
            other => Err(ClientError::Protocol { brick, core, what: format!("{} answered {other:?}", op.name()) }),
        }
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

    /// Counters of every core of `brick`.
    pub fn stats(&mut self, brick: usize) -> Result<Vec<CoreStats>, ClientError> {
        (0..self.cores(brick))
            .map(|core| {
                let payload = self.call(brick, core, Op::Stats)?;
                CoreStats::decode(&payload).map_err(|e| ClientError::Protocol { brick, core, what: e.to_string() })
            })
            .collect()
    }
}
