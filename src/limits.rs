//! Process-wide limits the server adjusts or derives once, at start.
//!
//! Every WebSocket client holds one open file (its socket), so the open-file
//! limit caps the number of clients. Most systems start processes with a soft
//! limit of 1,024 and a much higher hard limit; any process may raise its own
//! soft limit up to the hard one, so the server does, and thousands of
//! connections work without touching the system's configuration.
//!
//! Memory caps them first, though: each client costs a thread, a socket and
//! their kernel memory, and a server that admits more clients than its memory
//! holds is ended by the OOM killer, every client at once. So when
//! MAX_CONNECTIONS is unset, [`capacity`] derives it from the memory this
//! process may use (its cgroup's limit, or the machine's), the open-file
//! limit and `vm.max_map_count`, and says how in one log line.

use std::fmt;
use std::io;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The whole cost of one WebSocket client in a release build: ~38.5 KiB
/// measured inside a 256 MiB cgroup (~27 KiB of kernel memory, mostly the
/// thread's kernel stack and task_struct, and ~11.5 KiB of RSS, two stack
/// pages and some heap) plus ~4 KiB of send buffer while a broadcast is in
/// flight. See BENCHMARKS.md, "What stops each one" (256 MiB) and "Sizing
/// fly.toml"; re-measure with `make bench` after changing what a connection
/// holds.
pub const RELEASE_PER_CLIENT_BYTES: u64 = 42 * KIB + KIB / 2;

/// The same in a debug build (what `cargo test` runs): unoptimized frames are
/// larger, so each connection thread touches ~3 more stack pages. Measured by
/// tests/capacity.rs's setup in a 256 MiB cgroup: 49 KiB per client (RSS
/// 23.5 KiB of it), plus the 4 KiB in flight.
pub const DEBUG_PER_CLIENT_BYTES: u64 = 53 * KIB;

/// The whole per-client cost of this build.
pub const PER_CLIENT_BYTES: u64 = if cfg!(debug_assertions) {
    DEBUG_PER_CLIENT_BYTES
} else {
    RELEASE_PER_CLIENT_BYTES
};

/// Memory kept for the process itself rather than for clients: ~4 MB at
/// start, the threads of up to [`EXTRA_CONNECTIONS`] page loads and
/// handshakes (~10 MiB at [`PER_CLIENT_BYTES`] each), the recovery ring and
/// queues. The broker may keep more aside ([`Inputs::broker_reserve`]).
pub const RESERVE_BYTES: u64 = 16 * MIB;

/// Bounds of [`backlog_budget`].
pub const BACKLOG_BUDGET_MIN: u64 = 4 * MIB;
pub const BACKLOG_BUDGET_MAX: u64 = 64 * MIB;

/// Connections the server admits beyond MAX_CONNECTIONS that are not (yet)
/// WebSockets (http.rs uses this one): each
/// holds a descriptor and a thread as a client does.
pub const EXTRA_CONNECTIONS: u64 = 256;

/// Descriptors and threads of the process that are no connection: the
/// listener, stdio, the fan-out, the broker's threads and HTTPS connections.
pub const OWN_SHARE: u64 = 64;

/// Descriptors http.rs holds besides each connection's own: a handle on each
/// of up to 128 connections still sending their request.
pub const PENDING_HANDLES: u64 = 128;

/// Memory mappings each connection thread costs: its stack, the stack's
/// guard page, Rust's signal stack and its guard (BENCHMARKS.md: thread
/// creation fails past ~16,380 clients with the default 65,530).
pub const MAPPINGS_PER_THREAD: u64 = 4;

/// Assumed when neither a cgroup limit nor /proc/meminfo can be read: the
/// memory of the VM Skywatch is deployed on (fly.toml).
pub const ASSUMED_MEMORY_BYTES: u64 = 256 * MIB;

/// The total bytes all clients' send backlogs may hold together: 1/16 of the
/// memory, at least 4 MiB and at most 64 MiB. The fan-out enforces it; it is
/// part of what [`capacity`] keeps apart from the clients.
pub fn backlog_budget(memory: u64) -> u64 {
    (memory / 16).clamp(BACKLOG_BUDGET_MIN, BACKLOG_BUDGET_MAX)
}

/// The open-file limits before and after [`raise_open_files`].
pub struct OpenFiles {
    pub before: u64,
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_open_files() -> io::Result<OpenFiles> {
    let limit = open_files_limit()?;
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

fn open_files_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Where the memory figure of a [`Capacity`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// `memory.max` of the process's cgroup (or an ancestor's), cgroup v2.
    CgroupV2,
    /// `memory.limit_in_bytes` of the process's memory cgroup (or an
    /// ancestor's), cgroup v1.
    CgroupV1,
    /// `MemTotal` of /proc/meminfo: no cgroup limit below it.
    MemTotal,
    /// Nothing readable: [`ASSUMED_MEMORY_BYTES`].
    Assumed,
}

impl fmt::Display for MemorySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemorySource::CgroupV2 => "cgroup v2 memory.max",
            MemorySource::CgroupV1 => "cgroup v1 memory.limit_in_bytes",
            MemorySource::MemTotal => "MemTotal",
            MemorySource::Assumed => "assumed: no cgroup limit or MemTotal readable",
        })
    }
}

/// What [`derive`] works from; [`Inputs::read`] fills it from the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// /proc/meminfo's MemTotal, in bytes.
    pub mem_total: Option<u64>,
    /// The tightest memory limit of the process's cgroup and its ancestors;
    /// `None` when there is none.
    pub cgroup_limit: Option<(u64, MemorySource)>,
    /// RLIMIT_NOFILE's soft limit now; `None` when unlimited or unknown.
    pub open_files: Option<u64>,
    /// /proc/sys/vm/max_map_count.
    pub max_map_count: Option<u64>,
    /// [`PER_CLIENT_BYTES`] (a parameter so tests can use either build's).
    pub per_client: u64,
    /// Memory the broker may use at the most, beyond [`RESERVE_BYTES`]
    /// (Pub/Sub: the dedupe's alert ids).
    pub broker_reserve: u64,
}

impl Inputs {
    /// Reads /proc/self/cgroup, the cgroup files under /sys/fs/cgroup,
    /// /proc/meminfo, RLIMIT_NOFILE and /proc/sys/vm/max_map_count. Call it
    /// after [`raise_open_files`]: the open-file cap is the limit as it is.
    pub fn read() -> Inputs {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        Inputs {
            mem_total: read("/proc/meminfo").as_deref().and_then(parse_mem_total),
            cgroup_limit: read("/proc/self/cgroup")
                .and_then(|text| cgroup_limit(&text, CGROUP_ROOT, &read)),
            open_files: open_files_limit()
                .ok()
                .map(|limit| limit.rlim_cur)
                .filter(|&soft| soft != libc::RLIM_INFINITY),
            max_map_count: read("/proc/sys/vm/max_map_count")
                .and_then(|text| text.trim().parse().ok()),
            per_client: PER_CLIENT_BYTES,
            broker_reserve: 0,
        }
    }
}

/// How many WebSocket clients this process can hold, and how that was
/// worked out. Its `Display` is the one-line account for the start log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The default MAX_CONNECTIONS: the smallest of [`Capacity::by_memory`]
    /// and the caps, at least 1.
    pub max_connections: usize,
    /// The memory the process may use, in bytes, and where that came from.
    pub memory: u64,
    pub memory_source: MemorySource,
    /// [`RESERVE_BYTES`] plus the broker's reserve.
    pub reserve: u64,
    /// [`backlog_budget`] of `memory`: what all send backlogs may hold.
    pub backlog_budget: u64,
    /// [`Inputs::per_client`], normally [`PER_CLIENT_BYTES`].
    pub per_client: u64,
    /// Clients that fit in `memory - reserve - backlog_budget`.
    pub by_memory: u64,
    /// Clients the open-file limit leaves room for; `None`: no limit known.
    pub open_files_cap: Option<u64>,
    /// Clients `vm.max_map_count` leaves room for; `None`: unknown.
    pub map_count_cap: Option<u64>,
}

/// Derives MAX_CONNECTIONS for this process on this machine, keeping
/// `broker_reserve` bytes aside for the broker (see [`Inputs::read`] and
/// [`derive`]).
pub fn capacity(broker_reserve: u64) -> Capacity {
    derive(&Inputs {
        broker_reserve,
        ..Inputs::read()
    })
}

/// The arithmetic of [`capacity`], on given inputs:
///
/// - memory: the cgroup limit, never more than MemTotal;
/// - minus [`RESERVE_BYTES`], the broker's reserve and the
///   [`backlog_budget`] of that memory,
///   divided by the per-client cost ([`PER_CLIENT_BYTES`]);
/// - capped by the open-file soft limit and by `vm.max_map_count` /
///   [`MAPPINGS_PER_THREAD`], each less the [`EXTRA_CONNECTIONS`] and the
///   process's [`OWN_SHARE`] of descriptors and threads;
/// - at least 1.
pub fn derive(inputs: &Inputs) -> Capacity {
    let (memory, memory_source) = match (inputs.cgroup_limit, inputs.mem_total) {
        (Some((limit, source)), Some(total)) if limit < total => (limit, source),
        (Some((limit, source)), None) => (limit, source),
        (_, Some(total)) => (total, MemorySource::MemTotal),
        (None, None) => (ASSUMED_MEMORY_BYTES, MemorySource::Assumed),
    };
    let backlog_budget = backlog_budget(memory);
    let per_client = inputs.per_client.max(1);
    let reserve = RESERVE_BYTES + inputs.broker_reserve;
    let by_memory = memory.saturating_sub(reserve + backlog_budget) / per_client;
    let others = EXTRA_CONNECTIONS + OWN_SHARE;
    let open_files_cap = inputs
        .open_files
        .map(|n| n.saturating_sub(others + PENDING_HANDLES));
    let map_count_cap = inputs
        .max_map_count
        .map(|n| (n / MAPPINGS_PER_THREAD).saturating_sub(others));
    let bound = [Some(by_memory), open_files_cap, map_count_cap]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(by_memory)
        .max(1);
    Capacity {
        max_connections: usize::try_from(bound).unwrap_or(usize::MAX),
        memory,
        memory_source,
        reserve,
        backlog_budget,
        per_client,
        by_memory,
        open_files_cap,
        map_count_cap,
    }
}

impl fmt::Display for Capacity {
    /// `MAX_CONNECTIONS 5397: 256 MiB (cgroup v1 memory.limit_in_bytes) -
    /// 16 MiB reserve - 16 MiB backlogs, at 42.5 KiB per client; open files
    /// cap 19680, max_map_count/4 cap 16062`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MAX_CONNECTIONS {}: {} ({}) - {} reserve - {} backlogs, at {} per client; ",
            self.max_connections,
            Bytes(self.memory),
            self.memory_source,
            Bytes(self.reserve),
            Bytes(self.backlog_budget),
            Bytes(self.per_client),
        )?;
        match self.open_files_cap {
            Some(cap) => write!(f, "open files cap {cap}, ")?,
            None => f.write_str("no open-file cap, ")?,
        }
        match self.map_count_cap {
            Some(cap) => write!(f, "max_map_count/{MAPPINGS_PER_THREAD} cap {cap}"),
            None => f.write_str("max_map_count unknown"),
        }
    }
}

/// Bytes in the largest binary unit that keeps them at least 1, with one
/// decimal when it is not a whole number: `256 MiB`, `42.5 KiB`, `23.5 GiB`.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, name) = match self.0 {
            n if n >= GIB => (GIB, "GiB"),
            n if n >= MIB => (MIB, "MiB"),
            n if n >= KIB => (KIB, "KiB"),
            _ => (1, "bytes"),
        };
        let tenths = (self.0 * 10 + unit / 2) / unit;
        if tenths.is_multiple_of(10) {
            write!(f, "{} {name}", tenths / 10)
        } else {
            write!(f, "{}.{} {name}", tenths / 10, tenths % 10)
        }
    }
}

/// Where the cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// v1 writes "no limit" as the largest page-aligned counter,
/// 9223372036854771712 (≈ 2^63); anything from 2^60 (1 EiB) up is no limit.
const V1_UNLIMITED: u64 = 1 << 60;

/// The process's cgroup paths from /proc/self/cgroup: the cgroup v2 one
/// (`0::/path`) and the cgroup v1 memory controller's (`N:memory:/path`, the
/// controller possibly comma-joined with others).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CgroupPaths<'a> {
    pub v2: Option<&'a str>,
    pub v1_memory: Option<&'a str>,
}

pub fn parse_proc_self_cgroup(text: &str) -> CgroupPaths<'_> {
    let mut paths = CgroupPaths::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            paths.v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            paths.v1_memory = Some(path);
        }
    }
    paths
}

/// A cgroup v2 `memory.max`: bytes, or `None` for `max` (no limit) or
/// anything unreadable.
pub fn parse_memory_max(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        n => n.parse().ok(),
    }
}

/// A cgroup v1 `memory.limit_in_bytes`: bytes, or `None` for the huge value
/// that means no limit, or anything unreadable.
pub fn parse_limit_in_bytes(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&n| n < V1_UNLIMITED)
}

/// /proc/meminfo's `MemTotal:  24683656 kB`, in bytes.
pub fn parse_mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(KIB),
        _ => None,
    }
}

/// The tightest memory limit on the process: cgroup v2's `memory.max` of its
/// cgroup and each ancestor up to the mount's root, else cgroup v1's
/// `memory.limit_in_bytes` along the memory controller's path. An ancestor's
/// limit binds its descendants (v2 always, v1 with `use_hierarchy`, the
/// default), and a container or systemd service may be limited one level up.
/// `read` returns a file's contents, `None` when it cannot be read.
pub fn cgroup_limit(
    proc_self_cgroup: &str,
    root: &str,
    read: &dyn Fn(&str) -> Option<String>,
) -> Option<(u64, MemorySource)> {
    let paths = parse_proc_self_cgroup(proc_self_cgroup);
    let v2 = paths.v2.and_then(|path| {
        tightest(&format!("{root}{}", trim_end_slash(path)), root, |dir| {
            read(&format!("{dir}/memory.max"))
                .as_deref()
                .and_then(parse_memory_max)
        })
    });
    if let Some(limit) = v2 {
        return Some((limit, MemorySource::CgroupV2));
    }
    let memory_root = format!("{root}/memory");
    let v1 = paths.v1_memory.and_then(|path| {
        tightest(
            &format!("{memory_root}{}", trim_end_slash(path)),
            &memory_root,
            |dir| {
                read(&format!("{dir}/memory.limit_in_bytes"))
                    .as_deref()
                    .and_then(parse_limit_in_bytes)
            },
        )
    });
    v1.map(|limit| (limit, MemorySource::CgroupV1))
}

fn trim_end_slash(path: &str) -> &str {
    path.trim_end_matches('/')
}

/// The smallest `limit(dir)` for `dir` and each of its parents down to (and
/// including) `root`.
fn tightest(dir: &str, root: &str, limit: impl Fn(&str) -> Option<u64>) -> Option<u64> {
    let mut dir = dir;
    let mut best: Option<u64> = None;
    loop {
        if let Some(n) = limit(dir) {
            best = Some(best.map_or(n, |b| b.min(n)));
        }
        if dir.len() <= root.len() {
            return best;
        }
        dir = match dir.rfind('/') {
            Some(i) if i >= root.len() => &dir[..i],
            _ => root,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let files = raise_open_files().expect("getrlimit and setrlimit work here");
        assert!(files.now >= files.before);
        let limit = open_files_limit().expect("getrlimit works here");
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(files.now, limit.rlim_max);
    }

    fn inputs(mem_total: u64, cgroup: Option<(u64, MemorySource)>) -> Inputs {
        Inputs {
            mem_total: Some(mem_total),
            cgroup_limit: cgroup,
            open_files: Some(1_048_576),
            max_map_count: Some(65_530),
            per_client: RELEASE_PER_CLIENT_BYTES,
            broker_reserve: 0,
        }
    }

    #[test]
    fn a_256_mib_cgroup_holds_what_benchmarks_md_measured_with_a_margin() {
        let c = derive(&inputs(24 * GIB, Some((256 * MIB, MemorySource::CgroupV1))));
        assert_eq!(c.memory, 256 * MIB);
        assert_eq!(c.backlog_budget, 16 * MIB);
        // (256 - 16 - 16) MiB / 42.5 KiB
        assert_eq!(c.by_memory, 5397);
        assert_eq!(c.max_connections, 5397);
        // BENCHMARKS.md: 6,200 clients used 233 MiB; 6,825 met the OOM killer.
        assert!(c.max_connections < 6200);
        assert_eq!(
            c.to_string(),
            "MAX_CONNECTIONS 5397: 256 MiB (cgroup v1 memory.limit_in_bytes) - 16 MiB reserve \
             - 16 MiB backlogs, at 42.5 KiB per client; open files cap 1048128, \
             max_map_count/4 cap 16062"
        );
    }

    #[test]
    fn a_debug_build_counts_its_deeper_stacks() {
        let mut i = inputs(24 * GIB, Some((256 * MIB, MemorySource::CgroupV1)));
        i.per_client = DEBUG_PER_CLIENT_BYTES;
        let c = derive(&i);
        // (256 - 16 - 16) MiB / 53 KiB; a debug server held 5,000 clients in
        // 241 MiB there and met the OOM killer at ~5,325.
        assert_eq!(c.max_connections, 4327);
        assert!(c.to_string().contains("at 53 KiB per client"), "{c}");
    }

    #[test]
    fn without_a_cgroup_limit_memtotal_counts_and_the_mappings_cap_binds() {
        let c = derive(&inputs(24_683_656 * KIB, None));
        assert_eq!(c.memory_source, MemorySource::MemTotal);
        assert_eq!(c.backlog_budget, BACKLOG_BUDGET_MAX);
        assert!(c.by_memory > 500_000);
        assert_eq!(c.map_count_cap, Some(65_530 / 4 - 320));
        assert_eq!(c.max_connections, 16_062);
        assert!(
            c.to_string().starts_with(
                "MAX_CONNECTIONS 16062: 23.5 GiB (MemTotal) - 16 MiB reserve - 64 MiB backlogs"
            ),
            "{c}"
        );
    }

    #[test]
    fn a_cgroup_limit_above_memtotal_is_memtotal() {
        let c = derive(&inputs(512 * MIB, Some((8 * GIB, MemorySource::CgroupV2))));
        assert_eq!(
            (c.memory, c.memory_source),
            (512 * MIB, MemorySource::MemTotal)
        );
        assert_eq!(c.backlog_budget, 32 * MIB);
        assert_eq!(
            c.by_memory,
            (512 - 16 - 32) * MIB / RELEASE_PER_CLIENT_BYTES
        );
    }

    #[test]
    fn the_backlog_budget_is_a_sixteenth_within_its_bounds() {
        assert_eq!(backlog_budget(0), 4 * MIB);
        assert_eq!(backlog_budget(32 * MIB), 4 * MIB);
        assert_eq!(backlog_budget(256 * MIB), 16 * MIB);
        assert_eq!(backlog_budget(512 * MIB), 32 * MIB);
        assert_eq!(backlog_budget(64 * GIB), 64 * MIB);
    }

    #[test]
    fn the_open_file_limit_caps_and_the_bound_is_at_least_one() {
        let mut i = inputs(GIB, None);
        i.open_files = Some(1024);
        let c = derive(&i);
        assert_eq!(c.open_files_cap, Some(1024 - 320 - 128));
        assert_eq!(c.max_connections, 576);

        i.open_files = Some(100);
        assert_eq!(derive(&i).max_connections, 1);

        let tiny = derive(&inputs(20 * MIB, None));
        assert_eq!(tiny.by_memory, 0);
        assert_eq!(tiny.max_connections, 1);
    }

    #[test]
    fn unknown_inputs_fall_back_to_what_is_known() {
        let nothing = Inputs {
            mem_total: None,
            cgroup_limit: None,
            open_files: None,
            max_map_count: None,
            per_client: RELEASE_PER_CLIENT_BYTES,
            broker_reserve: 0,
        };
        let c = derive(&nothing);
        assert_eq!(
            (c.memory, c.memory_source),
            (256 * MIB, MemorySource::Assumed)
        );
        assert_eq!(c.max_connections, 5397);
        assert_eq!(
            c.to_string(),
            "MAX_CONNECTIONS 5397: 256 MiB (assumed: no cgroup limit or MemTotal readable) \
             - 16 MiB reserve - 16 MiB backlogs, at 42.5 KiB per client; no open-file cap, \
             max_map_count unknown"
        );

        let only_cgroup = Inputs {
            cgroup_limit: Some((512 * MIB, MemorySource::CgroupV2)),
            ..nothing
        };
        assert_eq!(derive(&only_cgroup).memory, 512 * MIB);
    }

    #[test]
    fn the_brokers_reserve_comes_off_the_clients_share() {
        let local = derive(&inputs(256 * MIB, None));
        let pubsub = derive(&Inputs {
            broker_reserve: 9 * MIB,
            ..inputs(256 * MIB, None)
        });
        assert_eq!(pubsub.reserve, local.reserve + 9 * MIB);
        assert_eq!(
            pubsub.by_memory,
            local.by_memory - (9 * MIB).div_ceil(RELEASE_PER_CLIENT_BYTES)
        );
        assert!(pubsub.to_string().contains("- 25 MiB reserve"), "{pubsub}");
    }

    #[test]
    fn bytes_are_shown_in_the_largest_whole_unit() {
        assert_eq!(Bytes(256 * MIB).to_string(), "256 MiB");
        assert_eq!(Bytes(RELEASE_PER_CLIENT_BYTES).to_string(), "42.5 KiB");
        assert_eq!(Bytes(DEBUG_PER_CLIENT_BYTES).to_string(), "53 KiB");
        assert_eq!(Bytes(24_683_656 * KIB).to_string(), "23.5 GiB");
        assert_eq!(Bytes(300_000_000).to_string(), "286.1 MiB");
        assert_eq!(Bytes(512).to_string(), "512 bytes");
    }

    #[test]
    fn parses_proc_self_cgroup_in_v1_v2_and_hybrid_layouts() {
        let v1 = "12:pids:/user.slice\n\
                  5:cpu,cpuacct:/user.slice\n\
                  4:memory,hugetlb:/docker/abc\n\
                  1:name=systemd:/user.slice/session-1.scope\n";
        assert_eq!(
            parse_proc_self_cgroup(v1),
            CgroupPaths {
                v2: None,
                v1_memory: Some("/docker/abc"),
            }
        );
        assert_eq!(
            parse_proc_self_cgroup("0::/system.slice/skywatch.service\n"),
            CgroupPaths {
                v2: Some("/system.slice/skywatch.service"),
                v1_memory: None,
            }
        );
        // Hybrid: v1 controllers plus an empty unified hierarchy.
        let hybrid = "4:memory:/process_api/ae27\n3:cpuset:/\n0::/\n";
        assert_eq!(
            parse_proc_self_cgroup(hybrid),
            CgroupPaths {
                v2: Some("/"),
                v1_memory: Some("/process_api/ae27"),
            }
        );
        // A path may hold a colon; a malformed line is skipped.
        assert_eq!(
            parse_proc_self_cgroup("garbage\n4:memory:/a:b\n").v1_memory,
            Some("/a:b")
        );
        assert_eq!(parse_proc_self_cgroup(""), CgroupPaths::default());
    }

    #[test]
    fn parses_limit_files() {
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("268435456\n"), Some(256 * MIB));
        assert_eq!(parse_memory_max(""), None);
        assert_eq!(parse_limit_in_bytes("268435456\n"), Some(256 * MIB));
        assert_eq!(parse_limit_in_bytes("9223372036854771712\n"), None);
        assert_eq!(parse_limit_in_bytes("-1"), None);
        assert_eq!(
            parse_mem_total("MemTotal:       24683656 kB\nMemFree: 1 kB\n"),
            Some(24_683_656 * KIB)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
    }

    /// A file system of the given files and nothing else.
    fn files(list: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |path| map.get(path).cloned()
    }

    #[test]
    fn reads_the_v2_limit_of_the_process_or_an_ancestor() {
        let fs = files(&[
            ("/sys/fs/cgroup/system.slice/memory.max", "max\n"),
            (
                "/sys/fs/cgroup/system.slice/skywatch.service/memory.max",
                "268435456\n",
            ),
        ]);
        assert_eq!(
            cgroup_limit("0::/system.slice/skywatch.service\n", "/sys/fs/cgroup", &fs),
            Some((256 * MIB, MemorySource::CgroupV2))
        );

        let parent_binds = files(&[
            ("/sys/fs/cgroup/machine/memory.max", "134217728\n"),
            ("/sys/fs/cgroup/machine/app/memory.max", "max\n"),
        ]);
        assert_eq!(
            cgroup_limit("0::/machine/app\n", "/sys/fs/cgroup", &parent_binds),
            Some((128 * MIB, MemorySource::CgroupV2))
        );

        // A container's own cgroup is its namespace's root.
        let root = files(&[("/sys/fs/cgroup/memory.max", "536870912\n")]);
        assert_eq!(
            cgroup_limit("0::/\n", "/sys/fs/cgroup", &root),
            Some((512 * MIB, MemorySource::CgroupV2))
        );
    }

    #[test]
    fn reads_the_v1_limit_when_v2_has_none() {
        let fs = files(&[
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/skywatch/memory.limit_in_bytes",
                "268435456\n",
            ),
            // The hybrid layout's v2 root has no memory.max: v1 decides.
        ]);
        let text = "5:cpu,cpuacct:/\n4:memory,hugetlb:/skywatch\n0::/\n";
        assert_eq!(
            cgroup_limit(text, "/sys/fs/cgroup", &fs),
            Some((256 * MIB, MemorySource::CgroupV1))
        );

        // v2 says max everywhere: v1 decides.
        let both = files(&[
            ("/sys/fs/cgroup/memory.max", "max\n"),
            (
                "/sys/fs/cgroup/memory/a/memory.limit_in_bytes",
                "1073741824\n",
            ),
        ]);
        assert_eq!(
            cgroup_limit("4:memory:/a\n0::/\n", "/sys/fs/cgroup", &both),
            Some((GIB, MemorySource::CgroupV1))
        );
    }

    #[test]
    fn no_limit_when_unlimited_or_missing() {
        let unlimited = files(&[
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/a/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]);
        assert_eq!(
            cgroup_limit("4:memory:/a\n", "/sys/fs/cgroup", &unlimited),
            None
        );
        let nothing = files(&[]);
        assert_eq!(
            cgroup_limit("4:memory:/a\n0::/b\n", "/sys/fs/cgroup", &nothing),
            None
        );
        assert_eq!(cgroup_limit("", "/sys/fs/cgroup", &nothing), None);
        // No cgroup line for memory at all (e.g. v1 without the controller).
        let limited = files(&[("/sys/fs/cgroup/memory/memory.limit_in_bytes", "1024\n")]);
        assert_eq!(cgroup_limit("3:cpu:/\n", "/sys/fs/cgroup", &limited), None);
    }

    #[test]
    fn walks_from_the_cgroup_up_to_the_root_only() {
        let seen = std::cell::RefCell::new(Vec::new());
        let limit = tightest("/r/a/b", "/r", |dir| {
            seen.borrow_mut().push(dir.to_string());
            None
        });
        assert_eq!(limit, None);
        assert_eq!(*seen.borrow(), ["/r/a/b", "/r/a", "/r"]);
        let limit = tightest("/r", "/r", |_| Some(7));
        assert_eq!(limit, Some(7));
    }

    #[test]
    fn reads_this_machine() {
        // Whatever the machine, the derivation ends with a usable bound and
        // a line that names it.
        let c = capacity(0);
        assert!(c.max_connections >= 1);
        assert!(
            c.to_string()
                .starts_with(&format!("MAX_CONNECTIONS {}: ", c.max_connections))
        );
        eprintln!("{c}");
    }
}
