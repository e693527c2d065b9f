//! What the server hands back to tests: the log of requests answered
//! ([`RequestRecord`]), what a bearer token was accepted as ([`Credential`]), the JWTs
//! it verified ([`VerifiedJwt`]) and the federation calls it answered ([`StsExchange`],
//! [`Impersonation`]). Public, re-exported at the crate root; plain data that uses no
//! other module of the crate.

use serde_json::Value;

/// What a bearer token was accepted as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// An access token from `/token` (the service-account JWT-bearer grant).
    ServiceAccount,
    /// A self-signed service-account JWT.
    SelfSignedJwt,
    /// A federated access token from the STS endpoint.
    Federated,
    /// A token of this service account (its email) from `generateAccessToken`.
    Impersonated(String),
}

/// One HTTP request the server answered, in arrival order of completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, e.g. `"POST"`.
    pub method: String,
    /// The percent-encoded request path without the query, including any `:verb`,
    /// e.g. `"/v1/projects/p/subscriptions/s:pull"`.
    pub path: String,
    /// The HTTP status code answered.
    pub status: u16,
    /// Whether the request carried a bearer token that this server accepted. Always
    /// `false` in [`crate::Auth::None`] mode (nothing is verified) and for `/token` itself.
    pub authorized: bool,
    /// What the accepted bearer token was (None when `authorized` is false).
    pub credential: Option<Credential>,
}

/// A JWT the server verified (signature, issuer, audience, lifetime): a
/// `/token` assertion or a self-signed bearer token, decoded so tests can look
/// at exactly what the client claimed.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedJwt {
    /// The JOSE header, e.g. `{"alg":"RS256","typ":"JWT","kid":"..."}`.
    pub header: Value,
    /// The claims, e.g. `{"iss":..,"aud":..,"scope":..,"iat":..,"exp":..}`.
    pub claims: Value,
}

/// A token exchange the STS endpoint answered: the parameters it received (the subject
/// token itself left out), the subject token's claims if it verified, and the answer.
#[derive(Clone, Debug, PartialEq)]
pub struct StsExchange {
    /// The request's parameters by their RFC 8693 (snake_case) names, e.g.
    /// `grant_type`, `audience`, `scope`, `requested_token_type`, `subject_token_type`.
    pub params: Vec<(String, String)>,
    /// The subject token, decoded, when its signature and claims verified.
    pub subject: Option<VerifiedJwt>,
    /// The HTTP status answered.
    pub status: u16,
}

impl StsExchange {
    /// The parameter `name`, if the request had it.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A `generateAccessToken` call the server answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Impersonation {
    /// The service account asked for.
    pub email: String,
    /// What the bearer token was accepted as (None: missing or refused).
    pub bearer: Option<Credential>,
    /// The request body as received.
    pub body: Value,
    /// The HTTP status answered.
    pub status: u16,
}
