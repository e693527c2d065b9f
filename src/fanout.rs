//! The fan-out thread: the only code that writes to a client socket.
//!
//! Each connection thread owns the read half of its socket; when the
//! handshake is done it hands a shared handle to the socket (the write half)
//! to this thread in [`Event::Join`] and never writes to the socket again. From then
//! on everything a client receives — the greeting, alerts, replies, pongs,
//! pings, close frames — is written here, by one thread, in order. That is why
//! frames can never tear or interleave, and why no socket needs a lock.
//!
//! Writes never block: each is a `send(MSG_DONTWAIT)`. What a client's kernel
//! buffer cannot take waits in that client's backlog, which is retried every
//! few milliseconds; a backlog past [`Limits::max_backlog`] bytes, or older
//! than [`Limits::slow_client_grace`], gets the client disconnected. So a
//! client that stops reading costs the others nothing.
//!
//! An alert is serialized and framed once, then the same bytes are written to
//! every client. When several are waiting, they are framed one after another
//! into one batch and each client gets the batch with one `send`: the cost of
//! a broadcast is the number of clients, not clients × alerts.
//!
//! What every client is sent per second is bounded (`storm.rs`): past
//! STORM_ALERTS_PER_SECOND individual alerts, presses are counted into a
//! summary sent every STORM_SUMMARY_MS.
//!
//! Two more things live here because they must be ordered with the alerts:
//! the ring of recent messages that a reconnecting client is replayed from
//! (`recovery.rs`; a client is registered and replayed in one step, so no
//! message falls between), and the presence picture (`presence.rs`), which
//! counts this thread's own clients.

use crate::broker::{Broker, Delivery};
use crate::clock::{now_ms, wall_ms};
use crate::frames::{self, close_frame, text_frame};
use crate::message::{self, Alert};
use crate::metrics::METRICS;
use crate::presence::{Heartbeat, Presence};
use crate::recovery::{Missed, Recent, Sent};
use crate::storm::{Overflow, Route, Storm, Summary};
use crossbeam_channel::{Receiver, select};
use socket2::SockRef;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;

pub type ClientId = u64;

/// What connection threads (and `main`, for shutdown) tell the fan-out thread.
pub enum Event {
    /// A client finished its handshake. `writer` is its socket's write half,
    /// owned here from now on; `greeting` is written before anything else.
    Join {
        id: ClientId,
        writer: Arc<TcpStream>,
        greeting: Arc<[u8]>,
        last_seen: Arc<AtomicU64>,
        /// The last alert the client saw, when it is coming back (`?since=`).
        since: Option<Box<str>>,
    },
    /// Encoded frames for one client: a reply, a pong, a close echo.
    Send { id: ClientId, frames: Vec<u8> },
    /// Send this close frame, then nothing more.
    Close { id: ClientId, frame: Vec<u8> },
    /// The client's connection thread has ended.
    Leave { id: ClientId },
    /// Close every client with 1001 (going away) and return once they are
    /// gone or `deadline` passes.
    Shutdown { deadline: Instant },
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Ping a client silent for this long; drop it after another silent one.
    pub ping_interval: Duration,
    /// Most bytes kept for a client whose socket buffer is full.
    pub max_backlog: usize,
    /// Longest a client may leave its backlog unread.
    pub slow_client_grace: Duration,
    /// Most bytes all backlogs together may hold: past it the clients with
    /// the longest backlogs are disconnected, so a storm cannot run an
    /// instance at its connection bound out of memory.
    pub max_total_backlog: usize,
}

/// Everything the fan-out thread is configured with.
pub struct Settings {
    pub limits: Limits,
    /// Messages kept for clients that reconnect (0: none).
    pub recovery_alerts: usize,
    /// Most individual alerts a client is sent per second.
    pub storm_alerts_per_second: usize,
    /// How often counted presses go out as one summary.
    pub storm_summary: Duration,
    /// Presses the local broker counted while `deliveries` was full.
    pub overflow: Arc<Overflow>,
    /// None when presence is switched off.
    pub presence: Option<PresenceSettings>,
}

pub struct PresenceSettings {
    pub interval: Duration,
    /// This instance, as its heartbeats name it.
    pub instance: String,
    pub region: String,
    /// Where heartbeats go; they come back on `deliveries` like alerts.
    pub broker: Arc<dyn Broker>,
}

/// How often a non-empty backlog is retried. Only clients that have fallen
/// behind cost anything; an idle server never wakes for this.
const FLUSH_RETRY: Duration = Duration::from_millis(10);

/// Most bytes written to every client in one `send`: half the fixed socket
/// send buffer (`http.rs`), so a client that reads normally takes a whole
/// batch even when the previous one is still in its buffer.
const BATCH_BYTES: usize = 16 * 1024;

/// Most deliveries taken from the queue in one turn before writing: bounds
/// the time events (a departure, a shutdown) wait behind a storm.
const DELIVERIES_PER_TURN: usize = 4096;

/// Most events (replies, pongs, joins, departures) handled in one turn
/// before the deliveries get theirs: however fast clients send, an alert
/// waits at most this many single-client writes.
const EVENTS_PER_TURN: usize = 64;

/// Runs the fan-out thread until shutdown completes (or every sender of
/// `events` is gone).
pub fn run(settings: Settings, deliveries: Receiver<Delivery>, events: Receiver<Event>) {
    let limits = settings.limits;
    let mut hub = Hub {
        limits,
        recent: Recent::new(settings.recovery_alerts),
        storm: Storm::new(settings.storm_alerts_per_second, settings.storm_summary),
        overflow: settings.overflow,
        outbox: Outbox::default(),
        presence: settings.presence.map(|settings| PresenceState {
            picture: Presence::new(settings.interval),
            next_beat: Instant::now(),
            counted: None,
            settings,
        }),
        clients: HashMap::new(),
        behind: HashSet::new(),
        next_ping_check: Instant::now() + limits.ping_interval,
        stopping: None,
        ping: frames::ping(),
        going_away: close_frame(CloseCode::Away, "server shutting down"),
    };
    let never = crossbeam_channel::never();
    let mut deliveries = Some(deliveries);
    loop {
        // One turn: a bounded share of each queue, so neither can hold up
        // the other (a client flooding pings fills `events`; a storm fills
        // `deliveries`).
        let mut worked = false;
        for event in events.try_iter().take(EVENTS_PER_TURN) {
            handle_event(&mut hub, event, deliveries.as_ref());
            worked = true;
        }
        if let Some(queue) = &deliveries {
            for delivery in queue.try_iter().take(DELIVERIES_PER_TURN) {
                hub.take(delivery);
                worked = true;
            }
        }
        // Everything taken this turn goes out as one batch.
        hub.send_outbox();
        if !worked {
            // Both queues empty: sleep until either has something, or
            // until there is housekeeping to do.
            let now = Instant::now();
            let timeout = hub.next_wakeup(now).saturating_duration_since(now);
            let overflow = Arc::clone(&hub.overflow);
            select! {
                recv(events) -> event => match event {
                    Ok(event) => handle_event(&mut hub, event, deliveries.as_ref()),
                    Err(_) => break,
                },
                // Counted by housekeeping, below.
                recv(overflow.wakeup()) -> _ => {}
                recv(deliveries.as_ref().unwrap_or(&never)) -> delivery => match delivery {
                    Ok(delivery) => {
                        hub.take(delivery);
                        hub.send_outbox();
                    }
                    Err(_) => deliveries = None,
                },
                default(timeout) => {}
            }
        }
        if hub.housekeeping(Instant::now()) == AfterHousekeeping::AllClosed {
            break;
        }
        METRICS.connected_clients.set(hub.clients.len() as i64);
    }
    METRICS.connected_clients.set(0);
}

/// Handles one event. Before a shutdown, alerts already waiting (accepted,
/// and answered `ACCEPTED`) go out ahead of the close frames.
fn handle_event(hub: &mut Hub, event: Event, deliveries: Option<&Receiver<Delivery>>) {
    if let (Event::Shutdown { .. }, Some(queue)) = (&event, deliveries) {
        for delivery in queue.try_iter().take(DELIVERIES_PER_TURN) {
            hub.take(delivery);
        }
    }
    hub.handle(event);
}

/// Whether the fan-out goes on after a round of housekeeping.
#[derive(PartialEq, Eq)]
enum AfterHousekeeping {
    KeepRunning,
    AllClosed,
}

struct Hub {
    limits: Limits,
    /// The last messages sent, for clients that come back.
    recent: Recent,
    /// Which presses go out as alerts and which are counted.
    storm: Storm,
    overflow: Arc<Overflow>,
    /// Frames for every client, written as one batch.
    outbox: Outbox,
    presence: Option<PresenceState>,
    clients: HashMap<ClientId, Client>,
    /// Clients with a non-empty backlog.
    behind: HashSet<ClientId>,
    next_ping_check: Instant,
    stopping: Option<Instant>,
    ping: Vec<u8>,
    going_away: Vec<u8>,
}

/// The presence picture and this instance's part in it.
struct PresenceState {
    settings: PresenceSettings,
    picture: Presence,
    next_beat: Instant,
    /// This instance's count as last written into `picture`: the fan-out looks
    /// after every event, and only a change costs anything.
    counted: Option<usize>,
}

impl PresenceState {
    fn own(&self, clients: usize) -> Heartbeat {
        Heartbeat {
            instance: self.settings.instance.clone(),
            region: self.settings.region.clone(),
            clients: clients as u64,
            sent: wall_ms(),
        }
    }

    /// Puts this instance's client count into the picture when it changed.
    fn count_own(&mut self, clients: usize, now: Instant) {
        if self.counted != Some(clients) {
            self.counted = Some(clients);
            self.picture.record(self.own(clients), now);
        }
    }
}

impl Hub {
    fn next_wakeup(&self, now: Instant) -> Instant {
        let mut at = self.next_ping_check;
        if let Some(presence) = &self.presence {
            at = at.min(presence.next_beat);
            if let Some(due) = presence.picture.next_due() {
                at = at.min(due);
            }
        }
        if !self.behind.is_empty() {
            at = at.min(now + FLUSH_RETRY);
        }
        if let Some(due) = self.storm.due() {
            at = at.min(due);
        }
        if let Some(deadline) = self.stopping {
            at = at.min(deadline);
        }
        at
    }

    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Join {
                id,
                writer,
                greeting,
                last_seen,
                since,
            } => {
                let mut client = Client {
                    fd: writer.as_raw_fd(),
                    writer,
                    backlog: Vec::new(),
                    behind_since: None,
                    last_seen,
                    pinged_at: None,
                    closing: false,
                };
                // The greeting, what a returning client missed, and the
                // presence picture, in one write.
                let mut frames = greeting.to_vec();
                if let Some(since) = since {
                    frames.extend(replay(&self.recent, &since, self.limits.max_backlog / 2));
                }
                if let Some(presence) = &mut self.presence {
                    // This instance's count includes the newcomer at once,
                    // and the newcomer sees the picture without waiting for
                    // the next update.
                    presence.count_own(self.clients.len() + 1, now);
                    frames.extend(text_frame(presence.picture.message()));
                }
                let sent = client.send(&frames, now, &self.limits);
                let sent = sent.and_then(|()| match self.stopping {
                    Some(_) => client.close(&self.going_away, now, &self.limits),
                    None => Ok(()),
                });
                self.clients.insert(id, client);
                self.after_write(id, sent);
            }
            Event::Send { id, frames } => {
                if let Some(client) = self.clients.get_mut(&id) {
                    let sent = client.send(&frames, now, &self.limits);
                    self.after_write(id, sent);
                }
            }
            Event::Close { id, frame } => {
                if let Some(client) = self.clients.get_mut(&id) {
                    let sent = client.close(&frame, now, &self.limits);
                    self.after_write(id, sent);
                }
            }
            Event::Leave { id } => {
                self.behind.remove(&id);
                if let Some(mut client) = self.clients.remove(&id) {
                    // Last chance for a close frame still in the backlog.
                    let _ = client.flush();
                }
            }
            Event::Shutdown { deadline } => {
                // Every press already counted goes out before the close.
                self.count_overflow(now);
                if let Some(summary) = self.storm.take_now(now) {
                    self.queue_summary(summary);
                }
                self.send_outbox();
                self.stopping = Some(deadline);
                for (id, client) in &mut self.clients {
                    if client.close(&self.going_away, now, &self.limits).is_ok()
                        && client.is_behind()
                    {
                        self.behind.insert(*id);
                    }
                }
            }
        }
    }

    /// Records the outcome of a write to one client.
    fn after_write(&mut self, id: ClientId, sent: Result<(), Gone>) {
        match sent {
            Ok(()) => {
                if self.clients.get(&id).is_some_and(Client::is_behind) {
                    self.behind.insert(id);
                }
            }
            Err(gone) => self.disconnect(id, gone),
        }
    }

    /// Takes one delivery from the broker: an alert goes into the outbox
    /// or is counted for the next summary; a heartbeat updates presence.
    fn take(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Alert(alert) => {
                if self.stopping.is_some() {
                    return;
                }
                let now = Instant::now();
                // A window that has ended goes out before anything is
                // counted into the next.
                if let Some(summary) = self.storm.take_due(now) {
                    self.queue_summary(summary);
                }
                if self.storm.route(&alert.region, now, wall_ms()) == Route::Alert {
                    self.queue_alert(alert);
                } else {
                    METRICS.presses_summarized.inc();
                }
            }
            Delivery::Presence(beat) => self.record_heartbeat(beat),
        }
    }

    fn queue_alert(&mut self, alert: Alert) {
        self.queue(&text_frame(alert.to_client_json()), true);
        self.recent.push(Sent::Alert(alert));
    }

    fn queue_summary(&mut self, summary: Summary) {
        self.queue(&text_frame(summary.to_client_json()), false);
        METRICS.summaries_sent.inc();
        self.recent.push(Sent::Summary(summary));
    }

    /// Adds a frame for every client to the outbox, writing the outbox out
    /// first if the frame would not fit in the batch.
    fn queue(&mut self, frame: &[u8], is_alert: bool) {
        if self.outbox.bytes.len() + frame.len() > BATCH_BYTES {
            self.send_outbox();
        }
        self.outbox.bytes.extend_from_slice(frame);
        self.outbox.frames += 1;
        self.outbox.alerts += u64::from(is_alert);
    }

    /// Writes the outbox to every client as one batch.
    fn send_outbox(&mut self) {
        if self.outbox.frames == 0 {
            return;
        }
        let batch = std::mem::take(&mut self.outbox);
        self.send_to_all(&batch.bytes);
        METRICS.fanout_batch_frames.observe_count(batch.frames);
        METRICS
            .alerts_delivered
            .add(batch.alerts * self.clients.len() as u64);
        // Keep the buffer's memory for the next batch (it is at most
        // BATCH_BYTES plus one frame).
        self.outbox.bytes = batch.bytes;
        self.outbox.bytes.clear();
    }

    /// Counts the presses the local broker could not queue.
    fn count_overflow(&mut self, now: Instant) {
        if let Some(regions) = self.overflow.take() {
            if let Some(summary) = self.storm.take_due(now) {
                self.queue_summary(summary);
            }
            let now_ms = wall_ms();
            for (region, n) in regions {
                self.storm.count(&region, n, now, now_ms);
                METRICS.presses_summarized.add(n);
            }
        }
    }

    /// Another instance's heartbeat (this instance's own comes back too, but
    /// its count is kept here first-hand).
    fn record_heartbeat(&mut self, beat: Heartbeat) {
        if let Some(presence) = &mut self.presence
            && beat.instance != presence.settings.instance
        {
            presence.picture.record(beat, Instant::now());
        }
    }

    /// Writes the same frame to every client.
    fn send_to_all(&mut self, frame: &[u8]) {
        let now = Instant::now();
        let Hub {
            clients,
            behind,
            limits,
            ..
        } = self;
        clients.retain(|id, client| match client.send(frame, now, limits) {
            Ok(()) => {
                if client.is_behind() {
                    behind.insert(*id);
                }
                true
            }
            Err(gone) => {
                gone.log(*id);
                client.disconnect();
                behind.remove(id);
                false
            }
        });
    }

    fn disconnect(&mut self, id: ClientId, gone: Gone) {
        self.behind.remove(&id);
        if let Some(client) = self.clients.remove(&id) {
            gone.log(id);
            client.disconnect();
        }
    }

    /// Sends a summary whose window has ended, retries backlogs, pings idle
    /// clients, and finishes a shutdown.
    fn housekeeping(&mut self, now: Instant) -> AfterHousekeeping {
        if self.stopping.is_none() {
            self.count_overflow(now);
            if let Some(summary) = self.storm.take_due(now) {
                self.queue_summary(summary);
            }
            self.send_outbox();
        }
        let stuck: Vec<(ClientId, Gone)> = self
            .behind
            .iter()
            .filter_map(|id| {
                let client = self.clients.get_mut(id)?;
                client.flush().err().map(|gone| (*id, gone))
            })
            .collect();
        for (id, gone) in stuck {
            self.disconnect(id, gone);
        }
        let grace = self.limits.slow_client_grace;
        let too_slow: Vec<ClientId> = self
            .behind
            .iter()
            .copied()
            .filter(|id| {
                self.clients
                    .get(id)
                    .and_then(|c| c.behind_since)
                    .is_some_and(|since| now - since > grace)
            })
            .collect();
        for id in too_slow {
            self.disconnect(id, Gone::Slow("its backlog went unread too long"));
        }
        self.keep_backlogs_within_budget();
        let clients = &self.clients;
        self.behind
            .retain(|id| clients.get(id).is_some_and(Client::is_behind));

        if now >= self.next_ping_check {
            self.next_ping_check = now + self.limits.ping_interval;
            self.keepalive();
        }
        if self.stopping.is_none() {
            self.presence_update(now);
        }

        match self.stopping {
            Some(deadline) if self.clients.is_empty() || now >= deadline => {
                for (_, client) in self.clients.drain() {
                    client.disconnect();
                }
                AfterHousekeeping::AllClosed
            }
            _ => AfterHousekeeping::KeepRunning,
        }
    }

    /// Disconnects the clients furthest behind while all backlogs together
    /// hold more than [`Limits::max_total_backlog`].
    fn keep_backlogs_within_budget(&mut self) {
        let backlog = |id: &ClientId| self.clients.get(id).map_or(0, |c| c.backlog.len());
        let mut total: usize = self.behind.iter().map(backlog).sum();
        if total <= self.limits.max_total_backlog {
            return;
        }
        let mut furthest: Vec<(usize, ClientId)> =
            self.behind.iter().map(|id| (backlog(id), *id)).collect();
        furthest.sort_unstable_by(|a, b| b.cmp(a));
        for (bytes, id) in furthest {
            if total <= self.limits.max_total_backlog {
                break;
            }
            total -= bytes;
            self.disconnect(id, Gone::Slow("the instance's backlog budget is spent"));
        }
    }

    /// Keeps this instance's count current, sends its heartbeat and forgets
    /// silent instances once per interval, and tells clients when the
    /// picture changed (at most once per interval: `Presence::due`).
    fn presence_update(&mut self, now: Instant) {
        let clients = self.clients.len();
        let Some(presence) = &mut self.presence else {
            return;
        };
        presence.count_own(clients, now);
        if now >= presence.next_beat {
            presence.next_beat = now + presence.settings.interval;
            let beat = presence.own(clients);
            // Recorded here too, so this instance never looks silent.
            presence.picture.record(beat.clone(), now);
            presence.settings.broker.publish_presence(beat);
            presence.picture.expire(now);
        }
        if let Some(message) = presence.picture.due(now) {
            self.queue(&text_frame(message), false);
            self.send_outbox();
        }
    }

    /// Pings clients silent for an interval, and drops a client that has
    /// not made a sound in the whole interval since its ping. Checked once
    /// per interval, so a silent peer is gone within three intervals.
    fn keepalive(&mut self) {
        let interval = self.limits.ping_interval.as_millis() as u64;
        let now_ms = now_ms();
        let now = Instant::now();
        let mut dead = Vec::new();
        for (id, client) in &mut self.clients {
            let last_seen = client.last_seen.load(Ordering::Relaxed);
            match client.pinged_at {
                Some(pinged) if last_seen >= pinged => client.pinged_at = None,
                Some(pinged) if now_ms.saturating_sub(pinged) >= interval => {
                    dead.push((*id, Gone::Silent));
                    continue;
                }
                _ => {}
            }
            if client.pinged_at.is_none() && now_ms.saturating_sub(last_seen) >= interval {
                client.pinged_at = Some(now_ms);
                if let Err(gone) = client.send(&self.ping, now, &self.limits) {
                    dead.push((*id, gone));
                } else if client.is_behind() {
                    self.behind.insert(*id);
                }
            }
        }
        for (id, gone) in dead {
            self.disconnect(id, gone);
        }
    }
}

/// What a client coming back after the message `since` is owed, as frames
/// for one write: every later message still held, marked replayed, or a
/// MISSED notice. A replay larger than `max_bytes` (half a client's backlog
/// limit, so the write cannot get the client dropped as slow) is a MISSED
/// notice too.
fn replay(recent: &Recent, since: &str, max_bytes: usize) -> Vec<u8> {
    let missed = || text_frame(message::missed(since));
    let Missed::Messages(sent) = recent.after(since) else {
        return missed();
    };
    let mut frames = Vec::new();
    for message in &sent {
        frames.extend(text_frame(message.to_replay_json()));
        if frames.len() > max_bytes {
            return missed();
        }
    }
    METRICS.alerts_replayed.add(sent.len() as u64);
    frames
}

/// Frames waiting to be written to every client in one batch.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    frames: usize,
    /// How many of the frames are alerts (for the delivered metric).
    alerts: u64,
}

/// Why a client was disconnected by the fan-out thread.
enum Gone {
    Io(io::Error),
    Slow(&'static str),
    Silent,
}

impl Gone {
    fn log(&self, id: ClientId) {
        match self {
            Gone::Io(err) => crate::debug!("client {id}: write failed: {err}"),
            Gone::Slow(why) => {
                METRICS.slow_clients_dropped.inc();
                crate::warn!("disconnecting slow client {id}: {why}");
            }
            Gone::Silent => crate::info!("disconnecting client {id}: no answer to ping"),
        }
    }
}

struct Client {
    /// The socket's descriptor, copied out of `writer`: a broadcast walks
    /// every client, and reading the descriptor through the `Arc` would be a
    /// cache miss per client (the sockets live wherever their connection
    /// threads allocated them); measured at 4,000 clients, ~8 % of the
    /// fan-out's CPU.
    fd: RawFd,
    /// Owns the socket with its connection thread: `fd` stays open while
    /// this is held.
    writer: Arc<TcpStream>,
    /// Bytes the kernel would not take yet, starting mid-frame if need be.
    backlog: Vec<u8>,
    behind_since: Option<Instant>,
    last_seen: Arc<AtomicU64>,
    /// When (on [`now_ms`]'s clock) the unanswered ping was sent, if any.
    pinged_at: Option<u64>,
    /// A close frame has been queued: nothing may follow it.
    closing: bool,
}

impl Client {
    fn socket(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` is `writer`'s descriptor, and `writer`, held by this
        // struct, keeps it open for as long as the borrow (of `self`) lasts.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    fn is_behind(&self) -> bool {
        !self.backlog.is_empty()
    }

    fn send(&mut self, bytes: &[u8], now: Instant, limits: &Limits) -> Result<(), Gone> {
        if self.closing {
            return Ok(());
        }
        if self.backlog.is_empty() {
            let written = send_nonblocking(self.socket(), bytes).map_err(Gone::Io)?;
            if written < bytes.len() {
                self.backlog.extend_from_slice(&bytes[written..]);
                self.behind_since = Some(now);
            }
        } else {
            // Order matters: behind a partly written frame, nothing may jump
            // the queue, or the client would read a torn frame.
            self.backlog.extend_from_slice(bytes);
            self.flush()?;
        }
        if self.backlog.len() > limits.max_backlog {
            return Err(Gone::Slow("its backlog passed the limit"));
        }
        Ok(())
    }

    fn close(&mut self, frame: &[u8], now: Instant, limits: &Limits) -> Result<(), Gone> {
        let sent = self.send(frame, now, limits);
        self.closing = true;
        sent
    }

    fn flush(&mut self) -> Result<(), Gone> {
        if self.backlog.is_empty() {
            return Ok(());
        }
        let written = send_nonblocking(self.socket(), &self.backlog).map_err(Gone::Io)?;
        self.backlog.drain(..written);
        if self.backlog.is_empty() {
            self.behind_since = None;
            // A burst can grow a backlog; don't keep its memory for the
            // connection's whole life.
            self.backlog = Vec::new();
        }
        Ok(())
    }

    /// Ends the connection: the connection thread's blocked read returns at once
    /// and it cleans up.
    fn disconnect(&self) {
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}

/// Writes what the socket's buffer takes now, without blocking.
///
/// The connection thread blocks reading the same descriptor, so O_NONBLOCK,
/// which would apply to its reads too, cannot be used; MSG_DONTWAIT makes
/// just this call non-blocking. MSG_NOSIGNAL turns a
/// peer's reset into EPIPE instead of a signal.
fn send_nonblocking(writer: BorrowedFd<'_>, mut bytes: &[u8]) -> io::Result<usize> {
    let socket = SockRef::from(&writer);
    let mut written = 0;
    while !bytes.is_empty() {
        match socket.send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                bytes = &bytes[n..];
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(written)
}
