//! Whom the server trusts, and how it checks their JWTs: a service account's key
//! ([`Verifier`], for [`crate::Auth::Verify`]) and a workload identity provider's OIDC
//! issuer ([`Trust`], for [`crate::Auth::WorkloadIdentity`], configured by the public
//! [`Federation`]). Both are built once when the server starts and kept in
//! [`crate::state::Shared`]; the endpoints that use them are in `auth` and `federation`.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::records::VerifiedJwt;
use crate::time::unix_now;

/// Google refuses assertions meant to live longer than an hour.
const MAX_JWT_LIFETIME: u64 = 3600;
/// Tolerated clock difference between a token's issuer and this server.
const CLOCK_SKEW: u64 = 60;

/// The account the server trusts.
pub(crate) struct Verifier {
    key: DecodingKey,
    pub(crate) client_email: String,
}

impl Verifier {
    pub(crate) fn new(public_key_pem: &str, client_email: &str) -> std::io::Result<Verifier> {
        let key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("Auth::Verify public_key_pem is not an RSA public key: {e}"),
            )
        })?;
        if client_email.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "Auth::Verify client_email is empty",
            ));
        }
        Ok(Verifier {
            key,
            client_email: client_email.to_owned(),
        })
    }

    /// Verifies an RS256 JWT of our service account for `audience`, including Google's
    /// one-hour lifetime rule. Returns its claims.
    pub(crate) fn verify(&self, token: &str, audience: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("Invalid JWT: cannot decode header ({e})."))?;
        if header.alg != Algorithm::RS256 {
            return Err(format!(
                "Invalid JWT: algorithm {:?} is not supported; service accounts sign with RS256.",
                header.alg
            ));
        }
        if header.kid.as_deref().is_none_or(str::is_empty) {
            return Err(
                "Invalid JWT: the header has no kid (the key file's private_key_id).".into(),
            );
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[&self.client_email]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = CLOCK_SKEW;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).map_err(|e| {
            match e.kind() {
                ErrorKind::InvalidSignature => "Invalid JWT Signature.".to_owned(),
                ErrorKind::ExpiredSignature => TIMEFRAME_ERROR.to_owned(),
                ErrorKind::InvalidAudience => {
                    format!("Invalid JWT: Failed audience check. The expected value is {audience}.")
                }
                ErrorKind::InvalidIssuer => format!(
                    "Invalid grant: account not found (iss must be {}).",
                    self.client_email
                ),
                other => format!("Invalid JWT: {other:?}."),
            }
        })?;
        let claims = data.claims;
        let now = unix_now();
        let sane = claims.iat <= now + CLOCK_SKEW
            && claims.exp > claims.iat
            && claims.exp - claims.iat <= MAX_JWT_LIFETIME;
        if !sane {
            return Err(TIMEFRAME_ERROR.to_owned());
        }
        Ok(claims)
    }
}

const TIMEFRAME_ERROR: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and \
     in a reasonable timeframe. Check your iat and exp values in the JWT claim.";

/// The claims of a service account's JWT that the server looks at.
#[derive(Deserialize)]
pub(crate) struct Claims {
    pub(crate) iat: u64,
    exp: u64,
    #[serde(default)]
    pub(crate) sub: Option<String>,
    #[serde(default)]
    pub(crate) scope: Option<String>,
}

/// The workload identity pool and OIDC provider the server plays, and what the pool's
/// identities may do.
#[derive(Clone, Debug)]
pub struct Federation {
    /// The provider's full name:
    /// `projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    pub provider: String,
    /// The issuer the provider trusts, e.g. `https://oidc.fly.io/ORG`
    /// ([`crate::FlyMachineApi::issuer`]).
    pub issuer: String,
    /// SPKI PEM of the issuer's signing key ([`crate::FlyMachineApi::public_key_pem`]).
    pub issuer_public_key_pem: String,
    /// Whether the pool's federated identities may call Pub/Sub themselves: a Pub/Sub
    /// role granted to the pool's `principalSet://...`. When false, Pub/Sub answers
    /// their tokens 403 `PERMISSION_DENIED`, as Google does for an identity without
    /// the permission, and only impersonated tokens work.
    pub direct_access: bool,
    /// Service accounts the pool's identities may impersonate (holders of
    /// `roles/iam.workloadIdentityUser` on them).
    pub impersonable: Vec<String>,
}

/// The provider's trust: its configuration and the issuer's decoded key.
pub(crate) struct Trust {
    federation: Federation,
    key: DecodingKey,
}

impl Trust {
    pub(crate) fn new(federation: Federation) -> std::io::Result<Trust> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let key = DecodingKey::from_rsa_pem(federation.issuer_public_key_pem.as_bytes())
            .map_err(|e| invalid(format!("Federation issuer_public_key_pem: {e}")))?;
        if federation.provider.split('/').count() != 8 || federation.issuer.is_empty() {
            return Err(invalid(format!(
                "Federation needs a provider's full name and an issuer, got {:?} and {:?}",
                federation.provider, federation.issuer
            )));
        }
        Ok(Trust { federation, key })
    }

    pub(crate) fn direct_access(&self) -> bool {
        self.federation.direct_access
    }

    /// The provider's full name (`projects/NUMBER/.../providers/PROVIDER`).
    pub(crate) fn provider(&self) -> &str {
        &self.federation.provider
    }

    /// Whether the pool's identities may impersonate the service account `email`.
    pub(crate) fn may_impersonate(&self, email: &str) -> bool {
        self.federation.impersonable.iter().any(|e| e == email)
    }

    /// Verifies an OIDC subject token as the provider does; returns it decoded, or
    /// Google-like words for what is wrong.
    pub(crate) fn verify(&self, token: &str) -> Result<VerifiedJwt, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("Unable to parse the ID Token ({e})."))?;
        if header.alg != Algorithm::RS256 || header.kid.as_deref().is_none_or(str::is_empty) {
            return Err("The ID Token must be signed with RS256 and name its key (kid).".into());
        }
        let audience = format!("https://iam.googleapis.com/{}", self.federation.provider);
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&audience]);
        validation.set_issuer(&[&self.federation.issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = CLOCK_SKEW;
        let data =
            jsonwebtoken::decode::<Value>(token, &self.key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => "Invalid ID Token signature.".to_owned(),
                    ErrorKind::ExpiredSignature => "The ID Token has expired.".to_owned(),
                    ErrorKind::InvalidAudience => format!(
                        "The audience in ID Token does not match the expected audience {audience}."
                    ),
                    ErrorKind::InvalidIssuer => format!(
                        "The issuer in ID Token does not match the expected issuer {}.",
                        self.federation.issuer
                    ),
                    other => format!("Invalid ID Token: {other:?}."),
                }
            })?;
        let claims = data.claims;
        let now = unix_now();
        if claims["iat"]
            .as_u64()
            .is_none_or(|iat| iat > now + CLOCK_SKEW)
        {
            return Err("The ID Token was issued in the future.".into());
        }
        if claims["sub"].as_str().is_none_or(str::is_empty) {
            return Err("The ID Token has no subject.".into());
        }
        let header = serde_json::to_value(&header).unwrap_or(Value::Null);
        Ok(VerifiedJwt { header, claims })
    }
}
