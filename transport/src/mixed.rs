//! TCP always, RDMA beside it when asked for and a device opens: the transport a brick
//! core and a client hold. A brick core listens on both (TCP for peers, the copy
//! driver, tools and TCP clients; RDMA for clients that speak it); a client dials each
//! brick core over whichever the cluster map offers. Connections of the two are told
//! apart by the top bit of their `ConnId` slot, so a handler sees one id space.

use std::net::SocketAddr;
use std::time::Duration;
#[cfg(feature = "rdma")]
use std::time::Instant;

use crate::{CloseReason, ConnId, Framing, Handler, TcpConfig, TcpTransport, Transport, TransportError};

/// The `ConnId` slot bit of RDMA connections.
const RDMA_BIT: u32 = 1 << 31;
/// Which transport a connection belongs to.
pub(crate) fn is_rdma(conn: ConnId) -> bool {
    conn.slot & RDMA_BIT != 0
}

#[cfg(feature = "rdma")]
fn tagged(conn: ConnId) -> ConnId {
    assert!(conn.slot & RDMA_BIT == 0, "slot numbers stay far below 2^31");
    ConnId { slot: conn.slot | RDMA_BIT, generation: conn.generation }
}

#[cfg(feature = "rdma")]
fn untagged(conn: ConnId) -> ConnId {
    ConnId { slot: conn.slot & !RDMA_BIT, generation: conn.generation }
}

/// The RDMA side's callbacks, with its connection ids tagged on the way to the handler.
#[cfg(feature = "rdma")]
struct Tagged<'a, H: Handler>(&'a mut H);

#[cfg(feature = "rdma")]
impl<H: Handler> Handler for Tagged<'_, H> {
    fn on_frame(&mut self, conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.0.on_frame(tagged(conn), frame, out)
    }

    fn on_accept(&mut self, conn: ConnId, peer: SocketAddr) {
        self.0.on_accept(tagged(conn), peer)
    }

    fn on_close(&mut self, conn: ConnId, peer: SocketAddr, reason: &CloseReason) {
        self.0.on_close(tagged(conn), peer, reason)
    }

    fn on_refused(&mut self, peer: SocketAddr, connections_open: usize) {
        self.0.on_refused(peer, connections_open)
    }

    fn on_unauthenticated(&mut self, peer: SocketAddr, why: &str) {
        self.0.on_unauthenticated(peer, why)
    }
}

pub struct MixedTransport<F: Framing + Clone> {
    tcp: TcpTransport<F>,
    #[cfg(feature = "rdma")]
    rdma: Option<crate::rdma::RdmaTransport<F>>,
    #[cfg(feature = "rdma")]
    framing: F,
    /// With RDMA on, wait by spinning on both (a client waiting for its replies), not
    /// asleep in epoll (a brick core, whose loop spins by itself while busy).
    #[cfg(feature = "rdma")]
    spin_wait: bool,
}

impl<F: Framing + Clone> MixedTransport<F> {
    /// TCP only, until `enable_rdma` succeeds.
    pub fn new(framing: F, config: TcpConfig) -> Result<Self, TransportError> {
        Ok(MixedTransport {
            tcp: TcpTransport::new(framing.clone(), config)?,
            #[cfg(feature = "rdma")]
            rdma: None,
            #[cfg(feature = "rdma")]
            framing,
            #[cfg(feature = "rdma")]
            spin_wait: false,
        })
    }

    /// With RDMA on, `poll` waits by spinning rather than asleep in epoll until a
    /// completion wakes it: for a client, whose thread has nothing to do but wait for
    /// its replies.
    pub fn set_spin_wait(&mut self, spin: bool) {
        #[cfg(feature = "rdma")]
        {
            self.spin_wait = spin;
        }
        #[cfg(not(feature = "rdma"))]
        let _ = spin;
    }

    /// Opens the first RDMA device for this transport. `Err` is the one-line reason
    /// there is none (no kernel RDMA, no device, a build without the `rdma` feature):
    /// the caller says so and goes on over TCP.
    pub fn enable_rdma(&mut self) -> Result<(), String> {
        #[cfg(feature = "rdma")]
        {
            if self.rdma.is_none() {
                let config = crate::rdma::RdmaConfig { secret: self.tcp.secret().cloned(), ..crate::rdma::RdmaConfig::default() };
                let rdma = crate::rdma::RdmaTransport::new(self.framing.clone(), config).map_err(|e| e.to_string())?;
                // An idle loop sleeps in this transport's epoll: RDMA completions and
                // control messages must wake it too.
                for fd in rdma.wake_fds() {
                    self.tcp.watch_fd(fd).map_err(|e| format!("watch the RDMA completion channel: {e}"))?;
                }
                self.rdma = Some(rdma);
            }
            Ok(())
        }
        #[cfg(not(feature = "rdma"))]
        Err("this build has no RDMA transport (build with --features rdma)".into())
    }

    pub fn rdma_enabled(&self) -> bool {
        #[cfg(feature = "rdma")]
        return self.rdma.is_some();
        #[cfg(not(feature = "rdma"))]
        false
    }

    /// Accepts RDMA connections (their control channel) on `addr`.
    pub fn listen_rdma(&mut self, addr: SocketAddr) -> Result<SocketAddr, TransportError> {
        #[cfg(feature = "rdma")]
        if let Some(rdma) = self.rdma.as_mut() {
            return rdma.listen(addr);
        }
        Err(TransportError::Io { op: "rdma listen", addr, source: std::io::Error::other("RDMA is not enabled on this transport") })
    }

    /// Opens an RDMA connection to a peer's RDMA listener.
    pub fn connect_rdma(&mut self, addr: SocketAddr, timeout: Duration) -> Result<ConnId, TransportError> {
        #[cfg(feature = "rdma")]
        if let Some(rdma) = self.rdma.as_mut() {
            return rdma.connect(addr, timeout).map(tagged);
        }
        let _ = timeout;
        Err(TransportError::Io { op: "rdma connect", addr, source: std::io::Error::other("RDMA is not enabled on this transport") })
    }
}

impl<F: Framing + Clone> Transport for MixedTransport<F> {
    /// TCP; see `listen_rdma` for RDMA.
    fn listen(&mut self, addr: SocketAddr) -> Result<SocketAddr, TransportError> {
        self.tcp.listen(addr)
    }

    /// TCP; see `connect_rdma` for RDMA.
    fn connect(&mut self, addr: SocketAddr, timeout: Duration) -> Result<ConnId, TransportError> {
        self.tcp.connect(addr, timeout)
    }

    fn outbox(&mut self, conn: ConnId) -> Result<&mut Vec<u8>, TransportError> {
        #[cfg(feature = "rdma")]
        if is_rdma(conn) {
            return match self.rdma.as_mut() {
                Some(rdma) => rdma.outbox(untagged(conn)),
                None => Err(TransportError::Closed(conn)),
            };
        }
        self.tcp.outbox(conn)
    }

    fn flush<H: Handler>(&mut self, handler: &mut H) {
        #[cfg(feature = "rdma")]
        if let Some(rdma) = self.rdma.as_mut() {
            rdma.flush(&mut Tagged(handler));
        }
        self.tcp.flush(handler);
    }

    fn poll<H: Handler>(&mut self, timeout: Option<Duration>, handler: &mut H) -> Result<usize, TransportError> {
        #[cfg(feature = "rdma")]
        if let Some(rdma) = self.rdma.as_mut() {
            let deadline = timeout.map(|t| Instant::now() + t);
            loop {
                let mut delivered = rdma.poll(Some(Duration::ZERO), &mut Tagged(handler))?;
                let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let mut wait = if delivered > 0 || self.spin_wait { Some(Duration::ZERO) } else { remaining };
                if wait != Some(Duration::ZERO) {
                    // About to sleep in epoll: have the next completion wake it (the
                    // completion channel is watched there, as is the control channel).
                    delivered += rdma.arm(&mut Tagged(handler))?;
                    if delivered > 0 {
                        wait = Some(Duration::ZERO);
                    }
                }
                delivered += self.tcp.poll(wait, handler)?;
                if self.tcp.take_woken() {
                    rdma.take_wakes();
                }
                if delivered > 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(delivered);
                }
            }
        }
        self.tcp.poll(timeout, handler)
    }

    fn close<H: Handler>(&mut self, conn: ConnId, reason: CloseReason, handler: &mut H) {
        #[cfg(feature = "rdma")]
        if is_rdma(conn) {
            if let Some(rdma) = self.rdma.as_mut() {
                rdma.close(untagged(conn), reason, &mut Tagged(handler));
            }
            return;
        }
        self.tcp.close(conn, reason, handler)
    }

    fn peer(&self, conn: ConnId) -> Option<SocketAddr> {
        #[cfg(feature = "rdma")]
        if is_rdma(conn) {
            return self.rdma.as_ref().and_then(|r| r.peer(untagged(conn)));
        }
        self.tcp.peer(conn)
    }

    fn connections_open(&self) -> usize {
        #[cfg(feature = "rdma")]
        let rdma = self.rdma.as_ref().map_or(0, |r| r.connections_open());
        #[cfg(not(feature = "rdma"))]
        let rdma = 0;
        self.tcp.connections_open() + rdma
    }
}
