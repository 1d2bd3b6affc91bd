//! The per-CPU *window*: what one CPU knows about the listener segment it is
//! handling right now. Every attach mode opens it where it first sees the listener
//! and the segment, marks it admitted when the kernel accepts the segment, and
//! closes it where the outcome is known. Softirq handling of one segment does not
//! migrate or nest on a CPU, so one slot per CPU suffices.
use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::kernel::{self, QueueState};
use crate::maps;

pub const KIND_SYN: u8 = 1;
pub const KIND_ACK: u8 = 2;
/// A window older than this belongs to a segment whose end we never saw. Generous:
/// windows normally close within microseconds, but a preempted vCPU (a busy cloud
/// host, qemu TCG) can stretch one segment's handling to milliseconds, and expiring
/// a live window loses its drop.
const STALE_NS: u64 = 1_000_000_000;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Window {
    pub sk: u64,
    pub opened_ns: u64,
    pub drops_before: u32,
    pub ack_backlog: u32,
    pub syn_qlen: u32,
    /// The segment's TCP ports, raw (network order), as the peer sent them.
    pub sport_be: u16,
    pub dport_be: u16,
    pub open: u8,
    pub kind: u8,
    pub admitted: u8,
    /// The outcome was recorded (IPv4-mapped segments pass through both the v6 and
    /// the v4 functions; only the first decision counts).
    pub decided: u8,
    pub peer: [u8; 16],
}

#[map(name = "WINDOW")]
static WINDOW: PerCpuArray<Window> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn slot() -> Option<&'static mut Window> {
    // SAFETY: per-CPU slot; the programs touching it run in the same softirq on this CPU.
    WINDOW.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Opens this CPU's window on `sk` for a segment from `peer` with the given ports.
#[inline(always)]
pub fn open(sk: u64, kind: u8, peer: [u8; 16], sport_be: u16, dport_be: u16) {
    // Only what can change before the kernel decides is read now; the limit and the
    // syncookies sysctl are read if there is a drop to classify.
    let o = kernel::offsets();
    let Some(w) = slot() else { return };
    w.sk = sk;
    w.opened_ns = maps::now_ns();
    w.drops_before = kernel::sk_drops(sk, o);
    w.ack_backlog = kernel::read::<u32>(sk, o.sk_ack_backlog);
    w.syn_qlen = kernel::read::<u32>(sk, o.icsk_accept_queue_qlen);
    w.sport_be = sport_be;
    w.dport_be = dport_be;
    w.kind = kind;
    w.admitted = 0;
    w.decided = 0;
    w.peer = peer;
    w.open = 1;
}

/// This CPU's open, fresh window, closing it if it went stale.
#[inline(always)]
pub fn current() -> Option<&'static mut Window> {
    let w = slot()?;
    if w.open == 0 {
        return None;
    }
    if maps::now_ns().wrapping_sub(w.opened_ns) > STALE_NS {
        w.open = 0;
        return None;
    }
    Some(w)
}

/// Whether `child` belongs to the listener of window `w` (same local port).
#[inline(always)]
fn owns(w: &Window, child: u64) -> bool {
    let o = kernel::offsets();
    kernel::read::<u16>(child, o.skc_num) == kernel::read::<u16>(w.sk, o.skc_num)
}

/// inet_sock_set_state LISTEN -> SYN_RECV: a child was born from the final ACK this
/// CPU is handling, which admits it (tracepoint mode's signal; harmless in the
/// others). Returns the listener, which is about to queue the child.
#[inline(always)]
pub fn child_born(child: u64) -> Option<u64> {
    let w = current()?;
    if w.kind != KIND_ACK {
        return None;
    }
    w.admitted = 1;
    owns(w, child).then_some(w.sk)
}

/// inet_sock_set_state SYN_RECV -> CLOSE: tcp_v4_syn_recv_sock() failed after
/// cloning; the child is destroyed and the kernel counts a listen drop.
#[inline(always)]
pub fn child_died() {
    if let Some(w) = current() {
        if w.kind == KIND_ACK {
            w.admitted = 0;
        }
    }
}

/// A child turned ESTABLISHED: its final ACK's story is over, so the window closes
/// (an admitted ACK is freed by __kfree_skb, which no tracepoint reports).
#[inline(always)]
pub fn finish_ack(child: u64) {
    if let Some(w) = current() {
        if w.kind == KIND_ACK && owns(w, child) {
            w.open = 0;
        }
    }
}

/// Whether the listener's drop counter moved since the window opened.
#[inline(always)]
pub fn drops_moved(w: &Window) -> bool {
    kernel::sk_drops(w.sk, &kernel::offsets()) != w.drops_before
}

/// The listener's queues for classifying a drop: the kernel tested them between
/// our two looks, so take the fuller of the two.
#[inline(always)]
pub fn queues_at_drop(w: &Window) -> QueueState {
    let now = kernel::queue_state(w.sk, &kernel::offsets());
    QueueState {
        ack_backlog: max(w.ack_backlog, now.ack_backlog),
        max_ack_backlog: now.max_ack_backlog,
        syn_qlen: max(w.syn_qlen, now.syn_qlen),
    }
}

/// Records the drop this window saw (once).
#[inline(always)]
pub fn record_drop(w: &mut Window) {
    if w.decided != 0 {
        return;
    }
    w.decided = 1;
    let q = queues_at_drop(w);
    let o = kernel::offsets();
    let reason = if w.kind == KIND_SYN {
        super::classify_syn(&q, kernel::syncookies(kernel::sk_net(w.sk, o), o))
    } else {
        super::classify_ack(&q)
    };
    let peer = super::Peer { addr: w.peer, port: u16::from_be(w.sport_be) };
    super::record(w.sk, reason, &q, &peer, o);
}

#[inline(always)]
fn max(a: u32, b: u32) -> u32 {
    if a > b {
        a
    } else {
        b
    }
}
