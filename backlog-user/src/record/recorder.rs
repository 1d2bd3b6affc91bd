//! The `record` sink: everything the live session learns, appended to the file.
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result};
use backlog_common::ListenerKey;

use super::format::{self, CounterSync, ListenerState, Owners, Phase, Reconcile, Record, Recording};
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
    /// The recording file (an existing one is replaced).
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
    last_sync: CounterSync,
    /// The reconciliation last written (its time aside), repeated after rotation.
    last_reconcile: Option<Reconcile>,
    /// The first write error, returned at the next sync.
    error: Option<io::Error>,
    /// Why the recording ended early (a write or a rotation failed): reported at
    /// once, the session goes on counting, and `finish` says it again.
    stopped: Option<String>,
}

fn owners_of(l: &Listener) -> Owners {
    Owners { sk: l.sk, ino: l.sock_ino, owners: l.owners.iter().map(|(p, c)| (*p, c.clone())).collect() }
}

impl Recorder {
    /// Creates the file; `filter` is the session's, recorded for `report`.
    pub fn create(args: &RecordSettings, f: &Filter) -> Result<Recorder> {
        let path = &args.output;
        let writer = Writer::create(path, args.max_size, args.rotate)
            .with_context(|| format!("cannot create {} (choose a writable path with -o)", path.display()))?;
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
            last_sync,
            last_reconcile: None,
            error: None,
            stopped: None,
        })
    }

    /// Appends a record, first starting a new file if this one is full.
    fn put(&mut self, rec: &Record) -> io::Result<()> {
        let framed = format::frame(rec);
        if self.writer.is_full(framed.len()) {
            self.writer.rotate()?;
            self.session.part += 1;
            let mut preamble = vec![Record::Recording(self.session.clone())];
            preamble.extend(self.start.clone());
            preamble.extend(self.owners.values().cloned().map(Record::Owners));
            let mut sync = self.last_sync.clone();
            sync.listeners = self.states.values().cloned().collect();
            preamble.push(Record::CounterSync(sync));
            preamble.extend(self.last_reconcile.clone().map(Record::Reconcile));
            for p in &preamble {
                self.writer.write(&format::frame(p))?;
            }
            self.writer.preamble_done();
        }
        self.writer.write(&framed)
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
        self.put(&Record::Owners(o.clone()))?;
        self.owners.insert(l.key(), o);
        Ok(())
    }

    /// Listeners whose counters changed, their owners, and the queue depths.
    fn sync(&mut self, model: &Model) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let changed: Vec<ListenerState> =
            model.listeners.values().map(state_of).filter(|s| self.states.get(&state_key(s)) != Some(s)).collect();
        for l in model.listeners.values() {
            self.put_owners(l)?;
        }
        let ts_ns = mono_ns();
        self.last_sync = CounterSync {
            ts_ns,
            lost_events: model.totals.lost_events,
            unmatched_accepts: model.totals.unmatched_accepts,
            pending_enqueued: model.totals.pending_enqueued,
            listeners: changed,
        };
        let rec = Record::CounterSync(self.last_sync.clone());
        self.put(&rec)?;
        for s in std::mem::take(&mut self.last_sync.listeners) {
            self.states.insert(state_key(&s), s);
        }
        let rec = reconcile_of(model, ts_ns);
        let changed = self.last_reconcile.as_ref().is_none_or(|last| Reconcile { ts_ns, ..last.clone() } != rec);
        if changed {
            self.put(&Record::Reconcile(rec.clone()))?;
            self.last_reconcile = Some(rec);
        }
        let queues = self.watched.queues(ts_ns);
        self.put(&Record::Queues(queues))?;
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
        self.put(&Record::Recording(self.session.clone()))?;
        // Counters are read once the programs are attached, so that the kernel's
        // deltas and the recorded events cover the same window.
        let start = Record::Snapshot(self.watched.snapshot(mono_ns(), Phase::Start));
        self.put(&start)?;
        self.start = Some(start);
        self.writer.preamble_done();
        self.writer.flush()?;
        Ok(())
    }

    fn event(&mut self, ev: &ListenerEvent, l: &Listener) {
        if self.error.is_some() || self.stopped.is_some() {
            return;
        }
        let r = self.put(&Record::Event(*ev)).and_then(|()| self.put_owners(l));
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
        (|| {
            self.sync(model)?;
            self.put(&Record::Snapshot(end))?;
            self.put(&Record::End { ts_ns: mono_ns() })?;
            self.writer.flush()
        })()
        .context("writing the recording")
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
        std::fs::create_dir_all(dir.join("rec.1/blocker")).unwrap();
        let settings = RecordSettings { output: dir.join("rec"), max_size: Some(1024), rotate: 1 };
        let mut rec = Recorder::create(&settings, &Filter::default()).unwrap();
        let started = Started { mode: "test", kernel: "test", fallbacks: &[], scope: "all" };
        rec.started(&started).unwrap();
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
}
