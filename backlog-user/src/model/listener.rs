//! A listener as every output shows it: identity, owners, limits and the exact
//! counts, plus the filter that selects listeners for display.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use backlog_common::{hist, DropReason, ListenerKey, N_REASONS};

/// pid -> comm of every process holding a socket.
pub type Owners = BTreeMap<u32, String>;

/// A process that took connections from a listener by accept().
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acceptor {
    pub comm: String,
    pub accepts: u64,
}

/// Which listeners are shown: empty lists select everything. The kernel side counts
/// at every listener whatever this says (reconciliation compares whole namespaces).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub pids: Vec<u32>,
    pub netns: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
pub struct Listener {
    pub sk: u64,
    pub netns: u32,
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub sock_ino: u64,
    pub owners: Owners,
    /// pid -> the processes that took connections from it by accept(), which of
    /// the owners serve this socket (SO_REUSEPORT workers all hold every socket).
    pub acceptors: BTreeMap<u32, Acceptor>,
    /// Drops by peer address, exact from the kernel's per-peer counts (bounded by
    /// its PEERS map: drops of peers it had no room for are under no peer).
    pub peers: HashMap<IpAddr, u64>,
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
    /// Drops whose line `--max-drop-lines` held back (exact, from the kernel's
    /// per-listener counter; the drops themselves are in `drops`).
    pub suppressed: u64,
    /// Listen drops the kernel counted at this socket that the kernel side did not
    /// detect, placed here by the socket's own drop counter (`session::reconcile`).
    pub undetected: u64,
}

/// The exact per-listener counts the kernel keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub drops: [u64; N_REASONS],
    pub accepts: u64,
    pub abandoned: u64,
    pub suppressed: u64,
}

/// Accept-queue waits in the kernel's bucket layout (see `backlog_common::hist`).
#[derive(Clone, Debug, Default)]
pub struct Wait {
    /// Empty until the first wait: most listeners of a churning host never accept
    /// anything while they are in the model, and 232 buckets are 1.8 KB each.
    pub buckets: Vec<u64>,
    /// The waits accept events reported, by bucket (empty unless accept events are
    /// asked for: a recording, `--events`). Kept apart from `buckets` because the
    /// kernel's histogram, read at every sync, can already hold a wait whose event is
    /// still in the ring buffer: adding the event on top of the kernel's count would
    /// count that wait twice (seen in a guest: 22 waits for 20 accepts).
    events: Vec<u64>,
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
    /// A wait an accept event reported. Each bucket is the larger of the two
    /// sources' counts, both of which count subsets of the same waits.
    pub fn record(&mut self, ns: u64) {
        let b = hist::bucket(ns / 1000);
        if self.events.is_empty() {
            self.events = vec![0; hist::BUCKETS];
        }
        self.events[b] += 1;
        let n = self.events[b];
        let slot = &mut self.buckets_mut()[b];
        *slot = (*slot).max(n);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Raises each bucket to the kernel's count for it (never lowers one: see
    /// `Model::set_kernel_hist`).
    pub fn raise_to(&mut self, kernel: &[u64]) {
        for (have, k) in self.buckets_mut().iter_mut().zip(kernel) {
            *have = (*have).max(*k);
        }
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

    /// The `n` peers with most drops, most first (ties by address), and the drops
    /// of every other peer or of none.
    pub fn top_peers(&self, n: usize) -> (Vec<(IpAddr, u64)>, u64) {
        top_n(self.peers.iter().map(|(p, c)| (*p, *c)).collect(), n, self.total_drops())
    }

    /// Drops under no peer: the kernel counted them at this listener while its
    /// peer table had no room for their peer (`peers_full`). Computed from the whole
    /// table, not the shown peers, so it ties the two kernel counts together.
    pub fn drops_no_peer(&self) -> u64 {
        self.total_drops().saturating_sub(self.peers.values().sum())
    }

    /// Acceptors, most accepts first.
    pub fn acceptors_by_accepts(&self) -> Vec<(u32, &Acceptor)> {
        let mut v: Vec<(u32, &Acceptor)> = self.acceptors.iter().map(|(p, a)| (*p, a)).collect();
        v.sort_by(|a, b| b.1.accepts.cmp(&a.1.accepts).then(a.0.cmp(&b.0)));
        v
    }

    pub fn local(&self) -> String {
        fmt_sockaddr(self.addr, self.port)
    }

    pub fn matches(&self, f: &Filter) -> bool {
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

/// The `n` peers with most drops, most first, ties by address, and what `total`
/// counts beyond them (other peers' drops, and drops under no peer). Only the `n`
/// are sorted: a flood can leave thousands.
pub fn top_n(mut v: Vec<(IpAddr, u64)>, n: usize, total: u64) -> (Vec<(IpAddr, u64)>, u64) {
    let order = |a: &(IpAddr, u64), b: &(IpAddr, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > n && n > 0 {
        v.select_nth_unstable_by(n - 1, order);
    }
    v.truncate(n);
    v.sort_by(order);
    let rest = total.saturating_sub(v.iter().map(|(_, c)| c).sum());
    (v, rest)
}
