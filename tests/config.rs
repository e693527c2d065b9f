//! Command line and environment configuration.

mod support;

use std::net::TcpListener;

use support::{Server, get, run_to_exit};

/// Every variable and a string its documented default must show
/// (ALLOWED_ORIGINS has no default value, only extra origins).
const VARIABLES: &[(&str, Option<&str>)] = &[
    ("HOST", Some("0.0.0.0")),
    ("PORT", Some("8080")),
    ("METRICS_PORT", Some("unset")),
    ("FLY_ALLOC_ID", Some("random")),
    ("FLY_REGION", Some("LOCAL_REGION")),
    ("ALLOWED_ORIGINS", None),
    ("MAX_CONNECTIONS", Some("memory")),
    ("ADDRESS_ALERTS_PER_SECOND", Some("20")),
    ("ADDRESS_ALERT_BURST", Some("300")),
    ("ADDRESS_MAX_CONNECTIONS", Some("300")),
    ("CONTROL_PER_SECOND", Some("10")),
    ("CLIENT_IP_HEADER", None),
    ("ALERTS_PER_SECOND", Some("1")),
    ("ALERT_BURST", Some("5")),
    ("STORM_ALERTS_PER_SECOND", Some("10")),
    ("STORM_SUMMARY_MS", Some("200")),
    ("PUBSUB_OUTSTANDING_PULLS", Some("4")),
    ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", Some("unset")),
    ("GOOGLE_IMPERSONATE_SERVICE_ACCOUNT", Some("unset")),
    ("FLY_API_SOCKET", Some("/.fly/api")),
    ("GOOGLE_STS_ENDPOINT", Some("https://sts.googleapis.com")),
    (
        "GOOGLE_IAMCREDENTIALS_ENDPOINT",
        Some("https://iamcredentials.googleapis.com"),
    ),
    ("LOG_LEVEL", Some("info")),
    ("PING_INTERVAL_SECS", Some("30")),
    ("HANDSHAKE_TIMEOUT_SECS", Some("5")),
];

/// Whether `line`, trimmed, starts with the variable `name` as a whole word.
fn starts_with_var(line: &str, name: &str) -> bool {
    let t = line.trim_start().trim_start_matches(['-', '*', '`']);
    t.strip_prefix(name).is_some_and(|rest| {
        !rest
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The part of the help text documenting `name`: from the line that starts
/// with it up to the next line starting with another variable.
fn help_section<'a>(help: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let lines: Vec<&str> = help.lines().collect();
    let start = lines.iter().position(|l| starts_with_var(l, name))?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| VARIABLES.iter().any(|(v, _)| starts_with_var(l, v)))
        .map_or(lines.len(), |i| start + 1 + i);
    Some(lines[start..end].to_vec())
}

fn check_help(flag: &str) {
    let out = run_to_exit(&[flag], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{flag}: {:?}\n{}",
        out.status,
        out.stderr
    );
    for (name, default) in VARIABLES {
        let section = help_section(&out.stdout, name)
            .unwrap_or_else(|| panic!("{flag}: {name} not listed in:\n{}", out.stdout));
        let text = section.join("\n");
        if let Some(default) = default {
            assert!(
                text.to_lowercase().contains(&default.to_lowercase()),
                "{flag}: default {default:?} of {name} not shown in:\n{text}"
            );
        }
    }
}

#[test]
fn help_lists_every_variable_with_its_default() {
    check_help("--help");
}

#[test]
fn short_help_lists_every_variable_with_its_default() {
    check_help("-h");
}

#[test]
fn version_prints_name_and_version() {
    let out = run_to_exit(&["--version"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{:?}\n{}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout.trim(), "skywatch 0.1.0");
}

#[test]
fn unknown_argument_exits_2() {
    let out = run_to_exit(&["--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2), "{:?}", out.status);
    assert!(!out.stderr.trim().is_empty(), "no message on stderr");
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// Runs with `var=value` and checks the contract for invalid configuration:
/// exit 2, one stderr line naming the variable and the bad value, no panic.
fn check_invalid(var: &str, value: &str, shown: &str) {
    let out = run_to_exit(&[], &[(var, value)]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{var}={value:?}: {:?}\nstderr: {}",
        out.status,
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked"),
        "{var}={value:?}: {}",
        out.stderr
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{var}={value:?}: expected one stderr line, got:\n{}",
        out.stderr
    );
    assert!(
        lines[0].contains(var) && lines[0].contains(shown),
        "{var}={value:?}: message does not name the variable and value {shown:?}: {}",
        lines[0]
    );
}

#[test]
fn invalid_port_is_rejected() {
    check_invalid("PORT", "abc", "abc");
    check_invalid("PORT", "70000", "70000");
    check_invalid("PORT", "-1", "-1");
}

#[test]
fn invalid_metrics_port_is_rejected() {
    check_invalid("METRICS_PORT", "abc", "abc");
    check_invalid("METRICS_PORT", "70000", "70000");
    check_invalid("METRICS_PORT", "-1", "-1");
    check_invalid("METRICS_PORT", "9091x", "9091x");
}

#[test]
fn metrics_port_must_not_be_port() {
    let out = run_to_exit(&[], &[("PORT", "18080"), ("METRICS_PORT", "18080")]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{:?}\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.contains("invalid METRICS_PORT=\"18080\"") && out.stderr.contains("PORT"),
        "{}",
        out.stderr
    );
}

#[test]
fn invalid_max_connections_is_rejected() {
    check_invalid("MAX_CONNECTIONS", "0", "0");
    check_invalid("MAX_CONNECTIONS", "-1", "-1");
    check_invalid("MAX_CONNECTIONS", "many", "many");
}

#[test]
fn invalid_alerts_per_second_is_rejected() {
    check_invalid("ALERTS_PER_SECOND", "0", "0");
    check_invalid("ALERTS_PER_SECOND", "nan", "nan");
    check_invalid("ALERTS_PER_SECOND", "abc", "abc");
    check_invalid("ALERTS_PER_SECOND", "-1", "-1");
}

#[test]
fn invalid_alert_burst_is_rejected() {
    check_invalid("ALERT_BURST", "0", "0");
    check_invalid("ALERT_BURST", "abc", "abc");
}

#[test]
fn invalid_storm_settings_are_rejected() {
    check_invalid("STORM_ALERTS_PER_SECOND", "-1", "-1");
    check_invalid("STORM_ALERTS_PER_SECOND", "100001", "100001");
    check_invalid("STORM_ALERTS_PER_SECOND", "many", "many");
    check_invalid("STORM_SUMMARY_MS", "0", "0");
    check_invalid("STORM_SUMMARY_MS", "9", "9");
    check_invalid("STORM_SUMMARY_MS", "60001", "60001");
    check_invalid("STORM_SUMMARY_MS", "1.5", "1.5");
}

#[test]
fn invalid_outstanding_pulls_are_rejected_with_pubsub() {
    for value in ["0", "17", "four"] {
        let out = run_to_exit(
            &[],
            &[
                ("PUBSUB_EMULATOR_HOST", "127.0.0.1:1"),
                ("PUBSUB_PROJECT_ID", "p"),
                ("PUBSUB_OUTSTANDING_PULLS", value),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{value}: {}", out.stderr);
        assert!(
            out.stderr
                .contains(&format!("invalid PUBSUB_OUTSTANDING_PULLS=\"{value}\"")),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn invalid_log_level_is_rejected() {
    check_invalid("LOG_LEVEL", "loud", "loud");
}

#[test]
fn invalid_ping_interval_is_rejected() {
    check_invalid("PING_INTERVAL_SECS", "0", "0");
    check_invalid("PING_INTERVAL_SECS", "soon", "soon");
}

#[test]
fn invalid_handshake_timeout_is_rejected() {
    check_invalid("HANDSHAKE_TIMEOUT_SECS", "abc", "abc");
}

#[test]
fn allowed_origins_with_a_non_origin_is_rejected() {
    check_invalid("ALLOWED_ORIGINS", "not a url", "not a url");
    check_invalid(
        "ALLOWED_ORIGINS",
        "https://a.example,not a url",
        "not a url",
    );
}

#[test]
fn allowed_origins_with_a_path_is_rejected() {
    // A URL with a path is not an origin.
    check_invalid(
        "ALLOWED_ORIGINS",
        "https://a.example/path",
        "https://a.example/path",
    );
}

#[test]
fn startup_logs_listening_address_and_local_broker() {
    let server = Server::start(&[]);
    let logs = server.logs();
    assert!(
        logs.contains(&format!("listening on http://{}", server.addr)),
        "{logs}"
    );
    assert!(
        server.wait_for_log("broker: local", support::TIMEOUT),
        "no `broker: local` line:\n{}",
        server.logs()
    );
    assert!(!server.logs().contains("panicked"));
}

#[test]
fn explicit_port_is_used() {
    // Ask the OS for a free port, release it, and hand it to the server.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let port_s = port.to_string();
    let server = Server::start(&[("PORT", &port_s)]);
    assert_eq!(server.addr.port(), port);
    assert_eq!(get(server.addr, "/healthz").status, 200);
}

#[test]
fn valid_non_default_values_are_accepted() {
    let server = Server::start(&[
        ("ALERTS_PER_SECOND", "0.5"),
        ("ALERT_BURST", "2"),
        ("MAX_CONNECTIONS", "3"),
        ("LOG_LEVEL", "debug"),
        ("PING_INTERVAL_SECS", "10"),
        ("HANDSHAKE_TIMEOUT_SECS", "3"),
        ("ALLOWED_ORIGINS", "https://a.example,http://b.example:8080"),
        ("FLY_REGION", "syd"),
        ("FLY_ALLOC_ID", "alloc-9"),
        ("STORM_ALERTS_PER_SECOND", "1"),
        ("STORM_SUMMARY_MS", "10"),
    ]);
    let mut c = server.client();
    c.send_alert(1);
    let v = c.next_alert();
    assert_eq!(v["regionCode"], "syd");
    assert_eq!(v["sender"], "alloc-9");
    // STORM_ALERTS_PER_SECOND=1: the second press within the second goes
    // out in a summary of a 10 ms window.
    c.send_alert(2);
    let v = c.next_json();
    assert_eq!(v["message"], "ALIEN_LANDING_SUMMARY", "{v}");
    assert_eq!(v["regions"], serde_json::json!({"syd": 1}));
    assert_eq!(v["to"].as_u64().unwrap() - v["from"].as_u64().unwrap(), 10);
    // ALERT_BURST=2 at 0.5/s: the third alert in a row is limited.
    c.send_alert(3);
    c.expect_error("rate_limited");
}
