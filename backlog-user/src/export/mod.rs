//! Where a live session's data goes besides the terminal: a recording file
//! (`record`) or a Prometheus endpoint (`--prometheus`). Both are sinks the live
//! loop feeds; neither changes what the session prints.
mod http;
mod prometheus;

use anyhow::Result;
use backlog_common::Event;

use crate::model::{Listener, Model};

pub use prometheus::{parse_listen_addr, Prometheus};

/// What the live loop tells a sink, in this order: `started` once, then `event`
/// and `synced` interleaved, then `finish` once.
pub trait Sink {
    /// The programs are attached; `mode`, `kernel` and `scope` are what the start
    /// line says.
    fn started(&mut self, mode: &str, kernel: &str, scope: &str) -> Result<()>;
    /// Every event the kernel delivered, after the model folded it into `l`.
    /// Infallible so the hot path stays simple: a sink keeps its first error and
    /// returns it from the next `synced` or `finish`.
    fn event(&mut self, ev: &Event, l: &Listener);
    /// The model has just been corrected with the kernel's exact counters (every
    /// second while a sink is attached, and once more at the end).
    fn synced(&mut self, model: &Model) -> Result<()>;
    /// The session is over and the model is final (owners resolved once more).
    fn finish(&mut self, model: &Model) -> Result<()>;
    /// Whether the kernel must emit one event per accept() (off by default: only
    /// a recording needs each wait; counters and histograms come from maps).
    fn wants_accept_events(&self) -> bool {
        false
    }
}
