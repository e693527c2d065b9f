//! Google Cloud Pub/Sub over its REST API (v1), with ureq: one topic shared
//! by every instance, one subscription per instance.
//!
//! Two threads do the work:
//! - the publisher takes alerts from a bounded queue, batches them (up to
//!   [`MAX_BATCH`] or [`BATCH_WINDOW`]) into one `topics.publish` call, and
//!   retries with exponential backoff and jitter until Pub/Sub takes them;
//! - the puller creates the topic and this instance's subscription, then
//!   long-polls `subscriptions.pull`, hands each new message to the fan-out
//!   once (deduplicated by messageId), and acknowledges it.
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
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Alerts (and heartbeats) accepted but not yet published. While Pub/Sub is
/// unreachable they wait here; only when it is full is a client told
/// `broker_unavailable`.
const PUBLISH_QUEUE: usize = 10_000;
/// Most messages in one publish request (Google allows 1,000).
const MAX_BATCH: usize = 100;
/// How long the publisher waits to fill a batch after its first alert.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Most messages asked for in one pull.
const MAX_PULL: usize = 250;
/// Google holds an empty pull for up to about 90 s; the HTTP timeout must be
/// longer, or every quiet minute would look like a failure.
const PULL_TIMEOUT: Duration = Duration::from_secs(100);
/// Timeout of every other call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of the subscription delete at shutdown.
const DELETE_TIMEOUT: Duration = Duration::from_secs(2);
/// An empty pull answered faster than this did not wait (some emulators
/// never do): back off before the next, or the puller would spin.
const EMPTY_PULL_FAST: Duration = Duration::from_millis(500);
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
}

pub struct PubSubBroker {
    queue: Sender<Delivery>,
    api: Arc<Api>,
    ready: Arc<AtomicBool>,
    stop: Sender<Instant>,
    publisher_done: Receiver<()>,
    puller: Arc<PullerState>,
    puller_done: Receiver<()>,
}

/// What shutdown and the puller share, so a shutdown never races the
/// puller re-creating the subscription it is deleting.
#[derive(Default)]
struct PullerState {
    stopping: AtomicBool,
    /// The puller is creating the topic or subscription.
    setting_up: AtomicBool,
}

impl PubSubBroker {
    /// Starts the publisher and puller threads. Returns at once: the
    /// subscription is created by the puller, which retries until Pub/Sub
    /// answers; /readyz says when it has.
    pub fn start(
        settings: PubSubSettings,
        deliveries: Sender<Delivery>,
    ) -> std::io::Result<PubSubBroker> {
        let api = Arc::new(Api::new(settings));
        let (queue_tx, queue_rx) = bounded(PUBLISH_QUEUE);
        let (stop_tx, stop_rx) = bounded(1);
        let (done_tx, done_rx) = bounded(1);
        let (puller_done_tx, puller_done_rx) = bounded(1);
        let puller_state = Arc::new(PullerState::default());
        // Closed (never sent on) once the subscription first exists.
        let (subscribed_tx, subscribed_rx) = bounded::<()>(0);
        let ready = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("pubsub-publisher".into())
            .spawn({
                let api = Arc::clone(&api);
                move || {
                    publisher(&api, &queue_rx, &stop_rx, &subscribed_rx);
                    let _ = done_tx.send(());
                }
            })?;
        std::thread::Builder::new()
            .name("pubsub-puller".into())
            .spawn({
                let (api, ready) = (Arc::clone(&api), Arc::clone(&ready));
                let state = Arc::clone(&puller_state);
                move || {
                    puller(&api, &deliveries, &ready, &state, subscribed_tx);
                    let _ = puller_done_tx.send(());
                }
            })?;
        Ok(PubSubBroker {
            queue: queue_tx,
            api,
            ready,
            stop: stop_tx,
            publisher_done: done_rx,
            puller: puller_state,
            puller_done: puller_done_rx,
        })
    }
}

impl Broker for PubSubBroker {
    fn name(&self) -> &'static str {
        "pubsub"
    }

    fn publish(&self, alert: Alert) -> Result<(), PublishError> {
        self.queue
            .try_send(Delivery::Alert(alert))
            .map_err(|err| match err {
                TrySendError::Full(_) | TrySendError::Disconnected(_) => PublishError::Unavailable,
            })
    }

    fn publish_presence(&self, beat: Heartbeat) {
        let _ = self.queue.try_send(Delivery::Presence(beat));
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Publishes what is still queued (until shortly before `deadline`), then
    /// deletes this instance's subscription so it stops collecting copies.
    fn shutdown(&self, deadline: Instant) {
        self.ready.store(false, Ordering::SeqCst);
        let publish_deadline = deadline.checked_sub(DELETE_TIMEOUT).unwrap_or(deadline);
        let _ = self.stop.try_send(publish_deadline);
        let _ = self.publisher_done.recv_deadline(publish_deadline);
        // SeqCst on both flags: either the puller sees `stopping` before it
        // creates anything, or we see it `setting_up` and let its create
        // finish first, so our delete is the last word.
        self.puller.stopping.store(true, Ordering::SeqCst);
        if self.puller.setting_up.load(Ordering::SeqCst) {
            let _ = self.puller_done.recv_deadline(publish_deadline);
        }
        match self.api.delete_subscription() {
            Ok(()) => crate::info!("deleted subscription {}", self.api.subscription),
            Err(err) => crate::warn!(
                "could not delete subscription {}: {err} (it expires after a day unused)",
                self.api.subscription
            ),
        }
    }
}

fn publisher(
    api: &Api,
    queue: &Receiver<Delivery>,
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

fn puller(
    api: &Api,
    deliveries: &Sender<Delivery>,
    ready: &AtomicBool,
    state: &PullerState,
    subscribed_signal: Sender<()>,
) {
    let mut subscribed_signal = Some(subscribed_signal);
    let mut recent = RecentIds::new(RECENT_IDS);
    let mut errors = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut empty = Backoff::new(Duration::from_millis(50), EMPTY_PULL_FAST);
    let mut subscribed = false;
    let mut last_check = Instant::now();
    loop {
        if !subscribed {
            state.setting_up.store(true, Ordering::SeqCst);
            if state.stopping.load(Ordering::SeqCst) {
                return;
            }
            let created = api.create_topic().and_then(|()| api.create_subscription());
            state.setting_up.store(false, Ordering::SeqCst);
            if state.stopping.load(Ordering::SeqCst) {
                return; // shutdown deletes the subscription after we return
            }
            match created {
                Ok(()) => {
                    crate::info!("subscribed to {} as {}", api.topic, api.subscription);
                    subscribed = true;
                    drop(subscribed_signal.take()); // lets the publisher start
                    errors.reset();
                }
                Err(err) => {
                    crate::warn!("cannot set up subscription {}: {err}", api.subscription);
                    std::thread::sleep(errors.next());
                    continue;
                }
            }
        }
        ready.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let pulled = api.pull();
        METRICS.pull_duration.observe(started.elapsed());
        if pulled.is_err() {
            METRICS.pull_errors.inc();
        }
        match pulled {
            Ok(received) if received.is_empty() => {
                if started.elapsed() < EMPTY_PULL_FAST {
                    std::thread::sleep(empty.next());
                }
                // A quiet subscription may be one detached from a deleted and
                // recreated topic: look, once in a while.
                if last_check.elapsed() >= SUBSCRIPTION_CHECK {
                    last_check = Instant::now();
                    if let Err(err) = api.reattach_subscription() {
                        crate::warn!("cannot check subscription {}: {err}", api.subscription);
                    }
                }
            }
            Ok(received) => {
                empty.reset();
                errors.reset();
                let mut ack_ids = Vec::with_capacity(received.len());
                for message in received {
                    ack_ids.push(message.ack_id);
                    if !recent.insert(&message.message_id) {
                        continue; // a redelivery: its clients already have it
                    }
                    if let Some(delivery) = message.delivery
                        && deliveries.send(delivery).is_err()
                    {
                        return; // the fan-out has stopped: shutting down
                    }
                }
                if let Err(err) = api.acknowledge(&ack_ids) {
                    // Not fatal: Pub/Sub redelivers, and the dedupe drops them.
                    crate::warn!("acknowledge failed: {err}");
                }
            }
            Err(_) if state.stopping.load(Ordering::SeqCst) => return,
            Err(err) if err.status() == Some(404) => {
                ready.store(false, Ordering::SeqCst);
                crate::warn!("subscription {} is gone; recreating it", api.subscription);
                subscribed = false;
            }
            Err(err) => {
                crate::warn!("pull failed: {err}");
                std::thread::sleep(errors.next());
            }
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
            Err(err) if err.status() == Some(409) => Ok(()), // ALREADY_EXISTS
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
            Err(err) if err.status() == Some(409) => Ok(()),
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
        let answer = self.call(
            &self.pulls,
            "POST",
            &path,
            Some(json!({ "maxMessages": MAX_PULL })),
        )?;
        let response: PullResponse = serde_json::from_value(answer)
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

    /// One call, with one retry after a 401 (the token may have been revoked
    /// or expired early).
    fn call(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
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
    ) -> Result<Value, ApiError> {
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
        let value: Value = if text.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }))
        };
        if (200..300).contains(&code) {
            return Ok(value);
        }
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
