//! Closed listeners leave the model, their counts do not.
//!
//! A host that opens and closes listeners all day (tests, port-0 servers, short-lived
//! containers) would otherwise keep ~2.7 KB per listener ever seen. A closed listener
//! stays a row of its own for `Policy::keep_for` after its kernel entry is released, at
//! most `Policy::keep_max` of them (the oldest go first), so a final count is shown
//! and scraped at least once; then it is merged into an aggregate keyed like its
//! Prometheus series: namespace, port class, owner names, and whether it matched the
//! filters. Aggregates keep every count, so totals per namespace and per port still add
//! up, and there are at most `Policy::aggregates_max` of them (past that, merged
//! listeners go to one catch-all per namespace and filter match: reconciliation
//! compares each namespace's detected drops with its kernel counters).
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use backlog_common::{ListenerKey, ListenerStats};

use super::listener::{Filter, Listener};

/// Where a listener's counts are kept once it is merged, and the `port` label of its
/// Prometheus series for its whole life (so a merge never moves counts between series).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortClass {
    Port(u16),
    /// A port of the namespace's ip_local_port_range: bind(0) listeners take a new one
    /// each time, so a series per port would grow with every listener ever opened.
    Ephemeral,
    /// Listeners merged after `aggregates_max` aggregates existed (their namespace's
    /// catch-all).
    Other,
}

impl PortClass {
    pub fn label(self) -> String {
        match self {
            PortClass::Port(p) => p.to_string(),
            PortClass::Ephemeral => "ephemeral".into(),
            PortClass::Other => "other".into(),
        }
    }
}

/// How long and how many closed listeners stay individual, and how aggregates are keyed.
#[derive(Clone, Debug)]
pub struct Policy {
    pub keep_for: Duration,
    pub keep_max: usize,
    pub aggregates_max: usize,
    pub ephemeral: RangeInclusive<u16>,
    /// The session's filters: an aggregate records whether its listeners matched them,
    /// since owners (for --pid) are gone once listeners are merged.
    pub filters: Filter,
}

/// The kernel's default ip_local_port_range, used when it cannot be read.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            // Long enough for a Prometheus scrape interval or two and a person watching
            // the interval table; 1024 rows of ~2.7 KB bound the memory they take.
            keep_for: Duration::from_secs(60),
            keep_max: 1024,
            aggregates_max: 2048,
            ephemeral: DEFAULT_EPHEMERAL,
            filters: Filter::default(),
        }
    }
}

impl Policy {
    /// The defaults with this host's ephemeral port range and the session's filters.
    /// The range is the tracer's own namespace's; other namespaces usually share the
    /// default, and a listener outside the range just keeps a per-port aggregate.
    pub fn for_session(filters: &Filter) -> Policy {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some(it.next()??..=it.next()??)
        });
        Policy { ephemeral: range.unwrap_or(DEFAULT_EPHEMERAL), filters: filters.clone(), ..Policy::default() }
    }

    /// A port named by --port is never lumped with others: the user asked for it.
    pub fn class(&self, port: u16) -> PortClass {
        if self.ephemeral.contains(&port) && !self.filters.ports.contains(&port) {
            PortClass::Ephemeral
        } else {
            PortClass::Port(port)
        }
    }
}

/// Owner names as one label value: sorted, deduplicated, comma-joined.
pub fn comm_label(l: &Listener) -> String {
    let mut comms: Vec<&str> = l.owners.values().map(String::as_str).collect();
    comms.sort_unstable();
    comms.dedup();
    comms.join(",")
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggKey {
    pub netns: u32,
    pub port: PortClass,
    pub comm: String,
    pub matched: bool,
}

/// Merged closed listeners: their summed counts and wait buckets, the highest queue
/// peak and wait among them.
#[derive(Clone, Debug, Default)]
pub struct Aggregate {
    pub listeners: u64,
    /// A listener-shaped sum, so every renderer of listeners can render it.
    pub sum: Listener,
}

impl Aggregate {
    fn absorb(&mut self, l: &Listener) {
        let s = &mut self.sum;
        for (a, b) in s.drops.iter_mut().zip(l.drops) {
            *a += b;
        }
        s.accepts += l.accepts;
        s.abandoned += l.abandoned;
        if !l.wait.buckets.is_empty() {
            for (a, b) in s.wait.buckets_mut().iter_mut().zip(&l.wait.buckets) {
                *a += b;
            }
        }
        s.wait.max_ns = s.wait.max_ns.max(l.wait.max_ns);
        s.queue_peak = s.queue_peak.max(l.queue_peak);
        s.queue_max = s.queue_max.max(l.queue_max);
        self.listeners += 1;
    }

    /// Counts of a kernel entry that appeared after its listener was merged.
    fn absorb_late(&mut self, per_cpu: &[ListenerStats]) {
        let s = &mut self.sum;
        for st in per_cpu {
            for (a, b) in s.drops.iter_mut().zip(st.drops) {
                *a += b;
            }
            s.accepts += st.accepts;
            s.abandoned += st.abandoned;
        }
    }
}

/// Keys merged lately, to recognise a late kernel entry or event of one. A closed
/// listener's last counts arrive within its close(), long before the merge; this only
/// has to cover stragglers.
const MERGED_REMEMBERED: usize = 4096;

#[derive(Default)]
pub struct Retired {
    policy: Policy,
    /// Closed listeners whose kernel entry is gone, oldest first.
    released: VecDeque<(Instant, ListenerKey)>,
    /// The latest release of each key in `released`: an older queue entry of a key
    /// released again (listen() again on the same socket, a late entry) is stale.
    latest: HashMap<ListenerKey, Instant>,
    pub aggregates: BTreeMap<AggKey, Aggregate>,
    merged: HashMap<ListenerKey, AggKey>,
    merged_order: VecDeque<ListenerKey>,
    /// Socket inodes merged since the last sock_diag reading was folded in
    /// (`Model::listening`): a reading taken before such a listener closed still
    /// lists it, and must not bring it back.
    merged_lately: HashSet<u64>,
}

impl Retired {
    pub fn new(policy: Policy) -> Retired {
        Retired { policy, ..Retired::default() }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// `key`'s kernel entry was deleted (its counts are final in the model).
    pub fn released(&mut self, key: ListenerKey, now: Instant) {
        self.released.push_back((now, key));
        self.latest.insert(key, now);
    }

    /// Whether `key` was released and waits to be merged.
    pub fn is_released(&self, key: &ListenerKey) -> bool {
        self.latest.contains_key(key)
    }

    /// Closed listeners kept individually right now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.latest.len()
    }

    /// Merges the closed listeners that are past `keep_for` or over `keep_max`;
    /// returns how many it merged.
    /// `in_kernel` holds the keys that had a kernel entry at this sync: a listener
    /// with one (children of its close counted after the release) is released again
    /// once that entry is read and deleted, and merged then.
    pub fn merge_due(
        &mut self,
        listeners: &mut BTreeMap<ListenerKey, Listener>,
        in_kernel: &HashSet<ListenerKey>,
        now: Instant,
    ) -> usize {
        let mut merged = 0;
        while let Some(&(at, key)) = self.released.front() {
            let due = self.latest.len() > self.policy.keep_max || now.duration_since(at) >= self.policy.keep_for;
            if !due {
                break;
            }
            self.released.pop_front();
            if self.latest.get(&key) != Some(&at) {
                continue;
            }
            self.latest.remove(&key);
            // listen() again on the same socket: live again, not ours to merge.
            if in_kernel.contains(&key) || !listeners.get(&key).is_some_and(|l| l.closed) {
                continue;
            }
            let Some(l) = listeners.remove(&key) else { continue };
            let agg = self.key_for(&l);
            self.aggregates.entry(agg.clone()).or_default().absorb(&l);
            self.merged_lately.insert(key.ino);
            self.remember(key, agg);
            merged += 1;
        }
        merged
    }

    fn key_for(&self, l: &Listener) -> AggKey {
        let matched = l.matches(&self.policy.filters);
        let key = AggKey { netns: l.netns, port: self.policy.class(l.port), comm: comm_label(l), matched };
        if self.aggregates.len() < self.policy.aggregates_max || self.aggregates.contains_key(&key) {
            return key;
        }
        AggKey { netns: l.netns, port: PortClass::Other, comm: String::new(), matched }
    }

    fn remember(&mut self, key: ListenerKey, agg: AggKey) {
        if self.merged_order.len() >= MERGED_REMEMBERED {
            if let Some(old) = self.merged_order.pop_front() {
                self.merged.remove(&old);
            }
        }
        self.merged_order.push_back(key);
        self.merged.insert(key, agg);
    }

    /// Whether socket `ino` was merged since `forget_lately` (see `merged_lately`).
    pub fn merged_lately(&self, ino: u64) -> bool {
        self.merged_lately.contains(&ino)
    }

    pub fn forget_lately(&mut self) {
        self.merged_lately = HashSet::new();
    }

    pub fn was_merged(&self, key: &ListenerKey) -> bool {
        self.merged.contains_key(key)
    }

    /// Adds a kernel entry of an already merged listener to its aggregate; false if
    /// `key` is not a merged listener. The caller deletes the entry: every count in it
    /// is new, since the merge happened after the previous entry was deleted.
    pub fn absorb_late(&mut self, key: &ListenerKey, per_cpu: &[ListenerStats]) -> bool {
        let Some(agg) = self.merged.get(key) else { return false };
        if let Some(a) = self.aggregates.get_mut(agg) {
            a.absorb_late(per_cpu);
        }
        true
    }

    /// Adds each namespace's drops at merged listeners to `by_ns`.
    pub fn add_drops_by_ns(&self, by_ns: &mut HashMap<u32, u64>) {
        for (k, a) in &self.aggregates {
            *by_ns.entry(k.netns).or_default() += a.sum.total_drops();
        }
    }

    /// Aggregates of listeners that matched the session's filters.
    pub fn matching(&self) -> impl Iterator<Item = (&AggKey, &Aggregate)> {
        self.aggregates.iter().filter(|(k, _)| k.matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    fn closed(sk: u64, port: u16, drops: u64) -> Listener {
        let mut l =
            Listener { sk, sock_ino: sk + 1000, netns: 7, port, closed: true, accepts: 1, ..Default::default() };
        l.drops[0] = drops;
        l.wait.record(2_000);
        l.owners.insert(sk as u32, "srv".into());
        l
    }

    fn policy() -> Policy {
        Policy { keep_for: Duration::from_secs(10), keep_max: 3, aggregates_max: 4, ..Policy::default() }
    }

    fn sums(m: &Model) -> (u64, u64, u64) {
        let live = m.listeners.values().map(|l| (l.total_drops(), l.accepts, l.wait.count()));
        let merged = m.retired.aggregates.values().map(|a| (a.sum.total_drops(), a.sum.accepts, a.sum.wait.count()));
        live.chain(merged).fold((0, 0, 0), |s, x| (s.0 + x.0, s.1 + x.1, s.2 + x.2))
    }

    #[test]
    fn closed_listeners_merge_by_count_and_age_and_totals_stay() {
        let mut m = Model::default();
        m.retired = Retired::new(policy());
        let t0 = Instant::now();
        for sk in 1..=10u64 {
            let l = closed(sk, if sk <= 5 { 8080 } else { 40000 + sk as u16 }, sk);
            m.listeners.insert(l.key(), l.clone());
            m.retired.released(l.key(), t0);
        }
        let before = sums(&m);
        let none = HashSet::new();
        m.retired.merge_due(&mut m.listeners, &none, t0);
        // Over keep_max: the oldest 7 go, 3 stay individually.
        assert_eq!((m.listeners.len(), m.retired.kept()), (3, 3));
        assert_eq!(sums(&m), before);
        // Port 8080 keeps its own aggregate; ephemeral ports share one.
        let agg8080 =
            &m.retired.aggregates[&AggKey { netns: 7, port: PortClass::Port(8080), comm: "srv".into(), matched: true }];
        assert_eq!((agg8080.listeners, agg8080.sum.total_drops()), (5, 15));
        let eph = AggKey { netns: 7, port: PortClass::Ephemeral, comm: "srv".into(), matched: true };
        assert_eq!(m.retired.aggregates[&eph].listeners, 2);
        // Age: the rest go once keep_for has passed.
        m.retired.merge_due(&mut m.listeners, &none, t0 + Duration::from_secs(9));
        assert_eq!(m.listeners.len(), 3);
        m.retired.merge_due(&mut m.listeners, &none, t0 + Duration::from_secs(10));
        assert!(m.listeners.is_empty());
        assert_eq!(sums(&m), before);
        assert!(m.retired.was_merged(&ListenerKey { sk: 10, ino: 1010 }));
        // Reconciliation sees the merged drops in their namespace (1 + ... + 10).
        let mut by_ns = HashMap::new();
        m.retired.add_drops_by_ns(&mut by_ns);
        assert_eq!(by_ns, HashMap::from([(7, 55)]));
    }

    #[test]
    fn reopened_or_still_counted_listeners_are_not_merged() {
        let mut m = Model::default();
        m.retired = Retired::new(Policy { keep_max: 0, ..policy() });
        let t0 = Instant::now();
        let (a, b, c) = (closed(1, 80, 1), closed(2, 80, 1), closed(3, 80, 1));
        for l in [&a, &b, &c] {
            m.listeners.insert(l.key(), l.clone());
            m.retired.released(l.key(), t0);
        }
        // a listens again; b has a kernel entry again (children of its close).
        m.listeners.get_mut(&a.key()).unwrap().closed = false;
        let in_kernel: HashSet<_> = [b.key()].into();
        // c was released twice: the first queue entry is stale and skipped.
        m.retired.released(c.key(), t0 + Duration::from_secs(1));
        m.retired.merge_due(&mut m.listeners, &in_kernel, t0 + Duration::from_secs(1));
        assert!(m.listeners.contains_key(&a.key()) && m.listeners.contains_key(&b.key()));
        assert!(!m.listeners.contains_key(&c.key()));
        let agg = m.retired.aggregates.values().next().unwrap();
        assert_eq!(agg.listeners, 1, "c merged once");
        // b's entry is read and deleted later: released again, then merged.
        m.retired.released(b.key(), t0 + Duration::from_secs(2));
        m.retired.merge_due(&mut m.listeners, &HashSet::new(), t0 + Duration::from_secs(2));
        assert!(!m.listeners.contains_key(&b.key()));
        // A kernel entry that turns up after the merge adds to the aggregate.
        let late = ListenerStats { abandoned: 4, drops: [0, 0, 1, 0], ..Default::default() };
        assert!(m.retired.absorb_late(&b.key(), &[late]));
        assert!(!m.retired.absorb_late(&a.key(), &[late]));
        let agg = m.retired.aggregates.values().next().unwrap();
        assert_eq!((agg.listeners, agg.sum.abandoned, agg.sum.total_drops()), (2, 4, 3));
    }

    #[test]
    fn aggregates_are_bounded_and_pinned_ports_keep_theirs() {
        let filters = Filter { ports: vec![40001], ..Default::default() };
        let mut r = Retired::new(Policy { aggregates_max: 2, keep_max: 0, filters, ..policy() });
        let mut listeners = BTreeMap::new();
        let t0 = Instant::now();
        // 40001 is asked for by --port: its own class; the others do not match.
        for (sk, port) in [(1u64, 40001u16), (2, 81), (3, 82), (4, 83)] {
            let l = closed(sk, port, 1);
            r.released(l.key(), t0);
            listeners.insert(l.key(), l);
        }
        r.merge_due(&mut listeners, &HashSet::new(), t0);
        let keys: Vec<(PortClass, bool)> = r.aggregates.keys().map(|k| (k.port, k.matched)).collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.contains(&(PortClass::Port(40001), true)));
        assert!(keys.contains(&(PortClass::Other, false)));
        // The catch-all stays in the listeners' namespace, for reconciliation.
        assert!(r.aggregates.keys().all(|k| k.netns == 7));
        assert_eq!(r.matching().count(), 1);
        let total: u64 = r.aggregates.values().map(|a| a.listeners).sum();
        assert_eq!(total, 4);
    }
}
