//! What reaches the operator: other users' strings are shown, never obeyed; a
//! closed stdout ends the session cleanly and the recording is still finished.
//!
//!   cargo test -p backlog-tests --test outputs -- --test-threads=1
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use backlog_tests::netns::Netns;
use backlog_tests::scenario::fence;
use backlog_tests::tracer::{tracer_command, Tracer};
use backlog_tests::workload::{workload_bin, Clients};
use backlog_tests::{require_root, scratch_path, wait_for};

const PORT: u16 = 8080;

/// A listener held by a process whose name (comm) is a terminal escape sequence:
/// its executable is bt-server copied under that name.
fn hostile_server(ns: &Netns, comm: &str) -> backlog_tests::workload::Spawned {
    let dir = scratch_path("esc");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(comm);
    std::fs::copy(workload_bin("bt-server"), &exe).expect("copy bt-server");
    let ready = dir.join("ready");
    let argv = [
        exe.to_str().unwrap().to_string(),
        format!("--port={PORT}"),
        "--backlog=8".into(),
        "--accept=none".into(),
        format!("--ready-file={}", ready.display()),
    ];
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let proc = ns.spawn(&argv);
    wait_for("the renamed server to listen", Duration::from_secs(30), || ready.exists().then_some(()));
    proc
}

#[test]
fn escape_sequences_in_a_process_name_are_shown_escaped() {
    require_root();
    let ns = Netns::new("esc");
    // Clears the screen and rings the bell if printed raw (15 bytes: comm's limit).
    let comm = "\x1b[2J\x1b[Hevil\x07";
    let _server = hostile_server(&ns, comm);
    let mut tracer = Tracer::spawn(&["--netns", ns.name(), "--events"]);
    Clients::new("127.0.0.1", PORT, 100).run(&ns);
    fence(&ns);
    let status = tracer.stop_sigint();
    assert!(status.success(), "{status}; stderr:\n{}", tracer.stderr());
    let out = tracer.stdout().join("\n");
    assert!(!out.contains('\x1b') && !out.contains('\x07'), "raw control characters on the terminal:\n{out:?}");
    assert!(out.contains("\\x1b[2J\\x1b[Hevil\\x07"), "the owner's name is not shown escaped:\n{out}");
}

#[test]
fn a_closed_stdout_ends_the_session_and_the_recording_is_finished() {
    require_root();
    let ns = Netns::new("epipe");
    let _server =
        backlog_tests::workload::Server::start(&ns, backlog_tests::workload::ServerSpec::new("127.0.0.1", PORT));
    let file = scratch_path("epipe-rec");
    let mut child = tracer_command()
        .args(["record", "-o", file.to_str().unwrap(), "--json", "--netns", ns.name()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the recorder");
    // Read the start line, then close our end of the pipe: the next drop line fails.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        first.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&first).contains("\"type\":\"start\""), "{first:?}");
    drop(stdout);
    Clients::new("127.0.0.1", PORT, 100).run(&ns);
    let status =
        wait_for("the recorder to end after its stdout closed", Duration::from_secs(30), || child.try_wait().unwrap());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "a closed stdout is a clean end, not {status}; stderr:\n{stderr}");
    // The recording was finished: it has its end mark and the drops.
    let out = Command::new(backlog_tests::tracer::tracer_bin())
        .args(["report", "--json", file.to_str().unwrap()])
        .output()
        .expect("report");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "report failed: {}", String::from_utf8_lossy(&out.stderr));
    let recording: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(recording["clean_end"], true, "no end mark after a closed stdout: {recording}");
    let summary: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "summary")
        .unwrap();
    assert!(summary["totals"]["drops"].as_u64().unwrap() > 0, "{summary}");
    let _ = std::fs::remove_file(&file);
}
