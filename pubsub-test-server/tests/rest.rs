//! The Pub/Sub REST surface in emulator mode (no auth), driven over loopback HTTP.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{Client, SUB, TOPIC, ack_id, assert_error, publish, received, topic_and_subscription};
use pubsub_test_server::{Options, PubSubTestServer};
use serde_json::{Value, json};

fn start() -> (PubSubTestServer, Client) {
    start_with(Options::default())
}

fn start_with(opts: Options) -> (PubSubTestServer, Client) {
    let server = PubSubTestServer::start(opts).expect("start test server");
    let client = Client::new(&server.base_url());
    (server, client)
}

fn pull(client: &Client, max: i32) -> Vec<Value> {
    let (status, body) = client.post(
        &format!("/v1/{SUB}:pull"),
        json!({"maxMessages": max, "returnImmediately": true}),
    );
    assert_eq!(status, 200, "{body}");
    received(&body)
}

#[test]
fn topics_are_created_once_fetched_and_deleted() {
    let (server, client) = start();
    let path = format!("/v1/{TOPIC}");

    let (status, body) = client.put(&path, None);
    assert_eq!(status, 200);
    assert_eq!(body, json!({"name": TOPIC}));
    assert_eq!(client.put(&path, Some(json!({}))).0, 409);
    let message = assert_error(&client.put(&path, None), 409, "ALREADY_EXISTS");
    assert!(message.contains("resource=alerts"), "{message}");

    assert_eq!(client.get(&path), (200, json!({"name": TOPIC})));
    assert_eq!(server.topics(), vec![TOPIC.to_owned()]);
    assert_eq!(
        client.get("/v1/projects/skywatch-test/topics").1,
        json!({"topics": [{"name": TOPIC}]})
    );

    assert_eq!(client.delete(&path), (200, json!({})));
    assert_error(&client.get(&path), 404, "NOT_FOUND");
    assert_error(&client.delete(&path), 404, "NOT_FOUND");
    assert!(server.topics().is_empty());
}

#[test]
fn invalid_names_are_400() {
    let (_server, client) = start();
    for path in [
        "/v1/projects/p/topics/ab",               // too short
        "/v1/projects/p/topics/1abc",             // must start with a letter
        "/v1/projects/p/topics/goog-alerts",      // reserved prefix
        "/v1/projects/p/topics/has%20space",      // bad character
        "/v1/projects/p/topics/caf%C3%A9",        // non-ASCII
        "/v1/projects/Bad_Project/topics/alerts", // bad project
        "/v1/projects/p/subscriptions/goog-sub",  // same rules for subscriptions
        &format!("/v1/projects/p/topics/{}", "a".repeat(256)),
    ] {
        let answer = client.put(path, None);
        let message = assert_error(&answer, 400, "INVALID_ARGUMENT");
        assert!(message.contains("name"), "{path}: {message}");
    }
    // Percent-encoded allowed characters are fine.
    assert_eq!(
        client
            .put("/v1/projects/p/topics/a-b_c.d~e%2Bf%25g", None)
            .0,
        200
    );
}

#[test]
fn wrong_methods_and_unknown_paths() {
    let (_server, client) = start();
    assert_eq!(client.put(&format!("/v1/{TOPIC}"), None).0, 200);
    assert_error(
        &client.post(&format!("/v1/{TOPIC}"), json!({})),
        405,
        "UNIMPLEMENTED",
    );
    assert_error(
        &client.get(&format!("/v1/{TOPIC}:publish")),
        405,
        "UNIMPLEMENTED",
    );
    assert_error(&client.get("/v1/projects/p/nothing/here"), 404, "NOT_FOUND");
    assert_error(&client.get("/elsewhere"), 404, "NOT_FOUND");
    assert_error(
        &client.get(&format!("/v1/{TOPIC}?bogus=1")),
        400,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        client
            .get(&format!("/v1/{TOPIC}?alt=json&prettyPrint=false"))
            .0,
        200
    );
}

#[test]
fn subscriptions_are_validated_like_google() {
    let (server, client) = start();
    let path = format!("/v1/{SUB}");
    let invalid = |body: Value| {
        let answer = client.put(&path, Some(body.clone()));
        assert_error(&answer, 400, "INVALID_ARGUMENT");
    };

    // The topic must be given, well-formed and existing.
    invalid(json!({}));
    invalid(json!({"topic": "alerts"}));
    let missing = client.put(&path, Some(json!({"topic": TOPIC})));
    let message = assert_error(&missing, 404, "NOT_FOUND");
    assert_eq!(message, "Resource not found (resource=alerts).");

    assert_eq!(client.put(&format!("/v1/{TOPIC}"), None).0, 200);
    invalid(json!({"topic": TOPIC, "ackDeadlineSeconds": 5}));
    invalid(json!({"topic": TOPIC, "ackDeadlineSeconds": 601}));
    invalid(json!({"topic": TOPIC, "ackDeadlineSeconds": "ten"}));
    invalid(json!({"topic": TOPIC, "messageRetentionDuration": "599s"}));
    invalid(json!({"topic": TOPIC, "messageRetentionDuration": "600"}));
    invalid(json!({"topic": TOPIC, "messageRetentionDuration": "2678401s"}));
    invalid(json!({"topic": TOPIC, "expirationPolicy": {"ttl": "3600s"}}));
    invalid(json!({"topic": TOPIC, "expirationPolicy": {"ttl": "86399s"}}));
    // ttl shorter than the retention it would have to outlive
    invalid(
        json!({"topic": TOPIC, "messageRetentionDuration": "172800s",
                   "expirationPolicy": {"ttl": "86400s"}}),
    );
    invalid(json!({"topic": TOPIC, "expirationPolicy": {"ttl": "86400s", "x": 1}}));
    invalid(json!({"topic": TOPIC, "bogusField": true}));
    invalid(json!({"topic": TOPIC, "filter": "attributes.kind = \"ufo\""}));
    invalid(json!({"topic": TOPIC, "pushConfig": {"pushEndpoint": "https://example.com/"}}));
    assert!(server.subscriptions().is_empty());

    // Defaults are filled in as Google does.
    let (status, body) = client.put(&path, Some(json!({"topic": TOPIC})));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ackDeadlineSeconds"], json!(10));
    assert_eq!(body["messageRetentionDuration"], json!("604800s"));
    assert_eq!(body["expirationPolicy"], json!({"ttl": "2678400s"}));
    assert_eq!(body["topic"], json!(TOPIC));
    assert_eq!(client.get(&path), (200, body.clone()));
    assert_eq!(server.subscription(SUB), Some(body));
    assert_error(
        &client.put(&path, Some(json!({"topic": TOPIC}))),
        409,
        "ALREADY_EXISTS",
    );

    // What Skywatch asks for: short retention, one-day TTL, snake_case also accepted.
    let other = "projects/skywatch-test/subscriptions/alerts-instance-2";
    let (status, body) = client.put(
        &format!("/v1/{other}"),
        Some(json!({
            "topic": TOPIC,
            "ack_deadline_seconds": "20",
            "messageRetentionDuration": "600s",
            "expirationPolicy": {"ttl": "86400s"},
        })),
    );
    assert_eq!(status, 200, "{body}");
    let stored = server.subscription(other).expect("stored");
    assert_eq!(stored["ackDeadlineSeconds"], json!(20));
    assert_eq!(stored["messageRetentionDuration"], json!("600s"));
    assert_eq!(stored["expirationPolicy"], json!({"ttl": "86400s"}));

    // An empty policy means "never expires".
    let forever = "projects/skywatch-test/subscriptions/forever";
    let (status, body) = client.put(
        &format!("/v1/{forever}"),
        Some(json!({"topic": TOPIC, "expirationPolicy": {}})),
    );
    assert_eq!(status, 200);
    assert_eq!(body["expirationPolicy"], json!({}));

    assert_eq!(client.delete(&path), (200, json!({})));
    assert_error(&client.delete(&path), 404, "NOT_FOUND");
}

#[test]
fn publish_is_validated() {
    let (_server, client) = start();
    let path = format!("/v1/{TOPIC}:publish");
    let one = json!({"messages": [{"data": "aGk="}]});

    let message = assert_error(&client.post(&path, one.clone()), 404, "NOT_FOUND");
    assert_eq!(message, "Resource not found (resource=alerts).");
    assert_eq!(client.put(&format!("/v1/{TOPIC}"), None).0, 200);

    let invalid = |body: Value| assert_error(&client.post(&path, body), 400, "INVALID_ARGUMENT");
    invalid(json!({}));
    invalid(json!({"messages": []}));
    invalid(json!({"messages": [{}]}));
    invalid(json!({"messages": [{"data": ""}]}));
    invalid(json!({"messages": [{"data": "not base64!"}]}));
    invalid(json!({"messages": [{"data": "aGk"}]})); // missing padding
    invalid(json!({"messages": [{"data": "_-8="}]})); // URL-safe alphabet
    invalid(json!({"messages": [{"data": "aGk=", "extra": 1}]}));
    invalid(json!({"messages": [{"attributes": {"k": 1}}]}));
    invalid(json!({"messages": "aGk="}));
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"data": "aGk="})).collect();
    invalid(json!({ "messages": too_many }));
    let bad_json = client.post_raw(&path, "application/json", "{\"messages\": [");
    assert_error(&bad_json, 400, "INVALID_ARGUMENT");
    let not_json = client.post_raw(&path, "text/plain", "hello");
    assert_error(&not_json, 400, "INVALID_ARGUMENT");

    // Attributes alone are a valid message; so is the maximum batch.
    assert_eq!(
        client
            .post(
                &path,
                json!({"messages": [{"attributes": {"kind": "ufo"}}]})
            )
            .0,
        200
    );
    let batch: Vec<Value> = (0..1000).map(|_| json!({"data": "aGk="})).collect();
    let (status, body) = client.post(&path, json!({ "messages": batch }));
    assert_eq!(status, 200);
    assert_eq!(body["messageIds"].as_array().map(Vec::len), Some(1000));
}

#[test]
fn publish_pull_acknowledge() {
    let (server, client) = start();
    topic_and_subscription(&client);

    let ids = publish(&client, &[b"first landing", b"second landing"]);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert!(ids.iter().all(|id| id.bytes().all(|b| b.is_ascii_digit())));
    assert_eq!(
        server.published(TOPIC),
        vec![b"first landing".to_vec(), b"second landing".to_vec()]
    );
    assert_eq!(server.unacked(SUB), 2);

    // Attributes and ordering keys come back as sent.
    let (status, _) = client.post(
        &format!("/v1/{TOPIC}:publish"),
        json!({"messages": [{"data": "aGk=", "attributes": {"origin": "roswell"},
                             "orderingKey": "nm"}]}),
    );
    assert_eq!(status, 200);

    let messages = pull(&client, 10);
    assert_eq!(messages.len(), 3);
    let data: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| {
            STANDARD
                .decode(m["message"]["data"].as_str().expect("data"))
                .expect("base64")
        })
        .collect();
    assert_eq!(data[0], b"first landing");
    assert_eq!(data[1], b"second landing");
    assert_eq!(messages[0]["message"]["messageId"], json!(ids[0]));
    assert_eq!(
        messages[2]["message"]["attributes"],
        json!({"origin": "roswell"})
    );
    assert_eq!(messages[2]["message"]["orderingKey"], json!("nm"));
    assert!(messages[0].get("deliveryAttempt").is_none());
    let publish_time = messages[0]["message"]["publishTime"]
        .as_str()
        .expect("time");
    assert_eq!(publish_time.len(), "2026-11-27T22:40:01.123456789Z".len());
    assert!(publish_time.ends_with('Z') && publish_time.as_bytes()[10] == b'T');

    // Outstanding messages are not handed out again.
    assert!(pull(&client, 10).is_empty());
    assert_eq!(server.unacked(SUB), 3);

    let ack_ids: Vec<String> = messages.iter().map(ack_id).collect();
    let ack = client.post(
        &format!("/v1/{SUB}:acknowledge"),
        json!({ "ackIds": ack_ids }),
    );
    assert_eq!(ack, (200, json!({})));
    assert_eq!(server.unacked(SUB), 0);
    // Acking again is harmless; an empty list or a made-up id is not.
    let ack = client.post(
        &format!("/v1/{SUB}:acknowledge"),
        json!({ "ackIds": ack_ids }),
    );
    assert_eq!(ack.0, 200);
    let path = format!("/v1/{SUB}:acknowledge");
    assert_error(
        &client.post(&path, json!({"ackIds": []})),
        400,
        "INVALID_ARGUMENT",
    );
    assert_error(
        &client.post(&path, json!({"ackIds": ["nope"]})),
        400,
        "INVALID_ARGUMENT",
    );

    // maxMessages is required and positive; the batch respects it.
    let pull_path = format!("/v1/{SUB}:pull");
    assert_error(&client.post(&pull_path, json!({})), 400, "INVALID_ARGUMENT");
    assert_error(
        &client.post(&pull_path, json!({"maxMessages": 0})),
        400,
        "INVALID_ARGUMENT",
    );
    assert_error(
        &client.post(&pull_path, json!({"maxMessages": -1})),
        400,
        "INVALID_ARGUMENT",
    );
    publish(&client, &[b"a", b"b", b"c"]);
    assert_eq!(pull(&client, 2).len(), 2);
    assert_eq!(pull(&client, 2).len(), 1);
}

#[test]
fn messages_published_before_a_subscription_exist_are_not_delivered_to_it() {
    let (server, client) = start();
    assert_eq!(client.put(&format!("/v1/{TOPIC}"), None).0, 200);
    publish(&client, &[b"early"]);
    let created = client.put(&format!("/v1/{SUB}"), Some(json!({"topic": TOPIC})));
    assert_eq!(created.0, 200);
    assert_eq!(server.unacked(SUB), 0);
    assert!(pull(&client, 10).is_empty());
}

#[test]
fn nacked_message_is_redelivered_with_same_id_and_new_ack_id() {
    let (server, client) = start();
    topic_and_subscription(&client);
    let ids = publish(&client, &[b"ufo over nevada"]);

    let first = pull(&client, 1);
    assert_eq!(first.len(), 1);
    let modify = format!("/v1/{SUB}:modifyAckDeadline");
    let nack = client.post(
        &modify,
        json!({"ackIds": [ack_id(&first[0])], "ackDeadlineSeconds": 0}),
    );
    assert_eq!(nack, (200, json!({})));

    let second = pull(&client, 1);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0]["message"]["messageId"], json!(ids[0]));
    assert_ne!(ack_id(&second[0]), ack_id(&first[0]));

    // The first delivery's ackId is stale: silently ignored, message still unacked.
    let ack = format!("/v1/{SUB}:acknowledge");
    assert_eq!(
        client.post(&ack, json!({"ackIds": [ack_id(&first[0])]})).0,
        200
    );
    assert_eq!(server.unacked(SUB), 1);
    assert_eq!(
        client.post(&ack, json!({"ackIds": [ack_id(&second[0])]})).0,
        200
    );
    assert_eq!(server.unacked(SUB), 0);

    for bad in [json!(-1), json!(601)] {
        let answer = client.post(
            &modify,
            json!({"ackIds": [ack_id(&second[0])], "ackDeadlineSeconds": bad}),
        );
        assert_error(&answer, 400, "INVALID_ARGUMENT");
    }
}

#[test]
fn held_pull_gets_a_message_again_when_its_ack_deadline_passes() {
    let (_server, client) = start();
    topic_and_subscription(&client);
    let ids = publish(&client, &[b"lights in the sky"]);
    let first = pull(&client, 1);

    // Shorten the lease to 1 s instead of waiting out the 10 s minimum deadline.
    let shortened = client.post(
        &format!("/v1/{SUB}:modifyAckDeadline"),
        json!({"ackIds": [ack_id(&first[0])], "ackDeadlineSeconds": 1}),
    );
    assert_eq!(shortened.0, 200);
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}));
    assert_eq!(status, 200);
    let again = received(&body);
    assert_eq!(again.len(), 1, "{body}");
    assert_eq!(again[0]["message"]["messageId"], json!(ids[0]));
    // It came when the lease ran out, not at the end of the 10 s hold.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn held_pull_wakes_on_publish() {
    let (server, client) = start_with(Options {
        max_pull_hold: Duration::from_secs(30),
        ..Options::default()
    });
    topic_and_subscription(&client);

    let base = server.base_url();
    let puller = thread::spawn(move || {
        let started = Instant::now();
        let answer = Client::new(&base).post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 5}));
        (answer, started.elapsed())
    });
    assert!(server.wait_for(Duration::from_secs(10), |s| s.held_pulls() == 1));
    publish(&client, &[b"it landed"]);

    let ((status, body), elapsed) = puller.join().expect("puller thread");
    assert_eq!(status, 200);
    assert_eq!(received(&body).len(), 1);
    assert!(
        elapsed < Duration::from_secs(10),
        "woke by publish, not timeout"
    );
    assert!(server.wait_for(Duration::from_secs(5), |s| s.held_pulls() == 0));
}

#[test]
fn empty_pull_is_held_for_max_pull_hold_then_answers_empty() {
    let hold = Duration::from_millis(300);
    let (_server, client) = start_with(Options {
        max_pull_hold: hold,
        ..Options::default()
    });
    topic_and_subscription(&client);
    let started = Instant::now();
    let answer = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}));
    assert_eq!(answer, (200, json!({})));
    assert!(started.elapsed() >= hold);

    // returnImmediately answers at once.
    let started = Instant::now();
    let answer = client.post(
        &format!("/v1/{SUB}:pull"),
        json!({"maxMessages": 1, "returnImmediately": true}),
    );
    assert_eq!(answer, (200, json!({})));
    assert!(started.elapsed() < hold);
}

#[test]
fn pulls_return_immediately_option_never_holds() {
    let (_server, client) = start_with(Options {
        max_pull_hold: Duration::from_secs(30),
        pulls_return_immediately: true,
        ..Options::default()
    });
    topic_and_subscription(&client);
    let started = Instant::now();
    let answer = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}));
    assert_eq!(answer, (200, json!({})));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn deleting_a_subscription_wakes_its_held_pull_with_404() {
    let (server, client) = start_with(Options {
        max_pull_hold: Duration::from_secs(30),
        ..Options::default()
    });
    topic_and_subscription(&client);
    let base = server.base_url();
    let puller = thread::spawn(move || {
        Client::new(&base).post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}))
    });
    assert!(server.wait_for(Duration::from_secs(10), |s| s.held_pulls() == 1));
    assert!(server.delete_subscription(SUB));
    assert!(!server.delete_subscription(SUB));

    let answer = puller.join().expect("puller thread");
    let message = assert_error(&answer, 404, "NOT_FOUND");
    assert!(message.contains("alerts-instance-1"), "{message}");
    assert_error(
        &client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1})),
        404,
        "NOT_FOUND",
    );
}

#[test]
fn deleting_a_topic_detaches_its_subscriptions() {
    let (server, client) = start();
    topic_and_subscription(&client);
    publish(&client, &[b"before"]);
    assert!(server.delete_topic(TOPIC));
    assert_eq!(
        server.subscription(SUB).expect("still there")["topic"],
        json!("_deleted-topic_")
    );
    // The backlog can still be drained; publishing is a 404.
    assert_eq!(pull(&client, 10).len(), 1);
    let answer = client.post(
        &format!("/v1/{TOPIC}:publish"),
        json!({"messages": [{"data": "aGk="}]}),
    );
    assert_error(&answer, 404, "NOT_FOUND");
}

#[test]
fn injected_failures_then_success() {
    let (server, client) = start();
    server.fail_next(2, 503);
    let path = format!("/v1/{TOPIC}");
    assert_error(&client.put(&path, None), 503, "UNAVAILABLE");
    assert_error(&client.put(&path, None), 503, "UNAVAILABLE");
    assert_eq!(client.put(&path, None).0, 200);

    server.fail_next(1, 429);
    assert_error(&client.get(&path), 429, "RESOURCE_EXHAUSTED");
    server.fail_next(1, 500);
    assert_error(&client.get(&path), 500, "INTERNAL");
    assert_eq!(client.get(&path).0, 200);

    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200, 429, 500, 200]);
    let first = &server.requests()[0];
    assert_eq!(first.method, "PUT");
    assert_eq!(first.path, path);
    assert!(!first.authorized);
}

#[test]
fn aborted_and_denied_creates_answer_like_google() {
    let (server, client) = start();
    let topic = format!("/v1/{TOPIC}");
    server.abort_next_creates(1);
    // 409 with ABORTED, not ALREADY_EXISTS, and nothing created.
    assert_error(&client.put(&topic, None), 409, "ABORTED");
    assert_eq!(client.get(&topic).0, 404);
    assert_eq!(client.put(&topic, None).0, 200);
    assert_error(&client.put(&topic, None), 409, "ALREADY_EXISTS");
    // A role without pubsub.topics.create: 403 even though the topic exists.
    server.deny_topic_creates(true);
    assert_error(&client.put(&topic, None), 403, "PERMISSION_DENIED");
    assert_eq!(client.get(&topic).0, 200);
    server.deny_topic_creates(false);
    assert_error(&client.put(&topic, None), 409, "ALREADY_EXISTS");
}

#[test]
fn an_outage_fails_every_call_and_held_pulls_until_it_ends() {
    let (server, client) = start();
    topic_and_subscription(&client);
    // A pull held when the outage begins answers 503 at once.
    let base = server.base_url();
    let held = thread::spawn(move || {
        Client::new(&base).post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}))
    });
    assert!(server.wait_for(Duration::from_secs(10), |s| s.held_pulls() == 1));
    server.fail_for(Duration::from_millis(300), 503);
    assert_error(&held.join().expect("pull thread"), 503, "UNAVAILABLE");
    // So does every call made during it...
    assert_error(&client.get(&format!("/v1/{TOPIC}")), 503, "UNAVAILABLE");
    // ...and once it is over, calls work again.
    assert!(server.wait_for(Duration::from_secs(10), |_| {
        client.get(&format!("/v1/{TOPIC}")).0 == 200
    }));
    assert_eq!(pull(&client, 1).len(), 0);
}

#[test]
fn delay_slows_every_call() {
    let (server, client) = start();
    server.set_delay(Duration::from_millis(200));
    let started = Instant::now();
    assert_error(&client.get(&format!("/v1/{TOPIC}")), 404, "NOT_FOUND");
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.set_delay(Duration::ZERO);
}

#[test]
fn wait_for_reports_timeout_and_wakes_on_requests() {
    let (server, client) = start();
    assert!(!server.wait_for(Duration::from_millis(50), |s| !s.topics().is_empty()));

    let base = server.base_url();
    let creator = thread::spawn(move || Client::new(&base).put(&format!("/v1/{TOPIC}"), None));
    assert!(server.wait_for(Duration::from_secs(10), |s| s.requests().len() == 1));
    assert_eq!(creator.join().expect("creator").0, 200);
    assert_eq!(server.topics(), vec![TOPIC.to_owned()]);
    drop(client);
}

#[test]
fn dropping_the_server_ends_held_pulls_promptly() {
    let (server, client) = start_with(Options {
        max_pull_hold: Duration::from_secs(30),
        ..Options::default()
    });
    topic_and_subscription(&client);
    let base = server.base_url();
    let puller = thread::spawn(move || {
        let started = Instant::now();
        let answer = Client::new(&base).post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}));
        (answer, started.elapsed())
    });
    assert!(server.wait_for(Duration::from_secs(10), |s| s.held_pulls() == 1));
    drop(server);
    let (answer, elapsed) = puller.join().expect("puller thread");
    assert_eq!(answer, (200, json!({})));
    assert!(elapsed < Duration::from_secs(10));
}
