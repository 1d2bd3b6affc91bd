//! `backlog-trace report`: replays recordings into the live session's model and
//! prints it with the live renderers, then what only a recording can tell: a
//! per-second timeline, the peers that lost most connections, and the sysctls and
//! namespace counters around the session.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use backlog_common::{DropReason, EventKind, ListenerKey, N_REASONS};
use serde_json::{json, Value};

use super::format::{ListenerState, Phase, Reconcile, Record, Session, Snapshot, Sync};
use super::reader::{Damage, Reader, Step};
use super::recorder::{apply_reconcile, state_key};
use super::time::fmt_utc;
use super::ReportArgs;
use crate::cli::Filters;
use crate::model::{ip, Listener, Model};
use crate::output::{emit, Json, Output, Text};

/// What one second of the recording saw at one listener.
#[derive(Clone, Copy, Default)]
struct Second {
    drops: [u64; N_REASONS],
    accepts: u64,
    queue_peak: u32,
}

impl Second {
    fn merge(&mut self, o: &Second) {
        for (a, b) in self.drops.iter_mut().zip(o.drops) {
            *a += b;
        }
        self.accepts += o.accepts;
        self.queue_peak = self.queue_peak.max(o.queue_peak);
    }
}

struct FileResult {
    path: PathBuf,
    records: u64,
    damage: Option<Damage>,
}

/// Everything folded out of the recordings.
#[derive(Default)]
struct Replay {
    model: Model,
    session: Option<Session>,
    /// Wall-clock window [since, until) in ns; None bounds are open.
    window: (Option<u64>, Option<u64>),
    /// Latest exact counters per listener, from Sync records.
    states: HashMap<ListenerKey, ListenerState>,
    last_sync: Option<Sync>,
    /// The latest reconciliation with the kernel's own counters.
    reconcile: Option<Reconcile>,
    owners: HashMap<ListenerKey, BTreeMap<u32, String>>,
    /// Per listener, per second since the start of the recording.
    timeline: HashMap<ListenerKey, BTreeMap<u64, Second>>,
    /// Accept-queue samples: (netns, socket inode) -> (port, per second peak).
    queues: HashMap<(u32, u64), (u16, BTreeMap<u64, u32>)>,
    peers: HashMap<ListenerKey, HashMap<IpAddr, u64>>,
    start: Option<Snapshot>,
    end: Option<Snapshot>,
    /// CLOCK_MONOTONIC of the first and last timed records, to measure duration.
    first_ts: Option<u64>,
    last_ts: u64,
    clean_end: bool,
}

impl Replay {
    fn wall(&self, mono_ns: u64) -> u64 {
        mono_ns + self.session.as_ref().map_or(0, |s| s.mono_to_wall_ns)
    }

    fn in_window(&self, wall: u64) -> bool {
        self.window.0.is_none_or(|s| wall >= s) && self.window.1.is_none_or(|u| wall < u)
    }

    /// Seconds since the recording started (the first session's id is its start).
    fn second(&self, wall: u64) -> u64 {
        wall.saturating_sub(self.session.as_ref().map_or(0, |s| s.id)) / 1_000_000_000
    }

    /// From the first to the last timed record, within the window if one was given.
    fn duration_s(&self) -> f64 {
        let Some(first) = self.first_ts else { return 0.0 };
        let from = self.window.0.map_or(self.wall(first), |s| s.max(self.wall(first)));
        let to = self.window.1.map_or(self.wall(self.last_ts), |u| u.min(self.wall(self.last_ts)));
        to.saturating_sub(from) as f64 / 1e9
    }

    fn seen(&mut self, mono_ns: u64) {
        self.first_ts.get_or_insert(mono_ns);
        self.last_ts = self.last_ts.max(mono_ns);
    }

    fn apply(&mut self, rec: Record) {
        match rec {
            Record::Session(s) => {
                // The first file's session fixes the clock; later parts repeat it.
                self.session.get_or_insert(s);
            }
            Record::Event(ev) => {
                let wall = self.wall(ev.ts_ns);
                if !self.in_window(wall) {
                    return;
                }
                self.seen(ev.ts_ns);
                let sec = self.second(wall);
                if self.model.apply(&ev).is_none() {
                    return;
                }
                let key = ListenerKey { sk: ev.sk, ino: ev.sock_ino };
                let s = self.timeline.entry(key).or_default().entry(sec).or_default();
                match EventKind::from_u8(ev.kind) {
                    Some(EventKind::Drop) => {
                        if let Some(r) = DropReason::from_u8(ev.reason) {
                            s.drops[r as usize] += 1;
                        }
                        s.queue_peak = s.queue_peak.max(ev.queue_len);
                        // Peers by address only: their ports are ephemeral.
                        *self.peers.entry(key).or_default().entry(ip(ev.family, &ev.raddr)).or_default() += 1;
                    }
                    Some(EventKind::Accept) => {
                        s.accepts += 1;
                        s.queue_peak = s.queue_peak.max(ev.queue_len);
                    }
                    _ => {}
                }
            }
            Record::Owners(o) => self.owners.entry(ListenerKey { sk: o.sk, ino: o.ino }).or_default().extend(o.owners),
            Record::Sync(s) => {
                self.seen(s.ts_ns);
                for l in &s.listeners {
                    self.states.insert(state_key(l), l.clone());
                }
                self.last_sync = Some(s);
            }
            Record::Snapshot(s) => {
                self.seen(s.ts_ns);
                match s.phase {
                    Phase::Start => {
                        self.start.get_or_insert(s);
                    }
                    Phase::End => self.end = Some(s),
                }
            }
            Record::Queues(q) => {
                let wall = self.wall(q.ts_ns);
                if !self.in_window(wall) {
                    return;
                }
                let sec = self.second(wall);
                for r in q.rows {
                    let e = self.queues.entry((r.netns, u64::from(r.sock_ino))).or_insert((r.port, BTreeMap::new()));
                    let peak = e.1.entry(sec).or_default();
                    *peak = (*peak).max(r.len);
                }
            }
            Record::End { ts_ns } => {
                self.seen(ts_ns);
                self.clean_end = true;
            }
            Record::Reconcile(r) => {
                self.seen(r.ts_ns);
                self.reconcile = Some(r);
            }
        }
    }

    /// Without a time window, the kernel's exact counters replace what the events
    /// said, exactly as the live session does at each sync.
    fn apply_exact_counters(&mut self) {
        for (key, st) in &self.states {
            self.model.set_kernel_stats(*key, &[st.stats]);
            let buckets: Vec<(usize, u64)> = st.wait.iter().map(|&(b, n)| (usize::from(b), n)).collect();
            self.model.set_kernel_hist(*key, &buckets);
            if let Some(l) = self.model.listeners.get_mut(key) {
                l.pending = st.pending;
            }
        }
        if let Some(s) = &self.last_sync {
            self.model.lost_events = s.lost_events;
            self.model.unmatched_accepts = s.unmatched_accepts;
            self.model.pending_enqueued = s.pending_enqueued.map(|n| n as usize);
        }
        if let Some(r) = &self.reconcile {
            apply_reconcile(&mut self.model, r);
        }
    }

    fn attribute(&mut self) {
        for (key, owners) in &self.owners {
            if let Some(l) = self.model.listeners.get_mut(key) {
                l.owners.extend(owners.iter().map(|(p, c)| (*p, c.clone())));
            }
        }
    }
}

/// Opens a file and reads its first record (the session) to order the files.
fn open(path: &Path) -> Result<(Reader<BufReader<File>>, Step)> {
    let f = File::open(path).map_err(|e| anyhow::anyhow!("file {}: {e}", path.display()))?;
    let mut r = Reader::new(BufReader::new(f)).map_err(|e| anyhow::anyhow!("file {}: {e}", path.display()))?;
    let first = r.next_step();
    Ok((r, first))
}

/// Replays the files, oldest part first, each up to its first damage.
fn replay_files(args: &ReportArgs) -> Result<(Replay, Vec<FileResult>)> {
    let mut files = Vec::new();
    for p in &args.files {
        let (reader, first) = open(p)?;
        let key = match &first {
            Step::Record(Record::Session(s)) => (s.id, s.part),
            _ => (0, 0),
        };
        files.push((key, p.clone(), reader, first));
    }
    // Rotation renames files, so names do not tell the order; the sessions do.
    files.sort_by_key(|f| f.0);

    let mut replay = Replay::default();
    if let Some(s) = files.iter().find_map(|f| match &f.3 {
        Step::Record(Record::Session(s)) => Some(s),
        _ => None,
    }) {
        let start = s.id;
        replay.window = (args.since.map(|t| t.resolve(start)), args.until.map(|t| t.resolve(start)));
    }
    let mut results = Vec::new();
    for (_, path, mut reader, first) in files {
        let mut res = FileResult { path, records: 0, damage: None };
        let mut step = first;
        loop {
            match step {
                Step::Record(rec) => {
                    res.records += 1;
                    replay.apply(rec);
                }
                Step::Eof => break,
                Step::Damaged(d) => {
                    eprintln!("backlog-trace report: file {}: {d}", res.path.display());
                    res.damage = Some(d);
                    break;
                }
            }
            step = reader.next_step();
        }
        results.push(res);
    }
    Ok((replay, results))
}

pub fn run(args: &ReportArgs) -> Result<i32> {
    let (mut replay, results) = replay_files(args)?;
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
    let filters = Filters {
        ports: if args.ports.is_empty() { session.ports.clone() } else { args.ports.clone() },
        pids: session.pids.clone(),
        netns: session.netns.clone(),
    };
    let rows: Vec<&Listener> = replay.model.matching(&filters).collect();
    let secs = replay.duration_s();
    let timeline = timeline(&replay, &rows, &filters);
    let peers = top_peers(&replay, &rows, 10);
    let table = crate::output::rows(&replay.model, &filters, args.top.n);

    if args.json {
        emit(&recording_json(&replay, &session, &results, windowed).to_string());
        Json.summary(&replay.model, &table, secs, args.hist);
        emit(&timeline_json(&session, &timeline).to_string());
        let peers: Vec<Value> = peers.iter().map(|(p, n)| json!({"peer": p.to_string(), "drops": n})).collect();
        emit(&json!({"type": "peers", "top": peers}).to_string());
        emit(&json!({"type": "namespaces", "namespaces": namespaces_json(&replay)}).to_string());
    } else {
        text_header(&replay, &session, &results, windowed);
        Text.summary(&replay.model, &table, secs, args.hist);
        text_sections(&replay, &session, &timeline, &peers);
    }
    Ok(0)
}

/// Seconds with activity at the selected listeners, merged over listeners.
fn timeline(r: &Replay, rows: &[&Listener], f: &Filters) -> BTreeMap<u64, Second> {
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

fn recording_json(r: &Replay, s: &Session, files: &[FileResult], windowed: bool) -> Value {
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
    })
}

fn timeline_json(s: &Session, t: &BTreeMap<u64, Second>) -> Value {
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

fn namespaces_json(r: &Replay) -> Vec<Value> {
    let Some(start) = &r.start else { return vec![] };
    start
        .namespaces
        .iter()
        .map(|ns| {
            let end = r.end.as_ref().and_then(|e| e.namespaces.iter().find(|n| n.inode == ns.inode));
            let sysctls: serde_json::Map<String, Value> =
                ns.sysctls.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            let counters: serde_json::Map<String, Value> = ns
                .counters
                .iter()
                .map(|(k, v)| {
                    let after = end.and_then(|e| e.counters.iter().find(|c| &c.0 == k)).map(|c| c.1);
                    (k.clone(), json!({"start": v, "end": after, "delta": after.map(|a| a.saturating_sub(*v))}))
                })
                .collect();
            let changed: serde_json::Map<String, Value> = end
                .map(|e| {
                    e.sysctls.iter().filter(|s| !ns.sysctls.contains(s)).map(|(k, v)| (k.clone(), json!(v))).collect()
                })
                .unwrap_or_default();
            json!({
                "netns": ns.inode,
                "name": ns.name,
                "sysctls": sysctls,
                "sysctls_changed": changed,
                "counters": counters,
            })
        })
        .collect()
}

fn text_header(r: &Replay, s: &Session, files: &[FileResult], windowed: bool) {
    emit(&format!(
        "Recording of {} (kernel {}, {} mode) from {} to {}{}",
        s.scope,
        s.kernel,
        s.mode,
        fmt_utc(s.id),
        fmt_utc(r.wall(r.last_ts)),
        if r.clean_end { "" } else { " (no end mark: the recorder did not stop cleanly)" }
    ));
    for f in files {
        let stop = f.damage.as_ref().map(|d| format!(", {d}")).unwrap_or_default();
        emit(&format!("  {}: {} records{stop}", f.path.display(), f.records));
    }
    if windowed {
        emit(&format!(
            "Window {} to {}: counts are the recorded events in it (events the kernel could not deliver are missing)",
            r.window.0.map_or("start".into(), fmt_utc),
            r.window.1.map_or("end".into(), fmt_utc)
        ));
    }
}

fn text_sections(r: &Replay, s: &Session, t: &BTreeMap<u64, Second>, peers: &[(IpAddr, u64)]) {
    emit("");
    emit("Per second (UTC, seconds with activity):");
    emit(&format!(
        "{:<13} {:>6} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8}",
        "TIME", "+S", "ACCEPTQ", "SYNQ", "ACK_OVF", "OTHER", "QPEAK", "ACCEPTS"
    ));
    for (sec, x) in t {
        let wall = fmt_utc(s.id + sec * 1_000_000_000);
        let d = |r: DropReason| x.drops[r as usize];
        emit(&format!(
            "{:<13} {:>6} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8}",
            &wall[11..19],
            sec,
            d(DropReason::AcceptQueueFull),
            d(DropReason::SynQueueFull),
            d(DropReason::AckOverflow),
            d(DropReason::Other),
            x.queue_peak,
            x.accepts
        ));
    }
    emit("");
    emit("Top peers by drops:");
    if peers.is_empty() {
        emit("  (none)");
    }
    for (p, n) in peers {
        emit(&format!("  {:<40} {n}", p.to_string()));
    }
    for ns in namespaces_json(r) {
        emit("");
        let name = ns["name"].as_str().map(|n| format!(" ({n})")).unwrap_or_default();
        emit(&format!("Network namespace {}{name}:", ns["netns"]));
        for (k, v) in ns["sysctls"].as_object().into_iter().flatten() {
            let changed =
                ns["sysctls_changed"].get(k).map(|e| format!(" (changed to {e} by the end)")).unwrap_or_default();
            emit(&format!("  {k:<32} {v}{changed}"));
        }
        for (k, c) in ns["counters"].as_object().into_iter().flatten() {
            emit(&format!("  {k:<32} {} -> {} (+{})", c["start"], c["end"], c["delta"]));
        }
    }
}
