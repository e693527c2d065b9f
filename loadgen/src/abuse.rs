//! Under abuse: what one attacker costs a bystander, measured from the
//! bystander's side (issue "Hold up under abuse").
//!
//! - **Ping flood.** A bystander sends alerts one at a time and times each
//!   until its own copy comes back: first alone, then while an attacker on
//!   another address floods pings in big writes, reads its pongs (so it is
//!   never dropped as a slow client) and reconnects whenever it is closed.
//! - **Reconnecting sender.** One address connects, sends its burst of five,
//!   disconnects, and again, for a few seconds: how many alerts a second the
//!   server accepts from it. Run against servers with their default limits.

use crate::stats::Percentiles;
use crate::ws::{self, Frame};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BYSTANDER: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 1);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 2);
/// Round trips timed in each phase.
const ROUND_TRIPS: usize = 20;
/// Between two of the bystander's alerts: under the storm limit's 10 a second.
const PACE: Duration = Duration::from_millis(150);
/// A round trip that takes longer counts as this long.
const GIVE_UP: Duration = Duration::from_secs(5);

/// The bystander's round trips, alone and during the flood.
#[derive(Debug, Default, Clone)]
pub struct FloodOutcome {
    pub quiet: Option<Percentiles>,
    pub flooded: Option<Percentiles>,
    /// Pings the attacker got written to the server.
    pub pings: u64,
    /// Times the server closed the attacker (1008 for a spent budget).
    pub closed: u64,
}

/// What one reconnecting address got accepted.
#[derive(Debug, Default, Clone)]
pub struct ReconnectOutcome {
    pub seconds: f64,
    pub connections: u64,
    pub accepted: u64,
    pub refused: u64,
}

impl ReconnectOutcome {
    pub fn accepted_per_second(&self) -> f64 {
        if self.seconds == 0.0 {
            return 0.0;
        }
        self.accepted as f64 / self.seconds
    }
}

/// A blocking client: a stream and what it has read but not parsed yet.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

enum Msg {
    Text(Vec<u8>),
    Closed,
}

impl Conn {
    fn open(addr: SocketAddr, from: Ipv4Addr) -> io::Result<Conn> {
        let (stream, buf) =
            ws::open_from(addr, Some(from)).map_err(|err| io::Error::other(err.kind()))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Conn { stream, buf })
    }

    fn send_alert(&mut self, timestamp: u64) -> io::Result<()> {
        let text = format!(r#"{{"message":"ALIEN_LANDING","timestamp":{timestamp}}}"#);
        self.stream
            .write_all(&ws::client_frame(ws::OP_TEXT, text.as_bytes()))
    }

    /// The next text message (pings answered on the way), `Closed`, or
    /// `None` when nothing came before `deadline`.
    fn next(&mut self, deadline: Instant) -> io::Result<Option<Msg>> {
        loop {
            if let Some((frame, len)) = ws::parse(&self.buf).map_err(io::Error::other)? {
                let msg = match frame {
                    Frame::Text(text) => Some(Msg::Text(text.to_vec())),
                    Frame::Close => Some(Msg::Closed),
                    Frame::Ping(payload) => {
                        let pong = ws::client_frame(ws::OP_PONG, payload);
                        self.stream.write_all(&pong)?;
                        None
                    }
                    Frame::Other => None,
                };
                self.buf.drain(..len);
                match msg {
                    Some(msg) => return Ok(Some(msg)),
                    None => continue,
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(Some(Msg::Closed)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => return Err(err),
            }
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Times `n` round trips of the bystander's own alerts, in microseconds.
fn round_trips(bystander: &mut Conn, n: usize, first_timestamp: u64) -> io::Result<Vec<u32>> {
    let mut samples = Vec::with_capacity(n);
    for k in 0..n as u64 {
        let timestamp = first_timestamp + k;
        let started = Instant::now();
        bystander.send_alert(timestamp)?;
        let deadline = started + GIVE_UP;
        loop {
            match bystander.next(deadline)? {
                Some(Msg::Text(text))
                    if ws::find(&text, b"\"ALIEN_LANDING\"").is_some()
                        && ws::json_u64(&text, b"timestamp") == Some(timestamp) =>
                {
                    break;
                }
                Some(Msg::Text(_)) => {}
                Some(Msg::Closed) => return Err(io::Error::other("the bystander was closed")),
                None => break, // gave up: counts as GIVE_UP
            }
        }
        samples.push(started.elapsed().min(GIVE_UP).as_micros() as u32);
        std::thread::sleep(PACE.saturating_sub(started.elapsed()));
    }
    Ok(samples)
}

/// The ping flood, against `addr`.
pub fn ping_flood(addr: SocketAddr) -> io::Result<FloodOutcome> {
    let mut bystander = Conn::open(addr, BYSTANDER)?;
    let first = wall_ms();
    let mut quiet = round_trips(&mut bystander, ROUND_TRIPS / 2, first)?;

    let stop = Arc::new(AtomicBool::new(false));
    let pings = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let attacker = std::thread::Builder::new().name("attacker".into()).spawn({
        let (stop, pings, closed) = (Arc::clone(&stop), Arc::clone(&pings), Arc::clone(&closed));
        move || flood(addr, &stop, &pings, &closed)
    })?;
    // Let the flood build before timing.
    std::thread::sleep(Duration::from_millis(300));
    let flooded = round_trips(&mut bystander, ROUND_TRIPS, first + 1000);
    stop.store(true, Ordering::Relaxed);
    let _ = attacker.join();
    let mut flooded = flooded?;
    Ok(FloodOutcome {
        quiet: Percentiles::of(&mut quiet),
        flooded: Percentiles::of(&mut flooded),
        pings: pings.load(Ordering::Relaxed),
        closed: closed.load(Ordering::Relaxed),
    })
}

/// The attacker: connects, writes pings as fast as the socket takes them
/// while a second thread reads (and drops) whatever comes back, and
/// reconnects when the server closes it.
fn flood(addr: SocketAddr, stop: &AtomicBool, pings: &AtomicU64, closed: &AtomicU64) {
    const PER_WRITE: u64 = 256;
    let burst: Vec<u8> = ws::client_frame(0x9, &[7u8; 125]).repeat(PER_WRITE as usize);
    while !stop.load(Ordering::Relaxed) {
        let Ok(conn) = Conn::open(addr, ATTACKER) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(mut reader) = conn.stream.try_clone() else {
            continue;
        };
        let drain = std::thread::spawn(move || {
            let mut sink = vec![0u8; 64 * 1024];
            while let Ok(n) = reader.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        });
        let mut writer = conn.stream;
        while !stop.load(Ordering::Relaxed) {
            match writer.write_all(&burst) {
                Ok(()) => {
                    pings.fetch_add(PER_WRITE, Ordering::Relaxed);
                }
                Err(_) => {
                    closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
        let _ = drain.join();
    }
}

/// One address reconnecting after every burst of five, for `window`.
pub fn reconnecting_sender(addr: SocketAddr, window: Duration) -> io::Result<ReconnectOutcome> {
    const FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 3);
    let started = Instant::now();
    let mut outcome = ReconnectOutcome::default();
    let mut timestamp = wall_ms();
    while started.elapsed() < window {
        let mut conn = Conn::open(addr, FROM)?;
        outcome.connections += 1;
        let mut mine = Vec::new();
        for _ in 0..5 {
            timestamp += 1;
            mine.push(timestamp);
            conn.send_alert(timestamp)?;
        }
        // Five answers: refusals, and ACCEPTED replies or (from a server that
        // sends none) the alerts themselves coming back.
        let (mut refused, mut accepted, mut echoed) = (0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(2);
        while refused + accepted.max(echoed) < 5 {
            match conn.next(deadline)? {
                Some(Msg::Text(text)) => {
                    if ws::find(&text, b"\"rate_limited\"").is_some() {
                        refused += 1;
                    } else if ws::find(&text, b"\"ACCEPTED\"").is_some() {
                        accepted += 1;
                    } else if ws::find(&text, b"\"ALIEN_LANDING\"").is_some()
                        && ws::json_u64(&text, b"timestamp").is_some_and(|t| mine.contains(&t))
                    {
                        echoed += 1;
                    }
                }
                Some(Msg::Closed) | None => break,
            }
        }
        outcome.accepted += accepted.max(echoed);
        outcome.refused += refused;
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Round trips as "p50 / p90 / max" in milliseconds.
pub fn round_trips_ms(p: &Option<Percentiles>) -> String {
    match p {
        Some(p) => format!(
            "{:.2} / {:.2} / {:.2} ms",
            p.p50 as f64 / 1000.0,
            p.p90 as f64 / 1000.0,
            p.max as f64 / 1000.0
        ),
        None => "none".into(),
    }
}

/// The measurements as text, for `skywatch-load abuse`.
pub fn text(
    limited: &FloodOutcome,
    unlimited: &FloodOutcome,
    reconnect: &ReconnectOutcome,
) -> String {
    let flood = |name: &str, flood: &FloodOutcome| {
        format!(
            "{name}: bystander's alert round trip (p50 / p90 / max) alone {}, during the \
             flood {} ({} pings sent into its sockets, attacker closed {} times)\n",
            round_trips_ms(&flood.quiet),
            round_trips_ms(&flood.flooded),
            flood.pings,
            flood.closed,
        )
    };
    format!(
        "{}{}reconnecting sender: {} alerts accepted in {:.1} s ({:.1} a second), {} refused, {} connections\n",
        flood("ping flood", limited),
        flood(
            "ping flood, CONTROL_PER_SECOND out of reach (the fan-out's turns alone)",
            unlimited
        ),
        reconnect.accepted,
        reconnect.seconds,
        reconnect.accepted_per_second(),
        reconnect.refused,
        reconnect.connections,
    )
}
