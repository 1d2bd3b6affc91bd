//! Maps shared by every attach mode, and the two ways data leaves the kernel:
//! per-listener counters (exact, never lost) and ring-buffer events (best effort,
//! every loss counted).
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use backlog_common::{global, Event, ListenerStats};

use crate::kernel;

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Keyed by the listener's kernel address. LRU so an insert never fails; user space
/// deletes a listener's entry after it has read the final values.
#[map(name = "STATS")]
pub static STATS: LruPerCpuHashMap<u64, ListenerStats> = LruPerCpuHashMap::with_max_entries(16384, 0);

#[map(name = "GLOBAL")]
pub static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(global::N, 0);

/// Local ports to watch when `Config::filter_ports` is set.
#[map(name = "FILTER_PORTS")]
pub static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = GLOBAL.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn port_watched(port: u16) -> bool {
    if crate::kernel::config().filter_ports == 0 {
        return true;
    }
    // SAFETY: read-only lookup of a plain value.
    unsafe { FILTER_PORTS.get(&port).is_some() }
}

/// This CPU's counters for a listener, created on first use with the listener's
/// identity filled in.
#[inline(always)]
pub fn stats(sk: u64) -> Option<*mut ListenerStats> {
    if let Some(p) = STATS.get_ptr_mut(&sk) {
        return Some(p);
    }
    let o = kernel::offsets();
    let (family, laddr, lport) = kernel::local_addr(sk, &o);
    let fresh = ListenerStats {
        sock_ino: kernel::socket_inode(sk, &o),
        netns: kernel::netns_inum(kernel::sk_net(sk, &o), &o),
        family,
        lport,
        laddr,
        ..ListenerStats::default()
    };
    if STATS.insert(&sk, &fresh, 0).is_err() {
        count(global::STATS_FULL);
        return None;
    }
    STATS.get_ptr_mut(&sk)
}

/// Sends one event; a full ring buffer is counted, never silent.
#[inline(always)]
pub fn emit(ev: &Event) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(*ev);
            slot.submit(0);
        }
        None => count(global::LOST_EVENTS),
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}
