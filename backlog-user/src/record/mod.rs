//! `record` writes a live session to a file; `report` prints, from such files,
//! what the live session printed, plus a timeline, the top peers and the sysctls.
//!
//! format.rs is the bytes on disk; writer.rs appends and rotates; recorder.rs is
//! the live-loop sink deciding what to write, with watch.rs reading the recorded
//! namespaces' counters and queues; reader.rs reads back up to the first damage;
//! report.rs replays into the model; time.rs parses and prints times.
mod format;
mod reader;
mod recorder;
mod report;
mod time;
mod watch;
mod writer;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::cli::TraceArgs;
use crate::export::Sink;

pub use report::run as report;

#[derive(Args, Debug, Clone)]
pub struct RecordArgs {
    /// The recording file, created readable by its owner only (an existing file
    /// is replaced).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Start a new file when FILE would grow past this size (e.g. 500K, 64M, 1G);
    /// the old one becomes FILE.1. Default: no limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// How many rotated files (FILE.1 … FILE.N) to keep.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rotate: u32,
    /// The live session's own options; its output is printed as usual.
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Recording files: one file, or a rotated set (FILE FILE.1 …) in any order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Only listeners on this local port (repeatable); default: what was recorded.
    #[arg(long = "port", short = 'p', value_parser = clap::value_parser!(u16).range(1..=65535))]
    pub ports: Vec<u16>,
    /// Only events from this time on: an offset from the recording's start (90s,
    /// 5m), a UTC time (2026-11-22T01:02:03Z) or a Unix time (@1763773323).
    #[arg(long, value_parser = time::parse_time)]
    pub since: Option<time::TimeSpec>,
    /// Only events before this time (same forms as --since).
    #[arg(long, value_parser = time::parse_time)]
    pub until: Option<time::TimeSpec>,
    /// NDJSON, as the live session prints it, plus timeline, peers and namespaces lines.
    #[arg(long)]
    pub json: bool,
    /// Each listener's accept-queue wait histogram.
    #[arg(long)]
    pub hist: bool,
    #[command(flatten)]
    pub top: crate::cli::Top,
}

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

/// `backlog-trace record`: a live session with a recorder attached.
pub async fn record(args: RecordArgs) -> Result<i32> {
    let recorder = recorder::Recorder::create(&args)?;
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(recorder)];
    crate::trace::run(args.trace, sinks).await
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
