//! The clock as the wire shows it: RFC 3339 timestamps as Pub/Sub's JSON uses them
//! (`google.protobuf.Timestamp`'s JSON form, always UTC "Z"), formatted by hand to avoid
//! a date crate for one function, and the Unix seconds that JWTs count in.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as a JWT's `iat` and `exp` count them.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Formats `t` like `"2026-11-27T22:40:01.123456789Z"` (always nine fractional digits).
pub(crate) fn rfc3339_nanos(t: SystemTime) -> String {
    // Pre-1970 clocks do not occur on test machines; clamp rather than panic.
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// Proleptic Gregorian date of the day `days` after 1970-01-01 (Howard Hinnant's
/// well-known days-to-civil algorithm, valid for any day count a clock can produce).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, year starting in March
    let mp = (5 * doy + 2) / 153; // month index, March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, nanos: u32) -> String {
        rfc3339_nanos(UNIX_EPOCH + Duration::new(secs, nanos))
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56
        assert_eq!(at(951_827_696, 7), "2000-02-29T12:34:56.000000007Z");
        // 2026-11-27T22:40:01.123456789Z
        assert_eq!(
            at(1_795_819_201, 123_456_789),
            "2026-11-27T22:40:01.123456789Z"
        );
        // Last second of 2100 (not a leap year)
        assert_eq!(
            at(4_133_980_799, 999_999_999),
            "2100-12-31T23:59:59.999999999Z"
        );
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000000Z");
    }
}
