//! Graceful shutdown on SIGTERM / SIGINT.

mod support;

use std::time::{Duration, Instant};

use support::{Server, raw_connect, try_connect};

const EXIT_LIMIT: Duration = Duration::from_secs(5);

fn check_graceful_shutdown(sig: libc::c_int, name: &str) {
    let mut server = Server::start(&[]);
    let mut clients: Vec<_> = (0..3).map(|_| server.client()).collect();
    // Make sure all three are fully registered with the broker.
    clients[0].send_alert(1);
    for c in &mut clients {
        assert_eq!(c.next_alert()["timestamp"].as_u64(), Some(1));
    }

    let start = Instant::now();
    server.signal(sig);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.expect_close_within(EXIT_LIMIT),
            1001,
            "{name}: client {i} got the wrong close code"
        );
    }

    // The signal has been handled: new connections are refused.
    if let Ok(mut c) = try_connect(server.addr, None) {
        // The upgrade must not have happened; a greeting would be a failure.
        panic!(
            "{name}: new WebSocket connection accepted after the signal: {:?}",
            c.poll_until(Instant::now() + Duration::from_millis(100))
        );
    }

    let remaining = EXIT_LIMIT.saturating_sub(start.elapsed());
    let status = server
        .wait_exit(remaining)
        .unwrap_or_else(|| panic!("{name}: server still running {EXIT_LIMIT:?} after the signal"));
    assert_eq!(status.code(), Some(0), "{name}: exit status {status:?}");
    assert!(
        !server.logs().contains("panicked"),
        "{name}: server panicked:\n{}",
        server.logs()
    );
}

#[test]
fn sigterm_sends_going_away_and_exits_zero() {
    check_graceful_shutdown(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_sends_going_away_and_exits_zero() {
    check_graceful_shutdown(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_without_clients_exits_zero_quickly() {
    let mut server = Server::start(&[]);
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(EXIT_LIMIT)
        .expect("server still running 5 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        raw_connect_fails(&server),
        "port still accepting after exit"
    );
}

fn raw_connect_fails(server: &Server) -> bool {
    std::net::TcpStream::connect_timeout(&server.addr, Duration::from_secs(1)).is_err()
}

#[test]
fn idle_connections_do_not_delay_shutdown() {
    // A long handshake timeout, so it cannot be what ends the idle sockets.
    let mut server = Server::start(&[("HANDSHAKE_TIMEOUT_SECS", "30")]);
    let _idle: Vec<_> = (0..3).map(|_| raw_connect(server.addr)).collect();
    let mut c = server.client();
    // A client in the middle of nothing: connected, not reading.
    let _quiet = server.client();
    c.send_alert(2);
    assert_eq!(c.next_alert()["timestamp"].as_u64(), Some(2));

    server.signal(libc::SIGTERM);
    assert_eq!(c.expect_close_within(EXIT_LIMIT), 1001);
    let status = server
        .wait_exit(EXIT_LIMIT)
        .expect("server still running 5 s after SIGTERM with idle connections open");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}
