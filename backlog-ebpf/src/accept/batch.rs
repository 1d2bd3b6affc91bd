//! Accepts held back from the maps, per CPU. A web server's accepts on one CPU are
//! nearly all one listener's, taken by one worker: instead of looking up three
//! per-listener hash maps for each (STATS, WAIT_HIST, ACCEPTORS: ~0.5 µs of a
//! connection, BENCH.md), an accept by the CPU's *owner* (listener, process) adds to
//! this CPU's counters in a per-CPU array. User space's flush, which runs on each CPU
//! before any count is read, adds them to the maps (`flush`) and makes the listener
//! and process that last went to the maps the next owner; accepts of anyone else go
//! to the maps directly, as before.
//!
//! Owners change only in the flush: it runs in an interrupt, so no accept program
//! on the CPU is half-way through while it does, unless `busy` says one is (then
//! nothing is flushed, and user space tries again). The accept side only adds, with
//! atomic instructions: a syscall exit's program can be preempted by another task's
//! on the same CPU, and both may add at once.
use aya_ebpf::{helpers::bpf_get_current_comm, macros::map, maps::PerCpuArray};
use backlog_common::{global, hist, ListenerKey, COMM_LEN};

use crate::maps;

#[repr(C)]
pub struct Pending {
    /// Accept programs updating this CPU's counters now (a count, not a flag: one
    /// can be preempted by another).
    busy: u64,
    /// The owner: its listener and process, and that process's command name.
    listener: ListenerKey,
    tgid: u64,
    comm: [u8; COMM_LEN],
    /// Accepts by the owner since the last flush, and their longest wait.
    accepts: u64,
    wait_max_ns: u64,
    /// Who last went to the maps: the next owner. Written by accepts without the
    /// owner's care (a torn write makes an owner nobody matches, which costs a second
    /// of unbatched accepts, nothing else).
    next_listener: ListenerKey,
    next_tgid: u64,
    next_comm: [u8; COMM_LEN],
}

#[map(name = "ACCEPT_PENDING")]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// The owner's accepts by wait bucket since the last flush.
#[map(name = "ACCEPT_PENDING_HIST")]
static PENDING_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(hist::BUCKETS as u32, 0);

/// Counts an accept from `listener` by process `tgid` that waited `wait_ns` in
/// `bucket`, if they are this CPU's owner; false when the caller must count it in the
/// maps itself (then they become the next owner).
#[inline(always)]
pub fn add(listener: &ListenerKey, tgid: u64, wait_ns: u64, bucket: u32) -> bool {
    let Some(p) = PENDING.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's copy; shared only with programs on this CPU (see the module).
    unsafe {
        maps::atomic_add(&raw mut (*p).busy, 1);
        let mine = (*p).listener.sk == listener.sk && (*p).listener.ino == listener.ino && (*p).tgid == tgid;
        if mine {
            if let Some(h) = PENDING_HIST.get_ptr_mut(bucket) {
                // The flush runs in an interrupt, where a map allocated on use may
                // have no element to give (the kernel refills its caches after the
                // interrupt): the bucket's map entry is made here, once a flush.
                if *h == 0 {
                    super::hist_entry(*listener, bucket);
                }
                maps::atomic_add(h, 1);
                maps::atomic_add(&raw mut (*p).accepts, 1);
                if wait_ns > (*p).wait_max_ns {
                    (*p).wait_max_ns = wait_ns;
                }
            }
        } else {
            (*p).next_listener = *listener;
            (*p).next_tgid = tgid;
            (*p).next_comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        }
        maps::atomic_add(&raw mut (*p).busy, u64::MAX);
        mine
    }
}

/// User space's flush on this CPU: the owner's accepts into the maps; then the next
/// owner takes over. False, doing nothing, when an accept program is updating the
/// counters. A function of its own: the flush program also settles the drop window,
/// and the two stack frames together would pass 512 bytes on 5.10 and 6.1.
#[inline(never)]
pub fn flush() -> bool {
    let Some(p) = PENDING.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's copy, in an interrupt that no program on this CPU runs
    // inside of, unless `busy` says so.
    unsafe {
        if (*p).busy != 0 {
            maps::count(global::FLUSH_BUSY);
            return false;
        }
        let n = (*p).accepts;
        if n != 0 {
            let listener = (*p).listener;
            super::count_accepts(&listener, n, (*p).wait_max_ns);
            super::acceptors::count(&listener, (*p).tgid, n, Some(&(*p).comm));
            for bucket in 0..hist::BUCKETS as u32 {
                let Some(h) = PENDING_HIST.get_ptr_mut(bucket) else { break };
                let waits = *h;
                if waits != 0 {
                    *h = 0;
                    super::count_wait(listener, bucket, waits);
                }
            }
            (*p).accepts = 0;
            (*p).wait_max_ns = 0;
        }
        (*p).listener = (*p).next_listener;
        (*p).tgid = (*p).next_tgid;
        (*p).comm = (*p).next_comm;
    }
    true
}
