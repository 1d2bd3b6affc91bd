//! Accept-queue wait: when each child joined its listener's accept queue and when
//! accept() took it. The attach modes differ only in how they spot the two moments;
//! the bookkeeping (a bounded map of queued children, per-listener counters and
//! histograms) is here.
pub mod tracepoint;

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use backlog_common::{global, hist, Event, EventKind, WaitHist};

use crate::kernel;
use crate::maps;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Enqueued {
    pub ts_ns: u64,
    pub listener: u64,
}

/// Queued children by socket address. LRU, so a flood of never-accepted children
/// can only evict the oldest, never fail or grow without bound.
#[map(name = "ENQUEUED")]
static ENQUEUED: LruHashMap<u64, Enqueued> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "WAIT_HIST")]
static WAIT_HIST: LruPerCpuHashMap<u64, WaitHist> = LruPerCpuHashMap::with_max_entries(4096, 0);

/// A zeroed histogram to insert from: too large for the 512-byte BPF stack.
#[map(name = "ZERO_HIST")]
static ZERO_HIST: PerCpuArray<WaitHist> = PerCpuArray::with_max_entries(1, 0);

/// A child is on `listener`'s accept queue now.
#[inline(always)]
pub fn enqueued(child: u64, listener: u64) {
    let o = kernel::offsets();
    let lport = kernel::read::<u16>(listener, o.skc_num).unwrap_or(0);
    if !maps::port_watched(lport) {
        return;
    }
    let _ = ENQUEUED.insert(&child, &Enqueued { ts_ns: maps::now_ns(), listener }, 0);
    let q = kernel::queue_state(listener, &o);
    if let Some(s) = maps::stats(listener) {
        // SAFETY: this CPU's copy.
        unsafe {
            if q.ack_backlog > (*s).queue_peak {
                (*s).queue_peak = q.ack_backlog;
            }
            (*s).queue_max = q.max_ack_backlog;
        }
    }
}

#[inline(always)]
fn hist_of(listener: u64) -> Option<*mut WaitHist> {
    if let Some(h) = WAIT_HIST.get_ptr_mut(&listener) {
        return Some(h);
    }
    let zero = ZERO_HIST.get_ptr(0)?;
    // SAFETY: a map value pointer, valid for the program's run.
    let _ = WAIT_HIST.insert(&listener, unsafe { &*zero }, 0);
    WAIT_HIST.get_ptr_mut(&listener)
}

#[inline(always)]
fn listener_event(kind: EventKind, listener: u64, value: u64) {
    let o = kernel::offsets();
    let (family, laddr, lport) = kernel::local_addr(listener, &o);
    let q = kernel::queue_state(listener, &o);
    let mut ev = Event::zeroed();
    ev.ts_ns = maps::now_ns();
    ev.sk = listener;
    ev.sock_ino = kernel::socket_inode(listener, &o);
    ev.netns = kernel::netns_inum(kernel::sk_net(listener, &o), &o);
    ev.kind = kind as u8;
    ev.family = family;
    ev.lport = lport;
    ev.laddr = laddr;
    ev.queue_len = q.ack_backlog;
    ev.queue_max = q.max_ack_backlog;
    ev.syn_queue_len = q.syn_qlen;
    ev.value = value;
    maps::emit(&ev);
}

/// accept() returned `child`.
#[inline(always)]
pub fn accepted(child: u64) {
    // SAFETY: plain value copy out of the map.
    let Some(e) = (unsafe { ENQUEUED.get(&child) }).copied() else {
        if child != 0 {
            maps::count(global::UNMATCHED_ACCEPT);
        }
        return;
    };
    let _ = ENQUEUED.remove(&child);
    let wait = maps::now_ns().saturating_sub(e.ts_ns);
    if let Some(s) = maps::stats(e.listener) {
        // SAFETY: this CPU's copy.
        unsafe {
            (*s).accepts += 1;
            (*s).wait_sum_ns += wait;
            if wait > (*s).wait_max_ns {
                (*s).wait_max_ns = wait;
            }
        }
    }
    if let Some(h) = hist_of(e.listener) {
        // The volatile read hides the index's provenance from the optimiser, so the
        // bounds check below survives into the object where the verifier needs it.
        let b = hist::bucket(wait / 1000);
        // SAFETY: reading a local.
        let b = unsafe { core::ptr::read_volatile(&b) };
        if b < hist::BUCKETS {
            // SAFETY: this CPU's copy, index checked.
            unsafe { (*h).counts[b] += 1 };
        }
    }
    if kernel::config().emit_accepts != 0 {
        listener_event(EventKind::Accept, e.listener, wait);
    }
}

/// `child` is closing. If it is still on a queue it was never accepted (listener
/// closed, peer reset); if it has a `struct socket` it was accepted by a path we do
/// not see (io_uring, in-kernel accept).
#[inline(always)]
pub fn closed(child: u64) {
    // SAFETY: plain value copy out of the map.
    let Some(e) = (unsafe { ENQUEUED.get(&child) }).copied() else { return };
    let _ = ENQUEUED.remove(&child);
    let o = kernel::offsets();
    if kernel::has_socket(child, &o) {
        maps::count(global::UNMATCHED_ACCEPT);
        return;
    }
    if let Some(s) = maps::stats(e.listener) {
        // SAFETY: this CPU's copy.
        unsafe { (*s).abandoned += 1 };
    }
    listener_event(EventKind::Abandon, e.listener, maps::now_ns().saturating_sub(e.ts_ns));
}
