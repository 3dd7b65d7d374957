//! One-line log records on stderr: `<RFC 3339 UTC time> <LEVEL> <who>: <message>`,
//! for example `2026-12-01T21:40:12.345Z INFO brick: map epoch 4`. A brick's stderr is
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

/// Now, as RFC 3339 in UTC with milliseconds.
pub fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_millis())
}

/// `secs` since the Unix epoch (and `millis`) as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(secs: u64, millis: u32) -> String {
    let (year, month, day, hour, minute, second) = civil(secs);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

/// `secs` since the Unix epoch as UTC year, month, day, hour, minute and second: the
/// proleptic Gregorian calendar, by Howard Hinnant's days-to-civil algorithm.
pub fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rest / 3600, rest % 3600 / 60, rest % 60)
}

/// `log!(who, "...")` at level INFO; `log!(warn: who, "...")` for what an operator
/// should look at (a refused connection, a torn tail, a lost peer). ERROR is a
/// process's last line: a fail-stop, or the error that stopped a brick or authority
/// (`main.rs`).
#[macro_export]
macro_rules! log {
    (warn: $who:expr, $($arg:tt)*) => {
        if $crate::logging::enabled() {
            eprintln!("{} WARN {}: {}", $crate::logging::timestamp(), $who, format_args!($($arg)*))
        }
    };
    ($who:expr, $($arg:tt)*) => {
        if $crate::logging::enabled() {
            eprintln!("{} INFO {}: {}", $crate::logging::timestamp(), $who, format_args!($($arg)*))
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
        eprintln!("{} ERROR fail-stop: thread '{name}' {info}; ending the process", timestamp());
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

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(super::rfc3339(1_796_160_111, 371), "2026-12-01T21:21:51.371Z");
        assert_eq!(super::rfc3339(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }
}
