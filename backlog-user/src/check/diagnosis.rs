//! What the check found, as rendered in text and serialized as the `--json` document.
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::cpu::CpuUse;
use super::share::{NsDrops, Share};
use crate::sys::sysctl::Sysctls;

/// Bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub sample_seconds: f64,
    pub namespaces: Vec<NetnsReport>,
    pub listeners: Vec<ListenerGroup>,
    pub findings: Vec<Finding>,
    /// Parts of the picture this run could not see, and why.
    pub not_visible: Vec<String>,
    pub exit_code: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetnsReport {
    pub inode: u32,
    pub name: Option<String>,
    pub sysctls: Sysctls,
    pub counters: Vec<CounterDelta>,
    /// ListenDrops against the listeners' own drop counters (share.rs).
    pub drops: NsDrops,
}

/// A TcpExt counter at the start and end of the window.
#[derive(Debug, Clone, Serialize)]
pub struct CounterDelta {
    pub name: &'static str,
    pub start: u64,
    pub end: u64,
    pub delta: u64,
    pub per_second: f64,
}

impl NetnsReport {
    pub fn delta(&self, name: &str) -> u64 {
        self.counters.iter().find(|c| c.name == name).map_or(0, |c| c.delta)
    }
}

/// Every socket listening on one local address and port of one namespace: a single
/// socket, or a SO_REUSEPORT group whose members each have their own accept queue.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerGroup {
    pub netns: u32,
    pub address: IpAddr,
    pub port: u16,
    pub reuseport: bool,
    pub members: Vec<Member>,
    /// Pending handshakes (SYN_RECV requests) for this address and port; shared by the
    /// group because a request is not tied to one member before it is accepted.
    pub syn_queue_now: u32,
    pub syn_queue_peak: u32,
    /// The group's share of its namespace's ListenDrops over the window (from the
    /// members' drop counters, which are not listen-drop counts: share.rs).
    pub listen_drops: Share,
}

impl ListenerGroup {
    pub fn endpoint(&self) -> String {
        SocketAddr::new(self.address, self.port).to_string()
    }

    /// How far the group's sockets' drop counters rose during the window; None when
    /// the kernel did not report socket drop counters.
    pub fn drops_window(&self) -> Option<u64> {
        self.members.iter().map(|m| m.drops_window.map(u64::from)).sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub inode: u32,
    /// Accept-queue limit: min(listen backlog, net.core.somaxconn).
    pub limit: u32,
    pub queue_now: u32,
    pub queue_peak: u32,
    pub samples: u32,
    /// Samples in which the queue was full (the kernel drops once length > limit).
    pub samples_full: u32,
    pub full_seconds: f64,
    /// The socket's drop counter (`ss -tlnm`'s `d`) since it was created, and its
    /// rise over the window: a final-ACK overflow counts twice there (share.rs).
    pub drops_total: Option<u32>,
    pub drops_window: Option<u32>,
    pub owners: Vec<OwnerUse>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OwnerUse {
    pub pid: i32,
    pub comm: String,
    /// None when the process exited or its threads were not readable.
    pub cpu: Option<CpuUse>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn label(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable identifier, for scripts.
    pub kind: &'static str,
    pub netns: u32,
    /// "address:port" when the finding is about one listener.
    pub listener: Option<String>,
    pub summary: String,
    pub evidence: String,
    pub fix: String,
}

/// 0 healthy, 1 at least one warning; informational findings do not count.
pub fn exit_code(findings: &[Finding]) -> i32 {
    i32::from(findings.iter().any(|f| f.severity >= Severity::Warning))
}
