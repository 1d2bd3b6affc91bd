//! A tracing process under test (backlog-trace, or bpftrace as the peer): started,
//! waited on until it is attached, sampled from /proc, stopped with SIGINT.
//!
//! Its stdout goes to a file, not a pipe: under a flood backlog-trace prints
//! hundreds of thousands of lines a second, and a pipe would make the bench's own
//! reading speed part of the tracer's figures.
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::sys;

/// How long a probe may take to attach before the bench gives up on it.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// The same in a kernel-matrix guest ($BACKLOG_VM_KERNEL set), whose CPUs qemu
/// emulates: there, under the stress loads, attaching took longer than 30 s.
const VM_ATTACH_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a probe may take to print its summary and exit after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the output file is read while waiting for the "attached" line: the
/// resolution of the start-up figure.
const POLL: Duration = Duration::from_millis(5);

/// The attach mode the bench asks backlog-trace for ($BACKLOG_MODE), if any.
pub fn mode() -> Option<String> {
    std::env::var("BACKLOG_MODE").ok().filter(|m| !m.is_empty())
}

pub struct Probe {
    name: &'static str,
    child: Child,
    /// Spawn to "attached" line: for backlog-trace, the JSON start line.
    pub startup: Duration,
    out: PathBuf,
    err: PathBuf,
}

/// CPU time and memory of a running probe, from /proc.
#[derive(Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    /// Times any of its threads went to sleep waiting (for the ring buffer, mostly).
    pub wakeups: u64,
    pub rss_kb: u64,
    /// Since the process started (VmHWM), so including its start-up.
    pub peak_rss_kb: u64,
}

/// What a probe printed.
pub struct Stopped {
    /// Every line but JSON drop lines, which are only counted: a flood prints millions.
    pub lines: Vec<String>,
    pub drop_lines: u64,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Probe {
    /// backlog-trace with `--json` and `args`, in the attach mode $BACKLOG_MODE names
    /// when set (a kernel-matrix guest sets it, as for the tests).
    pub fn tracer(path: &Path, args: &[&str]) -> Result<Probe> {
        let mut cmd = Command::new(path);
        cmd.arg("--json").args(args);
        if let Some(mode) = mode() {
            cmd.arg("--mode").arg(mode);
        }
        Probe::start("backlog-trace", cmd, |l| l.contains(r#""type":"start""#))
    }

    /// bpftrace prints "Attaching N probes..." before it attaches: callers settle
    /// for a moment after start, as they do for backlog-trace.
    pub fn bpftrace(script: &str) -> Result<Probe> {
        let mut cmd = Command::new("bpftrace");
        cmd.arg("-e").arg(script);
        Probe::start("bpftrace", cmd, |l| l.starts_with("Attaching"))
    }

    fn start(name: &'static str, mut cmd: Command, ready: fn(&str) -> bool) -> Result<Probe> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "backlog-bench-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let (out, err) = (base.with_extension("out"), base.with_extension("err"));
        let t0 = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&out).with_context(|| format!("creating {}", out.display()))?)
            .stderr(File::create(&err).with_context(|| format!("creating {}", err.display()))?)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut probe = Probe { name, child, startup: Duration::ZERO, out, err };
        loop {
            if std::fs::read_to_string(&probe.out).is_ok_and(|s| s.lines().any(ready)) {
                break;
            }
            if let Some(st) = probe.child.try_wait()? {
                bail!("{name} exited ({st}) before attaching: {}", last_line(&probe.stderr()));
            }
            let timeout =
                if std::env::var_os("BACKLOG_VM_KERNEL").is_some() { VM_ATTACH_TIMEOUT } else { ATTACH_TIMEOUT };
            if t0.elapsed() > timeout {
                bail!("{name} did not attach within {timeout:?}: {}", last_line(&probe.stderr()));
            }
            thread::sleep(POLL);
        }
        probe.startup = t0.elapsed();
        Ok(probe)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn usage(&self) -> Result<Usage> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let mut wakeups = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let st = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            wakeups += field(&st, "voluntary_ctxt_switches:");
        }
        Ok(Usage {
            cpu: sys::process_cpu(pid)?,
            wakeups,
            rss_kb: field(&status, "VmRSS:"),
            peak_rss_kb: field(&status, "VmHWM:"),
        })
    }

    pub fn stop(mut self) -> Result<Stopped> {
        sys::interrupt(self.child.id());
        let t0 = Instant::now();
        let mut resent = Duration::ZERO;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            // bpftrace 0.17 sometimes misses the first SIGINT (about one stop in
            // eight here): it stays in epoll_wait, which a script that prints nothing
            // never wakes. A repeated SIGINT ends it. backlog-trace is signalled
            // once: one Ctrl-C is what its contract covers.
            if self.name == "bpftrace" && t0.elapsed() >= resent + Duration::from_secs(1) {
                resent = t0.elapsed();
                sys::interrupt(self.child.id());
            }
            if t0.elapsed() > STOP_TIMEOUT {
                bail!("{} did not exit within {STOP_TIMEOUT:?} of SIGINT", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut lines = Vec::new();
        let mut drop_lines = 0;
        for line in BufReader::new(File::open(&self.out)?).lines() {
            let line = line?;
            // serde_json sorts keys, so "type" is not first: match it anywhere.
            if line.contains(r#""type":"drop""#) {
                drop_lines += 1;
            } else {
                lines.push(line);
            }
        }
        Ok(Stopped { lines, drop_lines, stderr: self.stderr(), status })
    }
}

impl Drop for Probe {
    /// Kills the probe only on an error path (never leave programs attached), and
    /// removes its output files.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            sys::send(self.child.id(), sys::SIGKILL);
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
    }
}

/// backlog-trace's summary line: drops summed over its listeners, and lost events.
pub struct Summary {
    pub drops: u64,
    pub lost_events: u64,
    /// Drop lines held back by `--max-drop-lines` (the drops are in `drops`).
    pub suppressed_lines: u64,
    /// Drops counted under no peer: the kernel's peer table was full.
    pub peers_full: u64,
}

impl Summary {
    pub fn find(stopped: &Stopped) -> Result<Summary> {
        let Some(line) = stopped.lines.iter().find(|l| l.contains(r#""type":"summary""#)) else {
            bail!(
                "backlog-trace printed no summary line at SIGINT ({}, {} other lines); its stderr: {}",
                stopped.status,
                stopped.lines.len(),
                last_line(&stopped.stderr)
            );
        };
        let v: serde_json::Value = serde_json::from_str(line).context("backlog-trace's summary line")?;
        let listeners = v["listeners"].as_array().into_iter().flatten();
        // Every selected listener's, shown or not; the shown listeners' sum otherwise.
        let drops =
            v["totals"]["drops"].as_u64().unwrap_or_else(|| listeners.filter_map(|l| l["drops"].as_u64()).sum());
        Ok(Summary {
            drops,
            lost_events: v["lost_events"].as_u64().unwrap_or(0),
            suppressed_lines: v["diagnostics"]["suppressed_lines"].as_u64().unwrap_or(0),
            peers_full: v["diagnostics"]["peers_full"].as_u64().unwrap_or(0),
        })
    }
}

/// The number after `key` in a /proc/PID/status text.
fn field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_sums_listener_drops_only() {
        let l = r#"{"type":"summary","listeners":[{"drops":3,"drops_by_reason":{"other":3},"port":1},{"drops":4}],"lost_events":2}"#;
        let with_totals = l.replace(r#""lost_events""#, r#""totals":{"drops":9},"lost_events""#);
        for (line, drops) in [(l.to_string(), 7), (with_totals, 9)] {
            let stopped =
                Stopped { lines: vec![line], drop_lines: 0, stderr: String::new(), status: Default::default() };
            let s = Summary::find(&stopped).unwrap();
            assert_eq!((s.drops, s.lost_events), (drops, 2));
        }
    }
}
