//! One-line log records on stderr: `<unix time> <who>: <message>`. A brick's stderr is
//! its log file under a local cluster's directory.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

#[macro_export]
macro_rules! log {
    ($who:expr, $($arg:tt)*) => {
        eprintln!("{} {}: {}", $crate::logging::timestamp(), $who, format_args!($($arg)*))
    };
}
