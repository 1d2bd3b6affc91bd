//! `backlog-trace check`: the operator's diagnosis, automated.
//!
//! For every listener in every network namespace: its accept-queue limit against the
//! sysctls that cap it, how full it gets over a sampling window, whether the namespace's
//! drop counters move and which listener they belong to, and whether the owning
//! processes have CPU left. Needs no eBPF: sock_diag, /proc and sysctls only.
mod cpu;
mod diagnosis;
mod findings;
mod render;
mod sample;
mod share;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sys::netns::{self, Inside, NetnsInfo};
use crate::sys::netstat::{self, Counters};
use crate::sys::procs;
use diagnosis::{CounterDelta, NetnsReport, OwnerUse, Report};
use sample::Sampler;

/// What `check` looks at and how it answers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Which listeners (ports, owners) in which namespaces; all when empty.
    pub filter: crate::model::Filter,
    /// How long to watch queues and counters.
    pub sample: Duration,
    /// One JSON document instead of text.
    pub json: bool,
}

/// Returns the exit code: 0 healthy, 1 at least one warning. Errors mean the check
/// could not run (the caller exits 2).
pub fn run(args: &Settings, out: &mut dyn std::io::Write) -> anyhow::Result<i32> {
    let mut not_visible = Vec::new();
    let mut watched = open_namespaces(&args.filter.netns, &mut not_visible)?;
    let mut sampler = Sampler::new(&args.filter.ports);
    observe(&mut watched, &mut sampler)?;
    let mut scan = procs::scan(Some(&sampler.inodes()));
    let cpu_before: BTreeMap<i32, cpu::CpuSample> = scan
        .owners
        .values()
        .flat_map(|o| o.keys())
        .filter_map(|&pid| cpu::cpu_sample(pid as i32).map(|s| (pid as i32, s)))
        .collect();
    let counters_before = counters_and_dump(&mut watched, &mut sampler, Edge::Start)?;
    let start = Instant::now();
    // On stderr in every mode: it tells a person (or a test) the window is open.
    eprintln!(
        "sampling {} network namespace(s) for {:.1}s (change with --sample)…",
        watched.len(),
        args.sample.as_secs_f64()
    );

    // Bounded: one dump per tick until the window closes, the last one (with the
    // counters) at its end.
    let tick = (args.sample / 20).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let end = start + args.sample;
    let mut next = start + tick;
    while next < end {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        observe(&mut watched, &mut sampler)?;
        next += tick;
    }
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let counters_after = counters_and_dump(&mut watched, &mut sampler, Edge::End)?;
    let window = start.elapsed().as_secs_f64();
    let cpu: HashMap<i32, cpu::CpuUse> = cpu_before
        .iter()
        .filter_map(|(&pid, before)| cpu::cpu_sample(pid).map(|after| (pid, cpu::cpu_use(before, &after))))
        .collect();

    // Listeners that appeared during the window were not in the first owner scan.
    let unowned = sampler.inodes().into_iter().filter(|i| !scan.owners.contains_key(i)).collect();
    let late = procs::scan(Some(&unowned));
    scan.owners.extend(late.owners);
    scan.unreadable = scan.unreadable.max(late.unreadable);
    if scan.unreadable > 0 {
        not_visible.push(format!(
            "the open files of {} process(es) we may not inspect, so some listeners' owners and their CPU use \
             ({})",
            scan.unreadable,
            why_hidden()
        ));
    }

    let mut listeners = sampler.groups(window, |inode| {
        let owners = scan.owners.get(&u64::from(inode)).into_iter().flatten();
        owners
            .map(|(&pid, comm)| {
                let pid = pid as i32;
                OwnerUse { pid, comm: comm.clone(), cpu: cpu.get(&pid).copied() }
            })
            .collect()
    });
    let mut namespaces: Vec<NetnsReport> = watched
        .iter()
        .zip(counters_before.iter().zip(&counters_after))
        .map(|((info, inside), (before, after))| NetnsReport {
            inode: info.inode,
            name: info.name.clone(),
            sysctls: inside.sysctls.clone(),
            counters: deltas(before, after, window),
            drops: Default::default(),
        })
        .collect();
    // Each listener's share of its namespace's ListenDrops, from the socket counters
    // of every listener seen there (before --pid narrows what is shown).
    for ns in &mut namespaces {
        let mine: Vec<usize> = (0..listeners.len()).filter(|&i| listeners[i].netns == ns.inode).collect();
        let rises: Vec<Option<u64>> = mine.iter().map(|&i| listeners[i].drops_window()).collect();
        let (shares, drops) = share::apportion(ns.delta("ListenDrops"), &rises, sampler.saw_all(ns.inode));
        for (&i, s) in mine.iter().zip(shares) {
            listeners[i].listen_drops = s;
        }
        ns.drops = drops;
    }
    // --pid keeps the listeners those processes hold (known once owners are).
    let pids = &args.filter.pids;
    if !pids.is_empty() {
        listeners.retain(|g| g.members.iter().flat_map(|m| &m.owners).any(|o| pids.contains(&(o.pid as u32))));
    }
    let findings = findings::analyze(&namespaces, &listeners);
    let exit_code = diagnosis::exit_code(&findings);
    let report = Report {
        schema_version: diagnosis::SCHEMA_VERSION,
        sample_seconds: window,
        namespaces,
        listeners,
        findings,
        not_visible,
        exit_code,
    };
    let text = if args.json { render::json(&report) } else { render::text(&report) };
    writeln!(out, "{text}").and_then(|()| out.flush()).context("writing the report")?;
    Ok(exit_code)
}

/// Enters every requested namespace; the ones we may not enter are reported, not fatal.
fn open_namespaces(netns_wanted: &[u32], not_visible: &mut Vec<String>) -> anyhow::Result<Vec<(NetnsInfo, Inside)>> {
    let opened = netns::open(netns_wanted)?;
    if opened.hidden_pids > 0 {
        not_visible.push(format!(
            "the network namespaces of {} process(es) we may not inspect ({})",
            opened.hidden_pids,
            why_hidden()
        ));
    }
    for (ns, e) in &opened.failed {
        let name = ns.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        not_visible.push(format!("netns {}{name}: could not enter it ({e}); needs root", ns.inode));
    }
    if opened.entered.is_empty() {
        bail!("could not look into any network namespace ({}); run as root", not_visible.join("; "));
    }
    Ok(opened.entered)
}

/// Why /proc hid something from us: without root it is other users' processes; as root
/// it is a process protected by a sandbox, an LSM or a different user namespace.
fn why_hidden() -> &'static str {
    // SAFETY: no arguments, cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        "protected even from root, e.g. by a sandbox or another user namespace"
    } else {
        "other users' processes need root"
    }
}

fn observe(watched: &mut [(NetnsInfo, Inside)], sampler: &mut Sampler) -> anyhow::Result<()> {
    for (info, inside) in watched {
        let entries = inside.diag.dump().with_context(|| format!("sock_diag dump in netns {}", info.inode))?;
        sampler.observe(info.inode, &entries);
    }
    Ok(())
}

/// Which end of the sampling window a reading is for.
#[derive(Clone, Copy, PartialEq)]
enum Edge {
    Start,
    End,
}

/// Per namespace, its TcpExt counters and a sock_diag dump read back to back, the
/// counters outside: the sockets' drop counters then cover the span of the TcpExt
/// deltas but for the microseconds between two reads, so that they can be set
/// against ListenDrops (share.rs).
fn counters_and_dump(
    watched: &mut [(NetnsInfo, Inside)],
    sampler: &mut Sampler,
    edge: Edge,
) -> anyhow::Result<Vec<Counters>> {
    let mut out = Vec::with_capacity(watched.len());
    for (info, inside) in watched {
        let read = |inside: &mut Inside| {
            inside.netstat.read().with_context(|| format!("reading netstat of netns {}", info.inode))
        };
        if edge == Edge::Start {
            out.push(read(inside)?);
        }
        let entries = inside.diag.dump().with_context(|| format!("sock_diag dump in netns {}", info.inode))?;
        sampler.observe(info.inode, &entries);
        match edge {
            Edge::Start => sampler.baseline(info.inode),
            Edge::End => out.push(read(inside)?),
        }
    }
    Ok(out)
}

fn deltas(before: &Counters, after: &Counters, window: f64) -> Vec<CounterDelta> {
    netstat::COUNTERS
        .iter()
        .map(|&name| {
            let (start, end) = (before[name], after[name]);
            let delta = end.saturating_sub(start);
            CounterDelta { name, start, end, delta, per_second: delta as f64 / window.max(1e-3) }
        })
        .collect()
}
