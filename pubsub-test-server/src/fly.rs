//! A stand-in for the Fly Machine API's OIDC token endpoint, on a Unix socket as on a
//! Machine (`/.fly/api`): `POST /v1/tokens/oidc` with `{"aud": "..."}` answers a JWT
//! signed with a test key, with the claims Fly documents for its tokens
//! (<https://fly.io/docs/reference/openid-connect/>, the Machines API's Tokens resource
//! <https://fly.io/docs/machines/api/tokens-resource/>): `iss` `https://oidc.fly.io/ORG`,
//! `sub` `ORG:APP:MACHINE`, the asked-for `aud`, `iat`, `nbf`, `exp`, and the
//! `app_name`, `org_name`, `machine_id`, `region`... claims.
//!
//! # Known differences
//! * Fly's `aud` is optional (it defaults to `https://fly.io/ORG`); here a request
//!   without a non-empty string `aud` is refused (400), because Skywatch must always
//!   ask for Google's audience.
//! * The answer's exact framing and content type on a real Machine are not documented
//!   beyond "the body is the JWT"; here it is `text/plain` with a `Content-Length`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::keys::TestKey;

/// How long Fly's tokens live here unless [`FlyMachineApi::set_token_lifetime`] says.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
const MAX_BODY: u64 = 64 * 1024;

/// One request the stand-in answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcRequest {
    pub method: String,
    pub path: String,
    /// The `aud` asked for, when the body had one.
    pub aud: Option<String>,
    pub status: u16,
}

struct Issuer {
    key: EncodingKey,
    kid: String,
    org: String,
    app: String,
    machine: String,
    lifetime: Mutex<Duration>,
    refuse: AtomicBool,
    requests: Mutex<Vec<OidcRequest>>,
    shutdown: AtomicBool,
}

/// The Fly Machine API stand-in, serving on a Unix socket. Dropping it stops it and
/// removes the socket.
pub struct FlyMachineApi {
    issuer: Arc<Issuer>,
    http: Arc<tiny_http::Server>,
    path: PathBuf,
    public_key_pem: String,
    acceptor: Option<JoinHandle<()>>,
}

impl FlyMachineApi {
    /// Serves on a new Unix socket at `path` (normally in a test's temp dir), signing
    /// tokens with `key` for Machine `machine` of app `app` in org `org`.
    pub fn start(
        path: &Path,
        key: &TestKey,
        org: &str,
        app: &str,
        machine: &str,
    ) -> std::io::Result<FlyMachineApi> {
        let encoding = EncodingKey::from_rsa_pem(key.private_key_pem.as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let http = Arc::new(tiny_http::Server::http_unix(path).map_err(std::io::Error::other)?);
        let issuer = Arc::new(Issuer {
            key: encoding,
            kid: key.private_key_id.clone(),
            org: org.to_owned(),
            app: app.to_owned(),
            machine: machine.to_owned(),
            lifetime: Mutex::new(DEFAULT_LIFETIME),
            refuse: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
        });
        let acceptor = {
            let (issuer, http) = (Arc::clone(&issuer), Arc::clone(&http));
            std::thread::Builder::new()
                .name("fly-machine-api".into())
                .spawn(move || {
                    loop {
                        match http.recv() {
                            // One at a time: each answer is a signature, no waiting.
                            Ok(request) => issuer.answer(request),
                            Err(_) if issuer.shutdown.load(Ordering::SeqCst) => return,
                            Err(_) => continue,
                        }
                    }
                })?
        };
        Ok(FlyMachineApi {
            issuer,
            http,
            path: path.to_owned(),
            public_key_pem: key.public_key_pem.clone(),
            acceptor: Some(acceptor),
        })
    }

    /// The socket's path: what `FLY_API_SOCKET` names.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// `https://oidc.fly.io/ORG`: the tokens' `iss`, which a provider trusts.
    pub fn issuer(&self) -> String {
        format!("https://oidc.fly.io/{}", self.issuer.org)
    }

    /// SPKI PEM of the signing key, for [`crate::Federation::issuer_public_key_pem`].
    pub fn public_key_pem(&self) -> &str {
        &self.public_key_pem
    }

    /// Tokens issued from now on live `d`.
    pub fn set_token_lifetime(&self, d: Duration) {
        *self
            .issuer
            .lifetime
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = d;
    }

    /// While `on`, token requests answer 500, as a Machine API in trouble would.
    pub fn refuse(&self, on: bool) {
        self.issuer.refuse.store(on, Ordering::SeqCst);
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<OidcRequest> {
        self.issuer
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FlyMachineApi {
    fn drop(&mut self) {
        self.issuer.shutdown.store(true, Ordering::SeqCst);
        self.http.unblock();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Issuer {
    fn answer(&self, mut request: tiny_http::Request) {
        let method = request.method().as_str().to_ascii_uppercase();
        let path = request.url().to_owned();
        let mut body = Vec::new();
        let read = std::io::Read::read_to_end(
            &mut std::io::Read::take(request.as_reader(), MAX_BODY + 1),
            &mut body,
        );
        let aud = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("aud").and_then(Value::as_str).map(str::to_owned));
        let (status, text, content_type) = match self.token(&method, &path, read.is_ok(), &body) {
            Ok(jwt) => (200, jwt, "text/plain; charset=utf-8"),
            Err((status, message)) => (
                status,
                json!({ "error": message }).to_string(),
                "application/json",
            ),
        };
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(OidcRequest {
                method,
                path,
                aud,
                status,
            });
        let mut response = tiny_http::Response::from_string(text).with_status_code(status);
        if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", content_type) {
            response.add_header(header);
        }
        let _ = request.respond(response);
    }

    /// The JWT for a well-formed request, or the status and message of the refusal.
    fn token(
        &self,
        method: &str,
        path: &str,
        read: bool,
        body: &[u8],
    ) -> Result<String, (u16, String)> {
        if path != "/v1/tokens/oidc" {
            return Err((404, format!("{path} not found")));
        }
        if method != "POST" {
            return Err((405, format!("{method} not allowed; use POST")));
        }
        if !read || body.len() as u64 > MAX_BODY {
            return Err((400, "unreadable or oversized body".into()));
        }
        let request: Value = serde_json::from_slice(body)
            .map_err(|e| (400, format!("the body is not JSON: {e}")))?;
        let Some(fields) = request.as_object() else {
            return Err((400, "the body must be a JSON object".into()));
        };
        if let Some(unknown) = fields
            .keys()
            .find(|k| !["aud", "aws_principal_tags"].contains(&k.as_str()))
        {
            return Err((400, format!("unknown field {unknown:?}")));
        }
        let aud = match fields.get("aud") {
            Some(Value::String(aud)) if !aud.trim().is_empty() => aud.clone(),
            Some(_) => return Err((400, "aud must be a non-empty string".into())),
            None => {
                return Err((
                    400,
                    "aud is required (pubsub-test-server's stand-in)".into(),
                ));
            }
        };
        if self.refuse.load(Ordering::SeqCst) {
            return Err((500, "internal error (FlyMachineApi::refuse)".into()));
        }
        let lifetime = *self.lifetime.lock().unwrap_or_else(PoisonError::into_inner);
        let now = crate::time::unix_now();
        let claims = json!({
            "iss": format!("https://oidc.fly.io/{}", self.org),
            "sub": format!("{}:{}:{}", self.org, self.app, self.machine),
            "aud": aud,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
            "jti": crate::keys::hex(&crate::keys::random_bytes::<16>()),
            "app_id": "1234567",
            "app_name": self.app,
            "org_id": "7654321",
            "org_name": self.org,
            "machine_id": self.machine,
            "machine_name": format!("{}-machine", self.app),
            "machine_version": "01HZ0000000000000000000000",
            "image": format!("registry.fly.io/{}:deployment-1", self.app),
            "image_digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "region": "ams",
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| (500, format!("cannot sign: {e}")))
    }
}
