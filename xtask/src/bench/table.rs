//! The result: one row per figure beside its target, as a Markdown table (readable
//! on a terminal, pasted as is into BENCH.md), and the machine it was measured on.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

pub struct Table {
    rows: Vec<Row>,
}

struct Row {
    figure: String,
    measured: String,
    target: String,
    status: Status,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Status {
    Met,
    Missed,
    /// The samples spread too widely (a shared, noisy machine) to judge the median.
    Inconclusive,
    /// A figure reported for context, with no target of its own.
    Info,
}

impl From<bool> for Status {
    fn from(met: bool) -> Status {
        if met {
            Status::Met
        } else {
            Status::Missed
        }
    }
}

impl Table {
    pub fn new() -> Table {
        Table { rows: Vec::new() }
    }

    pub fn add(&mut self, figure: &str, measured: String, target: &str, status: Status) {
        self.rows.push(Row { figure: figure.into(), measured, target: target.into(), status });
    }

    pub fn missed(&self) -> usize {
        self.rows.iter().filter(|r| r.status == Status::Missed).count()
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("| figure | measured | target | |\n|---|---|---|---|\n");
        for r in &self.rows {
            let status = match r.status {
                Status::Met => "met",
                Status::Missed => "**missed**",
                Status::Inconclusive => "inconclusive (spread)",
                Status::Info => "",
            };
            s += &format!("| {} | {} | {} | {} |\n", r.figure, r.measured, r.target, status);
        }
        s
    }
}

/// One line naming the machine, the software versions and the tracer measured.
pub fn machine(workspace: &Path, tracer: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|v| v.trim_start_matches([' ', '\t', ':']));
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:")).map(|v| v.trim().to_string()))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let debian = std::fs::read_to_string("/etc/debian_version").unwrap_or_default();
    format!(
        "{} × {}, {mem_gib:.0} GiB, Debian {}, kernel {}; {}, {}, {}; {} built {} UTC, tree at {}",
        cores,
        cpu.unwrap_or("unknown CPU"),
        debian.trim(),
        first_line("uname", &["-r"], workspace),
        first_line("nginx", &["-v"], workspace).replace("nginx version: ", ""),
        first_line("wrk", &["--version"], workspace).split(" [").next().unwrap_or("wrk ?"),
        first_line("bpftrace", &["--version"], workspace),
        tracer.strip_prefix(workspace).unwrap_or(tracer).display(),
        first_line("date", &["-u", "-r", &tracer.to_string_lossy(), "+%Y-%m-%d %H:%M"], workspace),
        first_line("git", &["describe", "--always", "--dirty"], workspace),
    )
}

/// What else the machine was doing when the bench started: the figures are only as
/// quiet as the machine, and other tracers add their own hooks to every packet.
pub fn conditions() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    let others = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "backlog-trace"))
                .count()
        })
        .unwrap_or(0);
    format!("load average {load} at start, {others} other backlog-trace process(es) running")
}

/// First line of a command's stdout or, failing that, stderr (nginx -v and wrk
/// print their versions on stderr).
fn first_line(cmd: &str, args: &[&str], dir: &Path) -> String {
    let Ok(out) = Command::new(cmd).args(args).current_dir(dir).output() else {
        return format!("{cmd} ?");
    };
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
}

const BEGIN: &str = "<!-- bench:run -->";
const END: &str = "<!-- /bench:run -->";

/// Replaces the run recorded in `path` (between the markers) with `run`, keeping the
/// hand-written notes around it; appends the block when there is none yet.
pub fn record(path: &Path, run: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{run}{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => format!("{old}{}{block}\n", if old.is_empty() { "" } else { "\n" }),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
