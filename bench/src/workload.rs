//! What to ask: the operation mix and the key distribution.

use rand::rngs::SmallRng;
use rand::Rng;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Get,
    Put,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// 100% gets, uniform keys.
    Read,
    /// 100% puts, uniform keys.
    Write,
    /// 50% gets, 50% puts, uniform keys.
    Mixed,
    /// YCSB A: 50% reads, 50% updates, zipfian keys.
    YcsbA,
    /// YCSB B: 95% reads, 5% updates, zipfian keys.
    YcsbB,
    /// YCSB C: 100% reads, zipfian keys.
    YcsbC,
    /// The paper's read benchmark: 100% gets, uniform keys, 150-byte values, 100 in
    /// flight per client (those two are the defaults the CLI gives it).
    PaperRead,
    /// The paper's write benchmark: 100% puts, otherwise as `PaperRead`.
    PaperWrite,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDist {
    Uniform,
    Zipfian,
}

/// YCSB's default skew.
pub const ZIPF_THETA: f64 = 0.99;

impl Workload {
    pub const ALL: [Workload; 8] = [
        Workload::Read,
        Workload::Write,
        Workload::Mixed,
        Workload::YcsbA,
        Workload::YcsbB,
        Workload::YcsbC,
        Workload::PaperRead,
        Workload::PaperWrite,
    ];

    /// The paper's value size and operations in flight per client.
    pub const PAPER_VALUE_SIZE: usize = 150;
    pub const PAPER_DEPTH: usize = 100;

    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Mixed => "mixed",
            Workload::YcsbA => "ycsb-a",
            Workload::YcsbB => "ycsb-b",
            Workload::YcsbC => "ycsb-c",
            Workload::PaperRead => "paper-read",
            Workload::PaperWrite => "paper-write",
        }
    }

    /// Share of gets, in percent.
    pub fn read_percent(self) -> u32 {
        match self {
            Workload::Read | Workload::YcsbC | Workload::PaperRead => 100,
            Workload::Write | Workload::PaperWrite => 0,
            Workload::Mixed | Workload::YcsbA => 50,
            Workload::YcsbB => 95,
        }
    }

    pub fn key_dist(self) -> KeyDist {
        match self {
            Workload::Read | Workload::Write | Workload::Mixed | Workload::PaperRead | Workload::PaperWrite => {
                KeyDist::Uniform
            }
            Workload::YcsbA | Workload::YcsbB | Workload::YcsbC => KeyDist::Zipfian,
        }
    }

    /// Whether the keys must exist before the run (reads of missing keys measure little).
    pub fn needs_preload(self) -> bool {
        self.read_percent() > 0
    }

    pub fn is_paper(self) -> bool {
        matches!(self, Workload::PaperRead | Workload::PaperWrite)
    }
}

/// Draws operations and key indexes for one client thread.
pub struct OpGen {
    read_percent: u32,
    keys: u64,
    zipf: Option<Zipf<f64>>,
}

impl OpGen {
    pub fn new(workload: Workload, keys: u64) -> OpGen {
        assert!(keys > 0, "a workload needs at least one key");
        let zipf = match workload.key_dist() {
            KeyDist::Uniform => None,
            KeyDist::Zipfian => Some(Zipf::new(keys as f64, ZIPF_THETA).expect("keys >= 1 and theta > 0")),
        };
        OpGen { read_percent: workload.read_percent(), keys, zipf }
    }

    pub fn next(&self, rng: &mut SmallRng) -> (OpKind, u64) {
        let op = if rng.random_range(0..100) < self.read_percent { OpKind::Get } else { OpKind::Put };
        let index = match &self.zipf {
            None => rng.random_range(0..self.keys),
            // Scrambled zipfian (as YCSB): the hot keys are spread over the key space,
            // not bunched at its start, so they do not all land in one partition.
            Some(z) => scramble(z.sample(rng) as u64 - 1) % self.keys,
        };
        (op, index)
    }
}

fn scramble(x: u64) -> u64 {
    // splitmix64's finaliser: a bijection on u64.
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the key for `index` into `buf` (cleared first): fixed width, no allocation
/// once `buf` has grown.
pub fn key_for(index: u64, buf: &mut Vec<u8>) {
    use std::io::Write;
    buf.clear();
    write!(buf, "key:{index:012}").expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mixes_match_their_names() {
        let mut rng = SmallRng::seed_from_u64(1);
        for w in Workload::ALL {
            assert_eq!(<Workload as clap::ValueEnum>::from_str(w.name(), false), Ok(w), "CLI name and report name agree");
            let gen = OpGen::new(w, 1000);
            let gets = (0..10_000).filter(|_| gen.next(&mut rng).0 == OpKind::Get).count() as f64 / 100.0;
            assert!((gets - w.read_percent() as f64).abs() < 3.0, "{}: {gets}% gets", w.name());
        }
    }

    #[test]
    fn zipfian_keys_stay_in_range_and_are_skewed() {
        let mut rng = SmallRng::seed_from_u64(2);
        let gen = OpGen::new(Workload::YcsbC, 1000);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[gen.next(&mut rng).1 as usize] += 1;
        }
        counts.sort_unstable();
        assert!(counts[999] > 20 * counts[500], "hottest {} vs median {}", counts[999], counts[500]);
    }

    #[test]
    fn keys_are_fixed_width() {
        let mut buf = Vec::new();
        key_for(7, &mut buf);
        assert_eq!(buf, b"key:000000000007");
    }
}
