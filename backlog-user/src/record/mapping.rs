//! The model as records and back: what the recorder writes of it at each sync, and
//! what the replay of a recording puts back into it.
use std::net::IpAddr;

use backlog_common::{ListenerKey, ListenerStats, AF_INET, AF_INET6};

use super::format::{ListenerState, Reconcile};
use crate::model::{Listener, Model};

/// A listener as the kernel's counters describe it, from the model (which holds
/// the exact counters after a sync).
/// Peers a sync record keeps per listener, most drops first: the report names ten.
const RECORDED_PEERS: usize = 64;

pub fn state_of(l: &Listener) -> ListenerState {
    let (family, laddr) = match l.addr {
        Some(IpAddr::V6(a)) => (AF_INET6, a.octets()),
        Some(IpAddr::V4(a)) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (AF_INET, b)
        }
        None => (0, [0u8; 16]),
    };
    let stats = ListenerStats {
        drops: l.drops,
        sock_ino: l.sock_ino,
        netns: l.netns,
        family,
        lport: l.port,
        laddr,
        accepts: l.accepts,
        wait_max_ns: l.wait.max_ns,
        abandoned: l.abandoned,
        queue_peak: l.queue_peak,
        queue_max: l.queue_max,
        suppressed: l.suppressed,
        ..Default::default()
    };
    let wait = l.wait.buckets.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (i as u16, *n)).collect();
    ListenerState { sk: l.sk, stats, pending: l.pending, wait, peers: l.top_peers(RECORDED_PEERS).0 }
}

/// The listener a recorded state belongs to (its stats carry the socket inode).
pub fn state_key(s: &ListenerState) -> ListenerKey {
    ListenerKey { sk: s.sk, ino: s.stats.sock_ino }
}

/// The model's reconciliation as a record.
pub fn reconcile_of(model: &Model, ts_ns: u64) -> Reconcile {
    let r = &model.reconciled;
    Reconcile {
        ts_ns,
        missed_runs: model.missed_runs,
        diagnostics: model.diagnostics.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        namespaces: r.namespaces.iter().map(|(i, n)| (*i, n.clone())).collect(),
        folded: r.folded,
        placed: model
            .listeners
            .values()
            .filter(|l| l.undetected > 0)
            .map(|l| (l.sk, l.sock_ino, l.undetected))
            .collect(),
        unreconciled: r.unreconciled.iter().map(|(i, w)| (*i, w.clone())).collect(),
        detached: model.detached.clone(),
    }
}

/// Puts a recorded reconciliation back into a model (`report`). Diagnostics this
/// build does not know by name are left out.
pub fn apply_reconcile(model: &mut Model, r: &Reconcile) {
    model.missed_runs = r.missed_runs;
    model.diagnostics = crate::kernel::diagnostic_names()
        .filter_map(|name| r.diagnostics.iter().find(|(n, _)| n == name).map(|(_, v)| (name, *v)))
        .collect();
    model.detached = r.detached.clone();
    let rec = &mut model.reconciled;
    rec.namespaces = r.namespaces.iter().cloned().collect();
    rec.folded = r.folded;
    rec.unreconciled = r.unreconciled.iter().cloned().collect();
    for &(sk, ino, n) in &r.placed {
        if let Some(l) = model.listeners.get_mut(&ListenerKey { sk, ino }) {
            l.undetected = n;
        }
    }
}
