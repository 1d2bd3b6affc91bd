//! Who holds a socket: socket inode -> /proc/PID/fd -> pid and comm. The tracer
//! attributes each listener (and so each drop) this way, never to the task that
//! happened to run the softirq; `check` names the processes behind a listener.
//! Socket inodes are unique machine-wide, so one pass covers every namespace.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;

/// pid -> comm for every process holding a socket (a socket inherited across fork
/// has several).
pub type Owners = BTreeMap<u32, String>;

#[derive(Debug, Default)]
pub struct OwnerScan {
    /// Socket inode -> the processes holding it.
    pub owners: HashMap<u64, Owners>,
    /// Processes whose fd table, or some of whose fd links, could not be read (other
    /// users' processes without root, or processes protected from us): owners they
    /// are of stay unknown.
    pub unreadable: usize,
}

/// One pass over /proc; `only` limits the result to these socket inodes (None: every
/// socket). Links are read directly rather than through procfs's fd iterator, which
/// skips unreadable ones silently: /proc/PID/fd can be listable while its links are not.
pub fn scan(only: Option<&BTreeSet<u64>>) -> OwnerScan {
    let mut out = OwnerScan::default();
    let Ok(procs) = procfs::process::all_processes() else {
        out.unreadable += 1;
        return out;
    };
    for p in procs {
        // A process that exited mid-scan is not hidden from us, just gone.
        let Ok(p) = p else { continue };
        let held = match sockets_held(p.pid(), only) {
            Ok((held, hidden)) => {
                out.unreadable += usize::from(hidden);
                held
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                out.unreadable += 1;
                continue;
            }
        };
        if held.is_empty() {
            continue;
        }
        let comm = p.stat().map(|s| s.comm).unwrap_or_default();
        for ino in held {
            out.owners.entry(ino).or_default().insert(p.pid() as u32, comm.clone());
        }
    }
    out
}

/// The sockets a process holds (of `only`, when given), and whether some of its fd
/// links were unreadable.
fn sockets_held(pid: i32, only: Option<&BTreeSet<u64>>) -> io::Result<(BTreeSet<u64>, bool)> {
    let mut held = BTreeSet::new();
    let mut hidden = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        match std::fs::read_link(entry?.path()) {
            Ok(target) => {
                let ino: Option<u64> =
                    target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
                held.extend(ino.filter(|i| only.is_none_or(|o| o.contains(i))));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // closed meanwhile
            Err(_) => hidden = true,
        }
    }
    Ok((held, hidden))
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_our_own_listening_socket() {
        let (_l, ino) = crate::sys::own_listener();
        let all = super::scan(None);
        let owners = all.owners.get(&ino).expect("our socket is in the scan");
        assert_eq!(owners.keys().copied().collect::<Vec<_>>(), vec![std::process::id()]);
        let only = super::scan(Some(&[ino].into()));
        assert_eq!(only.owners.len(), 1, "{:?}", only.owners);
    }
}
