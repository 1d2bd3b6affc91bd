//! Where a drop is *attributed*: from the listening socket to the processes that own
//! it. The kernel tells us the socket's inode; /proc/PID/fd links name the same
//! inode for every process holding it (forked workers included). The task running
//! when a drop happens is whoever ran the softirq and is never used.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use procfs::process::FDTarget;

/// pid -> comm for every process holding a socket.
pub type Owners = BTreeMap<u32, String>;

/// Socket inode -> owners, from one pass over /proc.
pub fn scan() -> HashMap<u64, Owners> {
    let mut out: HashMap<u64, Owners> = HashMap::new();
    let Ok(procs) = procfs::process::all_processes() else { return out };
    for p in procs.flatten() {
        // Processes vanish mid-scan and kernel threads have no fds: skip quietly.
        let Ok(fds) = p.fd() else { continue };
        let mut comm: Option<String> = None;
        for fd in fds.flatten() {
            if let FDTarget::Socket(ino) = fd.target {
                let c = comm.get_or_insert_with(|| p.stat().map(|s| s.comm).unwrap_or_default()).clone();
                out.entry(ino).or_default().insert(p.pid as u32, c);
            }
        }
    }
    out
}

/// A cache in front of [`scan`]: a full /proc pass costs milliseconds, so misses
/// trigger at most one rescan per `min_gap`.
pub struct Resolver {
    table: HashMap<u64, Owners>,
    last: Option<Instant>,
    min_gap: Duration,
}

impl Resolver {
    pub fn new(min_gap: Duration) -> Self {
        Resolver { table: HashMap::new(), last: None, min_gap }
    }

    pub fn refresh(&mut self) {
        self.table = scan();
        self.last = Some(Instant::now());
    }

    /// Owners of a socket inode, rescanning if it is unknown and the last scan is old.
    pub fn owners(&mut self, ino: u64) -> Option<&Owners> {
        if ino != 0 && !self.table.contains_key(&ino) && self.last.is_none_or(|t| t.elapsed() >= self.min_gap) {
            self.refresh();
        }
        self.table.get(&ino)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_our_own_listening_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = crate::sys::socket_inode(&l);
        let table = super::scan();
        let owners = table.get(&ino).expect("our socket is in the scan");
        assert_eq!(owners.keys().copied().collect::<Vec<_>>(), vec![std::process::id()]);
    }
}
