//! Where the tracer's kernel-side time goes: with kernel.bpf_stats_enabled the kernel
//! times every program run, and `bpftool prog show` reports run_time_ns and run_cnt
//! per program. Stats cost a clock read per run, so only the profiling passes
//! turn them on, never the runs whose rates are compared.
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// kernel.bpf_stats_enabled=1 while alive; the previous value comes back on drop.
pub struct StatsOn {
    previous: String,
}

impl StatsOn {
    pub fn enable() -> Result<StatsOn> {
        let previous = std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        std::fs::write(SYSCTL, "1").with_context(|| format!("writing {SYSCTL}"))?;
        Ok(StatsOn { previous: previous.trim().to_string() })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.previous);
    }
}

/// Cumulative (run_cnt, run_time_ns) per program name.
pub type Sample = BTreeMap<String, (u64, u64)>;

/// The programs process `pid` holds open.
pub fn sample(pid: u32) -> Result<Sample> {
    let ids = prog_ids(pid)?;
    let out =
        Command::new("bpftool").args(["prog", "show"]).output().context("running bpftool (apt install bpftool)")?;
    if !out.status.success() {
        bail!("bpftool prog show failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout), &ids))
}

/// Program ids behind `pid`'s bpf-prog fds. Debian's bpftool cannot name a
/// program's holders, and other tracers with the same program names may be loaded.
fn prog_ids(pid: u32) -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = fd?;
        if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-prog") {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()))?;
            ids.extend(
                info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse::<u32>().ok()),
            );
        }
    }
    Ok(ids)
}

/// Plain `bpftool prog show`: each program's first line is
/// "ID: type  name NAME  tag …  gpl  run_time_ns N  run_cnt N".
fn parse(text: &str, ids: &BTreeSet<u32>) -> Sample {
    let mut out = Sample::new();
    for line in text.lines().filter(|l| !l.starts_with(char::is_whitespace)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let id = words.first().and_then(|w| w.trim_end_matches(':').parse::<u32>().ok());
        if !id.is_some_and(|id| ids.contains(&id)) {
            continue;
        }
        let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
        let num = |key: &str| after(key).and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Some(name) = after("name") {
            out.insert(name.to_string(), (num("run_cnt"), num("run_time_ns")));
        }
    }
    out
}

/// What bpf_stats itself adds to every call: the ns/call of an empty program
/// (bpftrace's `{ }`), sampled like the tracer's. Subtracted to give net costs.
pub const FLOOR_SCRIPT: &str = "tracepoint:net:net_dev_queue { }";

/// ns per call of the single program in a sample pair (the floor probe's).
pub fn floor(before: &Sample, after: &Sample) -> f64 {
    let p = Profile::new(before, after, Duration::from_secs(1), 1.0, 0.0);
    p.rows.first().map_or(0.0, |r| r.2)
}

/// Per-program cost over one window: (name, calls/s, ns per call).
pub struct Profile {
    pub rows: Vec<(String, f64, f64)>,
    /// The workload's unit rate (connections/s, drops/s), to express the cost per unit.
    pub per_sec: f64,
    pub floor_ns: f64,
}

impl Profile {
    pub fn new(before: &Sample, after: &Sample, window: Duration, per_sec: f64, floor_ns: f64) -> Profile {
        let secs = window.as_secs_f64();
        let rows = after
            .iter()
            .map(|(name, &(cnt, ns))| {
                let (cnt0, ns0) = before.get(name).copied().unwrap_or((0, 0));
                let (c, t) = (cnt.saturating_sub(cnt0), ns.saturating_sub(ns0));
                let per_call = if c > 0 { t as f64 / c as f64 } else { 0.0 };
                (name.clone(), c as f64 / secs, per_call)
            })
            .collect();
        Profile { rows, per_sec, floor_ns }
    }

    /// ns per second of one row, net of the stats floor.
    fn net(&self, row: &(String, f64, f64)) -> f64 {
        row.1 * (row.2 - self.floor_ns).max(0.0)
    }

    /// (calls/s, ns/call, net ns per unit of work) of one program.
    fn get(&self, name: &str) -> (f64, f64, f64) {
        self.rows.iter().find(|r| r.0 == name).map_or((0.0, 0.0, 0.0), |r| (r.1, r.2, self.net(r) / self.per_sec))
    }

    pub fn net_per_unit(&self) -> f64 {
        self.rows.iter().map(|r| self.net(r)).sum::<f64>() / self.per_sec
    }

    fn net_cpu_pct(&self) -> f64 {
        self.rows.iter().map(|r| self.net(r)).sum::<f64>() / 1e7
    }
}

/// One column group of the per-program table: a profile and what its rate counts.
pub struct Column<'a> {
    pub label: &'a str,
    pub unit: &'a str,
    pub profile: &'a Profile,
}

/// Side by side: the same programs under each load (connections, floods).
pub fn markdown(columns: &[Column]) -> String {
    let Some(first) = columns.first() else { return String::new() };
    let mut s = format!(
        "bpf_stats adds {:.0} ns to every call (an empty program's ns/call); the net columns subtract it.\n\n| program |",
        first.profile.floor_ns
    );
    for c in columns {
        s += &format!(" {}: calls/s | ns/call | net ns per {} |", c.label, c.unit);
    }
    s += "\n|---|";
    s += &"---|---|---|".repeat(columns.len());
    s += "\n";
    for (name, ..) in &first.profile.rows {
        s += &format!("| {name} |");
        for c in columns {
            let (r, n, u) = c.profile.get(name);
            s += &format!(" {r:.0} | {n:.0} | {u:.0} |");
        }
        s += "\n";
    }
    s += "| **all** |";
    for c in columns {
        let p = c.profile;
        s += &format!(
            " {:.0} {}s/s | net {:.1} % of a core | **{:.0}** |",
            p.per_sec,
            c.unit,
            p.net_cpu_pct(),
            p.net_per_unit()
        );
    }
    s + "\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_only_the_given_programs() {
        let text = "\
12: tracing  name bt_tp_consume  tag 1  gpl  run_time_ns 900 run_cnt 3
\tloaded_at 2026-01-01T00:00:00+0000  uid 0
13: tracing  name bt_tp_kfree  tag 2  gpl  run_time_ns 50 run_cnt 1
";
        let s = super::parse(text, &[12].into());
        assert_eq!(s.len(), 1);
        assert_eq!(s["bt_tp_consume"], (3, 900));
    }
}
