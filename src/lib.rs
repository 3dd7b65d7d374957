//! dds: a replicated, partitioned, persistent hash table for the back ends of internet
//! services, after the distributed data structure of Gribble et al. (OSDI 2000).
//! See ARCHITECTURE.md for the map of this crate.

#[macro_use]
pub mod logging;
pub mod log;
pub mod brick;
pub mod check;
pub mod client;
pub mod durable;
pub mod hash;
pub mod map;
pub mod metrics;
pub mod meta;
pub mod mutation;
pub mod proto;
pub mod rpc;

pub use client::{Client, ClientConfig, ClientError, Completion, Outcome, Request};
/// The cluster's secret (`Secret::load` reads the file `dds cluster up` writes).
pub use dds_transport::auth::{self, Secret};
pub mod cli;

/// The README's Rust code, compiled (not run: it needs a cluster) as a doctest, so the
/// snippet a user pastes keeps compiling.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(feature = "sim")]
pub mod sim;
