//! Starting and stopping the processes under test: Skywatch instances, the
//! Pub/Sub test server, and the 256 MiB memory cgroup for the capacity run.

use crate::limits;
use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a process gets to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of a server's log kept for the report when something goes wrong.
const LOG_TAIL: usize = 20;

/// Where the binaries are: next to this tool (`target/release/`), since
/// `cargo build --release --workspace --bins` puts them together.
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|err| format!("cannot find myself: {err}"))?;
    let path = me.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found; build it first: cargo build --release --locked --workspace --bins",
            path.display()
        ))
    }
}

/// A child process that printed `listening on http://ADDR`.
pub struct Process {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Process {
    /// Starts `command` and waits for its `listening on http://ADDR` line on
    /// stderr; the rest of stderr is kept (its last lines) for the report.
    pub fn start(mut command: Command) -> Result<Process, String> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|err| format!("cannot start {command:?}: {err}"))?;
        let pid = child.id();
        let Some(stderr) = child.stderr.take() else {
            return Err("no stderr pipe".into());
        };
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (found_tx, found_rx) = mpsc::channel();
        let tail = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut found = Some(found_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let addr = addr.split_whitespace().next().unwrap_or_default();
                    if let (Some(tx), Ok(addr)) = (found.take(), addr.parse::<SocketAddr>()) {
                        let _ = tx.send(addr);
                    }
                }
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
        match found_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Ok(Process {
                child,
                addr,
                pid,
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = log.lock().map(|t| t.iter().cloned().collect::<Vec<_>>());
                Err(format!(
                    "{command:?} did not report its address: {}",
                    tail.unwrap_or_default().join(" | ")
                ))
            }
        }
    }

    /// How the process ended, if it has.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 6 s.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Settings every benchmarked instance gets: a free port, room for all the
/// clients, quiet logs, and (with `raise_rate_limits`) rate limits that never
/// refuse the one client that sends nor the one address all clients share; a
/// storm keeps the server's defaults, its clients each on their own address.
pub fn skywatch_command(
    bin: &Path,
    extra_env: &[(String, String)],
    cgroup: Option<&Cgroup>,
    raise_rate_limits: bool,
) -> Command {
    // The server starts as a system would start it: the system's hard
    // open-file limit (the tool raised its own above it) and a soft limit of
    // 1,024, the usual default, which the server lifts itself. A shell sets
    // the limits, joins the cgroup if there is one (so every allocation of
    // the server, from the first, is charged to it), then becomes the server.
    let join = match cgroup {
        Some(group) => format!("echo $$ > {}/cgroup.procs && ", group.path.display()),
        None => String::new(),
    };
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -Hn {hard} && ulimit -Sn 1024 && {join}exec \"$0\"",
            hard = limits::system_hard_limit()
        ))
        .arg(bin)
        .env_clear()
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("MAX_CONNECTIONS", "100000")
        .env("LOG_LEVEL", "info");
    if raise_rate_limits {
        // Every client of a run comes from 127.0.0.1, so the limits per
        // source address (a server that has none ignores them) go up too.
        command
            .env("ALERTS_PER_SECOND", "1000")
            .env("ALERT_BURST", "1000")
            .env("ADDRESS_ALERTS_PER_SECOND", "1000")
            .env("ADDRESS_ALERT_BURST", "1000")
            .env("ADDRESS_MAX_CONNECTIONS", "100000");
    }
    for (name, value) in extra_env {
        command.env(name, value);
    }
    command
}

/// Starts the Pub/Sub test server on a free port, with `extra` arguments
/// (e.g. `--pulls-return-immediately`).
pub fn start_pubsub_test_server(extra: &[String]) -> Result<Process, String> {
    let bin = sibling_binary("pubsub-test-server")?;
    let mut command = Command::new(bin);
    command.args(["--port", "0"]).args(extra).env_clear();
    Process::start(command)
}

/// Waits until `GET /readyz` answers 200 (with Pub/Sub: subscribed).
pub fn wait_ready(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let mut response = String::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut response).is_ok()
                && response.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{addr} was not ready within {limit:?}"))
}

/// A cgroup v1 memory group with a hard limit, TCP buffer accounting on.
pub struct Cgroup {
    pub path: PathBuf,
}

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/memory";

impl Cgroup {
    /// Creates (or re-creates) `name` under the v1 memory controller with
    /// `limit` bytes for memory and, separately, for TCP buffers. In cgroup
    /// v1 socket buffers are charged to their own counter, which stays off
    /// until `memory.kmem.tcp.limit_in_bytes` is written.
    pub fn create(name: &str, limit: u64) -> Result<Cgroup, String> {
        let path = Path::new(CGROUP_ROOT).join(name);
        if path.exists() {
            // Left by an interrupted run; only removable once empty.
            fs::remove_dir(&path)
                .map_err(|err| format!("cannot remove the old {}: {err}", path.display()))?;
        }
        fs::create_dir(&path).map_err(|err| format!("cannot create {}: {err}", path.display()))?;
        let group = Cgroup { path };
        group.write("memory.limit_in_bytes", limit)?;
        group.write("memory.kmem.tcp.limit_in_bytes", limit)?;
        Ok(group)
    }

    fn write(&self, file: &str, value: u64) -> Result<(), String> {
        fs::write(self.path.join(file), value.to_string())
            .map_err(|err| format!("cannot write {}/{file}: {err}", self.path.display()))
    }

    /// A counter of the group, e.g. `memory.usage_in_bytes`.
    pub fn read(&self, file: &str) -> Option<u64> {
        fs::read_to_string(self.path.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A line `key value` of a flat-keyed file such as `memory.oom_control`.
    pub fn read_key(&self, file: &str, key: &str) -> Option<u64> {
        let text = fs::read_to_string(self.path.join(file)).ok()?;
        text.lines().find_map(|line| {
            line.strip_prefix(key)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Succeeds once the server in it has exited.
        let deadline = Instant::now() + Duration::from_secs(3);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
