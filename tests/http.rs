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

/// The page served is index.html with the committed map outline,
/// assets/world-map.svg, in place of its marker line (build.rs), byte for
/// byte; the page's Content-Security-Policy is the one in index.html.
#[test]
fn index_is_the_page_with_the_world_map_spliced_in() {
    const MARKER: &str = "<!-- world-map.svg -->";
    let page = include_str!("../index.html");
    let map = include_str!("../assets/world-map.svg").trim_end();
    assert_eq!(
        page.matches(MARKER).count(),
        1,
        "index.html lost its marker"
    );
    assert!(
        map.starts_with("<svg ") && map.contains("<path d=\"M") && map.ends_with("</svg>"),
        "assets/world-map.svg is not one SVG with a path"
    );
    // A few tens of KB, as generated; a much larger one would be an
    // outline that was not simplified.
    assert!(
        (5_000..60_000).contains(&map.len()),
        "assets/world-map.svg is {} bytes",
        map.len()
    );

    let server = Server::start(&[]);
    let body = get(server.addr, "/").body_text();
    assert!(!body.contains(MARKER), "the marker was served");
    assert!(
        body.contains(map),
        "the served page lacks assets/world-map.svg"
    );
    assert!(
        body == page.replacen(MARKER, map, 1),
        "the served page is not index.html with the outline in place of its marker"
    );
    // The map is inline: the policy stays as strict as before it (nothing
    // from another host, no images but data: URLs).
    let policy = "content=\"default-src 'none'; script-src 'unsafe-inline'; \
                  style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
                  base-uri 'none'; form-action 'none'\">";
    assert_eq!(
        body.matches("http-equiv=\"Content-Security-Policy\"")
            .count(),
        1,
        "one policy, in one meta tag"
    );
    assert!(
        body.contains(policy),
        "the page's Content-Security-Policy changed"
    );
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
