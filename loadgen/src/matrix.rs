//! The standard matrix behind `make bench`: every number BENCHMARKS.md keeps
//! in its generated section, measured in one go (about five and a half minutes).
//!
//! 1. local, 1,000 clients (×runs): start RSS, RSS per client, idle CPU,
//!    CPU per delivered message, latency; once more with a 65 s idle window,
//!    which takes in the keepalive's pings (every client is pinged once it
//!    has been silent 30 s, checked every 30 s);
//! 2. local, 4,000 clients (×runs): the latency target;
//! 3. local ceiling: clients until the first failures, 1,000 of them timed;
//! 4. 256 MiB cgroup: 1,000 probe clients plus up to 7,000 idle ones, then,
//!    if the group ran out first, 90 % of what it held (skipped where cgroup
//!    v1's memory controller is not writable);
//! 5. three instances through the Pub/Sub test server, 1,000 clients
//!    (×runs): the broker path's added latency;
//! 6. one instance through a Pub/Sub test server whose empty pulls answer at
//!    once (`--pulls-return-immediately`, like some emulators), 1,000 clients
//!    (×runs): what busy pulling does to the latency;
//! 7. storms (see `storm.rs`): one instance, 4,000 clients all pressing;
//!    one instance, 2,000 clients of which 500 press; three instances
//!    through the Pub/Sub test server, 1,000 clients each, all pressing;
//! 8. the kernel's floor for one send per client per alert (see `floor.rs`).
//!
//! Rows 6 and 7 need a server and test server that know storms and
//! `--pulls-return-immediately`; where a row cannot run, the section says
//! why instead of stopping the matrix.

use crate::bench::{self, Report, Setup};
use crate::floor;
use crate::procfs;
use crate::report::{ms, thousands};
use crate::scenario::{Outcome, Plan};
use crate::stats::median;
use crate::storm::{StormOutcome, StormPlan};
use std::fmt::Write as _;
use std::fs;
use std::time::{Duration, Instant};

pub const BEGIN: &str =
    "<!-- skywatch-load matrix: begin (generated; edits here are overwritten) -->";
pub const END: &str = "<!-- skywatch-load matrix: end -->";

const CGROUP_MIB: u64 = 256;

pub fn main(args: &[String]) -> Result<(), String> {
    let mut write = None;
    let mut runs = 3;
    let mut only: Option<String> = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--write", Some(path)) => write = Some(path.clone()),
            ("--only", Some(text)) => only = Some(text.to_lowercase()),
            ("--runs", Some(n)) => {
                runs = n
                    .parse()
                    .map_err(|_| format!("--runs: {n:?} is not a number"))?
            }
            _ => return Err(format!("matrix: unexpected argument {flag:?}")),
        }
    }
    if only.is_some() && write.is_some() {
        return Err("matrix: --only is for trying rows out; it cannot --write".into());
    }
    let started = Instant::now();
    let load_before = procfs::load_average();
    let command = std::iter::once("skywatch-load".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");

    let local = Setup {
        instances: 1,
        ..Setup::default()
    };
    let plan = |probe: usize, idle_window: u64| Plan {
        endpoints: Vec::new(),
        pids: Vec::new(),
        probe,
        idle: 0,
        until_failure: false,
        alerts: 10,
        rate: 2.0,
        settle: Duration::from_secs(2),
        idle_window: Duration::from_secs(idle_window),
        drain: Duration::from_secs(5),
        busy_poll: true,
    };

    // Every row, in order; --only runs those whose name contains its text.
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|text| name.to_lowercase().contains(text.as_str()))
    };
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let ceiling_plan = Plan {
        idle: 60_000,
        until_failure: true,
        ..plan(1000, 1)
    };
    let pubsub = Setup {
        instances: 3,
        pubsub: true,
        ..Setup::default()
    };
    let immediate = Setup {
        instances: 1,
        pubsub: true,
        pubsub_args: vec!["--pulls-return-immediately".into()],
        ..Setup::default()
    };
    let table: [(&'static str, usize, &Setup, Plan); 6] = [
        ("local, 1,000 clients", runs, &local, plan(1000, 10)),
        (
            "local, 1,000 clients, 65 s idle (keepalive included)",
            1,
            &local,
            plan(1000, 65),
        ),
        ("local, 4,000 clients", runs, &local, plan(4000, 3)),
        ("local, ceiling", 1, &local, ceiling_plan),
        (
            "Pub/Sub test server, 3 instances, 1,000 clients",
            runs,
            &pubsub,
            plan(1000, 2),
        ),
        (IMMEDIATE_PULLS, runs, &immediate, plan(1000, 2)),
    ];
    for (name, runs, setup, plan) in table {
        if !wanted(name) {
            continue;
        }
        match repeat(name, runs, setup, &plan) {
            Ok(row) => rows.push(row),
            // Newer than the rest: a test server without the option (or
            // another branch's) leaves the row out, not the matrix.
            Err(why) if name == IMMEDIATE_PULLS => skipped.push(format!("{name}: {why}")),
            Err(why) => return Err(why),
        }
    }

    let storms = storm_rows(runs, &wanted, &mut skipped);
    let abuse = if wanted("under abuse") {
        eprintln!("under abuse: ping flood, twice, then a reconnecting sender");
        Some(crate::abuse_runs(None)?)
    } else {
        None
    };

    let cgroup = match bench::cgroup_available() {
        _ if !wanted("256 MiB cgroup") => None,
        Ok(()) => Some(cgroup_runs(&plan(1000, 1))?),
        Err(why) => {
            eprintln!("cgroup runs skipped: {why}");
            None
        }
    };
    let floor_us = if wanted("kernel floor") {
        eprintln!("kernel floor: 4,000 sockets");
        Some(floor::measure(4000, 10).map_err(|err| format!("floor: {err}"))?)
    } else {
        None
    };

    let markdown = render(&Rendering {
        rows: &rows,
        storms: &storms,
        abuse: abuse.as_ref(),
        skipped: &skipped,
        cgroup: cgroup.as_ref(),
        floor_us,
        partial: only.is_some(),
        command: &command,
        load_before: &load_before,
        elapsed: started.elapsed(),
    });
    match write {
        Some(path) => splice(&path, &markdown)?,
        None => print!("{markdown}"),
    }
    Ok(())
}

/// The row through a test server whose empty pulls answer at once.
const IMMEDIATE_PULLS: &str =
    "Pub/Sub test server, pulls return at once, 1 instance, 1,000 clients";

/// A storm row: one setup, run a few times.
struct StormRow {
    name: &'static str,
    reports: Vec<Report<StormOutcome>>,
}

impl StormRow {
    fn outcomes(&self) -> impl Iterator<Item = &StormOutcome> {
        self.reports.iter().map(|r| &r.outcome)
    }

    fn median_of(&self, f: impl Fn(&StormOutcome) -> f64) -> f64 {
        median(&self.outcomes().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    }

    fn worst(&self, f: impl Fn(&StormOutcome) -> u64) -> u64 {
        self.outcomes().map(f).max().unwrap_or(0)
    }

    fn completion(&self, f: impl Fn(&crate::stats::Percentiles) -> u32) -> String {
        // A run where some client never got every press has no "every
        // client by" time: the row says so rather than take the others'.
        if self.worst(|o| o.short as u64) > 0 {
            return "never".into();
        }
        let values: Vec<f64> = self
            .outcomes()
            .filter_map(|o| o.completion.as_ref().map(|p| ms(f(p))))
            .collect();
        match median(&values) {
            Some(v) => format!("{v:.1} ms"),
            None => "never".into(),
        }
    }
}

/// The storms of issue 7's targets, at the server's default storm settings.
fn storm_rows(
    runs: usize,
    wanted: &dyn Fn(&str) -> bool,
    skipped: &mut Vec<String>,
) -> Vec<StormRow> {
    let one = Setup {
        instances: 1,
        default_rate_limits: true,
        ..Setup::default()
    };
    let three = Setup {
        instances: 3,
        pubsub: true,
        ..one.clone()
    };
    // A storm the server has not summed up within 5 s has failed already;
    // the default 10 s would only make the matrix longer.
    let storm = |clients: usize, pressers: usize| StormPlan {
        clients,
        pressers: Some(pressers),
        drain: Duration::from_secs(5),
        ..StormPlan::default()
    };
    let setups: [(&'static str, &Setup, StormPlan); 3] = [
        (
            "1 instance, 4,000 clients, all press",
            &one,
            storm(4000, 4000),
        ),
        (
            "1 instance, 2,000 clients, 500 press",
            &one,
            storm(2000, 500),
        ),
        (
            "Pub/Sub test server, 3 instances, 1,000 clients each, all press",
            &three,
            storm(3000, 3000),
        ),
    ];
    let mut rows = Vec::new();
    for (name, setup, plan) in setups {
        if !wanted(&format!("storm, {name}")) {
            continue;
        }
        let mut reports = Vec::new();
        for run in 1..=runs.max(1) {
            eprintln!("storm, {name}: run {run} of {runs}");
            match bench::storm(setup, &plan) {
                Ok(report) => {
                    eprint!("{}", crate::report::storm_text(&report));
                    reports.push(report);
                }
                Err(why) => {
                    skipped.push(format!("storm, {name}: {why}"));
                    break;
                }
            }
        }
        if !reports.is_empty() {
            rows.push(StormRow { name, reports });
        }
    }
    rows
}

/// A row of the matrix: one setup, run a few times.
struct Row {
    name: &'static str,
    reports: Vec<Report>,
}

impl Row {
    fn outcomes(&self) -> impl Iterator<Item = &Outcome> {
        self.reports.iter().map(|r| &r.outcome)
    }

    fn median_of(&self, f: impl Fn(&Outcome) -> f64) -> f64 {
        median(&self.outcomes().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    }

    fn latency(&self, f: impl Fn(&crate::stats::Percentiles) -> u32) -> f64 {
        let values: Vec<f64> = self
            .outcomes()
            .filter_map(|o| o.latency.as_ref().map(|p| ms(f(p))))
            .collect();
        median(&values).unwrap_or(f64::NAN)
    }

    /// The worst delivery ratio of the runs.
    fn delivery(&self) -> f64 {
        self.outcomes()
            .map(Outcome::delivery_ratio)
            .fold(1.0, f64::min)
    }
}

fn repeat(name: &'static str, runs: usize, setup: &Setup, plan: &Plan) -> Result<Row, String> {
    let mut reports = Vec::new();
    for run in 1..=runs.max(1) {
        eprintln!("{name}: run {run} of {runs}");
        let report = bench::run(setup, plan)?;
        eprint!("{}", crate::report::text(&report));
        reports.push(report);
    }
    Ok(Row { name, reports })
}

/// The capacity runs inside the 256 MiB group.
struct CgroupRuns {
    /// 1,000 probe clients and up to 7,000 idle ones, stopping at failures.
    target: Report,
    /// When `target` did not hold: 90 % of what it held, measured.
    held: Option<Report>,
}

fn cgroup_runs(plan: &crate::scenario::Plan) -> Result<CgroupRuns, String> {
    let setup = Setup {
        instances: 1,
        cgroup_mib: Some(CGROUP_MIB),
        ..Setup::default()
    };
    let target_plan = Plan {
        idle: 7000,
        until_failure: true,
        ..plan.clone()
    };
    eprintln!("cgroup: 1,000 probe + 7,000 idle clients in {CGROUP_MIB} MiB");
    let target = bench::run(&setup, &target_plan)?;
    eprint!("{}", crate::report::text(&target));
    let held_all = target.died.is_none() && target.outcome.delivery_ratio() >= 1.0;
    let held = if held_all {
        None
    } else {
        // What the group held when it gave out, less a margin, in hundreds.
        let idle = (target.outcome.connected.saturating_sub(plan.probe) * 9 / 10) / 100 * 100;
        let held_plan = Plan {
            idle,
            ..plan.clone()
        };
        eprintln!("cgroup: 1,000 probe + {idle} idle clients");
        let report = bench::run(&setup, &held_plan)?;
        eprint!("{}", crate::report::text(&report));
        Some(report)
    };
    Ok(CgroupRuns { target, held })
}

struct Rendering<'a> {
    rows: &'a [Row],
    storms: &'a [StormRow],
    abuse: Option<&'a AbuseRuns>,
    /// Rows that could not run, and why.
    skipped: &'a [String],
    cgroup: Option<&'a CgroupRuns>,
    floor_us: Option<f64>,
    /// Only some rows ran (`--only`).
    partial: bool,
    command: &'a str,
    load_before: &'a str,
    elapsed: Duration,
}

fn render(r: &Rendering<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{BEGIN}");
    let _ = writeln!(out, "### Latest `make bench`\n");
    let _ = writeln!(out, "- Machine: {}", procfs::machine());
    let _ = writeln!(out, "- Commit: {}", commit());
    let _ = writeln!(out, "- Command: `{}`", r.command);
    let _ = writeln!(
        out,
        "- Date: {}; took {} s; 1-minute load average {} before, {} after",
        date(),
        r.elapsed.as_secs(),
        r.load_before,
        procfs::load_average()
    );
    let _ = writeln!(
        out,
        "- Rows with several runs show the median of the runs for each column \
         (delivery: the worst run)\n"
    );
    if !r.rows.is_empty() {
        let _ = writeln!(
            out,
            "| setup | runs | clients | RSS start | RSS connected | KiB/client | idle CPU | CPU, alerts | µs/delivery | min | p50 | p90 | p99 | max | delivered | connect errors |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for row in r.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.1} MiB | {:.1} MiB | {:.2} | {:.3} % | {:.2} % | {:.2} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.4} | {:.0} |",
                row.name,
                row.reports.len(),
                row.median_of(|o| o.connected as f64),
                row.median_of(|o| o.rss_start_kib as f64) / 1024.0,
                row.median_of(|o| o.rss_connected_kib as f64) / 1024.0,
                row.median_of(Outcome::rss_per_client_kib),
                row.median_of(|o| o.idle_cpu.percent()),
                row.median_of(|o| o.alert_cpu.percent()),
                row.median_of(Outcome::cpu_per_delivery_us),
                row.latency(|p| p.min),
                row.latency(|p| p.p50),
                row.latency(|p| p.p90),
                row.latency(|p| p.p99),
                row.latency(|p| p.max),
                row.delivery(),
                row.median_of(|o| o.connect_errors as f64),
            );
        }
    }
    let _ = writeln!(out);

    let ceiling = r.rows.iter().find(|row| row.name == "local, ceiling");
    if let Some(report) = ceiling.and_then(|row| row.reports.first()) {
        let o = &report.outcome;
        let mut seen = Vec::new();
        for warning in &report.warnings {
            if !seen.contains(warning) {
                seen.push(warning.clone());
            }
        }
        let _ = writeln!(
            out,
            "- Ceiling: {} clients connected, {} server threads; then {}; the server said: {}",
            o.connected,
            o.threads_connected,
            describe_errors(o),
            if seen.is_empty() {
                "nothing".to_string()
            } else {
                seen.iter()
                    .map(|w| format!("`{w}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    let local = r.rows.iter().find(|row| row.name == "local, 1,000 clients");
    let pubsub = r
        .rows
        .iter()
        .find(|row| row.name == "Pub/Sub test server, 3 instances, 1,000 clients");
    if let (Some(local), Some(pubsub)) = (local, pubsub) {
        let _ = writeln!(
            out,
            "- Broker path (Pub/Sub test server, 3 instances, against local with as many clients): \
             {:+.2} ms min, {:+.2} ms p50, {:+.2} ms p99.",
            pubsub.latency(|p| p.min) - local.latency(|p| p.min),
            pubsub.latency(|p| p.p50) - local.latency(|p| p.p50),
            pubsub.latency(|p| p.p99) - local.latency(|p| p.p99),
        );
    }
    let immediate = r.rows.iter().find(|row| row.name == IMMEDIATE_PULLS);
    if let (Some(local), Some(immediate)) = (local, immediate) {
        let _ = writeln!(
            out,
            "- Pulls that return at once (Pub/Sub test server `--pulls-return-immediately`, \
             1 instance, against local with as many clients): {:+.2} ms min, {:+.2} ms p50, \
             {:+.2} ms p99.",
            immediate.latency(|p| p.min) - local.latency(|p| p.min),
            immediate.latency(|p| p.p50) - local.latency(|p| p.p50),
            immediate.latency(|p| p.p99) - local.latency(|p| p.p99),
        );
    }
    if let Some(floor_us) = r.floor_us {
        let _ = writeln!(
            out,
            "- Kernel floor: {floor_us:.2} µs of CPU per `send` of an alert-sized frame to one of \
             4,000 loopback sockets watched by epoll, one thread, no server."
        );
    }
    match r.cgroup {
        None if r.partial => {}
        None => {
            let _ = writeln!(
                out,
                "- {CGROUP_MIB} MiB cgroup: skipped, cgroup v1's memory controller is not writable here."
            );
        }
        Some(runs) => {
            let _ = writeln!(
                out,
                "- {CGROUP_MIB} MiB cgroup, 1,000 probe clients plus up to 7,000 idle: {}",
                cgroup_line(&runs.target)
            );
            if let Some(held) = &runs.held {
                let _ = writeln!(
                    out,
                    "- {CGROUP_MIB} MiB cgroup, with a margin: {}",
                    cgroup_line(held)
                );
            }
        }
    }
    render_storms(&mut out, r.storms);
    if let Some(abuse) = r.abuse {
        render_abuse(&mut out, abuse);
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(out);
        for why in r.skipped {
            let _ = writeln!(out, "- Not run: {}", why.replace('\n', " "));
        }
    }
    let _ = writeln!(out, "\n{END}");
    out
}

type AbuseRuns = (
    crate::abuse::FloodOutcome,
    crate::abuse::FloodOutcome,
    crate::abuse::ReconnectOutcome,
);

fn render_abuse(out: &mut String, (limited, unlimited, reconnect): &AbuseRuns) {
    let _ = writeln!(out, "\n#### Under abuse\n");
    let _ = writeln!(
        out,
        "A bystander times its own alerts (one every 150 ms) alone, then while one \
         attacker on another address floods pings, reads its pongs and reconnects \
         whenever it is closed (`skywatch-load abuse`).\n"
    );
    let _ = writeln!(
        out,
        "| attack | bystander round trip alone, p50 / p90 / max | during the attack | attacker |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    let ms = crate::abuse::round_trips_ms;
    for (name, flood) in [
        ("ping flood, default limits", limited),
        (
            "ping flood, CONTROL_PER_SECOND out of reach (the fan-out's turns alone)",
            unlimited,
        ),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | closed {} times |",
            ms(&flood.quiet),
            ms(&flood.flooded),
            flood.closed
        );
    }
    let _ = writeln!(
        out,
        "\n| attack | alerts accepted from the one address |\n|---|---|\n\
         | reconnect, send 5, repeat, for {:.0} s (default limits) | {:.1} a second ({} accepted, {} refused, {} connections) |",
        reconnect.seconds,
        reconnect.accepted_per_second(),
        reconnect.accepted,
        reconnect.refused,
        reconnect.connections
    );
}

fn render_storms(out: &mut String, rows: &[StormRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n#### Storms\n");
    let _ = writeln!(
        out,
        "Clients connect each from its own 127.0.x.y to servers with their default \
         limits (ALERTS_PER_SECOND 1, ALERT_BURST 5, STORM_ALERTS_PER_SECOND 10, \
         STORM_SUMMARY_MS 200); once settled, the pressers press once each, all \
         written in one loop. A client accounts for a press when it gets its alert \
         or a summary counting it; \"every client by\" is from the first press \
         written until the last client had accounted for every accepted press, p50 \
         and p99 over the clients. CPU is the servers' over that window; bytes are \
         what a client read in it. Medians of the runs; refused, disconnected, short \
         and over-counted: the worst run.\n"
    );
    let _ = writeln!(
        out,
        "| setup | runs | clients | pressers | written in | accepted | refused | disconnected | every client by | p50 | p99 | short | over-counted | alerts + summaries per client | server CPU | bytes/s per client, max / mean | RSS connected | RSS after |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        let refused = row.worst(|o| o.refused.values().sum());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} ms | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} + {:.1} | {:.3} core-s | {:.0} / {:.0} B/s | {:.1} MiB | {:.1} MiB |",
            row.name,
            row.reports.len(),
            thousands(row.median_of(|o| o.connected as f64) as u64),
            thousands(row.median_of(|o| o.pressers as f64) as u64),
            row.median_of(|o| o.send_time.as_secs_f64() * 1000.0),
            thousands(row.median_of(|o| o.accepted as f64) as u64),
            if refused == 0 {
                "0".to_string()
            } else {
                let codes = row
                    .reports
                    .iter()
                    .map(|r| crate::report::codes(&r.outcome.refused))
                    .max_by_key(String::len)
                    .unwrap_or_default();
                format!("{} ({codes})", thousands(refused))
            },
            row.worst(|o| o.disconnected as u64),
            row.completion(|p| p.max),
            row.completion(|p| p.p50),
            row.completion(|p| p.p99),
            row.worst(|o| o.short as u64),
            match row.worst(|o| o.over_counted as u64) {
                0 => "0".to_string(),
                n => format!("**{n} (bug)**"),
            },
            row.median_of(|o| o.alerts.mean),
            row.median_of(|o| o.summaries.mean),
            row.median_of(|o| o.cpu.cpu_ns as f64 / 1e9),
            row.median_of(|o| o.bytes_per_second(o.bytes.max as f64)),
            row.median_of(|o| o.bytes_per_second(o.bytes.mean)),
            row.median_of(|o| o.rss_connected_kib as f64) / 1024.0,
            row.median_of(|o| o.rss_after_kib as f64) / 1024.0,
        );
    }
    let _ = writeln!(out);
    for row in rows {
        let _ = writeln!(
            out,
            "- {}: {}",
            row.name,
            row.reports
                .iter()
                .map(storm_note)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

/// One storm run in a few words, for the notes under the table.
fn storm_note(report: &Report<StormOutcome>) -> String {
    let o = &report.outcome;
    let mut note = format!(
        "{} accepted, {} unanswered, every client by {}, {:.3} core-s",
        thousands(o.accepted),
        thousands(o.unanswered),
        match (o.short, o.completion) {
            (0, Some(p)) => format!("{:.1} ms", ms(p.max)),
            _ => format!("never ({} short)", thousands(o.short as u64)),
        },
        o.cpu.cpu_ns as f64 / 1e9
    );
    if o.over_counted > 0 {
        let _ = write!(
            note,
            ", OVER-COUNTED on {} clients (up to {})",
            o.over_counted, o.most_accounted
        );
    }
    if o.duplicates > 0 {
        let _ = write!(note, ", {} duplicate ids", o.duplicates);
    }
    if let Some(died) = &report.died {
        let _ = write!(note, ", died: {died}");
    }
    note
}

fn describe_errors(o: &Outcome) -> String {
    if o.error_kinds.is_empty() {
        return "no failures".into();
    }
    o.error_kinds
        .iter()
        .map(|(kind, n)| format!("{n}× \"{kind}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cgroup_line(report: &Report) -> String {
    let o = &report.outcome;
    let mib = crate::report::mib;
    let mut line = format!(
        "{} connected ({} idle); probe delivery {}/{}, ",
        o.connected,
        o.connected.saturating_sub(1000),
        o.probe_delivered,
        o.probe_expected
    );
    match o.latency {
        Some(p) => {
            let _ = write!(line, "p50 {:.1} ms, p99 {:.1} ms", ms(p.p50), ms(p.p99));
        }
        None => line.push_str("no receipts"),
    }
    if let (Some(s), None) = (&report.cgroup_connected, &report.died) {
        let per = |bytes: u64| bytes as f64 / 1024.0 / o.connected.max(1) as f64;
        let _ = write!(
            line,
            "; connected: {:.1} MiB used ({:.1} KiB per client), of which kernel {:.1} MiB ({:.1} KiB per client)",
            mib(s.usage),
            per(s.usage),
            mib(s.kmem),
            per(s.kmem)
        );
    }
    if let Some(s) = &report.cgroup_peak {
        let _ = write!(
            line,
            "; peak {:.1} MiB, TCP buffers (counted apart in cgroup v1) peak {:.1} MiB; {} OOM kill(s)",
            mib(s.usage),
            mib(s.tcp),
            report.oom_kills
        );
    }
    if report.died.is_some() {
        line.push_str("; the server was killed while clients connected");
    }
    if o.connect_errors > 0 {
        let _ = write!(line, "; failures: {}", describe_errors(o));
    }
    line
}

/// `git rev-parse --short HEAD`, plus "+dirty" when the tree has changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    match git(&["status", "--porcelain"]) {
        Some(status) if !status.is_empty() => format!("{head}+dirty"),
        _ => head,
    }
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Replaces the generated part of `path` (between [`BEGIN`] and [`END`]), or
/// appends one when the file has none.
fn splice(path: &str, generated: &str) -> Result<(), String> {
    let old = fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            let after = end + END.len();
            let after = after + usize::from(old[after..].starts_with('\n'));
            format!("{}{generated}{}", &old[..begin], &old[after..])
        }
        _ => format!("{old}\n{generated}"),
    };
    fs::write(path, new).map_err(|err| format!("cannot write {path}: {err}"))?;
    eprintln!("wrote {path}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    fn columns(line: &str) -> usize {
        line.matches('|').count()
    }

    #[test]
    fn storm_rows_have_as_many_columns_as_their_header() {
        let outcome = StormOutcome {
            connected: 4000,
            pressers: 4000,
            accepted: 3990,
            refused: [("rate_limited".to_string(), 10)].into(),
            target: 3990,
            complete: 4000,
            completion: Some(Percentiles {
                min: 200_000,
                p50: 210_000,
                p90: 220_000,
                p99: 230_000,
                max: 240_000,
            }),
            over_counted: 2,
            window: Duration::from_millis(250),
            ..StormOutcome::default()
        };
        let rows = [StormRow {
            name: "a storm",
            reports: vec![Report {
                outcome,
                ..Report::default()
            }],
        }];
        let mut out = String::new();
        render_storms(&mut out, &rows);
        let table: Vec<&str> = out.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(table.len(), 3, "{out}");
        assert!(
            table.iter().all(|l| columns(l) == columns(table[0])),
            "{out}"
        );
        assert!(out.contains("| 10 (rate_limited 10) |"), "{out}");
        assert!(out.contains("| 240.0 ms | 210.0 ms | 230.0 ms |"), "{out}");
        assert!(out.contains("**2 (bug)**"), "{out}");
    }

    #[test]
    fn a_short_client_leaves_no_completion_time() {
        let outcome = StormOutcome {
            short: 3,
            completion: Some(Percentiles::default()),
            ..StormOutcome::default()
        };
        let row = StormRow {
            name: "short",
            reports: vec![Report {
                outcome,
                ..Report::default()
            }],
        };
        assert_eq!(row.completion(|p| p.max), "never");
    }
}
