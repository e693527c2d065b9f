//! Skywatch: press a button when you see an alien landing, and everyone
//! connected to any instance, anywhere, sees the alert within moments.
//!
//! The whole shape of the server is here: read the configuration, start the
//! broker and the fan-out, start accepting connections, wait for a signal,
//! shut down in order. The server's threads and channels are created below
//! (the acceptor starts a connection thread per connection, in
//! `http::accept_loop`; the Pub/Sub broker starts its own threads, inside
//! `PubSubBroker::start`);
//! ARCHITECTURE.md draws how they connect, and follows one press through
//! them.

mod address;
mod auth;
mod broker;
mod clock;
mod config;
mod connection;
mod fanout;
mod frames;
mod http;
mod limits;
mod log;
mod message;
mod metrics;
mod presence;
mod ratelimit;
mod recovery;
mod storm;
mod unix_http;

use broker::Broker;
use broker::local::LocalBroker;
use broker::pubsub::PubSubBroker;
use config::{BrokerChoice, Config};
use crossbeam_channel::bounded;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Alerts (and heartbeats) waiting for the fan-out thread. When it is full the local broker
/// counts further presses into the next storm summary (`storm::Overflow`);
/// the Pub/Sub puller waits.
const DELIVERY_QUEUE: usize = 1024;
/// Greetings, replies and departures waiting for the fan-out thread.
const EVENT_QUEUE: usize = 4096;
/// Most bytes kept for one client whose socket buffer is full.
const MAX_BACKLOG: usize = 64 * 1024;
/// Clients get this long to answer our close frame at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Everything, broker clean-up included, finishes within this after a signal
/// (Fly's kill_timeout is 5 s).
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);

fn main() -> ExitCode {
    if let Some(code) = handle_arguments() {
        return code;
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("skywatch: {err}");
            return ExitCode::from(2);
        }
    };
    log::set_level(config.log_level);
    raise_open_file_limit();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> Result<(), String> {
    // Registered first, so a signal during start-up is not lost.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|err| format!("cannot install signal handlers: {err}"))?;
    let listener = TcpListener::bind((config.host, config.port))
        .map_err(|err| format!("cannot listen on {}:{}: {err}", config.host, config.port))?;
    // What this machine holds, unless MAX_CONNECTIONS says otherwise.
    let capacity = limits::capacity(match &config.broker {
        BrokerChoice::Local { .. } => 0,
        BrokerChoice::PubSub { .. } => PubSubBroker::MEMORY_RESERVE,
    });
    let max_connections = match config.max_connections {
        Some(n) => n,
        None => {
            info!("{capacity}");
            capacity.max_connections
        }
    };

    // broker --deliveries--> fan-out <--events-- connection threads
    // (the Pub/Sub broker adds its own publisher and puller threads)
    let (deliveries_tx, deliveries_rx) = bounded(DELIVERY_QUEUE);
    let (events_tx, events_rx) = bounded(EVENT_QUEUE);
    let overflow = Arc::new(storm::Overflow::default());

    let (broker, why): (Arc<dyn Broker>, String) = match config.broker {
        BrokerChoice::Local { reason } => (
            Arc::new(LocalBroker::new(deliveries_tx, Arc::clone(&overflow))),
            reason,
        ),
        BrokerChoice::PubSub { settings, reason } => {
            // Room for every client's whole burst at once: a storm is
            // queued, never refused, while Pub/Sub answers.
            let queue_capacity = max_connections.saturating_mul(config.alert_burst as usize);
            let broker = PubSubBroker::start(*settings, queue_capacity, deliveries_tx)
                .map_err(|err| format!("cannot start the Pub/Sub threads: {err}"))?;
            (Arc::new(broker), reason)
        }
    };
    info!("broker: {}, {why}", broker.name());

    let fanout_settings = fanout::Settings {
        limits: fanout::Limits {
            ping_interval: config.ping_interval,
            max_backlog: MAX_BACKLOG,
            slow_client_grace: Duration::from_secs(10),
            // A quarter of every client at its own limit, within what the
            // machine's memory set aside for backlogs.
            max_total_backlog: (max_connections.saturating_mul(MAX_BACKLOG) / 4)
                .min(capacity.backlog_budget as usize)
                .max(MAX_BACKLOG),
        },
        recovery_alerts: config.recovery_alerts,
        storm_alerts_per_second: config.storm_alerts_per_second,
        storm_summary: config.storm_summary,
        overflow,
        presence: config
            .presence_interval
            .map(|interval| fanout::PresenceSettings {
                interval,
                instance: config.instance_id.clone(),
                region: config.region.clone(),
                broker: Arc::clone(&broker),
            }),
    };
    let fanout = std::thread::Builder::new()
        .name("fanout".into())
        .spawn(move || fanout::run(fanout_settings, deliveries_rx, events_rx))
        .map_err(|err| format!("cannot start the fan-out thread: {err}"))?;

    let server = Arc::new(http::Server::new(
        http::HttpSettings {
            allowed_origins: config.allowed_origins.clone(),
            max_connections,
            handshake_timeout: config.handshake_timeout,
            client_ip_header: config.client_ip_header.clone(),
        },
        connection::Context {
            region: config.region.clone(),
            instance_id: config.instance_id.clone(),
            alerts_per_second: config.alerts_per_second,
            alert_burst: config.alert_burst,
            broker: Arc::clone(&broker),
            events: events_tx.clone(),
            greeting: connection::greeting_frame(&config.region),
        },
        address::Addresses::new(address::AddressLimits {
            alerts_per_second: config.address_alerts_per_second,
            alert_burst: config.address_alert_burst,
            control_per_second: config.control_per_second,
            control_burst: (config.control_per_second * 2.0).ceil() as u32,
            max_connections: config.address_max_connections,
            // Every client's address, and as many again that left recently.
            capacity: max_connections.saturating_mul(2).max(64),
        }),
    ));
    // GET /metrics on a listener of its own (METRICS_PORT), never on PORT.
    start_metrics(
        config.host,
        config.metrics_port,
        broker.name(),
        &config.region,
    );

    let address = listener
        .local_addr()
        .map_err(|err| format!("cannot read the bound address: {err}"))?;
    let acceptor = http::Acceptor::spawn(listener, server)
        .map_err(|err| format!("cannot start the acceptor thread: {err}"))?;
    info!(
        "instance {} in region {} listening on http://{address}",
        config.instance_id, config.region
    );

    let signal = signals.forever().next().unwrap_or(SIGTERM);
    let started = Instant::now();
    info!(
        "received {}, shutting down",
        if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        }
    );

    acceptor.stop();
    let _ = events_tx.send(fanout::Event::Shutdown {
        deadline: started + CLOSE_GRACE,
    });
    let _ = fanout.join();
    broker.shutdown(started + SHUTDOWN_BUDGET);
    info!("stopped in {} ms", started.elapsed().as_millis());
    Ok(())
}

/// The metrics thread, when METRICS_PORT is set. Never fatal: an instance
/// without metrics still carries alerts. Never joined: a scrape in progress
/// must not hold up shutdown, and the process's exit ends the thread.
fn start_metrics(host: IpAddr, port: Option<u16>, broker: &'static str, region: &str) {
    let Some(port) = port else {
        info!("metrics: off (METRICS_PORT unset or empty)");
        return;
    };
    let listener = match http::bind_metrics(host, port) {
        Ok(listener) => listener,
        Err(err) => {
            warn!("cannot listen for metrics on port {port}: {err}; metrics off");
            return;
        }
    };
    let address = match listener.local_addr() {
        Ok(a) if a.ip().is_unspecified() && a.is_ipv6() => format!("{a}/metrics (IPv6 and IPv4)"),
        Ok(a) => format!("{a}/metrics"),
        Err(_) => format!("{}/metrics", SocketAddr::from((host, port))),
    };
    let region = region.to_owned();
    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || http::serve_metrics(&listener, broker, &region));
    match spawned {
        Ok(_) => info!("metrics on http://{address}"),
        Err(err) => warn!("cannot start the metrics thread: {err}; metrics off"),
    }
}

/// One open file per client: lift the soft limit to the hard one (see
/// `limits.rs`). Not fatal when it fails; the server then holds fewer clients.
fn raise_open_file_limit() {
    match limits::raise_open_files() {
        Ok(files) if files.now > files.before => {
            info!(
                "open-file limit raised from {} to {}",
                files.before, files.now
            );
        }
        Ok(files) => info!("open-file limit: {}", files.now),
        Err(err) => warn!("cannot raise the open-file limit: {err}"),
    }
}

/// Handles `--help` and `--version`; returns the exit code when the process
/// should not start the server.
fn handle_arguments() -> Option<ExitCode> {
    let argument = std::env::args().nth(1)?;
    match argument.as_str() {
        "-h" | "--help" => {
            print!("{}", config::help());
            Some(ExitCode::SUCCESS)
        }
        "-V" | "--version" => {
            println!("skywatch {}", env!("CARGO_PKG_VERSION"));
            Some(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("skywatch: unknown argument {other:?}; see skywatch --help");
            Some(ExitCode::from(2))
        }
    }
}
