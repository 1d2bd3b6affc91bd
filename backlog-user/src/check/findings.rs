//! Turns the measurements into findings: what is wrong, the evidence, what to change.
use crate::escape::escape;
use std::collections::BTreeMap;

use super::cpu::CpuUse;
use super::diagnosis::{Finding, ListenerGroup, Member, NetnsReport, OwnerUse, Severity};
use super::share::Share;

/// Since Linux 5.4 the kernel default; a lower somaxconn is a deliberate or inherited cap.
const DEFAULT_SOMAXCONN: u32 = 4096;
/// A SO_REUSEPORT member with a queue this short overflows on a modest burst.
const SMALL_MEMBER_LIMIT: u32 = 128;
/// A thread this busy (percent of one CPU) is not keeping up with accept().
const SATURATED_PERCENT: f64 = 90.0;
/// A process below this (percent of one CPU, all threads) over the window did next
/// to nothing: with its queue full throughout, it is not accepting at all. The
/// resolution is one clock tick (1% over a second, 0.1% over ten).
const IDLE_PERCENT: f64 = 1.0;

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

/// What the owners' CPU and the queue's fill over the window say about a
/// listener that fills or drops.
enum Owners {
    /// Idle owners, queue full in every sample: the application stopped accepting.
    Stuck { who: String, cpu: f64, samples: u32 },
    /// A thread of an owner at the limit of a CPU: workers cannot keep up.
    Busy { who: String, thread: f64 },
    /// Owners with CPU to spare, queue not always full: bursts outrun accept().
    Headroom { who: String, thread: f64 },
    /// No owner, or one whose CPU could not be read.
    Unknown,
}

fn owners_state(g: &ListenerGroup) -> Owners {
    let mut owners: Vec<&OwnerUse> = g.members.iter().flat_map(|m| &m.owners).collect();
    owners.sort_by_key(|o| o.pid);
    owners.dedup_by_key(|o| o.pid);
    let cpus: Vec<CpuUse> = owners.iter().filter_map(|o| o.cpu).collect();
    if owners.is_empty() || cpus.len() < owners.len() {
        return Owners::Unknown;
    }
    let who = owners_text(&owners.iter().map(|o| (*o).clone()).collect::<Vec<_>>());
    let thread = cpus.iter().map(|c| c.busiest_thread_percent).fold(0.0, f64::max);
    let total = cpus.iter().map(|c| c.total_percent).fold(0.0, f64::max);
    // Full in every sample of a member that was sampled more than once.
    let always_full = g.members.iter().find(|m| m.samples > 1 && m.samples_full == m.samples);
    match always_full {
        Some(m) if total < IDLE_PERCENT => Owners::Stuck { who, cpu: total, samples: m.samples },
        _ if thread >= SATURATED_PERCENT => Owners::Busy { who, thread },
        _ => Owners::Headroom { who, thread },
    }
}

/// The fix for a listener whose queue fills or drops, from its owners' state.
fn advice(g: &ListenerGroup) -> String {
    match owners_state(g) {
        Owners::Stuck { who, cpu, samples } => format!(
            "the application is stuck, not slow: {who} used {cpu:.1}% CPU while the queue was full in all {samples} \
             samples, so it is not calling accept() at all. A deeper queue would only make clients wait longer for \
             the same timeout: find what it is blocked on (its threads' stacks: /proc/PID/task/*/stack, gdb, py-spy; \
             a lock, a dependency, a full disk) or restart it"
        ),
        Owners::Busy { who, thread } => format!(
            "the workers cannot keep up: {who}'s busiest thread ran at {thread:.0}% of a CPU. Add workers or CPU \
             (or make each request cheaper); a deeper queue only rides out bursts, adding latency"
        ),
        Owners::Headroom { who, thread } => format!(
            "bursts outrun accept(): {who} has CPU to spare (busiest thread {thread:.0}%) and the queue was not full \
             throughout. Raise the listen backlog (and net.core.somaxconn if it caps it) to absorb the bursts, or \
             accept in more threads"
        ),
        Owners::Unknown => "the owners' CPU use could not be read: if its workers are busy, add workers or CPU; if \
                            they are idle while the queue stays full, the application is stuck (a deeper queue would \
                            only add latency); otherwise raise the listen backlog and net.core.somaxconn"
            .into(),
    }
}

/// One finding per listener (a SO_REUSEPORT group is one listener), naming the
/// members that filled.
fn filling(ns: &NetnsReport, g: &ListenerGroup, out: &mut Vec<Finding>) {
    let level = |m: &Member| {
        let pct = f64::from(m.queue_peak) * 100.0 / f64::from(m.limit.max(1));
        if m.samples_full > 0 {
            Some(Severity::Critical)
        } else if pct >= 80.0 {
            Some(Severity::Warning)
        } else if pct >= 50.0 {
            Some(Severity::Info)
        } else {
            None
        }
    };
    let filled: Vec<&Member> = g.members.iter().filter(|m| level(m).is_some()).collect();
    let Some(sev) = filled.iter().filter_map(|m| level(m)).max() else {
        return;
    };
    let worst = filled
        .iter()
        .max_by(|a, b| a.full_seconds.total_cmp(&b.full_seconds).then(a.queue_peak.cmp(&b.queue_peak)))
        .expect("one member filled");
    let what = if worst.samples_full > 0 {
        format!("was full {:.1}s of the window", worst.full_seconds)
    } else {
        format!("reached {:.0}% of its limit", f64::from(worst.queue_peak) * 100.0 / f64::from(worst.limit.max(1)))
    };
    let mut f = finding(sev, "accept_queue_filling", ns.inode, Some(g));
    f.summary = if g.reuseport {
        format!(
            "{} (SO_REUSEPORT group of {}): {} member queue(s) filled; the fullest {what}",
            g.endpoint(),
            g.members.len(),
            filled.len()
        )
    } else {
        format!("{} accept queue {what}", g.endpoint())
    };
    if let Owners::Stuck { .. } = owners_state(g) {
        f.summary.push_str(" and its owner is idle: the application is not accepting");
    }
    let each: Vec<String> = filled
        .iter()
        .map(|m| {
            format!(
                "socket inode {}: peak {} of limit {}, full in {} of {} samples",
                m.inode, m.queue_peak, m.limit, m.samples_full, m.samples
            )
        })
        .collect();
    let owners: Vec<OwnerUse> = {
        let mut o: Vec<OwnerUse> = g.members.iter().flat_map(|m| m.owners.iter().cloned()).collect();
        o.sort_by_key(|o| o.pid);
        o.dedup_by_key(|o| o.pid);
        o
    };
    f.evidence = format!("{}; owner {}", each.join("; "), owners_cpu_text(&owners));
    f.fix = advice(g);
    out.push(f);
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
    // What the socket counters say beyond ListenDrops, and why (share.rs).
    let counted = match (ns.drops.socket_drops, ns.drops.socket_excess) {
        (Some(d), Some(0)) => format!("; the listeners' own drop counters rose by {d}, one per listen drop"),
        (Some(d), Some(e)) => format!(
            "; the listeners' own drop counters rose by {d}: {} listen drops and {e} more, because a socket counts \
             a final-ACK overflow at a pending request twice (the drop, then the segment's discard) and a few other \
             discards once, so at most {} of the listen drops were such overflows",
            drop.delta,
            e.min(over.delta)
        ),
        (Some(d), None) => format!(
            "; the drop counters of the listeners watched rose by {d}, but not every listener of the namespace was \
             watched throughout (--port, or listeners opened or closed), so the shares below are upper bounds"
        ),
        (None, _) => "; the kernel reported no socket drop counters".into(),
    };
    // Dropping: a listener whose share may be above 0.
    let dropping: Vec<&ListenerGroup> = mine.iter().copied().filter(|g| g.listen_drops.max > 0).collect();
    match dropping.as_slice() {
        [g] => {
            f.listener = Some(g.endpoint());
            f.summary = if g.listen_drops == (Share { min: drop.delta, max: drop.delta }) {
                format!(
                    "{} dropped {} connection attempt(s): all of this namespace's ListenDrops",
                    g.endpoint(),
                    drop.delta
                )
            } else {
                format!("{} dropped {} of this namespace's {} listen drops", g.endpoint(), g.listen_drops, drop.delta)
            };
            f.evidence = format!("{rates}{counted}");
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
            let each: Vec<String> = many.iter().map(|g| format!("{} {}", g.endpoint(), g.listen_drops)).collect();
            f.summary = format!("{} listener(s) are dropping connections", many.len());
            f.evidence = format!("{rates}{counted}; share of ListenDrops per listener: {}", each.join(", "));
        }
    }
    f.fix = match dropping.as_slice() {
        [g] => advice(g),
        _ => advice_many(&dropping),
    };
    out.push(f);
}

/// Advice for several dropping listeners: each one's, named.
fn advice_many(groups: &[&ListenerGroup]) -> String {
    if groups.is_empty() {
        return "find the listener (backlog-trace names it per drop); then: if its workers are busy, add workers or \
                CPU; if they are idle while its queue stays full, the application is stuck; otherwise raise the \
                listen backlog and net.core.somaxconn"
            .into();
    }
    groups.iter().map(|g| format!("{}: {}", g.endpoint(), advice(g))).collect::<Vec<_>>().join(" | ")
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
        let options = match ns.sysctls.tcp_timestamps {
            Some(0) => "cookie connections lose window scaling, SACK and ECN here: net.ipv4.tcp_timestamps=0, and \
                        the kernel can carry them in a cookie only inside the timestamp option"
                .to_string(),
            Some(t) => format!(
                "with net.ipv4.tcp_timestamps={t} the kernel carries window scaling, SACK and ECN in the cookie's \
                 timestamp, so only clients that send no TCP timestamps lose them"
            ),
            None => "cookie connections lose window scaling and SACK only where TCP timestamps are off (not \
                     readable here: net.ipv4.tcp_timestamps)"
                .to_string(),
        };
        f.fix = format!(
            "with legitimate traffic, raise the listen backlog and net.ipv4.tcp_max_syn_backlog ({options}); under \
             a SYN flood, cookies are doing their job"
        );
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

/// Owners with their CPU use over the window, where it was read.
fn owners_cpu_text(owners: &[OwnerUse]) -> String {
    if owners.is_empty() {
        return "not visible".into();
    }
    let each: Vec<String> = owners
        .iter()
        .map(|o| match o.cpu {
            Some(c) => format!("{}[{}] at {:.1}% CPU", escape(&o.comm), o.pid, c.total_percent),
            None => format!("{}[{}] (CPU not readable)", escape(&o.comm), o.pid),
        })
        .collect();
    each.join(", ")
}

fn owners_text(owners: &[OwnerUse]) -> String {
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
                tcp_timestamps: Some(1),
            },
            counters: counters
                .iter()
                .map(|&(name, delta)| CounterDelta { name, start: 0, end: delta, delta, per_second: delta as f64 })
                .collect(),
            drops: Default::default(),
        }
    }

    /// `analyze` as check::run calls it: the shares of ListenDrops set first.
    fn analyze(namespaces: &[NetnsReport], groups: &[ListenerGroup]) -> Vec<Finding> {
        let (mut namespaces, mut groups) = (namespaces.to_vec(), groups.to_vec());
        for ns in &mut namespaces {
            let rises: Vec<Option<u64>> = groups.iter().map(ListenerGroup::drops_window).collect();
            let (shares, drops) = crate::check::share::apportion(ns.delta("ListenDrops"), &rises, true);
            for (g, s) in groups.iter_mut().zip(shares) {
                g.listen_drops = s;
            }
            ns.drops = drops;
        }
        super::analyze(&namespaces, &groups)
    }

    fn idle(pid: i32, percent: f64) -> OwnerUse {
        let cpu = CpuUse { total_percent: percent, busiest_thread_percent: percent, threads: 1 };
        OwnerUse { pid, comm: "app".into(), cpu: Some(cpu) }
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
            listen_drops: Share { min: 0, max: 0 },
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
        assert!(d.summary.contains("dropped 7 connection attempt(s): all of"), "{}", d.summary);
    }

    #[test]
    fn final_ack_overflows_counted_twice_by_the_socket_are_explained() {
        // 179 listen drops; the socket's counter rose by 227 (48 final-ACK
        // overflows at pending requests count twice there).
        let counters = [("ListenOverflows", 179), ("ListenDrops", 179)];
        let f = analyze(&[ns(4096, 0, &counters)], &[group(80, &[4], 5, 227), group(81, &[4], 0, 0)]);
        let d = f.iter().find(|f| f.kind == "listen_drops").unwrap();
        assert!(d.summary.contains("0.0.0.0:80 dropped 179 connection attempt(s)"), "{}", d.summary);
        assert!(d.evidence.contains("rose by 227: 179 listen drops and 48 more"), "{}", d.evidence);
        assert!(!d.summary.contains("227"), "{}", d.summary);
    }

    #[test]
    fn a_reuseport_group_is_one_finding() {
        let counters = [("ListenOverflows", 12), ("ListenDrops", 12)];
        let g = group(80, &[4, 4, 4], 5, 4);
        let f = analyze(&[ns(4096, 0, &counters)], &[g]);
        let per_listener: Vec<&Finding> = f.iter().filter(|f| f.listener.as_deref() == Some("0.0.0.0:80")).collect();
        let mut k: Vec<&str> = per_listener.iter().map(|f| f.kind).collect();
        k.sort();
        assert_eq!(k, ["accept_queue_filling", "listen_drops", "reuseport_small_members"], "{f:#?}");
        let fill = per_listener.iter().find(|f| f.kind == "accept_queue_filling").unwrap();
        assert!(fill.summary.contains("SO_REUSEPORT group of 3): 3 member queue(s) filled"), "{}", fill.summary);
        assert_eq!(fill.evidence.matches("socket inode").count(), 3, "{}", fill.evidence);
    }

    #[test]
    fn advice_follows_the_owner_cpu_and_the_fill() {
        let counters = [("ListenOverflows", 5), ("ListenDrops", 5)];
        let with = |owner: OwnerUse, full: u32| {
            let mut g = group(80, &[4], 5, 5);
            g.members[0].samples_full = full;
            g.members[0].owners = vec![owner];
            analyze(&[ns(4096, 0, &counters)], &[g])
        };
        let fix = |f: &[Finding], kind: &str| f.iter().find(|f| f.kind == kind).unwrap().fix.clone();
        // Idle, full in all 10 samples: stuck.
        let f = with(idle(7, 0.0), 10);
        assert!(fix(&f, "listen_drops").contains("stuck, not slow"), "{f:#?}");
        assert!(fix(&f, "listen_drops").contains("only make clients wait longer"), "{f:#?}");
        let fill = f.iter().find(|f| f.kind == "accept_queue_filling").unwrap();
        assert!(fill.summary.contains("not accepting"), "{}", fill.summary);
        // Idle but not always full: bursts, the backlog helps.
        assert!(fix(&with(idle(7, 0.0), 3), "listen_drops").contains("Raise the listen backlog"));
        // Busy: workers.
        assert!(fix(&with(idle(7, 99.0), 10), "listen_drops").contains("Add workers or CPU"));
        // Unreadable CPU: both, conditionally.
        let unknown = OwnerUse { pid: 7, comm: "app".into(), cpu: None };
        assert!(fix(&with(unknown, 10), "listen_drops").contains("could not be read"));
    }

    #[test]
    fn cookie_wording_follows_tcp_timestamps() {
        let mut n = ns(4096, 0, &[("SyncookiesSent", 2)]);
        let fix = |n: &NetnsReport| analyze(std::slice::from_ref(n), &[])[0].fix.clone();
        assert!(fix(&n).contains("only clients that send no TCP timestamps lose them"), "{}", fix(&n));
        n.sysctls.tcp_timestamps = Some(0);
        assert!(fix(&n).contains("lose window scaling, SACK and ECN here"), "{}", fix(&n));
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
