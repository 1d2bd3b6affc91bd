//! Network namespaces: named the ways operators name them, found, and looked into.
//!
//! A namespace is in use if some process lives in it (/proc/*/ns/net) or `ip netns`
//! pinned it (/run/netns/*). To look inside, a short-lived thread enters it with
//! setns(CLONE_NEWNET) and opens what the caller needs there (a sock_diag socket, the
//! netstat file, the sysctls). Sockets and open proc files stay bound to the namespace
//! they were opened in, so any thread samples them afterwards without moving.
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::diag::Diag;
use super::netstat::Netstat;
use super::sysctl::Sysctls;

/// ioctl(NS_GET_NSTYPE) = _IO(0xb7, 0x3): the CLONE_NEW* type of a namespace file
/// (Linux 4.11+); fails with ENOTTY on anything else.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Resolves an `ip netns` name or a path such as /proc/PID/ns/net to the network
/// namespace's inode (`ns.inum`); a bare number is taken as an inode, to be checked
/// against the namespaces in use with [`in_use`]. Errors say which: no such name or
/// file, permission denied, not a namespace, a namespace of another type.
pub fn parse_netns(s: &str) -> Result<u32, String> {
    if let Ok(ino) = s.parse::<u32>() {
        return Ok(ino);
    }
    let path = if s.contains('/') {
        PathBuf::from(s)
    } else {
        ["/run/netns", "/var/run/netns"]
            .iter()
            .map(|d| Path::new(d).join(s))
            .find(|p| p.exists())
            .ok_or_else(|| format!("no network namespace named '{s}' in /run/netns (see `ip netns list`)"))?
    };
    let shown = path.display();
    let f = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("{shown}: no such file"),
        io::ErrorKind::PermissionDenied => format!("{shown}: permission denied (run as root)"),
        _ => format!("{shown}: {e}"),
    })?;
    // SAFETY: an ioctl without arguments on a file we hold open.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if kind < 0 {
        return Err(format!("{shown}: not a namespace file (try /proc/PID/ns/net or a name from `ip netns list`)"));
    }
    if kind != libc::CLONE_NEWNET {
        return Err(format!("{shown}: a namespace, but not a network namespace"));
    }
    let ino = f.metadata().map_err(|e| format!("{shown}: {e}"))?.ino();
    u32::try_from(ino).map_err(|_| format!("{shown}: namespace inode {ino} out of range"))
}

/// Fails, naming the first, unless every one of `inodes` is a network namespace in
/// use now (a process lives in it, or `ip netns` pinned it).
pub fn in_use(inodes: &[u32]) -> Result<(), String> {
    if inodes.is_empty() {
        return Ok(());
    }
    let all = enumerate().map_err(|e| format!("cannot list network namespaces in /proc: {e}"))?;
    match inodes.iter().find(|i| !all.namespaces.iter().any(|n| n.inode == **i)) {
        None => Ok(()),
        Some(missing) => Err(not_in_use(*missing)),
    }
}

fn not_in_use(inode: u32) -> String {
    format!(
        "network namespace {inode} is not used by any process we can see nor named in /run/netns \
         (check `ip netns list` and `lsns -t net`; run as root to see other users' processes)"
    )
}

/// The inode of the namespace this process runs in.
pub fn current() -> io::Result<u32> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino() as u32)
}

#[derive(Debug, Clone)]
pub struct NetnsInfo {
    pub inode: u32,
    /// The `ip netns` name, when it has one.
    pub name: Option<String>,
    /// A file that refers to the namespace, to enter it by.
    pub path: PathBuf,
}

pub struct Enumeration {
    pub namespaces: Vec<NetnsInfo>,
    /// Processes whose namespace we may not look at (other users' processes without
    /// root, or processes protected from us).
    pub hidden_pids: usize,
}

/// What a namespace looks like from inside, ready to sample.
pub struct Inside {
    pub sysctls: Sysctls,
    pub diag: Diag,
    pub netstat: Netstat,
}

fn ns_inode(path: &Path) -> io::Result<u32> {
    Ok(std::fs::metadata(path)?.ino() as u32)
}

pub fn enumerate() -> io::Result<Enumeration> {
    let mut found: BTreeMap<u32, NetnsInfo> = BTreeMap::new();
    let mut hidden_pids = 0;
    // Named namespaces first, so a namespace that is both named and in use keeps its name.
    for dir in ["/run/netns", "/var/run/netns"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(inode) = ns_inode(&path) {
                let name = e.file_name().to_string_lossy().into_owned();
                found.entry(inode).or_insert(NetnsInfo { inode, name: Some(name), path });
            }
        }
    }
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        match ns_inode(&path) {
            Ok(inode) => {
                found.entry(inode).or_insert(NetnsInfo { inode, name: None, path });
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => hidden_pids += 1,
            Err(_) => {} // the process exited, or is a kernel thread without one
        }
    }
    Ok(Enumeration { namespaces: found.into_values().collect(), hidden_pids })
}

/// Opens the check's view of `ns`. Our own namespace needs no privilege; any other
/// needs CAP_SYS_ADMIN for setns.
pub fn enter(ns: &NetnsInfo, current: u32) -> io::Result<Inside> {
    run_in(ns, current, || Ok(Inside { sysctls: Sysctls::read(), diag: Diag::open()?, netstat: Netstat::open()? }))
}

/// Runs `look` inside `ns`: on this thread when it is our own namespace, else on a
/// helper thread that enters it first (and ends with it, so no thread of ours stays
/// in a foreign namespace).
pub fn run_in<T: Send + 'static>(
    ns: &NetnsInfo,
    current: u32,
    look: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    if ns.inode == current {
        return look();
    }
    let f = File::open(&ns.path)?;
    // The pid behind /proc/PID/ns/net may have exited and been reused since enumeration.
    if f.metadata()?.ino() as u32 != ns.inode {
        return Err(io::Error::new(io::ErrorKind::NotFound, "namespace went away"));
    }
    run_entered(f, look)
}

/// Runs `look` on a helper thread that first enters the namespace `path` refers to
/// (/run/netns/NAME, /proc/PID/ns/net); the thread ends with it. Sockets and proc
/// files it opens stay bound to that namespace wherever they are used afterwards.
pub fn run_at<T: Send + 'static>(path: &Path, look: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    run_entered(File::open(path)?, look)
}

fn run_entered<T: Send + 'static>(ns: File, look: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    std::thread::spawn(move || {
        join(&ns)?;
        look()
    })
    .join()
    .map_err(|_| io::Error::other("namespace helper thread panicked"))?
}

/// Network namespaces chosen and entered, as `check` and `record` look into them.
pub struct Opened {
    /// Our own namespace's inode.
    pub current: u32,
    pub entered: Vec<(NetnsInfo, Inside)>,
    /// Chosen but not entered (no privilege, or gone), and why.
    pub failed: Vec<(NetnsInfo, io::Error)>,
    /// With nothing `wanted`: processes whose namespace we may not look at.
    pub hidden_pids: usize,
}

/// The namespaces `wanted` names, else every namespace in use or named now, each
/// entered (`enter`). A wanted namespace that cannot be found is an error: it names
/// the namespace and where to look.
pub fn open(wanted: &[u32]) -> anyhow::Result<Opened> {
    use anyhow::Context;
    let current = current().context("cannot read /proc/self/ns/net (is /proc mounted?)")?;
    let all = enumerate().context("cannot list /proc (is /proc mounted?)")?;
    if let Some(missing) = wanted.iter().find(|w| !all.namespaces.iter().any(|n| n.inode == **w)) {
        anyhow::bail!(not_in_use(*missing));
    }
    let hidden_pids = if wanted.is_empty() { all.hidden_pids } else { 0 };
    let mut opened = Opened { current, entered: Vec::new(), failed: Vec::new(), hidden_pids };
    for ns in all.namespaces.into_iter().filter(|n| wanted.is_empty() || wanted.contains(&n.inode)) {
        match enter(&ns, current) {
            Ok(inside) => opened.entered.push((ns, inside)),
            Err(e) => opened.failed.push((ns, e)),
        }
    }
    Ok(opened)
}

/// Moves the calling thread (only it) into the network namespace `ns` refers to
/// (CAP_SYS_ADMIN needed). For a thread that stays there; see `run_at` otherwise.
pub fn join(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; it only changes the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_numbers() {
        assert_eq!(parse_netns("4026531840").unwrap(), 4026531840);
        let me = current().unwrap();
        assert_eq!(parse_netns("/proc/self/ns/net").unwrap(), me);
        assert!(in_use(&[me]).is_ok());
        assert!(in_use(&[12345]).unwrap_err().contains("12345 is not used"));
        assert!(parse_netns("surely-no-such-netns").unwrap_err().contains("no network namespace named"));
        assert!(parse_netns("/etc/passwd").unwrap_err().contains("not a namespace file"));
        assert!(parse_netns("/proc/self/ns/uts").unwrap_err().contains("not a network namespace"));
        assert!(parse_netns("/no/such/file").unwrap_err().contains("no such file"));
    }

    #[test]
    fn own_namespace_is_listed_and_enterable() {
        let me = current().unwrap();
        let all = enumerate().unwrap();
        let own = all.namespaces.iter().find(|n| n.inode == me).expect("own netns");
        let inside = enter(own, me).unwrap();
        assert!(inside.sysctls.somaxconn.is_some());
    }
}
