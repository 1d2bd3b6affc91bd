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

/// Drops held back from the maps: consecutive drops on this CPU of one listener, for
/// one reason, in one second in which the listener has no line budget left on this
/// CPU. Under a flood nearly every drop is one of these, and adding to the window (a
/// cache line this CPU already holds) instead of looking up STATS and PEERS and
/// adding to each with a locked instruction is most of what a drop costs after the
/// hooks themselves (BENCH.md). The run is added to the maps (`drain`) when a drop
/// does not extend it and when user space flushes the CPU before reading counts, so
/// what user space reads is exact.
///
/// A new peer does not end the run, only the peer's share of it (`peer_drops`): a
/// flood from spoofed sources brings a new peer with nearly every SYN, and ending
/// the run there cost each drop two more STATS lookups.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Run {
    pub peer: PeerKey,
    /// The budget's second (ktime / 1e9): the next second's first drops may be lines.
    sec: u64,
    /// The second of user space's last flush of this CPU (see `record`).
    pub flushed_sec: u64,
    pub drops: u64,
    /// How many of `drops` are `peer`'s and not yet under it in PEERS.
    peer_drops: u64,
    /// The longest accept queue and the limit the run's drops found.
    queue_peak: u32,
    queue_max: u32,
    reason: u8,
}

/// Counts the drop in the listener's per-CPU stats and under its peer, and emits an
/// event, unless the listener is over its line budget on this CPU this second: then
/// the drop joins `run` (or starts it), to be counted as suppressed when the run
/// drains. The counts stay exact either way; what the budget saves under a flood is
/// the ring-buffer event and its decoding in user space, and the run the map updates.
///
/// `peer` is the listener with the peer's address, as the PEERS map keys it, and
/// `port` the peer's port; the caller keeps `peer` and `run` in its window, not on
/// the stack (5.10's verifier allows 512 bytes for the whole call chain).
#[inline(always)]
pub fn record(run: &mut Run, peer: &PeerKey, port: u16, reason: DropReason, q: &QueueState, o: &KernelOffsets) {
    let limit = u64::from(crate::fields::config().max_drop_lines);
    let sec = if limit == 0 { 0 } else { maps::now_ns() / 1_000_000_000 };
    if run.drops != 0 {
        // A run grows only while user space flushes this CPU (every second): a CPU it
        // cannot flush (the tracer confined to it, or starved) holds back one drop at
        // most, as its window did before runs, instead of a run that may never drain.
        let flushed = sec <= run.flushed_sec + 2;
        if flushed && run.sec == sec && run.reason == reason as u8 && run.peer.listener == peer.listener {
            run.drops += 1;
            run.queue_peak = window::max(run.queue_peak, q.ack_backlog);
            run.queue_max = q.max_ack_backlog;
            if same_addr(&run.peer, peer) {
                run.peer_drops += 1;
            } else {
                drain_peer(run);
                start_peer(run, peer);
            }
            return;
        }
        drain(run);
    }
    let key = &peer.listener;
    if let Some(s) = maps::stats(key) {
        if !maps::take_line(s, sec, limit) {
            // Field by field: a `Run` built whole is a 64-byte stack temporary, which
            // takes 5.10's drop path past its 512-byte stack.
            start_peer(run, peer);
            run.sec = sec;
            run.drops = 1;
            run.queue_peak = q.ack_backlog;
            run.queue_max = q.max_ack_backlog;
            run.reason = reason as u8;
            return;
        }
        // SAFETY: this CPU's copy of the value.
        maps::atomic_add(unsafe { &raw mut (*s).drops[reason as usize] }, 1);
        maps::note_queue(s, q.ack_backlog, q.max_ack_backlog);
        peers::count(peer, 1);
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

/// Adds the run's drops to its listener's stats, as suppressed lines, and the rest
/// of them under its peer; the run is then empty.
#[inline(always)]
pub fn drain(run: &mut Run) {
    let n = run.drops;
    if n == 0 {
        return;
    }
    run.drops = 0;
    // The run's first drop made the entry; only a listener released since (user
    // space reads and deletes its counts after a flush, which drains first) has none.
    let Some(s) = maps::stats_entry(&run.peer.listener) else {
        maps::add(global::UNATTRIBUTED, n);
        run.peer_drops = 0;
        return;
    };
    // SAFETY: this CPU's copy of the value; `reason` came from a DropReason.
    unsafe {
        maps::atomic_add(&raw mut (*s).drops[run.reason as usize % backlog_common::N_REASONS], n);
        maps::atomic_add(&raw mut (*s).suppressed, n);
    }
    maps::note_queue(s, run.queue_peak, run.queue_max);
    maps::add(global::SUPPRESSED_LINES, n);
    drain_peer(run);
}

/// `peer` is the run's peer from this drop on. Its first drop goes under it now,
/// which makes the peer's entry if need be: a drain in user space's flush runs in an
/// interrupt, where a map allocated on use may have no element to give.
#[inline(always)]
fn start_peer(run: &mut Run, peer: &PeerKey) {
    peers::count(peer, 1);
    run.peer.listener = peer.listener;
    run.peer.addr = peer.addr;
    run.peer_drops = 0;
}

/// Adds the run's peer's held-back drops under it.
#[inline(always)]
fn drain_peer(run: &mut Run) {
    if run.peer_drops != 0 {
        peers::count(&run.peer, run.peer_drops);
        run.peer_drops = 0;
    }
}

/// PeerKey as words: an array compare would be a `bcmp` call, which BPF does not have.
#[inline(always)]
pub(super) fn words(k: &PeerKey) -> &[u64; 4] {
    // SAFETY: PeerKey is 32 bytes of plain integers, aligned to 8: listener, address.
    unsafe { &*(k as *const PeerKey as *const [u64; 4]) }
}

#[inline(always)]
fn same_addr(a: &PeerKey, b: &PeerKey) -> bool {
    let (a, b) = (words(a), words(b));
    a[2] == b[2] && a[3] == b[3]
}
