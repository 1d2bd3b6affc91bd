//! A traced run: the tracer watches some namespaces while a workload runs, and
//! the namespaces' kernel counters are read around it, so tests can compare the
//! tracer's numbers with the kernel's exactly.
use std::cell::OnceCell;
use std::time::Duration;

use crate::netns::{nft, Netns, Netstat, LISTEN_COUNTERS};
use crate::tracer::{DropEvent, Listener, Summary, Tracer};
use crate::wait_for;

/// Result of [`traced`]: counter deltas per namespace and the tracer's output.
pub struct Run {
    deltas: Vec<(u64, String, Netstat)>,
    tracer: Tracer,
    summary: OnceCell<Summary>,
}

/// Runs `workload` while `backlog-trace --netns <each namespace> <extra>` runs.
///
/// Sequence: tracer attached (start line) → counters before → workload →
/// fence (every TCP segment entering the namespaces is dropped by nftables, so
/// no listener there can drop anything more, e.g. from orphaned sockets still
/// retransmitting) → counters after, once stable → SIGINT, summary.
/// Between the two counter reads the tracer sees exactly the drops the kernel
/// counts.
pub fn traced(namespaces: &[&Netns], extra: &[&str], workload: impl FnOnce()) -> Run {
    traced_with(namespaces, extra, |_| workload())
}

/// [`traced`], with the running tracer handed to the workload (to act on it
/// from outside while it runs).
pub fn traced_with(namespaces: &[&Netns], extra: &[&str], workload: impl FnOnce(&mut Tracer)) -> Run {
    let mut args = Vec::new();
    for ns in namespaces {
        args.extend(["--netns", ns.name()]);
    }
    args.extend_from_slice(extra);
    let mut tracer = Tracer::start(&args);
    let before: Vec<Netstat> = namespaces.iter().map(|ns| ns.netstat()).collect();
    workload(&mut tracer);
    for ns in namespaces {
        fence(ns);
    }
    let deltas: Vec<(u64, String, Netstat)> = namespaces
        .iter()
        .zip(&before)
        .map(|(ns, before)| (ns.inode(), ns.name().to_string(), settled(ns).since(before)))
        .collect();
    for (inode, name, d) in &deltas {
        println!("netns {name} ({inode}) deltas: {d}");
    }
    let status = tracer.stop_sigint();
    assert!(status.success(), "backlog-trace ended with {status} after SIGINT; stderr:\n{}", tracer.stderr());
    Run { deltas, tracer, summary: OnceCell::new() }
}

/// Drops every TCP segment entering `ns` from now on: nothing more can happen at
/// its listeners.
pub fn fence(ns: &Netns) {
    nft(
        ns,
        "table inet bt_fence {\n\
         \tchain input { type filter hook input priority -300; policy accept; meta l4proto tcp drop; }\n\
         }\n",
    );
}

/// Counters once the listen counters stopped moving (two reads 300 ms apart
/// agree; bounded). Packets already past the fence are handled in softirq
/// within microseconds, so this settles at once in practice.
pub fn settled(ns: &Netns) -> Netstat {
    let key = |n: &Netstat| LISTEN_COUNTERS.map(|c| n.get(c));
    let mut prev = ns.netstat();
    wait_for(&format!("listen counters of {} to settle", ns.name()), Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = ns.netstat();
        let stable = key(&now) == key(&prev);
        prev = now;
        stable.then(|| prev.clone())
    })
}

impl Run {
    /// The namespace's counter increments over the traced window.
    pub fn delta(&self, ns: &Netns) -> &Netstat {
        let inode = ns.inode();
        self.deltas.iter().find(|(i, ..)| *i == inode).map(|(.., d)| d).expect("namespace was traced")
    }

    /// Fails unless the workload moved `counter` in `ns`: the scenario itself
    /// must provoke what it tests, or an exact comparison proves nothing.
    pub fn expect_kernel(&self, ns: &Netns, counter: &str) -> u64 {
        let n = self.delta(ns).get(counter);
        assert!(n > 0, "harness problem: the workload did not move {counter} in {}: {}", ns.name(), self.delta(ns));
        n
    }

    pub fn summary(&self) -> &Summary {
        self.summary.get_or_init(|| self.tracer.summary())
    }

    pub fn drops(&self) -> Vec<DropEvent> {
        self.tracer.drops()
    }

    /// What the tracer wrote on stderr.
    pub fn stderr(&self) -> String {
        self.tracer.stderr()
    }

    /// Summary entries of listeners in `ns`.
    pub fn listeners(&self, ns: &Netns) -> Vec<&Listener> {
        let inode = ns.inode();
        self.summary().listeners.iter().filter(|l| l.netns == inode).collect()
    }

    /// Summary entries for `port` in `ns` (several with SO_REUSEPORT).
    pub fn listeners_on(&self, ns: &Netns, port: u16) -> Vec<&Listener> {
        self.listeners(ns).into_iter().filter(|l| l.port == port).collect()
    }

    /// The one summary entry for `port` in `ns`.
    pub fn listener(&self, ns: &Netns, port: u16) -> &Listener {
        let found = self.listeners_on(ns, port);
        let [l] = found.as_slice() else {
            panic!(
                "expected one listener on port {port} in {} ({}), got {found:#?}\nsummary: {:#?}",
                ns.name(),
                ns.inode(),
                self.summary()
            );
        };
        l
    }

    /// The tracer's totals over `ns` equal the namespace's ListenDrops and
    /// ListenOverflows deltas exactly, and there were drops to count; every one of
    /// them was detected (undetected 0, a drop line each), and the tracer's own
    /// reading of the namespace's counters agrees with the test's.
    pub fn assert_exact(&self, ns: &Netns) {
        self.assert_counts(ns);
        let d = self.delta(ns);
        let s = self.summary();
        let lines = self.drops().iter().filter(|e| e.netns == ns.inode()).count() as u64;
        assert_eq!(
            lines,
            d.get("ListenDrops"),
            "drop lines vs ListenDrops in {} ({} lost events): every drop is detected as it happens",
            ns.name(),
            s.lost_events
        );
    }

    /// [`Run::assert_exact`] but for the drop lines: every count exact, every drop
    /// detected, whether or not the ring buffer had room for each drop's line.
    pub fn assert_counts(&self, ns: &Netns) {
        self.assert_totals(ns);
        let d = self.delta(ns);
        let s = self.summary();
        let n = s.netns(ns.inode());
        assert_eq!(
            (n.listen_drops, n.listen_overflows, n.reqq_full_drop),
            (d.get("ListenDrops"), d.get("ListenOverflows"), d.get("TCPReqQFullDrop")),
            "the tracer's reading of {}'s counters vs the test's (kernel deltas: {d}): {n:#?}",
            ns.name()
        );
        assert_eq!(
            (n.detected, n.undetected),
            (d.get("ListenDrops"), 0),
            "detected/undetected in {} (kernel deltas: {d}; diagnostics {:?}): {n:#?}",
            ns.name(),
            s.diagnostics
        );
    }

    /// Detected plus undetected drops over `ns` equal the namespace's ListenDrops
    /// delta exactly (whatever the tracer missed, it says so), and so does the
    /// tracer's own reading of the counters.
    pub fn assert_accounted(&self, ns: &Netns) {
        let d = self.delta(ns);
        let s = self.summary();
        let n = s.netns(ns.inode());
        let detected: u64 = self.listeners(ns).iter().map(|l| l.drops).sum();
        assert_eq!(n.detected, detected, "namespace vs listener totals in {}: {n:#?}", ns.name());
        assert_eq!(n.listen_drops, d.get("ListenDrops"), "the tracer's reading vs the test's: {n:#?}");
        assert_eq!(
            n.detected + n.undetected,
            d.get("ListenDrops"),
            "detected + undetected vs ListenDrops in {} (kernel deltas: {d}): {n:#?}",
            ns.name()
        );
    }

    /// Per listener sums over `ns` against ListenDrops and ListenOverflows.
    fn assert_totals(&self, ns: &Netns) {
        let ls = self.listeners(ns);
        let drops: u64 = ls.iter().map(|l| l.drops).sum();
        let overflows: u64 = ls.iter().map(|l| l.overflows).sum();
        let d = self.delta(ns);
        assert!(
            drops > 0,
            "tracer counted no drops in {}; kernel deltas: {d}\nsummary: {:#?}",
            ns.name(),
            self.summary()
        );
        let s = self.summary();
        assert_eq!(
            drops,
            d.get("ListenDrops"),
            "drops vs ListenDrops in {} (kernel deltas: {d}; tracer: {} lost events, {} skipped program runs): {ls:#?}",
            ns.name(),
            s.lost_events,
            s.missed_runs
        );
        assert_eq!(
            overflows,
            d.get("ListenOverflows"),
            "overflows vs ListenOverflows in {} (kernel deltas: {d}): {ls:#?}",
            ns.name()
        );
    }
}
