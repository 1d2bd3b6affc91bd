//! Moving the calling thread between CPUs, and back: `Session::flush` must never run
//! on the CPU it flushes.
use std::io;

use anyhow::{Context, Result};

/// The thread's CPU set as it was; restored on drop.
pub struct Pinned {
    saved: libc::cpu_set_t,
}

impl Pinned {
    pub fn save() -> Result<Pinned> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
        let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is this thread; the size is the set's.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("reading this thread's CPU affinity");
        }
        Ok(Pinned { saved })
    }

    /// A CPU this thread may run on other than `cpu`: the tracer may be confined to
    /// a few CPUs (taskset, a container's cpuset) and still flush every CPU.
    pub fn other_than(&self, cpu: u32) -> Option<u32> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `saved` is a valid cpu_set_t and the index is within its size.
            .filter(|c| unsafe { libc::CPU_ISSET(*c, &self.saved) })
            .map(|c| c as u32)
            .find(|c| *c != cpu)
    }

    /// Moves this thread to `cpu` (returns once it runs there).
    pub fn run_on(&self, cpu: u32) -> Result<()> {
        // SAFETY: as above; CPU_SET bounds-checks the index.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        set_affinity(&set).with_context(|| format!("moving to CPU {cpu}"))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = set_affinity(&self.saved);
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 is this thread; `set` is a valid cpu_set_t.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
