//! The `pubsub-test-server` binary: its flags, run as a real process.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, SUB, message_ids, publish, received, topic_and_subscription};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_pubsub-test-server");

/// The binary serving on some port; killed when dropped.
struct Running {
    child: Child,
    base: String,
    /// Kept open so the server never writes to a closed pipe.
    _stderr: BufReader<ChildStderr>,
}

impl Running {
    /// Starts the binary and waits for its `listening on URL` line.
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pubsub-test-server");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        let read = stderr.read_line(&mut line);
        let base = line.trim().strip_prefix("listening on ").map(str::to_owned);
        let Some(base) = base.filter(|_| read.is_ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pubsub-test-server {args:?} did not say where it listens: {line:?} {read:?}");
        };
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Running {
            child,
            base,
            _stderr: stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary expecting it to exit by itself: its status and stderr.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pubsub-test-server");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    // stderr closes when the process exits; a server that starts instead never does.
    let Ok(text) = rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("pubsub-test-server {args:?} did not exit");
    };
    (child.wait().expect("wait for pubsub-test-server"), text)
}

#[test]
fn pulls_return_immediately_flag_answers_empty_pulls_at_once() {
    let server = Running::start(&["--pulls-return-immediately", "--port", "0"]);
    let client = Client::new(&server.base);
    topic_and_subscription(&client);
    // Without the flag this pull would be held for 30 s.
    let started = Instant::now();
    let answer = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 1}));
    assert_eq!(answer, (200, json!({})));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn pull_fill_wait_flag_holds_a_pull_that_has_a_message() {
    let fill = Duration::from_millis(200);
    let server = Running::start(&["--pull-fill-wait-ms", "200", "--port", "0"]);
    let client = Client::new(&server.base);
    topic_and_subscription(&client);
    let ids = publish(&client, &[b"waiting"]);
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 10}));
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(elapsed >= fill, "answered after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "held {elapsed:?}");
}

#[test]
fn default_flags_answer_a_pull_with_a_message_at_once() {
    let server = Running::start(&["--host", "127.0.0.1", "--port", "0"]);
    let client = Client::new(&server.base);
    topic_and_subscription(&client);
    let ids = publish(&client, &[b"waiting"]);
    let started = Instant::now();
    let (status, body) = client.post(&format!("/v1/{SUB}:pull"), json!({"maxMessages": 10}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(message_ids(&received(&body)), ids);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn bad_arguments_exit_2_saying_what_is_wrong() {
    for (args, expected) in [
        (
            &["--pull-fill-wait-ms", "abc"][..],
            "bad --pull-fill-wait-ms \"abc\"",
        ),
        (
            &["--pull-fill-wait-ms", "-5"],
            "bad --pull-fill-wait-ms \"-5\"",
        ),
        (
            &["--pull-fill-wait-ms"],
            "--pull-fill-wait-ms needs a value",
        ),
        (&["--port", "http"], "bad --port \"http\""),
        (&["--pull-fill-wait-ms", "30001"], "milliseconds 0-30000"),
        (&["--port"], "--port needs a value"),
        (
            &["--pulls-return-immediately", "yes"],
            "unexpected argument \"yes\"",
        ),
        (&["--frobnicate"], "unexpected argument \"--frobnicate\""),
        (
            &["--pulls-return-immediately", "--pull-fill-wait-ms", "100"],
            "no effect",
        ),
    ] {
        let (status, stderr) = run_to_exit(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {status} {stderr}");
        assert!(
            stderr.starts_with("pubsub-test-server: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("usage: pubsub-test-server"), "{stderr}");
    }
}

#[test]
fn help_exits_0_and_lists_every_flag() {
    let (status, stderr) = run_to_exit(&["--help"]);
    assert!(status.success(), "{status}");
    for flag in [
        "--port",
        "--host",
        "--pulls-return-immediately",
        "--pull-fill-wait-ms",
    ] {
        assert!(stderr.contains(flag), "{flag} missing from {stderr}");
    }
}
