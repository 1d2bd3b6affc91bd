//! Attach modes a kernel cannot run are found by probing it, and said in one line:
//! a forced mode either starts or exits 3 with `<mode> mode is unavailable: <why>`,
//! and the automatic choice, if it got as far as that mode, passed it over for the
//! same reason. The VM matrix
//! (scripts/vm-guest.sh) runs this where the forced mode is refused, before it
//! reports the cell unsupported.
//!
//!   BACKLOG_MODE=fentry cargo test -p backlog-tests --test modes -- --test-threads=1
use backlog_tests::require_root;
use backlog_tests::tracer::tracer_command;

/// Exit status of backlog-trace for a forced mode the kernel lacks.
const UNAVAILABLE: i32 = 3;
/// The order in which the tracer tries modes when none is forced.
const PREFERENCE: [&str; 3] = ["fentry", "kprobe", "tracepoint"];

#[test]
fn a_forced_mode_starts_or_is_refused_in_one_line_that_the_automatic_choice_repeats() {
    require_root();
    let Ok(mode) = std::env::var("BACKLOG_MODE") else {
        // Without a forced mode, the automatic choice alone: every mode it passed
        // over is named with a reason, one line each; in tracepoint mode a line also
        // states the syscall tracepoints' tax (issue 15) and how to leave them out.
        let auto = automatic_start();
        for f in fallbacks(&auto) {
            let tax = f.starts_with("accept timing and listen() backlog from syscall tracepoints: ")
                && f.contains("--no-accept-timing");
            assert!(f.contains(" mode unavailable: ") || f.contains(" hooked with a kprobe ") || tax, "fallback {f:?}");
        }
        return;
    };
    let out = tracer_command()
        .args(["--json", "--duration", "1", "--mode", &mode])
        .output()
        .unwrap_or_else(|e| panic!("cannot run backlog-trace: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let auto = automatic_start();
    let passed_over: Vec<String> =
        fallbacks(&auto).into_iter().filter(|f| f.starts_with(&format!("{mode} mode unavailable"))).collect();
    match out.status.code() {
        Some(0) => assert!(
            passed_over.is_empty(),
            "--mode {mode} runs, yet the automatic choice passed it over: {passed_over:?}"
        ),
        Some(UNAVAILABLE) => {
            let prefix = format!("backlog-trace: {mode} mode is unavailable: ");
            assert!(!stderr.contains('\n'), "the refusal of --mode {mode} is not one line:\n{stderr}");
            let why = stderr
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("the refusal of --mode {mode} does not start with {prefix:?}: {stderr}"));
            assert!(why.contains("use --mode"), "the refusal names no way out: {why}");
            let chosen = auto["mode"].as_str().unwrap_or_default();
            assert_ne!(chosen, mode, "the automatic choice runs the mode --mode {mode} refused");
            let rank = |m: &str| PREFERENCE.iter().position(|p| *p == m);
            // The automatic choice stops at the first mode that works: it names only
            // the modes it tried before that one.
            let expected =
                if rank(&mode) < rank(chosen) { vec![format!("{mode} mode unavailable: {why}")] } else { Vec::new() };
            assert_eq!(passed_over, expected, "the automatic choice ({chosen}) disagrees with --mode {mode}");
        }
        other => panic!("backlog-trace --mode {mode} exited {other:?}, neither running nor refusing it:\n{stderr}"),
    }
}

/// The start line of the tracer left to choose its mode (no --mode).
fn automatic_start() -> serde_json::Value {
    let out = tracer_command()
        .args(["--json", "--duration", "1"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run backlog-trace: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the automatic choice exited {}; stderr:\n{stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_else(|| panic!("the automatic choice printed nothing: {stderr}"));
    serde_json::from_str(first).unwrap_or_else(|e| panic!("start line {first:?} is not JSON: {e}"))
}

fn fallbacks(start: &serde_json::Value) -> Vec<String> {
    start["fallbacks"].as_array().into_iter().flatten().filter_map(|f| f.as_str().map(str::to_owned)).collect()
}
