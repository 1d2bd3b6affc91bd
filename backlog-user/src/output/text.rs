//! Human output: a start line, optional per-drop lines, an ss/bcc-style table.
use std::collections::HashMap;

use backlog_common::{DropReason, Event};

use super::{emit, Output};
use crate::model::{fmt_sockaddr, ip, Listener, Model};

pub struct Text;

fn owners(l: &Listener) -> String {
    if l.owners.is_empty() {
        return "-".into();
    }
    let mut s: Vec<String> = l.owners.iter().take(3).map(|(p, c)| format!("{p}/{c}")).collect();
    if l.owners.len() > 3 {
        s.push(format!("+{}", l.owners.len() - 3));
    }
    s.join(",")
}

fn limit(l: &Listener) -> String {
    match l.requested_backlog {
        Some(r) if r != l.queue_max => format!("{}({r})", l.queue_max),
        _ => l.queue_max.to_string(),
    }
}

/// The table; `rate` adds a drops/s column computed against the previous totals.
pub fn table(listeners: &[&Listener], rate: Option<(f64, &HashMap<u64, u64>)>) -> Vec<String> {
    let mut out = vec![format!(
        "{:<22} {:>10} {:<20} {:>9} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8}{}",
        "LOCAL",
        "NETNS",
        "OWNER",
        "LIMIT",
        "PEAK",
        "ACCEPTQ",
        "SYNQ",
        "ACK_OVF",
        "OTHER",
        "DROPS",
        if rate.is_some() { "   DROPS/s" } else { "" }
    )];
    for l in listeners {
        let d = |r: DropReason| l.drops[r as usize];
        let per_s = rate
            .map(|(secs, prev)| format!(" {:>9.1}", (l.total_drops() - prev.get(&l.sk).copied().unwrap_or(0)) as f64 / secs))
            .unwrap_or_default();
        out.push(format!(
            "{:<22} {:>10} {:<20} {:>9} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8}{}",
            l.local(),
            l.netns,
            owners(l),
            limit(l),
            l.queue_peak,
            d(DropReason::AcceptQueueFull),
            d(DropReason::SynQueueFull),
            d(DropReason::AckOverflow),
            d(DropReason::Other),
            l.total_drops(),
            per_s
        ));
    }
    out
}

fn clock(wall_ns: u64) -> String {
    let secs = (wall_ns / 1_000_000_000) % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, wall_ns / 1_000_000 % 1000)
}

impl Output for Text {
    fn start(&self, mode: &str, kernel: &str, fallbacks: &[String], scope: &str) {
        for f in fallbacks {
            eprintln!("backlog-trace: not using {f}");
        }
        emit(&format!("Tracing listen-queue drops on {scope} (kernel {kernel}, {mode} mode). Ctrl-C to stop."));
    }

    fn drop_event(&self, wall_ns: u64, ev: &Event, l: &Listener) {
        let reason = DropReason::from_u8(ev.reason).map_or("other", DropReason::name);
        emit(&format!(
            "{} UTC  {:<22} <- {:<24} {:<18} queue {}/{}  syn {}  netns {}  {}",
            clock(wall_ns),
            l.local(),
            fmt_sockaddr(Some(ip(ev.family, &ev.raddr)), ev.rport),
            reason,
            ev.queue_len,
            ev.queue_max,
            ev.syn_queue_len,
            ev.netns,
            owners(l)
        ));
    }

    fn interval(&self, model: &Model, listeners: &[&Listener], secs: f64, prev: &HashMap<u64, u64>) {
        emit("");
        for line in table(listeners, Some((secs, prev))) {
            emit(&line);
        }
        if model.lost_events > 0 {
            emit(&format!("({} events lost: ring buffer full; counts above stay exact)", model.lost_events));
        }
    }

    fn summary(&self, listeners: &[&Listener], lost_events: u64, secs: f64) {
        emit("");
        let total: u64 = listeners.iter().map(|l| l.total_drops()).sum();
        emit(&format!("Summary after {secs:.1}s: {total} drops at {} listeners", listeners.len()));
        for line in table(listeners, None) {
            emit(&line);
        }
        if lost_events > 0 {
            emit(&format!("{lost_events} events lost (ring buffer full); per-listener counts are exact"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_line_up_and_show_capped_limits() {
        let mut l = Listener { port: 8080, netns: 4026531840, queue_max: 128, requested_backlog: Some(511), ..Default::default() };
        l.addr = Some("0.0.0.0".parse().unwrap());
        l.drops = [3, 0, 2, 1];
        l.owners.insert(42, "nginx".into());
        let rows = table(&[&l], None);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].ends_with("DROPS") && rows[1].ends_with(" 6"), "{rows:?}");
        assert_eq!(rows[0].len(), rows[1].len());
        assert!(rows[1].contains("128(511)"), "{}", rows[1]);
        assert!(rows[1].contains("42/nginx"));
        assert_eq!(clock(3_723_004_000_000), "01:02:03.004");
    }
}
