//! Clocks and times: the kernel's CLOCK_MONOTONIC stamps as wall time, and durations
//! and times as the command line spells them. Parsing and formatting are humantime's
//! (maintained, validates calendar dates); what is ours is only which forms a flag
//! takes and what they mean.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The shortest and longest durations any option takes.
pub const DURATION_MIN: Duration = Duration::from_millis(1);
pub const DURATION_MAX: Duration = Duration::from_secs(365 * 86_400);

/// Accepts "30" (seconds, as sleep(1) reads it), "30s", "250ms", "5m", "1h30m",
/// "1.5h", from 1 ms to 365 days.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bare = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let parsed = if bare { humantime::parse_duration(&format!("{s}s")) } else { humantime::parse_duration(s) };
    let d = parsed.map_err(|e| format!("'{s}' is not a duration ({e}); e.g. 30s, 500ms, 5m, 1h30m"))?;
    // Below a millisecond a timer would spin; far past a year a deadline computed
    // from it overflows the clock (a panic), and a year is a typo already.
    if !(DURATION_MIN..=DURATION_MAX).contains(&d) {
        return Err(format!("duration '{s}' is out of range: from 1ms to 365 days"));
    }
    Ok(d)
}

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock nanoseconds.
#[derive(Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let get = |id| {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid pointer to a timespec.
            unsafe { libc::clock_gettime(id, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        Clock { offset_ns: get(libc::CLOCK_REALTIME) - get(libc::CLOCK_MONOTONIC) }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }
}

/// CLOCK_MONOTONIC in ns, the clock of the kernel's event timestamps.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A bound of `report`'s time window, as journalctl, kubectl and docker read one:
/// a bare duration counts back from the end (the recording's, there being no "now"
/// in a recording).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSpec {
    /// This long before the recording's end: "5m" (or "-5m"), the last five minutes.
    BeforeEnd(Duration),
    /// This long after the recording's start: "+90s".
    AfterStart(Duration),
    /// Wall-clock ns since the Unix epoch.
    Wall(u64),
}

impl TimeSpec {
    /// Wall-clock ns, given the recording's start and end (wall ns).
    pub fn resolve(self, start_wall_ns: u64, end_wall_ns: u64) -> u64 {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        match self {
            TimeSpec::BeforeEnd(d) => end_wall_ns.saturating_sub(ns(d)),
            TimeSpec::AfterStart(d) => start_wall_ns.saturating_add(ns(d)),
            TimeSpec::Wall(ns) => ns,
        }
    }
}

impl std::fmt::Display for TimeSpec {
    /// As the user wrote it, give or take spelling: for error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeSpec::BeforeEnd(d) => write!(f, "{} before the end", humantime::format_duration(*d)),
            TimeSpec::AfterStart(d) => write!(f, "{} after the start", humantime::format_duration(*d)),
            TimeSpec::Wall(ns) => f.write_str(&fmt_utc(*ns)),
        }
    }
}

const TIME_FORMS: &str = "a duration back from the recording's end (5m, 1h30m), +DURATION from its start (+90s), \
                          a UTC time (2026-11-22T01:02:03Z) or a Unix time (@1763773323)";

pub fn parse_time(s: &str) -> Result<TimeSpec, String> {
    let s = s.trim();
    if let Some(unix) = s.strip_prefix('@') {
        let secs: f64 = unix.parse().map_err(|_| format!("'{s}' is not a Unix time (e.g. @1763773323)"))?;
        // Up to 2262, the last year a u64 of ns holds.
        if !(0.0..9.2e9).contains(&secs) {
            return Err(format!("Unix time '{s}' is out of range"));
        }
        return Ok(TimeSpec::Wall((secs * 1e9) as u64));
    }
    // "YYYY-": a date, whatever follows it.
    if s.len() > 4 && s.as_bytes()[..4].iter().all(u8::is_ascii_digit) && s.as_bytes()[4] == b'-' {
        let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
            format!("'{s}' is not a valid UTC time ({e}): give it as 2026-11-22T01:02:03Z (UTC only, no other offset)")
        })?;
        let ns = t.duration_since(UNIX_EPOCH).map_err(|_| format!("'{s}' is before 1970"))?.as_nanos();
        return u64::try_from(ns).map(TimeSpec::Wall).map_err(|_| format!("UTC time '{s}' is out of range"));
    }
    let parse = |d: &str| parse_duration(d).map_err(|e| format!("{e}; the forms are {TIME_FORMS}"));
    if let Some(d) = s.strip_prefix('+') {
        return parse(d).map(TimeSpec::AfterStart);
    }
    parse(s.strip_prefix('-').unwrap_or(s)).map(TimeSpec::BeforeEnd)
}

/// "2026-11-22T01:02:03.456Z".
pub fn fmt_utc(wall_ns: u64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_nanos(wall_ns)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_forms() {
        assert_eq!(parse_time("90s"), Ok(TimeSpec::BeforeEnd(Duration::from_secs(90))));
        assert_eq!(parse_time("-90s"), Ok(TimeSpec::BeforeEnd(Duration::from_secs(90))));
        assert_eq!(parse_time("+1h30m"), Ok(TimeSpec::AfterStart(Duration::from_secs(5400))));
        assert_eq!(parse_time("@1763773323"), Ok(TimeSpec::Wall(1_763_773_323_000_000_000)));
        let t = parse_time("2025-11-22T01:02:03Z").unwrap();
        assert_eq!(t, TimeSpec::Wall(1_763_773_323_000_000_000));
        assert_eq!(parse_time("2025-11-22 01:02:03.5"), Ok(TimeSpec::Wall(1_763_773_323_500_000_000)));
        assert_eq!(parse_time("2024-02-29T00:00:00Z"), Ok(TimeSpec::Wall(1_709_164_800_000_000_000)));
        assert!(parse_time("yesterday").unwrap_err().contains("UTC time"));
        for bad in ["@-1", "@1e300", "@NaN", "+0", "+", "-"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn impossible_dates_are_errors_not_other_dates() {
        for bad in [
            "2026-02-30T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-13-22T01:02:03Z",
            "2025-04-31T00:00:00Z",
            "2025-11-22T24:00:00Z",
            "2025-11-22T01:60:00Z",
            "2025-11-22T01:02:03+02:00",
            "2025-11-22",
            "1969-12-31T23:59:59Z",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("UTC time"), "{bad}: {e}");
        }
    }

    #[test]
    fn resolves_against_the_recording() {
        let (start, end) = (1_000_000_000_000, 1_600_000_000_000);
        assert_eq!(TimeSpec::BeforeEnd(Duration::from_secs(60)).resolve(start, end), 1_540_000_000_000);
        assert_eq!(TimeSpec::AfterStart(Duration::from_secs(2)).resolve(start, end), 1_002_000_000_000);
        assert_eq!(TimeSpec::Wall(7).resolve(start, end), 7);
        // Longer than the recording: from its start, never a wrapped time.
        assert_eq!(TimeSpec::BeforeEnd(DURATION_MAX).resolve(start, end), 0);
        assert_eq!(TimeSpec::BeforeEnd(Duration::from_secs(5400)).to_string(), "1h 30m before the end");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h 30m 5s").unwrap(), Duration::from_secs(5405));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        for bad in ["0.0000000001", "1e19", "1e300", "366d", "NaN", "inf", "-1", "", "5m5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("0.001").is_ok());
        assert!(parse_duration("8760h").is_ok());
        assert!(parse_duration("8761h").unwrap_err().contains("out of range"));
        assert!(parse_duration("18446744073709551616").is_err());
    }

    #[test]
    fn formats_utc() {
        assert_eq!(fmt_utc(1_763_773_323_456_000_000), "2025-11-22T01:02:03.456Z");
        assert_eq!(fmt_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_utc(u64::MAX), "2554-07-21T23:34:33.709Z");
    }
}
