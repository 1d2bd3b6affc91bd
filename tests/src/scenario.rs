//! A traced run: the tracer watches some namespaces while a workload runs, and
//! the namespaces' kernel counters are read around it, so tests can compare the
//! tracer's numbers with the kernel's exactly.
use std::cell::OnceCell;
use std::io::Write;
use std::time::Duration;

use crate::netns::{nft, Netns, Netstat, LISTEN_COUNTERS};
use serde::{Deserialize, Serialize};

use crate::tracer::{json_count, DropEvent, Listener, Summary, Tracer};
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
    let mut args = Vec::new();
    for ns in namespaces {
        args.extend(["--netns", ns.name()]);
    }
    args.extend_from_slice(extra);
    let mut tracer = Tracer::start(&args);
    let before: Vec<Netstat> = namespaces.iter().map(|ns| ns.netstat()).collect();
    workload();
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

fn fence(ns: &Netns) {
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
fn settled(ns: &Netns) -> Netstat {
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

    /// The tracer's and the kernel's numbers for `ns` over the traced window.
    pub fn counts(&self, ns: &Netns) -> Counts {
        let inode = ns.inode();
        let ls = self.listeners(ns);
        let d = self.delta(ns);
        let s = self.summary();
        // A total when the tracer reports one, else the listeners' own figures;
        // None when it reports neither (an older tracer: unknown, not 0).
        let undetected = s.undetected.as_ref().and_then(json_count).or_else(|| {
            let per_listener: Vec<u64> = ls.iter().filter_map(|l| l.undetected.as_ref().and_then(json_count)).collect();
            (!per_listener.is_empty()).then(|| per_listener.iter().sum())
        });
        Counts {
            netns: ns.name().to_string(),
            kernel: d.get("ListenDrops"),
            tracer: ls.iter().map(|l| l.drops).sum(),
            lines: self.drops().iter().filter(|e| e.netns == inode).count() as u64,
            kernel_overflows: d.get("ListenOverflows"),
            tracer_overflows: ls.iter().map(|l| l.overflows).sum(),
            lost_events: s.lost_events,
            missed_runs: s.missed_runs,
            undetected,
            diagnostics: s.diagnostics.clone(),
        }
    }

    /// Every drop in `ns` was detected: the tracer's drop lines, its totals and
    /// its overflows equal the namespace's ListenDrops and ListenOverflows
    /// deltas exactly, nothing is reported undetected, and there were drops.
    ///
    /// With `$BACKLOG_COUNTS_FILE` set, the counts are first appended to that
    /// file as a JSON line, pass or fail (`cargo xtask stress` reads them).
    pub fn assert_exact(&self, ns: &Netns) {
        let c = self.counts(ns);
        if let Some(path) = std::env::var_os(COUNTS_FILE_VAR) {
            let line = serde_json::to_string(&c).expect("counts serialize") + "\n";
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot append to ${COUNTS_FILE_VAR} {}: {e}", path.to_string_lossy()));
            f.write_all(line.as_bytes()).unwrap_or_else(|e| panic!("write ${COUNTS_FILE_VAR}: {e}"));
        }
        assert!(
            c.is_exact(),
            "not exact in {}: {c} (kernel deltas: {})\nsummary: {:#?}",
            ns.name(),
            self.delta(ns),
            self.listeners(ns)
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
    /// ListenOverflows delta.
    pub kernel_overflows: u64,
    pub tracer_overflows: u64,
    pub lost_events: u64,
    pub missed_runs: u64,
    /// None when the tracer does not report it.
    pub undetected: Option<u64>,
    pub diagnostics: Option<serde_json::Value>,
}

impl Counts {
    pub fn is_exact(&self) -> bool {
        self.kernel > 0
            && self.lines == self.kernel
            && self.tracer == self.kernel
            && self.tracer_overflows == self.kernel_overflows
            && self.undetected.unwrap_or(0) == 0
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let na = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        write!(
            f,
            "tracer {}, lines {}, kernel {} (overflows: tracer {}, kernel {}), lost_events {}, missed_runs {}, \
             undetected {}, diagnostics {}",
            self.tracer,
            self.lines,
            self.kernel,
            self.tracer_overflows,
            self.kernel_overflows,
            self.lost_events,
            self.missed_runs,
            na(self.undetected.map(|u| u.to_string())),
            na(self.diagnostics.as_ref().map(nonzero))
        )
    }
}

/// A diagnostics object as its non-zero counters, `name=value` (nested names
/// joined by dots), or "all 0".
fn nonzero(v: &serde_json::Value) -> String {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&name, v, out);
                }
            }
            serde_json::Value::Number(n) if n.as_f64() == Some(0.0) => {}
            other => out.push(format!("{prefix}={other}")),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    if out.is_empty() {
        "all 0".into()
    } else {
        out.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::Counts;

    fn counts(undetected: Option<u64>, diagnostics: Option<serde_json::Value>) -> Counts {
        Counts {
            netns: "ns".into(),
            kernel: 5,
            tracer: 5,
            lines: 5,
            kernel_overflows: 4,
            tracer_overflows: 4,
            lost_events: 0,
            missed_runs: 0,
            undetected,
            diagnostics,
        }
    }

    #[test]
    fn unknown_undetected_is_not_zero_but_does_not_fail() {
        let c = counts(None, None);
        assert!(c.is_exact());
        assert!(c.to_string().ends_with("undetected n/a, diagnostics n/a"), "{c}");
        assert!(!counts(Some(1), None).is_exact());
        let d = serde_json::json!({"windows_replaced": 0, "per_cpu": {"stats_full": 2}});
        assert!(counts(Some(0), Some(d)).to_string().ends_with("undetected 0, diagnostics per_cpu.stats_full=2"));
        assert!(!Counts { lines: 4, ..counts(None, None) }.is_exact());
    }
}
