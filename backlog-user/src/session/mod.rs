//! The live session: attach, stream events into the model, tell the observers,
//! reconcile with the kernel's own counters, detach.
pub mod observer;
mod owners;
mod reconcile;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use backlog_common::{global, Event, ListenerKey, EVENTS_RING_BYTES};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::event::{self, What};
use crate::kernel::{Mode, Session, StartOptions};
use crate::model::retired::{Policy, Retired};
use crate::model::{Filter, KernelTotals, Model};
use crate::sys::counters::{Counters, Reading, Scope};
use observer::{Observer, OnError, Started};
use owners::Resolver;
use reconcile::Reconciler;

/// How a live session runs (what it shows is up to its observers).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// The listeners shown: named in the start line, and kept apart when closed
    /// listeners are merged. The kernel side counts at every listener regardless.
    pub filter: Filter,
    /// Force an attach mode instead of the best one the kernel allows.
    pub mode: Option<Mode>,
    /// Observers' `interval` every this long.
    pub interval: Option<Duration>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Drop lines per listener, per CPU, per second; above it drops are counted
    /// (exactly, as ever) and their lines as `suppressed_lines`. 0: no limit.
    pub max_drop_lines: u32,
    /// Tracepoint mode: attach the syscall tracepoints accept timing needs.
    pub accept_timing: bool,
}

fn scope(f: &Filter) -> String {
    let join = |v: Vec<String>| v.join(",");
    let ports = if f.ports.is_empty() {
        "all ports".to_string()
    } else {
        format!("port {}", join(f.ports.iter().map(u16::to_string).collect()))
    };
    let ns = if f.netns.is_empty() {
        "all network namespaces".to_string()
    } else {
        format!("netns {}", join(f.netns.iter().map(u32::to_string).collect()))
    };
    format!("{ports} in {ns}")
}

/// Upper bound on the events one ring-buffer pass can hold.
const RING_EVENTS_MAX: usize = EVENTS_RING_BYTES as usize / std::mem::size_of::<Event>();

/// Under a flood the kernel wakes a consumer that has caught up at the next event:
/// thousands of wake-ups a second, each with a batch of a few events and a write(2).
/// After a drain of at least `BUSY_DRAIN` events the loop lets the ring fill for
/// `COALESCE` before reading again: at most 200 drains a second, each a large batch.
/// The ring holds ~37k events, over 100 ms at any drop rate a host sustains, and a
/// quiet ring still gets each event read at once.
const BUSY_DRAIN: usize = 32;
const COALESCE: Duration = Duration::from_millis(5);

/// At the end, between the kernel's counters being read and our maps: time for a
/// drop the kernel has just counted to reach the maps (its program runs in the same
/// softirq, microseconds later).
const SETTLE: Duration = Duration::from_millis(100);

struct Live {
    model: Model,
    owners: Resolver,
    observers: Vec<Box<dyn Observer>>,
    /// Events this build could not decode (never from its own kernel side).
    undecodable: u64,
    /// Closed listeners whose kernel entry goes at the next sync.
    closing: BTreeSet<ListenerKey>,
    merged_since_trim: usize,
    /// Listeners seen closing since the last sync (see `SYNC_AFTER_CLOSES`).
    closed_since_sync: usize,
    /// The namespaces' own counters, read on a helper thread, and what they say.
    counters: Counters,
    reconciler: Reconciler,
    /// Syncs still to read the kernel's peer counts (see `PEER_READS`).
    peer_reads_due: u8,
}

/// The kernel's peer counts are read only after drops moved: a table a spoofed
/// flood filled holds 4,096 entries until their listener closes, and reading them
/// every second took 1.2 % of a core on a host with no drops at all. Twice: a drop's
/// peer is counted just after its listener's drop, so a read can catch the one
/// without the other; the next sync's read has both.
const PEER_READS: u8 = 2;

/// Closed listeners leave the model (and their kernel entries the map) only through
/// syncs, which run every second: churn of 10,000 listeners a second held tens of MB
/// between them. A sync after this many closes bounds it by count, whatever the rate.
const SYNC_AFTER_CLOSES: usize = 2048;

/// Merged listeners after which the freed heap is handed back (see `sync_kernel`).
const TRIM_AFTER_MERGES: usize = 4096;

impl Live {
    fn handle(&mut self, raw: &Event) {
        let Ok(ev) = event::decode(raw) else {
            self.undecodable += 1;
            return;
        };
        // Churn hook: a straggler about a merged listener must not bring it back as
        // a listener of its own that never closes; its counts reach the aggregate
        // through the kernel entry (`sync_kernel`).
        if self.model.retired.was_merged(&ev.listener.key) {
            return;
        }
        match ev.what {
            What::Unlisten => self.closed_since_sync += 1,
            // The model's drops move with the line, so the next sync's stats will
            // not show the kernel's peer counts moving: say so here.
            What::Drop(_) => self.peer_reads_due = PEER_READS,
            _ => {}
        }
        let l = self.model.apply(&ev);
        self.owners.attribute(l, matches!(ev.what, What::Listen { .. }));
        for o in &mut self.observers {
            o.event(&ev, l);
        }
    }

    /// Calls `f` on every observer. One that fails is dropped: its failure is shown
    /// in every output (`OnError::Detach`) or ends the session (`EndSession`, the
    /// first such error is returned); the others are called all the same.
    fn each(&mut self, mut f: impl FnMut(&mut dyn Observer, &Model) -> Result<()>) -> Result<()> {
        let mut first = Ok(());
        let mut i = 0;
        while i < self.observers.len() {
            let Err(e) = f(self.observers[i].as_mut(), &self.model) else {
                i += 1;
                continue;
            };
            let o = self.observers.remove(i);
            match o.on_error() {
                OnError::EndSession => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
                OnError::Detach => {
                    let line = format!("{} stopped: {e:#}; tracing continues", o.name());
                    eprintln!("backlog-trace: {line}");
                    self.model.failed_outputs.push(line);
                }
            }
        }
        first
    }

    /// Handles at most `limit` events; returns how many, and whether the ring is now
    /// empty. Under a flood the kernel refills the ring as fast as we read it, so an
    /// unbounded drain would never return to the loop that watches for Ctrl-C.
    fn drain_some(&mut self, rb: &mut RingBuf<MapData>, limit: usize) -> (usize, bool) {
        let mut emptied = false;
        let mut handled = 0;
        while handled < limit {
            let Some(item) = rb.next() else {
                emptied = true;
                break;
            };
            handled += 1;
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole Event (repr(C), any bit pattern valid).
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            drop(item);
            self.handle(&ev);
        }
        (handled, emptied)
    }

    /// Everything in the ring now (a bounded amount: the ring's size), and the
    /// observers' buffered output after it.
    fn drain(&mut self, rb: &mut RingBuf<MapData>) -> Result<()> {
        self.drain_some(rb, RING_EVENTS_MAX);
        self.each(|o, _| o.flush())
    }

    /// Pulls the exact per-listener counts from the kernel and releases the map
    /// entries of listeners that have closed (their totals stay in the model).
    /// `settle` waits between the kernel side's flush and the reads (at the end).
    fn sync_kernel(&mut self, session: &mut Session, rb: &mut RingBuf<MapData>, settle: Duration) -> Result<()> {
        if !settle.is_zero() {
            std::thread::sleep(settle);
        }
        // Every CPU's open window settled first: a drop whose segment's end no
        // program saw is recorded now (event and count), before the reads below.
        session.flush()?;
        self.drain(rb)?;
        for line in session.newly_detached() {
            eprintln!("backlog-trace: {line}");
            self.model.detached.push(line);
        }
        self.model.diagnostics = session.diagnostics()?;
        self.closed_since_sync = 0;
        self.model.missed_runs = session.missed_runs()?;
        let pending = session.enqueued_by_listener();
        self.model.totals = KernelTotals {
            lost_events: session.global(global::LOST_EVENTS)?,
            unmatched_accepts: session.global(global::UNMATCHED_ACCEPT)?,
            pending_enqueued: Some(pending.values().sum()),
        };
        let keys: Vec<ListenerKey> = self.model.listeners.keys().copied().collect();
        for key in keys {
            self.model.set_pending(key, pending.get(&key).copied().unwrap_or(0));
        }
        // Counts before histograms: an accept between the two reads then shows in
        // both, never as a wait missing from the histogram.
        let mut stats = session.stats()?;
        let entries: Vec<(ListenerKey, Vec<_>)> =
            stats.iter().filter_map(|r| r.ok()).map(|(k, v)| (k, v.iter().copied().collect())).collect();
        let mut in_kernel = HashSet::new();
        let mut released = HashSet::new();
        for (key, per_cpu) in entries {
            // Churn hook: an entry of a listener already merged (retired.rs) adds to
            // its aggregate; every count in it is new, and the listener is long closed.
            if self.model.retired.absorb_late(&key, &per_cpu) {
                let _ = stats.remove(&key);
                self.peer_reads_due = PEER_READS;
                continue;
            }
            in_kernel.insert(key);
            if self.model.set_kernel_stats(key, &per_cpu) {
                self.peer_reads_due = PEER_READS;
            }
            if !self.model.listeners.get(&key).is_some_and(|l| l.closed) {
                continue;
            }
            // Not at the first sync that sees it closed: close() leaves LISTEN
            // first, then closes the queued children one by one, each counted as
            // abandoned into this entry (or a new one, once this one is gone).
            if self.closing.remove(&key) {
                let _ = stats.remove(&key);
                self.model.retire(key);
                released.insert(key);
            } else {
                self.closing.insert(key);
            }
        }
        let hist = session.wait_hist()?;
        for (key, buckets) in &hist {
            self.model.set_kernel_hist(*key, buckets);
        }
        // Churn hook: a released listener's wait buckets are final; deleting them
        // leaves the kernel's LRU histogram map to live listeners, which 150,000
        // closed listeners' buckets would otherwise evict.
        for (key, buckets) in &hist {
            if released.contains(key) || self.model.retired.was_merged(key) {
                session.forget_hist(*key, buckets)?;
            }
        }
        // Closed listeners the kernel side never counted anything at have no entry
        // to release: released now, so that they merge like the others and memory
        // stays bounded however many quiet listeners come and go.
        let quiet: Vec<ListenerKey> = self
            .model
            .listeners
            .iter()
            .filter(|(k, l)| {
                l.closed && !in_kernel.contains(*k) && !self.closing.contains(*k) && !self.model.retired.is_released(k)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in quiet {
            self.model.retire(key);
            released.insert(key);
        }
        // Who accepted from each listener; a released listener's entries are final.
        let acceptors = session.acceptors()?;
        for (key, list) in &acceptors {
            self.model.set_acceptors(*key, list);
            if released.contains(key) || self.model.retired.was_merged(key) {
                session.forget_acceptors(*key, list.iter().map(|a| a.0))?;
            }
        }
        // Likewise whom each listener dropped; a released listener's entries go now.
        if self.peer_reads_due > 0 || !released.is_empty() {
            self.peer_reads_due = self.peer_reads_due.saturating_sub(1);
            for (key, list) in &session.peers()? {
                self.model.set_kernel_peers(*key, list);
                if released.contains(key) || self.model.retired.was_merged(key) {
                    session.forget_peers(*key, list.iter().map(|p| p.0))?;
                }
            }
        }
        let now = Instant::now();
        for key in released {
            in_kernel.remove(&key);
            self.model.retired.released(key, now);
        }
        self.merged_since_trim += self.model.retired.merge_due(&mut self.model.listeners, &in_kernel, now);
        // A burst of churn leaves the heap full of freed listeners that glibc keeps
        // resident; a trim every few thousand merges costs a heap walk (~1 ms).
        if self.merged_since_trim >= TRIM_AFTER_MERGES {
            crate::kernel::release_freed_heap();
            self.merged_since_trim = 0;
        }
        Ok(())
    }

    /// After a sync: folds in the namespaces' counters read since the previous
    /// sync, and asks for the next reading (taken from now, so it is compared with
    /// the maps of the next sync: see `reconcile`).
    fn reconcile(&mut self) -> Result<()> {
        if let Some(reading) = self.counters.take() {
            let reading = reading?;
            self.listening(&reading);
            self.reconciler.apply(reading, &mut self.model);
        }
        if self.counters.ask() {
            self.reconciler.asked(&self.model);
        }
        Ok(())
    }

    /// Every listener a namespace reading lists joins the model (`Model::listening`),
    /// so that tables show every listener in scope, as `ss -lnt` does, not only those
    /// the kernel side has reported; new ones are given to owner resolution.
    fn listening(&mut self, reading: &Reading) {
        let added = self.model.listening(reading.namespaces.iter().map(|n| (n.inode, n.listeners.as_slice(), n.last)));
        for key in added {
            if let Some(l) = self.model.listeners.get_mut(&key) {
                self.owners.attribute(l, false);
            }
        }
    }

    /// The last sync: the kernel's counters first, then (flush, settle) the maps, so
    /// that every drop the kernel counted has reached them when they are compared.
    fn sync_final(&mut self, session: &mut Session, rb: &mut RingBuf<MapData>) -> Result<()> {
        self.sync_kernel(session, rb, Duration::ZERO)?;
        if let Some(reading) = self.counters.wait() {
            let reading = reading?;
            self.listening(&reading);
            self.reconciler.apply(reading, &mut self.model);
        }
        anyhow::ensure!(self.counters.ask(), "the namespace counter thread did not take the final request");
        self.reconciler.asked(&self.model);
        let reading = self.counters.wait().expect("asked")?;
        self.sync_kernel(session, rb, SETTLE)?;
        self.listening(&reading);
        self.reconciler.apply(reading, &mut self.model);
        Ok(())
    }
}

/// Runs the tracer until Ctrl-C, SIGTERM or `duration`; returns the exit code. An
/// observer's error ends the session too, after every observer has been finished
/// (a recording gets its end mark even when the terminal went away).
pub async fn run(settings: Settings, observers: Vec<Box<dyn Observer>>) -> Result<i32> {
    // Handlers first: whoever reads the start line may signal us at once, and the
    // default action would end the process without detaching or summarising.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let emit_accepts = observers.iter().any(|o| o.wants_accept_events());
    // The baseline of every namespace in scope, before anything attaches: a drop
    // between now and then is counted as undetected, not hidden.
    let netns = &settings.filter.netns;
    let which = if netns.is_empty() { Scope::All } else { Scope::Only(netns.clone()) };
    let (counters, baseline) = Counters::start(which)?;
    let mut model = Model { retired: Retired::new(Policy::for_session(&settings.filter)), ..Model::default() };
    // Every listener in scope from the start, with its limit and queue now.
    model.listening(baseline.namespaces.iter().map(|n| (n.inode, n.listeners.as_slice(), n.last)));
    let reconciler = Reconciler::new(netns, baseline, &mut model);
    // The kernel side counts at every listener (reconciliation compares whole
    // namespaces); the filter only chooses what is shown.
    let mut session = Session::start(&StartOptions {
        mode: settings.mode,
        emit_accepts,
        max_drop_lines: settings.max_drop_lines,
        accept_timing: settings.accept_timing,
    })?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until
    // the AsyncFd (and with it the RingBuf) is dropped below.
    let mut rb = unsafe { AsyncFd::register(session.take_events()?) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let mut live = Live {
        model,
        owners: Resolver::start(),
        observers,
        undecodable: 0,
        closing: BTreeSet::new(),
        merged_since_trim: 0,
        closed_since_sync: 0,
        counters,
        reconciler,
        peer_reads_due: 0,
    };
    let scope = scope(&settings.filter);
    let started = Started { mode: session.mode, kernel: &session.kernel, fallbacks: &session.fallbacks, scope: &scope };
    live.each(|o, _| o.started(&started))?;
    // The first /proc pass (~150 ms on a busy host), on its own thread; the
    // listeners listed at start get their owners from it.
    for l in live.model.listeners.values_mut() {
        live.owners.attribute(l, false);
    }
    live.owners.request();

    let began = Instant::now();
    let deadline = settings.duration.map(|d| tokio::time::Instant::now() + d);
    let period = settings.interval.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut last_tick = Instant::now();
    // Every second, whatever the interval: the exact counters for the observers,
    // closed listeners' map entries released, the namespaces' counters reconciled.
    let second = Duration::from_secs(1);
    let mut sync_ticker = tokio::time::interval_at(tokio::time::Instant::now() + second, second);

    // Set after a busy drain: the ring is left to fill until then.
    let mut resume: Option<tokio::time::Instant> = None;
    let outcome: Result<()> = loop {
        let step: Result<()> = tokio::select! {
            guard = rb.readable_mut(), if resume.is_none() => (|| {
                let mut guard = guard?;
                // Readiness stays set while events remain, so the loop comes back
                // here after giving signals and timers their turn.
                let (handled, emptied) = live.drain_some(guard.get_inner_mut(), 4096);
                live.each(|o, _| o.flush())?;
                if live.closed_since_sync >= SYNC_AFTER_CLOSES {
                    live.sync_kernel(&mut session, guard.get_inner_mut(), Duration::ZERO)?;
                    live.reconcile()?;
                }
                if emptied {
                    guard.clear_ready();
                    if handled >= BUSY_DRAIN {
                        resume = Some(tokio::time::Instant::now() + COALESCE);
                    }
                }
                Ok(())
            })(),
            _ = async { tokio::time::sleep_until(resume.expect("guarded")).await }, if resume.is_some() => {
                resume = None;
                Ok(())
            }
            Some(scan) = live.owners.next() => {
                live.owners.apply(scan, &mut live.model);
                Ok(())
            }
            _ = ticker.tick(), if settings.interval.is_some() => (|| {
                live.sync_kernel(&mut session, rb.get_mut(), Duration::ZERO)?;
                live.reconcile()?;
                let secs = last_tick.elapsed().as_secs_f64();
                last_tick = Instant::now();
                live.each(|o, m| o.interval(m, secs))
            })(),
            _ = sync_ticker.tick() => (|| {
                live.sync_kernel(&mut session, rb.get_mut(), Duration::ZERO)?;
                live.reconcile()?;
                live.owners.tick();
                live.each(|o, m| o.synced(m))
            })(),
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => break Ok(()),
        };
        if step.is_err() {
            break step;
        }
    };

    // Final accounting: whatever is still in the ring, the exact counters, and the
    // kernel's own counters against them; every observer finishes, whatever failed.
    let last = live.sync_final(&mut session, rb.get_mut());
    live.owners.finish(&mut live.model);
    if live.undecodable > 0 {
        eprintln!("backlog-trace: {} events of unknown kind were skipped", live.undecodable);
    }
    let secs = began.elapsed().as_secs_f64();
    let finished = live.each(|o, m| o.finish(m, secs));
    drop(rb);
    drop(session);
    // A closed stdout (`| head`) ends the session like Ctrl-C: the other observers
    // were finished above. Any other failure is the exit status.
    let outcome = outcome.or_else(|e| if broken_pipe(&e) { Ok(()) } else { Err(e) });
    outcome.and(last).and(finished)?;
    // Counting went on, but an output the user asked for is incomplete.
    Ok(if live.model.failed_outputs.is_empty() { 0 } else { 1 })
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
