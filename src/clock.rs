//! The two clocks the server reads, as milliseconds.

use std::sync::LazyLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on a process-wide monotonic clock: for stamps shared between
/// threads through an atomic (when a client was last heard from, when a log
/// line was last let through), where an `Instant` does not fit.
pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch, for what other machines read: the
/// windows of storm summaries, the `sent` of heartbeats.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
