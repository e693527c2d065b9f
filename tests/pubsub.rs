//! The Google Cloud Pub/Sub broker (issue 3), end to end: the real binary
//! against `pubsub-test-server` on loopback, in emulator mode (no auth) and
//! with service-account credentials (JWT-bearer tokens from the test server's
//! `/token`).

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use pubsub_test_server::{
    Auth, Options, PubSubTestServer, Refusal, RequestRecord, TestKey, generate_test_key,
    service_account_json,
};
use serde_json::{Value, json};
use support::{Client, Finished, Server, TempDir, get, key_set, keys, run_to_exit};
use tungstenite::{Error as WsError, Message};

const PROJECT: &str = support::PUBSUB_PROJECT;
const TOPIC: &str = "projects/skywatch-test/topics/ALIEN_NOTIFICATIONS";
const EMAIL: &str = "skywatch@skywatch-test.iam.gserviceaccount.com";
/// Bound for an instance to create its topic and subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for an alert to travel client -> Pub/Sub -> every client.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The issue: exit within 5 s of SIGTERM/SIGINT.
const EXIT_LIMIT: Duration = Duration::from_secs(5);

const ALERT_FIELDS: &[&str] = &["message", "timestamp", "regionCode", "sender", "id"];
const TOPIC_DATA_FIELDS: &[&str] = &["timestamp", "regionCode", "sender", "id"];

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn subscription(alloc: &str) -> String {
    format!("projects/{PROJECT}/subscriptions/ID_{alloc}")
}

fn test_server(opts: Options) -> PubSubTestServer {
    PubSubTestServer::start(opts).expect("start pubsub-test-server")
}

/// The environment of an instance using `ts` as an emulator.
fn emulator_env(ts: &PubSubTestServer, alloc: &str, region: &str) -> Vec<(String, String)> {
    let mut env = support::emulator_env(ts.addr(), alloc, region);
    env.extend([
        // Rate limiting is tested elsewhere; keep it out of the way.
        ("ALERTS_PER_SECOND".into(), "1000".into()),
        ("ALERT_BURST".into(), "1000".into()),
        // Presence heartbeats share the topic; these tests count messages
        // and calls, so they run without them (tests/presence.rs has
        // heartbeats through Pub/Sub).
        ("PRESENCE_INTERVAL_SECS".into(), "0".into()),
        (
            support::WITH_METRICS.0.into(),
            support::WITH_METRICS.1.into(),
        ),
    ]);
    env
}

fn start_emulated(ts: &PubSubTestServer, alloc: &str, region: &str) -> Server {
    let server = Server::start_owned(&emulator_env(ts, alloc, region));
    assert!(
        server.logs().contains("broker: pubsub, "),
        "Pub/Sub was not chosen:\n{}",
        server.logs()
    );
    server
}

fn readyz(server: &Server) -> u16 {
    get(server.addr, "/readyz").status
}

/// Waits for the instance's subscription to exist on the test server (the
/// event), then for /readyz to say 200 (a bounded poll: the flag is set just
/// after the subscription is created and nothing announces it).
fn wait_subscribed(ts: &PubSubTestServer, server: &Server, sub: &str) {
    let found = ts.wait_for(SUBSCRIBE_TIMEOUT, |s| {
        s.subscriptions().iter().any(|name| name == sub)
    });
    assert!(
        found,
        "{sub} not created within {SUBSCRIBE_TIMEOUT:?}; subscriptions {:?}\nrequests {:#?}\n{}",
        ts.subscriptions(),
        ts.requests(),
        server.logs()
    );
    server.wait_ready(SUBSCRIBE_TIMEOUT);
}

/// Reads the next message within `within` and checks it is the alert with
/// `timestamp` from `region`/`sender`; returns its id.
fn expect_alert(
    c: &mut Client,
    within: Duration,
    timestamp: u64,
    region: &str,
    sender: &str,
) -> String {
    let v = next_json(c, within)
        .unwrap_or_else(|| panic!("no message within {within:?}; expected alert {timestamp}"));
    assert_eq!(
        v["message"], "ALIEN_LANDING",
        "expected alert {timestamp}, got {v}"
    );
    assert_eq!(
        keys(&v),
        key_set(ALERT_FIELDS),
        "alert has wrong fields: {v}"
    );
    assert_eq!(v["timestamp"].as_u64(), Some(timestamp), "wrong alert: {v}");
    assert_eq!(v["regionCode"], region, "{v}");
    assert_eq!(v["sender"], sender, "{v}");
    let id = v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("id not a string: {v}"));
    assert!(!id.is_empty(), "empty id: {v}");
    id.to_string()
}

/// The next text message as JSON, or None after `within`. Skips pings and
/// pongs, and retries a read interrupted by a signal (a socket read with a
/// timeout fails with EINTR even under SA_RESTART); panics on anything else.
fn next_json(c: &mut Client, within: Duration) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        match c.poll_until(deadline)? {
            Ok(Message::Text(t)) => {
                return Some(
                    serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text {t:?}: {e}")),
                );
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

fn count(ts: &PubSubTestServer, pred: impl Fn(&RequestRecord) -> bool) -> usize {
    ts.requests().iter().filter(|r| pred(r)).count()
}

fn is_pull(r: &RequestRecord) -> bool {
    r.path.ends_with(":pull")
}

fn is_token(r: &RequestRecord) -> bool {
    r.path == "/token"
}

fn is_v1(r: &RequestRecord) -> bool {
    r.path.starts_with("/v1/")
}

/// A small JSON client for the test server's REST API (emulator mode).
///
/// Open its connection before instances connect: tiny_http 0.12 (under the
/// test server) pins a pool thread per keep-alive connection, and its pool
/// can leave a connection accepted right after another one queued with no
/// thread to serve it for many seconds (seen as a 5 s timeout of the first
/// call here when it was made after two instances had connected).
struct Rest {
    agent: ureq::Agent,
    base: String,
}

impl Rest {
    fn new(ts: &PubSubTestServer) -> Rest {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        Rest {
            agent,
            base: ts.base_url(),
        }
    }

    fn call(&self, ts: &PubSubTestServer, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}/v1/{path}", self.base))
            .header("Content-Type", "application/json")
            .body(body.to_string().into_bytes())
            .expect("request");
        let mut response = self
            .agent
            .run(request)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nrequests {:#?}", ts.requests()));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// The base64-decoded JSON of every message published to `topic`.
fn published_json(ts: &PubSubTestServer, topic: &str) -> Vec<Value> {
    ts.published(topic)
        .iter()
        .map(|data| {
            serde_json::from_slice(data).unwrap_or_else(|e| {
                panic!(
                    "published data is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(data)
                )
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Three instances joined by one topic
// ---------------------------------------------------------------------------

#[test]
fn alert_reaches_every_client_of_three_instances_exactly_once() {
    let ts = test_server(Options::default());
    // An observer subscription of our own, to see the messages as published.
    // Made first: the instances must cope with a topic that already exists,
    // and this client's connection is opened while the test server is idle
    // (see `Rest`).
    let rest = Rest::new(&ts);
    let (status, answer) = rest.call(&ts, "PUT", TOPIC, &json!({}));
    assert_eq!(status, 200, "cannot create the topic: {answer}");
    let (status, answer) = rest.call(
        &ts,
        "PUT",
        &format!("projects/{PROJECT}/subscriptions/observer"),
        &json!({ "topic": TOPIC }),
    );
    assert_eq!(
        status, 200,
        "cannot create the observer subscription: {answer}"
    );

    let a = start_emulated(&ts, "aaaa1111", "ams");
    wait_subscribed(&ts, &a, &subscription("aaaa1111"));
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= support::OUTSTANDING_PULLS));
    // B names its project the other documented way.
    let mut b_env = emulator_env(&ts, "bbbb2222", "syd");
    b_env.retain(|(k, _)| k != "PUBSUB_PROJECT_ID");
    b_env.push(("GOOGLE_CLOUD_PROJECT".into(), PROJECT.into()));
    let b = Server::start_owned(&b_env);
    wait_subscribed(&ts, &b, &subscription("bbbb2222"));
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= 2 * support::OUTSTANDING_PULLS));
    let c = start_emulated(&ts, "cccc3333", "sin");
    wait_subscribed(&ts, &c, &subscription("cccc3333"));
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= 3 * support::OUTSTANDING_PULLS));

    // Two clients on each instance; the first client of A is the sender.
    let mut clients: Vec<(String, Client)> = Vec::new();
    for (name, server) in [("A", &a), ("B", &b), ("C", &c)] {
        for n in 1..=2 {
            clients.push((format!("{name}{n}"), server.client()));
        }
    }

    // Every client gets each alert exactly once: the next message any client
    // reads after the first alert is the second alert, not a second copy.
    let mut ids = Vec::new();
    for timestamp in [1_700_000_000_001u64, 1_700_000_000_002] {
        clients[0].1.send_alert(timestamp);
        let mut seen = Vec::new();
        for (label, client) in &mut clients {
            let v = next_json(client, DELIVERY_TIMEOUT)
                .unwrap_or_else(|| panic!("client {label} got no alert {timestamp}"));
            assert_eq!(v["message"], "ALIEN_LANDING", "{label}: {v}");
            assert_eq!(keys(&v), key_set(ALERT_FIELDS), "{label}: {v}");
            assert_eq!(v["timestamp"].as_u64(), Some(timestamp), "{label}: {v}");
            assert_eq!(v["regionCode"], "ams", "{label}: A's region expected: {v}");
            assert_eq!(v["sender"], "aaaa1111", "{label}: A's id expected: {v}");
            seen.push(v["id"].as_str().unwrap_or_default().to_owned());
        }
        assert!(!seen[0].is_empty(), "alert without an id");
        assert!(
            seen.iter().all(|id| *id == seen[0]),
            "clients saw different ids for one alert: {seen:?}"
        );
        ids.push(seen.swap_remove(0));
    }
    assert_ne!(ids[0], ids[1], "two alerts share an id");
    // And nothing more arrives: no late duplicate from any instance.
    for (label, client) in &mut clients {
        if let Some(extra) = next_json(client, Duration::from_millis(300)) {
            panic!("client {label} got an extra message: {extra}");
        }
    }
    let (id_a, second_a) = (ids[0].clone(), ids[1].clone());

    // On the topic: each alert published once, as base64 JSON of
    // {timestamp, regionCode, sender, id}.
    let published = published_json(&ts, TOPIC);
    assert_eq!(published.len(), 2, "published {published:?}");
    for (message, (timestamp, id)) in published.iter().zip([
        (1_700_000_000_001u64, &id_a),
        (1_700_000_000_002, &second_a),
    ]) {
        assert_eq!(keys(message), key_set(TOPIC_DATA_FIELDS), "{message}");
        assert_eq!(
            message,
            &json!({"timestamp": timestamp, "regionCode": "ams", "sender": "aaaa1111", "id": id})
        );
    }

    // With the attribute type=ALIEN_LANDING.
    let (status, pulled) = rest.call(
        &ts,
        "POST",
        &format!("projects/{PROJECT}/subscriptions/observer:pull"),
        &json!({ "maxMessages": 10, "returnImmediately": true }),
    );
    assert_eq!(status, 200, "{pulled}");
    let received = pulled["receivedMessages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(received.len(), 2, "observer pulled {pulled}");
    for r in &received {
        let message = &r["message"];
        assert_eq!(
            message["attributes"],
            json!({"type": "ALIEN_LANDING"}),
            "{message}"
        );
        let data = BASE64
            .decode(message["data"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("data is not standard base64 ({e}): {message}"));
        let data: Value = serde_json::from_slice(&data).expect("data is JSON");
        assert_eq!(data["sender"], "aaaa1111", "{data}");
    }

    // Every instance acknowledged what it received.
    let acked = ts.wait_for(DELIVERY_TIMEOUT, |s| {
        ["aaaa1111", "bbbb2222", "cccc3333"]
            .iter()
            .all(|alloc| s.unacked(&subscription(alloc)) == 0)
    });
    assert!(acked, "messages left unacknowledged: {:#?}", ts.requests());
}

// ---------------------------------------------------------------------------
// 2. Lifecycle: subscription settings, readiness, clean-up at shutdown
// ---------------------------------------------------------------------------

#[test]
fn subscription_settings_readiness_and_deletion_on_sigterm() {
    let ts = test_server(Options::default());
    // Every call waits 1.5 s: the instance cannot be ready at once.
    ts.set_delay(Duration::from_millis(1500));
    let mut server = start_emulated(&ts, "aaaa1111", "ams");
    assert_eq!(
        readyz(&server),
        503,
        "/readyz must say 503 before the subscription exists"
    );
    ts.set_delay(Duration::ZERO);
    let sub = subscription("aaaa1111");
    wait_subscribed(&ts, &server, &sub);

    assert!(
        ts.topics().contains(&TOPIC.to_string()),
        "{:?}",
        ts.topics()
    );
    let resource = ts.subscription(&sub).expect("subscription exists");
    assert_eq!(resource["topic"], TOPIC, "{resource}");
    assert_eq!(resource["ackDeadlineSeconds"], 10, "{resource}");
    assert_eq!(resource["messageRetentionDuration"], "600s", "{resource}");
    assert_eq!(
        resource["expirationPolicy"],
        json!({"ttl": "86400s"}),
        "{resource}"
    );

    let mut clients = [server.client(), server.client()];
    clients[0].send_alert(7);
    for c in &mut clients {
        let sender = "aaaa1111";
        expect_alert(c, DELIVERY_TIMEOUT, 7, "ams", sender);
    }

    let started = Instant::now();
    server.signal(libc::SIGTERM);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.expect_close_within(EXIT_LIMIT), 1001, "client {i}");
    }
    let status = server
        .wait_exit(EXIT_LIMIT.saturating_sub(started.elapsed()))
        .unwrap_or_else(|| panic!("still running {EXIT_LIMIT:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert_subscription_deleted(&ts, &sub, &server.logs());
}

#[test]
fn sigint_deletes_the_subscription_too() {
    let ts = test_server(Options::default());
    let mut server = start_emulated(&ts, "cccc3333", "fra");
    let sub = subscription("cccc3333");
    wait_subscribed(&ts, &server, &sub);
    // Long-polling, as it is most of its life.
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= support::OUTSTANDING_PULLS));
    let started = Instant::now();
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(EXIT_LIMIT)
        .unwrap_or_else(|| panic!("still running {EXIT_LIMIT:?} after SIGINT"));
    assert!(started.elapsed() <= EXIT_LIMIT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert_subscription_deleted(&ts, &sub, &server.logs());
}

/// The subscription is gone, its DELETE succeeded, and nothing created it
/// again afterwards.
fn assert_subscription_deleted(ts: &PubSubTestServer, sub: &str, logs: &str) {
    let path = format!("/v1/{sub}");
    let requests = ts.requests();
    let delete = requests
        .iter()
        .position(|r| r.method == "DELETE" && r.path == path)
        .unwrap_or_else(|| panic!("no DELETE {path}: {requests:#?}\n{logs}"));
    assert_eq!(requests[delete].status, 200, "{:?}", requests[delete]);
    let recreated: Vec<_> = requests[delete..]
        .iter()
        .filter(|r| r.method == "PUT" && r.path == path)
        .collect();
    assert!(
        recreated.is_empty(),
        "the subscription was created again after its deletion at shutdown: {recreated:?}\n{logs}"
    );
    assert!(
        !ts.subscriptions().iter().any(|s| s == sub),
        "{sub} still exists after shutdown: {:?}\n{logs}",
        ts.subscriptions()
    );
    assert!(!logs.contains("panicked"), "{logs}");
}

// ---------------------------------------------------------------------------
// 3. Service-account authentication
// ---------------------------------------------------------------------------

fn key() -> TestKey {
    generate_test_key().expect("generate an RSA key with openssl")
}

fn auth_server(key: &TestKey) -> PubSubTestServer {
    test_server(Options {
        auth: Auth::Verify {
            public_key_pem: key.public_key_pem.clone(),
            client_email: EMAIL.into(),
        },
        ..Default::default()
    })
}

/// Lines of the private key's PEM body long enough to be unmistakable.
fn secret_lines(key: &TestKey) -> Vec<&str> {
    key.private_key_pem
        .lines()
        .map(str::trim)
        .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
        .collect()
}

fn assert_no_key_material(key: &TestKey, text: &str) {
    for line in secret_lines(key) {
        assert!(
            !text.contains(line),
            "private key material in the output:\n{text}"
        );
    }
}

/// The environment of an instance with credentials against `ts`, minus the
/// credential itself.
fn auth_env(ts: &PubSubTestServer, alloc: &str) -> Vec<(String, String)> {
    vec![
        ("PUBSUB_ENDPOINT".into(), ts.base_url()),
        ("FLY_ALLOC_ID".into(), alloc.into()),
        ("FLY_REGION".into(), "ams".into()),
        ("ALERTS_PER_SECOND".into(), "1000".into()),
        ("ALERT_BURST".into(), "1000".into()),
        ("PRESENCE_INTERVAL_SECS".into(), "0".into()),
    ]
}

/// Every `/v1` request carried a token the test server accepted.
fn assert_all_authorized(ts: &PubSubTestServer, logs: &str) {
    let unauthorized: Vec<_> = ts
        .requests()
        .into_iter()
        .filter(|r| is_v1(r) && (!r.authorized || r.status == 401))
        .collect();
    assert!(
        unauthorized.is_empty(),
        "unauthorized /v1 requests: {unauthorized:#?}\n{logs}"
    );
}

#[test]
fn key_file_tokens_are_cached_and_refreshed_after_a_401() {
    let key = key();
    let ts = auth_server(&key);
    let dir = TempDir::new("key-file");
    let path = dir.write(
        "key.json",
        &service_account_json(&key, PROJECT, EMAIL, &ts.token_uri()),
    );
    let mut env = auth_env(&ts, "aaaa1111");
    env.push((
        "GOOGLE_APPLICATION_CREDENTIALS".into(),
        path.display().to_string(),
    ));
    let server = Server::start_owned(&env);
    assert!(
        server
            .logs()
            .contains("broker: pubsub, credentials from GOOGLE_APPLICATION_CREDENTIALS="),
        "{}",
        server.logs()
    );
    let sub = subscription("aaaa1111");
    wait_subscribed(&ts, &server, &sub);

    let mut c = server.client();
    for t in 1..=5 {
        c.send_alert(t);
    }
    for t in 1..=5 {
        expect_alert(&mut c, DELIVERY_TIMEOUT, t, "ams", "aaaa1111");
    }
    let tokens = count(&ts, is_token);
    assert!(
        (1..=2).contains(&tokens),
        "{tokens} token requests for 5 alerts (expected a cached token): {:#?}",
        ts.requests()
    );
    assert_eq!(
        count(&ts, |r| is_token(r) && r.status != 200),
        0,
        "{:#?}",
        ts.requests()
    );
    assert_all_authorized(&ts, &server.logs());

    // Google revokes the token early: the next call gets 401, takes a new
    // token and retries, and the alert still arrives.
    let before = ts.requests().len();
    ts.reject_tokens_issued_before_now();
    c.send_alert(6);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 6, "ams", "aaaa1111");
    // (A request is recorded just after it takes effect, so the delivery can
    // overtake the record of its publish: wait for it.)
    let published = ts.wait_for(DELIVERY_TIMEOUT, |s| {
        s.requests()[before..]
            .iter()
            .any(|r| is_v1(r) && r.path.ends_with(":publish") && r.status == 200 && r.authorized)
    });
    assert!(
        published,
        "no authorized publish after the revocation: {:#?}",
        &ts.requests()[before..]
    );
    let after: Vec<RequestRecord> = ts.requests()[before..].to_vec();
    let new_tokens = after.iter().filter(|r| is_token(r)).count();
    assert!(
        (1..=2).contains(&new_tokens),
        "{new_tokens} token requests after the revocation: {after:#?}"
    );
    // Only the first use of the revoked token may fail.
    let refused = after.iter().filter(|r| r.status == 401).count();
    assert!(
        refused <= 2,
        "{refused} requests refused after the revocation: {after:#?}"
    );
    assert_no_key_material(&key, &server.logs());
    assert_no_key_material(&key, &server.process.stdout.text());
}

/// The claims of every JWT the client signed, checked one by one against
/// Google's rules for the JWT-bearer grant: RS256 with the key's id, our
/// account as the issuer, the token endpoint as the audience, the Pub/Sub
/// scope, issued now and living at most an hour.
fn assert_jwt_claims(ts: &PubSubTestServer, key: &TestKey) {
    let jwts = ts.verified_jwts();
    assert!(!jwts.is_empty(), "the client signed no JWT");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    for jwt in &jwts {
        let (header, claims) = (&jwt.header, &jwt.claims);
        assert_eq!(header["alg"], "RS256", "{header}");
        assert_eq!(header["typ"], "JWT", "{header}");
        assert_eq!(header["kid"], key.private_key_id.as_str(), "{header}");
        assert_eq!(claims["iss"], EMAIL, "{claims}");
        assert_eq!(claims["aud"], ts.token_uri().as_str(), "{claims}");
        let scopes = claims["scope"].as_str().unwrap_or_default();
        assert!(
            scopes
                .split(' ')
                .any(|s| s == "https://www.googleapis.com/auth/pubsub"),
            "no Pub/Sub scope: {claims}"
        );
        let iat = claims["iat"].as_u64().expect("iat is a number");
        let exp = claims["exp"].as_u64().expect("exp is a number");
        assert!(
            exp > iat && exp - iat <= 3600,
            "lifetime over 1 h: {claims}"
        );
        assert!(iat.abs_diff(now) <= 60, "iat {iat} is not now ({now})");
    }
}

#[test]
fn tokens_are_renewed_ahead_of_expiry_and_claim_what_google_requires() {
    let key = key();
    // Pulls come back every second, so the client makes calls often enough
    // to meet the renewal point of short-lived tokens.
    let ts = test_server(Options {
        auth: Auth::Verify {
            public_key_pem: key.public_key_pem.clone(),
            client_email: EMAIL.into(),
        },
        max_pull_hold: Duration::from_secs(1),
        ..Default::default()
    });
    // Google's tokens live an hour and are renewed 5 minutes ahead; these
    // live 4 s, so the client renews them half-way, after 2 s.
    ts.set_access_token_lifetime(Duration::from_secs(4));
    let mut env = auth_env(&ts, "aaaa1117");
    env.push((
        "GOOGLE_SERVICE_ACCOUNT_JSON".into(),
        service_account_json(&key, PROJECT, EMAIL, &ts.token_uri()),
    ));
    let server = Server::start_owned(&env);
    wait_subscribed(&ts, &server, &subscription("aaaa1117"));

    // Three renewals, each taken before the token in hand expired: the
    // server refuses an expired token with 401, and none was refused.
    let renewed = ts.wait_for(Duration::from_secs(20), |s| {
        s.requests().iter().filter(|r| is_token(r)).count() >= 4
    });
    assert!(renewed, "tokens not renewed: {:#?}", ts.requests());
    let mut c = server.client();
    c.send_alert(7);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 7, "ams", "aaaa1117");
    assert_all_authorized(&ts, &server.logs());
    // Reused, not minted per request.
    let (tokens, calls) = (count(&ts, is_token), count(&ts, is_v1));
    assert!(
        calls >= 2 * tokens,
        "{tokens} tokens for {calls} calls: {:#?}",
        ts.requests()
    );
    assert_jwt_claims(&ts, &key);
    assert_no_key_material(&key, &server.logs());
}

#[test]
fn inline_service_account_json_works() {
    let key = key();
    let ts = auth_server(&key);
    let mut env = auth_env(&ts, "bbbb2222");
    env.push((
        "GOOGLE_SERVICE_ACCOUNT_JSON".into(),
        service_account_json(&key, PROJECT, EMAIL, &ts.token_uri()),
    ));
    let server = Server::start_owned(&env);
    assert!(
        server
            .logs()
            .contains("broker: pubsub, credentials from GOOGLE_SERVICE_ACCOUNT_JSON"),
        "{}",
        server.logs()
    );
    wait_subscribed(&ts, &server, &subscription("bbbb2222"));
    let mut c = server.client();
    c.send_alert(11);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 11, "ams", "bbbb2222");
    assert!(count(&ts, is_token) >= 1, "no token was requested");
    assert_all_authorized(&ts, &server.logs());
    assert_no_key_material(&key, &server.logs());
}

#[test]
fn key_file_in_the_working_directory_is_found() {
    let key = key();
    let ts = auth_server(&key);
    let dir = TempDir::new("cwd-key");
    dir.write(
        "google-service-account.json",
        &service_account_json(&key, PROJECT, EMAIL, &ts.token_uri()),
    );
    let env = auth_env(&ts, "dddd4444");
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start_in(&pairs, Some(dir.path()));
    assert!(
        server
            .logs()
            .contains("broker: pubsub, credentials from ./google-service-account.json"),
        "{}",
        server.logs()
    );
    wait_subscribed(&ts, &server, &subscription("dddd4444"));
    let mut c = server.client();
    c.send_alert(12);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 12, "ams", "dddd4444");
    assert_all_authorized(&ts, &server.logs());
}

// ---------------------------------------------------------------------------
// 4. Bad configuration: exit 2, one line naming the variable, no secrets
// ---------------------------------------------------------------------------

fn check_bad_config(envs: &[(&str, &str)], variable: &str, key: Option<&TestKey>) {
    let out: Finished = run_to_exit(&[], envs);
    let shown = format!("stderr:\n{}\nstdout:\n{}", out.stderr, out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status {:?}\n{shown}",
        out.status
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error\n{shown}");
    assert!(
        lines[0].contains(variable),
        "the error does not name {variable}\n{shown}"
    );
    assert!(!shown.contains("panicked"), "{shown}");
    assert!(!shown.contains("listening on"), "{shown}");
    if let Some(key) = key {
        assert_no_key_material(key, &shown);
    }
}

fn key_file_json(key: &TestKey) -> String {
    service_account_json(key, PROJECT, EMAIL, "http://127.0.0.1:9/token")
}

/// The key file's JSON with `edit` applied to its object.
fn edited_key_json(
    key: &TestKey,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> String {
    let mut value: Value = serde_json::from_str(&key_file_json(key)).expect("key JSON");
    edit(value.as_object_mut().expect("object"));
    serde_json::to_string_pretty(&value).expect("serialize")
}

fn check_bad_key_file(contents: &str, variable: &str, key: &TestKey) {
    let dir = TempDir::new("bad-key");
    let path = dir.write("key.json", contents);
    let path = path.display().to_string();
    check_bad_config(
        &[("GOOGLE_APPLICATION_CREDENTIALS", &path)],
        variable,
        Some(key),
    );
}

#[test]
fn unreadable_key_file_is_a_config_error() {
    let dir = TempDir::new("missing-key");
    let missing = dir.path().join("no-such-key.json").display().to_string();
    check_bad_config(
        &[("GOOGLE_APPLICATION_CREDENTIALS", &missing)],
        "GOOGLE_APPLICATION_CREDENTIALS",
        None,
    );
    // A directory cannot be read as a file either.
    let dir_path = dir.path().display().to_string();
    check_bad_config(
        &[("GOOGLE_APPLICATION_CREDENTIALS", &dir_path)],
        "GOOGLE_APPLICATION_CREDENTIALS",
        None,
    );
}

#[test]
fn key_file_that_is_not_json_is_a_config_error() {
    // The usual mistake: pointing at the PEM instead of the JSON key file.
    let key = key();
    check_bad_key_file(&key.private_key_pem, "GOOGLE_APPLICATION_CREDENTIALS", &key);
}

#[test]
fn key_file_without_private_key_is_a_config_error() {
    let key = key();
    let json = edited_key_json(&key, |o| {
        o.remove("private_key");
    });
    check_bad_key_file(&json, "GOOGLE_APPLICATION_CREDENTIALS", &key);
}

/// The key's PEM with its body corrupted (two lines dropped): still PEM
/// framing, no longer an RSA key.
fn corrupted_pem(key: &TestKey) -> String {
    let lines: Vec<&str> = key.private_key_pem.lines().collect();
    let mut kept: Vec<&str> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if i == 3 || i == 4 {
            continue;
        }
        kept.push(line);
    }
    kept.join("\n") + "\n"
}

#[test]
fn private_key_that_is_not_an_rsa_pem_is_a_config_error() {
    let key = key();
    let broken = corrupted_pem(&key);
    let json = edited_key_json(&key, |o| {
        o.insert("private_key".into(), json!(broken));
    });
    check_bad_key_file(&json, "GOOGLE_APPLICATION_CREDENTIALS", &key);
    let json = edited_key_json(&key, |o| {
        o.insert("private_key".into(), json!("not a key at all"));
    });
    check_bad_key_file(&json, "GOOGLE_APPLICATION_CREDENTIALS", &key);
}

#[test]
fn key_without_project_and_no_project_variable_is_a_config_error() {
    let key = key();
    let json = edited_key_json(&key, |o| {
        o.remove("project_id");
    });
    check_bad_key_file(&json, "PUBSUB_PROJECT_ID", &key);
}

#[test]
fn broken_inline_key_json_is_a_config_error() {
    let key = key();
    // Truncated JSON: the value still holds the whole private key.
    let full = key_file_json(&key);
    let truncated = &full[..full.len() - 20];
    check_bad_config(
        &[("GOOGLE_SERVICE_ACCOUNT_JSON", truncated)],
        "GOOGLE_SERVICE_ACCOUNT_JSON",
        Some(&key),
    );
    // Well-formed JSON with a corrupted key.
    let broken = corrupted_pem(&key);
    let json = edited_key_json(&key, |o| {
        o.insert("private_key".into(), json!(broken));
    });
    check_bad_config(
        &[("GOOGLE_SERVICE_ACCOUNT_JSON", &json)],
        "GOOGLE_SERVICE_ACCOUNT_JSON",
        Some(&key),
    );
}

#[test]
fn emulator_host_with_a_scheme_is_a_config_error() {
    check_bad_config(
        &[
            ("PUBSUB_EMULATOR_HOST", "http://x:1"),
            ("PUBSUB_PROJECT_ID", PROJECT),
        ],
        "PUBSUB_EMULATOR_HOST",
        None,
    );
}

// ---------------------------------------------------------------------------
// 5. Faults
// ---------------------------------------------------------------------------

/// Pub/Sub fails the next `n` calls with `status` just before an alert is
/// sent: the publisher retries and the alert is delivered.
fn check_publish_survives(n: usize, status: u16, alloc: &str) {
    let ts = test_server(Options::default());
    let server = start_emulated(&ts, alloc, "ams");
    wait_subscribed(&ts, &server, &subscription(alloc));
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= support::OUTSTANDING_PULLS));
    let mut c = server.client();
    ts.fail_next(n, status);
    c.send_alert(21);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 21, "ams", alloc);
    let failed = count(&ts, |r| r.status == status);
    assert_eq!(
        failed,
        n,
        "injected failures answered: {:#?}",
        ts.requests()
    );
    assert!(
        count(&ts, |r| r.path.ends_with(":publish") && r.status == status) >= 1,
        "the publish never met the failures: {:#?}",
        ts.requests()
    );
    assert_eq!(published_json(&ts, TOPIC).len(), 1, "published once");
}

#[test]
fn publish_retries_through_503s() {
    check_publish_survives(3, 503, "eeee5551");
}

#[test]
fn publish_retries_through_429s() {
    check_publish_survives(2, 429, "eeee5552");
}

#[test]
fn deleted_subscription_is_recreated() {
    let ts = test_server(Options::default());
    let server = start_emulated(&ts, "ffff6661", "ams");
    let sub = subscription("ffff6661");
    wait_subscribed(&ts, &server, &sub);
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= support::OUTSTANDING_PULLS));
    assert!(ts.delete_subscription(&sub));
    let back = ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.subscriptions().contains(&sub));
    assert!(
        back,
        "{sub} not recreated: {:#?}\n{}",
        ts.requests(),
        server.logs()
    );
    assert!(
        count(&ts, |r| is_pull(r) && r.status == 404) >= 1,
        "the held pull did not see the deletion: {:#?}",
        ts.requests()
    );
    let mut c = server.client();
    c.send_alert(31);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 31, "ams", "ffff6661");
    assert!(server.logs().contains("recreating it"), "{}", server.logs());
}

#[test]
fn deleted_topic_is_recreated_and_alerts_still_arrive() {
    let ts = test_server(Options::default());
    let server = start_emulated(&ts, "ffff6662", "ams");
    let sub = subscription("ffff6662");
    wait_subscribed(&ts, &server, &sub);
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= support::OUTSTANDING_PULLS));
    assert!(ts.delete_topic(TOPIC));
    let mut c = server.client();
    c.send_alert(41);
    // The publisher meets a 404, creates the topic again and publishes.
    let republished = ts.wait_for(DELIVERY_TIMEOUT, |s| {
        s.topics().iter().any(|t| t == TOPIC) && !s.published(TOPIC).is_empty()
    });
    assert!(
        republished,
        "topic not recreated / alert not published: {:#?}\n{}",
        ts.requests(),
        server.logs()
    );
    assert!(
        count(&ts, |r| r.path.ends_with(":publish") && r.status == 404) >= 1,
        "{:#?}",
        ts.requests()
    );
    // ...and the alert reaches this instance's clients. (A subscription of a
    // deleted topic is detached for good: it must be replaced.)
    match next_json(&mut c, DELIVERY_TIMEOUT) {
        Some(v) => {
            assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
            assert_eq!(v["timestamp"], 41, "{v}");
        }
        None => panic!(
            "alert not delivered after the topic was deleted and recreated; \
             the subscription is {}\nrequests {:#?}\n{}",
            ts.subscription(&sub).unwrap_or(Value::Null),
            ts.requests(),
            server.logs()
        ),
    }
}

#[test]
fn alert_sent_while_pubsub_fails_is_delivered_later() {
    let ts = test_server(Options::default());
    // Pub/Sub answers 503 to the first 8 calls from start-up on. (More would
    // take the puller's backoff past this test's time budget.)
    ts.fail_next(8, 503);
    let server = start_emulated(&ts, "ffff6663", "ams");
    assert_eq!(readyz(&server), 503, "ready while Pub/Sub fails");
    let mut c = server.client();
    c.send_alert(51);
    // Accepted (no ERROR reply) and delivered once the failures run out.
    let v = next_text_or_explain(&mut c, Duration::from_secs(9), &ts, &server);
    assert_eq!(v["message"], "ALIEN_LANDING", "expected the alert, got {v}");
    assert_eq!(v["timestamp"], 51, "{v}");
    assert!(
        ts.wait_for(DELIVERY_TIMEOUT, |s| {
            s.requests().iter().filter(|r| r.status == 503).count() == 8
        }),
        "{:#?}",
        ts.requests()
    );
    assert_eq!(readyz(&server), 200);
}

#[test]
fn alerts_sent_during_a_ten_second_outage_arrive_once_afterwards() {
    let ts = test_server(Options::default());
    let a = start_emulated(&ts, "ffff6665", "ams");
    let b = start_emulated(&ts, "ffff6666", "syd");
    wait_subscribed(&ts, &a, &subscription("ffff6665"));
    wait_subscribed(&ts, &b, &subscription("ffff6666"));
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls()
        >= 2 * support::OUTSTANDING_PULLS));
    let mut on_a = a.client();
    let mut on_b = b.client();

    // Pub/Sub answers every call with 503 for 10 s, held pulls included.
    const OUTAGE: Duration = Duration::from_secs(10);
    let outage_start = Instant::now();
    ts.fail_for(OUTAGE, 503);
    // Alerts early in the outage, and more once the publisher has met it
    // (its first attempts failed) and is backing off.
    for t in 61..=63 {
        on_a.send_alert(t);
    }
    let met = ts.wait_for(OUTAGE, |s| {
        s.requests()
            .iter()
            .filter(|r| r.path.ends_with(":publish") && r.status == 503)
            .count()
            >= 2
    });
    assert!(
        met,
        "the publisher never met the outage: {:#?}",
        ts.requests()
    );
    for t in 64..=65 {
        on_a.send_alert(t);
    }
    assert!(
        outage_start.elapsed() < OUTAGE,
        "the alerts were not all sent during the outage"
    );

    // Afterwards both instances' clients get each alert exactly once.
    let within = OUTAGE + Duration::from_secs(20);
    for (label, client) in [("A", &mut on_a), ("B", &mut on_b)] {
        let mut got = Vec::new();
        while got.len() < 5 {
            let Some(v) = next_json(client, within) else {
                panic!(
                    "client of {label} got only {got:?}\nrequests {:#?}\nA: {}\nB: {}",
                    ts.requests(),
                    a.logs(),
                    b.logs()
                );
            };
            assert_eq!(v["message"], "ALIEN_LANDING", "{label}: {v}");
            got.push(v["timestamp"].as_u64().unwrap_or_default());
        }
        got.sort_unstable();
        assert_eq!(got, vec![61, 62, 63, 64, 65], "client of {label}");
    }
    assert!(
        outage_start.elapsed() >= OUTAGE,
        "delivered before the outage ended: the knob did not bite"
    );
    // Nothing twice: one copy of each on the topic, and no late duplicate.
    let mut published: Vec<u64> = published_json(&ts, TOPIC)
        .iter()
        .map(|m| m["timestamp"].as_u64().unwrap_or_default())
        .collect();
    published.sort_unstable();
    assert_eq!(published, vec![61, 62, 63, 64, 65], "published");
    for (label, client) in [("A", &mut on_a), ("B", &mut on_b)] {
        if let Some(extra) = next_json(client, Duration::from_millis(500)) {
            panic!("client of {label} got a second copy: {extra}");
        }
    }
    assert_eq!(readyz(&a), 200);
    assert_eq!(readyz(&b), 200);
}

#[test]
fn alert_sent_before_the_subscription_exists_is_not_lost() {
    let ts = test_server(Options::default());
    // The topic exists, as it does whenever other instances run.
    let rest = Rest::new(&ts);
    let (status, answer) = rest.call(&ts, "PUT", TOPIC, &json!({}));
    assert_eq!(status, 200, "cannot create the topic: {answer}");
    // Pub/Sub is slow (every call takes 500 ms) while the instance starts:
    // its subscription takes two calls (topic, subscription), a publish one.
    ts.set_delay(Duration::from_millis(500));
    let server = start_emulated(&ts, "ffff6664", "ams");
    let mut c = server.client();
    c.send_alert(52);
    // The sender's own clients get the alert they were not told was refused.
    let v = next_text_or_explain(&mut c, Duration::from_secs(8), &ts, &server);
    assert_eq!(v["message"], "ALIEN_LANDING", "expected the alert, got {v}");
    assert_eq!(v["timestamp"], 52, "{v}");
}

/// The next text message as JSON, or a panic showing what Pub/Sub saw.
fn next_text_or_explain(
    c: &mut Client,
    within: Duration,
    ts: &PubSubTestServer,
    server: &Server,
) -> Value {
    next_json(c, within).unwrap_or_else(|| {
        panic!(
            "no message within {within:?}; published {:?}; subscriptions {:?}\nrequests {:#?}\n{}",
            published_json(ts, TOPIC),
            ts.subscriptions(),
            ts.requests(),
            server.logs()
        )
    })
}

// ---------------------------------------------------------------------------
// 6. An emulator that never holds pulls
// ---------------------------------------------------------------------------

#[test]
fn immediate_empty_pulls_do_not_busy_loop() {
    let ts = test_server(Options {
        pulls_return_immediately: true,
        ..Default::default()
    });
    let mut env = emulator_env(&ts, "gggg7777", "ams");
    env.push(("PUBSUB_TOPIC".into(), "custom-alerts".into()));
    let server = Server::start_owned(&env);
    let topic = format!("projects/{PROJECT}/topics/custom-alerts");
    wait_subscribed(&ts, &server, &subscription("gggg7777"));
    assert!(ts.topics().contains(&topic), "{:?}", ts.topics());

    let mut c = server.client();
    c.send_alert(61);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 61, "ams", "gggg7777");

    // Two seconds of idleness: all the outstanding pulls together make at
    // most one pull per 100 ms instead of spinning (20 in 2 s, plus one
    // already on its way per puller). Fails as soon as it passes the bound.
    let base = count(&ts, is_pull);
    let idle = Duration::from_secs(2);
    let limit = 20 + support::OUTSTANDING_PULLS;
    let spun = ts.wait_for(idle, |s| {
        s.requests().iter().filter(|r| is_pull(r)).count() >= base + limit
    });
    let pulls = count(&ts, is_pull) - base;
    assert!(
        !spun,
        "{pulls}+ pulls in {idle:?} of idleness: the puller busy-loops"
    );
    assert!(pulls >= 1, "no pull at all in {idle:?}: the puller stopped");

    c.send_alert(62);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 62, "ams", "gggg7777");
    assert_eq!(published_json(&ts, &topic).len(), 2);
}

// ---------------------------------------------------------------------------
// 7. Redelivery is deduplicated
// ---------------------------------------------------------------------------

#[test]
fn redelivered_message_reaches_clients_once() {
    let ts = test_server(Options::default());
    let server = start_emulated(&ts, "hhhh8888", "ams");
    let sub = subscription("hhhh8888");
    wait_subscribed(&ts, &server, &sub);
    let mut c = server.client();

    // The instance's acknowledgement of the first alert is lost...
    ts.ignore_next_acks(1);
    c.send_alert(71);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 71, "ams", "hhhh8888");
    let acks = |s: &PubSubTestServer| {
        s.requests()
            .iter()
            .filter(|r| r.path.ends_with(":acknowledge") && r.status == 200)
            .count()
    };
    assert!(
        ts.wait_for(DELIVERY_TIMEOUT, |s| acks(s) >= 1),
        "never acknowledged: {:#?}",
        ts.requests()
    );
    assert_eq!(ts.unacked(&sub), 1, "the lost ack still counted");

    // ...so Pub/Sub delivers it again, with the same messageId.
    ts.expire_ack_deadlines();
    let redelivered = ts.wait_for(DELIVERY_TIMEOUT, |s| acks(s) >= 2 && s.unacked(&sub) == 0);
    assert!(
        redelivered,
        "the redelivery was not pulled and acknowledged: {:#?}\n{}",
        ts.requests(),
        server.logs()
    );

    // The client got it once: its next message is the next alert.
    c.send_alert(72);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 72, "ams", "hhhh8888");
}

/// The latency of each of `alerts` alerts sent 200 ms apart, through an
/// instance keeping `pulls` pulls outstanding on a test server that holds
/// every pull a second to fill a batch, even with messages waiting (as the
/// real service may).
fn latencies_with_pulls(pulls: &str, alloc: &str) -> Vec<Duration> {
    let ts = test_server(Options {
        pull_fill_wait: Duration::from_secs(1),
        ..Default::default()
    });
    let mut env = emulator_env(&ts, alloc, "ams");
    env.push(("PUBSUB_OUTSTANDING_PULLS".into(), pulls.into()));
    let server = Server::start_owned(&env);
    wait_subscribed(&ts, &server, &subscription(alloc));
    let wanted: usize = pulls.parse().unwrap();
    // Every pull open for more than its fill wait, as after any quiet second.
    assert!(ts.wait_for(SUBSCRIBE_TIMEOUT, |s| s.held_pulls() >= wanted));
    std::thread::sleep(Duration::from_millis(1100));
    let mut sender = server.client();
    let mut watcher = server.client();
    // The watcher notes when each alert arrives while the sender goes on.
    let arrivals = std::thread::spawn(move || {
        (0..4u64)
            .map(|k| {
                let alert = watcher.next_json_within(DELIVERY_TIMEOUT);
                assert_eq!(alert["timestamp"], 100 + k, "{alert}");
                Instant::now()
            })
            .collect::<Vec<_>>()
    });
    let mut sent = Vec::new();
    let start = Instant::now();
    for k in 0..4u64 {
        let due = start + Duration::from_millis(200 * k);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        sent.push(Instant::now());
        sender.send_alert(100 + k);
    }
    let arrivals = arrivals.join().expect("the watcher panicked");
    sent.iter()
        .zip(arrivals)
        .map(|(sent, arrived)| arrived.saturating_duration_since(*sent))
        .collect()
}

#[test]
fn several_outstanding_pulls_hide_a_pull_held_to_fill_a_batch() {
    // One pull: once it has answered the first alert, the next pull is
    // held a second, so the alerts behind it wait for it.
    let one = latencies_with_pulls("1", "hhhh8881");
    // Four pulls: the ones still open take the next alerts at once.
    let four = latencies_with_pulls("4", "hhhh8884");
    let slowest = |l: &[Duration]| l.iter().max().copied().unwrap_or_default();
    assert!(
        slowest(&one) >= Duration::from_millis(600),
        "one pull: {one:?}"
    );
    assert!(
        slowest(&four) < Duration::from_millis(400),
        "four pulls: {four:?} (one pull: {one:?})"
    );
}

#[test]
fn an_aborted_create_is_retried_not_taken_as_done() {
    // 409 is ALREADY_EXISTS and ABORTED alike; only the first means done.
    let ts = test_server(Options::default());
    ts.abort_next_creates(2);
    let server = start_emulated(&ts, "abab0001", "ams");
    wait_subscribed(&ts, &server, &subscription("abab0001"));
    assert_eq!(count(&ts, |r| r.method == "PUT" && r.status == 409), 2);
    // Ready only once the subscription really existed: no pull ever found it
    // missing (taken as done, an aborted create would have sent the pulls
    // into a 404 first).
    assert_eq!(count(&ts, |r| is_pull(r) && r.status == 404), 0);
    let mut c = server.client();
    c.send_alert(71);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 71, "ams", "abab0001");
}

#[test]
fn a_role_that_cannot_create_topics_uses_the_existing_one() {
    let ts = test_server(Options::default());
    let rest = Rest::new(&ts);
    let (status, answer) = rest.call(&ts, "PUT", TOPIC, &json!({}));
    assert_eq!(status, 200, "cannot create the topic: {answer}");
    // From now on a topic create is refused, as for a least-privilege role.
    ts.deny_topic_creates(true);
    let server = start_emulated(&ts, "abab0002", "ams");
    wait_subscribed(&ts, &server, &subscription("abab0002"));
    assert!(count(&ts, |r| r.method == "PUT" && r.status == 403) >= 1);
    let mut c = server.client();
    c.send_alert(72);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 72, "ams", "abab0002");
}

// ---------------------------------------------------------------------------
// What only the real service would show (issue 13): Google's error statuses,
// a publish stored twice
// ---------------------------------------------------------------------------

/// Bound for a publish refused by a status that needs a person (retried
/// slowly: at most 30 s apart) to go through once the refusal is lifted.
const SLOW_RETRY_BOUND: Duration = Duration::from_secs(35);

fn is_publish(r: &RequestRecord) -> bool {
    r.path.ends_with(":publish")
}

/// Two instances on one test server, subscribed, with a client each.
fn two_instances(
    ts: &PubSubTestServer,
    a: (&str, &[(&str, &str)]),
    b: &str,
) -> (Server, Client, Server, Client) {
    let mut env = emulator_env(ts, a.0, "ams");
    env.extend(a.1.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let first = Server::start_owned(&env);
    let second = start_emulated(ts, b, "syd");
    wait_subscribed(ts, &first, &subscription(a.0));
    wait_subscribed(ts, &second, &subscription(b));
    let (ca, cb) = (first.client(), second.client());
    (first, ca, second, cb)
}

#[test]
fn a_publish_stored_twice_reaches_every_client_once() {
    let ts = test_server(Options::default());
    let (a, mut ca, b, mut cb) = two_instances(&ts, ("dupe0001", &[]), "dupe0002");
    // The first publish is stored, but its answer is lost: the publisher
    // retries, and Pub/Sub stores the alert a second time.
    ts.lose_next_publish_answers(1);
    ca.send_alert(81);
    let id = expect_alert(&mut ca, DELIVERY_TIMEOUT, 81, "ams", "dupe0001");
    assert_eq!(
        expect_alert(&mut cb, DELIVERY_TIMEOUT, 81, "ams", "dupe0001"),
        id
    );
    // Both copies were stored, under one alert id, and both instances have
    // pulled and acknowledged both.
    let (sub_a, sub_b) = (subscription("dupe0001"), subscription("dupe0002"));
    let settled = ts.wait_for(DELIVERY_TIMEOUT, |s| {
        s.published(TOPIC).len() == 2 && s.unacked(&sub_a) == 0 && s.unacked(&sub_b) == 0
    });
    assert!(
        settled,
        "the retried publish was not stored twice and pulled: {:#?}\n{}",
        ts.requests(),
        a.logs()
    );
    let copies = published_json(&ts, TOPIC);
    assert!(
        copies.iter().all(|m| m["id"] == id.as_str()),
        "two copies of one alert expected: {copies:?}"
    );
    // The second copy reached no client: the next message is the next alert.
    cb.send_alert(82);
    expect_alert(&mut ca, DELIVERY_TIMEOUT, 82, "syd", "dupe0002");
    expect_alert(&mut cb, DELIVERY_TIMEOUT, 82, "syd", "dupe0002");
    for server in [&a, &b] {
        assert_eq!(server.metric("skywatch_duplicate_alerts_dropped_total"), 1);
    }
}

/// A publish refused for a reason only a person can fix: the alert is kept
/// (not dropped as "malformed"), the log and /readyz name Google's status and
/// message, and once the refusal is lifted the alert reaches everyone.
fn check_refusal_keeps_the_alert(refusal: Refusal, a_id: &str, b_id: &str) {
    let ts = test_server(Options::default());
    let (a, mut ca, _b, mut cb) = two_instances(&ts, (a_id, &[]), b_id);
    ts.refuse_publishes(Some(refusal));
    ca.send_alert(91);
    assert!(!ca.next_accepted().is_empty(), "the alert was not accepted");
    let refused = ts.wait_for(DELIVERY_TIMEOUT, |s| {
        count(s, |r| is_publish(r) && r.status == refusal.code) >= 1
    });
    assert!(refused, "no refused publish: {:#?}", ts.requests());
    assert!(
        a.wait_for_log(refusal.message, DELIVERY_TIMEOUT),
        "the log does not give Google's message:\n{}",
        a.logs()
    );
    let logs = a.logs();
    assert!(logs.contains(refusal.status), "{logs}");
    assert!(!logs.contains("malformed"), "{logs}");
    let ready = get(a.addr, "/readyz");
    assert_eq!(ready.status, 503, "ready while every publish is refused");
    let why = ready.body_text();
    assert!(
        why.contains("publishing fails")
            && why.contains(&format!("{} {}", refusal.code, refusal.status))
            && !why.contains(PROJECT),
        "/readyz does not say why: {why:?}"
    );

    ts.refuse_publishes(None);
    expect_alert(&mut cb, SLOW_RETRY_BOUND, 91, "ams", a_id);
    expect_alert(&mut ca, DELIVERY_TIMEOUT, 91, "ams", a_id);
    a.wait_ready(DELIVERY_TIMEOUT);
    assert_eq!(
        a.metric("skywatch_alerts_unpublished_total{reason=\"expired\"}"),
        0
    );
}

#[test]
fn a_project_without_billing_keeps_alerts_and_readyz_says_why() {
    check_refusal_keeps_the_alert(Refusal::BILLING_DISABLED, "bill0001", "bill0002");
}

#[test]
fn a_role_that_cannot_publish_keeps_alerts_and_readyz_says_why() {
    check_refusal_keeps_the_alert(Refusal::PERMISSION_DENIED, "perm0001", "perm0002");
}

#[test]
fn alerts_older_than_the_publish_timeout_are_dropped_with_a_log_line_and_a_metric() {
    let ts = test_server(Options::default());
    let (a, mut ca, _b, mut cb) = two_instances(
        &ts,
        ("aged0001", &[("PUBSUB_PUBLISH_TIMEOUT", "1")]),
        "aged0002",
    );
    ts.refuse_publishes(Some(Refusal::BILLING_DISABLED));
    ca.send_alert(95);
    assert!(
        a.wait_for_log(
            "dropped 1 alerts still unpublished after 1 s",
            SLOW_RETRY_BOUND
        ),
        "{}",
        a.logs()
    );
    assert_eq!(
        a.metric("skywatch_alerts_unpublished_total{reason=\"expired\"}"),
        1
    );
    ts.refuse_publishes(None);
    ca.send_alert(96);
    // The next alert gets through; the expired one never does.
    expect_alert(&mut cb, SLOW_RETRY_BOUND, 96, "ams", "aged0001");
    expect_alert(&mut ca, DELIVERY_TIMEOUT, 96, "ams", "aged0001");
    let stamps: Vec<Value> = published_json(&ts, TOPIC)
        .iter()
        .map(|m| m["timestamp"].clone())
        .collect();
    assert_eq!(stamps, vec![json!(96)]);
}

#[test]
fn a_publish_google_calls_invalid_is_dropped_and_said_so() {
    let ts = test_server(Options::default());
    let (a, mut ca, _b, mut cb) = two_instances(&ts, ("inva0001", &[]), "inva0002");
    ts.refuse_publishes(Some(Refusal::INVALID_ARGUMENT));
    ca.send_alert(97);
    assert!(
        a.wait_for_log(
            "refused a publish as invalid, dropping 1 alerts",
            DELIVERY_TIMEOUT
        ),
        "{}",
        a.logs()
    );
    assert_eq!(
        a.metric("skywatch_alerts_unpublished_total{reason=\"invalid\"}"),
        1
    );
    // Dropped once, not retried: one refused publish.
    assert_eq!(count(&ts, |r| is_publish(r) && r.status == 400), 1);
    ts.refuse_publishes(None);
    ca.send_alert(98);
    expect_alert(&mut cb, DELIVERY_TIMEOUT, 98, "ams", "inva0001");
}

#[test]
fn a_refused_setup_is_named_by_readyz_and_retried() {
    let ts = test_server(Options::default());
    // Every call is refused for a while, as for a service account without
    // the role yet.
    ts.fail_for(Duration::from_secs(5), 403);
    let server = start_emulated(&ts, "setu0001", "ams");
    assert!(
        ts.wait_for(DELIVERY_TIMEOUT, |s| count(s, |r| r.method == "PUT"
            && r.status == 403)
            >= 1),
        "{:#?}",
        ts.requests()
    );
    // /readyz knows before the log line is written.
    assert!(server.wait_for_log("needs a fix in Google Cloud", DELIVERY_TIMEOUT));
    let ready = get(server.addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert!(
        ready
            .body_text()
            .contains("cannot set up the subscription: 403 PERMISSION_DENIED"),
        "/readyz does not say why: {:?}",
        ready.body_text()
    );
    // Retried slowly, as a refusal is, until the outage ends.
    let sub = subscription("setu0001");
    assert!(
        ts.wait_for(SLOW_RETRY_BOUND, |s| s.subscriptions().contains(&sub)),
        "{}",
        server.logs()
    );
    server.wait_ready(DELIVERY_TIMEOUT);
    let mut c = server.client();
    c.send_alert(99);
    expect_alert(&mut c, DELIVERY_TIMEOUT, 99, "ams", "setu0001");
}
