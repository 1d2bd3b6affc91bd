//! `backlog-trace report`: replays recordings (replay.rs) into the live session's
//! model and prints it with the live renderers, then what only a recording can tell:
//! a per-second timeline, the peers that lost most connections, and the sysctls and
//! namespace counters around the session.
//!
//! Linear in what it reads: every lookup goes through a hash map or a sorted list,
//! and the JSON lines whose size follows the recording (timeline, namespaces) are
//! written item by item rather than built as one document first.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use backlog_common::{DropReason, ListenerKey};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};

use super::format::{NetnsSnapshot, Recording};
use super::replay::{replay_files, FileResult, Replay, Second};
use crate::escape::escape;
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
    let peers = top_peers(&replay, &selected, &timeline, 10);
    let table = rows(&replay.model, &filters, args.top);
    let namespaces = namespaces(&replay);

    let mut w = std::io::BufWriter::new(w);
    (|| -> std::io::Result<()> {
        if args.json {
            json_out::line(&mut w, &recording_json(&replay, &session, &results, windowed))?;
            json_out::summary(&mut w, &replay.model, &table, secs, args.hist)?;
            let seconds = Seconds { start: session.id, seconds: &timeline };
            stream_line(&mut w, &TimelineLine { seconds, kind: "timeline" })?;
            let top: Vec<Value> = peers.top.iter().map(|(p, n)| json!({"peer": p.to_string(), "drops": n})).collect();
            json_out::line(
                &mut w,
                &json!({
                    "type": "peers",
                    "from": if peers.from_kernel { "kernel counters" } else { "drop lines" },
                    "top": top,
                    "drops_other_peers": peers.other,
                    "suppressed_lines": peers.no_line,
                }),
            )?;
            stream_line(&mut w, &NamespacesLine { namespaces: &namespaces, kind: "namespaces" })?;
        } else {
            text_header(&mut w, &replay, &session, &results, windowed)?;
            text::summary(&mut w, &replay.model, &table, secs, args.hist, text::Width::default())?;
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
    let selected: HashSet<ListenerKey> = rows.iter().map(|l| l.key()).collect();
    let mut out: BTreeMap<u64, Second> = BTreeMap::new();
    for ((key, sec), s) in &r.timeline {
        if selected.contains(key) {
            out.entry(*sec).or_default().merge(s);
        }
    }
    // Queue samples cover listeners that never dropped or accepted too; those in
    // the model must pass the filters (owners included), others port and netns.
    let mut known: HashMap<(u32, u64), bool> = HashMap::new();
    for l in r.model.listeners.values() {
        *known.entry((l.netns, l.sock_ino)).or_default() |= selected.contains(&l.key());
    }
    let wanted = |netns: u32, ino: u64| match known.get(&(netns, ino)) {
        Some(selected) => *selected,
        None => {
            let port = r.queue_ports.get(&(netns, ino)).copied().unwrap_or_default();
            f.pids.is_empty()
                && (f.ports.is_empty() || f.ports.contains(&port))
                && (f.netns.is_empty() || f.netns.contains(&netns))
        }
    };
    // An empty queue is no activity: it would list every sampled second.
    for (&(netns, ino, sec), &peak) in r.queue_peaks.iter().filter(|(_, p)| **p > 0) {
        if wanted(netns, ino) {
            let s = out.entry(sec).or_default();
            s.queue_peak = s.queue_peak.max(peak);
        }
    }
    out
}

/// The peers that lost most connections at the selected listeners.
struct Peers {
    top: Vec<(IpAddr, u64)>,
    /// The selected drops not in `top`: other peers', and those with no known peer.
    other: u64,
    /// From the kernel's per-peer counts (the whole recording), else from drop lines
    /// (a time window: the counts are cumulative, only lines have a time).
    from_kernel: bool,
    /// Drops without a line: in `other` when the peers come from lines.
    no_line: u64,
}

fn top_peers(r: &Replay, rows: &[&Listener], t: &BTreeMap<u64, Second>, n: usize) -> Peers {
    let no_line: u64 = t.values().map(|x| x.suppressed).sum();
    let from_kernel = r.window == (None, None) && rows.iter().any(|l| !l.peers.is_empty());
    let mut all: HashMap<IpAddr, u64> = HashMap::new();
    let total: u64 = if from_kernel {
        for (p, c) in rows.iter().flat_map(|l| &l.peers) {
            *all.entry(*p).or_default() += c;
        }
        rows.iter().map(|l| l.total_drops()).sum()
    } else {
        let selected: HashSet<ListenerKey> = rows.iter().map(|l| l.key()).collect();
        for ((key, p), c) in &r.peers {
            if selected.contains(key) {
                *all.entry(*p).or_default() += c;
            }
        }
        all.values().sum::<u64>() + no_line
    };
    let (top, other) = crate::model::top_n(all.into_iter().collect(), n, total);
    Peers { top, other, from_kernel, no_line }
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

/// One NDJSON line serialised straight to the writer.
fn stream_line(w: &mut impl Write, v: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")
}

/// `{"seconds": [...], "type": "timeline"}`, a second at a time. Keys are in
/// alphabetical order, as serde_json's sorted maps print every other line.
#[derive(serde::Serialize)]
struct TimelineLine<'a> {
    seconds: Seconds<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

struct Seconds<'a> {
    start: u64,
    seconds: &'a BTreeMap<u64, Second>,
}

impl Serialize for Seconds<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.seconds.iter().map(|(sec, x)| {
            let drops: serde_json::Map<String, Value> =
                DropReason::ALL.iter().map(|d| (d.name().to_string(), json!(x.drops[*d as usize]))).collect();
            json!({
                "t": fmt_utc(wall_of(self.start, *sec)),
                "offset_s": sec,
                "drops": drops,
                "suppressed_lines": x.suppressed,
                "queue_peak": x.queue_peak,
                "accepts": x.accepts,
            })
        }))
    }
}

/// Wall-clock ns of a second of the recording (saturating: ids can be crafted).
fn wall_of(start: u64, sec: u64) -> u64 {
    start.saturating_add(sec.saturating_mul(1_000_000_000))
}

#[derive(serde::Serialize)]
struct NamespacesLine<'a> {
    namespaces: &'a [NamespaceView<'a>],
    #[serde(rename = "type")]
    kind: &'static str,
}

/// A list sorted by key as a JSON object, the last of equal keys winning, as a
/// serde_json map built from it would print; values are built one at a time.
struct Sorted<'a, T>(&'a [T], fn(&T) -> &str, fn(&T) -> Value);

impl<T> Serialize for Sorted<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Sorted(items, key, value) = self;
        let mut m = s.serialize_map(None)?;
        for (i, item) in items.iter().enumerate() {
            if items.get(i + 1).is_some_and(|next| key(next) == key(item)) {
                continue;
            }
            m.serialize_entry(key(item), &value(item))?;
        }
        m.end()
    }
}

/// A recorded namespace: its sysctls at the start (and those changed by the end),
/// and its TcpExt counters at start and end, each list sorted.
struct NamespaceView<'a> {
    inode: u32,
    name: Option<&'a str>,
    sysctls: Vec<(&'a str, Option<u32>)>,
    changed: Vec<(&'a str, Option<u32>)>,
    /// (name, start, end): end is None when the recording has no end snapshot.
    counters: Vec<(&'a str, u64, Option<u64>)>,
}

impl NamespaceView<'_> {
    /// What a sysctl was changed to by the end (the first such entry).
    fn changed_to(&self, name: &str) -> Option<Option<u32>> {
        let i = self.changed.partition_point(|c| c.0 < name);
        self.changed.get(i).filter(|c| c.0 == name).map(|c| c.1)
    }
}

impl Serialize for NamespaceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sysctl = |c: &(&str, Option<u32>)| json!(c.1);
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry(
            "counters",
            &Sorted(
                &self.counters,
                |c| c.0,
                |c| json!({"start": c.1, "end": c.2, "delta": c.2.map(|e| e.saturating_sub(c.1))}),
            ),
        )?;
        m.serialize_entry("name", &self.name)?;
        m.serialize_entry("netns", &self.inode)?;
        m.serialize_entry("sysctls", &Sorted(&self.sysctls, |c| c.0, sysctl))?;
        m.serialize_entry("sysctls_changed", &Sorted(&self.changed, |c| c.0, sysctl))?;
        m.end()
    }
}

fn namespaces(r: &Replay) -> Vec<NamespaceView<'_>> {
    let Some(start) = &r.start else { return vec![] };
    // The first end namespace of each inode, and its first value of each counter.
    let mut ends: HashMap<u32, &NetnsSnapshot> = HashMap::new();
    for n in r.end.iter().flat_map(|e| &e.namespaces) {
        ends.entry(n.inode).or_insert(n);
    }
    start
        .namespaces
        .iter()
        .map(|ns| {
            let end = ends.get(&ns.inode).copied();
            let mut sysctls: Vec<(&str, Option<u32>)> = ns.sysctls.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            sysctls.sort_unstable();
            let mut changed: Vec<(&str, Option<u32>)> = end
                .iter()
                .flat_map(|e| &e.sysctls)
                .map(|(k, v)| (k.as_str(), *v))
                .filter(|s| sysctls.binary_search(s).is_err())
                .collect();
            changed.sort();
            let mut at_end: HashMap<&str, u64> = HashMap::new();
            for (k, v) in end.iter().flat_map(|e| &e.counters) {
                at_end.entry(k.as_str()).or_insert(*v);
            }
            let mut counters: Vec<(&str, u64, Option<u64>)> =
                ns.counters.iter().map(|(k, v)| (k.as_str(), *v, at_end.get(k.as_str()).copied())).collect();
            counters.sort_unstable();
            NamespaceView { inode: ns.inode, name: ns.name.as_deref(), sysctls, changed, counters }
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
    peers: &Peers,
    namespaces: &[NamespaceView],
) -> std::io::Result<()> {
    writeln!(w)?;
    writeln!(
        w,
        "Per second (UTC, seconds with activity; NO_LINE: drops whose lines --max-drop-lines suppressed, in the \
         second their counters were read):"
    )?;
    writeln!(
        w,
        "{:<13} {:>6} {:>8} {:>8} {:>8} {:>6} {:>8} {:>6} {:>8}",
        "TIME", "+S", "ACCEPTQ", "SYNQ", "ACK_OVF", "OTHER", "NO_LINE", "QPEAK", "ACCEPTS"
    )?;
    for (sec, x) in t {
        let wall = fmt_utc(wall_of(s.id, *sec));
        let d = |r: DropReason| x.drops[r as usize];
        writeln!(
            w,
            "{:<13} {:>6} {:>8} {:>8} {:>8} {:>6} {:>8} {:>6} {:>8}",
            &wall[11..19],
            sec,
            d(DropReason::AcceptQueueFull),
            d(DropReason::SynQueueFull),
            d(DropReason::AckOverflow),
            d(DropReason::Other),
            x.suppressed,
            x.queue_peak,
            x.accepts
        )?;
    }
    writeln!(w)?;
    let from = if peers.from_kernel { "the kernel's per-peer counts" } else { "drop lines" };
    writeln!(w, "Top peers by drops (from {from}):")?;
    if peers.top.is_empty() && peers.other == 0 {
        writeln!(w, "  (none)")?;
    }
    for (p, n) in &peers.top {
        writeln!(w, "  {:<40} {n}", p.to_string())?;
    }
    if peers.other > 0 {
        let unknown = match peers.no_line {
            n if n > 0 && !peers.from_kernel => {
                format!(", {n} of them without a line (--max-drop-lines): peers unknown")
            }
            _ => String::new(),
        };
        writeln!(w, "  (and {} drops of other peers{unknown})", peers.other)?;
    }
    let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
    for ns in namespaces {
        writeln!(w)?;
        let name = ns.name.as_deref().map(|n| format!(" ({})", escape(n))).unwrap_or_default();
        writeln!(w, "Network namespace {}{name}:", ns.inode)?;
        for (k, v) in &ns.sysctls {
            let changed = ns
                .changed_to(k)
                .map(|c| format!(" (changed to {} by the end)", opt(c.map(u64::from))))
                .unwrap_or_default();
            writeln!(w, "  {k:<32} {}{changed}", opt(v.map(u64::from)))?;
        }
        for (k, start, end) in &ns.counters {
            let delta = end.map(|e| e.saturating_sub(*start));
            writeln!(w, "  {k:<32} {start} -> {} (+{})", opt(*end), opt(delta))?;
        }
    }
    Ok(())
}
