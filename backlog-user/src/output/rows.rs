//! What a table shows: the busiest listeners, then one line summing the rest (listeners
//! past `--top` and merged closed ones), so that 150,000 listeners print as a screenful
//! and the totals still add up.
use backlog_common::N_REASONS;

use crate::model::retired::{AggKey, Aggregate};
use crate::model::{Filter, Listener, Model};

/// Summed counts of a set of listeners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub listeners: u64,
    /// Of `listeners`, closed ones merged into per-port aggregates.
    pub merged: u64,
    pub drops: [u64; N_REASONS],
    pub accepts: u64,
    pub abandoned: u64,
    /// Accepts missing from the wait histograms (see `Listener::waits_unrecorded`).
    pub waits_unrecorded: u64,
}

impl Totals {
    fn add(&mut self, l: &Listener, listeners: u64) {
        self.listeners += listeners;
        for (a, b) in self.drops.iter_mut().zip(l.drops) {
            *a += b;
        }
        self.accepts += l.accepts;
        self.abandoned += l.abandoned;
        self.waits_unrecorded += l.waits_unrecorded();
    }

    fn add_all(&mut self, t: &Totals) {
        self.listeners += t.listeners;
        self.merged += t.merged;
        for (a, b) in self.drops.iter_mut().zip(t.drops) {
            *a += b;
        }
        self.accepts += t.accepts;
        self.abandoned += t.abandoned;
        self.waits_unrecorded += t.waits_unrecorded;
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// The listeners a table shows, and what it leaves out.
pub struct Rows<'a> {
    pub shown: Vec<&'a Listener>,
    /// Listeners not shown: past `--top`, and merged ones.
    pub rest: Totals,
    /// Everything selected, shown or not.
    pub total: Totals,
    /// Aggregates of merged listeners that match the filters (part of `rest`).
    pub merged: Vec<(&'a AggKey, &'a Aggregate)>,
}

/// The listeners matching `filters`, the `top` with most drops (then accepts) first,
/// all of them when `top` is 0.
pub fn rows<'a>(model: &'a Model, filters: &'a Filter, top: usize) -> Rows<'a> {
    let mut all: Vec<&Listener> = model.matching(filters).collect();
    all.sort_by(|a, b| (b.total_drops(), b.accepts, a.key()).cmp(&(a.total_drops(), a.accepts, b.key())));
    let cut = if top == 0 { all.len() } else { top.min(all.len()) };
    let mut rest = Totals::default();
    for l in &all[cut..] {
        rest.add(l, 1);
    }
    let merged: Vec<_> = model.retired.matching().collect();
    for (_, a) in &merged {
        rest.add(&a.sum, a.listeners);
        rest.merged += a.listeners;
    }
    all.truncate(cut);
    let mut total = Totals::default();
    for l in &all {
        total.add(l, 1);
    }
    total.add_all(&rest);
    Rows { shown: all, rest, total, merged }
}

impl Totals {
    /// An aggregate of merged listeners as totals.
    pub fn of_aggregate(a: &Aggregate) -> Totals {
        let mut t = Totals::default();
        t.add(&a.sum, a.listeners);
        t.merged = a.listeners;
        t
    }
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Instant;

    use super::*;
    use crate::model::retired::{Policy, Retired};

    #[test]
    fn the_busiest_are_shown_and_the_rest_summed() {
        let mut m = Model::default();
        m.retired = Retired::new(Policy { keep_max: 0, ..Policy::default() });
        for sk in 1..=6u64 {
            let mut l = Listener { sk, port: 8000 + sk as u16, accepts: 10, ..Default::default() };
            l.drops[1] = sk;
            l.closed = sk == 1;
            m.listeners.insert(l.key(), l);
        }
        m.retired.released(backlog_common::ListenerKey { sk: 1, ino: 0 }, Instant::now());
        m.retired.merge_due(&mut m.listeners, &HashSet::new(), Instant::now());
        let all = Filter::default();
        let r = rows(&m, &all, 2);
        let shown: Vec<u64> = r.shown.iter().map(|l| l.sk).collect();
        assert_eq!(shown, vec![6, 5]);
        assert_eq!((r.rest.listeners, r.rest.merged, r.rest.total_drops(), r.rest.accepts), (4, 1, 1 + 2 + 3 + 4, 40));
        assert_eq!((r.total.listeners, r.total.total_drops(), r.total.accepts), (6, 21, 60));
        // Every accept lacks its wait here: nothing was recorded in the histograms.
        assert_eq!(r.total.waits_unrecorded, 60);
        assert_eq!(r.merged.len(), 1);
        assert_eq!(r.merged[0].0.port.label(), "8001");
        assert_eq!(Totals::of_aggregate(r.merged[0].1).merged, 1);
        assert_eq!(rows(&m, &all, 0).shown.len(), 5);
    }
}
