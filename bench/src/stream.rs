//! Targets that speak a request/response protocol over one TCP connection per client
//! thread, with replies in request order: echo, Redis (RESP) and memcached (text). They
//! share the dds transport, so every system is driven by the same client code.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use dds_transport::{CloseReason, ConnId, Framing, Handler, TcpConfig, TcpTransport, Transport};

use crate::driver::{Done, Target, TargetError};
use crate::workload::OpKind;

/// How one protocol writes requests and judges replies.
pub trait Protocol: Framing {
    fn name(&self) -> &'static str;
    fn encode(&self, op: OpKind, key: &[u8], value: &[u8], out: &mut Vec<u8>);
    /// Whether the reply to `op` reports success (a missing key on a get is success).
    fn reply_ok(&self, op: OpKind, frame: &[u8]) -> Result<bool, String>;
}

pub struct StreamTarget<P: Protocol> {
    protocol: P,
    transport: TcpTransport<P>,
    conn: ConnId,
    fifo: Fifo<P>,
    next_token: u64,
}

/// What the transport calls back into: matches replies to requests in order.
struct Fifo<P> {
    protocol: P,
    in_flight: VecDeque<(u64, OpKind)>,
    done: Vec<Done>,
    closed: Option<String>,
}

impl<P: Protocol + Clone> StreamTarget<P> {
    pub fn connect(protocol: P, addr: SocketAddr) -> Result<Self, TargetError> {
        let name = protocol.name();
        let mut transport =
            TcpTransport::new(protocol.clone(), TcpConfig::default()).map_err(|e| TargetError::new(name, e))?;
        let conn = transport
            .connect(addr, Duration::from_secs(5))
            .map_err(|e| TargetError::new(format!("{name} connect"), e))?;
        let fifo = Fifo { protocol: protocol.clone(), in_flight: VecDeque::new(), done: Vec::new(), closed: None };
        Ok(StreamTarget { protocol, transport, conn, fifo, next_token: 0 })
    }
}

impl<P: Protocol> Handler for Fifo<P> {
    fn on_frame(&mut self, _conn: ConnId, frame: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        let (token, op) = self.in_flight.pop_front().ok_or("reply with nothing in flight")?;
        let ok = self.protocol.reply_ok(op, frame)?;
        self.done.push(Done { token, ok });
        Ok(())
    }

    fn on_close(&mut self, _conn: ConnId, _peer: SocketAddr, reason: &CloseReason) {
        self.closed = Some(reason.to_string());
    }
}

impl<P: Protocol> Target for StreamTarget<P> {
    fn submit(&mut self, op: OpKind, key: &[u8], value: &[u8]) -> Result<u64, TargetError> {
        let name = self.protocol.name();
        let out = self.transport.outbox(self.conn).map_err(|e| TargetError::new(name, e))?;
        self.protocol.encode(op, key, value, out);
        self.next_token += 1;
        self.fifo.in_flight.push_back((self.next_token, op));
        Ok(self.next_token)
    }

    fn poll(&mut self, done: &mut Vec<Done>, timeout: Duration) -> Result<(), TargetError> {
        let name = self.protocol.name();
        self.transport.poll(Some(timeout), &mut self.fifo).map_err(|e| TargetError::new(name, e))?;
        done.append(&mut self.fifo.done);
        if let Some(reason) = &self.fifo.closed {
            return Err(TargetError::new(name, format!("connection closed: {reason}")));
        }
        Ok(())
    }
}

/// Position just past the first `\r\n` at or after `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|i| from + i + 2)
}

fn parse_len(digits: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| format!("bad length {:?}", String::from_utf8_lossy(digits)))
}

/// Longest header line accepted before a reply is called malformed.
const LINE_MAX: usize = 1024;
/// Largest value accepted in a reply.
const VALUE_MAX: i64 = 16 << 20;

/// Redis serialization protocol: `GET key` and `SET key value`.
#[derive(Clone, Copy, Default)]
pub struct Resp;

impl Framing for Resp {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        let Some(end) = line_end(buf, 0) else {
            return if buf.len() > LINE_MAX { Err("RESP line too long".into()) } else { Ok(None) };
        };
        match buf[0] {
            b'+' | b'-' | b':' => Ok(Some(end)),
            b'$' => {
                let len = parse_len(&buf[1..end - 2])?;
                if len < 0 {
                    return Ok(Some(end));
                }
                if len > VALUE_MAX {
                    return Err(format!("RESP bulk string of {len} bytes"));
                }
                Ok(Some(end + len as usize + 2))
            }
            other => Err(format!("unexpected RESP reply type {:?}", other as char)),
        }
    }
}

impl Protocol for Resp {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn encode(&self, op: OpKind, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
        use std::io::Write;
        match op {
            OpKind::Get => write!(out, "*2\r\n$3\r\nGET\r\n${}\r\n", key.len()),
            OpKind::Put => write!(out, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len()),
        }
        .expect("Vec write");
        out.extend_from_slice(key);
        out.extend_from_slice(b"\r\n");
        if op == OpKind::Put {
            write!(out, "${}\r\n", value.len()).expect("Vec write");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn reply_ok(&self, op: OpKind, frame: &[u8]) -> Result<bool, String> {
        Ok(match op {
            OpKind::Get => frame[0] == b'$',
            OpKind::Put => frame == b"+OK\r\n",
        })
    }
}

/// memcached text protocol: `get key` and `set key 0 0 len`.
#[derive(Clone, Copy, Default)]
pub struct Memcached;

impl Framing for Memcached {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        let Some(end) = line_end(buf, 0) else {
            return if buf.len() > LINE_MAX { Err("memcached line too long".into()) } else { Ok(None) };
        };
        let line = &buf[..end - 2];
        if line.starts_with(b"VALUE ") {
            // VALUE <key> <flags> <bytes>\r\n<data>\r\nEND\r\n
            let bytes = line.rsplit(|&c| c == b' ').next().ok_or("VALUE line without a length")?;
            let len = parse_len(bytes)?;
            if !(0..=VALUE_MAX).contains(&len) {
                return Err(format!("memcached value of {len} bytes"));
            }
            let total = end + len as usize + 2 + b"END\r\n".len();
            return Ok(Some(total));
        }
        Ok(Some(end))
    }
}

impl Protocol for Memcached {
    fn name(&self) -> &'static str {
        "memcached"
    }

    fn encode(&self, op: OpKind, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
        use std::io::Write;
        match op {
            OpKind::Get => {
                out.extend_from_slice(b"get ");
                out.extend_from_slice(key);
                out.extend_from_slice(b"\r\n");
            }
            OpKind::Put => {
                out.extend_from_slice(b"set ");
                out.extend_from_slice(key);
                write!(out, " 0 0 {}\r\n", value.len()).expect("Vec write");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    fn reply_ok(&self, op: OpKind, frame: &[u8]) -> Result<bool, String> {
        Ok(match op {
            OpKind::Get => frame.starts_with(b"VALUE ") || frame == b"END\r\n",
            OpKind::Put => frame == b"STORED\r\n",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_frames() {
        assert_eq!(Resp.frame_len(b"+OK\r\n+OK"), Ok(Some(5)));
        assert_eq!(Resp.frame_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(Resp.frame_len(b"$3\r\nabc\r\n"), Ok(Some(9)));
        assert_eq!(Resp.frame_len(b"$3\r\nab"), Ok(Some(9)));
        assert_eq!(Resp.frame_len(b"$3"), Ok(None));
        assert!(Resp.frame_len(b"*1\r\n").is_err());
        let mut out = Vec::new();
        Resp.encode(OpKind::Put, b"k", b"vv", &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n");
    }

    #[test]
    fn memcached_frames() {
        assert_eq!(Memcached.frame_len(b"STORED\r\n"), Ok(Some(8)));
        assert_eq!(Memcached.frame_len(b"END\r\n"), Ok(Some(5)));
        let hit = b"VALUE k 0 2\r\nvv\r\nEND\r\n";
        assert_eq!(Memcached.frame_len(hit), Ok(Some(hit.len())));
        assert_eq!(Memcached.reply_ok(OpKind::Get, hit), Ok(true));
        assert_eq!(Memcached.frame_len(b"VALUE k 0 2\r\nv"), Ok(Some(hit.len())));
    }
}
