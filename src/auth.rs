//! Access tokens for Google APIs: one [`TokenSource`], shared by every thread
//! that calls Pub/Sub, caching one token and getting a new one shortly before
//! it expires, whichever way the token is obtained ([`Credentials`]):
//!
//! - **a service-account key** ([`service_account`]): sign a JWT with the
//!   key and exchange it at Google's OAuth endpoint (the JWT-bearer grant);
//! - **keyless, on Fly** ([`workload_identity`]): ask the Fly Machine API for
//!   this Machine's OIDC token and exchange it at Google's Security Token
//!   Service (Workload Identity Federation), optionally for a service
//!   account's token after that.
//!
//! The cache does not care which: a credential source only says "here is a
//! token, valid for this long". Token material (keys, JWTs, access tokens)
//! never goes into a log line or an error message; errors carry the HTTP
//! status and Google's own explanation instead.

mod service_account;
mod workload_identity;

pub use service_account::ServiceAccount;
pub use workload_identity::WorkloadIdentity;

use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// Google's access tokens last an hour; take a new one this long before.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Timeout of one token request.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from a token endpoint's answer (Google's federated tokens
/// are at most 12 KiB).
const MAX_ANSWER: u64 = 64 * 1024;
/// Scope of the tokens Skywatch asks for: Pub/Sub, or everything the
/// identity's IAM roles allow (what federated tokens are issued for).
pub const PUBSUB_SCOPE: &str = "https://www.googleapis.com/auth/pubsub";
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Where access tokens come from.
#[derive(Debug)]
pub enum Credentials {
    /// A service-account key file.
    Key(ServiceAccount),
    /// Workload Identity Federation with the Fly Machine's OIDC token.
    Keyless(WorkloadIdentity),
}

/// Why no access token could be had.
#[derive(Debug)]
pub struct TokenError {
    /// What went wrong, with the endpoint's status and words: safe to log,
    /// never token material.
    pub reason: String,
    /// An endpoint answered and refused (a 4xx other than 408 and 429): a
    /// revoked key, a disabled account, a provider that does not trust this
    /// app. Only a person can fix that. Otherwise (no answer, a 5xx, an
    /// answer that could not be read) the failure may pass by itself.
    pub refused: bool,
    /// The HTTP status the endpoint answered, if it answered.
    pub status: Option<u16>,
}

impl TokenError {
    fn answered(status: u16, reason: String) -> TokenError {
        TokenError {
            reason,
            refused: (400..500).contains(&status) && status != 408 && status != 429,
            status: Some(status),
        }
    }
}

impl From<String> for TokenError {
    fn from(reason: String) -> TokenError {
        TokenError {
            reason,
            refused: false,
            status: None,
        }
    }
}

impl From<&str> for TokenError {
    fn from(reason: &str) -> TokenError {
        TokenError::from(reason.to_string())
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A token just obtained, and how long it stays valid.
struct Fresh {
    value: String,
    lifetime: Duration,
}

/// Access tokens from one credential source, cached and shared by every
/// thread that calls Google.
pub struct TokenSource {
    credentials: Credentials,
    agent: ureq::Agent,
    cached: Mutex<Option<CachedToken>>,
    /// Held by the one thread renewing the token. The others go on with the
    /// cached token meanwhile, if it is still valid: a renewal can take tens
    /// of seconds (three requests, keyless) and must not hold up calls.
    renewing: Mutex<()>,
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
    expires_at: Instant,
    /// After a failed renewal, the next one waits until this.
    retry_at: Instant,
}

/// Longest a token is believed to last, whatever its issuer says: an absurd
/// `expires_in` must not overflow the clock arithmetic.
const MAX_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Between renewal attempts while the cached token is still valid.
const RENEW_RETRY: Duration = Duration::from_secs(10);

/// A refresh failed while the cached token was still good: said once per
/// 10 s, not on every call.
static STILL_VALID: crate::log::Throttle = crate::log::Throttle::new();

impl TokenSource {
    pub fn new(credentials: Credentials) -> TokenSource {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(TOKEN_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        TokenSource {
            credentials,
            agent,
            cached: Mutex::new(None),
            renewing: Mutex::new(()),
        }
    }

    /// A valid access token, fetched only when the cached one is near expiry.
    /// One thread renews; the others use the cached token meanwhile, or,
    /// when there is none valid, wait for that renewal rather than make their
    /// own. A renewal that fails while the cached token is still valid is no
    /// outage: that token is used until it expires, and the renewal tried
    /// again every [`RENEW_RETRY`].
    pub fn token(&self) -> Result<String, TokenError> {
        if let Some(token) = self.cached_if(|t, now| now < t.refresh_at) {
            return Ok(token);
        }
        let _renewing = match self.renewing.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                if let Some(token) = self.cached() {
                    return Ok(token);
                }
                self.renewing
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            }
        };
        // Renewed by another thread while this one waited, or renewed in
        // vain a moment ago: no need to ask again yet.
        if let Some(token) =
            self.cached_if(|t, now| now < t.refresh_at || (now < t.retry_at && now < t.expires_at))
        {
            return Ok(token);
        }
        let fetched = match &self.credentials {
            Credentials::Key(account) => account.fetch_token(&self.agent),
            Credentials::Keyless(identity) => identity.fetch_token(&self.agent),
        };
        let now = Instant::now();
        let mut cached = self.lock_cached();
        let fresh = match (fetched, cached.as_mut()) {
            (Ok(fresh), _) => fresh,
            (Err(err), Some(old)) if now < old.expires_at => {
                old.retry_at = now + RENEW_RETRY;
                if let Some(held) = STILL_VALID.allow() {
                    crate::warn!(
                        "cannot renew the access token ({err}); using the current one for its last {} s{}",
                        old.expires_at.saturating_duration_since(now).as_secs(),
                        crate::log::suppressed(held)
                    );
                }
                return Ok(old.value.clone());
            }
            (Err(err), _) => return Err(err),
        };
        let lifetime = fresh.lifetime.min(MAX_LIFETIME);
        let refresh_at = now + lifetime.saturating_sub(REFRESH_MARGIN).max(lifetime / 2);
        *cached = Some(CachedToken {
            value: fresh.value.clone(),
            // Short-lived tokens (tests use seconds) are renewed half-way.
            refresh_at,
            // A little before the issuer's own expiry, for the clocks and
            // the time a call takes to arrive.
            expires_at: now + lifetime.saturating_sub(lifetime.min(REFRESH_MARGIN) / 10),
            retry_at: refresh_at,
        });
        Ok(fresh.value)
    }

    /// The cached token if it is still valid, without ever fetching one:
    /// for a call that cannot wait (the delete at shutdown).
    pub fn cached(&self) -> Option<String> {
        self.cached_if(|t, now| now < t.expires_at)
    }

    fn cached_if(&self, good: impl Fn(&CachedToken, Instant) -> bool) -> Option<String> {
        let now = Instant::now();
        self.lock_cached()
            .as_ref()
            .filter(|t| good(t, now))
            .map(|t| t.value.clone())
    }

    fn lock_cached(&self) -> MutexGuard<'_, Option<CachedToken>> {
        self.cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets `rejected` (a token the API answered 401 to), so the next call
    /// fetches a new one.
    pub fn invalidate(&self, rejected: &str) {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cached.as_ref().is_some_and(|t| t.value == rejected) {
            *cached = None;
        }
    }
}

/// The usual answer of an OAuth token endpoint (Google's, and its STS).
#[derive(serde::Deserialize)]
struct OAuthToken {
    access_token: String,
    expires_in: u64,
}

impl From<OAuthToken> for Fresh {
    fn from(token: OAuthToken) -> Fresh {
        Fresh {
            value: token.access_token,
            lifetime: Duration::from_secs(token.expires_in),
        }
    }
}

/// One request to a token endpoint: POSTs `body` and reads a 200 answer as
/// `T`. Any other status is a refusal, said as `"{refused}: "` and the
/// endpoint's own words, with `secrets` it may have echoed hidden. Errors
/// name the URL (which holds no secret), never the body.
fn request_token<T: serde::de::DeserializeOwned>(
    agent: &ureq::Agent,
    url: &str,
    (content_type, body): (&str, &[u8]),
    bearer: Option<&str>,
    refused: &str,
    secrets: &[&str],
) -> Result<T, TokenError> {
    let mut request = agent.post(url).header("Content-Type", content_type);
    if let Some(token) = bearer {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request
        .send(body)
        .map_err(|err| format!("request to {url} failed: {err}"))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_string()
        .map_err(|err| format!("answer from {url} unreadable: {err}"))?;
    if status != 200 {
        let said = refusal(status, &text, secrets);
        return Err(TokenError::answered(status, format!("{refused}: {said}")));
    }
    Ok(parse_answer(&text, &format!("the answer of {url}"))?)
}

/// Why a token endpoint said no, from its answer: OAuth's
/// `{"error", "error_description"}` (RFC 6749 section 5.2, what Google's OAuth
/// and STS endpoints send) or Google's `{"error": {"code", "status",
/// "message"}}` (its REST APIs), else the start of the text. Any of
/// `secrets` the endpoint echoed, and anything shaped like a token, is
/// blanked out (before the text is cut short, so no piece of one survives),
/// so a refusal can be logged.
fn refusal(status: u16, text: &str, secrets: &[&str]) -> String {
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let error = &value["error"];
    let said = match (error.as_str(), error["status"].as_str()) {
        (Some(code), _) => match value["error_description"].as_str() {
            Some(description) if !description.is_empty() => {
                format!("{status} {code}: {description}")
            }
            _ => format!("{status} {code}"),
        },
        (None, Some(google_status)) => {
            let message = error["message"].as_str().unwrap_or("");
            format!("{status} {google_status}: {message}")
        }
        _ => format!("{status}: {}", text.trim()),
    };
    let mut said = said;
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        said = said.replace(secret, "(hidden)");
    }
    hide_token_shapes(&said).chars().take(500).collect()
}

/// `text` with every word that looks like a token replaced: a Google access
/// token (`ya29.`...) or a JWT (three dot-separated base64url parts of ten
/// characters or more; host names and emails have shorter parts or more).
fn hide_token_shapes(text: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    let looks_like_token = |word: &str| {
        let parts: Vec<&str> = word.split('.').collect();
        word.starts_with("ya29.") || (parts.len() == 3 && parts.iter().all(|p| p.len() >= 10))
    };
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if is_token_char(c) {
            word.push(c);
            continue;
        }
        out.push_str(if looks_like_token(&word) {
            "(hidden)"
        } else {
            &word
        });
        word.clear();
        out.push(c);
    }
    out.pop(); // the space chained on to end the last word
    out
}

/// A JSON answer parsed into `T`, or an error that says where it broke and
/// never quotes it (serde's messages may quote a value, and the value here
/// may be a token).
fn parse_answer<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|err| {
        format!(
            "{what} malformed ({:?} error at line {}, column {})",
            err.classify(),
            err.line(),
            err.column()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_renewal_does_not_hold_up_callers_while_the_token_is_valid() {
        use std::os::unix::net::UnixListener;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = std::env::temp_dir().join(format!("skywatch-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("api.sock");
        // A Fly Machine API that takes the request and never answers.
        let listener = UnixListener::bind(&socket).expect("bind a Unix socket");
        let tokens = Arc::new(TokenSource::new(Credentials::Keyless(WorkloadIdentity {
            provider: "projects/1/locations/global/workloadIdentityPools/p/providers/q".into(),
            impersonate: None,
            fly_api_socket: socket,
            sts_endpoint: "http://127.0.0.1:9".into(),
            iamcredentials_endpoint: "http://127.0.0.1:9".into(),
        })));
        let now = Instant::now();
        *tokens.lock_cached() = Some(CachedToken {
            value: "still-good".into(),
            refresh_at: now,
            expires_at: now + Duration::from_secs(60),
            retry_at: now,
        });
        let renewed = Arc::new(AtomicBool::new(false));
        let renewer = std::thread::spawn({
            let (tokens, renewed) = (Arc::clone(&tokens), Arc::clone(&renewed));
            move || {
                let token = tokens.token();
                renewed.store(true, Ordering::SeqCst);
                token.map_err(|err| err.reason)
            }
        });
        // The renewal is under way (and stuck) once its request arrives.
        let (held, _) = listener.accept().expect("the renewal's connection");
        assert_eq!(
            tokens.token().map_err(|e| e.reason).as_deref(),
            Ok("still-good")
        );
        assert!(
            !renewed.load(Ordering::SeqCst),
            "the call waited for the renewal"
        );
        assert_eq!(tokens.cached().as_deref(), Some("still-good"));
        // The renewal fails (the connection closes): the old token is kept.
        drop(held);
        let token = renewer.join().expect("the renewer");
        assert_eq!(token.as_deref(), Ok("still-good"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refusals_keep_googles_words_and_drop_echoed_secrets() {
        let oauth = r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#;
        assert_eq!(
            refusal(400, oauth, &[]),
            "400 invalid_grant: Invalid JWT Signature."
        );
        let google =
            r#"{"error":{"code":403,"status":"PERMISSION_DENIED","message":"Permission denied"}}"#;
        assert_eq!(
            refusal(403, google, &[]),
            "403 PERMISSION_DENIED: Permission denied"
        );
        assert_eq!(refusal(502, " Bad gateway\n", &[]), "502: Bad gateway");
        assert_eq!(
            refusal(400, r#"{"error":"aud is required"}"#, &[]),
            "400 aud is required"
        );
        let echo =
            r#"{"error":"invalid_request","error_description":"bad token eyJhbGciOi.abc.def"}"#;
        let said = refusal(400, echo, &["eyJhbGciOi.abc.def"]);
        assert!(!said.contains("eyJhbGciOi"), "{said}");
        assert!(
            said.contains("400 invalid_request") && said.contains("(hidden)"),
            "{said}"
        );
        assert!(refusal(500, &"x".repeat(10_000), &[]).len() <= 500);
        // A secret across the cut is hidden whole, not cut into a visible piece.
        let long = format!("{} SECRETSECRETSECRET", "x".repeat(490));
        assert!(!refusal(500, &long, &["SECRETSECRETSECRET"]).contains("SECRET"));
    }

    #[test]
    fn anything_shaped_like_a_token_is_hidden() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhY21lOnNreXdhdGNoIn0.c2lnbmF0dXJlc2lnbmF0dXJl";
        let text = format!(
            "bad subject_token={jwt}, bearer ya29.c.abcdef; for skywatch@p.iam.gserviceaccount.com \
             at https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts (2026-11-27T22:40:01.123Z)"
        );
        assert_eq!(
            hide_token_shapes(&text),
            "bad subject_token=(hidden), bearer (hidden); for skywatch@p.iam.gserviceaccount.com \
             at https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts (2026-11-27T22:40:01.123Z)"
        );
        assert_eq!(hide_token_shapes(""), "");
        assert_eq!(hide_token_shapes("a.b.c"), "a.b.c");
    }

    #[test]
    fn malformed_answers_are_described_without_quoting_them() {
        #[derive(Debug, serde::Deserialize)]
        struct Answer {
            #[allow(dead_code)]
            expires_in: u64,
        }
        let err = parse_answer::<Answer>(r#"{"expires_in":"ya29.SECRET"}"#, "the answer")
            .expect_err("a string is not a number");
        assert!(err.starts_with("the answer malformed"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }
}
