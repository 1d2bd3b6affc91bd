//! Human output: a start line, optional per-drop lines, an ss/bcc-style table, and
//! bcc/bpftrace-style histograms.
use std::io::{self, Write};

use backlog_common::{hist, DropReason};

use super::rows::{rates, Previous, Rows, Totals};
use crate::escape::escape;
use crate::event::Dropped;
use crate::model::{Listener, Model, SockAddr};
use crate::session::observer::Started;

fn owners(l: &Listener) -> String {
    if l.owners.is_empty() {
        return "-".into();
    }
    let mut s: Vec<String> = l.owners.iter().take(3).map(|(p, c)| format!("{p}/{}", escape(c))).collect();
    if l.owners.len() > 3 {
        s.push(format!("+{}", l.owners.len() - 3));
    }
    s.join(",")
}

/// The effective limit, with what the application asked for when that was more.
fn limit(l: &Listener) -> String {
    match l.requested_backlog {
        Some(r) if r != l.queue_max => format!("{}({r})", l.queue_max),
        _ => l.queue_max.to_string(),
    }
}

fn ms(us: f64) -> String {
    format!("{:.1}", us / 1000.0)
}

const HEAD: [&str; 14] = [
    "LOCAL", "NETNS", "OWNER", "LIMIT", "PEAK", "ACCEPTQ", "SYNQ", "ACK_OVF", "OTHER", "DROPS", "ACCEPTS", "P50ms",
    "P99ms", "MAXms",
];

fn row(cells: &[String], rate: Option<[String; 2]>) -> String {
    let mut s = format!(
        "{:<22} {:>10} {:<20} {:>9} {:>5} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7}",
        cells[0],
        cells[1],
        cells[2],
        cells[3],
        cells[4],
        cells[5],
        cells[6],
        cells[7],
        cells[8],
        cells[9],
        cells[10],
        cells[11],
        cells[12],
        cells[13]
    );
    if let Some([d, a]) = rate {
        s.push_str(&format!(" {d:>8} {a:>8}"));
    }
    s
}

/// The table; `rate` adds drops/s and accepts/s computed against the previous totals.
pub fn table(listeners: &[&Listener], rate: Option<(f64, &Previous)>) -> Vec<String> {
    let head: Vec<String> = HEAD.iter().map(|s| s.to_string()).collect();
    let mut out = vec![row(&head, rate.map(|_| ["DROPS/s".into(), "ACC/s".into()]))];
    for l in listeners {
        let d = |r: DropReason| l.drops[r as usize].to_string();
        let lat = l.wait.latency();
        let q = |f: fn(&crate::model::Latency) -> f64| lat.as_ref().map_or("-".to_string(), |w| ms(f(w)));
        let cells = [
            l.local(),
            l.netns.to_string(),
            owners(l),
            limit(l),
            l.queue_peak.to_string(),
            d(DropReason::AcceptQueueFull),
            d(DropReason::SynQueueFull),
            d(DropReason::AckOverflow),
            d(DropReason::Other),
            l.total_drops().to_string(),
            l.accepts.to_string(),
            q(|w| w.p50),
            q(|w| w.p99),
            q(|w| w.max),
        ];
        let r = rate.map(|(secs, prev)| {
            let (dr, ar) = rates(l, secs, prev);
            [format!("{dr:.1}"), format!("{ar:.1}")]
        });
        out.push(row(&cells, r));
    }
    out
}

/// One listener's accept-wait histogram in the bcc/bpftrace style. Adjacent
/// sub-buckets are merged to powers of two for reading; percentiles elsewhere use
/// the fine buckets.
pub fn histogram(l: &Listener) -> Vec<String> {
    let mut pow2: Vec<(u64, u64, u64)> = Vec::new();
    for (i, n) in l.wait.buckets.iter().enumerate() {
        let (lo, _) = hist::bounds(i);
        let p_lo = if lo == 0 { 0 } else { 1u64 << (63 - lo.leading_zeros()) };
        let p_hi = if lo == 0 { 1 } else { p_lo * 2 };
        match pow2.last_mut() {
            Some(last) if last.0 == p_lo => last.2 += n,
            _ => pow2.push((p_lo, p_hi, *n)),
        }
    }
    let first = pow2.iter().position(|b| b.2 > 0);
    let last = pow2.iter().rposition(|b| b.2 > 0);
    let (Some(first), Some(last)) = (first, last) else { return vec![] };
    let max = pow2[first..=last].iter().map(|b| b.2).max().unwrap_or(1).max(1);
    let mut out = vec![format!("@accept_wait_us[{}, netns {}]:", l.local(), l.netns)];
    for (lo, hi, n) in &pow2[first..=last] {
        let bar = "@".repeat((n * 40 / max) as usize);
        out.push(format!("{:<20} {:>8} |{:<40}|", format!("[{lo}, {hi})"), n, bar));
    }
    out
}

fn clock(wall_ns: u64) -> String {
    let secs = (wall_ns / 1_000_000_000) % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, wall_ns / 1_000_000 % 1000)
}

/// The start line; before it, on stderr, why better modes were passed over: each in
/// full with `verbose`, else one short line.
pub fn start(w: &mut impl Write, s: &Started, verbose: bool) -> io::Result<()> {
    if verbose {
        for f in s.fallbacks {
            eprintln!("backlog-trace: {f}");
        }
    } else if !s.fallbacks.is_empty() {
        let modes: Vec<&str> =
            s.fallbacks.iter().filter_map(|f| f.split_once(" mode unavailable").map(|m| m.0)).collect();
        let hooks = s.fallbacks.len() - modes.len();
        let mut what = Vec::new();
        if !modes.is_empty() {
            what.push(format!("{} unavailable on this kernel", modes.join(" and ")));
        }
        if hooks > 0 {
            what.push(format!("{hooks} hook(s) attached another way"));
        }
        eprintln!("backlog-trace: {} mode; {} (-v says why)", s.mode, what.join(", "));
    }
    writeln!(w, "Tracing listen-queue drops on {} (kernel {}, {} mode). Ctrl-C to stop.", s.scope, s.kernel, s.mode)
}

pub fn drop_line(w: &mut impl Write, wall_ns: u64, d: &Dropped, l: &Listener) -> io::Result<()> {
    writeln!(
        w,
        "{} UTC  {:<22} <- {:<24} {:<18} queue {}/{}  syn {}  netns {}  {}",
        clock(wall_ns),
        l.local(),
        SockAddr(Some(d.peer.ip()), d.peer.port).to_string(),
        d.reason.name(),
        d.queue_len,
        d.queue_max,
        d.syn_queue_len,
        l.netns,
        owners(l)
    )
}

fn lines(w: &mut impl Write, lines: impl IntoIterator<Item = String>) -> io::Result<()> {
    lines.into_iter().try_for_each(|l| writeln!(w, "{l}"))
}

pub fn interval(w: &mut impl Write, model: &Model, rows: &Rows, secs: f64, prev: &Previous) -> io::Result<()> {
    writeln!(w)?;
    lines(w, table(&rows.shown, Some((secs, prev))))?;
    lines(w, more(&rows.rest))?;
    if model.totals.lost_events > 0 {
        writeln!(w, "({} events lost: ring buffer full; counts above stay exact)", model.totals.lost_events)?;
    }
    lines(w, undetected_line(model, &rows.shown))
}

pub fn summary(w: &mut impl Write, model: &Model, rows: &Rows, secs: f64, hist: bool) -> io::Result<()> {
    writeln!(w)?;
    let total = &rows.total;
    writeln!(w, "Summary after {secs:.1}s: {} drops at {} listeners", total.total_drops(), total.listeners)?;
    lines(w, table(&rows.shown, None))?;
    lines(w, more(&rows.rest))?;
    if hist {
        for l in rows.shown.iter().filter(|l| l.wait.count() > 0) {
            writeln!(w)?;
            lines(w, histogram(l))?;
        }
    }
    if total.waits_unrecorded > 0 {
        writeln!(
            w,
            "{} of {} accepts are missing from the wait histograms (the kernel's WAIT_HIST map was full: hist_full): wait percentiles cover the rest",
            total.waits_unrecorded, total.accepts
        )?;
    }
    if model.totals.lost_events > 0 {
        writeln!(w, "{} events lost (ring buffer full); per-listener counts are exact", model.totals.lost_events)?;
    }
    if model.missed_runs > 0 {
        writeln!(
            w,
            "{} program runs skipped by the kernel (a run of the same program was already active on that CPU): counts may be short",
            model.missed_runs
        )?;
    }
    lines(w, completeness_lines(model))?;
    lines(w, undetected_line(model, &rows.shown))
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
            let name = n.name.as_deref().map(|n| format!(" ({})", escape(n))).unwrap_or_default();
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
    out.extend(model.failed_outputs.iter().cloned());
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

/// The line under a table for the listeners it leaves out.
fn more(rest: &Totals) -> Option<String> {
    if rest.listeners == 0 {
        return None;
    }
    let merged = if rest.merged > 0 { format!(" ({} closed, merged by port)", rest.merged) } else { String::new() };
    // The table's column names, in DropReason order.
    let by_reason: Vec<String> = DropReason::ALL
        .iter()
        .zip(&HEAD[5..9])
        .map(|(r, name)| format!("{name} {}", rest.drops[*r as usize]))
        .collect();
    Some(format!(
        "... and {} more listeners{merged}: {} drops ({}), {} accepts, {} abandoned",
        rest.listeners,
        rest.total_drops(),
        by_reason.join(", "),
        rest.accepts,
        rest.abandoned
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_line_up_and_show_capped_limits() {
        let mut l = Listener {
            port: 8080,
            netns: 4026531840,
            queue_max: 128,
            requested_backlog: Some(511),
            ..Default::default()
        };
        l.addr = Some("0.0.0.0".parse().unwrap());
        l.drops = [3, 0, 2, 1];
        l.owners.insert(42, "nginx".into());
        let rows = table(&[&l], None);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].len(), rows[1].len(), "{rows:?}");
        assert!(rows[1].contains("128(511)"), "{}", rows[1]);
        assert!(rows[1].contains("42/nginx"));
        assert_eq!(clock(3_723_004_000_000), "01:02:03.004");
    }

    #[test]
    fn histogram_merges_to_powers_of_two() {
        let mut l = Listener::default();
        for us in [130u64, 140, 200, 255, 256, 300] {
            l.wait.record(us * 1000);
        }
        let h = histogram(&l);
        assert_eq!(h.len(), 3, "{h:?}");
        assert!(h[1].starts_with("[128, 256)") && h[1].contains(" 4 |"), "{}", h[1]);
        assert!(h[2].starts_with("[256, 512)") && h[2].contains(" 2 |"), "{}", h[2]);
        assert!(h[1].contains(&"@".repeat(40)));
    }
}
