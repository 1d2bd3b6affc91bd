//! Drops per (listener, peer address), counted in the kernel for every drop, so that
//! the peers a flood hits are known exactly even when `--max-drop-lines` holds their
//! lines back. Bounded: once the map is full, a new peer's drops count at their
//! listener as ever and in `global::PEERS_FULL`, under no peer.
use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::PerCpuHashMap};
use backlog_common::{global, PeerKey, PEERS_MAX_ENTRIES};

use crate::maps;

/// (listener, peer) -> drops, per CPU. Not LRU, for the reason WAIT_HIST is not;
/// allocated on use where the kernel allows it; user space deletes a released
/// listener's entries.
#[map(name = "PEERS")]
static PEERS: PerCpuHashMap<PeerKey, u64> = PerCpuHashMap::with_max_entries(PEERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// One more drop under `key`, which the caller keeps off the stack (see `record`).
#[inline(always)]
pub fn count(key: &PeerKey) {
    if let Some(c) = PEERS.get_ptr_mut(key).or_else(|| maps::create(&PEERS, key, &0, global::PEERS_FULL)) {
        maps::atomic_add(c, 1);
    }
}
