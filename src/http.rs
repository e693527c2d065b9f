//! The listener: accepts TCP connections, reads each HTTP request head, and
//! either answers it (the page, health checks) or upgrades it to a WebSocket
//! served by `connection.rs` on the same thread. Also the metrics listener, on
//! METRICS_PORT: `GET /metrics` only, one scrape at a time, never on PORT.
//!
//! Why not tiny_http: its `Request::upgrade` yields one boxed stream that can
//! be neither cloned nor given a timeout, so the fan-out thread could not own
//! a write half while this thread blocks reading. With a handful of fixed
//! routes, a small request reader over httparse (already in tungstenite's
//! handshake) does the job and keeps every socket a plain `TcpStream`.

use crate::address::{Addresses, Person, Refused};
use crate::config::normalize_origin;
use crate::connection;
use crate::fanout::ClientId;
use crate::log::{Throttle, suppressed};
use crate::metrics::{METRICS, Refusal};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The page, built into the binary so a deploy is one file: index.html with
/// the map's outline spliced in by build.rs.
const INDEX_HTML: &str = include_str!(concat!(env!("OUT_DIR"), "/index.html"));

/// Largest request head accepted. Browsers send well under 2 KiB.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Connections allowed beyond MAX_CONNECTIONS for requests that are not (yet)
/// WebSockets: health checks and page loads keep working on a full server,
/// while the number of threads stays bounded.
const EXTRA_CONNECTIONS: usize = crate::limits::EXTRA_CONNECTIONS as usize;

/// Connections that have not sent their whole request yet. Fewer than
/// [`EXTRA_CONNECTIONS`], so sockets that never speak cannot take every
/// slot meant for health checks: when this many wait, the oldest is dropped
/// to make room for the newest.
const PENDING_CONNECTIONS: usize = 128;

/// A new connection must send its first byte within this (browsers and
/// Fly's proxy send the request at once); the whole head, within
/// HANDSHAKE_TIMEOUT_SECS.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Stack for each connection thread. Only touched pages count towards memory;
/// the deepest path (JSON parsing of a 4 KiB message) stays far below this.
const CONNECTION_STACK: usize = 256 * 1024;

/// Kernel send buffer for a WebSocket. Alerts are ~150 bytes, so this holds
/// hundreds, and it bounds kernel memory for a client that stops reading.
const SOCKET_SEND_BUFFER: usize = 32 * 1024;

pub struct HttpSettings {
    pub allowed_origins: Vec<String>,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// The header a trusted proxy puts the client's address in.
    pub client_ip_header: Option<String>,
}

/// Shared by the acceptor and every connection thread.
pub struct Server {
    pub settings: HttpSettings,
    /// What every connection thread needs once its WebSocket is open.
    pub context: connection::Context,
    /// Limits per source address.
    addresses: Arc<Addresses>,
    /// Open connections of any kind (each has a thread).
    connections: AtomicUsize,
    /// Open WebSocket clients, held against MAX_CONNECTIONS.
    clients: AtomicUsize,
    /// Connections still sending their request, oldest first.
    pending: Mutex<VecDeque<Pending>>,
    next_connection: AtomicU64,
    next_client_id: AtomicU64,
}

/// A connection that has not sent its whole request: its number, and a
/// handle on its socket to drop it by.
struct Pending {
    number: u64,
    socket: TcpStream,
}

impl Server {
    pub fn new(
        settings: HttpSettings,
        context: connection::Context,
        addresses: Addresses,
    ) -> Server {
        Server {
            settings,
            context,
            addresses: Arc::new(addresses),
            connections: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            pending: Mutex::new(VecDeque::new()),
            next_connection: AtomicU64::new(1),
            next_client_id: AtomicU64::new(1),
        }
    }

    /// Notes a new connection as pending; when too many are, drops the
    /// oldest (its thread's read returns at once and the thread ends).
    fn add_pending(&self, stream: &TcpStream) -> Option<u64> {
        let socket = stream.try_clone().ok()?;
        let number = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= PENDING_CONNECTIONS
            && let Some(oldest) = pending.pop_front()
        {
            let _ = oldest.socket.shutdown(Shutdown::Both);
            METRICS.refused(Refusal::PendingEvicted);
        }
        pending.push_back(Pending { number, socket });
        Some(number)
    }

    /// The connection `number` has sent its request (or ended).
    fn remove_pending(&self, number: Option<u64>) {
        let Some(number) = number else { return };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pending.iter().position(|p| p.number == number) {
            pending.remove(i);
        }
    }
}

static REFUSED_AT_LIMIT: Throttle = Throttle::new();
static REFUSED_ORIGIN: Throttle = Throttle::new();
static REFUSED_FULL: Throttle = Throttle::new();
static REFUSED_ADDRESS: Throttle = Throttle::new();

/// The running acceptor thread.
pub struct Acceptor {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Acceptor {
    /// Starts the thread that accepts connections on `listener`.
    pub fn spawn(listener: TcpListener, server: Arc<Server>) -> io::Result<Acceptor> {
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("acceptor".into()).spawn({
            let (listener, stopping) = (Arc::clone(&listener), Arc::clone(&stopping));
            move || accept_loop(&listener, &server, &stopping)
        })?;
        Ok(Acceptor {
            listener,
            stopping,
            thread,
        })
    }

    /// Stops accepting: new connections are refused from here on.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes the blocked accept() (Linux).
        let _ = SockRef::from(&*self.listener).shutdown(Shutdown::Both);
        let _ = self.thread.join();
    }
}

fn accept_loop(listener: &TcpListener, server: &Arc<Server>, stopping: &AtomicBool) {
    let limit = server.settings.max_connections + EXTRA_CONNECTIONS;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if server.connections.load(Ordering::SeqCst) >= limit {
                    METRICS.refused(Refusal::ConnectionLimit);
                    if let Some(more) = REFUSED_AT_LIMIT.allow() {
                        crate::warn!(
                            "refusing a connection: {limit} already open{}",
                            suppressed(more)
                        );
                    }
                    continue; // dropping the stream closes it
                }
                // Among the pending, the oldest makes room for it when they
                // are too many: an idle socket must not keep a health check
                // out.
                let pending = server.add_pending(&stream);
                server.connections.fetch_add(1, Ordering::SeqCst);
                let for_thread = Arc::clone(server);
                let spawned = std::thread::Builder::new()
                    .name("connection".into())
                    .stack_size(CONNECTION_STACK)
                    .spawn(move || {
                        connection_thread(stream, &for_thread, pending);
                        for_thread.connections.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(err) = spawned {
                    server.remove_pending(pending);
                    server.connections.fetch_sub(1, Ordering::SeqCst);
                    crate::error!("cannot start a connection thread: {err}");
                }
            }
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(err) => {
                crate::warn!("accept failed: {err}");
                // Out of descriptors or memory: nothing to wait on but time.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The life of a connection thread, in two steps that never overlap on the
/// stack: the HTTP request (and the handshake), then the WebSocket phase
/// (`connection::serve`), with the request's stack pages given back in
/// between (ARCHITECTURE.md, "Stack pages of a connection thread").
fn connection_thread(stream: TcpStream, server: &Server, pending: Option<u64>) {
    let Some(client) = handle_connection(stream, server, pending) else {
        return;
    };
    release_stack_below_here();
    let Upgraded {
        id,
        stream,
        already_read,
        since,
        slot,
        person,
    } = client;
    connection::serve(id, stream, already_read, since, person, &server.context);
    drop(slot);
}

/// Gives the stack pages below this call's frame back to the kernel
/// (ARCHITECTURE.md, "Stack pages of a connection thread"). Only dead frames
/// lie below the stack pointer, and a page given back reads as zeros if
/// touched again.
#[inline(never)]
fn release_stack_below_here() {
    let here = 0u8;
    let here = std::ptr::addr_of!(here) as usize;
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let (mut low, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pthread_getattr_np fills `attr` for the calling thread (from
    // glibc's own thread record, with a cpuset it allocates);
    // pthread_attr_getstack reads it into two locals; pthread_attr_destroy
    // frees it before it goes out of scope.
    let known = unsafe {
        let filled = libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) == 0;
        let read = filled && libc::pthread_attr_getstack(attr.as_ptr(), &mut low, &mut size) == 0;
        if filled {
            libc::pthread_attr_destroy(attr.as_mut_ptr());
        }
        read
    };
    // The kernel's page size (4 KiB on x86_64; 16 or 64 KiB on some arm64
    // kernels), since madvise rounds its length up to whole pages.
    // SAFETY: sysconf only reads a system value.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => return,
    };
    // Room below this frame for the madvise call itself (a bare syscall
    // wrapper), then everything from the next page boundary down.
    let end = here.saturating_sub(512) & !(page - 1);
    let start = (low as usize + page - 1) & !(page - 1);
    if known && end > start {
        // SAFETY: [start, end) lies within this thread's stack, below the
        // frames of this call and its callers; nothing lives there.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// A connection whose WebSocket handshake is done, ready for `connection::serve`.
struct Upgraded<'a> {
    id: ClientId,
    stream: TcpStream,
    /// Bytes the client sent right after its request.
    already_read: Vec<u8>,
    /// `?since=<alert id>`: the client is coming back and wants what it missed.
    since: Option<Box<str>>,
    /// Its place among MAX_CONNECTIONS, given back when its WebSocket closes.
    slot: ClientSlot<'a>,
    /// Its share of its address's limits.
    person: Person,
}

/// The request headers the server reads (and CLIENT_IP_HEADER's); the
/// others are not kept. Each kept header is two small allocations on the
/// connection thread, and glibc keeps what a thread frees in that thread's
/// own cache for the thread's whole life.
const USED_HEADERS: &[&str] = &[
    "Host",
    "Origin",
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Key",
];

/// Headers that must not appear twice: with two, which one a proxy and this
/// server each believe is anyone's guess (RFC 9110 §5.3, RFC 6455 §11.3).
/// `Sec-WebSocket-Extensions` and `-Protocol` may repeat.
const SINGLE_HEADERS: &[&str] = &[
    "Host",
    "Origin",
    "Upgrade",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
];

/// A parsed request head, with the headers in [`USED_HEADERS`].
struct Head {
    method: String,
    path: String,
    /// The query string, without the `?` (empty when there is none).
    query: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many times header `name` was sent.
    fn count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

enum HeadError {
    /// Timed out, reset, or closed before a whole head arrived.
    Gone,
    TooLarge,
    Malformed,
}

/// Reads the request and answers it; returns the connection when it became a
/// WebSocket. Never inlined: its frame must be gone before the WebSocket phase runs.
#[inline(never)]
fn handle_connection(
    mut stream: TcpStream,
    server: &Server,
    pending: Option<u64>,
) -> Option<Upgraded<'_>> {
    let deadline = Instant::now() + server.settings.handshake_timeout;
    let _ = stream.set_nodelay(true);
    let read = read_head(
        &mut stream,
        deadline,
        server.settings.client_ip_header.as_deref(),
    );
    server.remove_pending(pending);
    let (head, already_read) = match read {
        Ok(parsed) => parsed,
        Err(err) => {
            if let Some(response) = unreadable(err) {
                respond(stream, response);
            }
            return None;
        }
    };
    if let Some(name) = SINGLE_HEADERS.iter().find(|name| head.count(name) > 1) {
        respond(stream, Response::text(400, duplicate_header_message(name)));
        return None;
    }
    let response = match (head.path.as_str(), head.method.as_str()) {
        ("/", "GET" | "HEAD") => Response::html(INDEX_HTML),
        ("/healthz", "GET" | "HEAD") => Response::text(200, "ok"),
        // Ready once alerts published here reach every instance: with
        // Pub/Sub, when the subscription exists and pulling has begun.
        ("/readyz", "GET" | "HEAD") => match server.context.broker.readiness() {
            Ok(()) => Response::text(200, "ready"),
            Err(why) => Response::text_owned(503, format!("not ready: {why}\n")),
        },
        ("/ws", "GET") => return upgrade(stream, &head, already_read, server),
        ("/ws", _) => Response::text(405, "method not allowed\n").with_header("Allow", "GET"),
        ("/" | "/healthz" | "/readyz", _) => get_or_head_only(),
        // /metrics among them: it is served on METRICS_PORT alone, so the
        // public port never shows it.
        _ => Response::text(404, "not found\n"),
    };
    respond(stream, response.for_method(&head.method));
    None
}

/// The answer to a request head that could not be read, or None when the
/// client is gone and nothing can be answered.
fn unreadable(err: HeadError) -> Option<Response> {
    match err {
        HeadError::Gone => None,
        HeadError::TooLarge => Some(Response::text(431, "request head too large\n")),
        HeadError::Malformed => Some(Response::text(400, "malformed request\n")),
    }
}

fn get_or_head_only() -> Response {
    Response::text(405, "method not allowed\n").with_header("Allow", "GET, HEAD")
}

fn duplicate_header_message(name: &str) -> &'static str {
    match name {
        "Host" => "duplicate Host header\n",
        "Origin" => "duplicate Origin header\n",
        "Upgrade" => "duplicate Upgrade header\n",
        "Sec-WebSocket-Key" => "duplicate Sec-WebSocket-Key header\n",
        _ => "duplicate Sec-WebSocket-Version header\n",
    }
}

/// Reads until a whole request head has arrived: the first byte within
/// [`FIRST_BYTE_TIMEOUT`], the whole head within `deadline` (a slowloris
/// client trickling a byte at a time gets no extension). Keeps the headers
/// in [`USED_HEADERS`] and `client_ip_header`.
fn read_head(
    stream: &mut TcpStream,
    deadline: Instant,
    client_ip_header: Option<&str>,
) -> Result<(Head, Vec<u8>), HeadError> {
    // Room for the largest head at once: no reallocation, and a block too
    // big for glibc's per-thread cache, so it goes back to the shared heap
    // when the head is parsed instead of staying with this thread for life.
    let mut buf = Vec::with_capacity(MAX_HEAD_BYTES);
    let first_byte = deadline.min(Instant::now() + FIRST_BYTE_TIMEOUT);
    loop {
        let until = if buf.is_empty() { first_byte } else { deadline };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(HeadError::Gone);
        }
        // Straight into the buffer, not through a chunk on the stack
        // (ARCHITECTURE.md, "Stack pages of a connection thread").
        let filled = buf.len();
        buf.resize(filled + 1024, 0);
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return Err(HeadError::Gone),
            Ok(n) => n,
        };
        buf.truncate(filled + n);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = request.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let head = Head {
                    method: request.method.unwrap_or_default().to_string(),
                    // The query string plays no part in routing.
                    path: path.to_string(),
                    query: query.to_string(),
                    headers: request
                        .headers
                        .iter()
                        .filter(|h| {
                            USED_HEADERS.iter().any(|n| h.name.eq_ignore_ascii_case(n))
                                || client_ip_header.is_some_and(|n| h.name.eq_ignore_ascii_case(n))
                        })
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                return Ok((head, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::TooLarge);
            }
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

fn upgrade<'a>(
    mut stream: TcpStream,
    head: &Head,
    already_read: Vec<u8>,
    server: &'a Server,
) -> Option<Upgraded<'a>> {
    if !head.header_has_token("Upgrade", "websocket")
        || !head.header_has_token("Connection", "upgrade")
    {
        let response = Response::text(426, "this endpoint speaks WebSocket only\n")
            .with_header("Upgrade", "websocket")
            .with_header("Sec-WebSocket-Version", "13");
        return refuse(stream, response);
    }
    if head.header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        let response = Response::text(426, "unsupported WebSocket version; use 13\n")
            .with_header("Upgrade", "websocket")
            .with_header("Sec-WebSocket-Version", "13");
        return refuse(stream, response);
    }
    let Some(key) = head
        .header("Sec-WebSocket-Key")
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return refuse(stream, Response::text(400, "missing Sec-WebSocket-Key\n"));
    };
    if !is_websocket_key(key) {
        let response = Response::text(400, "Sec-WebSocket-Key must be 16 bytes in base64\n");
        return refuse(stream, response);
    }
    let Ok(ip) = client_ip(&stream, head, server.settings.client_ip_header.as_deref()) else {
        let response = Response::text(400, "the client address header is not one address\n");
        return refuse(stream, response);
    };
    let Ok(since) = since_param(&head.query) else {
        let response = Response::text(400, "since must be an alert id: 32 lowercase hex digits\n");
        return refuse(stream, response);
    };
    if !origin_allowed(head, &server.settings.allowed_origins) {
        return refuse_origin(stream, head);
    }
    let person = match server.addresses.connect(ip, Instant::now()) {
        Ok(person) => person,
        Err(refused) => return refuse_address(stream, ip, refused),
    };
    let Some(slot) = ClientSlot::take(&server.clients, server.settings.max_connections) else {
        return refuse_full(stream, server.settings.max_connections);
    };

    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let switching = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream
        .set_write_timeout(Some(server.settings.handshake_timeout))
        .is_err()
        || stream.write_all(switching.as_bytes()).is_err()
    {
        return None;
    }
    // From here the connection thread blocks in read for as long as the client
    // stays; only the keepalive decides when a silent peer is gone.
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    let _ = SockRef::from(&stream).set_send_buffer_size(SOCKET_SEND_BUFFER);
    Some(Upgraded {
        id: server.next_client_id.fetch_add(1, Ordering::Relaxed),
        stream,
        already_read,
        since,
        slot,
        person,
    })
}

/// RFC 6455 §4.2.1: the key is 16 random bytes in base64, which is 22
/// characters of the alphabet (the last of them carrying only 2 bits, so
/// one of `AQgw`) and `==`. Checked by hand rather than decoded
/// (ARCHITECTURE.md, "Stack pages of a connection thread").
fn is_websocket_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    let alphabet = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    bytes.len() == 24
        && bytes[..21].iter().all(alphabet)
        && b"AQgw".contains(&bytes[21])
        && &bytes[22..] == b"=="
}

/// The client's address: the peer's, or the one a trusted proxy put in
/// `header`. A header that is there but not exactly one address is an error.
#[inline(never)]
fn client_ip(stream: &TcpStream, head: &Head, header: Option<&str>) -> Result<IpAddr, ()> {
    if let Some(name) = header
        && head.count(name) > 0
    {
        if head.count(name) > 1 {
            return Err(());
        }
        return head
            .header(name)
            .unwrap_or_default()
            .trim()
            .parse()
            .map_err(drop);
    }
    stream.peer_addr().map(|peer| peer.ip()).map_err(drop)
}

// The refusals below are out of line (ARCHITECTURE.md, "Stack pages of a
// connection thread").

#[cold]
#[inline(never)]
fn refuse_origin<'a>(stream: TcpStream, head: &Head) -> Option<Upgraded<'a>> {
    if let Some(more) = REFUSED_ORIGIN.allow() {
        let origin: String = head
            .header("Origin")
            .unwrap_or_default()
            .chars()
            .take(100)
            .collect();
        crate::info!(
            "refusing WebSocket from origin {origin:?}{}",
            suppressed(more)
        );
    }
    refuse(stream, Response::text(403, "origin not allowed\n"))
}

#[cold]
#[inline(never)]
fn refuse_full<'a>(stream: TcpStream, max: usize) -> Option<Upgraded<'a>> {
    METRICS.refused(Refusal::ServerFull);
    if let Some(more) = REFUSED_FULL.allow() {
        crate::warn!(
            "refusing WebSocket: {max} clients connected{}",
            suppressed(more)
        );
    }
    refuse(
        stream,
        Response::text(503, "server full, try again soon\n").with_header("Retry-After", "5"),
    )
}

/// Answers a WebSocket that its address may not open now.
#[cold]
#[inline(never)]
fn refuse_address<'a>(stream: TcpStream, ip: IpAddr, refused: Refused) -> Option<Upgraded<'a>> {
    let (refusal, response) = match refused {
        Refused::TooManyConnections => (
            Refusal::AddressConnections,
            Response::text(429, "too many connections from your network\n"),
        ),
        Refused::TableFull => (
            Refusal::AddressTableFull,
            Response::text(503, "server busy, try again soon\n"),
        ),
    };
    METRICS.refused(refusal);
    if let Some(more) = REFUSED_ADDRESS.allow() {
        crate::warn!(
            "refusing WebSocket from {ip}: {refused:?}{}",
            suppressed(more)
        );
    }
    refuse(stream, response.with_header("Retry-After", "5"))
}

/// The `since` of a query string: the last alert a returning client saw.
/// Absent is fine; present, it must be an alert id.
fn since_param(query: &str) -> Result<Option<Box<str>>, ()> {
    match query
        .split('&')
        .find_map(|pair| pair.strip_prefix("since="))
    {
        None => Ok(None),
        Some(id) if crate::message::is_alert_id(id) => Ok(Some(id.into())),
        Some(_) => Err(()),
    }
}

/// Answers a request that will not become a WebSocket.
#[inline(never)]
fn refuse<'a>(stream: TcpStream, response: Response) -> Option<Upgraded<'a>> {
    respond(stream, response);
    None
}

/// A place among MAX_CONNECTIONS clients, given back on drop.
struct ClientSlot<'a>(&'a AtomicUsize);

impl<'a> ClientSlot<'a> {
    fn take(clients: &'a AtomicUsize, max: usize) -> Option<ClientSlot<'a>> {
        clients
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(clients))
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Browsers always send Origin on a WebSocket handshake; a page on another
/// site must not be able to open a socket with the user's cookies (cross-site
/// WebSocket hijacking). Clients without Origin are not browsers and allowed.
fn origin_allowed(head: &Head, allowed: &[String]) -> bool {
    let Some(origin) = head.header("Origin") else {
        return true;
    };
    let Some(origin) = normalize_origin(origin) else {
        return false;
    };
    if allowed.contains(&origin) {
        return true;
    }
    let (Some(host), Some((scheme, _))) = (head.header("Host"), origin.split_once("://")) else {
        return false;
    };
    normalize_origin(&format!("{scheme}://{host}")).is_some_and(|same_host| same_host == origin)
}

struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Cow<'static, [u8]>,
    content_length: usize,
}

impl Response {
    fn text(status: u16, body: &'static str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: Cow::Borrowed(body.as_bytes()),
            content_length: body.len(),
        }
    }

    fn text_owned(status: u16, body: String) -> Response {
        Response {
            content_length: body.len(),
            body: Cow::Owned(body.into_bytes()),
            ..Response::text(status, "")
        }
    }

    /// Prometheus' text exposition format.
    fn metrics(text: String) -> Response {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            headers: Vec::new(),
            content_length: text.len(),
            body: Cow::Owned(text.into_bytes()),
        }
    }

    fn html(body: &'static str) -> Response {
        Response {
            content_type: "text/html; charset=utf-8",
            ..Response::text(200, body)
        }
        .with_header("X-Frame-Options", "DENY")
        .with_header("Referrer-Policy", "no-referrer")
    }

    fn with_header(mut self, name: &'static str, value: &'static str) -> Response {
        self.headers.push((name, value));
        self
    }

    /// The response to a `method` request: for HEAD, the same headers
    /// (Content-Length included) without the body.
    fn for_method(mut self, method: &str) -> Response {
        if method == "HEAD" {
            self.body = Cow::Borrowed(b"");
        }
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes a response and closes the connection. One request per connection:
/// the page makes two requests in its life, so keep-alive would buy nothing.
fn respond(stream: TcpStream, response: Response) {
    respond_within(stream, response, Duration::from_secs(5));
}

/// [`respond`], giving up on a client that takes longer than `timeout` to
/// take the response.
fn respond_within(mut stream: TcpStream, response: Response, timeout: Duration) {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.content_length
    )
    .into_bytes();
    for (name, value) in &response.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&response.body);
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(&out).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
        connection::linger(&stream, Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------
// The metrics listener (METRICS_PORT)
// ---------------------------------------------------------------------------

/// A scraper gets this long to send its request, and as long again to take
/// the answer. Scrapes are served one at a time, so this bounds how long a
/// stuck one holds up the next (Fly's scraper comes every 15 s).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

static METRICS_ACCEPT_FAILED: Throttle = Throttle::new();

/// Binds the metrics port. With HOST unspecified (the default 0.0.0.0, or
/// ::) that means every interface, as one IPv6 socket with IPV6_V6ONLY off,
/// which takes IPv4 connections too: Fly's scraper then reaches it over the
/// Machine's private IPv6 address as well as over IPv4. On a host without
/// IPv6 it falls back to 0.0.0.0, and says so. Any other HOST is used as
/// given (127.0.0.1 keeps metrics on the machine).
pub fn bind_metrics(host: IpAddr, port: u16) -> io::Result<TcpListener> {
    if !host.is_unspecified() {
        return TcpListener::bind((host, port));
    }
    match bind_dual_stack(port) {
        Err(err) if !is_port_problem(&err) => {
            crate::warn!("no IPv6 for the metrics port ({err}): listening on IPv4 only");
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        }
        bound => bound,
    }
}

fn bind_dual_stack(port: u16) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    // Explicitly: the default follows net.ipv6.bindv6only, which a host may set.
    socket.set_only_v6(false)?;
    // As std's TcpListener::bind does: a restart need not wait out TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Whether binding failed for the port itself (taken, or privileged), which
/// IPv4 would not fix, rather than for want of IPv6.
fn is_port_problem(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
    )
}

/// The metrics thread: answers each connection in turn, `GET /metrics`
/// with the Prometheus text and anything else with 404 or 405. One at a
/// time and with short timeouts, a slow scraper delays only the next scrape
/// and costs one thread; nothing else waits on this one.
pub fn serve_metrics(listener: &TcpListener, broker: &str, region: &str) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => answer_scrape(stream, broker, region),
            Err(err) => {
                if let Some(more) = METRICS_ACCEPT_FAILED.allow() {
                    crate::warn!("metrics accept failed: {err}{}", suppressed(more));
                }
                // Out of descriptors or memory: nothing to wait on but time.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn answer_scrape(mut stream: TcpStream, broker: &str, region: &str) {
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let response = match read_head(&mut stream, deadline, None) {
        Ok((head, _)) => match (head.path.as_str(), head.method.as_str()) {
            ("/metrics", "GET" | "HEAD") => {
                Response::metrics(METRICS.render(broker, region)).for_method(&head.method)
            }
            ("/metrics", _) => get_or_head_only(),
            _ => Response::text(404, "not found\n"),
        },
        Err(err) => match unreadable(err) {
            Some(response) => response,
            None => return,
        },
    };
    respond_within(stream, response, SCRAPE_TIMEOUT);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Head {
        Head {
            method: "GET".into(),
            path: "/ws".into(),
            query: String::new(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn since_must_be_an_alert_id_when_given() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(since_param(""), Ok(None));
        assert_eq!(since_param("x=1&y"), Ok(None));
        assert_eq!(since_param(&format!("since={id}")), Ok(Some(id.into())));
        assert_eq!(
            since_param(&format!("a=b&since={id}&c")),
            Ok(Some(id.into()))
        );
        for bad in [
            "since=",
            "since=xyz",
            "since=0123456789ABCDEF0123456789ABCDEF",
        ] {
            assert_eq!(since_param(bad), Err(()), "{bad}");
        }
    }

    #[test]
    fn origin_rules() {
        let allowed = vec!["https://friend.example".to_string()];
        let check = |headers: &[(&str, &str)]| origin_allowed(&head(headers), &allowed);
        assert!(
            check(&[("Host", "sky.fly.dev")]),
            "no Origin: not a browser"
        );
        assert!(check(&[
            ("Host", "sky.fly.dev"),
            ("Origin", "https://sky.fly.dev")
        ]));
        assert!(check(&[
            ("Host", "localhost:8080"),
            ("Origin", "http://localhost:8080")
        ]));
        assert!(check(&[
            ("Host", "sky.fly.dev:443"),
            ("Origin", "https://SKY.fly.dev")
        ]));
        assert!(check(&[
            ("Host", "sky.fly.dev"),
            ("Origin", "https://friend.example")
        ]));
        assert!(!check(&[
            ("Host", "sky.fly.dev"),
            ("Origin", "https://evil.example")
        ]));
        assert!(!check(&[
            ("Host", "localhost:8080"),
            ("Origin", "http://localhost:9999")
        ]));
        assert!(!check(&[("Host", "sky.fly.dev"), ("Origin", "null")]));
        assert!(
            !check(&[("Origin", "https://sky.fly.dev")]),
            "no Host to compare with"
        );
    }

    #[test]
    fn only_a_missing_ipv6_falls_back_to_ipv4() {
        let error = io::Error::from_raw_os_error;
        assert!(is_port_problem(&error(libc::EADDRINUSE)));
        assert!(is_port_problem(&error(libc::EACCES)));
        assert!(!is_port_problem(&error(libc::EAFNOSUPPORT)));
        assert!(!is_port_problem(&error(libc::EADDRNOTAVAIL)));
    }

    #[test]
    fn the_dual_stack_metrics_socket_takes_ipv4_and_ipv6() {
        let listener = match bind_dual_stack(0) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("SKIPPED: no IPv6 on this host ({err}); bind_metrics uses 0.0.0.0");
                return;
            }
        };
        let port = listener.local_addr().expect("bound").port();
        for ip in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ] {
            let client =
                TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(2));
            assert!(client.is_ok(), "{ip} cannot reach [::]:{port}: {client:?}");
            let (_, peer) = listener.accept().expect("accept");
            assert_eq!(peer.ip().to_canonical(), ip, "{peer}");
        }
    }

    #[test]
    fn client_slots_are_bounded_and_returned() {
        let clients = AtomicUsize::new(0);
        let a = ClientSlot::take(&clients, 2);
        let b = ClientSlot::take(&clients, 2);
        assert!(a.is_some() && b.is_some());
        assert!(ClientSlot::take(&clients, 2).is_none());
        drop(a);
        assert!(ClientSlot::take(&clients, 2).is_some());
    }

    #[test]
    fn websocket_keys_are_16_bytes_of_base64() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        for n in 0..64u8 {
            let key = engine.encode([n.wrapping_mul(37); 16]);
            assert!(is_websocket_key(&key), "{key}");
        }
        assert!(is_websocket_key("dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            "",
            "c2hvcnQ=",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25j!Q==",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(!is_websocket_key(bad), "{bad}");
            assert_ne!(engine.decode(bad).map(|b| b.len()).ok(), Some(16), "{bad}");
        }
    }
}
