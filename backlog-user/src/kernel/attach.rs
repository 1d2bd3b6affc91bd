//! What every attach mode implements (`AttachMode`), and the hooks modes share; the
//! modes are sibling modules (fentry_kprobe.rs, tracepoint.rs), chosen in mod.rs.
use anyhow::{Context, Result};
use aya::programs::TracePoint;
use aya::{Btf, Ebpf};
use backlog_common::programs;

use super::features::Features;

/// One way of detecting drops. Adding a mode is adding a sibling module.
pub trait AttachMode {
    /// Why this mode cannot work on this kernel, if that is known without trying.
    fn unavailable(&self, features: &Features) -> Option<String>;
    /// Why this mode would fail, told by a test far cheaper than loading the object
    /// and attaching (which is what a failed attempt costs); run before attaching.
    fn probe(&self) -> Option<String> {
        None
    }
    /// Whether the mode sees accept() return, so that queued children are worth
    /// remembering (`Config::time_accepts`).
    fn sees_accepts(&self) -> bool {
        true
    }
    /// Attaches the mode's programs; returns notes on hooks done another way.
    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<String>>;
}

/// listen()'s backlog from the syscall's entry tracepoint.
pub fn attach_listen_tracepoint(ebpf: &mut Ebpf) -> Result<()> {
    let p: &mut TracePoint = ebpf.program_mut(programs::LISTEN).context(programs::LISTEN)?.try_into()?;
    p.load().context("loading syscalls:sys_enter_listen")?;
    p.attach("syscalls", "sys_enter_listen").context("attaching syscalls:sys_enter_listen")?;
    Ok(())
}
