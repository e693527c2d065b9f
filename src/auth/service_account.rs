//! Service-account authentication for Google Cloud, as Google documents it
//! for server-to-server apps: sign a JWT with the key's RSA private key
//! (RS256, `kid` = the key's id), exchange it at the key's `token_uri` for an
//! OAuth 2.0 access token (the JWT-bearer grant), and send that token as
//! `Authorization: Bearer` (cached by [`super::TokenSource`]).
//!
//! One crypto stack: ureq's TLS already runs on `ring`, so the JWT is signed
//! with `ring` too, through jsonwebtoken's pluggable `CryptoProvider`, instead
//! of pulling in RustCrypto's `rsa` or aws-lc for the one signature we make.
//!
//! Key material never leaves this module: `ServiceAccount` has no `Debug`
//! that shows it, and no error message quotes it.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{Error as SignatureError, Signer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde::Deserialize;
use std::fmt;
use std::sync::Once;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Fresh, OAuthToken, PUBSUB_SCOPE, TokenError, request_token};

const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// A parsed service-account key file.
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    pub token_uri: String,
    pub project_id: Option<String>,
    key: EncodingKey,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Parses a key file's JSON. The error says what is wrong, never what the
    /// file contains.
    pub fn from_json(text: &str) -> Result<ServiceAccount, String> {
        #[derive(Deserialize)]
        struct KeyFile {
            #[serde(rename = "type")]
            kind: Option<String>,
            client_email: Option<String>,
            private_key_id: Option<String>,
            private_key: Option<String>,
            token_uri: Option<String>,
            project_id: Option<String>,
        }
        let file: KeyFile = serde_json::from_str(text).map_err(|err| {
            // serde_json's message quotes no input, only line and column.
            format!(
                "not a service-account key (JSON error at line {}, column {})",
                err.line(),
                err.column()
            )
        })?;
        if let Some(kind) = file
            .kind
            .as_deref()
            .filter(|kind| *kind != "service_account")
        {
            return Err(format!(
                "key type is {kind:?}, expected \"service_account\""
            ));
        }
        let missing = |field: &str| format!("the key has no {field}");
        let pem = file
            .private_key
            .filter(|k| !k.is_empty())
            .ok_or_else(|| missing("private_key"))?;
        let key = EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|_| "private_key is not an RSA private key in PEM form".to_string())?;
        RsaKeyPair::from_der(key.as_bytes())
            .map_err(|err| format!("private_key is not a usable RSA key ({err})"))?;
        Ok(ServiceAccount {
            client_email: file
                .client_email
                .filter(|e| !e.is_empty())
                .ok_or_else(|| missing("client_email"))?,
            private_key_id: file.private_key_id.unwrap_or_default(),
            token_uri: file
                .token_uri
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_TOKEN_URI.into()),
            project_id: file.project_id.filter(|p| !p.is_empty()),
            key,
        })
    }

    /// The signed assertion for the JWT-bearer grant.
    fn assertion(&self, now: u64) -> Result<String, String> {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            scope: &'a str,
            aud: &'a str,
            iat: u64,
            exp: u64,
        }
        install_ring_provider();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.private_key_id.clone()).filter(|kid| !kid.is_empty());
        let claims = Claims {
            iss: &self.client_email,
            scope: PUBSUB_SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + 3600,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|err| format!("cannot sign the token request: {err}"))
    }
}

impl ServiceAccount {
    /// A new access token: the signed assertion, exchanged at the key's
    /// `token_uri` (the JWT-bearer grant).
    pub(super) fn fetch_token(&self, agent: &ureq::Agent) -> Result<Fresh, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970")?;
        let assertion = self.assertion(now.as_secs())?;
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let uri = &self.token_uri;
        // Google's OAuth errors say what is wrong (invalid_grant: bad
        // signature, clock skew...).
        let token: OAuthToken = request_token(
            agent,
            uri,
            ("application/x-www-form-urlencoded", body.as_bytes()),
            None,
            &format!("token request to {uri} refused"),
            &[&assertion],
        )?;
        Ok(token.into())
    }
}

fn install_ring_provider() {
    static RING: CryptoProvider = CryptoProvider {
        signer_factory: ring_signer,
        verifier_factory: |_, _| Err(ErrorKind::InvalidAlgorithm.into()),
        key_utils: KeyUtils::new_unimplemented(),
    };
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = RING.install_default();
    });
}

fn ring_signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *algorithm != Algorithm::RS256 {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let pair = RsaKeyPair::from_der(key.as_bytes())
        .map_err(|err| ErrorKind::InvalidRsaKey(err.to_string()))?;
    Ok(Box::new(RingRs256(pair)))
}

struct RingRs256(RsaKeyPair);

impl Signer<Vec<u8>> for RingRs256 {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut signature,
            )
            .map_err(|_| SignatureError::new())?;
        Ok(signature)
    }
}

impl JwtSigner for RingRs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}
