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

/// Resolves `ip netns` names, /proc/PID/ns/net style paths, and bare inode numbers
/// to the namespace inode the kernel reports (`ns.inum`).
pub fn parse_netns(s: &str) -> Result<u32, String> {
    if let Ok(ino) = s.parse::<u32>() {
        return Ok(ino);
    }
    let candidates = if s.contains('/') {
        vec![s.to_string()]
    } else {
        vec![format!("/run/netns/{s}"), format!("/var/run/netns/{s}")]
    };
    for c in &candidates {
        if let Ok(md) = std::fs::metadata(Path::new(c)) {
            return u32::try_from(md.ino()).map_err(|_| format!("{c}: not a namespace file"));
        }
    }
    Err(format!("no network namespace '{s}' (not in `ip netns list`, not a path, not an inode number)"))
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
        assert!(parse_netns("surely-no-such-netns").is_err());
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
