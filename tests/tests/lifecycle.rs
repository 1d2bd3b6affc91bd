//! The tracer leaves no eBPF program behind however it ends, and rejects bad
//! flags with clap's usage exit code.
//!
//!   cargo test -p backlog-tests --test lifecycle -- --test-threads=1
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use backlog_tests::bpf::{programs_held_by, still_loaded};
use backlog_tests::require_root;
use backlog_tests::tracer::{tracer_command, Tracer};

/// Starts the tracer with `args`, ends it with `stop`, and checks that all
/// its programs are gone afterwards. Returns the tracer for further checks.
fn run_and_unload(args: &[&str], how: &str, stop: impl FnOnce(&mut Tracer) -> ExitStatus) -> (Tracer, ExitStatus) {
    require_root();
    let mut tracer = Tracer::start(args);
    let ours = programs_held_by(tracer.pid());
    assert!(
        !ours.is_empty(),
        "backlog-trace printed its start line but holds no bt_* program; the unload check would prove nothing"
    );
    let status = stop(&mut tracer);
    // Links die with their last fd; the kernel frees the programs shortly
    // after the process is gone (asynchronously, hence the bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = still_loaded(&ours);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "after {how}, tracer programs are still loaded: {left:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (tracer, status)
}

fn assert_clean_end(tracer: &Tracer, status: ExitStatus, how: &str) {
    assert!(status.success(), "backlog-trace exited {status} after {how}; stderr:\n{}", tracer.stderr());
    tracer.summary();
}

#[test]
fn nothing_stays_loaded_after_duration_ends() {
    let (t, status) = run_and_unload(&["--duration", "2s"], "--duration 2s", Tracer::wait_exit);
    assert_clean_end(&t, status, "--duration 2s");
}

#[test]
fn nothing_stays_loaded_after_sigint() {
    let (t, status) = run_and_unload(&[], "SIGINT", Tracer::stop_sigint);
    assert_clean_end(&t, status, "SIGINT");
}

#[test]
fn nothing_stays_loaded_after_sigterm() {
    let (t, status) = run_and_unload(&[], "SIGTERM", Tracer::stop_sigterm);
    assert_clean_end(&t, status, "SIGTERM");
}

#[test]
fn nothing_stays_loaded_after_sigkill() {
    run_and_unload(&[], "SIGKILL", Tracer::kill);
}

fn assert_usage_error(args: &[&str]) {
    let out = tracer_command().args(args).output().expect("run backlog-trace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "backlog-trace {args:?} should be a usage error; stderr:\n{stderr}");
    assert!(!stderr.trim().is_empty(), "usage error without a message");
}

#[test]
fn port_zero_is_a_usage_error() {
    assert_usage_error(&["--port", "0"]);
}

#[test]
fn unknown_netns_is_a_usage_error() {
    assert_usage_error(&["--netns", "no-such-ns"]);
}
