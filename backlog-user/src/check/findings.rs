//! Turns the measurements into findings: what is wrong, the evidence, what to change.
use crate::escape::escape;
use std::collections::BTreeMap;

use super::diagnosis::{Finding, ListenerGroup, NetnsReport, Severity};

/// Since Linux 5.4 the kernel default; a lower somaxconn is a deliberate or inherited cap.
const DEFAULT_SOMAXCONN: u32 = 4096;
/// A SO_REUSEPORT member with a queue this short overflows on a modest burst.
const SMALL_MEMBER_LIMIT: u32 = 128;
/// A thread this busy (percent of one CPU) is not keeping up with accept().
const SATURATED_PERCENT: f64 = 90.0;

pub fn analyze(namespaces: &[NetnsReport], listeners: &[ListenerGroup]) -> Vec<Finding> {
    let mut out = Vec::new();
    for ns in namespaces {
        let mine: Vec<&ListenerGroup> = listeners.iter().filter(|g| g.netns == ns.inode).collect();
        for g in &mine {
            capped(ns, g, &mut out);
            filling(ns, g, &mut out);
            small_reuseport(ns, g, &mut out);
        }
        drops(ns, &mine, &mut out);
        syn_queue(ns, &mut out);
        abort_on_overflow(ns, &mut out);
    }
    saturated(listeners, &mut out);
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

fn finding(sev: Severity, kind: &'static str, netns: u32, g: Option<&ListenerGroup>) -> Finding {
    Finding {
        severity: sev,
        kind,
        netns,
        listener: g.map(ListenerGroup::endpoint),
        summary: String::new(),
        evidence: String::new(),
        fix: String::new(),
    }
}

fn capped(ns: &NetnsReport, g: &ListenerGroup, out: &mut Vec<Finding>) {
    let Some(max) = ns.sysctls.somaxconn else {
        return;
    };
    if !g.members.iter().any(|m| m.limit == max) {
        return;
    }
    let sev = if max < DEFAULT_SOMAXCONN { Severity::Warning } else { Severity::Info };
    let mut f = finding(sev, "capped_by_somaxconn", ns.inode, Some(g));
    f.summary = format!("{} accept queue is capped by net.core.somaxconn at {max}", g.endpoint());
    f.evidence = format!(
        "limit {max} = net.core.somaxconn {max}. The kernel uses min(listen backlog, somaxconn), \
         so the application probably asked for more (nginx and Node ask for 511) and was cut to {max} without an error"
    );
    f.fix = if max < DEFAULT_SOMAXCONN {
        format!(
            "raise it in this namespace (sysctl -w net.core.somaxconn={DEFAULT_SOMAXCONN}; persist it in /etc/sysctl.d/, \
             or in the container's/pod's sysctls), then restart the service so it calls listen() again"
        )
    } else {
        "nothing to do unless this listener drops; then raise somaxconn and the listen backlog together".into()
    };
    out.push(f);
}

fn filling(ns: &NetnsReport, g: &ListenerGroup, out: &mut Vec<Finding>) {
    for m in &g.members {
        let pct = f64::from(m.queue_peak) * 100.0 / f64::from(m.limit.max(1));
        let (sev, what) = if m.samples_full > 0 {
            (Severity::Critical, format!("was full {:.1}s of the window", m.full_seconds))
        } else if pct >= 80.0 {
            (Severity::Warning, format!("reached {pct:.0}% of its limit"))
        } else if pct >= 50.0 {
            (Severity::Info, format!("reached {pct:.0}% of its limit"))
        } else {
            continue;
        };
        let mut f = finding(sev, "accept_queue_filling", ns.inode, Some(g));
        f.summary = format!("{} accept queue {what}", g.endpoint());
        f.evidence = format!(
            "socket inode {}: peak {} of limit {}, full in {} of {} samples; owner {}",
            m.inode,
            m.queue_peak,
            m.limit,
            m.samples_full,
            m.samples,
            owners_text(&m.owners)
        );
        f.fix = "the application accepts more slowly than connections arrive: if its workers are busy, add workers \
                 or CPU; if they are idle, raise the listen backlog (and net.core.somaxconn if it caps it)"
            .into();
        out.push(f);
    }
}

fn small_reuseport(ns: &NetnsReport, g: &ListenerGroup, out: &mut Vec<Finding>) {
    let largest = g.members.iter().map(|m| m.limit).max().unwrap_or(0);
    if !g.reuseport || largest > SMALL_MEMBER_LIMIT {
        return;
    }
    let mut f = finding(Severity::Warning, "reuseport_small_members", ns.inode, Some(g));
    f.summary = format!(
        "{} is a SO_REUSEPORT group of {} sockets, each with its own queue of at most {largest}",
        g.endpoint(),
        g.members.len()
    );
    let limits: Vec<String> = g.members.iter().map(|m| m.limit.to_string()).collect();
    f.evidence = format!(
        "member limits {}; the kernel hashes each connection to one member and never rebalances, \
         so one slow worker overflows its own queue while the others sit idle",
        limits.join(", ")
    );
    f.fix = "give every member the full headroom: raise the listen backlog per socket and net.core.somaxconn".into();
    out.push(f);
}

fn drops(ns: &NetnsReport, mine: &[&ListenerGroup], out: &mut Vec<Finding>) {
    let c = |name| ns.counters.iter().find(|c| c.name == name);
    let (Some(over), Some(drop)) = (c("ListenOverflows"), c("ListenDrops")) else {
        return;
    };
    if over.delta == 0 && drop.delta == 0 {
        return;
    }
    let mut f = finding(Severity::Critical, "listen_drops", ns.inode, None);
    let rates = format!(
        "ListenOverflows +{} ({:.1}/s), ListenDrops +{} ({:.1}/s)",
        over.delta, over.per_second, drop.delta, drop.per_second
    );
    // Every listen drop also bumps the socket's own drop counter, which names the culprit.
    let dropping: Vec<(&ListenerGroup, u64)> =
        mine.iter().filter_map(|g| g.drops_window().filter(|&d| d > 0).map(|d| (*g, d))).collect();
    match dropping.as_slice() {
        [(g, d)] => {
            f.listener = Some(g.endpoint());
            f.summary = format!("{} is dropping connections: its accept queue overflows", g.endpoint());
            f.evidence = format!("{rates} in this namespace; the drop counter of {} itself rose by {d}", g.endpoint());
        }
        [] => {
            // No socket counter moved: the dropping listener was closed, filtered out by --port,
            // or not visible. Fall back to the ones seen full.
            let full: Vec<String> =
                mine.iter().filter(|g| g.members.iter().any(|m| m.samples_full > 0)).map(|g| g.endpoint()).collect();
            f.summary = match full.as_slice() {
                [one] => {
                    f.listener = Some(one.clone());
                    format!("{one} is probably dropping connections (it was seen full)")
                }
                [] => "listen drops in this namespace, but no listener shown here accounts for them".into(),
                many => format!("listen drops in this namespace; ambiguous between {}", many.join(", ")),
            };
            f.evidence = format!("{rates}; no listener's own drop counter rose");
        }
        many => {
            let each: Vec<String> = many.iter().map(|(g, d)| format!("{} +{d}", g.endpoint())).collect();
            f.summary = format!("{} listeners are dropping connections", many.len());
            f.evidence = format!("{rates}; per listener: {}", each.join(", "));
        }
    }
    f.fix = "the listener does not accept() fast enough: if its workers are busy (see CPU), add workers or CPU; \
             if they are idle, raise the listen backlog and net.core.somaxconn"
        .into();
    out.push(f);
}

fn syn_queue(ns: &NetnsReport, out: &mut Vec<Finding>) {
    let cookies = ns.delta("SyncookiesSent").max(ns.delta("TCPReqQFullDoCookies"));
    let dropped = ns.delta("TCPReqQFullDrop");
    let show = |v: Option<u32>| v.map_or("unknown".to_string(), |v| v.to_string());
    let evidence = format!(
        "SyncookiesSent +{}, TCPReqQFullDoCookies +{}, TCPReqQFullDrop +{dropped}; tcp_max_syn_backlog={}, tcp_syncookies={}",
        ns.delta("SyncookiesSent"),
        ns.delta("TCPReqQFullDoCookies"),
        show(ns.sysctls.tcp_max_syn_backlog),
        show(ns.sysctls.tcp_syncookies)
    );
    if dropped > 0 {
        let mut f = finding(Severity::Critical, "syn_queue_drops", ns.inode, None);
        f.summary = format!("{dropped} SYNs dropped because a SYN queue was full and syncookies could not be used");
        f.evidence = evidence.clone();
        f.fix = "enable syncookies (sysctl -w net.ipv4.tcp_syncookies=1) and raise net.ipv4.tcp_max_syn_backlog \
                 and the listen backlog, which also bounds the SYN queue"
            .into();
        out.push(f);
    }
    if cookies > 0 {
        let mut f = finding(Severity::Warning, "syncookies", ns.inode, None);
        f.summary = format!("syncookies fired {cookies} times: a SYN queue overflowed");
        f.evidence = evidence;
        f.fix = "with legitimate traffic, raise the listen backlog and net.ipv4.tcp_max_syn_backlog (cookie \
                 connections lose TCP options such as window scaling); under a SYN flood, cookies are doing their job"
            .into();
        out.push(f);
    }
}

fn abort_on_overflow(ns: &NetnsReport, out: &mut Vec<Finding>) {
    if ns.sysctls.tcp_abort_on_overflow != Some(1) {
        return;
    }
    let mut f = finding(Severity::Warning, "abort_on_overflow", ns.inode, None);
    f.summary = "net.ipv4.tcp_abort_on_overflow=1: clients get a RST when an accept queue is full".into();
    f.evidence = "with 0 the kernel silently drops the handshake's last ACK and the client retries; with 1 it \
                  resets the connection, so a momentary burst becomes 'connection reset by peer' errors"
        .into();
    f.fix =
        "sysctl -w net.ipv4.tcp_abort_on_overflow=0, unless clients are known to fail over faster on a reset".into();
    out.push(f);
}

fn saturated(listeners: &[ListenerGroup], out: &mut Vec<Finding>) {
    // One finding per process, however many sockets it owns.
    let mut busy: BTreeMap<i32, (u32, String, f64, f64, Vec<String>)> = BTreeMap::new();
    for g in listeners {
        for o in g.members.iter().flat_map(|m| &m.owners) {
            let Some(cpu) = o.cpu.filter(|c| c.busiest_thread_percent >= SATURATED_PERCENT) else {
                continue;
            };
            let e = busy.entry(o.pid).or_insert_with(|| {
                (g.netns, o.comm.clone(), cpu.busiest_thread_percent, cpu.total_percent, Vec::new())
            });
            if !e.4.contains(&g.endpoint()) {
                e.4.push(g.endpoint());
            }
        }
    }
    for (pid, (netns, comm, thread, total, endpoints)) in busy {
        let mut f = finding(Severity::Warning, "owner_saturated", netns, None);
        let comm = escape(&comm);
        f.summary = format!("{comm} (pid {pid}) is CPU-bound: its busiest thread ran at {thread:.0}% of a CPU");
        f.evidence = format!("process total {total:.0}% over the window; it owns {}", endpoints.join(", "));
        f.fix = "add workers or CPU, or find what makes the workers slow; a deeper accept queue would only add latency"
            .into();
        out.push(f);
    }
}

fn owners_text(owners: &[super::diagnosis::OwnerUse]) -> String {
    if owners.is_empty() {
        return "not visible".into();
    }
    owners.iter().map(|o| format!("{}[{}]", escape(&o.comm), o.pid)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::diagnosis::{CounterDelta, Member};
    use crate::sys::sysctl::Sysctls;

    fn ns(somaxconn: u32, abort: u32, counters: &[(&'static str, u64)]) -> NetnsReport {
        NetnsReport {
            inode: 9,
            name: None,
            sysctls: Sysctls {
                somaxconn: Some(somaxconn),
                tcp_max_syn_backlog: Some(512),
                tcp_syncookies: Some(1),
                tcp_abort_on_overflow: Some(abort),
            },
            counters: counters
                .iter()
                .map(|&(name, delta)| CounterDelta { name, start: 0, end: delta, delta, per_second: delta as f64 })
                .collect(),
        }
    }

    fn group(port: u16, limits: &[u32], peak: u32, drops: u32) -> ListenerGroup {
        ListenerGroup {
            netns: 9,
            address: "0.0.0.0".parse().unwrap(),
            port,
            reuseport: limits.len() > 1,
            members: limits
                .iter()
                .map(|&limit| Member {
                    inode: 1,
                    limit,
                    queue_now: 0,
                    queue_peak: peak,
                    samples: 10,
                    samples_full: u32::from(peak > limit),
                    full_seconds: 0.1,
                    drops_total: Some(drops),
                    drops_window: Some(drops),
                    owners: Vec::new(),
                })
                .collect(),
            syn_queue_now: 0,
            syn_queue_peak: 0,
        }
    }

    fn kinds(f: &[Finding]) -> Vec<&'static str> {
        f.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn healthy_is_silent() {
        let f = analyze(&[ns(4096, 0, &[("ListenOverflows", 0), ("ListenDrops", 0)])], &[group(80, &[511], 3, 0)]);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn capped_listener_is_a_warning() {
        let f = analyze(&[ns(128, 0, &[])], &[group(80, &[128], 0, 0)]);
        assert_eq!(kinds(&f), ["capped_by_somaxconn"]);
        assert_eq!(f[0].severity, Severity::Warning);
        assert!(f[0].summary.contains("capped by net.core.somaxconn at 128"));
        assert_eq!(crate::check::diagnosis::exit_code(&f), 1);
    }

    #[test]
    fn drops_name_the_only_dropping_listener() {
        let counters = [("ListenOverflows", 7), ("ListenDrops", 7)];
        let f = analyze(&[ns(4096, 0, &counters)], &[group(80, &[4], 5, 7), group(81, &[4], 0, 0)]);
        let d = f.iter().find(|f| f.kind == "listen_drops").unwrap();
        assert_eq!(d.listener.as_deref(), Some("0.0.0.0:80"));
        assert!(d.evidence.contains("ListenOverflows +7"));
    }

    #[test]
    fn drops_without_socket_counters_are_ambiguous() {
        let counters = [("ListenOverflows", 3), ("ListenDrops", 3)];
        let f = analyze(&[ns(4096, 0, &counters)], &[group(80, &[4], 5, 0), group(81, &[4], 5, 0)]);
        let d = f.iter().find(|f| f.kind == "listen_drops").unwrap();
        assert_eq!(d.listener, None);
        assert!(d.summary.contains("ambiguous"), "{}", d.summary);
    }

    #[test]
    fn a_saturated_owner_is_named_once() {
        use crate::check::cpu::CpuUse;
        use crate::check::diagnosis::OwnerUse;
        let cpu = CpuUse { total_percent: 130.0, busiest_thread_percent: 97.0, threads: 4 };
        let mut groups = [group(80, &[511], 0, 0), group(443, &[511], 0, 0)];
        for g in &mut groups {
            g.members[0].owners = vec![OwnerUse { pid: 42, comm: "nginx".into(), cpu: Some(cpu) }];
        }
        let f = analyze(&[ns(4096, 0, &[])], &groups);
        assert_eq!(kinds(&f), ["owner_saturated"]);
        assert!(f[0].summary.contains("nginx (pid 42)") && f[0].summary.contains("97%"), "{}", f[0].summary);
        assert!(f[0].evidence.contains("0.0.0.0:80, 0.0.0.0:443"), "{}", f[0].evidence);
    }

    #[test]
    fn reuseport_syncookies_and_abort() {
        let f = analyze(&[ns(4096, 1, &[("SyncookiesSent", 2)])], &[group(80, &[64, 64, 64, 64], 0, 0)]);
        let mut k = kinds(&f);
        k.sort();
        assert_eq!(k, ["abort_on_overflow", "reuseport_small_members", "syncookies"]);
    }
}
