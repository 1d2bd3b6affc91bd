//! NDJSON: the machine contract (`type` = start | drop | interval | summary).
use std::collections::HashMap;

use backlog_common::{DropReason, Event};
use serde_json::{json, Value};

use super::{emit, Output};
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
    })
}

impl Output for Json {
    fn start(&self, mode: &str, kernel: &str, fallbacks: &[String], scope: &str) {
        emit(&json!({"type": "start", "mode": mode, "kernel": kernel, "scope": scope, "fallbacks": fallbacks}).to_string());
    }

    fn drop_event(&self, wall_ns: u64, ev: &Event, l: &Listener) {
        let reason = DropReason::from_u8(ev.reason).map_or("other", DropReason::name);
        emit(
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

    fn interval(&self, model: &Model, listeners: &[&Listener], secs: f64, prev: &HashMap<u64, u64>) {
        let rows: Vec<Value> = listeners
            .iter()
            .map(|l| {
                let mut v = listener_json(l);
                let delta = l.total_drops() - prev.get(&l.sk).copied().unwrap_or(0);
                v["drops_per_sec"] = json!(delta as f64 / secs);
                v
            })
            .collect();
        emit(&json!({"type": "interval", "listeners": rows, "lost_events": model.lost_events}).to_string());
    }

    fn summary(&self, listeners: &[&Listener], lost_events: u64, secs: f64) {
        let rows: Vec<Value> = listeners.iter().map(|l| listener_json(l)).collect();
        emit(&json!({"type": "summary", "duration_s": secs, "listeners": rows, "lost_events": lost_events}).to_string());
    }
}
