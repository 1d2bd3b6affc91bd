//! What the kernel says about our programs' runs, from `bpf_prog_info`.
//!
//! A tracing program is not re-entered on a CPU where it is already running: when
//! an interrupt's softirq frees a dropped segment while the same program is busy
//! with a process-context event on that CPU, the kernel skips the nested run and
//! only counts it (`recursion_misses`). A skipped run can hide a drop, so the
//! tracer reports these counts next to its own losses instead of trusting them to
//! be zero.
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::Result;
use aya_obj::generated::bpf_prog_info;

/// Runs of the program behind `fd` that the kernel skipped.
pub fn recursion_misses(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: bpf_prog_info is plain old data; all-zero is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    super::objinfo::get(fd, &mut info)?;
    Ok(info.recursion_misses)
}

/// Sum over every loaded program of `ebpf` (programs of the modes not chosen were
/// never loaded and have no descriptor). A failed read is an error, not a zero.
pub fn total_misses(ebpf: &aya::Ebpf) -> Result<u64> {
    ebpf.programs().filter_map(|(_, p)| p.fd().ok()).map(|fd| recursion_misses(fd.as_fd())).sum()
}
