//! Maps shared by every attach mode, and the two ways data leaves the kernel:
//! per-listener counters (exact, never lost) and ring-buffer events (best effort,
//! every loss counted).
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use backlog_common::{
    global, Event, EventKind, KernelOffsets, ListenerKey, ListenerStats, EVENTS_RING_BYTES, STATS_MAX_ENTRIES,
};

use crate::fields;

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Keyed by the listener's identity (`ListenerKey`). Not LRU: an eviction would throw
/// a live listener's counts away. Declared allocated-on-use, but the loader
/// preallocates it within a memory budget (backlog-user/src/kernel/object.rs: inserts
/// into a map allocated on use failed under bursts of new listeners); user space
/// deletes a closed listener's entry once it has read the final values.
#[map(name = "STATS")]
pub static STATS: PerCpuHashMap<ListenerKey, ListenerStats> =
    PerCpuHashMap::with_max_entries(STATS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// A zeroed STATS value to insert from (never written: a program preempted between
/// filling a shared scratch slot and its insert could find another's listener in it).
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<ListenerStats> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "GLOBAL")]
pub static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(global::N, 0);

#[inline(always)]
pub fn count(index: u32) {
    add(index, 1);
}

#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(p) = GLOBAL.get_ptr_mut(index) {
        atomic_add(p, n);
    }
}

/// Adds to this CPU's copy of a counter with one atomic instruction (BPF_XADD, which
/// every supported kernel has: the result is unused). Programs run with migration
/// disabled, not preemption: a program in process context (accept, listen) can be
/// interrupted by a softirq's, and on PREEMPT_RT by another task's, between a plain
/// load and its store — and the increment made in between would be lost (seen under
/// load on 6.1: 21 waits counted for 20 accepts).
#[inline(always)]
pub fn atomic_add(p: *mut u64, n: u64) {
    // SAFETY: `p` points at a live, aligned u64 in a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}

/// This CPU's value under `key` after inserting `init` there, or the value another
/// program put there first: BPF_NOEXIST, because a program that preempted this one
/// may have created the entry since the caller's lookup, and replacing it would lose
/// its counts. None, counted at GLOBAL[`full`], only when the map has no room.
#[inline(always)]
pub fn create<K, V>(map: &PerCpuHashMap<K, V>, key: &K, init: &V, full: u32) -> Option<*mut V> {
    let p = try_create(map, key, init);
    if p.is_none() {
        count(full);
    }
    p
}

/// `create` for a caller that counts a full map itself.
#[inline(always)]
pub fn try_create<K, V>(map: &PerCpuHashMap<K, V>, key: &K, init: &V) -> Option<*mut V> {
    let _ = map.insert(key, init, BPF_NOEXIST as u64);
    map.get_ptr_mut(key)
}

/// This CPU's counters for a listener, created on first use with the listener's
/// identity filled in. Callers that already hold the listener's key pass it: it
/// costs four dependent reads (sock -> socket -> file -> inode).
#[inline(always)]
pub fn stats(key: &ListenerKey) -> Option<*mut ListenerStats> {
    let o = fields::offsets();
    let sk = key.sk;
    if let Some(p) = STATS.get_ptr_mut(key) {
        return Some(p);
    }
    let zero = SCRATCH.get_ptr(0)?;
    // SAFETY: the zeroed slot is only read.
    let p = create(&STATS, key, unsafe { &*zero }, global::STATS_FULL)?;
    // The identity is written in place: every writer of one key writes the same values.
    let (family, laddr, lport) = fields::local_addr(sk, &o);
    // SAFETY: this CPU's copy of the value.
    unsafe {
        (*p).sock_ino = key.ino;
        (*p).netns = fields::netns_inum(fields::sk_net(sk, &o), &o);
        (*p).family = family;
        (*p).lport = lport;
        (*p).laddr = laddr;
    }
    Some(p)
}

/// This CPU's counters for a listener that has them already (no identity to read).
#[inline(always)]
pub fn stats_entry(key: &ListenerKey) -> Option<*mut ListenerStats> {
    STATS.get_ptr_mut(key)
}

/// Folds an observation of the listener's accept queue into this CPU's stats.
#[inline(always)]
pub fn note_queue(s: *mut ListenerStats, ack_backlog: u32, max_ack_backlog: u32) {
    // SAFETY: `s` is this CPU's copy of a map value.
    unsafe {
        if ack_backlog > (*s).queue_peak {
            (*s).queue_peak = ack_backlog;
        }
        (*s).queue_max = max_ack_backlog;
    }
}

/// Whether a drop line may be sent for this listener in second `sec`: at most
/// `limit` (`Config::max_drop_lines`) per second on this CPU (0: no limit). Per CPU,
/// so that the budget needs no shared cache line under a flood, at the price of a
/// bound of N lines per CPU rather than N in all. Not atomic: a program preempting
/// another on this CPU can let one line more or fewer through, never miscount a drop
/// (each drop is either a line or `suppressed`).
#[inline(always)]
pub fn take_line(s: *mut ListenerStats, sec: u64, limit: u64) -> bool {
    if limit == 0 {
        return true;
    }
    // SAFETY: `s` is this CPU's copy of a map value.
    unsafe {
        if (*s).lines_sec != sec {
            (*s).lines_sec = sec;
            (*s).lines_in_sec = 0;
        }
        if (*s).lines_in_sec >= limit {
            return false;
        }
        (*s).lines_in_sec += 1;
    }
    true
}

/// Sends an event about listener `sk`: its identity (address, port, namespace,
/// socket inode) and current queues are filled in, then `fill` adds what is
/// particular to the kind. The event is built in place in the ring buffer (an Event
/// on the 512-byte BPF stack crowds out everything else). A full ring buffer is
/// counted, never silent.
#[inline(always)]
pub fn emit_listener_event(kind: EventKind, key: &ListenerKey, o: &KernelOffsets, fill: impl FnOnce(&mut Event)) {
    let sk = key.sk;
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        count(global::LOST_EVENTS);
        return;
    };
    // SAFETY: the reservation is sizeof(Event) bytes, exclusively ours until submit;
    // every field is written below before it is read.
    let ev = unsafe { &mut *slot.as_mut_ptr() };
    let (family, laddr, lport) = fields::local_addr(sk, o);
    let q = fields::queue_state(sk, o);
    // SAFETY: an Event is plain integers and arrays, 8-byte aligned (its u64 fields).
    unsafe { zero(ev) };
    ev.ts_ns = now_ns();
    ev.sk = sk;
    ev.sock_ino = key.ino;
    ev.netns = fields::netns_inum(fields::sk_net(sk, o), o);
    ev.kind = kind as u8;
    ev.family = family;
    ev.lport = lport;
    ev.laddr = laddr;
    ev.queue_len = q.ack_backlog;
    ev.queue_max = q.max_ack_backlog;
    ev.syn_queue_len = q.syn_qlen;
    fill(ev);
    slot.submit(0);
}

/// Zeroes `*v` in place with 8-byte stores. Volatile, so that LLVM does not turn
/// them into a call to `memset`, which on this target is a subprogram zeroing byte by
/// byte: a frame of its own (5.10's verifier rounds it up to 32 bytes, which took the
/// drop path's call chain past the 512-byte stack there) and ~4 instructions a byte.
/// An array repeat expression (`[0; 16]`) becomes such a call too.
///
/// # Safety
/// `v` points at a `T` (initialised or not) that may be all zero bytes, 8-byte
/// aligned and a whole number of words long (checked at compile time).
#[inline(always)]
pub unsafe fn zero<T>(v: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() >= 8) };
    let p = v as *mut u64;
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within `*v` (the caller's promise).
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}
