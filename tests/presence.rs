//! Live watcher counts (issue 7): instances exchange heartbeats through the
//! broker, and clients get `{"message":"PRESENCE","regions":{...},"total":N}`
//! when the picture changes, at most once per interval.

mod support;

use std::time::{Duration, Instant};

use pubsub_test_server::{Options, PubSubTestServer};
use serde_json::{Value, json};
use support::{Client, Server, emulator_env};

/// One second between heartbeats keeps the tests short.
const INTERVAL: Duration = Duration::from_secs(1);

/// Reads PRESENCE updates until one satisfies `pred` (any other message is a
/// failure: heartbeats must never look like anything else).
fn wait_presence(c: &mut Client, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let v = c.next_presence(deadline.saturating_duration_since(Instant::now()));
        if pred(&v) {
            return v;
        }
        last = v;
    }
    panic!("no matching PRESENCE within {within:?}; the last was {last}");
}

#[test]
fn one_instance_counts_its_own_watchers() {
    let server = Server::start(&[("FLY_REGION", "ams"), ("PRESENCE_INTERVAL_SECS", "1")]);
    let mut first = server.client();
    // A newcomer learns the picture at once, itself included.
    let v = first.next_presence(Duration::from_secs(5));
    assert_eq!(
        v,
        json!({"message": "PRESENCE", "regions": {"ams": 1}, "total": 1})
    );

    let second = server.client();
    wait_presence(&mut first, 5 * INTERVAL, |v| {
        v["regions"] == json!({"ams": 2}) && v["total"] == 2
    });
    second.close();
    wait_presence(&mut first, 5 * INTERVAL, |v| v["total"] == 1);
}

#[test]
fn a_newcomer_gets_the_picture_without_waiting_for_the_interval() {
    let server = Server::start(&[("FLY_REGION", "syd"), ("PRESENCE_INTERVAL_SECS", "3600")]);
    let _first = server.client();
    let mut second = server.client();
    let v = second.next_presence(Duration::from_secs(5));
    assert_eq!(
        v,
        json!({"message": "PRESENCE", "regions": {"syd": 2}, "total": 2})
    );
}

#[test]
fn presence_can_be_switched_off() {
    let server = Server::start(&[("PRESENCE_INTERVAL_SECS", "0")]);
    let mut c = server.client();
    // With presence off, the first message after the greeting is the alert.
    c.send_alert(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = c.next_message_until(deadline);
    assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
}

/// A text message within `within`, if one arrives.
fn poll_text(c: &mut Client, within: Duration) -> Option<Value> {
    match c.poll_until(Instant::now() + within)? {
        Ok(tungstenite::Message::Text(t)) => Some(serde_json::from_str(t.as_str()).expect("JSON")),
        Ok(_) => None,
        Err(e) => panic!("read failed: {e}"),
    }
}

#[test]
fn updates_come_at_most_once_per_interval_and_cost_no_rate_limit() {
    // A client allowed one alert, ever.
    let server = Server::start(&[
        ("FLY_REGION", "ams"),
        ("PRESENCE_INTERVAL_SECS", "1"),
        ("ALERT_BURST", "1"),
        ("ALERTS_PER_SECOND", "0.001"),
    ]);
    let mut watcher = server.client().with_presence();
    watcher.next_presence(Duration::from_secs(5)); // its own arrival
    // Churn: clients come and go much faster than the interval.
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < 3 * INTERVAL {
        drop(server.client());
        if let Some(v) = poll_text(&mut watcher, Duration::from_millis(50)) {
            assert_eq!(v["message"], "PRESENCE", "{v}");
            times.push(Instant::now());
        }
    }
    assert!(!times.is_empty(), "no PRESENCE update during the churn");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        // Scheduling can delay a send, never bring it forward; the margin is
        // for the reads' own timing.
        assert!(
            gap >= INTERVAL.mul_f64(0.8),
            "two PRESENCE updates {gap:?} apart"
        );
    }
    // Heartbeats never touched the client's allowance: its one alert goes.
    watcher.send_alert(7);
    let v = watcher.next_json();
    assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
}

#[test]
fn a_client_cannot_send_presence() {
    let server = Server::start(&[("PRESENCE_INTERVAL_SECS", "1")]);
    let mut c = server.client();
    c.send_text(r#"{"message":"PRESENCE","regions":{"ams":1000},"total":1000}"#);
    c.expect_error("unknown_message");
}

#[test]
fn instances_share_their_counts_and_forget_one_that_vanished() {
    let ts = PubSubTestServer::start(Options::default()).expect("start the Pub/Sub test server");
    let start = |alloc: &str, region: &str| {
        let mut env = emulator_env(ts.addr(), alloc, region);
        env.push(("PRESENCE_INTERVAL_SECS".into(), "1".into()));
        Server::start_owned(&env)
    };
    let a = start("aaaa0008", "ams");
    let mut b = start("bbbb0008", "syd");
    a.wait_ready(Duration::from_secs(10));
    b.wait_ready(Duration::from_secs(10));

    let mut on_a = a.client();
    let _also_on_a = a.client();
    let _on_b = b.client();
    let v = wait_presence(&mut on_a, Duration::from_secs(10), |v| {
        v["regions"] == json!({"ams": 2, "syd": 1})
    });
    assert_eq!(v["total"], 3, "{v}");

    // B dies without a word: after three silent intervals it is forgotten.
    b.signal(libc::SIGKILL);
    let _ = b.wait_exit(Duration::from_secs(5));
    let gone = Instant::now();
    wait_presence(&mut on_a, Duration::from_secs(10), |v| {
        v["regions"] == json!({"ams": 2})
    });
    assert!(
        gone.elapsed() >= 2 * INTERVAL,
        "B forgotten after {:?}, before three intervals could pass",
        gone.elapsed()
    );

    // On the topic, heartbeats are heartbeats, never shaped like alerts.
    let published = ts.published("projects/skywatch-test/topics/ALIEN_NOTIFICATIONS");
    assert!(!published.is_empty());
    for data in published {
        let v: Value = serde_json::from_slice(&data).expect("JSON on the topic");
        assert!(
            v.get("timestamp").is_none(),
            "a heartbeat shaped like an alert: {v}"
        );
        assert!(v["instance"].is_string() && v["clients"].is_u64(), "{v}");
    }
}
