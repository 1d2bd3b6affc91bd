//! Reading the operating system beside the eBPF programs: network namespaces,
//! sock_diag, TcpExt counters and sysctls. Shared by `check`, `record` and the live
//! session's reconciliation with the kernel's own counters.
pub mod counters;
pub mod diag;
pub mod netns;
pub mod netstat;
pub mod sysctl;

/// The inode of the socket behind `fd`, as /proc/PID/fd and sock_diag name it. For
/// tests (the binary's unit tests reach it through the library, built without cfg(test)).
pub fn socket_inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("own fd").ino()
}
