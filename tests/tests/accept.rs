//! Issue 3's "must show": the tracer's accept-queue waits (child born of its final
//! ACK to accept returning it) lie within bounds the workload measures itself, every
//! accept style is seen, children a closing listener never accepted are counted
//! as abandoned and leave nothing behind, and --hist prints the histogram.
//! Each listener's numbers are its own, also when listeners come and go and
//! when other namespaces accept connections at the same time, and beside a second
//! backlog-trace.
//!
//! Run as root, serially, once backlog-trace is built in release mode:
//!   cargo test -p backlog-tests --test accept -- --test-threads=1
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;

use backlog_common::hist;
use backlog_tests::netns::Netns;
use backlog_tests::tracer::{tracer_command, Tracer};
use backlog_tests::workload::{workload_bin, Spawned};
use backlog_tests::{scratch_path, short_by_missed_runs, wait_for};

/// The listening port, one per test process. The tracer's kernel side follows
/// every listener on the port it is told, whatever the namespace, and keys
/// listeners by socket address (see `successive_listeners_keep_their_own_accepts`):
/// two runs of this suite at once on a shared machine must not share a port.
fn port() -> u16 {
    10_000 + (std::process::id() % 20_000) as u16
}

/// Bound on each step (attaching, a workload phase, exiting); generous because
/// the VM runner emulates the CPU.
const STEP: Duration = Duration::from_secs(60);

/// How one bt-acceptor run listens, connects and accepts.
struct Spec {
    addr: &'static str,
    clients: u32,
    /// blocking | epoll | accept4 | none
    accept: &'static str,
    /// Once every client is queued, the k-th accept happens no earlier than
    /// k * interval_ms later, so waits spread over (clients - 1) * interval_ms
    /// at least.
    interval_ms: u32,
}

/// What bt-acceptor measured on its own clock: per accepted connection, a lower
/// and an upper bound of its true wait (see bt-acceptor's `bracket_us`).
#[derive(Deserialize, Debug)]
struct Measured {
    accepted: u64,
    waits_us: Vec<(f64, f64)>,
}

/// Nearest-rank quantile, the convention of the tracer's percentiles.
fn quantile(mut w: Vec<f64>, q: f64) -> f64 {
    w.sort_by(f64::total_cmp);
    let rank = (q * w.len() as f64).ceil().max(1.0) as usize;
    w[rank - 1]
}

impl Measured {
    /// Bounds of the true waits' q-quantile. Order statistics are monotone: if
    /// every wait lies within its bounds, the q-quantile of the waits lies between
    /// the q-quantiles of the lower and of the upper bounds.
    fn quantile_bounds(&self, q: f64) -> (f64, f64) {
        let (lo, hi): (Vec<f64>, Vec<f64>) = self.waits_us.iter().copied().unzip();
        (quantile(lo, q), quantile(hi, q))
    }

    /// Median and widest bracket (hi - lo), to tell a noisy run from a wrong tracer.
    fn widths(&self) -> (f64, f64) {
        let w: Vec<f64> = self.waits_us.iter().map(|(lo, hi)| hi - lo).collect();
        (quantile(w.clone(), 0.5), quantile(w, 1.0))
    }
}

/// A started bt-acceptor whose clients have all connected.
struct Acceptor {
    proc: Spawned,
    result: PathBuf,
}

impl Acceptor {
    /// Starts bt-acceptor in `ns` on port(); returns once every client connected.
    fn start(ns: &Netns, spec: &Spec) -> Acceptor {
        Acceptor::start_on(ns, spec, port())
    }

    fn start_on(ns: &Netns, spec: &Spec, port: u16) -> Acceptor {
        let (ready, result) = (scratch_path("acceptor-ready"), scratch_path("acceptor-result"));
        let bin = workload_bin("bt-acceptor");
        let argv = [
            bin.display().to_string(),
            format!("--addr={}", spec.addr),
            format!("--port={port}"),
            "--backlog=64".into(),
            format!("--clients={}", spec.clients),
            format!("--accept={}", spec.accept),
            format!("--interval-ms={}", spec.interval_ms),
            format!("--ready-file={}", ready.display()),
            format!("--result-file={}", result.display()),
        ];
        let mut proc = ns.spawn(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        wait_for("bt-acceptor's clients to connect", STEP, || {
            // Exit status first: a quick run may write the file and end between
            // two polls, which is fine; ending without the file is not.
            let exited = proc.try_wait();
            if ready.exists() {
                return Some(());
            }
            if let Some(status) = exited {
                panic!("bt-acceptor exited ({status}) before its clients connected");
            }
            None
        });
        let _ = std::fs::remove_file(&ready);
        Acceptor { proc, result }
    }

    /// Makes a non-accepting bt-acceptor close its listener.
    fn close_listener(&self) {
        // SAFETY: plain syscall on our own, not yet reaped, child.
        unsafe { libc::kill(self.proc.pid() as libc::pid_t, libc::SIGUSR1) };
    }

    /// Waits for bt-acceptor to end by itself and reads what it measured.
    fn finish(mut self) -> Measured {
        let status = self.proc.wait(STEP);
        assert!(status.success(), "bt-acceptor failed: {status}");
        let text = std::fs::read_to_string(&self.result).expect("bt-acceptor result file");
        let _ = std::fs::remove_file(&self.result);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad bt-acceptor result ({e}): {text}"))
    }
}

/// Runs `workload` while `backlog-trace --netns <each of namespaces> --port
/// <port()> <extra>` (plus `--mode $BACKLOG_MODE` when set) runs, and returns
/// everything the tracer printed on stdout once it exited on SIGINT. Both output
/// modes print a first line once every program is attached, so the workload starts
/// after that line. The scenario's `traced` cannot serve here: its summary type
/// omits the accept fields.
fn traced(namespaces: &[&Netns], extra: &[&str], workload: impl FnOnce()) -> Vec<String> {
    traced_sub(&[], namespaces, extra, workload)
}

/// `traced` with a subcommand (e.g. `record -o FILE`) before the options.
fn traced_sub(sub: &[&str], namespaces: &[&Netns], extra: &[&str], workload: impl FnOnce()) -> Vec<String> {
    let port = port().to_string();
    let mut argv = sub.to_vec();
    for ns in namespaces {
        argv.extend(["--netns", ns.name()]);
    }
    argv.extend(["--port", &port]);
    argv.extend_from_slice(extra);
    let mut tracer = Tracer::spawn(&argv);
    workload();
    let status = tracer.stop_sigint();
    assert!(status.success(), "backlog-trace {extra:?} ended with {status}; stderr:\n{}", tracer.stderr());
    tracer.stdout()
}

#[derive(Deserialize, Debug)]
struct Latency {
    count: u64,
    p50: f64,
    max: f64,
}

/// The accept-related part of one summary listener.
#[derive(Deserialize, Debug)]
struct Listener {
    netns: u64,
    port: u16,
    local: String,
    pids: Vec<u32>,
    accepts: u64,
    abandoned: u64,
    pending: u64,
    queue_peak: u32,
    accept_latency_us: Option<Latency>,
    accept_wait_hist_us: Option<Vec<(u64, u64, u64)>>,
    accepted_by: Vec<backlog_tests::tracer::Acceptor>,
}

/// The lines of `kind` (summary, interval) in a `--json` run's output.
fn json_lines(out: &[String], kind: &str) -> Vec<serde_json::Value> {
    out.iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("non-JSON line ({e}): {l}")))
        .filter(|v| v["type"] == kind)
        .collect()
}

/// The listeners on port() in `ns` among a summary or interval line's listeners.
fn listeners_in(line: &serde_json::Value, ns: &Netns) -> Vec<Listener> {
    let listeners: Vec<Listener> = serde_json::from_value(line["listeners"].clone())
        .unwrap_or_else(|e| panic!("listeners do not match the contract ({e}): {line}"));
    listeners.into_iter().filter(|l| l.netns == ns.inode() && l.port == port()).collect()
}

/// The one summary line of a `--json` run.
fn summary_line(out: &[String]) -> serde_json::Value {
    let mut summaries = json_lines(out, "summary");
    assert_eq!(summaries.len(), 1, "expected one summary line in:\n{}", out.join("\n"));
    summaries.remove(0)
}

/// The summary's one listener on port() in `ns`.
fn summary_listener(out: &[String], ns: &Netns) -> Listener {
    let summary = summary_line(out);
    let mut ours = listeners_in(&summary, ns);
    assert_eq!(ours.len(), 1, "expected one listener on port {} in {}: {summary}", port(), ns.name());
    ours.remove(0)
}

/// Every connection was accepted and each accept was timed; nothing was
/// abandoned and the timestamp map keeps nothing for the listener.
fn assert_all_timed(l: &Listener, m: &Measured, spec: &Spec) {
    let n = u64::from(spec.clients);
    assert_eq!(m.accepted, n, "bt-acceptor accepted {} of {n}", m.accepted);
    let count = l.accept_latency_us.as_ref().map(|w| w.count);
    assert_eq!((l.accepts, count, l.abandoned, l.pending), (n, Some(n), 0, 0), "{} accepts: {l:#?}", spec.accept);
}

/// The program runs the kernel skipped, as the tracer's summary line counts them.
fn missed_runs(summary: &serde_json::Value) -> u64 {
    summary["missed_runs"].as_u64().expect("missed_runs in the summary line")
}

/// What the tracer's and the workload's clocks may disagree by beyond the
/// brackets: both read CLOCK_MONOTONIC, so only the reads' own cost.
const SLACK_US: f64 = 100.0;

/// [low, high) of the tracer's histogram bucket holding `us`.
fn bucket_of(us: f64) -> (f64, f64) {
    let (lo, hi) = hist::bounds(hist::bucket(us.max(0.0) as u64));
    (lo as f64, hi as f64)
}

/// The tracer's `what` lies within the measured bounds [lo, hi] of the true value,
/// widened to the edges of the histogram buckets holding them when `bucketed`
/// (percentiles are bucket midpoints; the maximum is exact), plus SLACK_US. The
/// bounds must be tight enough that a tracer off by half or by double could not
/// pass: a loose reference would prove nothing.
/// The values a tracer's reading may take, given the true value's bounds.
fn allowed((lo, hi): (f64, f64), bucketed: bool) -> (f64, f64) {
    let (lo_edge, hi_edge) = if bucketed { (bucket_of(lo).0, bucket_of(hi).1) } else { (lo, hi) };
    (lo_edge - SLACK_US, hi_edge + SLACK_US)
}

/// Whether bounds this wide can judge a reading at all: whatever the true value in
/// [min, max], half of it is below min and double it above max only if max < 2 min.
fn judgeable((min, max): (f64, f64)) -> bool {
    min > 0.0 && max < 2.0 * min
}

fn assert_within(what: &str, tracer_us: f64, (lo, hi): (f64, f64), bucketed: bool) {
    let (min, max) = allowed((lo, hi), bucketed);
    println!("{what}: tracer {tracer_us:.0} us, true value in [{lo:.0}, {hi:.0}] us, allowed [{min:.0}, {max:.0}] us");
    assert!(
        min <= tracer_us && tracer_us <= max,
        "{what}: tracer {tracer_us:.0} us outside [{min:.0}, {max:.0}] us (true value in [{lo:.0}, {hi:.0}] us)"
    );
    assert!(
        judgeable((min, max)),
        "{what}: the measured bounds [{lo:.0}, {hi:.0}] us are too loose to judge the tracer"
    );
}

/// The spread of waits a paced server produces: the tracer's p50 and max lie
/// within the measured bounds.
fn assert_waits_match(l: &Listener, m: &Measured) {
    let w = l.accept_latency_us.as_ref().expect("accepts were timed");
    let (median, widest) = m.widths();
    println!("brackets: median width {median:.0} us, widest {widest:.0} us");
    assert_within("p50", w.p50, m.quantile_bounds(0.5), true);
    assert_within("max", w.max, m.quantile_bounds(1.0), false);
}

/// Runs bt-acceptor with `spec` in a fresh namespace under `backlog-trace
/// --json`: every connection timed, with the waits bt-acceptor measured.
/// Under an emulated CPU a run's reference bounds can come out too wide to judge
/// anything (a scheduling stall inside one bracket): such a run is measured again,
/// up to `ATTEMPTS` times; a tracer reading outside judgeable bounds fails at once.
fn paced_and_measured(tag: &str, spec: Spec) {
    const ATTEMPTS: u32 = 3;
    for attempt in 1..=ATTEMPTS {
        let ns = Netns::new(tag);
        let mut measured = None;
        let out = traced(&[&ns], &["--json"], || measured = Some(Acceptor::start(&ns, &spec).finish()));
        let (m, l) = (measured.expect("workload ran"), summary_listener(&out, &ns));
        assert_all_timed(&l, &m, &spec);
        assert!(l.accept_wait_hist_us.is_none(), "histogram without --hist: {l:#?}");
        // Every client connects before the first accept: the last child's birth saw
        // the others queued (the kernel side notes the queue then), and a sync's
        // socket listing may have seen all of them.
        let n = spec.clients;
        assert!((n - 1..=n).contains(&l.queue_peak), "queue peak {} with {n} children queued: {l:#?}", l.queue_peak);
        let loose = [(m.quantile_bounds(0.5), true), (m.quantile_bounds(1.0), false)]
            .into_iter()
            .any(|(bounds, bucketed)| !judgeable(allowed(bounds, bucketed)));
        if loose && attempt < ATTEMPTS {
            println!("attempt {attempt}: the measured bounds are too loose to judge the tracer; measuring again");
            continue;
        }
        assert_waits_match(&l, &m);
        return;
    }
}

#[test]
fn paced_server_waits_match_measured() {
    paced_and_measured("paced", Spec { addr: "127.0.0.1", clients: 40, accept: "blocking", interval_ms: 25 });
}

/// One process accepting one listener's connections for three seconds on end, while
/// the tracer syncs every 200 ms: after the first sync its CPU holds those accepts
/// back from the maps (backlog-ebpf/src/accept/batch.rs) until the next, and every
/// accept must still be counted, timed (the histogram's count, the longest wait) and
/// put to the process that made it.
#[test]
fn a_steady_acceptor_is_counted_exactly_across_syncs() {
    let spec = Spec { addr: "127.0.0.1", clients: 60, accept: "blocking", interval_ms: 50 };
    let ns = Netns::new("steady");
    let mut measured = None;
    let mut pid = 0;
    let out = traced(&[&ns], &["--json", "--interval", "200ms"], || {
        let acceptor = Acceptor::start(&ns, &spec);
        pid = acceptor.proc.pid();
        measured = Some(acceptor.finish());
    });
    let (m, l) = (measured.expect("workload ran"), summary_listener(&out, &ns));
    println!("{l:?}");
    if short_by_missed_runs("accepts", l.accepts, u64::from(spec.clients), missed_runs(&summary_line(&out))) {
        return;
    }
    assert_all_timed(&l, &m, &spec);
    let by: Vec<(u32, u64)> = l.accepted_by.iter().map(|a| (a.pid, a.accepts)).collect();
    assert_eq!(by, vec![(pid, u64::from(spec.clients))], "accepted_by: {l:#?}");
    assert!(l.accepted_by[0].comm.starts_with("bt-acceptor"), "the acceptor's command name: {l:#?}");
    let w = l.accept_latency_us.as_ref().expect("accepts were timed");
    assert_within("max", w.max, m.quantile_bounds(1.0), false);
}

/// Recv-Q of the listener on port() in `ns`: its accept-queue length.
fn queued(ns: &Netns) -> u64 {
    let out = ns.exec(&["ss", "-Hlnt", &format!("sport = :{}", port())]);
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields.as_slice() {
        ["LISTEN", recv_q, ..] => recv_q.parse().expect("Recv-Q"),
        _ => panic!("ss shows no listener on port {}: {text}", port()),
    }
}

#[test]
fn closing_listener_abandons_queued_children() {
    let ns = Netns::new("abandon");
    let spec = Spec { addr: "127.0.0.1", clients: 20, accept: "none", interval_ms: 0 };
    let mut on_queue = 0;
    let out = traced(&[&ns], &["--json", "--interval", "200ms"], || {
        let acceptor = Acceptor::start(&ns, &spec);
        // bt-acceptor is ready once its own view of the queue holds every
        // child; ss confirms it from outside.
        on_queue = wait_for("20 children on the accept queue", STEP, || {
            let q = queued(&ns);
            (q == u64::from(spec.clients)).then_some(q)
        });
        // Leaves time for several interval lines (every 200 ms) while every
        // child waits, to see them in the timestamp map.
        std::thread::sleep(Duration::from_secs(1));
        acceptor.close_listener();
        assert_eq!(acceptor.finish().accepted, 0);
    });
    let l = summary_listener(&out, &ns);
    let intervals: Vec<Listener> = json_lines(&out, "interval").iter().flat_map(|v| listeners_in(v, &ns)).collect();
    let held = intervals.iter().map(|l| l.pending).max();
    // The interval lines show how the count built up if the final one is wrong.
    let abandoned_seen: Vec<u64> = intervals.iter().map(|l| l.abandoned).collect();
    println!(
        "queued {on_queue}, pending at most {held:?}, then abandoned {} (interval lines: {abandoned_seen:?}), accepts {}, pending {}",
        l.abandoned, l.accepts, l.pending
    );
    assert_eq!(l.abandoned, on_queue, "abandoned vs Recv-Q before close: {l:#?}");
    assert_eq!((l.accepts, l.pending), (0, 0), "{l:#?}");
    assert!(l.accept_latency_us.is_none(), "no accepts, no latency: {l:#?}");
    assert_eq!(held, Some(on_queue), "largest pending of the interval lines while {on_queue} children were queued");
}

/// One accept style and address family per test: 20 connections accepted 5 ms
/// apart, each one timed. Many connections close together rather than few far
/// apart: one stalled connect or accept widens its own bracket, which moves the
/// bounds of the median by about one spacing.
macro_rules! style_is_timed {
    ($($test:ident: $tag:literal, $addr:literal, $accept:literal;)*) => {$(
        #[test]
        fn $test() {
            paced_and_measured($tag, Spec { addr: $addr, clients: 20, accept: $accept, interval_ms: 5 });
        }
    )*};
}

style_is_timed! {
    blocking_accept_is_timed: "blocking", "127.0.0.1", "blocking";
    epoll_nonblocking_accept_is_timed: "epoll", "127.0.0.1", "epoll";
    accept4_nonblock_is_timed: "accept4", "127.0.0.1", "accept4";
    ipv6_accept_is_timed: "ipv6", "::1", "blocking";
}

/// Whether `row` is, as a whole, a histogram row `[lo, hi)  count |@@@  |`: the
/// extended regular expression `\[[0-9]+, [0-9]+\) +[0-9]+ \|@* *\|`.
fn is_hist_row(row: &str) -> bool {
    /// One or more digits off the front of `s`.
    fn digits(s: &str) -> Option<&str> {
        Some(s.trim_start_matches(|c: char| c.is_ascii_digit())).filter(|r| r.len() < s.len())
    }
    let rest = (|| {
        let s = digits(digits(row.strip_prefix('[')?)?.strip_prefix(", ")?)?.strip_prefix(')')?;
        let count = Some(s.trim_start_matches(' ')).filter(|r| r.len() < s.len())?;
        Some(digits(count)?.strip_prefix(" |")?.trim_start_matches('@').trim_start_matches(' '))
    })();
    rest == Some("|")
}

#[test]
fn hist_in_json_and_text() {
    let ns = Netns::new("hist");
    let spec = Spec { addr: "127.0.0.1", clients: 20, accept: "blocking", interval_ms: 10 };
    let recording = scratch_path("hist-recording");
    let rec = recording.to_string_lossy().into_owned();
    let mut measured = None;
    // One tracer, two renderings of one histogram: the live JSON summary, and the
    // text report of what the same session recorded. (Two tracers side by side
    // time each connection at their own hook runs, which under emulation can put
    // one wait in neighbouring buckets.)
    let json = traced_sub(&["record", "-o", &rec], &[&ns], &["--json", "--hist"], || {
        measured = Some(Acceptor::start(&ns, &spec).finish())
    });
    let l = summary_listener(&json, &ns);
    assert_all_timed(&l, &measured.expect("workload ran"), &spec);
    let buckets = l.accept_wait_hist_us.as_ref().expect("--hist adds accept_wait_hist_us");
    assert!(buckets.iter().all(|(lo, hi, n)| lo < hi && *n > 0), "{buckets:?}");
    assert_eq!(buckets.iter().map(|b| b.2).sum::<u64>(), l.accepts, "{buckets:?}");

    let report = tracer_command().args(["report", &rec, "--hist"]).output().expect("run backlog-trace report");
    let _ = std::fs::remove_file(&recording);
    assert!(report.status.success(), "report failed: {}", String::from_utf8_lossy(&report.stderr));
    let text: Vec<String> = String::from_utf8_lossy(&report.stdout).lines().map(String::from).collect();
    let header = format!("@accept_wait_us[{}, netns {}]:", l.local, l.netns);
    let start = text.iter().position(|s| *s == header).unwrap_or_else(|| {
        panic!("no line {header:?} in the text output:\n{}", text.join("\n"));
    });
    let rows: Vec<&str> = text[start + 1..].iter().map(String::as_str).take_while(|s| !s.is_empty()).collect();
    println!("{header}\n{}", rows.join("\n"));
    assert!(!rows.is_empty(), "empty histogram after {header:?}");
    let bad: Vec<&&str> = rows.iter().filter(|r| !is_hist_row(r)).collect();
    assert!(bad.is_empty(), "histogram lines not in the `[lo, hi)  count |@@@  |` format: {bad:#?}");
    let mut total = 0;
    for row in &rows {
        let nums: Vec<u64> = row
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("number"))
            .collect();
        let [lo, hi, n] = nums[..] else { panic!("row {row:?}") };
        // A text row merges the fine JSON buckets that fall inside it.
        let inside: u64 = buckets.iter().filter(|b| lo <= b.0 && b.1 <= hi).map(|b| b.2).sum();
        assert_eq!(n, inside, "text row {row:?} vs JSON buckets {buckets:?}");
        total += n;
    }
    assert_eq!(total, l.accepts, "text histogram counts vs accepts");
}

/// Listeners that come and go during one session keep their own accepts, in
/// their own namespace: every bt-acceptor run is a new listening socket, which
/// the kernel may place at the address of one freed before.
#[test]
fn successive_listeners_keep_their_own_accepts() {
    const ROUNDS: usize = 10;
    let spec = Spec { addr: "127.0.0.1", clients: 10, accept: "blocking", interval_ms: 1 };
    let (a, b) = (Netns::new("succ-a"), Netns::new("succ-b"));
    let out = traced(&[&a, &b], &["--json"], || {
        for ns in [&a, &b].repeat(ROUNDS) {
            assert_eq!(Acceptor::start(ns, &spec).finish().accepted, u64::from(spec.clients));
        }
    });
    let summary = summary_line(&out);
    // On PREEMPT_RT a kprobe run that finds another BPF program preempted on its CPU
    // is skipped.
    let total: u64 = [&a, &b].iter().flat_map(|ns| listeners_in(&summary, ns)).map(|l| l.accepts).sum();
    if short_by_missed_runs("accepts", total, (2 * ROUNDS) as u64 * u64::from(spec.clients), missed_runs(&summary)) {
        return;
    }
    for ns in [&a, &b] {
        let ls = listeners_in(&summary, ns);
        let seen: Vec<(u64, usize)> = ls.iter().map(|l| (l.accepts, l.pids.len())).collect();
        println!("{}: (accepts, pids) per listener {seen:?}", ns.name());
        assert_eq!(
            seen,
            vec![(u64::from(spec.clients), 1); ROUNDS],
            "{ROUNDS} listeners of one process and {} accepts each in {} (missed_runs {}, unmatched_accepts {}, \
             diagnostics {}): {ls:#?}",
            spec.clients,
            ns.name(),
            summary["missed_runs"],
            summary["unmatched_accepts"],
            summary["diagnostics"]
        );
    }
}

/// Connections elsewhere on the machine (another namespace, another port, not
/// traced) never count at the traced listener: the kernel side sees every
/// child, so attributing each to its own listener must hold under load.
#[test]
fn foreign_accepts_are_not_counted() {
    let spec = Spec { addr: "127.0.0.1", clients: 10, accept: "blocking", interval_ms: 50 };
    let (ns, busy) = (Netns::new("own"), Netns::new("busy"));
    let stop = AtomicBool::new(false);
    let mut measured = None;
    let out = traced(&[&ns], &["--json"], || {
        std::thread::scope(|s| {
            // Two loads, so both CPUs handle foreign handshakes and accepts.
            for shift in [1, 2] {
                let (busy, stop) = (&busy, &stop);
                s.spawn(move || {
                    let load = Spec { addr: "127.0.0.1", clients: 50, accept: "blocking", interval_ms: 0 };
                    // Bounded, so a failed measured run cannot leave the load spinning.
                    for _ in 0..100 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        Acceptor::start_on(busy, &load, port() + shift).finish();
                    }
                });
            }
            measured = Some(Acceptor::start(&ns, &spec).finish());
            stop.store(true, Ordering::Relaxed);
        });
    });
    let m = measured.expect("workload ran");
    let summary = summary_line(&out);
    let l = summary_listener(&out, &ns);
    // Under the foreign load a program run can be skipped: a child whose queueing was
    // not seen is not timed.
    if short_by_missed_runs("accepts", l.accepts, u64::from(spec.clients), missed_runs(&summary)) {
        return;
    }
    assert_all_timed(&l, &m, &spec);
}

/// Issue 15: with `--no-accept-timing`, tracepoint mode has nothing that sees
/// accept(), so it must not remember queued children either: each accepted child was
/// found at its close and counted as accepted unseen (20 `unmatched_accepts` for 20
/// connections), and every connection paid for the bookkeeping. Accepts are then
/// not counted at all, and nothing is reported missing. Modes that see accept()
/// without a syscall tracepoint ignore the flag and time every accept.
#[test]
fn without_accept_timing_accepted_children_are_not_reported_unseen() {
    let spec = Spec { addr: "127.0.0.1", clients: 20, accept: "blocking", interval_ms: 0 };
    let ns = Netns::new("untimed");
    let mut measured = None;
    let out = traced(&[&ns], &["--json", "--no-accept-timing"], || {
        measured = Some(Acceptor::start(&ns, &spec).finish());
    });
    let m = measured.expect("workload ran");
    assert_eq!(m.accepted, u64::from(spec.clients), "bt-acceptor accepted {} of {}", m.accepted, spec.clients);
    let start = json_lines(&out, "start").pop().expect("start line");
    let summary = summary_line(&out);
    let l = summary_listener(&out, &ns);
    if start["mode"] == "tracepoint" {
        let unseen = summary["unmatched_accepts"].as_u64().expect("unmatched_accepts");
        assert_eq!((l.accepts, l.pending, l.abandoned, unseen), (0, 0, 0, 0), "untimed accepts: {summary:#}");
    } else {
        assert_all_timed(&l, &m, &spec);
    }
}

/// Two tracers at once (an operator's beside a recorder, say): each keeps its own
/// queued children and counters, so each must count and time every accept, with
/// the waits the workload measured, and neither may report the other's work as
/// unseen or abandoned. The second watches every namespace and every port, as a
/// fleet exporter would.
#[test]
fn accepts_are_exact_beside_a_second_tracer() {
    let spec = Spec { addr: "127.0.0.1", clients: 30, accept: "accept4", interval_ms: 5 };
    let ns = Netns::new("twin");
    let mut second = Tracer::spawn(&["--json"]);
    let mut measured = None;
    let out = traced(&[&ns], &["--json"], || measured = Some(Acceptor::start(&ns, &spec).finish()));
    let status = second.stop_sigint();
    assert!(status.success(), "the second backlog-trace ended with {status}; stderr:\n{}", second.stderr());
    let m = measured.expect("workload ran");
    for (who, out) in [("the scoped tracer", out), ("the second tracer", second.stdout())] {
        let summary = summary_line(&out);
        let l = summary_listener(&out, &ns);
        println!("{who}: {l:?}");
        if short_by_missed_runs("accepts", l.accepts, u64::from(spec.clients), missed_runs(&summary)) {
            continue;
        }
        assert_all_timed(&l, &m, &spec);
        assert_eq!(summary["unmatched_accepts"], 0, "{who}: {summary:#}");
        assert_waits_match(&l, &m);
    }
}
