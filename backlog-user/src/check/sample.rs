//! Accumulates sock_diag dumps taken across the window into per-listener statistics:
//! queue peak, how often it was full, SYN-queue depth and the drop counter's rise.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::diagnosis::{ListenerGroup, Member, OwnerUse};
use super::share::Share;
use crate::sys::diag::SockEntry;

/// One local address and port in one namespace.
type GroupKey = (u32, IpAddr, u16);

struct Track {
    key: GroupKey,
    limit: u32,
    now: u32,
    peak: u32,
    samples: u32,
    full: u32,
    drops_first: Option<u32>,
    drops_last: Option<u32>,
}

/// A namespace's listening sockets as the dumps saw them.
#[derive(Default)]
struct NsSeen {
    /// The window's first dump (`baseline`) was taken.
    baselined: bool,
    /// The set of listening sockets changed after it (one opened or closed).
    changed: bool,
    last: BTreeSet<u32>,
}

#[derive(Default)]
pub struct Sampler {
    /// Only these local ports; all when empty.
    ports: Vec<u16>,
    /// Listening sockets by inode.
    socks: BTreeMap<u32, Track>,
    /// SYN-queue depth per group: (latest, peak).
    syn: BTreeMap<GroupKey, (u32, u32)>,
    namespaces: BTreeMap<u32, NsSeen>,
}

impl Sampler {
    pub fn new(ports: &[u16]) -> Sampler {
        Sampler { ports: ports.to_vec(), ..Sampler::default() }
    }

    /// Folds in one dump of namespace `netns`.
    pub fn observe(&mut self, netns: u32, entries: &[SockEntry]) {
        let ports = &self.ports;
        let wanted = |port| ports.is_empty() || ports.contains(&port);
        let mut keys = BTreeSet::new();
        let mut inodes = BTreeSet::new();
        for e in entries.iter().filter(|e| e.listening && wanted(e.port)) {
            let key = (netns, e.addr, e.port);
            keys.insert(key);
            inodes.insert(e.inode);
            let t = self.socks.entry(e.inode).or_insert(Track {
                key,
                limit: e.wqueue,
                now: 0,
                peak: 0,
                samples: 0,
                full: 0,
                drops_first: e.drops,
                drops_last: e.drops,
            });
            t.limit = e.wqueue;
            t.now = e.rqueue;
            t.peak = t.peak.max(e.rqueue);
            t.samples += 1;
            // The kernel refuses a new connection once the queue holds more than the limit.
            t.full += u32::from(e.rqueue > e.wqueue);
            t.drops_last = e.drops;
        }
        let mut pending: BTreeMap<GroupKey, u32> = keys.iter().map(|&k| (k, 0)).collect();
        for e in entries.iter().filter(|e| !e.listening) {
            if let Some(key) = owning_group(&keys, netns, e.addr, e.port) {
                *pending.entry(key).or_default() += 1;
            }
        }
        for (key, n) in pending {
            let s = self.syn.entry(key).or_default();
            *s = (n, s.1.max(n));
        }
        let seen = self.namespaces.entry(netns).or_default();
        seen.changed |= seen.baselined && seen.last != inodes;
        seen.last = inodes;
    }

    /// Starts the window of namespace `netns` at its latest dump: the sockets' drop
    /// counters rise from here, and a listener opened or closed from here on means
    /// the namespace's listeners were not all watched throughout.
    pub fn baseline(&mut self, netns: u32) {
        for t in self.socks.values_mut().filter(|t| t.key.0 == netns) {
            t.drops_first = t.drops_last;
        }
        let seen = self.namespaces.entry(netns).or_default();
        (seen.baselined, seen.changed) = (true, false);
    }

    /// Whether every listener of `netns` was watched from its baseline to now (all
    /// ports, none opened or closed): only then do its socket counters account for
    /// all of its listen drops.
    pub fn saw_all(&self, netns: u32) -> bool {
        self.ports.is_empty() && self.namespaces.get(&netns).is_some_and(|s| s.baselined && !s.changed)
    }

    /// Inodes of every listener seen so far.
    pub fn inodes(&self) -> BTreeSet<u64> {
        self.socks.keys().map(|&i| u64::from(i)).collect()
    }

    /// The listeners, grouped by address and port; `owners` names a socket's processes.
    pub fn groups(&self, window_secs: f64, owners: impl Fn(u32) -> Vec<OwnerUse>) -> Vec<ListenerGroup> {
        let mut groups: BTreeMap<GroupKey, Vec<Member>> = BTreeMap::new();
        for (&inode, t) in &self.socks {
            let drops_window = t.drops_first.zip(t.drops_last).map(|(a, b)| b.wrapping_sub(a));
            groups.entry(t.key).or_default().push(Member {
                inode,
                limit: t.limit,
                queue_now: t.now,
                queue_peak: t.peak,
                samples: t.samples,
                samples_full: t.full,
                full_seconds: window_secs * f64::from(t.full) / f64::from(t.samples.max(1)),
                drops_total: t.drops_last,
                drops_window,
                owners: owners(inode),
            });
        }
        groups
            .into_iter()
            .map(|(key @ (netns, address, port), members)| {
                let (syn_queue_now, syn_queue_peak) = self.syn.get(&key).copied().unwrap_or_default();
                ListenerGroup {
                    netns,
                    address,
                    port,
                    reuseport: members.len() > 1,
                    members,
                    syn_queue_now,
                    syn_queue_peak,
                    // Known once the namespace's counters are (check::run).
                    listen_drops: Share { min: 0, max: 0 },
                }
            })
            .collect()
    }
}

/// The listener a pending request belongs to: the one bound to exactly its address,
/// else a wildcard of the same family, else an IPv6 wildcard (which also takes IPv4).
fn owning_group(keys: &BTreeSet<GroupKey>, netns: u32, addr: IpAddr, port: u16) -> Option<GroupKey> {
    let wildcard = |v6: bool| (netns, if v6 { IpAddr::from([0u16; 8]) } else { IpAddr::from([0u8; 4]) }, port);
    [(netns, addr, port), wildcard(addr.is_ipv6()), wildcard(true)].into_iter().find(|k| keys.contains(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(addr: &str, port: u16, inode: u32, q: u32, limit: u32, drops: u32) -> SockEntry {
        SockEntry {
            listening: true,
            addr: addr.parse().unwrap(),
            port,
            rqueue: q,
            wqueue: limit,
            inode,
            drops: Some(drops),
        }
    }

    fn syn(addr: &str, port: u16) -> SockEntry {
        SockEntry { listening: false, inode: 0, rqueue: 0, wqueue: 0, drops: None, ..listen(addr, port, 0, 0, 0, 0) }
    }

    #[test]
    fn groups_reuseport_members_and_tracks_peaks() {
        let mut s = Sampler::new(&[]);
        s.observe(7, &[listen("0.0.0.0", 80, 1, 0, 4, 10), listen("0.0.0.0", 80, 2, 3, 4, 0), syn("10.0.0.1", 80)]);
        s.observe(7, &[listen("0.0.0.0", 80, 1, 5, 4, 13), listen("0.0.0.0", 80, 2, 1, 4, 0)]);
        let g = s.groups(2.0, |_| Vec::new());
        assert_eq!(g.len(), 1);
        assert!(g[0].reuseport);
        assert_eq!(g[0].members.len(), 2);
        let m1 = &g[0].members[0];
        assert_eq!((m1.limit, m1.queue_peak, m1.queue_now, m1.samples_full), (4, 5, 5, 1));
        assert_eq!(m1.full_seconds, 1.0);
        assert_eq!((m1.drops_total, m1.drops_window), (Some(13), Some(3)));
        assert_eq!(g[0].members[1].queue_peak, 3);
        assert_eq!((g[0].syn_queue_now, g[0].syn_queue_peak), (0, 1));
        assert_eq!(g[0].drops_window(), Some(3));
    }

    #[test]
    fn baseline_starts_the_counters_and_churn_is_noticed() {
        let mut s = Sampler::new(&[]);
        s.observe(7, &[listen("0.0.0.0", 80, 1, 0, 4, 10)]);
        assert!(!s.saw_all(7), "no baseline yet");
        s.observe(7, &[listen("0.0.0.0", 80, 1, 0, 4, 12)]);
        s.baseline(7);
        s.observe(7, &[listen("0.0.0.0", 80, 1, 0, 4, 15)]);
        assert!(s.saw_all(7));
        assert_eq!(s.groups(1.0, |_| Vec::new())[0].members[0].drops_window, Some(3));
        // A listener opened in the window: the namespace was not watched whole.
        s.observe(7, &[listen("0.0.0.0", 80, 1, 0, 4, 15), listen("0.0.0.0", 81, 2, 0, 4, 0)]);
        assert!(!s.saw_all(7));
        s.baseline(7);
        assert!(s.saw_all(7));
        s.observe(7, &[listen("0.0.0.0", 81, 2, 0, 4, 0)]);
        assert!(!s.saw_all(7), "a listener closed");
        assert!(!Sampler::new(&[80]).saw_all(7));
    }

    #[test]
    fn port_filter_and_request_attribution() {
        let mut s = Sampler::new(&[443]);
        s.observe(
            1,
            &[
                listen("::", 443, 1, 0, 128, 0),
                listen("127.0.0.1", 443, 2, 0, 128, 0),
                listen("0.0.0.0", 80, 3, 0, 128, 0),
                syn("127.0.0.1", 443),
                syn("10.1.1.1", 443),
                syn("10.1.1.1", 80),
            ],
        );
        let g = s.groups(1.0, |_| Vec::new());
        assert_eq!(g.len(), 2);
        let by = |a: &str| g.iter().find(|g| g.address == a.parse::<IpAddr>().unwrap()).unwrap();
        assert_eq!(by("127.0.0.1").syn_queue_peak, 1);
        assert_eq!(by("::").syn_queue_peak, 1);
    }
}
