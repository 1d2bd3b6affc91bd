//! Drop detection without kprobes or fentry: tracepoints and a cgroup_skb program.
//!
//! tcp_listendrop() is inline and no tracepoint marks it, and a SYN dropped at SYN
//! time is freed with consume_skb() like an admitted one. What we can see, all on the
//! CPU that handles the packet, in this order:
//!
//! 1. `cgroup_skb/ingress` runs inside tcp_filter() for every segment delivered to a
//!    listener, with the listener in hand. We open a per-CPU *window*: the listener,
//!    its sk_drops, its queues, the segment's ports and flags.
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
use aya_ebpf::{helpers::bpf_skc_to_tcp_sock, macros::map, maps::PerCpuArray, programs::SkBuffContext};
use backlog_common::{global, AF_INET6};

use super::{classify_ack, classify_syn, record, Peer};
use crate::kernel::{self, QueueState, TCP_CLOSE, TCP_LISTEN, TCP_SYN_RECV, TH_ACK, TH_RST, TH_SYN};
use crate::maps;

const KIND_SYN: u8 = 1;
const KIND_ACK: u8 = 2;
/// A window older than this belongs to a segment whose free we did not see (an
/// admitted final ACK is freed by __kfree_skb, which has no tracepoint).
const STALE_NS: u64 = 10_000_000;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Window {
    sk: u64,
    opened_ns: u64,
    drops_before: u32,
    ack_backlog: u32,
    max_ack_backlog: u32,
    syn_qlen: u32,
    sport_be: u16,
    dport_be: u16,
    open: u8,
    kind: u8,
    admitted: u8,
    syncookies: u8,
    peer: [u8; 16],
}

#[map(name = "WINDOW")]
static WINDOW: PerCpuArray<Window> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn window() -> Option<&'static mut Window> {
    // SAFETY: per-CPU slot; the programs touching it run in the same softirq on this CPU.
    WINDOW.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPPROTO_TCP: u8 = 6;

/// The segment's peer address, TCP header offset, from the IP header at offset 0.
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
    let lport = kernel::read::<u16>(sk, o.skc_num).unwrap_or(0);
    if !maps::port_watched(lport) {
        return;
    }
    let Some((mut peer, th)) = parse_ip(ctx) else {
        return;
    };
    let Ok(ports) = ctx.load::<[u8; 4]>(th) else {
        return;
    };
    let Ok(flags) = ctx.load::<u8>(th + 13) else {
        return;
    };
    let kind = if flags & (TH_SYN | TH_ACK | TH_RST) == TH_SYN {
        KIND_SYN
    } else if flags & (TH_SYN | TH_ACK | TH_RST) == TH_ACK {
        KIND_ACK
    } else {
        return;
    };
    // An IPv4 peer of an IPv6 listener is shown v4-mapped, like ss does.
    let family = kernel::read::<u16>(sk, o.skc_family).unwrap_or(0);
    if family == AF_INET6 && ctx.skb.protocol() == ETH_P_IP_BE {
        peer = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, peer[0], peer[1], peer[2], peer[3]];
    }
    let q = kernel::queue_state(sk, &o);
    let Some(w) = window() else { return };
    w.sk = sk;
    w.opened_ns = maps::now_ns();
    w.drops_before = kernel::sk_drops(sk, &o);
    w.ack_backlog = q.ack_backlog;
    w.max_ack_backlog = q.max_ack_backlog;
    w.syn_qlen = q.syn_qlen;
    w.sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    w.dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    w.kind = kind;
    w.admitted = 0;
    w.syncookies = kernel::syncookies(kernel::sk_net(sk, &o), &o);
    w.peer = peer;
    w.open = 1;
}

/// Returns the open, fresh window of this CPU, closing it if it went stale.
#[inline(always)]
fn open_window() -> Option<&'static mut Window> {
    let w = window()?;
    if w.open == 0 {
        return None;
    }
    if maps::now_ns().wrapping_sub(w.opened_ns) > STALE_NS {
        w.open = 0;
        return None;
    }
    Some(w)
}

/// net_dev_queue: a SYN-ACK for the window's segment means the SYN was admitted.
#[inline(always)]
pub fn on_xmit(skb: u64) {
    let Some(w) = open_window() else { return };
    if w.kind != KIND_SYN || w.admitted != 0 {
        return;
    }
    let o = kernel::offsets();
    let Some(th) = kernel::skb_tcp_head(skb, &o) else {
        return;
    };
    if th.sport_be == w.dport_be && th.dport_be == w.sport_be && th.flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
        w.admitted = 1;
    }
}

/// inet_sock_set_state: a child socket born (or dying at birth) while a final ACK is
/// handled.
#[inline(always)]
pub fn on_child_state(old: u8, new: u8) {
    let Some(w) = open_window() else { return };
    if w.kind != KIND_ACK {
        return;
    }
    if old == TCP_LISTEN && new == TCP_SYN_RECV {
        w.admitted = 1;
    } else if old == TCP_SYN_RECV && new == TCP_CLOSE {
        // tcp_v4_syn_recv_sock() failed after cloning: the child is destroyed and
        // the kernel counts a listen drop.
        w.admitted = 0;
    }
}

/// The listener whose final ACK this CPU is handling, if any: a child that turns
/// ESTABLISHED now has just been put on that listener's accept queue.
#[inline(always)]
pub fn ack_listener() -> Option<u64> {
    let w = open_window()?;
    (w.kind == KIND_ACK).then_some(w.sk)
}

/// consume_skb / kfree_skb: the window's segment is freed; decide.
/// `drop_reason` is None for consume_skb.
#[inline(always)]
pub fn on_free(skb: u64, drop_reason: Option<u32>) {
    let Some(w) = open_window() else { return };
    let o = kernel::offsets();
    let Some(th) = kernel::skb_tcp_head(skb, &o) else {
        return;
    };
    if th.sport_be != w.sport_be || th.dport_be != w.dport_be {
        return;
    }
    w.open = 0;
    if w.admitted != 0 || kernel::sk_drops(w.sk, &o) == w.drops_before {
        return;
    }
    let now = kernel::queue_state(w.sk, &o);
    // The kernel tested the queues between our two looks; take the fuller one.
    let q = QueueState {
        ack_backlog: max(w.ack_backlog, now.ack_backlog),
        max_ack_backlog: now.max_ack_backlog,
        syn_qlen: max(w.syn_qlen, now.syn_qlen),
    };
    let reason = if w.kind == KIND_SYN {
        classify_syn(&q, w.syncookies)
    } else {
        // A final ACK that tcp_check_req() rejected for other causes (bad sequence,
        // stale timestamps) moves sk_drops too, but is freed with a specific reason.
        let Some(r) = drop_reason else {
            maps::count(global::UNMATCHED_END);
            return;
        };
        if r != o.reason_listen_overflow && r != o.reason_no_socket && r != o.reason_not_specified {
            return;
        }
        classify_ack(&q)
    };
    let peer = Peer { addr: w.peer, port: u16::from_be(w.sport_be) };
    record(w.sk, reason, &q, &peer, &o);
}

#[inline(always)]
fn max(a: u32, b: u32) -> u32 {
    if a > b {
        a
    } else {
        b
    }
}
