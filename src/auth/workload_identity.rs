//! Keyless authentication on Fly: Google's Workload Identity Federation with
//! the Fly Machine's own OIDC token, so no key exists anywhere. Each new
//! access token takes two or three requests:
//!
//! 1. **Fly**: `POST /v1/tokens/oidc` with `{"aud": "https://iam.googleapis.com/<provider>"}`
//!    on the Machine API's Unix socket (`FLY_API_SOCKET`, `/.fly/api` on a
//!    Machine). The answer's body is a JWT signed by Fly, issued by
//!    `https://oidc.fly.io/<org>`, naming this Machine (`sub` = org:app:machine).
//!    The audience is Google's default for an OIDC provider: its full name
//!    behind `https://iam.googleapis.com/`.
//! 2. **Google STS** (`POST {GOOGLE_STS_ENDPOINT}/v1/token`, RFC 8693 token
//!    exchange): the JWT for a *federated* access token of the pool's
//!    identity. The provider checks the JWT's issuer, audience and attribute
//!    condition. Sent as a form, as Google's own client libraries do.
//! 3. **Optionally, IAM Credentials** (`generateAccessToken`, with the
//!    federated token as the bearer): a token of the service account named by
//!    `GOOGLE_IMPERSONATE_SERVICE_ACCOUNT`, for resources granted to that
//!    account rather than to the pool's identities.
//!
//! The Fly token is asked for anew at every exchange: it is used once,
//! within seconds, and only the token Pub/Sub is called with is cached (by
//! [`super::TokenSource`], like the key path's).

use serde::Deserialize;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{CLOUD_PLATFORM_SCOPE, Fresh, OAuthToken, TokenError, refusal, request_token};

/// Google's name for a workload identity provider, as a template for errors.
const PROVIDER_SHAPE: &str =
    "projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER";
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Google's longest impersonated-token lifetime without an organization
/// policy that allows more.
const IMPERSONATED_LIFETIME: &str = "3600s";
/// Bounds of the Fly Machine API call: a local socket answers at once, and a
/// JWT is a couple of kilobytes.
const FLY_API_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_FLY_TOKEN: usize = 64 * 1024;

/// Where and how to exchange the Fly Machine's identity for Google tokens.
/// Holds names and addresses only: nothing here is secret.
#[derive(Debug)]
pub struct WorkloadIdentity {
    /// `projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    pub provider: String,
    /// The service account to act as, or None to call Pub/Sub as the pool's
    /// federated identity.
    pub impersonate: Option<String>,
    /// The Fly Machine API's Unix socket.
    pub fly_api_socket: PathBuf,
    /// Base URLs, without a trailing slash.
    pub sts_endpoint: String,
    pub iamcredentials_endpoint: String,
}

impl WorkloadIdentity {
    /// The `aud` of the Fly token: the provider's default allowed audience.
    pub fn fly_audience(&self) -> String {
        format!("https://iam.googleapis.com/{}", self.provider)
    }

    /// The `audience` of the STS exchange: the provider's full resource name.
    pub fn sts_audience(&self) -> String {
        format!("//iam.googleapis.com/{}", self.provider)
    }

    pub(super) fn fetch_token(&self, agent: &ureq::Agent) -> Result<Fresh, TokenError> {
        let fly_token = self.fly_token()?;
        let federated = self.exchange(agent, &fly_token)?;
        match &self.impersonate {
            None => Ok(federated),
            Some(email) => self.impersonate(agent, email, &federated.value),
        }
    }

    /// Step 1: this Machine's OIDC token from the Fly Machine API.
    fn fly_token(&self) -> Result<String, TokenError> {
        let socket = self.fly_api_socket.display();
        let body = serde_json::json!({ "aud": self.fly_audience() }).to_string();
        let answer = crate::unix_http::post(
            &self.fly_api_socket,
            "/v1/tokens/oidc",
            "application/json",
            body.as_bytes(),
            FLY_API_TIMEOUT,
            MAX_FLY_TOKEN,
        )
        .map_err(|err| format!("no OIDC token from the Fly Machine API: {err}"))?;
        let text = String::from_utf8_lossy(&answer.body);
        if answer.status != 200 {
            return Err(TokenError::answered(
                answer.status,
                format!(
                    "the Fly Machine API at {socket} refused the OIDC token request: {}",
                    refusal(answer.status, &text, &[])
                ),
            ));
        }
        // The documented answer is the raw JWT; a JSON string is taken too.
        let text = text.trim();
        let token = match text.strip_prefix('"') {
            Some(_) => serde_json::from_str::<String>(text).unwrap_or_default(),
            None => text.to_string(),
        };
        if !is_jwt(&token) {
            return Err(TokenError::from(format!(
                "the Fly Machine API at {socket} answered 200 with something that is not a JWT ({} bytes)",
                answer.body.len()
            )));
        }
        Ok(token)
    }

    /// Step 2: the Fly token for a federated access token, at Google's STS.
    fn exchange(&self, agent: &ureq::Agent, fly_token: &str) -> Result<Fresh, TokenError> {
        let url = format!("{}/v1/token", self.sts_endpoint);
        let audience = self.sts_audience();
        let form = form_encode(&[
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("audience", &audience),
            ("scope", CLOUD_PLATFORM_SCOPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("subject_token", fly_token),
            ("subject_token_type", JWT_TOKEN_TYPE),
        ]);
        // Google: the exchange must not carry an Authorization header.
        let token: OAuthToken = request_token(
            agent,
            &url,
            ("application/x-www-form-urlencoded", form.as_bytes()),
            None,
            &format!(
                "the Security Token Service ({url}) refused the Fly token for {}",
                self.provider
            ),
            &[fly_token],
        )?;
        Ok(token.into())
    }

    /// Step 3: the federated token for a service account's access token.
    fn impersonate(
        &self,
        agent: &ureq::Agent,
        email: &str,
        federated: &str,
    ) -> Result<Fresh, TokenError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct GenerateAccessTokenResponse {
            access_token: String,
            expire_time: String,
        }
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
            self.iamcredentials_endpoint
        );
        let body = serde_json::json!({
            "scope": [CLOUD_PLATFORM_SCOPE],
            "lifetime": IMPERSONATED_LIFETIME,
        })
        .to_string();
        let answer: GenerateAccessTokenResponse = request_token(
            agent,
            &url,
            ("application/json", body.as_bytes()),
            Some(federated),
            &format!("generateAccessToken for {email} ({url}) refused"),
            &[federated],
        )?;
        let expires = parse_rfc3339(&answer.expire_time).ok_or_else(|| {
            format!(
                "the answer of {url} has an expireTime that is not an RFC 3339 time: {:?}",
                answer.expire_time.chars().take(40).collect::<String>()
            )
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970")?
            .as_secs();
        Ok(Fresh {
            value: answer.access_token,
            lifetime: Duration::from_secs(expires.saturating_sub(now)),
        })
    }

    /// Checks a workload identity provider's full name; the error says what is
    /// wrong with it (it is a name, not a secret, so it may be quoted).
    pub fn check_provider(name: &str) -> Result<(), String> {
        if let Some(prefix) = ["//iam.googleapis.com/", "https://iam.googleapis.com/"]
            .iter()
            .find(|prefix| name.starts_with(*prefix))
        {
            return Err(format!(
                "expected {PROVIDER_SHAPE}, without {prefix} in front"
            ));
        }
        let segments: Vec<&str> = name.split('/').collect();
        let [
            "projects",
            number,
            "locations",
            location,
            "workloadIdentityPools",
            pool,
            "providers",
            provider,
        ] = segments.as_slice()
        else {
            return Err(format!("expected {PROVIDER_SHAPE}"));
        };
        if number.is_empty() || number.len() > 20 || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{number:?} is not a project number (the provider's name has the project's number, not its id; \
                 gcloud projects describe PROJECT shows it)"
            ));
        }
        if *location != "global" {
            return Err(format!(
                "location {location:?}: workload identity pools are always in \"global\""
            ));
        }
        for (what, id) in [("pool", pool), ("provider", provider)] {
            let valid = (4..=32).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !id.starts_with("gcp-");
            if !valid {
                return Err(format!(
                    "{what} id {id:?}: expected 4-32 of a-z 0-9 -, not starting with gcp-"
                ));
            }
        }
        Ok(())
    }

    /// Checks the shape of a service account's email: an impersonated account
    /// is always one of Google's `...gserviceaccount.com` accounts.
    pub fn check_service_account_email(email: &str) -> Result<(), String> {
        let label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let valid = email.split_once('@').is_some_and(|(name, domain)| {
            label(name)
                && (domain == "gserviceaccount.com" || domain.ends_with(".gserviceaccount.com"))
                && domain.split('.').all(label)
        });
        if valid {
            Ok(())
        } else {
            Err(
                "expected a service account's email, like NAME@PROJECT.iam.gserviceaccount.com"
                    .into(),
            )
        }
    }
}

/// Three non-empty base64url segments: the shape of a signed JWT.
fn is_jwt(token: &str) -> bool {
    let segments: Vec<&str> = token.split('.').collect();
    segments.len() == 3
        && segments.iter().all(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `application/x-www-form-urlencoded`, percent-encoding everything but
/// RFC 3986's unreserved characters.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Seconds since the Unix epoch of an RFC 3339 time as Google's JSON writes
/// them (`2026-11-29T21:06:00Z`, `...00.123456789Z`, or with a `+hh:mm`
/// offset); fractions of a second are dropped. None when malformed.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let number = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (date, time) = text.split_once(['T', 't'])?;
    let mut ymd = date.splitn(3, '-');
    let (year, month, day) = (
        number(ymd.next()?)?,
        number(ymd.next()?)?,
        number(ymd.next()?)?,
    );
    let (clock, offset) = match time.strip_suffix(['Z', 'z']) {
        Some(clock) => (clock, 0),
        None => {
            let at = time.rfind(['+', '-'])?;
            let (hours, minutes) = time[at + 1..].split_once(':')?;
            let sign = if time.as_bytes()[at] == b'-' { -1 } else { 1 };
            (
                &time[..at],
                sign * (number(hours)? * 3600 + number(minutes)? * 60),
            )
        }
    };
    let clock = clock.split_once('.').map_or(clock, |(whole, fraction)| {
        if number(fraction).is_some() {
            whole
        } else {
            ""
        }
    });
    let mut hms = clock.splitn(3, ':');
    let (hour, minute, second) = (
        number(hms.next()?)?,
        number(hms.next()?)?,
        number(hms.next()?)?,
    );
    let in_range = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && minute < 60
        && second <= 60;
    if !in_range {
        return None;
    }
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(seconds).ok()
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDER: &str =
        "projects/123456789012/locations/global/workloadIdentityPools/fly-pool/providers/fly-org";

    #[test]
    fn provider_names_are_checked_part_by_part() {
        assert_eq!(WorkloadIdentity::check_provider(PROVIDER), Ok(()));
        let cases = [
            ("", "expected projects/NUMBER"),
            (
                "projects/1/locations/global/workloadIdentityPools/pool",
                "expected projects/NUMBER",
            ),
            (
                &format!("//iam.googleapis.com/{PROVIDER}"),
                "without //iam.googleapis.com/",
            ),
            (
                &format!("https://iam.googleapis.com/{PROVIDER}"),
                "without https://",
            ),
            (&format!("{PROVIDER}/"), "expected projects/NUMBER"),
            (
                "projects/my-project/locations/global/workloadIdentityPools/fly-pool/providers/fly-org",
                "not a project number",
            ),
            (
                "projects/1/locations/europe-west1/workloadIdentityPools/fly-pool/providers/fly-org",
                "always in \"global\"",
            ),
            (
                "projects/1/locations/global/workloadIdentityPools/fly/providers/fly-org",
                "pool id",
            ),
            (
                "projects/1/locations/global/workloadIdentityPools/Fly-Pool/providers/fly-org",
                "pool id",
            ),
            (
                "projects/1/locations/global/workloadIdentityPools/gcp-pool/providers/fly-org",
                "pool id",
            ),
            (
                "projects/1/locations/global/workloadIdentityPools/fly-pool/providers/fly_org",
                "provider id",
            ),
            (
                "projects/1/locations/global/workloadIdentityPools/fly-pool/providers/a-very-long-provider-name-of-33-c",
                "provider id",
            ),
        ];
        for (name, expected) in cases {
            let err = WorkloadIdentity::check_provider(name).expect_err(name);
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn service_account_emails_are_checked() {
        for good in [
            "skywatch@my-project.iam.gserviceaccount.com",
            "123456789012-compute@developer.gserviceaccount.com",
            "my-project@appspot.gserviceaccount.com",
        ] {
            assert_eq!(
                WorkloadIdentity::check_service_account_email(good),
                Ok(()),
                "{good}"
            );
        }
        for bad in [
            "",
            "skywatch",
            "skywatch@",
            "@my-project.iam.gserviceaccount.com",
            "someone@gmail.com",
            "Skywatch@my-project.iam.gserviceaccount.com",
            "a@b@my-project.iam.gserviceaccount.com",
            "sky watch@my-project.iam.gserviceaccount.com",
            "skywatch@my-project..iam.gserviceaccount.com",
            "skywatch@my-project.iam.gserviceaccount.com/x",
            "skywatch@evil.com?x=.gserviceaccount.com",
        ] {
            assert!(
                WorkloadIdentity::check_service_account_email(bad).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn audiences_follow_googles_two_forms() {
        let identity = WorkloadIdentity {
            provider: PROVIDER.into(),
            impersonate: None,
            fly_api_socket: "/.fly/api".into(),
            sts_endpoint: "https://sts.googleapis.com".into(),
            iamcredentials_endpoint: "https://iamcredentials.googleapis.com".into(),
        };
        assert_eq!(
            identity.fly_audience(),
            format!("https://iam.googleapis.com/{PROVIDER}")
        );
        assert_eq!(
            identity.sts_audience(),
            format!("//iam.googleapis.com/{PROVIDER}")
        );
    }

    #[test]
    fn forms_percent_encode_all_but_unreserved_characters() {
        assert_eq!(
            form_encode(&[
                ("audience", "//iam.googleapis.com/p"),
                ("t", "a.b-c_d~e f+g")
            ]),
            "audience=%2F%2Fiam.googleapis.com%2Fp&t=a.b-c_d~e%20f%2Bg"
        );
        assert_eq!(
            form_encode(&[("grant_type", TOKEN_EXCHANGE_GRANT)]),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
        );
    }

    #[test]
    fn jwts_are_three_base64url_segments() {
        assert!(is_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "a..c",
            "a.b.c\n",
            "a.b.c=",
            "{\"error\":1}",
        ] {
            assert!(!is_jwt(bad), "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_times_as_google_writes_them() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-27T22:40:01Z"), Some(1_795_819_201));
        assert_eq!(
            parse_rfc3339("2026-11-27T22:40:01.123456789Z"),
            Some(1_795_819_201)
        );
        assert_eq!(parse_rfc3339("2000-02-29T12:34:56Z"), Some(951_827_696));
        assert_eq!(
            parse_rfc3339("2026-11-28T00:40:01+02:00"),
            Some(1_795_819_201)
        );
        assert_eq!(
            parse_rfc3339("2026-11-27T21:40:01-01:00"),
            Some(1_795_819_201)
        );
        for bad in [
            "",
            "2026-11-27",
            "2026-11-27T22:40:01",
            "2026-13-01T00:00:00Z",
            "2026-11-27T25:00:00Z",
            "2026-11-27T22:40:01.Z",
            "2026-11-27T22:40Z",
            "tomorrow",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
