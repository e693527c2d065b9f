//! Turning outcomes into text: a plain block for `run`, table rows for the
//! matrix.

use crate::bench::{CgroupSample, Report};
use std::fmt::Write;

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn ms(us: u32) -> f64 {
    us as f64 / 1000.0
}

/// A human-readable account of one run.
pub fn text(report: &Report) -> String {
    let o = &report.outcome;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "clients: {} connected in {:.1} s, {} connect errors {:?}",
        o.connected,
        o.connect_time.as_secs_f64(),
        o.connect_errors,
        o.error_kinds
    );
    let _ = writeln!(
        out,
        "server RSS: {:.1} MiB at start, {:.1} MiB connected ({:.2} KiB per client), {} threads",
        o.rss_start_kib as f64 / 1024.0,
        o.rss_connected_kib as f64 / 1024.0,
        o.rss_per_client_kib(),
        o.threads_connected
    );
    let _ = writeln!(
        out,
        "server CPU: idle {:.3} % of a core over {:.1} s; {:.2} % while alerts flow ({:.2} us per delivered message)",
        o.idle_cpu.percent(),
        o.idle_cpu.wall_ns as f64 / 1e9,
        o.alert_cpu.percent(),
        o.cpu_per_delivery_us()
    );
    match o.latency {
        Some(p) => {
            let _ = writeln!(
                out,
                "fan-out latency: min {:.2} ms, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms(p.min),
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.max)
            );
        }
        None => {
            let _ = writeln!(out, "fan-out latency: no receipts");
        }
    }
    let _ = writeln!(
        out,
        "delivery: {}/{} ({:.4}); probe {}/{}; closed by server {}; error replies {:?}",
        o.delivered,
        o.expected,
        o.delivery_ratio(),
        o.probe_delivered,
        o.probe_expected,
        o.closed_by_server,
        o.error_replies
    );
    let cg = |s: &CgroupSample| {
        format!(
            "usage {:.1} MiB (kernel {:.1} MiB), TCP buffers {:.1} MiB",
            mib(s.usage),
            mib(s.kmem),
            mib(s.tcp)
        )
    };
    if let Some(s) = &report.cgroup_connected {
        let _ = writeln!(out, "cgroup when connected: {}", cg(s));
    }
    if let Some(s) = &report.cgroup_peak {
        let _ = writeln!(
            out,
            "cgroup peak: {}; failcnt {}, OOM kills {}",
            cg(s),
            report.cgroup_failcnt,
            report.oom_kills
        );
    }
    if let Some(err) = &o.send_error {
        let _ = writeln!(out, "sending alerts failed: {err}");
    }
    if let Some(died) = &report.died {
        let _ = writeln!(out, "DIED: {died}");
    }
    for warning in report.warnings.iter().take(5) {
        let _ = writeln!(out, "server: {warning}");
    }
    out
}
