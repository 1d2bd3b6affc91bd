//! Listener registry: sockets entering and leaving LISTEN, with the task that made
//! them and the backlog it asked for. Runs in process context (listen(), close()),
//! so the current task is the owner, unlike at drop time.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::{Array, LruHashMap},
    programs::TracePointContext,
};
use backlog_common::EventKind;

use crate::fields::{self, TCP_CLOSE, TCP_LISTEN};
use crate::maps;

/// Listeners closed since the tracer started, in all: a CPU's cached listener key
/// (drops/window.rs) is valid only while this has not moved. Shared by every CPU,
/// added to atomically.
#[map(name = "LISTENERS_GEN")]
static LISTENERS_GEN: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn generation() -> u64 {
    LISTENERS_GEN.get(0).copied().unwrap_or(0)
}

/// listen() backlog argument by thread, from sys_enter_listen until the socket
/// reaches LISTEN inside the same syscall.
#[map(name = "LISTEN_ARGS")]
static LISTEN_ARGS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1024, 0);

/// syscalls:sys_enter_listen (tracepoint mode): the backlog argument.
#[inline(always)]
pub fn on_sys_enter_listen(ctx: &TracePointContext) {
    let off = fields::config().listen_backlog_off as usize;
    // SAFETY: offset of a u64 field inside the tracepoint record (from its format file).
    if let Ok(backlog) = unsafe { ctx.read_at::<u64>(off) } {
        remember_backlog(backlog as u32);
    }
}

/// The backlog this thread is asking of listen(), before somaxconn caps it: from
/// the syscall's tracepoint, or (fentry and kprobe modes, which then need no syscall
/// tracepoint at all) from the kernel function that still has it.
#[inline(always)]
pub fn remember_backlog(backlog: u32) {
    let _ = LISTEN_ARGS.insert(&bpf_get_current_pid_tgid(), &backlog, 0);
}

/// inet_sock_set_state for a socket entering or leaving LISTEN. A function of its
/// own for the same reason as `accept::enqueued`.
#[inline(never)]
pub fn on_state(sk: u64, old: u8, new: u8) {
    let kind = if new == TCP_LISTEN {
        EventKind::Listen
    } else if old == TCP_LISTEN && new == TCP_CLOSE {
        EventKind::Unlisten
    } else {
        return;
    };
    if kind == EventKind::Unlisten {
        // Before the sock can be freed and reused: see `generation`.
        if let Some(g) = LISTENERS_GEN.get_ptr_mut(0) {
            maps::atomic_add(g, 1);
        }
    }
    let o = fields::offsets();
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut requested = 0;
    if kind == EventKind::Listen {
        // SAFETY: plain value lookup.
        if let Some(b) = unsafe { LISTEN_ARGS.get(&pid_tgid) } {
            requested = *b;
        }
        let _ = LISTEN_ARGS.remove(&pid_tgid);
    }
    maps::emit_listener_event(kind, &fields::listener_key(sk, o), o, |ev| {
        ev.pid = (pid_tgid >> 32) as u32;
        ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        ev.requested_backlog = requested;
    });
}
