//! Integration-test harness: network namespaces, workloads, kernel counters,
//! and a driver for the `backlog-trace` binary.
//!
//! Everything here panics on failure with a message meant for the test log:
//! a harness problem must fail the test loudly, never skip it.
//!
//! Running the suite needs root, `ip`, `nft` and `bpftool`; the tests run
//! serially: `cargo test -p backlog-tests -- --test-threads=1`. The tracer is
//! `$BACKLOG_TRACE_BIN`, else `target/release/backlog-trace`; `$BACKLOG_MODE`
//! (fentry|kprobe|tracepoint) forces its attach mode.
pub mod bpf;
pub mod http;
pub mod netns;
pub mod scenario;
pub mod sys;
pub mod tracer;
pub mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Fails the test unless it runs as root (namespaces, nftables and eBPF need it).
pub fn require_root() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        panic!("needs root: run the suite as root (sudo)");
    }
}

/// Whether `counted` falls short of `expected` only by program runs the kernel
/// skipped (`missed`, the tracer's `missed_runs`): on PREEMPT_RT a kprobe run that
/// finds another BPF program preempted on its CPU is skipped, and what it would have
/// seen is missing. False when nothing was skipped or nothing is missing, so the
/// caller's exact check applies; panics when the shortfall is more than the skipped
/// runs, or when nothing was counted at all.
pub fn short_by_missed_runs(what: &str, counted: u64, expected: u64, missed: u64) -> bool {
    if missed == 0 || counted >= expected {
        return false;
    }
    assert!(counted > 0 && expected - counted <= missed, "{counted} {what} of {expected}, only {missed} runs skipped");
    println!("{counted} {what} of {expected}: short by what {missed} skipped runs account for");
    true
}

/// The Cargo workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Polls `probe` every 50 ms until it yields a value; panics after `timeout`
/// naming `what` so a hung step is obvious in the log.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh path for a ready file (not created), unique within this process.
pub fn scratch_path(what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("bt-{what}-{}-{n}", std::process::id()))
}
