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
mod core;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use dds_transport::auth::Secret;
use dds_transport::{CloseReason, ConnId, Handler, MixedTransport, TcpConfig, Transport, TransportError};
use hashbrown::HashMap;

use crate::map::{BrickId, ClusterMap};
use crate::proto::{DdsFraming, Status, KEY_LEN_MAX, VALUE_LEN_MAX};

pub use self::core::ClientCore;
pub use coordinator::ClientStats;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long an operation may take, retries included.
    pub op_timeout: Duration,
    pub connect_timeout: Duration,
    /// A brick silent this long on one message is suspected: the client looks for a
    /// newer map (in which a dead brick is gone).
    pub suspect_after: Duration,
    /// Speak RDMA to the brick cores that serve it, when a verbs device opens here;
    /// TCP to the rest, and to all when none opens (`Client::rdma_unavailable` says why).
    pub rdma: bool,
    /// The cluster's secret, proved on every connection (`Secret::load` reads the file
    /// `dds cluster up` writes). `None` reaches only a cluster that runs without one.
    pub secret: Option<Arc<Secret>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            op_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            suspect_after: Duration::from_millis(300),
            rdma: false,
            secret: None,
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
    #[error("{op} refused by {brick}: {}: {message}", status.name())]
    Refused { op: &'static str, brick: BrickId, status: Status, message: String },
    #[error("protocol error from {brick}: {what}")]
    Protocol { brick: BrickId, what: String },
    #[error("poll: {0}")]
    Poll(#[source] TransportError),
    #[error("set up the client's transport: {0}")]
    Setup(#[source] TransportError),
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

/// The transport's callbacks, into the core (kept apart from the transport to borrow
/// both).
struct Inbound<'a> {
    core: &'a mut ClientCore,
    addrs: &'a HashMap<ConnId, SocketAddr>,
}

impl Handler for Inbound<'_> {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        let Some(&from) = self.addrs.get(&conn) else { return Err("a frame on a connection the client did not open".into()) };
        self.core.on_frame(from, frame)
    }

    fn on_close(&mut self, _conn: ConnId, peer: SocketAddr, _reason: &CloseReason) {
        self.core.link_lost(peer);
    }
}

/// The client over TCP or RDMA: `ClientCore` with one connection per brick core it
/// talks to.
pub struct Client {
    core: ClientCore,
    transport: MixedTransport<DdsFraming>,
    /// Why RDMA was asked for and is not used.
    rdma_unavailable: Option<String>,
    /// Brick core (TCP address, as the core knows it) to its RDMA listener, for the map
    /// of epoch `rdma_epoch`.
    rdma_addrs: HashMap<SocketAddr, SocketAddr>,
    rdma_epoch: Option<u64>,
    /// Where to ask for a map when bricks cannot tell: the seeds given to `connect`.
    seeds: Vec<SocketAddr>,
    conns: HashMap<SocketAddr, ConnId>,
    addrs: HashMap<ConnId, SocketAddr>,
}

impl Client {
    /// Connects to a cluster through any of `seeds` (bricks or the map authority): fetches
    /// the map, then opens connections as operations need them.
    pub fn connect(seeds: &[SocketAddr], config: ClientConfig) -> Result<Client, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::NoBricks);
        }
        let map = crate::rpc::fetch_map(seeds, config.connect_timeout.max(Duration::from_millis(500)), config.secret.as_deref())
            .map_err(|why| ClientError::NoMap { seeds: format!("{seeds:?}"), why })?;
        Self::with_map(seeds, map, config)
    }

    /// A client that starts from `map` as it is (even an old one: it repairs itself on
    /// first use) and asks `seeds` for newer maps. Fails only if the transport cannot be
    /// set up (no epoll instance: out of file descriptors or memory).
    pub fn with_map(seeds: &[SocketAddr], map: ClusterMap, config: ClientConfig) -> Result<Client, ClientError> {
        let tcp = TcpConfig { secret: config.secret.clone(), ..TcpConfig::default() };
        let mut transport = MixedTransport::new(DdsFraming, tcp).map_err(ClientError::Setup)?;
        let rdma_unavailable = if config.rdma { transport.enable_rdma().err() } else { None };
        // Replies over RDMA raise no epoll event: a client waiting for them spins.
        transport.set_spin_wait(true);
        Ok(Client {
            core: ClientCore::new(map, config, crate::hash::random_u64(), Instant::now()),
            transport,
            rdma_unavailable,
            rdma_addrs: HashMap::new(),
            rdma_epoch: None,
            seeds: seeds.to_vec(),
            conns: HashMap::new(),
            addrs: HashMap::new(),
        })
    }

    /// Why RDMA was asked for (`ClientConfig::rdma`) and is not used: no device here.
    pub fn rdma_unavailable(&self) -> Option<&str> {
        self.rdma_unavailable.as_deref()
    }

    /// Connections open now, and how many of them are RDMA.
    pub fn connections(&self) -> (usize, usize) {
        let rdma = self.conns.values().filter(|c| c.is_rdma() && self.transport.peer(**c).is_some()).count();
        (self.transport.connections_open(), rdma)
    }

    /// The RDMA listener of each brick core that has one, from the current map.
    fn refresh_rdma_addrs(&mut self) {
        let map = self.core.map();
        if !self.transport.rdma_enabled() || self.rdma_epoch == Some(map.epoch()) {
            return;
        }
        self.rdma_addrs = map.bricks().values().flat_map(|b| b.cores.iter().copied().zip(b.rdma.iter().copied())).collect();
        self.rdma_epoch = Some(map.epoch());
    }

    /// The map this client routes by now.
    pub fn map(&self) -> &ClusterMap {
        self.core.map()
    }

    pub fn stats(&self) -> &ClientStats {
        self.core.stats()
    }

    /// Operations submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.core.in_flight()
    }

    /// Starts an operation; its completion carries the returned token.
    pub fn submit(&mut self, request: Request<'_>) -> Result<u64, ClientError> {
        self.core.set_now(Instant::now());
        self.core.submit(request)
    }

    /// Does what the core asked for: fetches a map (blocking, bounded), opens
    /// connections and queues its frames, then writes them.
    fn drive(&mut self) {
        if self.core.take_map_wanted() {
            let mut seeds = self.seeds.clone();
            seeds.extend(self.core.map().bricks().values().filter_map(|b| b.cores.first().copied()));
            if let Ok(map) = crate::rpc::fetch_map(&seeds, Duration::from_millis(200), self.core.config.secret.as_deref()) {
                self.core.install_fetched(map);
            }
        }
        self.send_queued();
    }

    /// Opens connections and queues the core's frames, then writes them.
    fn send_queued(&mut self) {
        self.refresh_rdma_addrs();
        let Client { core, transport, conns, addrs, rdma_addrs, .. } = self;
        let connect_timeout = core.config.connect_timeout;
        core.drain_out(|at, frame| {
            let open = conns.get(&at).copied().filter(|c| transport.peer(*c).is_some());
            let conn = match open {
                Some(c) => c,
                None => {
                    // Over RDMA where the brick core serves it and this client has a device.
                    let dialled = match rdma_addrs.get(&at) {
                        Some(&rdma_at) => transport.connect_rdma(rdma_at, connect_timeout),
                        None => transport.connect(at, connect_timeout),
                    };
                    let Ok(c) = dialled else { return false };
                    conns.insert(at, c);
                    addrs.retain(|_, a| *a != at);
                    addrs.insert(c, at);
                    c
                }
            };
            match transport.outbox(conn) {
                Ok(out) => {
                    out.extend_from_slice(frame);
                    true
                }
                Err(_) => false,
            }
        });
        self.transport.flush(&mut Inbound { core: &mut self.core, addrs: &self.addrs });
    }

    /// One round: send, wait at most `timeout` for replies, feed them and the timers to
    /// the core, and send what that produced.
    fn round(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.drive();
        self.transport.poll(Some(timeout), &mut Inbound { core: &mut self.core, addrs: &self.addrs }).map_err(ClientError::Poll)?;
        self.core.set_now(Instant::now());
        self.core.process();
        self.drive();
        Ok(())
    }

    /// Sends what was submitted, waits at most `timeout` for replies, and appends every
    /// completion that is ready to `out`. Returns how many it appended.
    pub fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<usize, ClientError> {
        if self.core.has_completions() {
            // Completions are waiting: return them at once, but send what was submitted.
            self.drive();
        } else {
            let timeout = if self.core.in_flight() == 0 { Duration::ZERO } else { timeout.min(self.core.next_timer()) };
            self.round(timeout)?;
        }
        Ok(self.core.take_completions(out))
    }

    /// Waits for the completion of `token`; other completions stay queued for `poll`.
    /// A blocking call may be the caller's last for a while: the commit decisions it
    /// leaves go out before it returns, not with a later frame.
    fn wait(&mut self, token: u64) -> Result<Outcome, ClientError> {
        loop {
            if let Some(c) = self.core.take_completion(token) {
                self.core.release_decisions();
                self.send_queued();
                return c.result;
            }
            let timeout = self.core.next_timer();
            self.round(timeout)?;
        }
    }

    /// Counters of every core of `brick`, asked on each core's own connection.
    pub fn brick_stats(&mut self, brick: BrickId) -> Result<Vec<crate::proto::CoreStats>, ClientError> {
        let cores = self.core.map().bricks().get(&brick).map(|b| b.cores.clone()).unwrap_or_default();
        let timeout = self.core.config.connect_timeout;
        cores
            .into_iter()
            .map(|addr| crate::rpc::core_stats(addr, timeout, self.core.config.secret.as_deref()).map_err(|what| ClientError::Protocol { brick, what }))
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

impl Drop for Client {
    /// Commit decisions still queued leave now (best effort: a replica that misses one
    /// decides in doubt), so a client that ends does not leave its last writes' keys
    /// waiting at the replicas.
    fn drop(&mut self) {
        self.core.set_now(Instant::now());
        self.core.release_decisions();
        self.send_queued();
    }
}
