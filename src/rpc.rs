//! Blocking request/reply over one TCP connection, for the control plane: bricks
//! talking to the map authority, the authority driving a copy, clients and tools
//! fetching maps. The data path never uses it (it has the event-driven transport).
//! A bottom-layer module: it depends on `proto` and `map` only, so the brick, the
//! authority and the client can all use it without depending on one another.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dds_transport::auth::{self, AuthError, Secret};

use crate::map::ClusterMap;
use crate::proto::{MemberList, MemberRequest, MemberStatus};
use crate::proto::{decode_exact, encode, frame_len, Frame, Kind, Op, Status, HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{op} to {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} to {addr}: malformed reply: {what}")]
    Protocol { op: &'static str, addr: SocketAddr, what: String },
    #[error("connect to {addr}: {source}")]
    Auth {
        addr: SocketAddr,
        #[source]
        source: AuthError,
    },
}

impl RpcError {
    /// The peer refused this process's credentials (or could not prove its own): not
    /// a failure that trying again mends.
    pub fn is_refusal(&self) -> bool {
        matches!(self, RpcError::Auth { source, .. } if source.is_refusal())
    }
}

/// Reads one whole frame into `buf`; `Ok(false)` if the peer closed between frames. A
/// malformed header is `InvalidData`.
pub fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = frame_len(&header).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?.expect("a whole header");
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(len, 0);
    stream.read_exact(&mut buf[HEADER_LEN..])?;
    Ok(true)
}

pub struct Rpc {
    stream: TcpStream,
    addr: SocketAddr,
    next_id: u64,
    buf: Vec<u8>,
}

impl Rpc {
    /// Connects and, with a `secret`, proves it (and checks the peer's proof) within
    /// `timeout` per step.
    pub fn connect(addr: SocketAddr, timeout: Duration, secret: Option<&Secret>) -> Result<Rpc, RpcError> {
        let io = |source| RpcError::Io { op: "connect", addr, source };
        let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        if secret.is_some() {
            stream.set_read_timeout(Some(timeout)).and_then(|()| stream.set_write_timeout(Some(timeout))).map_err(io)?;
            auth::client_handshake(&mut stream, secret).map_err(|source| RpcError::Auth { addr, source })?;
        }
        Ok(Rpc { stream, addr, next_id: 1, buf: Vec::new() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connection, proved, for a caller that writes frames of its own.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Sends one request and waits at most `timeout` for its reply: (status, value).
    pub fn call(&mut self, op: Op, epoch: u64, key: &[u8], value: &[u8], timeout: Duration) -> Result<(Status, Vec<u8>), RpcError> {
        let addr = self.addr;
        let io = |source| RpcError::Io { op: op.name(), addr, source };
        // `FAILPOINTS=rpc-heartbeat=return` (failpoints builds): the call is lost, as on
        // a broken connection; `rpc-snapshot-chunk` fails copy chunks the same way.
        if cfg!(feature = "failpoints") && crate::logging::failpoint_hit(&format!("rpc-{}", op.name())) {
            return Err(io(std::io::Error::other("failpoint")));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.buf.clear();
        encode(&mut self.buf, &Frame { kind: Kind::Request(op), request_id: id, epoch, key, value });
        self.stream.set_write_timeout(Some(timeout)).map_err(io)?;
        self.stream.write_all(&self.buf).map_err(io)?;
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let bad = |what: String| RpcError::Protocol { op: op.name(), addr, what };
        // A process without a secret, answered by one that wants it: say so (its hello
        // comes before any reply, so the first call sees it).
        let mut first = [0u8; auth::MAGIC.len()];
        if id == 1 && self.stream.peek(&mut first).is_ok_and(|n| auth::opens_with_magic(&first[..n]) == Some(true)) {
            return Err(RpcError::Auth { addr, source: AuthError::NoSecret });
        }
        match read_frame(&mut self.stream, &mut self.buf) {
            Ok(true) => {}
            Ok(false) => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(bad(e.to_string())),
            Err(e) => return Err(io(e)),
        }
        reply_of(&self.buf, op, id).map_err(bad)
    }
}

/// The reply to request `id` of `op`, read from `bytes` (one whole frame): its status
/// and value, or why it is not that reply.
pub fn reply_of(bytes: &[u8], op: Op, id: u64) -> Result<(Status, Vec<u8>), String> {
    let frame = decode_exact(bytes).map_err(|e| e.to_string())?;
    match frame.kind {
        Kind::Reply(o, status) if o == op && frame.request_id == id => Ok((status, frame.value.to_vec())),
        other => Err(format!("{other:?} to request {id} answered by {}", frame.request_id)),
    }
}

/// The map in an `Ok` answer to `GetMap` or `Heartbeat` (empty: nothing newer).
pub fn parse_map(value: &[u8]) -> Result<Option<ClusterMap>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    ClusterMap::from_json(&String::from_utf8_lossy(value)).map(Some).map_err(|e| e.to_string())
}

/// One brick core's counters, asked on its own port (`Op::Stats`, each step within
/// `timeout`); the error says what went wrong.
pub fn core_stats(addr: SocketAddr, timeout: Duration, secret: Option<&Secret>) -> Result<crate::proto::CoreStats, String> {
    let (status, value) = Rpc::connect(addr, timeout, secret).and_then(|mut r| r.call(Op::Stats, 0, &[], &[], timeout)).map_err(|e| e.to_string())?;
    if status != Status::Ok {
        return Err(format!("stats answered {}", status.name()));
    }
    crate::proto::CoreStats::decode(&value).map_err(|e| e.to_string())
}

/// Asks the authority member at `addr` for its `MemberStatus`.
pub fn member_status(addr: SocketAddr, timeout: Duration, secret: Option<&Secret>) -> Result<MemberStatus, String> {
    let (status, value) = Rpc::connect(addr, timeout, secret).and_then(|mut r| r.call(Op::Stats, 0, &[], &[], timeout)).map_err(|e| e.to_string())?;
    if status != Status::Ok {
        return Err(format!("stats answered {}", status.name()));
    }
    serde_json::from_slice(&value).map_err(|e| e.to_string())
}

/// Asks the authority group (any of `seeds`; a member that does not lead names the
/// one that does) about its membership, for up to `wait`: a change is answered by the
/// leader once committed. `Err`: refused (the reason), or no answer in time.
pub fn ask_members(seeds: &[SocketAddr], request: &MemberRequest, secret: Option<&Secret>, wait: Duration) -> Result<MemberList, String> {
    assert!(!seeds.is_empty(), "a member to ask");
    let value = serde_json::to_vec(request).expect("serialises");
    let deadline = Instant::now() + wait;
    let timeout = Duration::from_secs(2);
    let mut ask: Vec<SocketAddr> = seeds.to_vec();
    let mut at = 0;
    let mut said: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        let addr = ask[at % ask.len()];
        at += 1;
        match Rpc::connect(addr, timeout, secret).and_then(|mut r| r.call(Op::Members, 0, &[], &value, timeout)) {
            Ok((Status::Ok, list)) => return serde_json::from_slice(&list).map_err(|e| format!("{addr} answered badly: {e}")),
            Ok((Status::NotLeader, hint)) => match std::str::from_utf8(&hint).ok().and_then(|h| h.parse::<SocketAddr>().ok()) {
                // Ask the leader it names next.
                Some(leader) => {
                    ask.retain(|a| *a != leader);
                    ask.insert(at % (ask.len() + 1), leader);
                    // Two members may name each other while an election settles.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                None => said.push(format!("{addr}: knows no leader")),
            },
            Ok((Status::Conflict, why)) => return Err(format!("{addr} refused: {}", String::from_utf8_lossy(&why))),
            Ok((status, why)) => said.push(format!("{addr}: {} {}", status.name(), String::from_utf8_lossy(&why))),
            Err(e) => said.push(format!("{addr}: {e}")),
        }
        said.drain(..said.len().saturating_sub(3));
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no leader among {seeds:?} answered within {} ms (last: {})", wait.as_millis(), said.join("; ")))
}

/// Fetches the current map from any of `seeds` (bricks or the authority).
pub fn fetch_map(seeds: &[SocketAddr], timeout: Duration, secret: Option<&Secret>) -> Result<ClusterMap, String> {
    let mut errors = Vec::new();
    for &seed in seeds {
        let got = Rpc::connect(seed, timeout, secret)
            .and_then(|mut r| r.call(Op::GetMap, 0, &[], &[], timeout))
            .map_err(|e| e.to_string())
            .and_then(|(status, value)| match status {
                Status::Ok => parse_map(&value)?.ok_or(format!("{seed} has no map yet")),
                other => Err(format!("{seed}: {other:?}: {}", String::from_utf8_lossy(&value))),
            });
        match got {
            Ok(map) => return Ok(map),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}
