//! Drops per (listener, peer address), counted in the kernel for every drop, so that
//! the peers a flood hits are known exactly even when `--max-drop-lines` holds their
//! lines back. Bounded: once the map is full, a new peer's drops count at their
//! listener as ever and in `global::PEERS_FULL`, under no peer.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use backlog_common::{global, PeerKey, PEERS_MAX_ENTRIES};

use crate::maps;

/// (listener, peer) -> drops, per CPU. Not LRU, for the reason WAIT_HIST is not;
/// allocated on use where the kernel allows it; user space deletes a released
/// listener's entries.
#[map(name = "PEERS")]
static PEERS: PerCpuHashMap<PeerKey, u64> = PerCpuHashMap::with_max_entries(PEERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// New peers this CPU counts under no peer without trying to insert them, after an
/// insert found PEERS full. A spoofed-source flood brings a new peer with every SYN
/// once the table is full, and each failed insert took a bucket lock and two more
/// hash walks: 0.78 of bare drops/s against 0.80-0.84 from one source (bench). The
/// table only gains room when user space deletes a closed listener's entries, so
/// trying again every so many new peers loses nothing that matters; their drops are
/// counted (`global::PEERS_FULL`) either way.
const FULL_BACKOFF: u64 = 256;

#[map(name = "PEERS_BACKOFF")]
static BACKOFF: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `n` more drops under `key`, which the caller keeps off the stack (see `record`).
#[inline(always)]
pub fn count(key: &PeerKey, n: u64) {
    if let Some(c) = PEERS.get_ptr_mut(key) {
        maps::atomic_add(c, n);
        return;
    }
    let Some(backoff) = BACKOFF.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's copy. Not atomic: a program preempting this one can at
    // worst make one insert attempt more or fewer.
    unsafe {
        if *backoff > 0 {
            *backoff -= 1;
            maps::add(global::PEERS_FULL, n);
            return;
        }
    }
    // Counted here, not by `maps::create`: these are `n` drops under no peer.
    match maps::try_create(&PEERS, key, &0) {
        Some(c) => maps::atomic_add(c, n),
        None => {
            maps::add(global::PEERS_FULL, n);
            // SAFETY: as above.
            unsafe { *backoff = FULL_BACKOFF }
        }
    }
}
