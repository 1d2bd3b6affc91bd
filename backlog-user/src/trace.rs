//! The live session: attach, stream events into the model, print, detach.
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use backlog_common::{global, Event, EventKind, ListenerKey, EVENTS_RING_BYTES};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::attribute::Resolver;
use crate::cli::TraceArgs;
use crate::export::Sink;
use crate::kernel::{Session, StartOptions};
use crate::model::Model;
use crate::output::{rows, snapshot, Clock, Json, Output, Previous, Rows, Text};
use crate::reconcile::Reconciler;
use crate::retired::{Policy, Retired};
use crate::sys::counters::{Counters, Scope};

fn scope(args: &TraceArgs) -> String {
    let f = &args.filters;
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
    out: Box<dyn Output>,
    clock: Clock,
    args: TraceArgs,
    /// Recorder and exporter: see `export::Sink` for what they are told when.
    sinks: Vec<Box<dyn Sink>>,
    /// Closed listeners whose kernel entry goes at the next sync.
    closing: BTreeSet<ListenerKey>,
    merged_since_trim: usize,
    /// Listeners seen closing since the last sync (see `SYNC_AFTER_CLOSES`).
    closed_since_sync: usize,
    /// The namespaces' own counters, read on a helper thread, and what they say.
    counters: Counters,
    reconciler: Reconciler,
}

/// Closed listeners leave the model (and their kernel entries the map) only through
/// syncs, which run every second: churn of 10,000 listeners a second held tens of MB
/// between them. A sync after this many closes bounds it by count, whatever the rate.
const SYNC_AFTER_CLOSES: usize = 2048;

/// Merged listeners after which the freed heap is handed back (see `sync_kernel`).
const TRIM_AFTER_MERGES: usize = 4096;

impl Live {
    fn handle(&mut self, ev: &Event) {
        // Churn hook: a straggler about a merged listener must not bring it back as
        // a listener of its own that never closes; its counts reach the aggregate
        // through the kernel entry (`sync_kernel`).
        if self.model.retired.was_merged(&ListenerKey { sk: ev.sk, ino: ev.sock_ino }) {
            return;
        }
        if ev.kind == EventKind::Unlisten as u8 {
            self.closed_since_sync += 1;
        }
        let Some(l) = self.model.apply(ev) else { return };
        // The listen() caller is known from the event; forked workers and sockets
        // that predate the tracer are found through /proc.
        if l.owners.is_empty() || ev.kind == EventKind::Listen as u8 {
            if let Some(o) = self.owners.owners(l.sock_ino) {
                l.owners.extend(o.iter().map(|(p, c)| (*p, c.clone())));
            }
        }
        for s in &mut self.sinks {
            s.event(ev, l);
        }
        if ev.kind == EventKind::Drop as u8 && (self.args.events || self.args.json) && l.matches(&self.args.filters) {
            let wall = self.clock.wall_ns(ev.ts_ns);
            self.out.drop_event(wall, ev, l);
        }
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
        crate::output::flush();
        (handled, emptied)
    }

    /// Everything in the ring now (a bounded amount: the ring's size).
    fn drain(&mut self, rb: &mut RingBuf<MapData>) {
        self.drain_some(rb, RING_EVENTS_MAX);
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
        self.drain(rb);
        for line in session.newly_detached() {
            eprintln!("backlog-trace: {line}");
            self.model.detached.push(line);
        }
        self.model.diagnostics = session.diagnostics()?;
        self.closed_since_sync = 0;
        self.model.lost_events = session.global(global::LOST_EVENTS)?;
        self.model.missed_runs = session.missed_runs()?;
        self.model.unmatched_accepts = session.global(global::UNMATCHED_ACCEPT)?;
        let pending = session.enqueued_by_listener()?;
        self.model.pending_enqueued = Some(pending.values().sum::<u64>() as usize);
        for (key, l) in self.model.listeners.iter_mut() {
            l.pending = pending.get(key).copied().unwrap_or(0);
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
                continue;
            }
            in_kernel.insert(key);
            self.model.set_kernel_stats(key, &per_cpu);
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
            self.reconciler.apply(reading?, &mut self.model);
        }
        if self.counters.ask() {
            self.reconciler.asked(&self.model);
        }
        Ok(())
    }

    /// The last sync: the kernel's counters first, then (flush, settle) the maps, so
    /// that every drop the kernel counted has reached them when they are compared.
    fn sync_final(&mut self, session: &mut Session, rb: &mut RingBuf<MapData>) -> Result<()> {
        self.sync_kernel(session, rb, Duration::ZERO)?;
        if let Some(reading) = self.counters.wait() {
            self.reconciler.apply(reading?, &mut self.model);
        }
        anyhow::ensure!(self.counters.ask(), "the namespace counter thread did not take the final request");
        self.reconciler.asked(&self.model);
        let reading = self.counters.wait().expect("asked")?;
        self.sync_kernel(session, rb, SETTLE)?;
        self.reconciler.apply(reading, &mut self.model);
        Ok(())
    }

    fn rows(&self) -> Rows<'_> {
        rows(&self.model, &self.args.filters, self.args.top.n)
    }
}

/// Runs the tracer until Ctrl-C, SIGTERM or --duration; returns the exit code.
pub async fn run(args: TraceArgs, mut sinks: Vec<Box<dyn Sink>>) -> Result<i32> {
    // Handlers first: whoever reads the start line may signal us at once, and the
    // default action would end the process without detaching or summarising.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    if let Some(addr) = args.prometheus {
        sinks.push(Box::new(crate::export::Prometheus::serve(addr, args.filters.clone()).await?));
    }
    let emit_accepts = sinks.iter().any(|s| s.wants_accept_events());
    // The baseline of every namespace in scope, before anything attaches: a drop
    // between now and then is counted as undetected, not hidden.
    let which = if args.filters.netns.is_empty() { Scope::All } else { Scope::Only(args.filters.netns.clone()) };
    let (counters, baseline) = Counters::start(which)?;
    let mut model = Model { retired: Retired::new(Policy::for_session(&args.filters)), ..Model::default() };
    let reconciler = Reconciler::new(&args.filters.netns, baseline, &mut model);
    // The kernel side counts at every listener (reconciliation compares whole
    // namespaces); --port, --pid and --netns only choose what is printed.
    let mut session = Session::start(&StartOptions { mode: args.mode, emit_accepts })?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until
    // the AsyncFd (and with it the RingBuf) is dropped below.
    let mut rb = unsafe { AsyncFd::register(session.take_events()?) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
    let out: Box<dyn Output> = if args.json { Box::new(Json) } else { Box::new(Text) };
    let mut live = Live {
        model,
        owners: Resolver::new(Duration::from_millis(500)),
        out,
        clock: Clock::now(),
        args,
        sinks,
        closing: BTreeSet::new(),
        merged_since_trim: 0,
        closed_since_sync: 0,
        counters,
        reconciler,
    };
    let scope = scope(&live.args);
    live.out.start(session.mode, &session.kernel, &session.fallbacks, &scope);
    for s in &mut live.sinks {
        s.started(session.mode, &session.kernel, &scope)?;
    }
    // The first /proc pass (~150 ms on a busy host) after the start line, not before:
    // everything is attached already, and events wait in the ring meanwhile.
    live.owners.refresh();

    let started = Instant::now();
    let deadline = live.args.duration.map(|d| tokio::time::Instant::now() + d);
    let period = live.args.interval.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut prev = Previous::new();
    let mut last_tick = Instant::now();
    // Every second, whatever --interval says: the exact counters for the sinks,
    // closed listeners' map entries released, the namespaces' counters reconciled.
    let second = Duration::from_secs(1);
    let mut sink_ticker = tokio::time::interval_at(tokio::time::Instant::now() + second, second);

    // Set after a busy drain: the ring is left to fill until then.
    let mut resume: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            guard = rb.readable_mut(), if resume.is_none() => {
                let mut guard = guard?;
                // Readiness stays set while events remain, so the loop comes back
                // here after giving signals and timers their turn.
                let (handled, emptied) = live.drain_some(guard.get_inner_mut(), 4096);
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
            }
            _ = async { tokio::time::sleep_until(resume.expect("guarded")).await }, if resume.is_some() => {
                resume = None;
            }
            _ = ticker.tick(), if live.args.interval.is_some() => {
                live.sync_kernel(&mut session, rb.get_mut(), Duration::ZERO)?;
                live.reconcile()?;
                let secs = last_tick.elapsed().as_secs_f64();
                last_tick = Instant::now();
                let rows = live.rows();
                live.out.interval(&live.model, &rows, secs, &prev);
                prev = snapshot(live.model.matching(&live.args.filters));
            }
            _ = sink_ticker.tick() => {
                live.sync_kernel(&mut session, rb.get_mut(), Duration::ZERO)?;
                live.reconcile()?;
                for s in &mut live.sinks {
                    s.synced(&live.model)?;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => break,
        }
    }

    // Final accounting: whatever is still in the ring, the exact counters, and the
    // kernel's own counters against them.
    live.sync_final(&mut session, rb.get_mut())?;
    live.owners.refresh();
    let Live { model, owners, .. } = &mut live;
    for l in model.listeners.values_mut() {
        if let Some(o) = owners.owners(l.sock_ino) {
            l.owners.extend(o.iter().map(|(p, c)| (*p, c.clone())));
        }
    }
    let rows = live.rows();
    live.out.summary(&live.model, &rows, started.elapsed().as_secs_f64(), live.args.hist);
    for s in &mut live.sinks {
        s.finish(&live.model)?;
    }
    drop(rb);
    drop(session);
    Ok(0)
}
