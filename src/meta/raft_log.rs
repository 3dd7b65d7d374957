//! An authority member's raft log on disk: the entries and hard state raft-rs asks to
//! persist, in one file of redo log records (`log::record`, through `log::LogFile`), so
//! the torn-tail and corruption rules are the redo log's own: a bad record with nothing
//! valid after it is the torn tail of a write that never synced (dropped), one with a
//! valid record after it is corruption (start-up stops with the offset).
//!
//! Each record is a `Put` whose key says what it holds: `e` one raft entry (protobuf),
//! `h` the hard state (protobuf), `b` the group as this member's log begins from it
//! (`Boot`, JSON; written once, first): where membership changes in the entries start. Replaying them in order into a `MemStorage` rebuilds
//! what raft had persisted: an entry at an index already held replaces it and
//! everything after it, as raft's own append does. Every `persist` ends with one
//! fdatasync before raft may send what depends on it.
//!
//! The log is never compacted (each entry is one map change, a few per brick failure);
//! a member restarts by replaying it whole.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};
use raft::storage::MemStorage;
use raft::Storage as _;

use crate::log::record::{self, Mutation, ScanEnd};
use crate::log::{Disk, LogError, LogFile};

pub const RAFT_LOG_FILE: &str = "raft.log";

const ENTRY_KEY: &[u8] = b"e";
const HARD_STATE_KEY: &[u8] = b"h";
const BOOT_KEY: &[u8] = b"b";

/// The group a member's raft log begins from: the voters before the log's first entry
/// (every member of one group has the same), and other members' addresses it knew when
/// it joined (a joining member learns them from the leader). Written once, so later
/// starts need no `--member` or `--join`: what the log says wins.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Boot {
    /// The member whose log this is (0: written before the id was recorded).
    #[serde(default)]
    pub id: u64,
    pub voters: Vec<(u64, std::net::SocketAddr)>,
    #[serde(default)]
    pub known: Vec<(u64, std::net::SocketAddr)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("raft log {path}: record {lsn}: {what}; refusing to start (the log is left as it is)")]
    Bad { path: PathBuf, lsn: u64, what: String },
    #[error("raft log: committed entry {index}: {what}; refusing to start (the log is left as it is)")]
    Replay { index: u64, what: String },
    #[error("member {id} is not in the group its raft log holds (voters {voters:?}): a wrong --id, or another member's --dir?")]
    Foreign { id: u64, voters: Vec<u64> },
    #[error("this raft log is member {owner}'s, not member {id}'s: a wrong --id, or another member's --dir?")]
    NotMine { id: u64, owner: u64 },
    #[error("member {id} was removed from the authority group (its raft log says so): it does not start again; add a member with a new id (`dds cluster meta add`, `dds meta --join`)")]
    Removed { id: u64 },
}

pub struct RaftLog<D: Disk> {
    file: LogFile<D::File>,
    /// The lsn of the next record.
    next_lsn: u64,
    scratch: Vec<u8>,
}

impl<D: Disk> RaftLog<D> {
    /// Opens (creating) `dir/raft.log` and replays it into `mem`. Returns the log and
    /// the group it begins from, if it says (a member that never ran, or one of a
    /// version before membership changes, has none).
    pub fn open(disk: &mut D, dir: &Path, mem: &MemStorage) -> Result<(RaftLog<D>, Option<Boot>), RaftLogError> {
        let path = dir.join(RAFT_LOG_FILE);
        let (file, contents) = LogFile::open_on(disk, &path)?;
        let mut file = file.with_failpoints("raft-log-write", "raft-log-fsync");
        let mut records = Vec::new();
        let end = record::scan(&contents, |r| records.push(r)).map_err(|error| LogError::Corrupt { path: path.clone(), offset: error.offset(), error })?;
        let bad = |lsn: u64, what: String| RaftLogError::Bad { path: path.clone(), lsn, what };
        let mut next_lsn = 1;
        let mut boot = None;
        for r in &records {
            let Mutation::Put { key, value } = r.mutation else { return Err(bad(r.lsn, "not a raft record".into())) };
            match key {
                ENTRY_KEY => {
                    let entry = Entry::parse_from_bytes(value).map_err(|e| bad(r.lsn, format!("entry: {e}")))?;
                    // Raft appends only right after what it holds, or over a suffix of it.
                    let (first, last) = (mem.first_index().unwrap_or(1), mem.last_index().unwrap_or(0));
                    if entry.index < first || entry.index > last + 1 {
                        return Err(bad(r.lsn, format!("entry {} outside {first}..={}", entry.index, last + 1)));
                    }
                    mem.wl().append(&[entry]).map_err(|e| bad(r.lsn, e.to_string()))?;
                }
                BOOT_KEY => boot = Some(serde_json::from_slice::<Boot>(value).map_err(|e| bad(r.lsn, format!("boot: {e}")))?),
                HARD_STATE_KEY => mem.wl().set_hardstate(HardState::parse_from_bytes(value).map_err(|e| bad(r.lsn, format!("hard state: {e}")))?),
                _ => return Err(bad(r.lsn, "unknown key".into())),
            }
            next_lsn = r.lsn + 1;
        }
        if let ScanEnd::TornTail { offset, error } = end {
            crate::log!(warn: "meta", "{}: dropped a torn tail at offset {offset} ({error})", path.display());
            file.truncate_to(offset)?;
        }
        Ok((RaftLog { file, next_lsn, scratch: Vec::new() }, boot))
    }

    /// Records (and syncs) the group this log begins from.
    pub fn write_boot(&mut self, boot: &Boot) -> Result<(), LogError> {
        self.scratch.clear();
        let value = serde_json::to_vec(boot).expect("serialises");
        record::encode(&mut self.scratch, self.next_lsn, &Mutation::Put { key: BOOT_KEY, value: &value });
        self.next_lsn += 1;
        self.file.append(&self.scratch, true)
    }

    /// Appends `entries` and `hard_state` (either may be empty) and syncs them, and
    /// applies them to `mem`, which raft reads.
    pub fn persist(&mut self, mem: &MemStorage, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), LogError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        self.scratch.clear();
        for entry in entries {
            let value = entry.write_to_bytes().expect("an entry encodes");
            record::encode(&mut self.scratch, self.next_lsn, &Mutation::Put { key: ENTRY_KEY, value: &value });
            self.next_lsn += 1;
        }
        if let Some(hs) = hard_state {
            let value = hs.write_to_bytes().expect("a hard state encodes");
            record::encode(&mut self.scratch, self.next_lsn, &Mutation::Put { key: HARD_STATE_KEY, value: &value });
            self.next_lsn += 1;
        }
        self.file.append(&self.scratch, true)?;
        let mut core = mem.wl();
        if !entries.is_empty() {
            core.append(entries).expect("raft appends after what it holds");
        }
        if let Some(hs) = hard_state {
            core.set_hardstate(hs.clone());
        }
        Ok(())
    }

    /// Records that entries up to `index` are committed (raft's light ready): the hard
    /// state's commit moves, durably.
    pub fn commit_to(&mut self, mem: &MemStorage, index: u64) -> Result<(), LogError> {
        let mut hs = mem.rl().hard_state().clone();
        if hs.commit >= index {
            return Ok(());
        }
        hs.commit = index;
        self.persist(mem, &[], Some(&hs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::mem_disk::MemDisk;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec().into(), ..Entry::default() }
    }

    fn reopen(disk: &mut MemDisk) -> MemStorage {
        let mem = MemStorage::new();
        RaftLog::open(disk, Path::new("/m"), &mem).expect("reopens");
        mem
    }

    #[test]
    fn entries_and_hard_state_come_back_and_a_rewritten_suffix_replaces_the_old() {
        let mut disk = MemDisk::default();
        let mem = MemStorage::new();
        let (mut log, boot) = RaftLog::open(&mut disk, Path::new("/m"), &mem).unwrap();
        assert!(boot.is_none());
        let said = Boot { id: 1, voters: vec![(1, "127.0.0.1:1".parse().unwrap())], known: vec![] };
        log.write_boot(&said).unwrap();
        log.persist(&mem, &[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")], None).unwrap();
        let hs = HardState { term: 2, vote: 3, ..HardState::default() };
        log.persist(&mem, &[entry(3, 2, b"C")], Some(&hs)).unwrap();
        log.commit_to(&mem, 2).unwrap();
        let back = reopen(&mut disk);
        assert_eq!(back.last_index().unwrap(), 3);
        let got = back.entries(1, 4, None, raft::GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| (e.term, e.data.to_vec())).collect::<Vec<_>>(), vec![(1, b"a".to_vec()), (1, b"b".to_vec()), (2, b"C".to_vec())]);
        let state = back.initial_state().unwrap().hard_state;
        assert_eq!((state.term, state.vote, state.commit), (2, 3, 2));
        assert_eq!(RaftLog::open(&mut disk, Path::new("/m"), &MemStorage::new()).unwrap().1, Some(said));
    }

    #[test]
    fn a_power_loss_keeps_what_was_synced_and_drops_a_torn_tail() {
        let mut disk = MemDisk::default();
        let mem = MemStorage::new();
        let (mut log, _) = RaftLog::open(&mut disk, Path::new("/m"), &mem).unwrap();
        log.persist(&mem, &[entry(1, 1, b"synced")], None).unwrap();
        // A write that never synced, cut mid-record by the crash.
        let mut half = Vec::new();
        record::encode(&mut half, 2, &Mutation::Put { key: ENTRY_KEY, value: &entry(2, 1, b"lost").write_to_bytes().unwrap() });
        let (mut f, contents) = disk.open(&Path::new("/m").join(RAFT_LOG_FILE)).unwrap();
        crate::log::DiskFile::write_at(&mut f, contents.len() as u64, &half[..half.len() / 2], &[]).unwrap();
        let back = reopen(&mut disk);
        assert_eq!(back.last_index().unwrap(), 1);
        // The torn bytes are gone: what comes next is readable after another restart.
        let (mut log, _) = RaftLog::open(&mut disk, Path::new("/m"), &MemStorage::new()).unwrap();
        log.persist(&back, &[entry(2, 1, b"next")], None).unwrap();
        assert_eq!(reopen(&mut disk).last_index().unwrap(), 2);
    }

    #[test]
    fn a_flipped_byte_before_a_good_record_stops_start_up() {
        let mut disk = MemDisk::default();
        let mem = MemStorage::new();
        let (mut log, _) = RaftLog::open(&mut disk, Path::new("/m"), &mem).unwrap();
        log.persist(&mem, &[entry(1, 1, b"first")], None).unwrap();
        log.persist(&mem, &[entry(2, 1, b"second")], None).unwrap();
        let path = Path::new("/m").join(RAFT_LOG_FILE);
        let (mut f, _) = disk.open(&path).unwrap();
        crate::log::DiskFile::write_at(&mut f, 20, &[0xff], &[]).unwrap();
        let err = RaftLog::open(&mut disk, Path::new("/m"), &MemStorage::new()).err().expect("corruption is refused");
        assert!(err.to_string().contains("corrupt record"), "{err}");
    }
}
