//! Reading the operating system beside the eBPF programs: network namespaces,
//! sock_diag, TcpExt counters, sysctls and socket owners. Shared by the live session,
//! `check`, `record`, the integration tests and xtask.
pub mod counters;
pub mod diag;
pub mod limits;
pub mod netns;
pub mod netstat;
pub mod procs;
pub mod sysctl;
pub mod term;

/// A listening socket of this process on loopback, and its inode as /proc/PID/fd
/// and sock_diag name it: what the readers' tests look for.
#[cfg(test)]
pub fn own_listener() -> (std::net::TcpListener, u64) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).expect("own fd").ino();
    (l, ino)
}
