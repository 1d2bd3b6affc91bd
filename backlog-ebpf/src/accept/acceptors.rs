//! Which processes take connections from which listener. accept() returns in the
//! acceptor's own context, so the current task is the process that took the
//! connection (unlike at drop time, where it is whoever ran the softirq): a count per
//! (listener, process). SO_REUSEPORT groups whose sockets every worker holds (nginx)
//! are told apart by this, not by the owners /proc shows.
use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, helpers::bpf_get_current_comm, macros::map, maps::PerCpuHashMap};
use backlog_common::{global, Acceptor, AcceptorKey, ListenerKey, ACCEPTORS_MAX_ENTRIES, COMM_LEN};

use crate::maps;

/// (listener, tgid) -> accepts and the task's comm, per CPU. Not LRU, for the reason
/// WAIT_HIST is not; allocated on use, a failed insert counted (`acceptors_full`);
/// user space deletes a released listener's entries.
#[map(name = "ACCEPTORS")]
static ACCEPTORS: PerCpuHashMap<AcceptorKey, Acceptor> =
    PerCpuHashMap::with_max_entries(ACCEPTORS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Process `tgid` took `n` connections from `listener`; `comm` is its command name
/// when the caller runs outside that process (a flush), else the current task's is.
#[inline(always)]
pub fn count(listener: &ListenerKey, tgid: u64, n: u64, comm: Option<&[u8; COMM_LEN]>) {
    let key = AcceptorKey { listener: *listener, tgid: tgid as u32, _pad: 0 };
    // The initial value is built only when the entry is missing: its zeroed comm is a
    // `memset` call (see `maps::zero`), which every accept paid for.
    let a = ACCEPTORS.get_ptr_mut(&key).or_else(|| {
        let fresh = Acceptor { accepts: 0, comm: [0; COMM_LEN] };
        maps::create(&ACCEPTORS, &key, &fresh, global::ACCEPTORS_FULL)
    });
    let Some(a) = a else { return };
    // SAFETY: `a` is this CPU's copy of a live map value (a new entry, or another
    // CPU's insert, left it zeroed, without a comm).
    unsafe {
        if (*a).accepts == 0 {
            (*a).comm = match comm {
                Some(c) => *c,
                None => bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
            };
        }
        maps::atomic_add(&raw mut (*a).accepts, n);
    }
}
