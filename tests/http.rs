//! Plain HTTP behaviour of the server: routes, methods, error statuses and
//! `Connection: close`.

mod support;

use support::{Server, get, http, http_raw};

#[test]
fn index_is_utf8_html_with_a_button() {
    let server = Server::start(&[]);
    let resp = get(server.addr, "/");
    assert_eq!(resp.status, 200, "{resp:?}");
    let ct = resp
        .header("content-type")
        .expect("GET / has no Content-Type");
    let normalized: String = ct
        .to_ascii_lowercase()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(normalized, "text/html;charset=utf-8", "Content-Type {ct:?}");
    assert!(
        resp.body_text().contains("<button"),
        "index page has no <button: {}",
        resp.body_text()
    );
    resp.assert_connection_close();
}

#[test]
fn healthz_says_ok() {
    let server = Server::start(&[]);
    let resp = get(server.addr, "/healthz");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body_text().trim(), "ok");
    resp.assert_connection_close();
}

#[test]
fn head_requests_answer_200_without_body() {
    let server = Server::start(&[]);
    for path in ["/", "/healthz"] {
        let resp = http(server.addr, "HEAD", path);
        assert_eq!(resp.status, 200, "HEAD {path}: {resp:?}");
        assert!(
            resp.body.is_empty(),
            "HEAD {path} returned a body: {:?}",
            resp.body_text()
        );
        resp.assert_connection_close();
    }
}

#[test]
fn unknown_path_is_404() {
    let server = Server::start(&[]);
    // /metrics too: it is served on METRICS_PORT alone (tests/metrics.rs).
    for path in ["/nope", "/healthz/extra", "/index.html", "/metrics"] {
        let resp = get(server.addr, path);
        assert_eq!(resp.status, 404, "GET {path}: {resp:?}");
        resp.assert_connection_close();
    }
}

#[test]
fn wrong_method_is_405_with_allow_get() {
    let server = Server::start(&[]);
    for (method, path) in [("POST", "/"), ("PUT", "/healthz"), ("POST", "/ws")] {
        let resp = http(server.addr, method, path);
        assert_eq!(resp.status, 405, "{method} {path}: {resp:?}");
        let allow = resp
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow header: {resp:?}"));
        assert!(
            allow.split(',').any(|m| m.trim() == "GET"),
            "{method} {path}: Allow is {allow:?}"
        );
        resp.assert_connection_close();
    }
}

#[test]
fn ws_path_without_upgrade_is_426() {
    let server = Server::start(&[]);
    let resp = get(server.addr, "/ws");
    assert_eq!(resp.status, 426, "{resp:?}");
    resp.assert_connection_close();
}

#[test]
fn garbage_request_is_400() {
    let server = Server::start(&[]);
    let resp = http_raw(server.addr, b"\x00\x01garbage\r\n\r\n");
    assert_eq!(resp.status, 400, "{resp:?}");
    resp.assert_connection_close();
    // The server keeps serving afterwards.
    assert_eq!(get(server.addr, "/healthz").status, 200);
}

#[test]
fn server_keeps_serving_many_sequential_requests() {
    let server = Server::start(&[]);
    for i in 0..50 {
        let path = if i % 2 == 0 { "/healthz" } else { "/" };
        let resp = get(server.addr, path);
        assert_eq!(resp.status, 200, "request {i} to {path}: {resp:?}");
        resp.assert_connection_close();
    }
}
