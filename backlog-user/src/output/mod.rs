//! Where drops are *printed*: text for people (text.rs), NDJSON for programs
//! (json.rs). Both render the same model and typed events into a writer they are
//! handed; `Printer` is either one as a session observer.
pub mod json;
mod rows;
pub mod text;

use std::io::{self, BufWriter, Write};

use anyhow::{Context, Result};

use crate::event::{ListenerEvent, What};
use crate::model::{Filter, Listener, Model};
use crate::session::observer::{Observer, Started};
use crate::time::Clock;

pub use rows::rows;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// What the terminal shows of a session.
#[derive(Clone, Debug)]
pub struct View {
    pub format: Format,
    pub filter: Filter,
    /// Listeners a table lists before summing the rest (0: all).
    pub top: usize,
    /// Text: one line per drop as it happens (NDJSON always has them).
    pub events: bool,
    /// Each listener's accept-wait histogram in the summary.
    pub hist: bool,
}

/// A session's terminal output: a writer, what to show, and the previous interval's
/// totals for rates. Drop lines are written per ring-buffer batch rather than per
/// line (a write(2) per line was 40% of the tracer's CPU in a SYN flood); every
/// other record goes out at once so pipes and tests see it as it happens.
pub struct Printer {
    w: BufWriter<Box<dyn Write>>,
    view: View,
    clock: Clock,
    prev: Previous,
    /// The first write error of a drop line, returned by the next `flush`.
    error: Option<io::Error>,
}

impl Printer {
    pub fn new(view: View, w: Box<dyn Write>) -> Printer {
        Printer {
            w: BufWriter::with_capacity(64 << 10, w),
            view,
            clock: Clock::now(),
            prev: Previous::new(),
            error: None,
        }
    }

    fn done(&mut self, r: io::Result<()>) -> Result<()> {
        r.and_then(|()| self.w.flush()).context("writing the output")
    }
}

impl Observer for Printer {
    fn started(&mut self, s: &Started) -> Result<()> {
        let r = match self.view.format {
            Format::Text => text::start(&mut self.w, s),
            Format::Json => json::start(&mut self.w, s),
        };
        self.done(r)
    }

    fn event(&mut self, ev: &ListenerEvent, l: &Listener) {
        let What::Drop(d) = &ev.what else { return };
        let shown = match self.view.format {
            Format::Text => self.view.events,
            Format::Json => true,
        };
        if !shown || self.error.is_some() || !l.matches(&self.view.filter) {
            return;
        }
        let wall = self.clock.wall_ns(ev.ts_ns);
        let r = match self.view.format {
            Format::Text => text::drop_line(&mut self.w, wall, d, l),
            Format::Json => json::drop_line(&mut self.w, wall, d, l),
        };
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn flush(&mut self) -> Result<()> {
        let r = self.error.take().map_or(Ok(()), Err);
        self.done(r)
    }

    fn interval(&mut self, model: &Model, secs: f64) -> Result<()> {
        let rows = rows(model, &self.view.filter, self.view.top);
        let r = match self.view.format {
            Format::Text => text::interval(&mut self.w, model, &rows, secs, &self.prev),
            Format::Json => json::interval(&mut self.w, model, &rows, secs, &self.prev),
        };
        self.prev = snapshot(model.matching(&self.view.filter));
        self.done(r)
    }

    fn finish(&mut self, model: &Model, secs: f64) -> Result<()> {
        self.flush()?;
        let rows = rows(model, &self.view.filter, self.view.top);
        let r = match self.view.format {
            Format::Text => text::summary(&mut self.w, model, &rows, secs, self.view.hist),
            Format::Json => json::summary(&mut self.w, model, &rows, secs, self.view.hist),
        };
        self.done(r)
    }
}

/// The one-line warning when the kernel counted listen drops the kernel side did not
/// detect: how many, where (namespaces, and the listeners shown that their own
/// counters place them at), and what it means. None when there were none.
pub fn undetected_line(model: &Model, rows: &[&Listener]) -> Option<String> {
    let r = &model.reconciled;
    let total = r.undetected(&[]);
    if total == 0 {
        return None;
    }
    let mut wheres: Vec<String> = r
        .namespaces
        .iter()
        .filter(|(_, n)| n.undetected > 0)
        .map(|(inode, n)| {
            let name = n.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            let placed: Vec<String> = rows
                .iter()
                .filter(|l| l.netns == *inode && l.undetected > 0)
                .map(|l| format!("{} {}", l.local(), l.undetected))
                .collect();
            let mut at = placed;
            if n.unplaced > 0 {
                at.push(format!("{} at no one listener", n.unplaced));
            }
            format!("netns {inode}{name} {}: {}", n.undetected, at.join(", "))
        })
        .collect();
    if r.folded.undetected > 0 {
        wheres.push(format!("{} in {} namespaces since gone", r.folded.undetected, r.folded.namespaces));
    }
    Some(format!(
        "WARNING: {total} listen drops counted by the kernel (TcpExt ListenDrops) were not detected ({}):          the counts above are short by that much; detected + undetected equals the kernel's count",
        wheres.join("; ")
    ))
}

/// Other things that make counts incomplete, a line each: programs detached from
/// outside, namespaces whose counters could not be read, kernel-side diagnostics.
pub fn completeness_lines(model: &Model) -> Vec<String> {
    let mut out: Vec<String> = model.detached.clone();
    for (inode, why) in &model.reconciled.unreconciled {
        out.push(format!("netns {inode}: not reconciled with the kernel's counters: {why}"));
    }
    let diag: Vec<String> =
        model.diagnostics.iter().filter(|(_, n)| *n > 0).map(|(name, n)| format!("{name} {n}")).collect();
    if !diag.is_empty() {
        out.push(format!("kernel-side diagnostics (see README): {}", diag.join(", ")));
    }
    out
}

/// Each listener's (drops, accepts) at the previous interval, for rates.
pub type Previous = std::collections::HashMap<backlog_common::ListenerKey, (u64, u64)>;

/// Every listener's, not only the shown ones': a listener entering the top rows
/// has its rate measured from its own previous totals.
pub fn snapshot<'a>(listeners: impl Iterator<Item = &'a Listener>) -> Previous {
    listeners.map(|l| (l.key(), (l.total_drops(), l.accepts))).collect()
}

/// Per-second rates of drops and accepts since `prev`.
pub fn rates(l: &Listener, secs: f64, prev: &Previous) -> (f64, f64) {
    let (d, a) = prev.get(&l.key()).copied().unwrap_or((0, 0));
    ((l.total_drops().saturating_sub(d)) as f64 / secs, (l.accepts.saturating_sub(a)) as f64 / secs)
}
