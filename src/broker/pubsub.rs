//! Google Cloud Pub/Sub over its REST API (v1), with ureq: one topic shared
//! by every instance, one subscription per instance.
//!
//! Threads do the work:
//! - the publisher takes alerts from a bounded queue, batches them (up to
//!   [`MAX_BATCH`] or [`BATCH_WINDOW`]) into one `topics.publish` call, and
//!   retries with exponential backoff and jitter until Pub/Sub takes them;
//! - several pullers (PUBSUB_OUTSTANDING_PULLS) keep that many
//!   `subscriptions.pull` requests open at once, each asking for up to
//!   [`MAX_PULL`] messages; each hands every new message to the fan-out once
//!   (deduplicated by messageId, across all pullers) and acknowledges its
//!   batch with one call. Several outstanding pulls is Google's advice for
//!   low latency with unary pull: the service may hold a pull a while to
//!   fill a batch, and with one pull everything behind it would wait. The
//!   first puller to run creates the topic and this instance's subscription;
//!   the others wait for it.
//!
//! This instance's own alerts come back through its subscription like
//! everyone else's: one delivery path, so exactly-once to local clients is
//! just the messageId dedupe, at the price of one Pub/Sub round trip.
//!
//! Presence heartbeats share the topic, the queue and the threads; the
//! message attribute `type` (`ALIEN_LANDING` or `PRESENCE`) tells them apart.

use super::{Broker, Delivery, PublishError};
use crate::auth::TokenSource;
use crate::message::Alert;
use crate::metrics::METRICS;
use crate::presence::Heartbeat;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The least room in the queue of alerts (and heartbeats) accepted but not
/// yet published; `PubSubSettings::queue_capacity` may ask for more. While
/// Pub/Sub is unreachable they wait here; only when it is full is a client
/// told `broker_unavailable`.
const MIN_PUBLISH_QUEUE: usize = 10_000;
/// Most messages in one publish request (Google's limit).
const MAX_BATCH: usize = 1000;
/// How long the publisher waits to fill a batch after its first alert.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Most messages asked for in one pull (Google's limit).
const MAX_PULL: usize = 1000;
/// Google holds an empty pull for up to about 90 s; the HTTP timeout must be
/// longer, or every quiet minute would look like a failure.
const PULL_TIMEOUT: Duration = Duration::from_secs(100);
/// Timeout of every other call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of the subscription delete at shutdown.
const DELETE_TIMEOUT: Duration = Duration::from_secs(2);
/// An empty pull answered faster than this did not wait (some emulators
/// never do): such pulls are spaced out, or the pullers would spin.
const EMPTY_PULL_FAST: Duration = Duration::from_millis(500);
/// Between the starts of two puller threads.
const PULLER_STAGGER: Duration = Duration::from_millis(25);
/// Against an endpoint whose empty pulls return at once, all pullers
/// together make at most one pull per this (10 a second): an alert then
/// waits at most this long for a pull, and an idle instance stays cheap.
const IDLE_PULL_GAP: Duration = Duration::from_millis(100);
/// How often an idle puller checks that its subscription is still attached
/// to the topic (one GET per instance per interval).
const SUBSCRIPTION_CHECK: Duration = Duration::from_secs(60);
/// Message ids remembered for deduplication of redeliveries.
const RECENT_IDS: usize = 10_000;
/// The `type` attribute of each kind of message on the topic.
const ALERT_TYPE: &str = "ALIEN_LANDING";
const PRESENCE_TYPE: &str = "PRESENCE";

/// Where and as whom to talk to Pub/Sub.
pub struct PubSubSettings {
    /// API base URL, e.g. `https://pubsub.googleapis.com` or `http://localhost:8085`.
    pub endpoint: String,
    /// None for an emulator, which takes no credentials.
    pub tokens: Option<TokenSource>,
    pub project: String,
    pub topic: String,
    pub subscription: String,
    /// Pull requests kept open at once (one puller thread each).
    pub outstanding_pulls: usize,
    /// Room in the publish queue (at least [`MIN_PUBLISH_QUEUE`]).
    pub queue_capacity: usize,
}

pub struct PubSubBroker {
    queue: PublishQueue,
    api: Arc<Api>,
    stop: Sender<Instant>,
    publisher_done: Receiver<()>,
    pullers: Arc<Pullers>,
}

/// What the puller threads share with each other and with shutdown.
struct Pullers {
    ready: AtomicBool,
    subscription: SubscriptionState,
    /// Message ids recently handed to the fan-out, by any puller.
    recent: Mutex<RecentIds>,
    /// When the next pull may go after one that came back empty at once.
    next_idle_pull: Mutex<Instant>,
    /// When an idle puller last checked the subscription's topic.
    last_check: Mutex<Instant>,
}

/// Whether this instance's subscription exists, and who is creating it. A
/// mutex and a condition variable, so that one puller creates while the
/// others wait, and a shutdown never races a create: it waits for one in
/// progress, and none starts after it.
struct SubscriptionState {
    state: Mutex<Setup>,
    changed: Condvar,
}

struct Setup {
    subscribed: bool,
    in_progress: bool,
    stopping: bool,
    /// Dropped when the subscription first exists: lets the publisher start.
    first: Option<Sender<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking puller cannot leave these half-updated in a way that
    // matters; carry on with the data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PubSubBroker {
    /// Starts the publisher and puller threads. Returns at once: the
    /// subscription is created by the puller, which retries until Pub/Sub
    /// answers; /readyz says when it has.
    pub fn start(
        settings: PubSubSettings,
        deliveries: Sender<Delivery>,
    ) -> std::io::Result<PubSubBroker> {
        let outstanding_pulls = settings.outstanding_pulls.max(1);
        let (queue, queue_rx) = PublishQueue::new(settings.queue_capacity.max(MIN_PUBLISH_QUEUE));
        let queued = Arc::clone(&queue.queued);
        let api = Arc::new(Api::new(settings));
        let (stop_tx, stop_rx) = bounded(1);
        let (done_tx, done_rx) = bounded(1);
        // Closed (never sent on) once the subscription first exists.
        let (subscribed_tx, subscribed_rx) = bounded::<()>(0);
        let pullers = Arc::new(Pullers {
            ready: AtomicBool::new(false),
            subscription: SubscriptionState {
                state: Mutex::new(Setup {
                    subscribed: false,
                    in_progress: false,
                    stopping: false,
                    first: Some(subscribed_tx),
                }),
                changed: Condvar::new(),
            },
            recent: Mutex::new(RecentIds::new(RECENT_IDS)),
            next_idle_pull: Mutex::new(Instant::now()),
            last_check: Mutex::new(Instant::now()),
        });
        std::thread::Builder::new()
            .name("pubsub-publisher".into())
            .spawn({
                let api = Arc::clone(&api);
                move || {
                    publisher(&api, &queue_rx, &queued, &stop_rx, &subscribed_rx);
                    let _ = done_tx.send(());
                }
            })?;
        for n in 0..outstanding_pulls {
            std::thread::Builder::new()
                .name(format!("pubsub-puller-{n}"))
                .spawn({
                    let (api, pullers) = (Arc::clone(&api), Arc::clone(&pullers));
                    let deliveries = deliveries.clone();
                    move || {
                        // Staggered starts spread the pulls out in time, and
                        // their connections: an HTTP server with a thread pool
                        // can leave one of several connections opened in the
                        // same instant waiting (tiny_http's, which the test
                        // server runs on, does).
                        std::thread::sleep(PULLER_STAGGER * n as u32);
                        puller(&api, &deliveries, &pullers)
                    }
                })?;
        }
        Ok(PubSubBroker {
            queue,
            api,
            stop: stop_tx,
            publisher_done: done_rx,
            pullers,
        })
    }
}

impl Broker for PubSubBroker {
    fn name(&self) -> &'static str {
        "pubsub"
    }

    fn publish(&self, alert: Alert) -> Result<(), PublishError> {
        self.queue.try_push(Delivery::Alert(alert))
    }

    fn publish_presence(&self, beat: Heartbeat) {
        let _ = self.queue.try_push(Delivery::Presence(beat));
    }

    fn is_ready(&self) -> bool {
        self.pullers.ready.load(Ordering::SeqCst)
    }

    /// Publishes what is still queued (until shortly before `deadline`), then
    /// deletes this instance's subscription so it stops collecting copies.
    fn shutdown(&self, deadline: Instant) {
        self.pullers.ready.store(false, Ordering::SeqCst);
        let publish_deadline = deadline.checked_sub(DELETE_TIMEOUT).unwrap_or(deadline);
        let _ = self.stop.try_send(publish_deadline);
        let _ = self.publisher_done.recv_deadline(publish_deadline);
        // No create starts after this, and one in progress finishes first,
        // so our delete is the last word.
        self.pullers.subscription.stop(publish_deadline);
        match self.api.delete_subscription() {
            Ok(()) => crate::info!("deleted subscription {}", self.api.subscription),
            Err(err) => crate::warn!(
                "could not delete subscription {}: {err} (it expires after a day unused)",
                self.api.subscription
            ),
        }
    }
}

/// The queue of messages accepted but not yet published. It must have room
/// for every client's whole burst at once (a storm is queued, not refused),
/// which is tens of thousands of messages; a bounded channel would allocate
/// all of that at start. So the bound is a count kept beside an unbounded
/// channel, which allocates as it fills and frees as it drains: the room
/// costs nothing until a storm uses it.
struct PublishQueue {
    sender: Sender<Delivery>,
    /// Messages in the channel: added by `try_push`, taken off by the
    /// publisher as it forms each batch.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl PublishQueue {
    fn new(capacity: usize) -> (PublishQueue, Receiver<Delivery>) {
        let (sender, receiver) = unbounded();
        let queue = PublishQueue {
            sender,
            queued: Arc::new(AtomicUsize::new(0)),
            capacity,
        };
        (queue, receiver)
    }

    fn try_push(&self, delivery: Delivery) -> Result<(), PublishError> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(PublishError::Unavailable);
        }
        self.sender.send(delivery).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            PublishError::Unavailable
        })
    }
}

fn publisher(
    api: &Api,
    queue: &Receiver<Delivery>,
    queued: &AtomicUsize,
    stop: &Receiver<Instant>,
    subscribed: &Receiver<()>,
) {
    let mut deadline: Option<Instant> = None;
    // A message published before this instance's subscription exists never
    // reaches this instance's clients: hold alerts (in the queue) until then.
    crossbeam_channel::select! {
        recv(subscribed) -> _ => {}
        recv(stop) -> at => deadline = Some(at.unwrap_or_else(|_| Instant::now())),
    }
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if deadline.is_none() {
            crossbeam_channel::select! {
                recv(queue) -> alert => match alert {
                    Ok(alert) => batch.push(alert),
                    Err(_) => return,
                },
                recv(stop) -> at => deadline = Some(at.unwrap_or_else(|_| Instant::now())),
            }
        }
        if deadline.is_some() {
            // Shutting down: take what is queued without waiting for more.
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(alert) => batch.push(alert),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
        } else {
            let window = Instant::now() + BATCH_WINDOW;
            while batch.len() < MAX_BATCH {
                match queue.recv_deadline(window) {
                    Ok(alert) => batch.push(alert),
                    Err(_) => break,
                }
            }
        }
        queued.fetch_sub(batch.len(), Ordering::AcqRel);
        publish_with_retry(api, &batch, stop, &mut deadline);
        batch.clear();
    }
}

/// Retries until Pub/Sub takes the batch. Gives up only on a request Pub/Sub
/// can never accept (a 400: a bug here) or past the shutdown deadline, and
/// says so in the log either way.
fn publish_with_retry(
    api: &Api,
    batch: &[Delivery],
    stop: &Receiver<Instant>,
    deadline: &mut Option<Instant>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let alerts = batch
        .iter()
        .filter(|d| matches!(d, Delivery::Alert(_)))
        .count() as u64;
    loop {
        let started = Instant::now();
        let published = api.publish(batch);
        METRICS.publish_duration.observe(started.elapsed());
        let err = match published {
            Ok(()) => {
                METRICS.alerts_published.add(alerts);
                return;
            }
            Err(err) => err,
        };
        METRICS.publish_errors.inc();
        match err.status() {
            Some(404) => {
                // Someone deleted the topic. Recreate it, and reattach this
                // instance's subscription (Pub/Sub detaches subscriptions of a
                // deleted topic) before publishing again, so this instance's
                // clients get the alert. Other instances reattach theirs within
                // SUBSCRIPTION_CHECK; alerts in between miss them.
                crate::warn!("topic {} is missing; creating it", api.topic);
                if let Err(err) = api
                    .create_topic()
                    .and_then(|()| api.reattach_subscription())
                {
                    crate::warn!("cannot recreate topic {}: {err}", api.topic);
                }
            }
            Some(400) => {
                crate::error!(
                    "Pub/Sub refused {} messages as malformed, dropping them: {err}",
                    batch.len()
                );
                return;
            }
            _ => crate::warn!(
                "publish of {} messages failed, will retry: {err}",
                batch.len()
            ),
        }
        let pause = backoff.next();
        if let Some(at) = *deadline {
            if Instant::now() + pause >= at {
                crate::error!(
                    "shutting down with {} messages unpublished: {err}",
                    batch.len()
                );
                return;
            }
            std::thread::sleep(pause);
        } else if let Ok(at) = stop.recv_timeout(pause) {
            *deadline = Some(at);
        }
    }
}

/// One of the puller threads: makes sure the subscription exists, then
/// pulls, hands new messages to the fan-out, and acknowledges them, until
/// shutdown.
fn puller(api: &Api, deliveries: &Sender<Delivery>, pullers: &Pullers) {
    let mut errors = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match pullers.subscription.ensure(api) {
            Subscribed::Yes => errors.reset(),
            Subscribed::NotYet => {
                std::thread::sleep(errors.next());
                continue;
            }
            Subscribed::Stopping => return,
        }
        pullers.ready.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let pulled = api.pull();
        METRICS.pull_duration.observe(started.elapsed());
        if pulled.is_err() {
            METRICS.pull_errors.inc();
        }
        match pulled {
            Ok(received) if received.is_empty() => {
                if started.elapsed() < EMPTY_PULL_FAST {
                    pullers.wait_idle_turn();
                }
                // A quiet subscription may be one detached from a deleted and
                // recreated topic: look, once in a while.
                if pullers.check_due()
                    && let Err(err) = api.reattach_subscription()
                {
                    crate::warn!("cannot check subscription {}: {err}", api.subscription);
                }
            }
            Ok(received) => {
                errors.reset();
                let ack_ids: Vec<String> = received.iter().map(|m| m.ack_id.clone()).collect();
                // Dedupe under one lock for the whole batch: a redelivered
                // message may reach two pullers at once, and only one may
                // hand it on.
                let fresh: Vec<Delivery> = {
                    let mut recent = lock(&pullers.recent);
                    received
                        .into_iter()
                        .filter(|message| recent.insert(&message.message_id))
                        .filter_map(|message| message.delivery)
                        .collect()
                };
                for delivery in fresh {
                    if deliveries.send(delivery).is_err() {
                        return; // the fan-out has stopped: shutting down
                    }
                }
                if let Err(err) = api.acknowledge(&ack_ids) {
                    // Not fatal: Pub/Sub redelivers, and the dedupe drops them.
                    crate::warn!("acknowledge failed: {err}");
                }
            }
            Err(_) if pullers.subscription.is_stopping() => return,
            Err(err) if err.status() == Some(404) => {
                pullers.ready.store(false, Ordering::SeqCst);
                crate::warn!("subscription {} is gone; recreating it", api.subscription);
                pullers.subscription.lost();
            }
            Err(err) => {
                crate::warn!("pull failed: {err}");
                std::thread::sleep(errors.next());
            }
        }
    }
}

impl Pullers {
    /// Waits for this puller's turn after a pull that came back empty at
    /// once: turns are [`IDLE_PULL_GAP`] apart, whatever the number of
    /// pullers.
    fn wait_idle_turn(&self) {
        let turn = {
            let mut next = lock(&self.next_idle_pull);
            let turn = (*next).max(Instant::now());
            *next = turn + IDLE_PULL_GAP;
            turn
        };
        std::thread::sleep(turn.saturating_duration_since(Instant::now()));
    }

    /// Whether it is time (for this puller, and none other) to check the
    /// subscription's topic.
    fn check_due(&self) -> bool {
        let mut last = lock(&self.last_check);
        if last.elapsed() >= SUBSCRIPTION_CHECK {
            *last = Instant::now();
            true
        } else {
            false
        }
    }
}

enum Subscribed {
    Yes,
    /// Creating it failed (logged): back off and try again.
    NotYet,
    Stopping,
}

impl SubscriptionState {
    /// Makes sure the topic and this instance's subscription exist: one
    /// puller creates them while the others wait for it.
    fn ensure(&self, api: &Api) -> Subscribed {
        let mut state = lock(&self.state);
        loop {
            if state.stopping {
                return Subscribed::Stopping;
            }
            if state.subscribed {
                return Subscribed::Yes;
            }
            if !state.in_progress {
                break;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.in_progress = true;
        drop(state);
        let created = api.create_topic().and_then(|()| api.create_subscription());
        let mut state = lock(&self.state);
        state.in_progress = false;
        self.changed.notify_all();
        if state.stopping {
            return Subscribed::Stopping; // shutdown deletes it after this
        }
        match created {
            Ok(()) => {
                crate::info!("subscribed to {} as {}", api.topic, api.subscription);
                state.subscribed = true;
                drop(state.first.take()); // lets the publisher start
                Subscribed::Yes
            }
            Err(err) => {
                crate::warn!("cannot set up subscription {}: {err}", api.subscription);
                Subscribed::NotYet
            }
        }
    }

    /// A pull found the subscription gone: the next `ensure` recreates it.
    fn lost(&self) {
        lock(&self.state).subscribed = false;
    }

    fn is_stopping(&self) -> bool {
        lock(&self.state).stopping
    }

    /// Stops all creating: waits (until `deadline`) for a create in
    /// progress, and lets none start after.
    fn stop(&self, deadline: Instant) {
        let mut state = lock(&self.state);
        state.stopping = true;
        while state.in_progress {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// A pulled message, decoded.
struct Received {
    ack_id: String,
    message_id: String,
    /// None when the data is neither an alert nor a heartbeat (logged,
    /// acknowledged, dropped).
    delivery: Option<Delivery>,
}

/// An error from a Pub/Sub call.
#[derive(Debug)]
pub enum ApiError {
    /// Pub/Sub answered with an error status: Google's `status` and `message`.
    Status {
        code: u16,
        status: String,
        message: String,
    },
    /// No answer: connection refused, timeout, TLS, unreadable body.
    Transport(String),
    /// No access token could be had.
    Auth(String),
}

impl ApiError {
    fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A create that found its resource already there. Google answers 409 for
    /// ABORTED too (a transient conflict, to be retried), so the status says
    /// which.
    fn already_exists(&self) -> bool {
        matches!(self, ApiError::Status { code: 409, status, .. } if status == "ALREADY_EXISTS")
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Status {
                code,
                status,
                message,
            } => write!(f, "{code} {status}: {message}"),
            ApiError::Transport(why) => write!(f, "no answer: {why}"),
            ApiError::Auth(why) => write!(f, "no access token: {why}"),
        }
    }
}

/// The few Pub/Sub REST calls Skywatch makes.
struct Api {
    endpoint: String,
    tokens: Option<TokenSource>,
    topic: String,
    subscription: String,
    calls: ureq::Agent,
    pulls: ureq::Agent,
    deletes: ureq::Agent,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        // Every puller keeps its connection between pulls.
        .max_idle_connections_per_host(16)
        .http_status_as_error(false)
        .build()
        .new_agent()
}

impl Api {
    fn new(settings: PubSubSettings) -> Api {
        let project = settings.project;
        Api {
            endpoint: settings.endpoint.trim_end_matches('/').to_string(),
            tokens: settings.tokens,
            topic: format!("projects/{project}/topics/{}", settings.topic),
            subscription: format!("projects/{project}/subscriptions/{}", settings.subscription),
            calls: agent(CALL_TIMEOUT),
            pulls: agent(PULL_TIMEOUT),
            deletes: agent(DELETE_TIMEOUT),
        }
    }

    fn create_topic(&self) -> Result<(), ApiError> {
        match self.call(&self.calls, "PUT", &self.topic, Some(json!({}))) {
            Err(err) if err.already_exists() => Ok(()),
            // A least-privilege role without pubsub.topics.create is refused
            // even when the topic exists: then an existing topic will do.
            Err(err) if err.status() == Some(403) => {
                match self.call(&self.calls, "GET", &self.topic, None) {
                    Ok(_) => Ok(()),
                    Err(_) => Err(err),
                }
            }
            other => other.map(drop),
        }
    }

    fn create_subscription(&self) -> Result<(), ApiError> {
        let body = json!({
            "topic": self.topic,
            // Messages are acknowledged within milliseconds of a pull.
            "ackDeadlineSeconds": 10,
            // An alert older than this is history, not news.
            "messageRetentionDuration": "600s",
            // The minimum: a crashed instance's subscription goes away after a
            // day unused instead of the default 31.
            "expirationPolicy": { "ttl": "86400s" },
        });
        match self.call(&self.calls, "PUT", &self.subscription, Some(body)) {
            Err(err) if err.already_exists() => Ok(()),
            other => other.map(drop),
        }
    }

    /// Makes sure this instance's subscription exists and receives from the
    /// topic: one whose topic was deleted shows `_deleted-topic_` and gets
    /// nothing ever again, so it is replaced.
    fn reattach_subscription(&self) -> Result<(), ApiError> {
        match self.call(&self.calls, "GET", &self.subscription, None) {
            Ok(found) if found["topic"].as_str() == Some(self.topic.as_str()) => Ok(()),
            Ok(found) => {
                crate::warn!(
                    "subscription {} is attached to {}; replacing it",
                    self.subscription,
                    found["topic"]
                );
                match self.call(&self.calls, "DELETE", &self.subscription, None) {
                    Err(err) if err.status() != Some(404) => return Err(err),
                    _ => {}
                }
                self.create_subscription()
            }
            Err(err) if err.status() == Some(404) => self.create_subscription(),
            Err(err) => Err(err),
        }
    }

    fn delete_subscription(&self) -> Result<(), ApiError> {
        self.call(&self.deletes, "DELETE", &self.subscription, None)
            .map(drop)
    }

    fn publish(&self, batch: &[Delivery]) -> Result<(), ApiError> {
        let messages: Vec<Value> = batch
            .iter()
            .map(|delivery| {
                let (data, kind) = match delivery {
                    Delivery::Alert(alert) => (serde_json::to_vec(alert), ALERT_TYPE),
                    Delivery::Presence(beat) => (serde_json::to_vec(beat), PRESENCE_TYPE),
                };
                let data = data.expect("strings and integers always serialize");
                json!({ "data": BASE64.encode(data), "attributes": { "type": kind } })
            })
            .collect();
        let path = format!("{}:publish", self.topic);
        self.call(
            &self.calls,
            "POST",
            &path,
            Some(json!({ "messages": messages })),
        )
        .map(drop)
    }

    fn pull(&self) -> Result<Vec<Received>, ApiError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct PullResponse {
            #[serde(default)]
            received_messages: Vec<ReceivedMessage>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct ReceivedMessage {
            ack_id: String,
            message: PubsubMessage,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct PubsubMessage {
            #[serde(default)]
            data: String,
            message_id: String,
            #[serde(default)]
            attributes: HashMap<String, String>,
        }
        let path = format!("{}:pull", self.subscription);
        // Parsed straight into its types: an answer of 1,000 messages as a
        // generic JSON tree first would cost several times its size.
        let answer = self.call_text(
            &self.pulls,
            "POST",
            &path,
            Some(json!({ "maxMessages": MAX_PULL })),
        )?;
        let response: PullResponse = serde_json::from_str(&answer)
            .map_err(|err| ApiError::Transport(format!("malformed pull response: {err}")))?;
        Ok(response
            .received_messages
            .into_iter()
            .map(|received| {
                let message = received.message;
                let data = BASE64.decode(&message.data).ok();
                let delivery = data.and_then(|bytes| {
                    match message.attributes.get("type").map(String::as_str) {
                        Some(PRESENCE_TYPE) => {
                            serde_json::from_slice(&bytes).ok().map(Delivery::Presence)
                        }
                        // Untyped messages are read as alerts, as the
                        // original demo published them.
                        Some(ALERT_TYPE) | None => {
                            serde_json::from_slice(&bytes).ok().map(Delivery::Alert)
                        }
                        Some(_) => None,
                    }
                });
                if delivery.is_none() {
                    crate::warn!(
                        "ignoring message {}: neither an alert nor a heartbeat",
                        message.message_id
                    );
                }
                Received {
                    ack_id: received.ack_id,
                    message_id: message.message_id,
                    delivery,
                }
            })
            .collect())
    }

    fn acknowledge(&self, ack_ids: &[String]) -> Result<(), ApiError> {
        let path = format!("{}:acknowledge", self.subscription);
        self.call(
            &self.calls,
            "POST",
            &path,
            Some(json!({ "ackIds": ack_ids })),
        )
        .map(drop)
    }

    /// One call whose JSON answer is read as a generic value.
    fn call(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let text = self.call_text(agent, method, path, body)?;
        Ok(parse_answer(&text))
    }

    /// One call, with one retry after a 401 (the token may have been revoked
    /// or expired early); the text of a successful answer.
    fn call_text(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<String, ApiError> {
        let body = body.map(|b| b.to_string());
        let mut token = self.token()?;
        for attempt in 0..2 {
            match self.send(agent, method, path, body.as_deref(), token.as_deref()) {
                Err(ApiError::Status { code: 401, .. })
                    if attempt == 0 && self.tokens.is_some() =>
                {
                    if let (Some(tokens), Some(rejected)) = (&self.tokens, &token) {
                        tokens.invalidate(rejected);
                    }
                    token = self.token()?;
                }
                other => return other,
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn token(&self) -> Result<Option<String>, ApiError> {
        self.tokens
            .as_ref()
            .map(|tokens| tokens.token().map_err(ApiError::Auth))
            .transpose()
    }

    fn send(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> Result<String, ApiError> {
        let url = format!("{}/v1/{path}", self.endpoint);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let request = request
            .header("Content-Type", "application/json")
            .body(body.unwrap_or("").as_bytes().to_vec())
            .map_err(|err| ApiError::Transport(format!("bad request for {url}: {err}")))?;
        let mut response = agent
            .run(request)
            .map_err(|err| ApiError::Transport(format!("{method} {url}: {err}")))?;
        let code = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(16 * 1024 * 1024)
            .read_to_string()
            .map_err(|err| {
                ApiError::Transport(format!("{method} {url}: unreadable answer: {err}"))
            })?;
        if (200..300).contains(&code) {
            return Ok(text);
        }
        let value = parse_answer(&text);
        // Google's error shape: {"error":{"code","message","status"}}.
        let error = &value["error"];
        Err(ApiError::Status {
            code,
            status: error["status"].as_str().unwrap_or("").to_string(),
            message: error["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(200).collect()),
        })
    }
}

/// An answer's JSON, or the raw text kept under `raw` when it is not JSON
/// (a proxy's error page, say), so it can still be shown.
fn parse_answer(text: &str) -> Value {
    if text.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| json!({ "raw": text }))
    }
}

/// Exponential backoff with full jitter: a random pause between zero and a
/// ceiling that doubles per failure, so many instances recovering from the
/// same outage do not retry in step.
struct Backoff {
    base: Duration,
    cap: Duration,
    ceiling: Duration,
}

impl Backoff {
    fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            ceiling: base,
        }
    }

    fn next(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.cap);
        ceiling.mul_f64(random_fraction())
    }

    fn reset(&mut self) {
        self.ceiling = self.base;
    }
}

fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// The last `capacity` message ids, for dropping redeliveries in bounded memory.
struct RecentIds {
    capacity: usize,
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    fn new(capacity: usize) -> RecentIds {
        RecentIds {
            capacity,
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// True when `id` was not seen recently (and remembers it).
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_drop_repeats_and_forget_the_oldest() {
        let mut recent = RecentIds::new(2);
        assert!(recent.insert("a"));
        assert!(!recent.insert("a"));
        assert!(recent.insert("b"));
        assert!(recent.insert("c"));
        assert!(recent.insert("a"), "a was forgotten when c arrived");
        assert!(recent.set.len() <= 2 && recent.order.len() <= 2);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let pauses: Vec<Duration> = (0..6).map(|_| backoff.next()).collect();
        let ceilings = [100, 200, 400, 800, 800, 800];
        for (pause, ceiling) in pauses.iter().zip(ceilings) {
            assert!(
                *pause <= Duration::from_millis(ceiling),
                "{pause:?} > {ceiling} ms"
            );
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
