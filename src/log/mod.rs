//! The redo log of a brick core: record format and scanning (`record`), the file
//! written through io_uring with group commit (`file`).

pub mod file;
pub mod record;

pub use file::{LogError, LogFile};
