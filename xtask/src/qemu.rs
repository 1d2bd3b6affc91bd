//! One guest boot under qemu TCG (KVM on this kind of host cannot run stock kernels).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::initramfs::{Share, OUT_TAG, ROOT_TAG, WORKSPACE_TAG};

const QEMU: &str = "qemu-system-x86_64";
/// The guest's memory in MiB (a virtiofs guest's is a shared memfd of that size).
const MEMORY_MIB: u32 = 1024;

pub struct Boot<'a> {
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    /// How the host's directories reach the guest.
    pub share: Share,
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

/// virtiofsd, for kernels without 9p: on PATH or where scripts/vm-deps.sh's `cargo
/// install` puts it (Debian 12 packages none; qemu 8+ no longer ships one).
fn virtiofsd() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_home.map(|c| c.join("bin")))
        .chain(["/usr/libexec", "/usr/lib/qemu"].map(PathBuf::from))
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

pub fn check_virtiofsd() -> Result<()> {
    match virtiofsd() {
        Some(_) => Ok(()),
        None => {
            bail!("virtiofsd not found (kernels without 9p share the host root over virtiofs): run scripts/vm-deps.sh")
        }
    }
}

/// One virtiofsd per shared directory, killed (if still running) when dropped.
struct Daemons {
    children: Vec<std::process::Child>,
    dir: PathBuf,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts virtiofsd for each (tag, dir, read-only) and returns the daemons and the qemu
/// arguments that connect to them. Sockets live in a short private dir under /tmp (a
/// socket path has at most 107 bytes; the results dir may be deeper).
fn start_virtiofsd(shares: &[(&str, &Path, bool)], log: &Path) -> Result<(Daemons, Vec<String>)> {
    let program = virtiofsd().context("virtiofsd not found: run scripts/vm-deps.sh")?;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("backlog-vm-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut daemons = Daemons { children: Vec::new(), dir: dir.clone() };
    let mut args = vec![
        "-object".to_owned(),
        format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
        "-machine".to_owned(),
        "memory-backend=mem".to_owned(),
    ];
    for (i, (tag, path, read_only)) in shares.iter().enumerate() {
        let socket = dir.join(format!("{tag}.sock"));
        let mut cmd = Command::new(&program);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", path.canonicalize()?.display()))
            // The guest sees each host mount below the share as its own device, as
            // 9p's multidevs=remap does.
            .args(["--announce-submounts", "--cache=auto", "--log-level=error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::options().create(true).append(true).open(log)?);
        if *read_only {
            cmd.arg("--readonly");
        }
        die_with_parent(&mut cmd);
        daemons.children.push(cmd.spawn().with_context(|| format!("starting {}", program.display()))?);
        let start = Instant::now();
        while !socket.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("virtiofsd made no socket for '{tag}' in 10 s: see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        args.extend([
            "-chardev".to_owned(),
            format!("socket,id=fs{i},path={}", socket.display()),
            "-device".to_owned(),
            format!("vhost-user-fs-pci,chardev=fs{i},tag={tag}"),
        ]);
    }
    Ok((daemons, args))
}

impl Boot<'_> {
    pub fn run(&self) -> Result<(Outcome, Duration)> {
        let console = self.out_dir.join("console.log");
        let status_file = self.out_dir.join("exit-status");
        let _ = fs::remove_file(&status_file);
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-m", &MEMORY_MIB.to_string(), "-smp", "2"])
            .args(["-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(self.vmlinux)
            .arg("-initrd")
            .arg(self.initramfs)
            // panic=-1 + -no-reboot: a guest panic ends qemu at once instead of hanging.
            .args(["-append", "console=ttyS0 quiet panic=-1 mitigations=off"]);
        let out_dir = virtfs_path(self.out_dir)?;
        let workspace = virtfs_path(self.workspace)?;
        let shares =
            [(ROOT_TAG, Path::new("/"), true), (OUT_TAG, &*out_dir, false), (WORKSPACE_TAG, &*workspace, true)];
        // Held until qemu has exited.
        let mut _daemons = None;
        match self.share {
            Share::NineP => {
                for (tag, path, read_only) in shares {
                    let ro = if read_only { ",readonly=on" } else { "" };
                    cmd.arg("-virtfs").arg(format!(
                        "local,path={},mount_tag={tag},security_model=none{ro},multidevs=remap",
                        path.display()
                    ));
                }
            }
            Share::VirtioFs => {
                let (daemons, args) = start_virtiofsd(&shares, &self.out_dir.join("virtiofsd.log"))?;
                cmd.args(args);
                _daemons = Some(daemons);
            }
        }
        cmd.arg("-serial");
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
