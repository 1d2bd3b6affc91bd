//! The guest's initramfs: busybox-static, the few modules needed to mount the host's root
//! over virtio 9p, or over virtiofs on kernels built without 9p (Debian's -cloud
//! flavour), decompressed (busybox insmod cannot read .ko.xz), and two scripts.
//!
//! /init (in the initramfs) loads those modules, mounts the host root read-only at
//! /newroot plus a tmpfs /run holding the read-write results share, then execs
//! `chroot /newroot ... stage2`. Doing the chroot as pid 1 matters: pid 1 shares its
//! fs_struct with kthreadd, so the kernel's own helpers (module autoloading through
//! /proc/sys/kernel/modprobe) then resolve paths in the host root too.
//!
//! stage2 (pid 1, inside the chroot) mounts the pseudo filesystems, brings up lo, runs
//! the per-run script that the host wrote into the results share, records its exit
//! status there and powers off.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// How the guest mounts the host's directories (see qemu::Boot for the host side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// virtio 9p, served by qemu itself: every generic and -rt kernel.
    NineP,
    /// virtiofs, served by one virtiofsd per directory: kernels without 9p (-cloud
    /// flavour: CONFIG_NET_9P unset, CONFIG_VIRTIO_FS=m).
    VirtioFs,
}

impl Share {
    /// Modules needed to mount the shares; virtio_pci is modular on 6.1 and -cloud,
    /// built in on later generic kernels.
    fn modules(self) -> &'static [&'static str] {
        match self {
            Share::NineP => &["virtio_pci", "9pnet_virtio", "9p"],
            Share::VirtioFs => &["virtio_pci", "virtiofs"],
        }
    }

    /// The guest's shell command mounting the share `tag` on `target`.
    pub fn mount(self, tag: &str, target: &str, read_only: bool) -> String {
        match (self, read_only) {
            (Share::NineP, true) => {
                format!("mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 {tag} {target}")
            }
            (Share::NineP, false) => {
                format!("mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {tag} {target}")
            }
            (Share::VirtioFs, true) => format!("mount -t virtiofs -o ro {tag} {target}"),
            (Share::VirtioFs, false) => format!("mount -t virtiofs {tag} {target}"),
        }
    }
}
const BUSYBOX: &str = "/bin/busybox";

/// Where the guest finds things; shared with the host-side run script.
pub const GUEST_DIR: &str = "/run/backlog-vm";
pub const GUEST_OUT: &str = "/run/backlog-vm/out";
pub const ROOT_TAG: &str = "hostroot";
pub const OUT_TAG: &str = "vmout";
/// The workspace, mounted over its own path by the run script (see qemu::Boot).
pub const WORKSPACE_TAG: &str = "workspace";

/// Builds the initramfs (uncompressed newc cpio) for a kernel whose modules live in
/// `<modules_root>/lib/modules/<release>`; returns how it mounts the host's directories.
pub fn build(release: &str, modules_root: &Path, out: &Path) -> Result<Share> {
    let moddir = modules_root.join("lib/modules").join(release);
    let (share, order) = load_order(&moddir)?;

    let busybox = fs::read(BUSYBOX).context("busybox not found: run scripts/vm-deps.sh")?;
    if busybox.get(..4) != Some(b"\x7fELF".as_slice()) || is_dynamic(&busybox) {
        bail!("{BUSYBOX} is not busybox-static: run scripts/vm-deps.sh");
    }

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.node("dev/console", 0o020600, (5, 1), &[]);
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut insmods = String::new();
    for rel in &order {
        let name = rel.rsplit('/').next().unwrap();
        let name = name.split(".ko").next().unwrap().to_owned() + ".ko";
        cpio.file(&format!("lib/modules/{name}"), 0o644, &decompress_module(&moddir.join(rel))?);
        insmods += &format!("insmod /lib/modules/{name} || fail 'insmod {name}'\n");
    }
    cpio.file("init", 0o755, init_script(share, &insmods).as_bytes());
    cpio.file("stage2", 0o755, stage2_script(modules_root).as_bytes());
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))?;
    Ok(share)
}

fn init_script(share: Share, insmods: &str) -> String {
    let mount_root = share.mount(ROOT_TAG, "/newroot", true);
    let mount_out = share.mount(OUT_TAG, &format!("/newroot{GUEST_OUT}"), false);
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "backlog-vm: init: $*"; poweroff -f; }}
{insmods}
# The virtio device may still be probing: retry briefly.
i=0
until {mount_root} 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 50 ] || fail "cannot mount the host root ({mount_root})"
    sleep 0.1
done
mount -t tmpfs -o mode=0755 run /newroot/run || fail "tmpfs on /run"
mkdir -p /newroot{GUEST_OUT}
{mount_out} || fail "cannot mount the results share"
cp /bin/busybox /stage2 /newroot{GUEST_DIR}/
exec chroot /newroot {GUEST_DIR}/busybox sh {GUEST_DIR}/stage2
"#
    )
}

fn stage2_script(modules_root: &Path) -> String {
    let root = modules_root.display();
    format!(
        r#"bb={GUEST_DIR}/busybox
m() {{ $bb mount "$@" || echo "backlog-vm: mount $* failed"; }}
m -t proc proc /proc
m -t sysfs sysfs /sys
m -t devtmpfs devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm
m -t devpts devpts /dev/pts
m -t tmpfs -o mode=1777 shm /dev/shm
m -t tmpfs -o mode=1777 tmp /tmp
m -t tracefs tracefs /sys/kernel/tracing
m -t debugfs debugfs /sys/kernel/debug
m -t bpf bpf /sys/fs/bpf
m -t cgroup2 cgroup2 /sys/fs/cgroup
$bb mkdir -p /run/netns {GUEST_DIR}/bin
# The host root has no /lib/modules for this kernel: point modprobe (ours and the
# kernel's autoloader) at the unpacked tree.
$bb cat > {GUEST_DIR}/bin/modprobe <<'END'
#!/bin/sh
exec /sbin/modprobe -d "{root}" "$@"
END
$bb chmod 755 {GUEST_DIR}/bin/modprobe
echo {GUEST_DIR}/bin/modprobe > /proc/sys/kernel/modprobe
$bb hostname backlog-vm
$bb ip link set lo up
/bin/sh {GUEST_OUT}/run.sh
echo $? > {GUEST_OUT}/exit-status
$bb sync
$bb poweroff -f
"#
    )
}

/// How the guest can mount the shares (9p where the kernel has it), and the module files
/// (relative to the modules dir) to insmod for that, dependencies first, from
/// modules.dep; modules listed in modules.builtin need nothing.
fn load_order(moddir: &Path) -> Result<(Share, Vec<String>)> {
    let dep = fs::read_to_string(moddir.join("modules.dep")).context("reading modules.dep")?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| path.rsplit('/').next().unwrap().split(".ko").next().unwrap().replace('-', "_");
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(name_of(path), (path.to_owned(), rest.split_whitespace().map(name_of).collect()));
    }
    let builtin: HashSet<String> = builtin.lines().map(name_of).collect();

    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, ds)) = deps.get(name) {
            for d in ds {
                visit(d, deps, seen, order);
            }
            order.push(path.clone());
        }
    }
    let has = |m: &&str| deps.contains_key(*m) || builtin.contains(*m);
    let Some(share) = [Share::NineP, Share::VirtioFs].into_iter().find(|s| s.modules().iter().all(has)) else {
        bail!(
            "kernel in {} has neither 9p nor virtiofs (modules or built in): the guest mounts the host's root over \
             one of them (CONFIG_NET_9P + CONFIG_9P_FS, or CONFIG_VIRTIO_FS)",
            moddir.display()
        );
    };
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for m in share.modules() {
        visit(m, &deps, &mut seen, &mut order);
    }
    Ok((share, order))
}

fn decompress_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("ko") => return fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("unknown module compression: {}", path.display()),
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// An ELF with a PT_INTERP program header needs a dynamic loader the guest lacks.
fn is_dynamic(elf: &[u8]) -> bool {
    let u = |o: usize, n: usize| elf.get(o..o + n).map(|b| b.iter().rev().fold(0u64, |a, &x| a << 8 | x as u64));
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u(0x20, 8), u(0x36, 2), u(0x38, 2)) else {
        return true;
    };
    (0..phnum).any(|i| u((phoff + i * phentsize) as usize, 4) == Some(3))
}

/// A minimal writer for the "newc" cpio format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.node(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.node(name, 0o100000 | perm, (0, 0), data);
    }

    fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.node("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moddir(name: &str, dep: &str, builtin: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("modules.dep"), dep).unwrap();
        fs::write(dir.join("modules.builtin"), builtin).unwrap();
        dir
    }

    #[test]
    fn nine_p_where_the_kernel_has_it_else_virtiofs() {
        let generic = moddir(
            "generic",
            "kernel/net/9p/9pnet.ko.xz:\nkernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n\
             kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz\nkernel/fs/fuse/fuse.ko.xz:\n\
             kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko.xz\n",
            "kernel/drivers/virtio/virtio_pci.ko\n",
        );
        let (share, order) = load_order(&generic).unwrap();
        assert_eq!(share, Share::NineP);
        assert_eq!(order.iter().filter(|m| m.contains("9pnet.ko")).count(), 1, "{order:?}");
        assert!(order.last().unwrap().ends_with("fs/9p/9p.ko.xz"), "{order:?}");

        // Debian's -cloud: no 9p, modular virtio and virtiofs.
        let cloud = moddir(
            "cloud",
            "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/fs/fuse/fuse.ko:\nkernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko\n",
            "",
        );
        let (share, order) = load_order(&cloud).unwrap();
        assert_eq!(share, Share::VirtioFs);
        let at = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap();
        assert!(at("/virtio.ko") < at("/virtio_pci.ko") && at("/fuse.ko") < at("/virtiofs.ko"), "{order:?}");
        assert!(share.mount(ROOT_TAG, "/newroot", true).starts_with("mount -t virtiofs -o ro hostroot"));

        let neither = moddir("neither", "kernel/fs/fuse/fuse.ko:\n", "kernel/drivers/virtio/virtio_pci.ko\n");
        assert!(load_order(&neither).unwrap_err().to_string().contains("neither 9p nor virtiofs"));
        for d in [generic, cloud, neither] {
            fs::remove_dir_all(d).unwrap();
        }
    }
}
