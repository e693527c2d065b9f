//! A tiny leveled logger that writes one line per event to stderr.
//!
//! Fly collects a machine's stderr and stamps every line with the time and the
//! instance, so a line here carries only its level and its text. Pulling in the
//! `log` facade plus a logger crate would buy nothing this file does not.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        match text.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes one whole line; `eprintln!` locks stderr for the line, so lines from
/// different threads never interleave.
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    eprintln!("{} {}", level.label(), args);
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $($arg:tt)+) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)+));
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Error, $($arg)+) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Warn, $($arg)+) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Info, $($arg)+) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Debug, $($arg)+) }; }

/// Lets a repeated line through at most once per [`Throttle::EVERY`], so a
/// flood of refusals cannot flood the log: one `static` per kind of line.
///
/// ```ignore
/// static REFUSED: Throttle = Throttle::new();
/// if let Some(more) = REFUSED.allow() {
///     warn!("refusing ...{}", log::suppressed(more));
/// }
/// ```
pub struct Throttle {
    /// When the line was last let through, in ms on the fan-out's clock
    /// (`clock::now_ms`), plus one (0: never).
    last: std::sync::atomic::AtomicU64,
    /// Lines held back since then.
    held: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub const EVERY_MS: u64 = 10_000;

    pub const fn new() -> Throttle {
        Throttle {
            last: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the line may be written now, `n` being how many were
    /// held back since the last one; `None` when it is held back.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(crate::clock::now_ms() + 1)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::EVERY_MS;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The tail of a throttled line: how many like it were held back.
pub fn suppressed(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} more like this in the last 10 s not logged)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_line_goes_out_once_per_period_with_the_count_held_back() {
        let throttle = Throttle::new();
        assert_eq!(throttle.allow_at(1), Some(0));
        assert_eq!(throttle.allow_at(2), None);
        assert_eq!(throttle.allow_at(9_999), None);
        assert_eq!(throttle.allow_at(10_001), Some(2));
        assert_eq!(throttle.allow_at(10_002), None);
        assert_eq!(suppressed(0), "");
        assert!(suppressed(2).contains("2 more"));
    }
}
