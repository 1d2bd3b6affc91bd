//! The load: wrk with `Connection: close`, so every request is a new connection and
//! requests/s is connections/s.
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::harness::netns::{self, Netns};
use crate::harness::sys;

/// One run's rate and wrk's own CPU time (client-side TCP, and the probes'
/// programs that run in its context).
pub struct Run {
    pub rate: f64,
    pub cpu: Duration,
}

pub struct Wrk {
    pub url: String,
    pub seconds: u64,
    pub connections: u32,
    pub threads: usize,
}

impl Wrk {
    /// wrk with this configuration, run in `netns` (None: ours).
    pub fn command(&self, netns: Option<&Netns>) -> Command {
        let mut cmd = netns::command(netns, "wrk");
        cmd.args(["-t", &self.threads.to_string(), "-c", &self.connections.to_string()])
            .args(["-d", &format!("{}s", self.seconds), "--timeout", "2s"])
            .args(["-H", "Connection: close", &self.url])
            .stdin(Stdio::null());
        cmd
    }

    /// One run, here.
    pub fn run(&self) -> Result<Run> {
        let cpu0 = sys::children_cpu();
        let out = self.command(None).output().context("running wrk (install it with scripts/bench-deps.sh)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("wrk failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        // wrk was waited for just now and is the only child reaped in between.
        let cpu = sys::children_cpu().saturating_sub(cpu0);
        let rate = parse_rate(&text).with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
        Ok(Run { rate, cpu })
    }
}

fn parse_rate(text: &str) -> Option<f64> {
    text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rate_line() {
        let out = "  38783 requests in 5.09s, 5.36MB read\nRequests/sec:   7614.54\nTransfer/sec: 1.05MB\n";
        assert_eq!(super::parse_rate(out), Some(7614.54));
    }
}
