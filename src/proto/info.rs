//! Payloads of the `Hello` and `Stats` replies: small fixed little-endian records.

use super::{Op, Status};

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub keys: u64,
    /// Key plus value bytes stored.
    pub bytes: u64,
    pub requests: u64,
    pub connections_open: u64,
    pub connections_closed_bad_input: u64,
    /// Of `requests`, those that came over RDMA.
    pub rdma_requests: u64,
    /// Requests by op (`Op::ALL` order).
    pub ops: [u64; Op::ALL.len()],
    /// Replies by status (`Status::ALL` order).
    pub statuses: [u64; Status::ALL.len()],
    /// Per op, how long from the start of the round that executed a request until its
    /// reply went to the transport (after the round's log sync, if it waited for one).
    pub latency: [Histogram; Op::ALL.len()],
    /// Group commits: log writes, their bytes, their fdatasyncs and how long those took.
    pub log_writes: u64,
    pub log_bytes: u64,
    pub syncs: Histogram,
    /// Log records per group commit (a count in each bucket's bound, not microseconds).
    pub batch_records: Histogram,
    /// In-doubt transactions this core resolved with its peers, by outcome.
    pub in_doubt_commits: u64,
    pub in_doubt_aborts: u64,
    /// Values in the log: gets served from the value cache and read from the log, the
    /// bytes cached, values the cleaner wrote again, and the bytes of the log on disk.
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_bytes: u64,
    pub values_moved: u64,
    pub log_disk_bytes: u64,
}

/// Durations in microseconds (or counts), in power-of-two buckets: `buckets[i]` counts
/// values at most `2^i` (and above `2^(i-1)`), as Prometheus's `le` means; the last
/// counts the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; HISTOGRAM_BUCKETS],
    pub sum_us: u64,
}

/// 1 us up to 2^22 us (4.2 s), then the rest.
pub const HISTOGRAM_BUCKETS: usize = 24;

impl Histogram {
    pub fn record(&mut self, us: u64, n: u64) {
        let bucket = (u64::BITS - us.saturating_sub(1).leading_zeros()) as usize;
        self.buckets[bucket.min(HISTOGRAM_BUCKETS - 1)] += n;
        self.sum_us += us * n;
    }

    /// The upper bound in microseconds of bucket `i` (`None`: the last, unbounded).
    pub fn bound_us(i: usize) -> Option<u64> {
        (i + 1 < HISTOGRAM_BUCKETS).then(|| 1 << i)
    }

    fn fields(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets.iter().copied().chain([self.sum_us])
    }

    fn read(fields: &mut impl Iterator<Item = u64>) -> Histogram {
        let mut h = Histogram::default();
        for b in &mut h.buckets {
            *b = fields.next().unwrap_or(0);
        }
        h.sum_us = fields.next().unwrap_or(0);
        h
    }
}

impl CoreStats {
    const FIELDS: usize = 6 + Op::ALL.len() + Status::ALL.len() + (Op::ALL.len() + 2) * (HISTOGRAM_BUCKETS + 1) + 4 + 5;
    const LEN: usize = Self::FIELDS * 8;

    fn fields(&self) -> Vec<u64> {
        let mut v = vec![self.keys, self.bytes, self.requests, self.connections_open, self.connections_closed_bad_input, self.rdma_requests];
        v.extend(self.ops);
        v.extend(self.statuses);
        for h in &self.latency {
            v.extend(h.fields());
        }
        v.extend([self.log_writes, self.log_bytes]);
        v.extend(self.syncs.fields());
        v.extend(self.batch_records.fields());
        v.extend([self.in_doubt_commits, self.in_doubt_aborts]);
        v.extend([self.cache_hits, self.cache_misses, self.cache_bytes, self.values_moved, self.log_disk_bytes]);
        debug_assert_eq!(v.len(), Self::FIELDS);
        v
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in self.fields() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// The fields `buf` holds: a brick of another version may send fewer (those
    /// missing read as 0) or more (ignored), whole fields after the first six.
    pub fn decode(buf: &[u8]) -> Result<CoreStats, InfoError> {
        if buf.len() < 48 || buf.len() % 8 != 0 {
            return Err(InfoError::BadLength { what: "stats", len: buf.len(), expected: Self::LEN });
        }
        let mut fields = buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        let mut next = || fields.next().unwrap_or(0);
        let mut s = CoreStats {
            keys: next(),
            bytes: next(),
            requests: next(),
            connections_open: next(),
            connections_closed_bad_input: next(),
            rdma_requests: next(),
            ..CoreStats::default()
        };
        for v in s.ops.iter_mut().chain(s.statuses.iter_mut()) {
            *v = fields.next().unwrap_or(0);
        }
        for h in &mut s.latency {
            *h = Histogram::read(&mut fields);
        }
        s.log_writes = fields.next().unwrap_or(0);
        s.log_bytes = fields.next().unwrap_or(0);
        s.syncs = Histogram::read(&mut fields);
        s.batch_records = Histogram::read(&mut fields);
        s.in_doubt_commits = fields.next().unwrap_or(0);
        s.in_doubt_aborts = fields.next().unwrap_or(0);
        for v in [&mut s.cache_hits, &mut s.cache_misses, &mut s.cache_bytes, &mut s.values_moved, &mut s.log_disk_bytes] {
            *v = fields.next().unwrap_or(0);
        }
        Ok(s)
    }
}
