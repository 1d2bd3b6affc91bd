//! What the live loop tells whoever watches it: the terminal (text or NDJSON), the
//! recorder, the Prometheus exporter. One trait, one lifecycle: `started` once, then
//! `event`, `flush`, `synced` and `interval` interleaved, then `finish` once.
use anyhow::Result;

use crate::event::ListenerEvent;
use crate::model::{Listener, Model};

/// What the start line says.
pub struct Started<'a> {
    pub mode: &'a str,
    pub kernel: &'a str,
    /// Attach points that fell back to another, a line each.
    pub fallbacks: &'a [String],
    /// Which listeners are shown ("port 80 in all network namespaces").
    pub scope: &'a str,
}

/// What an observer's failure does to the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// The session ends (every other observer is still finished): the terminal.
    EndSession,
    /// The observer is dropped, the failure shown in every output, and tracing goes
    /// on: a full disk or a misbehaving scraper must not stop the counting.
    Detach,
}

pub trait Observer {
    /// Names the observer in the line that reports its failure.
    fn name(&self) -> &'static str;
    /// What its failure does to the session.
    fn on_error(&self) -> OnError {
        OnError::Detach
    }
    /// The programs are attached.
    fn started(&mut self, s: &Started) -> Result<()>;
    /// Every event the kernel delivered, after the model folded it into `l`.
    /// Infallible so the hot path stays simple: an observer keeps its first error and
    /// returns it from the next `flush`, `synced`, `interval` or `finish`.
    fn event(&mut self, ev: &ListenerEvent, l: &Listener);
    /// A batch of events was handled: what they buffered goes out now.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// The model has just been corrected with the kernel's exact counters (every
    /// second, and once more at the end).
    fn synced(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }
    /// `--interval` elapsed, `secs` after the previous one.
    fn interval(&mut self, _model: &Model, _secs: f64) -> Result<()> {
        Ok(())
    }
    /// The session is over and the model is final (owners resolved once more).
    fn finish(&mut self, model: &Model, secs: f64) -> Result<()>;
    /// Whether the kernel must emit one event per accept() (off by default: only a
    /// recording needs each wait; counters and histograms come from maps).
    fn wants_accept_events(&self) -> bool {
        false
    }
}
