//! Catch-up of a returning replica: the wire bodies of `Digests`, `Diff` and `Repair`.
//!
//! A partition's keys fall into `2^log2` buckets by the high bits of their hash (the low
//! bits choose the partition). A bucket's digest is the wrapping sum of its entries'
//! digests (a 64-bit hash of the value seeded with the key's hash), so it does not
//! depend on the order a table iterates in. The copy driver asks the joining replica
//! for its digests (`Digests`), hands them to a readable replica (`Diff`), which answers
//! with the entries of every bucket whose digest differs from its own (`Buckets`), and
//! hands that to the joining replica (`Repair`), which makes those buckets equal to the
//! source's: what it holds there and the source does not is removed. Every decoder
//! checks lengths and never panics.

use super::tx::{check_entries, ChunkEntries, PayloadError};

/// At most `2^24` buckets per partition (a digest reply of 128 MiB over all calls).
pub const BUCKETS_LOG2_MAX: u8 = 24;
/// Digests per `Digests` reply and `Diff` request (64 KiB of digests).
pub const DIGESTS_PER_CALL: u32 = 8192;

/// The bucket of a key with hash `hash` among `2^log2`.
pub fn bucket_of(hash: u64, log2: u8) -> u32 {
    if log2 == 0 {
        0
    } else {
        (hash >> (64 - u32::from(log2))) as u32
    }
}

/// One entry's share of its bucket's digest, from its key's hash and its value's hash
/// (xxh3 of the bytes: a replica that keeps its values in its log has it without reading
/// them).
pub fn entry_digest(key_hash: u64, value_hash: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&value_hash.to_le_bytes(), key_hash)
}

/// The bucket count for a replica holding `keys` keys of a partition: about one key a
/// bucket, so a changed key brings about one other along.
pub fn buckets_log2_for(keys: u64) -> u8 {
    (64 - keys.saturating_sub(1).leading_zeros()).min(u32::from(BUCKETS_LOG2_MAX)) as u8
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn check_range(what: &'static str, log2: u8, from: u32, count: u32) -> Result<(), PayloadError> {
    if log2 > BUCKETS_LOG2_MAX {
        return Err(PayloadError::Invalid { what, why: "more buckets than the limit" });
    }
    if count > DIGESTS_PER_CALL || u64::from(from) + u64::from(count) > 1u64 << log2 {
        return Err(PayloadError::Invalid { what, why: "bucket range past the partition's buckets or the call's limit" });
    }
    Ok(())
}

/// `Digests` request, to the joining replica: `partition u32 | log2 u8 | from u32 |
/// count u32`. `count` 0 asks only how many keys of the partition it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigestRequest {
    pub partition: u32,
    pub log2: u8,
    pub from: u32,
    pub count: u32,
}

pub const DIGEST_REQUEST_LEN: usize = 13;

impl DigestRequest {
    pub fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DIGEST_REQUEST_LEN);
        b.extend_from_slice(&self.partition.to_le_bytes());
        b.push(self.log2);
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<DigestRequest, PayloadError> {
        let what = "digest request";
        if buf.len() != DIGEST_REQUEST_LEN {
            return Err(PayloadError::Invalid { what, why: "not 13 bytes" });
        }
        let req = DigestRequest { partition: u32_at(buf, 0), log2: buf[4], from: u32_at(buf, 5), count: u32_at(buf, 9) };
        check_range(what, req.log2, req.from, req.count)?;
        Ok(req)
    }
}

/// `Digests` reply: `keys u64 | digest u64 ...` (the keys of the partition held, then
/// one digest per bucket asked for).
pub fn encode_digest_reply(out: &mut Vec<u8>, keys: u64, digests: &[u64]) {
    out.extend_from_slice(&keys.to_le_bytes());
    for d in digests {
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// The keys held and the digests of a `Digests` reply.
pub fn decode_digest_reply(buf: &[u8]) -> Result<(u64, Vec<u64>), PayloadError> {
    let what = "digest reply";
    if buf.len() < 8 || (buf.len() - 8) % 8 != 0 || (buf.len() - 8) / 8 > DIGESTS_PER_CALL as usize {
        return Err(PayloadError::Invalid { what, why: "not a count and whole digests" });
    }
    let keys = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    Ok((keys, buf[8..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
}

/// `Diff` request, to a readable replica: `partition u32 | log2 u8 | from u32 | digest
/// u64 ...`: the joining replica's digests of buckets `from..from + n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffRequest {
    pub partition: u32,
    pub log2: u8,
    pub from: u32,
    pub digests: Vec<u64>,
}

impl DiffRequest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(9 + 8 * self.digests.len());
        b.extend_from_slice(&self.partition.to_le_bytes());
        b.push(self.log2);
        b.extend_from_slice(&self.from.to_le_bytes());
        for d in &self.digests {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Result<DiffRequest, PayloadError> {
        let what = "diff request";
        if buf.len() < 9 || (buf.len() - 9) % 8 != 0 {
            return Err(PayloadError::Invalid { what, why: "not a header and whole digests" });
        }
        let digests: Vec<u64> = buf[9..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        let req = DiffRequest { partition: u32_at(buf, 0), log2: buf[4], from: u32_at(buf, 5), digests };
        check_range(what, req.log2, req.from, u32::try_from(req.digests.len()).unwrap_or(u32::MAX))?;
        Ok(req)
    }
}

/// A `Diff` reply and a `Repair` request: `partition u32 | log2 u8 | next u32 | n u32 |
/// bucket u32 x n | entries` (entries as in a `Chunk`). The listed buckets are to be
/// made equal to the entries given for them (none: empty); `next` is the first bucket
/// of the asked range the source has not compared yet (the range's end: all compared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buckets<'a> {
    pub partition: u32,
    pub log2: u8,
    pub next: u32,
    buckets: &'a [u8],
    pub entries: &'a [u8],
}

pub const BUCKETS_HEADER_LEN: usize = 13;

impl<'a> Buckets<'a> {
    pub fn encode(out: &mut Vec<u8>, partition: u32, log2: u8, next: u32, buckets: &[u32], entries: &[u8]) {
        out.extend_from_slice(&partition.to_le_bytes());
        out.push(log2);
        out.extend_from_slice(&next.to_le_bytes());
        out.extend_from_slice(&(buckets.len() as u32).to_le_bytes());
        for b in buckets {
            out.extend_from_slice(&b.to_le_bytes());
        }
        out.extend_from_slice(entries);
    }

    pub fn decode(buf: &'a [u8]) -> Result<Buckets<'a>, PayloadError> {
        let what = "buckets";
        if buf.len() < BUCKETS_HEADER_LEN {
            return Err(PayloadError::Short { what, len: buf.len(), needed: BUCKETS_HEADER_LEN });
        }
        let (log2, n) = (buf[4], u32_at(buf, 9) as usize);
        if log2 > BUCKETS_LOG2_MAX {
            return Err(PayloadError::Invalid { what, why: "more buckets than the limit" });
        }
        let Some(list) = n.checked_mul(4).and_then(|l| buf.get(BUCKETS_HEADER_LEN..BUCKETS_HEADER_LEN + l)) else {
            return Err(PayloadError::Invalid { what, why: "bucket list runs past the end" });
        };
        if list.chunks_exact(4).any(|b| u64::from(u32_at(b, 0)) >= 1u64 << log2) {
            return Err(PayloadError::Invalid { what, why: "a bucket past the partition's buckets" });
        }
        let entries = &buf[BUCKETS_HEADER_LEN + list.len()..];
        check_entries(what, entries)?;
        Ok(Buckets { partition: u32_at(buf, 0), log2, next: u32_at(buf, 5), buckets: list, entries })
    }

    pub fn buckets(&self) -> impl Iterator<Item = u32> + 'a {
        self.buckets.chunks_exact(4).map(|b| u32_at(b, 0))
    }

    pub fn entries(&self) -> ChunkEntries<'a> {
        ChunkEntries::new(self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Chunk;
    use proptest::prelude::*;

    #[test]
    fn buckets_take_the_high_hash_bits() {
        assert_eq!(bucket_of(u64::MAX, 0), 0);
        assert_eq!(bucket_of(u64::MAX, 24), (1 << 24) - 1);
        assert_eq!(bucket_of(1 << 63, 1), 1);
        assert_eq!((buckets_log2_for(0), buckets_log2_for(1), buckets_log2_for(2), buckets_log2_for(1000)), (0, 0, 1, 10));
        assert_eq!(buckets_log2_for(u64::MAX), BUCKETS_LOG2_MAX);
    }

    proptest! {
        #[test]
        fn round_trips(p in any::<u32>(), log2 in 0u8..=BUCKETS_LOG2_MAX, from in any::<u32>(), digests in prop::collection::vec(any::<u64>(), 0..20),
                       entries in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..20), prop::collection::vec(any::<u8>(), 0..50)), 0..10)) {
            let from = (u64::from(from) % (1u64 << log2)) as u32;
            let count = digests.len().min(((1u64 << log2) - u64::from(from)) as usize);
            let digests = digests[..count].to_vec();
            let req = DigestRequest { partition: p, log2, from, count: count as u32 };
            prop_assert_eq!(DigestRequest::decode(&req.to_bytes()), Ok(req));
            let diff = DiffRequest { partition: p, log2, from, digests: digests.clone() };
            prop_assert_eq!(DiffRequest::decode(&diff.to_bytes()), Ok(diff));
            let mut reply = Vec::new();
            encode_digest_reply(&mut reply, 7, &digests);
            prop_assert_eq!(decode_digest_reply(&reply), Ok((7, digests.clone())));
            let mut raw = Vec::new();
            for (k, v) in &entries {
                Chunk::push_entry(&mut raw, k, v);
            }
            let list: Vec<u32> = digests.iter().map(|d| bucket_of(*d, log2)).collect();
            let mut buf = Vec::new();
            Buckets::encode(&mut buf, p, log2, from, &list, &raw);
            let b = Buckets::decode(&buf).unwrap();
            prop_assert_eq!((b.partition, b.log2, b.next), (p, log2, from));
            prop_assert_eq!(b.buckets().collect::<Vec<_>>(), list);
            let back: Vec<(Vec<u8>, Vec<u8>)> = b.entries().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn any_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = DigestRequest::decode(&buf);
            let _ = DiffRequest::decode(&buf);
            let _ = decode_digest_reply(&buf);
            if let Ok(b) = Buckets::decode(&buf) {
                let _ = (b.buckets().count(), b.entries().count());
            }
        }
    }
}
