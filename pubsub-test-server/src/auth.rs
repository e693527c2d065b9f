//! Service-account authentication as Google does it, for [`crate::Auth::Verify`]:
//!
//! * the OAuth 2.0 token endpoint (`POST /token`) of "Using OAuth 2.0 for Server to
//!   Server Applications" (<https://developers.google.com/identity/protocols/oauth2/service-account>),
//!   i.e. the JWT-bearer grant of RFC 7523: an RS256 assertion signed with the service
//!   account's key is exchanged for a short-lived access token;
//! * "Addendum: Service account authorization without OAuth" on the same page: a
//!   self-signed JWT whose `aud` is the API (`https://pubsub.googleapis.com/`) is sent
//!   directly as the bearer token.
//!
//! Error bodies of `/token` follow RFC 6749 section 5.2 as Google's endpoint sends them:
//! `{"error": "invalid_grant", "error_description": "..."}`.
//!
//! The JWTs themselves are checked by `trust::Verifier`; this module decides what a
//! verified token may do.

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use crate::oauth::{bearer_token, oauth_error, oauth_post_only, parse_form};
use crate::records::{Credential, VerifiedJwt};
use crate::reply::{ApiError, Reply};
use crate::state::{IssuedToken, Shared, State};
use crate::trust::Trust;

/// The `aud` of a self-signed JWT for Pub/Sub.
pub(crate) const PUBSUB_AUDIENCE: &str = "https://pubsub.googleapis.com/";
/// Scopes that grant Pub/Sub access: Pub/Sub's own, or the umbrella Cloud scope.
const ACCEPTED_SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/pubsub",
    "https://www.googleapis.com/auth/cloud-platform",
];
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// What a `/v1` request's `Authorization` header amounted to.
pub(crate) enum Bearer {
    /// No `Authorization` header (or the server does not verify tokens).
    Missing,
    /// A token the server accepts for Pub/Sub, and what it is.
    Valid(Credential),
    /// Not a token this server issued or can verify (401).
    Invalid(String),
    /// A valid token whose identity may not call Pub/Sub (403).
    Forbidden(String),
}

/// Checks the bearer token of a `/v1` request (only when the server verifies tokens).
pub(crate) fn check_bearer(shared: &Shared, headers: &[(String, String)]) -> Bearer {
    if !shared.requires_auth() {
        return Bearer::Missing;
    }
    let token = match bearer_token(headers) {
        Ok(Some(token)) => token,
        Ok(None) => return Bearer::Missing,
        Err(reason) => return Bearer::Invalid(reason),
    };

    // An access token this server issued?
    {
        let state = shared.lock();
        match state.access_tokens.get(token) {
            Some(issued) if Instant::now() < issued.expiry => return pubsub_access(shared, issued),
            Some(_) => return Bearer::Invalid("the access token expired".into()),
            None => {}
        }
    }
    let Some(verifier) = &shared.verifier else {
        return Bearer::Invalid("unknown or revoked access token".into());
    };
    if token.split('.').count() != 3 {
        return Bearer::Invalid("unknown or revoked access token".into());
    }

    // Otherwise it must be a self-signed service-account JWT.
    let claims = match verifier.verify(token, PUBSUB_AUDIENCE) {
        Ok(claims) => claims,
        Err(reason) => return Bearer::Invalid(reason),
    };
    // Google's self-signed JWTs name the account twice: iss = sub = client_email.
    if claims.sub.as_deref() != Some(verifier.client_email.as_str()) {
        return Bearer::Invalid("a self-signed JWT's sub must be the service account".into());
    }
    let mut state = shared.lock();
    if state.revoked_jwts.contains(token) || claims.iat < state.jwt_not_before {
        return Bearer::Invalid("the self-signed JWT was revoked".into());
    }
    if state.seen_jwts.insert(token.to_owned()) {
        record_jwt(&mut state, token);
    }
    Bearer::Valid(Credential::SelfSignedJwt)
}

/// Whether an issued, unexpired token may call Pub/Sub: its scopes must cover Pub/Sub,
/// and a federated identity needs a Pub/Sub role of its own (`direct_access`).
fn pubsub_access(shared: &Shared, issued: &IssuedToken) -> Bearer {
    if !issued
        .scopes
        .iter()
        .any(|s| ACCEPTED_SCOPES.contains(&s.as_str()))
    {
        return Bearer::Forbidden("Request had insufficient authentication scopes.".into());
    }
    let direct = shared.federation.as_ref().is_some_and(Trust::direct_access);
    if issued.credential == Credential::Federated && !direct {
        return Bearer::Forbidden(
            "The caller does not have permission (the federated identity has no Pub/Sub role; \
             pubsub-test-server Federation::direct_access is false)."
                .into(),
        );
    }
    Bearer::Valid(issued.credential.clone())
}

/// Keeps the decoded header and claims of a JWT that passed verification, so
/// tests can check what the client put in it ([`crate::PubSubTestServer::verified_jwts`]).
fn record_jwt(state: &mut State, token: &str) {
    let decode = |part: Option<&str>| {
        part.and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let mut parts = token.split('.');
    let header = decode(parts.next());
    let claims = decode(parts.next());
    state.verified_jwts.push(VerifiedJwt { header, claims });
}

/// `POST /token`: the OAuth 2.0 JWT-bearer grant.
pub(crate) fn token_endpoint(
    shared: &Shared,
    method: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Reply {
    let Some(verifier) = &shared.verifier else {
        return ApiError::new(
            404,
            "pubsub-test-server runs without Auth::Verify: it has no token endpoint.".into(),
        )
        .into_reply();
    };
    if let Err(refusal) = oauth_post_only(method) {
        return refusal;
    }
    let content_type = headers
        .iter()
        .find(|(name, _)| name == "content-type")
        .map(|(_, value)| value.to_ascii_lowercase());
    let is_form = content_type.as_deref().is_some_and(|ct| {
        ct.split(';').next().map(str::trim) == Some("application/x-www-form-urlencoded")
    });
    if !is_form {
        return oauth_error(
            400,
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded.",
        );
    }
    let form = match parse_form(body) {
        Ok(form) => form,
        Err(reason) => return oauth_error(400, "invalid_request", &reason),
    };
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match param("grant_type") {
        Some(JWT_BEARER_GRANT) => {}
        Some(other) => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            );
        }
        None => {
            return oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: grant_type",
            );
        }
    }
    let Some(assertion) = param("assertion") else {
        return oauth_error(
            400,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };

    let token_uri = format!("{}/token", shared.base_url);
    let claims = match verifier.verify(assertion, &token_uri) {
        Ok(claims) => claims,
        Err(reason) => return oauth_error(400, "invalid_grant", &reason),
    };
    if claims
        .sub
        .as_deref()
        .is_some_and(|sub| sub != verifier.client_email)
    {
        return oauth_error(
            400,
            "unauthorized_client",
            "Domain-wide delegation (a sub other than the service account) is not emulated.",
        );
    }
    let scopes: Vec<String> = claims
        .scope
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !scopes.iter().any(|s| ACCEPTED_SCOPES.contains(&s.as_str())) {
        return oauth_error(
            400,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided: the assertion's scope must \
             include https://www.googleapis.com/auth/pubsub (or .../auth/cloud-platform).",
        );
    }

    let token = format!(
        "ya29.{}",
        URL_SAFE_NO_PAD.encode(crate::keys::random_bytes::<64>())
    );
    let lifetime = {
        let mut state = shared.lock();
        record_jwt(&mut state, assertion);
        let lifetime = state.token_lifetime;
        state.access_tokens.insert(
            token.clone(),
            IssuedToken {
                expiry: Instant::now() + lifetime,
                credential: Credential::ServiceAccount,
                scopes,
            },
        );
        shared.notify(&mut state);
        lifetime
    };
    Reply::json(
        200,
        json!({
            "access_token": token,
            "expires_in": lifetime.as_secs(),
            "token_type": "Bearer",
        }),
    )
    .with_header("Cache-Control", "no-store")
}
