//! Accept-queue wait: when each child joined its listener's accept queue and when
//! accept() took it. The attach modes differ only in how they spot the two moments;
//! the bookkeeping (a bounded map of queued children, per-listener counters and
//! histograms) is here.
pub mod acceptors;
pub mod tracepoint;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{LruHashMap, PerCpuHashMap},
};
use backlog_common::{global, hist, Enqueued, EventKind, HistKey, ListenerKey, HIST_MAX_ENTRIES};

use crate::fields;
use crate::maps;

/// The kernel's ENOENT, as a map operation returns it (negated).
const ENOENT: i32 = 2;

/// Queued children by socket address. LRU, so a flood of never-accepted children
/// can only evict the oldest, never fail or grow without bound.
#[map(name = "ENQUEUED")]
static ENQUEUED: LruHashMap<u64, Enqueued> = LruHashMap::with_max_entries(65536, 0);

/// (listener, wait bucket) -> accepts, per CPU. Not LRU: an LRU evicted live
/// listeners' buckets (per-CPU free lists evict before the map is full). Allocated
/// on use (a preallocated map's size was paid at start-up: 65536 entries took 56 ms
/// here); user space deletes a released listener's buckets.
#[map(name = "WAIT_HIST")]
static WAIT_HIST: PerCpuHashMap<HistKey, u64> = PerCpuHashMap::with_max_entries(HIST_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// A child is on `listener`'s accept queue now. Not inlined (nor `closed`,
/// `accepted`): bt_set_state also closes windows, whose settlement is a function
/// call of its own, and the two stack frames together must stay within 512 bytes.
#[inline(never)]
pub fn enqueued(child: u64, listener: &ListenerKey, queues: &fields::QueueState) {
    if fields::config().time_accepts != 0 {
        let _ = ENQUEUED.insert(&child, &Enqueued { ts_ns: maps::now_ns(), listener: *listener }, 0);
    }
    if let Some(s) = maps::stats(listener) {
        maps::note_queue(s, queues);
    }
}

/// Counts one wait in the listener's histogram.
#[inline(always)]
fn count_wait(listener: ListenerKey, wait_ns: u64) {
    let key = HistKey { listener, bucket: hist::bucket(wait_ns / 1000) as u32, _pad: 0 };
    if let Some(c) = WAIT_HIST.get_ptr_mut(&key).or_else(|| maps::create(&WAIT_HIST, &key, &0, global::HIST_FULL)) {
        maps::atomic_add(c, 1);
    }
}

#[inline(always)]
fn listener_event(kind: EventKind, listener: &ListenerKey, value: u64) {
    maps::emit_listener_event(kind, listener, fields::offsets(), |ev| ev.value = value);
}

/// accept() returned `child`.
#[inline(never)]
pub fn accepted(child: u64) {
    // SAFETY: plain value copy out of the map.
    let Some(e) = (unsafe { ENQUEUED.get(&child) }).copied() else {
        if child != 0 {
            maps::count(global::UNMATCHED_ACCEPT);
        }
        return;
    };
    // Whoever removes the entry owns the child's outcome (accepted or abandoned), so
    // a close racing this accept on the same CPU cannot count it twice. Only ENOENT
    // says another took it: a delete can also fail with EBUSY (the bucket's lock
    // held by a program this one interrupted), and the accept happened all the same.
    if ENQUEUED.remove(&child) == Err(-ENOENT) {
        return;
    }
    let wait = maps::now_ns().saturating_sub(e.ts_ns);
    if let Some(s) = maps::stats(&e.listener) {
        // SAFETY: this CPU's copy.
        unsafe {
            maps::atomic_add(&raw mut (*s).accepts, 1);
            if wait > (*s).wait_max_ns {
                (*s).wait_max_ns = wait;
            }
        }
    }
    count_wait(e.listener, wait);
    acceptors::count(&e.listener);
    if fields::config().emit_accepts != 0 {
        listener_event(EventKind::Accept, &e.listener, wait);
    }
}

/// `child` died before it reached the accept queue: not a wait, not abandoned.
#[inline(always)]
pub fn forget(child: u64) {
    if fields::config().time_accepts == 0 {
        return;
    }
    let _ = ENQUEUED.remove(&child);
}

/// `child` is closing or being closed. If it is still timed and has no `struct
/// socket`, it left the queue unaccepted (listener closed, peer reset); if it has one
/// it was accepted by a path we do not see (io_uring, in-kernel accept).
#[inline(never)]
pub fn closed(child: u64) {
    if fields::config().time_accepts == 0 {
        return;
    }
    // SAFETY: plain value copy out of the map.
    let Some(e) = (unsafe { ENQUEUED.get(&child) }).copied() else { return };
    if ENQUEUED.remove(&child) == Err(-ENOENT) {
        return;
    }
    let o = fields::offsets();
    if fields::has_socket(child, &o) {
        maps::count(global::UNMATCHED_ACCEPT);
        return;
    }
    if let Some(s) = maps::stats(&e.listener) {
        // SAFETY: this CPU's copy.
        maps::atomic_add(unsafe { &raw mut (*s).abandoned }, 1);
    }
    listener_event(EventKind::Abandon, &e.listener, maps::now_ns().saturating_sub(e.ts_ns));
}
