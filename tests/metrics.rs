//! GET /metrics (issue 7): Prometheus text format, with the counters moving
//! as clients connect, send, get refused and leave; served on METRICS_PORT
//! alone (issue 13), never on the public PORT.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pubsub_test_server::{Options, PubSubTestServer};
use support::{Server, TIMEOUT, WITH_METRICS, emulator_env, get, http, http_raw, listening_ports};

/// The samples, by series (name plus labels), after checking that every
/// family has `# HELP` and `# TYPE`.
fn scrape(server: &Server) -> BTreeMap<String, f64> {
    let response = server.scrape();
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
        WITH_METRICS,
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
    env.push((WITH_METRICS.0.into(), WITH_METRICS.1.into()));
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
fn metrics_port_answers_get_and_head_of_metrics_only() {
    let server = Server::start(&[WITH_METRICS]);
    let metrics = server.metrics_addr();
    let response = http(metrics, "POST", "/metrics");
    assert_eq!(response.status, 405);
    assert_eq!(response.header("Allow"), Some("GET, HEAD"));
    response.assert_connection_close();
    let head = http(metrics, "HEAD", "/metrics");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    // The metrics port serves nothing else, and nothing of PORT's.
    for path in ["/", "/healthz", "/readyz", "/ws", "/metrics/x"] {
        let response = get(metrics, path);
        assert_eq!(response.status, 404, "GET {path} on the metrics port");
        response.assert_connection_close();
    }
    assert_eq!(http_raw(metrics, b"\x00\x01garbage\r\n\r\n").status, 400);
    assert_eq!(server.scrape().status, 200, "still serving after all that");
}

#[test]
fn metrics_are_never_served_on_the_public_port() {
    let server = Server::start(&[WITH_METRICS]);
    assert_ne!(server.metrics_addr().port(), server.addr.port());
    assert_eq!(server.scrape().status, 200);
    for method in ["GET", "HEAD", "POST"] {
        let response = http(server.addr, method, "/metrics");
        assert_eq!(response.status, 404, "{method} /metrics on PORT");
    }
    // What stays on PORT.
    for path in ["/", "/healthz", "/readyz"] {
        assert_eq!(get(server.addr, path).status, 200, "GET {path} on PORT");
    }
    server.client().send_alert(1);
    // The process listens on exactly the two ports.
    let mut expected = vec![server.addr.port(), server.metrics_addr().port()];
    expected.sort_unstable();
    assert_eq!(listening_ports(server.process.pid()), expected);
}

#[test]
fn without_metrics_port_nothing_serves_metrics() {
    // Unset, or empty (how a shell or fly.toml says "not set").
    for env in [&[][..], &[("METRICS_PORT", "")][..]] {
        let server = Server::start(env);
        assert!(
            server
                .logs()
                .contains("metrics: off (METRICS_PORT unset or empty)"),
            "{env:?}: {}",
            server.logs()
        );
        assert!(!server.logs().contains("metrics on http://"), "{env:?}");
        assert_eq!(get(server.addr, "/metrics").status, 404, "{env:?}");
        // No listener besides PORT's: several instances on one host do not
        // collide over a metrics port.
        assert_eq!(
            listening_ports(server.process.pid()),
            [server.addr.port()],
            "{env:?}"
        );
    }
}

#[test]
fn a_busy_metrics_port_is_logged_and_the_server_carries_on() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to take");
    let port = taken.local_addr().expect("its address").port().to_string();
    let server = Server::start(&[("METRICS_PORT", &port)]);
    let line = format!("cannot listen for metrics on port {port}");
    assert!(
        server.wait_for_log(&line, TIMEOUT) && server.logs().contains("metrics off"),
        "{}",
        server.logs()
    );
    assert_eq!(get(server.addr, "/readyz").status, 200);
    let mut c = server.client();
    c.send_alert(7);
    assert_eq!(c.next_alert()["timestamp"], 7);
    assert_eq!(listening_ports(server.process.pid()), [server.addr.port()]);
}

#[test]
fn a_stalled_scraper_holds_up_no_one_but_the_next_scrape() {
    let server = Server::start(&[WITH_METRICS]);
    let metrics = server.metrics_addr();
    // A scraper that never finishes its request.
    let mut stalled = TcpStream::connect(metrics).expect("connect");
    stalled.write_all(b"GET /metr").expect("write");
    // The public port does not wait for it: it answers while the stalled
    // scrape is still being held (open, unanswered).
    assert_eq!(get(server.addr, "/healthz").status, 200);
    let mut c = server.client();
    c.send_alert(1);
    assert_eq!(c.next_alert()["timestamp"], 1);
    stalled.set_nonblocking(true).expect("non-blocking");
    let held =
        matches!(stalled.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    stalled.set_nonblocking(false).expect("blocking again");
    assert!(
        held,
        "the stalled scrape was dropped or answered before PORT answered"
    );
    // ...and the metrics port drops it after its timeout (2 s) and answers
    // the next scrape.
    assert_eq!(server.scrape().status, 200);
    stalled
        .set_read_timeout(Some(TIMEOUT))
        .expect("set a read timeout");
    let mut rest = Vec::new();
    // Closed without an answer: EOF, or a reset for the bytes it never read.
    let closed = match std::io::Read::read_to_end(&mut stalled, &mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed,
        "the stalled scraper is still connected, or was answered: {rest:?}"
    );
}
