//! Throw-away service-account credentials for tests: an RSA key pair made with the
//! `openssl` command at test time (never committed), and the key file JSON that Google
//! Cloud's console would download for it ("Create and delete service account keys",
//! <https://cloud.google.com/iam/docs/keys-create-delete>).

use std::io::{Error, ErrorKind, Write};
use std::process::{Command, Stdio};

use serde_json::json;

/// A freshly generated RSA key pair for a fake service account.
#[derive(Clone, Debug)]
pub struct TestKey {
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the form Google's key files use.
    pub private_key_pem: String,
    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`), for [`crate::Auth::Verify`].
    pub public_key_pem: String,
    /// 40 hex digits, like a real key file's `private_key_id` (JWTs carry it as `kid`).
    pub private_key_id: String,
}

/// Generates an RSA-2048 key pair with `openssl genpkey` and `openssl pkey -pubout`.
///
/// The key travels through pipes only, so no key material is ever written to disk.
pub fn generate_test_key() -> std::io::Result<TestKey> {
    let private_key_pem = openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        None,
    )?;
    let public_key_pem = openssl(&["pkey", "-pubout"], Some(&private_key_pem))?;
    if !private_key_pem.contains("BEGIN PRIVATE KEY")
        || !public_key_pem.contains("BEGIN PUBLIC KEY")
    {
        return Err(Error::other("openssl produced unexpected PEM output"));
    }
    Ok(TestKey {
        private_key_pem,
        public_key_pem,
        private_key_id: hex(&random_bytes::<20>()),
    })
}

fn openssl(args: &[&str], stdin: Option<&str>) -> std::io::Result<String> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::new(e.kind(), format!("cannot run `openssl`: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A PEM key is far below a pipe's buffer size, so writing before reading the
        // output cannot deadlock.
        pipe.write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(Error::other(format!(
            "`openssl {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout).map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

/// The JSON of a Google service-account key file for `key`, with `token_uri` pointing
/// wherever the test wants (normally [`crate::PubSubTestServer::token_uri`]).
pub fn service_account_json(
    key: &TestKey,
    project_id: &str,
    client_email: &str,
    token_uri: &str,
) -> String {
    // A real client_id is a 21-digit number.
    let client_id: String = random_bytes::<21>()
        .iter()
        .enumerate()
        .map(|(i, b)| char::from(b'0' + if i == 0 { 1 + b % 9 } else { b % 10 }))
        .collect();
    let file = json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": key.private_key_id,
        "private_key": key.private_key_pem,
        "client_email": client_email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": format!(
            "https://www.googleapis.com/robot/v1/metadata/x509/{}",
            client_email.replace('@', "%40")
        ),
        "universe_domain": "googleapis.com",
    });
    // Serialising a `Value` built from strings cannot fail.
    serde_json::to_string_pretty(&file).unwrap_or_default()
}

/// Random bytes from the OS. If the OS source fails (it does not on Linux), fall back
/// to std's randomly seeded hasher rather than panicking: these are test tokens and ids.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if getrandom::fill(&mut buf).is_err() {
        use std::hash::{BuildHasher, RandomState};
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let word = RandomState::new().hash_one(i).to_be_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
    buf
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
