//! `backlog-trace check`: the operator's diagnosis, automated.
//!
//! For every listener in every network namespace: its accept-queue limit against the
//! sysctls that cap it, how full it gets over a sampling window, whether the namespace's
//! drop counters move and which listener they belong to, and whether the owning
//! processes have CPU left. Needs no eBPF: sock_diag, /proc and sysctls only.
mod findings;
mod model;
mod procs;
mod render;
mod sample;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::sys::netns::{self, Inside, NetnsInfo};
use crate::sys::netstat::{self, Counters};
use model::{CounterDelta, NetnsReport, OwnerUse, Report};
use sample::Sampler;

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Only listeners on this local port (repeatable).
    #[arg(long = "port", short = 'p', value_parser = clap::value_parser!(u16).range(1..=65535))]
    pub ports: Vec<u16>,
    /// Only this network namespace: a name from `ip netns`, a path such as
    /// /proc/PID/ns/net, or an inode number (repeatable). Default: all of them.
    #[arg(long = "netns", value_parser = crate::sys::netns::parse_netns)]
    pub netns: Vec<u32>,
    /// How long to watch queues and counters (e.g. 2s, 500ms). Ten seconds, as with
    /// two `nstat` runs, catches bursts that a shorter look misses.
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub sample: Duration,
    /// Emit one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Returns the exit code: 0 healthy, 1 at least one warning. Errors mean the check
/// could not run (the caller exits 2).
pub fn run(args: &CheckArgs) -> anyhow::Result<i32> {
    let mut not_visible = Vec::new();
    let mut watched = open_namespaces(args, &mut not_visible)?;
    let mut sampler = Sampler::new(&args.ports);
    observe(&mut watched, &mut sampler)?;
    let mut scan = procs::owners_of(&sampler.inodes());
    let cpu_before: BTreeMap<i32, procs::CpuSample> =
        scan.owners.values().flatten().filter_map(|o| procs::cpu_sample(o.pid).map(|s| (o.pid, s))).collect();
    let counters_before = read_counters(&mut watched)?;
    let start = Instant::now();
    // On stderr in every mode: it tells a person (or a test) the window is open.
    eprintln!(
        "sampling {} network namespace(s) for {:.1}s (change with --sample)…",
        watched.len(),
        args.sample.as_secs_f64()
    );

    // Bounded: one dump per tick until the window closes, the last one at its end.
    let tick = (args.sample / 20).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut next = start;
    while next < start + args.sample {
        next = (next + tick).min(start + args.sample);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        observe(&mut watched, &mut sampler)?;
    }
    let counters_after = read_counters(&mut watched)?;
    let window = start.elapsed().as_secs_f64();
    let cpu: HashMap<i32, procs::CpuUse> = cpu_before
        .iter()
        .filter_map(|(&pid, before)| procs::cpu_sample(pid).map(|after| (pid, procs::cpu_use(before, &after))))
        .collect();

    // Listeners that appeared during the window were not in the first owner scan.
    let unowned = sampler.inodes().into_iter().filter(|i| !scan.owners.contains_key(i)).collect();
    let late = procs::owners_of(&unowned);
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

    let listeners = sampler.groups(window, |inode| {
        let owners = scan.owners.get(&inode).map(Vec::as_slice).unwrap_or_default();
        owners.iter().map(|o| OwnerUse { pid: o.pid, comm: o.comm.clone(), cpu: cpu.get(&o.pid).copied() }).collect()
    });
    let namespaces: Vec<NetnsReport> = watched
        .iter()
        .zip(counters_before.iter().zip(&counters_after))
        .map(|((info, inside), (before, after))| NetnsReport {
            inode: info.inode,
            name: info.name.clone(),
            sysctls: inside.sysctls.clone(),
            counters: deltas(before, after, window),
        })
        .collect();
    let findings = findings::analyze(&namespaces, &listeners);
    let exit_code = model::exit_code(&findings);
    let report = Report {
        schema_version: model::SCHEMA_VERSION,
        sample_seconds: window,
        namespaces,
        listeners,
        findings,
        not_visible,
        exit_code,
    };
    println!("{}", if args.json { render::json(&report) } else { render::text(&report) });
    Ok(exit_code)
}

/// Enters every requested namespace; the ones we may not enter are reported, not fatal.
fn open_namespaces(args: &CheckArgs, not_visible: &mut Vec<String>) -> anyhow::Result<Vec<(NetnsInfo, Inside)>> {
    let current = netns::current().context("cannot read /proc/self/ns/net (is /proc mounted?)")?;
    let all = netns::enumerate().context("cannot list /proc (is /proc mounted?)")?;
    let chosen: Vec<NetnsInfo> = if args.netns.is_empty() {
        if all.hidden_pids > 0 {
            not_visible.push(format!(
                "the network namespaces of {} process(es) we may not inspect ({})",
                all.hidden_pids,
                why_hidden()
            ));
        }
        all.namespaces
    } else {
        let mut chosen = Vec::new();
        for &want in &args.netns {
            match all.namespaces.iter().find(|n| n.inode == want) {
                Some(n) => chosen.push(n.clone()),
                None => bail!(
                    "network namespace {want} is not used by any process we can see nor named in /run/netns \
                     (check `ip netns list` and `lsns -t net`; run as root to see other users' processes)"
                ),
            }
        }
        chosen
    };
    let mut watched = Vec::new();
    for ns in chosen {
        match netns::enter(&ns, current) {
            Ok(inside) => watched.push((ns, inside)),
            Err(e) => {
                let name = ns.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
                not_visible.push(format!("netns {}{name}: could not enter it ({e}); needs root", ns.inode));
            }
        }
    }
    if watched.is_empty() {
        bail!("could not look into any network namespace ({}); run as root", not_visible.join("; "));
    }
    Ok(watched)
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

fn read_counters(watched: &mut [(NetnsInfo, Inside)]) -> anyhow::Result<Vec<Counters>> {
    watched
        .iter_mut()
        .map(|(info, inside)| inside.netstat.read().with_context(|| format!("reading netstat of netns {}", info.inode)))
        .collect()
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
