//! Clocks and times: the kernel's CLOCK_MONOTONIC stamps as wall time, durations and
//! times as the command line spells them, and UTC formatting without a date crate.
use std::time::Duration;

/// The shortest and longest durations any option takes.
pub const DURATION_MIN: Duration = Duration::from_millis(1);
pub const DURATION_MAX: Duration = Duration::from_secs(365 * 86_400);

/// Accepts "30", "30s", "250ms", "5m", "1h", from 1 ms to 365 days.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (try 10s, 500ms, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit '{unit}' in '{s}' (use ms, s, m or h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration '{s}' must be positive"));
    }
    // Below a millisecond a timer would spin; far past a year a deadline computed
    // from it overflows the clock (a panic), and a year is a typo already.
    if !(DURATION_MIN.as_secs_f64()..=DURATION_MAX.as_secs_f64()).contains(&secs) {
        return Err(format!("duration '{s}' is out of range: from 1ms to 365 days"));
    }
    Ok(Duration::from_secs_f64(secs))
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSpec {
    /// From the start of the recording.
    Offset(Duration),
    /// Wall-clock ns since the Unix epoch.
    Wall(u64),
}

impl TimeSpec {
    /// Wall-clock ns, given the recording's start.
    pub fn resolve(self, start_wall_ns: u64) -> u64 {
        match self {
            TimeSpec::Offset(d) => start_wall_ns.saturating_add(d.as_nanos() as u64),
            TimeSpec::Wall(ns) => ns,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// "2026-11-22T01:02:03Z" (the Z and fractional seconds are optional; always UTC).
fn parse_utc(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&day)
        || h > 23
        || mi > 59
        || sec > 60
        || h < 0
        || mi < 0
        || sec < 0
    {
        return None;
    }
    let frac_ns: u64 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32)
    };
    let secs = days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + sec;
    u64::try_from(secs).ok().map(|s| s * 1_000_000_000 + frac_ns)
}

pub fn parse_time(s: &str) -> Result<TimeSpec, String> {
    if let Some(unix) = s.strip_prefix('@') {
        let secs: f64 = unix.parse().map_err(|_| format!("'{s}' is not a Unix time (e.g. @1763773323)"))?;
        return Ok(TimeSpec::Wall((secs * 1e9) as u64));
    }
    if s.contains('-') && s.contains(':') {
        return parse_utc(s)
            .map(TimeSpec::Wall)
            .ok_or_else(|| format!("'{s}' is not a UTC time of the form 2026-11-22T01:02:03Z"));
    }
    parse_duration(s)
        .map(TimeSpec::Offset)
        .map_err(|e| format!("{e}; or give a UTC time (2026-11-22T01:02:03Z) or a Unix time (@1763773323)"))
}

/// "2026-11-22T01:02:03.456Z".
pub fn fmt_utc(wall_ns: u64) -> String {
    let secs = (wall_ns / 1_000_000_000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let r = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", r / 3600, r / 60 % 60, r % 60, wall_ns / 1_000_000 % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse_time("90s"), Ok(TimeSpec::Offset(Duration::from_secs(90))));
        assert_eq!(parse_time("@1763773323"), Ok(TimeSpec::Wall(1_763_773_323_000_000_000)));
        let t = parse_time("2025-11-22T01:02:03Z").unwrap();
        assert_eq!(t, TimeSpec::Wall(1_763_773_323_000_000_000));
        assert_eq!(parse_time("2025-11-22 01:02:03.5"), Ok(TimeSpec::Wall(1_763_773_323_500_000_000)));
        assert!(parse_time("2025-13-22T01:02:03Z").is_err());
        assert!(parse_time("yesterday").unwrap_err().contains("UTC time"));
        assert_eq!(TimeSpec::Offset(Duration::from_secs(2)).resolve(1_000), 2_000_001_000);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        for bad in ["0.0000000001", "1e19", "1e300", "366d", "NaN", "inf", "-1"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("0.001").is_ok());
        assert!(parse_duration("8760h").is_ok());
        assert!(parse_duration("18446744073709551616").unwrap_err().contains("out of range"));
    }

    #[test]
    fn formats_utc() {
        assert_eq!(fmt_utc(1_763_773_323_456_000_000), "2025-11-22T01:02:03.456Z");
        assert_eq!(fmt_utc(0), "1970-01-01T00:00:00.000Z");
        for days in [0i64, 59, 60, 365, 10_957, 20_000, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
