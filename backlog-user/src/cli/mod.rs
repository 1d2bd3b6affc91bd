//! The command line, and the only code that knows clap: arguments become the
//! domain's settings here (`session::Settings`, `output::View`, `record::*Settings`,
//! `check::Settings`) and nothing below sees a flag.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::Filter;
use crate::output::{Format, View};
use crate::record::{RecordSettings, ReportSettings};
use crate::session::Settings;
use crate::time::{parse_duration, parse_time, TimeSpec};

#[cfg(test)]
mod fuzz;

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
    Check(CheckArgs),
    /// Trace as usual and write every event, owner, queue sample and counter to a file.
    Record(RecordArgs),
    /// Print recordings as the live session did, plus a timeline, top peers and sysctls.
    Report(ReportArgs),
}

/// Attach mode for the kernel programs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fentry,
    Kprobe,
    Tracepoint,
}

/// Which listeners to look at: one set for every command.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
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

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter { ports: self.ports.clone(), pids: self.pids.clone(), netns: self.netns.clone() }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// List the N listeners with most drops (then accepts) and sum the rest on one
    /// line; 0 lists every listener.
    #[arg(long = "top", value_name = "N", default_value_t = 50)]
    pub top: usize,
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
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Serve Prometheus metrics at http://ADDR/metrics: a port (on 127.0.0.1) or address:port.
    #[arg(long, value_name = "ADDR", value_parser = crate::export::parse_listen_addr)]
    pub prometheus: Option<SocketAddr>,
}

/// A live session as the settings of its parts.
pub struct Live {
    pub session: Settings,
    pub view: View,
    pub prometheus: Option<SocketAddr>,
}

impl TraceArgs {
    pub fn live(&self) -> Live {
        let filter = self.filters.filter();
        let session = Settings {
            filter: filter.clone(),
            mode: self.mode.map(Into::into),
            interval: self.interval,
            duration: self.duration,
        };
        let format = if self.json { Format::Json } else { Format::Text };
        let view = View { format, filter, top: self.top, events: self.events, hist: self.hist };
        Live { session, view, prometheus: self.prometheus }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RecordArgs {
    /// The recording file, created readable by its owner only (an existing file
    /// is replaced).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Start a new file when FILE would grow past this size (e.g. 500K, 64M, 1G);
    /// the old one becomes FILE.1. Default: no limit.
    #[arg(long, value_name = "SIZE", value_parser = crate::record::parse_size)]
    pub max_size: Option<u64>,
    /// How many rotated files (FILE.1 … FILE.N) to keep.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rotate: u32,
    /// The live session's own options; its output is printed as usual.
    #[command(flatten)]
    pub trace: TraceArgs,
}

impl RecordArgs {
    pub fn settings(&self) -> RecordSettings {
        RecordSettings { output: self.output.clone(), max_size: self.max_size, rotate: self.rotate }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Recording files: one file, or a rotated set (FILE FILE.1 …) in any order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Which listeners; each one given replaces what the recording was made with.
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Only events from this time on: an offset from the recording's start (90s,
    /// 5m), a UTC time (2026-11-22T01:02:03Z) or a Unix time (@1763773323).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<TimeSpec>,
    /// Only events before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<TimeSpec>,
    /// NDJSON, as the live session prints it, plus timeline, peers and namespaces lines.
    #[arg(long)]
    pub json: bool,
    /// Each listener's accept-queue wait histogram.
    #[arg(long)]
    pub hist: bool,
    /// List the N listeners with most drops (then accepts) and sum the rest on one
    /// line; 0 lists every listener.
    #[arg(long = "top", value_name = "N", default_value_t = 50)]
    pub top: usize,
}

impl ReportArgs {
    pub fn settings(&self) -> ReportSettings {
        ReportSettings {
            files: self.files.clone(),
            filter: self.filters.filter(),
            since: self.since,
            until: self.until,
            json: self.json,
            hist: self.hist,
            top: self.top,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub filters: FilterArgs,
    /// How long to watch queues and counters (e.g. 2s, 500ms). Ten seconds, as with
    /// two `nstat` runs, catches bursts that a shorter look misses.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sample: Duration,
    /// Emit one JSON document.
    #[arg(long)]
    pub json: bool,
}

impl CheckArgs {
    pub fn settings(&self) -> crate::check::Settings {
        crate::check::Settings { filter: self.filters.filter(), sample: self.sample, json: self.json }
    }
}

impl From<Mode> for crate::kernel::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Fentry => crate::kernel::Mode::Fentry,
            Mode::Kprobe => crate::kernel::Mode::Kprobe,
            Mode::Tracepoint => crate::kernel::Mode::Tracepoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
