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
use backlog_common::{global, AF_INET6};

use super::window::{self, KIND_ACK, KIND_SYN};
use crate::kernel::{self, TCP_LISTEN, TH_ACK, TH_RST, TH_SYN};
use crate::maps;

const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPPROTO_TCP: u8 = 6;

/// The segment's peer address and TCP header offset, from the IP header at offset 0.
#[inline(always)]
fn parse_ip(ctx: &SkBuffContext) -> Option<([u8; 16], usize)> {
    let proto = ctx.skb.protocol();
    let mut peer = [0u8; 16];
    if proto == ETH_P_IP_BE {
        let vihl: u8 = ctx.load(0).ok()?;
        let l4: u8 = ctx.load(9).ok()?;
        if l4 != IPPROTO_TCP {
            return None;
        }
        let saddr: [u8; 4] = ctx.load(12).ok()?;
        peer[..4].copy_from_slice(&saddr);
        Some((peer, ((vihl & 0x0f) as usize) * 4))
    } else if proto == ETH_P_IPV6_BE {
        let next: u8 = ctx.load(6).ok()?;
        if next != IPPROTO_TCP {
            return None;
        }
        peer = ctx.load(8).ok()?;
        Some((peer, 40))
    } else {
        None
    }
}

/// cgroup_skb/ingress: a segment is about to be handled by a listener.
#[inline(always)]
pub fn on_ingress(ctx: &SkBuffContext) {
    // SAFETY: reading the context's socket pointer; checked for null below.
    let bsk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if bsk.is_null() {
        return;
    }
    // SAFETY: non-null bpf_sock; `state` is a readable context field.
    if unsafe { (*bsk).state } != TCP_LISTEN as u32 {
        return;
    }
    // SAFETY: the helper accepts any socket pointer and returns null for non-TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(bsk as *mut _) };
    if tp.is_null() {
        return;
    }
    let sk = tp as u64;
    let o = kernel::offsets();
    let lport = kernel::read::<u16>(sk, o.skc_num);
    if !maps::port_watched(lport) {
        return;
    }
    let Some((mut peer, th)) = parse_ip(ctx) else { return };
    let Ok(ports) = ctx.load::<[u8; 4]>(th) else { return };
    let Ok(flags) = ctx.load::<u8>(th + 13) else { return };
    let kind = match flags & (TH_SYN | TH_ACK | TH_RST) {
        TH_SYN => KIND_SYN,
        TH_ACK => KIND_ACK,
        _ => return,
    };
    let family = kernel::read::<u16>(sk, o.skc_family);
    if family == AF_INET6 && ctx.skb.protocol() == ETH_P_IP_BE {
        peer = kernel::v4_mapped(&peer);
    }
    window::open(
        sk,
        kind,
        peer,
        u16::from_ne_bytes([ports[0], ports[1]]),
        u16::from_ne_bytes([ports[2], ports[3]]),
    );
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
        let Some(r) = drop_reason else {
            maps::count(global::UNMATCHED_END);
            return;
        };
        if r != o.reason_listen_overflow && r != o.reason_no_socket && r != o.reason_not_specified {
            return;
        }
    }
    window::record_drop(w);
}
