//! Where a drop is *recorded*: every attach mode decides, in its own module, that a
//! tcp_listendrop() happened and why, then calls [`record`]. Classification from
//! queue state lives here too, so all modes name reasons the same way.
pub mod functions;
pub mod tracepoint;
pub mod window;

use backlog_common::{DropReason, EventKind, KernelOffsets};

use crate::kernel::{self, QueueState};
use crate::maps;

/// Why a SYN was dropped, from the listener's queues at that moment. Mirrors the
/// order of tests in tcp_conn_request(): the SYN-queue test (only fatal without
/// syncookies) comes before the accept-queue test.
#[inline(always)]
pub fn classify_syn(q: &QueueState, syncookies: u8) -> DropReason {
    if syncookies == 0 && q.syn_qlen >= q.max_ack_backlog {
        DropReason::SynQueueFull
    } else if q.ack_backlog > q.max_ack_backlog {
        DropReason::AcceptQueueFull
    } else {
        DropReason::Other
    }
}

/// Why a final ACK (or SYN-cookie ACK) was dropped: tcp_v4_syn_recv_sock() tests the
/// accept queue first; any later failure is not an overflow.
#[inline(always)]
pub fn classify_ack(q: &QueueState) -> DropReason {
    if q.ack_backlog > q.max_ack_backlog {
        DropReason::AckOverflow
    } else {
        DropReason::Other
    }
}

/// The peer of a dropped connection, as seen in the packet.
#[derive(Clone, Copy)]
pub struct Peer {
    pub addr: [u8; 16],
    pub port: u16,
}

/// Counts the drop in the listener's per-CPU stats and emits an event.
#[inline(always)]
pub fn record(sk: u64, reason: DropReason, q: &QueueState, peer: &Peer, o: &KernelOffsets) {
    let key = kernel::listener_key(sk, o);
    if let Some(s) = maps::stats(&key) {
        // SAFETY: this CPU's copy of the value; tracing programs do not nest on one CPU
        // for the same hook.
        unsafe { (*s).drops[reason as usize] += 1 };
        maps::note_queue(s, q);
    }
    maps::emit_listener_event(EventKind::Drop, &key, o, |ev| {
        ev.reason = reason as u8;
        ev.rport = peer.port;
        ev.raddr = peer.addr;
        // The queues the kernel decided on, not the ones after it.
        ev.queue_len = q.ack_backlog;
        ev.queue_max = q.max_ack_backlog;
        ev.syn_queue_len = q.syn_qlen;
    });
}
