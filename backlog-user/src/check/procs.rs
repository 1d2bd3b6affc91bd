//! Who owns a listening socket (socket inode → /proc/*/fd → pid) and how busy its
//! threads are: a deeper queue does not help workers that are already at 100% CPU.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::time::Instant;

use procfs::process::{all_processes, Process};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct Owner {
    pub pid: i32,
    pub comm: String,
}

#[derive(Default)]
pub struct OwnerScan {
    /// Socket inode → processes holding it (a socket inherited across fork has several).
    pub owners: HashMap<u32, Vec<Owner>>,
    /// Processes whose fd table we could not read (other users' processes without root,
    /// or processes protected from us).
    pub unreadable: usize,
}

/// Finds the owners of `inodes`. Socket inodes are unique machine-wide, so one scan
/// covers every namespace.
pub fn owners_of(inodes: &BTreeSet<u32>) -> OwnerScan {
    let mut scan = OwnerScan::default();
    let Ok(procs) = all_processes() else {
        return scan;
    };
    for p in procs {
        // A process that exited mid-scan is not hidden from us, just gone.
        let Ok(p) = p else { continue };
        let held = match sockets_held(p.pid(), inodes) {
            Ok((held, hidden)) => {
                scan.unreadable += usize::from(hidden);
                held
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                scan.unreadable += 1;
                continue;
            }
        };
        if held.is_empty() {
            continue;
        }
        let comm = p.stat().map(|s| s.comm).unwrap_or_default();
        for ino in held {
            scan.owners.entry(ino).or_default().push(Owner { pid: p.pid(), comm: comm.clone() });
        }
    }
    scan
}

/// Which of `inodes` the process holds, and whether some of its fds were unreadable.
/// Read directly rather than through procfs's fd iterator, which skips unreadable
/// links silently: /proc/PID/fd can be listable while its links are not.
fn sockets_held(pid: i32, inodes: &BTreeSet<u32>) -> io::Result<(BTreeSet<u32>, bool)> {
    let mut held = BTreeSet::new();
    let mut hidden = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        match std::fs::read_link(entry?.path()) {
            Ok(target) => {
                let ino = target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
                held.extend(ino.filter(|i| inodes.contains(i)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // closed meanwhile
            Err(_) => hidden = true,
        }
    }
    Ok((held, hidden))
}

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
    fn finds_own_listener_and_measures_a_busy_thread() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = crate::sys::socket_inode(&l) as u32;
        let scan = owners_of(&BTreeSet::from([ino]));
        let me = std::process::id() as i32;
        assert!(scan.owners[&ino].iter().any(|o| o.pid == me));

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
