//! Where drops are *printed*: text for people, NDJSON for programs. Both render the
//! same model and events.
mod json;
mod rows;
mod text;

use std::io::Write;

use backlog_common::Event;

use crate::model::{Listener, Model};

pub use json::Json;
pub use rows::{rows, Rows};
pub use text::Text;

/// What a session says at start, per event, per interval and at the end.
pub trait Output {
    fn start(&self, mode: &str, kernel: &str, fallbacks: &[String], scope: &str);
    fn drop_event(&self, wall_ns: u64, ev: &Event, l: &Listener);
    fn interval(&self, model: &Model, rows: &Rows, secs: f64, prev: &Previous);
    fn summary(&self, model: &Model, rows: &Rows, secs: f64, hist: bool);
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

/// stdout through one buffer. Drop lines are written per ring-buffer batch rather
/// than per line (a write(2) per line was 40% of the tracer's CPU in a SYN flood);
/// every other record flushes at once so pipes and tests see it as it happens. A
/// closed pipe ends the program quietly, like other Unix tools.
static STDOUT: std::sync::LazyLock<std::sync::Mutex<std::io::BufWriter<std::io::Stdout>>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(std::io::BufWriter::with_capacity(64 << 10, std::io::stdout())));

/// A record that is seen at once.
pub(crate) fn emit(line: &str) {
    let mut out = STDOUT.lock().unwrap_or_else(|e| e.into_inner());
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// A line of a batch, written by `write` straight into the output buffer; the batch
/// ends with [`flush`].
pub(crate) fn emit_batched(write: impl FnOnce(&mut std::io::BufWriter<std::io::Stdout>) -> std::io::Result<()>) {
    let mut out = STDOUT.lock().unwrap_or_else(|e| e.into_inner());
    if write(&mut out).is_err() {
        std::process::exit(0);
    }
}

pub(crate) fn flush() {
    if STDOUT.lock().unwrap_or_else(|e| e.into_inner()).flush().is_err() {
        std::process::exit(0);
    }
}

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock nanoseconds.
#[derive(Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let get = |id| {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid pointer to a timespec.
            unsafe { libc::clock_gettime(id, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        Clock { offset_ns: get(libc::CLOCK_REALTIME) - get(libc::CLOCK_MONOTONIC) }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }
}
