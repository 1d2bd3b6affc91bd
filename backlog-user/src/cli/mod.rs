//! The command line, and the only code that knows clap: arguments become the
//! domain's settings here (`session::Settings`, `output::View`, `record::*Settings`,
//! `check::Settings`) and nothing below sees a flag.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

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
leaves out goes on an indented line under it. --wide prints every column.

Exit status: 0 done; 1 the session failed, or an output asked for (recording, metrics
endpoint) failed while tracing went on; 2 a flag value that cannot work; 3 a forced
--mode this kernel lacks. `check` exits 0 healthy, 1 on a warning, 2 when it could not
run.";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Diagnose every listener's queue configuration (no eBPF needed).
    Check(CheckArgs),
    /// Trace as usual and write every event, owner, queue sample and counter to a file.
    Record(RecordArgs),
    /// Print recordings as the live session did, plus a timeline, top peers and sysctls.
    Report(ReportArgs),
    /// Print a completion script for SHELL (installed by scripts/install-extras.sh).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages (backlog-trace.1 and one per subcommand) into DIR, or
    /// print the main page without DIR.
    #[command(hide = true)]
    Man { dir: Option<PathBuf> },
}

/// The shells a completion script is generated for.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script for `shell`, generated from the definitions above.
pub fn completions(shell: Shell, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    // Generated into memory: clap_complete panics on a failed write (a closed
    // stdout), where this returns the error.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if shell == clap_complete::Shell::Bash {
        // clap_complete 4.6's bash script names a hyphenated binary's subcommand
        // cases "backlog__subcmd__trace__subcmd__report" but matches
        // "backlog__trace__subcmd__report", so no subcommand's flags would complete:
        // put the two names in step.
        let wrong = name.replace('-', "__subcmd__") + "__subcmd__";
        script = script.replace(&wrong, &(name.replace('-', "__") + "__subcmd__"));
    }
    out.write_all(script.as_bytes())
}

/// The man pages: every one into `dir` (returns their paths), or the main page to
/// `out`.
pub fn man(dir: Option<&std::path::Path>, out: &mut dyn std::io::Write) -> std::io::Result<Vec<PathBuf>> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        // As generate_to renders it: no `help` subcommand of clap's own.
        clap_mangen::Man::new(cmd.disable_help_subcommand(true)).render(out)?;
        return Ok(vec![]);
    };
    clap_mangen::generate_to(cmd.clone(), dir)?;
    // The pages generate_to wrote: the command's, and each visible subcommand's.
    let mut pages = vec![dir.join("backlog-trace.1")];
    pages.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| dir.join(format!("backlog-trace-{}.1", s.get_name()))),
    );
    Ok(pages)
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
    /// At most N drop lines per listener, per CPU, per second; drops above it are
    /// still counted exactly, their lines as `suppressed_lines` in every output.
    /// 0: a line for every drop.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_DROP_LINES)]
    pub max_drop_lines: u32,
    /// Tracepoint mode: attach no syscall tracepoint (they slow every syscall of
    /// every process on the host): drops only, no accept waits or requested backlog.
    #[arg(long)]
    pub no_accept_timing: bool,
    /// Tables with every column on one line, however wide (default: fit 100
    /// columns, or the terminal's width when wider).
    #[arg(long)]
    pub wide: bool,
}

/// The default of `--max-drop-lines`: more lines a second than anyone reads, far
/// fewer than a SYN flood's drops (hundreds of thousands a second), whose ring
/// events and decoding would otherwise cost as much as the drops themselves.
pub const DEFAULT_MAX_DROP_LINES: u32 = 1000;

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
        let session = Settings {
            filter: filter.clone(),
            mode: self.mode,
            interval: self.interval,
            duration: self.duration,
            max_drop_lines: self.max_drop_lines,
            accept_timing: !self.no_accept_timing,
        };
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
    /// How many rotated files (FILE.1 ... FILE.N) to keep.
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
    /// Recording files: one file, or a rotated set (FILE FILE.1 ...) in any order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Which listeners; each one given replaces what the recording was made with.
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Only events from this time on, as journalctl reads it: a duration counts back
    /// from the recording's end (5m: its last five minutes; 1h30m), +DURATION counts
    /// from its start (+90s), or a UTC time (2026-11-22T01:02:03Z) or Unix time
    /// (@1763773323). An empty or inverted window is an error.
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
    pub since: Option<TimeSpec>,
    /// Only events before this time (same forms as --since: 2m is two minutes
    /// before the end).
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
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

    /// Every visible subcommand and every long flag of each: in --help, the bash,
    /// zsh and fish scripts, and the man pages.
    fn every_flag() -> Vec<(String, String)> {
        let cmd = Cli::command();
        let mut out: Vec<(String, String)> = Vec::new();
        let mut add = |sub: &str, c: &clap::Command| {
            for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(l) = a.get_long() {
                    out.push((sub.to_string(), format!("--{l}")));
                }
            }
        };
        add("", &cmd);
        for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            add(s.get_name(), s);
        }
        out
    }

    #[test]
    fn completions_name_every_subcommand_and_flag() {
        let flags = every_flag();
        assert!(flags.len() > 30, "{flags:?}");
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut buf = Vec::new();
            completions(shell, &mut buf).unwrap();
            let text = String::from_utf8(buf).unwrap();
            for sub in ["check", "record", "report"] {
                assert!(text.contains(sub), "{shell:?} lacks {sub}");
            }
            assert!(!text.contains("backlog__subcmd__trace"), "{shell:?}: subcommand cases out of step");
            for (sub, flag) in &flags {
                // fish lists long flags without their dashes (-l NAME).
                let bare = flag.trim_start_matches('-');
                let found = match shell {
                    Shell::Fish => text.contains(&format!("-l {bare}")),
                    _ => text.contains(flag.as_str()),
                };
                assert!(found, "{shell:?} lacks {sub} {flag}");
            }
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand_and_flag() {
        let dir = std::env::temp_dir().join(format!("bt-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pages = man(Some(&dir), &mut std::io::sink()).unwrap();
        let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            ["backlog-trace.1", "backlog-trace-check.1", "backlog-trace-record.1", "backlog-trace-report.1"]
        );
        let page = |sub: &str| {
            let name = if sub.is_empty() { "backlog-trace.1".into() } else { format!("backlog-trace-{sub}.1") };
            std::fs::read_to_string(dir.join(name)).unwrap()
        };
        for (sub, flag) in every_flag() {
            // roff escapes each '-' of a flag as '\-'.
            let roff = flag.replace('-', "\\-");
            assert!(page(&sub).contains(&roff), "man page of '{sub}' lacks {flag}");
        }
        for (sub, text) in ["", "check", "record", "report"].map(|s| (s, page(s))) {
            // Plain ASCII, so that man renders it in any locale (troff warns otherwise).
            assert!(text.is_ascii(), "man page of '{sub}' has non-ASCII text");
        }
        let main = page("");
        for sub in ["check", "record", "report"] {
            assert!(main.contains(&format!("backlog\\-trace\\-{sub}(1)")), "main page lacks {sub}:\n{main}");
        }
        assert!(!main.contains("completions"), "hidden commands stay out of the man page");
        let mut stdout = Vec::new();
        assert!(man(None, &mut stdout).unwrap().is_empty());
        assert_eq!(String::from_utf8(stdout).unwrap(), main, "without DIR: the main page");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_line_budget_and_accept_timing_flags() {
        let d = Cli::try_parse_from(["backlog-trace"]).unwrap().trace.live().unwrap();
        assert_eq!((d.session.max_drop_lines, d.session.accept_timing), (DEFAULT_MAX_DROP_LINES, true));
        let l = Cli::try_parse_from(["backlog-trace", "--max-drop-lines", "0", "--no-accept-timing"])
            .unwrap()
            .trace
            .live()
            .unwrap();
        assert_eq!((l.session.max_drop_lines, l.session.accept_timing), (0, false));
        let r = Cli::try_parse_from(["backlog-trace", "record", "-o", "f", "--max-drop-lines", "7"]).unwrap();
        let Some(Command::Record(r)) = r.command else { panic!("record not parsed") };
        assert_eq!(r.trace.live().unwrap().session.max_drop_lines, 7);
        for bad in ["-1", "x", "4294967296", ""] {
            let e = Cli::try_parse_from(["backlog-trace", "--max-drop-lines", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "--max-drop-lines {bad:?}");
        }
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
