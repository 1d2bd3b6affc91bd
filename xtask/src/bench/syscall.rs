//! The syscall tax: any program on a syscall tracepoint puts every task of the host
//! on the syscall-tracing slow path, so a tracer that watches accept() slows every
//! other process's system calls. Measured as the time of a tight getppid() loop
//! (a syscall that does almost nothing) bare and with each probe attached.
use std::path::Path;
use std::thread;

use anyhow::Result;

use crate::harness::probe::Probe;
use crate::harness::sys;

use super::rate::{Spread, SETTLE};
use super::table::{Status, Table};

/// Calls per measurement by default (the figure): ~1 s each on this host.
pub const CALLS: u64 = 5_000_000;
/// Alternating bare/with pairs per probe.
const PAIRS: usize = 7;
/// Target in modes with no syscall tracepoint (fentry, kprobe, `--no-accept-timing`).
const TARGET: f64 = 0.98;

/// This thread's CPU time (user + system), ns: unlike wall time, it leaves out the
/// time other processes on a shared host take the CPU away, while the slow path's
/// extra work is charged to the thread's system time.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// CPU ns per getppid() call over `calls` calls.
fn loop_ns(calls: u64) -> f64 {
    let t0 = thread_cpu_ns();
    for _ in 0..calls {
        // SAFETY: getppid has no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    (thread_cpu_ns() - t0) as f64 / calls as f64
}

/// A probe to compare: its label, how to start it, and the ratio it must reach.
type Candidate<'a> = (&'a str, &'a dyn Fn() -> Result<Probe>, Option<f64>);

/// bare/with ratios of the getppid loop (`calls` calls a measurement), per probe, as
/// table rows. In fentry and kprobe modes ($BACKLOG_MODE, as the kernel matrix sets
/// it) the tracer attaches no syscall tracepoint, so its default configuration is
/// held to the target and `--no-accept-timing` (tracepoint mode's) is not run.
pub fn measure(tracer: &Path, calls: u64, t: &mut Table) -> Result<()> {
    let mode = crate::harness::probe::mode();
    let no_tax = matches!(mode.as_deref(), Some("fentry" | "kprobe"));
    let default_label =
        format!("backlog-trace (default{})", mode.as_deref().map(|m| format!(", --mode {m}")).unwrap_or_default());
    let default = || Probe::tracer(tracer, &[]);
    let no_accept_timing = || Probe::tracer(tracer, &["--no-accept-timing"]);
    let peer = || Probe::bpftrace("tracepoint:syscalls:sys_exit_accept4 { @n = count(); }");
    let mut probes: Vec<Candidate> = vec![(&default_label, &default, no_tax.then_some(TARGET))];
    if !no_tax {
        probes.push(("backlog-trace --no-accept-timing", &no_accept_timing, Some(TARGET)));
    }
    probes.push(("bpftrace on sys_exit_accept4 alone", &peer, None));
    for (label, start, target) in probes {
        eprintln!("bench: getppid loop, {calls} calls, bare vs {label}");
        let (mut bare, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..PAIRS {
            sys::check_interrupt()?;
            let b = loop_ns(calls);
            let p = start()?;
            thread::sleep(SETTLE);
            let w = loop_ns(calls);
            p.stop()?;
            bare.push(b);
            with.push(w);
            ratios.push(b / w);
        }
        let (b, w, r) = (Spread::of(bare), Spread::of(with), Spread::of(ratios));
        // Judged on the fastest loop of each side: other work on the machine (in an
        // emulated guest, the other vCPU's, the tracer's own included) only ever
        // adds to a loop's time, while a slow path on every syscall is in every loop,
        // the fastest too. The median of the pair ratios is shown beside it.
        let best = b.min / w.min;
        t.add(
            &format!("getppid() loop (thread CPU time), bare/with ratio of the fastest loops, {label} ({PAIRS} pairs)"),
            format!(
                "{best:.3}: {:.0} → {:.0} ns a call (+{:.0}); median of pair ratios {:.3} (range {:.3}–{:.3}), \
                 medians {:.0} → {:.0} ns",
                b.min,
                w.min,
                w.min - b.min,
                r.median,
                r.min,
                r.max,
                b.median,
                w.median,
            ),
            if target.is_some() { "≥ 0.98 (no syscall tracepoint)" } else { "tax stated in README" },
            match target {
                Some(min) => Status::from(best >= min),
                None => Status::Info,
            },
        );
    }
    Ok(())
}
