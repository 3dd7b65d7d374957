//! Results of a run: JSON for machines, a table row for people.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::driver::RunConfig;

/// Latency and throughput of one kind of operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpReport {
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl OpReport {
    pub fn from_histogram(h: &Histogram<u64>, elapsed: Duration) -> OpReport {
        let us = |ns: u64| ns as f64 / 1000.0;
        let secs = elapsed.as_secs_f64().max(1e-9);
        OpReport {
            ops: h.len(),
            ops_per_sec: h.len() as f64 / secs,
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// What `--json` writes. The top-level latency fields cover all operations.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub workload: String,
    pub clients: usize,
    pub depth: usize,
    pub value_size: usize,
    pub keys: u64,
    pub read_percent: u32,
    pub key_dist: String,
    pub warmup_secs: f64,
    pub seconds: f64,
    pub errors: u64,
    /// All operations; its fields sit at the top level of the JSON.
    #[serde(flatten)]
    pub total: OpReport,
    /// Open-loop target rate (ops/s); absent for closed loop.
    pub rate: Option<f64>,
    /// `[quantile, microseconds]` pairs over all operations, for plots.
    pub percentiles: Vec<[f64; 2]>,
    pub get: OpReport,
    pub put: OpReport,
}

/// Quantiles kept in every report.
pub const QUANTILES: [f64; 10] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0];

impl Report {
    pub(crate) fn new(config: &RunConfig, elapsed: Duration, all: &Histogram<u64>, errors: u64, get: OpReport, put: OpReport) -> Report {
        Report {
            target: config.target.clone(),
            workload: config.workload.name().to_string(),
            clients: config.clients,
            depth: config.depth,
            value_size: config.value_size,
            keys: config.keys,
            read_percent: config.workload.read_percent(),
            key_dist: format!("{:?}", config.workload.key_dist()).to_lowercase(),
            warmup_secs: config.warmup.as_secs_f64(),
            seconds: elapsed.as_secs_f64(),
            errors,
            total: OpReport::from_histogram(all, elapsed),
            rate: config.rate,
            percentiles: QUANTILES.iter().map(|&q| [q, all.value_at_quantile(q) as f64 / 1000.0]).collect(),
            get,
            put,
        }
    }

    pub fn table_header() -> String {
        format!(
            "{:<10} {:<4} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "workload", "op", "ops", "ops/s", "p50 us", "p99 us", "p999 us", "max us", "errors"
        )
    }

    /// One table line per operation kind the workload ran.
    pub fn table_rows(&self) -> Vec<String> {
        [("get", &self.get), ("put", &self.put)]
            .into_iter()
            .filter(|(_, r)| r.ops > 0)
            .map(|(name, r)| {
                format!(
                    "{:<10} {:<4} {:>10} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
                    self.workload, name, r.ops, r.ops_per_sec, r.p50_us, r.p99_us, r.p999_us, r.max_us, self.errors
                )
            })
            .collect()
    }
}
