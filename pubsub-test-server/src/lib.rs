//! A strict, in-memory emulation of Google Cloud Pub/Sub's REST API v1, for tests.
//!
//! Modules, top to bottom (each uses only modules below it; `tests/layering.rs` checks):
//! * `lib`: the public API: [`PubSubTestServer`] with its knobs and inspection methods,
//!   [`Options`], [`Auth`]; the acceptor thread; re-exports of the public types below.
//! * `api`: the HTTP front, run on each request's own thread: routing, the fault knobs,
//!   the `/v1` Pub/Sub methods.
//! * `auth`: the service-account token endpoint (`/token`) and the bearer check of `/v1`.
//! * `federation`: the STS token exchange and IAM's `generateAccessToken`.
//! * `state`: the in-memory model (`State`), and `Shared`, which guards it and holds the
//!   server's fixed configuration.
//! * `trust`: whom the server trusts and how it checks their JWTs (a service account's
//!   key, a workload identity provider's issuer, [`Federation`]).
//! * `records`: the plain data tests read back ([`RequestRecord`], [`Credential`],
//!   [`VerifiedJwt`], [`StsExchange`], [`Impersonation`]).
//! * `fly`: [`FlyMachineApi`], the Fly Machine API stand-in (a server of its own).
//! * `oauth`: OAuth 2.0 on the wire: bearer headers, form bodies, OAuth-style errors.
//! * `json`: strict reading of request bodies under proto3's JSON mapping.
//! * `reply`: what the server answers: a JSON reply, Google's error shape, [`Refusal`].
//! * `percent`: percent-decoding of paths, queries and forms.
//! * `keys`: throw-away service-account keys ([`TestKey`]) and random bytes.
//! * `time`: RFC 3339 timestamps and the Unix clock.
//!
//! Skywatch talks to Pub/Sub over plain HTTP+JSON. This machine (and CI) cannot reach
//! Google, so the tests run Skywatch against this server instead. It follows Google's
//! public REST reference, <https://cloud.google.com/pubsub/docs/reference/rest>:
//!
//! * `projects.topics`: `create` (PUT), `get`, `delete`, `list`, `publish`, and
//!   `projects.topics.subscriptions.list`;
//! * `projects.subscriptions`: `create` (PUT), `get`, `delete`, `list`, `pull`,
//!   `acknowledge`, `modifyAckDeadline`;
//! * the resource types `Topic`, `Subscription`, `PubsubMessage`, `ReceivedMessage`,
//!   `ExpirationPolicy`, and Google's JSON error shape (`google.rpc.Status`).
//!
//! It is deliberately *as strict as the real service* (names, field ranges, unknown JSON
//! fields, base64, request limits), because a lenient fake lets client bugs through that
//! production would reject. Where the fake knowingly differs it says so below or in the
//! docs of the item concerned.
//!
//! With [`Auth::Verify`] it also plays Google's OAuth 2.0 token endpoint for service
//! accounts (<https://developers.google.com/identity/protocols/oauth2/service-account>):
//! a JWT-bearer assertion signed with the service account's key is exchanged for an
//! access token, and the `/v1` API then demands `Authorization: Bearer`, accepting those
//! access tokens or self-signed service-account JWTs ("JWT access without OAuth").
//!
//! With [`Auth::WorkloadIdentity`] it plays Google's keyless path instead: the Security
//! Token Service's token exchange (`POST /v1/token`) and IAM Credentials'
//! `generateAccessToken`, verifying OIDC tokens signed by [`FlyMachineApi`], a stand-in
//! for the Fly Machine API on a Unix socket (see the `federation` and `fly` modules).
//!
//! Test knobs ([`PubSubTestServer::fail_next`], [`PubSubTestServer::set_delay`],
//! [`PubSubTestServer::set_pull_fill_wait`], [`PubSubTestServer::delete_subscription`],
//! ...) inject the failures and timings a client must survive, and inspection methods
//! ([`PubSubTestServer::published`], [`PubSubTestServer::requests`],
//! [`PubSubTestServer::wait_for`], ...) let tests observe the outcome without sleeping.
//!
//! # Not emulated
//! Push, BigQuery and Cloud Storage subscriptions, filters, dead-letter and retry
//! policies, exactly-once delivery, detached subscriptions, schemas, snapshots and seek,
//! `patch` methods, IAM, streaming pull (gRPC only anyway), message retention expiry,
//! subscription expiry after inactivity, list paging (lists return everything at once),
//! per-key ordering guarantees (messages are simply delivered in publish order), and the
//! `fields` response filter (accepted and ignored). Requests asking for a feature that
//! would change delivery semantics are answered `400 INVALID_ARGUMENT` saying "not
//! emulated", so a test fails loudly instead of silently passing.
//!
//! # Known differences
//! * `data` must be standard base64 with padding, the form the reference documents;
//!   Google's proto3 JSON parser would also take URL-safe or unpadded base64.
//! * A wrong HTTP method on a known path is `405` (status `UNIMPLEMENTED`, with an
//!   `Allow` header); Google's front end answers such requests with a 404.
//! * Project IDs of 1-30 characters are accepted (Google requires 6-30) so that short
//!   test projects work; project numbers are accepted too.
//! * Error messages imitate Google's wording but are not byte-identical; clients should
//!   branch on `error.code` / `error.status` anyway.
//! * The fault knobs (`fail_next`, `set_delay`) act on `/v1` calls only, not on `/token`.
//! * By default a pull answers as soon as any message is deliverable; the real service
//!   may hold it a little longer to fill the batch. [`Options::pull_fill_wait`] models
//!   that hold.
//!
//! The whole server is blocking `std` threads: one acceptor thread and one thread per
//! request (pulls block), all state behind one `Mutex` + `Condvar`.

mod api;
mod auth;
mod federation;
mod fly;
mod json;
mod keys;
mod oauth;
mod percent;
mod records;
mod reply;
mod state;
mod time;
mod trust;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use fly::{FlyMachineApi, OidcRequest};
pub use keys::{TestKey, generate_test_key, service_account_json};
pub use records::{Credential, Impersonation, RequestRecord, StsExchange, VerifiedJwt};
pub use reply::Refusal;
pub use trust::Federation;

use state::{Shared, State};

/// How the server is configured. Build it with `Options { .., ..Default::default() }`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Whether `/v1` calls need an `Authorization: Bearer` token.
    pub auth: Auth,
    /// How long an empty `pull` is held open before it answers `{}`. The real service
    /// holds for roughly 90 s; the default here is 10 s so tests finish sooner.
    pub max_pull_hold: Duration,
    /// Answer every `pull` at once, as some emulators do, even when
    /// `returnImmediately` is false. Lets a client's busy-loop back-off be tested.
    /// Overrides [`Options::pull_fill_wait`].
    pub pulls_return_immediately: bool,
    /// How long a `pull` that has messages to return is held to fill its batch, counted
    /// from when the pull began, as the real service may hold a pull for a moment before
    /// answering. Zero (the default) answers as soon as any message is deliverable.
    ///
    /// When non-zero, a pull that finds messages, or is woken by their arrival, answers
    /// once this much time has passed since it began, or as soon as `maxMessages`
    /// messages are deliverable, whichever comes first, with everything deliverable by
    /// then (up to `maxMessages`), including messages published during the hold. A pull
    /// that is still empty when the wait is over answers as soon as a message arrives.
    /// No pull is held past [`Options::max_pull_hold`], and `returnImmediately` pulls
    /// (or [`Options::pulls_return_immediately`]) never wait. Messages stay deliverable
    /// to every pull until one answers with them, so concurrent held pulls share them
    /// out rather than each waiting on the same ones. Outages, deletion and shutdown
    /// end held pulls as usual. Changed at run time with
    /// [`PubSubTestServer::set_pull_fill_wait`].
    pub pull_fill_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: Auth::None,
            max_pull_hold: Duration::from_secs(10),
            pulls_return_immediately: false,
            pull_fill_wait: Duration::ZERO,
        }
    }
}

/// Authentication mode.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Emulator mode: like the official Pub/Sub emulator, no credentials are needed and
    /// any `Authorization` header is ignored. `/token` answers 404.
    None,
    /// Every `/v1` call needs `Authorization: Bearer <token>` where the token is either an
    /// access token issued by this server's `/token` endpoint, or a self-signed JWT of the
    /// service account `client_email`, verified (RS256) with `public_key_pem`.
    Verify {
        /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`) or PKCS#1 PEM of the account's key.
        public_key_pem: String,
        /// The service account's e-mail, expected as the JWTs' `iss` (and `sub`).
        client_email: String,
    },
    /// Keyless: every `/v1` call needs `Authorization: Bearer <token>` with a token this
    /// server issued at its STS endpoint (`/v1/token`, for an OIDC token of the trusted
    /// issuer) or at `generateAccessToken` (for such a federated token). `/token` answers
    /// 404. See [`Federation`].
    WorkloadIdentity(Federation),
}

/// A running Pub/Sub REST test server on a loopback port. Dropping it stops it.
pub struct PubSubTestServer {
    shared: Arc<Shared>,
    http: Arc<tiny_http::Server>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl PubSubTestServer {
    /// Starts a server on `127.0.0.1` with an ephemeral port.
    pub fn start(opts: Options) -> std::io::Result<PubSubTestServer> {
        Self::start_on("127.0.0.1:0", opts)
    }

    /// Starts a server on the given address (used by the `pubsub-test-server` binary).
    pub fn start_on(addr: impl ToSocketAddrs, opts: Options) -> std::io::Result<PubSubTestServer> {
        let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
        })?;
        let (verifier, federation) = match &opts.auth {
            Auth::None => (None, None),
            Auth::Verify {
                public_key_pem,
                client_email,
            } => (
                Some(trust::Verifier::new(public_key_pem, client_email)?),
                None,
            ),
            Auth::WorkloadIdentity(federation) => {
                (None, Some(trust::Trust::new(federation.clone())?))
            }
        };
        let http = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
        let addr = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("server is not bound to an IP address"))?;
        let http = Arc::new(http);
        let mut state = State::new();
        state.pull_fill_wait = opts.pull_fill_wait;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            max_pull_hold: opts.max_pull_hold,
            pulls_return_immediately: opts.pulls_return_immediately,
            verifier,
            federation,
            base_url: format!("http://{addr}"),
            shutdown: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            let http = Arc::clone(&http);
            std::thread::Builder::new()
                .name("pubsub-test-server-accept".into())
                .spawn(move || accept_loop(&shared, &http))?
        };
        Ok(PubSubTestServer {
            shared,
            http,
            addr,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"http://127.0.0.1:PORT"`: the root to put in front of `/v1/...`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The OAuth token endpoint to put in a service-account key file: `base_url() + "/token"`.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.shared.base_url)
    }

    /// The next `n` `/v1` calls answer `status` with Google's error JSON (503 ->
    /// `UNAVAILABLE`, 429 -> `RESOURCE_EXHAUSTED`, 500 -> `INTERNAL`, others mapped the
    /// same way), whatever they asked and whether or not they were authorized.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut state = self.shared.lock();
        state.fail_next = n;
        state.fail_status = status;
        self.shared.notify(&mut state);
    }

    /// An outage: for the next `d`, every `/v1` call answers `status` with Google's
    /// error JSON, and pulls already held answer it at once, as when the service is
    /// down. Calls made after `d` work again.
    pub fn fail_for(&self, d: Duration, status: u16) {
        let mut state = self.shared.lock();
        state.outage_until = Some(Instant::now() + d);
        state.outage_status = status;
        self.shared.notify(&mut state);
    }

    /// The next `n` creates of a topic or subscription answer 409 with status
    /// `ABORTED` (a transient conflict, which Google maps to the same HTTP code
    /// as `ALREADY_EXISTS`), and create nothing.
    pub fn abort_next_creates(&self, n: usize) {
        let mut state = self.shared.lock();
        state.abort_creates = n;
        self.shared.notify(&mut state);
    }

    /// While `on`, every topic create answers 403 `PERMISSION_DENIED`, whether
    /// or not the topic exists: what a role without `pubsub.topics.create`
    /// (a least-privilege custom role) gets.
    pub fn deny_topic_creates(&self, on: bool) {
        let mut state = self.shared.lock();
        state.deny_topic_creates = on;
        self.shared.notify(&mut state);
    }

    /// While `Some`, every publish is refused with `refusal` and stores
    /// nothing, as a project the service will not serve answers (billing
    /// disabled, a region forbidden by policy, a missing role); `None` lifts it.
    pub fn refuse_publishes(&self, refusal: Option<Refusal>) {
        let mut state = self.shared.lock();
        state.publish_refusal = refusal;
        self.shared.notify(&mut state);
    }

    /// The next `n` publishes are stored (their subscribers get the messages)
    /// but answered `503 UNAVAILABLE`, as when the answer is lost on its way
    /// back or arrives after the client's timeout: a client that retries
    /// stores the same messages a second time, under new message ids.
    pub fn lose_next_publish_answers(&self, n: usize) {
        let mut state = self.shared.lock();
        state.lose_publish_answers = n;
        self.shared.notify(&mut state);
    }

    /// Sleeps `d` before answering each later `/v1` call (zero turns it off).
    pub fn set_delay(&self, d: Duration) {
        let mut state = self.shared.lock();
        state.delay = d;
        self.shared.notify(&mut state);
    }

    /// Sets [`Options::pull_fill_wait`]: how long a pull with messages to return is held
    /// to fill its batch (zero turns it off). Pulls already held use the new value from
    /// now on, still counted from when each of them began.
    pub fn set_pull_fill_wait(&self, d: Duration) {
        let mut state = self.shared.lock();
        state.pull_fill_wait = d;
        self.shared.notify(&mut state);
    }

    /// Deletes a subscription as if someone deleted it underneath the client; held
    /// pulls on it answer 404. Returns whether it existed.
    pub fn delete_subscription(&self, full_name: &str) -> bool {
        let mut state = self.shared.lock();
        let existed = state.subscriptions.remove(full_name).is_some();
        self.shared.notify(&mut state);
        existed
    }

    /// Deletes a topic as if someone deleted it underneath the client. As in the real
    /// service, its subscriptions survive with topic `_deleted-topic_`.
    pub fn delete_topic(&self, full_name: &str) -> bool {
        let mut state = self.shared.lock();
        let existed = state.delete_topic(full_name);
        self.shared.notify(&mut state);
        existed
    }

    /// Makes every access token issued so far, and every self-signed JWT seen so far or
    /// issued (`iat`) before the current second, fail with 401, as when Google revokes
    /// or expires a token early. Lets tests check refresh-on-401.
    pub fn reject_tokens_issued_before_now(&self) {
        let mut state = self.shared.lock();
        state.revoke_tokens();
        self.shared.notify(&mut state);
    }

    /// The next `n` acknowledge calls answer 200 but acknowledge nothing, as
    /// when an ack is lost on the way: the messages are redelivered once their
    /// ack deadline passes (or at once, with [`Self::expire_ack_deadlines`]).
    pub fn ignore_next_acks(&self, n: usize) {
        let mut state = self.shared.lock();
        state.ignore_acks = n;
        self.shared.notify(&mut state);
    }

    /// Ends every outstanding lease now, so unacknowledged messages are
    /// redelivered on the next pull instead of after their ack deadline.
    pub fn expire_ack_deadlines(&self) {
        let mut state = self.shared.lock();
        let far_future = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        for sub in state.subscriptions.values_mut() {
            sub.expire_leases(far_future);
        }
        self.shared.notify(&mut state);
    }

    /// Access tokens issued from now on live `d` (and `/token` and the STS say so in
    /// `expires_in`, `generateAccessToken` in `expireTime`, when `d` is shorter than it
    /// was asked for), to test renewal ahead of expiry without waiting an hour.
    pub fn set_access_token_lifetime(&self, d: Duration) {
        let mut state = self.shared.lock();
        state.token_lifetime = d;
        self.shared.notify(&mut state);
    }

    /// Every JWT that passed verification so far, first sightings only, in order.
    pub fn verified_jwts(&self) -> Vec<VerifiedJwt> {
        self.shared.lock().verified_jwts.clone()
    }

    /// While `Some((status, error))`, the STS endpoint answers every well-formed exchange
    /// of a valid token `status` with the OAuth error code `error` (e.g. `(400,
    /// "invalid_grant")`, or `(400, "unauthorized_client")` as for a failed attribute
    /// condition) and issues nothing. `None` lifts the refusal.
    pub fn set_sts_refusal(&self, refusal: Option<(u16, &str)>) {
        let mut state = self.shared.lock();
        state.sts_refusal = refusal.map(|(status, error)| (status, error.to_owned()));
        self.shared.notify(&mut state);
    }

    /// While `on`, `generateAccessToken` answers 403 `PERMISSION_DENIED`, as when the
    /// pool's identities lack `roles/iam.workloadIdentityUser` on the account.
    pub fn set_impersonation_refusal(&self, on: bool) {
        let mut state = self.shared.lock();
        state.refuse_impersonation = on;
        self.shared.notify(&mut state);
    }

    /// Every token exchange the STS endpoint answered, in order.
    pub fn sts_exchanges(&self) -> Vec<StsExchange> {
        self.shared.lock().sts_exchanges.clone()
    }

    /// Every `generateAccessToken` call answered, in order.
    pub fn impersonations(&self) -> Vec<Impersonation> {
        self.shared.lock().impersonations.clone()
    }

    /// Full names of all topics, sorted.
    pub fn topics(&self) -> Vec<String> {
        self.shared.lock().topics.keys().cloned().collect()
    }

    /// Full names of all subscriptions, sorted.
    pub fn subscriptions(&self) -> Vec<String> {
        self.shared.lock().subscriptions.keys().cloned().collect()
    }

    /// The subscription as `subscriptions.get` would return it.
    pub fn subscription(&self, full_name: &str) -> Option<serde_json::Value> {
        self.shared
            .lock()
            .subscriptions
            .get(full_name)
            .map(|s| s.resource.clone())
    }

    /// The decoded `data` of every message published to the topic, in publish order.
    /// Kept even after the topic is deleted.
    pub fn published(&self, topic_full_name: &str) -> Vec<Vec<u8>> {
        self.shared
            .lock()
            .published
            .get(topic_full_name)
            .cloned()
            .unwrap_or_default()
    }

    /// Messages of the subscription that are pending or delivered but not yet acked.
    pub fn unacked(&self, sub_full_name: &str) -> usize {
        self.shared
            .lock()
            .subscriptions
            .get(sub_full_name)
            .map_or(0, |s| s.unacked())
    }

    /// Pulls currently held open: waiting for a message, or (with
    /// [`Options::pull_fill_wait`]) holding messages while their batch fills. Lets a
    /// test wait until a client is really long-polling before it publishes or deletes
    /// something.
    pub fn held_pulls(&self) -> usize {
        self.shared.lock().held_pulls
    }

    /// Every request answered so far, in order of completion.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Waits until `cond(self)` holds or `timeout` passes; returns whether it held.
    /// `cond` is re-evaluated whenever the server's state changes (condvar, no polling),
    /// so it may call any inspection method.
    pub fn wait_for(&self, timeout: Duration, cond: impl Fn(&PubSubTestServer) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the version before evaluating, so a change made while `cond` runs
            // (it takes the lock itself) is not missed.
            let seen = self.shared.lock().version;
            if cond(self) {
                return true;
            }
            let mut state = self.shared.lock();
            while state.version == seen {
                let now = Instant::now();
                if now >= deadline {
                    drop(state);
                    return cond(self);
                }
                state = self.shared.wait_timeout(state, deadline - now);
            }
        }
    }
}

impl Drop for PubSubTestServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let mut state = self.shared.lock();
            self.shared.notify(&mut state);
        }
        self.http.unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // Held pulls and delays see the shutdown flag and answer at once; give those
        // request threads a moment to finish so a test's next server starts clean.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut state = self.shared.lock();
        while state.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self.shared.wait_timeout(state, deadline - now);
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, http: &tiny_http::Server) {
    loop {
        match http.recv() {
            Ok(request) => {
                {
                    let mut state = shared.lock();
                    state.in_flight += 1;
                }
                let shared_for_thread = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("pubsub-test-server-request".into())
                    .spawn(move || {
                        api::handle(&shared_for_thread, request);
                        let mut state = shared_for_thread.lock();
                        state.in_flight -= 1;
                        shared_for_thread.notify(&mut state);
                    });
                if spawned.is_err() {
                    // The request was moved into the failed closure and dropped, which
                    // closes its connection; the client sees a reset and may retry.
                    let mut state = shared.lock();
                    state.in_flight -= 1;
                }
            }
            // `recv` fails when unblocked by Drop, or on a transient accept error.
            Err(_) if shared.is_shutting_down() => return,
            Err(_) => continue,
        }
    }
}
