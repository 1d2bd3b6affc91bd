//! Drop detection where the kernel lets us hook its functions (fentry/fexit or
//! kprobe/kretprobe): the call sites of tcp_listendrop() lie inside
//! tcp_v{4,6}_conn_request (SYN) and tcp_v{4,6}_syn_recv_sock (final ACK and
//! SYN-cookie ACK). A window spans each call; the CPU's own listen counters decide
//! at its return (window.rs). The fentry and kprobe entry points in main.rs are thin
//! shims onto these functions.
use backlog_common::{WindowKind, AF_INET6};

use super::window;
use crate::fields::{self, Probe};

/// Opens the window from a listener and the skb it is handling.
#[inline(always)]
fn open(sk: u64, skb: u64, kind: WindowKind) {
    let o = fields::offsets();
    let (mut peer, v4) = fields::skb_peer(skb, &o);
    let Some(sport_be) = fields::skb_source_port::<Probe>(skb, &o) else { return };
    if v4 && fields::read::<u16>(sk, o.skc_family) == AF_INET6 {
        peer = fields::v4_mapped(&peer);
    }
    // The same functions are kprobed, whose arguments are plain numbers: every read
    // takes the helper (fentry could load them directly; not yet measured there).
    let lport = fields::read::<u16>(sk, o.skc_num);
    window::open::<Probe>(sk, kind, &window::Segment { peer, skb, lport, sport_be });
}

/// Entry of a hooked function that handles a `kind` segment for listener `sk`.
/// The v6 functions hand IPv4 segments to the v4 ones on the same listener: the
/// inner call keeps the outer call's window.
#[inline(always)]
fn enter(sk: u64, skb: u64, kind: WindowKind) {
    if let Some(w) = window::current() {
        if w.sk == sk && w.is(kind) {
            return;
        }
    }
    open(sk, skb, kind);
}

/// Return of a hooked function: the segment's handling by the listener is over.
#[inline(always)]
fn leave(kind: WindowKind) {
    if let Some(w) = window::current() {
        if w.is(kind) {
            window::close(w);
        }
    }
}

/// Entry of tcp_v{4,6}_conn_request(sk, skb).
#[inline(always)]
pub fn conn_request_entry(sk: u64, skb: u64) {
    enter(sk, skb, WindowKind::Syn);
}

/// Return of tcp_v{4,6}_conn_request.
#[inline(always)]
pub fn conn_request_exit() {
    leave(WindowKind::Syn);
}

/// Entry of tcp_v{4,6}_syn_recv_sock(sk, skb, ...).
#[inline(always)]
pub fn syn_recv_entry(sk: u64, skb: u64) {
    enter(sk, skb, WindowKind::Ack);
}

/// Return of tcp_v{4,6}_syn_recv_sock. The child it made, if any, was born inside
/// the window (inet_sock_set_state LISTEN -> SYN_RECV), which is all accept timing
/// needs of it.
#[inline(always)]
pub fn syn_recv_exit() {
    leave(WindowKind::Ack);
}
