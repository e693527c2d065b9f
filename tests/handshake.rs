//! The WebSocket handshake: Origin checks, the MAX_CONNECTIONS limit and the
//! handshake timeout (slowloris protection).

mod support;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    ConnectError, Ended, Server, TIMEOUT, connect_eventually, connect_ready, get, raw_connect,
    raw_handshake, read_until_closed, try_connect,
};

fn assert_origin_allowed(server: &Server, origin: Option<&str>) {
    let mut c = try_connect(server.addr, origin)
        .unwrap_or_else(|e| panic!("origin {origin:?} should be allowed, got {e:?}"));
    let hello = c.next_json();
    assert_eq!(hello["message"], "CONNECTED", "origin {origin:?}: {hello}");
    c.close();
}

/// A WebSocket handshake (with `origin`, if any) must be refused with
/// HTTP `status`.
fn expect_refused(server: &Server, origin: Option<&str>, status: u16, what: &str) {
    match try_connect(server.addr, origin) {
        Err(ConnectError::Status(s)) if s == status => {}
        Err(other) => panic!("{what}: expected HTTP {status}, got {other:?}"),
        Ok(_) => panic!("{what}: upgraded to WebSocket, expected HTTP {status}"),
    }
}

fn expect_status(server: &Server, status: u16, what: &str) {
    expect_refused(server, None, status, what);
}

fn assert_origin_rejected(server: &Server, origin: &str) {
    expect_refused(server, Some(origin), 403, &format!("origin {origin:?}"));
}

#[test]
fn handshake_without_origin_is_allowed() {
    let server = Server::start(&[]);
    assert_origin_allowed(&server, None);
}

#[test]
fn origin_matching_host_header_is_allowed() {
    let server = Server::start(&[]);
    // tungstenite sends `Host: 127.0.0.1:PORT`.
    assert_origin_allowed(&server, Some(&format!("http://{}", server.addr)));
}

#[test]
fn foreign_origin_gets_403_without_upgrade() {
    let server = Server::start(&[]);
    assert_origin_rejected(&server, "https://evil.example");

    // Look at the raw response too: no upgrade, connection closed.
    let mut stream = raw_connect(server.addr);
    let resp = raw_handshake(
        &mut stream,
        server.addr,
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(
        resp.header("sec-websocket-accept").is_none(),
        "403 response carries Sec-WebSocket-Accept: {resp:?}"
    );
    resp.assert_connection_close();
    let (ended, _) = read_until_closed(&mut stream, TIMEOUT);
    assert_eq!(
        ended,
        Ended::Closed,
        "server kept the rejected connection open"
    );
}

#[test]
fn origin_with_same_ip_but_other_port_or_name_is_rejected() {
    let server = Server::start(&[]);
    let port = server.addr.port();
    let other_port = if port == 65535 { 65534 } else { port + 1 };
    assert_origin_rejected(&server, &format!("http://127.0.0.1:{other_port}"));
    assert_origin_rejected(&server, &format!("http://localhost:{port}"));
    assert_origin_rejected(&server, "null");
    // A rejected handshake does not break the server.
    assert_origin_allowed(&server, None);
}

#[test]
fn allowed_origins_list_is_honoured() {
    let server = Server::start(&[("ALLOWED_ORIGINS", "https://a.example,http://b.example:8080")]);
    assert_origin_allowed(&server, Some("https://a.example"));
    assert_origin_allowed(&server, Some("http://b.example:8080"));
    // The defaults still apply.
    assert_origin_allowed(&server, None);
    assert_origin_allowed(&server, Some(&format!("http://{}", server.addr)));
    // Anything else is rejected: other scheme, other port, other host.
    for origin in [
        "https://evil.example",
        "http://a.example",
        "https://b.example:8080",
        "http://b.example",
        "http://b.example:8081",
        "https://a.example.evil.example",
    ] {
        assert_origin_rejected(&server, origin);
    }
}

#[test]
fn extra_client_beyond_max_connections_gets_503_until_one_leaves() {
    let server = Server::start(&[("MAX_CONNECTIONS", "2")]);
    let a = connect_ready(server.addr);
    let mut b = connect_ready(server.addr);

    // Third simultaneous client: 503, no upgrade, connection closed.
    expect_status(&server, 503, "third client");
    let mut stream = raw_connect(server.addr);
    let resp = raw_handshake(&mut stream, server.addr, &[]);
    assert_eq!(resp.status, 503, "{resp:?}");
    resp.assert_connection_close();
    let (ended, _) = read_until_closed(&mut stream, TIMEOUT);
    assert_eq!(
        ended,
        Ended::Closed,
        "server kept the rejected connection open"
    );

    // Plain HTTP is still served while full.
    let health = get(server.addr, "/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body_text().trim(), "ok");

    // The existing clients are unaffected.
    b.send_alert(42);
    assert_eq!(b.next_alert()["timestamp"], 42);

    // One leaves (clean close); a new client is admitted once the server
    // has noticed.
    a.close();
    let mut c = connect_eventually(server.addr, TIMEOUT);
    assert_eq!(c.next_json()["message"], "CONNECTED");

    // Full again: the rejected attempts above did not leak or free slots.
    expect_status(&server, 503, "client when full again");
    c.send_alert(43);
    assert_eq!(c.next_alert()["timestamp"], 43);
    assert_eq!(b.next_alert()["timestamp"], 43);
}

#[test]
fn abruptly_dropped_client_frees_its_slot() {
    let server = Server::start(&[("MAX_CONNECTIONS", "1")]);
    let a = connect_ready(server.addr);
    expect_status(&server, 503, "second client");
    // No close handshake: just drop the TCP connection.
    drop(a);
    let mut b = connect_eventually(server.addr, TIMEOUT);
    assert_eq!(b.next_json()["message"], "CONNECTED");
}

#[test]
fn silent_connection_is_dropped_after_handshake_timeout() {
    let server = Server::start(&[("HANDSHAKE_TIMEOUT_SECS", "1")]);
    let mut idle = raw_connect(server.addr);
    let start = Instant::now();

    // Meanwhile the server serves others.
    assert_eq!(get(server.addr, "/healthz").status, 200);
    let mut c = connect_ready(server.addr);
    c.send_alert(7);
    assert_eq!(c.next_alert()["timestamp"], 7);

    let (ended, bytes) = read_until_closed(&mut idle, Duration::from_secs(3));
    let elapsed = start.elapsed();
    assert_eq!(
        ended,
        Ended::Closed,
        "idle connection still open after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(800),
        "idle connection dropped after only {elapsed:?} (timeout is 1 s)"
    );
    // Whatever the server wrote (maybe a 408) must not be an upgrade.
    assert!(
        !String::from_utf8_lossy(&bytes).contains(" 101 "),
        "{bytes:?}"
    );
}

#[test]
fn partial_request_head_is_dropped_after_handshake_timeout() {
    let server = Server::start(&[("HANDSHAKE_TIMEOUT_SECS", "1")]);
    let mut slow = raw_connect(server.addr);
    slow.write_all(format!("GET /ws HTTP/1.1\r\nHost: {}\r\n", server.addr).as_bytes())
        .unwrap();
    let (ended, _) = read_until_closed(&mut slow, Duration::from_secs(3));
    assert_eq!(ended, Ended::Closed, "half-sent request head not dropped");
    assert_eq!(get(server.addr, "/healthz").status, 200);
}

#[test]
fn trickling_request_head_is_dropped_after_handshake_timeout() {
    let server = Server::start(&[("HANDSHAKE_TIMEOUT_SECS", "1")]);
    let mut slow = raw_connect(server.addr);
    let mut writer = slow.try_clone().unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        server.addr
    );
    // A slowloris client: one byte every 100 ms, never finishing the head
    // within the timeout. Stops once the server drops it.
    let trickle = thread::spawn(move || {
        for b in head.bytes() {
            if writer.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let start = Instant::now();
    let (ended, _) = read_until_closed(&mut slow, Duration::from_secs(3));
    assert_eq!(
        ended,
        Ended::Closed,
        "trickling client still connected after {:?}",
        start.elapsed()
    );
    drop(slow);
    trickle.join().unwrap();
}

#[test]
fn many_idle_connections_do_not_block_service() {
    // Default handshake timeout (5 s): the idle sockets stay open for the
    // whole test, so the server must serve others concurrently.
    let server = Server::start(&[]);
    let idle: Vec<_> = (0..20).map(|_| raw_connect(server.addr)).collect();
    let start = Instant::now();
    let health = get(server.addr, "/healthz");
    assert_eq!(health.status, 200);
    let mut c = connect_ready(server.addr);
    c.send_alert(1);
    assert_eq!(c.next_alert()["timestamp"], 1);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "serving took {:?} with idle connections open",
        start.elapsed()
    );
    drop(idle);
}

#[test]
fn handshake_timeout_does_not_apply_after_upgrade() {
    let server = Server::start(&[("HANDSHAKE_TIMEOUT_SECS", "1")]);
    let mut c = connect_ready(server.addr);
    // Stay quiet for 2.5 handshake timeouts: nothing (no close) arrives.
    let deadline = Instant::now() + Duration::from_millis(2500);
    while let Some(msg) = c.poll_until(deadline) {
        match msg {
            Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => {}
            other => panic!("upgraded client got {other:?} while idle"),
        }
    }
    c.send_alert(99);
    assert_eq!(c.next_alert()["timestamp"], 99);
}
