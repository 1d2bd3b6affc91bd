//! `cargo xtask stress`: the exact-count scenarios of tests/tests/drops.rs, run again
//! and again under concurrent load, each run checked for every drop detected.
//!
//! The scenarios and their assertions have one home, the drops test executable:
//! each run is one execution of one of its tests (`--exact NAME`), with a load
//! started just before it and stopped just after. The test's `assert_exact`
//! appends the run's numbers to `$BACKLOG_COUNTS_FILE` before it asserts, so a
//! run that fails still shows tracer, lines, kernel, lost events, skipped runs,
//! undetected and diagnostics. A run is exact when the test passed and its
//! counts are exact (drop lines == ListenDrops delta == the summary's drops).
mod load;

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backlog_tests::scenario::{Counts, COUNTS_FILE_VAR};
use clap::ValueEnum;

use crate::harness::{self, sys};
pub use load::Load;

/// Lets the loads reach their steady state before the scenario's tracer starts.
const SETTLE: Duration = Duration::from_millis(500);
/// A run's test is killed after this; its own waits are bounded well below it.
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The exact-count scenarios, each a test of tests/tests/drops.rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// listen(8) and 300 concurrent local clients: the accept queue overflows.
    AcceptOverflow,
    /// SYN-queue flood without syncookies: final ACKs held back over a veth pair.
    SynQueue,
    /// Final-ACK overflow with syncookies: the held-back ACKs released together.
    FinalAck,
    /// Over a line budget of 1 (`--max-drop-lines 1`), bursts from one peer and
    /// from new peers on one CPU: drops held back in the kernel's runs, each peer's
    /// share put under it, lines + suppressed exact.
    PeerRuns,
}

impl Scenario {
    pub const ALL: [Scenario; 4] =
        [Scenario::AcceptOverflow, Scenario::SynQueue, Scenario::FinalAck, Scenario::PeerRuns];

    /// The test in tests/tests/drops.rs that is this scenario.
    fn test(self) -> &'static str {
        match self {
            Scenario::AcceptOverflow => "ipv4_accept_queue_overflow_is_counted_exactly",
            Scenario::SynQueue => "syn_queue_full_without_syncookies_is_counted_exactly",
            Scenario::FinalAck => "final_ack_overflow_is_counted_exactly",
            Scenario::PeerRuns => "drops_from_a_new_peer_each_over_the_budget_are_counted_under_their_peers",
        }
    }

    fn name(self) -> String {
        self.to_possible_value().expect("no skipped variants").get_name().to_string()
    }
}

pub struct Options {
    pub runs: u32,
    pub scenarios: Vec<Scenario>,
    pub loads: Vec<Load>,
    pub tracer: Option<PathBuf>,
    pub drops_test: Option<PathBuf>,
    /// Use what is built (target/release) instead of building: the kernel matrix's
    /// guests cannot run cargo.
    pub no_build: bool,
    pub out: Option<PathBuf>,
}

/// One run's outcome.
struct Outcome {
    scenario: Scenario,
    load: Load,
    n: u32,
    exact: bool,
    /// What the test reported, one entry per namespace it checked.
    counts: Vec<Counts>,
    /// Why the run failed when its counts do not say: the test's panic, or a load
    /// that did not run throughout.
    problem: Option<String>,
    secs: f64,
    /// Of `secs`, the test's own time; the rest is starting and stopping the load.
    test_secs: f64,
    load_note: String,
    log: PathBuf,
}

impl Outcome {
    fn numbers(&self) -> String {
        let mut s = self.counts.iter().map(Counts::to_string).collect::<Vec<_>>().join("; ");
        if let Some(p) = &self.problem {
            if !s.is_empty() {
                s += "; ";
            }
            s += p;
        }
        if s.is_empty() {
            s = "no counts reported".into();
        }
        s
    }
}

pub fn run(workspace: &Path, o: &Options) -> Result<bool> {
    // The tests themselves run ip and nft; the loads add their own.
    let mut commands = vec!["ip", "nft"];
    for l in &o.loads {
        commands.extend(l.commands());
    }
    commands.dedup();
    harness::preflight("stress", &commands, "scripts/bench-deps.sh")?;
    sys::catch_sigint();
    let (tracer, drops) = binaries(workspace, o)?;
    let out = match (&o.out, std::env::var_os("BACKLOG_VM_OUT")) {
        (Some(d), _) => d.clone(),
        // In a kernel-matrix guest: the results directory shared with the host.
        (None, Some(vm)) => PathBuf::from(vm).join("stress"),
        (None, None) => harness::target_dir(workspace).join("stress"),
    };
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let total = o.runs as usize * o.scenarios.len() * o.loads.len();
    eprintln!(
        "stress: {total} runs ({} × {} scenario(s) × {} load(s)); tracer {}, mode {}; tests {}; logs in {}",
        o.runs,
        o.scenarios.len(),
        o.loads.len(),
        tracer.display(),
        std::env::var("BACKLOG_MODE").unwrap_or_else(|_| "best available".into()),
        drops.display(),
        out.display()
    );

    let t0 = Instant::now();
    let mut outcomes = Vec::with_capacity(total);
    for &load in &o.loads {
        for n in 1..=o.runs {
            for &scenario in &o.scenarios {
                sys::check_interrupt()?;
                let r = one_run(&tracer, &drops, &out, scenario, load, n)?;
                println!(
                    "stress: [{}/{total}] {} under {}, run {n}: {} — {} ({:.0} s, test {:.0} s{}{})",
                    outcomes.len() + 1,
                    scenario.name(),
                    load.name(),
                    if r.exact { "exact" } else { "NOT EXACT" },
                    r.numbers(),
                    r.secs,
                    r.test_secs,
                    if r.load_note.is_empty() { "" } else { "; " },
                    r.load_note
                );
                if !r.exact {
                    println!("stress:   log: {}", r.log.display());
                }
                outcomes.push(r);
            }
        }
    }
    let failed = outcomes.iter().filter(|r| !r.exact).count();
    println!("\n{}", table(&outcomes));
    println!("stress: {} of {total} runs exact in {:.0} s", total - failed, t0.elapsed().as_secs_f64());
    // In cargo test's words, so scripts/test.sh counts each run as a test.
    println!(
        "test result: {}. {} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out (cargo xtask stress runs)",
        if failed == 0 { "ok" } else { "FAILED" },
        total - failed
    );
    Ok(failed == 0)
}

/// The tracer and the drops test executable: built now, or as built before.
fn binaries(workspace: &Path, o: &Options) -> Result<(PathBuf, PathBuf)> {
    let release = harness::target_dir(workspace).join("release");
    if o.no_build {
        let tracer = o.tracer.clone().unwrap_or_else(|| release.join("backlog-trace"));
        if !tracer.is_file() {
            bail!("{} not found: build it on the host (cargo build --release -p backlog-user)", tracer.display());
        }
        let drops = match &o.drops_test {
            Some(p) => p.clone(),
            None => newest_drops_test(&release.join("deps"))?,
        };
        return Ok((tracer, drops));
    }
    let tracer = harness::tracer(workspace, o.tracer.as_deref(), "stress")?;
    if let Some(p) = &o.drops_test {
        return Ok((tracer, p.clone()));
    }
    eprintln!("stress: building the drops tests (release)");
    let json = harness::cargo(
        workspace,
        &["test", "--release", "-p", "backlog-tests", "--test", "drops", "--no-run", "--message-format=json"],
    )?;
    let drops = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["target"]["name"] == "drops" && m["profile"]["test"] == true)
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no drops test executable; run `cargo test --release -p backlog-tests --no-run`")?;
    Ok((tracer, drops))
}

/// The most recently built tests/tests/drops.rs executable in `deps`
/// (`drops-<hash>`, no extension).
fn newest_drops_test(deps: &Path) -> Result<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(deps)
        .with_context(|| format!("reading {}", deps.display()))?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("drops-").is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    match found.pop() {
        Some((_, p)) => Ok(p),
        None => bail!(
            "no drops test executable in {}: build it on the host (cargo test --release -p backlog-tests --no-run) \
             or pass --drops-test",
            deps.display()
        ),
    }
}

fn one_run(tracer: &Path, drops: &Path, out: &Path, scenario: Scenario, load: Load, n: u32) -> Result<Outcome> {
    let base = format!("{}.{}.{n}", load.name(), scenario.name());
    let (counts_file, log) = (out.join(format!("{base}.counts")), out.join(format!("{base}.log")));
    let t0 = Instant::now();
    let mut outcome = Outcome {
        scenario,
        load,
        n,
        exact: false,
        counts: vec![],
        problem: None,
        secs: 0.0,
        test_secs: 0.0,
        load_note: String::new(),
        log: log.clone(),
    };
    let running = match load.start(tracer) {
        Ok(r) => r,
        Err(e) => {
            outcome.problem = Some(format!("load {} did not start: {e:#}", load.name()));
            outcome.secs = t0.elapsed().as_secs_f64();
            return Ok(outcome);
        }
    };
    thread::sleep(SETTLE);
    let t_test = Instant::now();
    let test = run_test(drops, scenario.test(), tracer, &counts_file, &log);
    outcome.test_secs = t_test.elapsed().as_secs_f64();
    let stopped = running.stop();
    outcome.secs = t0.elapsed().as_secs_f64();
    if let Ok(text) = std::fs::read_to_string(&counts_file) {
        for line in text.lines() {
            outcome.counts.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{}: not a counts line: {line}", counts_file.display()))?,
            );
        }
    }
    let counts_exact = !outcome.counts.is_empty() && outcome.counts.iter().all(Counts::is_exact);
    let mut problems = Vec::new();
    match test {
        Ok(None) => {}
        Ok(Some(failure)) => {
            // A failure the counts already show needs no repeating.
            if counts_exact || outcome.counts.is_empty() {
                problems.push(failure);
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    match stopped {
        Ok(note) => outcome.load_note = note,
        Err(e) => problems.push(format!("load {} did not run throughout: {e:#}", load.name())),
    }
    outcome.exact = counts_exact && problems.is_empty();
    outcome.problem = (!problems.is_empty()).then(|| problems.join("; "));
    Ok(outcome)
}

/// Runs one test of the drops executable; Ok(None) if it passed, Ok(Some(why)) if
/// it failed, Err if it could not be run as one test.
fn run_test(drops: &Path, test: &str, tracer: &Path, counts: &Path, log: &Path) -> Result<Option<String>> {
    let _ = std::fs::remove_file(counts);
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(drops)
        .args(["--exact", test, "--test-threads=1"])
        .env("BACKLOG_TRACE_BIN", tracer)
        .env(COUNTS_FILE_VAR, counts)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", drops.display()))?;
    let t0 = Instant::now();
    let status: ExitStatus = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > TEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{test} did not finish within {TEST_TIMEOUT:?}; see {}", log.display());
        }
        thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let ran = libtest_counts(&text);
    if ran != Some((u64::from(status.success()), u64::from(!status.success()))) {
        bail!(
            "{} ({status}) did not run exactly the one test {test} (renamed in tests/tests/drops.rs?); see {}",
            drops.display(),
            log.display()
        );
    }
    Ok((!status.success()).then(|| panic_message(&text)))
}

/// (passed, failed) from libtest's "test result:" line.
fn libtest_counts(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("test result:"))?;
    let num = |word: &str| -> Option<u64> {
        let before = line.split(&format!(" {word}")).next()?;
        before.rsplit([' ', '.']).next()?.parse().ok()
    };
    Some((num("passed")?, num("failed")?))
}

/// The first line of the test's panic message, shortened.
fn panic_message(text: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.contains("panicked at"));
    let at = lines.next().unwrap_or("the test failed without a panic message");
    let msg = lines.next().filter(|l| !l.trim().is_empty()).unwrap_or(at);
    let mut s: String = msg.chars().take(400).collect();
    if s.len() < msg.len() {
        s += "…";
    }
    s
}

/// scenario × load: runs, exact, and the first mismatch with its numbers.
fn table(outcomes: &[Outcome]) -> String {
    let mut rows: Vec<[String; 5]> = vec![["scenario", "load", "runs", "exact", "first mismatch"].map(String::from)];
    let mut keys: Vec<(Scenario, Load)> = Vec::new();
    for r in outcomes {
        if !keys.contains(&(r.scenario, r.load)) {
            keys.push((r.scenario, r.load));
        }
    }
    keys.sort_by_key(|&(s, _)| Scenario::ALL.iter().position(|&x| x == s));
    for (s, l) in keys {
        let runs: Vec<&Outcome> = outcomes.iter().filter(|r| r.scenario == s && r.load == l).collect();
        let exact = runs.iter().filter(|r| r.exact).count();
        let first = runs.iter().find(|r| !r.exact).map_or("-".into(), |r| format!("run {}: {}", r.n, r.numbers()));
        rows.push([s.name(), l.name(), runs.len().to_string(), exact.to_string(), first]);
    }
    let widths: Vec<usize> = (0..4).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_line() {
        let ok = "running 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 6 filtered out; finished in 7.1s\n";
        assert_eq!(libtest_counts(ok), Some((1, 0)));
        let none = "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 7 filtered out\n";
        assert_eq!(libtest_counts(none), Some((0, 0)));
        assert_eq!(libtest_counts("error: no such file"), None);
    }

    #[test]
    fn first_line_of_the_panic() {
        let log = "---- t stdout ----\n\nthread 't' panicked at tests/src/scenario.rs:150:9:\nnot exact in ns: tracer 1, lines 1, kernel 2\nsummary: [..]\n";
        assert_eq!(panic_message(log), "not exact in ns: tracer 1, lines 1, kernel 2");
    }
}
