//! Workload Identity Federation as Google runs it for an OIDC provider, for
//! [`crate::Auth::WorkloadIdentity`]:
//!
//! * the Security Token Service's token exchange, `POST /v1/token` (reference:
//!   <https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token>, RFC 8693):
//!   an external OIDC token (here: one signed by [`crate::FlyMachineApi`]) for a
//!   *federated* access token of the pool's identity;
//! * IAM Service Account Credentials' `generateAccessToken`,
//!   `POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken` (reference:
//!   <https://cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken>):
//!   a federated token for a service account's token ("impersonation").
//!
//! On Google these live on `sts.googleapis.com` and `iamcredentials.googleapis.com`;
//! here they share the test server's base URL, which cannot clash with Pub/Sub's paths
//! (`token` is no project, and `-` is no project id). The `/v1` fault knobs
//! (`fail_next`, `fail_for`, `set_delay`) do not touch them; their own refusal knobs
//! do ([`crate::PubSubTestServer::set_sts_refusal`],
//! [`crate::PubSubTestServer::set_impersonation_refusal`]).
//!
//! What is checked, as the reference pages and Google's client libraries describe it:
//! the grant type, the audience (`//iam.googleapis.com/` + the provider's name), the
//! requested and subject token types, the scope, no `Authorization` header on the
//! exchange; the subject token's RS256 signature against the issuer's key, its `iss`,
//! its `aud` (the provider's default allowed audience, `https://iam.googleapis.com/` +
//! its name), `exp`, `iat` and `sub`. For impersonation: the `-` project wildcard, a
//! federated bearer token this server issued, an account the pool may impersonate, the
//! request's fields and the lifetime's bound. STS errors are OAuth-style
//! (`{"error", "error_description"}`), IAM errors Google's `google.rpc.Status`. The
//! provider's configuration ([`crate::Federation`]) and the subject token's checks are
//! in `trust`.
//!
//! # Known differences
//! * The attribute mapping and condition are not modelled: every token from the trusted
//!   issuer for the right audience passes (`set_sts_refusal` plays a failing condition).
//! * The issuer's key is given directly instead of being fetched from its JWKS URL.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::json;
use crate::oauth::{bearer_token, oauth_error, oauth_post_only, parse_form};
use crate::records::{Credential, Impersonation, StsExchange};
use crate::reply::{ApiError, Reply};
use crate::state::{IssuedToken, Shared};

const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Google takes an OIDC token as either type.
const SUBJECT_TOKEN_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
];
pub(crate) const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// generateAccessToken's longest lifetime without an organization policy.
const MAX_IMPERSONATED_LIFETIME: u128 = crate::json::secs(3600);

/// `POST /v1/token`: the token exchange.
pub(crate) fn sts(
    shared: &Shared,
    method: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Reply {
    let mut exchange = StsExchange {
        params: Vec::new(),
        subject: None,
        status: 400,
    };
    let reply = exchange_token(shared, method, headers, body, &mut exchange);
    exchange.status = reply.status;
    let mut state = shared.lock();
    state.sts_exchanges.push(exchange);
    shared.notify(&mut state);
    reply
}

fn exchange_token(
    shared: &Shared,
    method: &str,
    headers: &[(String, String)],
    body: &[u8],
    exchange: &mut StsExchange,
) -> Reply {
    let Some(trust) = &shared.federation else {
        return ApiError::new(
            404,
            "pubsub-test-server runs without Auth::WorkloadIdentity: it has no STS endpoint."
                .into(),
        )
        .into_reply();
    };
    if let Err(refusal) = oauth_post_only(method) {
        return refusal;
    }
    if headers.iter().any(|(name, _)| name == "authorization") {
        return oauth_error(
            400,
            "invalid_request",
            "The token exchange takes no Authorization header.",
        );
    }
    let params = match exchange_params(headers, body) {
        Ok(params) => params,
        Err(reason) => return oauth_error(400, "invalid_request", &reason),
    };
    exchange.params = params
        .iter()
        .filter(|(k, _)| k != "subject_token")
        .cloned()
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some((unknown, _)) = params.iter().find(|(k, _)| {
        ![
            "grant_type",
            "audience",
            "scope",
            "requested_token_type",
            "subject_token",
            "subject_token_type",
        ]
        .contains(&k.as_str())
    }) {
        return oauth_error(
            400,
            "invalid_request",
            &format!("Parameter {unknown} is not emulated by pubsub-test-server."),
        );
    }
    match param("grant_type") {
        Some(TOKEN_EXCHANGE_GRANT) => {}
        Some(other) => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                &format!("Invalid value for \"grant_type\": {other}"),
            );
        }
        None => return oauth_error(400, "invalid_request", "Missing grant_type."),
    }
    let expected_audience = format!("//iam.googleapis.com/{}", trust.provider());
    if param("audience") != Some(expected_audience.as_str()) {
        return oauth_error(
            400,
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid. This might \
             either be because the pool or provider is disabled or deleted or because it \
             doesn't exist.",
        );
    }
    if param("requested_token_type") != Some(ACCESS_TOKEN_TYPE) {
        return oauth_error(
            400,
            "invalid_request",
            &format!("Invalid value for \"requested_token_type\": expected {ACCESS_TOKEN_TYPE}."),
        );
    }
    if !param("subject_token_type").is_some_and(|t| SUBJECT_TOKEN_TYPES.contains(&t)) {
        return oauth_error(
            400,
            "invalid_request",
            "Invalid value for \"subject_token_type\": an OIDC token is \
             urn:ietf:params:oauth:token-type:jwt (or :id_token).",
        );
    }
    let scopes: Vec<String> = param("scope")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !scopes.iter().any(|s| s == CLOUD_PLATFORM_SCOPE) {
        return oauth_error(
            400,
            "invalid_scope",
            &format!("The scope must include {CLOUD_PLATFORM_SCOPE}."),
        );
    }
    let Some(subject_token) = param("subject_token") else {
        return oauth_error(400, "invalid_request", "Missing subject_token.");
    };
    match trust.verify(subject_token) {
        Ok(jwt) => exchange.subject = Some(jwt),
        Err(reason) => return oauth_error(400, "invalid_grant", &reason),
    }
    if let Some((status, error)) = shared.lock().sts_refusal.clone() {
        return oauth_error(
            status,
            &error,
            "The token exchange was refused (pubsub-test-server set_sts_refusal).",
        );
    }
    let (token, lifetime) = issue(shared, "ya29.d.", Credential::Federated, scopes, None);
    Reply::json(
        200,
        json!({
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
        }),
    )
    .with_header("Cache-Control", "no-store")
}

/// The exchange's parameters: a form with RFC 8693's names (what Google's client
/// libraries send), or JSON with the REST reference's camelCase names.
fn exchange_params(
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    let content_type = headers
        .iter()
        .find(|(name, _)| name == "content-type")
        .and_then(|(_, value)| value.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase());
    match content_type.as_deref() {
        Some("application/x-www-form-urlencoded") => parse_form(body),
        Some("application/json") => {
            let obj = json::parse_body(body).map_err(|e| e.message)?;
            obj.into_iter()
                .map(|(key, value)| {
                    let snake = crate::json::camel_to_snake(&key);
                    match value {
                        Value::String(text) => Ok((snake, text)),
                        other => Err(format!("Invalid value for \"{key}\": {other}")),
                    }
                })
                .collect()
        }
        _ => Err("The request body must be application/x-www-form-urlencoded or JSON.".into()),
    }
}

/// Whether `path` is a `projects.serviceAccounts` method of IAM Service Account
/// Credentials.
pub(crate) fn is_iam_path(path: &str) -> bool {
    path.strip_prefix("/v1/projects/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, rest)| rest.starts_with("serviceAccounts/"))
}

/// `POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken`.
pub(crate) fn generate_access_token(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (Reply, Option<Credential>) {
    let mut record = Impersonation {
        email: String::new(),
        bearer: None,
        body: json::parse_body(body)
            .map(Value::Object)
            .unwrap_or(Value::Null),
        status: 400,
    };
    let reply = impersonate(shared, method, path, headers, body, &mut record)
        .unwrap_or_else(ApiError::into_reply);
    record.status = reply.status;
    let bearer = record.bearer.clone();
    let mut state = shared.lock();
    state.impersonations.push(record);
    shared.notify(&mut state);
    (reply, bearer)
}

fn impersonate(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    record: &mut Impersonation,
) -> Result<Reply, ApiError> {
    let Some(trust) = &shared.federation else {
        return Err(ApiError::new(
            404,
            "pubsub-test-server runs without Auth::WorkloadIdentity: it has no IAM Credentials API."
                .into(),
        ));
    };
    let rest = path.strip_prefix("/v1/projects/").unwrap_or_default();
    let (project, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let name = rest.strip_prefix("serviceAccounts/").unwrap_or_default();
    let Some((email, "generateAccessToken")) = name.split_once(':') else {
        return Err(ApiError::new(
            404,
            format!("The requested URL {path} was not found on this server."),
        ));
    };
    let email = crate::percent::percent_decode(email)
        .ok_or_else(|| ApiError::invalid(format!("Malformed percent-encoding in {path}.")))?;
    record.email.clone_from(&email);
    if method != "POST" {
        return Err(ApiError::method_not_allowed(method, "POST"));
    }
    if project != "-" {
        return Err(ApiError::invalid(
            "The - wildcard character is required in place of the project id.".into(),
        ));
    }
    // The caller: a federated token of the pool, issued by the STS here.
    let issued = match bearer_token(headers) {
        Ok(None) => return Err(ApiError::unauthenticated(true, "no Authorization header")),
        Err(reason) => return Err(ApiError::unauthenticated(false, &reason)),
        Ok(Some(token)) => match shared.lock().access_tokens.get(token) {
            Some(issued) if Instant::now() < issued.expiry => issued.clone(),
            Some(_) => return Err(ApiError::unauthenticated(false, "the access token expired")),
            None => {
                return Err(ApiError::unauthenticated(
                    false,
                    "unknown or revoked access token",
                ));
            }
        },
    };
    record.bearer = Some(issued.credential.clone());
    let denied = || {
        ApiError::new(
            403,
            format!(
                "Permission 'iam.serviceAccounts.getAccessToken' denied on resource \
                 (or it may not exist): projects/-/serviceAccounts/{email}."
            ),
        )
    };
    if issued.credential != Credential::Federated {
        return Err(denied());
    }
    if !issued.scopes.iter().any(|s| s == CLOUD_PLATFORM_SCOPE) {
        return Err(ApiError::new(
            403,
            "Request had insufficient authentication scopes.".into(),
        ));
    }
    let obj = json::parse_body(body)?;
    let obj = json::fields(&obj, &["delegates", "scope", "lifetime"], "")?;
    if !json::strings(&obj, "delegates", "")?.is_empty() {
        return Err(ApiError::invalid(
            "delegates is not emulated by pubsub-test-server.".into(),
        ));
    }
    let scopes = json::strings(&obj, "scope", "")?;
    if scopes.is_empty() {
        return Err(ApiError::invalid("Scope required.".into()));
    }
    let lifetime = json::duration(&obj, "lifetime", "")?.unwrap_or(MAX_IMPERSONATED_LIFETIME);
    if lifetime == 0 || lifetime > MAX_IMPERSONATED_LIFETIME {
        return Err(ApiError::invalid(format!(
            "The lifetime {} is out of range: at most 3600s.",
            json::format_duration(lifetime)
        )));
    }
    if !trust.may_impersonate(&email) || shared.lock().refuse_impersonation {
        return Err(denied());
    }
    let requested = Duration::from_nanos(u64::try_from(lifetime).unwrap_or(u64::MAX));
    let (token, lifetime) = issue(
        shared,
        "ya29.c.",
        Credential::Impersonated(email),
        scopes,
        Some(requested),
    );
    let expire_time = crate::time::rfc3339_nanos(SystemTime::now() + lifetime);
    Ok(Reply::json(
        200,
        json!({ "accessToken": token, "expireTime": expire_time }),
    ))
}

/// Issues an access token: it lives the server's token lifetime, or `requested` if
/// that is shorter.
fn issue(
    shared: &Shared,
    prefix: &str,
    credential: Credential,
    scopes: Vec<String>,
    requested: Option<Duration>,
) -> (String, Duration) {
    let token = format!(
        "{prefix}{}",
        URL_SAFE_NO_PAD.encode(crate::keys::random_bytes::<64>())
    );
    let mut state = shared.lock();
    let lifetime = requested.map_or(state.token_lifetime, |r| r.min(state.token_lifetime));
    state.access_tokens.insert(
        token.clone(),
        IssuedToken {
            expiry: Instant::now() + lifetime,
            credential,
            scopes,
        },
    );
    shared.notify(&mut state);
    (token, lifetime)
}
