//! One-line log records on stderr: `<unix time> <who>: <message>`. A brick's stderr is
//! its log file under a local cluster's directory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences `log!` for the whole process (the simulator runs thousands of clusters).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    !QUIET.load(Ordering::Relaxed)
}

pub fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

#[macro_export]
macro_rules! log {
    ($who:expr, $($arg:tt)*) => {
        if $crate::logging::enabled() {
            eprintln!("{} {}: {}", $crate::logging::timestamp(), $who, format_args!($($arg)*))
        }
    };
}
