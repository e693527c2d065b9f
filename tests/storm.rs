//! Storms: many people press at once. Past STORM_ALERTS_PER_SECOND, presses
//! are counted into ALIEN_LANDING_SUMMARY messages; every accepted press
//! reaches every client exactly once, as an alert or inside one summary's
//! count, through either broker, and a press within its sender's rate limit
//! is never refused because others are pressing too.
//!
//! Each person connects from a loopback address of their own
//! (`support::person`), as people do on the internet.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use pubsub_test_server::{Options, PubSubTestServer};
use serde_json::{Value, json};
use support::{Client, Server, WITH_METRICS, connect_from, connect_since, emulator_env, person};

/// Long enough for a storm's last summary on a busy 2-core machine.
const ACCOUNTING_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client heard of a storm.
#[derive(Default, Debug)]
struct Heard {
    alerts: Vec<Value>,
    summaries: Vec<Value>,
    /// Ids in the order they arrived (alerts and summaries).
    ids: Vec<String>,
}

impl Heard {
    /// Presses accounted for: each alert, plus each summary's count.
    fn presses(&self) -> u64 {
        self.alerts.len() as u64
            + self
                .summaries
                .iter()
                .map(|s| s["count"].as_u64().unwrap())
                .sum::<u64>()
    }

    /// Presses accounted for, by region.
    fn by_region(&self) -> BTreeMap<String, u64> {
        let mut regions = BTreeMap::new();
        for alert in &self.alerts {
            *regions
                .entry(alert["regionCode"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        for summary in &self.summaries {
            for (region, n) in summary["regions"].as_object().unwrap() {
                *regions.entry(region.clone()).or_default() += n.as_u64().unwrap();
            }
        }
        regions
    }
}

/// Reads alerts and summaries until `c` has accounted for `expected` presses.
fn listen(c: &mut Client, expected: u64) -> Heard {
    let deadline = Instant::now() + ACCOUNTING_TIMEOUT;
    let mut heard = Heard::default();
    while heard.presses() < expected {
        assert!(
            Instant::now() < deadline,
            "accounted for {} of {expected} presses within {ACCOUNTING_TIMEOUT:?}: {heard:?}",
            heard.presses()
        );
        let v = c.next_message_until(deadline);
        match v["message"].as_str() {
            Some("ALIEN_LANDING") => {
                heard.ids.push(v["id"].as_str().unwrap().to_string());
                heard.alerts.push(v);
            }
            Some("ALIEN_LANDING_SUMMARY") => {
                check_summary_shape(&v);
                heard.ids.push(v["id"].as_str().unwrap().to_string());
                heard.summaries.push(v);
            }
            _ => panic!("unexpected message during a storm: {v}"),
        }
    }
    assert_eq!(heard.presses(), expected, "counted too many: {heard:?}");
    heard
}

/// After a storm is accounted for, nothing more about it may arrive: a
/// press counted twice would show here. Waits three summary periods (a
/// negative check has no event to wait for), for all `clients` together.
fn assert_quiet<'a>(clients: impl IntoIterator<Item = &'a mut Client>, summary_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(3 * summary_ms);
    for c in clients {
        if let Some(Ok(tungstenite::Message::Text(text))) = c.poll_until(deadline) {
            panic!("more after the storm was accounted for: {text}");
        }
    }
}

fn check_summary_shape(v: &Value) {
    let keys = support::keys(v);
    assert_eq!(
        keys,
        support::key_set(&["message", "id", "count", "regions", "from", "to"]),
        "{v}"
    );
    let id = v["id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    let count = v["count"].as_u64().unwrap();
    let by_region: u64 = v["regions"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(count > 0, "an empty summary: {v}");
    assert_eq!(count, by_region, "count is not the sum of regions: {v}");
    assert!(
        v["from"].as_u64().unwrap() < v["to"].as_u64().unwrap(),
        "{v}"
    );
}

/// Summaries of one stream never overlap, in the order they arrived.
fn assert_windows_in_order(summaries: &[Value]) {
    for pair in summaries.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            b["from"].as_u64() >= a["to"].as_u64(),
            "overlapping windows: {a} then {b}"
        );
    }
}

fn press(c: &mut Client) {
    c.send_alert(1_700_000_000_000);
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = server.scrape().body_text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[test]
fn a_storm_reaches_every_client_exactly_once_as_alerts_and_summaries() {
    const PRESSERS: usize = 30;
    let server = Server::start(&[
        WITH_METRICS,
        ("FLY_REGION", "syd"),
        ("STORM_ALERTS_PER_SECOND", "3"),
        ("STORM_SUMMARY_MS", "100"),
    ]);
    let mut people: Vec<Client> = (0..PRESSERS + 2)
        .map(|n| connect_from(server.addr, person(n)))
        .collect();
    // Everyone but the last two presses, as close to together as one
    // thread can.
    for c in &mut people[..PRESSERS] {
        press(c);
    }

    let mut streams = Vec::new();
    let mut heards = Vec::new();
    for c in &mut people {
        heards.push(listen(c, PRESSERS as u64));
    }
    let mut accepted = HashSet::new();
    for c in &mut people[..PRESSERS] {
        let id = c.next_accepted();
        assert!(accepted.insert(id.clone()), "ACCEPTED id {id} twice");
    }
    for heard in heards {
        assert!(heard.alerts.len() <= 3, "{} alerts", heard.alerts.len());
        assert!(!heard.summaries.is_empty(), "no summary in a storm");
        assert_eq!(
            heard.by_region(),
            BTreeMap::from([("syd".to_string(), PRESSERS as u64)])
        );
        for alert in &heard.alerts {
            let id = alert["id"].as_str().unwrap();
            assert!(accepted.contains(id), "alert {id} was never ACCEPTED");
        }
        for s in &heard.summaries {
            assert!(s["to"].as_u64().unwrap() - s["from"].as_u64().unwrap() <= 100);
        }
        assert_windows_in_order(&heard.summaries);
        streams.push(heard.ids);
    }
    // All clients of an instance get the same stream.
    assert!(streams.windows(2).all(|w| w[0] == w[1]), "{streams:?}");
    assert_quiet(&mut people, 100);
    for c in &people {
        assert!(c.accepted.is_empty(), "a stray ACCEPTED: {:?}", c.accepted);
    }
    let summarized = metric(&server, "skywatch_presses_summarized_total");
    let sent = streams[0].len() as f64;
    assert!(summarized >= PRESSERS as f64 - 3.0, "{summarized}");
    assert!(metric(&server, "skywatch_summaries_sent_total") >= 1.0);
    assert!(sent >= 2.0);
}

#[test]
fn every_press_within_its_limit_is_accepted_when_everyone_presses() {
    // 250 people each press their whole burst (5, the default) at once:
    // more than the fan-out's queue holds, so the local broker counts the
    // rest into the summary instead of refusing them.
    const PEOPLE: usize = 250;
    const BURST: usize = 5;
    let server = Server::start(&[WITH_METRICS, ("STORM_SUMMARY_MS", "100")]);
    let mut people: Vec<Client> = (0..PEOPLE)
        .map(|n| connect_from(server.addr, person(n)))
        .collect();
    let mut bystander = connect_from(server.addr, person(PEOPLE));
    for _ in 0..BURST {
        for c in &mut people {
            press(c);
        }
    }
    let expected = (PEOPLE * BURST) as u64;
    let heard = listen(&mut bystander, expected);
    assert!(heard.alerts.len() <= 10, "{} alerts", heard.alerts.len());
    for c in &mut people {
        let heard = listen(c, expected);
        assert_windows_in_order(&heard.summaries);
        for _ in 0..BURST {
            c.next_accepted();
        }
    }
    assert_quiet([&mut bystander], 100);
    assert_eq!(
        metric(&server, "skywatch_alerts_received_total"),
        expected as f64
    );
    let refused = server
        .scrape()
        .body_text()
        .lines()
        .filter(|l| l.starts_with("skywatch_messages_rejected_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum::<f64>();
    assert_eq!(refused, 0.0, "presses refused in a storm");
    assert_eq!(metric(&server, "skywatch_alerts_rate_limited_total"), 0.0);
}

#[test]
fn a_storm_through_pubsub_reaches_every_client_of_every_instance_once() {
    const PER_INSTANCE: usize = 40;
    const BURST: usize = 5;
    let ts = PubSubTestServer::start(Options::default()).expect("start the Pub/Sub test server");
    let start = |alloc: &str, region: &str| {
        let mut env = emulator_env(ts.addr(), alloc, region);
        env.push(("STORM_SUMMARY_MS".into(), "100".into()));
        env.push(("PRESENCE_INTERVAL_SECS".into(), "0".into()));
        let server = Server::start_owned(&env);
        server.wait_ready(Duration::from_secs(10));
        server
    };
    let ams = start("aaaa00a1", "ams");
    let syd = start("bbbb00b1", "syd");
    let mut people: Vec<Client> = (0..2 * PER_INSTANCE)
        .map(|n| {
            let instance = if n % 2 == 0 { &ams } else { &syd };
            connect_from(instance.addr, person(n))
        })
        .collect();
    for _ in 0..BURST {
        for c in &mut people {
            press(c);
        }
    }
    let expected = (2 * PER_INSTANCE * BURST) as u64;
    let per_region = (PER_INSTANCE * BURST) as u64;
    for c in &mut people {
        let heard = listen(c, expected);
        assert_eq!(
            heard.by_region(),
            BTreeMap::from([
                ("ams".to_string(), per_region),
                ("syd".to_string(), per_region)
            ]),
        );
        assert_windows_in_order(&heard.summaries);
        for _ in 0..BURST {
            c.next_accepted();
        }
    }
    assert_quiet(&mut people, 100);
    // Pub/Sub carried each press once: 400 alerts published.
    let published: usize = ts
        .published("projects/skywatch-test/topics/ALIEN_NOTIFICATIONS")
        .len();
    assert_eq!(published as u64, expected);
}

#[test]
fn a_client_cannot_send_a_summary_or_an_accepted() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let mut other = server.client();
    c.send_text(
        &json!({"message": "ALIEN_LANDING_SUMMARY", "id": "a".repeat(32), "count": 1000,
            "regions": {"syd": 1000}, "from": 0, "to": 200})
        .to_string(),
    );
    c.expect_error("unknown_message");
    c.send_text(&json!({"message": "ACCEPTED", "id": "a".repeat(32)}).to_string());
    c.expect_error("unknown_message");
    // Nothing reached the others, and the connection still works.
    press(&mut c);
    assert_eq!(other.next_json()["message"], "ALIEN_LANDING");
}

#[test]
fn accepted_goes_to_the_sender_alone_with_its_alert_id() {
    let server = Server::start(&[]);
    let mut sender = server.client();
    let mut other = server.client();
    press(&mut sender);
    let alert = sender.next_alert();
    let accepted = sender.next_accepted();
    assert_eq!(alert["id"].as_str(), Some(accepted.as_str()));
    assert_eq!(other.next_alert()["id"], alert["id"]);
    assert_quiet([&mut other], 100);
    assert!(other.accepted.is_empty(), "{:?}", other.accepted);
}

#[test]
fn a_client_can_come_back_after_a_summary_and_gets_what_followed() {
    // Summaries only, so every press goes into one.
    let server = Server::start(&[
        ("STORM_ALERTS_PER_SECOND", "0"),
        ("STORM_SUMMARY_MS", "50"),
        ("FLY_REGION", "ams"),
    ]);
    let mut a = connect_from(server.addr, person(0));
    let mut b = connect_from(server.addr, person(1));
    press(&mut a);
    let first = listen(&mut b, 1).summaries.remove(0);
    press(&mut a);
    let second = listen(&mut b, 1).summaries.remove(0);
    assert!(second["from"].as_u64() >= first["to"].as_u64());

    let first_id = first["id"].as_str().unwrap();
    let mut back = connect_since(server.addr, first_id).with_presence();
    let replayed = back.next_message_until(Instant::now() + support::TIMEOUT);
    assert_eq!(replayed["message"], "ALIEN_LANDING_SUMMARY", "{replayed}");
    assert_eq!(replayed["id"], second["id"]);
    assert_eq!(replayed["count"], 1);
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["regions"], json!({"ams": 1}));
    // Then the current watcher count, then the live stream.
    back.next_presence(support::TIMEOUT);
    back.presence = false;
    assert_quiet([&mut back], 50);
}

#[test]
fn waiting_frames_go_out_in_one_batch_with_the_same_bytes() {
    let server = Server::start(&[
        WITH_METRICS,
        ("ALERTS_PER_SECOND", "100000"),
        ("ALERT_BURST", "100000"),
        ("STORM_ALERTS_PER_SECOND", "100000"),
    ]);
    let mut sender = server.client();
    let mut watcher = server.client();
    let before = metric(&server, "skywatch_fanout_batch_frames_count");
    for ts in 0..300 {
        sender.send_alert(ts);
    }
    for ts in 0..300 {
        assert_eq!(watcher.next_alert()["timestamp"], ts);
    }
    let batches = metric(&server, "skywatch_fanout_batch_frames_count") - before;
    let frames = metric(&server, "skywatch_fanout_batch_frames_sum");
    let single = metric(&server, "skywatch_fanout_batch_frames_bucket{le=\"1\"}");
    assert!(frames >= 300.0, "{frames}");
    // Alerts arrive faster than the fan-out wakes for each (it also answers
    // the sender's 300 ACCEPTED first), so some batches carry several.
    assert!(
        single < batches + before,
        "{batches} batches for 300 alerts, every one a single frame"
    );
    // The sender got them all too, in order, after its replies.
    for ts in 0..300 {
        assert_eq!(sender.next_alert()["timestamp"], ts);
    }
}

#[test]
fn a_replay_too_large_for_one_write_is_a_missed_notice() {
    // Room for 1,000 messages, but a replay must fit half a client's 64 KiB
    // backlog, or writing it would get the returning client dropped as slow.
    let server = Server::start(&[
        ("RECOVERY_ALERTS", "1000"),
        ("ALERTS_PER_SECOND", "100000"),
        ("ALERT_BURST", "100000"),
        ("ADDRESS_ALERTS_PER_SECOND", "100000"),
        ("ADDRESS_ALERT_BURST", "100000"),
        ("STORM_ALERTS_PER_SECOND", "100000"),
    ]);
    let mut sender = connect_from(server.addr, person(0));
    sender.send_alert(0);
    let first = sender.next_alert()["id"].as_str().unwrap().to_string();
    // 400 alerts of ~170 bytes: ~68 KB after the first.
    for ts in 1..=400 {
        sender.send_alert(ts);
    }
    let mut three_hundredth = String::new();
    for ts in 1..=400 {
        let v = sender.next_alert();
        assert_eq!(v["timestamp"], ts);
        if ts == 300 {
            three_hundredth = v["id"].as_str().unwrap().to_string();
        }
    }
    let mut back = connect_since(server.addr, &first);
    let v = back.next_json();
    assert_eq!(v["message"], "MISSED", "{v}");
    assert_eq!(v["since"], first.as_str());
    // Coming back after the 300th: the last 100 (~17 KB) fit, in order.
    let mut near = connect_since(server.addr, &three_hundredth);
    for ts in 301..=400 {
        let v = near.next_alert();
        assert_eq!(
            (v["timestamp"].as_u64(), v["replayed"].as_bool()),
            (Some(ts), Some(true))
        );
    }
    back.send_alert(7);
    assert_eq!(back.next_alert()["timestamp"], 7);
}
