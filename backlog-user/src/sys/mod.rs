//! Reading the operating system beside the eBPF programs: network namespaces,
//! sock_diag, TcpExt counters and sysctls. Shared by `check`, `record` and the live
//! session's reconciliation with the kernel's own counters.
pub mod counters;
pub mod diag;
pub mod netns;
pub mod netstat;
pub mod sysctl;
