//! A traced run: the tracer watches some namespaces while a workload runs, and
//! the namespaces' kernel counters are read around it, so tests can compare the
//! tracer's numbers with the kernel's exactly.
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use crate::netns::{nft, veth_pair, Netns, Netstat, LISTEN_COUNTERS};
use serde::{Deserialize, Serialize};

use crate::tracer::{DropEvent, Listener, Summary, Tracer};
use crate::{require_root, wait_for};

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
    traced_sub(&[], namespaces, extra, workload)
}

/// [`traced_with`] with a subcommand (e.g. `record -o FILE`) before the options.
pub fn traced_sub(sub: &[&str], namespaces: &[&Netns], extra: &[&str], workload: impl FnOnce(&mut Tracer)) -> Run {
    let mut args = Vec::new();
    for ns in namespaces {
        args.extend(["--netns", ns.name()]);
    }
    args.extend_from_slice(extra);
    let mut tracer = Tracer::start_sub(sub, &args);
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

/// A server namespace and a client namespace joined by a veth pair, whose
/// client drops its own ACK-bearing segments (no SYN flag) to the server port,
/// so the server sees SYNs but never the final ACKs: handshakes stay half-open
/// until [`HeldAcks::release`]. How the suite makes final-ACK overflows.
pub struct HeldAcks {
    pub server_ns: Netns,
    pub client_ns: Netns,
    pub server_addr: String,
}

impl HeldAcks {
    pub fn new(syncookies: &str, port: u16) -> HeldAcks {
        require_root();
        let server_ns = Netns::new("srv");
        let client_ns = Netns::new("cli");
        let link = veth_pair(&server_ns, &client_ns);
        server_ns.sysctl("net.ipv4.tcp_syncookies", syncookies);
        nft(
            &client_ns,
            &format!(
                "table inet bt_hold {{\n\tchain output {{ type filter hook output priority 0; policy accept; \
                 tcp dport {port} tcp flags & (syn | ack) == ack drop; }}\n}}\n"
            ),
        );
        HeldAcks { server_ns, client_ns, server_addr: link.server_addr.to_string() }
    }

    /// Lets the held-back ACKs through from now on (retransmissions arrive).
    pub fn release(&self) {
        nft(&self.client_ns, "delete table inet bt_hold\n");
    }
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
    /// Everything the tracer printed on stdout, start line first.
    pub fn stdout(&self) -> Vec<String> {
        self.tracer.stdout()
    }

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
    ///
    /// With `$BACKLOG_COUNTS_FILE` set, the counts are first appended to that file
    /// as a JSON line, pass or fail (`cargo xtask stress` reads them).
    pub fn assert_exact(&self, ns: &Netns) {
        self.report_counts(ns);
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
        self.assert_peers(ns);
    }

    /// Each port's drops per peer, as the kernel's peer counts give them in the
    /// summary, equal the drop lines' peers: two separate paths (a map counted per
    /// drop, and one event per drop). Exact when every listener's peers fit its
    /// shown list (`drops_other_peers` 0); otherwise each shown peer has at most
    /// the lines' count (SO_REUSEPORT siblings can show a peer one of them drops
    /// less). Needs a line per drop, as `assert_exact` checks.
    pub fn assert_peers(&self, ns: &Netns) {
        let mut lines: BTreeMap<(u16, String), u64> = BTreeMap::new();
        for e in self.drops().iter().filter(|e| e.netns == ns.inode()) {
            let peer: std::net::SocketAddr =
                e.peer.parse().unwrap_or_else(|err| panic!("drop line peer {:?}: {err}", e.peer));
            *lines.entry((e.port, peer.ip().to_string())).or_default() += 1;
        }
        let listeners = self.listeners(ns);
        let mut counted: BTreeMap<(u16, String), u64> = BTreeMap::new();
        // A listener's drops under no peer are its drops (STATS) less every one of
        // its peers' (PEERS): none unless the peer table was full (`peers_full`).
        let full = self.summary().diagnostics.get("peers_full").copied().unwrap_or(0);
        let no_peer: u64 = listeners.iter().map(|l| l.drops_no_peer).sum();
        assert!(no_peer <= full, "{no_peer} drops under no peer, {full} found the peer table full: {listeners:#?}");
        for l in &listeners {
            for p in &l.dropped_peers {
                *counted.entry((l.port, p.peer.clone())).or_default() += p.drops;
            }
        }
        if listeners.iter().all(|l| l.drops_other_peers == 0) {
            assert_eq!(counted, lines, "drops per (port, peer) in {}: kernel counts vs drop lines", ns.name());
        } else {
            for (k, n) in &counted {
                let seen = lines.get(k).copied().unwrap_or(0);
                assert!(*n <= seen, "{k:?}: {n} drops in the kernel's peer counts, {seen} drop lines");
            }
        }
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

    /// [`Run::assert_counts`] when the kernel skipped none of the tracer's program
    /// runs. When it skipped some (its recursion guard: a run of the same program,
    /// or for kprobe and tracepoint programs any of them, already active on that CPU,
    /// which preemptible softirqs on PREEMPT_RT make more likely; counted per program
    /// and shown as `missed_runs`), each can hide a drop: every drop must still be
    /// accounted for, detected or shown undetected, and the shortfall be at most the
    /// skipped runs. For workloads heavy enough to meet that (thousands of clients
    /// retransmitting SYNs on timers); the others stay strict. Returns whether the
    /// counts were exact (not short).
    pub fn assert_counts_or_short_by_missed_runs(&self, ns: &Netns) -> bool {
        let s = self.summary();
        let drops: u64 = self.listeners(ns).iter().map(|l| l.drops).sum();
        let kernel = self.delta(ns).get("ListenDrops");
        if crate::short_by_missed_runs("drops", drops, kernel, s.missed_runs) {
            // Short, but every missing drop is shown as undetected.
            self.assert_accounted(ns);
            return false;
        }
        self.assert_counts(ns);
        true
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

    /// [`Run::assert_exact`] for a run under `--max-drop-lines`: every drop is a
    /// line or a suppressed one (lines + suppressed = ListenDrops), the counts exact.
    /// Counts reported to `$BACKLOG_COUNTS_FILE` as `assert_exact` does. Short only
    /// by what skipped program runs account for, every missing drop then shown as
    /// undetected (a PREEMPT_RT guest in kprobe mode skips runs under bursts).
    pub fn assert_exact_over_budget(&self, ns: &Netns) {
        let c = self.report_counts(ns);
        if !self.assert_counts_or_short_by_missed_runs(ns) {
            return;
        }
        assert_eq!(
            c.lines + c.suppressed + c.lost_events,
            c.kernel,
            "lines + suppressed + lost vs ListenDrops in {}: {c}",
            ns.name()
        );
    }

    /// The counts of `ns`, appended to `$BACKLOG_COUNTS_FILE` when it is set, as a
    /// JSON line, before any assertion can fail (`cargo xtask stress` reads them).
    fn report_counts(&self, ns: &Netns) -> Counts {
        let c = self.counts(ns);
        let Some(path) = std::env::var_os(COUNTS_FILE_VAR) else { return c };
        let line = serde_json::to_string(&c).expect("counts serialize") + "\n";
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot append to ${COUNTS_FILE_VAR} {}: {e}", path.to_string_lossy()));
        f.write_all(line.as_bytes()).unwrap_or_else(|e| panic!("write ${COUNTS_FILE_VAR}: {e}"));
        c
    }

    /// The tracer's and the kernel's numbers for `ns` over the traced window.
    pub fn counts(&self, ns: &Netns) -> Counts {
        let inode = ns.inode();
        let ls = self.listeners(ns);
        let d = self.delta(ns);
        let s = self.summary();
        Counts {
            netns: ns.name().to_string(),
            kernel: d.get("ListenDrops"),
            tracer: ls.iter().map(|l| l.drops).sum(),
            lines: self.drops().iter().filter(|e| e.netns == inode).count() as u64,
            suppressed: ls.iter().map(|l| l.suppressed_lines).sum(),
            kernel_overflows: d.get("ListenOverflows"),
            tracer_overflows: ls.iter().map(|l| l.overflows).sum(),
            lost_events: s.lost_events,
            missed_runs: s.missed_runs,
            undetected: s.netns(inode).undetected,
            diagnostics: s.diagnostics.clone(),
        }
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
            "drops vs ListenDrops in {} (kernel deltas: {d}; tracer: {} lost events, {} skipped program runs, \
             diagnostics {:?}, namespace {:?}): {ls:#?}",
            ns.name(),
            s.lost_events,
            s.missed_runs,
            s.diagnostics,
            s.namespaces.iter().find(|n| n.netns == ns.inode())
        );
        assert_eq!(
            overflows,
            d.get("ListenOverflows"),
            "overflows vs ListenOverflows in {} (kernel deltas: {d}): {ls:#?}",
            ns.name()
        );
    }
}

/// Environment variable naming the file [`Run::assert_exact`] appends its
/// [`Counts`] to.
pub const COUNTS_FILE_VAR: &str = "BACKLOG_COUNTS_FILE";

/// One namespace's figures from a traced run: what the tracer detected and
/// reported against what the kernel counted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Counts {
    pub netns: String,
    /// ListenDrops delta.
    pub kernel: u64,
    /// Drops in the tracer's summary, over the namespace's listeners.
    pub tracer: u64,
    /// `{"type":"drop"}` lines in the namespace.
    pub lines: u64,
    /// Drops whose line `--max-drop-lines` held back (0 without it).
    #[serde(default)]
    pub suppressed: u64,
    /// ListenOverflows delta.
    pub kernel_overflows: u64,
    pub tracer_overflows: u64,
    pub lost_events: u64,
    pub missed_runs: u64,
    pub undetected: u64,
    pub diagnostics: BTreeMap<String, u64>,
}

impl Counts {
    pub fn is_exact(&self) -> bool {
        self.kernel > 0
            && self.lines + self.suppressed == self.kernel
            && self.tracer == self.kernel
            && self.tracer_overflows == self.kernel_overflows
            && self.undetected == 0
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nonzero: Vec<String> =
            self.diagnostics.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
        write!(
            f,
            "tracer {}, lines {}{}, kernel {} (overflows: tracer {}, kernel {}), lost_events {}, missed_runs {}, \
             undetected {}, diagnostics {}",
            self.tracer,
            self.lines,
            if self.suppressed > 0 { format!(" (+{} suppressed)", self.suppressed) } else { String::new() },
            self.kernel,
            self.tracer_overflows,
            self.kernel_overflows,
            self.lost_events,
            self.missed_runs,
            self.undetected,
            if nonzero.is_empty() { "all 0".to_string() } else { nonzero.join(" ") }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Counts;

    fn counts(undetected: u64, diagnostics: &[(&str, u64)]) -> Counts {
        Counts {
            netns: "ns".into(),
            kernel: 5,
            tracer: 5,
            lines: 5,
            suppressed: 0,
            kernel_overflows: 4,
            tracer_overflows: 4,
            lost_events: 0,
            missed_runs: 0,
            undetected,
            diagnostics: diagnostics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn exact_means_every_drop_detected_and_shown() {
        let c = counts(0, &[("windows_replaced", 0)]);
        assert!(c.is_exact());
        assert!(c.to_string().ends_with("undetected 0, diagnostics all 0"), "{c}");
        assert!(!counts(1, &[]).is_exact());
        let c = counts(0, &[("windows_replaced", 0), ("stats_full", 2)]);
        assert!(c.to_string().ends_with("undetected 0, diagnostics stats_full=2"), "{c}");
        assert!(!Counts { lines: 4, ..counts(0, &[]) }.is_exact());
        // Under --max-drop-lines a drop is a line or a suppressed one.
        let budget = Counts { lines: 4, suppressed: 1, ..counts(0, &[]) };
        assert!(budget.is_exact());
        assert!(budget.to_string().starts_with("tracer 5, lines 4 (+1 suppressed), kernel 5"), "{budget}");
        assert!(!Counts { lines: 4, suppressed: 2, ..counts(0, &[]) }.is_exact());
        assert!(!Counts { kernel: 0, tracer: 0, lines: 0, ..counts(0, &[]) }.is_exact());
    }
}
