//! Maps shared by every attach mode, and the two ways data leaves the kernel:
//! per-listener counters (exact, never lost) and ring-buffer events (best effort,
//! every loss counted).
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use backlog_common::{global, Event, EventKind, KernelOffsets, ListenerKey, ListenerStats, EVENTS_RING_BYTES};

use crate::kernel;

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Keyed by the listener's identity (`ListenerKey`). LRU so an insert never fails; user space
/// deletes a listener's entry after it has read the final values.
#[map(name = "STATS")]
pub static STATS: LruPerCpuHashMap<ListenerKey, ListenerStats> = LruPerCpuHashMap::with_max_entries(16384, 0);

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

/// Whether a listener on `port` is watched (`--port`), with the port only looked at
/// when a filter is set: `port` is a closure because reading it is a helper call.
#[inline(always)]
pub fn port_watched(port: impl FnOnce() -> u16) -> bool {
    if kernel::config().filter_ports == 0 {
        return true;
    }
    // SAFETY: read-only lookup of a plain value.
    unsafe { FILTER_PORTS.get(&port()).is_some() }
}

/// `port_watched` for listener `sk`, reading its local port only if needed.
#[inline(always)]
pub fn listener_watched(sk: u64) -> bool {
    port_watched(|| kernel::read::<u16>(sk, kernel::offsets().skc_num))
}

/// This CPU's counters for a listener, created on first use with the listener's
/// identity filled in. Callers that already hold the listener's key pass it: it
/// costs four dependent reads (sock -> socket -> file -> inode).
#[inline(always)]
pub fn stats(key: &ListenerKey) -> Option<*mut ListenerStats> {
    let o = kernel::offsets();
    let sk = key.sk;
    if let Some(p) = STATS.get_ptr_mut(key) {
        return Some(p);
    }
    let (family, laddr, lport) = kernel::local_addr(sk, &o);
    let fresh = ListenerStats {
        sock_ino: key.ino,
        netns: kernel::netns_inum(kernel::sk_net(sk, &o), &o),
        family,
        lport,
        laddr,
        ..ListenerStats::default()
    };
    if STATS.insert(key, &fresh, 0).is_err() {
        count(global::STATS_FULL);
        return None;
    }
    STATS.get_ptr_mut(key)
}

/// Folds an observation of the listener's accept queue into this CPU's stats.
#[inline(always)]
pub fn note_queue(s: *mut ListenerStats, q: &kernel::QueueState) {
    // SAFETY: `s` is this CPU's copy of a map value.
    unsafe {
        if q.ack_backlog > (*s).queue_peak {
            (*s).queue_peak = q.ack_backlog;
        }
        (*s).queue_max = q.max_ack_backlog;
    }
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
    let (family, laddr, lport) = kernel::local_addr(sk, o);
    let q = kernel::queue_state(sk, o);
    // SAFETY: zeroing the reservation in place (no Event on the stack).
    unsafe { core::ptr::write_bytes(ev as *mut Event, 0, 1) };
    ev.ts_ns = now_ns();
    ev.sk = sk;
    ev.sock_ino = key.ino;
    ev.netns = kernel::netns_inum(kernel::sk_net(sk, o), o);
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

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}
