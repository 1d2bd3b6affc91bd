//! Recordings back into the model: each file read up to its first damage, oldest
//! part first, every record applied the way the live session applied it (typed
//! events through `Model::apply`, sync records through `set_kernel_stats`), plus what
//! only a recording keeps: seconds, peers, queue samples, namespace snapshots.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use backlog_common::{ListenerKey, N_REASONS};

use super::format::{CounterSync, LeftOut, ListenerState, Phase, Reconcile, Record, Recording, Snapshot};
use super::mapping::{apply_reconcile, state_key};
use super::reader::{Damage, Reader, Step};
use crate::event::What;
use crate::model::{KernelTotals, Model};
use crate::time::TimeSpec;

/// What one second of the recording saw at one listener.
#[derive(Clone, Copy, Default)]
pub struct Second {
    pub drops: [u64; N_REASONS],
    pub accepts: u64,
    pub queue_peak: u32,
}

impl Second {
    pub fn merge(&mut self, o: &Second) {
        for (a, b) in self.drops.iter_mut().zip(o.drops) {
            *a += b;
        }
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
    pub last_sync: Option<CounterSync>,
    /// The latest reconciliation with the kernel's own counters.
    pub reconcile: Option<Reconcile>,
    pub owners: HashMap<ListenerKey, BTreeMap<u32, String>>,
    /// Per listener, per second since the start of the recording.
    pub timeline: HashMap<ListenerKey, BTreeMap<u64, Second>>,
    /// Accept-queue samples: (netns, socket inode) -> (port, per second peak).
    pub queues: HashMap<(u32, u64), (u16, BTreeMap<u64, u32>)>,
    pub peers: HashMap<ListenerKey, HashMap<IpAddr, u64>>,
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
                let s = self.timeline.entry(key).or_default().entry(sec).or_default();
                match ev.what {
                    What::Drop(d) => {
                        s.drops[d.reason as usize] += 1;
                        s.queue_peak = s.queue_peak.max(d.queue_len);
                        // Peers by address only: their ports are ephemeral.
                        *self.peers.entry(key).or_default().entry(d.peer.ip()).or_default() += 1;
                    }
                    What::Accept { queue_len, .. } => {
                        s.accepts += 1;
                        s.queue_peak = s.queue_peak.max(queue_len);
                    }
                    _ => {}
                }
            }
            Record::Owners(o) => self.owners.entry(ListenerKey { sk: o.sk, ino: o.ino }).or_default().extend(o.owners),
            Record::CounterSync(s) => {
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
        for (key, st) in &self.states {
            self.model.set_kernel_stats(*key, &[st.stats]);
            let buckets: Vec<(usize, u64)> = st.wait.iter().map(|&(b, n)| (usize::from(b), n)).collect();
            self.model.set_kernel_hist(*key, &buckets);
            self.model.set_pending(*key, st.pending);
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

    pub fn attribute(&mut self) {
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

/// Replays the files, oldest part first, each up to its first damage; `window`
/// limits events to a wall-clock span resolved against the recording's start.
pub fn replay_files(
    paths: &[PathBuf],
    window: (Option<TimeSpec>, Option<TimeSpec>),
) -> Result<(Replay, Vec<FileResult>)> {
    let mut files = Vec::new();
    for p in paths {
        let (reader, first) = open(p)?;
        let key = match &first {
            Step::Record(Record::Recording(s)) => (s.id, s.part),
            _ => (0, 0),
        };
        files.push((key, p.clone(), reader, first));
    }
    // Rotation renames files, so names do not tell the order; the sessions do.
    files.sort_by_key(|f| f.0);

    let mut replay = Replay::default();
    if let Some(s) = files.iter().find_map(|f| match &f.3 {
        Step::Record(Record::Recording(s)) => Some(s),
        _ => None,
    }) {
        let start = s.id;
        replay.window = (window.0.map(|t| t.resolve(start)), window.1.map(|t| t.resolve(start)));
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
