//! `pubsub-test-server [--port N] [--host 127.0.0.1]`: runs the Pub/Sub REST test server
//! in emulator mode (no auth) until killed, e.g. for `make demo`, where several local
//! Skywatch instances share it through `PUBSUB_EMULATOR_HOST`.

use std::process::ExitCode;
use std::time::Duration;

use pubsub_test_server::{Options, PubSubTestServer};

const USAGE: &str = "usage: pubsub-test-server [--port N] [--host 127.0.0.1]";

fn main() -> ExitCode {
    let mut host = "127.0.0.1".to_owned();
    let mut port: u16 = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--host", Some(value)) => host = value,
            ("--port", Some(value)) => match value.parse() {
                Ok(p) => port = p,
                Err(_) => {
                    eprintln!("pubsub-test-server: bad --port {value:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            ("-h" | "--help", _) => {
                eprintln!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("pubsub-test-server: unexpected argument {arg:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    // The real service holds empty pulls for about 90 s; a shorter hold keeps a demo's
    // shutdown quick while still exercising long polling.
    let options = Options {
        max_pull_hold: Duration::from_secs(30),
        ..Options::default()
    };
    let server = match PubSubTestServer::start_on((host.as_str(), port), options) {
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
