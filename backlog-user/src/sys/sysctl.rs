//! The per-namespace sysctls that bound the listen queues.
//!
//! Files under /proc/sys/net answer for the network namespace of the task that opens
//! them, so `read` must run on a thread that has entered the namespace.
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Sysctls {
    /// net.core.somaxconn: ceiling on every listen() backlog.
    pub somaxconn: Option<u32>,
    /// net.ipv4.tcp_max_syn_backlog: SYN-queue bound (with syncookies off).
    pub tcp_max_syn_backlog: Option<u32>,
    pub tcp_syncookies: Option<u32>,
    pub tcp_abort_on_overflow: Option<u32>,
    /// net.ipv4.tcp_timestamps: with it on, a SYN cookie keeps window scaling, SACK
    /// and ECN (encoded in the timestamp option); off, cookie connections lose them.
    pub tcp_timestamps: Option<u32>,
}

impl Sysctls {
    /// Reads the calling thread's namespace. A missing or unreadable file is None, not
    /// an error: the rest of the check is still worth having.
    pub fn read() -> Sysctls {
        let get = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok());
        Sysctls {
            somaxconn: get("/proc/sys/net/core/somaxconn"),
            tcp_max_syn_backlog: get("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            tcp_syncookies: get("/proc/sys/net/ipv4/tcp_syncookies"),
            tcp_abort_on_overflow: get("/proc/sys/net/ipv4/tcp_abort_on_overflow"),
            tcp_timestamps: get("/proc/sys/net/ipv4/tcp_timestamps"),
        }
    }

    /// (sysctl name, value) in display order.
    pub fn entries(&self) -> [(&'static str, Option<u32>); 5] {
        [
            ("net.core.somaxconn", self.somaxconn),
            ("net.ipv4.tcp_max_syn_backlog", self.tcp_max_syn_backlog),
            ("net.ipv4.tcp_syncookies", self.tcp_syncookies),
            ("net.ipv4.tcp_abort_on_overflow", self.tcp_abort_on_overflow),
            ("net.ipv4.tcp_timestamps", self.tcp_timestamps),
        ]
    }
}
