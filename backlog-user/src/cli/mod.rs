//! The command line, and the only code that knows clap: arguments become the
//! domain's settings here (`session::Settings`, `output::View`, `record::*Settings`,
//! `check::Settings`) and nothing below sees a flag.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::kernel::Mode;
use crate::model::Filter;
use crate::output::text::Width;
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
    args_conflicts_with_subcommands = true,
    after_help = TABLE_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// What the table's columns mean, under --help.
const TABLE_HELP: &str = "\
Table columns (every listener in scope, as `ss -lnt` lists them, from the start):
  QUEUE    the accept queue now, length/limit. The length can exceed the limit by
           one (`queue 9/8`): the kernel admits a connection while length <= limit
           and drops only once it is over.
  PEAK     the longest the accept queue was seen.
  LIMIT    the effective limit, min(listen() backlog, net.core.somaxconn), with the
           backlog asked of listen() in brackets when it differs (seen only for
           listen() calls made while tracing).
  DROPS    connections dropped at this listener (its share of TcpExt ListenDrops);
           DROP_ACCQ, DROP_SYNQ, DROP_ACK, DROP_OTHER split them by reason:
           accept_queue_full, syn_queue_full, ack_overflow, other.
  ACCEPTS  connections taken by accept(); P50ms/P99ms/MAXms their accept-queue wait.
  OWNERS   pid/comm of every process holding the socket.
The default table fits 100 columns (more when the terminal is wider): what a row
leaves out goes on an indented line under it. --wide prints every column.";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Diagnose every listener's queue configuration (no eBPF needed).
    Check(CheckArgs),
    /// Trace as usual and write every event, owner, queue sample and counter to a file.
    Record(RecordArgs),
    /// Print recordings as the live session did, plus a timeline, top peers and sysctls.
    Report(ReportArgs),
}

/// `--mode`: the names `kernel::Mode` answers to, listed in --help.
fn mode_parser() -> impl TypedValueParser<Value = Mode> {
    PossibleValuesParser::new(Mode::ALL.map(Mode::name)).map(|s| s.parse().expect("a possible value"))
}

/// Which listeners to look at: one set for every command, spelled as bcc's tools
/// spell them (-p PID, -P PORT), each a comma list or repeated.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only listeners on these local ports (-P 80,443).
    #[arg(long = "port", short = 'P', value_name = "PORT", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..=65535))]
    pub ports: Vec<u16>,
    /// Only listeners held by these processes (-p 1234,5678).
    #[arg(long = "pid", short = 'p', value_name = "PID", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Only these network namespaces: names from `ip netns`, paths such as
    /// /proc/PID/ns/net, or inode numbers.
    #[arg(long = "netns", value_delimiter = ',', value_parser = crate::sys::netns::parse_netns)]
    pub netns: Vec<u32>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter { ports: self.ports.clone(), pids: self.pids.clone(), netns: self.netns.clone() }
    }

    /// For a command that looks at the system now: every namespace named must be in
    /// use (`report` reads namespaces that may be long gone).
    fn live_filter(&self) -> Result<Filter, String> {
        crate::sys::netns::in_use(&self.netns)?;
        Ok(self.filter())
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
    #[arg(long, value_parser = mode_parser())]
    pub mode: Option<Mode>,
    /// Say at start why each better attach mode was passed over, a line each.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics: a port (on 127.0.0.1) or address:port.
    #[arg(long, value_name = "ADDR", value_parser = crate::export::parse_listen_addr)]
    pub prometheus: Option<SocketAddr>,
    /// Tables with every column on one line, however wide (default: fit 100
    /// columns, or the terminal's width when wider).
    #[arg(long)]
    pub wide: bool,
}

/// A live session as the settings of its parts.
pub struct Live {
    pub session: Settings,
    pub view: View,
    pub prometheus: Option<SocketAddr>,
}

impl TraceArgs {
    /// The session's settings; an error (exit 2) names a flag value that cannot work.
    pub fn live(&self) -> Result<Live, String> {
        let filter = self.filters.live_filter()?;
        let session =
            Settings { filter: filter.clone(), mode: self.mode, interval: self.interval, duration: self.duration };
        let format = if self.json { Format::Json } else { Format::Text };
        let columns = crate::sys::term::stdout_columns().unwrap_or(0).max(Width::DEFAULT_COLUMNS);
        let width = Width { columns, wide: self.wide };
        let view =
            View { format, filter, top: self.top, events: self.events, hist: self.hist, verbose: self.verbose, width };
        Ok(Live { session, view, prometheus: self.prometheus })
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
    pub fn settings(&self) -> Result<crate::check::Settings, String> {
        Ok(crate::check::Settings { filter: self.filters.live_filter()?, sample: self.sample, json: self.json })
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
        let ok = Cli::try_parse_from(["backlog-trace", "--port", "80", "-P", "443"]).unwrap();
        assert_eq!(ok.trace.filters.ports, vec![80, 443]);
    }

    #[test]
    fn bcc_spellings_and_comma_lists() {
        let c = Cli::try_parse_from(["backlog-trace", "-P", "80,443", "-p", "7,8", "-p", "9"]).unwrap();
        assert_eq!((c.trace.filters.ports, c.trace.filters.pids), (vec![80, 443], vec![7, 8, 9]));
        for sub in ["check", "report"] {
            let mut args = vec!["backlog-trace", sub, "--pid", "42", "--port", "22,80"];
            if sub == "report" {
                args.push("file");
            }
            let c = Cli::try_parse_from(&args).unwrap();
            let f = match c.command {
                Some(Command::Check(a)) => a.filters,
                Some(Command::Report(a)) => a.filters,
                _ => unreachable!(),
            };
            assert_eq!((f.ports, f.pids), (vec![22, 80], vec![42]), "{sub}");
        }
        let c = Cli::try_parse_from(["backlog-trace", "record", "-o", "f", "-P", "8080", "-p", "1"]).unwrap();
        let Some(Command::Record(r)) = c.command else { unreachable!() };
        assert_eq!((r.trace.filters.ports, r.trace.filters.pids), (vec![8080], vec![1]));
        assert!(Cli::try_parse_from(["backlog-trace", "-P", "80,x"]).is_err());
    }
}
