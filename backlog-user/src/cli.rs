//! Command line: the live tracer is the default command; `check`, `record` and
//! `report` are subcommands that share its filters and output model.
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "backlog-trace",
    version,
    about = "Catch and explain TCP listen-queue drops, per listener, as they happen",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Diagnose every listener's queue configuration (no eBPF needed).
    Check(crate::check::CheckArgs),
    /// Trace as usual and write every event, owner, queue sample and counter to a file.
    Record(crate::record::RecordArgs),
    /// Print recordings as the live session did, plus a timeline, top peers and sysctls.
    Report(crate::record::ReportArgs),
}

pub use crate::kernel::Mode;

/// `--mode`: one of the kernel layer's mode names, listed in --help.
fn mode_parser() -> impl TypedValueParser<Value = Mode> {
    PossibleValuesParser::new(Mode::ALL.map(Mode::name)).map(|s| s.parse().expect("a possible value"))
}

/// Which listeners to look at; shared by the tracer, `record` and `report`.
#[derive(Args, Debug, Clone, Default)]
pub struct Filters {
    /// Only listeners on this local port (repeatable).
    #[arg(long = "port", short = 'p', value_parser = clap::value_parser!(u16).range(1..=65535))]
    pub ports: Vec<u16>,
    /// Only listeners owned by this process (repeatable).
    #[arg(long = "pid", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Only this network namespace: a name from `ip netns`, a path such as
    /// /proc/PID/ns/net, or an inode number (repeatable).
    #[arg(long = "netns", value_parser = crate::sys::netns::parse_netns)]
    pub netns: Vec<u32>,
}

/// How many listeners a table lists; shared by the tracer and `report`.
#[derive(Args, Debug, Clone, Copy)]
pub struct Top {
    /// List the N listeners with most drops (then accepts) and sum the rest on one
    /// line; 0 lists every listener.
    #[arg(long = "top", value_name = "N", default_value_t = 50)]
    pub n: usize,
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filters: Filters,
    #[command(flatten)]
    pub top: Top,
    /// Print the per-listener table every this many seconds.
    #[arg(long, short = 'i', value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// One line per drop as it happens.
    #[arg(long)]
    pub events: bool,
    /// Stop after this long (e.g. 30, 30s, 5m).
    #[arg(long, short = 'd', value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// NDJSON on stdout: a start line, one line per drop, a summary at the end.
    #[arg(long)]
    pub json: bool,
    /// At the end, print each listener's accept-queue wait histogram.
    #[arg(long)]
    pub hist: bool,
    /// Force an attach mode instead of the best one the kernel allows.
    #[arg(long, value_parser = mode_parser())]
    pub mode: Option<Mode>,
    /// Serve Prometheus metrics at http://ADDR/metrics: a port (on 127.0.0.1) or address:port.
    #[arg(long, value_name = "ADDR", value_parser = crate::export::parse_listen_addr)]
    pub prometheus: Option<std::net::SocketAddr>,
}

/// Accepts "30", "30s", "250ms", "5m", "1h".
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
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn port_zero_is_rejected() {
        let e = Cli::try_parse_from(["backlog-trace", "--port", "0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = Cli::try_parse_from(["backlog-trace", "--port", "65536"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let ok = Cli::try_parse_from(["backlog-trace", "--port", "80", "-p", "443"]).unwrap();
        assert_eq!(ok.trace.filters.ports, vec![80, 443]);
    }
}
