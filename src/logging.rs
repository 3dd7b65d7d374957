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

/// Fail-stop for a whole process: a panic in any thread (a core, the control thread, a
/// connection of the authority) logs its message and location and ends the process at
/// once with SIGABRT. Without it a panicking core thread dies alone while the process
/// and its heartbeats live on: a half-dead brick that holds partitions it never serves.
///
/// No backtrace: resolving one takes tens of milliseconds in which the other threads
/// would go on serving; the message names the file and line.
pub fn fail_stop_on_panic() {
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        eprintln!("{} fail-stop: thread '{name}' {info}; ending the process", timestamp());
        std::process::abort();
    }));
}

/// A failpoint in a real I/O path (the `fail` crate), compiled only into builds with the
/// `failpoints` feature, which only the tests make; configured by the `FAILPOINTS`
/// environment variable of the process (`FAILPOINTS='log-fsync=return'`).
#[macro_export]
macro_rules! failpoint {
    ($($arg:tt)*) => {
        #[cfg(feature = "failpoints")]
        {
            fail::fail_point!($($arg)*);
        }
    };
}

/// Whether the failpoint `name` fires now (`FAILPOINTS='name=return'`; `1*return`
/// fires once). Always false outside failpoints builds.
#[cfg(feature = "failpoints")]
pub fn failpoint_hit(name: &str) -> bool {
    fail::eval(name, |_| ()).is_some()
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint_hit(_name: &str) -> bool {
    false
}

/// The argument of the failpoint `name` when it fires (`FAILPOINTS='name=return(ARG)'`).
#[cfg(feature = "failpoints")]
pub fn failpoint_arg(name: &str) -> Option<String> {
    fail::eval(name, |arg| arg).flatten()
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint_arg(_name: &str) -> Option<String> {
    None
}
