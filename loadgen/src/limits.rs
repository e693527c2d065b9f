//! The tool holds one descriptor per client, thousands of them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Open files the tool allows itself when it may (as root): more than any
/// server it starts, so a ceiling run finds the server's limit, not its own.
const TOOL_OPEN_FILES: u64 = 1 << 16;

/// The hard open-file limit the tool was started with, which the servers it
/// starts get back (see `launch::skywatch_command`).
static SYSTEM_HARD_LIMIT: AtomicU64 = AtomicU64::new(0);

pub fn system_hard_limit() -> u64 {
    SYSTEM_HARD_LIMIT.load(Ordering::Relaxed)
}

/// Raises RLIMIT_NOFILE: the hard limit to [`TOOL_OPEN_FILES`] where allowed,
/// the soft limit to the hard one. Returns the tool's new soft limit.
pub fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        SYSTEM_HARD_LIMIT.store(limit.rlim_max, Ordering::Relaxed);
        for hard in [limit.rlim_max.max(TOOL_OPEN_FILES), limit.rlim_max] {
            let raised = libc::rlimit {
                rlim_cur: hard,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return hard;
            }
        }
    }
    limit.rlim_cur
}

/// Restricts the calling thread, and the threads and processes it starts
/// from now on, to CPU `cpu`. Returns false when that is not possible (fewer
/// CPUs, or the call failed).
///
/// Pinning (`--pin`) keeps the tool's reader off the server's core, which
/// models the target VM (a shared-cpu-1x, one vCPU) and stops socket
/// wake-ups from pulling the reader onto the fan-out's CPU. It is off by
/// default: on a box shared with other work, a server held to one core
/// waits for that core whenever something else runs there (measured: the
/// first receipt 2-4 ms late instead of 0.13 ms), while unpinned the
/// scheduler finds it the idle one.
pub fn pin_to(cpu: usize) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpu >= cores || cores < 2 {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write only into it,
    // and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Lifts a pin: the calling thread may run on every CPU again.
pub fn unpin() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: as in `pin_to`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for cpu in 0..cores {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
