//! Blocking request/reply over one TCP connection, for the control plane: bricks
//! talking to the map authority, the authority driving a copy, tools fetching maps.
//! The data path never uses it (it has the event-driven transport).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
}

pub struct Rpc {
    stream: TcpStream,
    addr: SocketAddr,
    next_id: u64,
    buf: Vec<u8>,
}

impl Rpc {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Rpc, RpcError> {
        let io = |source| RpcError::Io { op: "connect", addr, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        Ok(Rpc { stream, addr, next_id: 1, buf: Vec::new() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request and waits at most `timeout` for its reply: (status, value).
    pub fn call(&mut self, op: Op, epoch: u64, key: &[u8], value: &[u8], timeout: Duration) -> Result<(Status, Vec<u8>), RpcError> {
        let addr = self.addr;
        let io = |source| RpcError::Io { op: op.name(), addr, source };
        let id = self.next_id;
        self.next_id += 1;
        self.buf.clear();
        encode(&mut self.buf, &Frame { kind: Kind::Request(op), request_id: id, epoch, key, value });
        self.stream.set_write_timeout(Some(timeout)).map_err(io)?;
        self.stream.write_all(&self.buf).map_err(io)?;
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header).map_err(io)?;
        let bad = |what: String| RpcError::Protocol { op: op.name(), addr, what };
        let len = frame_len(&header).map_err(|e| bad(e.to_string()))?.expect("a whole header");
        self.buf.clear();
        self.buf.extend_from_slice(&header);
        self.buf.resize(len, 0);
        self.stream.read_exact(&mut self.buf[HEADER_LEN..]).map_err(io)?;
        let frame = decode_exact(&self.buf).map_err(|e| bad(e.to_string()))?;
        match frame.kind {
            Kind::Reply(o, status) if o == op && frame.request_id == id => Ok((status, frame.value.to_vec())),
            other => Err(bad(format!("{other:?} to request {id} answered by {}", frame.request_id))),
        }
    }
}
