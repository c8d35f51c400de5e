//! Times as the platform keeps them: UTC instants; written out (on the wire, in the
//! SQLite store) as RFC 3339 with microseconds and `Z`, which sorts as text.

/// An instant.
pub type Time = chrono::DateTime<chrono::Utc>;

/// Now.
pub fn now() -> Time {
    chrono::Utc::now()
}

/// The bounds of every time the platform keeps (for reads of all of a run's samples).
pub fn all_time() -> (Time, Time) {
    let end = chrono::DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31 is a time");
    (chrono::DateTime::UNIX_EPOCH, end)
}

/// `t` as RFC 3339 UTC with microseconds (`2026-12-01T18:29:42.123456Z`).
pub fn stamp(t: &Time) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `t` to the second, for tables (`2026-12-01T18:29:42`).
pub fn short(t: &Time) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Reads an RFC 3339 time (any offset), as UTC.
pub fn parse(s: &str) -> Option<Time> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Seconds from `start` to `end`, never negative.
pub fn seconds(start: &Time, end: &Time) -> f64 {
    (*end - *start).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_and_sorts_as_text() {
        let a = parse("2026-12-01T18:29:42.123456Z").unwrap();
        assert_eq!(stamp(&a), "2026-12-01T18:29:42.123456Z");
        assert_eq!(short(&a), "2026-12-01T18:29:42");
        let b = parse("2026-12-01T19:29:42.5+01:00").unwrap();
        assert_eq!(stamp(&b), "2026-12-01T18:29:42.500000Z");
        assert!(stamp(&a) < stamp(&b));
        assert_eq!(seconds(&a, &b), 0.376544);
        assert_eq!(seconds(&b, &a), 0.0);
        assert!(parse("yesterday").is_none());
        let (first, last) = all_time();
        assert!(stamp(&first) < stamp(&a) && stamp(&a) < stamp(&last));
    }
}
