//! backlog-trace's library half: the operating-system readers (network namespaces,
//! sock_diag, TcpExt counters, sysctls) that the tracer, `check`, the integration
//! tests and xtask share, so each is written once.
//!
//! Built without the `ebpf` feature (how tests/ and xtask depend on it), the crate
//! skips compiling the eBPF object: nothing here needs it.
pub mod sys;
