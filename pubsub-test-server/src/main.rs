//! `pubsub-test-server [--port N] [--host ADDR] [--pulls-return-immediately]
//! [--pull-fill-wait-ms N]`: runs the Pub/Sub REST test server in emulator mode (no
//! auth) until killed, e.g. for `make demo`, where several local Skywatch instances
//! share it through `PUBSUB_EMULATOR_HOST`, or for benchmarks.
//!
//! * `--port N` (default 0: any free port) and `--host ADDR` (default `127.0.0.1`):
//!   where to listen. The chosen URL is printed to stderr as `listening on URL`.
//! * `--pulls-return-immediately`: every pull answers at once, even an empty one, as
//!   some emulators do ([`Options::pulls_return_immediately`]).
//! * `--pull-fill-wait-ms N` (0-30000): a pull with messages to return is held up to
//!   N ms from its start (less once `maxMessages` are deliverable) to fill its batch,
//!   as the real service may do ([`Options::pull_fill_wait`]). Default 0: answer at
//!   once. Cannot be combined with `--pulls-return-immediately`.
//!
//! Empty pulls are held for 30 s. Bad arguments exit with status 2.

use std::process::ExitCode;
use std::time::Duration;

use pubsub_test_server::{Options, PubSubTestServer};

const USAGE: &str = "\
usage: pubsub-test-server [--port N] [--host ADDR] [--pulls-return-immediately]
                          [--pull-fill-wait-ms N]
  --port N                    port to listen on (default 0: any free port)
  --host ADDR                 address to listen on (default 127.0.0.1)
  --pulls-return-immediately  answer every pull at once, even with no messages
  --pull-fill-wait-ms N       hold a pull that has messages up to N ms (0-30000)
                              from its start to fill its batch (default 0: answer
                              at once)
Prints \"listening on URL\" to stderr once listening; runs until killed.";

/// How long empty pulls are held. The real service holds them for about 90 s; a shorter
/// hold keeps a demo's shutdown quick while still exercising long polling.
const MAX_PULL_HOLD: Duration = Duration::from_secs(30);

/// The longest accepted `--pull-fill-wait-ms`: no pull is held past `MAX_PULL_HOLD`, so
/// a longer fill wait could only be a mistake.
const MAX_FILL_WAIT_MS: u64 = MAX_PULL_HOLD.as_millis() as u64;

/// What the command line asked for.
#[derive(Debug, PartialEq)]
struct Args {
    host: String,
    port: u16,
    pulls_return_immediately: bool,
    pull_fill_wait: Duration,
}

/// `Ok(None)` for `--help`; `Err` carries the message for a bad command line.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        host: "127.0.0.1".to_owned(),
        port: 0,
        pulls_return_immediately: false,
        pull_fill_wait: Duration::ZERO,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--host" => parsed.host = value("--host")?,
            "--port" => {
                let v = value("--port")?;
                parsed.port = v
                    .parse()
                    .map_err(|_| format!("bad --port {v:?}: expected a port number 0-65535"))?;
            }
            "--pulls-return-immediately" => parsed.pulls_return_immediately = true,
            "--pull-fill-wait-ms" => {
                let v = value("--pull-fill-wait-ms")?;
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| *ms <= MAX_FILL_WAIT_MS)
                    .ok_or_else(|| {
                        format!(
                            "bad --pull-fill-wait-ms {v:?}: expected whole milliseconds \
                             0-{MAX_FILL_WAIT_MS} (no pull is held longer than {} s)",
                            MAX_PULL_HOLD.as_secs()
                        )
                    })?;
                parsed.pull_fill_wait = Duration::from_millis(ms);
            }
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    if parsed.pulls_return_immediately && !parsed.pull_fill_wait.is_zero() {
        return Err(
            "--pull-fill-wait-ms has no effect with --pulls-return-immediately \
             (every pull answers at once); give one or the other"
                .to_owned(),
        );
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("pubsub-test-server: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let options = Options {
        max_pull_hold: MAX_PULL_HOLD,
        pulls_return_immediately: args.pulls_return_immediately,
        pull_fill_wait: args.pull_fill_wait,
        ..Options::default()
    };
    let (host, port) = (args.host.as_str(), args.port);
    let server = match PubSubTestServer::start_on((host, port), options) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("pubsub-test-server: cannot listen on {host}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("listening on {}", server.base_url());
    // SIGINT/SIGTERM keep their default action (terminate), which is all a test server
    // holding nothing but memory needs.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn defaults_and_every_flag() {
        let defaults = parse(&[]).unwrap().unwrap();
        assert_eq!(defaults.host, "127.0.0.1");
        assert_eq!(defaults.port, 0);
        assert!(!defaults.pulls_return_immediately);
        assert_eq!(defaults.pull_fill_wait, Duration::ZERO);

        let all = parse(&[
            "--host",
            "0.0.0.0",
            "--port",
            "8085",
            "--pull-fill-wait-ms",
            "250",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            all,
            Args {
                host: "0.0.0.0".into(),
                port: 8085,
                pulls_return_immediately: false,
                pull_fill_wait: Duration::from_millis(250),
            }
        );
        let immediate = parse(&["--pulls-return-immediately", "--port", "1"])
            .unwrap()
            .unwrap();
        assert!(immediate.pulls_return_immediately);
        assert_eq!(immediate.port, 1);
        // A zero fill wait is the default, so it does not conflict.
        assert!(parse(&["--pulls-return-immediately", "--pull-fill-wait-ms", "0"]).is_ok());
        assert_eq!(parse(&["--help"]), Ok(None));
        assert_eq!(parse(&["--port", "1", "-h"]), Ok(None));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (args, expected) in [
            (&["--port"][..], "--port needs a value"),
            (&["--port", "65536"], "bad --port \"65536\""),
            (&["--port", "-1"], "bad --port"),
            (&["--host"], "--host needs a value"),
            (
                &["--pull-fill-wait-ms"],
                "--pull-fill-wait-ms needs a value",
            ),
            (
                &["--pull-fill-wait-ms", "abc"],
                "bad --pull-fill-wait-ms \"abc\"",
            ),
            (&["--pull-fill-wait-ms", "-5"], "bad --pull-fill-wait-ms"),
            (&["--pull-fill-wait-ms", "1.5"], "bad --pull-fill-wait-ms"),
            (&["--pull-fill-wait-ms", "200ms"], "bad --pull-fill-wait-ms"),
            (
                &["--pull-fill-wait-ms", "30001"],
                "bad --pull-fill-wait-ms \"30001\": expected whole milliseconds 0-30000",
            ),
            (&["--pulls-return-immediately=true"], "unexpected argument"),
            (&["--bogus"], "unexpected argument \"--bogus\""),
            (
                &["--pulls-return-immediately", "--pull-fill-wait-ms", "5"],
                "no effect",
            ),
        ] {
            let message = parse(args).expect_err(&format!("{args:?} must be refused"));
            assert!(message.contains(expected), "{args:?}: {message}");
        }
    }
}
