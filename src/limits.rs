//! Process-wide limits the server adjusts once, at start.
//!
//! Every WebSocket client holds one open file (its socket), so the open-file
//! limit caps the number of clients. Most systems start processes with a soft
//! limit of 1,024 and a much higher hard limit; any process may raise its own
//! soft limit up to the hard one, so the server does, and thousands of
//! connections work without touching the system's configuration.

use std::io;

/// The open-file limits before and after [`raise_open_files`].
pub struct OpenFiles {
    pub before: u64,
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_open_files() -> io::Result<OpenFiles> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(OpenFiles {
        before,
        now: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let files = raise_open_files().expect("getrlimit and setrlimit work here");
        assert!(files.now >= files.before);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only into the struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(files.now, limit.rlim_max);
    }
}
