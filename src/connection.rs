//! The connection thread once its WebSocket is open: one per client, owning
//! the socket's read half.
//!
//! The thread blocks in `read` until the client sends something — no polling,
//! no timeouts — so an idle connection costs no CPU. It parses what arrives,
//! rate-limits alerts and publishes them to the broker. It never writes to
//! the socket: its replies and tungstenite's automatic pongs and close
//! echoes are encoded here and handed to the fan-out thread, which owns the
//! write half (see `fanout.rs`). The greeting goes the same way; it is the
//! same for every client, so it is encoded once, at start.

use crate::address::Person;
use crate::broker::{Broker, PublishError};
use crate::fanout::{ClientId, Event};
use crate::message::{self, Alert, Rejection, RejectionCode, Request};
use crate::metrics::METRICS;
use crate::ratelimit::TokenBucket;
use crate::{clock, frames};
use crossbeam_channel::Sender;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// Largest message a client may send. An alert is about 60 bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// What each read asks the kernel for. tungstenite zero-fills this much of
/// its buffer before every read, so all of it stays resident for the
/// connection's life. Client messages are ~60 bytes; a larger one (up to
/// [`MAX_MESSAGE_BYTES`]) grows the buffer for as long as it needs.
const READ_BUFFER: usize = 256;

/// How long to wait for the client's close frame after sending ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What a connection thread needs from the rest of the server.
pub struct Context {
    pub region: String,
    pub instance_id: String,
    pub alerts_per_second: f64,
    pub alert_burst: u32,
    pub broker: Arc<dyn Broker>,
    pub events: Sender<Event>,
    /// The `CONNECTED` frame, the same for every client: encoded once.
    pub greeting: Arc<[u8]>,
}

/// The encoded `CONNECTED` frame for this instance's clients.
pub fn greeting_frame(region: &str) -> Arc<[u8]> {
    frames::text_frame(message::connected(region)).into()
}

/// The socket as tungstenite sees it, split: reads come from the socket;
/// writes land in `out`, from where the fan-out thread sends them.
/// tungstenite only ever writes whole frames into `out` (a Vec never takes
/// less than it is given), so `out` always holds whole frames.
///
/// The socket is shared with the fan-out thread (an `Arc`, not a `dup`): one
/// descriptor per client, so the open-file limit counts clients one to one.
struct SplitSocket {
    socket: Arc<TcpStream>,
    out: Vec<u8>,
}

impl Read for SplitSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.socket).read(buf)
    }
}

impl Write for SplitSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn websocket_config() -> WebSocketConfig {
    // tungstenite's defaults (128 KiB buffers, 64 MiB messages) suit bulk
    // transfer; here thousands of connections each carry tiny messages.
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// The connection's WebSocket state, on the heap, not in the frame the read
/// loop runs under (ARCHITECTURE.md, "Stack pages of a connection thread").
#[inline(never)]
fn websocket(socket: Arc<TcpStream>, already_read: Vec<u8>) -> Box<WebSocket<SplitSocket>> {
    let split = SplitSocket {
        socket,
        out: Vec::new(),
    };
    Box::new(WebSocket::from_partially_read(
        split,
        already_read,
        Role::Server,
        Some(websocket_config()),
    ))
}

/// Serves one upgraded connection until it ends. `already_read` holds bytes
/// the client sent right after its handshake request; `since`, the last
/// alert a returning client saw.
pub fn serve(
    id: ClientId,
    socket: TcpStream,
    already_read: Vec<u8>,
    since: Option<Box<str>>,
    person: Person,
    ctx: &Context,
) {
    let socket = Arc::new(socket);
    let writer = Arc::clone(&socket);
    let last_seen = Arc::new(AtomicU64::new(clock::now_ms()));
    let mut ws = websocket(socket, already_read);
    let mut connection = Connection {
        id,
        ctx,
        bucket: TokenBucket::new(ctx.alerts_per_second, ctx.alert_burst, Instant::now()),
        person,
    };

    let join = Event::Join {
        id,
        writer,
        greeting: Arc::clone(&ctx.greeting),
        last_seen: Arc::clone(&last_seen),
        since,
    };
    if ctx.events.send(join).is_err() {
        return; // the fan-out thread is gone: the server is stopping
    }
    crate::debug!("client {id}: connected");
    let close_to_send = connection.read_loop(&mut ws, &last_seen);
    if let Some((code, reason)) = close_to_send {
        close(&mut ws, id, ctx, code, reason);
    }
    let _ = ctx.events.send(Event::Leave { id });
    crate::debug!("client {id}: disconnected");
}

/// The server ends the connection: sends `code` and waits (briefly) for the
/// client's answer. Out of line (ARCHITECTURE.md, "Stack pages of a
/// connection thread").
#[inline(never)]
fn close(
    ws: &mut WebSocket<SplitSocket>,
    id: ClientId,
    ctx: &Context,
    code: CloseCode,
    reason: &'static str,
) {
    crate::debug!("client {id}: closing with {}: {reason}", u16::from(code));
    let _ = ctx.events.send(Event::Close {
        id,
        frame: frames::close_frame(code, reason),
    });
    // After a whole bad message (binary, invalid UTF-8) tungstenite is still
    // in step with the client and can see its close reply, so we close as
    // soon as it comes. After an oversized or malformed frame it is not: the
    // rest of that frame is still arriving, so drain it. After a policy
    // close (too many control messages) the client is not owed a reading:
    // drain, without parsing what it sends.
    if matches!(code, CloseCode::Unsupported | CloseCode::Invalid) {
        await_close_reply(ws, CLOSE_LINGER);
    } else {
        linger(&ws.get_ref().socket, CLOSE_LINGER);
    }
}

struct Connection<'a> {
    id: ClientId,
    ctx: &'a Context,
    /// This connection's alert bucket.
    bucket: TokenBucket,
    /// Its address's buckets, which outlive it.
    person: Person,
}

/// The close frame to send when the server is the one ending the
/// connection (None: the client ended it, or the socket failed).
type CloseToSend = Option<(CloseCode, &'static str)>;

/// The close for a client past its address's control budget.
const TOO_MANY_CONTROL: (CloseCode, &str) =
    (CloseCode::Policy, "too many pings or invalid messages");

impl Connection<'_> {
    /// Reads until the connection ends. Returns the close frame to send when
    /// the server is the one ending it.
    fn read_loop(&mut self, ws: &mut WebSocket<SplitSocket>, last_seen: &AtomicU64) -> CloseToSend {
        loop {
            let result = ws.read();
            if result.is_ok() {
                last_seen.store(clock::now_ms(), Ordering::Relaxed);
                // Moves a pong or close echo tungstenite queued while reading
                // into `out`, for `forward` below (nothing touches the socket).
                let _ = ws.flush();
            }
            self.forward(ws);
            match result {
                Ok(Message::Text(text)) => {
                    if let Some(close) = self.handle_text(ws, text.as_str()) {
                        return Some(close);
                    }
                }
                Ok(Message::Binary(_)) => {
                    return Some((CloseCode::Unsupported, "binary messages are not supported"));
                }
                Ok(Message::Ping(_)) => {
                    if !self.control_allowed() {
                        return Some(TOO_MANY_CONTROL);
                    }
                }
                Ok(Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => {}
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return None,
                Err(WsError::Io(err)) => {
                    crate::debug!("client {}: read failed: {err}", self.id);
                    return None;
                }
                Err(WsError::Capacity(_)) => {
                    return Some((CloseCode::Size, "message larger than 4096 bytes"));
                }
                Err(WsError::Utf8(_)) => {
                    return Some((CloseCode::Invalid, "text is not valid UTF-8"));
                }
                Err(WsError::Protocol(err)) => {
                    crate::debug!("client {}: protocol error: {err}", self.id);
                    return Some((CloseCode::Protocol, "WebSocket protocol error"));
                }
                Err(err) => {
                    crate::warn!("client {}: unexpected error: {err}", self.id);
                    return Some((CloseCode::Error, "internal error"));
                }
            }
        }
    }

    /// Answers one text message: `ACCEPTED` or an `ERROR`. Returns how the
    /// connection ends when this message was one invalid message too many.
    #[inline(never)]
    fn handle_text(&mut self, ws: &mut WebSocket<SplitSocket>, text: &str) -> CloseToSend {
        let outcome = message::parse_request(text).and_then(|request| match request {
            Request::AlienLanding { timestamp } => self.report_landing(timestamp),
        });
        let reply = match outcome {
            Ok(accepted) => accepted,
            Err(rejection) => {
                // A person pressing too often is not an attacker: only other
                // refusals spend the control budget.
                if rejection.code != RejectionCode::RateLimited && !self.control_allowed() {
                    METRICS.rejected(rejection.code);
                    return Some(TOO_MANY_CONTROL);
                }
                self.refusal(&rejection)
            }
        };
        let frames = self.encode_text(ws, reply);
        let _ = self.ctx.events.send(Event::Send {
            id: self.id,
            frames,
        });
        None
    }

    /// The `ERROR` reply to a refused message, counted: the one place a
    /// refusal is answered, so none goes out uncounted.
    fn refusal(&self, rejection: &Rejection) -> String {
        METRICS.rejected(rejection.code);
        crate::debug!(
            "client {}: rejected: {} ({})",
            self.id,
            rejection.code.as_str(),
            rejection.detail
        );
        message::error(rejection)
    }

    /// Spends one of the address's control tokens (a ping, an invalid
    /// message); false when there is none left.
    #[inline(never)]
    fn control_allowed(&self) -> bool {
        let allowed = self.person.take_control(Instant::now());
        if !allowed {
            METRICS.control_limited.inc();
        }
        allowed
    }

    /// Rate-limits and publishes a press; returns the `ACCEPTED` reply.
    fn report_landing(&mut self, timestamp: u64) -> Result<String, Rejection> {
        let now = Instant::now();
        if !self.bucket.try_take(now) {
            return Err(Rejection::new(
                RejectionCode::RateLimited,
                format!(
                    "too many alerts: at most {} per second, {} at once",
                    self.ctx.alerts_per_second, self.ctx.alert_burst
                ),
            ));
        }
        if !self.person.take_alert(now) {
            return Err(Rejection::new(
                RejectionCode::RateLimited,
                "too many alerts from your network at once; try again in a moment",
            ));
        }
        let id = message::new_alert_id().map_err(|err| {
            Rejection::new(
                RejectionCode::InternalError,
                format!("cannot make an alert id: {err}"),
            )
        })?;
        let reply = message::accepted(&id);
        let alert = Alert {
            timestamp,
            region: self.ctx.region.clone(),
            sender: self.ctx.instance_id.clone(),
            id,
        };
        self.ctx.broker.publish(alert).map_err(|err| match err {
            PublishError::Unavailable => {
                Rejection::new(RejectionCode::BrokerUnavailable, err.to_string())
            }
        })?;
        METRICS.alerts_received.inc();
        Ok(reply)
    }

    /// Encodes a text message through tungstenite (so its state stays right)
    /// and returns the frame bytes.
    fn encode_text(&self, ws: &mut WebSocket<SplitSocket>, text: String) -> Vec<u8> {
        if let Err(err) = ws.send(Message::text(text)) {
            crate::debug!("client {}: cannot encode reply: {err}", self.id);
        }
        std::mem::take(&mut ws.get_mut().out)
    }

    /// Hands frames tungstenite wrote (pongs, close echoes) to the fan-out.
    fn forward(&self, ws: &mut WebSocket<SplitSocket>) {
        let frames = std::mem::take(&mut ws.get_mut().out);
        if !frames.is_empty() {
            let _ = self.ctx.events.send(Event::Send {
                id: self.id,
                frames,
            });
        }
    }
}

/// Reads until the client answers our close frame, or `within` passes.
fn await_close_reply(ws: &mut WebSocket<SplitSocket>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || ws.get_ref().socket.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match ws.read() {
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// After our last write (a close frame, an HTTP response), reads and discards
/// until the client closes its side or `within` passes. Closing a socket with
/// unread input sends a reset, which can make the client lose what we wrote.
pub fn linger(mut socket: &TcpStream, within: Duration) {
    let deadline = Instant::now() + within;
    let mut sink = [0u8; 512];
    let mut budget: usize = 64 * 1024;
    while budget > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match socket.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => budget = budget.saturating_sub(n),
        }
    }
}
