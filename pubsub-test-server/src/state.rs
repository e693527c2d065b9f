//! The server's in-memory model: topics, subscriptions with their backlogs and leases,
//! issued tokens, fault knobs and the request log. Everything lives in one [`State`]
//! behind the `Mutex` in [`Shared`], next to the server's fixed configuration; every
//! change is followed by a condvar broadcast so held pulls and `wait_for` re-check.
//!
//! Delivery follows "Subscriber overview" / "Pull subscriptions" in Google's docs: a
//! pulled message is *outstanding* until acked; when its ack deadline passes it becomes
//! deliverable again with the same `messageId` and a new `ackId`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::json::Obj;
use crate::records::{Credential, Impersonation, RequestRecord, StsExchange, VerifiedJwt};
use crate::reply::Refusal;
use crate::trust::{Trust, Verifier};

/// What a subscription whose topic was deleted reports as its topic (as Google does).
pub(crate) const DELETED_TOPIC: &str = "_deleted-topic_";
/// Google issues access tokens valid for one hour and reports 3599 s: the lifetime of
/// every token issued until a test changes it (`set_access_token_lifetime`).
const ACCESS_TOKEN_LIFETIME: u64 = 3599;

/// A published message, shared by every subscription it was delivered to.
pub(crate) struct StoredMessage {
    pub(crate) message_id: String,
    pub(crate) publish_time: String,
    /// Canonical standard base64 of the data; `None` for an empty payload.
    pub(crate) data: Option<String>,
    pub(crate) attributes: Option<Obj>,
    pub(crate) ordering_key: Option<String>,
}

impl StoredMessage {
    /// The `PubsubMessage` JSON, leaving out empty fields as Google's JSON does.
    fn to_json(&self) -> Value {
        let mut m = Obj::new();
        if let Some(data) = &self.data {
            m.insert("data".into(), json!(data));
        }
        if let Some(attributes) = &self.attributes {
            m.insert("attributes".into(), Value::Object(attributes.clone()));
        }
        m.insert("messageId".into(), json!(self.message_id));
        m.insert("publishTime".into(), json!(self.publish_time));
        if let Some(key) = &self.ordering_key {
            m.insert("orderingKey".into(), json!(key));
        }
        Value::Object(m)
    }
}

/// A delivered, not yet acknowledged message.
struct Lease {
    /// Which delivery of the message this is; only the latest delivery's ackId counts.
    delivery: u64,
    deadline: Instant,
    message: Arc<StoredMessage>,
}

pub(crate) struct Subscription {
    /// Distinguishes a subscription from an earlier one of the same name, so ackIds and
    /// held pulls of a deleted subscription never touch its successor.
    pub(crate) uid: u64,
    /// Full name of the topic it receives from; `None` once that topic is deleted.
    pub(crate) topic: Option<String>,
    pub(crate) ack_deadline: Duration,
    /// The resource as `subscriptions.get` returns it.
    pub(crate) resource: Value,
    /// Deliverable messages by publish sequence, so redeliveries keep publish order.
    pending: BTreeMap<u64, Arc<StoredMessage>>,
    /// Outstanding messages by publish sequence.
    leases: HashMap<u64, Lease>,
    next_delivery: u64,
}

/// An ackId decoded: which subscription, message and delivery it acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckId {
    nonce: u64,
    uid: u64,
    seq: u64,
    delivery: u64,
}

impl AckId {
    fn encode(self) -> String {
        let mut bytes = Vec::with_capacity(32);
        for part in [self.nonce, self.uid, self.seq, self.delivery] {
            bytes.extend_from_slice(&part.to_be_bytes());
        }
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `None` when the string cannot be an ackId issued by this server: the real
    /// service rejects such ids with 400, while well-formed but stale ones are ignored.
    pub(crate) fn decode(s: &str, nonce: u64) -> Option<AckId> {
        let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
        if bytes.len() != 32 {
            return None;
        }
        let part = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        let id = AckId {
            nonce: part(0),
            uid: part(1),
            seq: part(2),
            delivery: part(3),
        };
        (id.nonce == nonce).then_some(id)
    }
}

impl Subscription {
    pub(crate) fn new(uid: u64, topic: String, ack_deadline: Duration, resource: Value) -> Self {
        Subscription {
            uid,
            topic: Some(topic),
            ack_deadline,
            resource,
            pending: BTreeMap::new(),
            leases: HashMap::new(),
            next_delivery: 0,
        }
    }

    pub(crate) fn unacked(&self) -> usize {
        self.pending.len() + self.leases.len()
    }

    /// Returns leases whose ack deadline has passed to the deliverable set.
    pub(crate) fn expire_leases(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(lease) = self.leases.remove(&seq) {
                self.pending.insert(seq, lease.message);
            }
        }
    }

    /// When the next outstanding lease expires, if any: a held pull must wake then,
    /// because that message becomes deliverable without any other state change.
    pub(crate) fn next_lease_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    pub(crate) fn has_deliverable(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How many messages a pull could be handed now.
    pub(crate) fn deliverable(&self) -> usize {
        self.pending.len()
    }

    /// Leases up to `max` deliverable messages and returns the `ReceivedMessage`s.
    pub(crate) fn deliver(&mut self, max: usize, now: Instant, nonce: u64) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((seq, message)) = self.pending.pop_first() else {
                break;
            };
            self.next_delivery += 1;
            let ack_id = AckId {
                nonce,
                uid: self.uid,
                seq,
                delivery: self.next_delivery,
            };
            out.push(json!({"ackId": ack_id.encode(), "message": message.to_json()}));
            self.leases.insert(
                seq,
                Lease {
                    delivery: self.next_delivery,
                    deadline: now + self.ack_deadline,
                    message,
                },
            );
        }
        out
    }

    /// Acknowledges the lease `id` names, if it is still the current one.
    pub(crate) fn ack(&mut self, id: AckId) -> bool {
        let current = self
            .leases
            .get(&id.seq)
            .is_some_and(|l| id.uid == self.uid && l.delivery == id.delivery);
        if current {
            self.leases.remove(&id.seq);
        }
        current
    }

    /// Sets a new deadline for the lease `id` names (now + `secs`); 0 makes the message
    /// deliverable at once (a "nack").
    pub(crate) fn modify_deadline(&mut self, id: AckId, secs: u64, now: Instant) -> bool {
        let current = self
            .leases
            .get(&id.seq)
            .is_some_and(|l| id.uid == self.uid && l.delivery == id.delivery);
        if !current {
            return false;
        }
        if secs == 0 {
            if let Some(lease) = self.leases.remove(&id.seq) {
                self.pending.insert(id.seq, lease.message);
            }
        } else if let Some(lease) = self.leases.get_mut(&id.seq) {
            lease.deadline = now + Duration::from_secs(secs);
        }
        true
    }
}

/// State shared by the public handle, the acceptor and the request threads.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Notified (all waiters) on every state change: held pulls and `wait_for` re-check.
    pub(crate) changed: Condvar,
    pub(crate) max_pull_hold: Duration,
    pub(crate) pulls_return_immediately: bool,
    pub(crate) verifier: Option<Verifier>,
    pub(crate) federation: Option<Trust>,
    pub(crate) base_url: String,
    pub(crate) shutdown: AtomicBool,
}

impl Shared {
    /// Locks the state. A panic in some request thread must not wedge every later test
    /// assertion, so a poisoned lock is simply taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a state change and wakes everything that waits on one.
    pub(crate) fn notify(&self, state: &mut State) {
        state.version = state.version.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Whether `/v1` calls need a bearer token.
    pub(crate) fn requires_auth(&self) -> bool {
        self.verifier.is_some() || self.federation.is_some()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Waits on the condvar for at most `timeout`, returning the re-acquired guard.
    pub(crate) fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

pub(crate) struct State {
    /// Bumped on every change; `wait_for` waits for it to move.
    pub(crate) version: u64,
    /// Request threads still running, so Drop can let them finish.
    pub(crate) in_flight: usize,
    /// Pulls currently held open waiting for messages.
    pub(crate) held_pulls: usize,
    /// Random per server, embedded in ackIds so foreign ids are recognised as invalid.
    pub(crate) nonce: u64,
    pub(crate) topics: BTreeMap<String, Value>,
    pub(crate) subscriptions: BTreeMap<String, Subscription>,
    pub(crate) published: HashMap<String, Vec<Vec<u8>>>,
    next_seq: u64,
    next_uid: u64,
    pub(crate) fail_next: usize,
    pub(crate) fail_status: u16,
    /// Creates of topics and subscriptions still to be answered 409 ABORTED.
    pub(crate) abort_creates: usize,
    /// Topic creates answer 403, as for a role without pubsub.topics.create.
    pub(crate) deny_topic_creates: bool,
    /// Every publish is refused with this, storing nothing (`refuse_publishes`).
    pub(crate) publish_refusal: Option<Refusal>,
    /// Publishes still to be stored but answered 503, as when the answer is lost.
    pub(crate) lose_publish_answers: usize,
    /// Every `/v1` call fails with `outage_status` until this instant (an outage).
    pub(crate) outage_until: Option<Instant>,
    pub(crate) outage_status: u16,
    pub(crate) delay: Duration,
    /// How long a pull with messages is held to fill its batch (`Options::pull_fill_wait`).
    pub(crate) pull_fill_wait: Duration,
    pub(crate) requests: Vec<RequestRecord>,
    /// Access tokens issued (by `/token`, the STS or generateAccessToken).
    pub(crate) access_tokens: HashMap<String, IssuedToken>,
    /// Self-signed JWTs accepted so far (to revoke them exactly).
    pub(crate) seen_jwts: HashSet<String>,
    pub(crate) revoked_jwts: HashSet<String>,
    /// Self-signed JWTs with an `iat` (Unix seconds) before this are refused.
    pub(crate) jwt_not_before: u64,
    /// Acknowledge calls still to be answered 200 but ignored (a lost ack).
    pub(crate) ignore_acks: usize,
    /// Lifetime of access tokens issued from now on (Google's: 3599 s).
    pub(crate) token_lifetime: Duration,
    /// Every JWT that passed verification, decoded, in order.
    pub(crate) verified_jwts: Vec<VerifiedJwt>,
    /// Token exchanges the STS endpoint answered, in order.
    pub(crate) sts_exchanges: Vec<StsExchange>,
    /// generateAccessToken calls answered, in order.
    pub(crate) impersonations: Vec<Impersonation>,
    /// While set, the STS refuses every exchange with this status and OAuth error.
    pub(crate) sts_refusal: Option<(u16, String)>,
    /// While true, generateAccessToken answers 403 PERMISSION_DENIED.
    pub(crate) refuse_impersonation: bool,
}

/// An access token this server issued.
#[derive(Clone)]
pub(crate) struct IssuedToken {
    pub(crate) expiry: Instant,
    /// What it was issued as.
    pub(crate) credential: Credential,
    pub(crate) scopes: Vec<String>,
}

impl State {
    /// The status to fail every call with at `now`, while an outage lasts.
    pub(crate) fn outage_at(&self, now: Instant) -> Option<u16> {
        self.outage_until
            .filter(|until| now < *until)
            .map(|_| self.outage_status)
    }

    pub(crate) fn new() -> State {
        State {
            version: 0,
            in_flight: 0,
            held_pulls: 0,
            nonce: u64::from_be_bytes(crate::keys::random_bytes::<8>()),
            topics: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            published: HashMap::new(),
            next_seq: 0,
            next_uid: 0,
            fail_next: 0,
            fail_status: 503,
            abort_creates: 0,
            deny_topic_creates: false,
            publish_refusal: None,
            lose_publish_answers: 0,
            outage_until: None,
            outage_status: 503,
            delay: Duration::ZERO,
            pull_fill_wait: Duration::ZERO,
            ignore_acks: 0,
            token_lifetime: Duration::from_secs(ACCESS_TOKEN_LIFETIME),
            requests: Vec::new(),
            verified_jwts: Vec::new(),
            access_tokens: HashMap::new(),
            seen_jwts: HashSet::new(),
            revoked_jwts: HashSet::new(),
            jwt_not_before: 0,
            sts_exchanges: Vec::new(),
            impersonations: Vec::new(),
            sts_refusal: None,
            refuse_impersonation: false,
        }
    }

    pub(crate) fn next_uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    /// Removes a topic; its subscriptions stay, detached from it, as in the real service.
    pub(crate) fn delete_topic(&mut self, full_name: &str) -> bool {
        if self.topics.remove(full_name).is_none() {
            return false;
        }
        for sub in self.subscriptions.values_mut() {
            if sub.topic.as_deref() == Some(full_name) {
                sub.topic = None;
                sub.resource["topic"] = json!(DELETED_TOPIC);
            }
        }
        true
    }

    /// Stores a message published to `topic` (which must exist) and queues it on every
    /// subscription attached to the topic now. Returns the messageId.
    pub(crate) fn publish(
        &mut self,
        topic: &str,
        data: Vec<u8>,
        data_b64: Option<String>,
        attributes: Option<Obj>,
        ordering_key: Option<String>,
    ) -> String {
        self.next_seq += 1;
        let seq = self.next_seq;
        // Real messageIds are large decimal numbers; starting high catches clients that
        // squeeze them into 32 bits.
        let message_id = (10_000_000_000_000_000 + seq).to_string();
        let message = Arc::new(StoredMessage {
            message_id: message_id.clone(),
            publish_time: crate::time::rfc3339_nanos(SystemTime::now()),
            data: data_b64,
            attributes,
            ordering_key,
        });
        for sub in self.subscriptions.values_mut() {
            if sub.topic.as_deref() == Some(topic) {
                sub.pending.insert(seq, Arc::clone(&message));
            }
        }
        self.published
            .entry(topic.to_owned())
            .or_default()
            .push(data);
        message_id
    }

    /// Makes every token accepted or issued so far invalid (see
    /// `PubSubTestServer::reject_tokens_issued_before_now`).
    pub(crate) fn revoke_tokens(&mut self) {
        self.access_tokens.clear();
        let seen: Vec<String> = self.seen_jwts.drain().collect();
        self.revoked_jwts.extend(seen);
        self.jwt_not_before = crate::time::unix_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_ids_round_trip_and_foreign_ones_are_invalid() {
        let id = AckId {
            nonce: 7,
            uid: 1,
            seq: 2,
            delivery: 3,
        };
        let s = id.encode();
        assert_eq!(AckId::decode(&s, 7), Some(id));
        assert_eq!(AckId::decode(&s, 8), None);
        assert_eq!(AckId::decode("not-an-ack-id", 7), None);
        assert_eq!(AckId::decode("", 7), None);
    }

    #[test]
    fn expired_lease_is_redelivered_with_a_new_ack_id() {
        let mut state = State::new();
        state.topics.insert(
            "projects/p/topics/t".into(),
            json!({"name": "projects/p/topics/t"}),
        );
        let sub = Subscription::new(
            1,
            "projects/p/topics/t".into(),
            Duration::from_secs(10),
            json!({}),
        );
        state
            .subscriptions
            .insert("projects/p/subscriptions/s".into(), sub);
        let id = state.publish(
            "projects/p/topics/t",
            b"x".to_vec(),
            Some("eA==".into()),
            None,
            None,
        );

        let nonce = state.nonce;
        let sub = state
            .subscriptions
            .get_mut("projects/p/subscriptions/s")
            .unwrap();
        let now = Instant::now();
        let first = sub.deliver(10, now, nonce);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0]["message"]["messageId"], json!(id));
        assert!(!sub.has_deliverable());

        sub.expire_leases(now + Duration::from_secs(11));
        let second = sub.deliver(10, now + Duration::from_secs(11), nonce);
        assert_eq!(second[0]["message"]["messageId"], json!(id));
        assert_ne!(second[0]["ackId"], first[0]["ackId"]);

        let stale = AckId::decode(first[0]["ackId"].as_str().unwrap(), nonce).unwrap();
        assert!(!sub.ack(stale), "the first delivery's ackId is stale");
        let current = AckId::decode(second[0]["ackId"].as_str().unwrap(), nonce).unwrap();
        assert!(sub.ack(current));
        assert_eq!(sub.unacked(), 0);
    }
}
