//! Configuration, read once at start from the environment.
//!
//! Fly's conventions come first (PORT, FLY_ALLOC_ID, FLY_REGION), then
//! Google's for the broker. Every variable is listed in [`VARIABLES`], which
//! is also what `skywatch --help` prints, so the two cannot drift apart.
//! A bad value stops the server before it binds anything: better a crash loop
//! with a clear message in `fly logs` than an instance running on a guess.

use crate::auth::{Credentials, ServiceAccount, WorkloadIdentity};
use crate::broker::pubsub::PubSubSettings;
use crate::log::Level;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// (name, default, meaning) of every variable the server reads.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "PORT",
        "8080",
        "TCP port to listen on (0 picks a free one; the log says which)",
    ),
    (
        "HOST",
        "0.0.0.0",
        "address to listen on (Fly's proxy needs 0.0.0.0 or ::)",
    ),
    (
        "METRICS_PORT",
        "unset",
        "TCP port of a listener for GET /metrics alone, on HOST (0.0.0.0 or :: meaning IPv6 and IPv4; 0 picks a free port); unset or empty: no metrics",
    ),
    (
        "FLY_ALLOC_ID",
        "random per process",
        "this instance's id, the `sender` of its alerts",
    ),
    (
        "FLY_REGION",
        "LOCAL_REGION",
        "region code shown with this instance's alerts",
    ),
    (
        "ALLOWED_ORIGINS",
        "none",
        "comma-separated extra origins allowed to open /ws, e.g. https://example.com",
    ),
    (
        "MAX_CONNECTIONS",
        "what this machine's memory holds",
        "most WebSocket clients at once; more get HTTP 503 (the log says how the default was derived)",
    ),
    (
        "ALERTS_PER_SECOND",
        "1",
        "per-connection alert rate (decimals allowed)",
    ),
    (
        "ALERT_BURST",
        "5",
        "alerts a connection may send at once before the rate applies",
    ),
    (
        "ADDRESS_ALERTS_PER_SECOND",
        "20",
        "alert rate of one source address, whatever its connections (decimals allowed)",
    ),
    (
        "ADDRESS_ALERT_BURST",
        "300",
        "alerts one source address may send at once: a NAT of a few hundred people pressing together",
    ),
    (
        "ADDRESS_MAX_CONNECTIONS",
        "300",
        "most WebSockets from one source address (IPv6: one /64) at once; more get HTTP 429",
    ),
    (
        "CONTROL_PER_SECOND",
        "10",
        "pings and invalid messages one source address may send per second (burst: twice that); past it, close 1008",
    ),
    (
        "CLIENT_IP_HEADER",
        "unset",
        "request header holding the client's address, set by a proxy you trust (Fly: Fly-Client-IP); unset: the peer address",
    ),
    (
        "STORM_ALERTS_PER_SECOND",
        "10",
        "most individual alerts a client is sent per second; further presses are counted into summaries (0: summaries only)",
    ),
    (
        "STORM_SUMMARY_MS",
        "200",
        "how often presses counted in a storm go out as one ALIEN_LANDING_SUMMARY",
    ),
    (
        "PING_INTERVAL_SECS",
        "30",
        "ping a client idle this long; drop it after another silent interval",
    ),
    (
        "HANDSHAKE_TIMEOUT_SECS",
        "5",
        "drop a connection that has not sent its request by then",
    ),
    (
        "RECOVERY_ALERTS",
        "100",
        "recent messages (alerts and storm summaries) kept for clients that reconnect with ?since= (0 keeps none)",
    ),
    (
        "PRESENCE_INTERVAL_SECS",
        "15",
        "seconds between watcher-count heartbeats to other instances (0 turns presence off)",
    ),
    ("LOG_LEVEL", "info", "error, warn, info or debug"),
    (
        "PUBSUB_EMULATOR_HOST",
        "unset",
        "host:port of a Pub/Sub emulator (plain http, no auth)",
    ),
    (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "unset",
        "path to a service-account key file for Pub/Sub",
    ),
    (
        "GOOGLE_SERVICE_ACCOUNT_JSON",
        "unset",
        "the service-account key's JSON itself (a Fly secret)",
    ),
    (
        "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
        "unset",
        "keyless auth on Fly: the workload identity provider's full name, \
         projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER \
         (needs PUBSUB_PROJECT_ID)",
    ),
    (
        "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
        "unset",
        "keyless auth: act as this service account (its email); unset: as the federated identity",
    ),
    (
        "FLY_API_SOCKET",
        "/.fly/api",
        "the Fly Machine API's Unix socket, which hands out the Machine's OIDC token (keyless auth)",
    ),
    (
        "GOOGLE_STS_ENDPOINT",
        "https://sts.googleapis.com",
        "Security Token Service base URL (keyless auth)",
    ),
    (
        "GOOGLE_IAMCREDENTIALS_ENDPOINT",
        "https://iamcredentials.googleapis.com",
        "IAM Service Account Credentials base URL (keyless auth with impersonation)",
    ),
    (
        "PUBSUB_PROJECT_ID",
        "the key's project_id",
        "Google Cloud project (GOOGLE_CLOUD_PROJECT is also read; keyless auth needs one of them)",
    ),
    (
        "PUBSUB_TOPIC",
        "ALIEN_NOTIFICATIONS",
        "topic shared by all instances",
    ),
    (
        "PUBSUB_ENDPOINT",
        "https://pubsub.googleapis.com",
        "Pub/Sub API base URL (auth kept on)",
    ),
    (
        "PUBSUB_OUTSTANDING_PULLS",
        "4",
        "pull requests kept open at once on this instance's subscription (1 to 16)",
    ),
    (
        "PUBSUB_PUBLISH_TIMEOUT",
        "600",
        "seconds an alert may wait for Pub/Sub to take it (1 to 600); older ones are dropped as history",
    ),
];

/// The key file the original demo read, used when no variable names a key.
const DEFAULT_KEY_FILE: &str = "google-service-account.json";
/// Where a Fly Machine reaches its Machine API.
const DEFAULT_FLY_API_SOCKET: &str = "/.fly/api";

/// Variables whose presence asks for the Pub/Sub broker.
const PUBSUB_VARIABLES: &[&str] = &[
    "PUBSUB_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT_JSON",
    "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
];

#[derive(Debug)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    /// The metrics listener's port; None: no metrics listener.
    pub metrics_port: Option<u16>,
    pub instance_id: String,
    pub region: String,
    /// Normalized origins (`scheme://host[:port]`, lowercase, no default port).
    pub allowed_origins: Vec<String>,
    /// None: derived from this machine's memory at start (`limits.rs`).
    pub max_connections: Option<usize>,
    pub alerts_per_second: f64,
    pub alert_burst: u32,
    pub address_alerts_per_second: f64,
    pub address_alert_burst: u32,
    pub address_max_connections: usize,
    pub control_per_second: f64,
    /// The header a trusted proxy puts the client's address in.
    pub client_ip_header: Option<String>,
    pub storm_alerts_per_second: usize,
    pub storm_summary: Duration,
    pub ping_interval: Duration,
    pub handshake_timeout: Duration,
    pub recovery_alerts: usize,
    /// None when presence is off.
    pub presence_interval: Option<Duration>,
    pub log_level: Level,
    pub broker: BrokerChoice,
}

/// Which broker joins this instance to the others, and why it was chosen.
#[derive(Debug)]
pub enum BrokerChoice {
    Local {
        reason: String,
    },
    PubSub {
        settings: Box<PubSubSettings>,
        reason: String,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}={:?}: {}",
            self.variable, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests need not touch the
    /// process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |name: &'static str| Var {
            name,
            value: lookup(name).filter(|v| !v.is_empty()),
        };
        let port = var("PORT").parse_or(8080, "expected a port number from 0 to 65535")?;
        let config = Config {
            port,
            metrics_port: metrics_port(var("METRICS_PORT"), port)?,
            host: var("HOST").parse_or(IpAddr::from([0, 0, 0, 0]), "expected an IP address")?,
            instance_id: match var("FLY_ALLOC_ID").value {
                Some(id) => id,
                None => random_instance_id()?,
            },
            region: var("FLY_REGION")
                .value
                .unwrap_or_else(|| "LOCAL_REGION".to_string()),
            allowed_origins: parse_origins(var("ALLOWED_ORIGINS"))?,
            max_connections: match var("MAX_CONNECTIONS") {
                v if v.value.is_none() => None,
                v => Some(v.parse_if(0, |n: &usize| *n > 0, "expected a positive integer")?),
            },
            alerts_per_second: var("ALERTS_PER_SECOND").parse_if(
                1.0,
                |n: &f64| n.is_finite() && *n > 0.0,
                "expected a positive number",
            )?,
            alert_burst: var("ALERT_BURST").parse_if(
                5,
                |n: &u32| *n > 0,
                "expected a positive integer",
            )?,
            address_alerts_per_second: var("ADDRESS_ALERTS_PER_SECOND").parse_if(
                20.0,
                |n: &f64| n.is_finite() && *n > 0.0,
                "expected a positive number",
            )?,
            address_alert_burst: var("ADDRESS_ALERT_BURST").parse_if(
                300,
                |n: &u32| *n > 0,
                "expected a positive integer",
            )?,
            address_max_connections: var("ADDRESS_MAX_CONNECTIONS").parse_if(
                300,
                |n: &usize| *n > 0,
                "expected a positive integer",
            )?,
            control_per_second: var("CONTROL_PER_SECOND").parse_if(
                10.0,
                |n: &f64| n.is_finite() && *n >= 0.5,
                "expected a number of at least 0.5",
            )?,
            client_ip_header: {
                let v = var("CLIENT_IP_HEADER");
                match &v.value {
                    None => None,
                    Some(name) if is_header_name(name.trim()) => Some(name.trim().to_string()),
                    Some(_) => return Err(v.error("expected a header name, e.g. Fly-Client-IP")),
                }
            },
            storm_alerts_per_second: var("STORM_ALERTS_PER_SECOND").parse_if(
                10,
                |n: &usize| *n <= 100_000,
                "expected a whole number from 0 to 100000",
            )?,
            storm_summary: Duration::from_millis(var("STORM_SUMMARY_MS").parse_if(
                200,
                |n: &u64| (10..=60_000).contains(n),
                "expected milliseconds from 10 to 60000",
            )?),
            ping_interval: seconds(var("PING_INTERVAL_SECS"), 30)?,
            handshake_timeout: seconds(var("HANDSHAKE_TIMEOUT_SECS"), 5)?,
            recovery_alerts: var("RECOVERY_ALERTS").parse_if(
                100,
                |n: &usize| *n <= 100_000,
                "expected a whole number from 0 to 100000",
            )?,
            presence_interval: {
                let secs = var("PRESENCE_INTERVAL_SECS").parse_if(
                    15,
                    |n: &u64| *n <= 3600,
                    "expected whole seconds from 0 (off) to 3600",
                )?;
                (secs > 0).then(|| Duration::from_secs(secs))
            },
            log_level: {
                let v = var("LOG_LEVEL");
                match &v.value {
                    None => Level::Info,
                    Some(text) => Level::parse(text)
                        .ok_or_else(|| v.error("expected error, warn, info or debug"))?,
                }
            },
            broker: BrokerChoice::Local {
                reason: String::new(),
            },
        };
        let broker = choose_broker(&lookup, &config.instance_id)?;
        Ok(Config { broker, ..config })
    }
}

/// One variable being read, so every error names it and its value.
struct Var {
    name: &'static str,
    value: Option<String>,
}

impl Var {
    fn error(&self, reason: &str) -> ConfigError {
        ConfigError {
            variable: self.name,
            value: self.value.clone().unwrap_or_default(),
            reason: reason.to_string(),
        }
    }

    fn parse_or<T: std::str::FromStr>(&self, default: T, reason: &str) -> Result<T, ConfigError> {
        self.parse_if(default, |_| true, reason)
    }

    fn parse_if<T: std::str::FromStr>(
        &self,
        default: T,
        valid: impl Fn(&T) -> bool,
        reason: &str,
    ) -> Result<T, ConfigError> {
        match &self.value {
            None => Ok(default),
            Some(text) => match text.trim().parse::<T>() {
                Ok(value) if valid(&value) => Ok(value),
                _ => Err(self.error(reason)),
            },
        }
    }
}

/// METRICS_PORT: unset or empty means no metrics listener, so that several
/// instances on one host (`make demo`) need no port each.
fn metrics_port(var: Var, port: u16) -> Result<Option<u16>, ConfigError> {
    if var.value.is_none() {
        return Ok(None);
    }
    let metrics = var.parse_or(
        0,
        "expected a port number from 0 to 65535 (unset or empty: no metrics)",
    )?;
    if metrics != 0 && metrics == port {
        return Err(var.error("the same as PORT: metrics need a port of their own"));
    }
    Ok(Some(metrics))
}

fn seconds(var: Var, default: u64) -> Result<Duration, ConfigError> {
    let secs = var.parse_if(
        default,
        |n: &u64| (1..=86_400).contains(n),
        "expected whole seconds from 1 to 86400",
    )?;
    Ok(Duration::from_secs(secs))
}

/// An HTTP header name: one or more of RFC 9110's token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn random_instance_id() -> Result<String, ConfigError> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(|err| ConfigError {
        variable: "FLY_ALLOC_ID",
        value: String::new(),
        reason: format!("unset, and no randomness to make one up: {err}"),
    })?;
    Ok(format!("local-{}", crate::message::hex(&bytes)))
}

fn parse_origins(var: Var) -> Result<Vec<String>, ConfigError> {
    let Some(list) = &var.value else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            normalize_origin(entry).ok_or_else(|| {
                var.error(&format!(
                    "{entry:?} is not an origin like https://example.com[:port]"
                ))
            })
        })
        .collect()
}

/// `scheme://host[:port]` in lowercase without the scheme's default port, or
/// None when `origin` is not a web origin (a path, no scheme, `null`...).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let valid = |c: char| c.is_ascii_alphanumeric() || "-.:[]".contains(c);
    if authority.is_empty() || !authority.chars().all(valid) {
        return None;
    }
    let authority = authority.strip_suffix(default_port).unwrap_or(authority);
    Some(format!("{scheme}://{authority}"))
}

fn choose_broker(
    lookup: &impl Fn(&str) -> Option<String>,
    instance_id: &str,
) -> Result<BrokerChoice, ConfigError> {
    let var = |name: &'static str| Var {
        name,
        value: lookup(name).filter(|v| !v.is_empty()),
    };
    let emulator = var("PUBSUB_EMULATOR_HOST");
    let endpoint = var("PUBSUB_ENDPOINT");

    let (credentials, endpoint, reason) = if let Some(host) = &emulator.value {
        // Google's convention: host:port, plain http, no credentials.
        let valid = !host.contains("://")
            && host
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(emulator.error("expected host:port (no scheme), e.g. localhost:8085"));
        }
        let mut reason = format!("PUBSUB_EMULATOR_HOST={host}: emulator, no auth");
        let unused: Vec<&str> = CREDENTIAL_VARIABLES
            .iter()
            .copied()
            .filter(|name| var(name).value.is_some())
            .collect();
        if !unused.is_empty() {
            reason.push_str(&format!(" ({} not used)", unused.join(", ")));
        }
        (None, format!("http://{host}"), reason)
    } else {
        let Some((credentials, reason)) = credentials(&var)? else {
            if endpoint.value.is_some() || var("PUBSUB_PROJECT_ID").value.is_some() {
                let named = if endpoint.value.is_some() {
                    endpoint
                } else {
                    var("PUBSUB_PROJECT_ID")
                };
                return Err(named.error(
                    "Pub/Sub needs credentials: set GOOGLE_WORKLOAD_IDENTITY_PROVIDER (keyless), \
                     GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT_JSON (or PUBSUB_EMULATOR_HOST)",
                ));
            }
            return Ok(BrokerChoice::Local {
                reason: format!(
                    "no Pub/Sub configuration ({} unset, no ./{DEFAULT_KEY_FILE})",
                    PUBSUB_VARIABLES.join(", ")
                ),
            });
        };
        let base = base_url(&endpoint, "https://pubsub.googleapis.com")?;
        (Some(credentials), base, reason)
    };

    let project_var = var("PUBSUB_PROJECT_ID");
    let key_project = match &credentials {
        Some(Credentials::Key(account)) => account.project_id.clone(),
        _ => None,
    };
    let project = project_var
        .value
        .clone()
        .or_else(|| var("GOOGLE_CLOUD_PROJECT").value)
        .or(key_project)
        .ok_or_else(|| {
            project_var.error(match credentials {
                Some(Credentials::Keyless(_)) => {
                    "keyless auth has no key file to take the project from: \
                     set PUBSUB_PROJECT_ID (or GOOGLE_CLOUD_PROJECT)"
                }
                _ => "no Google Cloud project: set PUBSUB_PROJECT_ID",
            })
        })?;
    if project.is_empty()
        || !project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c))
    {
        return Err(Var {
            name: "PUBSUB_PROJECT_ID",
            value: Some(project),
        }
        .error("not a project id"));
    }
    let topic_var = var("PUBSUB_TOPIC");
    let topic = topic_var
        .value
        .clone()
        .unwrap_or_else(|| "ALIEN_NOTIFICATIONS".to_string());
    if !is_resource_id(&topic) {
        return Err(topic_var.error(RESOURCE_ID_RULES));
    }
    let outstanding_pulls = var("PUBSUB_OUTSTANDING_PULLS").parse_if(
        4,
        |n: &usize| (1..=16).contains(n),
        "expected a whole number from 1 to 16",
    )?;
    // Not past the subscription's retention: an alert older than that would
    // be dropped by Pub/Sub itself, unread.
    let publish_timeout = var("PUBSUB_PUBLISH_TIMEOUT").parse_if(
        600,
        |n: &u64| (1..=600).contains(n),
        "expected a whole number of seconds from 1 to 600",
    )?;
    let settings = PubSubSettings {
        endpoint,
        credentials,
        project,
        topic,
        subscription: subscription_id(instance_id),
        outstanding_pulls,
        publish_timeout: Duration::from_secs(publish_timeout),
    };
    Ok(BrokerChoice::PubSub {
        settings: Box::new(settings),
        reason,
    })
}

/// Variables that say how to authenticate (the emulator uses none of them).
const CREDENTIAL_VARIABLES: &[&str] = &[
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT_JSON",
    "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
    "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
];

/// The credentials Pub/Sub is called with, and a line for the log saying
/// which (never what they contain); None when none are configured.
///
/// Precedence: keyless auth (GOOGLE_WORKLOAD_IDENTITY_PROVIDER), else
/// GOOGLE_APPLICATION_CREDENTIALS, else GOOGLE_SERVICE_ACCOUNT_JSON, else
/// ./google-service-account.json. A variable set on purpose beats a file
/// that merely lies in the working directory. But a provider together with a
/// key variable is refused: someone moving to keyless auth who left the key
/// secret behind would otherwise keep a long-lived key in use without
/// knowing which of the two is.
fn credentials(
    var: &impl Fn(&'static str) -> Var,
) -> Result<Option<(Credentials, String)>, ConfigError> {
    let key_path = var("GOOGLE_APPLICATION_CREDENTIALS");
    let key_json = var("GOOGLE_SERVICE_ACCOUNT_JSON");
    let provider = var("GOOGLE_WORKLOAD_IDENTITY_PROVIDER");
    let impersonate = var("GOOGLE_IMPERSONATE_SERVICE_ACCOUNT");
    if provider.value.is_some() {
        if let Some(key) = [&key_path, &key_json].iter().find(|v| v.value.is_some()) {
            return Err(provider.error(&format!(
                "{} is set too: keyless auth or a key, not both (unset one of them)",
                key.name
            )));
        }
        return keyless(var, &provider, &impersonate).map(Some);
    }
    if impersonate.value.is_some() {
        return Err(impersonate.error(
            "only used with GOOGLE_WORKLOAD_IDENTITY_PROVIDER (keyless auth); a key is already a service account's",
        ));
    }
    let default_key = std::path::Path::new(DEFAULT_KEY_FILE);
    let (account, source) = if let Some(path) = &key_path.value {
        let text = std::fs::read_to_string(path)
            .map_err(|err| key_path.error(&format!("cannot read the key file: {err}")))?;
        let account = ServiceAccount::from_json(&text).map_err(|why| key_path.error(&why))?;
        (account, format!("GOOGLE_APPLICATION_CREDENTIALS={path}"))
    } else if let Some(text) = &key_json.value {
        // The value is the key itself: never echo it.
        let hidden = |why: String| ConfigError {
            variable: key_json.name,
            value: "(hidden)".into(),
            reason: why,
        };
        (
            ServiceAccount::from_json(text).map_err(hidden)?,
            "GOOGLE_SERVICE_ACCOUNT_JSON".to_string(),
        )
    } else if default_key.exists() {
        let text = std::fs::read_to_string(default_key).map_err(|err| ConfigError {
            variable: "GOOGLE_APPLICATION_CREDENTIALS",
            value: format!("(unset; found ./{DEFAULT_KEY_FILE})"),
            reason: format!("cannot read ./{DEFAULT_KEY_FILE}: {err}"),
        })?;
        let account = ServiceAccount::from_json(&text).map_err(|why| ConfigError {
            variable: "GOOGLE_APPLICATION_CREDENTIALS",
            value: format!("(unset; found ./{DEFAULT_KEY_FILE})"),
            reason: why,
        })?;
        (account, format!("./{DEFAULT_KEY_FILE}"))
    } else {
        return Ok(None);
    };
    let reason = format!("credentials from {source} for {}", account.client_email);
    Ok(Some((Credentials::Key(account), reason)))
}

/// Keyless auth: everything that can be checked before the first token
/// request is checked here, so a typo stops the server at start (exit 2)
/// instead of failing every exchange at run time.
fn keyless(
    var: &impl Fn(&'static str) -> Var,
    provider: &Var,
    impersonate: &Var,
) -> Result<(Credentials, String), ConfigError> {
    let name = provider.value.clone().unwrap_or_default();
    WorkloadIdentity::check_provider(&name).map_err(|why| provider.error(&why))?;
    if let Some(email) = &impersonate.value {
        WorkloadIdentity::check_service_account_email(email)
            .map_err(|why| impersonate.error(&why))?;
    }
    let socket = var("FLY_API_SOCKET");
    let fly_api_socket = match &socket.value {
        None => std::path::PathBuf::from(DEFAULT_FLY_API_SOCKET),
        Some(path) if path.starts_with('/') => std::path::PathBuf::from(path),
        Some(_) => {
            return Err(socket.error("expected the absolute path of a Unix socket, e.g. /.fly/api"));
        }
    };
    let identity = WorkloadIdentity {
        provider: name,
        impersonate: impersonate.value.clone(),
        fly_api_socket,
        sts_endpoint: base_url(&var("GOOGLE_STS_ENDPOINT"), "https://sts.googleapis.com")?,
        iamcredentials_endpoint: base_url(
            &var("GOOGLE_IAMCREDENTIALS_ENDPOINT"),
            "https://iamcredentials.googleapis.com",
        )?,
    };
    let acting = match &identity.impersonate {
        Some(email) => format!("impersonating {email}"),
        None => "as the federated identity (no impersonation)".to_string(),
    };
    let mut reason = format!(
        "keyless auth (Workload Identity Federation) through provider {}, {acting}, \
         with the Machine's OIDC token from {}",
        identity.provider,
        identity.fly_api_socket.display()
    );
    if std::path::Path::new(DEFAULT_KEY_FILE).exists() {
        reason.push_str(&format!(" (./{DEFAULT_KEY_FILE} not used)"));
    }
    Ok((Credentials::Keyless(identity), reason))
}

/// An http(s) base URL from `var`, without a trailing slash, or `default`.
fn base_url(var: &Var, default: &str) -> Result<String, ConfigError> {
    match &var.value {
        Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
            Ok(url.trim_end_matches('/').to_string())
        }
        Some(_) => Err(var.error("expected an http:// or https:// URL")),
        None => Ok(default.to_string()),
    }
}

const RESOURCE_ID_RULES: &str = "a Pub/Sub id starts with a letter, has 3-255 of A-Z a-z 0-9 - _ . ~ + %, and does not start with goog";

/// Pub/Sub's rule for topic and subscription ids.
pub fn is_resource_id(id: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.~+%".contains(c);
    (3..=255).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && !id.to_ascii_lowercase().starts_with("goog")
        && id.chars().all(allowed)
}

/// This instance's subscription: `ID_<instance id>` (the original's naming;
/// the prefix makes it start with a letter), with characters Pub/Sub does not
/// allow replaced and the length capped.
pub fn subscription_id(instance_id: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.~+".contains(c);
    let mut id: String = format!("ID_{instance_id}")
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .collect();
    id.truncate(255);
    id
}

/// The text of `skywatch --help`.
pub fn help() -> String {
    let mut text = String::from(
        "skywatch: real-time alien-landing alerts for browsers.\n\n\
         Usage: skywatch [--help | --version]\n\n\
         On PORT: the page at /, WebSockets at /ws, liveness at /healthz,\n\
         readiness at /readyz. On METRICS_PORT, when set: Prometheus metrics\n\
         at /metrics (never on PORT).\n\n\
         Configured only through environment variables:\n\n",
    );
    for (name, default, meaning) in VARIABLES {
        text.push_str(&format!(
            "  {name:<32} {meaning}\n  {:<32} default: {default}\n",
            ""
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_follow_fly_conventions() {
        let c = config(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.region, "LOCAL_REGION");
        assert_eq!(c.max_connections, None, "derived from memory at start");
        assert_eq!(c.metrics_port, None, "no metrics listener unless asked");
        assert_eq!((c.alerts_per_second, c.alert_burst), (1.0, 5));
        assert!(matches!(c.broker, BrokerChoice::Local { .. }));
    }

    #[test]
    fn subscription_ids_follow_pubsub_rules() {
        for instance in [
            "3f2df1d3",
            "local-0a1b2c",
            "a b/c\u{e9}",
            &"x".repeat(400),
            "",
        ] {
            let id = subscription_id(instance);
            assert!(is_resource_id(&id), "{id}");
        }
        assert_eq!(subscription_id("3f2df1d3"), "ID_3f2df1d3");
        assert!(!is_resource_id("goog-topic") && !is_resource_id("1abc") && !is_resource_id("ab"));
    }

    #[test]
    fn the_emulator_needs_no_key_but_a_project() {
        let c = config(&[
            ("PUBSUB_EMULATOR_HOST", "localhost:8085"),
            ("PUBSUB_PROJECT_ID", "demo"),
        ])
        .unwrap();
        let BrokerChoice::PubSub { settings, .. } = c.broker else {
            panic!("expected Pub/Sub")
        };
        assert_eq!(settings.endpoint, "http://localhost:8085");
        assert!(settings.credentials.is_none());
        assert_eq!(
            (settings.project.as_str(), settings.topic.as_str()),
            ("demo", "ALIEN_NOTIFICATIONS")
        );
        let err = config(&[("PUBSUB_EMULATOR_HOST", "localhost:8085")]).unwrap_err();
        assert_eq!(err.variable, "PUBSUB_PROJECT_ID");
        let err = config(&[
            ("PUBSUB_EMULATOR_HOST", "http://localhost:8085"),
            ("PUBSUB_PROJECT_ID", "p"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "PUBSUB_EMULATOR_HOST");
    }

    const PROVIDER: &str =
        "projects/123456789012/locations/global/workloadIdentityPools/fly-pool/providers/fly-org";

    #[test]
    fn a_workload_identity_provider_selects_keyless_pubsub() {
        let c = config(&[
            ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", PROVIDER),
            ("PUBSUB_PROJECT_ID", "demo"),
        ])
        .unwrap();
        let BrokerChoice::PubSub { settings, reason } = c.broker else {
            panic!("expected Pub/Sub")
        };
        let Some(Credentials::Keyless(identity)) = &settings.credentials else {
            panic!("expected keyless credentials")
        };
        assert_eq!(identity.provider, PROVIDER);
        assert_eq!(identity.impersonate, None);
        assert_eq!(identity.fly_api_socket, std::path::Path::new("/.fly/api"));
        assert_eq!(identity.sts_endpoint, "https://sts.googleapis.com");
        assert_eq!(
            identity.iamcredentials_endpoint,
            "https://iamcredentials.googleapis.com"
        );
        assert_eq!(settings.endpoint, "https://pubsub.googleapis.com");
        assert!(
            reason.contains(PROVIDER) && reason.contains("no impersonation"),
            "{reason}"
        );

        let c = config(&[
            ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", PROVIDER),
            ("GOOGLE_CLOUD_PROJECT", "demo"),
            (
                "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
                "sky@demo.iam.gserviceaccount.com",
            ),
            ("FLY_API_SOCKET", "/tmp/api.sock"),
            ("GOOGLE_STS_ENDPOINT", "http://127.0.0.1:9/"),
            ("GOOGLE_IAMCREDENTIALS_ENDPOINT", "http://127.0.0.1:9"),
        ])
        .unwrap();
        let BrokerChoice::PubSub { settings, reason } = c.broker else {
            panic!("expected Pub/Sub")
        };
        let Some(Credentials::Keyless(identity)) = &settings.credentials else {
            panic!("expected keyless credentials")
        };
        assert_eq!(
            identity.impersonate.as_deref(),
            Some("sky@demo.iam.gserviceaccount.com")
        );
        assert_eq!(
            identity.fly_api_socket,
            std::path::Path::new("/tmp/api.sock")
        );
        assert_eq!(identity.sts_endpoint, "http://127.0.0.1:9");
        assert_eq!(identity.iamcredentials_endpoint, "http://127.0.0.1:9");
        assert_eq!(settings.project, "demo");
        assert!(
            reason.contains("impersonating sky@demo.iam.gserviceaccount.com"),
            "{reason}"
        );
    }

    #[test]
    fn keyless_mistakes_are_named_at_start() {
        let provider = ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", PROVIDER);
        let project = ("PUBSUB_PROJECT_ID", "demo");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[provider], "PUBSUB_PROJECT_ID"),
            (
                &[("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", "fly-org"), project],
                "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
            ),
            (
                &[
                    provider,
                    project,
                    ("GOOGLE_IMPERSONATE_SERVICE_ACCOUNT", "me@gmail.com"),
                ],
                "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
            ),
            (
                &[(
                    "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
                    "sky@demo.iam.gserviceaccount.com",
                )],
                "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
            ),
            (
                &[provider, project, ("FLY_API_SOCKET", "fly/api")],
                "FLY_API_SOCKET",
            ),
            (
                &[
                    provider,
                    project,
                    ("GOOGLE_STS_ENDPOINT", "sts.googleapis.com"),
                ],
                "GOOGLE_STS_ENDPOINT",
            ),
            (
                &[
                    provider,
                    project,
                    ("GOOGLE_IAMCREDENTIALS_ENDPOINT", "ftp://x"),
                ],
                "GOOGLE_IAMCREDENTIALS_ENDPOINT",
            ),
            (
                &[
                    provider,
                    project,
                    ("GOOGLE_APPLICATION_CREDENTIALS", "/key.json"),
                ],
                "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
            ),
        ];
        for (vars, variable) in cases {
            let err = config(vars).expect_err(variable);
            assert_eq!(err.variable, *variable, "{vars:?}: {err}");
        }
        // Both a provider and an inline key: the key is named, never shown.
        let err = config(&[
            provider,
            project,
            (
                "GOOGLE_SERVICE_ACCOUNT_JSON",
                "{\"private_key\":\"SECRET\"}",
            ),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("GOOGLE_SERVICE_ACCOUNT_JSON is set too"),
            "{err}"
        );
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn the_emulator_takes_no_credentials_and_says_which_it_ignores() {
        let c = config(&[
            ("PUBSUB_EMULATOR_HOST", "localhost:8085"),
            ("PUBSUB_PROJECT_ID", "demo"),
            ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", PROVIDER),
        ])
        .unwrap();
        let BrokerChoice::PubSub { settings, reason } = c.broker else {
            panic!("expected Pub/Sub")
        };
        assert!(settings.credentials.is_none());
        assert!(
            reason.contains("emulator, no auth (GOOGLE_WORKLOAD_IDENTITY_PROVIDER not used)"),
            "{reason}"
        );
    }

    #[test]
    fn a_broken_inline_key_is_named_but_never_echoed() {
        let secret = r#"{"type":"service_account","private_key":"-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n","client_email":"a@b"}"#;
        let err = config(&[("GOOGLE_SERVICE_ACCOUNT_JSON", secret)]).unwrap_err();
        assert_eq!(err.variable, "GOOGLE_SERVICE_ACCOUNT_JSON");
        assert!(!err.to_string().contains("SECRET"), "{err}");
        let err = config(&[("GOOGLE_SERVICE_ACCOUNT_JSON", "not json SECRET")]).unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn instance_ids_are_random_when_fly_gives_none() {
        let a = config(&[]).unwrap().instance_id;
        let b = config(&[]).unwrap().instance_id;
        assert_ne!(a, b);
        assert_eq!(
            config(&[("FLY_ALLOC_ID", "abc")]).unwrap().instance_id,
            "abc"
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let cases = [
            ("PORT", "abc"),
            ("PORT", "70000"),
            ("METRICS_PORT", "abc"),
            ("METRICS_PORT", "70000"),
            ("METRICS_PORT", "-1"),
            ("METRICS_PORT", " "),
            ("METRICS_PORT", "8080"),
            ("HOST", "nowhere"),
            ("MAX_CONNECTIONS", "0"),
            ("MAX_CONNECTIONS", "-1"),
            ("ALERTS_PER_SECOND", "0"),
            ("ALERTS_PER_SECOND", "NaN"),
            ("ALERTS_PER_SECOND", "inf"),
            ("ALERT_BURST", "0"),
            ("LOG_LEVEL", "loud"),
            ("PING_INTERVAL_SECS", "0"),
            ("HANDSHAKE_TIMEOUT_SECS", "1.5"),
            ("RECOVERY_ALERTS", "-1"),
            ("RECOVERY_ALERTS", "100001"),
            ("PRESENCE_INTERVAL_SECS", "3601"),
            ("PRESENCE_INTERVAL_SECS", "1.5"),
            ("ALLOWED_ORIGINS", "not a url"),
            ("ALLOWED_ORIGINS", "https://ok.example,ftp://x"),
        ];
        for (name, value) in cases {
            let err = config(&[(name, value)]).expect_err(name);
            assert_eq!(err.variable, name);
            assert!(
                err.to_string().starts_with(&format!("invalid {name}=")),
                "{err}"
            );
        }
    }

    #[test]
    fn metrics_port_is_optional_and_apart_from_port() {
        let port = |vars: &[(&str, &str)]| config(vars).map(|c| c.metrics_port);
        assert_eq!(port(&[("METRICS_PORT", "")]), Ok(None), "empty is unset");
        assert_eq!(port(&[("METRICS_PORT", "9091")]), Ok(Some(9091)));
        assert_eq!(port(&[("METRICS_PORT", " 9091 ")]), Ok(Some(9091)));
        assert_eq!(port(&[("METRICS_PORT", "0")]), Ok(Some(0)), "a free one");
        assert_eq!(
            port(&[("PORT", "0"), ("METRICS_PORT", "0")]),
            Ok(Some(0)),
            "two free ports are two ports"
        );
        let err = config(&[("PORT", "9091"), ("METRICS_PORT", "9091")]).unwrap_err();
        assert_eq!(err.variable, "METRICS_PORT");
        assert!(err.reason.contains("PORT"), "{err}");
    }

    #[test]
    fn origins_are_normalized() {
        assert_eq!(
            normalize_origin("HTTPS://Example.com:443/").as_deref(),
            Some("https://example.com")
        );
        assert_eq!(
            normalize_origin("http://localhost:8080").as_deref(),
            Some("http://localhost:8080")
        );
        assert_eq!(
            normalize_origin("http://[::1]:80").as_deref(),
            Some("http://[::1]")
        );
        for bad in [
            "null",
            "example.com",
            "https://",
            "https://a.com/path",
            "file://x",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
        let c = config(&[(
            "ALLOWED_ORIGINS",
            " https://a.example , http://b.example:8080 ",
        )])
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "http://b.example:8080"]
        );
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let text = help();
        for (name, default, _) in VARIABLES {
            assert!(text.contains(name) && text.contains(default), "{name}");
        }
    }
}
