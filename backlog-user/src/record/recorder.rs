//! The `record` sink: everything the live session learns, appended to the file.
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

use anyhow::{Context, Result};
use backlog_common::{Event, ListenerKey, ListenerStats, AF_INET, AF_INET6};

use super::format::{self, ListenerState, Owners, Phase, Reconcile, Record, Session, Sync};
use super::watch::Watched;
use super::writer::Writer;
use super::RecordArgs;
use crate::export::Sink;
use crate::model::{Listener, Model};
use crate::output::Clock;

/// CLOCK_MONOTONIC in ns, the clock of the kernel's event timestamps.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct Recorder {
    writer: Writer,
    session: Session,
    watched: Watched,
    /// What a new file after rotation must repeat to stand on its own.
    start: Option<Record>,
    owners: HashMap<ListenerKey, Owners>,
    states: HashMap<ListenerKey, ListenerState>,
    last_sync: Sync,
    /// The reconciliation last written (its time aside), repeated after rotation.
    last_reconcile: Option<Reconcile>,
    /// The first write error, returned at the next sync.
    error: Option<io::Error>,
}

/// A listener as the kernel's counters describe it, from the model (which holds
/// the exact counters after a sync).
fn state_of(l: &Listener) -> ListenerState {
    let (family, laddr) = match l.addr {
        Some(IpAddr::V6(a)) => (AF_INET6, a.octets()),
        Some(IpAddr::V4(a)) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (AF_INET, b)
        }
        None => (0, [0u8; 16]),
    };
    let stats = ListenerStats {
        drops: l.drops,
        sock_ino: l.sock_ino,
        netns: l.netns,
        family,
        lport: l.port,
        laddr,
        accepts: l.accepts,
        wait_max_ns: l.wait.max_ns,
        abandoned: l.abandoned,
        queue_peak: l.queue_peak,
        queue_max: l.queue_max,
        ..Default::default()
    };
    let wait = l.wait.buckets.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (i as u16, *n)).collect();
    ListenerState { sk: l.sk, stats, pending: l.pending, wait }
}

/// The listener a recorded state belongs to (its stats carry the socket inode).
pub fn state_key(s: &ListenerState) -> ListenerKey {
    ListenerKey { sk: s.sk, ino: s.stats.sock_ino }
}

/// The model's reconciliation as a record.
fn reconcile_of(model: &Model, ts_ns: u64) -> Reconcile {
    let r = &model.reconciled;
    Reconcile {
        ts_ns,
        missed_runs: model.missed_runs,
        diagnostics: model.diagnostics.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        namespaces: r.namespaces.iter().map(|(i, n)| (*i, n.clone())).collect(),
        folded: r.folded,
        placed: model
            .listeners
            .values()
            .filter(|l| l.undetected > 0)
            .map(|l| (l.sk, l.sock_ino, l.undetected))
            .collect(),
        unreconciled: r.unreconciled.iter().map(|(i, w)| (*i, w.clone())).collect(),
        detached: model.detached.clone(),
    }
}

/// Puts a recorded reconciliation back into a model (`report`). Diagnostics this
/// build does not know by name are left out.
pub fn apply_reconcile(model: &mut Model, r: &Reconcile) {
    model.missed_runs = r.missed_runs;
    model.diagnostics = crate::kernel::diagnostic_names()
        .filter_map(|name| r.diagnostics.iter().find(|(n, _)| n == name).map(|(_, v)| (name, *v)))
        .collect();
    model.detached = r.detached.clone();
    let rec = &mut model.reconciled;
    rec.namespaces = r.namespaces.iter().cloned().collect();
    rec.folded = r.folded;
    rec.unreconciled = r.unreconciled.iter().cloned().collect();
    for &(sk, ino, n) in &r.placed {
        if let Some(l) = model.listeners.get_mut(&ListenerKey { sk, ino }) {
            l.undetected = n;
        }
    }
}

fn owners_of(l: &Listener) -> Owners {
    Owners { sk: l.sk, ino: l.sock_ino, owners: l.owners.iter().map(|(p, c)| (*p, c.clone())).collect() }
}

impl Recorder {
    pub fn create(args: &RecordArgs) -> Result<Recorder> {
        let path = &args.output;
        let writer = Writer::create(path, args.max_size, args.rotate)
            .with_context(|| format!("cannot create {} (choose a writable path with -o)", path.display()))?;
        let watched = Watched::open(&args.trace.filters.netns)?;
        let f = &args.trace.filters;
        let clock = Clock::now();
        let session = Session {
            // Wall-clock ns now: unique enough to tell recordings apart.
            id: clock.wall_ns(mono_ns()),
            part: 0,
            // wall = mono + offset, and the offset is what wall_ns adds to 0.
            mono_to_wall_ns: clock.wall_ns(0),
            mode: String::new(),
            kernel: String::new(),
            scope: String::new(),
            ports: f.ports.clone(),
            pids: f.pids.clone(),
            netns: f.netns.clone(),
        };
        let last_sync =
            Sync { ts_ns: 0, lost_events: 0, unmatched_accepts: 0, pending_enqueued: None, listeners: vec![] };
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
        })
    }

    /// Appends a record, first starting a new file if this one is full.
    fn put(&mut self, rec: &Record) -> io::Result<()> {
        let framed = format::frame(rec);
        if self.writer.is_full(framed.len()) {
            self.writer.rotate()?;
            self.session.part += 1;
            let mut preamble = vec![Record::Session(self.session.clone())];
            preamble.extend(self.start.clone());
            preamble.extend(self.owners.values().cloned().map(Record::Owners));
            let mut sync = self.last_sync.clone();
            sync.listeners = self.states.values().cloned().collect();
            preamble.push(Record::Sync(sync));
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
        self.last_sync = Sync {
            ts_ns,
            lost_events: model.lost_events,
            unmatched_accepts: model.unmatched_accepts,
            pending_enqueued: model.pending_enqueued.map(|n| n as u64),
            listeners: changed,
        };
        let rec = Record::Sync(self.last_sync.clone());
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

impl Sink for Recorder {
    fn started(&mut self, mode: &str, kernel: &str, scope: &str) -> Result<()> {
        self.session.mode = mode.to_string();
        self.session.kernel = kernel.to_string();
        self.session.scope = scope.to_string();
        self.put(&Record::Session(self.session.clone()))?;
        // Counters are read once the programs are attached, so that the kernel's
        // deltas and the recorded events cover the same window.
        let start = Record::Snapshot(self.watched.snapshot(mono_ns(), Phase::Start));
        self.put(&start)?;
        self.start = Some(start);
        self.writer.preamble_done();
        self.writer.flush()?;
        Ok(())
    }

    fn event(&mut self, ev: &Event, l: &Listener) {
        if self.error.is_some() {
            return;
        }
        let r = self.put(&Record::Event(*ev)).and_then(|()| self.put_owners(l));
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn synced(&mut self, model: &Model) -> Result<()> {
        self.sync(model).context("writing the recording")
    }

    fn finish(&mut self, model: &Model) -> Result<()> {
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
