//! The storage engine (shard + log records + replay) against a `BTreeMap`, with group
//! commits and crashes that keep the synced log and any prefix of what was written
//! after the last sync, cut anywhere, even inside a record.

use std::collections::BTreeMap;

use proptest::prelude::*;

use std::sync::Arc;

use super::control::standalone_map;
use super::{Effects, Shard};
use crate::log::record::{self, ScanEnd};
use crate::map::{BrickAddr, BrickId};
use crate::proto::{BrickInfo, Frame, Kind, Op};

const CONN: dds_transport::ConnId = dds_transport::ConnId { slot: 0, generation: 0 };

fn new_shard() -> Shard {
    Shard::new(0, 1, 4, BrickId(0), Arc::new(standalone_map(4, &BrickAddr::tcp(Vec::new()))))
}

/// Executes one write; returns the log records it made.
fn write(shard: &mut Shard, op: Op, key: &[u8], value: &[u8], next_lsn: &mut u64) -> Vec<u8> {
    let info = BrickInfo { partition_bits: 4, core: 0, ports: vec![1] };
    let mut fx = Effects::new(*next_lsn);
    let mut reply = Vec::new();
    shard.execute(CONN, &Frame { kind: Kind::Request(op), request_id: 1, epoch: 1, key, value }, &info, &mut reply, &mut fx);
    *next_lsn = fx.next_lsn;
    fx.batch
}

#[derive(Clone, Debug)]
enum Step {
    Put(u8, Vec<u8>),
    Remove(u8),
    /// End of a loop round: the batch is written; `sync` also fdatasyncs it.
    Commit { sync: bool },
    /// The process dies: the unwritten batch is gone, and of the unsynced bytes on disk
    /// only the first `keep / 255` survive.
    Crash { keep: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..24, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, v)| Step::Put(k, v)),
        2 => (0u8..24).prop_map(Step::Remove),
        3 => any::<bool>().prop_map(|sync| Step::Commit { sync }),
        1 => any::<u8>().prop_map(|keep| Step::Crash { keep }),
    ]
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;
/// A logged mutation: (is a put, key, value).
type Logged = (bool, Vec<u8>, Vec<u8>);

fn apply(model: &mut Model, m: &Logged) {
    if m.0 {
        model.insert(m.1.clone(), m.2.clone());
    } else {
        model.remove(&m.1);
    }
}

fn contents(shard: &Shard) -> Model {
    shard.entries().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn recovery_keeps_every_synced_write_and_nothing_unwritten(steps in prop::collection::vec(step(), 1..120)) {
        let mut shard = new_shard();
        let mut live = Model::new();
        let mut disk: Vec<u8> = Vec::new();
        let mut synced = 0usize;
        // Every record on disk: where it ends, and what it does.
        let mut on_disk: Vec<(usize, Logged)> = Vec::new();
        let mut batch = Vec::new();
        let mut batch_mutations = Vec::new();
        let mut next_lsn = 1u64;
        for step in steps {
            match step {
                Step::Put(k, value) => {
                    let key = key(k);
                    let records = write(&mut shard, Op::Put, &key, &value, &mut next_lsn);
                    prop_assert!(!records.is_empty());
                    batch.extend_from_slice(&records);
                    batch_mutations.push((batch.len(), (true, key.clone(), value.clone())));
                    live.insert(key, value);
                }
                Step::Remove(k) => {
                    let key = key(k);
                    let records = write(&mut shard, Op::Remove, &key, &[], &mut next_lsn);
                    let changed = !records.is_empty();
                    prop_assert_eq!(changed, live.remove(&key).is_some());
                    if changed {
                        batch.extend_from_slice(&records);
                        batch_mutations.push((batch.len(), (false, key, Vec::new())));
                    }
                }
                Step::Commit { sync } => {
                    let base = disk.len();
                    disk.extend_from_slice(&batch);
                    on_disk.extend(batch_mutations.drain(..).map(|(end, m)| (base + end, m)));
                    batch.clear();
                    if sync {
                        synced = disk.len();
                    }
                }
                Step::Crash { keep } => {
                    batch.clear();
                    batch_mutations.clear();
                    let kept = synced + (disk.len() - synced) * keep as usize / 255;
                    disk.truncate(kept);
                    on_disk.retain(|(end, _)| *end <= kept);
                    let mut expected = Model::new();
                    for (_, m) in &on_disk {
                        apply(&mut expected, m);
                    }
                    // Restart: a fresh shard from the log alone.
                    shard = new_shard();
                    let mut last_lsn = 0;
                    let end = record::scan(&disk, |r| {
                        shard.replay(&r.mutation);
                        last_lsn = r.lsn;
                    });
                    match end {
                        Ok(ScanEnd::Clean) => {}
                        Ok(ScanEnd::TornTail { offset, .. }) => {
                            prop_assert!(offset as usize >= synced, "a synced record was called torn");
                            disk.truncate(offset as usize);
                        }
                        Ok(ScanEnd::Preallocated { .. }) => prop_assert!(false, "a log that grows by appends was called preallocated"),
                        Err(e) => prop_assert!(false, "a crash-cut log was called corrupt: {}", e),
                    }
                    prop_assert_eq!(contents(&shard), expected.clone());
                    prop_assert_eq!(last_lsn as usize, on_disk.len());
                    next_lsn = last_lsn + 1;
                    live = expected;
                }
            }
            prop_assert_eq!(contents(&shard), live.clone());
        }
    }
}
