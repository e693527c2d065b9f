//! `Options::pull_fill_wait`: pulls that have messages are held to fill their batch, as
//! the real service may do; concurrent held pulls never share a message.

mod common;

use std::collections::HashSet;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    Answer, Client, SUB, TOPIC, assert_error, message_ids, publish, received,
    topic_and_subscription,
};
use pubsub_test_server::{Options, PubSubTestServer};
use serde_json::json;

/// Long enough that nothing in a test runs into it unless the test means to.
const LONG: Duration = Duration::from_secs(30);
/// What "answered at once" / "did not wait for LONG" allows for a slow, busy machine.
const PROMPT: Duration = Duration::from_secs(10);

fn start_with(opts: Options) -> (PubSubTestServer, Client) {
    let server = PubSubTestServer::start(opts).expect("start test server");
    let client = Client::new(&server.base_url());
    topic_and_subscription(&client);
    (server, client)
}

fn fill_wait(fill: Duration, hold: Duration) -> Options {
    Options {
        pull_fill_wait: fill,
        max_pull_hold: hold,
        ..Options::default()
    }
}

/// A pull (not `returnImmediately`) on its own thread: the answer and how long it took.
fn spawn_pull(server: &PubSubTestServer, max: i32) -> JoinHandle<(Answer, Duration)> {
    let base = server.base_url();
    thread::spawn(move || {
        let started = Instant::now();
        let answer =
            Client::new(&base).post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": max}));
        (answer, started.elapsed())
    })
}

fn join(puller: JoinHandle<(Answer, Duration)>) -> (Answer, Duration) {
    puller.join().expect("puller thread")
}

#[test]
fn pull_with_a_waiting_message_is_held_for_the_fill_wait_and_takes_later_messages() {
    // Generous, so that publishing during the hold cannot miss it on a busy machine.
    let fill = Duration::from_secs(1);
    let (server, client) = start_with(fill_wait(fill, LONG));
    let first = publish(&client, &[b"first"]);

    let puller = spawn_pull(&server, 10);
    // The message is waiting, yet the pull is held.
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 1));
    let second = publish(&client, &[b"second", b"third"]);

    let ((status, body), elapsed) = join(puller);
    assert_eq!(status, 200, "{body}");
    let expected: Vec<String> = first.into_iter().chain(second).collect();
    assert_eq!(message_ids(&received(&body)), expected);
    assert!(
        elapsed >= fill,
        "answered after {elapsed:?}, before the fill wait"
    );
    assert!(
        elapsed < PROMPT,
        "held {elapsed:?}: to the hold, not the fill wait"
    );
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 0));
    assert_eq!(server.unacked(SUB), 3);
}

#[test]
fn held_pull_answers_as_soon_as_max_messages_are_deliverable() {
    let (server, client) = start_with(fill_wait(LONG, LONG));
    let first = publish(&client, &[b"one"]);

    // A full batch is waiting already: no hold at all.
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), first);
    assert!(started.elapsed() < PROMPT);

    // One of two waiting: held until a second one arrives, then answered at once.
    let second = publish(&client, &[b"two"]);
    let puller = spawn_pull(&server, 2);
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 1));
    let third = publish(&client, &[b"three", b"four"]);
    let ((status, body), elapsed) = join(puller);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        message_ids(&received(&body)),
        vec![second[0].clone(), third[0].clone()]
    );
    assert!(elapsed < PROMPT, "waited {elapsed:?} for a full batch");
    // The message beyond maxMessages stays for the next pull.
    assert_eq!(server.unacked(SUB), 4);
    let (_, body) = client.post(
        &format!("/v1/{SUB}:pull"),
        json!({"maxMessages": 5, "returnImmediately": true}),
    );
    assert_eq!(message_ids(&received(&body)), vec![third[1].clone()]);
}

#[test]
fn concurrent_held_pulls_split_the_messages_when_their_batches_fill() {
    let (server, client) = start_with(fill_wait(LONG, LONG));
    let mut published = publish(&client, &[b"a", b"b"]);

    let pullers = [spawn_pull(&server, 3), spawn_pull(&server, 3)];
    // Both hold the same two waiting messages...
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 2));
    // ...and six make a full batch for each: both answer, neither waits on the other's.
    published.extend(publish(&client, &[b"c", b"d", b"e", b"f"]));

    let mut seen = Vec::new();
    for puller in pullers {
        let ((status, body), elapsed) = join(puller);
        assert_eq!(status, 200, "{body}");
        assert!(elapsed < PROMPT, "waited {elapsed:?}");
        let ids = message_ids(&received(&body));
        assert_eq!(ids.len(), 3, "{body}");
        seen.extend(ids);
    }
    assert_delivered_exactly_once(seen, &published);
    assert_eq!(server.unacked(SUB), 6);
}

#[test]
fn concurrent_held_pulls_never_get_the_same_message_when_the_wait_ends() {
    let fill = Duration::from_millis(300);
    let hold = Duration::from_secs(1);
    let (server, client) = start_with(fill_wait(fill, hold));
    let published = publish(&client, &[b"a", b"b", b"c", b"d"]);

    // Neither batch can fill: each pull answers when its own wait ends, with whatever
    // the other has not taken by then (the later one may get nothing and answer `{}`
    // at the end of its hold).
    let pullers = [spawn_pull(&server, 10), spawn_pull(&server, 10)];
    let mut seen = Vec::new();
    for puller in pullers {
        let ((status, body), elapsed) = join(puller);
        assert_eq!(status, 200, "{body}");
        assert!(elapsed < PROMPT, "waited {elapsed:?}");
        let ids = message_ids(&received(&body));
        if !ids.is_empty() {
            assert!(elapsed >= fill, "answered after {elapsed:?}");
        }
        seen.extend(ids);
    }
    assert_delivered_exactly_once(seen, &published);
    assert_eq!(server.unacked(SUB), 4);
}

fn assert_delivered_exactly_once(mut seen: Vec<String>, published: &[String]) {
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "a message went to both: {seen:?}"
    );
    seen.sort();
    let mut published = published.to_vec();
    published.sort();
    assert_eq!(seen, published);
}

#[test]
fn zero_fill_wait_answers_at_once_as_before() {
    assert_eq!(Options::default().pull_fill_wait, Duration::ZERO);
    let (_server, client) = start_with(Options::default());
    let ids = publish(&client, &[b"now"]);
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 10}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn return_immediately_skips_the_fill_wait() {
    let (_server, client) = start_with(fill_wait(LONG, LONG));
    let ids = publish(&client, &[b"quick"]);
    let started = Instant::now();
    let (status, body) = client.post(
        &format!("/v1/{SUB}:pull"),
        json!({"maxMessages": 10, "returnImmediately": true}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(started.elapsed() < PROMPT);

    // So does the server-wide option.
    let (_server, client) = start_with(Options {
        pulls_return_immediately: true,
        ..fill_wait(LONG, LONG)
    });
    let ids = publish(&client, &[b"quick"]);
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 10}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(started.elapsed() < PROMPT);
}

#[test]
fn fill_wait_can_be_changed_at_run_time_even_for_held_pulls() {
    let (server, client) = start_with(fill_wait(Duration::ZERO, LONG));

    let fill = Duration::from_millis(300);
    server.set_pull_fill_wait(fill);
    let ids = publish(&client, &[b"later"]);
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 10}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(started.elapsed() >= fill);

    // A pull held for a long fill wait is released when the wait is turned off.
    server.set_pull_fill_wait(LONG);
    let ids = publish(&client, &[b"released"]);
    let puller = spawn_pull(&server, 10);
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 1));
    server.set_pull_fill_wait(Duration::ZERO);
    let ((status, body), elapsed) = join(puller);
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(elapsed < PROMPT, "waited {elapsed:?}");
}

#[test]
fn an_outage_ends_a_held_pull_and_its_messages_stay_deliverable() {
    let (server, client) = start_with(fill_wait(LONG, LONG));
    let ids = publish(&client, &[b"kept"]);
    let puller = spawn_pull(&server, 10);
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 1));
    server.fail_for(Duration::from_millis(300), 503);
    let (answer, elapsed) = join(puller);
    assert_error(&answer, 503, "UNAVAILABLE");
    assert!(elapsed < PROMPT);

    // The held message was never handed out, so the next pull gets it.
    assert!(server.wait_for(PROMPT, |_| { client.get(&format!("/v1/{TOPIC}")).0 == 200 }));
    let (status, body) = client.post(
        &format!("/v1/{SUB}:pull"),
        json!({"maxMessages": 10, "returnImmediately": true}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
}

#[test]
fn deleting_the_subscription_ends_a_held_pull_with_404() {
    let (server, client) = start_with(fill_wait(LONG, LONG));
    publish(&client, &[b"orphaned"]);
    let puller = spawn_pull(&server, 10);
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 1));
    assert!(server.delete_subscription(SUB));
    let (answer, elapsed) = join(puller);
    assert_error(&answer, 404, "NOT_FOUND");
    assert!(elapsed < PROMPT);
}

#[test]
fn dropping_the_server_ends_a_held_pull_promptly() {
    let (server, client) = start_with(fill_wait(LONG, LONG));
    publish(&client, &[b"unsent"]);
    let puller = spawn_pull(&server, 10);
    assert!(server.wait_for(PROMPT, |s| s.held_pulls() == 1));
    drop(server);
    let (answer, elapsed) = join(puller);
    assert_eq!(answer, (200, json!({})));
    assert!(elapsed < PROMPT);
}
