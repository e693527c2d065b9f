//! OAuth 2.0 on the wire, shared by the token endpoints (`/token` in `auth`, the STS in
//! `federation`) and the bearer checks of the APIs: the `Authorization: Bearer` header
//! (RFC 6750), form bodies (`application/x-www-form-urlencoded`), and OAuth-style
//! error answers, `{"error", "error_description"}` (RFC 6749 section 5.2).

use serde_json::json;

use crate::percent::percent_decode;
use crate::reply::Reply;

/// The token of the request's `Authorization: Bearer` header: None when there is no
/// such header, an error when it is malformed.
pub(crate) fn bearer_token(headers: &[(String, String)]) -> Result<Option<&str>, String> {
    let mut values = headers
        .iter()
        .filter(|(name, _)| name == "authorization")
        .map(|(_, value)| value.as_str());
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one Authorization header".into());
    }
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => return Err("the Authorization header is not \"Bearer <token>\"".into()),
    };
    if token.is_empty() {
        return Err("empty bearer token".into());
    }
    Ok(Some(token))
}

/// Token endpoints take POST only; anything else is answered OAuth-style.
pub(crate) fn oauth_post_only(method: &str) -> Result<(), Reply> {
    if method == "POST" {
        return Ok(());
    }
    Err(oauth_error(
        405,
        "invalid_request",
        "The token endpoint only accepts POST.",
    )
    .with_header("Allow", "POST"))
}

/// An OAuth-style error answer: `{"error", "error_description"}`, not to be cached.
pub(crate) fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": error, "error_description": description}),
    )
    .with_header("Cache-Control", "no-store")
}

/// Parses `application/x-www-form-urlencoded`: `+` is a space, `%XX` a byte.
/// A parameter given twice is refused, as RFC 6749 section 3.1 requires.
pub(crate) fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "The form body is not UTF-8.".to_owned())?;
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in text.trim_end_matches(['\r', '\n']).split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = form_decode(k)?;
        let v = form_decode(v)?;
        if out.iter().any(|(existing, _)| *existing == k) {
            return Err(format!("Parameter {k} is given more than once."));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn form_decode(s: &str) -> Result<String, String> {
    percent_decode(&s.replace('+', " "))
        .ok_or_else(|| format!("Malformed percent-encoding in the form body: {s}"))
}
