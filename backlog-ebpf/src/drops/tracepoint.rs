//! Drop detection without kprobes or fentry: tracepoints and a cgroup_skb program.
//!
//! tcp_listendrop() is inline and no tracepoint marks it, and a SYN dropped at SYN
//! time is freed with consume_skb() like an admitted one. What we can see, all on the
//! CPU that handles the packet, in this order:
//!
//! 1. `cgroup_skb/ingress` runs inside tcp_filter() for every segment delivered to a
//!    listener, with the listener in hand: it opens the per-CPU window.
//! 2. While the kernel handles the segment, the outcome leaves traces on this CPU:
//!    an admitted SYN transmits a SYN-ACK (`net_dev_queue`); an admitted final ACK
//!    creates a child socket (`inet_sock_set_state` LISTEN -> SYN_RECV).
//! 3. The segment is freed (`consume_skb` / `kfree_skb`, matched by its ports): the
//!    window closes. It was a listen drop when the listener's sk_drops moved and the
//!    segment was not admitted.
//!
//! Gating on sk_drops keeps packets that were simply discarded (a SYN-ACK the
//! firewall ate, a stale ACK) from counting; gating on the per-CPU admission signal
//! keeps a drop made by another CPU at the same listener, in the same instant, from
//! being counted twice. The final-ACK path also adds one to sk_drops when it discards
//! the segment, which is why sk_drops is a gate here and never a count.
use aya_ebpf::{helpers::bpf_skc_to_tcp_sock, programs::SkBuffContext};
use backlog_common::AF_INET6;

use super::window::{self, KIND_ACK, KIND_SYN};
use crate::kernel::{self, TCP_LISTEN, TH_ACK, TH_RST, TH_SYN};
use crate::maps;

const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPPROTO_TCP: u8 = 6;

/// The segment's peer address and TCP ports and flags, read with one load per
/// header (each load is a helper call; this runs for every segment to a listener).
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<([u8; 16], [u8; 14])> {
    let proto = ctx.skb.protocol();
    let mut peer = [0u8; 16];
    let th = if proto == ETH_P_IP_BE {
        let ip: [u8; 20] = ctx.load(0).ok()?;
        if ip[9] != IPPROTO_TCP {
            return None;
        }
        peer[..4].copy_from_slice(&ip[12..16]);
        ((ip[0] & 0x0f) as usize) * 4
    } else if proto == ETH_P_IPV6_BE {
        let ip: [u8; 24] = ctx.load(0).ok()?;
        if ip[6] != IPPROTO_TCP {
            return None;
        }
        peer.copy_from_slice(&ip[8..24]);
        40
    } else {
        return None;
    };
    Some((peer, ctx.load(th).ok()?))
}

/// cgroup_skb/ingress: a segment is about to be handled by a listener.
#[inline(always)]
pub fn on_ingress(ctx: &SkBuffContext) {
    // SAFETY: reading the context's socket pointer; checked for null below.
    let bsk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if bsk.is_null() {
        return;
    }
    // SAFETY: non-null bpf_sock; state, family and src_port are context fields the
    // verifier rewrites into direct loads (no helper calls).
    let (state, family, lport) = unsafe { ((*bsk).state, (*bsk).family, (*bsk).src_port) };
    if state != TCP_LISTEN as u32 || !maps::port_watched(|| lport as u16) {
        return;
    }
    // SAFETY: the helper accepts any socket pointer and returns null for non-TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(bsk as *mut _) };
    if tp.is_null() {
        return;
    }
    let Some((mut peer, th)) = parse(ctx) else { return };
    let kind = match th[13] & (TH_SYN | TH_ACK | TH_RST) {
        TH_SYN => KIND_SYN,
        TH_ACK => KIND_ACK,
        _ => return,
    };
    if family == AF_INET6 as u32 && ctx.skb.protocol() == ETH_P_IP_BE {
        peer = kernel::v4_mapped(&peer);
    }
    window::open(tp as u64, kind, peer, u16::from_ne_bytes([th[0], th[1]]), u16::from_ne_bytes([th[2], th[3]]));
}

/// net_dev_queue: a SYN-ACK for the window's segment means the SYN was admitted.
#[inline(always)]
pub fn on_xmit(skb: u64) {
    let Some(w) = window::current() else { return };
    if w.kind != KIND_SYN || w.admitted != 0 {
        return;
    }
    let Some(th) = kernel::skb_tcp_head(skb, &kernel::offsets()) else { return };
    if th.sport_be == w.dport_be && th.dport_be == w.sport_be && th.flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
        w.admitted = 1;
    }
}

/// consume_skb / kfree_skb: the window's segment is freed; decide.
/// `drop_reason` is None for consume_skb.
#[inline(always)]
pub fn on_free(skb: u64, drop_reason: Option<u32>) {
    let Some(w) = window::current() else { return };
    let o = kernel::offsets();
    let Some(th) = kernel::skb_tcp_head(skb, &o) else { return };
    if th.sport_be != w.sport_be || th.dport_be != w.dport_be {
        return;
    }
    w.open = 0;
    if w.admitted != 0 || !window::drops_moved(w) {
        return;
    }
    if w.kind == KIND_ACK {
        // A final ACK that tcp_check_req() rejected for other causes (bad sequence,
        // stale timestamps) moves sk_drops too, but is freed with a specific reason.
        let Some(r) = drop_reason else { return };
        if r != o.reason_listen_overflow && r != o.reason_no_socket && r != o.reason_not_specified {
            return;
        }
    }
    window::record_drop(w);
}
