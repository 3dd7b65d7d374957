//! The storage engine (shard + log records + replay) against a `BTreeMap`, with group
//! commits and crashes that keep the synced log and any prefix of what was written
//! after the last sync, cut anywhere, even inside a record.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::Shard;
use crate::log::record::{self, Mutation, ScanEnd};
use crate::proto::{BrickInfo, Frame, Kind, Op};

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
        let info = BrickInfo { partition_bits: 4, core: 0, ports: vec![1] };
        let mut shard = Shard::new(0, 1, 4);
        let mut live = Model::new();
        let mut disk: Vec<u8> = Vec::new();
        let mut synced = 0usize;
        // Every record on disk: where it ends, and what it does.
        let mut on_disk: Vec<(usize, Logged)> = Vec::new();
        let mut batch = Vec::new();
        let mut batch_mutations = Vec::new();
        let mut next_lsn = 1u64;
        let mut reply = Vec::new();
        for step in steps {
            match step {
                Step::Put(k, value) => {
                    let key = key(k);
                    let frame = Frame { kind: Kind::Request(Op::Put), request_id: 1, epoch: 0, key: &key, value: &value };
                    prop_assert!(shard.execute(&frame, &info, &mut reply));
                    record::encode(&mut batch, next_lsn, &Mutation::Put { key: &key, value: &value });
                    next_lsn += 1;
                    batch_mutations.push((batch.len(), (true, key.clone(), value.clone())));
                    live.insert(key, value);
                }
                Step::Remove(k) => {
                    let key = key(k);
                    let frame = Frame { kind: Kind::Request(Op::Remove), request_id: 1, epoch: 0, key: &key, value: &[] };
                    let changed = shard.execute(&frame, &info, &mut reply);
                    prop_assert_eq!(changed, live.remove(&key).is_some());
                    if changed {
                        record::encode(&mut batch, next_lsn, &Mutation::Remove { key: &key });
                        next_lsn += 1;
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
                    shard = Shard::new(0, 1, 4);
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
