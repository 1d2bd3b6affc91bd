//! Drop detection where the kernel lets us hook its functions (fentry/fexit or
//! kprobe/kretprobe): the call sites of tcp_listendrop() are function boundaries.
//!
//! - SYN: tcp_v4_conn_request / tcp_v6_conn_request. Inside, an admitted SYN builds
//!   a SYN-ACK (tcp_make_synack); a dropped one does not, and bumps sk_drops.
//! - final ACK (and SYN-cookie ACK): tcp_v4_syn_recv_sock / tcp_v6_syn_recv_sock
//!   return NULL exactly when they call tcp_listendrop().
//! Both signals are per CPU and per call, so concurrent drops on other CPUs cannot
//! be confused with ours. The fentry and kprobe entry points in main.rs are thin
//! shims onto these functions.
use backlog_common::AF_INET6;

use super::window::{self, Window, KIND_ACK, KIND_SYN};
use crate::kernel;

/// Opens the window from a listener and the skb it is handling.
#[inline(always)]
fn open(sk: u64, skb: u64, kind: u8) {
    if !crate::maps::listener_watched(sk) {
        return;
    }
    let o = kernel::offsets();
    let (mut peer, v4) = kernel::skb_peer(skb, &o);
    let Some(th) = kernel::skb_tcp_head(skb, &o) else { return };
    if v4 && kernel::read::<u16>(sk, o.skc_family) == AF_INET6 {
        peer = kernel::v4_mapped(&peer);
    }
    window::open(sk, kind, peer, th.sport_be, th.dport_be);
}

/// Entry of a hooked function that handles a `kind` segment for listener `sk`.
/// The v6 functions hand IPv4 segments to the v4 ones on the same listener: the
/// inner call keeps the outer call's window.
#[inline(always)]
fn enter(sk: u64, skb: u64, kind: u8) {
    if let Some(w) = window::current() {
        if w.sk == sk && w.kind == kind && w.decided == 0 {
            return;
        }
    }
    open(sk, skb, kind);
}

/// Return of a hooked function: records the drop once if `dropped` says so.
#[inline(always)]
fn leave(kind: u8, dropped: impl FnOnce(&Window) -> bool) {
    let Some(w) = window::current() else { return };
    if w.kind != kind {
        return;
    }
    if dropped(w) {
        window::record_drop(w);
    }
    w.decided = 1;
}

/// Entry of tcp_v{4,6}_conn_request(sk, skb).
#[inline(always)]
pub fn conn_request_entry(sk: u64, skb: u64) {
    enter(sk, skb, KIND_SYN);
}

/// Entry of tcp_make_synack: the SYN is admitted.
#[inline(always)]
pub fn send_synack() {
    if let Some(w) = window::current() {
        if w.kind == KIND_SYN {
            w.admitted = 1;
        }
    }
}

/// Return of tcp_v{4,6}_conn_request: dropped if no SYN-ACK was built and the
/// listener's drop counter moved.
#[inline(always)]
pub fn conn_request_exit() {
    leave(KIND_SYN, |w| w.admitted == 0 && window::drops_moved(w));
}

/// Entry of tcp_v{4,6}_syn_recv_sock(sk, skb, ...).
#[inline(always)]
pub fn syn_recv_entry(sk: u64, skb: u64) {
    enter(sk, skb, KIND_ACK);
}

/// Return of tcp_v{4,6}_syn_recv_sock: NULL is a listen drop. After a success the
/// window stays open until the child turns ESTABLISHED (window::finish_ack).
#[inline(always)]
pub fn syn_recv_exit(child: u64) {
    leave(KIND_ACK, |_| child == 0);
}
