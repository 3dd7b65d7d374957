//! Checkpoints: a snapshot of one core's partitions, written a partition at a time
//! between loop rounds (fuzzy), so serving never stops for the whole copy.
//!
//! File: a 28-byte header `magic "DDSCKPT1" | start_lsn: u64 | entries: u64 | crc32c`,
//! then `entries` records in the log's format with lsns `1..=entries`: puts, then the
//! decided transactions the core remembered when the checkpoint finished (decision
//! records: a peer in doubt may ask about one after the log segment that held it is
//! gone). Recovery loads it and replays every log record from `start_lsn` on: puts and
//! removes are blind writes, so a key's last record since `start_lsn` decides it
//! whatever the snapshot caught, and a key with no record since then has not changed
//! since `start_lsn`.
//!
//! A checkpoint is written to `<name>.tmp`, fdatasync'd, renamed, and the directory
//! fsync'd; only then are older log segments deleted. A checkpoint under its final name
//! must be whole: any defect in it is corruption, never a torn tail.

use std::path::{Path, PathBuf};

use super::record::{self, Mutation, ScanEnd};
use crate::proto::TxId;
use super::disk::{Disk, DiskFile, FsFile};
use super::{LogError, LogFile};

const MAGIC: &[u8; 8] = b"DDSCKPT1";
pub const HEADER_LEN: usize = 28;

fn header(start_lsn: u64, entries: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&start_lsn.to_le_bytes());
    h[16..24].copy_from_slice(&entries.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..].copy_from_slice(&crc.to_le_bytes());
    h
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("header: {0}")]
    Header(&'static str),
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error("{found} entries where the header says {expected}")]
    Count { found: u64, expected: u64 },
    #[error("an entry that cannot be loaded: {0}")]
    Entry(&'static str),
}

/// Decodes a whole checkpoint, calling `put` for every entry and `decided` for every
/// remembered decision; returns its start lsn.
pub fn load<'a>(bytes: &'a [u8], mut put: impl FnMut(&'a [u8], &'a [u8]), mut decided: impl FnMut(Mutation<'a>)) -> Result<u64, CheckpointError> {
    let h = bytes.get(..HEADER_LEN).ok_or(CheckpointError::Header("cut short"))?;
    if &h[..8] != MAGIC {
        return Err(CheckpointError::Header("bad magic"));
    }
    let stored = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
    if crc32c::crc32c(&h[..24]) != stored {
        return Err(CheckpointError::Header("checksum mismatch"));
    }
    let start_lsn = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let expected = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let body = &bytes[HEADER_LEN..];
    let mut found = 0u64;
    let mut bad_kind = false;
    let end = record::scan(body, |r| {
        found += 1;
        match r.mutation {
            Mutation::Put { key, value } => put(key, value),
            m @ Mutation::Decide { .. } => decided(m),
            _ => bad_kind = true,
        }
    })
    .map_err(|e| CheckpointError::Record(shift(e)))?;
    if let ScanEnd::TornTail { error, .. } = end {
        return Err(CheckpointError::Record(shift(error)));
    }
    if bad_kind {
        return Err(CheckpointError::Header("a checkpoint holds a record that is neither a put nor a decision"));
    }
    if found != expected {
        return Err(CheckpointError::Count { found, expected });
    }
    Ok(start_lsn)
}

/// Offsets in errors count from the start of the file, not of the body.
fn shift(e: record::RecordError) -> record::RecordError {
    use record::RecordError::*;
    let o = HEADER_LEN as u64;
    match e {
        ShortHeader { offset, available } => ShortHeader { offset: offset + o, available },
        TooLong { offset, len } => TooLong { offset: offset + o, len },
        ShortBody { offset, len, available } => ShortBody { offset: offset + o, len, available },
        Checksum { offset, stored, computed } => Checksum { offset: offset + o, stored, computed },
        Payload { offset, what } => Payload { offset: offset + o, what },
    }
}

/// A checkpoint being written, one chunk per loop round.
pub struct Writer<F: DiskFile = FsFile> {
    file: LogFile<F>,
    tmp: PathBuf,
    path: PathBuf,
    start_lsn: u64,
    entries: u64,
    /// Next partition to copy.
    pub next_partition: usize,
    buf: Vec<u8>,
}

impl<F: DiskFile> Writer<F> {
    /// Starts a checkpoint on `disk` that will cover the log from `start_lsn` on.
    pub fn start<D: Disk<File = F>>(disk: &mut D, path: &Path, start_lsn: u64) -> Result<Writer<F>, LogError> {
        let tmp = path.with_extension("ckpt.tmp");
        disk.remove(&tmp).map_err(|source| LogError::Io { op: "remove", path: tmp.clone(), source })?;
        let (mut file, _) = LogFile::open_on(disk, &tmp)?;
        // The real header is written last, once the entry count is known.
        file.append(&[0u8; HEADER_LEN], false)?;
        Ok(Writer { file, tmp, path: path.to_path_buf(), start_lsn, entries: 0, next_partition: 0, buf: Vec::new() })
    }

    /// Appends entries (copied by the caller from one or more partitions); returns the
    /// bytes written.
    pub fn add<'a>(&mut self, entries: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Result<usize, LogError> {
        self.buf.clear();
        for (key, value) in entries {
            self.entries += 1;
            record::encode(&mut self.buf, self.entries, &Mutation::Put { key, value });
        }
        self.file.append(&self.buf, false)?;
        Ok(self.buf.len())
    }

    /// Appends the remembered decisions `(key, txid, commit)`, after every entry.
    pub fn add_decisions<'a>(&mut self, decisions: impl Iterator<Item = (&'a [u8], TxId, bool)>) -> Result<(), LogError> {
        self.buf.clear();
        for (key, txid, commit) in decisions {
            self.entries += 1;
            record::encode(&mut self.buf, self.entries, &Mutation::Decide { key, txid, commit });
        }
        self.file.append(&self.buf, false)
    }

    /// Makes the checkpoint durable under its final name; returns its start lsn.
    pub fn finish<D: Disk<File = F>>(mut self, disk: &mut D) -> Result<u64, LogError> {
        self.file.write_at(0, &header(self.start_lsn, self.entries))?;
        self.file.append(&[], true)?;
        crate::failpoint!("checkpoint-rename", |_| Err(LogError::Io {
            op: "rename checkpoint",
            path: self.tmp.clone(),
            source: std::io::Error::other("failpoint checkpoint-rename"),
        }));
        disk.rename(&self.tmp, &self.path).map_err(|source| LogError::Io { op: "rename checkpoint", path: self.tmp.clone(), source })?;
        sync_dir(disk, &self.path)?;
        Ok(self.start_lsn)
    }
}

/// fsyncs the directory holding `path` on `disk`, so a rename or an unlink in it is durable.
pub fn sync_dir<D: Disk>(disk: &mut D, path: &Path) -> Result<(), LogError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    disk.sync_dir(dir).map_err(|source| LogError::Io { op: "fsync directory", path: dir.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_checkpoints_load_back_and_defects_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core-0.ckpt");
        let mut w = Writer::start(&mut crate::log::FsDisk::default(), &path, 42).unwrap();
        let data: Vec<(Vec<u8>, Vec<u8>)> = (0..500u32).map(|i| (i.to_le_bytes().to_vec(), vec![i as u8; (i % 70) as usize])).collect();
        for chunk in data.chunks(64) {
            w.add(chunk.iter().map(|(k, v)| (&k[..], &v[..]))).unwrap();
        }
        assert_eq!(w.finish(&mut crate::log::FsDisk::default()).unwrap(), 42);
        let bytes = std::fs::read(&path).unwrap();
        let mut got = Vec::new();
        assert_eq!(load(&bytes, |k, v| got.push((k.to_vec(), v.to_vec())), |_| {}), Ok(42));
        assert_eq!(got, data);
        assert!(!path.with_extension("ckpt.tmp").exists());
        // Cut short at a record boundary: the count catches it.
        let mut two = Vec::new();
        let mut w = Writer::start(&mut crate::log::FsDisk::default(), &path, 1).unwrap();
        w.add([(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"2"[..])].into_iter()).unwrap();
        w.finish(&mut crate::log::FsDisk::default()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let first_end = HEADER_LEN + record::decode(&bytes[HEADER_LEN..], 0).unwrap().1;
        assert!(matches!(load(&bytes[..first_end], |k, _| two.push(k), |_| {}), Err(CheckpointError::Count { found: 1, expected: 2 })));
        // Cut anywhere else or flipped anywhere: an error, never a partial success.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(load(&bad, |_, _| {}, |_| {}).is_err(), "flip at {at}");
            assert!(at == first_end || load(&bytes[..at], |_, _| {}, |_| {}).is_err(), "cut at {at}");
        }
    }
}
