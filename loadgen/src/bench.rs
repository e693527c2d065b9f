//! A run with its servers: start the instances a setup asks for (local or
//! joined by the Pub/Sub test server, optionally inside a memory cgroup), run
//! the plan against them, stop them, and say what happened to them.

use crate::launch::{self, Cgroup, Process};
use crate::limits;
use crate::scenario::{self, Hook, Outcome, Plan};
use crate::storm::{self, StormOutcome, StormPlan};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Instances to start; more than one needs `pubsub`.
    pub instances: usize,
    pub pubsub: bool,
    /// Run the (single) instance in a cgroup v1 memory group of this many MiB.
    pub cgroup_mib: Option<u64>,
    /// Extra environment for every instance.
    pub env: Vec<(String, String)>,
    /// Servers on CPU 0, the tool on CPU 1.
    pub pin: bool,
    /// The skywatch binary to start; `skywatch` next to this tool when unset.
    pub server_bin: Option<PathBuf>,
    /// Extra arguments for the Pub/Sub test server, e.g.
    /// `--pulls-return-immediately`.
    pub pubsub_args: Vec<String>,
    /// Leave ALERTS_PER_SECOND and ALERT_BURST at the server's defaults (a
    /// storm's people) instead of raising them for the one client that sends.
    pub default_rate_limits: bool,
}

/// Memory of the cgroup at one moment, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupSample {
    pub usage: u64,
    pub kmem: u64,
    pub tcp: u64,
}

/// One run's outcome plus what the servers went through.
#[derive(Debug, Clone, Default)]
pub struct Report<O = Outcome> {
    pub outcome: O,
    /// With a cgroup: memory when everyone was connected, and at the peak.
    pub cgroup_connected: Option<CgroupSample>,
    pub cgroup_peak: Option<CgroupSample>,
    pub cgroup_failcnt: u64,
    pub oom_kills: u64,
    /// Exit status and last log lines of an instance that died during the run.
    pub died: Option<String>,
    pub warnings: Vec<String>,
}

pub const CGROUP_NAME: &str = "skywatch-bench";

/// Whether a v1 memory cgroup can be made here; the reason when not.
pub fn cgroup_available() -> Result<(), String> {
    Cgroup::create(&format!("{CGROUP_NAME}-probe"), 256 << 20).map(drop)
}

pub fn run(setup: &Setup, plan: &Plan) -> Result<Report, String> {
    with_servers(setup, |servers, hook| {
        let plan = Plan {
            endpoints: servers.iter().map(|s| s.addr).collect(),
            pids: servers.iter().map(|s| s.pid).collect(),
            ..plan.clone()
        };
        scenario::run(&plan, hook)
    })
}

/// A storm against the servers `setup` starts.
pub fn storm(setup: &Setup, plan: &StormPlan) -> Result<Report<StormOutcome>, String> {
    with_servers(setup, |servers, hook| {
        let plan = StormPlan {
            endpoints: servers.iter().map(|s| s.addr).collect(),
            pids: servers.iter().map(|s| s.pid).collect(),
            ..plan.clone()
        };
        storm::run(&plan, hook)
    })
}

/// An instance the tool started, as a run sees it.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    pub addr: SocketAddr,
    pub pid: u32,
}

/// Starts the servers `setup` asks for, runs `body` against them, stops
/// them, and reports what they went through along with `body`'s outcome.
pub fn with_servers<O: Default>(
    setup: &Setup,
    body: impl FnOnce(&[Server], Hook<'_>) -> io::Result<O>,
) -> Result<Report<O>, String> {
    let bin = match &setup.server_bin {
        Some(path) if path.exists() => path.clone(),
        Some(path) => return Err(format!("--server-bin {}: no such file", path.display())),
        None => launch::sibling_binary("skywatch")?,
    };
    let cgroup = match setup.cgroup_mib {
        Some(mib) => Some(Cgroup::create(CGROUP_NAME, mib << 20)?),
        None => None,
    };
    // Servers (and the Pub/Sub test server) on CPU 0, the tool on CPU 1; see
    // `limits::pin_to` for why.
    let pin = PinGuard(setup.pin && limits::pin_to(0));
    let pubsub = match setup.pubsub {
        true => Some(launch::start_pubsub_test_server(&setup.pubsub_args)?),
        false => None,
    };
    let mut instances: Vec<Process> = Vec::new();
    for i in 0..setup.instances.max(1) {
        let mut env = setup.env.clone();
        if let Some(pubsub) = &pubsub {
            env.extend([
                ("PUBSUB_EMULATOR_HOST".into(), pubsub.addr.to_string()),
                ("PUBSUB_PROJECT_ID".into(), "skywatch-bench".into()),
                ("FLY_ALLOC_ID".into(), format!("bench-{i}")),
                ("FLY_REGION".into(), format!("r{i}")),
            ]);
        }
        let command =
            launch::skywatch_command(&bin, &env, cgroup.as_ref(), !setup.default_rate_limits);
        let started = Process::start(command);
        match started {
            Ok(process) => instances.push(process),
            Err(err) => {
                stop_all(instances, pubsub);
                return Err(err);
            }
        }
    }
    for instance in &instances {
        if let Err(err) = launch::wait_ready(instance.addr, Duration::from_secs(20)) {
            stop_all(instances, pubsub);
            return Err(err);
        }
    }
    if pin.0 {
        limits::pin_to(1);
    }
    // Let start-up settle (threads spawned, first pulls made) before the
    // start RSS is read.
    std::thread::sleep(Duration::from_millis(500));

    let servers: Vec<Server> = instances
        .iter()
        .map(|p| Server {
            addr: p.addr,
            pid: p.pid,
        })
        .collect();
    let mut report = Report::default();
    let sample = |group: &Cgroup| CgroupSample {
        usage: group.read("memory.usage_in_bytes").unwrap_or(0),
        kmem: group.read("memory.kmem.usage_in_bytes").unwrap_or(0),
        tcp: group.read("memory.kmem.tcp.usage_in_bytes").unwrap_or(0),
    };
    let mut hook = |phase: &str| {
        if let (Some(group), "connected") = (&cgroup, phase) {
            report.cgroup_connected = Some(sample(group));
        }
    };
    let outcome = body(&servers, &mut hook);
    if let Some(group) = &cgroup {
        report.cgroup_peak = Some(CgroupSample {
            usage: group.read("memory.max_usage_in_bytes").unwrap_or(0),
            kmem: group.read("memory.kmem.max_usage_in_bytes").unwrap_or(0),
            tcp: group
                .read("memory.kmem.tcp.max_usage_in_bytes")
                .unwrap_or(0),
        });
        report.cgroup_failcnt = group.read("memory.failcnt").unwrap_or(0);
        report.oom_kills = group
            .read_key("memory.oom_control", "oom_kill")
            .unwrap_or(0);
    }
    for instance in &mut instances {
        if let Some(status) = instance.exit_status() {
            report.died = Some(format!(
                "instance on {} exited ({status}); its last log lines: {}",
                instance.addr,
                instance.log_tail().join(" | ")
            ));
        } else {
            report.warnings.extend(
                instance
                    .log_tail()
                    .into_iter()
                    .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR")),
            );
        }
    }
    stop_all(instances, pubsub);
    drop(cgroup);
    drop(pin);
    report.outcome = outcome.map_err(|err| format!("run failed: {err}"))?;
    Ok(report)
}

fn stop_all(instances: Vec<Process>, pubsub: Option<Process>) {
    for instance in instances {
        instance.stop();
    }
    if let Some(pubsub) = pubsub {
        pubsub.stop();
    }
}

/// Lifts the tool's CPU pin however `run` returns.
struct PinGuard(bool);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0 {
            limits::unpin();
        }
    }
}
