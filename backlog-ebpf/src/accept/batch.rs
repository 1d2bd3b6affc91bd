//! Accepts held back from the maps, per CPU. A web server's accepts on one CPU are
//! nearly all one listener's, taken by a few workers: instead of looking up three
//! per-listener hash maps for each (STATS, WAIT_HIST, ACCEPTORS: ~0.5 µs of a
//! connection, BENCH.md), an accept from the CPU's *owner* listener by one of its
//! `SLOTS` processes adds to this CPU's counters in a per-CPU array. User space's
//! flush, which runs on each CPU before any count is read, adds them to the maps
//! (`flush`) and gives the listener or process that last went to the maps a place
//! for the next interval; accepts of anyone else go to the maps directly, as before.
//!
//! Several processes, not one: the scheduler moves a server's workers between CPUs,
//! and with one process per CPU (nginx's two workers on this bench's two cores) a
//! fifth of the accepts found another worker owning the CPU and paid for the maps.
//!
//! Owners change only in the flush: it runs in an interrupt, so no accept program
//! on the CPU is half-way through while it does, unless `busy` says one is (then
//! nothing is flushed, and user space tries again). The accept side only adds, with
//! atomic instructions: a syscall exit's program can be preempted by another task's
//! on the same CPU, and both may add at once.
use aya_ebpf::{helpers::bpf_get_current_comm, macros::map, maps::PerCpuArray};
use backlog_common::{global, hist, ListenerKey, COMM_LEN};

use crate::maps;

/// Processes of the owner listener whose accepts a CPU holds back at once.
const SLOTS: usize = 4;

/// One process taking the owner's connections on this CPU.
#[repr(C)]
struct Slot {
    /// 0 when free: no process has tgid 0.
    tgid: u64,
    /// Its accepts since the last flush.
    accepts: u64,
    comm: [u8; COMM_LEN],
}

#[repr(C)]
pub struct Pending {
    /// Accept programs updating this CPU's counters now (a count, not a flag: one
    /// can be preempted by another).
    busy: u64,
    /// The owner listener and the processes whose accepts from it are held back.
    listener: ListenerKey,
    slots: [Slot; SLOTS],
    /// The longest wait among the held-back accepts.
    wait_max_ns: u64,
    /// Who last went to the maps: given a slot at the flush (and the listener, if it
    /// is another). Written by accepts without the owner's care (a torn write makes
    /// a slot nobody matches, which costs a second of unbatched accepts, nothing
    /// else); `next_tgid` 0 when nobody did.
    next_listener: ListenerKey,
    next_tgid: u64,
    next_comm: [u8; COMM_LEN],
    /// The slot the next newcomer takes (modulo `SLOTS`).
    turn: u64,
}

#[map(name = "ACCEPT_PENDING")]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

/// The owner's accepts by wait bucket since the last flush.
#[map(name = "ACCEPT_PENDING_HIST")]
static PENDING_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(hist::BUCKETS as u32, 0);

/// Counts an accept from `listener` by process `tgid` that waited `wait_ns` in
/// `bucket`, if they hold a slot on this CPU; false when the caller must count it in
/// the maps itself (then they get a slot at the next flush).
#[inline(always)]
pub fn add(listener: &ListenerKey, tgid: u64, wait_ns: u64, bucket: u32) -> bool {
    let Some(p) = PENDING.get_ptr_mut(0) else { return false };
    let mut mine = false;
    // SAFETY: this CPU's copy; shared only with programs on this CPU (see the module).
    unsafe {
        maps::atomic_add(&raw mut (*p).busy, 1);
        if (*p).listener == *listener {
            for i in 0..SLOTS {
                let slot = &raw mut (*p).slots[i];
                if (*slot).tgid != tgid {
                    continue;
                }
                let Some(h) = PENDING_HIST.get_ptr_mut(bucket) else { break };
                // The flush runs in an interrupt, where a map allocated on use may
                // have no element to give (the kernel refills its caches after the
                // interrupt): the bucket's map entry is made here, once a flush.
                if *h == 0 {
                    super::hist_entry(*listener, bucket);
                }
                maps::atomic_add(h, 1);
                maps::atomic_add(&raw mut (*slot).accepts, 1);
                if wait_ns > (*p).wait_max_ns {
                    (*p).wait_max_ns = wait_ns;
                }
                mine = true;
                break;
            }
        }
        if !mine {
            (*p).next_listener = *listener;
            (*p).next_tgid = tgid;
            (*p).next_comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        }
        maps::atomic_add(&raw mut (*p).busy, u64::MAX);
    }
    mine
}

/// The held-back waits into the listener's histogram. A function of its own: the
/// verifier leaves this 232-step loop in several states, and inlined, each of them
/// walked the rest of the flush again (verifying the flush program took 0.4 s of the
/// tracer's start instead of 0.08).
#[inline(never)]
fn flush_hist(listener: &ListenerKey) {
    for bucket in 0..hist::BUCKETS as u32 {
        let Some(h) = PENDING_HIST.get_ptr_mut(bucket) else { break };
        // SAFETY: this CPU's copy (see `flush`).
        unsafe {
            let waits = *h;
            if waits != 0 {
                *h = 0;
                super::count_wait(*listener, bucket, waits);
            }
        }
    }
}

/// One slot's accepts into ACCEPTORS. A function of its own so that the paths
/// through one slot's map update are not multiplied by the others' in the verifier
/// (inlined, four slots took the flush past a million instructions).
#[inline(never)]
fn flush_slot(listener: &ListenerKey, slot: *mut Slot) {
    // SAFETY: a slot of this CPU's copy (see `flush`).
    unsafe {
        let a = (*slot).accepts;
        if a != 0 {
            super::acceptors::count(listener, (*slot).tgid, a, Some(&(*slot).comm));
            (*slot).accepts = 0;
        }
    }
}

/// User space's flush on this CPU: the held-back accepts into the maps; then whoever
/// last went to the maps takes a slot, the slots taken in turn (the whole CPU if
/// their listener is another). False, doing nothing, when an accept program is
/// updating the counters. A function of its own: the flush program also settles the
/// drop window, and the two stack frames together would pass 512 bytes on 5.10 and
/// 6.1.
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
        let listener = (*p).listener;
        let mut n = 0;
        for i in 0..SLOTS {
            n += (*p).slots[i].accepts;
        }
        if n != 0 {
            super::count_accepts(&listener, n, (*p).wait_max_ns);
            (*p).wait_max_ns = 0;
            flush_hist(&listener);
            for i in 0..SLOTS {
                flush_slot(&listener, &raw mut (*p).slots[i]);
            }
        }
        if (*p).next_tgid == 0 {
            return true;
        }
        let moved = (*p).next_listener != listener;
        if moved {
            (*p).listener = (*p).next_listener;
        }
        let turn = (*p).turn % SLOTS as u64;
        (*p).turn = turn + 1;
        // Constant indices only: a computed one would be a bounds check the
        // verifier follows into the panic handler's endless loop.
        for i in 0..SLOTS {
            let slot = &raw mut (*p).slots[i];
            if i as u64 == turn {
                (*slot).tgid = (*p).next_tgid;
                (*slot).comm = (*p).next_comm;
            } else if moved {
                (*slot).tgid = 0;
            }
        }
        (*p).next_tgid = 0;
    }
    true
}
