//! The per-listener model every output is rendered from: fed by typed kernel events
//! (live, or replayed from a recording) through `Model::apply`, corrected by the
//! kernel's exact per-listener counters through `set_kernel_stats`/`set_kernel_hist`
//! (at each live sync, or from a recording's sync records): one update path for both.
mod listener;
mod reconciled;
pub mod retired;

use std::collections::{BTreeMap, HashMap, HashSet};

use backlog_common::{hist, ListenerKey, ListenerStats};

use crate::event::{comm_str, Endpoint, ListenerEvent, ListenerRef, What};
use crate::sys::diag::SockEntry;
#[cfg(test)]
pub use listener::{fmt_sockaddr, Wait};
pub use listener::{top_n, Counts, Filter, Latency, Listener, Owners, SockAddr};
pub use reconciled::{Folded, NetnsCounts, Reconciled};
use retired::Retired;

/// Session-wide counts the kernel side keeps beside the per-listener ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTotals {
    /// Events the ring buffer had no room for (counts stay exact: they come from maps).
    pub lost_events: u64,
    /// accept()s of children never seen queued (tracer started later, LRU eviction,
    /// accepts by paths the tracer cannot see).
    pub unmatched_accepts: u64,
    /// Children the kernel side still times as queued (None: not known).
    pub pending_enqueued: Option<u64>,
}

#[derive(Default)]
pub struct Model {
    pub listeners: BTreeMap<ListenerKey, Listener>,
    pub totals: KernelTotals,
    /// Program runs the kernel skipped (recursion on a CPU): drops they would
    /// have seen are missing from the counts.
    pub missed_runs: u64,
    /// Closed listeners merged into aggregates (see retired.rs): the hook that keeps
    /// the model bounded under listener churn.
    pub retired: Retired,
    /// The kernel side's diagnostics (`backlog_common::global::DIAGNOSTICS`), by name.
    pub diagnostics: Vec<(&'static str, u64)>,
    /// The tracer's programs found detached from outside, one line each.
    pub detached: Vec<String>,
    /// Outputs that failed and were dropped while tracing went on (a recording on a
    /// full disk, the metrics endpoint), one line each.
    pub failed_outputs: Vec<String>,
    /// The kernel's own counters against the detected drops.
    pub reconciled: Reconciled,
}

impl Model {
    fn entry(&mut self, r: &ListenerRef) -> &mut Listener {
        if !self.listeners.contains_key(&r.key) {
            // A listener known so far only from sock_diag (`listening`) becomes this
            // one: it keeps its owners, limit and queue, under the kernel side's key.
            let listed = ListenerKey { sk: 0, ino: r.key.ino };
            let known = (r.key.sk != 0 && r.key.ino != 0).then(|| self.listeners.remove(&listed)).flatten();
            let l = match known {
                Some(l) => Listener { sk: r.key.sk, ..l },
                None => Listener {
                    sk: r.key.sk,
                    netns: r.netns,
                    addr: Some(r.local.own_ip()),
                    port: r.local.port,
                    sock_ino: r.key.ino,
                    ..Default::default()
                },
            };
            self.listeners.insert(r.key, l);
        }
        let l = self.listeners.get_mut(&r.key).expect("inserted above");
        // listen() on an unbound socket enters LISTEN before the kernel picks its
        // port: its Listen event says port 0, anything later has the real one.
        if l.port == 0 && r.local.port != 0 {
            l.port = r.local.port;
            l.addr = Some(r.local.own_ip());
        }
        l
    }

    /// Every listening socket of each namespace read, as sock_diag lists it now
    /// (what `ss -lnt` shows), given as (namespace, listed sockets, whether this is
    /// its last reading). Listeners the kernel side has not reported (older than the
    /// session, or quiet since) join the model under `ListenerKey { sk: 0, ino }`
    /// until an event or a kernel entry names their socket; every listed one gets its
    /// queue length and limit now. Such a listener no longer listed, or whose
    /// namespace is read for the last time, has closed. Returns the listeners added,
    /// for owner resolution.
    pub fn listening<'a>(
        &mut self,
        namespaces: impl IntoIterator<Item = (u32, &'a [SockEntry], bool)>,
    ) -> Vec<ListenerKey> {
        let by_ino: HashMap<(u32, u64), ListenerKey> =
            self.listeners.iter().map(|(k, l)| ((l.netns, l.sock_ino), *k)).collect();
        let mut added = Vec::new();
        let mut read: HashMap<u32, bool> = HashMap::new();
        let mut present = HashSet::new();
        for (netns, listed, last) in namespaces {
            read.insert(netns, last);
            for e in listed.iter().filter(|e| e.listening && e.inode != 0) {
                let ino = u64::from(e.inode);
                present.insert((netns, ino));
                let key = match by_ino.get(&(netns, ino)) {
                    Some(k) => *k,
                    // Closed and merged after this reading was taken.
                    None if self.retired.merged_lately(ino) => continue,
                    None => {
                        let key = ListenerKey { sk: 0, ino };
                        let l =
                            Listener { netns, addr: Some(e.addr), port: e.port, sock_ino: ino, ..Default::default() };
                        self.listeners.insert(key, l);
                        added.push(key);
                        key
                    }
                };
                let Some(l) = self.listeners.get_mut(&key) else { continue };
                if l.port == 0 {
                    (l.port, l.addr) = (e.port, Some(e.addr));
                }
                l.queue_len = e.rqueue;
                l.queue_max = e.wqueue;
                l.queue_peak = l.queue_peak.max(e.rqueue);
            }
        }
        for (k, l) in self.listeners.iter_mut() {
            let Some(last) = read.get(&l.netns) else { continue };
            if k.sk == 0 && (*last || !present.contains(&(l.netns, k.ino))) {
                l.closed = true;
            }
        }
        self.retired.forget_lately();
        added
    }

    /// Folds one event in; returns the listener it concerns.
    pub fn apply(&mut self, ev: &ListenerEvent) -> &mut Listener {
        let l = self.entry(&ev.listener);
        match ev.what {
            What::Drop(d) => {
                l.drops[d.reason as usize] += 1;
                l.queue_len = d.queue_len;
                l.queue_max = d.queue_max;
                l.queue_peak = l.queue_peak.max(d.queue_len);
            }
            What::Listen { pid, comm, requested_backlog, queue_max } => {
                l.closed = false;
                l.queue_max = queue_max;
                if requested_backlog.is_some() {
                    l.requested_backlog = requested_backlog;
                }
                if pid != 0 {
                    l.owners.insert(pid, comm_str(&comm));
                }
            }
            What::Unlisten => l.closed = true,
            What::Accept { wait_ns, queue_len } => {
                l.accepts += 1;
                l.wait.record(wait_ns);
                l.queue_len = queue_len;
            }
            What::Abandon => l.abandoned += 1,
        }
        l
    }

    /// Replaces event-derived counts with the kernel's exact per-listener counters
    /// (summed over CPUs). Events can be lost; these cannot, and they carry the
    /// listener's identity for the case where every event about it was lost.
    /// Returns whether the listener's drops moved (a drop the kernel's peer counts
    /// may hold that the model's do not yet).
    pub fn set_kernel_stats(&mut self, key: ListenerKey, per_cpu: &[ListenerStats]) -> bool {
        let Some(id) = per_cpu.iter().find(|s| s.lport != 0) else { return false };
        let r =
            ListenerRef { key, netns: id.netns, local: Endpoint { family: id.family, addr: id.laddr, port: id.lport } };
        let l = self.entry(&r);
        let Counts { mut drops, mut accepts, mut abandoned, mut suppressed } = l.retired;
        for s in per_cpu {
            for (d, v) in drops.iter_mut().zip(s.drops) {
                *d += v;
            }
            accepts += s.accepts;
            abandoned += s.abandoned;
            suppressed += s.suppressed;
            l.wait.max_ns = l.wait.max_ns.max(s.wait_max_ns);
            l.queue_peak = l.queue_peak.max(s.queue_peak);
            l.queue_max = l.queue_max.max(s.queue_max);
        }
        let moved = l.drops != drops;
        l.drops = drops;
        l.accepts = accepts;
        l.abandoned = abandoned;
        l.suppressed = suppressed;
        moved
    }

    /// The kernel entry of `key`, just read into the model by `set_kernel_stats`,
    /// is being deleted: what it counted stays as the base of any later entry.
    pub fn retire(&mut self, key: ListenerKey) {
        if let Some(l) = self.listeners.get_mut(&key) {
            l.retired = Counts { drops: l.drops, accepts: l.accepts, abandoned: l.abandoned, suppressed: l.suppressed };
        }
    }

    /// Raises wait buckets to the kernel's histogram, given as (bucket, count) pairs.
    /// Never lowers one: a bucket the kernel's LRU map evicted (and maybe created
    /// again from 1) keeps what was read before, and `waits_unrecorded` says what is
    /// still missing. Event-derived counts are a subset of the kernel's, so the
    /// larger of the two is right.
    pub fn set_kernel_hist(&mut self, key: ListenerKey, buckets: &[(usize, u64)]) {
        let Some(l) = self.listeners.get_mut(&key) else { return };
        let mut all = vec![0u64; hist::BUCKETS];
        for &(b, n) in buckets {
            if let Some(slot) = all.get_mut(b) {
                *slot += n;
            }
        }
        if buckets.is_empty() {
            return;
        }
        l.wait.raise_to(&all);
    }

    /// The kernel's count of who accepted from `key`: (pid, comm, accepts) each.
    pub fn set_acceptors(&mut self, key: ListenerKey, list: &[(u32, [u8; backlog_common::COMM_LEN], u64)]) {
        let Some(l) = self.listeners.get_mut(&key) else { return };
        for (pid, comm, accepts) in list {
            let a = l.acceptors.entry(*pid).or_default();
            a.accepts = a.accepts.max(*accepts);
            if comm[0] != 0 {
                a.comm = comm_str(comm);
            }
        }
    }

    /// The kernel's drops per peer at `key`: (address as the drop's segment carried
    /// it, drops) each, shown as peers are (v4-mapped as IPv4, like ss).
    pub fn set_kernel_peers(&mut self, key: ListenerKey, list: &[([u8; 16], u64)]) {
        let Some(l) = self.listeners.get(&key) else { return };
        let family = match l.addr {
            Some(std::net::IpAddr::V4(_)) => backlog_common::AF_INET,
            _ => backlog_common::AF_INET6,
        };
        let peers: Vec<_> = list.iter().map(|(a, n)| (Endpoint { family, addr: *a, port: 0 }.ip(), *n)).collect();
        self.set_peers(key, &peers);
    }

    /// Drops per peer at `key`, exact; counts only grow.
    pub fn set_peers(&mut self, key: ListenerKey, list: &[(std::net::IpAddr, u64)]) {
        let Some(l) = self.listeners.get_mut(&key) else { return };
        for (peer, drops) in list {
            let c = l.peers.entry(*peer).or_default();
            *c = (*c).max(*drops);
        }
    }

    /// A listener's accept-queue entries the kernel side is still timing.
    pub fn set_pending(&mut self, key: ListenerKey, pending: u64) {
        if let Some(l) = self.listeners.get_mut(&key) {
            l.pending = pending;
        }
    }

    pub fn matching<'a>(&'a self, f: &'a Filter) -> impl Iterator<Item = &'a Listener> + 'a {
        self.listeners.values().filter(move |l| l.matches(f))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use backlog_common::{DropReason, AF_INET, AF_INET6};

    use super::*;
    use crate::event::Dropped;

    fn at(sk: u64, what: What) -> ListenerEvent {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let local = Endpoint { family: AF_INET, addr, port: 8080 };
        ListenerEvent { ts_ns: 0, listener: ListenerRef { key: ListenerKey { sk, ino: 0 }, netns: 42, local }, what }
    }

    fn drop_ev(sk: u64, reason: DropReason) -> ListenerEvent {
        let peer = Endpoint::default();
        at(sk, What::Drop(Dropped { reason, peer, queue_len: 9, queue_max: 8, syn_queue_len: 0 }))
    }

    #[test]
    fn a_wait_read_from_the_kernel_before_its_event_arrives_is_counted_once() {
        let mut m = Model::default();
        let k = ListenerKey { sk: 7, ino: 0 };
        let waits = [40_000_000u64, 41_000_000, 90_000_000];
        let bucket = |ns: u64| hist::bucket(ns / 1000);
        // The first accept's event arrives before the sync; the sync then reads all
        // three from the kernel; then the other two events come out of the ring.
        m.apply(&at(7, What::Accept { wait_ns: waits[0], queue_len: 0 }));
        m.set_kernel_hist(k, &waits.iter().map(|w| (bucket(*w), 1)).collect::<Vec<_>>());
        for w in &waits[1..] {
            m.apply(&at(7, What::Accept { wait_ns: *w, queue_len: 0 }));
        }
        let l = &m.listeners[&k];
        assert_eq!(
            l.wait.count(),
            3,
            "{:?}",
            l.wait.buckets.iter().enumerate().filter(|b| *b.1 > 0).collect::<Vec<_>>()
        );
        // Events alone (the kernel's reading lost) still count each wait.
        let mut only = Model::default();
        for w in waits {
            only.apply(&at(7, What::Accept { wait_ns: w, queue_len: 0 }));
        }
        assert_eq!(only.listeners[&k].wait.count(), 3);
    }

    #[test]
    fn events_aggregate_per_listener_and_kernel_counts_win() {
        let mut m = Model::default();
        for r in [
            DropReason::AcceptQueueFull,
            DropReason::AcceptQueueFull,
            DropReason::SynQueueFull,
            DropReason::AckOverflow,
        ] {
            m.apply(&drop_ev(1, r));
        }
        m.apply(&drop_ev(2, DropReason::Other));
        let k = |sk| ListenerKey { sk, ino: 0 };
        let l = &m.listeners[&k(1)];
        assert_eq!((l.total_drops(), l.overflows()), (4, 3));
        assert_eq!(l.local(), "127.0.0.1:8080");
        assert_eq!(l.queue_peak, 9);
        assert_eq!(m.listeners[&k(2)].total_drops(), 1);

        // Two CPUs' counters: the sum replaces what the (lossy) events said.
        let a = ListenerStats { drops: [5, 0, 1, 0], queue_peak: 9, queue_max: 8, lport: 8080, ..Default::default() };
        let b = ListenerStats { drops: [2, 0, 0, 1], queue_peak: 12, queue_max: 8, ..Default::default() };
        m.set_kernel_stats(k(1), &[a, b]);
        let l = &m.listeners[&k(1)];
        assert_eq!(l.drops, [7, 0, 1, 1]);
        assert_eq!((l.total_drops(), l.overflows(), l.queue_peak), (9, 8, 12));

        // A listener known only from the kernel's counters (all its events lost).
        m.set_kernel_stats(k(99), &[a]);
        assert_eq!((m.listeners[&k(99)].port, m.listeners[&k(99)].total_drops()), (8080, 6));

        // The kernel reuses a closed listener's memory: same address, new socket
        // inode, a listener of its own.
        let mut reused = drop_ev(1, DropReason::Other);
        reused.listener.key.ino = 77;
        m.apply(&reused);
        assert_eq!(m.listeners[&ListenerKey { sk: 1, ino: 77 }].total_drops(), 1);
        assert_eq!(m.listeners[&k(1)].total_drops(), 9);
    }

    #[test]
    fn counts_of_a_released_entry_stay_when_a_new_one_appears() {
        let mut m = Model::default();
        let k = ListenerKey { sk: 1, ino: 5 };
        let first = ListenerStats { abandoned: 7, accepts: 2, drops: [1, 0, 0, 0], lport: 8080, ..Default::default() };
        m.set_kernel_stats(k, &[first]);
        m.retire(k);
        // The last children closing as the listener goes count into a fresh entry.
        let late = ListenerStats { abandoned: 13, lport: 8080, ..Default::default() };
        m.set_kernel_stats(k, &[late]);
        let l = &m.listeners[&k];
        assert_eq!((l.abandoned, l.accepts, l.drops), (20, 2, [1, 0, 0, 0]));
    }

    fn listed(ino: u32, port: u16, len: u32, max: u32) -> SockEntry {
        SockEntry {
            listening: true,
            addr: "10.0.0.1".parse().unwrap(),
            port,
            rqueue: len,
            wqueue: max,
            inode: ino,
            drops: Some(0),
        }
    }

    #[test]
    fn listed_listeners_join_then_take_the_kernel_key_and_close() {
        let mut m = Model::default();
        let added = m.listening([(42, &[listed(5, 80, 5, 4), listed(6, 81, 0, 128)][..], false)]);
        assert_eq!(added, vec![ListenerKey { sk: 0, ino: 5 }, ListenerKey { sk: 0, ino: 6 }]);
        let l = &m.listeners[&ListenerKey { sk: 0, ino: 5 }];
        assert_eq!((l.port, l.queue_len, l.queue_max, l.queue_peak, l.closed), (80, 5, 4, 5, false));
        m.listeners.get_mut(&ListenerKey { sk: 0, ino: 5 }).unwrap().owners.insert(7, "srv".into());
        // The kernel side names socket 5: the same listener, under its key, owners kept.
        let mut ev = drop_ev(1, DropReason::AcceptQueueFull);
        ev.listener.key.ino = 5;
        m.apply(&ev);
        assert!(!m.listeners.contains_key(&ListenerKey { sk: 0, ino: 5 }));
        let l = &m.listeners[&ListenerKey { sk: 1, ino: 5 }];
        assert_eq!((l.total_drops(), l.owners.len(), l.queue_max), (1, 1, 8));
        // Listed again: known, not added; socket 6 is gone, so it closed.
        assert!(m.listening([(42, &[listed(5, 80, 2, 4)][..], false)]).is_empty());
        assert_eq!(m.listeners[&ListenerKey { sk: 1, ino: 5 }].queue_len, 2);
        assert!(m.listeners[&ListenerKey { sk: 0, ino: 6 }].closed);
        // Another namespace's reading leaves these alone.
        m.listening([(43, &[][..], false)]);
        assert!(!m.listeners[&ListenerKey { sk: 1, ino: 5 }].closed);
    }

    #[test]
    fn the_kernel_chosen_port_replaces_port_zero() {
        let mut m = Model::default();
        // listen() without bind(): LISTEN is entered before the port is chosen.
        let mut listen = at(9, What::Listen { pid: 7, comm: [0; 16], requested_backlog: Some(1), queue_max: 1 });
        listen.listener.local.port = 0;
        m.apply(&listen);
        assert_eq!(m.listeners[&ListenerKey { sk: 9, ino: 0 }].port, 0);
        let mut later = ListenerStats { lport: 41234, ..Default::default() };
        later.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        m.set_kernel_stats(ListenerKey { sk: 9, ino: 0 }, &[later]);
        assert_eq!(m.listeners[&ListenerKey { sk: 9, ino: 0 }].local(), "127.0.0.1:41234");
    }

    #[test]
    fn a_reading_older_than_a_merge_does_not_bring_the_listener_back() {
        let mut m = Model::default();
        m.retired = Retired::new(retired::Policy { keep_max: 0, ..Default::default() });
        m.listening([(42, &[listed(5, 80, 0, 4)][..], false)]);
        let key = ListenerKey { sk: 0, ino: 5 };
        m.listeners.get_mut(&key).unwrap().closed = true;
        let now = std::time::Instant::now();
        m.retired.released(key, now);
        m.retired.merge_due(&mut m.listeners, &Default::default(), now);
        assert!(m.listeners.is_empty());
        // A reading taken before the close still lists the socket.
        assert!(m.listening([(42, &[listed(5, 80, 0, 4)][..], false)]).is_empty());
        assert!(m.listeners.is_empty());
    }

    #[test]
    fn wait_percentiles_are_within_a_bucket() {
        let mut w = Wait::default();
        // 1..=1000 ms uniformly: p50 ~ 500 ms, p99 ~ 990 ms, max exactly 1000 ms.
        for ms in 1..=1000u64 {
            w.record(ms * 1_000_000);
        }
        let l = w.latency().unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50 / 500_000.0 - 1.0).abs() < 0.07, "p50 {}", l.p50);
        assert!((l.p99 / 990_000.0 - 1.0).abs() < 0.07, "p99 {}", l.p99);
        assert_eq!(l.max, 1_000_000.0);
        assert!(Wait::default().latency().is_none());
    }

    #[test]
    fn accept_events_feed_the_model() {
        let mut m = Model::default();
        m.apply(&at(3, What::Accept { wait_ns: 25_000_000, queue_len: 0 }));
        m.apply(&at(3, What::Abandon));
        let l = &m.listeners[&ListenerKey { sk: 3, ino: 0 }];
        assert_eq!((l.accepts, l.abandoned, l.total_drops()), (1, 1, 0));
        let lat = l.wait.latency().unwrap();
        assert!((lat.p50 / 25_000.0 - 1.0).abs() < 0.07);
    }

    #[test]
    fn filters_and_addresses() {
        let mut m = Model::default();
        let mut e = drop_ev(7, DropReason::Other);
        e.listener.local = Endpoint { family: AF_INET6, addr: Ipv6Addr::LOCALHOST.octets(), port: 8080 };
        m.apply(&e);
        let l = &m.listeners[&ListenerKey { sk: 7, ino: 0 }];
        assert_eq!(l.local(), "[::1]:8080");
        let f = Filter { ports: vec![8080], netns: vec![42], pids: vec![] };
        assert!(l.matches(&f));
        assert!(!l.matches(&Filter { ports: vec![80], ..f.clone() }));
        assert!(!l.matches(&Filter { pids: vec![1], ..f }));
    }
}
