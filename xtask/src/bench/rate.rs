//! Connection rate with and without a probe, in alternating runs of equal length,
//! so drift in the machine (other load, TIME_WAIT build-up, thermal) hits both sides.
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::probe::Probe;
use super::sys;
use super::wrk::Wrk;

/// Pause between a probe's "attached" line and the load: bpftrace announces before
/// it attaches, and backlog-trace's first listener scan should not be measured.
pub const SETTLE: Duration = Duration::from_secs(1);

pub struct Pairs {
    /// Connections/s of each run, in run order.
    pub without: Vec<f64>,
    pub with: Vec<f64>,
    pub startups: Vec<Duration>,
    /// The probe's own CPU (user + system) during each loaded run, % of one core.
    pub cpu_pct: Vec<f64>,
}

impl Pairs {
    /// with/without per pair: its median, minimum and maximum.
    pub fn ratio(&self) -> Spread {
        Spread::of(self.without.iter().zip(&self.with).map(|(a, b)| b / a).collect())
    }
}

/// Runs `pairs` × (without, with) and prints each run as it ends.
pub fn alternate(label: &str, wrk: &Wrk, pairs: usize, start: &dyn Fn() -> Result<Probe>) -> Result<Pairs> {
    let mut p = Pairs { without: Vec::new(), with: Vec::new(), startups: Vec::new(), cpu_pct: Vec::new() };
    for i in 1..=pairs {
        let bare = wrk.run()?;
        check_interrupt()?;
        let probe = start()?;
        thread::sleep(SETTLE);
        let u0 = probe.usage()?;
        let t0 = Instant::now();
        let loaded = wrk.run()?;
        let cpu = probe.usage()?.cpu.saturating_sub(u0.cpu).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
        let startup = probe.startup;
        probe.stop()?;
        check_interrupt()?;
        eprintln!(
            "bench: {label} pair {i}/{pairs}: {bare:.0} → {loaded:.0} conn/s (×{:.3}), attached in {} ms",
            loaded / bare,
            startup.as_millis()
        );
        p.without.push(bare);
        p.with.push(loaded);
        p.startups.push(startup);
        p.cpu_pct.push(cpu);
    }
    Ok(p)
}

pub fn check_interrupt() -> Result<()> {
    if sys::interrupted() {
        bail!("interrupted");
    }
    Ok(())
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
