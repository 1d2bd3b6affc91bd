//! Drop detection without kprobes or fentry: a cgroup_skb program and tracepoints.
//!
//! tcp_listendrop() is inline and no tracepoint marks it. What we can see, all on the
//! CPU that handles the segment, in this order:
//!
//! 1. `cgroup_skb/ingress` runs inside tcp_filter() for every segment delivered to a
//!    listener, with the listener in hand, before any listen drop it can cause: it
//!    opens the per-CPU window.
//! 2. The segment is freed (`consume_skb` / `kfree_skb`, recognised by its address), or
//!    for an admitted final ACK its child turns ESTABLISHED: the window closes, and
//!    the CPU's own listen counters say whether the segment was dropped (window.rs).
//!
//! A close we never see costs nothing but time: the next segment on the CPU settles
//! the window, as does user space's flush.
use aya_ebpf::{helpers::bpf_skc_to_tcp_sock, programs::SkBuffContext};
use backlog_common::{WindowKind, AF_INET6};

use super::window;
use crate::fields::{self, Btf, TCP_LISTEN, TH_ACK, TH_RST, TH_SYN};
use crate::maps;

const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPPROTO_TCP: u8 = 6;

/// Fills `seg`'s peer and ports from the segment's headers and returns its TCP
/// flags (None: not TCP). This runs for every segment to a listener: the headers are
/// read in place (direct packet access, no helper) when they have their usual sizes
/// and lie in the linear part, else through one helper call per header. A function
/// of its own, so that its frame is not on the stack beside the window's (512 bytes
/// for the whole call chain); it fills the caller's `seg` because a BPF function
/// cannot return an aggregate.
#[inline(never)]
fn parse(ctx: &SkBuffContext, seg: &mut window::Segment) -> Option<u8> {
    let proto = ctx.skb.protocol();
    // SAFETY: context fields the verifier turns into packet pointers.
    let (data, end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
    if proto == ETH_P_IP_BE && data + 20 + 14 <= end {
        // SAFETY: 34 bytes from `data` are inside the packet (checked just above).
        let (ip, th) = unsafe { (&*(data as *const [u8; 20]), &*((data + 20) as *const [u8; 14])) };
        if ip[0] == 0x45 {
            if ip[9] != IPPROTO_TCP {
                return None;
            }
            seg.peer[..4].copy_from_slice(&ip[12..16]);
            return Some(ports(seg, th));
        }
    } else if proto == ETH_P_IPV6_BE && data + 40 + 14 <= end {
        // SAFETY: 54 bytes from `data` are inside the packet (checked just above).
        let (ip, th) = unsafe { (&*(data as *const [u8; 40]), &*((data + 40) as *const [u8; 14])) };
        if ip[6] != IPPROTO_TCP {
            return None;
        }
        seg.peer.copy_from_slice(&ip[8..24]);
        return Some(ports(seg, th));
    }
    parse_loaded(ctx, proto, seg)
}

/// `parse` for headers with options or outside the linear part.
#[inline(always)]
fn parse_loaded(ctx: &SkBuffContext, proto: u32, seg: &mut window::Segment) -> Option<u8> {
    let th = if proto == ETH_P_IP_BE {
        let ip: [u8; 20] = ctx.load(0).ok()?;
        if ip[9] != IPPROTO_TCP {
            return None;
        }
        seg.peer[..4].copy_from_slice(&ip[12..16]);
        ((ip[0] & 0x0f) as usize) * 4
    } else if proto == ETH_P_IPV6_BE {
        let ip: [u8; 24] = ctx.load(0).ok()?;
        if ip[6] != IPPROTO_TCP {
            return None;
        }
        seg.peer.copy_from_slice(&ip[8..24]);
        40
    } else {
        return None;
    };
    let th: [u8; 14] = ctx.load(th).ok()?;
    Some(ports(seg, &th))
}

/// The TCP header's source port into `seg`; returns its flags.
#[inline(always)]
fn ports(seg: &mut window::Segment, th: &[u8; 14]) -> u8 {
    seg.sport_be = u16::from_ne_bytes([th[0], th[1]]);
    th[13]
}

/// cgroup_skb/ingress: a segment is about to be handled by a listener.
#[inline(always)]
pub fn on_ingress(ctx: &SkBuffContext) {
    // SAFETY: reading the context's socket pointer; checked for null below.
    let bsk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if bsk.is_null() {
        return;
    }
    // SAFETY: non-null bpf_sock; state and family are context fields the
    // verifier rewrites into direct loads (no helper calls).
    let (state, family) = unsafe { ((*bsk).state, (*bsk).family) };
    if state != TCP_LISTEN as u32 {
        return;
    }
    // SAFETY: the helper accepts any socket pointer and returns null for non-TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(bsk as *mut _) };
    if tp.is_null() {
        return;
    }
    // SAFETY: as above; the bound port, host order.
    let lport = unsafe { (*bsk).src_port } as u16;
    let mut seg = core::mem::MaybeUninit::<window::Segment>::uninit();
    // SAFETY: a Segment is plain integers and arrays, 8-byte aligned, 32 bytes; the
    // peer must start zeroed (an IPv4 address fills only its first four bytes).
    let seg = unsafe {
        maps::zero(seg.as_mut_ptr());
        seg.assume_init_mut()
    };
    seg.lport = lport;
    // The context is the skb itself: the freed skb is recognised by its address.
    seg.skb = ctx.skb.skb as u64;
    let Some(flags) = parse(ctx, seg) else { return };
    let kind = match flags & (TH_SYN | TH_ACK | TH_RST) {
        TH_SYN => WindowKind::Syn,
        TH_ACK => WindowKind::Ack,
        _ => return,
    };
    if family == AF_INET6 as u32 && ctx.skb.protocol() == ETH_P_IP_BE {
        seg.peer = fields::v4_mapped(&seg.peer);
    }
    // `tp` is a BTF-typed tcp_sock: the window reads the listener with plain loads.
    window::open::<Btf>(tp as u64, kind, seg);
}

/// consume_skb / kfree_skb: when the freed skb is the window's segment, its
/// handling is over. Compared by address, not by its headers: no reads at all for
/// the many skbs freed while a window is open (a flood keeps one open on every CPU).
#[inline(always)]
pub fn on_free(skb: u64) {
    let Some(w) = window::current() else { return };
    if skb == w.skb {
        window::close(w);
    }
}
