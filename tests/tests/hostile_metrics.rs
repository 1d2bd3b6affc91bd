//! Issue 11's "must show" for the metrics port: an unprivileged client holding 1,100
//! idle connections to `--prometheus` under RLIMIT_NOFILE 1024 (soft and hard, so the
//! tracer cannot raise it) while `record` rotates its files under a drop flood: the
//! tracing goes on, /metrics answers as soon as the idle connections are gone, and
//! the counts equal the namespace's TcpExt ListenDrops exactly, live, scraped and at
//! the end.
//!
//! Run as root, serially, once backlog-trace is built in release mode:
//!   cargo test -p backlog-tests --test hostile_metrics -- --test-threads=1
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backlog_tests::http::{free_port, http_get};
use backlog_tests::netns::Netns;
use backlog_tests::scenario::{fence, settled};
use backlog_tests::sys::raise_nofile;
use backlog_tests::tracer::{tracer_bin, Summary};
use backlog_tests::workload::{Clients, Server, ServerSpec};
use backlog_tests::{require_root, scratch_path, wait_for};

const PORT: u16 = 8080;
/// Bound on attaching and on exiting after SIGINT (generous for emulated CPUs).
const STEP: Duration = Duration::from_secs(60);
/// What the hostile client keeps open, against the tracer's 1024 fds.
const IDLE: usize = 1100;
const NOFILE: &str = "1024";

/// `backlog-trace record --json` under `prlimit --nofile=1024:1024`, its output
/// going to files; killed on drop if still running.
struct Recording {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Recording {
    fn start(file: &Path, args: &[&str]) -> Recording {
        require_root();
        let bin = tracer_bin();
        assert!(bin.exists(), "tracer binary {} not found: build it or set BACKLOG_TRACE_BIN", bin.display());
        let (stdout, stderr) = (scratch_path("hm-stdout"), scratch_path("hm-stderr"));
        // prlimit sets its own limits and execs the tracer: same pid, same limits.
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={NOFILE}:{NOFILE}")).arg("--").arg(&bin);
        cmd.arg("record").arg("-o").arg(file).arg("--json").args(args);
        if let Ok(mode) = std::env::var("BACKLOG_MODE") {
            cmd.args(["--mode", &mode]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start prlimit backlog-trace record");
        let mut rec = Recording { child, stdout, stderr };
        wait_for("backlog-trace record to print its start line", STEP, || {
            if let Some(status) = rec.child.try_wait().expect("wait") {
                panic!("backlog-trace record exited ({status}) before starting: {}", rec.stderr());
            }
            std::fs::read_to_string(&rec.stdout).unwrap_or_default().contains('\n').then_some(())
        });
        rec
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open fds of the tracer now.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// SIGINT, then the live session's summary line.
    fn stop(&mut self) -> Summary {
        // SAFETY: plain syscall on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let child = &mut self.child;
        let status = wait_for("backlog-trace record to exit", STEP, || child.try_wait().expect("wait"));
        assert!(status.success(), "record ended with {status}: {}", self.stderr());
        let out = std::fs::read_to_string(&self.stdout).expect("stdout");
        let line = out
            .lines()
            .find(|l| l.contains("\"type\":\"summary\""))
            .unwrap_or_else(|| panic!("no summary line in:\n{out}\nstderr:\n{}", self.stderr()));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("summary line does not parse ({e}): {line}"))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// The hostile client: keeps `IDLE` connections to `addr` open, sending nothing,
/// and reopens each one the tracer closed, once a second, until `stop`. `held` is
/// how many it has open after each round of connects (some of them closed by the
/// tracer already), `failures` its connects that timed out; returns the most.
fn hold_idle(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = Vec::with_capacity(IDLE);
        let mut most = 0;
        while !stop.load(Ordering::Relaxed) {
            conns.retain(|c| {
                let mut b = [0u8; 1];
                match c.peek(&mut b) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            });
            // A connect may time out while the accept queue is full for a moment
            // (the tracer closes the excess as fast as it can): retry, boundedly.
            // A SYN dropped there is sent again after 1 s: 3 s covers one retry.
            let mut failed = 0;
            while conns.len() < IDLE && failed < 50 && !stop.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Ok(c) => {
                        c.set_nonblocking(true).expect("nonblocking");
                        conns.push(c);
                        most = most.max(conns.len());
                        held.store(conns.len(), Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed += 1;
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            held.store(conns.len(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(1));
        }
        most
    })
}

/// Sum of `backlog_drops_total` over the series of namespace `netns`.
fn scraped_drops(body: &str, netns: u64) -> u64 {
    let label = format!("netns=\"{netns}\"");
    body.lines()
        .filter(|l| l.starts_with("backlog_drops_total{") && l.contains(&label))
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()).expect("a counter value"))
        .sum()
}

/// The metrics listener's queue and what the tracer's threads are doing: for a
/// failure's message.
fn tracer_state(pid: u32, metrics: &str) -> String {
    let port = metrics.rsplit(':').next().unwrap_or_default();
    let ss = Command::new("ss").args(["-ltnH", "sport", "=", &format!(":{port}")]).output();
    let ss = ss.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let mut threads = String::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or_default().split_whitespace().next().unwrap_or_default();
        threads += &format!(" {}:{state}:{wchan}", t.file_name().to_string_lossy());
    }
    format!(
        "listener [{ss}], tracer threads [{threads} ], fds {}",
        std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
    )
}

fn nofile_limits(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files").to_string()
}

#[test]
fn idle_metrics_connections_under_1024_fds_stop_neither_tracing_nor_rotation() {
    require_root();
    raise_nofile(IDLE + 256);
    let ns = Netns::new("hostmetrics");
    // Accepts one connection per 20 ms under 300 concurrent clients: drops each flood.
    let _server = Server::start(&ns, ServerSpec { accept: "delay=20".into(), ..ServerSpec::new("127.0.0.1", PORT) });
    let file = scratch_path("hostile.btrec");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut rec = Recording::start(
        &file,
        &["--netns", ns.name(), "--max-size", "64K", "--rotate", "2", "--prometheus", &metrics],
    );
    let limits = nofile_limits(rec.pid());
    assert_eq!(limits.split_whitespace().skip(3).take(2).collect::<Vec<_>>(), [NOFILE, NOFILE], "{limits}");
    let fds_at_start = rec.fds();
    let before = ns.netstat();

    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let hostile = hold_idle(metrics.parse().unwrap(), stop.clone(), held.clone(), failures.clone());
    let t = Instant::now();
    while held.load(Ordering::Relaxed) < IDLE {
        assert!(rec.running(), "the tracer ended under the hostile client: {}", rec.stderr());
        assert!(
            t.elapsed() < STEP,
            "the hostile client holds {} connections after {STEP:?} ({} connects timed out); {}; tracer stderr:\n{}",
            held.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed),
            tracer_state(rec.pid(), &metrics),
            rec.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Floods, two at least and then until the recording has rotated twice; the
    // tracer's fds are sampled throughout.
    let rotated = |n: u32| PathBuf::from(format!("{}.{n}", file.display()));
    let mut most_fds = rec.fds();
    let mut floods = 0;
    while floods < 2 || (!rotated(2).exists() && floods < 10) {
        let batch = Clients { hold_secs: 1, ..Clients::new("127.0.0.1", PORT, 300) }.start(&ns);
        for _ in 0..10 {
            most_fds = most_fds.max(rec.fds());
            std::thread::sleep(Duration::from_millis(100));
        }
        batch.finish();
        floods += 1;
        most_fds = most_fds.max(rec.fds());
        assert!(rec.running(), "the tracer ended under the hostile client: {}", rec.stderr());
    }
    assert!(rotated(2).exists(), "no second rotation after {floods} floods");
    let still_held = held.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let most_held = hostile.join().expect("hostile client");
    // Its connections are closed now (the thread owned them).
    let closed = Instant::now();
    let (status, _) = wait_for("/metrics to answer after the flood", STEP, || http_get(&metrics, "/metrics"));
    let answered = closed.elapsed();
    assert_eq!(status, 200);
    println!(
        "hostile client: held {most_held} connections at most ({still_held} at the end, {} connects timed out), \
         {floods} floods; \
         tracer fds: {fds_at_start} at start, {most_fds} at most (limit {NOFILE}); /metrics answered {answered:?} \
         after the client closed",
        failures.load(Ordering::Relaxed)
    );
    // At once in practice (under a millisecond); the bound leaves room for a host
    // loaded by other work, and is the exchange deadline: nothing waits on a slot.
    assert!(answered < Duration::from_secs(5), "/metrics took {answered:?} after the flood");
    assert!(most_fds <= fds_at_start + 64 + 32, "the tracer held {most_fds} fds (from {fds_at_start})");

    fence(&ns);
    let delta = settled(&ns).since(&before);
    let listen_drops = delta.get("ListenDrops");
    println!("kernel deltas: {delta}");
    assert!(listen_drops > 0, "the floods dropped nothing: {delta}");
    // The scraped counter reaches the kernel's count at the next sync.
    let scraped = wait_for("the scraped drops to reach ListenDrops", Duration::from_secs(10), || {
        let (_, body) = http_get(&metrics, "/metrics")?;
        let n = scraped_drops(&body, ns.inode());
        (n == listen_drops).then_some(body)
    });
    let refused: u64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("backlog_metrics_refused_total "))
        .and_then(|v| v.parse().ok())
        .expect("backlog_metrics_refused_total");
    assert!(refused > 0, "the cap refused nothing");

    let stderr = rec.stderr();
    let summary = rec.stop();
    let n = summary.netns(ns.inode());
    let detected: u64 = summary.listeners.iter().filter(|l| l.netns == ns.inode()).map(|l| l.drops).sum();
    println!(
        "ListenDrops {listen_drops}: tracer {detected} (namespace detected {}, undetected {}), scraped {listen_drops}, \
         {refused} metrics connections refused",
        n.detected, n.undetected
    );
    assert_eq!((n.listen_drops, n.detected, n.undetected), (listen_drops, listen_drops, 0), "{n:#?}");
    assert_eq!(detected, listen_drops);
    let notices = stderr.lines().filter(|l| l.contains("closing new ones at once")).count();
    assert!((1..=2).contains(&notices), "the refusals are said in one line (a minute): {stderr}");
    assert!(!stderr.contains("Too many open files"), "{stderr}");
    // Every file of the rotation is a readable recording reporting the same drops.
    let out = Command::new(tracer_bin())
        .arg("report")
        .arg("--json")
        .args([rotated(2), rotated(1), file.clone()])
        .output()
        .expect("run backlog-trace report");
    assert!(out.status.success(), "report: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("\"type\":\"summary\"")).expect("a report summary");
    let report: Summary = serde_json::from_str(line).unwrap_or_else(|e| panic!("report summary ({e}): {line}"));
    let reported: u64 = report.listeners.iter().filter(|l| l.netns == ns.inode()).map(|l| l.drops).sum();
    assert_eq!(reported, listen_drops, "the rotated recording's report");
    for f in [file.clone(), rotated(1), rotated(2)] {
        let _ = std::fs::remove_file(f);
    }
}
