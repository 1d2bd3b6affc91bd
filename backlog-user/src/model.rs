//! The per-listener model every output is rendered from, fed by kernel events (live
//! or recorded) and corrected by the kernel's exact per-listener counters.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use backlog_common::{hist, DropReason, Event, EventKind, ListenerKey, ListenerStats, AF_INET6, N_REASONS};

use crate::attribute::Owners;
use crate::cli::Filters;

#[derive(Clone, Debug, Default)]
pub struct Listener {
    pub sk: u64,
    pub netns: u32,
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub sock_ino: u64,
    pub owners: Owners,
    /// What the application passed to listen(), when the tracer saw it.
    pub requested_backlog: Option<u32>,
    pub queue_max: u32,
    pub queue_len: u32,
    pub queue_peak: u32,
    /// Drops by reason: exact kernel counts where known, else counted from events.
    pub drops: [u64; N_REASONS],
    pub accepts: u64,
    pub abandoned: u64,
    /// Children on the accept queue that the kernel side is still timing.
    pub pending: u64,
    pub wait: Wait,
    pub closed: bool,
    /// Exact counts of kernel entries already released (`Model::retire`). Children
    /// a closing listener empties from its queue count into a new entry after its
    /// old one may have gone; those add to these counts, never replace them.
    pub retired: Counts,
    /// Listen drops the kernel counted at this socket that the kernel side did not
    /// detect, placed here by the socket's own drop counter (`crate::reconcile`).
    pub undetected: u64,
}

/// The exact per-listener counts the kernel keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub drops: [u64; N_REASONS],
    pub accepts: u64,
    pub abandoned: u64,
}

/// Accept-queue waits in the kernel's bucket layout (see `backlog_common::hist`).
#[derive(Clone, Debug, Default)]
pub struct Wait {
    /// Empty until the first wait: most listeners of a churning host never accept
    /// anything while they are in the model, and 232 buckets are 1.8 KB each.
    pub buckets: Vec<u64>,
    pub max_ns: u64,
}

/// Percentiles of accept-queue wait, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Wait {
    pub fn record(&mut self, ns: u64) {
        self.buckets_mut()[hist::bucket(ns / 1000)] += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Every bucket, allocated on first use.
    pub fn buckets_mut(&mut self) -> &mut [u64] {
        if self.buckets.is_empty() {
            self.buckets = vec![0; hist::BUCKETS];
        }
        &mut self.buckets
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Percentiles through hdrhistogram, each bucket entered at its midpoint (a
    /// bucket is at most 1/8 of its value wide, so the midpoint is within 6.25%).
    /// The maximum is exact: the kernel tracks it apart from the buckets.
    pub fn latency(&self) -> Option<Latency> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        // Values in tenths of a microsecond keep sub-microsecond midpoints distinct.
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1 << 45, 3).ok()?;
        for (i, n) in self.buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
            let (lo, hi) = hist::bounds(i);
            h.record_n(((lo + hi) * 5).max(1), *n).ok()?;
        }
        let max = self.max_ns as f64 / 1000.0;
        let q = |p: f64| (h.value_at_quantile(p) as f64 / 10.0).min(max);
        Some(Latency { count, p50: q(0.50), p90: q(0.90), p99: q(0.99), max })
    }
}

impl Listener {
    pub fn key(&self) -> ListenerKey {
        ListenerKey { sk: self.sk, ino: self.sock_ino }
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Accepts whose wait is missing from the histogram. The kernel counts an accept
    /// and its wait bucket together, so any shortfall is waits the kernel's WAIT_HIST
    /// map had no room for (`hist_full`): percentiles then cover only the rest.
    pub fn waits_unrecorded(&self) -> u64 {
        self.accepts.saturating_sub(self.wait.count())
    }

    pub fn overflows(&self) -> u64 {
        DropReason::ALL.iter().filter(|r| r.is_overflow()).map(|r| self.drops[*r as usize]).sum()
    }

    /// How far the detected drops moved the socket's own drop counter
    /// (SK_MEMINFO_DROPS): a final-ACK overflow counts twice there (the listen
    /// drop, then the segment's discard), every other listen drop once.
    pub fn socket_drops_expected(&self) -> u64 {
        DropReason::ALL
            .iter()
            .map(|r| self.drops[*r as usize] * if *r == DropReason::AckOverflow { 2 } else { 1 })
            .sum()
    }

    pub fn local(&self) -> String {
        fmt_sockaddr(self.addr, self.port)
    }

    pub fn matches(&self, f: &Filters) -> bool {
        (f.ports.is_empty() || f.ports.contains(&self.port))
            && (f.netns.is_empty() || f.netns.contains(&self.netns))
            && (f.pids.is_empty() || self.owners.keys().any(|p| f.pids.contains(p)))
    }
}

/// `addr:port` the way ss spells it (`[v6]:port`, `*:port` for any address);
/// displays without allocating, for the per-drop output.
pub struct SockAddr(pub Option<IpAddr>, pub u16);

impl std::fmt::Display for SockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 {
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.1),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.1),
            None => write!(f, "*:{}", self.1),
        }
    }
}

pub fn fmt_sockaddr(addr: Option<IpAddr>, port: u16) -> String {
    SockAddr(addr, port).to_string()
}

/// The address bytes of an event as an IP address of the event's family.
pub fn ip(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*bytes);
        // Show v4-mapped peers of dual-stack listeners as IPv4, like ss does.
        match v6.to_ipv4_mapped() {
            Some(v4) if bytes[..10].iter().all(|b| *b == 0) && bytes[10] == 0xff => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// One network namespace's drops as the kernel counted them (TcpExt deltas since
/// its baseline) against the drops detected at its listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsCounts {
    pub name: Option<String>,
    /// Where counting starts: "start" (read before the programs attached) or
    /// "first_seen" (found later: from its first reading).
    pub baseline: &'static str,
    /// TcpExt ListenDrops, ListenOverflows, TCPReqQFullDrop since the baseline, as
    /// of the latest reading.
    pub listen_drops: u64,
    pub listen_overflows: u64,
    pub reqq_full_drop: u64,
    /// Drops detected at the namespace's listeners over the same span.
    pub detected: u64,
    /// Drops the kernel counted and the kernel side did not detect (placed at a
    /// listener or not). Only ever grows.
    pub undetected: u64,
    /// The part of `undetected` no listener's own counter could be charged with.
    pub unplaced: u64,
    /// The namespace is gone; these are its final counts.
    pub gone: bool,
}

/// Gone namespaces summed, once they are too many to keep one by one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub namespaces: u64,
    pub listen_drops: u64,
    pub detected: u64,
    pub undetected: u64,
}

/// How the kernel side's counts compare with the kernel's own counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Namespaces read, by inode.
    pub namespaces: BTreeMap<u32, NetnsCounts>,
    pub folded: Folded,
    /// Namespaces with detected drops whose counters could not be read, and why
    /// (no process in them and no /run/netns name, or entering them failed).
    pub unreconciled: BTreeMap<u32, String>,
}

impl Reconciled {
    /// Undetected drops over the namespaces `netns` selects (all when empty).
    pub fn undetected(&self, netns: &[u32]) -> u64 {
        let kept: u64 = self.selected(netns).map(|(_, n)| n.undetected).sum();
        kept + if netns.is_empty() { self.folded.undetected } else { 0 }
    }

    pub fn selected<'a>(&'a self, netns: &'a [u32]) -> impl Iterator<Item = (&'a u32, &'a NetnsCounts)> + 'a {
        self.namespaces.iter().filter(move |(i, _)| netns.is_empty() || netns.contains(i))
    }
}

#[derive(Default)]
pub struct Model {
    pub listeners: BTreeMap<ListenerKey, Listener>,
    pub lost_events: u64,
    /// Program runs the kernel skipped (recursion on a CPU): drops they would
    /// have seen are missing from the counts.
    pub missed_runs: u64,
    /// accept()s of children never seen queued (tracer started later, LRU eviction,
    /// accepts by paths the tracer cannot see).
    pub unmatched_accepts: u64,
    /// Children the kernel side still times as queued (live sessions only).
    pub pending_enqueued: Option<usize>,
    /// Closed listeners merged into aggregates (see retired.rs): the hook that keeps
    /// the model bounded under listener churn.
    pub retired: crate::retired::Retired,
    /// The kernel side's diagnostics (`backlog_common::global::DIAGNOSTICS`), by name.
    pub diagnostics: Vec<(&'static str, u64)>,
    /// The tracer's programs found detached from outside, one line each.
    pub detached: Vec<String>,
    /// The kernel's own counters against the detected drops.
    pub reconciled: Reconciled,
}

impl Model {
    fn entry(&mut self, ev: &Event) -> &mut Listener {
        let key = ListenerKey { sk: ev.sk, ino: ev.sock_ino };
        self.listeners.entry(key).or_insert_with(|| Listener {
            sk: ev.sk,
            netns: ev.netns,
            addr: Some(match ip(ev.family, &ev.laddr) {
                // A listener's own address keeps its family (:: stays ::).
                IpAddr::V4(a) if ev.family == AF_INET6 => IpAddr::V6(a.to_ipv6_mapped()),
                a => a,
            }),
            port: ev.lport,
            sock_ino: ev.sock_ino,
            ..Default::default()
        })
    }

    /// Folds one event in; returns the listener it concerns.
    pub fn apply(&mut self, ev: &Event) -> Option<&mut Listener> {
        let kind = EventKind::from_u8(ev.kind)?;
        let l = self.entry(ev);
        match kind {
            EventKind::Drop => {
                let r = DropReason::from_u8(ev.reason)?;
                l.drops[r as usize] += 1;
                l.queue_len = ev.queue_len;
                l.queue_max = ev.queue_max;
                l.queue_peak = l.queue_peak.max(ev.queue_len);
            }
            EventKind::Listen => {
                l.closed = false;
                l.queue_max = ev.queue_max;
                if ev.requested_backlog != 0 {
                    l.requested_backlog = Some(ev.requested_backlog);
                }
                if ev.pid != 0 {
                    l.owners.insert(ev.pid, comm_str(&ev.comm));
                }
            }
            EventKind::Unlisten => l.closed = true,
            EventKind::Accept => {
                l.accepts += 1;
                l.wait.record(ev.value);
                l.queue_len = ev.queue_len;
            }
            EventKind::Abandon => l.abandoned += 1,
        }
        Some(l)
    }

    /// Replaces event-derived counts with the kernel's exact per-listener counters
    /// (summed over CPUs). Events can be lost; these cannot, and they carry the
    /// listener's identity for the case where every event about it was lost.
    pub fn set_kernel_stats(&mut self, key: ListenerKey, per_cpu: &[ListenerStats]) {
        let Some(id) = per_cpu.iter().find(|s| s.lport != 0) else { return };
        let mut ev = Event::zeroed();
        ev.sk = key.sk;
        ev.netns = id.netns;
        ev.family = id.family;
        ev.lport = id.lport;
        ev.laddr = id.laddr;
        ev.sock_ino = key.ino;
        let l = self.entry(&ev);
        let Counts { mut drops, mut accepts, mut abandoned } = l.retired;
        for s in per_cpu {
            for (d, v) in drops.iter_mut().zip(s.drops) {
                *d += v;
            }
            accepts += s.accepts;
            abandoned += s.abandoned;
            l.wait.max_ns = l.wait.max_ns.max(s.wait_max_ns);
            l.queue_peak = l.queue_peak.max(s.queue_peak);
            l.queue_max = l.queue_max.max(s.queue_max);
        }
        l.drops = drops;
        l.accepts = accepts;
        l.abandoned = abandoned;
    }

    /// The kernel entry of `key`, just read into the model by `set_kernel_stats`,
    /// is being deleted: what it counted stays as the base of any later entry.
    pub fn retire(&mut self, key: ListenerKey) {
        if let Some(l) = self.listeners.get_mut(&key) {
            l.retired = Counts { drops: l.drops, accepts: l.accepts, abandoned: l.abandoned };
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
        for (have, kernel) in l.wait.buckets_mut().iter_mut().zip(all) {
            *have = (*have).max(kernel);
        }
    }

    pub fn matching<'a>(&'a self, f: &'a Filters) -> impl Iterator<Item = &'a Listener> + 'a {
        self.listeners.values().filter(move |l| l.matches(f))
    }
}

pub fn comm_str(c: &[u8]) -> String {
    let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use backlog_common::AF_INET;

    fn drop_ev(sk: u64, reason: DropReason) -> Event {
        let mut e = Event::zeroed();
        e.kind = EventKind::Drop as u8;
        e.reason = reason as u8;
        e.sk = sk;
        e.family = AF_INET;
        e.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.lport = 8080;
        e.netns = 42;
        e.queue_len = 9;
        e.queue_max = 8;
        e
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
        reused.sock_ino = 77;
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
        let mut e = drop_ev(3, DropReason::Other);
        e.kind = EventKind::Accept as u8;
        e.value = 25_000_000;
        m.apply(&e);
        e.kind = EventKind::Abandon as u8;
        m.apply(&e);
        let l = &m.listeners[&ListenerKey { sk: 3, ino: 0 }];
        assert_eq!((l.accepts, l.abandoned, l.total_drops()), (1, 1, 0));
        let lat = l.wait.latency().unwrap();
        assert!((lat.p50 / 25_000.0 - 1.0).abs() < 0.07);
    }

    #[test]
    fn filters_and_addresses() {
        let mut m = Model::default();
        let mut e = drop_ev(7, DropReason::Other);
        e.family = AF_INET6;
        e.laddr = Ipv6Addr::LOCALHOST.octets();
        m.apply(&e);
        let l = &m.listeners[&ListenerKey { sk: 7, ino: 0 }];
        assert_eq!(l.local(), "[::1]:8080");
        let f = Filters { ports: vec![8080], netns: vec![42], pids: vec![] };
        assert!(l.matches(&f));
        assert!(!l.matches(&Filters { ports: vec![80], ..f.clone() }));
        assert!(!l.matches(&Filters { pids: vec![1], ..f }));
        let mapped = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        assert_eq!(ip(AF_INET6, &mapped).to_string(), "10.1.2.3");
    }
}
