//! The report as text for a terminal, or as one JSON document.
use crate::escape::escape;
use std::fmt::Write;

use super::diagnosis::{ListenerGroup, Member, Report};

pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("report serializes")
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "backlog-trace check: {} listener(s) in {} network namespace(s), sampled over {:.1}s",
        r.listeners.len(),
        r.namespaces.len(),
        r.sample_seconds
    );
    for ns in &r.namespaces {
        let name = ns.name.as_deref().map(|n| format!(" ({})", escape(n))).unwrap_or_default();
        let _ = writeln!(s, "\nnetns {}{name}", ns.inode);
        let sysctls: Vec<String> = ns
            .sysctls
            .entries()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.map_or("?".to_string(), |v| v.to_string())))
            .collect();
        let _ = writeln!(s, "  sysctls: {}", sysctls.join(" "));
        let counters: Vec<String> =
            ns.counters.iter().map(|c| format!("{} +{} ({:.1}/s)", c.name, c.delta, c.per_second)).collect();
        let _ = writeln!(s, "  counters: {}", counters.join(", "));
        let d = &ns.drops;
        if let Some(sock) = d.socket_drops.filter(|&n| n > 0 || d.listen_drops > 0) {
            let why = match d.socket_excess {
                Some(0) => " (one per listen drop)".to_string(),
                Some(e) => format!(
                    " ({e} beyond ListenDrops: a final-ACK overflow at a pending request counts twice there, other \
                     discards once)"
                ),
                None => " (not every listener was watched throughout: shares are upper bounds)".to_string(),
            };
            let _ = writeln!(s, "  listeners' own drop counters: +{sock}{why}");
        }
        for g in r.listeners.iter().filter(|g| g.netns == ns.inode) {
            listener(&mut s, g);
        }
    }
    if r.findings.is_empty() && r.listeners.is_empty() {
        let _ = writeln!(s, "\nNo findings: no TCP listeners in the namespaces checked.");
    } else if r.findings.is_empty() {
        let _ = writeln!(s, "\nNo findings: every listener shown has headroom.");
    } else {
        let _ = writeln!(s, "\nFindings:");
        for f in &r.findings {
            let _ = writeln!(s, "  {:<8} [netns {}] {}", f.severity.label(), f.netns, f.summary);
            let _ = writeln!(s, "           evidence: {}", f.evidence);
            let _ = writeln!(s, "           fix: {}", f.fix);
        }
    }
    if !r.not_visible.is_empty() {
        let _ = writeln!(s, "\nNot visible in this run:");
        for n in &r.not_visible {
            let _ = writeln!(s, "  - {n}");
        }
    }
    s
}

fn listener(s: &mut String, g: &ListenerGroup) {
    let group = if g.reuseport { format!(" SO_REUSEPORT group of {}", g.members.len()) } else { String::new() };
    let drops = if g.listen_drops.max > 0 { format!("  listen drops {}", g.listen_drops) } else { String::new() };
    let _ = writeln!(
        s,
        "  LISTEN {}{group}  syn-queue now {} peak {}{drops}",
        g.endpoint(),
        g.syn_queue_now,
        g.syn_queue_peak
    );
    for m in &g.members {
        let _ = writeln!(s, "    {}", member(m));
    }
}

fn member(m: &Member) -> String {
    let drops = match (m.drops_window, m.drops_total) {
        (Some(w), Some(t)) => format!("drop counter +{w} (total {t})"),
        _ => "drops ?".into(),
    };
    let owners: Vec<String> = m
        .owners
        .iter()
        .map(|o| match o.cpu {
            Some(c) => format!(
                "{}[{}] cpu {:.0}% (busiest thread {:.0}%)",
                escape(&o.comm),
                o.pid,
                c.total_percent,
                c.busiest_thread_percent
            ),
            None => format!("{}[{}]", escape(&o.comm), o.pid),
        })
        .collect();
    let owners = if owners.is_empty() { "owner not visible".to_string() } else { owners.join(", ") };
    format!(
        "inode {}: limit {} queue now {} peak {} full {:.1}s  {drops}  {owners}",
        m.inode, m.limit, m.queue_now, m.queue_peak, m.full_seconds
    )
}
