//! What the tool reads about a server process from /proc.

use std::fs;
use std::time::Instant;

/// Resident set size in KiB (VmRSS), or `None` once the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Number of threads of the process.
pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads:")
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// CPU time the process has used, in nanoseconds: the sum of every thread's
/// run time from /proc/PID/task/*/schedstat. /proc/PID/stat counts in clock
/// ticks (10 ms here), far too coarse for "0.1 % of a core"; schedstat is in
/// nanoseconds. Threads that exit take their time with them, so a window is
/// only exact while no thread exits (true of every window the tool measures).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("schedstat")) else {
            continue; // the thread exited while we looked
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// CPU used by a set of processes between two moments.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuWindow {
    pub cpu_ns: u64,
    pub wall_ns: u64,
}

impl CpuWindow {
    /// Share of one core, in percent.
    pub fn percent(&self) -> f64 {
        if self.wall_ns == 0 {
            return 0.0;
        }
        100.0 * self.cpu_ns as f64 / self.wall_ns as f64
    }
}

/// The start of a CPU measurement over several processes.
pub struct CpuMark {
    at: Instant,
    cpu_ns: u64,
}

pub fn cpu_mark(pids: &[u32]) -> CpuMark {
    let cpu_ns = pids.iter().filter_map(|&pid| cpu_ns(pid)).sum();
    CpuMark {
        at: Instant::now(),
        cpu_ns,
    }
}

impl CpuMark {
    pub fn window(&self, pids: &[u32]) -> CpuWindow {
        let now: u64 = pids.iter().filter_map(|&pid| cpu_ns(pid)).sum();
        CpuWindow {
            cpu_ns: now.saturating_sub(self.cpu_ns),
            wall_ns: self.at.elapsed().as_nanos() as u64,
        }
    }
}

/// The machine, for the report: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0));
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores (nproc), {memory_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
