//! The page (index.html, issue 4) in a real browser: Debian's headless
//! Chromium, driven from Rust through chromedriver's W3C WebDriver HTTP API
//! (plain JSON over HTTP, so no npm and no driver crate).
//!
//! The main test joins two instances through `pubsub-test-server`, opens one
//! page on each, presses the button, stops and restarts one instance and
//! checks that its page comes back by itself. Screenshots go to
//! `target/browser-test/` (the test prints the paths); with
//! `SKYWATCH_UPDATE_SCREENSHOTS=1` they are also copied to `docs/`.
//!
//! `chromium` and `chromedriver` are looked up on PATH (Debian:
//! `apt-get install chromium chromium-driver`, which .ci/run does). Where
//! they are missing the browser tests print `SKIPPED: ... not installed` with
//! that command, and fail instead under SKYWATCH_REQUIRE_TOOLS=1, as in CI
//! (`support::tool`).

mod support;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    };
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

    /// Waits until there are `count` alerts, the newest from `city`, each in
    /// the issue's format.
    fn wait_alerts(&self, count: usize, city: &str) -> View {
        let view = self.wait_for(
            &format!("{count} alert(s), the newest from {city}"),
            WAIT,
            |v| v.alerts.len() >= count && alert_delay(&v.alerts[0], city).is_some(),
        );
        assert_eq!(view.alerts.len(), count, "[{}] {view:#?}", self.name);
        for text in &view.alerts {
            assert!(
                text.starts_with("Alien landing near ") && text.ends_with(" ms ago"),
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

/// The N of "Alien landing near <city>, N ms ago", if `text` is that.
fn alert_delay(text: &str, city: &str) -> Option<u64> {
    text.strip_prefix(&format!("Alien landing near {city}, "))?
        .strip_suffix(" ms ago")?
        .parse()
        .ok()
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

    // Phone-sized: nothing wider than the screen, the whole button on it.
    let fits = page2.eval(
        r#"const b = document.getElementById("alert").getBoundingClientRect();
           return document.documentElement.scrollWidth <= window.innerWidth
               && b.left >= 0 && b.right <= window.innerWidth;"#,
    );
    assert_eq!(fits, true, "the page does not fit a phone-sized screen");

    // Screenshots of the final state.
    let desktop = page1.screenshot("desktop.png");
    let phone = page2.screenshot("phone.png");
    publish_screenshot(&desktop, "screenshot.png");
    publish_screenshot(&phone, "screenshot-phone.png");
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
    assert_eq!(view.alerts[0], "Alien landing near your machine, 0 ms ago");
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
    let odd = Server::start(&[("FLY_REGION", code)]);
    page.goto(&format!("http://{}/", odd.addr));
    page.wait_connected(&format!("in {code}"), WAIT);
    page.press();
    page.wait_alerts(1, code);
    let injected =
        page.eval(r#"return document.querySelectorAll("img").length + " " + document.title;"#);
    assert_eq!(
        injected,
        json!("0 Skywatch: alien landing alerts"),
        "network text was parsed as HTML"
    );
}

/// Cheap checks on the file itself: self-contained, and no API that parses
/// strings as HTML.
#[test]
fn page_is_one_self_contained_file_without_html_parsing() {
    let html = include_str!("../index.html");
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
    // A real button; alerts in a live region.
    assert!(html.contains(r#"<button id="alert" type="button""#));
    assert!(html.contains(r#"<ol id="alerts" aria-live="polite""#));
    // And the browser is told so.
    assert!(
        html.contains("default-src 'none'") && html.contains("connect-src 'self'"),
        "index.html lost its Content-Security-Policy"
    );
    // The WebSocket URL follows the page's scheme and host.
    assert!(html.contains(r#"location.protocol === "https:" ? "wss:" : "ws:""#));
    assert!(html.contains("${location.host}/ws"));
}
