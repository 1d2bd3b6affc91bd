//! The `record` sink: everything the live session learns, appended to the file.
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result};
use backlog_common::ListenerKey;

use super::format::{
    self, CounterSync, LeftOut, ListenerState, Owners, Phase, Queues, Reconcile, Record, Recording, HEADER_LEN,
};
use super::mapping::{reconcile_of, state_key, state_of};
use super::watch::Watched;
use super::writer::Writer;
use crate::event::ListenerEvent;
use crate::model::{Filter, Listener, Model};
use crate::session::observer::{Observer, Started};
use crate::time::{mono_ns, Clock};

/// Where and how a recording is written.
#[derive(Clone, Debug)]
pub struct RecordSettings {
    /// The recording file: an existing recording of ours is replaced once the
    /// session has started; anything else there is refused (see writer.rs).
    pub output: PathBuf,
    /// Start a new file when this one would grow past this many bytes.
    pub max_size: Option<u64>,
    /// Rotated files (FILE.1 … FILE.N) kept.
    pub rotate: u32,
}

pub struct Recorder {
    writer: Writer,
    session: Recording,
    watched: Watched,
    /// What a new file after rotation must repeat to stand on its own.
    start: Option<Record>,
    owners: HashMap<ListenerKey, Owners>,
    states: HashMap<ListenerKey, ListenerState>,
    /// Listeners closed at the last sync: a rotated file's preamble leaves them out.
    closed: HashSet<ListenerKey>,
    last_sync: CounterSync,
    /// The reconciliation last written (its time aside), repeated after rotation.
    last_reconcile: Option<Reconcile>,
    /// What --max-size made the recorder leave out, said at the end.
    omitted: LeftOut,
    /// Rotations since the round (sync) began: at most --rotate + 1 per round.
    round_rotations: u32,
    /// The first write error, returned at the next sync.
    error: Option<io::Error>,
    /// Why the recording ended early (a write or a rotation failed): reported at
    /// once, the session goes on counting, and `finish` says it again.
    stopped: Option<String>,
}

/// One line for stderr, when anything was left out.
fn left_out_line(o: &LeftOut, max_size: u64) -> Option<String> {
    if o.records == 0 && o.capped_records == 0 && o.short_preambles == 0 && o.reconciles == 0 {
        return None;
    }
    let reconciles =
        if o.reconciles > 0 { format!("; the reconciliation from {} preambles", o.reconciles) } else { String::new() };
    Some(format!(
        "the recording left out, to keep each file within --max-size {max_size}: {} records too large for a file \
         ({} bytes), {} records past --rotate + 1 rotations in one second ({} bytes); in {} of {} rotations, up to {} live listeners' counters and owners from the new file's \
         preamble{reconciles}",
        o.records, o.bytes, o.capped_records, o.capped_bytes, o.short_preambles, o.rotations, o.listeners_max,
    ))
}

/// A rotated file's preamble repeats at most this many live listeners (those with
/// the most drops first), and never more than its share of --max-size.
const PREAMBLE_LISTENERS_MAX: usize = 4096;

fn owners_of(l: &Listener) -> Owners {
    Owners { sk: l.sk, ino: l.sock_ino, owners: l.owners.iter().map(|(p, c)| (*p, c.clone())).collect() }
}

/// Bytes a listener's state takes in a sync record (see `format::put_state`).
fn state_len(s: &ListenerState) -> usize {
    128 + 10 * s.wait.len() + 24 * s.peers.len()
}

fn total_drops(s: &ListenerState) -> u64 {
    s.stats.drops.iter().sum()
}

impl Recorder {
    /// Creates the file (aside: an existing recording is replaced only once the
    /// session has started); `filter` is the session's, recorded for `report`.
    pub fn create(args: &RecordSettings, f: &Filter) -> Result<Recorder> {
        let path = &args.output;
        let writer = Writer::create(path, args.max_size, args.rotate)
            .with_context(|| format!("cannot record to {} (choose another path with -o)", path.display()))?;
        let watched = Watched::open(&f.netns)?;
        let clock = Clock::now();
        let session = Recording {
            // Wall-clock ns now: unique enough to tell recordings apart.
            id: clock.wall_ns(mono_ns()),
            part: 0,
            // wall = mono + offset, and the offset is what wall_ns adds to 0.
            mono_to_wall_ns: clock.wall_ns(0),
            mode: String::new(),
            kernel: String::new(),
            scope: String::new(),
            filter: f.clone(),
        };
        let last_sync =
            CounterSync { ts_ns: 0, lost_events: 0, unmatched_accepts: 0, pending_enqueued: None, listeners: vec![] };
        Ok(Recorder {
            writer,
            session,
            watched,
            start: None,
            owners: HashMap::new(),
            states: HashMap::new(),
            closed: HashSet::new(),
            last_sync,
            last_reconcile: None,
            omitted: LeftOut::default(),
            round_rotations: 0,
            error: None,
            stopped: None,
        })
    }

    /// What every file must hold besides its records: header, session, start
    /// snapshot and a sync without listeners.
    fn mandatory_len(&self) -> usize {
        let sync = CounterSync { listeners: vec![], ..self.last_sync.clone() };
        HEADER_LEN
            + format::frame(&Record::Recording(self.session.clone())).len()
            + self.start.as_ref().map_or(0, |s| format::frame(s).len())
            + format::frame(&Record::CounterSync(sync)).len()
            + format::frame(&Record::LeftOut(LeftOut::default())).len()
    }

    /// The largest record a list is cut into (syncs, queue samples): half of what a
    /// file holds beyond its mandatory preamble, so that it fits beside a preamble.
    fn chunk_limit(&self) -> usize {
        match self.writer.max_size() {
            Some(max) => ((max as usize).saturating_sub(self.mandatory_len()) / 2).max(256),
            None => usize::MAX,
        }
    }

    /// Appends a record, first starting a new file if this one is full. A record
    /// that no file could hold is left out and counted.
    fn put(&mut self, rec: &Record) -> io::Result<bool> {
        let framed = format::frame(rec);
        if self.writer.fits(framed.len()) {
            self.writer.write(&framed)?;
            return Ok(true);
        }
        let max = self.writer.max_size().expect("a file without a bound always fits") as usize;
        let mandatory = self.mandatory_len();
        if mandatory + framed.len() > max {
            self.omitted.records += 1;
            self.omitted.bytes += framed.len() as u64;
            return Ok(false);
        }
        // Rotating more within one round would delete what this round wrote, at a
        // cost (renames, a preamble) that could keep the loop from a signal.
        if self.round_rotations > self.writer.keep() {
            self.omitted.capped_records += 1;
            self.omitted.capped_bytes += framed.len() as u64;
            return Ok(false);
        }
        self.round_rotations += 1;
        // The repeated listeners take at most a quarter of what the file holds
        // beyond its mandatory part: the rest is left for records, so a file is
        // never full again right after its preamble (no rotation after rotation).
        let room = max - mandatory;
        self.rotate((room - framed.len()).min(room / 4))?;
        self.writer.write(&framed)?;
        Ok(true)
    }

    /// Starts a new file with a preamble: header, session, start snapshot, the latest
    /// totals (`mandatory_len`), then in at most `budget` more bytes the latest
    /// reconciliation and as many live listeners' counters and owners (most drops
    /// first) as fit. Never rotates again: the caller's record fits after it.
    fn rotate(&mut self, budget: usize) -> io::Result<()> {
        self.writer.rotate()?;
        self.omitted.rotations += 1;
        self.session.part += 1;
        let session = format::frame(&Record::Recording(self.session.clone()));
        let start = self.start.as_ref().map(format::frame);
        let reconcile = self.last_reconcile.clone().map(|r| format::frame(&Record::Reconcile(r)));
        let mut left = budget;
        let reconcile = reconcile.filter(|r| {
            let fits = r.len() <= left;
            if fits {
                left -= r.len();
            } else {
                self.omitted.reconciles += 1;
            }
            fits
        });
        let mut live: Vec<&ListenerState> =
            self.states.iter().filter(|(k, _)| !self.closed.contains(k)).map(|(_, s)| s).collect();
        live.sort_unstable_by_key(|s| std::cmp::Reverse(total_drops(s)));
        let mut kept = Vec::new();
        let mut owners = Vec::new();
        for s in &live {
            if kept.len() >= PREAMBLE_LISTENERS_MAX {
                break;
            }
            let o = self.owners.get(&state_key(s)).map(|o| format::frame(&Record::Owners(o.clone())));
            let need = state_len(s) + o.as_ref().map_or(0, |o| o.len());
            if need > left {
                break;
            }
            left -= need;
            kept.push((*s).clone());
            owners.extend(o);
        }
        // Owners of live listeners not synced yet (seen since the last sync).
        let mut short = kept.len() < live.len();
        for (k, o) in &self.owners {
            if self.states.contains_key(k) || self.closed.contains(k) {
                continue;
            }
            let f = format::frame(&Record::Owners(o.clone()));
            if short || f.len() > left {
                short = true;
                break;
            }
            left -= f.len();
            owners.push(f);
        }
        if short {
            self.omitted.short_preambles += 1;
            self.omitted.listeners_max = self.omitted.listeners_max.max((live.len() - kept.len()) as u64);
        }
        let mut sync = self.last_sync.clone();
        sync.listeners = kept;
        self.writer.write(&session)?;
        if let Some(s) = start {
            self.writer.write(&s)?;
        }
        for o in owners {
            self.writer.write(&o)?;
        }
        let missing = (live.len() - sync.listeners.len()) as u64;
        self.writer.write(&format::frame(&Record::CounterSync(sync)))?;
        if let Some(r) = reconcile {
            self.writer.write(&r)?;
        }
        if short || self.omitted != LeftOut::default() {
            // Sized into the mandatory part (a record of fixed size).
            let note = LeftOut { ts_ns: self.last_sync.ts_ns, preamble_listeners: missing, ..self.omitted.clone() };
            self.writer.write(&format::frame(&Record::LeftOut(note)))?;
        }
        Ok(())
    }

    /// Writes the listener's owners if they changed since last written. Runs
    /// for every event, so the unchanged case compares without allocating.
    fn put_owners(&mut self, l: &Listener) -> io::Result<()> {
        let unchanged = self.owners.get(&l.key()).is_some_and(|o| {
            o.owners.len() == l.owners.len()
                && o.owners.iter().zip(&l.owners).all(|((p, c), (lp, lc))| p == lp && c == lc)
        });
        if unchanged || l.owners.is_empty() {
            return Ok(());
        }
        let o = owners_of(l);
        // Left out or not, it is not tried again at every event (a left-out one is
        // counted once, and rotated files' preambles may still repeat it).
        self.put(&Record::Owners(o.clone()))?;
        self.owners.insert(l.key(), o);
        Ok(())
    }

    /// Listeners whose counters changed, their owners, and the queue depths.
    fn sync(&mut self, model: &Model) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.round_rotations = 0;
        // Listeners gone from the model (retired) are forgotten; closed ones stay
        // until then but no rotated file repeats them.
        self.owners.retain(|k, _| model.listeners.contains_key(k));
        self.states.retain(|k, _| model.listeners.contains_key(k));
        self.closed = model.listeners.values().filter(|l| l.closed).map(|l| l.key()).collect();
        let mut changed: Vec<ListenerState> =
            model.listeners.values().map(state_of).filter(|s| self.states.get(&state_key(s)) != Some(s)).collect();
        // Most drops first: if a round cannot write them all, the kept files hold
        // the listeners that matter.
        changed.sort_by_key(|s| std::cmp::Reverse(total_drops(s)));
        for l in model.listeners.values() {
            self.put_owners(l)?;
        }
        let ts_ns = mono_ns();
        self.last_sync = CounterSync {
            ts_ns,
            lost_events: model.totals.lost_events,
            unmatched_accepts: model.totals.unmatched_accepts,
            pending_enqueued: model.totals.pending_enqueued,
            listeners: vec![],
        };
        // Cut into records a file can hold; each part is a sync of its listeners.
        let limit = self.chunk_limit();
        let mut changed = changed.into_iter().peekable();
        loop {
            let mut part = Vec::new();
            let mut len = format::frame(&Record::CounterSync(self.last_sync.clone())).len();
            while let Some(s) = changed.peek() {
                if !part.is_empty() && len + state_len(s) > limit {
                    break;
                }
                len += state_len(s);
                part.push(changed.next().expect("peeked"));
            }
            let rec = Record::CounterSync(CounterSync { listeners: part, ..self.last_sync.clone() });
            // States left out stay "changed": the next sync tries them again.
            if self.put(&rec)? {
                let Record::CounterSync(written) = rec else { unreachable!() };
                for s in written.listeners {
                    self.states.insert(state_key(&s), s);
                }
            }
            if changed.peek().is_none() {
                break;
            }
        }
        let rec = reconcile_of(model, ts_ns);
        let changed = self.last_reconcile.as_ref().is_none_or(|last| Reconcile { ts_ns, ..last.clone() } != rec);
        if changed && self.put(&Record::Reconcile(rec.clone()))? {
            self.last_reconcile = Some(rec);
        }
        let queues = self.watched.queues(ts_ns);
        // A row takes 18 bytes; the record 21 more.
        let per = (limit.saturating_sub(21 + format::RECORD_OVERHEAD) / 18).max(1);
        if queues.rows.is_empty() {
            self.put(&Record::Queues(queues))?;
        } else {
            for rows in queues.rows.chunks(per) {
                self.put(&Record::Queues(Queues { ts_ns, rows: rows.to_vec() }))?;
            }
        }
        self.writer.flush()
    }
}

impl Observer for Recorder {
    fn name(&self) -> &'static str {
        "the recording"
    }

    fn started(&mut self, s: &Started) -> Result<()> {
        self.session.mode = s.mode.to_string();
        self.session.kernel = s.kernel.to_string();
        self.session.scope = s.scope.to_string();
        // Counters are read once the programs are attached, so that the kernel's
        // deltas and the recorded events cover the same window.
        let start = Record::Snapshot(self.watched.snapshot(mono_ns(), Phase::Start));
        let (session, snapshot) = (format::frame(&Record::Recording(self.session.clone())), format::frame(&start));
        self.writer.write(&session)?;
        if self.writer.fits(snapshot.len()) {
            self.writer.write(&snapshot)?;
            self.start = Some(start);
        } else {
            self.omitted.records += 1;
            self.omitted.bytes += snapshot.len() as u64;
        }
        // Only now does the new recording replace a previous one.
        self.writer.commit().context("recording")?;
        Ok(())
    }

    fn event(&mut self, ev: &ListenerEvent, l: &Listener) {
        if self.error.is_some() || self.stopped.is_some() {
            return;
        }
        let r = self.put(&Record::Event(*ev)).and_then(|_| self.put_owners(l));
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    /// A failed write (a full disk, EMFILE at a rotation) ends the recording, never
    /// the session: one stderr line now, the counting goes on, `finish` fails.
    fn synced(&mut self, model: &Model) -> Result<()> {
        if self.stopped.is_some() {
            return Ok(());
        }
        if let Err(e) = self.sync(model) {
            eprintln!("backlog-trace: writing the recording failed ({e}): it ends here, tracing goes on");
            self.stopped = Some(e.to_string());
        }
        Ok(())
    }

    fn finish(&mut self, model: &Model, _secs: f64) -> Result<()> {
        if let Some(e) = &self.stopped {
            anyhow::bail!("the recording ended early: writing it failed ({e})");
        }
        let end = self.watched.snapshot(mono_ns(), Phase::End);
        let r = (|| {
            self.sync(model)?;
            // The end snapshot and mark get a round of their own.
            self.round_rotations = 0;
            self.put(&Record::Snapshot(end))?;
            if self.omitted != LeftOut::default() {
                let note = LeftOut { ts_ns: mono_ns(), preamble_listeners: 0, ..self.omitted.clone() };
                self.put(&Record::LeftOut(note))?;
            }
            self.put(&Record::End { ts_ns: mono_ns() })?;
            self.writer.flush()
        })()
        .context("writing the recording");
        if let Some(line) = self.writer.max_size().and_then(|max| left_out_line(&self.omitted, max)) {
            eprintln!("backlog-trace: {line}");
        }
        r
    }

    fn wants_accept_events(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation that fails (FILE.1 is a directory that cannot be replaced) ends
    /// the recording but not the session: `synced` goes on returning Ok.
    #[test]
    fn a_failed_rotation_ends_the_recording_not_the_session() {
        let dir = std::env::temp_dir().join(format!("bt-recorder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let settings = RecordSettings { output: dir.join("rec"), max_size: Some(1024), rotate: 1 };
        let mut rec = Recorder::create(&settings, &Filter::default()).unwrap();
        let started = Started { mode: "test", kernel: "test", fallbacks: &[], scope: "all" };
        rec.started(&started).unwrap();
        // Planted after the start: the first rotation finds FILE.1 is not ours.
        std::fs::create_dir_all(dir.join("rec.1/blocker")).unwrap();
        let mut model = Model::default();
        for sk in 0..64u64 {
            let l = model.listeners.entry(ListenerKey { sk, ino: 0 }).or_default();
            l.sk = sk;
            l.port = 8000 + sk as u16;
        }
        for n in 0..64u64 {
            for l in model.listeners.values_mut() {
                l.accepts = n;
            }
            rec.synced(&model).expect("a failed write never ends the session");
        }
        assert!(rec.stopped.is_some(), "the rotation should have failed");
        assert!(rec.finish(&model, 1.0).is_err(), "finish says the recording ended early");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_len_is_what_a_sync_record_spends_per_listener() {
        let sync = |listeners: Vec<ListenerState>| {
            let s = CounterSync { ts_ns: 1, lost_events: 2, unmatched_accepts: 3, pending_enqueued: None, listeners };
            format::frame(&Record::CounterSync(s)).len()
        };
        let mut s = ListenerState { sk: 1, stats: Default::default(), pending: 0, wait: vec![], peers: vec![] };
        assert_eq!(sync(vec![s.clone()]) - sync(vec![]), state_len(&s));
        s.wait = vec![(1, 2), (3, 4), (5, 6)];
        s.peers = vec![("10.0.0.1".parse().unwrap(), 7), ("::1".parse().unwrap(), 1)];
        assert_eq!(sync(vec![s.clone(), s.clone()]) - sync(vec![]), 2 * state_len(&s));
    }

    #[test]
    fn what_is_left_out_is_said_in_one_line() {
        assert_eq!(left_out_line(&LeftOut::default(), 4096), None);
        let o = LeftOut {
            records: 2,
            bytes: 9000,
            rotations: 7,
            short_preambles: 3,
            listeners_max: 900,
            reconciles: 1,
            ..Default::default()
        };
        let line = left_out_line(&o, 65536).expect("something was left out");
        assert!(!line.contains('\n'), "{line}");
        for part in ["2 records", "9000 bytes", "3 of 7 rotations", "900 live listeners", "from 1 preambles"] {
            assert!(line.contains(part), "{part}: {line}");
        }
    }
}
