//! Human output: a start line, optional per-drop lines, an ss/bcc-style table, and
//! bcc/bpftrace-style histograms.
use std::io::{self, Write};

use backlog_common::{hist, DropReason};

use super::rows::{rates, Previous, Rows, Totals};
use crate::escape::escape;
use crate::event::Dropped;
use crate::model::{Listener, Model, SockAddr};
use crate::session::observer::Started;
use crate::time::fmt_utc;

/// How wide a table may be. Tables fit `columns` (100, or the terminal's width
/// when that is wider); `wide` prints every column on one line whatever it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Width {
    pub columns: usize,
    pub wide: bool,
}

impl Width {
    /// What an operator's terminal fits without wrapping, IPv6 addresses included.
    pub const DEFAULT_COLUMNS: usize = 100;
}

impl Default for Width {
    fn default() -> Self {
        Width { columns: Width::DEFAULT_COLUMNS, wide: false }
    }
}

/// `pid/comm` of up to `max` processes, then `+N` for the rest.
fn procs<'a>(all: impl ExactSizeIterator<Item = (u32, &'a str)>, max: usize) -> String {
    let n = all.len();
    if n == 0 {
        return "-".into();
    }
    let mut s: Vec<String> = all.take(max).map(|(p, c)| format!("{p}/{}", escape(c))).collect();
    if n > max {
        s.push(format!("+{}", n - max));
    }
    s.join(",")
}

fn owners(l: &Listener) -> String {
    procs(l.owners.iter().map(|(p, c)| (*p, c.as_str())), 3)
}

/// The processes that accepted from it, most first, with how many each took.
fn accepted_by(l: &Listener) -> Option<String> {
    let all = l.acceptors_by_accepts();
    if all.is_empty() {
        return None;
    }
    let mut s: Vec<String> =
        all.iter().take(3).map(|(p, a)| format!("{p}/{} {}", escape(&a.comm), a.accepts)).collect();
    if all.len() > 3 {
        s.push(format!("+{}", all.len() - 3));
    }
    Some(s.join(", "))
}

/// The peers it dropped most, with how many each, and the drops of every other peer
/// (or of none: the kernel's peer table was full) as `other`. None without drops.
fn dropped_from(l: &Listener) -> Option<String> {
    if l.total_drops() == 0 {
        return None;
    }
    let (top, other) = l.top_peers(3);
    let mut s: Vec<String> = top.iter().map(|(p, n)| format!("{p} {n}")).collect();
    if other > 0 {
        s.push(format!("other {other}"));
    }
    Some(s.join(", "))
}

/// Owners, as many as fit in `room` characters with the count of the rest; when not
/// even one fits with its name, pids alone (the count of owners is never cut off).
fn owners_within(l: &Listener, room: usize) -> String {
    for max in (1..=l.owners.len().max(1)).rev() {
        let s = procs(l.owners.iter().map(|(p, c)| (*p, c.as_str())), max);
        if s.chars().count() <= room {
            return s;
        }
    }
    let pids: Vec<String> = l.owners.keys().map(u32::to_string).collect();
    fit(&pids.join(","), room)
}

/// `s` cut to `room` characters, the cut marked with `…`.
fn fit(s: &str, room: usize) -> String {
    if s.chars().count() <= room {
        return s.to_string();
    }
    let mut out: String = s.chars().take(room.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A local address cut in its middle so that its port stays readable
/// (`[2001:db8:…:1]:8080`).
fn fit_addr(s: &str, room: usize) -> String {
    let n = s.chars().count();
    if n <= room {
        return s.to_string();
    }
    let tail = s.rfind(':').map_or(5, |i| s[i..].chars().count() + 6).min(room.saturating_sub(2));
    let head = room.saturating_sub(tail + 1);
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(n - tail));
    out
}

/// The effective limit, with what the application asked for when that was more.
fn limit(l: &Listener) -> String {
    match l.requested_backlog {
        Some(r) if r != l.queue_max => format!("{}({r})", l.queue_max),
        _ => l.queue_max.to_string(),
    }
}

/// The accept queue now: length/limit (the length can be the limit plus one: the
/// kernel admits a connection while length <= limit).
fn queue(l: &Listener) -> String {
    format!("{}/{}", l.queue_len, l.queue_max)
}

/// A namespace as `ip netns` names it, else its inode.
pub fn netns_label(model: &Model, netns: u32) -> String {
    match model.reconciled.namespaces.get(&netns).and_then(|n| n.name.as_deref()) {
        Some(name) => escape(name).into_owned(),
        None => netns.to_string(),
    }
}

fn ms(us: f64) -> String {
    format!("{:.1}", us / 1000.0)
}

/// Drops by reason, the non-zero ones, by their JSON names.
fn reasons(l: &Listener) -> Option<String> {
    let parts: Vec<String> = DropReason::ALL
        .iter()
        .filter(|r| l.drops[**r as usize] > 0)
        .map(|r| format!("{} {}", r.name(), l.drops[*r as usize]))
        .collect();
    (!parts.is_empty()).then(|| format!("drops: {}", parts.join(", ")))
}

/// One column: header, width (0: as wide as its widest cell) and alignment.
struct Col {
    head: &'static str,
    width: usize,
    right: bool,
}

const fn col(head: &'static str, width: usize, right: bool) -> Col {
    Col { head, width, right }
}

/// Drop columns by reason in the wide table, in DropReason order: named so that
/// none reads as a queue length.
const REASON_HEADS: [&str; 4] = ["DROP_ACCQ", "DROP_SYNQ", "DROP_ACK", "DROP_OTHER"];

/// Each column's width: its own, or its widest cell's when that is wider.
fn widths(cols: &[Col], rows: &[Vec<String>]) -> Vec<usize> {
    cols.iter()
        .enumerate()
        .map(|(i, c)| {
            let widest = rows.iter().filter_map(|r| r.get(i)).map(|s| s.chars().count()).max().unwrap_or(0);
            widest.max(c.head.len()).max(c.width)
        })
        .collect()
}

fn render(cols: &[Col], rows: &[Vec<String>]) -> Vec<String> {
    let widths = widths(cols, rows);
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, cell)) in cols.iter().zip(cells).enumerate() {
            if i > 0 {
                s.push(' ');
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if c.right {
                s.push_str(&" ".repeat(pad));
                s.push_str(&cell);
            } else {
                s.push_str(&cell);
                if i + 1 < cols.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(cols.iter().map(|c| c.head.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out
}

/// The per-listener table; `rate` adds drops/s (and accepts/s when wide) against the
/// previous totals. Every line fits `width.columns` unless `width.wide`; when every
/// column fits on one line within it, that is what is printed, else the narrow
/// table with a second, indented line per listener for what its row leaves out
/// (drops by reason, the backlog asked of listen()).
pub fn table(model: &Model, listeners: &[&Listener], rate: Option<(f64, &Previous)>, width: Width) -> Vec<String> {
    let wide = wide_table(model, listeners, rate);
    if width.wide || wide.iter().all(|l| l.chars().count() <= width.columns) {
        return wide;
    }
    narrow_table(model, listeners, rate, width.columns)
}

fn latency_cells(l: &Listener) -> [String; 3] {
    let lat = l.wait.latency();
    let q = |f: fn(&crate::model::Latency) -> f64| lat.as_ref().map_or("-".to_string(), |w| ms(f(w)));
    [q(|w| w.p50), q(|w| w.p99), q(|w| w.max)]
}

fn wide_table(model: &Model, listeners: &[&Listener], rate: Option<(f64, &Previous)>) -> Vec<String> {
    let mut cols = vec![col("LOCAL", 0, false), col("NETNS", 0, false), col("QUEUE", 7, true), col("PEAK", 5, true)];
    cols.push(col("LIMIT", 9, true));
    cols.push(col("DROPS", 7, true));
    if rate.is_some() {
        cols.push(col("DROPS/s", 7, true));
    }
    cols.extend(REASON_HEADS.iter().map(|h| col(h, 0, true)));
    cols.push(col("ACCEPTS", 8, true));
    if rate.is_some() {
        cols.push(col("ACC/s", 7, true));
    }
    cols.extend([col("P50ms", 7, true), col("P99ms", 7, true), col("MAXms", 7, true), col("OWNERS", 0, false)]);
    cols.extend([col("ACCEPTED_BY", 0, false), col("DROPPED_FROM", 0, false)]);
    let rows: Vec<Vec<String>> = listeners
        .iter()
        .map(|l| {
            let rates = rate.map(|(secs, prev)| rates(l, secs, prev));
            let mut r = vec![l.local(), netns_label(model, l.netns), queue(l), l.queue_peak.to_string(), limit(l)];
            r.push(l.total_drops().to_string());
            if let Some((d, _)) = rates {
                r.push(format!("{d:.1}"));
            }
            r.extend(DropReason::ALL.iter().map(|x| l.drops[*x as usize].to_string()));
            r.push(l.accepts.to_string());
            if let Some((_, a)) = rates {
                r.push(format!("{a:.1}"));
            }
            r.extend(latency_cells(l));
            r.push(owners(l));
            r.push(accepted_by(l).unwrap_or_else(|| "-".into()));
            r.push(dropped_from(l).unwrap_or_else(|| "-".into()));
            r
        })
        .collect();
    render(&cols, &rows)
}

/// Column widths of the narrow table before OWNERS: LOCAL, NETNS, QUEUE, PEAK, DROPS,
/// (DROPS/s), ACCEPTS, P99ms.
const NARROW: [(&str, usize, bool); 7] = [
    ("LOCAL", 23, false),
    ("NETNS", 10, false),
    ("QUEUE", 9, true),
    ("PEAK", 5, true),
    ("DROPS", 7, true),
    ("ACCEPTS", 8, true),
    ("P99ms", 7, true),
];

fn narrow_table(model: &Model, listeners: &[&Listener], rate: Option<(f64, &Previous)>, columns: usize) -> Vec<String> {
    let mut cols: Vec<Col> = NARROW.iter().map(|&(h, w, r)| col(h, w, r)).collect();
    if rate.is_some() {
        cols.insert(5, col("DROPS/s", 7, true));
    }
    let mut details = Vec::new();
    let mut rows: Vec<Vec<String>> = listeners
        .iter()
        .map(|l| {
            let mut r = vec![
                fit_addr(&l.local(), 23),
                fit(&netns_label(model, l.netns), 10),
                fit(&queue(l), 9),
                l.queue_peak.to_string(),
                l.total_drops().to_string(),
                l.accepts.to_string(),
                latency_cells(l)[1].clone(),
            ];
            if let Some((secs, prev)) = rate {
                r.insert(5, format!("{:.1}", rates(l, secs, prev).0));
            }
            let mut more: Vec<String> = reasons(l).into_iter().collect();
            more.extend(accepted_by(l).map(|a| format!("accepted by {a}")));
            if let Some(asked) = l.requested_backlog.filter(|r| *r != l.queue_max) {
                more.push(format!("listen() asked {asked}, limit {}", l.queue_max));
            }
            // Peers on a line of their own: the line above is often cut already.
            let mut extra: Vec<String> =
                (!more.is_empty()).then(|| fit(&format!("  {}", more.join("; ")), columns)).into_iter().collect();
            extra.extend(dropped_from(l).map(|d| fit(&format!("  dropped from {d}"), columns)));
            details.push(extra);
            r
        })
        .collect();
    // OWNERS takes what the other columns leave (a count too wide for its column
    // widens it, and the owners give way).
    let used: usize = widths(&cols, &rows).iter().map(|w| w + 1).sum();
    let room = columns.saturating_sub(used).max(8);
    cols.push(col("OWNERS", 0, false));
    for (r, l) in rows.iter_mut().zip(listeners) {
        r.push(owners_within(l, room));
    }
    let mut out = Vec::new();
    let mut lines = render(&cols, &rows).into_iter();
    out.extend(lines.next());
    for (line, detail) in lines.zip(details) {
        out.push(line);
        out.extend(detail);
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

/// An interval's table, under a line saying when it was taken (UTC) and over how long.
pub fn interval(
    w: &mut impl Write,
    model: &Model,
    rows: &Rows,
    secs: f64,
    prev: &Previous,
    wall_ns: u64,
    width: Width,
) -> io::Result<()> {
    writeln!(w)?;
    let total = &rows.total;
    writeln!(
        w,
        "{}  last {secs:.1}s: {} drops at {} listeners since start",
        fmt_utc(wall_ns),
        total.total_drops(),
        total.listeners
    )?;
    lines(w, table(model, &rows.shown, Some((secs, prev)), width))?;
    lines(w, more(&rows.rest))?;
    if model.totals.lost_events > 0 {
        writeln!(w, "({} events lost: ring buffer full; counts above stay exact)", model.totals.lost_events)?;
    }
    lines(w, undetected_line(model, &rows.shown))
}

pub fn summary(w: &mut impl Write, model: &Model, rows: &Rows, secs: f64, hist: bool, width: Width) -> io::Result<()> {
    writeln!(w)?;
    let total = &rows.total;
    writeln!(w, "Summary after {secs:.1}s: {} drops at {} listeners", total.total_drops(), total.listeners)?;
    lines(w, table(model, &rows.shown, None, width))?;
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
    let by_reason: Vec<String> =
        DropReason::ALL.iter().map(|r| format!("{} {}", r.name(), rest.drops[*r as usize])).collect();
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

    fn listener(addr: &str, port: u16) -> Listener {
        let mut l = Listener {
            port,
            netns: 4026531840,
            queue_max: 128,
            queue_len: 129,
            queue_peak: 129,
            requested_backlog: Some(4096),
            accepts: 123_456_789,
            ..Default::default()
        };
        l.addr = Some(addr.parse().unwrap());
        l.drops = [3_000_000, 0, 2, 1];
        l.owners.insert(4_194_303, "nginx".into());
        l.owners.insert(4_194_302, "nginx: worker process".into());
        l.wait.record(1_234_567_890);
        l.peers.insert("10.0.0.7".parse().unwrap(), 2_999_990);
        l.peers.insert("10.0.0.9".parse().unwrap(), 10);
        l
    }

    #[test]
    fn rows_fit_100_columns_for_ipv4_and_ipv6_listeners() {
        let v4 = listener("255.255.255.255", 65535);
        let v6 = listener("2001:db8:85a3:1234:5678:8a2e:370:7334", 65535);
        let mapped = listener("::ffff:192.168.100.200", 443);
        let m = Model::default();
        let prev = Previous::new();
        for rate in [None, Some((1.0, &prev))] {
            let rows = table(&m, &[&v4, &v6, &mapped], rate, Width::default());
            for r in &rows {
                assert!(r.chars().count() <= 100, "{} columns: {r}", r.chars().count());
            }
            // Header, and each listener's row with its two detail lines.
            assert_eq!(rows.len(), 10, "{rows:#?}");
            assert_eq!(rows[3], "  dropped from 10.0.0.7 2999990, 10.0.0.9 10, other 3");
            assert!(rows[1].starts_with("255.255.255.255:65535 "), "{}", rows[1]);
            assert!(rows[1].contains("129/128"), "queue now/limit: {}", rows[1]);
            assert!(rows[2].contains("accept_queue_full 3000000") && rows[2].contains("asked 4096"), "{}", rows[2]);
            // An IPv6 address is cut in its middle: the port stays.
            assert!(rows[4].contains("…") && rows[4].contains(":7334]:65535"), "{}", rows[4]);
            assert!(rows[1].contains("4194302"), "an owner, cut to what is left: {}", rows[1]);
        }
        // A wider terminal, or --wide: every column on one line.
        let wide = table(&m, &[&v4, &v6], None, Width { columns: 100, wide: true });
        assert_eq!(wide.len(), 3);
        assert!(wide[2].contains("[2001:db8:85a3:1234:5678:8a2e:370:7334]:65535"), "{}", wide[2]);
        assert!(wide[0].contains("DROP_ACCQ") && !wide[0].contains(" ACCEPTQ"), "{}", wide[0]);
        assert!(wide[1].contains("128(4096)"), "{}", wide[1]);
        // The peers it dropped most; `other` is the rest of its drops.
        assert!(wide[1].ends_with(" 10.0.0.7 2999990, 10.0.0.9 10, other 3"), "{}", wide[1]);

        let roomy = table(&m, &[&v4, &v6], None, Width { columns: 400, wide: false });
        assert_eq!(roomy, wide);
        assert_eq!(clock(3_723_004_000_000), "01:02:03.004");
    }

    #[test]
    fn namespaces_show_their_ip_netns_name() {
        let mut m = Model::default();
        let l = listener("10.0.0.1", 80);
        m.reconciled
            .namespaces
            .insert(l.netns, crate::model::NetnsCounts { name: Some("blue".into()), ..Default::default() });
        let rows = table(&m, &[&l], None, Width::default());
        assert!(rows[1].contains(" blue "), "{}", rows[1]);
        assert_eq!(netns_label(&m, 1), "1");
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
