//! The page (index.html, issue 4) in a real browser: Debian's headless
//! Chromium, driven from Rust through chromedriver's W3C WebDriver HTTP API
//! (plain JSON over HTTP, so no npm and no driver crate).
//!
//! The main test joins two instances through `pubsub-test-server`, opens one
//! page on each, presses the button, stops and restarts one instance and
//! checks that its page comes back by itself, then makes a small storm on
//! both instances. Screenshots go to `target/browser-test/` (the test prints
//! the paths); with `SKYWATCH_UPDATE_SCREENSHOTS=1` the map test's two are
//! also copied to `docs/`.
//!
//! The storm test (issue "Storms", point 5) presses 10,000 times from the
//! test's own clients while a page is open, and checks the page's counts,
//! its bounded list, its sum-ups for screen readers, its map and its main
//! thread (Long Tasks API, weighed by the CPU time the renderer's main
//! thread used, read from /proc).
//!
//! The map tests (issue 15) join three instances in three regions through
//! `pubsub-test-server` (a press pulses its region on every page, a storm
//! sizes the marks by count, the caption names the regions; their
//! screenshots are the README's), and check the map with reduced motion
//! (nothing moves, fading in steps), for a server without a region ("on
//! this machine") and for an unknown region ("elsewhere").
//!
//! `chromium` and `chromedriver` are looked up on PATH (Debian:
//! `apt-get install chromium chromium-driver`, which .ci/run does). Where
//! they are missing the browser tests print `SKIPPED: ... not installed` with
//! that command, and fail instead under SKYWATCH_REQUIRE_TOOLS=1, as in CI
//! (`support::tool`).

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use pubsub_test_server::{Options, PubSubTestServer};
use serde_json::{Value, json};
use support::{Server, TempDir, connect_ready, tool};

const PROJECT: &str = support::PUBSUB_PROJECT;
/// Bound for anything the browser must show: generous, because this machine
/// has 2 cores shared by Chromium, three servers and other test binaries.
const WAIT: Duration = Duration::from_secs(30);
/// Bound for a stopped page to reconnect by itself: the backoff may have
/// grown to a wait of up to 16 s while the instance was down.
const RECONNECT_WAIT: Duration = Duration::from_secs(45);
/// How often a wait looks at the page again.
const POLL: Duration = Duration::from_millis(100);
/// The issue: exit within 5 s of SIGTERM; doubled for a loaded machine.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// WebDriver's codes for the Tab and Enter keys.
const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";
/// The W3C WebDriver key under which an element reference is returned.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

// ---------------------------------------------------------------------------
// chromedriver and Chromium
// ---------------------------------------------------------------------------

/// How to install what these tests need, for the skip or failure message.
const INSTALL: &str = "apt-get install chromium chromium-driver";

/// A running chromedriver, in its own process group so that dropping it
/// (also during a panic) kills it and every browser it started.
struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
    chromium: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Driver {
    /// Starts chromedriver; `None` (after saying so) where Chromium or
    /// chromedriver is not installed and SKYWATCH_REQUIRE_TOOLS is not set.
    fn start() -> Option<Driver> {
        let chromium = tool("chromium", INSTALL);
        let chromedriver = tool("chromedriver", INSTALL);
        let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
            return None;
        };
        let mut child = Command::new(&chromedriver)
            // Port 0: chromedriver picks a free one and prints it.
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let log = Arc::new(Mutex::new(String::new()));
        let (lines_tx, lines_rx) = mpsc::channel();
        capture(
            child.stdout.take().expect("piped stdout"),
            &log,
            Some(lines_tx),
        );
        capture(child.stderr.take().expect("piped stderr"), &log, None);

        // The event: "ChromeDriver was started successfully on port N."
        let deadline = Instant::now() + WAIT;
        let port = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(port) = started_port(&line) {
                        break port;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "chromedriver did not report its port within {WAIT:?}:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // WebDriver errors are JSON bodies with 4xx/5xx statuses: read them.
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent,
            chromium,
            log,
        };
        // Ready to create sessions once /status says so (it normally does as
        // soon as the port is printed).
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, status) = driver.request("GET", "/status", None);
            if status["value"]["ready"] == true {
                return Some(driver);
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within {WAIT:?}: {status}\n{}",
                driver.log()
            );
            thread::sleep(POLL);
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// One WebDriver call; returns the HTTP status and the JSON body.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            ("POST", body) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json; charset=utf-8")
                .send(body.unwrap_or(&json!({})).to_string()),
            _ => panic!("unsupported WebDriver method {method}"),
        };
        let mut resp = result.unwrap_or_else(|e| {
            panic!(
                "WebDriver {method} {path} failed: {e}\n--- chromedriver ---\n{}",
                self.log()
            )
        });
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_else(|e| panic!("reading WebDriver {method} {path}: {e}"));
        let value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("WebDriver {method} {path} answered non-JSON ({e}): {text:?}")
        });
        (status, value)
    }

    /// Opens a browser: a desktop window, or a phone-sized screen.
    fn open(&self, name: &'static str, screen: Screen) -> Page<'_> {
        let label: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let profile = TempDir::new(&format!("chromium-{label}"));
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            "--no-proxy-server".into(),
            // Timers in a page that is not focused must not be throttled:
            // the reconnect countdown is exactly such a timer.
            "--disable-background-timer-throttling".into(),
            "--disable-renderer-backgrounding".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut options = json!({ "binary": self.chromium.to_string_lossy() });
        match screen {
            Screen::Desktop { width, height } => {
                args.push(format!("--window-size={width},{height}"))
            }
            Screen::Phone { width, height } => {
                options["mobileEmulation"] = json!({
                    "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2.0, "touch": true }
                });
            }
        }
        options["args"] = json!(args);
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "timeouts": { "pageLoad": 30_000, "script": 30_000, "implicit": 0 },
        }}});
        let (status, body) = self.request("POST", "/session", Some(&caps));
        let id = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "chromedriver could not start Chromium ({status}): {body}\n\
                     --- chromedriver ---\n{}",
                    self.log()
                )
            })
            .to_string();
        Page {
            driver: self,
            name,
            id,
            _profile: profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions. The target is
        // the process group this test created for chromedriver (its pid is
        // the group id), which holds chromedriver and the browsers it ran.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- chromedriver ---\n{}", self.log());
        }
    }
}

/// Copies `pipe` into `log` line by line; sends each line on `lines` too.
fn capture(
    pipe: impl Read + Send + 'static,
    log: &Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) {
    let log = Arc::clone(log);
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
            if let Some(tx) = &lines {
                let _ = tx.send(line);
            }
        }
    });
}

/// The port in chromedriver's "started successfully on port N." line.
fn started_port(line: &str) -> Option<u16> {
    let rest = line.split("started successfully on port ").nth(1)?;
    rest.trim().trim_end_matches('.').parse().ok()
}

#[derive(Clone, Copy)]
enum Screen {
    Desktop { width: u32, height: u32 },
    Phone { width: u32, height: u32 },
}

const DESKTOP: Screen = Screen::Desktop {
    width: 960,
    height: 880,
};
const PHONE: Screen = Screen::Phone {
    width: 390,
    height: 760,
};

// ---------------------------------------------------------------------------
// A page in one browser
// ---------------------------------------------------------------------------

/// One WebDriver session (one browser with one tab); deleted on drop.
struct Page<'d> {
    driver: &'d Driver,
    name: &'static str,
    id: String,
    _profile: TempDir,
}

/// What the page shows, read from its DOM in one script call.
#[derive(Debug, Clone)]
struct View {
    /// `data-state` of the status line: connecting, connected, reconnecting.
    state: String,
    status: String,
    button_disabled: bool,
    feedback: String,
    /// The alerts' texts, newest first.
    alerts: Vec<String>,
    /// "N watchers in M regions".
    watchers: String,
    /// The notice shown after coming back to an instance that could not
    /// replay what was missed (empty while hidden).
    missed: String,
    /// "N reports since you opened this page, ..." (empty while hidden).
    tally: String,
    /// The storm line (empty while hidden) and its `data-state`: live,
    /// over or away.
    storm: String,
    storm_state: String,
    /// The map's marks that are shown: region code -> radius, and opacity.
    marks: BTreeMap<String, f64>,
    mark_opacity: BTreeMap<String, f64>,
    /// The map's watcher rings that are shown: region code -> radius.
    rings: BTreeMap<String, f64>,
    /// The map's caption: its landings sentence and its watchers sentence.
    map_landings: String,
    map_watching: String,
    /// With [`MAP_PROBE`] installed: the region of every animation seen on
    /// the page since, in the order they started ("-" for one outside the
    /// map's marks).
    animated: Vec<String>,
}

impl View {
    /// The N of the tally line: every alert and every summary's count the
    /// page received.
    fn reports(&self) -> Option<u64> {
        leading_count(&self.tally)
    }
}

/// A JSON object of numbers as a map (anything else left out).
fn numbers_by_key(v: &Value) -> BTreeMap<String, f64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, n)| Some((k.clone(), n.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The number "1,523" that `text` starts with, as 1523.
fn leading_count(text: &str) -> Option<u64> {
    let digits: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

const READ_VIEW: &str = r##"
    const status = document.getElementById("status");
    return {
        state: status ? (status.dataset.state || "") : "",
        status: status ? status.textContent : "",
        disabled: document.getElementById("alert")?.disabled ?? true,
        feedback: document.getElementById("feedback")?.textContent ?? "",
        alerts: Array.from(document.querySelectorAll("#alerts li .alert-text"), (e) => e.textContent),
        watchers: document.getElementById("watchers")?.textContent ?? "",
        missed: document.getElementById("missed")?.hidden === false
            ? document.getElementById("missed").textContent : "",
        tally: document.getElementById("tally")?.hidden === false
            ? document.getElementById("tally").textContent : "",
        storm: document.getElementById("storm")?.hidden === false
            ? document.getElementById("storm").textContent : "",
        stormState: document.getElementById("storm")?.dataset.state ?? "",
        marks: shown("#map-marks [data-region]", (g) => g.querySelector(".mark-dot").getAttribute("r")),
        markOpacity: shown("#map-marks [data-region]", (g) => g.getAttribute("opacity") ?? "1"),
        rings: shown("#map-watchers [data-region]", (c) => c.getAttribute("r")),
        mapLandings: document.getElementById("map-landings")?.textContent ?? "",
        mapWatching: document.getElementById("map-watching")?.textContent ?? "",
        animated: window.mapProbe ? window.mapProbe.animated : [],
    };
    function shown(css, value) {
        return Object.fromEntries(Array.from(document.querySelectorAll(css))
            .filter((e) => e.getAttribute("display") !== "none")
            .map((e) => [e.dataset.region, Number(value(e))]));
    }
"##;

impl Page<'_> {
    /// A WebDriver command on this session; panics on a WebDriver error.
    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, reply) =
            self.driver
                .request(method, &format!("/session/{}{path}", self.id), body);
        if status != 200 {
            panic!(
                "[{}] WebDriver {method} {path} answered {status}: {reply}\n--- chromedriver ---\n{}",
                self.name,
                self.driver.log()
            );
        }
        reply["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page; returns its value.
    fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
    }

    fn view(&self) -> View {
        let v = self.eval(READ_VIEW);
        View {
            state: v["state"].as_str().unwrap_or_default().to_string(),
            status: v["status"].as_str().unwrap_or_default().to_string(),
            button_disabled: v["disabled"].as_bool().unwrap_or(true),
            feedback: v["feedback"].as_str().unwrap_or_default().to_string(),
            alerts: v["alerts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            watchers: v["watchers"].as_str().unwrap_or_default().to_string(),
            missed: v["missed"].as_str().unwrap_or_default().to_string(),
            tally: v["tally"].as_str().unwrap_or_default().to_string(),
            storm: v["storm"].as_str().unwrap_or_default().to_string(),
            storm_state: v["stormState"].as_str().unwrap_or_default().to_string(),
            marks: numbers_by_key(&v["marks"]),
            mark_opacity: numbers_by_key(&v["markOpacity"]),
            rings: numbers_by_key(&v["rings"]),
            map_landings: v["mapLandings"].as_str().unwrap_or_default().to_string(),
            map_watching: v["mapWatching"].as_str().unwrap_or_default().to_string(),
            animated: v["animated"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Polls the page until `pred` holds; panics after `timeout` with what
    /// the page showed last.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&View) -> bool) -> View {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.view();
            if pred(&view) {
                return view;
            }
            if Instant::now() >= deadline {
                panic!(
                    "[{}] {what}: not shown within {timeout:?}; the page shows {view:#?}",
                    self.name
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits for "Connected to the WebSocket server <where>" with the button
    /// enabled.
    fn wait_connected(&self, place: &str, timeout: Duration) -> View {
        let expected = format!("Connected to the WebSocket server {place}");
        self.wait_for(&format!("{expected:?}"), timeout, |v| {
            v.state == "connected" && v.status == expected && !v.button_disabled
        })
    }

    /// Polls `get` until it gives a value; panics after `timeout`.
    fn wait_for_value<T>(
        &self,
        what: &str,
        timeout: Duration,
        get: impl Fn(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = get(self) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("[{}] {what}: not within {timeout:?}", self.name);
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until there are `count` alerts, the newest from `city`, each in
    /// the page's format ("Alien landing near CITY, N ms ago").
    fn wait_alerts(&self, count: usize, city: &str) -> View {
        let view = self.wait_for(
            &format!("{count} alert(s), the newest from {city}"),
            WAIT,
            |v| v.alerts.len() >= count && alert_delay(&v.alerts[0], city).is_some(),
        );
        assert_eq!(view.alerts.len(), count, "[{}] {view:#?}", self.name);
        for text in &view.alerts {
            let ago = text
                .strip_prefix("Alien landing near ")
                .and_then(|rest| rest.rsplit_once(", "))
                .and_then(|(_, ago)| relative_ms(ago));
            assert!(
                ago.is_some(),
                "[{}] alert not in the issue's format: {text:?}",
                self.name
            );
        }
        view
    }

    /// Clicks `css` like a person would (a real WebDriver click).
    fn click(&self, css: &str) {
        let found = self.cmd(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        );
        let element = found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("[{}] no element {css}: {found}", self.name));
        self.cmd(
            "POST",
            &format!("/element/{element}/click"),
            Some(&json!({})),
        );
    }

    /// Presses and releases keys (WebDriver key codes, e.g. TAB) as a person
    /// at a keyboard would.
    fn keys(&self, keys: &[&str]) {
        let mut actions = Vec::new();
        for key in keys {
            actions.push(json!({ "type": "keyDown", "value": key }));
            actions.push(json!({ "type": "keyUp", "value": key }));
        }
        self.cmd(
            "POST",
            "/actions",
            Some(&json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] })),
        );
    }

    /// Presses the red button (which must be enabled) and waits for "Sent".
    fn press(&self) {
        let before = self.view();
        assert!(
            !before.button_disabled,
            "[{}] the button is disabled: {before:#?}",
            self.name
        );
        self.eval(r#"document.getElementById("feedback").textContent = "";"#);
        self.click("#alert");
        self.wait_for("the sent confirmation", WAIT, |v| {
            v.feedback.starts_with("Sent")
        });
    }

    /// A Chrome DevTools Protocol command, through chromedriver.
    fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(&json!({ "cmd": cmd, "params": params })),
        )
    }

    /// Emulates the reader's `prefers-reduced-motion: reduce` setting (or
    /// takes it back); the page sees it as a change of its media query.
    fn reduce_motion(&self, reduce: bool) {
        let features = if reduce {
            json!([{ "name": "prefers-reduced-motion", "value": "reduce" }])
        } else {
            json!([])
        };
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({ "features": features }),
        );
        let matches =
            self.eval(r#"return matchMedia("(prefers-reduced-motion: reduce)").matches;"#);
        assert_eq!(
            matches,
            json!(reduce),
            "[{}] prefers-reduced-motion not emulated",
            self.name
        );
    }

    /// Installs [`MAP_PROBE`]: from now on [`View::animated`] lists every
    /// animation that runs on the page.
    fn watch_animations(&self) {
        self.eval(MAP_PROBE);
    }

    /// Saves a PNG of what the page shows; returns its path.
    fn screenshot(&self, file: &str) -> PathBuf {
        let data = self.cmd("GET", "/screenshot", None);
        let png = BASE64
            .decode(data.as_str().expect("screenshot is a base64 string"))
            .expect("screenshot decodes as base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = dir.join(file);
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("screenshot [{}]: {}", self.name, path.display());
        path
    }
}

impl Drop for Page<'_> {
    fn drop(&mut self) {
        // Ends the browser cleanly; the driver's process-group kill is the
        // backstop. Errors are ignored: this may run during a panic.
        let url = format!("{}/session/{}", self.driver.base, self.id);
        let _ = self
            .driver
            .agent
            .delete(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .call();
    }
}

/// Records every animation on the page (CSS animations and transitions and
/// Web Animations alike: `document.getAnimations()` holds them all while
/// they run), looking in every animation frame: a pulse lasts over a
/// second, a frame a sixtieth. Each is recorded once, as the region of the
/// map mark it moves, or "-". Installing it again starts a new record.
const MAP_PROBE: &str = r##"
    const probe = window.mapProbe = { animated: [], frames: 0 };
    const seen = new WeakSet();
    const look = () => {
        if (window.mapProbe !== probe) return;
        probe.frames += 1;
        for (const animation of document.getAnimations()) {
            if (seen.has(animation)) continue;
            seen.add(animation);
            const target = animation.effect ? animation.effect.target : null;
            const mark = target instanceof Element ? target.closest(".map [data-region]") : null;
            probe.animated.push(mark ? mark.dataset.region : "-");
        }
        requestAnimationFrame(look);
    };
    requestAnimationFrame(look);
"##;

/// How long ago, in ms, "Alien landing near <city>, N ms ago" says (or
/// "N s ago", "N min ago", "N h ago", as the page puts older alerts), if
/// `text` is that.
fn alert_delay(text: &str, city: &str) -> Option<u64> {
    relative_ms(text.strip_prefix(&format!("Alien landing near {city}, "))?)
}

/// "42 ms ago" -> 42, "3 s ago" -> 3000, "2 min ago", "1 h ago".
fn relative_ms(text: &str) -> Option<u64> {
    let (n, unit) = text.strip_suffix(" ago")?.split_once(' ')?;
    let n: u64 = n.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(n * scale)
}

/// `target/browser-test/` (or under CARGO_TARGET_DIR).
fn screenshot_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| manifest.join("target"), |d| manifest.join(d));
    target.join("browser-test")
}

/// With SKYWATCH_UPDATE_SCREENSHOTS=1, copies a screenshot into docs/.
fn publish_screenshot(from: &Path, name: &str) {
    if std::env::var_os("SKYWATCH_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        let to = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name);
        std::fs::copy(from, &to)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
        println!("updated {}", to.display());
    }
}

// ---------------------------------------------------------------------------
// Instances
// ---------------------------------------------------------------------------

/// The environment of an instance using `ts` as its Pub/Sub emulator.
fn emulator_env(ts: &PubSubTestServer, alloc: &str, region: &str) -> Vec<(String, String)> {
    let mut env = support::emulator_env(ts.addr(), alloc, region);
    // Watcher counts cross instances within a second, not fifteen.
    env.push(("PRESENCE_INTERVAL_SECS".into(), "1".into()));
    // The test's own clients make a small storm, pressing faster than any
    // person may.
    env.push(("ALERT_BURST".into(), "1000".into()));
    env.push(("ALERTS_PER_SECOND".into(), "1000".into()));
    env.push(("ADDRESS_ALERT_BURST".into(), "1000".into()));
    env.push(("ADDRESS_ALERTS_PER_SECOND".into(), "1000".into()));
    env
}

fn start(envs: &[(String, String)]) -> Server {
    let server = Server::start_owned(envs);
    assert!(
        server.logs().contains("broker: pubsub, "),
        "Pub/Sub was not chosen:\n{}",
        server.logs()
    );
    server
}

/// Waits for the instance's subscription to exist (the event), then for
/// /readyz to say 200 (a bounded poll: nothing announces it).
fn wait_ready(ts: &PubSubTestServer, server: &Server, alloc: &str) {
    let sub = format!("projects/{PROJECT}/subscriptions/ID_{alloc}");
    let found = ts.wait_for(WAIT, |s| s.subscriptions().contains(&sub));
    assert!(
        found,
        "{sub} not created within {WAIT:?}; subscriptions {:?}\n{}",
        ts.subscriptions(),
        server.logs()
    );
    server.wait_ready(WAIT);
}

// ---------------------------------------------------------------------------
// Storms: the test's own clients pressing thousands of times
// ---------------------------------------------------------------------------

/// A client's text frame: masked, as RFC 6455 requires of every client.
fn client_text_frame(text: &str) -> Vec<u8> {
    const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x2e];
    let payload = text.as_bytes();
    let len = u8::try_from(payload.len()).expect("a press fits a short frame");
    assert!(len < 126, "a press fits a short frame");
    let mut frame = vec![0x81, 0x80 | len];
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The `message` of a server message. The server writes it first, so that
/// is read without parsing (thousands a second, in a debug build); anything
/// else is parsed.
fn message_kind(payload: &[u8]) -> Option<String> {
    if let Some(rest) = payload.strip_prefix(br#"{"message":""#) {
        let end = rest.iter().position(|&b| b == b'"')?;
        return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
    }
    let v: Value = serde_json::from_slice(payload).ok()?;
    v["message"].as_str().map(str::to_string)
}

/// Calls `each(opcode, payload)` for every complete server frame (never
/// masked) at the front of `buf`, then removes them: one pass, one move,
/// however many frames a read brought.
fn take_frames(buf: &mut Vec<u8>, mut each: impl FnMut(u8, &[u8])) {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => (
                usize::try_from(u64::from_be_bytes(rest[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        if rest.len() < head + len {
            break;
        }
        each(rest[0] & 0x0f, &rest[head..head + len]);
        at += head + len;
    }
    buf.drain(..at);
}

/// What one of the test's own clients received in a storm.
#[derive(Debug, Default)]
struct Heard {
    alerts: u64,
    /// Every summary's count, with when it arrived.
    summaries: Vec<(Instant, u64)>,
    /// ACCEPTED replies to its own presses.
    accepted: u64,
    /// ERROR replies, as sent.
    refused: Vec<String>,
}

impl Heard {
    fn summarised(&self) -> u64 {
        self.summaries.iter().map(|(_, n)| n).sum()
    }

    fn total(&self) -> u64 {
        self.alerts + self.summarised()
    }

    /// The summaries' counts since the last gap of `gap` or more between
    /// two of them: what a page that ends a storm after such a gap shows as
    /// the last storm.
    fn last_storm(&self, gap: Duration) -> u64 {
        let mut sum = 0;
        let mut previous: Option<Instant> = None;
        for &(at, n) in &self.summaries {
            if previous.is_some_and(|p| at.duration_since(p) >= gap) {
                sum = 0;
            }
            sum += n;
            previous = Some(at);
        }
        sum
    }
}

/// One of the test's own clients in a storm, on a raw socket so that one
/// thread can press while another reads. It must read everything the server
/// sends it (every alert and summary, as any client gets them) or be dropped
/// as a slow client, so its reader reads each message's kind without
/// parsing it (see [`message_kind`]), and parses only summaries.
struct StormClient {
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    heard: Arc<Mutex<Heard>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl StormClient {
    fn connect(addr: SocketAddr) -> StormClient {
        let mut stream = support::raw_connect(addr);
        let response = support::raw_handshake(&mut stream, addr, &[]);
        assert_eq!(response.status, 101, "no WebSocket: {response:?}");
        let mut read = stream.try_clone().expect("clone the socket");
        read.set_read_timeout(Some(POLL)).expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(Mutex::new(Heard::default()));
        let reader = {
            let (stop, heard) = (stop.clone(), heard.clone());
            thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match read.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            continue;
                        }
                        Err(_) => break,
                    }
                    let mut heard = heard.lock().unwrap();
                    take_frames(&mut buf, |opcode, payload| {
                        if opcode != 1 {
                            return;
                        }
                        match message_kind(payload).as_deref() {
                            Some("ALIEN_LANDING") => heard.alerts += 1,
                            Some("ALIEN_LANDING_SUMMARY") => {
                                let v: Value = serde_json::from_slice(payload).expect("JSON");
                                let n = v["count"].as_u64().expect("a summary's count");
                                heard.summaries.push((Instant::now(), n));
                            }
                            Some("ACCEPTED") => heard.accepted += 1,
                            Some("ERROR") => heard
                                .refused
                                .push(String::from_utf8_lossy(payload).into_owned()),
                            _ => {}
                        }
                    });
                }
            })
        };
        StormClient {
            stream,
            stop,
            heard,
            reader: Some(reader),
        }
    }

    /// Waits until the server has accepted `n` presses in all; panics on a
    /// refusal or after `timeout`.
    fn wait_accepted(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let heard = self.heard.lock().unwrap();
                if let Some(first) = heard.refused.first() {
                    panic!(
                        "{} presses refused, the first: {first}",
                        heard.refused.len()
                    );
                }
                if heard.accepted >= n {
                    assert_eq!(heard.accepted, n, "more presses accepted than sent");
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} of {n} presses accepted within {timeout:?}",
                    heard.accepted
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until everything sent so far is read (the server sends nothing
    /// for `quiet`), then stops reading and returns what was heard.
    fn finish(mut self, quiet: Duration) -> Heard {
        let total = |c: &StormClient| {
            let heard = c.heard.lock().unwrap();
            (heard.total(), heard.accepted)
        };
        let mut last = total(&self);
        loop {
            thread::sleep(quiet);
            let now = total(&self);
            if now == last {
                break;
            }
            last = now;
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("a reader panicked");
        }
        std::mem::take(&mut *self.heard.lock().unwrap())
    }
}

impl Drop for StormClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Clients pressing on and on, a few times every round, until stopped (at
/// most for `WAIT`).
struct Pressing {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    _clients: Vec<StormClient>,
}

impl Pressing {
    /// Presses a round's worth that keeps a storm going (past ten alerts
    /// a second) without loading the machine.
    const PER_ROUND: usize = 5;

    fn start(clients: Vec<StormClient>) -> Pressing {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = clients
            .iter()
            .map(|c| c.stream.try_clone().expect("clone the socket"))
            .map(|mut stream| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let until = Instant::now() + WAIT;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let batch =
                            client_text_frame(&support::alert(now_ms())).repeat(Self::PER_ROUND);
                        if stream.write_all(&batch).is_err() {
                            return;
                        }
                        thread::sleep(STORM_ROUND_GAP);
                    }
                })
            })
            .collect();
        Pressing {
            stop,
            threads,
            _clients: clients,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("a pressing thread panicked");
        }
    }
}

/// Now, in ms since the epoch, as alerts carry it.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// How often [`RendererCpu`] reads the renderer's CPU time.
const CPU_SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// One thread's CPU time as sampled: (ms since the epoch, CPU ns so far).
type CpuSamples = Vec<(f64, u64)>;

/// The CPU time of Chromium's renderer main threads (the page's JavaScript,
/// style, layout and paint), read from /proc every `CPU_SAMPLE_EVERY` while
/// a storm runs. On a 2-core machine shared with the server, the test's own
/// clients and other builds, a task's wall-clock time says as much about the
/// scheduler as about the page; the CPU time it used says what the page did.
struct RendererCpu {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<CpuSamples>>>,
}

impl RendererCpu {
    /// Waits (at most `WAIT`) until the renderers in process group `group`
    /// are quiet: a page just loaded keeps its renderer busy for a moment
    /// (fonts, first frames), which is no part of what a storm costs.
    fn wait_quiet(group: u32) {
        let used = || -> u64 {
            renderer_pids(group)
                .into_iter()
                .filter_map(main_thread_cpu_ns)
                .sum()
        };
        let deadline = Instant::now() + WAIT;
        let mut before = used();
        loop {
            thread::sleep(Duration::from_millis(250));
            let now = used();
            // Under 5% of one core over the last quarter second.
            if now.saturating_sub(before) < 12_500_000 || Instant::now() >= deadline {
                return;
            }
            before = now;
        }
    }

    /// Starts sampling every renderer process in chromedriver's process
    /// group `group` (one per open page, and maybe a spare).
    fn start(group: u32) -> RendererCpu {
        let pids = renderer_pids(group);
        assert!(
            !pids.is_empty(),
            "no Chromium renderer in process group {group}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut samples = vec![Vec::new(); pids.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (pid, samples) in pids.iter().zip(samples.iter_mut()) {
                        if let Some(ns) = main_thread_cpu_ns(*pid) {
                            samples.push((epoch_ms(), ns));
                        }
                    }
                    thread::sleep(CPU_SAMPLE_EVERY);
                }
                samples
            })
        };
        RendererCpu {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns the samples (epoch ms, CPU ns) of the renderer that
    /// worked the most: the page's.
    fn finish(mut self) -> CpuSamples {
        self.stop.store(true, Ordering::Relaxed);
        let all = self
            .thread
            .take()
            .expect("not finished twice")
            .join()
            .expect("the CPU sampler panicked");
        let used = |s: &CpuSamples| match (s.first(), s.last()) {
            (Some(a), Some(b)) => b.1 - a.1,
            _ => 0,
        };
        all.into_iter().max_by_key(used).unwrap_or_default()
    }
}

impl Drop for RendererCpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The CPU time (ms) the sampled thread used from `from` to `to` (epoch
/// ms), reading the samples around each end as if the CPU time between them
/// was spent evenly: off by at most what was used in the `CPU_SAMPLE_EVERY`
/// around each end (more where the sampler itself waited for a CPU). `None`
/// where the samples do not cover the span.
fn cpu_within(samples: &[(f64, u64)], from: f64, to: f64) -> Option<f64> {
    let at = |t: f64| -> Option<f64> {
        let after = samples.iter().position(|s| s.0 >= t)?;
        let (t1, c1) = (samples[after].0, samples[after].1 as f64);
        if after == 0 {
            return (t1 == t).then_some(c1);
        }
        let (t0, c0) = (samples[after - 1].0, samples[after - 1].1 as f64);
        Some(c0 + (c1 - c0) * (t - t0) / (t1 - t0))
    };
    Some((at(to)? - at(from)?) / 1e6)
}

/// The pids of the Chromium renderers in process group `group`.
fn renderer_pids(group: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may
            // hold spaces and parentheses, so count from the last ')'.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let pgrp = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                .and_then(|g| g.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            pgrp == Some(group) && contains(&cmdline, b"--type=renderer")
        })
        .collect()
}

/// The CPU time (ns) the main thread of process `pid` has used: the first
/// field of its schedstat.
fn main_thread_cpu_ns(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Now, in ms since the epoch (the clock of `performance.timeOrigin`).
fn epoch_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// Installed in the page just before a storm (its arguments: when to press
/// the page's button, in ms from now); the page itself is not changed. It
/// records, without any WebDriver call during the storm: Long Tasks API
/// entries (and, to tell what ran, long animation frames that blocked),
/// every sum-up in the reports live region, the feedback and storm lines and
/// the map's caption as they change, the longest the alert list got, and
/// when the tally line last changed.
const PROBE: &str = r#"
    const [pressAfter] = arguments;
    const probe = window.stormProbe = {
        longTasks: [], blockingFrames: [], announcements: [], feedback: [], storm: [], captions: [],
        maxListed: 0, firstListed: null, tally: null, installed: performance.now(),
        timeOrigin: performance.timeOrigin,
    };
    new PerformanceObserver((entries) => {
        for (const e of entries.getEntries()) {
            probe.longTasks.push({ start: e.startTime, duration: e.duration });
        }
    }).observe({ type: "longtask" });
    if (PerformanceObserver.supportedEntryTypes.includes("long-animation-frame")) {
        new PerformanceObserver((entries) => {
            for (const e of entries.getEntries()) {
                if (e.blockingDuration === 0) continue;
                probe.blockingFrames.push({
                    start: Math.round(e.startTime), duration: Math.round(e.duration),
                    blocking: Math.round(e.blockingDuration),
                    scripts: e.scripts.map((s) => `${s.invoker} ${Math.round(s.duration)} ms`),
                });
            }
        }).observe({ type: "long-animation-frame" });
    }
    const watch = (id, record) => {
        const el = document.getElementById(id);
        new MutationObserver(() => record(el, performance.now()))
            .observe(el, { childList: true, characterData: true, subtree: true, attributes: true });
    };
    watch("reports", (el, at) => probe.announcements.push({ at, text: el.textContent }));
    watch("feedback", (el, at) => probe.feedback.push({ at, text: el.textContent }));
    watch("map-landings", (el, at) => probe.captions.push({ at, text: el.textContent }));
    watch("tally", (el, at) => { probe.tally = { at, text: el.textContent }; });
    watch("storm", (el, at) => {
        const text = el.hidden ? "" : el.textContent;
        const state = el.dataset.state || "";
        const last = probe.storm[probe.storm.length - 1];
        if (!last || last.text !== text || last.state !== state) probe.storm.push({ at, state, text });
    });
    const list = document.getElementById("alerts");
    new MutationObserver(() => {
        probe.maxListed = Math.max(probe.maxListed, list.children.length);
        if (probe.firstListed === null) probe.firstListed = performance.now();
    }).observe(list, { childList: true });
    setTimeout(() => document.getElementById("alert").click(), pressAfter);
    return PerformanceObserver.supportedEntryTypes.includes("longtask");
"#;

/// Waits in the page (one WebDriver call, no polling from outside) until
/// its tally shows `expected` reports and its sum-ups have spoken of them
/// all, or `timeout` ms pass; returns the probe's record.
const PROBE_WAIT: &str = r#"
    const [expected, timeout, done] = arguments;
    const probe = window.stormProbe;
    const leading = (text) => Number((text.split(" ")[0] || "").replaceAll(",", ""));
    const announced = () => probe.announcements.reduce((sum, a) =>
        sum + (a.text.startsWith("Alien landing near ") ? 1 : leading(a.text)), 0);
    const started = performance.now();
    const check = () => {
        const tally = probe.tally === null ? 0 : leading(probe.tally.text);
        if (probe.complete === undefined && tally >= expected) probe.complete = probe.tally.at;
        if ((probe.complete !== undefined && announced() >= expected)
            || performance.now() - started > timeout) {
            done(probe);
        } else {
            setTimeout(check, 100);
        }
    };
    check();
"#;

/// How many reports one sum-up of the reports live region speaks of:
/// "12 reports: ..." or one alert's own words.
fn announced_count(text: &str) -> u64 {
    if text.starts_with("Alien landing near ") {
        1
    } else {
        leading_count(text).unwrap_or_else(|| panic!("not a sum-up of reports: {text:?}"))
    }
}

/// The storm test's presses: 10,000 from 2 clients, in rounds 100 ms apart.
const STORM_CLIENTS: usize = 2;
const STORM_ROUND_GAP: Duration = Duration::from_millis(100);
const STORM_PRESSES: usize = 10_000;
/// When the page's own button is pressed, after the storm began.
const STORM_PAGE_PRESS_MS: u64 = 300;
/// The Long Tasks API's threshold: any task of 50 ms or more is reported.
/// It is wall-clock time; the test fails a long task that also used this
/// much CPU time on the page's main thread (see [`RendererCpu`]).
const LONG_TASK_MS: f64 = 50.0;
/// The page's promise to screen readers: one sum-up at most every 5 s
/// (measured here a microtask after each change, so within 1 ms)...
const ANNOUNCE_EVERY_MS: f64 = 5_000.0;
/// ...and the first report after a quiet spell within about a second (it
/// waits 500 ms to gather a burst).
const FIRST_ANNOUNCE_WITHIN_MS: f64 = 1_500.0;
/// The map's caption: changed within a second of the first report after a
/// quiet spell (issue 15), then at most every ANNOUNCE_EVERY_MS.
const FIRST_CAPTION_WITHIN_MS: f64 = 1_000.0;

/// One storm against one local instance, with a page open on it: 10,000
/// presses from the test's own clients in `rounds` rounds 100 ms apart, and
/// one from the page. `storm_rate` is STORM_ALERTS_PER_SECOND (None: the
/// server's default). Checks what the page showed and how it ran; returns
/// its final view.
fn storm_run(driver: &Driver, name: &'static str, storm_rate: Option<&str>, rounds: usize) -> View {
    let limit = (STORM_PRESSES * 2).to_string();
    let mut env = vec![
        ("FLY_REGION", "syd"),
        // The test's clients press far faster than any person may.
        ("ALERT_BURST", limit.as_str()),
        ("ALERTS_PER_SECOND", limit.as_str()),
        ("ADDRESS_ALERT_BURST", limit.as_str()),
        ("ADDRESS_ALERTS_PER_SECOND", limit.as_str()),
    ];
    if let Some(rate) = storm_rate {
        env.push(("STORM_ALERTS_PER_SECOND", rate));
    }
    let server = Server::start(&env);
    let page = driver.open(name, DESKTOP);
    page.goto(&format!("http://{}/", server.addr));
    page.wait_connected("in Sydney", WAIT);
    // The pressers, and a client that only listens: what everyone was sent.
    let listener = StormClient::connect(server.addr);
    let pressers: Vec<StormClient> = (0..STORM_CLIENTS)
        .map(|_| StormClient::connect(server.addr))
        .collect();
    RendererCpu::wait_quiet(driver.child.id());
    let cpu = RendererCpu::start(driver.child.id());
    let has_long_tasks = page.cmd(
        "POST",
        "/execute/sync",
        Some(&json!({ "script": PROBE, "args": [STORM_PAGE_PRESS_MS] })),
    );
    assert_eq!(
        has_long_tasks, true,
        "[{name}] this Chromium has no Long Tasks API"
    );

    // The storm: every client presses STORM_PRESSES / (clients * rounds)
    // times a round, on its own thread. The page presses too (the probe
    // clicks its button), in the middle of it.
    let per_round = STORM_PRESSES / (STORM_CLIENTS * rounds);
    assert_eq!(per_round * STORM_CLIENTS * rounds, STORM_PRESSES);
    let started = Instant::now();
    let senders: Vec<_> = pressers
        .iter()
        .map(|p| p.stream.try_clone().expect("clone the socket"))
        .map(|mut stream| {
            thread::spawn(move || {
                for round in 0..rounds {
                    let at = started + STORM_ROUND_GAP * round as u32;
                    thread::sleep(at.saturating_duration_since(Instant::now()));
                    let batch = client_text_frame(&support::alert(now_ms())).repeat(per_round);
                    stream.write_all(&batch).expect("press");
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("a sender panicked");
    }
    let sent = started.elapsed();
    let per_client = (per_round * rounds) as u64;
    for presser in &pressers {
        presser.wait_accepted(per_client, WAIT);
    }
    let accepted = started.elapsed();

    // Every press reaches the page, as an alert or inside a summary's
    // count, and the sum-ups for screen readers speak of them all.
    let expected = STORM_PRESSES as u64 + 1;
    let probe = page.cmd(
        "POST",
        "/execute/async",
        Some(&json!({ "script": PROBE_WAIT, "args": [expected, 25_000] })),
    );
    let waited = started.elapsed();
    let cpu = cpu.finish();
    let heard = listener.finish(Duration::from_millis(500));
    drop(pressers);
    let view = page.view();
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let installed = ms(&probe["installed"]);
    let complete = ms(&probe["complete"]) - installed;
    let texts = |key: &str| -> Vec<(f64, String)> {
        probe[key]
            .as_array()
            .unwrap_or_else(|| panic!("[{name}] no {key} in {probe}"))
            .iter()
            .map(|e| {
                let text = e["text"].as_str().unwrap_or_default().to_string();
                (ms(&e["at"]) - installed, text)
            })
            .collect()
    };
    let feedback = texts("feedback");
    let announcements = texts("announcements");
    let captions = texts("captions");
    let storm = texts("storm");
    // Each long task: when (ms after the storm began), how long (wall
    // clock), and how much CPU time the page's main thread used meanwhile
    // (its wall-clock time where the samples do not cover it).
    let origin = ms(&probe["timeOrigin"]);
    let long_tasks: Vec<(f64, f64, f64)> = probe["longTasks"]
        .as_array()
        .expect("longTasks")
        .iter()
        .map(|t| {
            let (start, wall) = (ms(&t["start"]), ms(&t["duration"]));
            let used = cpu_within(&cpu, origin + start, origin + start + wall).unwrap_or(wall);
            (start - installed, wall, used)
        })
        .collect();
    let busy =
        cpu_within(&cpu, origin + installed, origin + installed + complete).unwrap_or(f64::NAN);
    println!(
        "[{name}] presses sent in {sent:?}, all accepted after {accepted:?}; the page \
         counted all {expected} {complete:.0} ms after the storm began (probe back after \
         {waited:?}); a plain client heard {} alerts and {} summaries counting {}",
        heard.alerts,
        heard.summaries.len(),
        heard.summarised(),
    );
    println!(
        "[{name}] the page's main thread used {busy:.0} ms of CPU in those {complete:.0} ms; \
         long tasks (start, wall-clock ms, CPU ms): {long_tasks:.0?}; blocking frames: {}; \
         longest list {}; feedback {feedback:.0?}; sum-ups {announcements:.0?}; \
         map captions {captions:.0?}",
        probe["blockingFrames"], probe["maxListed"],
    );
    assert_eq!(
        heard.total(),
        expected,
        "[{name}] the server lost presses, or a client"
    );
    assert!(
        probe["complete"].is_f64() || probe["complete"].is_u64(),
        "[{name}] the page did not count {expected} reports: {view:#?}"
    );
    assert_eq!(view.reports(), Some(expected), "[{name}] {view:#?}");
    assert!(
        view.alerts.len() <= 50,
        "[{name}] the list is not bounded: {} alerts",
        view.alerts.len()
    );

    // "Sent" once the server accepted the page's own press.
    assert!(
        feedback.iter().any(|(_, text)| text.starts_with("Sent")),
        "[{name}] the page's press was not confirmed: {feedback:?}"
    );
    // (b) The list stayed bounded all along.
    assert!(
        probe["maxListed"].as_u64().unwrap_or(u64::MAX) <= 50,
        "[{name}] the list grew past 50: {}",
        probe["maxListed"]
    );
    // (c) No long task of the page's own making: none that used 50 ms of
    // CPU time (one stretched past 50 ms of wall-clock time by other
    // processes on the machine is reported above, not failed).
    let worst = long_tasks.iter().map(|t| t.2).fold(0.0, f64::max);
    assert!(
        worst < LONG_TASK_MS,
        "[{name}] a long task used {worst:.0} ms of CPU: {long_tasks:.0?}"
    );
    // (d) The sum-ups spoke of every report, at most one every 5 s, the
    // first one soon after the storm's first alert showed.
    let spoken: u64 = announcements.iter().map(|(_, t)| announced_count(t)).sum();
    assert_eq!(spoken, expected, "[{name}] sum-ups {announcements:?}");
    for pair in announcements.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= ANNOUNCE_EVERY_MS - 1.0,
            "[{name}] two sum-ups {:.0} ms apart: {announcements:?}",
            pair[1].0 - pair[0].0
        );
    }
    let first_listed = ms(&probe["firstListed"]) - installed;
    assert!(
        announcements[0].0 - first_listed <= FIRST_ANNOUNCE_WITHIN_MS,
        "[{name}] the first sum-up came {:.0} ms after the first alert showed",
        announcements[0].0 - first_listed
    );
    // (e) The map: its caption said so within a second of the first alert
    // showing, then changed at most every 5 s, and ends on the whole storm;
    // one mark, Sydney's, at full size (the busiest region's).
    assert!(
        captions
            .first()
            .is_some_and(|(at, _)| at - first_listed <= FIRST_CAPTION_WITHIN_MS),
        "[{name}] the map's caption came late: first alert shown at {first_listed:.0} ms, \
         captions {captions:.0?}"
    );
    for pair in captions.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= ANNOUNCE_EVERY_MS - 1.0,
            "[{name}] the map's caption changed twice {:.0} ms apart: {captions:.0?}",
            pair[1].0 - pair[0].0
        );
    }
    let whole = format!(
        "Landings in the last minute: {} near Sydney.",
        thousands(expected)
    );
    let mapped = page.wait_for("the whole storm in the map's caption", WAIT, |v| {
        v.map_landings == whole
    });
    assert!(
        mapped.marks.keys().eq(["syd"]) && mapped.marks["syd"] == 90.0,
        "[{name}] the map's marks: {:?}",
        mapped.marks
    );

    if heard.summaries.is_empty() {
        assert_eq!(view.storm, "", "[{name}] a storm line without summaries");
        return view;
    }
    // (a) While it lasted: "N more reports in the last second: Sydney N",
    // never more than the summaries brought.
    let live: Vec<&String> = storm
        .iter()
        .filter(|(_, text)| text.contains("in the last second"))
        .map(|(_, text)| text)
        .collect();
    assert!(!live.is_empty(), "[{name}] no live storm line: {storm:?}");
    for text in &live {
        let n = leading_count(text).unwrap_or_else(|| panic!("[{name}] {text:?}"));
        let n_text = thousands(n);
        assert!(
            **text == format!("{n_text} more reports in the last second: Sydney\u{a0}{n_text}")
                && n <= heard.summarised(),
            "[{name}] the live storm line: {text:?}"
        );
    }
    // Once over, the storm's total stays, quietly. The page ends a storm
    // when no summary arrived for a second; the server sends one every
    // 200 ms while it lasts, so unless the machine stalled for a second,
    // the page saw one storm, and its total is every summary's.
    let view = page.wait_for("the storm to be over", WAIT, |v| v.storm_state == "over");
    let over = view
        .storm
        .strip_prefix("Storm over at ")
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(_, rest)| leading_count(rest))
        .unwrap_or_else(|| panic!("[{name}] the storm line once over: {:?}", view.storm));
    assert!(
        view.storm
            .ends_with(&format!(". Sydney\u{a0}{}", thousands(over))),
        "[{name}] the storm line once over: {:?}",
        view.storm
    );
    assert_eq!(
        over,
        heard.last_storm(Duration::from_secs(1)),
        "[{name}] the storm line once over: {:?}; summaries {:?}",
        view.storm,
        heard.summaries
    );
    page.screenshot("storm-over.png");
    view
}

/// 1523 as "1,523".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The issue's end-to-end test: two instances joined through Pub/Sub, a page
/// on each; an alert from one shows on both; an instance that stops and
/// starts again gets its page back without anyone reloading it.
#[test]
fn alerts_cross_instances_and_a_restarted_instance_gets_its_page_back() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let ts = PubSubTestServer::start(Options::default()).expect("start pubsub-test-server");
    let env_a = emulator_env(&ts, "browser-a", "ams");
    let env_b = emulator_env(&ts, "browser-b", "syd");
    let a = start(&env_a);
    let mut b = start(&env_b);
    wait_ready(&ts, &a, "browser-a");
    wait_ready(&ts, &b, "browser-b");

    let page1 = driver.open("page 1 (desktop, instance A)", DESKTOP);
    let page2 = driver.open("page 2 (phone, instance B)", PHONE);
    page1.goto(&format!("http://{}/", a.addr));
    page2.goto(&format!("http://{}/", b.addr));
    page1.wait_connected("in Amsterdam", WAIT);
    page2.wait_connected("in Sydney", WAIT);
    assert!(
        page1.view().alerts.is_empty(),
        "a new page shows old alerts"
    );
    // Each instance counts its own page and hears of the other's.
    for page in [&page1, &page2] {
        page.wait_for("the watcher count", WAIT, |v| {
            v.watchers == "2 watchers in 2 regions"
        });
    }

    // Press on page 1: both pages show the alert, naming A's city.
    page1.press();
    page1.wait_alerts(1, "Amsterdam");
    let view = page2.wait_alerts(1, "Amsterdam");
    let delay = alert_delay(&view.alerts[0], "Amsterdam").expect("checked by wait_alerts");
    assert!(
        delay < WAIT.as_millis() as u64,
        "an alert of this moment shows as {delay} ms ago"
    );

    // Stop B: page 2 says it is reconnecting, with the button disabled.
    let b_port = b.addr.port();
    b.signal(libc::SIGTERM);
    let view = page2.wait_for("the reconnecting state", WAIT, |v| {
        v.state == "reconnecting" && v.status.contains("Reconnecting in ") && v.button_disabled
    });
    assert!(
        view.status.ends_with(" s…"),
        "countdown not in seconds: {view:#?}"
    );
    page2.screenshot("phone-reconnecting.png");
    let status = b
        .wait_exit(EXIT_WAIT)
        .unwrap_or_else(|| panic!("B still running {EXIT_WAIT:?} after SIGTERM"));
    assert!(status.success(), "B exited with {status}\n{}", b.logs());
    drop(b);

    // Start B again on the same port: page 2 reconnects by itself.
    let mut env_b2 = env_b.clone();
    env_b2.push(("PORT".into(), b_port.to_string()));
    let b2 = start(&env_b2);
    assert_eq!(b2.addr.port(), b_port, "B came back on another port");
    wait_ready(&ts, &b2, "browser-b");
    page2.wait_connected("in Sydney", RECONNECT_WAIT);
    // Page 2 came back naming the last alert it saw; the restarted B never
    // saw it, so the page says some alerts may have been missed.
    page2.wait_for("the missed-alerts notice", WAIT, |v| {
        v.missed.contains("may have been missed")
    });

    // The next alert reaches page 2 through the restarted instance, and an
    // alert from page 2 reaches page 1.
    page1.press();
    page1.wait_alerts(2, "Amsterdam");
    page2.wait_alerts(2, "Amsterdam");
    page2.press();
    page1.wait_alerts(3, "Sydney");
    page2.wait_alerts(3, "Sydney");

    // A small storm on both instances at once: the test's own clients press
    // on A and on B until both pages show the storm line, naming both
    // regions, and the screenshots are taken.
    let pressing = Pressing::start(vec![
        StormClient::connect(a.addr),
        StormClient::connect(b2.addr),
    ]);
    for page in [&page1, &page2] {
        page.wait_for("a storm line from both regions", WAIT, |v| {
            v.storm_state == "live"
                && v.storm.contains("more reports in the last second: ")
                && v.storm.contains("Amsterdam\u{a0}")
                && v.storm.contains("Sydney\u{a0}")
        });
    }

    // Phone-sized: nothing wider than the screen, the whole button on it.
    let fits = page2.eval(
        r#"const b = document.getElementById("alert").getBoundingClientRect();
           return document.documentElement.scrollWidth <= window.innerWidth
               && b.left >= 0 && b.right <= window.innerWidth;"#,
    );
    assert_eq!(fits, true, "the page does not fit a phone-sized screen");

    // Screenshots of the final state, in the storm; the phone's scrolled to
    // its alerts, where the storm line is.
    page2.eval(
        r#"const alerts = document.getElementById("alerts-heading");
           window.scrollTo(0, alerts.getBoundingClientRect().top + window.scrollY - 16);
           return true;"#,
    );
    page1.screenshot("desktop.png");
    page2.screenshot("phone.png");
    pressing.stop();
}

/// One instance in local mode: "your machine", rate-limit feedback, region
/// codes to cities, server text shown as text, the reconnect backoff's range.
#[test]
fn local_page_names_regions_reports_refusals_and_shows_text_as_text() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let page = driver.open("local page", DESKTOP);

    // No FLY_REGION: the region is LOCAL_REGION, shown as "your machine".
    // A burst of 1 at a rate that will not refill during the test: the
    // second press is refused.
    let local = Server::start(&[("ALERT_BURST", "1"), ("ALERTS_PER_SECOND", "0.001")]);
    page.goto(&format!("http://{}/", local.addr));
    let view = page.wait_connected("on your machine", WAIT);
    let announced = page.eval(r#"return document.getElementById("announcer").textContent;"#);
    assert_eq!(
        announced,
        json!(view.status),
        "the connection was not announced"
    );

    // Keyboard only: Tab reaches the button (the first control on the page)
    // with a visible focus ring, and Enter sends the alert.
    page.keys(&[TAB]);
    let focus = page.eval(
        r#"const b = document.getElementById("alert");
           const style = getComputedStyle(b);
           return [document.activeElement === b, b.matches(":focus-visible"),
                   style.outlineStyle, parseFloat(style.outlineWidth)];"#,
    );
    assert_eq!(focus[0], true, "Tab does not reach the button: {focus}");
    assert_eq!(focus[1], true, "the focus is not visible: {focus}");
    assert!(
        focus[2] == "solid" && focus[3].as_f64().unwrap_or(0.0) >= 2.0,
        "no focus ring: {focus}"
    );
    page.keys(&[ENTER]);
    page.wait_for("the sent confirmation", WAIT, |v| {
        v.feedback.starts_with("Sent")
    });
    page.wait_alerts(1, "your machine");
    page.eval(r#"document.getElementById("feedback").textContent = "";"#);
    page.click("#alert");
    let view = page.wait_for("the rate-limited feedback", WAIT, |v| {
        v.feedback.starts_with("Rate-limited")
    });
    assert_eq!(view.alerts.len(), 1, "a refused alert was shown: {view:#?}");
    assert!(!view.button_disabled, "{view:#?}");

    // Another client's timestamp is whatever it chose: the largest one the
    // server accepts is beyond what a JavaScript Date holds, and shows as
    // "just now" rather than breaking the page.
    let mut other = connect_ready(local.addr);
    other.send_alert(9_007_199_254_740_991);
    let view = page.wait_alerts(2, "your machine");
    let ago = alert_delay(&view.alerts[0], "your machine").expect("checked by wait_alerts");
    assert!(
        ago < WAIT.as_millis() as u64,
        "a far-future timestamp is not \"just now\": {view:#?}"
    );
    other.close();

    // Fly region codes to cities; an unknown code shows as it is.
    let places = page.eval(
        r#"return ["ams", "syd", "sin", "lax", "dfw", "iad", "lhr", "nrt", "yyz", "LOCAL_REGION", "xyz"].map(place);"#,
    );
    assert_eq!(
        places,
        json!([
            "Amsterdam",
            "Sydney",
            "Singapore",
            "Los Angeles",
            "Dallas",
            "Ashburn",
            "London",
            "Tokyo",
            "Toronto",
            "your machine",
            "xyz"
        ])
    );

    // The words of the sum-ups for screen readers (at most five places by
    // name), and of relative times.
    let words = page.eval(
        r#"return [
            sumUp(12, new Map([["syd", 10], ["ams", 2]])),
            sumUp(1, new Map([["LOCAL_REGION", 1]])),
            sumUp(1523, new Map([["syd", 1200], ["ams", 323]])),
            sumUp(7, new Map([["a", 1], ["b", 1], ["c", 1], ["d", 1], ["e", 1], ["f", 2]])),
            ago(42), ago(3500), ago(125000), ago(7300000),
        ];"#,
    );
    assert_eq!(
        words,
        json!([
            "12 reports: 10 from Sydney, 2 from Amsterdam.",
            "Alien landing near your machine.",
            "1,523 reports: 1,200 from Sydney, 323 from Amsterdam.",
            "7 reports: 2 from f, 1 from a, 1 from b, 1 from c, 1 from d, 1 from other places.",
            "42 ms ago",
            "3 s ago",
            "2 min ago",
            "2 h ago"
        ])
    );

    // Full jitter, capped: every delay lies in [0, min(30 s, 1 s * 2^n)],
    // and the delays spread over that whole range.
    let spread = page.eval(
        r#"const out = [];
           for (let n = 0; n < 10; n++) {
               const ds = Array.from({ length: 400 }, () => backoffDelay(n));
               out.push([Math.min(...ds), Math.max(...ds)]);
           }
           return out;"#,
    );
    for (n, range) in spread.as_array().expect("array").iter().enumerate() {
        let ceiling = (1000.0 * 2f64.powi(n as i32)).min(30_000.0);
        let (lo, hi) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
        assert!(
            lo >= 0.0 && hi <= ceiling,
            "backoff {n}: {lo}..{hi} outside 0..{ceiling}"
        );
        assert!(
            lo < ceiling * 0.25 && hi > ceiling * 0.75,
            "backoff {n}: {lo}..{hi} is not jittered over 0..{ceiling}"
        );
    }
    drop(local);

    // The server's region code is set by whoever deploys it, but the page
    // still treats it as text: markup in it stays visible characters.
    let code = r#"<img src=x onerror="document.title='injected'">mars"#;
    // Its summaries name it too: a burst past ten presses a second from
    // another client makes a storm line of it.
    let odd = Server::start(&[
        ("FLY_REGION", code),
        ("ALERT_BURST", "100"),
        ("ALERTS_PER_SECOND", "100"),
        ("ADDRESS_ALERT_BURST", "100"),
        ("ADDRESS_ALERTS_PER_SECOND", "100"),
    ]);
    page.goto(&format!("http://{}/", odd.addr));
    page.wait_connected(&format!("in {code}"), WAIT);
    page.press();
    page.wait_alerts(1, code);
    let mut other = connect_ready(odd.addr);
    for _ in 0..40 {
        other.send_alert(now_ms());
    }
    page.wait_for("a storm line naming the odd region", WAIT, |v| {
        v.storm.contains(&format!("{code}\u{a0}"))
    });
    other.close();
    let injected =
        page.eval(r#"return document.querySelectorAll("img").length + " " + document.title;"#);
    assert_eq!(
        injected,
        json!("0 Skywatch: alien landing alerts"),
        "network text was parsed as HTML"
    );
}

/// Cheap checks on the page as served (index.html with the map's outline
/// spliced in by build.rs): self-contained, and no API that parses strings
/// as HTML.
#[test]
fn page_is_one_self_contained_file_without_html_parsing() {
    let html = include_str!(concat!(env!("OUT_DIR"), "/index.html"));
    assert!(
        html.contains(include_str!("../assets/world-map.svg").trim_end()),
        "the built page lacks the map"
    );
    for api in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "DOMParser",
        "createContextualFragment",
        "eval(",
        "new Function",
    ] {
        assert!(!html.contains(api), "index.html uses {api}");
    }
    // Nothing loaded from another host: every src/href is inline data or an
    // in-page anchor, and there is no external script, style or font.
    for attr in ["src=", "href="] {
        for (i, _) in html.match_indices(attr) {
            let value = html[i + attr.len()..].trim_start_matches(['"', '\'']);
            assert!(
                value.starts_with("data:") || value.starts_with('#'),
                "index.html loads {attr}{}",
                &value[..value.len().min(60)]
            );
        }
    }
    for external in ["@import", "url(", "<script src", "rel=\"stylesheet\""] {
        assert!(!html.contains(external), "index.html has {external}");
    }
    // A real button. The alert list is no live region (in a storm it would
    // talk without pause): a separate one sums up what arrived.
    assert!(html.contains(r#"<button id="alert" type="button""#));
    assert!(html.contains(r#"<ol id="alerts">"#));
    assert!(html.contains(r#"<div id="reports" class="visually-hidden" role="status">"#));
    assert!(
        !html.contains("aria-live"),
        "a region other than #reports talks"
    );
    // And the browser is told so.
    assert!(
        html.contains("default-src 'none'") && html.contains("connect-src 'self'"),
        "index.html lost its Content-Security-Policy"
    );
    // The WebSocket URL follows the page's scheme and host.
    assert!(html.contains(r#"location.protocol === "https:" ? "wss:" : "ws:""#));
    assert!(html.contains("${location.host}/ws"));
}

/// The page's table of regions (`const REGIONS = {` in index.html), one
/// line per region: (code, city, lat, lon). Any other line in it fails the
/// test, so a region cannot be added without its place.
fn page_regions() -> Vec<(String, String, f64, f64)> {
    let html = include_str!("../index.html");
    let start = html
        .find("const REGIONS = {\n")
        .expect("index.html has const REGIONS");
    let table = &html[start..];
    let table =
        &table[table.find('\n').expect("a table") + 1..table.find("\n};").expect("its end")];
    let mut out = Vec::new();
    for line in table.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let entry = (|| {
            let (code, rest) = line.split_once(": { city: \"")?;
            let (city, rest) = rest.split_once("\", lat: ")?;
            let (lat, rest) = rest.split_once(", lon: ")?;
            let lon = rest.strip_suffix(" },")?;
            Some((
                code.to_string(),
                city.to_string(),
                lat.parse().ok()?,
                lon.parse().ok()?,
            ))
        })();
        out.push(entry.unwrap_or_else(|| {
            panic!("not `code: {{ city: \"...\", lat: N, lon: N }},`: {line:?}")
        }));
    }
    out
}

/// Every region the page names has a place on the map: a latitude within
/// the map's crop (84°N to 60°S, assets/README.md) and a longitude.
#[test]
fn every_region_has_a_city_and_a_place_on_the_map() {
    let regions = page_regions();
    assert!(regions.len() >= 30, "only {} regions", regions.len());
    let mut codes = std::collections::BTreeSet::new();
    for (code, city, lat, lon) in &regions {
        assert!(
            code.len() == 3 && code.chars().all(|c| c.is_ascii_lowercase()),
            "{code:?}"
        );
        assert!(codes.insert(code.clone()), "{code} twice");
        assert!(!city.is_empty(), "{code} has no city");
        assert!(
            (-60.0..=84.0).contains(lat) && (-180.0..=180.0).contains(lon),
            "{code} ({city}) at {lat}, {lon} is off the map"
        );
    }
    // The regions the tests run instances in.
    for code in ["ams", "syd", "lax", "sin", "lhr"] {
        assert!(codes.contains(code), "no {code}");
    }
}

/// Where the page's map puts (lat, lon): the projection of
/// assets/make-world-map.mjs, as assets/README.md states it.
fn map_point(lat: f64, lon: f64) -> (f64, f64) {
    (
        (lon + 180.0) * 2000.0 / 360.0,
        (84.0 - lat) * 2000.0 / 360.0,
    )
}

/// Issue "Storms", point 5: 10,000 presses within about a second from the
/// test's own clients while a page is open. With the server's default, all
/// but ten a second reach the page as summaries' counts; then again with
/// STORM_ALERTS_PER_SECOND so high that the page gets them all as alerts.
/// Either way the page shows every report in its counts, keeps a list of at
/// most 50, runs no long task, and sums up for screen readers at most once
/// every 5 s.
#[test]
fn a_storm_shows_as_counts_with_a_bounded_list_and_no_long_tasks() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let view = storm_run(&driver, "storm of summaries", None, 10);
    assert!(view.alerts.len() < 50, "{view:#?}");
    let view = storm_run(&driver, "storm of alerts", Some("100000"), 50);
    assert_eq!(view.alerts.len(), 50, "{view:#?}");
}

// ---------------------------------------------------------------------------
// The live map (issue 15)
// ---------------------------------------------------------------------------

/// Where a region's mark is on a page: its (x, y) in the map's units, read
/// from its `translate(x y)`.
fn mark_position(page: &Page, code: &str) -> (f64, f64) {
    let transform = page.eval(&format!(
        r#"return document.querySelector('#map-marks [data-region="{code}"]')?.getAttribute("transform") ?? "";"#
    ));
    let transform = transform.as_str().unwrap_or_default();
    let numbers: Vec<f64> = transform
        .strip_prefix("translate(")
        .and_then(|t| t.strip_suffix(')'))
        .map(|t| t.split(' ').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    assert_eq!(
        numbers.len(),
        2,
        "[{}] {code}'s mark: transform {transform:?}",
        page.name
    );
    (numbers[0], numbers[1])
}

/// Where the page's region table puts `code` on the map, by the projection
/// as documented (computed here, not by the page).
fn documented_position(code: &str) -> (f64, f64) {
    let (_, _, lat, lon) = page_regions()
        .into_iter()
        .find(|r| r.0 == code)
        .unwrap_or_else(|| panic!("no region {code} in index.html"));
    map_point(lat, lon)
}

/// The `r`s of the marks, each as a share of the largest.
fn radius_shares(view: &View) -> BTreeMap<String, f64> {
    let largest = view.marks.values().copied().fold(0.0, f64::max);
    view.marks
        .iter()
        .map(|(code, r)| (code.clone(), r / largest))
        .collect()
}

/// Issue 15 across three instances joined through Pub/Sub (Amsterdam, Los
/// Angeles, Sydney), with a page on two of them: the watchers show as rings
/// where they are; a press in Amsterdam pulses Amsterdam on both pages, at
/// Amsterdam's place; a storm of different sizes in the three regions sizes
/// their marks by count; the caption names the regions with their counts.
/// Its screenshots, taken in a storm in all three regions, are the README's.
#[test]
fn the_map_shows_where_landings_are_and_who_is_watching() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let ts = PubSubTestServer::start(Options::default()).expect("start pubsub-test-server");
    let regions = [("map-ams", "ams"), ("map-lax", "lax"), ("map-syd", "syd")];
    let instances: Vec<Server> = regions
        .iter()
        .map(|(alloc, region)| start(&emulator_env(&ts, alloc, region)))
        .collect();
    for (server, (alloc, _)) in instances.iter().zip(&regions) {
        wait_ready(&ts, server, alloc);
    }
    let [ams, lax, syd] = [0, 1, 2].map(|i| instances[i].addr);

    let page1 = driver.open("map page 1 (desktop, Amsterdam)", DESKTOP);
    let page2 = driver.open("map page 2 (phone, Sydney)", PHONE);
    page1.goto(&format!("http://{ams}/"));
    page2.goto(&format!("http://{syd}/"));
    page1.wait_connected("in Amsterdam", WAIT);
    page2.wait_connected("in Sydney", WAIT);
    let pages = [&page1, &page2];

    // Who is watching where: a ring in Amsterdam and one in Sydney (none in
    // Los Angeles, where nobody is), and the words for them. Nothing has
    // landed yet.
    for page in pages {
        let view = page.wait_for("watcher rings in Amsterdam and Sydney", WAIT, |v| {
            v.rings.keys().eq(["ams", "syd"])
                && v.map_watching == "People watching: 1 in Amsterdam, 1 in Sydney."
        });
        assert!(view.marks.is_empty(), "[{}] {view:#?}", page.name);
        assert_eq!(
            view.map_landings, "No landings reported in the last minute.",
            "[{}]",
            page.name
        );
        page.watch_animations();
    }

    // A press in Amsterdam pulses Amsterdam, and only Amsterdam, on every
    // page; its mark stands where Amsterdam is.
    page1.press();
    for page in pages {
        let view = page.wait_for("Amsterdam's mark, pulsing", WAIT, |v| {
            v.marks.contains_key("ams") && v.animated.iter().any(|r| r == "ams")
        });
        assert!(
            view.marks.keys().eq(["ams"]) && view.animated.iter().all(|r| r == "ams"),
            "[{}] something else moved: {view:#?}",
            page.name
        );
        let (x, y) = mark_position(page, "ams");
        let (ex, ey) = documented_position("ams");
        assert!(
            (x - ex).abs() < 0.1 && (y - ey).abs() < 0.1,
            "[{}] Amsterdam's mark at {x}, {y}, not {ex:.1}, {ey:.1}",
            page.name
        );
        page.wait_for("the caption naming Amsterdam", WAIT, |v| {
            v.map_landings == "Landings in the last minute: 1 near Amsterdam."
        });
    }

    // A storm sizes the marks by count: 600 presses in Sydney, 200 in Los
    // Angeles, 50 more in Amsterdam, all at once. Each mark's area is its
    // count's share of the busiest, and the caption names them in order.
    let storm = [(syd, 600), (lax, 200), (ams, 50)];
    let pressers: Vec<StormClient> = storm
        .iter()
        .map(|&(addr, _)| StormClient::connect(addr))
        .collect();
    for (presser, &(_, n)) in pressers.iter().zip(&storm) {
        let mut stream = presser.stream.try_clone().expect("clone the socket");
        stream
            .write_all(&client_text_frame(&support::alert(now_ms())).repeat(n))
            .expect("press");
    }
    for (presser, &(_, n)) in pressers.iter().zip(&storm) {
        presser.wait_accepted(n as u64, WAIT);
    }
    let counted =
        "Landings in the last minute: 600 near Sydney, 200 near Los Angeles, 51 near Amsterdam.";
    for page in pages {
        let view = page.wait_for("the storm's counts in the caption", WAIT, |v| {
            v.map_landings == counted
        });
        let shares = radius_shares(&view);
        assert!(
            view.marks["syd"] > view.marks["lax"] && view.marks["lax"] > view.marks["ams"],
            "[{}] marks not sized by count: {view:#?}",
            page.name
        );
        for (code, n) in [("syd", 600.0), ("lax", 200.0), ("ams", 51.0)] {
            let area = (n / 600.0f64).sqrt();
            assert!(
                (shares[code] - area).abs() < 0.02,
                "[{}] {code}'s mark is {:.3} of Sydney's across, not {area:.3}: {view:#?}",
                page.name,
                shares[code]
            );
        }
        assert!(
            ["syd", "lax"]
                .iter()
                .all(|code| view.animated.iter().any(|r| r == code)),
            "[{}] the storm's regions did not pulse: {:?}",
            page.name,
            view.animated
        );
        // The text alternative is the map's description for screen readers.
        let described = page.eval(
            r#"const map = document.getElementById("map");
               return [map.getAttribute("role"), map.getAttribute("aria-label"),
                       document.getElementById(map.getAttribute("aria-describedby")).textContent];"#,
        );
        assert_eq!(described[0], "img", "[{}] {described}", page.name);
        assert!(
            described[2].as_str().unwrap_or_default().contains(counted),
            "[{}] the map's description: {described}",
            page.name
        );
    }
    drop(pressers);

    // The screenshots: a storm going on in all three regions.
    let pressing = Pressing::start(vec![
        StormClient::connect(ams),
        StormClient::connect(lax),
        StormClient::connect(syd),
    ]);
    for page in pages {
        page.wait_for("a storm line from all three regions", WAIT, |v| {
            v.storm_state == "live"
                && ["Amsterdam\u{a0}", "Los Angeles\u{a0}", "Sydney\u{a0}"]
                    .iter()
                    .all(|city| v.storm.contains(city))
        });
    }
    // Phone-sized: the map is as wide as the page's column, no wider than
    // the screen, and keeps its shape.
    let fits = page2.eval(
        r#"const map = document.getElementById("map").getBoundingClientRect();
           const column = document.querySelector("main").getBoundingClientRect();
           return [document.documentElement.scrollWidth <= window.innerWidth,
                   map.left >= 0 && map.right <= window.innerWidth,
                   Math.abs(map.width - column.width) < 1,
                   Math.abs(map.width / map.height - 2.5) < 0.02];"#,
    );
    assert_eq!(
        fits,
        json!([true, true, true, true]),
        "the map does not fit a phone-sized screen"
    );
    page2.eval(
        r#"const map = document.getElementById("map");
           window.scrollTo(0, map.getBoundingClientRect().top + window.scrollY - 16);
           return true;"#,
    );
    let desktop = page1.screenshot("map-desktop.png");
    let phone = page2.screenshot("map-phone.png");
    pressing.stop();
    publish_screenshot(&desktop, "screenshot.png");
    publish_screenshot(&phone, "screenshot-phone.png");
}

/// Records, from its installation on, when the first mark appears on the
/// map (`appeared`, ms) and each later change of a mark's opacity (`fades`,
/// [ms, opacity]).
const FADE_PROBE: &str = r##"
    const probe = window.fadeProbe = { appeared: null, fades: [] };
    const opacities = new WeakMap();
    new MutationObserver((changes) => {
        const at = performance.now();
        for (const change of changes) {
            if (change.type === "childList" && change.addedNodes.length > 0 && probe.appeared === null) {
                probe.appeared = at;
            }
            if (change.type === "attributes" && change.attributeName === "opacity") {
                const opacity = Number(change.target.getAttribute("opacity"));
                const before = opacities.get(change.target);
                opacities.set(change.target, opacity);
                if (before !== undefined && before !== opacity) probe.fades.push([at, opacity]);
            }
        }
    }).observe(document.getElementById("map-marks"), { childList: true, subtree: true, attributes: true });
"##;

/// For every region in the page's table: where the page's own `mapPoint`
/// puts it, and how far from there (in the map's units) the nearest land of
/// the outline is, looking up to 30 units (about 5°) around.
const PLACES_ON_LAND: &str = r##"
    const land = document.querySelector("#map .map-land path");
    const out = {};
    for (const [code, region] of Object.entries(REGIONS)) {
        const [x, y] = mapPoint(region.lat, region.lon);
        let near = null;
        for (let d = 0; d <= 30 && near === null; d += 1) {
            for (let k = 0; k < 32; k++) {
                const a = k * Math.PI / 16;
                if (land.isPointInFill(new DOMPoint(x + d * Math.cos(a), y + d * Math.sin(a)))) {
                    near = d;
                    break;
                }
            }
        }
        out[code] = [x, y, near];
    }
    return out;
"##;

/// Issue 15's other promises: with prefers-reduced-motion nothing on the
/// map moves (no CSS animation or transition, no Web Animation) and marks
/// fade in steps of 10 s, while a pulse comes back once the setting is
/// off; alerts from a server without a region show at no place, "on this
/// machine", and an unknown region "elsewhere", both still listed; every
/// region of the table stands where the documented projection puts it, on
/// (or by) land of the outline.
#[test]
fn the_map_keeps_still_with_reduced_motion_and_places_only_what_it_knows() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let syd = Server::start(&[("FLY_REGION", "syd")]);
    let still = driver.open("map page, reduced motion", DESKTOP);
    still.goto(&format!("http://{}/", syd.addr));
    still.wait_connected("in Sydney", WAIT);
    still.reduce_motion(true);

    // Every region where the projection puts it, near land.
    let places = still.eval(PLACES_ON_LAND);
    let regions = page_regions();
    assert_eq!(places.as_object().map(|o| o.len()), Some(regions.len()));
    for (code, city, lat, lon) in &regions {
        let place = &places[code.as_str()];
        let (x, y) = map_point(*lat, *lon);
        let (px, py) = (place[0].as_f64().unwrap(), place[1].as_f64().unwrap());
        assert!(
            (px - x).abs() < 0.01 && (py - y).abs() < 0.01,
            "{code} ({city}) at {px}, {py} on the page, not {x:.2}, {y:.2}"
        );
        // A coastal city may stand in the sea of a 1:110m outline, but
        // within a few pixels of its coast.
        let near = place[2].as_f64();
        assert!(
            near.is_some_and(|d| d <= 12.0),
            "{code} ({city}) is {near:?} units from land: {place}"
        );
    }

    // A press with reduced motion: the mark shows, nothing moves.
    still.watch_animations();
    still.eval(FADE_PROBE);
    still.press();
    let view = still.wait_for("Sydney's mark", WAIT, |v| {
        v.marks.contains_key("syd")
            && v.map_landings == "Landings in the last minute: 1 near Sydney."
    });
    assert_eq!(view.mark_opacity.get("syd"), Some(&1.0), "{view:#?}");

    // Meanwhile, on another page: the places the map cannot show.
    let page = driver.open("map page, other places", DESKTOP);
    let local = Server::start(&[]);
    page.goto(&format!("http://{}/", local.addr));
    page.wait_connected("on your machine", WAIT);
    page.watch_animations();
    page.press();
    page.wait_alerts(1, "your machine");
    let view = page.wait_for("\"on this machine\" in the caption", WAIT, |v| {
        v.map_landings == "Landings in the last minute: 1 on this machine."
            && v.map_watching == "People watching: 1 on this machine."
    });
    assert!(
        view.marks.is_empty() && view.rings.is_empty() && view.animated.is_empty(),
        "a place on the map for this machine: {view:#?}"
    );
    drop(local);
    let odd = Server::start(&[("FLY_REGION", "xyz")]);
    page.goto(&format!("http://{}/", odd.addr));
    page.wait_connected("in xyz", WAIT);
    page.watch_animations();
    page.press();
    page.wait_alerts(1, "xyz");
    let view = page.wait_for("\"elsewhere\" in the caption", WAIT, |v| {
        v.map_landings == "Landings in the last minute: 1 elsewhere."
            && v.map_watching == "People watching: 1 elsewhere."
    });
    assert!(
        view.marks.is_empty() && view.rings.is_empty() && view.animated.is_empty(),
        "an unknown region has a place on the map: {view:#?}"
    );
    drop(page);

    // Back to the page with reduced motion: nothing on it moved, and no
    // CSS animation or transition applies to anything on the map.
    let moving = still.eval(
        r##"return [document.getAnimations().length, window.mapProbe.frames,
                   Array.from(document.querySelectorAll(".map, .map *"))
                       .map((e) => getComputedStyle(e))
                       .filter((s) => s.animationName !== "none"
                           || s.transitionDuration.split(",").some((d) => parseFloat(d) > 0))
                       .length];"##,
    );
    assert_eq!(moving[0], 0, "animations with reduced motion: {moving}");
    assert_eq!(
        moving[2], 0,
        "CSS animations or transitions on the map: {moving}"
    );
    let view = still.view();
    assert!(
        view.animated.is_empty(),
        "with reduced motion, the map moved: {view:#?}"
    );
    // The probe looked all along (frames come 60 a second).
    assert!(
        moving[1].as_u64().unwrap_or(0) > 30,
        "the probe saw few frames: {moving}"
    );

    // Fading, in steps: the first comes 10 s after the mark appeared (the
    // next fading step after that, at most 10 s later), taking a sixth of
    // the way to faded.
    let fades = still.wait_for_value("the first fading step", Duration::from_secs(35), |page| {
        let probe = page.eval("return window.fadeProbe;");
        (!probe["fades"].as_array()?.is_empty()).then_some(probe)
    });
    let appeared = fades["appeared"].as_f64().expect("the mark appeared");
    let (at, opacity) = (
        fades["fades"][0][0].as_f64().unwrap(),
        fades["fades"][0][1].as_f64().unwrap(),
    );
    assert!(
        at - appeared >= 9_900.0,
        "the mark faded {:.0} ms after it appeared: {fades}",
        at - appeared
    );
    assert!(
        (opacity - (1.0 - 0.75 / 6.0)).abs() < 0.01,
        "the first step: {fades}"
    );

    // Without the setting, a press pulses again: it was the setting that
    // kept the map still.
    still.reduce_motion(false);
    still.press();
    still.wait_for("Sydney pulsing", WAIT, |v| {
        v.animated.iter().any(|r| r == "syd")
    });
}
