//! Every flag value a careless operator or a hostile user might pass is refused
//! before anything is attached: exit 2, one line naming the value and what is
//! expected, never a panic (exit 101) and never "traced nothing, exit 0".
//!
//!   cargo test -p backlog-tests --test flags
use std::process::Output;

use backlog_tests::require_root;
use backlog_tests::tracer::tracer_command;

fn run(args: &[&str]) -> Output {
    tracer_command().args(args).output().expect("running backlog-trace")
}

/// Exit 2, and stderr's first line names `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: exit {:?}, stderr:\n{stderr}", out.status);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.contains(needle), "{args:?}: first stderr line {first:?} lacks {needle:?}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed on stdout before refusing: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn durations_outside_1ms_to_a_year_are_refused() {
    for flag in ["--interval", "--duration"] {
        for v in ["0.0000000001", "1e19", "0", "-5", "400d", "8761h", "NaN"] {
            refused(&[flag, v], v);
        }
    }
    for v in ["10000000000000000000", "0.0001ms", "1e300"] {
        refused(&["check", "--sample", v], v);
    }
    refused(&["record", "-o", "/tmp/never-written", "--max-size", "99999999999G"], "too large");
    refused(&["record", "-o", "/tmp/never-written", "--max-size", "10"], "too small");
}

#[test]
fn drop_line_budgets_that_are_not_a_count_are_refused() {
    for v in ["-1", "x", "4294967296", "1.5"] {
        refused(&["--max-drop-lines", v], v);
        refused(&["record", "-o", "/tmp/never-written", "--max-drop-lines", v], v);
    }
    refused(&["--no-accept-timing=yes"], "no-accept-timing");
}

#[test]
fn netns_arguments_must_name_a_network_namespace_in_use() {
    require_root();
    for cmd in [&[][..], &["check"][..], &["record", "-o", "/tmp/never-written"][..]] {
        let with = |v: &'static str| [cmd, &["--netns", v][..]].concat();
        refused(&with("/etc/passwd"), "not a namespace file");
        refused(&with("/proc/self/ns/uts"), "not a network namespace");
        refused(&with("surely-no-such-netns"), "no network namespace named");
        refused(&with("12345"), "12345 is not used by any process");
    }
    assert!(!std::path::Path::new("/tmp/never-written").exists(), "a refused record created its file");
}

#[test]
fn netns_of_another_user_is_permission_denied_not_missing() {
    require_root();
    // As nobody, pid 1's namespace file cannot be opened: the line must say so.
    let bin = backlog_tests::tracer::tracer_bin();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["--netns", "/proc/1/ns/net", "-d", "1"])
        .output()
        .expect("running setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("permission denied"), "stderr:\n{stderr}");
}

/// `report --since/--until`: impossible dates and unknown spellings are refused before
/// any file is read; journalctl's spellings (1h30m, -5m) and RFC 3339 UTC are accepted
/// (the run then gets as far as the file, which does not exist).
#[test]
fn report_times_are_validated_and_take_journalctl_spellings() {
    let file = "/nonexistent/bt-flags.btr";
    for v in [
        "2026-02-30T00:00:00Z",
        "2025-02-29T12:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-04-31T10:00:00Z",
        "2026-01-01T00:00:00+02:00",
        "5 parsecs",
        "yesterday",
        "+0s",
    ] {
        for flag in ["--since", "--until"] {
            refused(&["report", file, flag, v], v);
        }
    }
    for v in ["1h30m", "5m", "-5m", "+90s", "1.5h", "2024-02-29T23:59:59Z", "2026-02-28 10:00:00", "@1763773323"] {
        let out = run(&["report", file, "--since", v]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{v}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{v}: {stderr}");
        assert!(stderr.contains(file) && stderr.contains("No such file"), "{v} accepted, then the file: {stderr}");
    }
}
