//! GET /metrics (issue 7): Prometheus text format, with the counters moving
//! as clients connect, send, get refused and leave.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use pubsub_test_server::{Options, PubSubTestServer};
use support::{Server, emulator_env, get};

/// The samples, by series (name plus labels), after checking that every
/// family has `# HELP` and `# TYPE`.
fn scrape(server: &Server) -> BTreeMap<String, f64> {
    let response = get(server.addr, "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.body_text();
    let mut typed = HashSet::new();
    let mut helped = HashSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap_or_default().to_owned();
            let kind = parts.next().unwrap_or_default();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name);
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap_or_default().to_owned());
        } else if !line.is_empty() {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            let name = series.split('{').next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "{name} has no # TYPE");
            assert!(helped.contains(family), "{name} has no # HELP");
            samples.insert(series.to_owned(), value);
        }
    }
    samples
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

/// Scrapes until `series` reads `expected`: the gauge is updated by the
/// fan-out thread, after the event that changes it.
fn wait_value(server: &Server, series: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = value(&scrape(server), series);
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn counters_follow_clients_alerts_and_refusals() {
    let server = Server::start(&[
        ("FLY_REGION", "ams"),
        ("ALERT_BURST", "1"),
        ("ALERTS_PER_SECOND", "0.001"),
    ]);
    let before = scrape(&server);
    assert_eq!(value(&before, "skywatch_connected_clients"), 0.0);
    let build_info = format!(
        "skywatch_build_info{{version=\"{}\",broker=\"local\",region=\"ams\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&before, &build_info), 1.0);

    let mut a = server.client();
    let mut b = server.client();
    wait_value(&server, "skywatch_connected_clients", 2.0);

    a.send_alert(1);
    a.next_alert();
    b.next_alert();
    a.send_alert(2);
    a.expect_error("rate_limited");
    a.send_text("not json");
    a.expect_error("invalid_json");
    a.send_text(r#"{"message":"HELLO"}"#);
    a.expect_error("unknown_message");

    // Counters move just after the work they count (a delivery can reach
    // its client before its thread has counted it): wait for them.
    wait_value(&server, "skywatch_alerts_received_total", 1.0);
    wait_value(&server, "skywatch_alerts_published_total", 1.0);
    wait_value(&server, "skywatch_alerts_delivered_total", 2.0);
    let after = scrape(&server);
    assert_eq!(value(&after, "skywatch_alerts_rate_limited_total"), 1.0);
    for (code, n) in [
        ("invalid_json", 1.0),
        ("unknown_message", 1.0),
        ("invalid_alert", 0.0),
        ("broker_unavailable", 0.0),
    ] {
        let series = format!("skywatch_messages_rejected_total{{code=\"{code}\"}}");
        assert_eq!(value(&after, &series), n, "{series}");
    }
    assert_eq!(value(&after, "skywatch_slow_clients_dropped_total"), 0.0);

    b.close();
    wait_value(&server, "skywatch_connected_clients", 1.0);
    drop(a);
    wait_value(&server, "skywatch_connected_clients", 0.0);
}

#[test]
fn pubsub_calls_are_timed_and_their_errors_counted() {
    let ts = PubSubTestServer::start(Options::default()).expect("start the Pub/Sub test server");
    let mut env = emulator_env(ts.addr(), "aaaa0009", "ams");
    // No heartbeats: the publish counts below are the alert's alone.
    env.push(("PRESENCE_INTERVAL_SECS".into(), "0".into()));
    let server = Server::start_owned(&env);
    server.wait_ready(Duration::from_secs(10));
    assert!(ts.wait_for(Duration::from_secs(5), |s| s.held_pulls()
        >= support::OUTSTANDING_PULLS));

    let mut c = server.client();
    ts.fail_next(2, 503);
    c.send_alert(1);
    assert_eq!(c.next_alert()["timestamp"], 1);

    // The publisher counts its success after Pub/Sub answers, which can be
    // after the puller has already delivered the alert.
    wait_value(&server, "skywatch_alerts_published_total", 1.0);
    wait_value(&server, "skywatch_alerts_delivered_total", 1.0);
    let samples = scrape(&server);
    let errors = value(&samples, "skywatch_publish_errors_total")
        + value(&samples, "skywatch_pull_errors_total");
    assert_eq!(errors, 2.0, "both injected failures counted");
    assert!(value(&samples, "skywatch_publish_duration_seconds_count") >= 3.0);
    assert!(value(&samples, "skywatch_pull_duration_seconds_count") >= 1.0);
    assert_eq!(
        value(
            &samples,
            "skywatch_publish_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        value(&samples, "skywatch_publish_duration_seconds_count")
    );
}

#[test]
fn metrics_answer_get_and_head_only() {
    let server = Server::start(&[]);
    let response = support::http(server.addr, "POST", "/metrics");
    assert_eq!(response.status, 405);
    assert_eq!(response.header("Allow"), Some("GET, HEAD"));
    let head = support::http(server.addr, "HEAD", "/metrics");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}
