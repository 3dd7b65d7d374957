//! One core's run-to-completion loop: poll the network, execute, queue replies; the
//! transport writes each connection's replies once per round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dds_transport::{CloseReason, ConnId, Handler, TcpTransport, Transport, TransportError};

use crate::proto::{decode_exact, BrickInfo, DdsFraming, Kind};

use super::Shard;

#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    pub spin: Duration,
    pub busy_poll: bool,
    /// Longest sleep in the kernel while idle; bounds how late a stop is seen.
    pub park: Duration,
}

struct Core {
    core: usize,
    shard: Shard,
    info: BrickInfo,
}

impl Handler for Core {
    fn on_frame(&mut self, _conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // The transport cut the frame with the same header rules, so this only fails on
        // a bug; it is still a per-connection error, never a crash.
        let frame = decode_exact(frame).map_err(|e| e.to_string())?;
        match frame.kind {
            Kind::Request(_) => {
                self.shard.execute(&frame, &self.info, out);
                Ok(())
            }
            Kind::Reply(op, _) => Err(format!("unexpected {} reply sent to a brick", op.name())),
        }
    }

    fn on_accept(&mut self, _conn: ConnId, _peer: SocketAddr) {
        self.shard.stats.connections_open += 1;
    }

    fn on_close(&mut self, _conn: ConnId, peer: SocketAddr, reason: &CloseReason) {
        self.shard.stats.connections_open -= 1;
        if reason.is_bad_input() {
            self.shard.stats.connections_closed_bad_input += 1;
        }
        if !matches!(reason, CloseReason::PeerClosed) {
            crate::log!(format_args!("core {}", self.core), "closed connection from {peer}: {reason}");
        }
    }

    fn on_refused(&mut self, peer: SocketAddr, open: usize) {
        crate::log!(format_args!("core {}", self.core), "refused connection from {peer}: {open} already open");
    }
}

pub fn run(
    core: usize,
    mut transport: TcpTransport<DdsFraming>,
    shard: Shard,
    info: BrickInfo,
    config: LoopConfig,
    stop: &AtomicBool,
) -> Result<(), TransportError> {
    let mut handler = Core { core, shard, info };
    let mut last_work = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Adaptive polling: spin while requests keep coming, then sleep in the kernel
        // so bricks and clients sharing a small machine do not starve each other.
        let timeout = if config.busy_poll || last_work.elapsed() < config.spin { Duration::ZERO } else { config.park };
        if transport.poll(Some(timeout), &mut handler)? > 0 {
            last_work = Instant::now();
        }
    }
    Ok(())
}
