//! skywatch-load: opens N WebSocket clients against Skywatch instances, has
//! one of them send K alerts, and reports per-alert fan-out latency,
//! delivery, connect errors, and the servers' RSS and CPU.
//!
//! `skywatch-load run ...` measures one setup; `skywatch-load storm ...` has a
//! crowd press at once; `skywatch-load matrix` runs the standard set behind
//! `make bench` and writes BENCHMARKS.md's numbers. Run with `--help` for
//! the options.

mod abuse;
mod bench;
mod floor;
mod launch;
mod limits;
mod matrix;
mod procfs;
mod protocol;
mod reader;
mod report;
mod scenario;
mod stats;
mod storm;
mod ws;

use bench::Setup;
use scenario::Plan;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;
use storm::StormPlan;

const USAGE: &str = "\
usage:
  skywatch-load run [options]       measure one setup: one client sends alerts
  skywatch-load storm [options]     a crowd presses at once (see storm options)
  skywatch-load abuse [--server-bin PATH]
                                    one attacker against a bystander: a ping flood
                                    and a sender that reconnects after every burst
  skywatch-load matrix [--write FILE] [--runs N] [--only TEXT]
                                    the standard matrix (make bench); with --write,
                                    replaces the generated part of FILE; --only runs
                                    the rows whose name contains TEXT (e.g. storm),
                                    printing them

run options (defaults in brackets):
  --clients N       measured clients; the first sends the alerts [1000]
  --idle N          further clients held open, not timed [0]
  --alerts K        alerts to send [20]
  --rate R          alerts per second [2]
  --idle-secs S     idle CPU window after connecting [10]
  --settle S        wait after connecting before measuring [2]
  --until-failure   stop connecting at the first failures (find a ceiling)
  --no-busy-poll    let the reader sleep between messages while alerts flow

storm options: C clients, each from its own 127.0.x.y, connect to servers with
their default rate limits; once settled, S of them press once, all at once
  --clients C       clients, spread over the instances [1000]
  --pressers S      how many of them press [all]
  --settle S        wait after connecting, before the storm [2]
  --drain S         most seconds after the first press for every client to
                    account for every press [10]
  --linger S        read on after that, to catch over-counting [1]
  --send-threads N  threads writing the presses, released together [1]
  --no-busy-poll    let the reader sleep while the storm lasts

against running instances (run and storm):
  --url HOST:PORT   an already running instance (repeatable; also ws://HOST:PORT/ws)
  --pid PID         its process, for RSS and CPU (repeatable)
without --url, the tool starts instances itself (from target/release):
  --instances N     instances to start [1]; more than 1 implies --pubsub
  --pubsub          join them through a pubsub-test-server it starts
  --pubsub-arg ARG  an argument for that pubsub-test-server (repeatable), e.g.
                    --pubsub-arg --pulls-return-immediately
  --server-bin PATH the skywatch binary to start [target/release/skywatch]
  --cgroup MIB      run the instance in a cgroup v1 memory group of MIB MiB
  --env NAME=VALUE  extra environment for the instances (repeatable), e.g.
                    --env STORM_ALERTS_PER_SECOND=20
  --pin             pin the servers to CPU 0 and the tool to CPU 1
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let open_files = limits::raise_open_files();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..], open_files),
        Some("storm") => run_storm(&args[1..], open_files),
        Some("abuse") => run_abuse(&args[1..]),
        Some("matrix") => matrix::main(&args[1..]),
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(format!("expected a command\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("skywatch-load: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run_abuse(args: &[String]) -> Result<(), String> {
    let server_bin = match args {
        [] => None,
        [flag, path] if flag == "--server-bin" => Some(path.into()),
        _ => return Err(format!("abuse: expected [--server-bin PATH]\n{USAGE}")),
    };
    let (limited, unlimited, reconnect) = abuse_runs(server_bin)?;
    print!("{}", abuse::text(&limited, &unlimited, &reconnect));
    Ok(())
}

/// The abuse measurements against a fresh server each: the ping flood with
/// the server's control limit, then with it out of reach, then the
/// reconnecting sender with every default limit.
pub fn abuse_runs(
    server_bin: Option<std::path::PathBuf>,
) -> Result<
    (
        abuse::FloodOutcome,
        abuse::FloodOutcome,
        abuse::ReconnectOutcome,
    ),
    String,
> {
    let flood_setup = |extra: &[(&str, &str)]| Setup {
        instances: 1,
        server_bin: server_bin.clone(),
        // The bystander's own alerts, one every 150 ms, never meet a limit.
        env: [("STORM_ALERTS_PER_SECOND", "1000")]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Setup::default()
    };
    let flood = |setup: &Setup| {
        bench::with_servers(setup, |servers, _| abuse::ping_flood(servers[0].addr))
            .map(|report| report.outcome)
    };
    let limited = flood(&flood_setup(&[]))?;
    let unlimited = flood(&flood_setup(&[("CONTROL_PER_SECOND", "1000000000")]))?;
    let reconnect_setup = Setup {
        instances: 1,
        server_bin,
        default_rate_limits: true,
        ..Setup::default()
    };
    let reconnect = bench::with_servers(&reconnect_setup, |servers, _| {
        abuse::reconnecting_sender(servers[0].addr, Duration::from_secs(3))
    })?
    .outcome;
    Ok((limited, unlimited, reconnect))
}

fn run(args: &[String], open_files: u64) -> Result<(), String> {
    let mut plan = Plan {
        endpoints: Vec::new(),
        pids: Vec::new(),
        probe: 1000,
        idle: 0,
        until_failure: false,
        alerts: 20,
        rate: 2.0,
        settle: Duration::from_secs(2),
        idle_window: Duration::from_secs(10),
        drain: Duration::from_secs(5),
        busy_poll: true,
    };
    let mut setup = Setup {
        instances: 1,
        ..Setup::default()
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--clients" => plan.probe = number(flag, &value()?)?,
            "--idle" => plan.idle = number(flag, &value()?)?,
            "--alerts" => plan.alerts = number(flag, &value()?)?,
            "--rate" => plan.rate = number(flag, &value()?)?,
            "--idle-secs" => plan.idle_window = Duration::from_secs_f64(number(flag, &value()?)?),
            "--settle" => plan.settle = Duration::from_secs_f64(number(flag, &value()?)?),
            "--until-failure" => plan.until_failure = true,
            "--no-busy-poll" => plan.busy_poll = false,
            _ => {
                let target = Target {
                    endpoints: &mut plan.endpoints,
                    pids: &mut plan.pids,
                    setup: &mut setup,
                };
                if !target.option(flag, &mut value)? {
                    return Err(format!("unknown option {flag:?}\n{USAGE}"));
                }
            }
        }
    }
    if plan.probe == 0 || plan.alerts == 0 || plan.rate <= 0.0 {
        return Err("--clients, --alerts and --rate must be positive".into());
    }
    setup.pubsub |= setup.instances > 1;
    let wanted = (plan.probe + plan.idle) as u64;
    if wanted + 64 > open_files {
        eprintln!("warning: {wanted} clients but only {open_files} open files allowed");
    }
    eprintln!(
        "machine: {}; load average {}",
        procfs::machine(),
        procfs::load_average()
    );
    let report = if plan.endpoints.is_empty() {
        bench::run(&setup, &plan)?
    } else {
        let mut nothing = |_: &str| {};
        bench::Report {
            outcome: scenario::run(&plan, &mut nothing).map_err(|err| err.to_string())?,
            ..bench::Report::default()
        }
    };
    print!("{}", report::text(&report));
    Ok(())
}

fn run_storm(args: &[String], open_files: u64) -> Result<(), String> {
    let mut plan = StormPlan::default();
    let mut setup = Setup {
        instances: 1,
        default_rate_limits: true,
        ..Setup::default()
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let secs = |text: String| number::<f64>(flag, &text).map(Duration::from_secs_f64);
        match flag.as_str() {
            "--clients" => plan.clients = number(flag, &value()?)?,
            "--pressers" => plan.pressers = Some(number(flag, &value()?)?),
            "--settle" => plan.settle = secs(value()?)?,
            "--drain" => plan.drain = secs(value()?)?,
            "--linger" => plan.linger = secs(value()?)?,
            "--send-threads" => plan.send_threads = number(flag, &value()?)?,
            "--no-busy-poll" => plan.busy_poll = false,
            _ => {
                let target = Target {
                    endpoints: &mut plan.endpoints,
                    pids: &mut plan.pids,
                    setup: &mut setup,
                };
                if !target.option(flag, &mut value)? {
                    return Err(format!("unknown option {flag:?}\n{USAGE}"));
                }
            }
        }
    }
    if plan.clients == 0 || plan.pressers == Some(0) || plan.send_threads == 0 {
        return Err("--clients, --pressers and --send-threads must be positive".into());
    }
    if plan.clients > storm::MAX_SOURCES {
        return Err(format!(
            "--clients: at most {} (one loopback address each)",
            storm::MAX_SOURCES
        ));
    }
    setup.pubsub |= setup.instances > 1;
    // Each presser holds a second descriptor, for the write.
    let wanted = (plan.clients + plan.pressers.unwrap_or(plan.clients)) as u64;
    if wanted + 64 > open_files {
        eprintln!("warning: {wanted} descriptors needed but only {open_files} open files allowed");
    }
    eprintln!(
        "machine: {}; load average {}",
        procfs::machine(),
        procfs::load_average()
    );
    let report = if plan.endpoints.is_empty() {
        bench::storm(&setup, &plan)?
    } else {
        let mut nothing = |_: &str| {};
        bench::Report {
            outcome: storm::run(&plan, &mut nothing).map_err(|err| err.to_string())?,
            ..bench::Report::default()
        }
    };
    print!("{}", report::storm_text(&report));
    eprintln!("load average after: {}", procfs::load_average());
    match report.outcome.bug() {
        Some(bug) => Err(bug),
        None => Ok(()),
    }
}

/// Where a run or storm goes: options both commands take.
struct Target<'a> {
    endpoints: &'a mut Vec<SocketAddr>,
    pids: &'a mut Vec<u32>,
    setup: &'a mut Setup,
}

impl Target<'_> {
    /// Takes `flag` (and its value) if it is one of these options; returns
    /// whether it was.
    fn option(
        self,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        let setup = self.setup;
        match flag {
            "--url" => self.endpoints.push(endpoint(&value()?)?),
            "--pid" => self.pids.push(number(flag, &value()?)?),
            "--instances" => setup.instances = number(flag, &value()?)?,
            "--pubsub" => setup.pubsub = true,
            "--pubsub-arg" => setup.pubsub_args.push(value()?),
            "--server-bin" => setup.server_bin = Some(value()?.into()),
            "--pin" => setup.pin = true,
            "--cgroup" => setup.cgroup_mib = Some(number(flag, &value()?)?),
            "--env" => {
                let pair = value()?;
                let (name, val) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("--env wants NAME=VALUE, not {pair:?}"))?;
                setup.env.push((name.into(), val.into()));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: {text:?} is not a valid number"))
}

/// `HOST:PORT` or `ws://HOST:PORT/ws` (the path is always /ws).
fn endpoint(text: &str) -> Result<SocketAddr, String> {
    let bare = text.trim_start_matches("ws://");
    let host_port = bare.split('/').next().unwrap_or(bare);
    host_port
        .to_socket_addrs()
        .map_err(|err| format!("--url {text:?}: {err}"))?
        .next()
        .ok_or_else(|| format!("--url {text:?}: no address"))
}
