//! Program entry points only: each hook is a few lines that hand over to the module
//! that owns the logic (drops::*, accept::*, listeners).
//!
//! A program's name is its function's name, which the loader knows as a constant
//! of `backlog_common::programs`: renaming, adding or removing a program here means
//! changing that list too (backlog-user's tests compare it with the built object).
#![no_std]
#![no_main]
// atomic_xadd: the BPF target has no compare-and-swap, so core's AtomicU64 offers no
// fetch_add there, while the instruction itself (BPF_XADD) is what we want.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accept;
mod drops;
mod fields;
mod listeners;
mod maps;

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_skb, fentry, fexit, kprobe, kretprobe, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext,
        SkBuffContext, TracePointContext,
    },
    EbpfContext as _,
};

use crate::drops::{fentry_kprobe, tracepoint as tp, window};
use crate::fields::{
    TCP_CLOSE, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_LISTEN, TCP_SYN_RECV,
};

// ---- every mode: user space settles each CPU's open window (BPF_PROG_TEST_RUN) ----

/// Never attached: user space runs it on each CPU in turn before reading counts.
/// Returns 1 when a program on the CPU was updating what it flushes (its drop
/// window, its held-back accepts) and that part was left for another try.
#[raw_tracepoint]
pub fn bt_flush(_ctx: RawTracePointContext) -> i32 {
    // Both, whatever the first says: each leaves alone only what is busy.
    let drops = window::flush();
    let accepts = accept::flush();
    if drops && accepts {
        0
    } else {
        1
    }
}

// ---- every mode: socket state changes and listen() ----

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bt_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    let old = ctx.arg::<u64>(1) as u8;
    let new = ctx.arg::<u64>(2) as u8;
    if new == TCP_LISTEN || old == TCP_LISTEN && new == TCP_CLOSE {
        listeners::on_state(sk, old, new);
        return 0;
    }
    // The accept side finds a child by its address, as a number: `sk` is a pointer
    // the verifier typed from BTF, on which it allows no arithmetic.
    let child = || fields::number(sk);
    let port = || fields::load::<u16>(sk, fields::offsets().skc_num);
    match (old, new) {
        (TCP_LISTEN, TCP_SYN_RECV) => {
            // A child born from a final ACK joins its listener's accept queue next
            // (inet_csk_complete_hashdance). Timing it here, not when it turns
            // ESTABLISHED, keeps an accept() on another CPU from taking it first.
            if let Some((listener, queues)) = window::child_born(sk) {
                accept::enqueued(child(), port(), &listener, queues.as_ref());
            }
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => window::finish_ack(sk),
        // Died before it was queued (syn_recv_sock failed after cloning).
        (TCP_SYN_RECV, TCP_CLOSE) => accept::forget(child()),
        // A queued child is ESTABLISHED or CLOSE_WAIT; leaving those states for
        // CLOSE (reset, listener closed) or FIN_WAIT1 / LAST_ACK (an owner closed
        // it, so it was accepted) ends its time in the queue. Sockets leaving any
        // other state were never queued or were seen leaving already.
        (TCP_ESTABLISHED | TCP_CLOSE_WAIT, TCP_CLOSE | TCP_FIN_WAIT1 | TCP_LAST_ACK) => {
            // A socket turning CLOSE has given its port back already (inet_put_port
            // runs before the state is stored, and the tracepoint with it).
            if new == TCP_CLOSE || accept::may_be_queued(port()) {
                accept::closed(child());
            }
        }
        _ => {}
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_listen")]
pub fn bt_listen(ctx: TracePointContext) -> u32 {
    listeners::on_sys_enter_listen(&ctx);
    0
}

// ---- tracepoint mode (drops/tracepoint.rs, accept/tracepoint.rs) ----

#[cgroup_skb]
pub fn bt_tp_ingress(ctx: SkBuffContext) -> i32 {
    tp::on_ingress(&ctx);
    1 // never drop: we only watch
}

#[btf_tracepoint(function = "consume_skb")]
pub fn bt_tp_consume(ctx: BtfTracePointContext) -> i32 {
    tp::on_free(ctx.arg::<u64>(0));
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn bt_tp_kfree(ctx: BtfTracePointContext) -> i32 {
    tp::on_free(ctx.arg::<u64>(0));
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn bt_tp_accept4(ctx: TracePointContext) -> u32 {
    accept::tracepoint::on_sys_exit_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn bt_tp_accept(ctx: TracePointContext) -> u32 {
    accept::tracepoint::on_sys_exit_accept(&ctx);
    0
}

// ---- fentry mode (drops/fentry_kprobe.rs): one program per kernel function ----

macro_rules! fentry_pair {
    ($entry:ident, $exit:ident, $func:literal, $on_entry:path, $on_exit:path) => {
        #[fentry(function = $func)]
        pub fn $entry(ctx: FEntryContext) -> i32 {
            $on_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(1));
            0
        }

        /// The return value is not needed: the window decides from the counters.
        #[fexit(function = $func)]
        pub fn $exit(_ctx: FExitContext) -> i32 {
            $on_exit();
            0
        }
    };
}

fentry_pair!(
    bt_fe_conn4,
    bt_fx_conn4,
    "tcp_v4_conn_request",
    fentry_kprobe::conn_request_entry,
    fentry_kprobe::conn_request_exit
);
fentry_pair!(
    bt_fe_conn6,
    bt_fx_conn6,
    "tcp_v6_conn_request",
    fentry_kprobe::conn_request_entry,
    fentry_kprobe::conn_request_exit
);
fentry_pair!(
    bt_fe_recv4,
    bt_fx_recv4,
    "tcp_v4_syn_recv_sock",
    fentry_kprobe::syn_recv_entry,
    fentry_kprobe::syn_recv_exit
);
fentry_pair!(
    bt_fe_recv6,
    bt_fx_recv6,
    "tcp_v6_syn_recv_sock",
    fentry_kprobe::syn_recv_entry,
    fentry_kprobe::syn_recv_exit
);

/// listen()'s backlog before somaxconn caps it, from __sys_listen(fd, backlog) and
/// __sys_listen_socket(sock, backlog): no syscall tracepoint in this mode.
#[fentry(function = "__sys_listen")]
pub fn bt_fe_listen(ctx: FEntryContext) -> i32 {
    listeners::remember_backlog(ctx.arg::<u64>(1) as u32);
    0
}

#[fentry(function = "__sys_listen_socket")]
pub fn bt_fe_listen_socket(ctx: FEntryContext) -> i32 {
    listeners::remember_backlog(ctx.arg::<u64>(1) as u32);
    0
}

/// An fexit context holds the function's arguments, then its return value; the
/// loader counted the arguments from BTF. The verifier refuses a computed offset into
/// the context, so the slot is read through its address as plain memory (the
/// trampoline's stack), which works on kernels without bpf_get_func_ret (5.10).
#[fexit(function = "inet_csk_accept")]
pub fn bt_fx_accept(ctx: FExitContext) -> i32 {
    let slot = fields::config().accept_nargs * 8;
    accept::accepted(fields::read::<u64>(fields::address_of(ctx.as_ptr()), slot));
    0
}

// ---- kprobe mode: the same functions; one program attaches to v4 and v6 ----

#[kprobe]
pub fn bt_kp_conn(ctx: ProbeContext) -> u32 {
    fentry_kprobe::conn_request_entry(ctx.arg::<u64>(0).unwrap_or(0), ctx.arg::<u64>(1).unwrap_or(0));
    0
}

#[kretprobe]
pub fn bt_kr_conn(_ctx: RetProbeContext) -> u32 {
    fentry_kprobe::conn_request_exit();
    0
}

#[kprobe]
pub fn bt_kp_recv(ctx: ProbeContext) -> u32 {
    fentry_kprobe::syn_recv_entry(ctx.arg::<u64>(0).unwrap_or(0), ctx.arg::<u64>(1).unwrap_or(0));
    0
}

#[kretprobe]
pub fn bt_kr_recv(_ctx: RetProbeContext) -> u32 {
    fentry_kprobe::syn_recv_exit();
    0
}

#[kprobe]
pub fn bt_kp_listen(ctx: ProbeContext) -> u32 {
    listeners::remember_backlog(ctx.arg::<u64>(1).unwrap_or(0) as u32);
    0
}

#[kretprobe]
pub fn bt_kr_accept(ctx: RetProbeContext) -> u32 {
    accept::accepted(ctx.ret::<u64>());
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
