//! Reading the operating system beside the eBPF programs: network namespaces,
//! sock_diag, TcpExt counters, sysctls and socket owners. Shared by the live session,
//! `check`, `record`, the integration tests and xtask.
pub mod counters;
pub mod diag;
pub mod netns;
pub mod netstat;
pub mod procs;
pub mod sysctl;

/// The inode of the socket behind `fd`, as /proc/PID/fd and sock_diag name it.
#[cfg(test)]
pub fn socket_inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("own fd").ino()
}
