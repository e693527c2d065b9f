//! Test harness for the `skywatch` binary: spawns the real server as a child
//! process, captures its output, and provides small WebSocket and raw HTTP
//! clients that only talk to loopback addresses.
//!
//! Every blocking operation has a bounded timeout so that a broken server
//! makes a test fail instead of hanging it.

// Each integration-test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::handshake::client::Response;
use tungstenite::http::Uri;
use tungstenite::protocol::CloseFrame;
use tungstenite::{ClientRequestBuilder, Error as WsError, HandshakeError, Message, WebSocket};

/// Default bound for any single wait on the server (a read, a log line, ...).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for the server to print its `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub const BIN: &str = env!("CARGO_BIN_EXE_skywatch");

// ---------------------------------------------------------------------------
// Captured output
// ---------------------------------------------------------------------------

#[derive(Default)]
struct OutputState {
    text: String,
    closed: bool,
}

/// Text captured from one of the child's pipes by a background thread.
#[derive(Default)]
pub struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

impl Output {
    fn capture<R: Read + Send + 'static>(pipe: R) -> Arc<Output> {
        let out = Arc::new(Output::default());
        let sink = Arc::clone(&out);
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let mut st = sink.state.lock().unwrap();
                        st.text.push_str(&String::from_utf8_lossy(&line));
                        sink.changed.notify_all();
                    }
                }
            }
            sink.state.lock().unwrap().closed = true;
            sink.changed.notify_all();
        });
        out
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.state.lock().unwrap().text.clone()
    }

    /// Whether the pipe reached EOF.
    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// Waits until `pred(text)` holds or the pipe closes or `deadline` passes.
    /// Returns the text at that moment and whether the predicate held.
    pub fn wait_until(&self, deadline: Instant, pred: impl Fn(&str) -> bool) -> (String, bool) {
        let mut st = self.state.lock().unwrap();
        loop {
            if pred(&st.text) {
                return (st.text.clone(), true);
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                return (st.text.clone(), false);
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Waits until the pipe reaches EOF (the child exited or closed it).
    fn wait_closed(&self, deadline: Instant) -> bool {
        let mut st = self.state.lock().unwrap();
        loop {
            if st.closed {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------
// Child process
// ---------------------------------------------------------------------------

/// The `skywatch` binary running as a child process with a clean environment.
/// Killed on drop.
pub struct Process {
    child: Child,
    status: Option<ExitStatus>,
    pub stdout: Arc<Output>,
    pub stderr: Arc<Output>,
}

impl Process {
    /// Starts the binary with `args` and an environment made only of PATH,
    /// HOST=127.0.0.1, PORT=0 and then `envs` (which may override HOST/PORT).
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Process {
        Process::spawn_in(args, envs, None)
    }

    /// Like [`Process::spawn`], with the child's working directory set to
    /// `cwd` when given (otherwise inherited from the test).
    pub fn spawn_in(args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>) -> Process {
        // SKYWATCH_TEST_BIN runs the tests against another build (e.g. an
        // older one, to see a test fail there).
        let bin = std::env::var_os("SKYWATCH_TEST_BIN")
            .filter(|bin| !bin.is_empty())
            .unwrap_or_else(|| BIN.into());
        let mut cmd = Command::new(bin);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", "0");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Process::launch(cmd)
    }

    /// Starts `bin` with exactly `envs` as its environment: nothing inherited,
    /// nothing added (not even HOST or PORT).
    pub fn spawn_exact(bin: &Path, envs: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(bin);
        cmd.env_clear().envs(envs.iter().copied());
        Process::launch(cmd)
    }

    fn launch(mut cmd: Command) -> Process {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let stdout = Output::capture(child.stdout.take().unwrap());
        let stderr = Output::capture(child.stderr.take().unwrap());
        Process {
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, sig: libc::c_int) {
        assert!(
            self.status.is_none(),
            "cannot signal a child that already exited"
        );
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Waits for the child to exit, at most `timeout`. Returns `None` if it is
    /// still running afterwards.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.status {
            return Some(st);
        }
        let deadline = Instant::now() + timeout;
        // The pipes reach EOF when the process exits: wait for that event
        // first, then reap it.
        self.stdout.wait_closed(deadline);
        self.stderr.wait_closed(deadline);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.status = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Pipes are closed (or the deadline is near); the exit is imminent.
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A summary of the child's output, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "--- child stderr ---\n{}--- child stdout ---\n{}",
            self.stderr.text(),
            self.stdout.text()
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}

/// Result of running the binary to completion.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary until it exits (at most `TIMEOUT`); panics if it keeps
/// running (which a server with bad configuration would do).
pub fn run_to_exit(args: &[&str], envs: &[(&str, &str)]) -> Finished {
    run_to_exit_in(args, envs, None)
}

/// Like [`run_to_exit`], with the child's working directory set to `cwd`
/// when given.
pub fn run_to_exit_in(args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>) -> Finished {
    let mut p = Process::spawn_in(args, envs, cwd);
    let status = p.wait_exit(TIMEOUT).unwrap_or_else(|| {
        panic!(
            "`skywatch {}` with {envs:?} still running after {TIMEOUT:?}\n{}",
            args.join(" "),
            p.dump()
        )
    });
    // The pipes may deliver their last bytes just after the exit.
    let deadline = Instant::now() + TIMEOUT;
    p.stdout.wait_closed(deadline);
    p.stderr.wait_closed(deadline);
    Finished {
        status,
        stdout: p.stdout.text(),
        stderr: p.stderr.text(),
    }
}

/// Runs the binary with `envs` and checks the contract for a configuration
/// error: exit code 2 and one stderr line, `skywatch: invalid VARIABLE=...`,
/// naming `variable`; nothing started, nothing panicked. Returns the run.
pub fn assert_config_error(envs: &[(&str, &str)], variable: &str) -> Finished {
    let out = run_to_exit(&[], envs);
    let shown = format!("stderr:\n{}\nstdout:\n{}", out.stderr, out.stdout);
    assert_eq!(out.status.code(), Some(2), "{envs:?}\n{shown}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected a one-line error\n{shown}");
    assert!(
        lines[0].starts_with(&format!("skywatch: invalid {variable}=")),
        "the error does not name {variable}\n{shown}"
    );
    assert!(
        !shown.contains("panicked") && !shown.contains("listening on"),
        "{shown}"
    );
    out
}

// ---------------------------------------------------------------------------
// Running server
// ---------------------------------------------------------------------------

/// A running server listening on a loopback address.
pub struct Server {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts the server with HOST=127.0.0.1 PORT=0 plus `envs`, and waits
    /// for its `listening on http://ADDR` line.
    pub fn start(envs: &[(&str, &str)]) -> Server {
        Server::start_in(envs, None)
    }

    /// [`Server::start`] with an environment of owned strings.
    pub fn start_owned(envs: &[(String, String)]) -> Server {
        let pairs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::start(&pairs)
    }

    /// Like [`Server::start`], with the child's working directory set to
    /// `cwd` when given.
    pub fn start_in(envs: &[(&str, &str)], cwd: Option<&Path>) -> Server {
        let process = Process::spawn_in(&[], envs, cwd);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let (text, found) = process
            .stderr
            .wait_until(deadline, |t| parse_listen_addr(t).is_some());
        if !found {
            panic!(
                "server with {envs:?} did not print `listening on http://ADDR`\n{}",
                process.dump()
            );
        }
        let addr = parse_listen_addr(&text).unwrap();
        assert!(
            addr.ip().is_loopback(),
            "server listens on non-loopback {addr}"
        );
        Server { process, addr }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Everything the server wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.process.stderr.text()
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.process
            .stderr
            .wait_until(Instant::now() + timeout, |t| t.contains(needle))
            .1
    }

    pub fn signal(&self, sig: libc::c_int) {
        self.process.signal(sig);
    }

    /// The value of the metric sample `sample` (a name, with its labels if
    /// any, e.g. `skywatch_alerts_unpublished_total{reason="expired"}`) from
    /// this instance's /metrics (start it [`WITH_METRICS`]); panics if it
    /// is missing.
    pub fn metric(&self, sample: &str) -> u64 {
        let text = self.scrape().body_text();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {sample} in /metrics:\n{text}"))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Connects a WebSocket client and consumes (and checks) the CONNECTED
    /// greeting.
    pub fn client(&self) -> Client {
        connect_ready(self.addr)
    }

    /// The metrics listener's address, from its `metrics on http://ADDR/metrics`
    /// line (start the server with [`WITH_METRICS`]).
    pub fn metrics_addr(&self) -> SocketAddr {
        let (text, found) = self
            .process
            .stderr
            .wait_until(Instant::now() + TIMEOUT, |t| {
                parse_addr_after(t, METRICS_NEEDLE).is_some()
            });
        assert!(
            found,
            "no `{METRICS_NEEDLE}ADDR` line (was the server started WITH_METRICS?)\n{text}"
        );
        parse_addr_after(&text, METRICS_NEEDLE).unwrap()
    }

    /// `GET /metrics` on the metrics listener.
    pub fn scrape(&self) -> HttpResponse {
        get(self.metrics_addr(), "/metrics")
    }

    /// Polls `/readyz` until it answers 200 (readiness has no event to wait
    /// on), panicking with the server's log after `within`.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let status = get(self.addr, "/readyz").status;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz still {status} after {within:?}\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Gives a test server a metrics listener on a free port, as PORT=0 does
/// for its main one; [`Server::metrics_addr`] finds it in the log.
pub const WITH_METRICS: (&str, &str) = ("METRICS_PORT", "0");

const METRICS_NEEDLE: &str = "metrics on http://";

/// The TCP ports process `pid` listens on, from /proc: its sockets' inodes
/// matched against the kernel's tables of listening sockets. Sorted.
pub fn listening_ports(pid: i32) -> Vec<u16> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"));
    let inodes: BTreeSet<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // no IPv6 on this host: no tcp6 table
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (the 10th field);
            // st 0A is LISTEN.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap_or_default();
                ports.push(
                    u16::from_str_radix(port, 16)
                        .unwrap_or_else(|_| panic!("bad port in {path}: {line}")),
                );
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The project every Pub/Sub test uses.
pub const PUBSUB_PROJECT: &str = "skywatch-test";

/// Pull requests an instance keeps open at once (PUBSUB_OUTSTANDING_PULLS's
/// default). A test that injects failures waits until all of them are held,
/// so the failures meet the call it means them for.
pub const OUTSTANDING_PULLS: usize = 4;

/// The environment that joins an instance to the Pub/Sub emulator (or test
/// server) at `emulator`, as `alloc` in `region`.
pub fn emulator_env(emulator: SocketAddr, alloc: &str, region: &str) -> Vec<(String, String)> {
    vec![
        ("PUBSUB_EMULATOR_HOST".into(), emulator.to_string()),
        ("PUBSUB_PROJECT_ID".into(), PUBSUB_PROJECT.into()),
        ("FLY_ALLOC_ID".into(), alloc.into()),
        ("FLY_REGION".into(), region.into()),
    ]
}

/// Finds `listening on http://ADDR` in `text` and parses ADDR.
pub fn parse_listen_addr(text: &str) -> Option<SocketAddr> {
    parse_addr_after(text, "listening on http://")
}

/// Finds `needle` followed by an address in `text` and parses the address.
fn parse_addr_after(text: &str, needle: &str) -> Option<SocketAddr> {
    for line in text.lines() {
        if let Some(i) = line.find(needle) {
            let rest = &line[i + needle.len()..];
            let token: String = rest
                .chars()
                .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
                .collect();
            let token = token.trim_end_matches(['.', ':']);
            if let Ok(addr) = token.parse() {
                return Some(addr);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

/// Why a WebSocket connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the handshake with this non-101 HTTP status.
    Status(u16),
    /// Anything else (refused, reset, EOF, timeout, protocol error).
    Other(String),
}

/// A connected tungstenite client over a std `TcpStream`.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub response: Response,
    /// Whether reads return PRESENCE updates (see [`Client::poll_until`]).
    pub presence: bool,
    /// Ids of the ACCEPTED replies read so far, oldest first: reads set
    /// them aside (see [`Client::poll_until`]); [`Client::next_accepted`]
    /// takes them.
    pub accepted: std::collections::VecDeque<String>,
    /// Set while [`Client::next_accepted`] reads.
    awaiting_accepted: bool,
}

/// Whether a text message is a PRESENCE update.
fn is_presence(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|v| v["message"] == "PRESENCE")
}

/// The id of an ACCEPTED reply, if `text` is one.
fn accepted_id(text: &str) -> Option<String> {
    let v = serde_json::from_str::<Value>(text).ok()?;
    if v["message"] != "ACCEPTED" {
        return None;
    }
    assert_eq!(keys(&v), key_set(&["message", "id"]), "ACCEPTED shape: {v}");
    Some(
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("ACCEPTED id is not a string: {v}"))
            .to_string(),
    )
}

fn tcp_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `ws://addr/ws`, optionally with an `Origin` header. Does not
/// read the greeting.
pub fn try_connect(addr: SocketAddr, origin: Option<&str>) -> Result<Client, ConnectError> {
    let stream = tcp_connect(addr).map_err(|e| ConnectError::Other(format!("tcp: {e}")))?;
    try_connect_over(stream, addr, origin)
}

/// Performs the client handshake over an already connected stream.
pub fn try_connect_over(
    stream: TcpStream,
    addr: SocketAddr,
    origin: Option<&str>,
) -> Result<Client, ConnectError> {
    try_connect_path(stream, addr, "/ws", origin)
}

/// Opens a WebSocket on `path` (e.g. `/ws?since=...`) over `stream`.
pub fn try_connect_path(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    origin: Option<&str>,
) -> Result<Client, ConnectError> {
    let uri: Uri = format!("ws://{addr}{path}")
        .parse()
        .unwrap_or_else(|e| panic!("bad test URI for {path}: {e}"));
    let mut req = ClientRequestBuilder::new(uri);
    if let Some(o) = origin {
        req = req.with_header("Origin", o);
    }
    match tungstenite::client(req, stream) {
        Ok((ws, response)) => Ok(Client {
            ws,
            response,
            presence: false,
            accepted: Default::default(),
            awaiting_accepted: false,
        }),
        Err(HandshakeError::Failure(WsError::Http(resp))) => {
            Err(ConnectError::Status(resp.status().as_u16()))
        }
        Err(HandshakeError::Failure(e)) => Err(ConnectError::Other(e.to_string())),
        Err(HandshakeError::Interrupted(_)) => {
            Err(ConnectError::Other("handshake timed out".into()))
        }
    }
}

/// Connects (without Origin), panicking on failure. Does not read the
/// greeting.
pub fn connect(addr: SocketAddr) -> Client {
    try_connect(addr, None).unwrap_or_else(|e| panic!("ws connect to {addr} failed: {e:?}"))
}

/// The loopback address of person `n` (from 0) when a test plays several
/// people: 127.0.x.y, a different one for each, so per-address logic is
/// exercised as on the internet.
pub fn person(n: usize) -> std::net::Ipv4Addr {
    let n = n + 10;
    std::net::Ipv4Addr::new(127, 0, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// Connects from the loopback address `from` (see [`person`]) and consumes
/// the `CONNECTED` greeting.
pub fn connect_from(addr: SocketAddr, from: std::net::Ipv4Addr) -> Client {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .unwrap_or_else(|e| panic!("socket: {e}"));
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .unwrap_or_else(|e| panic!("bind to {from}: {e}"));
    socket
        .connect_timeout(&addr.into(), TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from {from} to {addr}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut c = try_connect_over(stream, addr, None)
        .unwrap_or_else(|e| panic!("ws connect from {from} to {addr}: {e:?}"));
    let hello = c.next_json();
    assert_eq!(hello["message"], "CONNECTED", "unexpected greeting {hello}");
    c
}

/// A client over `stream`, whose `101` response [`raw_handshake`] already
/// read; consumes the `CONNECTED` greeting.
pub fn client_over_upgraded(stream: TcpStream) -> Client {
    let ws = WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None);
    let mut c = Client {
        ws,
        response: Response::new(None),
        presence: false,
        accepted: Default::default(),
        awaiting_accepted: false,
    };
    let hello = c.next_json();
    assert_eq!(hello["message"], "CONNECTED", "unexpected greeting {hello}");
    c
}

/// Connects and consumes the `CONNECTED` greeting.
pub fn connect_ready(addr: SocketAddr) -> Client {
    let mut c = connect(addr);
    let hello = c.next_json();
    assert_eq!(hello["message"], "CONNECTED", "unexpected greeting {hello}");
    c
}

/// Connects to `/ws?since=<id>`, as a page does after losing its socket, and
/// consumes the CONNECTED greeting.
pub fn connect_since(addr: SocketAddr, id: &str) -> Client {
    let stream = tcp_connect(addr).unwrap_or_else(|e| panic!("tcp connect to {addr}: {e}"));
    let mut c = try_connect_path(stream, addr, &format!("/ws?since={id}"), None)
        .unwrap_or_else(|e| panic!("ws connect to {addr} with since={id} failed: {e:?}"));
    let hello = c.next_json();
    assert_eq!(hello["message"], "CONNECTED", "unexpected greeting {hello}");
    c
}

/// Retries `try_connect` until it succeeds or `timeout` passes; used where the
/// server learns asynchronously that a slot became free.
pub fn connect_eventually(addr: SocketAddr, timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(addr, None) {
            Ok(c) => return c,
            Err(e) if Instant::now() >= deadline => {
                panic!("could not connect within {timeout:?}; last error {e:?}")
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Builds an `ALIEN_LANDING` alert as the client sends it.
pub fn alert(timestamp: u64) -> String {
    json!({"message": "ALIEN_LANDING", "timestamp": timestamp}).to_string()
}

/// Returns the set of keys of a JSON object (panics if not an object).
pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

pub fn key_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Client {
    pub fn stream(&self) -> &TcpStream {
        self.ws.get_ref()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream().local_addr().unwrap()
    }

    pub fn send(&mut self, msg: Message) {
        self.ws
            .send(msg)
            .unwrap_or_else(|e| panic!("ws send failed: {e}"));
    }

    pub fn send_text(&mut self, text: &str) {
        self.send(Message::text(text));
    }

    pub fn send_alert(&mut self, timestamp: u64) {
        self.send_text(&alert(timestamp));
    }

    /// Reads the next message (any kind) before `deadline`. `None` if the
    /// deadline passed; `Some(Err)` on a connection error.
    /// PRESENCE updates are skipped unless the client asked to see them
    /// ([`Client::with_presence`]): they arrive whenever the watcher count
    /// changes, which most tests do not care about. ACCEPTED replies are set
    /// aside in [`Client::accepted`]: they come in no fixed order with the
    /// alert itself, and tests of them read them with
    /// [`Client::next_accepted`].
    pub fn poll_until(&mut self, deadline: Instant) -> Option<Result<Message, WsError>> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return None;
            }
            self.ws.get_ref().set_read_timeout(Some(remaining)).unwrap();
            match self.ws.read() {
                Err(WsError::Io(e)) if is_timeout(&e) => return None,
                Ok(Message::Text(t)) if !self.presence && is_presence(t.as_str()) => {}
                Ok(Message::Text(t)) if t.as_str().contains("\"ACCEPTED\"") => {
                    match accepted_id(t.as_str()) {
                        Some(id) => {
                            self.accepted.push_back(id);
                            if self.awaiting_accepted {
                                return None;
                            }
                        }
                        None => return Some(Ok(Message::Text(t))),
                    }
                }
                other => return Some(other),
            }
        }
    }

    /// The id of the next ACCEPTED reply (one already read, or the next to
    /// arrive within `TIMEOUT`); any other message read meanwhile is lost.
    pub fn next_accepted(&mut self) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(id) = self.accepted.pop_front() {
                return id;
            }
            assert!(Instant::now() < deadline, "no ACCEPTED within {TIMEOUT:?}");
            // Returns (None) as soon as an ACCEPTED is set aside.
            self.awaiting_accepted = true;
            let read = self.poll_until(deadline);
            self.awaiting_accepted = false;
            if let Some(Err(e)) = read {
                panic!("connection error waiting for ACCEPTED: {e}");
            }
        }
    }

    /// Lets PRESENCE updates through to every read.
    pub fn with_presence(mut self) -> Client {
        self.presence = true;
        self
    }

    /// Reads the next message (any kind) before `deadline`; `Err` on a
    /// connection error, panics on timeout.
    pub fn read_until(&mut self, deadline: Instant) -> Result<Message, WsError> {
        self.poll_until(deadline)
            .unwrap_or_else(|| panic!("timed out waiting for a WebSocket message"))
    }

    /// Reads the next text message (skipping ping/pong) and parses it as JSON.
    pub fn next_json(&mut self) -> Value {
        self.next_json_within(TIMEOUT)
    }

    /// The next text message as JSON, skipping pings, pongs and PRESENCE
    /// updates (which arrive whenever the watcher count changes; tests of
    /// presence read them with [`Client::next_presence`]).
    pub fn next_json_within(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.next_message_until(deadline);
            if v["message"] != "PRESENCE" {
                return v;
            }
        }
    }

    /// The next PRESENCE update within `timeout`, skipping nothing else: any
    /// other message in between is a failure.
    pub fn next_presence(&mut self, timeout: Duration) -> Value {
        let shown = std::mem::replace(&mut self.presence, true);
        let v = self.next_message_until(Instant::now() + timeout);
        self.presence = shown;
        assert_eq!(v["message"], "PRESENCE", "expected PRESENCE, got {v}");
        v
    }

    /// The next text message as JSON, whatever it is (pings and pongs skipped).
    pub fn next_message_until(&mut self, deadline: Instant) -> Value {
        loop {
            match self.read_until(deadline) {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text {t:?}: {e}"));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("expected a text message, got {other:?}"),
                Err(e) => panic!("expected a text message, got error {e}"),
            }
        }
    }

    /// Reads the next message and checks it is a broadcast alert.
    pub fn next_alert(&mut self) -> Value {
        let v = self.next_json();
        assert_eq!(v["message"], "ALIEN_LANDING", "expected an alert, got {v}");
        v
    }

    /// Reads the next message and checks it is an ERROR with `code`, of the
    /// exact shape `{"message":"ERROR","error":code,"detail":"<non-empty>"}`.
    pub fn expect_error(&mut self, code: &str) -> Value {
        let v = self.next_json();
        assert_eq!(v["message"], "ERROR", "expected ERROR {code}, got {v}");
        assert_eq!(v["error"], code, "wrong error code in {v}");
        assert_eq!(
            keys(&v),
            key_set(&["message", "error", "detail"]),
            "ERROR has wrong fields: {v}"
        );
        let detail = v["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("detail not a string: {v}"));
        assert!(!detail.trim().is_empty(), "empty detail: {v}");
        v
    }

    /// Reads until a close frame arrives (skipping pings and text) and returns
    /// its code. Panics if the connection ends without a close frame.
    pub fn expect_close(&mut self) -> u16 {
        self.expect_close_within(TIMEOUT)
    }

    pub fn expect_close_within(&mut self, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline) {
                Ok(Message::Close(Some(CloseFrame { code, .. }))) => return code.into(),
                Ok(Message::Close(None)) => panic!("close frame without a status code"),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_)) => continue,
                Ok(other) => panic!("expected a close frame, got {other:?}"),
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }

    /// After a close frame was received: the server must end the connection
    /// (EOF/reset) within `TIMEOUT`; any further data message is an error.
    pub fn expect_disconnect(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.poll_until(deadline) {
                None => panic!("server did not close the connection within {TIMEOUT:?}"),
                Some(Err(_)) => return,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => {}
                Some(Ok(other)) => panic!("data after the close frame: {other:?}"),
            }
        }
    }

    /// Starts a normal close handshake (1000) and waits for it to complete.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return;
            }
            self.ws.get_ref().set_read_timeout(Some(remaining)).unwrap();
            if self.ws.read().is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the response carries `Connection: close`.
    pub fn assert_connection_close(&self) {
        let conn = self
            .header("connection")
            .unwrap_or_else(|| panic!("no Connection header in {self:?}"));
        assert!(
            conn.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close")),
            "Connection header is {conn:?}, expected close"
        );
    }
}

/// Parses a response head (`HTTP/1.1 200 OK\r\nK: V\r\n...`), without the
/// terminating blank line.
pub fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    assert!(
        version.starts_with("HTTP/1."),
        "bad status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    (status, headers)
}

/// Sends `request` verbatim and reads the response until EOF (the server
/// closes every connection after responding).
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = tcp_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.write_all(request).expect("write request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A reset after a complete response is still a response.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) if is_timeout(&e) => panic!(
                "server did not close the connection within {TIMEOUT:?}; got so far: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Err(e) => panic!("reading response: {e}"),
        }
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {buf:?}"));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let (status, headers) = parse_head(&head);
    HttpResponse {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    }
}

/// `METHOD path HTTP/1.1` with a Host header and an empty body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let req = if method == "GET" || method == "HEAD" {
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
    } else {
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")
    };
    http_raw(addr, req.as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, "GET", path)
}

/// Headers of a valid WebSocket upgrade request for `/ws`.
pub fn upgrade_request(addr: SocketAddr, extra_headers: &[(&str, &str)]) -> String {
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Sends a WebSocket upgrade request over `stream` and reads exactly the
/// response head (byte by byte, so no frame bytes are consumed). The
/// returned `body` is always empty.
pub fn raw_handshake(
    stream: &mut TcpStream,
    addr: SocketAddr,
    extra_headers: &[(&str, &str)],
) -> HttpResponse {
    stream
        .write_all(upgrade_request(addr, extra_headers).as_bytes())
        .expect("write upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "EOF inside the handshake response: {:?}",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(byte[0]),
            Err(e) => panic!(
                "reading handshake response: {e}; got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let (status, headers) = parse_head(&String::from_utf8_lossy(&head[..head.len() - 4]));
    HttpResponse {
        status,
        headers,
        body: Vec::new(),
    }
}

/// A raw TCP connection to the server with 5 s timeouts.
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    tcp_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// How a raw connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// EOF or connection reset: the server dropped us.
    Closed,
    /// Still open when the deadline passed.
    StillOpen,
}

/// Reads (and discards) from `stream` until EOF/reset or `timeout`; returns
/// how it ended and the bytes received.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Ended, Vec<u8>) {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return (Ended::StillOpen, got);
        }
        stream.set_read_timeout(Some(remaining)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return (Ended::Closed, got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => return (Ended::StillOpen, got),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (Ended::Closed, got),
        }
    }
}

// ---------------------------------------------------------------------------
// Raw WebSocket frames
// ---------------------------------------------------------------------------

/// A server-to-client frame parsed from raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Parses complete unmasked frames from the front of `buf`, removing them.
pub fn parse_frames(buf: &mut Vec<u8>) -> Vec<RawFrame> {
    let mut frames = Vec::new();
    loop {
        if buf.len() < 2 {
            return frames;
        }
        let fin = buf[0] & 0x80 != 0;
        let opcode = buf[0] & 0x0f;
        let masked = buf[1] & 0x80 != 0;
        let (len, mut pos) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
            126 | 127 => return frames,
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if buf.len() < pos + 4 {
                return frames;
            }
            let m: [u8; 4] = buf[pos..pos + 4].try_into().unwrap();
            pos += 4;
            Some(m)
        } else {
            None
        };
        let len = usize::try_from(len).unwrap();
        if buf.len() < pos + len {
            return frames;
        }
        let mut payload = buf[pos..pos + len].to_vec();
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        buf.drain(..pos + len);
        frames.push(RawFrame {
            fin,
            opcode,
            payload,
        });
    }
}

// ---------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed (with its contents)
/// on drop. Used for key files and as a child's working directory.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/skywatch-test-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("skywatch-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let file = self.path.join(name);
        std::fs::write(&file, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        file
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------

/// Finds `name` on PATH. When it is missing, CI (which sets
/// SKYWATCH_REQUIRE_TOOLS=1 after installing everything) fails the test with
/// `install` as the fix; elsewhere the test says what it skipped and passes,
/// so `make test` works on a machine without the extra tools.
pub fn tool(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        let message = format!("{name} is not installed (install it with: {install})");
        if std::env::var_os("SKYWATCH_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
            panic!("{message}; SKYWATCH_REQUIRE_TOOLS=1 requires it");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}
