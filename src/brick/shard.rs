//! The partitions one core owns, and the execution of one request against them.
//! Only the owning core's thread ever touches a shard: no locks.

use hashbrown::HashMap;

use crate::log::record::Mutation;
use crate::map::{core_of, key_hash, partition_of};
use crate::proto::{encode, BrickInfo, CoreStats, Frame, Kind, Op, Status};

type Table = HashMap<Box<[u8]>, Box<[u8]>>;

pub struct Shard {
    core: usize,
    cores: usize,
    partition_bits: u8,
    /// Indexed by partition; `Some` only for partitions this core owns.
    tables: Vec<Option<Table>>,
    pub stats: CoreStats,
}

impl Shard {
    pub fn new(core: usize, cores: usize, partition_bits: u8) -> Shard {
        assert!(core < cores);
        let partitions = 1u32 << partition_bits;
        let tables = (0..partitions).map(|p| (core_of(p, cores) == core).then(Table::new)).collect();
        Shard { core, cores, partition_bits, tables, stats: CoreStats::default() }
    }

    /// Applies a mutation to an owned partition; returns whether anything changed.
    fn mutate(&mut self, partition: u32, mutation: &Mutation<'_>) -> bool {
        let table = self.tables[partition as usize].as_mut().expect("mutate on an owned partition");
        match *mutation {
            Mutation::Put { key, value } => {
                match table.get_mut(key) {
                    Some(old) => {
                        self.stats.bytes -= old.len() as u64;
                        self.stats.bytes += value.len() as u64;
                        *old = value.into();
                    }
                    None => {
                        table.insert(key.into(), value.into());
                        self.stats.keys += 1;
                        self.stats.bytes += (key.len() + value.len()) as u64;
                    }
                }
                true
            }
            Mutation::Remove { key } => match table.remove(key) {
                Some(value) => {
                    self.stats.keys -= 1;
                    self.stats.bytes -= (key.len() + value.len()) as u64;
                    true
                }
                None => false,
            },
        }
    }

    /// Re-applies a logged mutation at start-up. The record came from this core's own
    /// log, so its partition must be one this core owns.
    pub fn replay(&mut self, mutation: &Mutation<'_>) {
        let partition = partition_of(key_hash(mutation.key()), self.partition_bits);
        assert!(self.tables[partition as usize].is_some(), "core {} log holds partition {partition} it does not own", self.core);
        self.mutate(partition, mutation);
    }

    pub fn partitions(&self) -> usize {
        self.tables.len()
    }

    /// Keys and values of `partition`, empty for one this core does not own.
    pub fn partition_entries(&self, partition: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.tables[partition].iter().flat_map(|t| t.iter().map(|(k, v)| (&k[..], &v[..])))
    }

    /// Every key and value this core holds, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.tables.iter().flatten().flat_map(|t| t.iter().map(|(k, v)| (&k[..], &v[..])))
    }

    /// Executes one request and appends its reply to `out`. `info` answers `Hello`.
    /// Returns whether the request changed the shard (and so must be logged).
    pub fn execute(&mut self, request: &Frame<'_>, info: &BrickInfo, out: &mut Vec<u8>) -> bool {
        let Kind::Request(op) = request.kind else {
            unreachable!("the core loop passes requests only")
        };
        self.stats.requests += 1;
        let mut reply = |status: Status, value: &[u8]| {
            encode(out, &Frame { kind: Kind::Reply(op, status), request_id: request.request_id, epoch: 0, key: &[], value })
        };
        match op {
            Op::Get | Op::Put | Op::Remove => {
                let partition = partition_of(key_hash(request.key), self.partition_bits);
                if self.tables[partition as usize].is_none() {
                    let msg = format!(
                        "partition {partition} belongs to core {} of this brick, not core {}",
                        core_of(partition, self.cores),
                        self.core
                    );
                    reply(Status::WrongShard, msg.as_bytes());
                    return false;
                }
                match op {
                    Op::Get => {
                        match self.tables[partition as usize].as_ref().expect("owned").get(request.key) {
                            Some(value) => reply(Status::Ok, value),
                            None => reply(Status::NotFound, &[]),
                        }
                        false
                    }
                    Op::Put => {
                        self.mutate(partition, &Mutation::Put { key: request.key, value: request.value });
                        reply(Status::Ok, &[]);
                        true
                    }
                    Op::Remove => {
                        let removed = self.mutate(partition, &Mutation::Remove { key: request.key });
                        reply(if removed { Status::Ok } else { Status::NotFound }, &[]);
                        removed
                    }
                    _ => unreachable!(),
                }
            }
            Op::Hello => {
                let mut payload = Vec::new();
                info.encode(&mut payload);
                reply(Status::Ok, &payload);
                false
            }
            Op::Stats => {
                let mut payload = Vec::new();
                self.stats.encode(&mut payload);
                reply(Status::Ok, &payload);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::decode;

    fn run(shard: &mut Shard, op: Op, key: &[u8], value: &[u8]) -> (Status, Vec<u8>) {
        let info = BrickInfo { partition_bits: 8, core: 0, ports: vec![1] };
        let mut out = Vec::new();
        let _ = shard.execute(&Frame { kind: Kind::Request(op), request_id: 9, epoch: 0, key, value }, &info, &mut out);
        let (frame, len) = decode(&out).unwrap().unwrap();
        assert_eq!(len, out.len());
        assert_eq!(frame.request_id, 9);
        match frame.kind {
            Kind::Reply(o, status) => {
                assert_eq!(o, op);
                (status, frame.value.to_vec())
            }
            Kind::Request(_) => panic!("a request came back"),
        }
    }

    #[test]
    fn put_get_remove_and_counters() {
        let mut shard = Shard::new(0, 1, 8);
        assert_eq!(run(&mut shard, Op::Get, b"a", b"").0, Status::NotFound);
        assert_eq!(run(&mut shard, Op::Put, b"a", b"one").0, Status::Ok);
        assert_eq!(run(&mut shard, Op::Put, b"a", b"three").0, Status::Ok);
        assert_eq!(run(&mut shard, Op::Get, b"a", b""), (Status::Ok, b"three".to_vec()));
        assert_eq!((shard.stats.keys, shard.stats.bytes), (1, 6));
        assert_eq!(run(&mut shard, Op::Remove, b"a", b"").0, Status::Ok);
        assert_eq!(run(&mut shard, Op::Remove, b"a", b"").0, Status::NotFound);
        assert_eq!((shard.stats.keys, shard.stats.bytes), (0, 0));
    }

    #[test]
    fn keys_of_other_cores_are_refused() {
        let mut shards = [Shard::new(0, 2, 8), Shard::new(1, 2, 8)];
        let key = b"some key";
        let owner = core_of(partition_of(key_hash(key), 8), 2);
        assert_eq!(run(&mut shards[owner], Op::Put, key, b"v").0, Status::Ok);
        let (status, msg) = run(&mut shards[1 - owner], Op::Get, key, b"");
        assert_eq!(status, Status::WrongShard);
        assert!(String::from_utf8(msg).unwrap().contains("belongs to core"));
    }
}
