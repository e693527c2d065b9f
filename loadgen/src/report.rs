//! Turning outcomes into text: a plain block for `run`, table rows for the
//! matrix.

use crate::bench::{CgroupSample, Report};
use crate::storm::StormOutcome;
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
    if o.summaries > 0 {
        let _ = writeln!(
            out,
            "storm summaries: {} received, counting {} presses (the server summarized \
             alerts, which then count as undelivered above)",
            o.summaries, o.summarized
        );
    }
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

/// `1,234`: thousands separated, as the report's prose writes numbers.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Error codes and their counts: `rate_limited 3, broker_unavailable 1`.
pub fn codes(counts: &std::collections::BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A human-readable account of one storm.
pub fn storm_text(report: &Report<StormOutcome>) -> String {
    let o = &report.outcome;
    let mut out = String::new();
    let n = |v: usize| thousands(v as u64);
    let _ = writeln!(
        out,
        "storm: {} of {} clients pressed at once, {} instance{}",
        n(o.pressers),
        n(o.connected),
        o.instances,
        if o.instances == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "  connected:     {} of {} in {:.1} s, {}; {} connect errors{}; {} greeted",
        n(o.connected),
        n(o.clients),
        o.connect_time.as_secs_f64(),
        if o.own_addresses {
            "each from its own 127.0.x.y"
        } else {
            "from one address"
        },
        o.connect_errors,
        if o.error_kinds.is_empty() {
            String::new()
        } else {
            format!(" {:?}", o.error_kinds)
        },
        n(o.greetings as usize)
    );
    let _ = writeln!(
        out,
        "  pressing:      {} presses written in {:.2} ms ({} thread{}){}",
        n(o.pressers),
        o.send_time.as_secs_f64() * 1000.0,
        o.send_threads,
        if o.send_threads == 1 { "" } else { "s" },
        if o.send_errors > 0 {
            format!("; {} could not be written", o.send_errors)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "  replies:       {} accepted, refused: {}, {} pressers got no reply",
        n(o.accepted as usize),
        codes(&o.refused),
        n(o.unanswered as usize)
    );
    let _ = writeln!(
        out,
        "  accounted:     {} of {} connected clients accounted for all {} {}; \
         {} disconnected by the server",
        n(o.complete),
        n(o.connected - o.disconnected),
        n(o.target as usize),
        // A server that sends no ACCEPTED: every press it did not refuse.
        if o.accepted == o.target {
            "accepted presses"
        } else {
            "presses not refused"
        },
        o.disconnected
    );
    if o.short > 0 {
        let (least, most) = o.short_accounted.unwrap_or_default();
        let _ = writeln!(
            out,
            "  SHORT:         {} clients never reached {} (they had {}..{})",
            n(o.short),
            n(o.target as usize),
            thousands(least),
            thousands(most)
        );
    }
    if o.over_counted > 0 {
        let _ = writeln!(
            out,
            "  OVER-COUNTED:  {} clients accounted for more than {} presses (up to {}): a bug",
            n(o.over_counted),
            n(o.target as usize),
            thousands(o.most_accounted)
        );
    }
    if o.duplicates > 0 {
        let _ = writeln!(
            out,
            "  DUPLICATES:    {} alerts or summaries arrived twice on the same client",
            thousands(o.duplicates)
        );
    }
    if o.inconsistent_summaries > 0 {
        let _ = writeln!(
            out,
            "  INCONSISTENT:  {} summaries whose regions do not add up to their count",
            thousands(o.inconsistent_summaries)
        );
    }
    match o.completion {
        Some(p) => {
            let _ = writeln!(
                out,
                "  time to all:   {} {:.1} ms after the first press; per client p50 {:.1} ms, \
                 p99 {:.1} ms, first {:.1} ms",
                if o.short == 0 && o.complete > 0 {
                    "every client by"
                } else {
                    "the complete ones by"
                },
                ms(p.max),
                ms(p.p50),
                ms(p.p99),
                ms(p.min)
            );
        }
        None => {
            let _ = writeln!(out, "  time to all:   no client accounted for every press");
        }
    }
    let _ = writeln!(
        out,
        "  per client:    {:.1} alerts ({}..{}) and {:.1} summaries ({}..{}){}",
        o.alerts.mean,
        o.alerts.min,
        o.alerts.max,
        o.summaries.mean,
        o.summaries.min,
        o.summaries.max,
        if o.replayed > 0 {
            format!("; {} replays ignored", o.replayed)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "  bytes:         per client over the {:.2} s storm: max {} B ({:.1} KiB/s), mean {:.0} B ({:.1} KiB/s)",
        o.window.as_secs_f64(),
        thousands(o.bytes.max),
        o.bytes_per_second(o.bytes.max as f64) / 1024.0,
        o.bytes.mean,
        o.bytes_per_second(o.bytes.mean) / 1024.0
    );
    if o.measured_servers == 0 {
        let _ = writeln!(out, "  server:        CPU and RSS not measured (no --pid)");
    } else {
        let _ = writeln!(
            out,
            "  server CPU:    {:.3} core-seconds over the storm ({:.1} % of a core)",
            o.cpu.cpu_ns as f64 / 1e9,
            o.cpu.percent()
        );
        let _ = writeln!(
            out,
            "  server RSS:    {:.1} MiB at start, {:.1} MiB connected ({} threads), {:.1} MiB after the storm",
            o.rss_start_kib as f64 / 1024.0,
            o.rss_connected_kib as f64 / 1024.0,
            o.threads_connected,
            o.rss_after_kib as f64 / 1024.0
        );
    }
    if o.protocol_errors > 0 {
        let _ = writeln!(out, "  protocol errors: {}", o.protocol_errors);
    }
    if let Some(died) = &report.died {
        let _ = writeln!(out, "DIED: {died}");
    }
    for warning in report.warnings.iter().take(5) {
        let _ = writeln!(out, "server: {warning}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4000), "4,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
