//! The docs agree with the code (issue 14): every function ARCHITECTURE.md's
//! "Life of one press" names exists where it says, and every source file the
//! codemap names is there. Renaming a function without the walkthrough, or
//! moving a module without the codemap, fails here.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The text of the section `## {title}` of ARCHITECTURE.md.
fn section(title: &str) -> String {
    let text = read(&Path::new(ROOT).join("ARCHITECTURE.md"));
    let start = text
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section {title:?}"));
    let body = &text[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |i| i + 3);
    body[..end].to_string()
}

/// Every `` `...` `` span of `text`.
fn code_spans(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The source file of a module path (`broker::pubsub` is src/broker/pubsub.rs
/// or src/broker/pubsub/mod.rs).
fn module_file(modules: &[&str]) -> PathBuf {
    let base = Path::new(ROOT).join("src").join(modules.join("/"));
    let file = base.with_extension("rs");
    if file.exists() {
        file
    } else {
        base.join("mod.rs")
    }
}

/// Where `span` (`module::function()`, `module::Type::method()`, or a page
/// function `name()`) is defined, or why it is not.
fn check(span: &str) -> Result<(), String> {
    let path = span.strip_suffix("()").ok_or("not a call")?;
    let parts: Vec<&str> = path.split("::").collect();
    let (name, owners) = parts.split_last().ok_or("empty")?;
    if owners.is_empty() {
        let page = read(&Path::new(ROOT).join("index.html"));
        return match page.contains(&format!("function {name}(")) {
            true => Ok(()),
            false => Err(format!("index.html has no function {name}")),
        };
    }
    let split = owners
        .iter()
        .position(|p| p.starts_with(|c: char| c.is_ascii_uppercase()))
        .unwrap_or(owners.len());
    let (modules, types) = owners.split_at(split);
    let file = module_file(modules);
    if !file.exists() {
        return Err(format!("no module file for {}", modules.join("::")));
    }
    let source = read(&file);
    let defines =
        |text: &str| text.contains(&format!("fn {name}(")) || text.contains(&format!("fn {name}<"));
    let Some(ty) = types.first() else {
        return match defines(&source) {
            true => Ok(()),
            false => Err(format!("{} has no fn {name}", file.display())),
        };
    };
    // A method: defined in one of the type's own impl blocks (an impl
    // starts at a line `impl... Type ... {` and ends at the line `}`).
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in source.lines() {
        if line.starts_with("impl") {
            let header = line.split('{').next().unwrap_or_default();
            let names_type = header
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|word| word == *ty);
            current = names_type.then(String::new);
        } else if line == "}" {
            blocks.extend(current.take());
        } else if let Some(block) = &mut current {
            block.push_str(line);
            block.push('\n');
        }
    }
    if blocks.is_empty() {
        return Err(format!("{} has no impl of {ty}", file.display()));
    }
    match blocks.iter().any(|block| defines(block)) {
        true => Ok(()),
        false => Err(format!(
            "no impl of {ty} in {} has fn {name}",
            file.display()
        )),
    }
}

#[test]
fn every_function_the_life_of_a_press_names_exists() {
    let calls: Vec<String> = code_spans(&section("Life of one press"))
        .into_iter()
        .filter(|span| span.ends_with("()"))
        .collect();
    assert!(
        calls.len() >= 30,
        "the walkthrough names only {} functions: {calls:?}",
        calls.len()
    );
    let missing: Vec<String> = calls
        .iter()
        .filter_map(|span| check(span).err().map(|why| format!("`{span}`: {why}")))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what is not there:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_checker_catches_a_name_that_is_not_there() {
    assert!(check("fanout::run()").is_ok());
    assert!(check("fanout::Hub::take()").is_ok());
    assert!(check("receiveAlert()").is_ok());
    assert!(check("fanout::walk()").is_err());
    assert!(check("fanout::Nobody::take()").is_err());
    // A method of another type of the same module does not count.
    assert!(check("fanout::Client::take()").is_err());
    assert!(check("broker::pubsub::Api::publish()").is_ok());
    assert!(check("broker::pubsub::Pullers::publish()").is_err());
    assert!(check("socket::serve()").is_err());
    assert!(check("noSuchPageFunction()").is_err());
}

#[test]
fn every_source_file_the_codemap_names_exists() {
    let text = read(&Path::new(ROOT).join("ARCHITECTURE.md"));
    let files: Vec<String> = code_spans(&text)
        .into_iter()
        .filter(|span| span.starts_with("src/") && (span.ends_with(".rs") || span.ends_with('/')))
        .collect();
    assert!(
        files.len() >= 20,
        "only {} files named: {files:?}",
        files.len()
    );
    let missing: Vec<&String> = files
        .iter()
        .filter(|file| !Path::new(ROOT).join(file).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names missing files: {missing:?}"
    );
    // And no source file goes unmentioned.
    let mut unnamed = Vec::new();
    for entry in walk(&Path::new(ROOT).join("src")) {
        let relative = entry
            .strip_prefix(ROOT)
            .map(|p| p.to_string_lossy().trim_start_matches('/').to_string())
            .unwrap_or_default();
        let named = files
            .iter()
            .any(|f| relative == *f || (f.ends_with('/') && relative.starts_with(f.as_str())))
            || text.contains(&format!("`{}`", relative.trim_start_matches("src/")));
        if !named {
            unnamed.push(relative);
        }
    }
    assert!(
        unnamed.is_empty(),
        "source files ARCHITECTURE.md does not name: {unnamed:?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Runs `make test` with a stand-in cargo that logs its arguments and
/// answers as `nextest` (is it installed?) and `test` (do the tests pass?)
/// say; returns make's success and the cargo calls.
fn make_test(nextest: bool, tests_pass: bool) -> (bool, Vec<String>) {
    let dir = std::env::temp_dir().join(format!(
        "skywatch-make-{}-{nextest}-{tests_pass}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("calls");
    let _ = std::fs::remove_file(&log);
    let cargo = dir.join("cargo");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\n\
             case \"$1\" in nextest) exit {};; test) exit {};; esac\nexit 0\n",
            log.display(),
            if nextest { 0 } else { 101 },
            if tests_pass { 0 } else { 101 },
        ),
    )
    .expect("write the stand-in cargo");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let status = std::process::Command::new(MAKE)
        .arg("--no-print-directory")
        .arg("test")
        .arg(format!("CARGO={}", cargo.display()))
        .current_dir(ROOT)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run make");
    let calls = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    (status.success(), calls)
}

const MAKE: &str = "make";

/// Whether `make` is here; if not, the Makefile tests say so and skip (CI,
/// which sets SKYWATCH_REQUIRE_TOOLS, fails instead).
fn have_make() -> bool {
    let found = std::process::Command::new(MAKE)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("SKYWATCH_REQUIRE_TOOLS").is_none(),
            "make is not installed"
        );
        println!("SKIPPED: make not installed (apt-get install make)");
    }
    found
}

#[test]
fn make_test_runs_nextest_when_it_is_installed() {
    if !have_make() {
        return;
    }
    let (ok, calls) = make_test(true, true);
    assert!(ok, "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("nextest run --workspace --locked")),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| c.starts_with("test ")), "{calls:?}");
}

#[test]
fn make_test_falls_back_to_cargo_test_without_nextest() {
    if !have_make() {
        return;
    }
    let (ok, calls) = make_test(false, true);
    assert!(ok, "{calls:?}");
    assert!(
        calls.iter().any(|c| c.starts_with("fmt --all --check")),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.starts_with("clippy --workspace")),
        "{calls:?}"
    );
    let tests: Vec<&String> = calls.iter().filter(|c| c.starts_with("test ")).collect();
    assert_eq!(tests.len(), 2, "{calls:?}");
    // Everything but the timing-sensitive tests, then those alone.
    assert!(
        tests[0].contains("--workspace") && tests[0].contains("--skip a_storm_shows_as_counts")
    );
    assert!(
        tests[1].contains("a_ping_flood_cannot_delay") && tests[1].contains("--test-threads=1")
    );
    // Both runs happen, and a failure fails make.
    let (ok, calls) = make_test(false, false);
    assert!(!ok, "make passed though the tests failed: {calls:?}");
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("test ")).count(),
        2,
        "{calls:?}"
    );
}
