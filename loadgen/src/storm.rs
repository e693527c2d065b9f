//! `skywatch-load storm`: a crowd presses the button at once.
//!
//! C clients connect, each from its own loopback address (127.0.x.y, one per
//! client: how people look to a server on the internet, and what per-address
//! limits would see), against a server with its default rate limits. Once
//! they have settled, S of them press once each, at the same instant: every
//! frame is prepared beforehand and written in one tight loop (or a few
//! threads released together). Then every client accounts for the presses
//! it hears about: one per individual `ALIEN_LANDING` alert (replays aside)
//! plus the `count` of every `ALIEN_LANDING_SUMMARY`. A client is complete
//! when it has accounted for every press the server accepted, which the
//! pressers learn from `ACCEPTED` (or `ERROR`) replies; more than that is
//! over-counting, a bug.

use crate::procfs::{self, CpuWindow};
use crate::protocol::{self, ServerMessage};
use crate::reader::{Conn, Handler, Reader};
use crate::scenario::{Hook, send_all, wall_clock_ms};
use crate::stats::Percentiles;
use crate::ws;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct StormPlan {
    /// Instances; clients are spread over them in turn.
    pub endpoints: Vec<SocketAddr>,
    /// Their processes, for RSS and CPU.
    pub pids: Vec<u32>,
    pub clients: usize,
    /// How many of the clients press (the first ones; spread over the
    /// instances like every client). `None`: all of them.
    pub pressers: Option<usize>,
    /// Wait after connecting, before the storm.
    pub settle: Duration,
    /// How long after the first press clients may take to account for all.
    pub drain: Duration,
    /// After every client has accounted for every press, how long to go on
    /// reading, to catch a late summary that would over-count.
    pub linger: Duration,
    /// Threads writing the presses, released together (1: one tight loop).
    pub send_threads: usize,
    /// Busy-poll while the storm lasts (see `reader.rs`).
    pub busy_poll: bool,
}

impl Default for StormPlan {
    fn default() -> StormPlan {
        StormPlan {
            endpoints: Vec::new(),
            pids: Vec::new(),
            clients: 1000,
            pressers: None,
            settle: Duration::from_secs(2),
            drain: Duration::from_secs(10),
            linger: Duration::from_secs(1),
            send_threads: 1,
            busy_poll: true,
        }
    }
}

/// Most clients with distinct source addresses: 127.0.1.1 to 127.0.255.250.
pub const MAX_SOURCES: usize = 255 * 250;

/// The source address of client `i`: 127.0.(1 + i / 250).(1 + i % 250), so
/// no client has a .0 or a .255, and none is 127.0.0.x (the server's own).
pub fn source_address(i: usize) -> Option<Ipv4Addr> {
    if i >= MAX_SOURCES {
        return None;
    }
    Some(Ipv4Addr::new(
        127,
        0,
        1 + (i / 250) as u8,
        1 + (i % 250) as u8,
    ))
}

/// Alert and summary ids, numbered as first seen, so a client's ids are a
/// bitset instead of a set of strings.
#[derive(Debug, Default)]
pub struct Ids {
    numbers: HashMap<Vec<u8>, u32>,
}

impl Ids {
    fn number(&mut self, id: &[u8]) -> u32 {
        let next = self.numbers.len() as u32;
        *self.numbers.entry(id.to_vec()).or_insert(next)
    }
}

/// What one client heard during the storm.
#[derive(Debug, Default, Clone)]
pub struct Account {
    /// Individual alerts, replays left out.
    pub alerts: u64,
    pub replayed: u64,
    pub summaries: u64,
    /// The sum of the summaries' counts.
    pub summarized: u64,
    /// Alerts or summaries whose id this client had already seen.
    pub duplicates: u64,
    /// Summaries whose regions do not add up to their count.
    pub inconsistent: u64,
    /// Replies to its own press.
    pub accepted: u64,
    pub refused: u64,
    /// Raw bytes read while the storm lasted.
    pub bytes: u64,
    /// Presses accounted for after each gain, and when (since the first
    /// press): a client's completion is the first gain reaching the target.
    pub gains: Vec<(u64, Duration)>,
    seen: Vec<u64>,
}

impl Account {
    /// Presses this client has accounted for.
    pub fn accounted(&self) -> u64 {
        self.alerts + self.summarized
    }

    /// Takes one message, read `since` the first press (`None`: before the
    /// storm, when alerts are nobody's presses). Returns what it was for the
    /// counters that are kept across clients.
    pub fn take(
        &mut self,
        message: &ServerMessage<'_>,
        since: Option<Duration>,
        ids: &mut Ids,
    ) -> Taken {
        match *message {
            ServerMessage::Alert { id, replayed } => {
                let Some(since) = since else {
                    return Taken::Ignored;
                };
                if replayed {
                    self.replayed += 1;
                    return Taken::Ignored;
                }
                self.check_id(id, ids);
                self.alerts += 1;
                self.gains.push((self.accounted(), since));
                Taken::Counted
            }
            ServerMessage::Summary {
                id,
                count,
                regions_total,
                replayed,
            } => {
                let Some(since) = since else {
                    return Taken::Ignored;
                };
                if replayed {
                    self.replayed += 1;
                    return Taken::Ignored;
                }
                self.check_id(id, ids);
                self.summaries += 1;
                self.summarized += count;
                if regions_total != Some(count) {
                    self.inconsistent += 1;
                }
                if count > 0 {
                    self.gains.push((self.accounted(), since));
                }
                Taken::Counted
            }
            ServerMessage::Accepted => {
                self.accepted += 1;
                Taken::Accepted
            }
            ServerMessage::Error { .. } => {
                self.refused += 1;
                Taken::Refused
            }
            ServerMessage::Connected => Taken::Greeting,
            ServerMessage::Other => Taken::Ignored,
        }
    }

    fn check_id(&mut self, id: Option<&[u8]>, ids: &mut Ids) {
        let Some(id) = id else { return };
        let n = ids.number(id) as usize;
        let (word, bit) = (n / 64, 1u64 << (n % 64));
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
        }
        self.seen[word] |= bit;
    }

    /// When this client had accounted for `target` presses, if it had.
    pub fn reached(&self, target: u64) -> Option<Duration> {
        if target == 0 {
            return Some(Duration::ZERO);
        }
        self.gains
            .iter()
            .find(|(accounted, _)| *accounted >= target)
            .map(|&(_, at)| at)
    }
}

/// What a message was, for the counters kept across clients.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    Counted,
    Accepted,
    Refused,
    Greeting,
    Ignored,
}

/// State the reader and the main thread share while the storm runs.
struct Shared {
    base: Instant,
    /// When the first press was sent: nanoseconds after `base`, plus one
    /// (zero: not yet).
    started: AtomicU64,
    /// The storm is over (every client complete, or the drain ran out):
    /// bytes from now on are not the storm's.
    over: AtomicBool,
    busy: AtomicBool,
    stop: AtomicBool,
    /// Presses accounted per client, for the main thread to watch.
    accounted: Vec<AtomicU64>,
    closed: Vec<AtomicBool>,
    accepted: AtomicU64,
    refused: AtomicU64,
    greetings: AtomicU64,
}

impl Shared {
    fn new(clients: usize) -> Shared {
        Shared {
            base: Instant::now(),
            started: AtomicU64::new(0),
            over: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            accounted: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            closed: (0..clients).map(|_| AtomicBool::new(false)).collect(),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            greetings: AtomicU64::new(0),
        }
    }

    /// Marks the storm's start: called just before the first press is
    /// written, so no reply can be read before it.
    fn start(&self) -> Instant {
        let now = Instant::now();
        let nanos = now.duration_since(self.base).as_nanos() as u64 + 1;
        self.started.store(nanos, Ordering::Release);
        now
    }

    fn since_start(&self, at: Instant) -> Option<Duration> {
        let started = self.started.load(Ordering::Acquire).checked_sub(1)?;
        let at = at.duration_since(self.base).as_nanos() as u64;
        Some(Duration::from_nanos(at.saturating_sub(started)))
    }

    /// Whether every client still connected has accounted for `target`.
    fn all_reached(&self, target: u64) -> bool {
        self.accounted.iter().zip(&self.closed).all(|(n, closed)| {
            closed.load(Ordering::Relaxed) || n.load(Ordering::Relaxed) >= target
        })
    }
}

/// The reader's side: every client's account.
struct Accounting {
    shared: Arc<Shared>,
    accounts: Vec<Account>,
    ids: Ids,
    refused: BTreeMap<String, u64>,
    protocol_errors: u64,
}

impl Handler for Accounting {
    fn busy(&self) -> bool {
        self.shared.busy.load(Ordering::Relaxed)
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    fn bytes(&mut self, index: usize, n: usize, _at: Instant) {
        if self.shared.started.load(Ordering::Relaxed) != 0
            && !self.shared.over.load(Ordering::Relaxed)
        {
            self.accounts[index].bytes += n as u64;
        }
    }

    fn text(&mut self, index: usize, _measured: bool, text: &[u8], at: Instant) {
        let message = protocol::classify(text);
        let since = self.shared.since_start(at);
        let account = &mut self.accounts[index];
        match account.take(&message, since, &mut self.ids) {
            Taken::Counted => {
                self.shared.accounted[index].store(account.accounted(), Ordering::Relaxed);
            }
            Taken::Accepted => {
                self.shared.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Taken::Refused => {
                if let ServerMessage::Error { code } = message {
                    let code = String::from_utf8_lossy(code).into_owned();
                    *self.refused.entry(code).or_default() += 1;
                }
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
            }
            Taken::Greeting => {
                self.shared.greetings.fetch_add(1, Ordering::Relaxed);
            }
            Taken::Ignored => {}
        }
    }

    fn closed(&mut self, index: usize) {
        self.shared.closed[index].store(true, Ordering::Relaxed);
    }

    fn protocol_error(&mut self) {
        self.protocol_errors += 1;
    }
}

/// Smallest, largest and mean of a per-client count.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub min: u64,
    pub max: u64,
    pub mean: f64,
}

impl Spread {
    pub fn of(values: impl Iterator<Item = u64>) -> Spread {
        let (mut min, mut max, mut sum, mut n) = (u64::MAX, 0, 0u128, 0u64);
        for v in values {
            min = min.min(v);
            max = max.max(v);
            sum += u128::from(v);
            n += 1;
        }
        if n == 0 {
            return Spread::default();
        }
        Spread {
            min,
            max,
            mean: sum as f64 / n as f64,
        }
    }
}

/// What a storm measured.
#[derive(Debug, Default, Clone)]
pub struct StormOutcome {
    pub instances: usize,
    /// Server processes whose CPU and RSS were read (none with `--url` and
    /// no `--pid`).
    pub measured_servers: usize,
    pub clients: usize,
    pub connected: usize,
    pub connect_errors: usize,
    pub error_kinds: BTreeMap<String, usize>,
    pub connect_time: Duration,
    /// Clients that connected from their own 127.0.x.y address.
    pub own_addresses: bool,
    /// `CONNECTED` greetings read before the storm.
    pub greetings: u64,
    pub rss_start_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_after_kib: u64,
    pub threads_connected: u64,
    /// Clients that pressed.
    pub pressers: usize,
    pub send_threads: usize,
    /// From the first press written to the last.
    pub send_time: Duration,
    /// Presses that could not be written (the server had closed the client).
    pub send_errors: usize,
    pub accepted: u64,
    /// Refused presses by error code.
    pub refused: BTreeMap<String, u64>,
    /// Pressers that got neither `ACCEPTED` nor `ERROR` (always all of them
    /// from a server that does not send `ACCEPTED`).
    pub unanswered: u64,
    /// Presses each client should account for: the pressers less the
    /// refused presses.
    pub target: u64,
    /// Clients the server closed.
    pub disconnected: usize,
    /// Connected clients that accounted for `target` presses, and when.
    pub complete: usize,
    pub completion: Option<Percentiles>,
    /// Connected clients still short of `target` at the end, and the most
    /// and least any of them had.
    pub short: usize,
    pub short_accounted: Option<(u64, u64)>,
    /// Clients that accounted for more than `target`: a bug.
    pub over_counted: usize,
    pub most_accounted: u64,
    pub duplicates: u64,
    pub inconsistent_summaries: u64,
    pub replayed: u64,
    pub alerts: Spread,
    pub summaries: Spread,
    /// Raw bytes each client read between the first press and the end of
    /// the storm (`window`).
    pub bytes: Spread,
    pub window: Duration,
    pub cpu: CpuWindow,
    pub protocol_errors: u64,
}

impl StormOutcome {
    /// Bytes per second per client over the storm window.
    pub fn bytes_per_second(&self, bytes: f64) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs == 0.0 { 0.0 } else { bytes / secs }
    }

    /// What the server got wrong beyond doubt: presses counted more than
    /// once on some client.
    pub fn bug(&self) -> Option<String> {
        (self.over_counted > 0 || self.duplicates > 0).then(|| {
            format!(
                "over-counting: {} clients accounted for more than {} presses (up to {}), \
                 {} duplicate ids",
                self.over_counted, self.target, self.most_accounted, self.duplicates
            )
        })
    }
}

pub fn run(plan: &StormPlan, hook: Hook<'_>) -> io::Result<StormOutcome> {
    let pids = &plan.pids;
    let rss = |pids: &[u32]| pids.iter().filter_map(|&p| procfs::rss_kib(p)).sum::<u64>();
    let wanted_pressers = plan.pressers.unwrap_or(plan.clients).min(plan.clients);
    let mut outcome = StormOutcome {
        instances: plan.endpoints.len(),
        measured_servers: pids.len(),
        clients: plan.clients,
        rss_start_kib: rss(pids),
        send_threads: plan.send_threads.max(1),
        own_addresses: plan
            .endpoints
            .iter()
            .all(|e| matches!(e, SocketAddr::V4(v4) if v4.ip().is_loopback())),
        ..StormOutcome::default()
    };
    if outcome.own_addresses && plan.clients > MAX_SOURCES {
        return Err(io::Error::other(format!(
            "at most {MAX_SOURCES} clients with their own loopback addresses"
        )));
    }

    // Connect, one at a time, each client from its own address.
    let mut reader = Reader::new()?;
    let mut writers = Vec::with_capacity(wanted_pressers);
    let started = Instant::now();
    for i in 0..plan.clients {
        let addr = plan.endpoints[i % plan.endpoints.len()];
        let source = source_address(i).filter(|_| outcome.own_addresses);
        match ws::open_from(addr, source) {
            Ok((stream, already_read)) => {
                if reader.len() < wanted_pressers {
                    writers.push(stream.try_clone()?);
                }
                reader.add(Conn {
                    stream,
                    pending: already_read,
                    measured: true,
                })?;
            }
            Err(err) => {
                outcome.connect_errors += 1;
                *outcome.error_kinds.entry(err.kind()).or_default() += 1;
            }
        }
    }
    outcome.connect_time = started.elapsed();
    outcome.connected = reader.len();
    outcome.pressers = writers.len();
    if outcome.connected == 0 {
        return Err(io::Error::other(format!(
            "no client could connect: {:?}",
            outcome.error_kinds
        )));
    }

    let shared = Arc::new(Shared::new(outcome.connected));
    let reading = std::thread::Builder::new().name("reader".into()).spawn({
        let accounting = Accounting {
            shared: Arc::clone(&shared),
            accounts: vec![Account::default(); outcome.connected],
            ids: Ids::default(),
            refused: BTreeMap::new(),
            protocol_errors: 0,
        };
        move || reader.run_with(accounting)
    })?;

    std::thread::sleep(plan.settle);
    outcome.rss_connected_kib = rss(pids);
    outcome.threads_connected = pids.iter().filter_map(|&p| procfs::threads(p)).sum();
    outcome.greetings = shared.greetings.load(Ordering::Relaxed);
    hook("connected");

    // Every press ready before the first goes out: one frame per presser,
    // stamped like a browser's Date.now().
    let now_ms = wall_clock_ms();
    let presses: Vec<(TcpStream, Vec<u8>)> = writers
        .into_iter()
        .map(|stream| {
            let text = format!(r#"{{"message":"ALIEN_LANDING","timestamp":{now_ms}}}"#);
            (stream, ws::client_frame(ws::OP_TEXT, text.as_bytes()))
        })
        .collect();
    let mark = procfs::cpu_mark(pids);
    let (t0, sent) = press(&presses, outcome.send_threads, &shared);
    // Busy-polling only from here: while the presses go out, a reader
    // spinning on one of the two cores would leave the writer and the
    // server's woken threads to share the other (writing took 12-22 ms for
    // 500 presses that way, 8-11 ms this way, on a quiet machine).
    shared.busy.store(plan.busy_poll, Ordering::Relaxed);
    outcome.send_time = sent.finished.saturating_duration_since(t0);
    outcome.send_errors = sent.errors;

    // Until every connected client has accounted for every press the
    // server accepted (all of them, less those refused so far), or the
    // drain runs out.
    let deadline = t0 + plan.drain;
    let pressed = outcome.pressers as u64;
    loop {
        let target = pressed.saturating_sub(shared.refused.load(Ordering::Relaxed));
        if shared.all_reached(target) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    shared.over.store(true, Ordering::Relaxed);
    outcome.window = t0.elapsed();
    outcome.cpu = mark.window(pids);
    shared.busy.store(false, Ordering::Relaxed);
    std::thread::sleep(plan.linger);
    outcome.rss_after_kib = rss(pids);
    hook("storm over");

    shared.stop.store(true, Ordering::Release);
    let accounting = reading
        .join()
        .map_err(|_| io::Error::other("the reader thread panicked"))?;
    tally(&mut outcome, &accounting);
    Ok(outcome)
}

/// When the last press was written, and how many could not be.
struct Sent {
    finished: Instant,
    errors: usize,
}

/// Writes every press as fast as it can: in one loop, or spread over
/// `threads` threads that a barrier releases together. Returns when the first
/// was written (the storm's time zero) and when the last was.
fn press(presses: &[(TcpStream, Vec<u8>)], threads: usize, shared: &Shared) -> (Instant, Sent) {
    let write = |chunk: &[(TcpStream, Vec<u8>)]| {
        let mut errors = 0;
        for (stream, frame) in chunk {
            // One write takes a whole small frame; the loop is for the odd
            // short write.
            let written = match (&mut &*stream).write(frame) {
                Ok(n) if n == frame.len() => Ok(()),
                Ok(n) => send_all(&mut &*stream, &frame[n..]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    send_all(&mut &*stream, frame)
                }
                Err(err) => Err(err),
            };
            errors += usize::from(written.is_err());
        }
        Sent {
            finished: Instant::now(),
            errors,
        }
    };
    if threads <= 1 || presses.len() < 2 {
        let t0 = shared.start();
        return (t0, write(presses));
    }
    let per_thread = presses.len().div_ceil(threads);
    let barrier = Barrier::new(threads.min(presses.len()) + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = presses
            .chunks(per_thread)
            .map(|chunk| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    write(chunk)
                })
            })
            .collect();
        let t0 = shared.start();
        barrier.wait();
        let mut all = Sent {
            finished: t0,
            errors: 0,
        };
        for worker in workers {
            if let Ok(sent) = worker.join() {
                all.finished = all.finished.max(sent.finished);
                all.errors += sent.errors;
            }
        }
        (t0, all)
    })
}

/// Sums up every client's account into the outcome.
fn tally(outcome: &mut StormOutcome, accounting: &Accounting) {
    let accounts = &accounting.accounts;
    let shared = &accounting.shared;
    outcome.refused = accounting.refused.clone();
    outcome.protocol_errors = accounting.protocol_errors;
    let refused: u64 = outcome.refused.values().sum();
    outcome.accepted = accounts.iter().map(|a| a.accepted).sum();
    let pressers = &accounts[..outcome.pressers.min(accounts.len())];
    outcome.unanswered = pressers
        .iter()
        .filter(|a| a.accepted + a.refused == 0)
        .count() as u64;
    outcome.target = (outcome.pressers as u64).saturating_sub(refused);

    let closed = |i: usize| shared.closed[i].load(Ordering::Relaxed);
    outcome.disconnected = (0..accounts.len()).filter(|&i| closed(i)).count();
    let alive: Vec<&Account> = accounts
        .iter()
        .enumerate()
        .filter(|&(i, _)| !closed(i))
        .map(|(_, a)| a)
        .collect();
    let mut completion_us: Vec<u32> = alive
        .iter()
        .filter_map(|a| a.reached(outcome.target))
        .map(|d| d.as_micros().min(u128::from(u32::MAX)) as u32)
        .collect();
    outcome.complete = completion_us.len();
    outcome.completion = Percentiles::of(&mut completion_us);
    let short: Vec<u64> = alive
        .iter()
        .map(|a| a.accounted())
        .filter(|&n| n < outcome.target)
        .collect();
    outcome.short = short.len();
    outcome.short_accounted = short
        .iter()
        .min()
        .zip(short.iter().max())
        .map(|(&min, &max)| (min, max));
    outcome.over_counted = accounts
        .iter()
        .filter(|a| a.accounted() > outcome.target)
        .count();
    outcome.most_accounted = accounts.iter().map(Account::accounted).max().unwrap_or(0);
    outcome.duplicates = accounts.iter().map(|a| a.duplicates).sum();
    outcome.inconsistent_summaries = accounts.iter().map(|a| a.inconsistent).sum();
    outcome.replayed = accounts.iter().map(|a| a.replayed).sum();
    outcome.alerts = Spread::of(alive.iter().map(|a| a.alerts));
    outcome.summaries = Spread::of(alive.iter().map(|a| a.summaries));
    outcome.bytes = Spread::of(alive.iter().map(|a| a.bytes));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    fn alert(id: &str) -> String {
        format!(
            r#"{{"message":"ALIEN_LANDING","timestamp":1,"regionCode":"syd","sender":"a","id":"{id}"}}"#
        )
    }

    fn summary(id: &str, count: u64) -> String {
        format!(
            r#"{{"message":"ALIEN_LANDING_SUMMARY","id":"{id}","count":{count},"regions":{{"syd":{count}}},"from":1,"to":2}}"#
        )
    }

    fn take(account: &mut Account, ids: &mut Ids, text: &str, since: Option<Duration>) -> Taken {
        account.take(&protocol::classify(text.as_bytes()), since, ids)
    }

    #[test]
    fn alerts_and_summary_counts_add_up() {
        let (mut a, mut ids) = (Account::default(), Ids::default());
        for k in 0..10 {
            assert_eq!(
                take(&mut a, &mut ids, &alert(&format!("a{k}")), ms(k)),
                Taken::Counted
            );
        }
        take(&mut a, &mut ids, &summary("s1", 2500), ms(200));
        take(&mut a, &mut ids, &summary("s2", 1490), ms(400));
        assert_eq!(a.accounted(), 4000);
        assert_eq!((a.alerts, a.summaries, a.summarized), (10, 2, 3990));
        assert_eq!(a.reached(4000), ms(400));
        assert_eq!(a.reached(2510), ms(200));
        assert_eq!(a.reached(5), ms(4));
        assert_eq!(a.reached(4001), None);
        assert_eq!(a.reached(0), Some(Duration::ZERO));
        assert_eq!((a.duplicates, a.inconsistent), (0, 0));
    }

    #[test]
    fn replays_and_what_came_before_the_storm_do_not_count() {
        let (mut a, mut ids) = (Account::default(), Ids::default());
        assert_eq!(
            take(&mut a, &mut ids, &alert("early"), None),
            Taken::Ignored
        );
        assert_eq!(
            take(&mut a, &mut ids, &summary("early", 3), None),
            Taken::Ignored
        );
        let replay = r#"{"message":"ALIEN_LANDING","timestamp":1,"replayed":true,"id":"r"}"#;
        assert_eq!(take(&mut a, &mut ids, replay, ms(1)), Taken::Ignored);
        let replay = r#"{"message":"ALIEN_LANDING_SUMMARY","id":"q","count":9,"regions":{"a":9},"from":1,"to":2,"replayed":true}"#;
        assert_eq!(take(&mut a, &mut ids, replay, ms(1)), Taken::Ignored);
        let presence = r#"{"message":"PRESENCE","regions":{"syd":4000},"total":4000}"#;
        assert_eq!(take(&mut a, &mut ids, presence, ms(1)), Taken::Ignored);
        assert_eq!((a.accounted(), a.replayed), (0, 2));
        assert!(a.gains.is_empty());
    }

    #[test]
    fn a_repeated_id_is_a_duplicate_and_over_counts() {
        let (mut a, mut ids) = (Account::default(), Ids::default());
        let mut b = Account::default();
        take(&mut a, &mut ids, &alert("x"), ms(1));
        take(&mut a, &mut ids, &summary("y", 4), ms(2));
        take(&mut a, &mut ids, &summary("y", 4), ms(3));
        // The same ids on another client are no duplicates there.
        take(&mut b, &mut ids, &alert("x"), ms(1));
        take(&mut b, &mut ids, &summary("y", 4), ms(2));
        assert_eq!((a.accounted(), a.duplicates), (9, 1));
        assert_eq!((b.accounted(), b.duplicates), (5, 0));
    }

    #[test]
    fn replies_and_refusals_are_counted_apart() {
        let (mut a, mut ids) = (Account::default(), Ids::default());
        let accepted = r#"{"message":"ACCEPTED","id":"0123456789abcdef0123456789abcdef"}"#;
        let refused = r#"{"message":"ERROR","error":"rate_limited","detail":"too many"}"#;
        assert_eq!(take(&mut a, &mut ids, accepted, ms(1)), Taken::Accepted);
        assert_eq!(take(&mut a, &mut ids, refused, ms(2)), Taken::Refused);
        let greeting = r#"{"message":"CONNECTED","regionCode":"syd"}"#;
        assert_eq!(take(&mut a, &mut ids, greeting, None), Taken::Greeting);
        assert_eq!((a.accepted, a.refused, a.accounted()), (1, 1, 0));
    }

    #[test]
    fn a_summary_whose_regions_disagree_is_flagged() {
        let (mut a, mut ids) = (Account::default(), Ids::default());
        let odd = r#"{"message":"ALIEN_LANDING_SUMMARY","id":"z","count":5,"regions":{"syd":2,"ams":2},"from":1,"to":2}"#;
        take(&mut a, &mut ids, odd, ms(1));
        assert_eq!((a.accounted(), a.inconsistent), (5, 1));
    }

    #[test]
    fn each_client_gets_its_own_loopback_address() {
        assert_eq!(source_address(0), Some(Ipv4Addr::new(127, 0, 1, 1)));
        assert_eq!(source_address(249), Some(Ipv4Addr::new(127, 0, 1, 250)));
        assert_eq!(source_address(250), Some(Ipv4Addr::new(127, 0, 2, 1)));
        assert_eq!(source_address(3999), Some(Ipv4Addr::new(127, 0, 16, 250)));
        assert_eq!(
            source_address(MAX_SOURCES - 1),
            Some(Ipv4Addr::new(127, 0, 255, 250))
        );
        assert_eq!(source_address(MAX_SOURCES), None);
        let distinct: std::collections::HashSet<_> =
            (0..MAX_SOURCES).filter_map(source_address).collect();
        assert_eq!(distinct.len(), MAX_SOURCES);
        assert!(distinct.iter().all(|a| a.is_loopback()
            && a.octets()[2] != 0
            && a.octets()[3] != 0
            && a.octets()[3] != 255));
    }

    #[test]
    fn spreads() {
        let s = Spread::of([3, 1, 2].into_iter());
        assert_eq!((s.min, s.max, s.mean), (1, 3, 2.0));
        assert_eq!(Spread::of(std::iter::empty()).max, 0);
    }

    #[test]
    fn the_storm_is_over_when_every_connected_client_has_all() {
        let shared = Shared::new(3);
        shared.accounted[0].store(5, Ordering::Relaxed);
        shared.accounted[1].store(4, Ordering::Relaxed);
        assert!(!shared.all_reached(5));
        shared.closed[2].store(true, Ordering::Relaxed);
        assert!(!shared.all_reached(5));
        assert!(shared.all_reached(4));
        shared.accounted[1].store(5, Ordering::Relaxed);
        assert!(shared.all_reached(5));
    }
}
