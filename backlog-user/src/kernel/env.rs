//! What the running system offers: privileges, BTF, tracefs, cgroup v2.
//! Each check fails with one line naming the cause and the fix.
use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The tracer loads tracing programs (CAP_BPF + CAP_PERFMON) and attaches to the
/// root cgroup (CAP_NET_ADMIN). CAP_SYS_ADMIN covers all three on any kernel.
pub fn require_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN)) {
        return Ok(());
    }
    bail!("needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN to load its eBPF programs: run it as root (sudo backlog-trace ...)")
}

pub fn require_btf() -> Result<()> {
    if Path::new(super::btf::VMLINUX).exists() {
        return Ok(());
    }
    bail!(
        "this kernel exposes no BTF ({} is missing): backlog-trace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        super::btf::VMLINUX
    )
}

fn mount(fstype: &str, target: &Path) -> Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let t = c(&target.to_string_lossy());
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c(fstype).as_ptr(), t.as_ptr(), c(fstype).as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting {fstype} on {}", target.display()));
    }
    Ok(())
}

fn mounts() -> Vec<(String, PathBuf)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mnt = pre.split_whitespace().nth(4)?;
            let fstype = post.split_whitespace().next()?;
            Some((fstype.to_string(), PathBuf::from(mnt)))
        })
        .collect()
}

/// tracefs, mounted where aya looks for it if the system has not mounted it
/// (it is not mounted at boot on every distribution).
pub fn ensure_tracefs() -> Result<PathBuf> {
    if let Some((_, p)) = mounts().into_iter().find(|(t, p)| t == "tracefs" && p.ends_with("tracing")) {
        return Ok(p);
    }
    let p = PathBuf::from("/sys/kernel/tracing");
    mount("tracefs", &p)
        .context("tracefs is not mounted and could not be (mount -t tracefs tracefs /sys/kernel/tracing)")?;
    Ok(p)
}

/// The root of the cgroup v2 hierarchy, where the ingress program attaches so that
/// it sees every listener on the machine. Mounted privately if the system has none.
pub fn cgroup2_root() -> Result<PathBuf> {
    if let Some((_, p)) = mounts().into_iter().find(|(t, _)| t == "cgroup2") {
        return Ok(p);
    }
    let p = PathBuf::from("/run/backlog-trace/cgroup2");
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    mount("cgroup2", &p).context("no cgroup v2 hierarchy is mounted and mounting one failed")?;
    Ok(p)
}

/// Offset of a field in a tracepoint's record, from its format file.
pub fn tracepoint_field_offset(tracefs: &Path, category: &str, name: &str, field: &str) -> Result<u32> {
    let path = tracefs.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_format_offset(&text, field).with_context(|| format!("no field '{field}' in {}", path.display()))
}

fn parse_format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let mut parts = l.trim().split(';');
        let decl = parts.next()?.trim().strip_prefix("field:")?;
        let fname = decl.split_whitespace().last()?.trim_start_matches('*');
        if fname != field {
            return None;
        }
        parts.next()?.trim().strip_prefix("offset:")?.parse().ok()
    })
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn format_offsets() {
        let f = "name: sys_enter_listen\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;\n\
                 \tfield:int backlog;\toffset:24;\tsize:8;\tsigned:0;\n";
        assert_eq!(super::parse_format_offset(f, "backlog"), Some(24));
        assert_eq!(super::parse_format_offset(f, "fd"), Some(16));
        assert_eq!(super::parse_format_offset(f, "nope"), None);
    }
}
