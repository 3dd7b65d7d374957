//! Wire protocol: one binary framing for requests and replies, on TCP streams and RDMA
//! sends alike.
//!
//! Every frame is a fixed 28-byte little-endian header followed by the key and the value:
//!
//! | offset | size | field                                                       |
//! |-------:|-----:|-------------------------------------------------------------|
//! |      0 |    2 | magic `0xDD5A`                                              |
//! |      2 |    1 | version (`1`)                                               |
//! |      3 |    1 | op; bit 7 set on replies                                    |
//! |      4 |    1 | status (replies); `0` on requests                           |
//! |      5 |    1 | flags, reserved: must be `0`                                |
//! |      6 |    2 | key length                                                  |
//! |      8 |    8 | request id (echoed in the reply)                            |
//! |     16 |    8 | map epoch                                                   |
//! |     24 |    4 | value length                                                |
//!
//! The header alone decides whether a frame is well formed (lengths, op, status, which
//! ops may carry a key or a value), so a transport can reject a bad frame before it
//! buffers its body. Ops `0x10..=0x1f` are two-phase commit and copying between bricks,
//! `0x20..=0x2f` map messages between bricks, clients and the map authority.

pub mod catchup;
mod codec;
mod control;
mod info;
pub mod tx;

pub use codec::{decode, decode_exact, encode, frame_len, DecodeError, Frame, Header, Kind};
pub use control::{MemberList, MemberRequest, MemberStatus, Registered, Registration, BRICK_TIMEOUT_MS, HEARTBEAT_MS, LEASE_MS};
pub use info::{BrickInfo, CoreStats, Histogram, InfoError, HISTOGRAM_BUCKETS};
pub use catchup::{Buckets, DiffRequest, DigestRequest};
pub use tx::{Chunk, ChunkEntries, PayloadError, PrepareBody, SnapshotRequest, TxId, TxState, WriteKind};

pub const MAGIC: u16 = 0xDD5A;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 28;
/// Longest key a frame may carry.
pub const KEY_LEN_MAX: usize = 4096;
/// Longest value a frame may carry (8 MiB).
pub const VALUE_LEN_MAX: usize = 8 << 20;
/// Longest frame on the wire.
pub const FRAME_LEN_MAX: usize = HEADER_LEN + KEY_LEN_MAX + VALUE_LEN_MAX;
/// Bit 7 of the op byte marks a reply.
pub const REPLY_BIT: u8 = 0x80;

/// Operations a client may ask of a brick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Get = 1,
    Put = 2,
    Remove = 3,
    /// Ask a brick core for its layout (cores, ports, partition bits).
    Hello = 4,
    /// Ask a brick core for its counters (keys, bytes, requests).
    Stats = 5,
    /// 2PC phase one: lock the key, log the write durably, vote (`Ok` yes, `Conflict` no).
    /// Value: a `PrepareBody`.
    Prepare = 0x10,
    /// 2PC phase two: apply the prepared write. Value: the `TxId`.
    Commit = 0x11,
    /// 2PC phase two: drop the prepared write. Value: the `TxId`.
    Abort = 0x12,
    /// What a replica knows of a transaction (asked by an in-doubt peer). Value: `TxId`;
    /// the reply's value is one `TxState` byte.
    Resolve = 0x13,
    /// Recovery: the next chunk of a partition's entries from a source replica. Value:
    /// partition id (u32) and cursor (u32); the reply's value is a `Chunk`.
    SnapshotChunk = 0x14,
    /// Recovery: entries for a replica that is joining a partition's group. Value: a
    /// `Chunk`; entries written since the join are newer and are kept.
    Install = 0x15,
    /// Catch-up: a joining replica's key count and bucket digests of a partition. Value:
    /// a `DigestRequest`; the reply's value is the count and the digests.
    Digests = 0x16,
    /// Catch-up: a readable replica's entries of the buckets whose digests differ from
    /// the joining replica's. Value: a `DiffRequest`; the reply's value is `Buckets`.
    Diff = 0x17,
    /// Catch-up: a joining replica makes the listed buckets equal to the entries given.
    /// Value: `Buckets`; entries written since the join are newer and are kept.
    Repair = 0x18,
    /// The current cluster map (JSON) if the request's epoch is older, else empty.
    GetMap = 0x20,
    /// A brick to the map authority: here I am (JSON `Registration`); the reply names the
    /// brick's id. The connection then carries its heartbeats.
    Register = 0x21,
    /// A brick to the map authority, with its epoch; the reply carries a newer map.
    Heartbeat = 0x22,
    /// One map authority member to another: a raft message (protobuf). No reply.
    Raft = 0x23,
    /// The authority group's membership: list it, or add or remove a member (JSON
    /// `MemberRequest`); the reply is a `MemberList`.
    Members = 0x24,
}

impl Op {
    pub const ALL: [Op; 19] = [
        Op::Get,
        Op::Put,
        Op::Remove,
        Op::Hello,
        Op::Stats,
        Op::Prepare,
        Op::Commit,
        Op::Abort,
        Op::Resolve,
        Op::SnapshotChunk,
        Op::Install,
        Op::Digests,
        Op::Diff,
        Op::Repair,
        Op::GetMap,
        Op::Register,
        Op::Heartbeat,
        Op::Raft,
        Op::Members,
    ];

    pub fn from_u8(byte: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == byte)
    }

    /// Its place in `Op::ALL` (a counter's index).
    pub fn slot(self) -> usize {
        Op::ALL.iter().position(|op| *op == self).expect("every op is in ALL")
    }

    /// Whether a request with this op carries a key.
    pub fn request_has_key(self) -> bool {
        matches!(self, Op::Get | Op::Put | Op::Remove | Op::Prepare | Op::Commit | Op::Abort | Op::Resolve)
    }

    /// Whether a request with this op may carry a value.
    pub fn request_has_value(self) -> bool {
        matches!(
            self,
            Op::Put
                | Op::Prepare
                | Op::Commit
                | Op::Abort
                | Op::Resolve
                | Op::SnapshotChunk
                | Op::Install
                | Op::Digests
                | Op::Diff
                | Op::Repair
                | Op::Register
                | Op::Raft
                | Op::Members
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Remove => "remove",
            Op::Hello => "hello",
            Op::Stats => "stats",
            Op::Prepare => "prepare",
            Op::Commit => "commit",
            Op::Abort => "abort",
            Op::Resolve => "resolve",
            Op::SnapshotChunk => "snapshot-chunk",
            Op::Install => "install",
            Op::Digests => "digests",
            Op::Diff => "diff",
            Op::Repair => "repair",
            Op::GetMap => "get-map",
            Op::Register => "register",
            Op::Heartbeat => "heartbeat",
            Op::Raft => "raft",
            Op::Members => "members",
        }
    }
}

/// Outcome carried by a reply. On anything but `Ok` and `NotFound` the value holds a
/// UTF-8 message for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    /// The key's partition is owned by another core or brick than the one asked.
    WrongShard = 2,
    /// The request carried an older map epoch than the brick's; the value is the
    /// brick's map (JSON), for the client to install and retry (lazy repair).
    StaleEpoch = 3,
    /// The brick cannot serve now (shutting down, fenced, a copy not ready).
    Unavailable = 4,
    /// The request carried a newer map epoch than the brick knows: retry shortly.
    Behind = 5,
    /// A prepare's "no" vote: the key is locked by another transaction, or the
    /// transaction was already given up here.
    Conflict = 6,
    /// A map authority member that is not the leader was asked what only the leader
    /// answers (`Register`, `Heartbeat`); the value is the leader's address if known.
    NotLeader = 7,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::NotFound,
        Status::WrongShard,
        Status::StaleEpoch,
        Status::Unavailable,
        Status::Behind,
        Status::Conflict,
        Status::NotLeader,
    ];

    pub fn from_u8(byte: u8) -> Option<Status> {
        Status::ALL.into_iter().find(|s| *s as u8 == byte)
    }

    /// Its name in metrics (`snake_case`).
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NotFound => "not_found",
            Status::WrongShard => "wrong_shard",
            Status::StaleEpoch => "stale_epoch",
            Status::Unavailable => "unavailable",
            Status::Behind => "behind",
            Status::Conflict => "conflict",
            Status::NotLeader => "not_leader",
        }
    }
}

/// The op and status of an encoded reply frame, read from its header without decoding
/// the rest (`None` if it is not one).
pub fn peek_reply(frame: &[u8]) -> Option<(Op, Status)> {
    let (op, status) = (*frame.get(3)?, *frame.get(4)?);
    (op & REPLY_BIT != 0).then_some(())?;
    Some((Op::from_u8(op & !REPLY_BIT)?, Status::from_u8(status)?))
}

#[cfg(test)]
mod tests;

/// Cuts dds frames out of a byte stream for a transport.
#[derive(Clone, Copy, Debug, Default)]
pub struct DdsFraming;

impl dds_transport::Framing for DdsFraming {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        frame_len(buf).map_err(|e| e.to_string())
    }
}
