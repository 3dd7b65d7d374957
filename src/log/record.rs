//! Redo log records: `length: u32 | crc32c: u32 | lsn: u64 | payload`, little-endian.
//! `length` counts the payload; the checksum covers `lsn` and the payload.
//! Payload: `kind: u8 | key_len: u16 | value_len: u32 | key | value`. Kinds: 1 put,
//! 2 remove (the state itself), 3 prepare (value: the wire `PrepareBody`), 4 commit and
//! 5 abort (value: the `TxId`) for two-phase commit, 6 sync point (lsn field 0, no key,
//! value: a `u64` byte length; see below), 7 forget a partition (no key, value: the DP
//! leaf's raw `u32` id).
//!
//! Reading distinguishes a torn tail (the last write of a crash that never synced, to be
//! dropped) from corruption (a bad record in bytes that had been durable, to stop on).
//! A log written by appending (its file grows with every write) can only lose a suffix,
//! so a bad record is torn only if no valid record follows it. A preallocated log (its
//! space laid out in zeros ahead of the writes, so a sync need not change the file's
//! size) can lose any page of the unsynced region, later ones surviving: there, every
//! group-commit write ends with a sync point that says how many bytes of the file were
//! durable when it was written, and a bad record is corruption only if a later sync point
//! says it had been durable. Such a log starts with a sync point (that is how a reader
//! knows which rule holds), and a run of zeros where the next record would be is its
//! clean end.

use crate::proto::{PrepareBody, TxId, KEY_LEN_MAX, VALUE_LEN_MAX};

pub const RECORD_HEADER_LEN: usize = 16;
const PAYLOAD_HEADER_LEN: usize = 7;
const SYNC_POINT_KIND: u8 = 6;
const FORGET_KIND: u8 = 7;
/// The length of a sync point record.
pub const SYNC_POINT_LEN: usize = RECORD_HEADER_LEN + PAYLOAD_HEADER_LEN + 8;

/// Appends the sync point that ends a write to a preallocated log.
pub fn encode_sync_point(out: &mut Vec<u8>, durable_len: u64) {
    encode(out, 0, &Mutation::SyncPoint { durable_len });
}

/// The durable length a valid sync point at the start of `buf` states.
fn sync_point_at(buf: &[u8]) -> Option<u64> {
    // Cheap filters first: a scan looks at every offset of a bad tail.
    if buf.len() < SYNC_POINT_LEN || buf[0] as usize != SYNC_POINT_LEN - RECORD_HEADER_LEN || buf[RECORD_HEADER_LEN] != SYNC_POINT_KIND {
        return None;
    }
    match decode(buf, 0) {
        Ok((Record { mutation: Mutation::SyncPoint { durable_len }, .. }, _)) => Some(durable_len),
        _ => None,
    }
}

/// Whether `log` is laid out ahead of its records: it starts with a sync point.
pub fn starts_preallocated(log: &[u8]) -> bool {
    sync_point_at(log).is_some()
}

/// A prepare's body holds the value plus the transaction and its participants.
pub const PAYLOAD_LEN_MAX: usize = PAYLOAD_HEADER_LEN + KEY_LEN_MAX + VALUE_LEN_MAX + 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Remove { key: &'a [u8] },
    /// A write prepared (and locked) under two-phase commit, not yet applied.
    Prepare { key: &'a [u8], body: PrepareBody<'a> },
    /// The outcome of a prepared write; a commit applies it.
    Decide { key: &'a [u8], txid: TxId, commit: bool },
    /// A sync point of a preallocated log: when the write it ends was made, the first
    /// `durable_len` bytes of the file were durable. Not a change of state; its lsn
    /// field is 0 and takes no place in the sequence.
    SyncPoint { durable_len: u64 },
    /// Every key of DP leaf `partition` (its raw id) held at this point is gone: the
    /// brick left the partition's group, or is joining it again and what it held is
    /// stale. One record stands for every key, so a replay after a later rejoin cannot
    /// bring back keys that were only ever dropped from memory.
    Forget { partition: u32 },
}

impl<'a> Mutation<'a> {
    /// The value a put or a prepare carries: the last bytes of its record.
    pub fn value(&self) -> Option<&'a [u8]> {
        match *self {
            Mutation::Put { value, .. } => Some(value),
            Mutation::Prepare { body, .. } => Some(body.value),
            _ => None,
        }
    }

    pub fn key(&self) -> &[u8] {
        match self {
            Mutation::Put { key, .. } | Mutation::Remove { key } | Mutation::Prepare { key, .. } | Mutation::Decide { key, .. } => key,
            Mutation::SyncPoint { .. } | Mutation::Forget { .. } => &[],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: u64,
    pub mutation: Mutation<'a>,
}

/// Why the bytes at `offset` are not a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record at offset {offset}: header cut short ({available} of {RECORD_HEADER_LEN} bytes)")]
    ShortHeader { offset: u64, available: usize },
    #[error("record at offset {offset}: length {len} exceeds the limit of {PAYLOAD_LEN_MAX}")]
    TooLong { offset: u64, len: usize },
    #[error("record at offset {offset}: {len} bytes promised, {available} present")]
    ShortBody { offset: u64, len: usize, available: usize },
    #[error("record at offset {offset}: checksum 0x{stored:08x} stored, 0x{computed:08x} computed")]
    Checksum { offset: u64, stored: u32, computed: u32 },
    #[error("record at offset {offset}: malformed payload: {what}")]
    Payload { offset: u64, what: &'static str },
}

impl RecordError {
    pub fn offset(&self) -> u64 {
        match *self {
            RecordError::ShortHeader { offset, .. }
            | RecordError::TooLong { offset, .. }
            | RecordError::ShortBody { offset, .. }
            | RecordError::Checksum { offset, .. }
            | RecordError::Payload { offset, .. } => offset,
        }
    }
}

/// Appends one record to `out`.
pub fn encode(out: &mut Vec<u8>, lsn: u64, mutation: &Mutation<'_>) {
    let mut scratch = Vec::new();
    let (kind, key, value): (u8, &[u8], &[u8]) = match *mutation {
        Mutation::Put { key, value } => (1, key, value),
        Mutation::Remove { key } => (2, key, &[]),
        Mutation::Prepare { key, body } => {
            body.write(&mut scratch);
            (3, key, &scratch[..])
        }
        Mutation::Decide { key, txid, commit } => {
            scratch.extend_from_slice(&txid.to_bytes());
            (if commit { 4 } else { 5 }, key, &scratch[..])
        }
        Mutation::SyncPoint { durable_len } => {
            assert_eq!(lsn, 0, "a sync point takes no lsn");
            scratch.extend_from_slice(&durable_len.to_le_bytes());
            (SYNC_POINT_KIND, &[][..], &scratch[..])
        }
        Mutation::Forget { partition } => {
            scratch.extend_from_slice(&partition.to_le_bytes());
            (FORGET_KIND, &[][..], &scratch[..])
        }
    };
    let start = out.len();
    let payload_len = PAYLOAD_HEADER_LEN + key.len() + value.len();
    assert!(key.len() <= KEY_LEN_MAX && payload_len <= PAYLOAD_LEN_MAX, "mutation past the wire limits");
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    // Check what is about to be written, as it will be read back.
    debug_assert_eq!(decode(&out[start..], 0).map(|(r, n)| (r.lsn, n)), Ok((lsn, out.len() - start)));
}

/// Decodes the record at the start of `buf` (found at file offset `offset`); returns it
/// and its length.
pub fn decode(buf: &[u8], offset: u64) -> Result<(Record<'_>, usize), RecordError> {
    let Some(h) = buf.get(..RECORD_HEADER_LEN) else {
        return Err(RecordError::ShortHeader { offset, available: buf.len() });
    };
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    if len > PAYLOAD_LEN_MAX {
        return Err(RecordError::TooLong { offset, len });
    }
    let total = RECORD_HEADER_LEN + len;
    let Some(whole) = buf.get(..total) else {
        return Err(RecordError::ShortBody { offset, len, available: buf.len() - RECORD_HEADER_LEN });
    };
    let computed = crc32c::crc32c(&whole[8..]);
    if computed != stored {
        return Err(RecordError::Checksum { offset, stored, computed });
    }
    let lsn = u64::from_le_bytes(whole[8..16].try_into().expect("8 bytes"));
    let p = &whole[RECORD_HEADER_LEN..];
    let bad = |what| RecordError::Payload { offset, what };
    if p.len() < PAYLOAD_HEADER_LEN {
        return Err(bad("shorter than its header"));
    }
    let key_len = u16::from_le_bytes([p[1], p[2]]) as usize;
    let value_len = u32::from_le_bytes(p[3..7].try_into().expect("4 bytes")) as usize;
    if key_len > KEY_LEN_MAX || PAYLOAD_HEADER_LEN + key_len + value_len != p.len() {
        return Err(bad("lengths disagree"));
    }
    let key = &p[PAYLOAD_HEADER_LEN..PAYLOAD_HEADER_LEN + key_len];
    let value = &p[PAYLOAD_HEADER_LEN + key_len..];
    let mutation = match p[0] {
        1 if value_len <= VALUE_LEN_MAX => Mutation::Put { key, value },
        1 => return Err(bad("value too long")),
        2 if value_len == 0 => Mutation::Remove { key },
        2 => return Err(bad("remove with a value")),
        3 => Mutation::Prepare { key, body: PrepareBody::decode(value).map_err(|_| bad("malformed prepare"))? },
        4 | 5 => Mutation::Decide { key, txid: TxId::decode(value).map_err(|_| bad("malformed txid"))?, commit: p[0] == 4 },
        SYNC_POINT_KIND if key_len == 0 && value_len == 8 && lsn == 0 => {
            Mutation::SyncPoint { durable_len: u64::from_le_bytes(value.try_into().expect("8 bytes")) }
        }
        SYNC_POINT_KIND => return Err(bad("malformed sync point")),
        FORGET_KIND if key_len == 0 && value_len == 4 => Mutation::Forget { partition: u32::from_le_bytes(value.try_into().expect("4 bytes")) },
        FORGET_KIND => return Err(bad("malformed forget")),
        _ => return Err(bad("unknown kind")),
    };
    Ok((Record { lsn, mutation }, total))
}

/// How a scan of a whole log ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte was a record.
    Clean,
    /// A preallocated log ends at `offset`: only zeros follow, the space laid out for it.
    Preallocated { offset: u64 },
    /// Bytes from `offset` on are the torn tail of an unsynced write: drop them.
    TornTail { offset: u64, error: RecordError },
}

/// Calls `apply` for every record of `log` in order, sync points included. Records carry
/// consecutive lsns (sync points carry none). A bad record is corruption and an error if
/// it had been durable (module docs); otherwise it and everything after it are a torn
/// tail.
pub fn scan<'a>(log: &'a [u8], mut apply: impl FnMut(Record<'a>)) -> Result<ScanEnd, RecordError> {
    let mut at = 0usize;
    let mut last_lsn = None;
    // Whether the log starts with a sync point: preallocated, so any unsynced page may
    // be lost, not only a suffix.
    let preallocated = starts_preallocated(log);
    while at < log.len() {
        match decode(&log[at..], at as u64) {
            Ok((record, len)) => {
                if !matches!(record.mutation, Mutation::SyncPoint { .. }) {
                    if last_lsn.is_some_and(|l| record.lsn != l + 1) {
                        return Err(RecordError::Payload { offset: at as u64, what: "lsn does not follow the previous one" });
                    }
                    last_lsn = Some(record.lsn);
                }
                apply(record);
                at += len;
            }
            Err(_) if preallocated && log[at..].iter().all(|&b| b == 0) => return Ok(ScanEnd::Preallocated { offset: at as u64 }),
            Err(error) if preallocated => {
                // Corrupt only if a later write found these bytes durable.
                let durable = (at + 1..log.len()).any(|from| sync_point_at(&log[from..]).is_some_and(|len| len > at as u64));
                return if durable { Err(error) } else { Ok(ScanEnd::TornTail { offset: at as u64, error }) };
            }
            Err(error) => {
                // Anything valid further on means this was not the end of the log. Lsns
                // are consecutive, so only offsets holding a plausible next lsn are
                // checksummed: the search stays linear in the tail's length.
                let records_left = ((log.len() - at) / RECORD_HEADER_LEN) as u64;
                let plausible = |lsn: u64| last_lsn.is_none_or(|l| lsn > l && lsn - l <= records_left + 1);
                let later = (at + 1..log.len().saturating_sub(RECORD_HEADER_LEN - 1)).any(|from| {
                    let lsn = u64::from_le_bytes(log[from + 8..from + 16].try_into().expect("8 bytes"));
                    plausible(lsn) && decode(&log[from..], from as u64).is_ok()
                });
                return if later { Err(error) } else { Ok(ScanEnd::TornTail { offset: at as u64, error }) };
            }
        }
    }
    Ok(ScanEnd::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log_of(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut log = Vec::new();
        let mut ends = Vec::new();
        for lsn in 1..=n {
            let key = format!("key{lsn}");
            let value = vec![lsn as u8; (lsn as usize * 37) % 300];
            let m = if lsn % 7 == 0 {
                Mutation::Forget { partition: lsn as u32 }
            } else if lsn % 5 == 0 {
                Mutation::Remove { key: key.as_bytes() }
            } else {
                Mutation::Put { key: key.as_bytes(), value: &value }
            };
            encode(&mut log, lsn, &m);
            ends.push(log.len());
        }
        (log, ends)
    }

    #[test]
    fn a_forget_record_reads_back_and_a_malformed_one_is_refused() {
        let mut log = Vec::new();
        encode(&mut log, 3, &Mutation::Forget { partition: 0x0102_0304 });
        assert_eq!(decode(&log, 0), Ok((Record { lsn: 3, mutation: Mutation::Forget { partition: 0x0102_0304 } }, log.len())));
        let mut bad = Vec::new();
        encode(&mut bad, 3, &Mutation::Put { key: b"", value: &[1, 2, 3] });
        bad[RECORD_HEADER_LEN] = FORGET_KIND;
        let crc = crc32c::crc32c(&bad[8..]);
        bad[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&bad, 0), Err(RecordError::Payload { what: "malformed forget", .. })));
    }

    #[test]
    fn a_clean_log_replays_whole() {
        let (log, _) = log_of(50);
        let mut lsns = Vec::new();
        assert_eq!(scan(&log, |r| lsns.push(r.lsn)), Ok(ScanEnd::Clean));
        assert_eq!(lsns, (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn every_truncation_is_a_torn_tail_keeping_whole_records() {
        let (log, ends) = log_of(20);
        for cut in 0..log.len() {
            let mut n = 0;
            let end = scan(&log[..cut], |_| n += 1).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(n, whole, "cut at {cut}");
            assert_eq!(end == ScanEnd::Clean, ends.contains(&cut) || cut == 0, "cut at {cut}: {end:?}");
        }
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_corruption() {
        let (log, ends) = log_of(20);
        for at in 0..ends[17] {
            let mut bad = log.clone();
            bad[at] ^= 0x40;
            let err = scan(&bad, |_| {}).expect_err(&format!("flip at {at} went unnoticed"));
            assert!(err.offset() <= at as u64, "flip at {at} reported at {}", err.offset());
        }
    }

    #[test]
    fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
        let (log, ends) = log_of(5);
        let mut bad = log.clone();
        bad[ends[3] + 20] ^= 1;
        let mut n = 0;
        assert!(matches!(scan(&bad, |_| n += 1), Ok(ScanEnd::TornTail { offset, .. }) if offset == ends[3] as u64));
        assert_eq!(n, 4);
    }

    /// A preallocated log image: batches written as `LogFile` writes them (each ending
    /// with a sync point), in `PREALLOC` zeros; returns the image, the end of each record
    /// (sync points not counted) and the durable length after the last batch.
    const PREALLOC: usize = 8192;
    fn preallocated(batches: &[(usize, bool)]) -> (Vec<u8>, Vec<usize>, usize) {
        let mut image = Vec::new();
        encode_sync_point(&mut image, 0);
        let mut durable = image.len();
        let mut ends = Vec::new();
        let mut lsn = 1u64;
        for &(records, sync) in batches {
            for _ in 0..records {
                let key = format!("key{lsn}");
                let value = vec![lsn as u8; (lsn as usize * 37) % 200];
                encode(&mut image, lsn, &Mutation::Put { key: key.as_bytes(), value: &value });
                ends.push(image.len());
                lsn += 1;
            }
            encode_sync_point(&mut image, durable as u64);
            if sync {
                durable = image.len();
            }
        }
        assert!(image.len() <= PREALLOC);
        image.resize(PREALLOC, 0);
        (image, ends, durable)
    }

    #[test]
    fn a_preallocated_log_ends_cleanly_at_its_zeros() {
        let (image, ends, _) = preallocated(&[(3, true), (2, true)]);
        let mut n = 0;
        assert_eq!(scan(&image, |r| n += u64::from(r.lsn != 0)), Ok(ScanEnd::Preallocated { offset: (ends[4] + SYNC_POINT_LEN) as u64 }));
        assert_eq!(n, 5);
    }

    #[test]
    fn a_bad_byte_in_what_a_later_write_found_durable_is_corruption() {
        let (image, ends, _) = preallocated(&[(3, true), (2, true), (2, false)]);
        // Inside the first batch: the second batch's sync point says it was durable.
        for at in SYNC_POINT_LEN..ends[2] {
            let mut bad = image.clone();
            bad[at] ^= 0x10;
            assert!(scan(&bad, |_| {}).is_err(), "flip at {at} in a durable batch went unnoticed");
        }
        // Inside the last batch, which nothing after it found durable: a torn tail.
        let mut bad = image.clone();
        bad[ends[5] + 20] ^= 0x10;
        assert!(matches!(scan(&bad, |_| {}), Ok(ScanEnd::TornTail { offset, .. }) if offset == ends[5] as u64));
    }

    proptest! {
        /// A power loss keeps the durable bytes and, of the rest, any subset of 512-byte
        /// sectors (the others read as the zeros laid out before): recovery is never
        /// called corrupt, keeps every durable record, and keeps a prefix of the rest.
        #[test]
        fn a_preallocated_log_survives_any_lost_unsynced_sectors(
            batches in prop::collection::vec((1usize..5, any::<bool>()), 1..12),
            lost in prop::collection::vec(any::<bool>(), 16),
        ) {
            let (image, ends, durable) = preallocated(&batches);
            let written = ends.last().map_or(0, |e| e + SYNC_POINT_LEN);
            let mut crashed = image.clone();
            for (sector, &gone) in lost.iter().enumerate() {
                let (from, to) = (sector * 512, (sector + 1) * 512);
                if gone && to > durable && from < written {
                    crashed[from.max(durable)..to].fill(0);
                }
            }
            let mut lsns = Vec::new();
            let end = scan(&crashed, |r| if r.lsn != 0 { lsns.push(r.lsn) });
            prop_assert!(end.is_ok(), "a power loss was called corruption: {:?}", end);
            let kept = ends.iter().filter(|&&e| e <= durable).count();
            prop_assert!(lsns.len() >= kept, "{} records replayed, {} were durable", lsns.len(), kept);
            let n = lsns.len();
            prop_assert_eq!(lsns, (1..).take(n).collect::<Vec<u64>>());
        }

        #[test]
        fn round_trip(lsn in any::<u64>(), key in prop::collection::vec(any::<u8>(), 0..64), value in prop::collection::vec(any::<u8>(), 0..512), put in any::<bool>()) {
            let m = if put { Mutation::Put { key: &key, value: &value } } else { Mutation::Remove { key: &key } };
            let mut buf = Vec::new();
            encode(&mut buf, lsn, &m);
            let (r, n) = decode(&buf, 0).unwrap();
            prop_assert_eq!(n, buf.len());
            prop_assert_eq!(r, Record { lsn, mutation: m });
        }

        #[test]
        fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = scan(&bytes, |_| {});
        }
    }
}
