//! NDJSON: the machine contract (`type` = start | drop | interval | summary).
use backlog_common::{hist, DropReason, Event};
use serde_json::{json, Value};

use super::{emit, emit_batched, rates, Output, Previous};
use crate::model::{fmt_sockaddr, ip, Listener, Model};

pub struct Json;

pub fn listener_json(l: &Listener) -> Value {
    let by_reason: serde_json::Map<String, Value> =
        DropReason::ALL.iter().map(|r| (r.name().to_string(), json!(l.drops[*r as usize]))).collect();
    json!({
        "netns": l.netns,
        "port": l.port,
        "local": l.local(),
        "pids": l.owners.keys().collect::<Vec<_>>(),
        "comms": l.owners.values().collect::<Vec<_>>(),
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
        "accept_latency_us": l.wait.latency().map(|w| json!({
            "count": w.count, "p50": w.p50, "p90": w.p90, "p99": w.p99, "max": w.max,
        })),
    })
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

impl Output for Json {
    fn start(&self, mode: &str, kernel: &str, fallbacks: &[String], scope: &str) {
        emit(&json!({"type": "start", "mode": mode, "kernel": kernel, "scope": scope, "fallbacks": fallbacks}).to_string());
    }

    fn drop_event(&self, wall_ns: u64, ev: &Event, l: &Listener) {
        let reason = DropReason::from_u8(ev.reason).map_or("other", DropReason::name);
        emit_batched(
            &json!({
                "type": "drop",
                "ts_ns": wall_ns,
                "netns": ev.netns,
                "port": ev.lport,
                "local": l.local(),
                "peer": fmt_sockaddr(Some(ip(ev.family, &ev.raddr)), ev.rport),
                "reason": reason,
                "queue_len": ev.queue_len,
                "queue_max": ev.queue_max,
                "syn_queue_len": ev.syn_queue_len,
                "pids": l.owners.keys().collect::<Vec<_>>(),
                "comms": l.owners.values().collect::<Vec<_>>(),
            })
            .to_string(),
        );
    }

    fn interval(&self, model: &Model, listeners: &[&Listener], secs: f64, prev: &Previous) {
        let rows: Vec<Value> = listeners
            .iter()
            .map(|l| {
                let mut v = listener_json(l);
                let (drops, accepts) = rates(l, secs, prev);
                v["drops_per_sec"] = json!(drops);
                v["accepts_per_sec"] = json!(accepts);
                v
            })
            .collect();
        emit(&json!({"type": "interval", "listeners": rows, "lost_events": model.lost_events}).to_string());
    }

    fn summary(&self, model: &Model, listeners: &[&Listener], secs: f64, hist: bool) {
        let rows: Vec<Value> = listeners
            .iter()
            .map(|l| {
                let mut v = listener_json(l);
                if hist {
                    v["accept_wait_hist_us"] = hist_json(l);
                }
                v
            })
            .collect();
        emit(
            &json!({
                "type": "summary",
                "duration_s": secs,
                "listeners": rows,
                "lost_events": model.lost_events,
                "missed_runs": model.missed_runs,
                "unmatched_accepts": model.unmatched_accepts,
                "pending_enqueued": model.pending_enqueued,
            })
            .to_string(),
        );
    }
}
