//! `record` writes a live session to a file; `report` prints, from such files,
//! what the live session printed, plus a timeline, the top peers and the sysctls.
//!
//! format.rs is the bytes on disk; writer.rs appends and rotates; recorder.rs is
//! the session observer deciding what to write, with watch.rs reading the recorded
//! namespaces' counters and queues and mapping.rs turning the model into records and
//! back; reader.rs reads back up to the first damage; replay.rs folds records into
//! the model; report.rs prints it.
#[cfg(test)]
pub(crate) mod alloc_meter;
mod format;
#[cfg(test)]
mod hostile;
mod mapping;
mod reader;
mod recorder;
mod replay;
mod report;
mod watch;
mod writer;

pub use recorder::{RecordSettings, Recorder};
pub use report::{run as report, ReportSettings};

/// Accepts 4096, 500K, 64M, 1G (powers of 1024, optional trailing B or iB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (try 4096, 500K, 64M or 1G)"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("size '{s}' is too large"))?;
    // Below this a file would hold hardly more than its preamble.
    if bytes < 4096 {
        return Err(format!("size '{s}' is too small: at least 4096 bytes"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("500K"), Ok(500 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2mb"), Err("'2mb' is not a size (try 4096, 500K, 64M or 1G)".into()));
        assert!(parse_size("10").unwrap_err().contains("too small"));
        assert!(parse_size("99999999999G").unwrap_err().contains("too large"));
    }
}
