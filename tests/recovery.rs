//! Missed-alert recovery (issue 7): a client that comes back with
//! `/ws?since=<id>` first gets, in order and marked `replayed`, every alert it
//! missed that the instance still holds; an id the instance does not hold
//! gets a MISSED notice instead.

mod support;

use std::time::Duration;

use pubsub_test_server::{Options, PubSubTestServer};
use serde_json::Value;
use support::{Client, Server, connect_since, emulator_env, get, http_raw, key_set, keys};

const FAST: [(&str, &str); 5] = [
    ("ALERTS_PER_SECOND", "100000"),
    ("ALERT_BURST", "100000"),
    ("STORM_ALERTS_PER_SECOND", "100000"),
    ("ADDRESS_ALERTS_PER_SECOND", "100000"),
    ("ADDRESS_ALERT_BURST", "100000"),
];
const REPLAYED_FIELDS: &[&str] = &[
    "message",
    "timestamp",
    "regionCode",
    "sender",
    "id",
    "replayed",
];

/// Sends alerts `timestamps` from `sender` and returns their ids, read back
/// from `sender`'s own copies.
fn send_alerts(sender: &mut Client, timestamps: std::ops::RangeInclusive<u64>) -> Vec<String> {
    for t in timestamps.clone() {
        sender.send_alert(t);
    }
    timestamps
        .map(|t| {
            let v = sender.next_alert();
            assert_eq!(v["timestamp"].as_u64(), Some(t), "{v}");
            v["id"].as_str().expect("id").to_owned()
        })
        .collect()
}

fn assert_replayed(v: &Value, timestamp: u64, id: &str) {
    assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
    assert_eq!(keys(v), key_set(REPLAYED_FIELDS), "{v}");
    assert_eq!(v["replayed"], true, "{v}");
    assert_eq!(v["timestamp"].as_u64(), Some(timestamp), "{v}");
    assert_eq!(v["id"], id, "{v}");
}

fn assert_live(v: &Value, timestamp: u64) {
    assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
    assert!(
        v.get("replayed").is_none(),
        "a live alert marked replayed: {v}"
    );
    assert_eq!(v["timestamp"].as_u64(), Some(timestamp), "{v}");
}

#[test]
fn missed_alerts_are_replayed_in_order_before_live_ones() {
    let server = Server::start(&FAST);
    let mut sender = server.client();
    let ids = send_alerts(&mut sender, 1..=5);

    // A page that saw alert 2 comes back: it gets 3, 4 and 5, replayed.
    let mut back = connect_since(server.addr, &ids[1]);
    for (t, id) in (3..=5).zip(&ids[2..]) {
        assert_replayed(&back.next_json(), t, id);
    }
    // Then the live stream, unmarked.
    sender.send_alert(6);
    assert_live(&back.next_json(), 6);
    assert_live(&sender.next_json(), 6);
}

#[test]
fn coming_back_after_the_newest_alert_replays_nothing() {
    let server = Server::start(&FAST);
    let mut sender = server.client();
    let ids = send_alerts(&mut sender, 1..=3);
    let mut back = connect_since(server.addr, &ids[2]);
    sender.send_alert(4);
    assert_live(&back.next_json(), 4);
}

#[test]
fn an_id_no_longer_held_is_told_it_may_have_missed_some() {
    // The ring holds two alerts: the first of three is gone.
    let server = Server::start(&[FAST[0], FAST[1], ("RECOVERY_ALERTS", "2")]);
    let mut sender = server.client();
    let ids = send_alerts(&mut sender, 1..=3);

    let mut back = connect_since(server.addr, &ids[0]);
    let v = back.next_json();
    assert_eq!(v["message"], "MISSED", "{v}");
    assert_eq!(v["since"], ids[0].as_str(), "{v}");
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    // Nothing is replayed after the notice, and live alerts flow.
    sender.send_alert(4);
    assert_live(&back.next_json(), 4);

    // An id this instance never delivered gets the same notice.
    let mut stranger = connect_since(server.addr, &"0".repeat(32));
    assert_eq!(stranger.next_json()["message"], "MISSED");
}

#[test]
fn recovery_can_be_switched_off() {
    let server = Server::start(&[FAST[0], FAST[1], ("RECOVERY_ALERTS", "0")]);
    let mut sender = server.client();
    let ids = send_alerts(&mut sender, 1..=1);
    let mut back = connect_since(server.addr, &ids[0]);
    assert_eq!(back.next_json()["message"], "MISSED");
}

#[test]
fn a_malformed_since_is_a_400_and_harms_nothing() {
    let server = Server::start(&FAST);
    for bad in [
        "xyz",
        "0123",
        "ABCDEF0123456789ABCDEF0123456789",
        "0123456789abcdef0123456789abcdeg",
        "",
    ] {
        let request = format!(
            "GET /ws?since={bad} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.addr
        );
        let response = http_raw(server.addr, request.as_bytes());
        assert_eq!(response.status, 400, "since={bad:?}");
        assert!(
            response.body_text().contains("since"),
            "since={bad:?}: {}",
            response.body_text()
        );
    }
    // The server goes on as before.
    assert_eq!(get(server.addr, "/healthz").status, 200);
    let mut c = server.client();
    c.send_alert(1);
    assert_live(&c.next_json(), 1);
}

// ---------------------------------------------------------------------------
// An instance stopped during a burst
// ---------------------------------------------------------------------------

#[test]
fn clients_of_an_instance_stopped_mid_burst_miss_nothing_on_another() {
    const BURST: u64 = 60;
    let ts = PubSubTestServer::start(Options::default()).expect("start the Pub/Sub test server");
    // One pull each: the test server then hands both instances the burst in
    // publish order, and the replay can be checked against one order.
    // Pub/Sub itself promises no order, and with several pulls open the two
    // instances may deliver a burst in different orders (README, "Missed
    // alerts").
    let one_pull = |alloc: &str, region: &str| {
        let mut env = emulator_env(ts.addr(), alloc, region);
        env.extend(FAST.map(|(k, v)| (k.to_owned(), v.to_owned())));
        env.push(("PUBSUB_OUTSTANDING_PULLS".into(), "1".into()));
        Server::start_owned(&env)
    };
    let a = one_pull("aaaa0007", "ams");
    let mut b = one_pull("bbbb0007", "syd");
    a.wait_ready(Duration::from_secs(10));
    b.wait_ready(Duration::from_secs(10));
    assert!(ts.wait_for(Duration::from_secs(5), |s| s.held_pulls() >= 2));

    let mut sender = a.client();
    let mut watcher = b.client();
    let mut seen: Vec<String> = Vec::new();
    let mut sent = 0;

    // The burst begins; the watcher on B sees the first third live.
    while sent < BURST / 3 {
        sent += 1;
        sender.send_alert(sent);
    }
    while seen.len() < (BURST / 3) as usize {
        let v = watcher.next_json();
        assert_live(&v, seen.len() as u64 + 1);
        seen.push(v["id"].as_str().expect("id").to_owned());
    }

    // B stops while the burst goes on.
    b.signal(libc::SIGTERM);
    while sent < 2 * BURST / 3 {
        sent += 1;
        sender.send_alert(sent);
    }
    assert_eq!(watcher.expect_close_within(Duration::from_secs(5)), 1001);
    let status = b.wait_exit(Duration::from_secs(5)).expect("B exits");
    assert!(status.success(), "{status:?}");
    while sent < BURST {
        sent += 1;
        sender.send_alert(sent);
    }
    // The sender's own copies: every alert has reached A.
    for t in 1..=BURST {
        assert_eq!(sender.next_alert()["timestamp"].as_u64(), Some(t));
    }

    // The page reconnects, lands on A, and names the last alert it saw.
    let last = seen.last().cloned().expect("saw alerts");
    let mut back = connect_since(a.addr, &last);
    let mut timestamps: Vec<u64> = (1..=seen.len() as u64).collect();
    while timestamps.len() < BURST as usize {
        let v = back.next_json();
        assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
        assert_eq!(v["replayed"], true, "held by A, so replayed: {v}");
        timestamps.push(v["timestamp"].as_u64().expect("timestamp"));
    }
    assert_eq!(
        timestamps,
        (1..=BURST).collect::<Vec<_>>(),
        "every alert once, in order"
    );
    // And it is live again.
    sender.send_alert(BURST + 1);
    assert_live(&back.next_json(), BURST + 1);
}
