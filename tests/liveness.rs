//! Keepalive pings and slow-client handling.

mod support;

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use support::{
    Client, Ended, RawFrame, Server, TIMEOUT, WITH_METRICS, parse_frames, raw_connect,
    raw_handshake, read_until_closed,
};
use tungstenite::Message;

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_PING: u8 = 0x9;

/// Reads (answering pings, as tungstenite does on read) until `deadline`;
/// returns the number of pings received. Panics if the connection ends or a
/// data message arrives, unless it is an alert with timestamp `stop_at`, in
/// which case it returns early with `(pings, true)`.
fn read_pings(c: &mut Client, deadline: Instant, stop_at: Option<u64>) -> (usize, bool) {
    let mut pings = 0;
    while let Some(msg) = c.poll_until(deadline) {
        match msg {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Pong(_)) => {}
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if stop_at.is_some() && v["timestamp"].as_u64() == stop_at {
                    return (pings, true);
                }
                panic!("unexpected message while idle: {v}");
            }
            Ok(other) => panic!("responsive client got {other:?} after {pings} pings"),
            Err(e) => panic!("responsive client disconnected after {pings} pings: {e}"),
        }
    }
    (pings, false)
}

#[test]
fn responsive_client_is_pinged_and_stays_connected() {
    let server = Server::start(&[("PING_INTERVAL_SECS", "1")]);
    let mut c = server.client();
    let (pings, _) = read_pings(&mut c, Instant::now() + Duration::from_millis(4500), None);
    assert!(
        pings >= 2,
        "expected at least 2 pings in 4.5 s with PING_INTERVAL_SECS=1, got {pings}"
    );
    // Still connected and usable.
    c.send_alert(31);
    assert_eq!(c.next_alert()["timestamp"].as_u64(), Some(31));
}

#[test]
fn peer_that_never_answers_pings_is_dropped() {
    let server = Server::start(&[("PING_INTERVAL_SECS", "1")]);

    // A well-behaved client, reading (and so answering pings) in the
    // background until it sees the alert sent at the end.
    let mut good = server.client();
    let good_thread = thread::spawn(move || {
        read_pings(
            &mut good,
            Instant::now() + Duration::from_secs(10),
            Some(55),
        )
    });

    // A raw peer: completes the handshake, then reads without ever answering.
    let mut peer = raw_connect(server.addr);
    let resp = raw_handshake(&mut peer, server.addr, &[]);
    assert_eq!(resp.status, 101, "{resp:?}");
    let start = Instant::now();
    let (ended, mut bytes) = read_until_closed(&mut peer, Duration::from_secs(5));
    let elapsed = start.elapsed();
    assert_eq!(
        ended,
        Ended::Closed,
        "silent peer still connected after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(1),
        "silent peer dropped after only {elapsed:?}, before it could have been pinged"
    );
    let frames: Vec<RawFrame> = parse_frames(&mut bytes);
    assert_eq!(
        frames.first().map(|f| f.opcode),
        Some(OPCODE_TEXT),
        "first frame should be the CONNECTED text: {frames:?}"
    );
    assert!(
        frames.iter().any(|f| f.opcode == OPCODE_PING),
        "silent peer was dropped without being pinged: {frames:?}"
    );

    // The responsive client survived all this.
    let mut sender = server.client();
    sender.send_alert(55);
    assert_eq!(sender.next_alert()["timestamp"].as_u64(), Some(55));
    let (pings, got_alert) = good_thread.join().expect("responsive client failed");
    assert!(
        got_alert,
        "responsive client did not receive the final alert"
    );
    assert!(pings >= 1, "responsive client was never pinged");
}

/// A client whose socket has a tiny receive buffer and that never reads after
/// the handshake.
fn stuck_client(server: &Server) -> TcpStream {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&server.addr.into(), TIMEOUT).unwrap();
    let mut stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    let resp = raw_handshake(&mut stream, server.addr, &[]);
    assert_eq!(resp.status, 101, "{resp:?}");
    stream
}

#[test]
fn stuck_client_is_dropped_without_delaying_others() {
    const N: u64 = 3000;
    const BATCH: u64 = 100;
    let server = Server::start(&[
        WITH_METRICS,
        ("ALERTS_PER_SECOND", "100000"),
        ("ALERT_BURST", "100000"),
        ("STORM_ALERTS_PER_SECOND", "100000"),
        ("ADDRESS_ALERTS_PER_SECOND", "100000"),
        ("ADDRESS_ALERT_BURST", "100000"),
    ]);
    let mut stuck = stuck_client(&server);

    let readers: Vec<Client> = (0..2).map(|_| server.client()).collect();
    let mut sender = server.client();
    let start = Instant::now();

    thread::scope(|s| {
        let handles: Vec<_> = readers
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                s.spawn(move || {
                    for ts in 0..N {
                        let v = r.next_json();
                        assert_eq!(
                            (v["message"].as_str(), v["timestamp"].as_u64()),
                            (Some("ALIEN_LANDING"), Some(ts)),
                            "reader {i}: alert {ts} missing or out of order"
                        );
                    }
                })
            })
            .collect();

        // The sender receives its own broadcasts too, so it reads them back
        // between batches to stay a fast client itself.
        for batch in 0..N / BATCH {
            for i in 0..BATCH {
                sender.send_alert(batch * BATCH + i);
            }
            for i in 0..BATCH {
                assert_eq!(
                    sender.next_alert()["timestamp"].as_u64(),
                    Some(batch * BATCH + i),
                    "sender's own copy missing or out of order"
                );
            }
        }
        for h in handles {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    });
    let elapsed = start.elapsed();

    assert!(
        server.wait_for_log("slow client", TIMEOUT),
        "no `slow client` log line after {N} alerts to a client that never reads"
    );
    // The server dropped it: what was buffered drains, then EOF/reset.
    let (ended, _) = read_until_closed(&mut stuck, TIMEOUT);
    assert_eq!(ended, Ended::Closed, "stuck client still connected");

    // And the server still works.
    let mut fresh = server.client();
    fresh.send_alert(N);
    assert_eq!(fresh.next_alert()["timestamp"].as_u64(), Some(N));
    assert_eq!(sender.next_alert()["timestamp"].as_u64(), Some(N));
    eprintln!("{N} alerts fanned out in {elapsed:?}");

    // /metrics counted the drop, and only that one.
    let metrics = server.scrape().body_text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "skywatch_slow_clients_dropped_total 1"),
        "{metrics}"
    );
}
