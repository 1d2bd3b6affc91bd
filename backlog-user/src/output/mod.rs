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
use crate::session::observer::{Observer, OnError, Started};
use crate::time::{mono_ns, Clock};

pub use rows::rows;
use rows::{snapshot, Previous};

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
    /// Text: every mode fallback in full at start (else one short line).
    pub verbose: bool,
    /// Text: how wide tables may be.
    pub width: text::Width,
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
    fn name(&self) -> &'static str {
        "the terminal output"
    }

    fn on_error(&self) -> OnError {
        OnError::EndSession
    }

    fn started(&mut self, s: &Started) -> Result<()> {
        let r = match self.view.format {
            Format::Text => text::start(&mut self.w, s, self.view.verbose),
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
        let wall = self.clock.wall_ns(mono_ns());
        let r = match self.view.format {
            Format::Text => text::interval(&mut self.w, model, &rows, secs, &self.prev, wall, self.view.width),
            Format::Json => json::interval(&mut self.w, model, &rows, secs, &self.prev, wall),
        };
        self.prev = snapshot(model.matching(&self.view.filter));
        self.done(r)
    }

    fn finish(&mut self, model: &Model, secs: f64) -> Result<()> {
        self.flush()?;
        let rows = rows(model, &self.view.filter, self.view.top);
        let r = match self.view.format {
            Format::Text => text::summary(&mut self.w, model, &rows, secs, self.view.hist, self.view.width),
            Format::Json => json::summary(&mut self.w, model, &rows, secs, self.view.hist),
        };
        self.done(r)
    }
}

#[cfg(test)]
mod tests {
    use backlog_common::{DropReason, ListenerKey};

    use super::*;
    use crate::event::{Dropped, Endpoint, ListenerRef};

    /// A terminal that went away.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_error_is_returned_not_fatal() {
        for format in [Format::Text, Format::Json] {
            let view = View {
                format,
                filter: Filter::default(),
                top: 10,
                events: true,
                hist: false,
                verbose: false,
                width: text::Width::default(),
            };
            let mut p = Printer::new(view, Box::new(Closed));
            let d = Dropped {
                reason: DropReason::AcceptQueueFull,
                peer: Endpoint::default(),
                queue_len: 2,
                queue_max: 1,
                syn_queue_len: 0,
            };
            let ev = ListenerEvent {
                ts_ns: 1,
                listener: ListenerRef { key: ListenerKey { sk: 1, ino: 2 }, ..Default::default() },
                what: What::Drop(d),
            };
            // Drop lines are buffered: the error shows at the batch's flush.
            p.event(&ev, &Listener::default());
            let e = p.flush().unwrap_err();
            assert!(format!("{e:#}").to_lowercase().contains("broken pipe"), "{e:#}");
            assert!(p.finish(&Model::default(), 1.0).is_err());
        }
    }
}
