//! One guest boot under qemu TCG (KVM on this kind of host cannot run stock kernels).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::initramfs::{OUT_TAG, ROOT_TAG, WORKSPACE_TAG};

const QEMU: &str = "qemu-system-x86_64";

pub struct Boot<'a> {
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    /// Shared read-write with the guest; receives console.log and exit-status.
    pub out_dir: &'a Path,
    /// The workspace, shared read-only again on its own: the guest's tmpfs /tmp, /run
    /// and /dev/shm would hide a checkout that lives under them (CI clones to /tmp).
    pub workspace: &'a Path,
    pub timeout: Duration,
    /// Console on this terminal (vm-shell) instead of out_dir/console.log.
    pub interactive: bool,
}

pub enum Outcome {
    /// The command ran; its exit status.
    Exited(i32),
    /// qemu stopped without the guest recording a status (init failed, kernel panic).
    NoStatus,
    Timeout,
}

pub fn check_installed() -> Result<()> {
    match Command::new(QEMU).arg("--version").stdout(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        _ => bail!("{QEMU} not found: run scripts/vm-deps.sh"),
    }
}

impl Boot<'_> {
    pub fn run(&self) -> Result<(Outcome, Duration)> {
        let console = self.out_dir.join("console.log");
        let status_file = self.out_dir.join("exit-status");
        let _ = fs::remove_file(&status_file);
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
            .args(["-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(self.vmlinux)
            .arg("-initrd")
            .arg(self.initramfs)
            // panic=-1 + -no-reboot: a guest panic ends qemu at once instead of hanging.
            .args(["-append", "console=ttyS0 quiet panic=-1 mitigations=off"])
            .arg("-virtfs")
            .arg(format!("local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"))
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag={OUT_TAG},security_model=none,multidevs=remap",
                virtfs_path(self.out_dir)?.display()
            ))
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag={WORKSPACE_TAG},security_model=none,readonly=on,multidevs=remap",
                virtfs_path(self.workspace)?.display()
            ))
            .arg("-serial");
        if self.interactive {
            // mon: keeps qemu's Ctrl-A escapes (Ctrl-A X quits).
            cmd.arg("mon:stdio");
        } else {
            cmd.arg(format!("file:{}", console.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(self.out_dir.join("qemu.stderr"))?);
        }
        die_with_parent(&mut cmd);

        let start = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("{QEMU} not found: run scripts/vm-deps.sh"))?;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let elapsed = start.elapsed();
        let Some(status) = status else {
            return Ok((Outcome::Timeout, elapsed));
        };
        if !status.success() {
            let err = fs::read_to_string(self.out_dir.join("qemu.stderr")).unwrap_or_default();
            bail!("{QEMU} failed ({status}): {}", err.trim());
        }
        let outcome = match fs::read_to_string(&status_file) {
            Ok(s) => Outcome::Exited(s.trim().parse().unwrap_or(-1)),
            Err(_) => Outcome::NoStatus,
        };
        Ok((outcome, elapsed))
    }
}

/// qemu's -virtfs option list splits on commas.
fn virtfs_path(p: &Path) -> Result<PathBuf> {
    let p = p.canonicalize()?;
    if p.to_string_lossy().contains(',') {
        bail!("{}: a path with a comma cannot be shared with the guest", p.display());
    }
    Ok(p)
}

/// Ask the kernel to SIGKILL qemu when xtask exits for any reason (Ctrl-C, kill), so no
/// guest outlives the run. std has no wrapper for prctl; it is in the libc std links.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    extern "C" {
        fn prctl(option: i32, arg2: u64, ...) -> i32;
    }
    const PR_SET_PDEATHSIG: i32 = 1;
    const SIGKILL: u64 = 9;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            Ok(())
        });
    }
}
