//! Running `backlog-trace --json` and reading its NDJSON output.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;

use crate::wait_for;

/// Bound on attaching (first line) and on exiting after a stop request;
/// generous because the VM runner emulates the CPU (qemu TCG).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A peer and its drops, in a listener's `dropped_peers`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerDrops {
    pub peer: String,
    pub drops: u64,
}

/// One listener of the final summary line.
#[derive(Deserialize, Debug, Clone)]
pub struct Listener {
    pub netns: u64,
    pub port: u16,
    pub local: String,
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub drops: u64,
    pub overflows: u64,
    pub drops_by_reason: BTreeMap<String, u64>,
    #[serde(default)]
    pub accepts: u64,
    /// Accepts missing from the wait histogram (kernel map evictions).
    #[serde(default)]
    pub waits_unrecorded: u64,
    #[serde(default)]
    pub accept_latency_us: Option<serde_json::Value>,
    /// What the owner asked of listen(), when the tracer saw the call.
    pub requested_backlog: Option<u32>,
    /// Drops the kernel counted at this socket that the tracer did not detect,
    /// placed here by the socket's own drop counter.
    pub undetected: u64,
    /// Drops whose line `--max-drop-lines` held back (counted in `drops`).
    #[serde(default)]
    pub suppressed_lines: u64,
    /// The peers with most drops, from the kernel's per-peer counts, and the drops
    /// of every other peer (or of none).
    pub dropped_peers: Vec<PeerDrops>,
    pub drops_other_peers: u64,
    /// Of `drops`, those under no peer: the kernel's peer table was full.
    #[serde(default)]
    pub drops_no_peer: u64,
    /// The accept queue's limit (sk_max_ack_backlog).
    #[serde(default)]
    pub queue_max: u32,
    /// The socket's inode (as /proc/PID/fd and `ss -e` name it).
    #[serde(default)]
    pub inode: u64,
    /// The processes that took connections from it by accept(), and how many each.
    #[serde(default)]
    pub accepted_by: Vec<Acceptor>,
}

/// A process that accepted connections from a listener.
#[derive(Deserialize, Debug, Clone)]
pub struct Acceptor {
    pub pid: u32,
    pub comm: String,
    pub accepts: u64,
}

/// One namespace of the summary's `namespaces`: the kernel's TcpExt deltas since
/// the tracer's baseline against the drops it detected there.
#[derive(Deserialize, Debug, Clone)]
pub struct NetnsCounts {
    pub netns: u64,
    pub baseline: String,
    pub listen_drops: u64,
    pub listen_overflows: u64,
    pub reqq_full_drop: u64,
    pub detected: u64,
    pub undetected: u64,
    pub unplaced: u64,
}

impl Listener {
    /// Drops of one reason (accept_queue_full, syn_queue_full, ack_overflow, other).
    pub fn reason(&self, reason: &str) -> u64 {
        self.drops_by_reason.get(reason).copied().unwrap_or(0)
    }
}

/// The final `{"type":"summary",...}` line.
#[derive(Deserialize, Debug, Clone)]
pub struct Summary {
    pub listeners: Vec<Listener>,
    pub lost_events: u64,
    /// Program runs the kernel skipped (recursion on one CPU).
    pub missed_runs: u64,
    /// Every selected listener's summed counts, shown or not (`listeners`, `merged`,
    /// `drops`, `accepts`, `waits_unrecorded`, ...).
    #[serde(default)]
    pub totals: serde_json::Value,
    #[serde(default)]
    pub unmatched_accepts: u64,
    #[serde(default)]
    pub pending_enqueued: Option<u64>,
    /// Drops the kernel counted and the tracer did not detect, over every namespace.
    pub undetected: u64,
    pub namespaces: Vec<NetnsCounts>,
    /// Every kernel-side diagnostic by name, with missed_runs and lost_events.
    pub diagnostics: BTreeMap<String, u64>,
    /// One line per program found detached from outside.
    pub detached: Vec<String>,
}

impl Summary {
    /// The reconciliation of namespace `inode`; panics if the tracer did not read it.
    pub fn netns(&self, inode: u64) -> &NetnsCounts {
        self.namespaces
            .iter()
            .find(|n| n.netns == inode)
            .unwrap_or_else(|| panic!("netns {inode} missing from the summary's namespaces: {self:#?}"))
    }
}

/// One `{"type":"drop",...}` line.
#[derive(Deserialize, Debug, Clone)]
pub struct DropEvent {
    pub ts_ns: u64,
    pub netns: u64,
    pub port: u16,
    pub local: String,
    pub peer: String,
    pub reason: String,
    pub queue_len: u64,
    pub queue_max: u64,
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
}

/// The tracer binary: $BACKLOG_TRACE_BIN, else the workspace's release build.
pub fn tracer_bin() -> PathBuf {
    match std::env::var_os("BACKLOG_TRACE_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::workspace_root().join("target/release/backlog-trace"),
    }
}

/// A command for the tracer binary; fails the test clearly if it is not built.
pub fn tracer_command() -> Command {
    let bin = tracer_bin();
    assert!(
        bin.exists(),
        "tracer binary {} not found: build backlog-trace in release mode or set BACKLOG_TRACE_BIN",
        bin.display()
    );
    Command::new(bin)
}

/// A running `backlog-trace`; killed on drop if still running. The one harness
/// every integration test starts the tracer with.
pub struct Tracer {
    child: Child,
    /// The parsed start line (`start`, `start_sub`); Null for `spawn`.
    pub start: serde_json::Value,
    /// The first line of stdout, printed once every program is attached.
    first: String,
    lines: Receiver<String>,
    /// Lines after the start line, complete once the tracer has exited.
    rest: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Tracer {
    /// Starts the tracer with `--json` plus `args` (and `--mode $BACKLOG_MODE`
    /// when set) and returns once it printed its start line, i.e. once every
    /// program is attached.
    pub fn start(args: &[&str]) -> Tracer {
        Tracer::start_sub(&[], args)
    }

    /// [`Tracer::start`] with a subcommand (e.g. `record -o FILE`) before the options.
    pub fn start_sub(sub: &[&str], args: &[&str]) -> Tracer {
        let argv: Vec<&str> = sub.iter().chain(&["--json"]).chain(args).copied().collect();
        let mut tracer = Tracer::spawn(&argv);
        let first = &tracer.first;
        tracer.start = serde_json::from_str(first).unwrap_or_else(|e| panic!("start line is not JSON ({e}): {first}"));
        assert_eq!(tracer.start["type"], "start", "first line should be the start line: {first}");
        if let Ok(mode) = std::env::var("BACKLOG_MODE") {
            assert_eq!(tracer.start["mode"], mode.as_str(), "a forced --mode must be the mode used: {first}");
        }
        tracer
    }

    /// Starts the tracer with `argv` as given (text or JSON output; plus `--mode
    /// $BACKLOG_MODE` when set) and returns once it printed its first line: both
    /// output modes print one once every program is attached.
    pub fn spawn(argv: &[&str]) -> Tracer {
        crate::require_root();
        let mut cmd = tracer_command();
        cmd.args(argv);
        if let Ok(mode) = std::env::var("BACKLOG_MODE") {
            cmd.args(["--mode", &mode]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tracer_bin().display()));

        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        // Line by line, so a hung tracer's messages can be shown before it ends.
        let stderr_reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = sink.lock().expect("stderr lock");
                all.push_str(&line);
                all.push('\n');
            }
        }));

        let start = serde_json::Value::Null;
        let mut tracer = Tracer { child, start, first: String::new(), lines, rest: Vec::new(), stderr, stderr_reader };
        tracer.first = match tracer.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!(
                "backlog-trace printed no start line within {STEP_TIMEOUT:?}; stderr so far:\n{}",
                tracer.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = tracer.wait_exit();
                panic!("backlog-trace {argv:?} exited ({status}) before its start line; stderr:\n{}", tracer.stderr());
            }
        };
        tracer
    }

    /// Everything the tracer printed on stdout, start line first (complete once it
    /// has exited).
    pub fn stdout(&self) -> Vec<String> {
        std::iter::once(&self.first).chain(&self.rest).cloned().collect()
    }

    /// A `kB` field of /proc/PID/status (VmRSS, VmHWM) of the running tracer.
    pub fn status_kb(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let line = text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'));
        let line = line.unwrap_or_else(|| panic!("no {field} in {path}"));
        line.trim().trim_end_matches("kB").trim().parse().unwrap_or_else(|_| panic!("bad {field} in {path}: {line}"))
    }

    fn signal(&mut self, sig: libc::c_int) -> ExitStatus {
        // SAFETY: plain syscall on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        self.wait_exit()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the tracer to stop (Ctrl-C) and waits for it to exit.
    pub fn stop_sigint(&mut self) -> ExitStatus {
        self.signal(libc::SIGINT)
    }

    pub fn stop_sigterm(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM)
    }

    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL)
    }

    /// Waits (bounded) for the tracer to exit and collects the rest of its
    /// output. On timeout the test fails and `Drop` kills the tracer.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let status = wait_for("backlog-trace to exit", STEP_TIMEOUT, || child.try_wait().expect("wait for tracer"));
        // The stdout reader ends at EOF, which closes the channel.
        self.rest.extend(self.lines.iter());
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        status
    }

    /// Waits (bounded) for an output line of type `kind` for which `pred` holds,
    /// while the tracer runs; earlier lines are kept for `drops`/`summary`.
    pub fn wait_line(&mut self, kind: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!("no {kind} line as expected within {timeout:?} ({e:?}); stderr:\n{}", self.stderr()),
            };
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("tracer printed a non-JSON line ({e}): {line}"));
            self.rest.push(line);
            if v["type"] == kind && pred(&v) {
                return;
            }
        }
    }

    /// What the tracer wrote on stderr (complete once it has exited).
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    fn lines_of_type(&self, kind: &str) -> Vec<&String> {
        self.rest
            .iter()
            .filter(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("tracer printed a non-JSON line ({e}): {l}"));
                v["type"] == kind
            })
            .collect()
    }

    /// The parsed final summary line (call after the tracer has exited).
    pub fn summary(&self) -> Summary {
        let lines = self.lines_of_type("summary");
        let [line] = lines.as_slice() else {
            panic!(
                "expected exactly one summary line, got {}; stdout after start:\n{}\nstderr:\n{}",
                lines.len(),
                self.rest.join("\n"),
                self.stderr()
            );
        };
        serde_json::from_str(line).unwrap_or_else(|e| panic!("summary line does not match the contract ({e}): {line}"))
    }

    /// The parsed drop lines.
    pub fn drops(&self) -> Vec<DropEvent> {
        self.lines_of_type("drop")
            .into_iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("drop line does not match the contract ({e}): {l}"))
            })
            .collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one `backlog-trace report` run printed.
pub struct ReportRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// stdout's NDJSON records, when it succeeded with --json.
    pub lines: Vec<serde_json::Value>,
}

/// Runs `backlog-trace report FILES ARGS`; fails the test on a panic or a signal.
pub fn report(files: &[&std::path::Path], args: &[&str]) -> ReportRun {
    let out = tracer_command().arg("report").args(files).args(args).output().expect("run backlog-trace report");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "report panicked on {files:?}: {stderr}");
    let code = out.status.code().unwrap_or_else(|| panic!("report killed by a signal: {stderr}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = if code == 0 && args.contains(&"--json") {
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect()
    } else {
        vec![]
    };
    ReportRun { code, stdout, stderr, lines }
}

#[cfg(test)]
mod tests {
    use super::{DropEvent, Summary};

    /// The contract's lines parse; fields the tests do not use are ignored.
    #[test]
    fn contract_lines_parse() {
        let drop: DropEvent = serde_json::from_str(
            r#"{"type":"drop","ts_ns":1,"netns":4026531840,"port":8080,"local":"[::1]:8080",
                "peer":"[::1]:40000","reason":"accept_queue_full","queue_len":9,"queue_max":8,
                "syn_queue_len":0,"pids":[7],"comms":["bt-server"]}"#,
        )
        .unwrap();
        assert_eq!((drop.port, drop.queue_len, drop.pids[0]), (8080, 9, 7));
        let summary: Summary = serde_json::from_str(
            r#"{"type":"summary","duration_s":1.5,"lost_events":0,"missed_runs":0,"listeners":[{"netns":1,
                "port":80,"local":"127.0.0.1:80","pids":[7],"comms":["x"],"drops":3,
                "overflows":2,"drops_by_reason":{"accept_queue_full":2,"syn_queue_full":1,
                "ack_overflow":0,"other":0},"undetected":1,
                "dropped_peers":[{"peer":"10.0.0.7","drops":2}],"drops_other_peers":1}],"undetected":2,
                "namespaces":[{"netns":1,"name":"blue","baseline":"start","listen_drops":5,
                "listen_overflows":3,"reqq_full_drop":1,"detected":3,"undetected":2,"unplaced":1,
                "gone":false}],"gone_namespaces":{"namespaces":0,"listen_drops":0,"detected":0,
                "undetected":0},"unreconciled":[],"detached":[],
                "diagnostics":{"windows_replaced":0,"settled_late":0,"unattributed":0,"stats_full":0,
                "flush_busy":0,"missed_runs":0,"lost_events":0}}"#,
        )
        .unwrap();
        let l = &summary.listeners[0];
        assert_eq!((l.drops, l.overflows, l.reason("syn_queue_full"), l.undetected), (3, 2, 1, 1));
        assert_eq!((l.dropped_peers[0].drops, l.drops_other_peers), (2, 1));
        let n = summary.netns(1);
        assert_eq!(n.detected + n.undetected, n.listen_drops);
        assert_eq!(summary.diagnostics.len(), 7);
    }
}
