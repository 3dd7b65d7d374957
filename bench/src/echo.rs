//! The floor: a trivial request/response server over the same TCP transport as dds,
//! exchanging the same number of bytes as the dds operation it stands in for, so that
//! `dds p50 / echo p50` is the cost of dds itself.
//!
//! Frame: `len: u32 | reply_len: u32 | payload[len]`; the server answers each frame with
//! `reply_len` payload bytes (and a zero `reply_len`) at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dds_transport::{ConnId, Framing, Handler, TcpConfig, TcpTransport, Transport, TransportError};
#[cfg(test)]
use crate::driver::Target;

use crate::stream::{Protocol, StreamTarget};
use crate::workload::OpKind;

const HEADER_LEN: usize = 8;
/// Same bound as dds frames: 8 MiB values plus headroom.
const FRAME_LEN_MAX: usize = (8 << 20) + 8192;
/// Bytes of a dds frame header, so echo frames are as large as the dds frames they mirror.
pub const DDS_HEADER_LEN: usize = 28;

#[derive(Clone, Copy, Default)]
pub struct EchoFraming;

impl Framing for EchoFraming {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
        let reply_len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
        if len + HEADER_LEN > FRAME_LEN_MAX || reply_len + HEADER_LEN > FRAME_LEN_MAX {
            return Err(format!("echo frame of {len} bytes asking for {reply_len} is too long"));
        }
        Ok(Some(HEADER_LEN + len))
    }
}

fn push_frame(out: &mut Vec<u8>, len: usize, reply_len: usize) {
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(reply_len as u32).to_le_bytes());
    out.resize(out.len() + len, 0xEC);
}

struct Server;

impl Handler for Server {
    fn on_frame(&mut self, _conn: ConnId, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let reply_len = u32::from_le_bytes(frame[4..8].try_into().expect("framing checked")) as usize;
        push_frame(out, reply_len, 0);
        Ok(())
    }
}

/// An echo server on its own thread; stops when dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), TransportError>>>,
}

impl EchoServer {
    /// `spin` mirrors the brick's adaptive polling so the floor is measured the same way.
    pub fn start(addr: SocketAddr, spin: Duration) -> Result<EchoServer, TransportError> {
        let mut transport = TcpTransport::new(EchoFraming, TcpConfig::default())?;
        let addr = transport.listen(addr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut last_work = std::time::Instant::now();
                while !stop2.load(Ordering::Relaxed) {
                    let timeout = if last_work.elapsed() < spin { Duration::ZERO } else { Duration::from_millis(50) };
                    if transport.poll(Some(timeout), &mut Server)? > 0 {
                        last_work = std::time::Instant::now();
                    }
                }
                Ok(())
            })
            .expect("spawn echo thread");
        Ok(EchoServer { addr, stop, thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a dds client would send for the same operation: a get sends its key and gets
/// `value_size` bytes back; a put sends key and value and gets a header back.
#[derive(Clone, Copy)]
pub struct Echo {
    pub value_size: usize,
}

impl Framing for Echo {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        EchoFraming.frame_len(buf)
    }
}

impl Protocol for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn encode(&self, op: OpKind, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
        // Lengths chosen so both directions carry as many bytes as the dds frames do.
        let (len, reply_len) = match op {
            OpKind::Get => (DDS_HEADER_LEN + key.len() - HEADER_LEN, DDS_HEADER_LEN + self.value_size - HEADER_LEN),
            OpKind::Put => (DDS_HEADER_LEN + key.len() + value.len() - HEADER_LEN, DDS_HEADER_LEN - HEADER_LEN),
        };
        push_frame(out, len, reply_len);
    }

    fn reply_ok(&self, _op: OpKind, _frame: &[u8]) -> Result<bool, String> {
        Ok(true)
    }
}

pub type EchoTarget = StreamTarget<Echo>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_answers_with_the_asked_size() {
        let server = EchoServer::start("127.0.0.1:0".parse().unwrap(), Duration::ZERO).unwrap();
        let mut t = EchoTarget::connect(Echo { value_size: 64 }, server.addr).unwrap();
        let mut done = Vec::new();
        for i in 0..100 {
            let op = if i % 2 == 0 { OpKind::Get } else { OpKind::Put };
            t.submit(op, b"key:000000000001", &[1; 64]).unwrap();
        }
        while done.len() < 100 {
            t.poll(&mut done, Duration::from_millis(10)).unwrap();
        }
        assert_eq!(done.iter().map(|d| d.token).collect::<Vec<_>>(), (1..=100).collect::<Vec<_>>());
    }
}
