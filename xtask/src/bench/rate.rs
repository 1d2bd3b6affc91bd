//! Connection rate with and without a probe, in alternating runs of equal length,
//! so drift in the machine (other load, TIME_WAIT build-up, thermal) hits both sides.
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::harness::nginx::Nginx;
use crate::harness::probe::Probe;
use crate::harness::sys;
use crate::harness::wrk::Wrk;

/// Pause between a probe's "attached" line and the load: bpftrace announces before
/// it attaches, and backlog-trace's first listener scan should not be measured.
pub const SETTLE: Duration = Duration::from_secs(1);

/// One run under load.
#[derive(Clone, Copy)]
pub struct Measured {
    /// Connections per second.
    pub rate: f64,
    /// CPU per connection of nginx, wrk and the probe process: what the machine
    /// pays per connection, which other load on a shared machine barely moves,
    /// unlike the rate.
    pub cpu_us: f64,
}

pub struct Pairs {
    pub without: Vec<Measured>,
    pub with: Vec<Probed>,
}

/// A run with the probe attached, and the probe's own figures.
pub struct Probed {
    pub run: Measured,
    pub startup: Duration,
    /// The probe's own CPU (user + system) during the run, % of one core.
    pub cpu_pct: f64,
}

impl Pairs {
    /// Rate with/without, per pair.
    pub fn ratio(&self) -> Spread {
        Spread::of(self.without.iter().zip(&self.with).map(|(a, b)| b.run.rate / a.rate).collect())
    }

    /// CPU per connection without/with, per pair: the rate ratio a CPU-bound machine
    /// with nothing else to do would show.
    pub fn cost_ratio(&self) -> Spread {
        Spread::of(self.without.iter().zip(&self.with).map(|(a, b)| a.cpu_us / b.run.cpu_us).collect())
    }
}

/// One wrk run, with the CPU nginx, wrk and `probe` used during it.
fn measure(wrk: &Wrk, nginx: &Nginx, probe: Option<&Probe>) -> Result<(Measured, f64)> {
    let probe_cpu = || probe.map_or(Ok(Duration::ZERO), |p| p.usage().map(|u| u.cpu));
    let (n0, p0, t0) = (nginx.cpu()?, probe_cpu()?, Instant::now());
    let run = wrk.run()?;
    let secs = t0.elapsed().as_secs_f64();
    let (n1, p1) = (nginx.cpu()?, probe_cpu()?);
    let probe_secs = p1.saturating_sub(p0).as_secs_f64();
    let cpu = n1.saturating_sub(n0).as_secs_f64() + run.cpu.as_secs_f64() + probe_secs;
    let cpu_us = cpu * 1e6 / (run.rate * secs);
    Ok((Measured { rate: run.rate, cpu_us }, probe_secs / secs * 100.0))
}

/// Runs `pairs` × (without, with) and prints each pair as it ends.
pub fn alternate(
    label: &str,
    wrk: &Wrk,
    nginx: &Nginx,
    pairs: usize,
    start: &dyn Fn() -> Result<Probe>,
) -> Result<Pairs> {
    let mut p = Pairs { without: Vec::new(), with: Vec::new() };
    for i in 1..=pairs {
        let (bare, _) = measure(wrk, nginx, None)?;
        sys::check_interrupt()?;
        let probe = start()?;
        thread::sleep(SETTLE);
        let (loaded, cpu) = measure(wrk, nginx, Some(&probe))?;
        let startup = probe.startup;
        probe.stop()?;
        sys::check_interrupt()?;
        eprintln!(
            "bench: {label} pair {i}/{pairs}: {:.0} → {:.0} conn/s (×{:.3}), {:.1} → {:.1} µs CPU/conn (×{:.3}), \
             attached in {} ms",
            bare.rate,
            loaded.rate,
            loaded.rate / bare.rate,
            bare.cpu_us,
            loaded.cpu_us,
            bare.cpu_us / loaded.cpu_us,
            startup.as_millis()
        );
        p.without.push(bare);
        p.with.push(Probed { run: loaded, startup, cpu_pct: cpu });
    }
    Ok(p)
}

/// Median and range of a small sample.
#[derive(Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Spread {
        assert!(!v.is_empty(), "a spread needs at least one sample");
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Spread { median, min: v[0], max: v[n - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(Spread::of(vec![3.0, 1.0, 2.0]).median, 2.0);
        let s = Spread::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }
}
