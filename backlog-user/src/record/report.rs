//! `backlog-trace report`: replays recordings (replay.rs) into the live session's
//! model and prints it with the live renderers, then what only a recording can tell:
//! a per-second timeline, the peers that lost most connections, and the sysctls and
//! namespace counters around the session.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use backlog_common::DropReason;
use serde_json::{json, Value};

use super::format::Recording;
use super::replay::{replay_files, FileResult, Replay, Second};
use crate::model::{Filter, Listener};
use crate::output::{json as json_out, rows, text};
use crate::time::{fmt_utc, TimeSpec};

/// What `report` reads and prints.
#[derive(Clone, Debug)]
pub struct ReportSettings {
    /// One file, or a rotated set in any order.
    pub files: Vec<PathBuf>,
    /// Which listeners; each list given replaces the recording's own.
    pub filter: Filter,
    pub since: Option<TimeSpec>,
    pub until: Option<TimeSpec>,
    pub json: bool,
    pub hist: bool,
    /// Listeners a table lists before summing the rest (0: all).
    pub top: usize,
}

pub fn run(args: &ReportSettings, w: &mut dyn Write) -> Result<i32> {
    let (mut replay, results) = replay_files(&args.files, (args.since, args.until))?;
    let Some(session) = replay.session.clone() else {
        bail!(
            "no complete session record in {}: the recording was cut before its first record",
            args.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    };

    let windowed = replay.window != (None, None);
    if !windowed {
        replay.apply_exact_counters();
    }
    replay.attribute();
    let f = &args.filter;
    let filters = Filter {
        ports: given_or(&f.ports, &session.filter.ports),
        pids: given_or(&f.pids, &session.filter.pids),
        netns: given_or(&f.netns, &session.filter.netns),
    };
    let selected: Vec<&Listener> = replay.model.matching(&filters).collect();
    let secs = replay.duration_s();
    let timeline = timeline(&replay, &selected, &filters);
    let peers = top_peers(&replay, &selected, 10);
    let table = rows(&replay.model, &filters, args.top);
    let namespaces = namespaces(&replay);

    let mut w = std::io::BufWriter::new(w);
    (|| -> std::io::Result<()> {
        if args.json {
            json_out::line(&mut w, &recording_json(&replay, &session, &results, windowed))?;
            json_out::summary(&mut w, &replay.model, &table, secs, args.hist)?;
            json_out::line(&mut w, &timeline_json(&session, &timeline))?;
            let peers: Vec<Value> = peers.iter().map(|(p, n)| json!({"peer": p.to_string(), "drops": n})).collect();
            json_out::line(&mut w, &json!({"type": "peers", "top": peers}))?;
            let ns: Vec<Value> = namespaces.iter().map(NamespaceView::json).collect();
            json_out::line(&mut w, &json!({"type": "namespaces", "namespaces": ns}))?;
        } else {
            text_header(&mut w, &replay, &session, &results, windowed)?;
            text::summary(&mut w, &replay.model, &table, secs, args.hist)?;
            text_sections(&mut w, &session, &timeline, &peers, &namespaces)?;
        }
        w.flush()
    })()
    .context("writing the report")?;
    Ok(0)
}

/// A filter list given on the command line, else the recording's own.
fn given_or<T: Clone>(given: &[T], recorded: &[T]) -> Vec<T> {
    if given.is_empty() { recorded } else { given }.to_vec()
}

/// Seconds with activity at the selected listeners, merged over listeners.
fn timeline(r: &Replay, rows: &[&Listener], f: &Filter) -> BTreeMap<u64, Second> {
    let mut out: BTreeMap<u64, Second> = BTreeMap::new();
    for l in rows {
        for (sec, s) in r.timeline.get(&l.key()).into_iter().flatten() {
            out.entry(*sec).or_default().merge(s);
        }
    }
    // Queue samples cover listeners that never dropped or accepted too; those in
    // the model must pass the filters (owners included), others port and netns.
    for ((netns, ino), (port, secs)) in &r.queues {
        let known = r.model.listeners.values().find(|l| l.netns == *netns && l.sock_ino == *ino);
        let wanted = match known {
            Some(l) => rows.iter().any(|x| x.key() == l.key()),
            None => {
                f.pids.is_empty()
                    && (f.ports.is_empty() || f.ports.contains(port))
                    && (f.netns.is_empty() || f.netns.contains(netns))
            }
        };
        if wanted {
            // An empty queue is no activity: it would list every sampled second.
            for (sec, peak) in secs.iter().filter(|(_, p)| **p > 0) {
                let s = out.entry(*sec).or_default();
                s.queue_peak = s.queue_peak.max(*peak);
            }
        }
    }
    out
}

fn top_peers(r: &Replay, rows: &[&Listener], n: usize) -> Vec<(IpAddr, u64)> {
    let mut all: HashMap<IpAddr, u64> = HashMap::new();
    for l in rows {
        for (p, c) in r.peers.get(&l.key()).into_iter().flatten() {
            *all.entry(*p).or_default() += c;
        }
    }
    let mut v: Vec<(IpAddr, u64)> = all.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

fn recording_json(r: &Replay, s: &Recording, files: &[FileResult], windowed: bool) -> Value {
    let files: Vec<Value> = files
        .iter()
        .map(|f| {
            json!({
                "path": f.path.display().to_string(),
                "records": f.records,
                "stopped_at": f.damage.as_ref().map(|d| d.offset),
                "stopped_because": f.damage.as_ref().map(|d| d.reason),
            })
        })
        .collect();
    json!({
        "type": "recording",
        "mode": s.mode,
        "kernel": s.kernel,
        "scope": s.scope,
        "start": fmt_utc(s.id),
        "end": fmt_utc(r.wall(r.last_ts)),
        "clean_end": r.clean_end,
        "since": r.window.0.map(fmt_utc),
        "until": r.window.1.map(fmt_utc),
        "counts_from": if windowed { "events in the window" } else { "kernel counters" },
        "files": files,
        "left_out": r.left_out.as_ref().map(|l| json!({
            "records": l.records,
            "bytes": l.bytes,
            "capped_records": l.capped_records,
            "capped_bytes": l.capped_bytes,
            "rotations": l.rotations,
            "short_preambles": l.short_preambles,
            "preamble_listeners_max": l.listeners_max,
            "preamble_reconciles": l.reconciles,
        })),
        "listeners_missing": r.preamble_missing,
    })
}

fn timeline_json(s: &Recording, t: &BTreeMap<u64, Second>) -> Value {
    let rows: Vec<Value> = t
        .iter()
        .map(|(sec, x)| {
            let drops: serde_json::Map<String, Value> =
                DropReason::ALL.iter().map(|d| (d.name().to_string(), json!(x.drops[*d as usize]))).collect();
            json!({
                "t": fmt_utc(s.id + sec * 1_000_000_000),
                "offset_s": sec,
                "drops": drops,
                "queue_peak": x.queue_peak,
                "accepts": x.accepts,
            })
        })
        .collect();
    json!({"type": "timeline", "seconds": rows})
}

/// A recorded namespace: its sysctls at the start (and those changed by the end),
/// and its TcpExt counters at start and end.
struct NamespaceView {
    inode: u32,
    name: Option<String>,
    sysctls: Vec<(String, Option<u32>)>,
    changed: Vec<(String, Option<u32>)>,
    /// (name, start, end): end is None when the recording has no end snapshot.
    counters: Vec<(String, u64, Option<u64>)>,
}

impl NamespaceView {
    fn json(&self) -> Value {
        let map = |v: &[(String, Option<u32>)]| -> serde_json::Map<String, Value> {
            v.iter().map(|(k, v)| (k.clone(), json!(v))).collect()
        };
        let counters: serde_json::Map<String, Value> = self
            .counters
            .iter()
            .map(|(k, start, end)| {
                (k.clone(), json!({"start": start, "end": end, "delta": end.map(|e| e.saturating_sub(*start))}))
            })
            .collect();
        json!({
            "netns": self.inode,
            "name": self.name,
            "sysctls": map(&self.sysctls),
            "sysctls_changed": map(&self.changed),
            "counters": counters,
        })
    }
}

fn namespaces(r: &Replay) -> Vec<NamespaceView> {
    let Some(start) = &r.start else { return vec![] };
    start
        .namespaces
        .iter()
        .map(|ns| {
            let end = r.end.as_ref().and_then(|e| e.namespaces.iter().find(|n| n.inode == ns.inode));
            let mut sysctls = ns.sysctls.clone();
            sysctls.sort();
            let mut changed: Vec<(String, Option<u32>)> = end
                .map(|e| e.sysctls.iter().filter(|s| !ns.sysctls.contains(s)).cloned().collect())
                .unwrap_or_default();
            changed.sort();
            let mut counters: Vec<(String, u64, Option<u64>)> = ns
                .counters
                .iter()
                .map(|(k, v)| (k.clone(), *v, end.and_then(|e| e.counters.iter().find(|c| &c.0 == k)).map(|c| c.1)))
                .collect();
            counters.sort();
            NamespaceView { inode: ns.inode, name: ns.name.clone(), sysctls, changed, counters }
        })
        .collect()
}

fn text_header(
    w: &mut impl Write,
    r: &Replay,
    s: &Recording,
    files: &[FileResult],
    windowed: bool,
) -> std::io::Result<()> {
    writeln!(
        w,
        "Recording of {} (kernel {}, {} mode) from {} to {}{}",
        s.scope,
        s.kernel,
        s.mode,
        fmt_utc(s.id),
        fmt_utc(r.wall(r.last_ts)),
        if r.clean_end { "" } else { " (no end mark: the recorder did not stop cleanly)" }
    )?;
    for f in files {
        let stop = f.damage.as_ref().map(|d| format!(", {d}")).unwrap_or_default();
        writeln!(w, "  {}: {} records{stop}", f.path.display(), f.records)?;
    }
    if let Some(l) = &r.left_out {
        writeln!(
            w,
            "  Left out to keep files within --max-size: {} records too large for a file ({} bytes), {} past \
             --rotate + 1 rotations in one second ({} bytes); in {} of {} rotations up to {} live listeners from the new file's preamble",
            l.records, l.bytes, l.capped_records, l.capped_bytes, l.short_preambles, l.rotations, l.listeners_max
        )?;
    }
    if r.preamble_missing > 0 {
        writeln!(
            w,
            "  The oldest file given is a rotated one whose preamble left out {} live listeners: they are missing here \
             (give the older files too)",
            r.preamble_missing
        )?;
    }
    if windowed {
        writeln!(
            w,
            "Window {} to {}: counts are the recorded events in it (events the kernel could not deliver are missing)",
            r.window.0.map_or("start".into(), fmt_utc),
            r.window.1.map_or("end".into(), fmt_utc)
        )?;
    }
    Ok(())
}

fn text_sections(
    w: &mut impl Write,
    s: &Recording,
    t: &BTreeMap<u64, Second>,
    peers: &[(IpAddr, u64)],
    namespaces: &[NamespaceView],
) -> std::io::Result<()> {
    writeln!(w)?;
    writeln!(w, "Per second (UTC, seconds with activity):")?;
    writeln!(
        w,
        "{:<13} {:>6} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8}",
        "TIME", "+S", "ACCEPTQ", "SYNQ", "ACK_OVF", "OTHER", "QPEAK", "ACCEPTS"
    )?;
    for (sec, x) in t {
        let wall = fmt_utc(s.id + sec * 1_000_000_000);
        let d = |r: DropReason| x.drops[r as usize];
        writeln!(
            w,
            "{:<13} {:>6} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8}",
            &wall[11..19],
            sec,
            d(DropReason::AcceptQueueFull),
            d(DropReason::SynQueueFull),
            d(DropReason::AckOverflow),
            d(DropReason::Other),
            x.queue_peak,
            x.accepts
        )?;
    }
    writeln!(w)?;
    writeln!(w, "Top peers by drops:")?;
    if peers.is_empty() {
        writeln!(w, "  (none)")?;
    }
    for (p, n) in peers {
        writeln!(w, "  {:<40} {n}", p.to_string())?;
    }
    let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
    for ns in namespaces {
        writeln!(w)?;
        let name = ns.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        writeln!(w, "Network namespace {}{name}:", ns.inode)?;
        for (k, v) in &ns.sysctls {
            let now = ns.changed.iter().find(|c| &c.0 == k);
            let changed =
                now.map(|c| format!(" (changed to {} by the end)", opt(c.1.map(u64::from)))).unwrap_or_default();
            writeln!(w, "  {k:<32} {}{changed}", opt(v.map(u64::from)))?;
        }
        for (k, start, end) in &ns.counters {
            let delta = end.map(|e| e.saturating_sub(*start));
            writeln!(w, "  {k:<32} {start} -> {} (+{})", opt(*end), opt(delta))?;
        }
    }
    Ok(())
}
