//! Transports for dds: how frames move between clients and brick cores.
//!
//! A [`Transport`] owns a set of connections (accepted by a listener, opened by
//! `connect`, or both), cuts the incoming byte stream into frames with a [`Framing`],
//! hands each whole frame to a [`Handler`] together with that connection's outbound
//! buffer, and writes every outbound buffer once per `poll` round, so replies produced
//! in one loop iteration leave in one write per connection.
//!
//! The transport knows nothing of keys or values: `Framing` tells it where a frame ends
//! and rejects malformed headers, which closes that connection only.

use std::net::SocketAddr;
use std::time::Duration;

pub mod auth;
mod mixed;
mod tcp;
#[cfg(feature = "rdma")]
pub mod rdma;
#[cfg(feature = "rdma")]
mod verbs;

pub use mixed::MixedTransport;
pub use tcp::{TcpConfig, TcpTransport};

/// One connection of a transport. Ids are never reused: a slot freed by a closed
/// connection comes back with a new generation, so a stale id is detected, not misrouted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub slot: u32,
    pub generation: u32,
}

impl ConnId {
    /// Whether this is an RDMA connection of a [`MixedTransport`].
    pub fn is_rdma(&self) -> bool {
        mixed::is_rdma(*self)
    }
}

/// Where frames end in a byte stream.
pub trait Framing {
    /// Length of the whole frame starting at `buf[0]`, or `Ok(None)` until enough bytes
    /// are there to know. `Err` (a reason for people) closes the connection.
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String>;
}

/// Why a connection was closed. Given to [`Handler::on_close`] and meant for logs.
#[derive(Debug)]
pub enum CloseReason {
    /// The peer closed between frames.
    PeerClosed,
    /// The peer closed with part of a frame buffered.
    PeerClosedMidFrame { buffered_bytes: usize },
    /// The framing rejected the input.
    Malformed(String),
    /// The handler refused a frame.
    Refused(String),
    /// The peer does not read its replies and the outbound buffer is full.
    OutboxFull { bytes: usize },
    /// A socket error.
    Io(std::io::Error),
    /// Closed by this side's `close`.
    Local,
    /// The peer did not prove it holds the cluster's secret (`auth`).
    Unauthenticated(auth::AuthError),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => write!(f, "peer closed"),
            CloseReason::PeerClosedMidFrame { buffered_bytes } => {
                write!(f, "peer closed mid-frame with {buffered_bytes} bytes of a frame buffered")
            }
            CloseReason::Malformed(why) => write!(f, "malformed frame: {why}"),
            CloseReason::Refused(why) => write!(f, "frame refused: {why}"),
            CloseReason::OutboxFull { bytes } => write!(f, "peer does not read: {bytes} reply bytes queued"),
            CloseReason::Io(e) => write!(f, "socket error: {e}"),
            CloseReason::Local => write!(f, "closed locally"),
            CloseReason::Unauthenticated(why) => write!(f, "not authenticated: {why}"),
        }
    }
}

impl CloseReason {
    /// Whether the peer broke the protocol (as opposed to leaving or failing).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, CloseReason::PeerClosedMidFrame { .. } | CloseReason::Malformed(_) | CloseReason::Refused(_) | CloseReason::Unauthenticated(_))
    }
}

/// What a transport calls back into: the brick's core loop or the client.
pub trait Handler {
    /// One whole frame from `conn`. Anything appended to `out` is sent back on `conn`.
    /// `Err(reason)` closes the connection.
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String>;

    fn on_accept(&mut self, _conn: ConnId, _peer: SocketAddr) {}

    fn on_close(&mut self, _conn: ConnId, _peer: SocketAddr, _reason: &CloseReason) {}

    /// A connection was refused because `connections_max` are open.
    fn on_refused(&mut self, _peer: SocketAddr, _connections_open: usize) {}

    /// An RDMA connection's control channel did not prove the cluster's secret: no
    /// queue pair was made (a TCP connection that fails it is closed through
    /// `on_close`, with `CloseReason::Unauthenticated`).
    fn on_unauthenticated(&mut self, _peer: SocketAddr, _why: &str) {}
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{op} {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("poll: {0}")]
    Poll(#[source] std::io::Error),
    #[error("connection {0:?} is closed")]
    Closed(ConnId),
}

/// The interface the brick and the client are written against.
pub trait Transport {
    /// Accepts connections on `addr` from now on; returns the bound address (port 0
    /// picks a free port).
    fn listen(&mut self, addr: SocketAddr) -> Result<SocketAddr, TransportError>;

    /// Opens a connection, waiting at most `timeout` for it to be established.
    fn connect(&mut self, addr: SocketAddr, timeout: Duration) -> Result<ConnId, TransportError>;

    /// The outbound buffer of `conn`: append whole frames; they leave at the next `poll`
    /// or `flush`.
    fn outbox(&mut self, conn: ConnId) -> Result<&mut Vec<u8>, TransportError>;

    /// Writes what can be written now without blocking.
    fn flush<H: Handler>(&mut self, handler: &mut H);

    /// Flushes, waits at most `timeout` (`None`: for ever) for input, delivers every
    /// whole frame that arrived, and flushes the replies. Returns the frames delivered.
    fn poll<H: Handler>(&mut self, timeout: Option<Duration>, handler: &mut H) -> Result<usize, TransportError>;

    /// Closes `conn` (its queued output is dropped) and reports it to `handler`.
    fn close<H: Handler>(&mut self, conn: ConnId, reason: CloseReason, handler: &mut H);

    fn peer(&self, conn: ConnId) -> Option<SocketAddr>;

    fn connections_open(&self) -> usize;
}
