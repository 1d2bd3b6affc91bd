//! Accept-queue wait: when each child joined its listener's accept queue and when
//! accept() took it. The attach modes differ only in how they spot the two moments;
//! the bookkeeping (a bounded map of queued children, per-listener counters and
//! histograms) is here.
pub mod acceptors;
mod batch;
pub mod tracepoint;

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, PerCpuHashMap},
};
use backlog_common::{
    global, hist, Enqueued, EnqueuedSet, EventKind, HistKey, ListenerKey, ENQUEUED_SETS, ENQUEUED_SETS_LOG2,
    ENQUEUED_WAYS, HIST_MAX_ENTRIES,
};

use crate::fields;
use crate::maps;

/// Queued children, found by their address: a table, not a hash map. The address
/// picks one entry by arithmetic and the child sits in one of its ENQUEUED_WAYS
/// slots, so finding it is an inlined array access and a few compares, where the LRU
/// hash map this replaces took a bucket lock and an LRU list lock to insert and
/// again to delete (~0.4 µs of a connection's ~3 µs saved; BENCH.md). A child whose entry
/// is full evicts the oldest slot (`enqueued_evicted`): a flood of never-accepted
/// children cannot grow it, and the evicted child's accept is counted as unmatched.
/// Memory-mappable, so user space counts the queued children in place.
#[map(name = "ENQUEUED")]
static ENQUEUED: Array<EnqueuedSet> = Array::with_max_entries(ENQUEUED_SETS, BPF_F_MMAPABLE);

/// `child`'s entry. Sockets are slab objects a few KiB apart, so the low bits of
/// their addresses are all alike: the multiply by 2^64/φ spreads the high ones.
#[inline(always)]
fn entry_of(child: u64) -> Option<*mut EnqueuedSet> {
    ENQUEUED.get_ptr_mut((child.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - ENQUEUED_SETS_LOG2)) as u32)
}

/// Times `child` from now: its own slot (the address may be a freed sock's whose
/// end was never seen), else an empty one, else the oldest. Runs before the child
/// is queued: the queue's lock orders these stores before any accept() of it.
#[inline(always)]
fn remember(child: u64, listener: &ListenerKey) {
    let Some(e) = entry_of(child) else { return };
    // SAFETY: a live map value, shared by every CPU; constant indices.
    unsafe {
        let slots = &raw mut (*e).slots;
        let mut pick = &raw mut (*slots)[0];
        let mut oldest = u64::MAX;
        let mut evicts = true;
        for w in 0..ENQUEUED_WAYS {
            let s = &raw mut (*slots)[w];
            let c = read_volatile(&raw const (*s).child);
            if c == child || c == 0 {
                pick = s;
                evicts = false;
                break;
            }
            let ts = read_volatile(&raw const (*s).ts_ns);
            if ts < oldest {
                oldest = ts;
                pick = s;
            }
        }
        if evicts {
            maps::count(global::ENQUEUED_EVICTED);
        }
        // The address first: a reader that finds it unchanged after copying the
        // slot copied one child's values (see `take`).
        write_volatile(&raw mut (*pick).child, child);
        write_volatile(&raw mut (*pick).ts_ns, maps::now_ns());
        write_volatile(&raw mut (*pick).listener, *listener);
    }
}

/// Takes `child` out of the table: when it was timed, and for which listener.
/// Whoever takes it owns its outcome (accepted, abandoned, unmatched). Two CPUs can
/// take one child together only when its accept() races its reset or its listener's
/// close to the same few instructions; BPF has no compare-and-swap on 5.10 to rule
/// that out. A slot reused for another child meanwhile is seen by reading the
/// address again after the copy (stores and loads keep their order on x86).
#[inline(always)]
fn take(child: u64) -> Option<Enqueued> {
    let e = entry_of(child)?;
    // SAFETY: as in `remember`.
    unsafe {
        let slots = &raw mut (*e).slots;
        for w in 0..ENQUEUED_WAYS {
            let s = &raw mut (*slots)[w];
            if read_volatile(&raw const (*s).child) != child {
                continue;
            }
            let copy = Enqueued {
                child,
                ts_ns: read_volatile(&raw const (*s).ts_ns),
                listener: read_volatile(&raw const (*s).listener),
            };
            if read_volatile(&raw const (*s).child) != child {
                return None;
            }
            write_volatile(&raw mut (*s).child, 0);
            return Some(copy);
        }
    }
    None
}

/// (listener, wait bucket) -> accepts, per CPU. Not LRU: an LRU evicted live
/// listeners' buckets (per-CPU free lists evict before the map is full). Allocated
/// on use (a preallocated map's size was paid at start-up: 65536 entries took 56 ms
/// here); user space deletes a released listener's buckets.
#[map(name = "WAIT_HIST")]
static WAIT_HIST: PerCpuHashMap<HistKey, u64> = PerCpuHashMap::with_max_entries(HIST_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Local ports on which a child was queued since the tracer started, a byte each, 64
/// to an entry (a cache line). Both sockets of every TCP connection on the host leave
/// ESTABLISHED or CLOSE_WAIT, but only a listener's child can be in ENQUEUED: a
/// socket on a port no child was ever queued on (a client's ephemeral port) is passed
/// over with one load here instead of a look in ENQUEUED (two cache lines) and the
/// read that turns its address into a number. Marked before the child is
/// remembered; never cleared, so 64 KiB however many listeners come and go, and a
/// port whose listener closed costs its sockets only the look it cost before.
#[map(name = "QUEUED_PORTS")]
static QUEUED_PORTS: Array<[u8; 64]> = Array::with_max_entries(1024, 0);

#[inline(always)]
fn port_mark(port: u16) -> Option<*mut u8> {
    let entry = QUEUED_PORTS.get_ptr_mut(u32::from(port >> 6))?;
    Some((entry as *mut u8).wrapping_add(usize::from(port & 63)))
}

/// Whether a socket on local port `port` leaving ESTABLISHED or CLOSE_WAIT may be a
/// child still in ENQUEUED (then `closed` must look).
#[inline(always)]
pub fn may_be_queued(port: u16) -> bool {
    if fields::config().time_accepts == 0 {
        return false;
    }
    // SAFETY: a byte inside a live map value.
    port_mark(port).is_some_and(|m| unsafe { read_volatile(m) } != 0)
}

/// A child on local port `port` is on `listener`'s accept queue now; `queues` is what its listener's
/// counters have not seen yet, if anything (see `window::child_born`). Not inlined
/// (nor `closed`, `accepted`): bt_set_state also closes windows, whose settlement is
/// a function call of its own, and the two stack frames together must stay within
/// 512 bytes.
#[inline(never)]
pub fn enqueued(child: u64, port: u16, listener: &ListenerKey, queues: Option<&fields::QueueState>) {
    if fields::config().time_accepts != 0 {
        if let Some(m) = port_mark(port) {
            // SAFETY: a byte inside a live map value. Written once: every birth
            // storing it would move the line between CPUs.
            unsafe {
                if read_volatile(m) == 0 {
                    write_volatile(m, 1);
                }
            }
        }
        remember(child, listener);
    }
    if let Some(q) = queues {
        if let Some(s) = maps::stats(listener) {
            maps::note_queue(s, q.ack_backlog, q.max_ack_backlog);
        }
    }
}

/// The listener's histogram bucket, made if missing (None, counted as `hist_full`,
/// when the map has no room).
#[inline(always)]
fn hist_entry(listener: ListenerKey, bucket: u32) -> Option<*mut u64> {
    let key = HistKey { listener, bucket, _pad: 0 };
    WAIT_HIST.get_ptr_mut(&key).or_else(|| maps::create(&WAIT_HIST, &key, &0, global::HIST_FULL))
}

/// Counts `n` accepts in the listener's stats, the longest of which waited `wait_max_ns`.
#[inline(always)]
fn count_accepts(listener: &ListenerKey, n: u64, wait_max_ns: u64) {
    if let Some(s) = maps::stats(listener) {
        // SAFETY: this CPU's copy.
        unsafe {
            maps::atomic_add(&raw mut (*s).accepts, n);
            if wait_max_ns > (*s).wait_max_ns {
                (*s).wait_max_ns = wait_max_ns;
            }
        }
    }
}

/// Counts `n` waits in the listener's histogram bucket.
#[inline(always)]
fn count_wait(listener: ListenerKey, bucket: u32, n: u64) {
    if let Some(c) = hist_entry(listener, bucket) {
        maps::atomic_add(c, n);
    }
}

#[inline(always)]
fn listener_event(kind: EventKind, listener: &ListenerKey, value: u64) {
    maps::emit_listener_event(kind, listener, fields::offsets(), |ev| ev.value = value);
}

/// accept() returned `child`.
#[inline(never)]
pub fn accepted(child: u64) {
    let Some(e) = take(child) else {
        if child != 0 {
            maps::count(global::UNMATCHED_ACCEPT);
        }
        return;
    };
    let wait = maps::now_ns().saturating_sub(e.ts_ns);
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let bucket = hist::bucket(wait / 1000) as u32;
    if !batch::add(&e.listener, tgid, wait, bucket) {
        count_accepts(&e.listener, 1, wait);
        count_wait(e.listener, bucket, 1);
        acceptors::count(&e.listener, tgid, 1, None);
    }
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
    let _ = take(child);
}

/// `child` is closing or being closed. If it is still timed and has no `struct
/// socket`, it left the queue unaccepted (listener closed, peer reset); if it has one
/// it was accepted by a path we do not see (io_uring, in-kernel accept).
#[inline(never)]
pub fn closed(child: u64) {
    if fields::config().time_accepts == 0 {
        return;
    }
    let Some(e) = take(child) else { return };
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

/// User space's flush, on each CPU in turn: see `batch`. False when an accept
/// program was busy there and nothing was done.
#[inline(always)]
pub fn flush() -> bool {
    batch::flush()
}
