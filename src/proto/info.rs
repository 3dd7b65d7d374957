//! Payloads of the `Hello` and `Stats` replies: small fixed little-endian records.

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    #[error("{what} payload of {len} bytes where {expected} were expected")]
    BadLength { what: &'static str, len: usize, expected: usize },
    #[error("brick info claims {cores} cores; at least one is needed")]
    NoCores { cores: u16 },
    #[error("brick info names core {core} of {cores}")]
    CoreOutOfRange { core: u16, cores: u16 },
    #[error("partition bits {bits} out of range 0..=16")]
    PartitionBits { bits: u8 },
}

/// What a brick core says about its brick in reply to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrickInfo {
    /// The partition count is `1 << partition_bits`.
    pub partition_bits: u8,
    /// The core that answered.
    pub core: u16,
    /// One TCP port per core; the client sends each key straight to its core's port.
    pub ports: Vec<u16>,
}

pub const PARTITION_BITS_MAX: u8 = 16;

impl BrickInfo {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.partition_bits);
        out.extend_from_slice(&self.core.to_le_bytes());
        out.extend_from_slice(&(self.ports.len() as u16).to_le_bytes());
        for port in &self.ports {
            out.extend_from_slice(&port.to_le_bytes());
        }
    }

    pub fn decode(buf: &[u8]) -> Result<BrickInfo, InfoError> {
        let fixed = 5;
        if buf.len() < fixed {
            return Err(InfoError::BadLength { what: "hello", len: buf.len(), expected: fixed });
        }
        let partition_bits = buf[0];
        let core = u16::from_le_bytes([buf[1], buf[2]]);
        let cores = u16::from_le_bytes([buf[3], buf[4]]);
        let expected = fixed + 2 * cores as usize;
        if buf.len() != expected {
            return Err(InfoError::BadLength { what: "hello", len: buf.len(), expected });
        }
        if partition_bits > PARTITION_BITS_MAX {
            return Err(InfoError::PartitionBits { bits: partition_bits });
        }
        if cores == 0 {
            return Err(InfoError::NoCores { cores });
        }
        if core >= cores {
            return Err(InfoError::CoreOutOfRange { core, cores });
        }
        let ports = buf[fixed..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Ok(BrickInfo { partition_bits, core, ports })
    }
}

/// Counters of one brick core, in reply to `Stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub keys: u64,
    /// Key plus value bytes stored.
    pub bytes: u64,
    pub requests: u64,
    pub connections_open: u64,
    pub connections_closed_bad_input: u64,
    /// Of `requests`, those that came over RDMA.
    pub rdma_requests: u64,
}

impl CoreStats {
    const LEN: usize = 48;

    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.keys, self.bytes, self.requests, self.connections_open, self.connections_closed_bad_input, self.rdma_requests] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn decode(buf: &[u8]) -> Result<CoreStats, InfoError> {
        if buf.len() != Self::LEN {
            return Err(InfoError::BadLength { what: "stats", len: buf.len(), expected: Self::LEN });
        }
        let field = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Ok(CoreStats {
            keys: field(0),
            bytes: field(1),
            requests: field(2),
            connections_open: field(3),
            connections_closed_bad_input: field(4),
            rdma_requests: field(5),
        })
    }
}
