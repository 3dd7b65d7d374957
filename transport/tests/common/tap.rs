//! A stream that records every byte written through it: what a captured connection
//! sent, to replay on another.

use std::io::{Read, Write};
use std::net::TcpStream;

pub struct Tap {
    pub stream: TcpStream,
    pub sent: Vec<u8>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent.extend_from_slice(buf);
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}
