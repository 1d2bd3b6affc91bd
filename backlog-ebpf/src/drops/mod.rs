//! Where a drop is *recorded*: every attach mode opens and closes a per-CPU window
//! around a listener's segment in its own module; the window (window.rs) decides from
//! the CPU's own TcpExt counters that a tcp_listendrop() happened and why, then calls
//! [`record`].
pub mod fentry_kprobe;
mod peers;
pub mod tracepoint;
pub mod window;

use backlog_common::{global, DropReason, EventKind, KernelOffsets, PeerKey};

use crate::fields::QueueState;
use crate::maps;

/// Counts the drop in the listener's per-CPU stats and under its peer, and emits an
/// event, unless the listener is over its line budget on this CPU this second: then
/// the line is counted as suppressed instead. The counts stay exact either way;
/// what the budget saves under a flood is the ring-buffer event and its decoding in
/// user space.
///
/// `peer` is the listener with the peer's address, as the PEERS map keys it, and
/// `port` the peer's port; the caller keeps `peer` in its window, not on the stack
/// (5.10's verifier allows 512 bytes for the whole call chain).
#[inline(always)]
pub fn record(peer: &PeerKey, port: u16, reason: DropReason, q: &QueueState, o: &KernelOffsets) {
    let key = &peer.listener;
    if let Some(s) = maps::stats(key) {
        // SAFETY: this CPU's copy of the value.
        maps::atomic_add(unsafe { &raw mut (*s).drops[reason as usize] }, 1);
        maps::note_queue(s, q);
        peers::count(peer);
        if !maps::take_line(s) {
            // SAFETY: as above.
            maps::atomic_add(unsafe { &raw mut (*s).suppressed }, 1);
            maps::count(global::SUPPRESSED_LINES);
            return;
        }
    }
    maps::emit_listener_event(EventKind::Drop, key, o, |ev| {
        ev.reason = reason as u8;
        ev.rport = port;
        ev.raddr = peer.addr;
        // The queues the kernel decided on, not the ones after it.
        ev.queue_len = q.ack_backlog;
        ev.queue_max = q.max_ack_backlog;
        ev.syn_queue_len = q.syn_qlen;
    });
}
