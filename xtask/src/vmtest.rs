//! `vm-test`: for each kernel × mode, one fresh boot running the command, then a table.
//! `vm-shell`: one boot with the guest console on the terminal.

use std::fmt::Write as _;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::initramfs::{self, Share, GUEST_DIR, GUEST_OUT, WORKSPACE_TAG};
use crate::kernels::{Kernels, Series};
use crate::qemu::{self, Boot, Outcome};

pub struct Options {
    pub series: Vec<Series>,
    pub modes: Vec<String>,
    pub list: bool,
    pub refresh: bool,
    pub timeout: Duration,
    /// Guests booted at the same time.
    pub jobs: usize,
    pub command: Vec<String>,
}

/// Exit status by which the command says its mode cannot run on this kernel, after
/// writing the one-line reason to $BACKLOG_VM_OUT/unsupported (automake's "skip").
pub const UNSUPPORTED_STATUS: i32 = 77;
const UNSUPPORTED_FILE: &str = "unsupported";

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    /// Why not, in a word or two: failed(1), timeout, no-status, error.
    Failed(String),
    /// The reason the command gave.
    Unsupported(String),
}

struct Row {
    kernel: String,
    mode: String,
    verdict: Verdict,
    boot: String,
    time: Duration,
}

/// A bootable kernel: its vmlinux, this run's initramfs and how that mounts the shares.
struct Ready {
    release: String,
    vmlinux: PathBuf,
    initramfs: PathBuf,
    share: Share,
}

/// The shared state under target/vm, held under a lock: concurrent runs would
/// overwrite each other's kernels and results.
struct Vm<'a> {
    workspace: &'a Path,
    dir: PathBuf,
    kernels: Kernels,
    _lock: File,
}

impl<'a> Vm<'a> {
    fn open(workspace: &'a Path) -> Result<Self> {
        let dir = workspace.join("target/vm");
        fs::create_dir_all(&dir)?;
        let lock = File::create(dir.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                eprintln!("vm: waiting for another vm-test/vm-shell in this tree to finish");
                lock.lock()?;
            }
            Err(TryLockError::Error(e)) => return Err(e).context("locking target/vm/lock"),
        }
        Ok(Vm { workspace, kernels: Kernels::new(&dir), dir, _lock: lock })
    }

    fn ready(&self, release: &str) -> Result<Ready> {
        let kernel = self.kernels.prepare(release)?;
        let initramfs = self.dir.join("kernels").join(release).join("initramfs.cpio");
        // Rebuilt on every run (it takes well under a second) so it never lags the code.
        let share = initramfs::build(release, &kernel.modules_root, &initramfs)?;
        if share == Share::VirtioFs {
            qemu::check_virtiofsd()?;
        }
        Ok(Ready { release: release.to_owned(), vmlinux: kernel.vmlinux, initramfs, share })
    }

    /// One boot running `command` with BACKLOG_MODE=`mode`; returns the result dir too.
    fn boot(
        &self,
        kernel: &Ready,
        mode: &str,
        command: &[String],
        timeout: Duration,
        interactive: bool,
    ) -> Result<(PathBuf, Result<(Outcome, Duration)>)> {
        let out_dir = self.dir.join("results").join(&kernel.release).join(mode);
        if out_dir.exists() {
            fs::remove_dir_all(&out_dir)?;
        }
        fs::create_dir_all(&out_dir)?;
        fs::write(out_dir.join("run.sh"), run_script(self.workspace, kernel.share, &kernel.release, mode, command))?;
        let boot = Boot {
            vmlinux: &kernel.vmlinux,
            initramfs: &kernel.initramfs,
            share: kernel.share,
            out_dir: &out_dir,
            workspace: self.workspace,
            timeout,
            interactive,
        };
        let result = boot.run();
        Ok((out_dir, result))
    }

    /// One kernel × mode cell: boots, reports on stderr, returns the table row.
    fn run_one(&self, kernel: &Ready, mode: &str, command: &[String], timeout: Duration) -> Row {
        let release = &kernel.release;
        let (verdict, time, out_dir) = match self.boot(kernel, mode, command, timeout, false) {
            Ok((out_dir, outcome)) => {
                let (verdict, time) = verdict(outcome, &out_dir);
                (verdict, time, Some(out_dir))
            }
            Err(e) => (Verdict::Failed(format!("error: {e:#}")), Duration::ZERO, None),
        };
        let Some(out_dir) = out_dir else {
            eprintln!("vm: {release} {mode}: {}", verdict.word());
            return Row { kernel: release.clone(), mode: mode.to_owned(), verdict, boot: "-".into(), time };
        };
        let log = out_dir.join("console.log");
        eprintln!("vm: {release} {mode}: {} in {}s (log: {})", verdict.word(), time.as_secs(), log.display());
        match &verdict {
            Verdict::Passed => {}
            Verdict::Unsupported(why) => eprintln!("  | {why}"),
            Verdict::Failed(_) => print_tail(&log),
        }
        let boot = fs::read_to_string(out_dir.join("boot-seconds"))
            .map(|s| format!("{}s", s.trim()))
            .unwrap_or_else(|_| "-".into());
        Row { kernel: release.clone(), mode: mode.to_owned(), verdict, boot, time }
    }
}

/// What one boot's outcome means for its cell.
fn verdict(outcome: Result<(Outcome, Duration)>, out_dir: &Path) -> (Verdict, Duration) {
    match outcome {
        Ok((Outcome::Exited(0), t)) => (Verdict::Passed, t),
        Ok((Outcome::Exited(UNSUPPORTED_STATUS), t)) => match fs::read_to_string(out_dir.join(UNSUPPORTED_FILE)) {
            Ok(why) if !why.trim().is_empty() => (Verdict::Unsupported(why.trim().to_owned()), t),
            // A skip without a reason is not one.
            _ => (
                Verdict::Failed(format!(
                    "failed({UNSUPPORTED_STATUS}, no reason in $BACKLOG_VM_OUT/{UNSUPPORTED_FILE})"
                )),
                t,
            ),
        },
        Ok((Outcome::Exited(code), t)) => (Verdict::Failed(format!("failed({code})")), t),
        Ok((Outcome::NoStatus, t)) => (Verdict::Failed("no-status".into()), t),
        Ok((Outcome::Timeout, t)) => (Verdict::Failed("timeout".into()), t),
        Err(e) => (Verdict::Failed(format!("error: {e:#}")), Duration::ZERO),
    }
}

impl Verdict {
    fn word(&self) -> &str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed(w) => w,
            Verdict::Unsupported(_) => "unsupported",
        }
    }
}

/// Returns whether every run passed.
pub fn run(workspace: &Path, opts: &Options) -> Result<bool> {
    let print = |resolved: &[(Series, String)]| {
        for (series, release) in resolved {
            println!("{:<11}{release}", series.name());
        }
        Ok(true)
    };
    // Reading the recorded choice needs no lock: --list answers during a long run.
    if opts.list && !opts.refresh {
        if let Some(resolved) = Kernels::new(&workspace.join("target/vm")).cached(&opts.series) {
            return print(&resolved);
        }
    }
    let vm = Vm::open(workspace)?;
    let resolved = vm.kernels.resolve(&opts.series, opts.refresh)?;
    if opts.list {
        return print(&resolved);
    }
    qemu::check_installed()?;
    check_command(workspace, &opts.command)?;

    // Downloads and initramfs builds first, one at a time; then the boots, `jobs` at once.
    let mut kernels = Vec::new();
    for (_, release) in &resolved {
        kernels.push(vm.ready(release)?);
    }
    let runs: Vec<(&Ready, &String)> = kernels.iter().flat_map(|k| opts.modes.iter().map(move |m| (k, m))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let rows = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, runs.len().max(1)) {
            s.spawn(|| {
                while let Some((kernel, mode)) = runs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    let row = vm.run_one(kernel, mode, &opts.command, opts.timeout);
                    rows.lock().expect("rows lock").push(row);
                }
            });
        }
    });
    let mut rows = rows.into_inner().expect("rows lock");
    // The table lists kernels in the order asked for, whichever guest ended first.
    rows.sort_by_key(|r| resolved.iter().position(|(_, rel)| *rel == r.kernel));
    print!("{}", table(&rows, &opts.modes));
    // An unsupported cell is a finding, not a failure: the command proved it so.
    Ok(rows.iter().all(|r| !matches!(r.verdict, Verdict::Failed(_))))
}

/// Boots one kernel with the console on this terminal (quit qemu with Ctrl-A X).
pub fn shell(workspace: &Path, series: Series, mode: &str, command: &[String]) -> Result<bool> {
    let vm = Vm::open(workspace)?;
    let (_, release) = vm.kernels.resolve(&[series], false)?.remove(0);
    qemu::check_installed()?;
    check_command(workspace, command)?;
    let kernel = vm.ready(&release)?;
    eprintln!("vm: booting {release} (BACKLOG_MODE={mode}); Ctrl-A X quits qemu");
    // A shell has no time limit of its own.
    let (_, outcome) = vm.boot(&kernel, mode, command, Duration::MAX, true)?;
    Ok(matches!(outcome?.0, Outcome::Exited(0)))
}

/// Catches the common mistake of testing a binary that was never built, before booting.
fn check_command(workspace: &Path, command: &[String]) -> Result<()> {
    let program = &command[0];
    if program.contains('/') && !workspace.join(program).exists() {
        bail!("{program} not found in {}: build it first (cargo build --release)", workspace.display());
    }
    Ok(())
}

/// The per-run script the guest's stage2 executes (with the host's /bin/sh).
fn run_script(workspace: &Path, share: Share, release: &str, mode: &str, command: &[String]) -> String {
    let mut s = String::from("set -u\n");
    let _ = writeln!(s, "cut -d' ' -f1 /proc/uptime > {GUEST_OUT}/boot-seconds");
    let ws = quote(&workspace.to_string_lossy());
    // The workspace may sit under a path the guest mounted a tmpfs over (/tmp).
    let _ = writeln!(s, "mkdir -p {ws} && {} || exit 125", share.mount(WORKSPACE_TAG, &ws, true));
    let _ = writeln!(s, "cd {ws} || exit 125");
    // Pass through the logging knobs and any BACKLOG_* setting of the caller.
    for (k, v) in std::env::vars() {
        if k.starts_with("BACKLOG_") || k == "RUST_LOG" || k == "RUST_BACKTRACE" || k == "TERM" {
            let _ = writeln!(s, "export {k}={}", quote(&v));
        }
    }
    let _ = writeln!(
        s,
        "export BACKLOG_VM_KERNEL={} BACKLOG_MODE={} BACKLOG_VM_OUT={GUEST_OUT} BACKLOG_VM_UNSUPPORTED={UNSUPPORTED_STATUS}",
        quote(release),
        quote(mode)
    );
    let _ = writeln!(
        s,
        "export HOME=/root PATH={GUEST_DIR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    let words: Vec<String> = command.iter().map(|w| quote(w)).collect();
    let _ = writeln!(s, "exec {}", words.join(" "));
    s
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn print_tail(log: &Path) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for l in &lines[lines.len().saturating_sub(15)..] {
        eprintln!("  | {l}");
    }
}

/// The kernel × mode matrix: one row per kernel, one column per mode, each cell the
/// verdict with the guest's run time; reasons for unsupported and failed cells follow
/// as numbered notes.
fn table(rows: &[Row], modes: &[String]) -> String {
    let mut kernels: Vec<&str> = Vec::new();
    for r in rows {
        if !kernels.contains(&r.kernel.as_str()) {
            kernels.push(&r.kernel);
        }
    }
    let mut notes = Vec::new();
    let mut cells: Vec<Vec<String>> = Vec::new();
    for k in &kernels {
        let mut line = vec![k.to_string()];
        for m in modes {
            let Some(r) = rows.iter().find(|r| r.kernel == *k && r.mode == *m) else {
                line.push("-".into());
                continue;
            };
            let mut cell = format!("{} {}s", r.verdict.word(), r.time.as_secs());
            if let Verdict::Unsupported(why) = &r.verdict {
                notes.push(format!("{k} {m}: {why}"));
                cell = format!("unsupported[{}] {}s", notes.len(), r.time.as_secs());
            }
            if r.boot != "-" {
                cell += &format!(" (boot {})", r.boot);
            }
            line.push(cell);
        }
        cells.push(line);
    }
    let mut header = vec!["kernel".to_string()];
    header.extend(modes.iter().cloned());
    let widths: Vec<usize> =
        (0..header.len()).map(|i| cells.iter().chain([&header]).map(|l| l[i].len()).max().unwrap_or(0) + 2).collect();
    let mut s = String::new();
    for line in [&header].into_iter().chain(&cells) {
        for (cell, w) in line.iter().zip(&widths) {
            let _ = write!(s, "{cell:<w$}");
        }
        s = s.trim_end().to_owned() + "\n";
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(s, "[{}] {n}", i + 1);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kernel: &str, mode: &str, verdict: Verdict) -> Row {
        Row { kernel: kernel.into(), mode: mode.into(), verdict, boot: "3.1s".into(), time: Duration::from_secs(90) }
    }

    #[test]
    fn the_table_has_a_row_per_kernel_and_numbered_reasons() {
        let modes: Vec<String> = ["fentry", "kprobe"].map(String::from).to_vec();
        let rows = [
            row("5.10.0-46-amd64", "fentry", Verdict::Unsupported("fentry mode is unavailable: no helper".into())),
            row("5.10.0-46-amd64", "kprobe", Verdict::Passed),
            row("6.1.0-57-amd64", "kprobe", Verdict::Failed("failed(1)".into())),
        ];
        let t = table(&rows, &modes);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("kernel") && lines[0].contains("fentry") && lines[0].contains("kprobe"), "{t}");
        assert!(lines[1].contains("unsupported[1] 90s (boot 3.1s)") && lines[1].contains("passed 90s"), "{t}");
        assert!(lines[2].contains("failed(1) 90s") && lines[2].split_whitespace().nth(1) == Some("-"), "{t}");
        assert_eq!(lines[3], "[1] 5.10.0-46-amd64 fentry: fentry mode is unavailable: no helper");
    }

    #[test]
    fn an_unsupported_status_needs_a_reason() {
        let dir = std::env::temp_dir().join(format!("xtask-verdict-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let t = Duration::from_secs(5);
        let status = |code| Ok((Outcome::Exited(code), t));
        assert!(matches!(verdict(status(UNSUPPORTED_STATUS), &dir).0, Verdict::Failed(w) if w.contains("no reason")));
        fs::write(dir.join(UNSUPPORTED_FILE), "tracepoint mode is unavailable: why\n").unwrap();
        assert_eq!(
            verdict(status(UNSUPPORTED_STATUS), &dir).0,
            Verdict::Unsupported("tracepoint mode is unavailable: why".into())
        );
        assert_eq!(verdict(status(0), &dir).0, Verdict::Passed);
        assert_eq!(verdict(status(1), &dir).0, Verdict::Failed("failed(1)".into()));
        assert_eq!(verdict(Ok((Outcome::Timeout, t)), &dir).0, Verdict::Failed("timeout".into()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
