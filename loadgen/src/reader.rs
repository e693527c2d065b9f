//! One thread reads every client socket through epoll.
//!
//! Why not a thread per client, like the server: the tool shares the
//! machine's two cores with the server it measures. Thousands of client
//! threads would each be woken for every alert, and their scheduling would
//! land in the very latency being measured. One epoll thread costs one
//! wake-up per batch of ready sockets and no memory per client beyond the
//! socket, so what the numbers show is the server.
//!
//! While alerts are due the reader busy-polls (epoll_wait with no timeout)
//! instead of sleeping. On one box, a sleeping reader must be woken by the
//! server's `send` for every message, and that wake-up (an inter-processor
//! interrupt, costly in a VM) is charged to the server's CPU time and delays
//! its next send; a browser on another machine costs the server no wake-up.
//! Busy-polling on its own core keeps that artifact out of the numbers.
//!
//! Latency is the receipt time minus the send time on the same monotonic
//! clock: the sender records when it sends alert `k` with the timestamp
//! `first_timestamp + k`, and the reader looks the timestamp up on receipt.

use crate::ws::{self, Frame};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When each alert was sent, shared by the sender and the reader.
pub struct SendClock {
    base: Instant,
    pub first_timestamp: u64,
    /// Nanoseconds after `base` plus one; zero means not sent yet.
    sent: Vec<AtomicU64>,
}

impl SendClock {
    pub fn new(alerts: usize, first_timestamp: u64) -> SendClock {
        SendClock {
            base: Instant::now(),
            first_timestamp,
            sent: (0..alerts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records that alert `k` is being sent now. Called just before the write,
    /// so the reader can never see a receipt without its send time.
    pub fn mark(&self, k: usize) {
        let nanos = self.base.elapsed().as_nanos() as u64 + 1;
        self.sent[k].store(nanos, Ordering::Release);
    }

    /// Microseconds from the send of the alert stamped `timestamp` to `at`.
    fn latency_us(&self, timestamp: u64, at: Instant) -> Option<(usize, u32)> {
        let k = usize::try_from(timestamp.checked_sub(self.first_timestamp)?).ok()?;
        let sent = self.sent.get(k)?.load(Ordering::Acquire).checked_sub(1)?;
        let received = at.duration_since(self.base).as_nanos() as u64;
        Some((k, (received.saturating_sub(sent) / 1000) as u32))
    }
}

/// A connected client, as the reader holds it.
pub struct Conn {
    pub stream: TcpStream,
    /// Bytes of a frame that has not fully arrived.
    pub pending: Vec<u8>,
    /// Whether its receipts count in the latency figures (probe clients) or
    /// only in the delivery count (idle clients).
    pub measured: bool,
}

/// What the reader saw, returned when it stops.
#[derive(Default)]
pub struct Tally {
    /// Latency of every alert receipt on a measured client, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Receipts of each alert, on any client.
    pub receipts: Vec<u64>,
    pub greetings: u64,
    /// `ALIEN_LANDING_SUMMARY` messages, and the sum of their counts.
    pub summaries: u64,
    pub summarized: u64,
    /// `ERROR` replies by code (e.g. rate_limited).
    pub error_replies: BTreeMap<String, u64>,
    /// Clients the server closed or reset.
    pub closed: u64,
    pub pongs_sent: u64,
    pub protocol_errors: u64,
}

/// Shared progress, read by the main thread while the reader runs.
#[derive(Default)]
pub struct Progress {
    pub alert_receipts: AtomicU64,
    pub closed: AtomicU64,
    pub stop: AtomicBool,
    /// Alerts are due: poll without sleeping.
    pub busy: AtomicBool,
}

/// Owns the epoll instance and every client.
pub struct Reader {
    epoll: i32,
    conns: Vec<Option<Conn>>,
}

impl Reader {
    pub fn new() -> io::Result<Reader> {
        // SAFETY: plain syscall; the descriptor is owned by Reader and closed on drop.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Reader {
            epoll,
            conns: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Hands a connected client to the reader (level-triggered: bytes that
    /// arrived before this call are reported at once).
    pub fn add(&mut self, conn: Conn) -> io::Result<()> {
        conn.stream.set_nonblocking(true)?;
        let index = self.conns.len();
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: index as u64,
        };
        let fd = conn.stream.as_raw_fd();
        // SAFETY: `fd` is open for as long as `conn` is in `self.conns`.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.conns.push(Some(conn));
        Ok(())
    }

    /// Reads until `progress.stop` is set; then returns what it saw (the
    /// alert-latency accounting of `skywatch-load run`).
    pub fn run(self, clock: Arc<SendClock>, progress: Arc<Progress>) -> Tally {
        let tally = Tally {
            receipts: vec![0; clock.sent.len()],
            ..Tally::default()
        };
        self.run_with(Latencies {
            clock,
            progress,
            tally,
        })
        .tally
    }

    /// Reads until `handler.stopped()`, handing it every byte count and text
    /// message; then returns it.
    pub fn run_with<H: Handler>(mut self, mut handler: H) -> H {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut scratch = vec![0u8; 64 * 1024];
        self.consume_pending(&mut handler);
        while !handler.stopped() {
            let timeout_ms = if handler.busy() { 0 } else { 50 };
            // SAFETY: `events` has room for the count passed.
            let ready = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout_ms,
                )
            };
            if ready < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            for event in &events[..ready as usize] {
                let index = event.u64 as usize;
                let open = self.service(index, &mut scratch, &mut handler);
                if !open {
                    self.remove(index);
                    handler.closed(index);
                }
            }
        }
        handler
    }

    /// Reads what one client has; returns whether it is still open.
    fn service(&mut self, index: usize, scratch: &mut [u8], handler: &mut impl Handler) -> bool {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return true;
        };
        let n = match conn.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return true,
            Err(_) => return false,
        };
        let at = Instant::now();
        handler.bytes(index, n, at);
        consume(conn, index, &scratch[..n], at, handler)
    }

    /// Handles what clients read along with their handshake (usually the
    /// greeting), before anything else arrives.
    fn consume_pending(&mut self, handler: &mut impl Handler) {
        let at = Instant::now();
        for index in 0..self.conns.len() {
            let Some(Some(conn)) = self.conns.get_mut(index) else {
                continue;
            };
            if conn.pending.is_empty() {
                continue;
            }
            let pending = std::mem::take(&mut conn.pending);
            if !consume(conn, index, &pending, at, handler) {
                self.remove(index);
                handler.closed(index);
            }
        }
    }

    fn remove(&mut self, index: usize) {
        if let Some(conn) = self.conns.get_mut(index).and_then(Option::take) {
            let fd = conn.stream.as_raw_fd();
            // SAFETY: `fd` is still open (closed when `conn` drops below).
            unsafe {
                libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created in `new` and is closed once.
        unsafe { libc::close(self.epoll) };
    }
}

/// Handles every complete frame in `fresh` (after what `conn` had pending),
/// however many were coalesced into one read; a partial one waits in
/// `pending` for its tail. Returns whether the client is still open.
fn consume(
    conn: &mut Conn,
    index: usize,
    fresh: &[u8],
    at: Instant,
    handler: &mut impl Handler,
) -> bool {
    // Usually whole frames arrive and are parsed straight from the read
    // buffer; only a partial one is copied.
    let owned;
    let bytes: &[u8] = if conn.pending.is_empty() {
        fresh
    } else {
        conn.pending.extend_from_slice(fresh);
        owned = std::mem::take(&mut conn.pending);
        &owned
    };
    let mut offset = 0;
    loop {
        match ws::parse(&bytes[offset..]) {
            Ok(Some((frame, length))) => {
                offset += length;
                match frame {
                    Frame::Text(text) => handler.text(index, conn.measured, text, at),
                    Frame::Ping(payload) => {
                        let pong = ws::client_frame(ws::OP_PONG, payload);
                        if (&conn.stream).write_all(&pong).is_ok() {
                            handler.pong();
                        }
                    }
                    Frame::Close => return false,
                    Frame::Other => {}
                }
            }
            Ok(None) => break,
            Err(_) => {
                handler.protocol_error();
                return false;
            }
        }
    }
    conn.pending.extend_from_slice(&bytes[offset..]);
    true
}

/// What the reader does with what it reads.
pub trait Handler {
    /// Poll without sleeping (see the module's comment).
    fn busy(&self) -> bool;
    /// Stop reading and return.
    fn stopped(&self) -> bool;
    /// `n` raw bytes were read from client `index` at `at`.
    fn bytes(&mut self, _index: usize, _n: usize, _at: Instant) {}
    /// A text message from the server to client `index`, read at `at`.
    fn text(&mut self, index: usize, measured: bool, text: &[u8], at: Instant);
    /// The server closed or reset client `index`.
    fn closed(&mut self, index: usize);
    fn pong(&mut self) {}
    /// Client `index` got something that is not WebSocket; it is dropped.
    fn protocol_error(&mut self) {}
}

/// `skywatch-load run`'s accounting: every alert receipt's latency.
struct Latencies {
    clock: Arc<SendClock>,
    progress: Arc<Progress>,
    tally: Tally,
}

impl Handler for Latencies {
    fn busy(&self) -> bool {
        self.progress.busy.load(Ordering::Relaxed)
    }

    fn stopped(&self) -> bool {
        self.progress.stop.load(Ordering::Acquire)
    }

    fn text(&mut self, _index: usize, measured: bool, text: &[u8], at: Instant) {
        record(
            text,
            at,
            measured,
            &self.clock,
            &self.progress,
            &mut self.tally,
        );
    }

    fn closed(&mut self, _index: usize) {
        self.tally.closed += 1;
        self.progress.closed.fetch_add(1, Ordering::Relaxed);
    }

    fn pong(&mut self) {
        self.tally.pongs_sent += 1;
    }

    fn protocol_error(&mut self) {
        self.tally.protocol_errors += 1;
    }
}

/// Accounts one text message from the server.
fn record(
    text: &[u8],
    at: Instant,
    measured: bool,
    clock: &SendClock,
    progress: &Progress,
    tally: &mut Tally,
) {
    if ws::find(text, b"\"ALIEN_LANDING\"").is_some() {
        let Some(timestamp) = ws::json_u64(text, b"timestamp") else {
            return;
        };
        let Some((k, latency)) = clock.latency_us(timestamp, at) else {
            return; // an alert from someone else
        };
        tally.receipts[k] += 1;
        progress.alert_receipts.fetch_add(1, Ordering::Relaxed);
        if measured {
            tally.latencies_us.push(latency);
        }
    } else if ws::find(text, b"\"ALIEN_LANDING_SUMMARY\"").is_some() {
        tally.summaries += 1;
        tally.summarized += ws::json_u64(text, b"count").unwrap_or(0);
    } else if ws::find(text, b"\"CONNECTED\"").is_some() {
        tally.greetings += 1;
    } else if ws::find(text, b"\"ERROR\"").is_some() {
        let code = error_code(text).unwrap_or_else(|| "?".into());
        *tally.error_replies.entry(code).or_default() += 1;
    }
}

pub fn error_code(text: &[u8]) -> Option<String> {
    let start = ws::find(text, b"\"error\":\"")? + 9;
    let end = text[start..].iter().position(|&b| b == b'"')?;
    Some(String::from_utf8_lossy(&text[start..start + end]).into_owned())
}

/// Sleeps in short steps until `done` holds or `limit` passes; returns
/// whether `done` held.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Collects every text message until it has `want` of them.
    struct Collect {
        want: usize,
        texts: Vec<(usize, String)>,
        bytes: usize,
    }

    impl Handler for Collect {
        fn busy(&self) -> bool {
            false
        }
        fn stopped(&self) -> bool {
            self.texts.len() >= self.want
        }
        fn bytes(&mut self, _index: usize, n: usize, _at: Instant) {
            self.bytes += n;
        }
        fn text(&mut self, index: usize, _measured: bool, text: &[u8], _at: Instant) {
            self.texts
                .push((index, String::from_utf8_lossy(text).into_owned()));
        }
        fn closed(&mut self, _index: usize) {}
    }

    fn server_frame(text: &str) -> Vec<u8> {
        let mut frame = vec![0x81];
        if text.len() < 126 {
            frame.push(text.len() as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(text.len() as u16).to_be_bytes());
        }
        frame.extend_from_slice(text.as_bytes());
        frame
    }

    #[test]
    fn coalesced_and_split_frames_each_arrive_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let greeting = r#"{"message":"CONNECTED","regionCode":"syd"}"#;
        let alert = r#"{"message":"ALIEN_LANDING","timestamp":1,"id":"a"}"#;
        let regions: String = (0..20).map(|i| format!(r#""r{i}":1,"#)).collect();
        let summary = format!(
            r#"{{"message":"ALIEN_LANDING_SUMMARY","id":"s","count":20,"regions":{{{}}},"from":1,"to":2}}"#,
            regions.trim_end_matches(',')
        );
        assert!(summary.len() > 125, "a 16-bit length frame");
        let accepted = r#"{"message":"ACCEPTED","id":"b"}"#;

        let mut reader = Reader::new().unwrap();
        // The greeting came with the handshake's response: pending.
        reader
            .add(Conn {
                stream: client,
                pending: server_frame(greeting),
                measured: true,
            })
            .unwrap();
        // Three frames in one write, then one frame split over two writes
        // with a pause between them.
        let mut coalesced = server_frame(alert);
        coalesced.extend(server_frame(&summary));
        coalesced.extend(server_frame(accepted));
        server.write_all(&coalesced).unwrap();
        let last = server_frame(alert);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            server.write_all(&last[..3]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            server.write_all(&last[3..]).unwrap();
            server
        });
        let got = reader.run_with(Collect {
            want: 5,
            texts: Vec::new(),
            bytes: 0,
        });
        let _server = writer.join().unwrap();
        let texts: Vec<&str> = got.texts.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, [greeting, alert, summary.as_str(), accepted, alert]);
        assert!(got.texts.iter().all(|(index, _)| *index == 0));
        assert_eq!(got.bytes, coalesced.len() + server_frame(alert).len());
    }
}
