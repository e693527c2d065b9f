//! Strict reading of request bodies under Google's proto3 JSON mapping
//! (<https://protobuf.dev/programming-guides/json/>), which is what the REST surface of
//! every Google API uses:
//!
//! * unknown field names are rejected (400), as Google's JSON front end does;
//! * a field may be spelled in lowerCamelCase or in its original snake_case;
//! * `null` means "not set";
//! * integers may be JSON numbers or decimal strings;
//! * `google.protobuf.Duration` is a string like `"600s"` or `"1.5s"`.

use serde_json::{Map, Value};

use crate::reply::ApiError;

pub(crate) type Obj = Map<String, Value>;

/// Parses a request body as a JSON object. An empty body is the empty message `{}`,
/// as Google treats it.
pub(crate) fn parse_body(body: &[u8]) -> Result<Obj, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Obj::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(other) => Err(ApiError::invalid(format!(
            "Invalid JSON payload received. Expected an object, got {}.",
            kind_of(&other)
        ))),
        Err(e) => Err(ApiError::invalid(format!(
            "Invalid JSON payload received. {e}."
        ))),
    }
}

/// Checks `obj` against the message's field names (lowerCamelCase) and returns it with
/// every key in lowerCamelCase and `null` fields dropped. `at` names the message in
/// errors ("" for the request itself), like Google's `at 'subscription'`.
pub(crate) fn fields(obj: &Obj, allowed: &[&str], at: &str) -> Result<Obj, ApiError> {
    let mut out = Obj::new();
    for (key, value) in obj {
        let camel = if allowed.contains(&key.as_str()) {
            key.clone()
        } else {
            let converted = snake_to_camel(key);
            if key.contains('_') && allowed.contains(&converted.as_str()) {
                converted
            } else {
                let at = if at.is_empty() {
                    String::new()
                } else {
                    format!(" at '{at}'")
                };
                return Err(ApiError::invalid(format!(
                    "Invalid JSON payload received. Unknown name \"{key}\"{at}: Cannot find field."
                )));
            }
        };
        if value.is_null() {
            continue;
        }
        if out.insert(camel.clone(), value.clone()).is_some() {
            return Err(ApiError::invalid(format!(
                "Invalid JSON payload received. Duplicate field \"{camel}\"{}.",
                if at.is_empty() {
                    String::new()
                } else {
                    format!(" at '{at}'")
                }
            )));
        }
    }
    Ok(out)
}

/// The path of field `name` for error messages: `"subscription.ack_deadline_seconds"`.
fn path(at: &str, name: &str) -> String {
    let snake = camel_to_snake(name);
    if at.is_empty() {
        snake
    } else {
        format!("{at}.{snake}")
    }
}

fn type_error(at: &str, name: &str, ty: &str, value: &Value) -> ApiError {
    ApiError::invalid(format!(
        "Invalid value at '{}' ({ty}), {value}",
        path(at, name)
    ))
}

pub(crate) fn string<'a>(obj: &'a Obj, name: &str, at: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(type_error(at, name, "TYPE_STRING", other)),
    }
}

pub(crate) fn boolean(obj: &Obj, name: &str, at: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(type_error(at, name, "TYPE_BOOL", other)),
    }
}

/// An `int32` field: a JSON number without fraction, or a decimal string.
pub(crate) fn int32(obj: &Obj, name: &str, at: &str) -> Result<Option<i32>, ApiError> {
    let Some(value) = obj.get(name) else {
        return Ok(None);
    };
    let parsed = match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    parsed
        .and_then(|v| i32::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| type_error(at, name, "TYPE_INT32", value))
}

pub(crate) fn object<'a>(obj: &'a Obj, name: &str, at: &str) -> Result<Option<&'a Obj>, ApiError> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(type_error(at, name, "TYPE_MESSAGE", other)),
    }
}

pub(crate) fn array<'a>(obj: &'a Obj, name: &str, at: &str) -> Result<&'a [Value], ApiError> {
    match obj.get(name) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(ApiError::invalid(format!(
            "Invalid value at '{}', expected a list, got {other}",
            path(at, name)
        ))),
    }
}

/// A `repeated string` field.
pub(crate) fn strings(obj: &Obj, name: &str, at: &str) -> Result<Vec<String>, ApiError> {
    array(obj, name, at)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(ApiError::invalid(format!(
                "Invalid value at '{}[{i}]' (TYPE_STRING), {other}",
                path(at, name)
            ))),
        })
        .collect()
}

/// A `map<string, string>` field (labels, attributes).
pub(crate) fn string_map(obj: &Obj, name: &str, at: &str) -> Result<Option<Obj>, ApiError> {
    let Some(map) = object(obj, name, at)? else {
        return Ok(None);
    };
    for (key, value) in map {
        if !value.is_string() {
            return Err(ApiError::invalid(format!(
                "Invalid value at '{}[{key}]' (TYPE_STRING), {value}",
                path(at, name)
            )));
        }
    }
    Ok(Some(map.clone()))
}

/// A non-negative `google.protobuf.Duration`, in nanoseconds.
pub(crate) fn duration(obj: &Obj, name: &str, at: &str) -> Result<Option<u128>, ApiError> {
    let Some(value) = obj.get(name) else {
        return Ok(None);
    };
    let parsed = value.as_str().and_then(parse_duration);
    match parsed {
        Some(nanos) => Ok(Some(nanos)),
        None => Err(ApiError::invalid(format!(
            "Invalid value at '{}' (type.googleapis.com/google.protobuf.Duration), {value}: \
             a duration is a decimal number of seconds with up to nine fractional digits, \
             terminated by 's', e.g. \"600s\" or \"3.5s\"",
            path(at, name)
        ))),
    }
}

/// Parses `"600s"`, `"0.5s"`, `"1.000000001s"` into nanoseconds. Negative durations are
/// valid protobuf values but never valid for the fields Pub/Sub has, so they are refused
/// here too.
pub(crate) fn parse_duration(s: &str) -> Option<u128> {
    let number = s.strip_suffix('s')?;
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    if number.contains('.') && frac.is_empty() {
        return None;
    }
    // protobuf's Duration range is about +-10,000 years.
    let secs: u128 = whole.parse().ok().filter(|s| *s <= 315_576_000_000)?;
    let nanos: u128 = format!("{frac:0<9}").parse().ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

/// Formats nanoseconds like Google does: `"600s"`, `"0.500s"`, `"1.000000001s"`.
pub(crate) fn format_duration(nanos: u128) -> String {
    let secs = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
    if frac == 0 {
        format!("{secs}s")
    } else if frac.is_multiple_of(1_000_000) {
        format!("{secs}.{:03}s", frac / 1_000_000)
    } else if frac.is_multiple_of(1_000) {
        format!("{secs}.{:06}s", frac / 1_000)
    } else {
        format!("{secs}.{frac:09}s")
    }
}

pub(crate) const fn secs(s: u64) -> u128 {
    s as u128 * 1_000_000_000
}

fn snake_to_camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn camel_to_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_parse_and_format_like_protobuf() {
        assert_eq!(parse_duration("600s"), Some(secs(600)));
        assert_eq!(parse_duration("0.5s"), Some(500_000_000));
        assert_eq!(parse_duration("1.000000001s"), Some(1_000_000_001));
        for bad in [
            "600",
            "s",
            "-1s",
            "1.s",
            ".5s",
            "1.0000000001s",
            "1 s",
            "1e3s",
            "",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(format_duration(secs(86_400)), "86400s");
        assert_eq!(format_duration(1_500_000_000), "1.500s");
        assert_eq!(format_duration(1_000_001_000), "1.000001s");
        assert_eq!(format_duration(1_000_000_001), "1.000000001s");
    }

    #[test]
    fn fields_accept_snake_case_and_reject_unknown_names() {
        let obj = json!({"ack_deadline_seconds": 20, "topic": null})
            .as_object()
            .unwrap()
            .clone();
        let out = fields(&obj, &["ackDeadlineSeconds", "topic"], "").unwrap();
        assert_eq!(out.get("ackDeadlineSeconds"), Some(&json!(20)));
        assert!(!out.contains_key("topic"));

        let obj = json!({"bogus": 1}).as_object().unwrap().clone();
        let err = fields(&obj, &["topic"], "subscription").unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("Unknown name \"bogus\" at 'subscription'")
        );

        let obj = json!({"ackDeadlineSeconds": 1, "ack_deadline_seconds": 2})
            .as_object()
            .unwrap()
            .clone();
        assert!(fields(&obj, &["ackDeadlineSeconds"], "").is_err());
    }

    #[test]
    fn int32_accepts_numbers_and_decimal_strings() {
        let obj = json!({"a": 5, "b": "7", "c": 1.0, "d": 1.5, "e": "x", "f": 3_000_000_000u64, "g": true});
        let obj = obj.as_object().unwrap();
        assert_eq!(int32(obj, "a", "").unwrap(), Some(5));
        assert_eq!(int32(obj, "b", "").unwrap(), Some(7));
        assert_eq!(int32(obj, "c", "").unwrap(), Some(1));
        assert_eq!(int32(obj, "missing", "").unwrap(), None);
        for bad in ["d", "e", "f", "g"] {
            assert!(int32(obj, bad, "").is_err(), "{bad}");
        }
    }
}
