//! `vm-test`: for each kernel × mode, one fresh boot running the command, then a table.
//! `vm-shell`: one boot with the guest console on the terminal.

use std::fmt::Write as _;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::initramfs::{self, GUEST_DIR, GUEST_OUT, WORKSPACE_TAG};
use crate::kernels::{Kernels, Series};
use crate::qemu::{self, Boot, Outcome};

pub struct Options {
    pub series: Vec<Series>,
    pub modes: Vec<String>,
    pub list: bool,
    pub refresh: bool,
    pub timeout: Duration,
    pub command: Vec<String>,
}

struct Row {
    kernel: String,
    mode: String,
    result: String,
    boot: String,
    time: Duration,
}

/// A bootable kernel: its vmlinux and this run's initramfs.
struct Ready {
    release: String,
    vmlinux: PathBuf,
    initramfs: PathBuf,
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
        initramfs::build(release, &kernel.modules_root, &initramfs)?;
        Ok(Ready { release: release.to_owned(), vmlinux: kernel.vmlinux, initramfs })
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
        fs::write(out_dir.join("run.sh"), run_script(self.workspace, &kernel.release, mode, command))?;
        let boot = Boot {
            vmlinux: &kernel.vmlinux,
            initramfs: &kernel.initramfs,
            out_dir: &out_dir,
            workspace: self.workspace,
            timeout,
            interactive,
        };
        let result = boot.run();
        Ok((out_dir, result))
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

    let mut rows = Vec::new();
    for (_, release) in &resolved {
        let kernel = vm.ready(release)?;
        for mode in &opts.modes {
            let (out_dir, outcome) = vm.boot(&kernel, mode, &opts.command, opts.timeout, false)?;
            let (result, time) = match outcome {
                Ok((Outcome::Exited(0), t)) => ("passed".to_owned(), t),
                Ok((Outcome::Exited(code), t)) => (format!("failed({code})"), t),
                Ok((Outcome::NoStatus, t)) => ("no-status".to_owned(), t),
                Ok((Outcome::Timeout, t)) => ("timeout".to_owned(), t),
                Err(e) => {
                    eprintln!("vm: {release} {mode}: {e:#}");
                    ("error".to_owned(), Duration::ZERO)
                }
            };
            let log = out_dir.join("console.log");
            eprintln!("vm: {release} {mode}: {result} in {}s (log: {})", time.as_secs(), log.display());
            if result != "passed" {
                print_tail(&log);
            }
            let boot = fs::read_to_string(out_dir.join("boot-seconds"))
                .map(|s| format!("{}s", s.trim()))
                .unwrap_or_else(|_| "-".into());
            rows.push(Row { kernel: release.clone(), mode: mode.clone(), result, boot, time });
        }
    }
    print!("{}", table(&rows));
    Ok(rows.iter().all(|r| r.result == "passed"))
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
fn run_script(workspace: &Path, release: &str, mode: &str, command: &[String]) -> String {
    let mut s = String::from("set -u\n");
    let _ = writeln!(s, "cut -d' ' -f1 /proc/uptime > {GUEST_OUT}/boot-seconds");
    let ws = quote(&workspace.to_string_lossy());
    // The workspace may sit under a path the guest mounted a tmpfs over (/tmp).
    let _ = writeln!(
        s,
        "mkdir -p {ws} && mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 {WORKSPACE_TAG} {ws} || exit 125"
    );
    let _ = writeln!(s, "cd {ws} || exit 125");
    // Pass through the logging knobs and any BACKLOG_* setting of the caller.
    for (k, v) in std::env::vars() {
        if k.starts_with("BACKLOG_") || k == "RUST_LOG" || k == "RUST_BACKTRACE" || k == "TERM" {
            let _ = writeln!(s, "export {k}={}", quote(&v));
        }
    }
    let _ = writeln!(
        s,
        "export BACKLOG_VM_KERNEL={} BACKLOG_MODE={} BACKLOG_VM_OUT={GUEST_OUT}",
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

fn table(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.kernel.len()).max().unwrap_or(6).max(6) + 2;
    let mut s = format!("{:<width$}{:<12}{:<12}{:<8}{}\n", "kernel", "mode", "result", "boot", "time");
    for r in rows {
        let _ = writeln!(s, "{:<width$}{:<12}{:<12}{:<8}{}s", r.kernel, r.mode, r.result, r.boot, r.time.as_secs());
    }
    s
}
