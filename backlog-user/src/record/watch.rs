//! The recorded namespaces seen from inside: their sysctls and TcpExt counters at
//! start and end, and their listeners' accept-queue depth at every sync. Built on
//! `check`'s per-namespace readers.
use anyhow::Result;

use super::format::{NetnsSnapshot, Phase, QueueRow, Queues, Snapshot};
use crate::sys::netns::{self, Inside, NetnsInfo};

pub struct Watched {
    namespaces: Vec<(NetnsInfo, Inside)>,
    current: u32,
}

impl Watched {
    /// The namespaces named by `--netns`, else every namespace in use now. A
    /// namespace that cannot be entered is skipped with a warning: the recording
    /// of events does not depend on it.
    pub fn open(wanted: &[u32]) -> Result<Watched> {
        let opened = netns::open(wanted)?;
        for (ns, e) in &opened.failed {
            eprintln!(
                "backlog-trace record: netns {}: not recording its counters and queues ({e}); needs root",
                ns.inode
            );
        }
        Ok(Watched { namespaces: opened.entered, current: opened.current })
    }

    /// Sysctls and counters now. At the end the sysctls are read afresh (entering
    /// each namespace again), since they may have been changed while recording.
    pub fn snapshot(&mut self, ts_ns: u64, phase: Phase) -> Snapshot {
        let mut out = Vec::new();
        for (info, inside) in &mut self.namespaces {
            if phase == Phase::End {
                if let Ok(fresh) = netns::enter(info, self.current) {
                    inside.sysctls = fresh.sysctls;
                }
            }
            // Unreadable counters (the namespace went away) are recorded as none.
            let counters = inside.netstat.read().map(|c| c.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
            out.push(NetnsSnapshot {
                inode: info.inode,
                name: info.name.clone(),
                sysctls: inside.sysctls.entries().iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                counters: counters.unwrap_or_default(),
            });
        }
        Snapshot { ts_ns, phase, namespaces: out }
    }

    /// Every listener's accept-queue length and limit, as `ss -ltn` shows them.
    pub fn queues(&mut self, ts_ns: u64) -> Queues {
        let mut rows = Vec::new();
        for (info, inside) in &mut self.namespaces {
            let Ok(entries) = inside.diag.dump() else { continue };
            rows.extend(entries.iter().filter(|e| e.listening).map(|e| QueueRow {
                netns: info.inode,
                sock_ino: e.inode,
                port: e.port,
                len: e.rqueue,
                max: e.wqueue,
            }));
        }
        Queues { ts_ns, rows }
    }
}
