//! The storage engine (shard, log records, the real `Storage` with its segments and
//! checkpoints, and `recover`) against a `BTreeMap`, on the crash-modelling memory disk
//! the simulator uses too (`log::mem_disk`): group commits, checkpoints, and crashes
//! that are process crashes (the kernel keeps every write) or power losses (what was
//! synced survives; of the rest, a prefix in whole sectors, one sector maybe torn).

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use rand::SeedableRng;

use std::sync::Arc;

use super::control::standalone_map;
use super::storage::recover;
use super::values::{LogAt, ValuesIn};
use super::{Effects, Shard};
use crate::log::mem_disk::MemDisk;
use crate::map::{BrickAddr, BrickId};
use crate::proto::{BrickInfo, Frame, Kind, Op};

const CONN: dds_transport::ConnId = dds_transport::ConnId { slot: 0, generation: 0 };

fn new_shard() -> Shard {
    Shard::new(0, 1, 4, BrickId(0), Arc::new(standalone_map(4, &BrickAddr::tcp(Vec::new()))))
}

/// Executes one write whose records will be written at `at`; returns them.
fn write(shard: &mut Shard, op: Op, key: &[u8], value: &[u8], next_lsn: &mut u64, at: LogAt) -> Vec<u8> {
    let info = BrickInfo { partition_bits: 4, core: 0, ports: vec![1] };
    let mut fx = Effects { log_at: at, ..Effects::new(*next_lsn) };
    let mut reply = Vec::new();
    shard.execute(CONN, &Frame { kind: Kind::Request(op), request_id: 1, epoch: 1, key, value }, &info, &mut reply, &mut fx);
    *next_lsn = fx.next_lsn;
    fx.batch
}

#[derive(Clone, Debug)]
enum Step {
    Put(u8, Vec<u8>),
    Remove(u8),
    /// End of a loop round: the batch is written (`sync`: and fdatasynced), then the
    /// checkpoint work between rounds runs.
    Commit { sync: bool },
    /// The process dies, or (`power_loss`) the machine: then what was not synced is
    /// cut as a disk may cut it (drawn from `seed`). The unwritten batch is gone.
    Crash { power_loss: bool, seed: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..24, prop::collection::vec(any::<u8>(), 0..120)).prop_map(|(k, v)| Step::Put(k, v)),
        2 => (0u8..24).prop_map(Step::Remove),
        3 => any::<bool>().prop_map(|sync| Step::Commit { sync }),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(power_loss, seed)| Step::Crash { power_loss, seed }),
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
    shard.entries().into_iter().collect()
}

/// Values in memory, or in the log with no cache or a small one (most reads go to the
/// disk).
fn values() -> impl Strategy<Value = ValuesIn> {
    prop_oneof![Just(ValuesIn::Memory), Just(ValuesIn::Log { cache_bytes: 0 }), Just(ValuesIn::Log { cache_bytes: 256 })]
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

/// A segment this small starts a checkpoint every few rounds.
const CHECKPOINT_LOG_BYTES: u64 = 2048;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn recovery_keeps_every_synced_write_and_a_prefix_of_the_rest(steps in prop::collection::vec(step(), 1..150), preallocate in any::<bool>(), values in values()) {
        crate::logging::set_quiet(true);
        let dir = Path::new("/core");
        let disk = MemDisk::default();
        let mut shard = new_shard();
        let (mut storage, mut next_lsn) = recover(disk.clone(), 0, dir, &mut shard, CHECKPOINT_LOG_BYTES, preallocate, values).expect("an empty directory");
        // Every mutation written to the log, in order, and how many of them were synced.
        let mut logged: Vec<Logged> = Vec::new();
        let mut synced = 0usize;
        let mut batch = Vec::new();
        let mut batch_mutations: Vec<Logged> = Vec::new();
        let mut live = Model::new();
        for step in steps {
            let at = storage.position();
            let at = LogAt { offset: at.offset + batch.len() as u64, ..at };
            match step {
                Step::Put(k, value) => {
                    let key = key(k);
                    let records = write(&mut shard, Op::Put, &key, &value, &mut next_lsn, at);
                    prop_assert!(!records.is_empty());
                    batch.extend_from_slice(&records);
                    batch_mutations.push((true, key.clone(), value.clone()));
                    live.insert(key, value);
                }
                Step::Remove(k) => {
                    let key = key(k);
                    let records = write(&mut shard, Op::Remove, &key, &[], &mut next_lsn, at);
                    prop_assert_eq!(!records.is_empty(), live.remove(&key).is_some());
                    if !records.is_empty() {
                        batch.extend_from_slice(&records);
                        batch_mutations.push((false, key, Vec::new()));
                    }
                }
                Step::Commit { sync } => {
                    storage.commit_batch(&batch, sync, storage.position()).expect("a memory disk does not fail");
                    shard.trim_cache();
                    batch.clear();
                    logged.append(&mut batch_mutations);
                    if sync {
                        synced = logged.len();
                    }
                    // Checkpoint work between rounds, as the core loop does it.
                    for _ in 0..64 {
                        if !storage.step(&shard, &mut next_lsn).expect("a memory disk does not fail") {
                            break;
                        }
                    }
                    // The cleaner's step: the values it writes again go into the next
                    // round's batch (they change no key's value).
                    let mut fx = Effects { log_at: storage.position(), ..Effects::new(next_lsn) };
                    storage.clean(&mut shard, &mut fx).expect("a memory disk does not fail");
                    next_lsn = fx.next_lsn;
                    batch.extend_from_slice(&fx.batch);
                }
                Step::Crash { power_loss, seed } => {
                    batch.clear();
                    batch_mutations.clear();
                    drop(storage);
                    if power_loss {
                        disk.lose_power(&mut rand::rngs::SmallRng::seed_from_u64(seed));
                    }
                    shard = new_shard();
                    let recovered = recover(disk.clone(), 0, dir, &mut shard, CHECKPOINT_LOG_BYTES, preallocate, values);
                    let Ok((s, lsn)) = recovered else {
                        return Err(TestCaseError::fail(format!("a log only crashes touched was refused: {:?}", recovered.err())));
                    };
                    (storage, next_lsn) = (s, lsn);
                    // What survived is the log up to some point: all that was synced (all
                    // that was written, after a process crash), and no mutation out of order.
                    let got = contents(&shard);
                    let least = if power_loss { synced } else { logged.len() };
                    let mut model = Model::new();
                    logged.iter().take(least).for_each(|m| apply(&mut model, m));
                    let mut kept = None;
                    for n in least..=logged.len() {
                        if model == got {
                            kept = Some(n);
                            break;
                        }
                        if let Some(m) = logged.get(n) {
                            apply(&mut model, m);
                        }
                    }
                    let Some(kept) = kept else {
                        return Err(TestCaseError::fail(format!("recovered {} keys, not the log up to any point from {least} of {} mutations", got.len(), logged.len())));
                    };
                    logged.truncate(kept);
                    // What recovery found is what the next crash starts from.
                    synced = logged.len();
                    live = got;
                }
            }
            prop_assert_eq!(contents(&shard), live.clone());
            prop_assert!(shard.take_failure().is_none(), "every value reads back");
        }
    }
}
