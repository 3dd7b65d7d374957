//! dds-bench: the load generator behind `dds bench` and `dds demo`.
//!
//! It knows nothing of dds itself: a system under test is a [`Target`] (submit an
//! operation, poll for completions), so the same threads, pacing and histograms can
//! measure dds and its peers alike.

pub mod driver;
pub mod echo;
pub mod plot;
pub mod report;
pub mod stream;
pub mod workload;

pub use driver::{preload, run, Done, Progress, RunConfig, Target, TargetError};
pub use report::{OpReport, Report};
pub use workload::{KeyDist, OpKind, Workload};
