//! Payloads of the two-phase-commit and recovery messages: small little-endian records
//! carried in a frame's value. Every decoder refuses malformed input with a
//! `PayloadError` and never panics.

use super::{KEY_LEN_MAX, VALUE_LEN_MAX};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{what} payload cut short: {len} bytes, at least {needed} needed")]
    Short { what: &'static str, len: usize, needed: usize },
    #[error("{what} payload: {why}")]
    Invalid { what: &'static str, why: &'static str },
}

/// A transaction: the coordinating client's random id and its sequence number. Unique
/// for the life of a cluster with overwhelming probability (64 random bits per client).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId {
    pub client: u64,
    pub seq: u64,
}

pub const TXID_LEN: usize = 16;

impl TxId {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.client.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
    }

    pub fn to_bytes(self) -> [u8; TXID_LEN] {
        let mut b = [0; TXID_LEN];
        b[..8].copy_from_slice(&self.client.to_le_bytes());
        b[8..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<TxId, PayloadError> {
        if buf.len() != TXID_LEN {
            return Err(PayloadError::Invalid { what: "txid", why: "not 16 bytes" });
        }
        Ok(TxId { client: u64_at(buf, 0), seq: u64_at(buf, 8) })
    }
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tx {:016x}.{}", self.client, self.seq)
    }
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    Put = 1,
    Remove = 2,
}

/// Most replicas a transaction may name.
pub const PARTICIPANTS_MAX: usize = 16;

/// A prepare: the transaction, what it writes, and every brick it was sent to (the
/// group at the coordinator's epoch), so an in-doubt replica knows whom to ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareBody<'a> {
    pub txid: TxId,
    pub kind: WriteKind,
    /// Brick ids, little-endian u32 each.
    pub participants: &'a [u8],
    pub value: &'a [u8],
}

impl<'a> PrepareBody<'a> {
    pub fn encode(txid: TxId, kind: WriteKind, participants: &[u32], value: &[u8], out: &mut Vec<u8>) {
        assert!(participants.len() <= PARTICIPANTS_MAX && (kind == WriteKind::Put || value.is_empty()));
        txid.encode(out);
        out.push(kind as u8);
        out.push(participants.len() as u8);
        for p in participants {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    /// Writes this body in its wire form (what `decode` read).
    pub fn write(&self, out: &mut Vec<u8>) {
        self.txid.encode(out);
        out.push(self.kind as u8);
        out.push((self.participants.len() / 4) as u8);
        out.extend_from_slice(self.participants);
        out.extend_from_slice(self.value);
    }

    pub fn decode(buf: &'a [u8]) -> Result<PrepareBody<'a>, PayloadError> {
        let what = "prepare";
        let fixed = TXID_LEN + 2;
        if buf.len() < fixed {
            return Err(PayloadError::Short { what, len: buf.len(), needed: fixed });
        }
        let txid = TxId::decode(&buf[..TXID_LEN])?;
        let kind = match buf[TXID_LEN] {
            1 => WriteKind::Put,
            2 => WriteKind::Remove,
            _ => return Err(PayloadError::Invalid { what, why: "unknown write kind" }),
        };
        let n = buf[TXID_LEN + 1] as usize;
        if n == 0 || n > PARTICIPANTS_MAX {
            return Err(PayloadError::Invalid { what, why: "participant count out of range" });
        }
        let needed = fixed + 4 * n;
        if buf.len() < needed {
            return Err(PayloadError::Short { what, len: buf.len(), needed });
        }
        let value = &buf[needed..];
        if kind == WriteKind::Remove && !value.is_empty() {
            return Err(PayloadError::Invalid { what, why: "a remove carries a value" });
        }
        if value.len() > VALUE_LEN_MAX {
            return Err(PayloadError::Invalid { what, why: "value too long" });
        }
        Ok(PrepareBody { txid, kind, participants: &buf[fixed..needed], value })
    }

    pub fn participants(&self) -> impl Iterator<Item = u32> + '_ {
        self.participants.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
    }
}

/// What a replica knows of a transaction, in a `Resolve` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxState {
    /// Prepared here, no decision known.
    Prepared = 1,
    Committed = 2,
    /// Aborted here, or never prepared here (and now it never will be).
    Aborted = 3,
}

impl TxState {
    pub fn from_u8(b: u8) -> Option<TxState> {
        [TxState::Prepared, TxState::Committed, TxState::Aborted].into_iter().find(|s| *s as u8 == b)
    }
}

/// A run of a partition's entries: `partition u32 | next u64 | token u64 | done u8 |
/// entries`, each entry `key_len u16 | value_len u32 | key | value`. A full copy reads
/// a partition in the order of its keys' hashes: in a `SnapshotChunk` reply `next` is
/// the hash the next request starts from and `token` names the source's window that
/// served it (the next request hands it back); in an `Install` both are unused (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub partition: u32,
    pub next: u64,
    pub token: u64,
    pub done: bool,
    pub entries: &'a [u8],
}

pub const CHUNK_HEADER_LEN: usize = 21;
/// An entry's lengths before its key and value.
pub const ENTRY_HEADER_LEN: usize = 6;

impl<'a> Chunk<'a> {
    /// Writes the header; entries follow with `push_entry`.
    pub fn start(out: &mut Vec<u8>, partition: u32, next: u64, token: u64, done: bool) {
        out.extend_from_slice(&partition.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
        out.extend_from_slice(&token.to_le_bytes());
        out.push(done as u8);
    }

    pub fn push_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
    }

    /// Decodes the header and checks every entry's lengths, so iterating cannot fail.
    pub fn decode(buf: &'a [u8]) -> Result<Chunk<'a>, PayloadError> {
        let what = "chunk";
        if buf.len() < CHUNK_HEADER_LEN {
            return Err(PayloadError::Short { what, len: buf.len(), needed: CHUNK_HEADER_LEN });
        }
        let done = match buf[20] {
            0 => false,
            1 => true,
            _ => return Err(PayloadError::Invalid { what, why: "done flag not 0 or 1" }),
        };
        let entries = &buf[CHUNK_HEADER_LEN..];
        check_entries(what, entries)?;
        Ok(Chunk { partition: u32_at(buf, 0), next: u64_at(buf, 4), token: u64_at(buf, 12), done, entries })
    }

    pub fn entries(&self) -> ChunkEntries<'a> {
        ChunkEntries { rest: self.entries }
    }
}

/// Checks every entry's lengths (`key_len u16 | value_len u32 | key | value` each), so
/// that iterating them cannot fail.
pub(crate) fn check_entries(what: &'static str, entries: &[u8]) -> Result<(), PayloadError> {
    let mut at = 0;
    while at < entries.len() {
        let Some(h) = entries.get(at..at + 6) else {
            return Err(PayloadError::Invalid { what, why: "entry header cut short" });
        };
        let (k, v) = (u16::from_le_bytes([h[0], h[1]]) as usize, u32_at(h, 2) as usize);
        if k > KEY_LEN_MAX || v > VALUE_LEN_MAX {
            return Err(PayloadError::Invalid { what, why: "entry longer than the limits" });
        }
        at += 6 + k + v;
        if at > entries.len() {
            return Err(PayloadError::Invalid { what, why: "entry runs past the end" });
        }
    }
    Ok(())
}

/// The entries of a checked chunk.
pub struct ChunkEntries<'a> {
    rest: &'a [u8],
}

impl<'a> ChunkEntries<'a> {
    /// Over entries `check_entries` accepted.
    pub(crate) fn new(rest: &'a [u8]) -> ChunkEntries<'a> {
        ChunkEntries { rest }
    }
}

impl<'a> Iterator for ChunkEntries<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let k = u16::from_le_bytes([self.rest[0], self.rest[1]]) as usize;
        let v = u32_at(self.rest, 2) as usize;
        let (key, rest) = self.rest[6..].split_at(k);
        let (value, rest) = rest.split_at(v);
        self.rest = rest;
        Some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn prepare_round_trip(client in any::<u64>(), seq in any::<u64>(), put in any::<bool>(), parts in prop::collection::vec(any::<u32>(), 1..5), value in prop::collection::vec(any::<u8>(), 0..100)) {
            let txid = TxId { client, seq };
            let (kind, value) = if put { (WriteKind::Put, value) } else { (WriteKind::Remove, vec![]) };
            let mut buf = Vec::new();
            PrepareBody::encode(txid, kind, &parts, &value, &mut buf);
            let body = PrepareBody::decode(&buf).unwrap();
            let mut again = Vec::new();
            body.write(&mut again);
            prop_assert_eq!(&again, &buf);
            prop_assert_eq!(body.txid, txid);
            prop_assert_eq!(body.kind, kind);
            prop_assert_eq!(body.participants().collect::<Vec<_>>(), parts);
            prop_assert_eq!(body.value, &value[..]);
        }

        #[test]
        fn chunk_round_trip(entries in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..20), prop::collection::vec(any::<u8>(), 0..50)), 0..10), p in any::<u32>(), next in any::<u64>(), token in any::<u64>(), done in any::<bool>()) {
            let mut buf = Vec::new();
            Chunk::start(&mut buf, p, next, token, done);
            for (k, v) in &entries {
                Chunk::push_entry(&mut buf, k, v);
            }
            let chunk = Chunk::decode(&buf).unwrap();
            prop_assert_eq!((chunk.partition, chunk.next, chunk.token, chunk.done), (p, next, token, done));
            let back: Vec<(Vec<u8>, Vec<u8>)> = chunk.entries().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn any_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = PrepareBody::decode(&buf);
            if let Ok(c) = Chunk::decode(&buf) {
                let _ = c.entries().count();
            }
            let _ = TxId::decode(&buf);
            let _ = SnapshotRequest::decode(&buf);
        }

        #[test]
        fn snapshot_request_round_trip(p in any::<u32>(), from in any::<u64>(), token in any::<u64>(), probe in any::<bool>()) {
            let req = if probe { SnapshotRequest::probe(p) } else { SnapshotRequest::read(p, from, token) };
            prop_assert_eq!(SnapshotRequest::decode(&req.to_bytes()).unwrap(), req);
        }
    }
}

/// A `SnapshotChunk` request: `partition u32 | probe u8 | from u64 | token u64`. A
/// probe only asks whether the partition has writes from older epochs pending (the copy
/// driver probes every member before a copy starts). A read asks for the partition's
/// entries whose key hashes are `from` or more, in hash order; `token` is the one the
/// last reply of the same copy carried (0 at its start: the source makes a new window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub partition: u32,
    pub probe: bool,
    pub from: u64,
    pub token: u64,
}

pub const SNAPSHOT_REQUEST_LEN: usize = 21;

impl SnapshotRequest {
    pub fn probe(partition: u32) -> SnapshotRequest {
        SnapshotRequest { partition, probe: true, from: 0, token: 0 }
    }

    pub fn read(partition: u32, from: u64, token: u64) -> SnapshotRequest {
        SnapshotRequest { partition, probe: false, from, token }
    }

    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn to_bytes(self) -> [u8; SNAPSHOT_REQUEST_LEN] {
        let mut b = [0; SNAPSHOT_REQUEST_LEN];
        b[..4].copy_from_slice(&self.partition.to_le_bytes());
        b[4] = self.probe as u8;
        b[5..13].copy_from_slice(&self.from.to_le_bytes());
        b[13..].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<SnapshotRequest, PayloadError> {
        let what = "snapshot request";
        if buf.len() != SNAPSHOT_REQUEST_LEN {
            return Err(PayloadError::Invalid { what, why: "not 21 bytes" });
        }
        let probe = match buf[4] {
            0 => false,
            1 => true,
            _ => return Err(PayloadError::Invalid { what, why: "probe flag not 0 or 1" }),
        };
        Ok(SnapshotRequest { partition: u32_at(buf, 0), probe, from: u64_at(buf, 5), token: u64_at(buf, 13) })
    }
}
