//! Keyless auth on Fly (issue 13): the real binary gets its Machine's OIDC token from a
//! stand-in Fly Machine API on a Unix socket in a temp dir, exchanges it at the test
//! server's STS (and, when asked, for a service account's token at its
//! generateAccessToken), and calls Pub/Sub with what it got. No key exists anywhere.

mod support;

use std::time::Duration;

use pubsub_test_server::{
    Auth, Credential, Federation, FlyMachineApi, Options, PubSubTestServer, RequestRecord,
    generate_test_key,
};
use support::{Server, TempDir, assert_config_error, get};

const PROJECT: &str = support::PUBSUB_PROJECT;
const PROVIDER: &str =
    "projects/123456789012/locations/global/workloadIdentityPools/fly-pool/providers/fly-acme";
const EMAIL: &str = "skywatch@skywatch-test.iam.gserviceaccount.com";
const EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Bound for an instance to get its token, create its subscription and be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for an instance to notice that a refusal was lifted: a missing token
/// waits for a person, so it is retried slowly (at most 30 s apart).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(35);

/// A Fly Machine API stand-in and a test server that trusts it, as one Fly org and
/// one Google project would be set up.
struct Keyless {
    // Dropped in this order: the servers first, then their socket's directory.
    ts: PubSubTestServer,
    fly: FlyMachineApi,
    _dir: TempDir,
}

impl Keyless {
    /// `impersonate`: the pool's identities may only act through this service
    /// account (no Pub/Sub role of their own); None: they hold the role themselves.
    fn start(label: &str, impersonate: Option<&str>, max_pull_hold: Duration) -> Keyless {
        let dir = TempDir::new(label);
        let key = generate_test_key().expect("generate an RSA key with openssl");
        let fly = FlyMachineApi::start(
            &dir.path().join("api.sock"),
            &key,
            "acme",
            "skywatch",
            "e2865013b63d68",
        )
        .expect("start the Fly Machine API stand-in");
        let ts = PubSubTestServer::start(Options {
            auth: Auth::WorkloadIdentity(Federation {
                provider: PROVIDER.into(),
                issuer: fly.issuer(),
                issuer_public_key_pem: fly.public_key_pem().to_owned(),
                direct_access: impersonate.is_none(),
                impersonable: impersonate.iter().map(|e| e.to_string()).collect(),
            }),
            max_pull_hold,
            ..Options::default()
        })
        .expect("start pubsub-test-server");
        Keyless { ts, fly, _dir: dir }
    }

    fn env(&self, alloc: &str, region: &str, impersonate: Option<&str>) -> Vec<(String, String)> {
        let base = self.ts.base_url();
        let mut env = vec![
            ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER".into(), PROVIDER.into()),
            ("PUBSUB_PROJECT_ID".into(), PROJECT.into()),
            ("PUBSUB_ENDPOINT".into(), base.clone()),
            ("GOOGLE_STS_ENDPOINT".into(), base.clone()),
            ("GOOGLE_IAMCREDENTIALS_ENDPOINT".into(), base),
            (
                "FLY_API_SOCKET".into(),
                self.fly.socket_path().display().to_string(),
            ),
            ("FLY_ALLOC_ID".into(), alloc.into()),
            ("FLY_REGION".into(), region.into()),
            ("ALERTS_PER_SECOND".into(), "1000".into()),
            ("ALERT_BURST".into(), "1000".into()),
            // These tests count calls; heartbeats would add their own.
            ("PRESENCE_INTERVAL_SECS".into(), "0".into()),
        ];
        if let Some(email) = impersonate {
            env.push(("GOOGLE_IMPERSONATE_SERVICE_ACCOUNT".into(), email.into()));
        }
        env
    }

    fn wait_subscribed(&self, server: &Server, alloc: &str) {
        self.wait_subscribed_within(server, alloc, READY_TIMEOUT);
    }

    fn wait_subscribed_within(&self, server: &Server, alloc: &str, within: Duration) {
        let sub = format!("projects/{PROJECT}/subscriptions/ID_{alloc}");
        let found = self
            .ts
            .wait_for(within, |s| s.subscriptions().contains(&sub));
        assert!(
            found,
            "{sub} not created; exchanges {:#?}\nrequests {:#?}\n{}",
            self.ts.sts_exchanges(),
            self.ts.requests(),
            server.logs()
        );
        server.wait_ready(within);
    }

    /// Every exchange asked for what Skywatch must ask for, with a Fly token for
    /// Google's default audience, and was answered `status`.
    fn assert_exchanges(&self, status: u16) {
        let exchanges = self.ts.sts_exchanges();
        assert!(!exchanges.is_empty(), "no token exchange");
        for exchange in &exchanges {
            let expected = [
                ("grant_type", EXCHANGE_GRANT.to_string()),
                ("audience", format!("//iam.googleapis.com/{PROVIDER}")),
                (
                    "scope",
                    "https://www.googleapis.com/auth/cloud-platform".into(),
                ),
                (
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:access_token".into(),
                ),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:jwt".into(),
                ),
            ];
            for (name, value) in expected {
                assert_eq!(exchange.param(name), Some(value.as_str()), "{exchange:#?}");
            }
            assert_eq!(exchange.status, status, "{exchange:#?}");
            let subject = exchange.subject.as_ref().expect("the Fly token verified");
            assert_eq!(
                subject.claims["aud"],
                format!("https://iam.googleapis.com/{PROVIDER}")
            );
            assert_eq!(subject.claims["iss"], "https://oidc.fly.io/acme");
        }
        let aud = format!("https://iam.googleapis.com/{PROVIDER}");
        let asked = self.fly.requests();
        assert!(
            asked
                .iter()
                .all(|r| r.aud.as_deref() == Some(aud.as_str()) && r.status == 200),
            "{asked:#?}"
        );
    }

    /// Every Pub/Sub call carried a token the test server issued as `credential`.
    fn assert_pubsub_calls_carried(&self, credential: &Credential, logs: &str) {
        let pubsub: Vec<RequestRecord> = self
            .ts
            .requests()
            .into_iter()
            .filter(|r| {
                r.path.starts_with("/v1/projects/") && !r.path.contains("/serviceAccounts/")
            })
            .collect();
        assert!(!pubsub.is_empty(), "no Pub/Sub call");
        let other: Vec<&RequestRecord> = pubsub
            .iter()
            .filter(|r| r.credential.as_ref() != Some(credential))
            .collect();
        assert!(
            other.is_empty(),
            "calls without a {credential:?} token: {other:#?}\n{logs}"
        );
    }
}

/// No token material in `text`: every JWT starts with `eyJ` (base64 of `{"`), and
/// every access token the test server issues with `ya29.`.
fn assert_no_tokens(text: &str) {
    for marker in ["eyJ", "ya29."] {
        assert!(
            !text.contains(marker),
            "token material ({marker}...) in:\n{text}"
        );
    }
}

fn alert_crosses(from: &Server, to: &Server, timestamp: u64) {
    let mut sender = from.client();
    let mut receiver = to.client();
    sender.send_alert(timestamp);
    for client in [&mut sender, &mut receiver] {
        let alert = client.next_alert();
        assert_eq!(alert["timestamp"].as_u64(), Some(timestamp), "{alert}");
    }
}

#[test]
fn keyless_without_impersonation_joins_two_instances() {
    let k = Keyless::start("keyless-direct", None, Duration::from_secs(10));
    let a = Server::start_owned(&k.env("kl0000a1", "ams", None));
    let b = Server::start_owned(&k.env("kl0000b2", "syd", None));
    for server in [&a, &b] {
        let logs = server.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("broker: pubsub, keyless auth"))
            .unwrap_or_else(|| panic!("no keyless start line:\n{logs}"));
        assert!(
            line.contains(PROVIDER) && line.contains("no impersonation"),
            "{line}"
        );
    }
    k.wait_subscribed(&a, "kl0000a1");
    k.wait_subscribed(&b, "kl0000b2");
    alert_crosses(&a, &b, 1_700_000_000_101);

    // One exchange per instance (the token is cached), all as Google wants them.
    k.assert_exchanges(200);
    assert_eq!(k.ts.sts_exchanges().len(), 2, "{:#?}", k.ts.sts_exchanges());
    assert_eq!(k.fly.requests().len(), 2);
    assert!(k.ts.impersonations().is_empty());
    let logs = format!("{}{}", a.logs(), b.logs());
    k.assert_pubsub_calls_carried(&Credential::Federated, &logs);
    assert_no_tokens(&logs);
}

#[test]
fn keyless_with_impersonation_calls_pubsub_as_the_service_account() {
    let k = Keyless::start("keyless-impersonate", Some(EMAIL), Duration::from_secs(10));
    let a = Server::start_owned(&k.env("kl0000c3", "ams", Some(EMAIL)));
    let b = Server::start_owned(&k.env("kl0000d4", "sin", Some(EMAIL)));
    assert!(
        a.logs().contains(&format!("impersonating {EMAIL}")),
        "{}",
        a.logs()
    );
    k.wait_subscribed(&a, "kl0000c3");
    k.wait_subscribed(&b, "kl0000d4");
    alert_crosses(&b, &a, 1_700_000_000_102);

    k.assert_exchanges(200);
    let impersonations = k.ts.impersonations();
    assert_eq!(impersonations.len(), 2, "{impersonations:#?}");
    for call in &impersonations {
        assert_eq!(
            (call.email.as_str(), call.status, &call.bearer),
            (EMAIL, 200, &Some(Credential::Federated)),
            "{call:#?}"
        );
        assert_eq!(
            call.body,
            serde_json::json!({
                "scope": ["https://www.googleapis.com/auth/cloud-platform"],
                "lifetime": "3600s"
            })
        );
    }
    let logs = format!("{}{}", a.logs(), b.logs());
    k.assert_pubsub_calls_carried(&Credential::Impersonated(EMAIL.into()), &logs);
    assert_no_tokens(&logs);
}

#[test]
fn tokens_near_expiry_are_renewed_ahead_of_time() {
    // Pulls come back every second, so calls are frequent enough to meet the
    // renewal point of tokens that live 4 s (renewed half-way, after ~2 s).
    let k = Keyless::start("keyless-renewal", Some(EMAIL), Duration::from_secs(1));
    k.ts.set_access_token_lifetime(Duration::from_secs(4));
    let server = Server::start_owned(&k.env("kl0000e5", "ams", Some(EMAIL)));
    k.wait_subscribed(&server, "kl0000e5");

    let renewed = k.ts.wait_for(Duration::from_secs(20), |s| {
        s.impersonations()
            .iter()
            .filter(|c| c.status == 200)
            .count()
            >= 4
    });
    assert!(renewed, "tokens not renewed: {:#?}", k.ts.impersonations());
    let mut client = server.client();
    client.send_alert(1_700_000_000_103);
    assert_eq!(
        client.next_alert()["timestamp"].as_u64(),
        Some(1_700_000_000_103)
    );
    // Renewed before expiry: the test server refuses an expired token with 401,
    // and no call was refused.
    let refused: Vec<RequestRecord> =
        k.ts.requests()
            .into_iter()
            .filter(|r| r.status == 401 || r.status == 403)
            .collect();
    assert!(refused.is_empty(), "{refused:#?}\n{}", server.logs());
    k.assert_pubsub_calls_carried(&Credential::Impersonated(EMAIL.into()), &server.logs());
    // Reused, not fetched per call.
    let tokens = k.ts.impersonations().len();
    let calls =
        k.ts.requests()
            .iter()
            .filter(|r| r.credential.is_some())
            .count();
    assert!(calls >= 2 * tokens, "{tokens} tokens for {calls} calls");
    k.assert_exchanges(200);
    assert_no_tokens(&server.logs());
}

#[test]
fn a_failed_renewal_keeps_using_the_token_while_it_is_valid() {
    // Tokens live 30 s: renewed after 15 s, used to the last ~27 s, so the
    // alert below has some 12 s to go through on the old token.
    let k = Keyless::start("keyless-stale", None, Duration::from_secs(1));
    k.ts.set_access_token_lifetime(Duration::from_secs(30));
    let server = Server::start_owned(&k.env("kl0000b8", "ams", None));
    k.wait_subscribed(&server, "kl0000b8");
    let first = k.ts.sts_exchanges().len();
    // From now on the exchange fails, as in an STS outage.
    k.ts.set_sts_refusal(Some((503, "temporarily_unavailable")));
    assert!(
        server.wait_for_log("cannot renew the access token", 3 * READY_TIMEOUT),
        "{}",
        server.logs()
    );
    assert!(k.ts.sts_exchanges().len() > first);
    // The instance carries on with the token it has: an alert goes through,
    // /readyz stays 200, and no Pub/Sub call went without a valid token.
    let mut client = server.client();
    client.send_alert(1_700_000_000_107);
    assert_eq!(
        client.next_alert()["timestamp"].as_u64(),
        Some(1_700_000_000_107)
    );
    assert_eq!(get(server.addr, "/readyz").status, 200);
    let refused: Vec<RequestRecord> =
        k.ts.requests()
            .into_iter()
            .filter(|r| r.status == 401)
            .collect();
    assert!(refused.is_empty(), "{refused:#?}\n{}", server.logs());
    assert_no_tokens(&server.logs());
}

#[test]
fn a_refused_exchange_keeps_the_instance_unready_until_lifted() {
    let k = Keyless::start("keyless-refused", None, Duration::from_secs(10));
    k.ts.set_sts_refusal(Some((400, "invalid_grant")));
    let server = Server::start_owned(&k.env("kl0000f6", "ams", None));
    assert!(
        server.wait_for_log("400 invalid_grant", READY_TIMEOUT),
        "the refusal's status is not logged:\n{}",
        server.logs()
    );
    // Retried, and still not ready, saying why.
    assert!(
        k.ts.wait_for(RECOVERY_TIMEOUT, |s| s.sts_exchanges().len() >= 3),
        "not retried: {:#?}",
        k.ts.sts_exchanges()
    );
    let ready = get(server.addr, "/readyz");
    assert_eq!(ready.status, 503);
    let why = ready.body_text();
    assert!(
        why.contains("no access token: the token endpoint answered 400"),
        "/readyz does not say why: {why:?}"
    );
    // Public, so brief: the provider's name is in the log, not here.
    assert!(
        !why.contains("workloadIdentityPools"),
        "/readyz names the provider: {why:?}"
    );
    assert_no_tokens(&why);
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("400 invalid_grant"))
        .unwrap_or_default();
    assert!(
        line.contains("Security Token Service") && line.contains("set_sts_refusal"),
        "Google's explanation is not in the log line: {line}"
    );
    assert_no_tokens(&logs);
    assert!(k.ts.subscriptions().is_empty());

    k.ts.set_sts_refusal(None);
    k.wait_subscribed_within(&server, "kl0000f6", RECOVERY_TIMEOUT);
    let mut client = server.client();
    client.send_alert(1_700_000_000_104);
    assert_eq!(
        client.next_alert()["timestamp"].as_u64(),
        Some(1_700_000_000_104)
    );
    assert_no_tokens(&server.logs());
}

#[test]
fn a_refused_impersonation_is_logged_with_googles_status_and_recovers() {
    let k = Keyless::start("keyless-iam-refused", Some(EMAIL), Duration::from_secs(10));
    k.ts.set_impersonation_refusal(true);
    let server = Server::start_owned(&k.env("kl0000a7", "ams", Some(EMAIL)));
    assert!(
        server.wait_for_log("403 PERMISSION_DENIED", READY_TIMEOUT),
        "the refusal's status is not logged:\n{}",
        server.logs()
    );
    let ready = get(server.addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert!(
        ready
            .body_text()
            .contains("no access token: the token endpoint answered 403"),
        "/readyz does not say why: {:?}",
        ready.body_text()
    );
    let logs = server.logs();
    assert!(
        logs.contains(&format!("generateAccessToken for {EMAIL}"))
            && logs.contains("iam.serviceAccounts.getAccessToken"),
        "{logs}"
    );
    assert_no_tokens(&logs);

    k.ts.set_impersonation_refusal(false);
    k.wait_subscribed_within(&server, "kl0000a7", RECOVERY_TIMEOUT);
    assert_no_tokens(&server.logs());
}

#[test]
fn a_missing_fly_api_socket_is_logged_and_leaves_the_instance_unready() {
    let k = Keyless::start("keyless-no-socket", None, Duration::from_secs(10));
    let mut env = k.env("kl0000b8", "ams", None);
    let missing = k.fly.socket_path().with_file_name("missing.sock");
    env.retain(|(name, _)| name != "FLY_API_SOCKET");
    env.push(("FLY_API_SOCKET".into(), missing.display().to_string()));
    let server = Server::start_owned(&env);
    assert!(
        server.wait_for_log("no OIDC token from the Fly Machine API", READY_TIMEOUT),
        "{}",
        server.logs()
    );
    assert!(server.logs().contains("missing.sock"), "{}", server.logs());
    assert_eq!(get(server.addr, "/readyz").status, 503);
    assert!(k.ts.sts_exchanges().is_empty());
}

// ---------------------------------------------------------------------------
// What can be checked before the first call stops the server (exit 2)
// ---------------------------------------------------------------------------

#[test]
fn keyless_configuration_mistakes_exit_2_naming_the_variable() {
    let provider = ("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", PROVIDER);
    let project = ("PUBSUB_PROJECT_ID", PROJECT);
    assert_config_error(
        &[("GOOGLE_WORKLOAD_IDENTITY_PROVIDER", "fly-acme"), project],
        "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
    );
    assert_config_error(
        &[
            (
                "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
                "projects/skywatch-test/locations/global/workloadIdentityPools/fly-pool/providers/fly-acme",
            ),
            project,
        ],
        "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
    );
    assert_config_error(&[provider], "PUBSUB_PROJECT_ID");
    assert_config_error(
        &[
            provider,
            project,
            ("GOOGLE_IMPERSONATE_SERVICE_ACCOUNT", "skywatch"),
        ],
        "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
    );
    assert_config_error(
        &[("GOOGLE_IMPERSONATE_SERVICE_ACCOUNT", EMAIL), project],
        "GOOGLE_IMPERSONATE_SERVICE_ACCOUNT",
    );
    assert_config_error(
        &[provider, project, ("FLY_API_SOCKET", "api.sock")],
        "FLY_API_SOCKET",
    );
    assert_config_error(
        &[
            provider,
            project,
            ("GOOGLE_STS_ENDPOINT", "sts.googleapis.com"),
        ],
        "GOOGLE_STS_ENDPOINT",
    );
    assert_config_error(
        &[
            provider,
            project,
            ("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json"),
        ],
        "GOOGLE_WORKLOAD_IDENTITY_PROVIDER",
    );
}
