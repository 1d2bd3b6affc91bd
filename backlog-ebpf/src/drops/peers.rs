//! Drops per (listener, peer address), counted in the kernel for every drop, so that
//! the peers a flood hits are known exactly even when `--max-drop-lines` holds their
//! lines back. Bounded: once the map is full, a new peer's drops count at their
//! listener as ever and in `global::PEERS_FULL`, under no peer.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap},
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

/// A byte per hash of (listener, peer), set once the pair has an entry in PEERS and
/// never cleared (64 KiB however many peers come and go). A pair whose byte is 0 has
/// no entry, so it is not looked for: under a flood from spoofed sources nearly
/// every drop brings a new peer, and the look in a full PEERS (a 32-byte hash and a
/// bucket in another cache line) was most of what such a drop cost: consume_skb took
/// 468 ns a call against 260 from one source, 378 with this (bench). A byte set by
/// another pair, or by a pair whose listener was released since, costs only the
/// look it cost before.
///
/// Set after the entry is made, so a byte is never set for a pair the table had no
/// room for. A drop on another CPU in the few instructions between the two, on a CPU
/// that found PEERS full since its last try (`BACKOFF`), is counted under no peer
/// while its pair has an entry: it still counts at its listener and in
/// `global::PEERS_FULL`.
#[map(name = "PEERS_SEEN")]
static SEEN: Array<[u8; 64]> = Array::with_max_entries(1024, 0);

#[inline(always)]
fn seen_byte(key: &PeerKey) -> Option<*mut u8> {
    let w = super::words(key);
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let h = (((w[0] ^ w[1]).wrapping_mul(K) ^ w[2]).wrapping_mul(K) ^ w[3]).wrapping_mul(K) >> 48;
    let entry = SEEN.get_ptr_mut((h >> 6) as u32)?;
    Some((entry as *mut u8).wrapping_add((h & 63) as usize))
}

/// `n` more drops under `key`, which the caller keeps off the stack (see `record`).
#[inline(always)]
pub fn count(key: &PeerKey, n: u64) {
    let Some(seen) = seen_byte(key) else { return };
    // SAFETY: a byte inside a live map value.
    if unsafe { read_volatile(seen) } != 0 {
        if let Some(c) = PEERS.get_ptr_mut(key) {
            maps::atomic_add(c, n);
            return;
        }
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
        Some(c) => {
            maps::atomic_add(c, n);
            // SAFETY: as above. Written once: every drop storing it would move the
            // line between CPUs.
            unsafe {
                if read_volatile(seen) == 0 {
                    write_volatile(seen, 1);
                }
            }
        }
        None => {
            maps::add(global::PEERS_FULL, n);
            // SAFETY: as above.
            unsafe { *backoff = FULL_BACKOFF }
        }
    }
}
