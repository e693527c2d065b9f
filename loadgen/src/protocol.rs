//! The server's messages, as a storm's accounting needs them: which kind a
//! text message is and the few fields that count.
//!
//! A small scanner over the top level of a JSON object instead of a JSON
//! library: the reader handles thousands of messages in a burst on the
//! machine's two cores, and a field here is a slice of the read buffer. It
//! looks only at the object's own keys, so a region named "count" inside a
//! summary's `regions` cannot be taken for its count.

/// A message from the server, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// `ALIEN_LANDING`: one press, sent to every client.
    Alert {
        id: Option<&'a [u8]>,
        /// A replay for a client that reconnected with `?since=`.
        replayed: bool,
    },
    /// `ALIEN_LANDING_SUMMARY`: `count` presses of a storm, sent to every
    /// client; `regions_total` is the sum of its `regions`, when readable.
    Summary {
        id: Option<&'a [u8]>,
        count: u64,
        regions_total: Option<u64>,
        /// A replay, like an alert's.
        replayed: bool,
    },
    /// `ACCEPTED`: to the sender only, its press went out.
    Accepted,
    /// `ERROR`: to the sender only, with its code (e.g. `rate_limited`).
    Error {
        code: &'a [u8],
    },
    Connected,
    /// Anything else (`PRESENCE`, `MISSED`, ...), or not a JSON object.
    Other,
}

/// Reads one server message.
pub fn classify(text: &[u8]) -> ServerMessage<'_> {
    let Some(top) = fields(text) else {
        return ServerMessage::Other;
    };
    let get = |key: &[u8]| top.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let id = get(b"id").and_then(string);
    let replayed = get(b"replayed") == Some(&b"true"[..]);
    match get(b"message").and_then(string) {
        Some(b"ALIEN_LANDING") => ServerMessage::Alert { id, replayed },
        Some(b"ALIEN_LANDING_SUMMARY") => ServerMessage::Summary {
            id,
            count: get(b"count").and_then(number).unwrap_or(0),
            regions_total: get(b"regions")
                .and_then(fields)
                .and_then(|regions| regions.iter().map(|(_, n)| number(n)).sum::<Option<u64>>()),
            replayed,
        },
        Some(b"ACCEPTED") => ServerMessage::Accepted,
        Some(b"ERROR") => ServerMessage::Error {
            code: get(b"error").and_then(string).unwrap_or(b"?"),
        },
        Some(b"CONNECTED") => ServerMessage::Connected,
        _ => ServerMessage::Other,
    }
}

/// The contents of a JSON string value (escapes left as they are).
fn string(value: &[u8]) -> Option<&[u8]> {
    value.strip_prefix(b"\"")?.strip_suffix(b"\"")
}

/// A non-negative integer value.
fn number(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The top-level `(key, raw value)` pairs of a JSON object, or `None` when
/// `text` is not one. Keys are given without their quotes; values as they
/// are written (a string with its quotes, an object with its braces).
pub fn fields(text: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut at = skip_space(text, 0);
    if text.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(text, at + 1);
    let mut out = Vec::new();
    if text.get(at) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let key_end = string_end(text, at)?;
        let key = &text[at + 1..key_end - 1];
        at = skip_space(text, key_end);
        if text.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(text, at + 1);
        let value_end = value_end(text, at)?;
        out.push((key, &text[at..value_end]));
        at = skip_space(text, value_end);
        match text.get(at) {
            Some(b',') => at = skip_space(text, at + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

fn skip_space(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// Given a `"` at `at`, the index just past the string's closing quote.
fn string_end(text: &[u8], at: usize) -> Option<usize> {
    if text.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The index just past the value that starts at `at`.
fn value_end(text: &[u8], at: usize) -> Option<usize> {
    match text.get(at)? {
        b'"' => string_end(text, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while i < text.len() {
                match text[i] {
                    b'"' => {
                        i = string_end(text, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let rest = &text[at..];
            let len = rest
                .iter()
                .position(|&b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            (len > 0).then_some(at + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_alert_and_a_replay() {
        let alert = br#"{"message":"ALIEN_LANDING","timestamp":1764280000123,"regionCode":"syd","sender":"a1","id":"0123456789abcdef0123456789abcdef"}"#;
        assert_eq!(
            classify(alert),
            ServerMessage::Alert {
                id: Some(b"0123456789abcdef0123456789abcdef"),
                replayed: false
            }
        );
        // serde_json without preserve_order writes keys sorted.
        let replay = br#"{"id":"ff","message":"ALIEN_LANDING","regionCode":"syd","replayed":true,"sender":"a1","timestamp":5}"#;
        assert_eq!(
            classify(replay),
            ServerMessage::Alert {
                id: Some(b"ff"),
                replayed: true
            }
        );
    }

    #[test]
    fn reads_a_summary_with_its_count_and_regions() {
        let summary = br#"{"message":"ALIEN_LANDING_SUMMARY","id":"ab","count":3990,"regions":{"syd":3000,"ams":990},"from":1764280000000,"to":1764280000200}"#;
        assert_eq!(
            classify(summary),
            ServerMessage::Summary {
                id: Some(b"ab"),
                count: 3990,
                regions_total: Some(3990),
                replayed: false
            }
        );
        // A region called "count" is the region's, not the summary's.
        let sorted = br#"{ "count" : 7, "from":1, "id":"cd", "message":"ALIEN_LANDING_SUMMARY", "regions":{"count":2,"x":4}, "to":2 }"#;
        assert_eq!(
            classify(sorted),
            ServerMessage::Summary {
                id: Some(b"cd"),
                count: 7,
                regions_total: Some(6),
                replayed: false
            }
        );
        let regions_first =
            br#"{"regions":{"count":2},"count":9,"message":"ALIEN_LANDING_SUMMARY"}"#;
        assert!(matches!(
            classify(regions_first),
            ServerMessage::Summary { count: 9, .. }
        ));
    }

    #[test]
    fn reads_replies_to_the_sender() {
        assert_eq!(
            classify(br#"{"message":"ACCEPTED","id":"0123"}"#),
            ServerMessage::Accepted
        );
        assert_eq!(
            classify(br#"{"detail":"too many alerts: at most 1 per second","error":"rate_limited","message":"ERROR"}"#),
            ServerMessage::Error {
                code: b"rate_limited"
            }
        );
        assert_eq!(
            classify(br#"{"message":"CONNECTED","regionCode":"LOCAL_REGION"}"#),
            ServerMessage::Connected
        );
    }

    #[test]
    fn anything_else_is_other() {
        for text in [
            &br#"{"message":"PRESENCE","regions":{"ams":12},"total":12}"#[..],
            br#"{"message":"MISSED","count":4}"#,
            br#"{"detail":"has \"message\":\"ALIEN_LANDING\" in it","message":"X"}"#,
            b"",
            b"not json",
            br#"{"message":"ALIEN_LANDING""#,
            b"[1,2]",
        ] {
            assert_eq!(
                classify(text),
                ServerMessage::Other,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn fields_keeps_raw_values() {
        let text = br#"{"a":"x\"y","b":[1,{"c":"]"}],"d":null,"e":-1.5e3}"#;
        let got = fields(text).unwrap();
        let keys: Vec<&[u8]> = got.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [&b"a"[..], b"b", b"d", b"e"]);
        assert_eq!(got[0].1, br#""x\"y""#);
        assert_eq!(got[1].1, br#"[1,{"c":"]"}]"#);
        assert_eq!(got[3].1, b"-1.5e3");
        assert_eq!(fields(b"{}").unwrap().len(), 0);
        assert!(fields(br#"{"a":1,}"#).is_none());
    }
}
