//! Recordings back into the model: each file read up to its first damage, oldest
//! part first, every record applied the way the live session applied it (typed
//! events through `Model::apply`, sync records through `set_kernel_stats`), plus what
//! only a recording keeps: seconds, peers, queue samples, namespace snapshots.
//!
//! Everything is kept in flat hash maps keyed by what a record names, so replaying
//! costs time and memory in proportion to the records, whatever their shape.
//! Files are refused, before any is replayed, when two are the same file, belong
//! to different recordings, or hold the same part of one.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{bail, Result};
use backlog_common::{ListenerKey, N_REASONS};

use super::format::{CounterSync, LeftOut, ListenerState, Phase, Reconcile, Record, Recording, Snapshot};
use super::mapping::{apply_reconcile, state_key};
use super::reader::{Damage, Reader, Step};
use crate::event::What;
use crate::model::{KernelTotals, Model};
use crate::time::{fmt_utc, TimeSpec};

/// What one second of the recording saw at one listener.
#[derive(Clone, Copy, Default)]
pub struct Second {
    /// Drops by reason, from their lines.
    pub drops: [u64; N_REASONS],
    /// Drops without a line (over `--max-drop-lines`), from the exact counters: at
    /// the second of the counter sync that first counted them (a second or less
    /// after they happened), as their reasons and peers are unknown.
    pub suppressed: u64,
    pub accepts: u64,
    pub queue_peak: u32,
}

impl Second {
    pub fn merge(&mut self, o: &Second) {
        for (a, b) in self.drops.iter_mut().zip(o.drops) {
            *a += b;
        }
        self.suppressed += o.suppressed;
        self.accepts += o.accepts;
        self.queue_peak = self.queue_peak.max(o.queue_peak);
    }
}

pub struct FileResult {
    pub path: PathBuf,
    pub records: u64,
    pub damage: Option<Damage>,
}

/// Everything folded out of the recordings.
#[derive(Default)]
pub struct Replay {
    pub model: Model,
    pub session: Option<Recording>,
    /// Wall-clock window [since, until) in ns; None bounds are open.
    pub window: (Option<u64>, Option<u64>),
    /// Latest exact counters per listener, from Sync records.
    pub states: HashMap<ListenerKey, ListenerState>,
    /// The latest Sync record's totals (its listeners are moved into `states`).
    pub last_sync: Option<CounterSync>,
    /// The latest reconciliation with the kernel's own counters.
    pub reconcile: Option<Reconcile>,
    pub owners: HashMap<ListenerKey, BTreeMap<u32, String>>,
    /// (listener, second since the start of the recording) -> what it saw then.
    pub timeline: HashMap<(ListenerKey, u64), Second>,
    /// Accept-queue samples: (netns, socket inode) -> port ...
    pub queue_ports: HashMap<(u32, u64), u16>,
    /// ... and (netns, socket inode, second) -> the peak sampled in that second.
    pub queue_peaks: HashMap<(u32, u64, u64), u32>,
    /// (listener, peer address) -> drops.
    pub peers: HashMap<(ListenerKey, IpAddr), u64>,
    /// Each listener's suppressed lines as of its latest counter sync, whatever
    /// the window: a sync's increase over it goes to the timeline.
    suppressed_synced: HashMap<ListenerKey, u64>,
    pub start: Option<Snapshot>,
    pub end: Option<Snapshot>,
    /// CLOCK_MONOTONIC of the first and last timed records, to measure duration.
    pub first_ts: Option<u64>,
    pub last_ts: u64,
    pub clean_end: bool,
    /// Files begun (session records seen), to tell the first file's preamble.
    pub files_begun: u64,
    /// What the recorder left out to keep files within --max-size (the latest count).
    pub left_out: Option<LeftOut>,
    /// Live listeners the first file's preamble left out: missing from this report.
    pub preamble_missing: u64,
}

impl Replay {
    pub fn wall(&self, mono_ns: u64) -> u64 {
        // Saturating: a crafted clock offset must not wrap (or panic in a debug build).
        mono_ns.saturating_add(self.session.as_ref().map_or(0, |s| s.mono_to_wall_ns))
    }

    fn in_window(&self, wall: u64) -> bool {
        self.window.0.is_none_or(|s| wall >= s) && self.window.1.is_none_or(|u| wall < u)
    }

    /// Seconds since the recording started (the first session's id is its start).
    fn second(&self, wall: u64) -> u64 {
        wall.saturating_sub(self.session.as_ref().map_or(0, |s| s.id)) / 1_000_000_000
    }

    /// From the first to the last timed record, within the window if one was given.
    pub fn duration_s(&self) -> f64 {
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
            Record::Recording(s) => {
                self.files_begun += 1;
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
                self.model.apply(&ev);
                let key = ev.listener.key;
                let s = self.timeline.entry((key, sec)).or_default();
                match ev.what {
                    What::Drop(d) => {
                        s.drops[d.reason as usize] += 1;
                        s.queue_peak = s.queue_peak.max(d.queue_len);
                        // Peers by address only: their ports are ephemeral.
                        *self.peers.entry((key, d.peer.ip())).or_default() += 1;
                    }
                    What::Accept { queue_len, .. } => {
                        s.accepts += 1;
                        s.queue_peak = s.queue_peak.max(queue_len);
                    }
                    _ => {}
                }
            }
            Record::Owners(o) => self.owners.entry(ListenerKey { sk: o.sk, ino: o.ino }).or_default().extend(o.owners),
            Record::CounterSync(mut s) => {
                self.seen(s.ts_ns);
                let wall = self.wall(s.ts_ns);
                let (in_window, sec) = (self.in_window(wall), self.second(wall));
                for l in std::mem::take(&mut s.listeners) {
                    let key = state_key(&l);
                    let before = self.suppressed_synced.insert(key, l.stats.suppressed).unwrap_or(0);
                    // Saturating: a crafted or restarted counter must not wrap.
                    let new = l.stats.suppressed.saturating_sub(before);
                    if in_window && new > 0 {
                        self.timeline.entry((key, sec)).or_default().suppressed += new;
                    }
                    self.states.insert(key, l);
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
                    let sock = (r.netns, u64::from(r.sock_ino));
                    self.queue_ports.entry(sock).or_insert(r.port);
                    let peak = self.queue_peaks.entry((sock.0, sock.1, sec)).or_default();
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
            Record::LeftOut(l) => {
                // Later files' preambles repeat what the earlier ones held.
                if self.files_begun == 1 {
                    self.preamble_missing = self.preamble_missing.max(l.preamble_listeners);
                }
                self.left_out = Some(l);
            }
        }
    }

    /// Without a time window, the kernel's exact counters replace what the events
    /// said, exactly as the live session does at each sync.
    pub fn apply_exact_counters(&mut self) {
        // Taken: each state is freed once it is in the model.
        for (key, st) in std::mem::take(&mut self.states) {
            self.model.set_kernel_stats(key, &[st.stats]);
            let buckets: Vec<(usize, u64)> = st.wait.iter().map(|&(b, n)| (usize::from(b), n)).collect();
            self.model.set_kernel_hist(key, &buckets);
            self.model.set_pending(key, st.pending);
            self.model.set_peers(key, &st.peers);
        }
        if let Some(s) = &self.last_sync {
            self.model.totals = KernelTotals {
                lost_events: s.lost_events,
                unmatched_accepts: s.unmatched_accepts,
                pending_enqueued: s.pending_enqueued,
            };
        }
        if let Some(r) = &self.reconcile {
            apply_reconcile(&mut self.model, r);
        }
    }

    /// Moves the recorded owners into the model's listeners.
    pub fn attribute(&mut self) {
        for (key, owners) in std::mem::take(&mut self.owners) {
            if let Some(l) = self.model.listeners.get_mut(&key) {
                if l.owners.is_empty() {
                    l.owners = owners;
                } else {
                    l.owners.extend(owners);
                }
            }
        }
    }
}

/// A file given to `report`, opened, with its first step read.
struct Input {
    path: PathBuf,
    reader: Reader<BufReader<File>>,
    first: Step,
}

impl Input {
    fn session(&self) -> Option<&Recording> {
        match &self.first {
            Step::Record(Record::Recording(s)) => Some(s),
            _ => None,
        }
    }
}

/// Opens every file and reads its first record (the session), refusing a file
/// given twice (by device and inode: two names of one file are the same file),
/// files of different recordings, and two files holding the same part of one.
fn open_all(paths: &[PathBuf]) -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
    for path in paths {
        let f = File::open(path).map_err(|e| anyhow::anyhow!("file {}: {e}", path.display()))?;
        let md = f.metadata().map_err(|e| anyhow::anyhow!("file {}: {e}", path.display()))?;
        if let Some(&i) = seen.get(&(md.dev(), md.ino())) {
            bail!(
                "{} and {} are the same file (device {}, inode {}): give each file once",
                paths[i].display(),
                path.display(),
                md.dev(),
                md.ino()
            );
        }
        seen.insert((md.dev(), md.ino()), inputs.len());
        let mut reader = Reader::new(BufReader::new(f)).map_err(|e| anyhow::anyhow!("file {}: {e}", path.display()))?;
        let first = reader.next_step();
        inputs.push(Input { path: path.clone(), reader, first });
    }
    let mut parts: HashMap<u32, usize> = HashMap::new();
    let mut recording: Option<usize> = None;
    for (i, input) in inputs.iter().enumerate() {
        let Some(s) = input.session() else { continue };
        let first = *recording.get_or_insert(i);
        let f = inputs[first].session().expect("a session");
        if s.id != f.id {
            bail!(
                "{} is of the recording started {} (id {}), {} of the one started {} (id {}): report each recording on its own",
                inputs[first].path.display(),
                fmt_utc(f.id),
                f.id,
                input.path.display(),
                fmt_utc(s.id),
                s.id
            );
        }
        if let Some(&j) = parts.get(&s.part) {
            bail!(
                "{} and {} both hold part {} of the recording started {}: give each part once",
                inputs[j].path.display(),
                input.path.display(),
                s.part,
                fmt_utc(s.id)
            );
        }
        parts.insert(s.part, i);
    }
    Ok(inputs)
}

/// Replays the files, oldest part first, each up to its first damage; `window`
/// limits events to a wall-clock span resolved against the recording's start and
/// end. A window that is empty, inverted or outside the recording is an error (the
/// caller exits 2): an empty report would read as "nothing happened".
pub fn replay_files(
    paths: &[PathBuf],
    window: (Option<TimeSpec>, Option<TimeSpec>),
) -> Result<(Replay, Vec<FileResult>)> {
    let mut replay = Replay::default();
    if window != (None, None) {
        // A window is checked against the recording's span and a relative bound
        // needs its end (its last timed record): both cost a first read of the files,
        // paid only when a window is given.
        if let Some((start, end)) = span(paths)? {
            replay.window = resolve_window(window, start, end)?;
        }
    }
    let mut files = open_all(paths)?;
    // Rotation renames files, so names do not tell the order; the sessions do.
    files.sort_by_key(|f| f.session().map(|s| s.part));
    let mut results = Vec::new();
    for Input { path, mut reader, first } in files {
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

/// When a timed record was written (CLOCK_MONOTONIC ns); None for untimed ones.
fn timestamp(rec: &Record) -> Option<u64> {
    match rec {
        Record::Event(ev) => Some(ev.ts_ns),
        Record::CounterSync(s) => Some(s.ts_ns),
        Record::Snapshot(s) => Some(s.ts_ns),
        Record::Queues(q) => Some(q.ts_ns),
        Record::End { ts_ns } => Some(*ts_ns),
        Record::Reconcile(r) => Some(r.ts_ns),
        Record::Recording(_) | Record::Owners(_) | Record::LeftOut(_) => None,
    }
}

/// The recording's start and end in wall ns: its first session's id, and its last
/// timed record in any file up to that file's damage. None without a session.
fn span(paths: &[PathBuf]) -> Result<Option<(u64, u64)>> {
    let files = open_all(paths)?;
    let Some(session) = files.iter().find_map(Input::session).cloned() else { return Ok(None) };
    let mut last = None::<u64>;
    for Input { mut reader, first, .. } in files {
        let mut step = first;
        // Bounded by the file: every step consumes a record or ends the loop.
        while let Step::Record(rec) = step {
            if let Some(ts) = timestamp(&rec) {
                last = Some(last.map_or(ts, |l| l.max(ts)));
            }
            step = reader.next_step();
        }
    }
    let start = session.id;
    let end = last.map_or(start, |ts| ts.saturating_add(session.mono_to_wall_ns)).max(start);
    Ok(Some((start, end)))
}

/// The window in wall ns, checked against the recording's [start, end].
fn resolve_window(
    (since, until): (Option<TimeSpec>, Option<TimeSpec>),
    start: u64,
    end: u64,
) -> Result<(Option<u64>, Option<u64>)> {
    let from = since.map(|t| t.resolve(start, end));
    let to = until.map(|t| t.resolve(start, end));
    let runs = format!("the recording runs from {} to {}", fmt_utc(start), fmt_utc(end));
    if let (Some(s), Some(u), Some(f), Some(t)) = (since, until, from, to) {
        if f >= t {
            bail!(
                "the window is empty: --since {s} ({}) is not before --until {u} ({}); {runs}",
                fmt_utc(f),
                fmt_utc(t)
            );
        }
    }
    if let (Some(s), Some(f)) = (since, from) {
        if f >= end {
            bail!("--since {s} ({}) is not before the recording's end: nothing to report; {runs}", fmt_utc(f));
        }
    }
    if let (Some(u), Some(t)) = (until, to) {
        if t <= start {
            bail!("--until {u} ({}) is not after the recording's start: nothing to report; {runs}", fmt_utc(t));
        }
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::hostile::{listener_records, write_file};
    use super::*;

    /// Drops replayed from a crafted recording (drop i at second i of 0..9, its end
    /// at second 11) through the window `since`..`until`.
    fn drops_in(since: Option<TimeSpec>, until: Option<TimeSpec>) -> Result<u64> {
        // One file per call: the tests run in parallel in one process.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("bt-window-{}-{n}.btr", std::process::id()));
        write_file(&path, &listener_records(10));
        let r = replay_files(std::slice::from_ref(&path), (since, until));
        let _ = std::fs::remove_file(&path);
        Ok(r?.0.timeline.values().map(|s| s.drops.iter().sum::<u64>()).sum())
    }

    fn back(s: u64) -> Option<TimeSpec> {
        Some(TimeSpec::BeforeEnd(Duration::from_secs(s)))
    }

    fn after(s: u64) -> Option<TimeSpec> {
        Some(TimeSpec::AfterStart(Duration::from_secs(s)))
    }

    #[test]
    fn relative_bounds_count_back_from_the_end() {
        assert_eq!(drops_in(None, None).unwrap(), 10);
        // The last 5 s of an 11 s recording: seconds 6..=9 hold drops.
        assert_eq!(drops_in(back(5), None).unwrap(), 4);
        assert_eq!(drops_in(after(5), None).unwrap(), 5);
        assert_eq!(drops_in(None, back(8)).unwrap(), 3);
        assert_eq!(drops_in(back(9), back(4)).unwrap(), 5);
        // Longer than the recording: all of it.
        assert_eq!(drops_in(back(3600), None).unwrap(), 10);
    }

    #[test]
    fn empty_and_inverted_windows_are_errors() {
        let e = drops_in(back(4), back(9)).unwrap_err().to_string();
        assert!(e.contains("window is empty") && e.contains("4s before the end"), "{e}");
        let e = drops_in(after(3), after(3)).unwrap_err().to_string();
        assert!(e.contains("window is empty"), "{e}");
        let e = drops_in(after(11), None).unwrap_err().to_string();
        assert!(e.contains("not before the recording's end") && e.contains("runs from"), "{e}");
        let start = 1_796_083_200_000_000_000;
        let e = drops_in(None, Some(TimeSpec::Wall(start))).unwrap_err().to_string();
        assert!(e.contains("not after the recording's start"), "{e}");
        assert_eq!(drops_in(Some(TimeSpec::Wall(start + 7_000_000_000)), None).unwrap(), 3);
    }
}
