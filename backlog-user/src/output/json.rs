//! NDJSON: the machine contract (`type` = start | drop | interval | summary).
use std::io::{self, Write};

use backlog_common::{hist, DropReason, N_REASONS};
use serde::ser::{Serialize, Serializer};
use serde_json::{json, Value};

use super::rows::{rates, Previous, Rows, Totals};
use crate::event::Dropped;
use crate::model::retired::{AggKey, Aggregate};
use crate::model::{Listener, Model, Owners, SockAddr};
use crate::session::observer::Started;

/// One NDJSON record.
pub fn line(w: &mut impl Write, v: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")
}

/// Drops by reason name, as every record prints them.
pub fn drops_by_reason(drops: &[u64; N_REASONS]) -> Value {
    DropReason::ALL.iter().map(|r| (r.name().to_string(), json!(drops[*r as usize]))).collect()
}

fn totals_json(t: &Totals) -> Value {
    json!({
        "listeners": t.listeners,
        "merged": t.merged,
        "drops": t.total_drops(),
        "drops_by_reason": drops_by_reason(&t.drops),
        "accepts": t.accepts,
        "abandoned": t.abandoned,
        "waits_unrecorded": t.waits_unrecorded,
    })
}

/// An aggregate as a JSON object: its key, listener count and counts.
fn aggregate_json(k: &AggKey, a: &Aggregate) -> Value {
    let mut v = totals_json(&Totals::of_aggregate(a));
    v["netns"] = json!(k.netns);
    v["port"] = json!(k.port.label());
    v["comm"] = json!(k.comm);
    v
}

/// Peers a listener's JSON names, most drops first; the rest are summed.
const TOP_PEERS: usize = 10;

pub fn listener_json(l: &Listener) -> Value {
    let by_reason = drops_by_reason(&l.drops);
    let (peers, other_peers) = l.top_peers(TOP_PEERS);
    json!({
        "netns": l.netns,
        "port": l.port,
        "local": l.local(),
        "inode": l.sock_ino,
        "pids": l.owners.keys().collect::<Vec<_>>(),
        "comms": l.owners.values().collect::<Vec<_>>(),
        "accepted_by": l.acceptors_by_accepts().iter().map(|(pid, a)| json!({
            "pid": pid, "comm": a.comm, "accepts": a.accepts,
        })).collect::<Vec<_>>(),
        "drops": l.total_drops(),
        "overflows": l.overflows(),
        "drops_by_reason": by_reason,
        "queue_max": l.queue_max,
        "queue_peak": l.queue_peak,
        "requested_backlog": l.requested_backlog,
        "closed": l.closed,
        "accepts": l.accepts,
        "abandoned": l.abandoned,
        "pending": l.pending,
        "waits_unrecorded": l.waits_unrecorded(),
        "undetected": l.undetected,
        "suppressed_lines": l.suppressed,
        "dropped_peers": peers.iter().map(|(p, n)| json!({"peer": p.to_string(), "drops": n})).collect::<Vec<_>>(),
        "drops_other_peers": other_peers,
        "drops_no_peer": l.drops_no_peer(),
        "accept_latency_us": l.wait.latency().map(|w| json!({
            "count": w.count, "p50": w.p50, "p90": w.p90, "p99": w.p99, "max": w.max,
        })),
    })
}

/// What the kernel counted against what was detected: the total undetected, per
/// namespace, and the namespaces that could not be read.
fn reconciled_json(model: &Model) -> Vec<(&'static str, Value)> {
    let r = &model.reconciled;
    let namespaces: Vec<Value> = r
        .namespaces
        .iter()
        .map(|(inode, n)| {
            json!({
                "netns": inode,
                "name": n.name,
                "baseline": n.baseline,
                "listen_drops": n.listen_drops,
                "listen_overflows": n.listen_overflows,
                "reqq_full_drop": n.reqq_full_drop,
                "detected": n.detected,
                "undetected": n.undetected,
                "unplaced": n.unplaced,
                "gone": n.gone,
            })
        })
        .collect();
    let unreconciled: Vec<Value> =
        r.unreconciled.iter().map(|(inode, why)| json!({"netns": inode, "why": why})).collect();
    let f = &r.folded;
    vec![
        ("undetected", json!(r.undetected(&[]))),
        ("namespaces", Value::Array(namespaces)),
        (
            "gone_namespaces",
            json!({"namespaces": f.namespaces, "listen_drops": f.listen_drops, "detected": f.detected,
                   "undetected": f.undetected}),
        ),
        ("unreconciled", Value::Array(unreconciled)),
    ]
}

/// Every way the kernel side can see less than everything, zero or not.
fn diagnostics_json(model: &Model) -> Value {
    let mut d: serde_json::Map<String, Value> =
        model.diagnostics.iter().map(|(name, n)| (name.to_string(), json!(n))).collect();
    d.insert("missed_runs".into(), json!(model.missed_runs));
    d.insert("lost_events".into(), json!(model.totals.lost_events));
    Value::Object(d)
}

/// Non-empty wait buckets as [low_us, high_us, count].
fn hist_json(l: &Listener) -> Value {
    let rows: Vec<Value> = l
        .wait
        .buckets
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| {
            let (lo, hi) = hist::bounds(i);
            json!([lo, hi, n])
        })
        .collect();
    Value::Array(rows)
}

/// A drop line, serialised straight from the event and its listener. It is the one
/// record written per event under a flood, where building a `serde_json::Value`
/// (a map of owned strings) per line cost more than everything else the tracer
/// does per event. Fields are in alphabetical order, as serde_json's sorted maps
/// print every other record, so the bytes are those of a `json!` rendering.
#[derive(serde::Serialize)]
struct DropLine<'a> {
    comms: Comms<'a>,
    local: SockAddr,
    netns: u32,
    peer: SockAddr,
    pids: Pids<'a>,
    port: u16,
    queue_len: u32,
    queue_max: u32,
    reason: &'static str,
    syn_queue_len: u32,
    ts_ns: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

pub fn drop_line(w: &mut impl Write, wall_ns: u64, d: &Dropped, l: &Listener) -> io::Result<()> {
    let line = DropLine {
        comms: Comms(&l.owners),
        local: SockAddr(l.addr, l.port),
        netns: l.netns,
        peer: SockAddr(Some(d.peer.ip()), d.peer.port),
        pids: Pids(&l.owners),
        port: l.port,
        queue_len: d.queue_len,
        queue_max: d.queue_max,
        reason: d.reason.name(),
        syn_queue_len: d.syn_queue_len,
        ts_ns: wall_ns,
        kind: "drop",
    };
    serde_json::to_writer(&mut *w, &line)?;
    w.write_all(b"\n")
}

/// Serialised through its Display, without an intermediate String.
impl Serialize for SockAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

struct Pids<'a>(&'a Owners);

impl Serialize for Pids<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.keys())
    }
}

struct Comms<'a>(&'a Owners);

impl Serialize for Comms<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.values())
    }
}

/// The NDJSON contract's version: a field renamed or removed, or a meaning changed,
/// raises it; fields are only ever added without.
pub const SCHEMA_VERSION: u32 = 1;

pub fn start(w: &mut impl Write, s: &Started) -> io::Result<()> {
    let v = json!({
        "type": "start",
        "schema_version": SCHEMA_VERSION,
        "version": env!("CARGO_PKG_VERSION"),
        "mode": s.mode,
        "kernel": s.kernel,
        "scope": s.scope,
        "fallbacks": s.fallbacks,
    });
    line(w, &v)
}

/// `listener_json` with its namespace's `ip netns` name (null when it has none).
fn named_listener_json(model: &Model, l: &Listener) -> Value {
    let mut v = listener_json(l);
    v["netns_name"] = json!(model.reconciled.namespaces.get(&l.netns).and_then(|n| n.name.as_deref()));
    v
}

/// An interval's record; `wall_ns` (UTC ns, as drop lines' `ts_ns`) is when it was taken.
pub fn interval(
    w: &mut impl Write,
    model: &Model,
    rows: &Rows,
    secs: f64,
    prev: &Previous,
    wall_ns: u64,
) -> io::Result<()> {
    let listeners: Vec<Value> = rows
        .shown
        .iter()
        .map(|l| {
            let mut v = named_listener_json(model, l);
            let (drops, accepts) = rates(l, secs, prev);
            // The queue now: live only (a recording keeps the last drop's), so not
            // in the summary, which `report` reproduces.
            v["queue_len"] = json!(l.queue_len);
            v["drops_per_sec"] = json!(drops);
            v["accepts_per_sec"] = json!(accepts);
            v
        })
        .collect();
    let mut line = json!({
        "type": "interval",
        "ts_ns": wall_ns,
        "interval_s": secs,
        "listeners": listeners,
        "more": totals_json(&rows.rest),
        "totals": totals_json(&rows.total),
        "lost_events": model.totals.lost_events,
    });
    for (k, v) in reconciled_json(model) {
        line[k] = v;
    }
    self::line(w, &line)
}

pub fn summary(w: &mut impl Write, model: &Model, rows: &Rows, secs: f64, hist: bool) -> io::Result<()> {
    let listeners: Vec<Value> = rows
        .shown
        .iter()
        .map(|l| {
            let mut v = named_listener_json(model, l);
            if hist {
                v["accept_wait_hist_us"] = hist_json(l);
            }
            v
        })
        .collect();
    let merged: Vec<Value> = rows.merged.iter().map(|(k, a)| aggregate_json(k, a)).collect();
    let mut line = json!({
        "type": "summary",
        "duration_s": secs,
        "listeners": listeners,
        "more": totals_json(&rows.rest),
        "totals": totals_json(&rows.total),
        "merged": merged,
        "lost_events": model.totals.lost_events,
        "missed_runs": model.missed_runs,
        "unmatched_accepts": model.totals.unmatched_accepts,
        "pending_enqueued": model.totals.pending_enqueued,
        "diagnostics": diagnostics_json(model),
        "detached": model.detached,
        // Outputs that failed while tracing went on (the text summary says so too).
        "failed_outputs": model.failed_outputs,
    });
    for (k, v) in reconciled_json(model) {
        line[k] = v;
    }
    self::line(w, &line)
}

#[cfg(test)]
mod tests {
    use backlog_common::{AF_INET, AF_INET6};

    use super::*;
    use crate::event::Endpoint;
    use crate::model::fmt_sockaddr;

    /// The drop line as it was built before, through a `serde_json::Value`.
    fn as_value(wall_ns: u64, d: &Dropped, l: &Listener) -> String {
        json!({
            "type": "drop",
            "ts_ns": wall_ns,
            "netns": l.netns,
            "port": l.port,
            "local": l.local(),
            "peer": fmt_sockaddr(Some(d.peer.ip()), d.peer.port),
            "reason": d.reason.name(),
            "queue_len": d.queue_len,
            "queue_max": d.queue_max,
            "syn_queue_len": d.syn_queue_len,
            "pids": l.owners.keys().collect::<Vec<_>>(),
            "comms": l.owners.values().collect::<Vec<_>>(),
        })
        .to_string()
    }

    #[test]
    fn the_summary_names_failed_outputs() {
        let mut model = Model::default();
        let filter = crate::model::Filter::default();
        let mut out = Vec::new();
        summary(&mut out, &model, &super::super::rows::rows(&model, &filter, 50), 1.0, false).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["failed_outputs"], json!([]));
        model.failed_outputs.push("recording incident.btr: No space left on device".into());
        let mut out = Vec::new();
        summary(&mut out, &model, &super::super::rows::rows(&model, &filter, 50), 1.0, false).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["failed_outputs"], json!(["recording incident.btr: No space left on device"]));
    }

    #[test]
    fn drop_lines_are_the_bytes_of_the_value_rendering() {
        let mut peer = Endpoint { family: AF_INET, addr: [0; 16], port: 51234 };
        peer.addr[..4].copy_from_slice(&[10, 0, 0, 7]);
        let mut d = Dropped { reason: DropReason::AckOverflow, peer, queue_len: 9, queue_max: 8, syn_queue_len: 3 };
        let mut l =
            Listener { addr: Some("127.0.0.1".parse().unwrap()), port: 8080, netns: 4026531840, ..Default::default() };
        let mut cases = Vec::new();
        // IPv4, no owners; IPv6 with owners whose names need escaping.
        cases.push((d, l.clone()));
        d.peer =
            Endpoint { family: AF_INET6, addr: "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets(), port: 1 };
        d.reason = DropReason::Other;
        l.addr = Some("::".parse().unwrap());
        l.owners.insert(7, "nginx".into());
        l.owners.insert(31, "we\"ird\\ \u{1}name".into());
        cases.push((d, l.clone()));
        l.addr = None;
        cases.push((d, l));
        for (d, l) in &cases {
            let mut out = Vec::new();
            drop_line(&mut out, 1_795_000_000_123_456_789, d, l).unwrap();
            let expected = as_value(1_795_000_000_123_456_789, d, l) + "\n";
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
