//! The wire protocol between the page and the server, and the alert that
//! travels between instances.
//!
//! Everything a client sends is parsed here into a closed set of requests;
//! everything else becomes a [`Rejection`] with a stable code the page can
//! show. The server, never the client, fills in an alert's region, sender and
//! id: the original demo relayed whatever the client sent, so anyone could
//! forge those.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest integer a browser's `Date.now()` can represent exactly.
pub const MAX_TIMESTAMP: u64 = (1 << 53) - 1;

/// Deepest nesting of arrays and objects accepted in a client message (an
/// alert is one level deep), checked before parsing: serde_json recurses per
/// level (ARCHITECTURE.md, "Stack pages of a connection thread").
pub const MAX_JSON_DEPTH: usize = 8;

/// An alert as it is broadcast to every client of every instance, and as it
/// is carried through the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Milliseconds since the epoch, as the reporting browser's clock saw it.
    pub timestamp: u64,
    /// Region of the instance that took the alert (FLY_REGION).
    #[serde(rename = "regionCode")]
    pub region: String,
    /// Id of the instance that took the alert (FLY_ALLOC_ID).
    pub sender: String,
    /// Unique id of this alert, assigned by the instance that took it.
    pub id: String,
}

impl Alert {
    /// The alert as the text of a WebSocket message. Encoded once per alert,
    /// whatever the number of clients.
    pub fn to_client_json(&self) -> String {
        #[derive(Serialize)]
        struct Outbound<'a> {
            message: &'static str,
            #[serde(flatten)]
            alert: &'a Alert,
        }
        serde_json::to_string(&Outbound {
            message: "ALIEN_LANDING",
            alert: self,
        })
        .expect("strings and integers always serialize")
    }
}

impl Alert {
    /// The alert as sent again to a client that missed it: the broadcast
    /// form plus `"replayed": true`, so the page can tell it is not new.
    pub fn to_replay_json(&self) -> String {
        #[derive(Serialize)]
        struct Replayed<'a> {
            message: &'static str,
            #[serde(flatten)]
            alert: &'a Alert,
            replayed: bool,
        }
        serde_json::to_string(&Replayed {
            message: "ALIEN_LANDING",
            alert: self,
            replayed: true,
        })
        .expect("strings and integers always serialize")
    }
}

/// Told to a client that came back naming an alert this instance does not
/// hold: alerts may have gone by unseen.
pub fn missed(since: &str) -> String {
    serde_json::json!({
        "message": "MISSED",
        "since": since,
        "detail": "some alerts may have been missed while disconnected",
    })
    .to_string()
}

/// Whether `text` has the shape of an alert id: 32 lowercase hex digits
/// (see [`new_alert_id`]).
pub fn is_alert_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Something a client may ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    AlienLanding { timestamp: u64 },
}

/// Why a client's message was refused. `code` is stable and machine-readable
/// (the page keys its feedback on it); `detail` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectionCode,
    pub detail: String,
}

/// Every code a refusal can carry. One type for the parser, the connection
/// thread, the `ERROR` reply and the metrics (`metrics::Metrics::rejected`
/// matches on it), so a code cannot be sent without being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionCode {
    /// Not JSON, not an object, or nested too deep.
    InvalidJson,
    /// A `message` this server does not take (or none).
    UnknownMessage,
    /// An `ALIEN_LANDING` without a usable `timestamp`.
    InvalidAlert,
    /// Past the client's or its address's alert rate.
    RateLimited,
    /// The broker cannot take the alert now (its queue is full).
    BrokerUnavailable,
    /// The server failed (it could not make an alert id).
    InternalError,
}

impl RejectionCode {
    /// In the order metrics list them.
    pub const ALL: [RejectionCode; 6] = [
        RejectionCode::InvalidJson,
        RejectionCode::UnknownMessage,
        RejectionCode::InvalidAlert,
        RejectionCode::RateLimited,
        RejectionCode::BrokerUnavailable,
        RejectionCode::InternalError,
    ];

    /// The code as the `error` field of an `ERROR` reply says it.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::InvalidJson => "invalid_json",
            RejectionCode::UnknownMessage => "unknown_message",
            RejectionCode::InvalidAlert => "invalid_alert",
            RejectionCode::RateLimited => "rate_limited",
            RejectionCode::BrokerUnavailable => "broker_unavailable",
            RejectionCode::InternalError => "internal_error",
        }
    }
}

impl Rejection {
    pub fn new(code: RejectionCode, detail: impl Into<String>) -> Rejection {
        Rejection {
            code,
            detail: detail.into(),
        }
    }
}

/// Parses one text message from a client. Unknown fields are accepted and
/// dropped, so a newer page can talk to an older server.
pub fn parse_request(text: &str) -> Result<Request, Rejection> {
    if nesting_depth(text) > MAX_JSON_DEPTH {
        return Err(Rejection::new(
            RejectionCode::InvalidJson,
            format!("nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    let fields: Map<String, Value> = serde_json::from_str(text).map_err(|err| {
        Rejection::new(
            RejectionCode::InvalidJson,
            format!("expected a JSON object: {err}"),
        )
    })?;
    match fields.get("message") {
        Some(Value::String(kind)) if kind == "ALIEN_LANDING" => {
            let timestamp = parse_timestamp(fields.get("timestamp"))?;
            Ok(Request::AlienLanding { timestamp })
        }
        Some(Value::String(kind)) => Err(Rejection::new(
            RejectionCode::UnknownMessage,
            format!(
                "unknown message {:?}; expected \"ALIEN_LANDING\"",
                kind.chars().take(40).collect::<String>()
            ),
        )),
        Some(_) => Err(Rejection::new(
            RejectionCode::UnknownMessage,
            "\"message\" must be a string",
        )),
        None => Err(Rejection::new(
            RejectionCode::UnknownMessage,
            "missing \"message\" field",
        )),
    }
}

/// The deepest nesting of `[` and `{` in `text`, outside strings. A cheap
/// scan that does not validate: serde_json does that afterwards.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn parse_timestamp(value: Option<&Value>) -> Result<u64, Rejection> {
    let invalid = |why: &str| Rejection::new(RejectionCode::InvalidAlert, why.to_string());
    match value {
        None => Err(invalid(
            "missing \"timestamp\" (milliseconds since the epoch)",
        )),
        Some(Value::Number(number)) => match number.as_u64() {
            Some(ms) if ms <= MAX_TIMESTAMP => Ok(ms),
            Some(_) => Err(invalid("\"timestamp\" is out of range")),
            None => Err(invalid(
                "\"timestamp\" must be a non-negative integer of milliseconds",
            )),
        },
        Some(_) => Err(invalid("\"timestamp\" must be a number of milliseconds")),
    }
}

/// The greeting a client gets once its socket is open.
pub fn connected(region: &str) -> String {
    serde_json::json!({ "message": "CONNECTED", "regionCode": region }).to_string()
}

/// The reply to an accepted press; it goes to the sender only, so the page
/// can say "sent" even when its press only ever shows up inside a storm
/// summary's count.
pub fn accepted(id: &str) -> String {
    serde_json::json!({ "message": "ACCEPTED", "id": id }).to_string()
}

/// Longest `ERROR` reply: a reply must never cost more than the message
/// that caused it is worth (a 4 KiB message echoed, escaped, would be 14 KiB).
pub const MAX_ERROR_BYTES: usize = 256;

/// The reply to a refused message; it goes to the sender only. Its detail
/// is cut short to keep it within [`MAX_ERROR_BYTES`].
pub fn error(rejection: &Rejection) -> String {
    let reply = |detail: &str| {
        serde_json::json!({ "message": "ERROR", "error": rejection.code.as_str(), "detail": detail })
            .to_string()
    };
    let text = reply(&rejection.detail);
    if text.len() <= MAX_ERROR_BYTES {
        return text;
    }
    // The longest prefix of the detail that fits, found by halving (escaping
    // makes a character one to six bytes, so its length alone cannot say).
    let ends: Vec<usize> = rejection
        .detail
        .char_indices()
        .map(|(i, _)| i)
        .chain([rejection.detail.len()])
        .collect();
    let (mut fits, mut too_long) = (0, ends.len() - 1);
    while too_long - fits > 1 {
        let mid = (fits + too_long) / 2;
        if reply(&rejection.detail[..ends[mid]]).len() <= MAX_ERROR_BYTES {
            fits = mid;
        } else {
            too_long = mid;
        }
    }
    reply(&rejection.detail[..ends[fits]])
}

/// A new alert id: 128 random bits in hex, unique across instances without
/// any coordination between them.
pub fn new_alert_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(hex(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> &'static str {
        parse_request(text)
            .expect_err("should be rejected")
            .code
            .as_str()
    }

    #[test]
    fn every_rejection_code_is_in_all_and_in_the_readme() {
        // The variants as the enum declares them, read from this file: a
        // variant missing from ALL would be counted but never shown.
        let source = include_str!("message.rs");
        let body = source
            .split("pub enum RejectionCode {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .expect("the enum's body");
        let declared: Vec<&str> = body
            .lines()
            .map(str::trim)
            .filter(|line| !line.starts_with("//") && line.ends_with(','))
            .map(|line| line.trim_end_matches(','))
            .collect();
        let listed: Vec<String> = RejectionCode::ALL
            .iter()
            .map(|code| format!("{code:?}"))
            .collect();
        assert_eq!(declared, listed, "RejectionCode::ALL is not the enum");
        let readme = include_str!("../README.md");
        for code in RejectionCode::ALL {
            assert!(
                readme.contains(&format!("`{}`", code.as_str())),
                "README.md does not list {}",
                code.as_str()
            );
        }
    }

    #[test]
    fn parses_an_alert() {
        let request = parse_request(r#"{"message":"ALIEN_LANDING","timestamp":1700000000000}"#);
        assert_eq!(
            request,
            Ok(Request::AlienLanding {
                timestamp: 1_700_000_000_000
            })
        );
    }

    #[test]
    fn ignores_fields_the_server_owns_and_unknown_ones() {
        let text = r#"{"message":"ALIEN_LANDING","timestamp":5,"regionCode":"x","sender":"y","id":"z","evil":{"a":[1]}}"#;
        assert_eq!(
            parse_request(text),
            Ok(Request::AlienLanding { timestamp: 5 })
        );
    }

    #[test]
    fn rejects_what_is_not_a_json_object() {
        for text in [
            "",
            "hello",
            "{",
            "[1,2]",
            "3",
            "\"ALIEN_LANDING\"",
            "null",
            "{\"message\":}",
        ] {
            assert_eq!(code(text), "invalid_json", "{text:?}");
        }
    }

    #[test]
    fn rejects_deep_nesting_before_parsing_it() {
        let nested = |levels: usize| {
            format!(
                r#"{{"message":"ALIEN_LANDING","timestamp":1,"x":{}{}}}"#,
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        assert!(parse_request(&nested(MAX_JSON_DEPTH)).is_ok());
        assert_eq!(code(&nested(MAX_JSON_DEPTH + 1)), "invalid_json");
        assert_eq!(code(&nested(127)), "invalid_json");
        // Brackets inside strings (escaped quotes included) are not nesting.
        let text = r#"{"message":"ALIEN_LANDING","timestamp":1,"x":"[[[[[[[[[[\"[[[["}"#;
        assert!(parse_request(text).is_ok());
    }

    #[test]
    fn rejects_unknown_or_missing_message_kinds() {
        for text in [
            r#"{}"#,
            r#"{"message":"HELLO"}"#,
            r#"{"message":7}"#,
            r#"{"message":null}"#,
        ] {
            assert_eq!(code(text), "unknown_message", "{text:?}");
        }
    }

    #[test]
    fn rejects_bad_timestamps() {
        for ts in [
            "",
            r#","timestamp":"1""#,
            r#","timestamp":1.5"#,
            r#","timestamp":-1"#,
            r#","timestamp":null"#,
            r#","timestamp":9007199254740992"#,
            r#","timestamp":1e300"#,
        ] {
            let text = format!(r#"{{"message":"ALIEN_LANDING"{ts}}}"#);
            assert_eq!(code(&text), "invalid_alert", "{text}");
        }
        let max = format!(r#"{{"message":"ALIEN_LANDING","timestamp":{MAX_TIMESTAMP}}}"#);
        assert!(parse_request(&max).is_ok());
    }

    #[test]
    fn an_alert_is_encoded_with_exactly_the_protocol_fields() {
        let alert = Alert {
            timestamp: 42,
            region: "ams".into(),
            sender: "abc".into(),
            id: "1f".into(),
        };
        let value: Value = serde_json::from_str(&alert.to_client_json()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"message":"ALIEN_LANDING","timestamp":42,"regionCode":"ams","sender":"abc","id":"1f"})
        );
    }

    #[test]
    fn alert_ids_are_distinct_hex() {
        let a = new_alert_id().unwrap();
        let b = new_alert_id().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn an_error_reply_is_never_longer_than_256_bytes() {
        for detail in [
            "short".to_string(),
            "x".repeat(4000),
            "\"".repeat(4000),
            "\u{1}".repeat(1000),
            "é".repeat(2000),
        ] {
            let text = error(&Rejection::new(
                RejectionCode::UnknownMessage,
                detail.clone(),
            ));
            assert!(text.len() <= MAX_ERROR_BYTES, "{} bytes", text.len());
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"], "unknown_message");
            let kept = v["detail"].as_str().unwrap();
            assert!(detail.starts_with(kept) && !kept.is_empty());
        }
    }
}
