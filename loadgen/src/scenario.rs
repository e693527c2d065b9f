//! One measured run: connect the clients, watch the server idle, send the
//! alerts, collect every receipt.
//!
//! The phases, in order, each measured on its own:
//! 1. the server's RSS before any client (it may have served earlier runs
//!    only if the caller reuses it; the matrix starts a fresh one);
//! 2. connect: `probe` measured clients, then `idle` held ones, one at a time;
//! 3. settle, then RSS and threads with everyone connected, and server CPU
//!    over an idle window;
//! 4. the first probe client sends `alerts` alerts at `rate` per second;
//!    server CPU over that window, and every receipt's latency.

use crate::procfs::{self, CpuWindow};
use crate::reader::{Conn, Progress, Reader, SendClock, Tally, wait_until};
use crate::stats::Percentiles;
use crate::ws;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Plan {
    /// Instances to connect to; clients are spread over them in turn.
    pub endpoints: Vec<SocketAddr>,
    /// Server processes whose memory and CPU are sampled.
    pub pids: Vec<u32>,
    /// Clients whose receipts are timed; the first one sends the alerts.
    pub probe: usize,
    /// Further clients that are held open (and read, like any browser), but
    /// left out of the latency figures.
    pub idle: usize,
    /// Stop connecting at the first failures instead of going on: for finding
    /// a ceiling, where `idle` is an upper bound.
    pub until_failure: bool,
    pub alerts: usize,
    /// Alerts per second.
    pub rate: f64,
    /// Wait after connecting, before measuring RSS and idle CPU.
    pub settle: Duration,
    pub idle_window: Duration,
    /// After the last alert, how long receipts may still take.
    pub drain: Duration,
    /// Busy-poll while alerts are due (see `reader.rs`).
    pub busy_poll: bool,
}

/// What a run measured.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub rss_start_kib: u64,
    pub rss_connected_kib: u64,
    pub threads_connected: u64,
    pub connected: usize,
    pub connect_errors: usize,
    /// Connect failures grouped by kind.
    pub error_kinds: BTreeMap<String, usize>,
    pub connect_time: Duration,
    pub idle_cpu: CpuWindow,
    pub alert_cpu: CpuWindow,
    pub latency: Option<Percentiles>,
    /// Alert receipts on every client, against clients × alerts.
    pub delivered: u64,
    pub expected: u64,
    /// Receipts on the probe clients, against probe clients × alerts.
    pub probe_delivered: u64,
    pub probe_expected: u64,
    pub closed_by_server: u64,
    pub error_replies: BTreeMap<String, u64>,
    /// Storm summaries received, and the presses they counted: a server in
    /// storm mode (more alerts a second than it sends one by one) sends
    /// these instead of alerts, which then look undelivered.
    pub summaries: u64,
    pub summarized: u64,
    pub alive_at_end: bool,
    /// Why sending the alerts stopped early, if it did.
    pub send_error: Option<String>,
}

impl Outcome {
    pub fn delivery_ratio(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        self.delivered as f64 / self.expected as f64
    }

    /// RSS added per connected client, in KiB.
    pub fn rss_per_client_kib(&self) -> f64 {
        if self.connected == 0 {
            return 0.0;
        }
        (self.rss_connected_kib as f64 - self.rss_start_kib as f64) / self.connected as f64
    }

    /// Server CPU per delivered message, in microseconds.
    pub fn cpu_per_delivery_us(&self) -> f64 {
        if self.delivered == 0 {
            return 0.0;
        }
        self.alert_cpu.cpu_ns as f64 / 1000.0 / self.delivered as f64
    }
}

/// Called between phases, e.g. to sample a cgroup while it is full.
pub type Hook<'a> = &'a mut dyn FnMut(&str);

pub fn run(plan: &Plan, hook: Hook<'_>) -> io::Result<Outcome> {
    let pids = &plan.pids;
    let rss = |pids: &[u32]| pids.iter().filter_map(|&p| procfs::rss_kib(p)).sum::<u64>();
    let mut outcome = Outcome {
        rss_start_kib: rss(pids),
        ..Outcome::default()
    };

    // Connect, one client at a time: the server's accept path is measured as
    // it is, and a refusal is seen where it happens.
    let mut reader = Reader::new()?;
    let mut sender = None;
    let wanted = plan.probe + plan.idle;
    let started = Instant::now();
    let mut failures_in_a_row = 0;
    for i in 0..wanted {
        let addr = plan.endpoints[i % plan.endpoints.len()];
        match ws::open(addr) {
            Ok((stream, already_read)) => {
                failures_in_a_row = 0;
                if i == 0 {
                    sender = Some(stream.try_clone()?);
                }
                reader.add(Conn {
                    stream,
                    pending: already_read,
                    measured: i < plan.probe,
                })?;
            }
            Err(err) => {
                outcome.connect_errors += 1;
                *outcome.error_kinds.entry(err.kind()).or_default() += 1;
                failures_in_a_row += 1;
                if i == 0 {
                    return Err(io::Error::other(format!(
                        "the first client could not connect: {}",
                        err.kind()
                    )));
                }
                if plan.until_failure && failures_in_a_row >= 3 {
                    break;
                }
            }
        }
    }
    outcome.connect_time = started.elapsed();
    outcome.connected = reader.len();
    let probe_connected = plan.probe.min(outcome.connected) as u64;
    let Some(mut sender) = sender else {
        return Err(io::Error::other("no sender"));
    };

    let clock = Arc::new(SendClock::new(plan.alerts, wall_clock_ms()));
    let progress = Arc::new(Progress::default());
    let reading = std::thread::Builder::new().name("reader".into()).spawn({
        let (clock, progress) = (Arc::clone(&clock), Arc::clone(&progress));
        move || reader.run(clock, progress)
    })?;

    std::thread::sleep(plan.settle);
    outcome.rss_connected_kib = rss(pids);
    outcome.threads_connected = pids.iter().filter_map(|&p| procfs::threads(p)).sum();
    hook("connected");
    let mark = procfs::cpu_mark(pids);
    std::thread::sleep(plan.idle_window);
    outcome.idle_cpu = mark.window(pids);

    // Alerts, paced from a fixed start so a slow write does not shift the rest.
    let alive = outcome.connected as u64 - progress.closed.load(Ordering::Relaxed);
    outcome.expected = alive * plan.alerts as u64;
    progress.busy.store(plan.busy_poll, Ordering::Relaxed);
    let mark = procfs::cpu_mark(pids);
    let t0 = Instant::now();
    for k in 0..plan.alerts {
        let due = t0 + Duration::from_secs_f64(k as f64 / plan.rate);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let text = format!(
            r#"{{"message":"ALIEN_LANDING","timestamp":{}}}"#,
            clock.first_timestamp + k as u64
        );
        clock.mark(k);
        if let Err(err) = send_all(&mut sender, &ws::client_frame(ws::OP_TEXT, text.as_bytes())) {
            // The server closed the sender (or died): report what arrived.
            outcome.send_error = Some(err.to_string());
            break;
        }
    }
    wait_until(plan.drain, || {
        progress.alert_receipts.load(Ordering::Relaxed) >= outcome.expected
    });
    outcome.alert_cpu = mark.window(pids);
    progress.busy.store(false, Ordering::Relaxed);
    hook("alerts sent");

    progress.stop.store(true, Ordering::Release);
    let mut tally: Tally = reading
        .join()
        .map_err(|_| io::Error::other("the reader thread panicked"))?;
    outcome.latency = Percentiles::of(&mut tally.latencies_us);
    outcome.delivered = tally.receipts.iter().sum();
    outcome.probe_delivered = tally.latencies_us.len() as u64;
    outcome.probe_expected = probe_connected * plan.alerts as u64;
    outcome.closed_by_server = tally.closed;
    outcome.error_replies = tally.error_replies;
    outcome.summaries = tally.summaries;
    outcome.summarized = tally.summarized;
    outcome.alive_at_end = pids.iter().all(|&p| procfs::rss_kib(p).is_some());
    Ok(outcome)
}

/// Writes a whole frame to a non-blocking socket.
pub fn send_all(mut stream: impl Write, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Milliseconds since the epoch: the first alert's timestamp, so alerts look
/// like a browser's (the server accepts any timestamp up to 2^53).
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
