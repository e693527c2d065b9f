//! The WebSocket protocol on /ws: greeting, alert broadcast, error replies,
//! rate limiting, message size and frame-type limits, fan-out.

mod support;

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Client, Server, TIMEOUT, alert, key_set, keys};
use tungstenite::Message;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

const ALERT_FIELDS: &[&str] = &["message", "timestamp", "regionCode", "sender", "id"];

/// Checks that `v` is a broadcast alert with exactly the contract's fields.
fn assert_alert(v: &Value, timestamp: u64, region: &str, sender: &str) -> String {
    assert_eq!(
        keys(v),
        key_set(ALERT_FIELDS),
        "alert has wrong fields: {v}"
    );
    assert_eq!(v["message"], "ALIEN_LANDING", "{v}");
    assert_eq!(
        v["timestamp"].as_u64(),
        Some(timestamp),
        "wrong timestamp in {v}"
    );
    assert_eq!(v["regionCode"], region, "{v}");
    assert_eq!(v["sender"], sender, "{v}");
    let id = v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {v}"));
    assert!(!id.is_empty(), "empty id: {v}");
    id.to_string()
}

/// A server with a rate limit high enough not to interfere.
fn unlimited_server(extra: &[(&str, &str)]) -> Server {
    // Storm summaries off too: these tests check every alert one by one.
    let mut envs = vec![
        ("ALERTS_PER_SECOND", "100000"),
        ("ALERT_BURST", "100000"),
        ("STORM_ALERTS_PER_SECOND", "100000"),
        ("ADDRESS_ALERTS_PER_SECOND", "100000"),
        ("ADDRESS_ALERT_BURST", "100000"),
    ];
    envs.extend_from_slice(extra);
    Server::start(&envs)
}

#[test]
fn greeting_reports_fly_region() {
    let server = Server::start(&[("FLY_REGION", "ams")]);
    let mut c = support::connect(server.addr);
    assert_eq!(
        c.next_json(),
        json!({"message": "CONNECTED", "regionCode": "ams"})
    );
}

#[test]
fn region_defaults_to_local_region() {
    let server = Server::start(&[("FLY_ALLOC_ID", "alloc-1")]);
    let mut c = support::connect(server.addr);
    assert_eq!(
        c.next_json(),
        json!({"message": "CONNECTED", "regionCode": "LOCAL_REGION"})
    );
    c.send_alert(5);
    assert_alert(&c.next_json(), 5, "LOCAL_REGION", "alloc-1");
}

#[test]
fn alert_is_broadcast_to_every_client_including_sender() {
    let server = Server::start(&[("FLY_REGION", "ams"), ("FLY_ALLOC_ID", "alloc-abc")]);
    let mut a = server.client();
    let mut b = server.client();
    let mut c = server.client();
    let ts = 1_700_000_000_123;
    a.send_alert(ts);
    let ids: Vec<String> = [&mut a, &mut b, &mut c]
        .into_iter()
        .map(|cl| assert_alert(&cl.next_json(), ts, "ams", "alloc-abc"))
        .collect();
    assert!(
        ids.iter().all(|id| id == &ids[0]),
        "copies of one alert carry different ids: {ids:?}"
    );

    // A second alert, from another client, gets a different id.
    b.send_alert(ts + 1);
    let ids2: Vec<String> = [&mut a, &mut b, &mut c]
        .into_iter()
        .map(|cl| assert_alert(&cl.next_json(), ts + 1, "ams", "alloc-abc"))
        .collect();
    assert!(ids2.iter().all(|id| id == &ids2[0]), "{ids2:?}");
    assert_ne!(ids[0], ids2[0], "two alerts share an id");
}

#[test]
fn alert_ids_are_unique() {
    let server = unlimited_server(&[("FLY_ALLOC_ID", "alloc-u"), ("FLY_REGION", "fra")]);
    let mut a = server.client();
    let mut seen = HashSet::new();
    for ts in 0..20 {
        a.send_alert(ts);
    }
    for ts in 0..20 {
        let id = assert_alert(&a.next_json(), ts, "fra", "alloc-u");
        assert!(seen.insert(id.clone()), "duplicate id {id}");
    }
}

#[test]
fn client_supplied_fields_are_overwritten_or_dropped() {
    let server = Server::start(&[("FLY_REGION", "ams"), ("FLY_ALLOC_ID", "alloc-real")]);
    let mut a = server.client();
    let mut b = server.client();
    a.send_text(
        &json!({
            "message": "ALIEN_LANDING",
            "timestamp": 123,
            "regionCode": "xx",
            "sender": "spoofed",
            "id": "fake-id",
            "evil": 1
        })
        .to_string(),
    );
    for cl in [&mut a, &mut b] {
        let v = cl.next_json();
        let id = assert_alert(&v, 123, "ams", "alloc-real");
        assert_ne!(id, "fake-id", "client-supplied id relayed: {v}");
    }
}

#[test]
fn sender_defaults_to_a_distinct_random_id_per_process() {
    let s1 = Server::start(&[]);
    let s2 = Server::start(&[]);
    let mut senders = Vec::new();
    for server in [&s1, &s2] {
        let mut c = server.client();
        c.send_alert(1);
        let v = c.next_alert();
        assert_eq!(keys(&v), key_set(ALERT_FIELDS), "{v}");
        let sender = v["sender"]
            .as_str()
            .unwrap_or_else(|| panic!("sender not a string: {v}"))
            .to_string();
        assert!(!sender.is_empty(), "empty sender: {v}");
        senders.push(sender);
    }
    assert_ne!(
        senders[0], senders[1],
        "two processes without FLY_ALLOC_ID report the same sender"
    );
}

#[test]
fn timestamp_boundaries_are_accepted() {
    let server = Server::start(&[("FLY_REGION", "r"), ("FLY_ALLOC_ID", "s")]);
    let mut a = server.client();
    let mut b = server.client();
    for ts in [0u64, 9_007_199_254_740_991] {
        a.send_alert(ts);
        assert_alert(&a.next_json(), ts, "r", "s");
        assert_alert(&b.next_json(), ts, "r", "s");
    }
}

/// Sends `input` from `sender`, expects ERROR `code` for it alone, then
/// proves nothing was broadcast and the connection still works by sending a
/// valid alert that must be the next thing both clients see.
fn assert_rejected(sender: &mut Client, observer: &mut Client, input: &str, code: &str, ts: u64) {
    sender.send_text(input);
    let err = sender.next_json();
    assert_eq!(
        (err["message"].as_str(), err["error"].as_str()),
        (Some("ERROR"), Some(code)),
        "input {input:?}: expected ERROR {code}, got {err}"
    );
    assert_eq!(
        keys(&err),
        key_set(&["message", "error", "detail"]),
        "input {input:?}: {err}"
    );
    assert!(
        err["detail"].as_str().is_some_and(|d| !d.trim().is_empty()),
        "input {input:?}: detail missing or empty: {err}"
    );

    sender.send_alert(ts);
    let own = sender.next_json();
    assert_eq!(
        own["timestamp"].as_u64(),
        Some(ts),
        "input {input:?}: sender's next message is not its following alert: {own}"
    );
    let seen = observer.next_json();
    assert_eq!(
        (seen["message"].as_str(), seen["timestamp"].as_u64()),
        (Some("ALIEN_LANDING"), Some(ts)),
        "input {input:?}: observer saw {seen} instead of the following alert"
    );
}

fn check_rejections(inputs: &[&str], code: &str) {
    let server = unlimited_server(&[]);
    let mut sender = server.client();
    let mut observer = server.client();
    for (i, input) in inputs.iter().enumerate() {
        assert_rejected(&mut sender, &mut observer, input, code, 1000 + i as u64);
    }
}

#[test]
fn non_json_or_non_object_text_is_invalid_json() {
    check_rejections(
        &[
            "not json",
            "",
            "{",
            r#"{"message":"ALIEN_LANDING","timestamp":1}garbage"#,
            "[1,2]",
            "42",
            r#""ALIEN_LANDING""#,
            "null",
            "true",
            r#"[{"message":"ALIEN_LANDING","timestamp":1}]"#,
        ],
        "invalid_json",
    );
}

#[test]
fn missing_non_string_or_unknown_message_is_unknown_message() {
    check_rejections(
        &[
            "{}",
            r#"{"timestamp":1}"#,
            r#"{"message":5,"timestamp":1}"#,
            r#"{"message":null,"timestamp":1}"#,
            r#"{"message":["ALIEN_LANDING"],"timestamp":1}"#,
            r#"{"message":"HELLO"}"#,
            r#"{"message":"HELLO","timestamp":1}"#,
            r#"{"message":"alien_landing","timestamp":1}"#,
        ],
        "unknown_message",
    );
}

#[test]
fn bad_timestamp_is_invalid_alert() {
    check_rejections(
        &[
            r#"{"message":"ALIEN_LANDING"}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":null}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":"1700000000000"}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":-1}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":1.5}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":true}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":{}}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":9007199254740992}"#,
            r#"{"message":"ALIEN_LANDING","timestamp":18446744073709551616}"#,
        ],
        "invalid_alert",
    );
}

#[test]
fn sixth_alert_in_a_burst_is_rate_limited_per_connection() {
    // Defaults: 1 alert/s refill, burst 5.
    let server = Server::start(&[]);
    let mut a = server.client();
    let mut b = server.client();
    for ts in 1..=6 {
        a.send_alert(ts);
    }
    // The sender gets 5 broadcasts and one rate_limited error, the error
    // being about the 6th alert (order relative to broadcasts not fixed).
    let mut broadcast = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..6 {
        let v = a.next_json();
        match v["message"].as_str() {
            Some("ALIEN_LANDING") => broadcast.push(v["timestamp"].as_u64().unwrap()),
            Some("ERROR") => errors.push(v),
            _ => panic!("unexpected message {v}"),
        }
    }
    assert_eq!(broadcast, vec![1, 2, 3, 4, 5], "sender's broadcasts");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["error"], "rate_limited", "{}", errors[0]);
    assert_eq!(
        keys(&errors[0]),
        key_set(&["message", "error", "detail"]),
        "{}",
        errors[0]
    );

    // The other client saw exactly the 5 broadcasts...
    for ts in 1..=5 {
        assert_eq!(b.next_alert()["timestamp"].as_u64(), Some(ts));
    }
    // ...and is not limited by a's bucket: its own alert goes through and is
    // the next thing both see (so a's 6th alert was never broadcast).
    b.send_alert(100);
    assert_eq!(b.next_alert()["timestamp"].as_u64(), Some(100));
    assert_eq!(a.next_alert()["timestamp"].as_u64(), Some(100));
}

#[test]
fn rate_limit_refills_at_fractional_rate() {
    // 2.5 alerts/s, burst 1: a token every 400 ms.
    let server = Server::start(&[("ALERTS_PER_SECOND", "2.5"), ("ALERT_BURST", "1")]);
    let mut a = server.client();
    a.send_alert(1);
    assert_eq!(a.next_alert()["timestamp"].as_u64(), Some(1));
    let first_done = Instant::now();
    a.send_alert(2);
    a.expect_error("rate_limited");
    // Time passing is the event we wait for here: after 700 ms at least one
    // token has been refilled.
    let wait = Duration::from_millis(700).saturating_sub(first_done.elapsed());
    thread::sleep(wait);
    a.send_alert(3);
    assert_eq!(a.next_alert()["timestamp"].as_u64(), Some(3));
    // The bucket holds at most 1 token (burst 1): the next one is limited.
    a.send_alert(4);
    a.expect_error("rate_limited");
}

/// Two healthy clients: `a` sends an alert and both receive it.
fn assert_others_unaffected(a: &mut Client, b: &mut Client, ts: u64) {
    a.send_alert(ts);
    assert_eq!(a.next_alert()["timestamp"].as_u64(), Some(ts));
    assert_eq!(b.next_alert()["timestamp"].as_u64(), Some(ts));
}

/// The offending client gets a close frame with `code`, then the server
/// closes the connection; the other clients keep working.
fn check_closed_with(send: impl FnOnce(&mut Client), code: u16) {
    let server = Server::start(&[]);
    let mut a = server.client();
    let mut b = server.client();
    let mut bad = server.client();
    send(&mut bad);
    assert_eq!(bad.expect_close(), code, "wrong close code");
    bad.expect_disconnect();
    assert_others_unaffected(&mut a, &mut b, 77);
}

#[test]
fn text_over_4096_bytes_is_closed_with_1009() {
    check_closed_with(|c| c.send_text(&"x".repeat(5000)), 1009);
}

#[test]
fn text_of_4097_bytes_is_closed_with_1009() {
    check_closed_with(|c| c.send_text(&"x".repeat(4097)), 1009);
}

#[test]
fn fragmented_text_over_4096_bytes_is_closed_with_1009() {
    check_closed_with(
        |c| {
            let part = vec![b'x'; 2500];
            c.send(Message::Frame(Frame::message(
                part.clone(),
                OpCode::Data(OpData::Text),
                false,
            )));
            c.send(Message::Frame(Frame::message(
                part,
                OpCode::Data(OpData::Continue),
                true,
            )));
        },
        1009,
    );
}

#[test]
fn text_of_exactly_4096_bytes_is_accepted() {
    let server = Server::start(&[("FLY_REGION", "r"), ("FLY_ALLOC_ID", "s")]);
    let mut a = server.client();
    let mut b = server.client();

    // Not JSON: an ordinary invalid_json error, connection stays open.
    a.send_text(&"x".repeat(4096));
    a.expect_error("invalid_json");

    // A valid alert padded with whitespace to exactly 4096 bytes.
    let mut padded = alert(4096);
    padded.push_str(&" ".repeat(4096 - padded.len()));
    assert_eq!(padded.len(), 4096);
    a.send_text(&padded);
    assert_alert(&a.next_json(), 4096, "r", "s");
    assert_alert(&b.next_json(), 4096, "r", "s");
}

#[test]
fn binary_frame_is_closed_with_1003() {
    check_closed_with(|c| c.send(Message::binary(alert(1).into_bytes())), 1003);
}

#[test]
fn invalid_utf8_text_is_closed_with_1007() {
    check_closed_with(
        |c| {
            c.send(Message::Frame(Frame::message(
                vec![b'{', 0xff, 0xfe, b'}'],
                OpCode::Data(OpData::Text),
                true,
            )))
        },
        1007,
    );
}

#[test]
fn alert_fans_out_to_fifty_clients() {
    let server = Server::start(&[("FLY_REGION", "ams"), ("FLY_ALLOC_ID", "fan")]);
    let mut clients: Vec<Client> = (0..50).map(|_| server.client()).collect();
    clients[17].send_alert(424242);
    let ids: HashSet<String> = clients
        .iter_mut()
        .map(|c| assert_alert(&c.next_json(), 424242, "ams", "fan"))
        .collect();
    assert_eq!(ids.len(), 1, "one alert, several ids: {ids:?}");
}

#[test]
fn alerts_from_one_client_arrive_in_order() {
    let server = unlimited_server(&[]);
    let mut a = server.client();
    let mut b = server.client();
    for ts in 0..200 {
        a.send_alert(ts);
    }
    for ts in 0..200 {
        assert_eq!(b.next_alert()["timestamp"].as_u64(), Some(ts));
        assert_eq!(a.next_alert()["timestamp"].as_u64(), Some(ts));
    }
}

#[test]
fn clean_close_by_client_is_acknowledged() {
    let server = Server::start(&[]);
    let mut a = server.client();
    let mut b = server.client();
    a.ws.close(None).expect("send close");
    let deadline = Instant::now() + TIMEOUT;
    // The server answers the close handshake and then ends the connection.
    loop {
        match a.read_until(deadline) {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("after close got {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake not completed cleanly: {e}"),
        }
    }
    b.send_alert(8);
    assert_eq!(b.next_alert()["timestamp"].as_u64(), Some(8));
}
