//! Program entry points only: each hook is a few lines that hand over to the module
//! that owns the logic (drops::*, listeners).
#![no_std]
#![no_main]

mod accept;
mod drops;
mod kernel;
mod listeners;
mod maps;

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_skb, tracepoint},
    programs::{BtfTracePointContext, SkBuffContext, TracePointContext},
};

use crate::kernel::{TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV};

// ---- tracepoint mode: drop detection (see drops/tracepoint.rs) ----

#[cgroup_skb]
pub fn bt_tp_ingress(ctx: SkBuffContext) -> i32 {
    drops::tracepoint::on_ingress(&ctx);
    1 // never drop: we only watch
}

#[btf_tracepoint(function = "net_dev_queue")]
pub fn bt_tp_xmit(ctx: BtfTracePointContext) -> i32 {
    drops::tracepoint::on_xmit(ctx.arg::<u64>(0));
    0
}

#[btf_tracepoint(function = "consume_skb")]
pub fn bt_tp_consume(ctx: BtfTracePointContext) -> i32 {
    drops::tracepoint::on_free(ctx.arg::<u64>(0), None);
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn bt_tp_kfree(ctx: BtfTracePointContext) -> i32 {
    drops::tracepoint::on_free(ctx.arg::<u64>(0), Some(ctx.arg::<u64>(2) as u32));
    0
}

// ---- every mode: socket state changes ----

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bt_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<u64>(0);
    let old = ctx.arg::<u64>(1) as u8;
    let new = ctx.arg::<u64>(2) as u8;
    if new == TCP_LISTEN || old == TCP_LISTEN && new == TCP_CLOSE {
        listeners::on_state(sk, old, new);
        return 0;
    }
    if old == TCP_LISTEN || old == TCP_SYN_RECV && new == TCP_CLOSE {
        // A child born from (or dying in) a final ACK: the drop windows care.
        drops::tracepoint::on_child_state(old, new);
    }
    if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        if let Some(listener) = drops::tracepoint::ack_listener() {
            accept::enqueued(sk, listener);
        }
    } else if new == TCP_CLOSE {
        accept::closed(sk);
    }
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

#[tracepoint(category = "syscalls", name = "sys_enter_listen")]
pub fn bt_listen(ctx: TracePointContext) -> u32 {
    listeners::on_sys_enter_listen(&ctx);
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
