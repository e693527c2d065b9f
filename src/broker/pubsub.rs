//! Google Cloud Pub/Sub over its REST API (v1), with ureq: one topic shared
//! by every instance, one subscription per instance.
//!
//! Threads do the work:
//! - the publisher takes alerts from a bounded queue, batches them (up to
//!   [`MAX_BATCH`] or [`BATCH_WINDOW`]) into one `topics.publish` call, and
//!   retries with exponential backoff and jitter until Pub/Sub takes them;
//! - several pullers (PUBSUB_OUTSTANDING_PULLS) keep that many
//!   `subscriptions.pull` requests open at once, each asking for up to
//!   [`MAX_PULL`] messages; each hands every new alert to the fan-out once
//!   (deduplicated by the alert's own id, across all pullers: `dedupe.rs`)
//!   and acknowledges its batch with one call. Several outstanding pulls is Google's advice for
//!   low latency with unary pull: the service may hold a pull a while to
//!   fill a batch, and with one pull everything behind it would wait. The
//!   first puller to run creates the topic and this instance's subscription;
//!   the others wait for it.
//!
//! This instance's own alerts come back through its subscription like
//! everyone else's: one delivery path, so exactly-once to local clients is
//! just the dedupe, at the price of one Pub/Sub round trip.
//!
//! A failed call is handled by what Google says went wrong (its `status`;
//! see [`Failure`]): a passing fault is retried at once with backoff; a
//! problem only a person can fix (billing, a region policy, a missing role)
//! is logged as an error, retried slowly, and named by /readyz, while the
//! alerts wait for at most PUBSUB_PUBLISH_TIMEOUT (600 s, the subscription's
//! retention: older alerts are history, not news).
//!
//! Presence heartbeats share the topic, the queue and the threads; the
//! message attribute `type` (`ALIEN_LANDING` or `PRESENCE`) tells them apart.

use super::dedupe::{SeenAlerts, Sight};
use super::{Broker, Delivery, PublishError};
use crate::auth::{Credentials, TokenError, TokenSource};
use crate::log::{Throttle, suppressed};
use crate::message::Alert;
use crate::metrics::METRICS;
use crate::metrics::Unpublished;
use crate::presence::Heartbeat;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The least room in the queue of alerts (and heartbeats) accepted but not
/// yet published; `PubSubBroker::start`'s `queue_capacity` may ask for more. While
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
/// How long Pub/Sub keeps a message no one acknowledged (the subscription's
/// `messageRetentionDuration`, and the least Pub/Sub allows).
pub const RETENTION: Duration = Duration::from_secs(600);
/// Backoff after a failure that may pass by itself.
const QUICK_RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));
/// Backoff after a failure that waits for a person (Google's clients wait at
/// most 60 s between tries): slow enough to cost nothing, fast enough to
/// carry on soon after the fix.
const SLOW_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// The `type` attribute of each kind of message on the topic.
const ALERT_TYPE: &str = "ALIEN_LANDING";
const PRESENCE_TYPE: &str = "PRESENCE";

/// Where and as whom to reach Pub/Sub, as the configuration says
/// (`config.rs` makes it from the environment).
#[derive(Debug)]
pub struct PubSubSettings {
    /// API base URL, e.g. `https://pubsub.googleapis.com` or `http://localhost:8085`.
    pub endpoint: String,
    /// None for an emulator, which takes no credentials.
    pub credentials: Option<Credentials>,
    pub project: String,
    pub topic: String,
    pub subscription: String,
    /// Pull requests kept open at once (one puller thread each).
    pub outstanding_pulls: usize,
    /// How long an alert may wait to be published before it is dropped as
    /// history (PUBSUB_PUBLISH_TIMEOUT, at most [`RETENTION`]).
    pub publish_timeout: Duration,
}

pub struct PubSubBroker {
    queue: PublishQueue,
    api: Arc<Api>,
    stop: Sender<Instant>,
    publisher_done: Receiver<()>,
    pullers: Arc<Pullers>,
    health: Arc<Health>,
}

/// Why this instance is not ready, for /readyz: the last failure of each
/// kind of work, cleared by that work's next success.
#[derive(Default)]
struct Health {
    problems: Mutex<Problems>,
}

#[derive(Default)]
struct Problems {
    setup: Option<String>,
    publish: Option<String>,
    pull: Option<String>,
}

#[derive(Clone, Copy)]
enum Work {
    Setup,
    Publish,
    Pull,
}

impl Health {
    fn slot(problems: &mut Problems, work: Work) -> &mut Option<String> {
        match work {
            Work::Setup => &mut problems.setup,
            Work::Publish => &mut problems.publish,
            Work::Pull => &mut problems.pull,
        }
    }

    /// Records why `work` fails. The reason is brief (Google's code and
    /// status, no names of projects, accounts or providers): /readyz is
    /// public, and the log line next to each failure has the whole story.
    fn failed(&self, work: Work, err: &ApiError) {
        let what = match work {
            Work::Setup => "cannot set up the subscription",
            Work::Publish => "publishing fails",
            Work::Pull => "pulling fails",
        };
        let problem = format!("{what}: {} (the log says more)", err.brief());
        *Health::slot(&mut lock(&self.problems), work) = Some(problem);
    }

    fn recovered(&self, work: Work) {
        *Health::slot(&mut lock(&self.problems), work) = None;
    }

    fn problem(&self) -> Option<String> {
        let problems = lock(&self.problems);
        [&problems.setup, &problems.publish, &problems.pull]
            .into_iter()
            .find_map(|p| p.clone())
    }
}

/// What the puller threads share with each other and with shutdown.
struct Pullers {
    subscription: SubscriptionState,
    /// Alerts recently handed to the fan-out, by any puller.
    seen: Mutex<SeenAlerts>,
    /// When the next pull may go after one that came back empty at once.
    next_idle_pull: Mutex<Instant>,
    /// When an idle puller last checked the subscription's topic.
    last_check: Mutex<Instant>,
}

/// Whether this instance's subscription exists, and who is creating it. A
/// mutex and a condition variable, so that one puller creates while the
/// others wait, retries after a failure are paced for all pullers together,
/// and a shutdown never races a create: it waits for one in progress, and
/// none starts after it.
struct SubscriptionState {
    state: Mutex<Setup>,
    changed: Condvar,
}

struct Setup {
    subscribed: bool,
    in_progress: bool,
    stopping: bool,
    /// After a failed create, no puller tries again before this.
    retry_at: Option<Instant>,
    quick: Backoff,
    slow: Backoff,
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
    /// Memory this broker may use beyond the queues: the dedupe's alert ids.
    pub const MEMORY_RESERVE: u64 = super::dedupe::MAX_BYTES;

    /// Starts the publisher and puller threads. Returns at once: the
    /// subscription is created by the puller, which retries until Pub/Sub
    /// answers; /readyz says when it has. `queue_capacity` is the room in the
    /// publish queue (at least [`MIN_PUBLISH_QUEUE`]).
    pub fn start(
        settings: PubSubSettings,
        queue_capacity: usize,
        deliveries: Sender<Delivery>,
    ) -> std::io::Result<PubSubBroker> {
        let outstanding_pulls = settings.outstanding_pulls.max(1);
        let publish_timeout = settings.publish_timeout.min(RETENTION);
        let (queue, queue_rx) = PublishQueue::new(queue_capacity.max(MIN_PUBLISH_QUEUE));
        let queued = Arc::clone(&queue.queued);
        let health = Arc::new(Health::default());
        let api = Arc::new(Api::new(settings));
        let (stop_tx, stop_rx) = bounded(1);
        let (done_tx, done_rx) = bounded(1);
        // Closed (never sent on) once the subscription first exists.
        let (subscribed_tx, subscribed_rx) = bounded::<()>(0);
        let pullers = Arc::new(Pullers {
            subscription: SubscriptionState {
                state: Mutex::new(Setup {
                    subscribed: false,
                    in_progress: false,
                    stopping: false,
                    retry_at: None,
                    quick: Backoff::new(QUICK_RETRY.0, Duration::from_secs(2)),
                    slow: Backoff::new(SLOW_RETRY.0, SLOW_RETRY.1),
                    first: Some(subscribed_tx),
                }),
                changed: Condvar::new(),
            },
            seen: Mutex::new(SeenAlerts::new(publish_timeout, RETENTION)),
            next_idle_pull: Mutex::new(Instant::now()),
            last_check: Mutex::new(Instant::now()),
        });
        std::thread::Builder::new()
            .name("pubsub-publisher".into())
            .spawn({
                let (api, health) = (Arc::clone(&api), Arc::clone(&health));
                let pullers = Arc::clone(&pullers);
                move || {
                    let publisher = Publisher {
                        api: &api,
                        subscription: &pullers.subscription,
                        health: &health,
                        stop: &stop_rx,
                        deadline: None,
                        publish_timeout,
                    };
                    publisher.run(&queue_rx, &queued, &subscribed_rx);
                    let _ = done_tx.send(());
                }
            })?;
        for n in 0..outstanding_pulls {
            std::thread::Builder::new()
                .name(format!("pubsub-puller-{n}"))
                .spawn({
                    let (api, pullers) = (Arc::clone(&api), Arc::clone(&pullers));
                    let health = Arc::clone(&health);
                    let deliveries = deliveries.clone();
                    move || {
                        // Staggered starts spread the pulls out in time, and
                        // their connections: an HTTP server with a thread pool
                        // can leave one of several connections opened in the
                        // same instant waiting (tiny_http's, which the test
                        // server runs on, does).
                        std::thread::sleep(PULLER_STAGGER * n as u32);
                        puller(&api, &deliveries, &pullers, &health)
                    }
                })?;
        }
        Ok(PubSubBroker {
            queue,
            api,
            stop: stop_tx,
            publisher_done: done_rx,
            pullers,
            health,
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

    fn readiness(&self) -> Result<(), String> {
        if let Some(problem) = self.health.problem() {
            return Err(problem);
        }
        if !self.pullers.subscription.is_subscribed() {
            return Err(format!("subscribing to {}", self.api.topic));
        }
        Ok(())
    }

    /// Publishes what is still queued (until shortly before `deadline`), then
    /// deletes this instance's subscription so it stops collecting copies.
    fn shutdown(&self, deadline: Instant) {
        let publish_deadline = deadline.checked_sub(DELETE_TIMEOUT).unwrap_or(deadline);
        let _ = self.stop.try_send(publish_deadline);
        if self.publisher_done.recv_deadline(publish_deadline).is_err() {
            // The publisher is inside a call that outlasts the deadline;
            // what waits behind it is lost with the process.
            let left = self.queue.queued.load(Ordering::Acquire);
            METRICS.unpublished(Unpublished::Shutdown, left as u64);
            crate::error!(
                "shutting down with a publish call unfinished and {left} messages queued behind it"
            );
        }
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
    sender: Sender<Queued>,
    /// Messages in the channel: added by `try_push`, taken off by the
    /// publisher as it forms each batch.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// A message waiting to be published, and when it was accepted.
struct Queued {
    accepted: Instant,
    delivery: Delivery,
}

impl PublishQueue {
    fn new(capacity: usize) -> (PublishQueue, Receiver<Queued>) {
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
        let queued = Queued {
            accepted: Instant::now(),
            delivery,
        };
        self.sender.send(queued).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            PublishError::Unavailable
        })
    }
}

/// The publisher thread: takes what is queued, in batches, and publishes
/// each batch until Pub/Sub takes it.
struct Publisher<'a> {
    api: &'a Api,
    /// To reattach the subscription after recreating a deleted topic.
    subscription: &'a SubscriptionState,
    health: &'a Health,
    stop: &'a Receiver<Instant>,
    /// Set when shutdown begins: publish what is queued until then.
    deadline: Option<Instant>,
    publish_timeout: Duration,
}

/// Lines the publisher repeats while a failure lasts: once per 10 s each.
static PUBLISH_RETRIED: Throttle = Throttle::new();
static PUBLISH_REFUSED: Throttle = Throttle::new();

impl Publisher<'_> {
    fn run(mut self, queue: &Receiver<Queued>, queued: &AtomicUsize, subscribed: &Receiver<()>) {
        // A message published before this instance's subscription exists
        // never reaches this instance's clients: hold alerts (in the queue)
        // until then.
        crossbeam_channel::select! {
            recv(subscribed) -> _ => {}
            recv(self.stop) -> at => self.deadline = Some(at.unwrap_or_else(|_| Instant::now())),
        }
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            if self.deadline.is_none() {
                crossbeam_channel::select! {
                    recv(queue) -> queued => match queued {
                        Ok(queued) => batch.push(queued),
                        Err(_) => return,
                    },
                    recv(self.stop) -> at => self.deadline = Some(at.unwrap_or_else(|_| Instant::now())),
                }
            }
            if self.deadline.is_some() {
                // Shutting down: take what is queued without waiting for more.
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(queued) => batch.push(queued),
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
                        Ok(queued) => batch.push(queued),
                        Err(_) => break,
                    }
                }
            }
            queued.fetch_sub(batch.len(), Ordering::AcqRel);
            if self.deadline.is_some_and(|at| Instant::now() >= at) {
                // Out of time: what is left is lost. Count it and say so,
                // once, rather than start calls the exit would cut short.
                let left =
                    alerts_in(&batch) + queue.try_iter().map(|q| alerts_in(&[q])).sum::<u64>();
                METRICS.unpublished(Unpublished::Shutdown, left);
                crate::error!("shutting down with {left} alerts unpublished: out of time");
                return;
            }
            self.publish_with_retry(&mut batch);
            batch.clear();
        }
    }

    /// Retries until Pub/Sub takes the batch, or its alerts are older than
    /// the publish timeout, or the shutdown deadline comes. How it retries
    /// depends on what failed ([`Failure`]). Gives up at once only on a
    /// request Pub/Sub calls invalid (a bug here), and says so in the log.
    fn publish_with_retry(&mut self, batch: &mut Vec<Queued>) {
        let mut quick = Backoff::new(QUICK_RETRY.0, QUICK_RETRY.1);
        let mut slow = Backoff::new(SLOW_RETRY.0, SLOW_RETRY.1);
        let mut last_error: Option<ApiError> = None;
        loop {
            self.drop_expired(batch, last_error.as_ref());
            if batch.is_empty() {
                return;
            }
            let started = Instant::now();
            let published = self.api.publish(batch);
            METRICS.publish_duration.observe(started.elapsed());
            let err = match published {
                Ok(()) => {
                    METRICS.alerts_published.add(alerts_in(batch));
                    self.health.recovered(Work::Publish);
                    if last_error.is_some() {
                        crate::info!("publishing works again");
                    }
                    return;
                }
                Err(err) => err,
            };
            METRICS.publish_errors.inc();
            self.health.failed(Work::Publish, &err);
            // A heartbeat is not worth a retry: the next one, due within an
            // interval, says the same with newer numbers.
            batch.retain(|queued| matches!(queued.delivery, Delivery::Alert(_)));
            let alerts = batch.len();
            let failure = err.failure();
            match failure {
                Failure::Invalid => {
                    METRICS.unpublished(Unpublished::Invalid, alerts as u64);
                    crate::error!(
                        "Pub/Sub refused a publish as invalid, dropping {alerts} alerts: {err}"
                    );
                    return;
                }
                Failure::NotFound => {
                    // Someone deleted the topic. Recreate it, and reattach
                    // this instance's subscription (Pub/Sub detaches
                    // subscriptions of a deleted topic) before publishing
                    // again, so this instance's clients get the alert. Other
                    // instances reattach theirs within SUBSCRIPTION_CHECK;
                    // alerts in between miss them.
                    crate::warn!("topic {} is missing; creating it", self.api.topic);
                    let api = self.api;
                    let recreated = self.subscription.unless_stopping(|| {
                        api.create_topic().and_then(|()| api.check_subscription())
                    });
                    if let Some(Err(err)) = recreated {
                        crate::warn!("cannot recreate topic {}: {err}", self.api.topic);
                    }
                }
                Failure::Passing => {
                    if let Some(held) = PUBLISH_RETRIED.allow() {
                        crate::warn!(
                            "publish of {alerts} alerts failed, will retry: {err}{}",
                            suppressed(held)
                        );
                    }
                }
                Failure::NeedsPerson => {
                    if let Some(held) = PUBLISH_REFUSED.allow() {
                        crate::error!(
                            "Pub/Sub refuses to publish: {err}; {NEEDS_A_PERSON}, keeping \
                             {alerts} alerts for up to {} s{}",
                            self.publish_timeout.as_secs(),
                            suppressed(held)
                        );
                    }
                }
            }
            last_error = Some(err);
            let pause = match failure {
                Failure::NeedsPerson => slow.next(),
                _ => quick.next(),
            };
            if let Some(at) = self.deadline {
                if Instant::now() + pause >= at {
                    METRICS.unpublished(Unpublished::Shutdown, alerts as u64);
                    crate::error!(
                        "shutting down with {alerts} alerts unpublished: {}",
                        last_error
                            .as_ref()
                            .map_or(String::new(), ToString::to_string)
                    );
                    return;
                }
                std::thread::sleep(pause);
            } else if let Ok(at) = self.stop.recv_timeout(pause) {
                self.deadline = Some(at);
            }
        }
    }

    /// Drops the messages accepted longer ago than the publish timeout: by
    /// now the subscription would have dropped them anyway, and a landing
    /// ten minutes old is history, not news.
    fn drop_expired(&self, batch: &mut Vec<Queued>, last_error: Option<&ApiError>) {
        let timeout = self.publish_timeout;
        let before = alerts_in(batch);
        batch.retain(|queued| queued.accepted.elapsed() < timeout);
        let expired = before - alerts_in(batch);
        if expired > 0 {
            METRICS.unpublished(Unpublished::Expired, expired);
            crate::error!(
                "dropped {expired} alerts still unpublished after {} s (PUBSUB_PUBLISH_TIMEOUT); last error: {}",
                timeout.as_secs(),
                last_error.map_or_else(|| "none".to_string(), ToString::to_string)
            );
        }
    }
}

fn alerts_in(batch: &[Queued]) -> u64 {
    batch
        .iter()
        .filter(|queued| matches!(queued.delivery, Delivery::Alert(_)))
        .count() as u64
}

/// One of the puller threads: makes sure the subscription exists, then
/// pulls, hands new messages to the fan-out, and acknowledges them, until
/// shutdown.
fn puller(api: &Api, deliveries: &Sender<Delivery>, pullers: &Pullers, health: &Health) {
    let mut quick = Backoff::new(QUICK_RETRY.0, Duration::from_secs(2));
    let mut slow = Backoff::new(SLOW_RETRY.0, SLOW_RETRY.1);
    loop {
        match pullers.subscription.ensure(api, health) {
            Subscribed::Yes => {}
            Subscribed::NotYet => continue,
            Subscribed::Stopping => return,
        }
        let started = Instant::now();
        let pulled = api.pull();
        METRICS.pull_duration.observe(started.elapsed());
        match &pulled {
            Ok(_) => health.recovered(Work::Pull),
            Err(_) if pullers.subscription.is_stopping() => {}
            Err(err) => {
                METRICS.pull_errors.inc();
                // A passing failure is retried within 2 s and clears at the
                // next pull; only one that waits for a person makes the
                // instance unready (an idle pull may be held ~90 s, so a
                // reset connection would otherwise show for that long).
                if err.failure() == Failure::NeedsPerson {
                    health.failed(Work::Pull, err);
                }
            }
        }
        match pulled {
            Ok(received) if received.is_empty() => {
                if started.elapsed() < EMPTY_PULL_FAST {
                    pullers.wait_idle_turn();
                }
                // A quiet subscription may be one detached from a deleted and
                // recreated topic: look, once in a while.
                if pullers.check_due()
                    && let Some(Err(err)) = pullers
                        .subscription
                        .unless_stopping(|| api.check_subscription())
                {
                    crate::warn!("cannot check subscription {}: {err}", api.subscription);
                }
            }
            Ok(received) => {
                quick.reset();
                slow.reset();
                let ack_ids: Vec<String> = received.iter().map(|m| m.ack_id.clone()).collect();
                let fresh = pullers.first_copies(received);
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
            Err(err) => match err.failure() {
                Failure::NotFound => {
                    crate::warn!("subscription {} is gone; recreating it", api.subscription);
                    pullers.subscription.lost();
                }
                Failure::NeedsPerson => {
                    if let Some(held) = PULL_REFUSED.allow() {
                        crate::error!(
                            "Pub/Sub refuses to let this instance pull: {err}; {NEEDS_A_PERSON}{}",
                            suppressed(held)
                        );
                    }
                    std::thread::sleep(slow.next());
                }
                Failure::Passing | Failure::Invalid => {
                    if let Some(held) = PULL_FAILED.allow() {
                        crate::warn!("pull failed, will retry: {err}{}", suppressed(held));
                    }
                    std::thread::sleep(quick.next());
                }
            },
        }
    }
}

/// The end of every log line about a failure only a person can fix.
const NEEDS_A_PERSON: &str =
    "this needs a fix in Google Cloud (README: Troubleshooting); retrying slowly";

static PULL_FAILED: Throttle = Throttle::new();
static PULL_REFUSED: Throttle = Throttle::new();
static DEDUPE_FULL: Throttle = Throttle::new();
static SETUP_FAILED: Throttle = Throttle::new();
static SETUP_REFUSED: Throttle = Throttle::new();

impl Pullers {
    /// The alerts and heartbeats of a pulled batch that no puller handed on
    /// before. Alerts are checked under one lock for the whole batch: a
    /// redelivered message may reach two pullers at once, and only one may
    /// hand it on. Heartbeats pass: presence drops stale ones itself.
    fn first_copies(&self, received: Vec<Received>) -> Vec<Delivery> {
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        let mut fresh = Vec::with_capacity(received.len());
        for delivery in received.into_iter().filter_map(|m| m.delivery) {
            if let Delivery::Alert(alert) = &delivery {
                let (sight, forgotten) = seen.first_sight(&alert.id, now);
                if forgotten > 0 {
                    METRICS.dedupe_forgotten_early.add(forgotten as u64);
                    if let Some(held) = DEDUPE_FULL.allow() {
                        crate::warn!(
                            "the dedupe's memory is full ({} alert ids): forgetting the oldest \
                             before the end of its {} s window{}",
                            seen.len(),
                            seen.window().as_secs(),
                            suppressed(held)
                        );
                    }
                }
                if sight == Sight::Again {
                    METRICS.duplicates_dropped.inc();
                    continue;
                }
            }
            fresh.push(delivery);
        }
        METRICS.dedupe_ids.set(seen.len() as i64);
        fresh
    }

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
    /// Creating it failed (logged, and shown by /readyz); the next `ensure`
    /// waits until it is time to try again.
    NotYet,
    Stopping,
}

impl SubscriptionState {
    /// Makes sure the topic and this instance's subscription exist: one
    /// puller creates them while the others wait for it.
    fn ensure(&self, api: &Api, health: &Health) -> Subscribed {
        let mut state = lock(&self.state);
        loop {
            if state.stopping {
                return Subscribed::Stopping;
            }
            if state.subscribed {
                return Subscribed::Yes;
            }
            let wait = match state.retry_at {
                _ if state.in_progress => None,
                Some(at) if at > Instant::now() => Some(at - Instant::now()),
                _ => break,
            };
            state = match wait {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(pause) => {
                    self.changed
                        .wait_timeout(state, pause)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
        state.in_progress = true;
        drop(state);
        let working = InProgress(self);
        let created = api.create_topic().and_then(|()| api.create_subscription());
        // What the create found is recorded before any waiter can start
        // another: one lock from here to the end.
        let mut state = working.finish();
        if state.stopping {
            return Subscribed::Stopping; // shutdown deletes it after this
        }
        match created {
            Ok(()) => {
                crate::info!("subscribed to {} as {}", api.topic, api.subscription);
                health.recovered(Work::Setup);
                state.subscribed = true;
                state.retry_at = None;
                state.quick.reset();
                state.slow.reset();
                drop(state.first.take()); // lets the publisher start
                Subscribed::Yes
            }
            Err(err) => {
                health.failed(Work::Setup, &err);
                // A topic or subscription that cannot be found while
                // creating them means a wrong project id.
                let needs_person =
                    matches!(err.failure(), Failure::NeedsPerson | Failure::NotFound);
                let pause = if needs_person {
                    if let Some(held) = SETUP_REFUSED.allow() {
                        crate::error!(
                            "cannot set up subscription {}: {err}; {NEEDS_A_PERSON}{}",
                            api.subscription,
                            suppressed(held)
                        );
                    }
                    state.slow.next()
                } else {
                    if let Some(held) = SETUP_FAILED.allow() {
                        crate::warn!(
                            "cannot set up subscription {}: {err}{}",
                            api.subscription,
                            suppressed(held)
                        );
                    }
                    state.quick.next()
                };
                state.retry_at = Some(Instant::now() + pause);
                Subscribed::NotYet
            }
        }
    }

    /// Runs `work` on the subscription (a check, a reattach) unless shutdown
    /// has begun, never alongside a create; shutdown waits for it to finish,
    /// so its delete is still the last word.
    fn unless_stopping<T>(&self, work: impl FnOnce() -> T) -> Option<T> {
        let mut state = lock(&self.state);
        while state.in_progress && !state.stopping {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if state.stopping {
            return None;
        }
        state.in_progress = true;
        drop(state);
        let working = InProgress(self);
        let done = work();
        drop(working.finish());
        Some(done)
    }

    /// A pull found the subscription gone: the next `ensure` recreates it.
    fn lost(&self) {
        lock(&self.state).subscribed = false;
    }

    fn is_stopping(&self) -> bool {
        lock(&self.state).stopping
    }

    fn is_subscribed(&self) -> bool {
        lock(&self.state).subscribed
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

/// Work on the subscription in progress. [`InProgress::finish`] ends it;
/// dropped without that (the work panicked), it still ends it: pullers
/// waiting for it, and shutdown, must not wait forever.
struct InProgress<'a>(&'a SubscriptionState);

impl<'a> InProgress<'a> {
    /// Ends the work and returns the state still locked, so that the caller
    /// records what the work found before any waiter sees it ended.
    fn finish(self) -> MutexGuard<'a, Setup> {
        let subscription = self.0;
        std::mem::forget(self);
        let mut state = lock(&subscription.state);
        state.in_progress = false;
        // The waiters run once this lock is released.
        subscription.changed.notify_all();
        state
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).in_progress = false;
        self.0.changed.notify_all();
    }
}

/// A pulled message, decoded.
struct Received {
    ack_id: String,
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
    Auth(TokenError),
}

/// What a failed call means, and so what to do about it, by Google's
/// `status` (or, when an answer has none, such as a proxy's error page, by
/// its HTTP code).
///
/// Google's own Pub/Sub clients retry a publish on ABORTED, CANCELLED,
/// DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE and UNKNOWN
/// (google-cloud-pubsub 2.44.0 on PyPI, `publisher/transports/base.py`), and
/// on nothing else. The HTTP codes are Google's mapping
/// (googleapis-common-protos, `google/rpc/code.proto`): 400 is
/// INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE, and 409 is
/// ALREADY_EXISTS or ABORTED, so the code alone does not say which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// May pass by itself: retried soon, with backoff. Also a call that got
    /// no answer at all (the network, a timeout).
    Passing,
    /// Waits for a person: FAILED_PRECONDITION (billing not enabled, a
    /// resource-location policy that forbids the region), PERMISSION_DENIED
    /// and UNAUTHENTICATED (a role or a key), a token endpoint that refused, and any status
    /// not named here. Logged as an error, retried slowly, shown in /readyz;
    /// alerts wait for the fix up to PUBSUB_PUBLISH_TIMEOUT.
    NeedsPerson,
    /// NOT_FOUND: the topic or subscription is missing; recreate it.
    NotFound,
    /// INVALID_ARGUMENT or OUT_OF_RANGE: Pub/Sub will never take this request
    /// as it is (a bug here). Retrying would only repeat it.
    Invalid,
}

impl ApiError {
    fn failure(&self) -> Failure {
        let (code, status) = match self {
            ApiError::Transport(_) => return Failure::Passing,
            // A token endpoint that refused (a revoked key, a provider that
            // does not trust this app) needs a person; one that did not
            // answer, or answered 5xx, may come back by itself.
            ApiError::Auth(err) if err.refused => return Failure::NeedsPerson,
            ApiError::Auth(_) => return Failure::Passing,
            ApiError::Status { code, status, .. } => (*code, status.as_str()),
        };
        match status {
            "ABORTED" | "CANCELLED" | "DEADLINE_EXCEEDED" | "INTERNAL" | "RESOURCE_EXHAUSTED"
            | "UNAVAILABLE" | "UNKNOWN" => Failure::Passing,
            "NOT_FOUND" => Failure::NotFound,
            "INVALID_ARGUMENT" | "OUT_OF_RANGE" => Failure::Invalid,
            "" => match code {
                404 => Failure::NotFound,
                408 | 429 | 499 | 500..=599 => Failure::Passing,
                _ => Failure::NeedsPerson,
            },
            _ => Failure::NeedsPerson,
        }
    }

    /// What went wrong in a few words that name nothing of the project.
    fn brief(&self) -> String {
        match self {
            ApiError::Status { code, status, .. } => format!("{code} {status}").trim().to_string(),
            ApiError::Transport(_) => "no answer from Pub/Sub".to_string(),
            ApiError::Auth(err) => match err.status {
                Some(status) => format!("no access token: the token endpoint answered {status}"),
                None => "no access token: no answer from the token endpoint".to_string(),
            },
        }
    }

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
            tokens: settings.credentials.map(TokenSource::new),
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
            "messageRetentionDuration": format!("{}s", RETENTION.as_secs()),
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
    fn check_subscription(&self) -> Result<(), ApiError> {
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

    /// The last call, at shutdown: with the token in hand, if it is still
    /// valid, rather than wait for a renewal the shutdown has no time for.
    fn delete_subscription(&self) -> Result<(), ApiError> {
        let token = match self.tokens.as_ref().map(TokenSource::cached) {
            Some(None) => self.token()?,
            cached => cached.flatten(),
        };
        self.send(
            &self.deletes,
            "DELETE",
            &self.subscription,
            None,
            token.as_deref(),
        )
        .map(drop)
    }

    fn publish(&self, batch: &[Queued]) -> Result<(), ApiError> {
        let messages: Vec<Value> = batch
            .iter()
            .map(|queued| {
                let (data, kind) = match &queued.delivery {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_follow_googles_retry_table() {
        let status = |code: u16, status: &str| ApiError::Status {
            code,
            status: status.to_string(),
            message: String::new(),
        };
        for passing in [
            "ABORTED",
            "CANCELLED",
            "DEADLINE_EXCEEDED",
            "INTERNAL",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
            "UNKNOWN",
        ] {
            assert_eq!(
                status(500, passing).failure(),
                Failure::Passing,
                "{passing}"
            );
        }
        for person in [
            "FAILED_PRECONDITION",
            "PERMISSION_DENIED",
            "UNAUTHENTICATED",
        ] {
            assert_eq!(
                status(400, person).failure(),
                Failure::NeedsPerson,
                "{person}"
            );
        }
        assert_eq!(status(400, "INVALID_ARGUMENT").failure(), Failure::Invalid);
        assert_eq!(status(404, "NOT_FOUND").failure(), Failure::NotFound);
        // No status: a proxy's page, judged by its code.
        assert_eq!(status(502, "").failure(), Failure::Passing);
        assert_eq!(status(429, "").failure(), Failure::Passing);
        assert_eq!(status(403, "").failure(), Failure::NeedsPerson);
        assert_eq!(status(400, "").failure(), Failure::NeedsPerson);
        assert_eq!(
            ApiError::Transport("reset".into()).failure(),
            Failure::Passing
        );
        let token_error = |refused| TokenError {
            reason: "no".into(),
            refused,
            status: None,
        };
        assert_eq!(
            ApiError::Auth(token_error(true)).failure(),
            Failure::NeedsPerson
        );
        assert_eq!(
            ApiError::Auth(token_error(false)).failure(),
            Failure::Passing
        );
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
