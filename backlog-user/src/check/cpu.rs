//! How busy a listener's owners are: a deeper queue does not help workers that are
//! already at 100% CPU.
use std::collections::BTreeMap;
use std::time::Instant;

use procfs::process::Process;
use serde::Serialize;

/// Cumulative CPU ticks (user + system) of each thread of a process at one moment.
pub struct CpuSample {
    at: Instant,
    ticks: BTreeMap<i32, u64>,
}

pub fn cpu_sample(pid: i32) -> Option<CpuSample> {
    let tasks = Process::new(pid).ok()?.tasks().ok()?;
    let ticks = tasks.flatten().filter_map(|t| t.stat().ok().map(|s| (t.tid, s.utime + s.stime))).collect();
    Some(CpuSample { at: Instant::now(), ticks })
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// Whole process, in percent of one CPU (can exceed 100 with several threads).
    pub total_percent: f64,
    /// The busiest single thread, in percent of one CPU: an event-loop worker at ~100%
    /// is saturated whatever the process total says.
    pub busiest_thread_percent: f64,
    pub threads: usize,
}

pub fn cpu_use(before: &CpuSample, after: &CpuSample) -> CpuUse {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let hz = procfs::ticks_per_second() as f64;
    let pct = |ticks: u64| ticks as f64 / hz / secs * 100.0;
    let deltas: Vec<u64> =
        after.ticks.iter().map(|(tid, &t)| t.saturating_sub(before.ticks.get(tid).copied().unwrap_or(t))).collect();
    CpuUse {
        total_percent: pct(deltas.iter().sum()),
        busiest_thread_percent: pct(deltas.iter().copied().max().unwrap_or(0)),
        threads: after.ticks.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_busy_thread() {
        let me = std::process::id() as i32;

        // Spin until this thread has used 300 ms of CPU (bounded in wall time), so
        // the check holds on a loaded machine where wall time says little.
        let thread_cpu = || {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid pointer to a timespec.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        };
        let before = cpu_sample(me).unwrap();
        let (cpu0, deadline) = (thread_cpu(), Instant::now() + std::time::Duration::from_secs(20));
        let mut spin = 0u64;
        while thread_cpu() - cpu0 < std::time::Duration::from_millis(300) && Instant::now() < deadline {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let after = cpu_sample(me).unwrap();
        let used = cpu_use(&before, &after);
        let busiest_secs = used.busiest_thread_percent / 100.0 * after.at.duration_since(before.at).as_secs_f64();
        // 300 ms of CPU, less a tick of rounding at each end.
        assert!(busiest_secs >= 0.25, "{used:?} over {:?}", after.at.duration_since(before.at));
        assert!(used.total_percent >= used.busiest_thread_percent);
    }
}
