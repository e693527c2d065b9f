//! Prometheus metrics, served as text on `GET /metrics`.
//!
//! The counters are process-wide statics of atomics: any thread bumps one
//! with a single relaxed add, nothing is locked, and nothing has to be passed
//! around. `render` reads them all into the text exposition format
//! (https://prometheus.io/docs/instrumenting/exposition_formats/), which is
//! simple enough that a client library would add more than it saves.

use crate::message::RejectionCode;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Every metric of this process.
pub static METRICS: Metrics = Metrics::new();

pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Gauge(AtomicI64);

impl Gauge {
    const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds: from a fast local call to
/// a long poll that Pub/Sub held for its full 90 s.
const SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 100.0,
];

/// Upper bounds of the frames-per-batch buckets.
const FRAMES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// A histogram with fixed buckets. Each observation is counted in the first
/// bucket that holds it; `render` makes the counts cumulative, as Prometheus
/// wants them.
pub struct Histogram<const N: usize> {
    bounds: [f64; N],
    buckets: [AtomicU64; N],
    /// Observations above the last bound (the `+Inf` bucket's own share).
    over: AtomicU64,
    /// The sum of observations, in millionths.
    sum_micros: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    const fn new(bounds: [f64; N]) -> Histogram<N> {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; N],
            over: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe_value(&self, value: f64) {
        match self.bounds.iter().position(|bound| value <= *bound) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        // `as` saturates: an absurd value cannot wrap the sum.
        let micros = (value * 1e6).round() as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records a duration, in seconds.
    pub fn observe(&self, elapsed: Duration) {
        self.observe_value(elapsed.as_secs_f64());
    }

    /// Records a count.
    pub fn observe_count(&self, n: usize) {
        self.observe_value(n as f64);
    }
}

/// Why a connection was refused or dropped before it became a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// MAX_CONNECTIONS WebSockets already (503).
    ServerFull,
    /// Its address already has ADDRESS_MAX_CONNECTIONS WebSockets (429).
    AddressConnections,
    /// The table of addresses is full of live entries (503).
    AddressTableFull,
    /// Every connection slot is taken, at accept (closed).
    ConnectionLimit,
    /// The oldest of too many connections that had not sent a request.
    PendingEvicted,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::ServerFull,
        Refusal::AddressConnections,
        Refusal::AddressTableFull,
        Refusal::ConnectionLimit,
        Refusal::PendingEvicted,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::AddressConnections => "address_connections",
            Refusal::AddressTableFull => "address_table_full",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::PendingEvicted => "pending_evicted",
        }
    }
}

/// Why alerts accepted from clients were never published (Pub/Sub only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpublished {
    /// Older than PUBSUB_PUBLISH_TIMEOUT: history, not news.
    Expired,
    /// Pub/Sub called the request invalid (INVALID_ARGUMENT): a bug here.
    Invalid,
    /// Still unpublished at the end of the shutdown's time.
    Shutdown,
}

impl Unpublished {
    const ALL: [Unpublished; 3] = [
        Unpublished::Expired,
        Unpublished::Invalid,
        Unpublished::Shutdown,
    ];

    fn label(self) -> &'static str {
        match self {
            Unpublished::Expired => "expired",
            Unpublished::Invalid => "invalid",
            Unpublished::Shutdown => "shutdown",
        }
    }
}

pub struct Metrics {
    pub connected_clients: Gauge,
    /// Connections refused, by [`Refusal`] (in `Refusal::ALL` order).
    refusals: [Counter; Refusal::ALL.len()],
    /// Clients closed (1008) for too many pings or invalid messages.
    pub control_limited: Counter,
    /// Presses counted into a storm summary instead of sent as alerts.
    pub presses_summarized: Counter,
    /// Storm summaries sent (each to every client).
    pub summaries_sent: Counter,
    /// Frames written to every client with one `send`.
    pub fanout_batch_frames: Histogram<{ FRAMES.len() }>,
    /// Alerts from this instance's clients, accepted for broadcast.
    pub alerts_received: Counter,
    /// Alerts this instance handed on to every instance (for Pub/Sub: once
    /// the publish call succeeded).
    pub alerts_published: Counter,
    /// Alert messages written to this instance's clients (one per client
    /// per alert).
    pub alerts_delivered: Counter,
    /// Messages (alerts and summaries) sent again to reconnecting clients
    /// from the recovery ring.
    pub alerts_replayed: Counter,
    /// Alerts refused for their client's or its address's rate limit.
    pub alerts_rate_limited: Counter,
    /// Refused client messages, by code (see [`Metrics::rejected`]).
    invalid_json: Counter,
    unknown_message: Counter,
    invalid_alert: Counter,
    broker_unavailable: Counter,
    internal_error: Counter,
    pub slow_clients_dropped: Counter,
    pub publish_errors: Counter,
    /// Alerts dropped unpublished, by [`Unpublished`] (in `Unpublished::ALL` order).
    unpublished: [Counter; Unpublished::ALL.len()],
    pub pull_errors: Counter,
    /// Second copies of an alert from Pub/Sub, dropped (`broker/dedupe.rs`).
    pub duplicates_dropped: Counter,
    /// Alert ids forgotten before the end of the dedupe window, for memory.
    pub dedupe_forgotten_early: Counter,
    /// Alert ids the dedupe remembers now.
    pub dedupe_ids: Gauge,
    pub publish_duration: Histogram<{ SECONDS.len() }>,
    pub pull_duration: Histogram<{ SECONDS.len() }>,
}

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            connected_clients: Gauge::new(),
            refusals: [const { Counter::new() }; Refusal::ALL.len()],
            control_limited: Counter::new(),
            presses_summarized: Counter::new(),
            summaries_sent: Counter::new(),
            fanout_batch_frames: Histogram::new(FRAMES),
            alerts_received: Counter::new(),
            alerts_published: Counter::new(),
            alerts_delivered: Counter::new(),
            alerts_replayed: Counter::new(),
            alerts_rate_limited: Counter::new(),
            invalid_json: Counter::new(),
            unknown_message: Counter::new(),
            invalid_alert: Counter::new(),
            broker_unavailable: Counter::new(),
            internal_error: Counter::new(),
            slow_clients_dropped: Counter::new(),
            publish_errors: Counter::new(),
            unpublished: [const { Counter::new() }; Unpublished::ALL.len()],
            pull_errors: Counter::new(),
            duplicates_dropped: Counter::new(),
            dedupe_forgotten_early: Counter::new(),
            dedupe_ids: Gauge::new(),
            publish_duration: Histogram::new(SECONDS),
            pull_duration: Histogram::new(SECONDS),
        }
    }

    /// Counts a refused connection.
    pub fn refused(&self, why: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|r| *r == why) {
            self.refusals[i].inc();
        }
    }

    /// Counts `n` alerts dropped unpublished.
    pub fn unpublished(&self, why: Unpublished, n: u64) {
        if let Some(i) = Unpublished::ALL.iter().position(|u| *u == why) {
            self.unpublished[i].add(n);
        }
    }

    /// Counts a refused message by its code. `rate_limited` has a metric of
    /// its own (a person pressing too often is not an error).
    pub fn rejected(&self, code: RejectionCode) {
        self.rejection_counter(code).inc();
    }

    /// Where each code is counted: a match, so a new code does not compile
    /// until it has a counter.
    fn rejection_counter(&self, code: RejectionCode) -> &Counter {
        match code {
            RejectionCode::InvalidJson => &self.invalid_json,
            RejectionCode::UnknownMessage => &self.unknown_message,
            RejectionCode::InvalidAlert => &self.invalid_alert,
            RejectionCode::RateLimited => &self.alerts_rate_limited,
            RejectionCode::BrokerUnavailable => &self.broker_unavailable,
            RejectionCode::InternalError => &self.internal_error,
        }
    }

    /// The text exposition format, with `# HELP` and `# TYPE` for each
    /// metric. `broker` and `region` label the build-info line.
    pub fn render(&self, broker: &str, region: &str) -> String {
        let mut out = String::with_capacity(4096);
        gauge(
            &mut out,
            "skywatch_connected_clients",
            "WebSocket clients connected to this instance.",
            self.connected_clients.get(),
        );
        counter(
            &mut out,
            "skywatch_alerts_received_total",
            "Alerts from this instance's clients accepted for broadcast (refusals are counted apart).",
            self.alerts_received.get(),
        );
        counter(
            &mut out,
            "skywatch_alerts_published_total",
            "Alerts handed to the broker and accepted by it.",
            self.alerts_published.get(),
        );
        counter(
            &mut out,
            "skywatch_alerts_delivered_total",
            "Alert messages written to clients (one per client per alert).",
            self.alerts_delivered.get(),
        );
        counter(
            &mut out,
            "skywatch_alerts_replayed_total",
            "Missed messages (alerts and summaries) sent again to reconnecting clients.",
            self.alerts_replayed.get(),
        );
        counter(
            &mut out,
            "skywatch_presses_summarized_total",
            "Presses counted into a storm summary instead of sent as individual alerts.",
            self.presses_summarized.get(),
        );
        counter(
            &mut out,
            "skywatch_summaries_sent_total",
            "Storm summaries (ALIEN_LANDING_SUMMARY) sent, each to every client.",
            self.summaries_sent.get(),
        );
        histogram(
            &mut out,
            "skywatch_fanout_batch_frames",
            "Frames written to every client with one send, per fan-out batch.",
            &self.fanout_batch_frames,
        );
        labeled_counter(
            &mut out,
            "skywatch_messages_rejected_total",
            "Client messages refused, by error code (rate limiting has its own metric).",
            "code",
            RejectionCode::ALL
                .into_iter()
                .filter(|code| *code != RejectionCode::RateLimited)
                .map(|code| (code.as_str(), self.rejection_counter(code).get())),
        );
        counter(
            &mut out,
            "skywatch_alerts_rate_limited_total",
            "Alerts refused for their client's or its address's rate limit.",
            self.alerts_rate_limited.get(),
        );
        labeled_counter(
            &mut out,
            "skywatch_connections_refused_total",
            "Connections refused or dropped before becoming clients, by reason.",
            "reason",
            Refusal::ALL
                .iter()
                .zip(&self.refusals)
                .map(|(why, count)| (why.label(), count.get())),
        );
        counter(
            &mut out,
            "skywatch_control_limited_total",
            "Clients closed (1008) for sending too many pings or invalid messages.",
            self.control_limited.get(),
        );
        counter(
            &mut out,
            "skywatch_slow_clients_dropped_total",
            "Clients disconnected because they stopped reading.",
            self.slow_clients_dropped.get(),
        );
        counter(
            &mut out,
            "skywatch_publish_errors_total",
            "Failed publish calls to the broker (each retry counts).",
            self.publish_errors.get(),
        );
        labeled_counter(
            &mut out,
            "skywatch_alerts_unpublished_total",
            "Alerts accepted from clients but never published, by reason.",
            "reason",
            Unpublished::ALL
                .iter()
                .zip(&self.unpublished)
                .map(|(why, count)| (why.label(), count.get())),
        );
        counter(
            &mut out,
            "skywatch_pull_errors_total",
            "Failed pull calls to the broker (each retry counts).",
            self.pull_errors.get(),
        );
        counter(
            &mut out,
            "skywatch_duplicate_alerts_dropped_total",
            "Second copies of an alert delivered by Pub/Sub (a redelivery or a retried publish), dropped.",
            self.duplicates_dropped.get(),
        );
        counter(
            &mut out,
            "skywatch_dedupe_forgotten_early_total",
            "Alert ids forgotten before the end of the dedupe window because its memory was full.",
            self.dedupe_forgotten_early.get(),
        );
        gauge(
            &mut out,
            "skywatch_dedupe_ids",
            "Alert ids remembered to drop second copies.",
            self.dedupe_ids.get(),
        );
        histogram(
            &mut out,
            "skywatch_publish_duration_seconds",
            "Duration of publish calls to Pub/Sub.",
            &self.publish_duration,
        );
        histogram(
            &mut out,
            "skywatch_pull_duration_seconds",
            "Duration of pull calls to Pub/Sub (long polls: held until a message or about 90 s).",
            &self.pull_duration,
        );
        let _ = writeln!(
            out,
            "# HELP skywatch_build_info The running build; always 1.\n\
             # TYPE skywatch_build_info gauge\n\
             skywatch_build_info{{version=\"{}\",broker=\"{}\",region=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            label_value(broker),
            label_value(region),
        );
        out
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// A counter family with one sample per value of `label`.
fn labeled_counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn histogram<const N: usize>(out: &mut String, name: &str, help: &str, h: &Histogram<N>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
        cumulative += bucket.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += h.over.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
/// (Region codes come from the environment, so they are not trusted to be
/// plain.)
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let h = Histogram::new(SECONDS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(20));
        h.observe(Duration::from_secs(500));
        let mut out = String::new();
        histogram(&mut out, "x", "help", &h);
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"100\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 500.0205\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_rejection_code_has_a_counter_that_render_shows() {
        let m = Metrics::new();
        for (n, code) in RejectionCode::ALL.into_iter().enumerate() {
            for _ in 0..=n {
                m.rejected(code);
            }
        }
        let text = m.render("local", "ams");
        for (n, code) in RejectionCode::ALL.into_iter().enumerate() {
            let line = match code {
                RejectionCode::RateLimited => {
                    format!("skywatch_alerts_rate_limited_total {}", n + 1)
                }
                _ => format!(
                    "skywatch_messages_rejected_total{{code=\"{}\"}} {}",
                    code.as_str(),
                    n + 1
                ),
            };
            assert!(text.contains(&line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_metric_has_help_and_type() {
        let m = Metrics::new();
        m.rejected(RejectionCode::RateLimited);
        m.rejected(RejectionCode::InvalidJson);
        m.rejected(RejectionCode::InternalError);
        let text = m.render("local", "ams");
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or_default().to_owned());
            }
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .filter(|f| typed.contains(*f))
                .unwrap_or(name);
            assert!(typed.contains(family), "{name} has no # TYPE:\n{text}");
        }
        assert!(text.contains("skywatch_messages_rejected_total{code=\"invalid_json\"} 1"));
        assert!(!text.contains("code=\"rate_limited\""));
        assert!(text.contains("skywatch_alerts_rate_limited_total 1"));
    }
}
