//! Reconciliation: the drops the kernel side detected, against the kernel's own
//! counters, so that a drop the hooks missed shows as `undetected`, never as nothing.
//!
//! Per namespace, `undetected` is the TcpExt ListenDrops delta since the namespace's
//! baseline less the drops detected at all its listeners over the same span:
//!
//! - **Baseline.** Namespaces in scope at start are read before the programs attach,
//!   so drops in between count as undetected, not as nothing. A namespace found later
//!   is reconciled from its first reading on, against the drops detected there since
//!   the sync before that reading (`first_seen`; why not from 0: `Origin`).
//! - **No false positives from drops in flight.** A reading is asked for just after a
//!   sync read the maps and is used at the next sync, after the maps are read again:
//!   `undetected(k) = max(undetected(k-1), TcpExt(read between k-1 and k) - detected(k))`.
//!   Every drop the kernel counted before the reading has been through the hooks by
//!   the time the maps are read, so this never exceeds what was really missed; it
//!   only grows, and at the end (kernel read, flush, settle, maps) it is exact.
//! - **Placement.** Each listening socket's own drop counter (SK_MEMINFO_DROPS) moves
//!   by 1 for a SYN dropped at it, by 2 for a final-ACK overflow, and for some
//!   non-listen discards. `ub` = its rise less what the detected drops explain (the
//!   detections taken when the reading was asked for, so this is an upper bound on
//!   the drops it missed). A listener must have missed at least `undetected - Σ ub of
//!   the others`; that much, capped by its own `ub`, is charged to it. Only while every
//!   listener the namespace had since its baseline is still readable (one that closed
//!   takes its counter with it) and not for `first_seen` namespaces. What cannot be
//!   placed stays with the namespace (`unplaced`).
use std::collections::{BTreeMap, HashMap, HashSet};

use backlog_common::ListenerKey;

use crate::model::{Folded, Model, NetnsCounts};
use crate::sys::counters::{NsReading, Origin, Reading, Tcp};

/// Gone namespaces with undetected drops kept one by one; beyond this (and at once
/// for those without) they are summed into `Reconciled::folded`, so that memory stays
/// bounded while namespaces come and go.
const GONE_KEPT: usize = 256;

struct Sock {
    base: u32,
    /// Expected socket drops (`Listener::socket_drops_expected`) at the baseline.
    base_expected: u64,
    latest: u32,
}

struct Ns {
    origin: Origin,
    base: Tcp,
    /// Drops detected in the namespace before its baseline (first_seen only).
    base_detected: u64,
    latest: Tcp,
    sockets: HashMap<u64, Sock>,
    /// Every listener the namespace had since its baseline is still readable.
    tracking: bool,
    undetected: u64,
}

pub struct Reconciler {
    /// `--netns` (empty: every namespace).
    scope: Vec<u32>,
    live: BTreeMap<u32, Ns>,
    /// Namespaces released, so that their detected drops are not reported as unread.
    done: HashSet<u32>,
    /// When the outstanding reading was asked for: detected drops per namespace, and
    /// each listener's expected socket drops by (namespace, socket inode).
    asked_detected: HashMap<u32, u64>,
    asked_expected: HashMap<u32, HashMap<u64, u64>>,
    /// Gone namespaces kept in the model, oldest first.
    gone: Vec<u32>,
}

fn detected_by_ns(model: &Model) -> HashMap<u32, u64> {
    let mut out: HashMap<u32, u64> = HashMap::new();
    for l in model.listeners.values() {
        *out.entry(l.netns).or_default() += l.total_drops();
    }
    // Churn hook: closed listeners merged away (retired.rs) detected drops too.
    model.retired.add_drops_by_ns(&mut out);
    out
}

/// The model's listeners by namespace: one pass over them per reading, not one per
/// namespace.
fn keys_by_ns(model: &Model) -> HashMap<u32, Vec<ListenerKey>> {
    let mut out: HashMap<u32, Vec<ListenerKey>> = HashMap::new();
    for (k, l) in &model.listeners {
        out.entry(l.netns).or_default().push(*k);
    }
    out
}

fn socket_delta(now: u32, base: u32) -> u64 {
    u64::from(now.wrapping_sub(base))
}

impl Reconciler {
    /// Starts from the baseline reading taken before the programs attached.
    pub fn new(scope: &[u32], baseline: Reading, model: &mut Model) -> Reconciler {
        let mut r = Reconciler {
            scope: scope.to_vec(),
            live: BTreeMap::new(),
            done: HashSet::new(),
            asked_detected: HashMap::new(),
            asked_expected: HashMap::new(),
            gone: Vec::new(),
        };
        r.apply(baseline, model);
        r
    }

    fn in_scope(&self, netns: u32) -> bool {
        self.scope.is_empty() || self.scope.contains(&netns)
    }

    /// A reading has just been asked for: what the model holds now is what it
    /// will be compared with for socket counters and first readings.
    pub fn asked(&mut self, model: &Model) {
        self.asked_detected = detected_by_ns(model);
        self.asked_expected.clear();
        for l in model.listeners.values() {
            self.asked_expected.entry(l.netns).or_default().insert(l.sock_ino, l.socket_drops_expected());
        }
    }

    /// Folds a reading in; the model's maps were read after it was taken.
    pub fn apply(&mut self, reading: Reading, model: &mut Model) {
        let detected = detected_by_ns(model);
        let keys = keys_by_ns(model);
        for (inode, why) in reading.unreadable {
            if self.in_scope(inode) {
                model.reconciled.unreconciled.insert(inode, why);
            }
        }
        for r in reading.namespaces {
            if !self.in_scope(r.inode) {
                continue;
            }
            model.reconciled.unreconciled.remove(&r.inode);
            let d = detected.get(&r.inode).copied().unwrap_or(0);
            self.update(&r, d, keys.get(&r.inode).map_or(&[], Vec::as_slice), model);
            if r.last {
                self.release(r.inode, model);
            }
        }
        // Drops detected in namespaces never read: say so rather than nothing.
        for (netns, d) in detected {
            let known = self.live.contains_key(&netns) || self.done.contains(&netns);
            if d > 0 && !known && self.in_scope(netns) {
                model.reconciled.unreconciled.entry(netns).or_insert_with(|| {
                    "no process in it and no /run/netns name, so its TcpExt counters cannot be read: drops missed \
                     there would not show"
                        .to_string()
                });
            }
        }
    }

    fn update(&mut self, r: &NsReading, detected: u64, keys: &[ListenerKey], model: &mut Model) {
        let asked_detected = self.asked_detected.get(&r.inode).copied().unwrap_or(0);
        let ns = match (r.first, self.live.contains_key(&r.inode)) {
            (Some(_), _) | (None, false) => {
                // A namespace read before without a first mark cannot happen; if it
                // did, counting from now is the safe side.
                let origin = r.first.unwrap_or(Origin::FirstSeen);
                let base_detected = if origin == Origin::FirstSeen { asked_detected } else { 0 };
                let sockets = r
                    .sockets()
                    .map(|(ino, drops)| {
                        let base_expected =
                            if origin == Origin::FirstSeen { self.expected_at_ask(r.inode, ino) } else { 0 };
                        (ino, Sock { base: drops, base_expected, latest: drops })
                    })
                    .collect();
                self.done.remove(&r.inode);
                self.live.insert(
                    r.inode,
                    Ns {
                        origin,
                        base: r.tcp,
                        base_detected,
                        latest: r.tcp,
                        sockets,
                        tracking: origin != Origin::FirstSeen,
                        undetected: 0,
                    },
                );
                self.live.get_mut(&r.inode).expect("just inserted")
            }
            (None, true) => self.live.get_mut(&r.inode).expect("checked"),
        };
        ns.latest = r.tcp;
        // A listener known when the reading was asked for and absent from it has
        // closed: drops it missed can no longer be told from the socket's counter.
        let present: HashSet<u64> = r.sockets().map(|s| s.0).collect();
        let empty = HashMap::new();
        let asked = self.asked_expected.get(&r.inode).unwrap_or(&empty);
        if ns.sockets.keys().any(|i| !present.contains(i)) || asked.keys().any(|i| !present.contains(i)) {
            ns.tracking = false;
        }
        ns.sockets.retain(|i, _| present.contains(i));
        for (ino, drops) in r.sockets() {
            // A socket not listening at the baseline began after it, from 0.
            ns.sockets.entry(ino).or_insert(Sock { base: 0, base_expected: 0, latest: drops }).latest = drops;
        }
        let kernel = ns.latest.since(&ns.base);
        let detected = detected.saturating_sub(ns.base_detected);
        ns.undetected = ns.undetected.max(kernel.listen_drops.saturating_sub(detected));

        let netns = r.inode;
        let mut at_least: HashMap<u64, u64> = HashMap::new();
        if ns.tracking && ns.undetected > 0 {
            let ub: Vec<(u64, u64)> = ns
                .sockets
                .iter()
                .map(|(ino, s)| {
                    let explained = asked.get(ino).copied().unwrap_or(0);
                    let unexplained =
                        socket_delta(s.latest, s.base).saturating_sub(explained.saturating_sub(s.base_expected));
                    (*ino, unexplained)
                })
                .collect();
            let total_ub: u64 = ub.iter().map(|u| u.1).sum();
            for (ino, own) in ub {
                at_least.insert(ino, ns.undetected.saturating_sub(total_ub - own).min(own));
            }
        }
        let mut placed = 0;
        for k in keys {
            let Some(l) = model.listeners.get_mut(k) else { continue };
            if let Some(n) = at_least.get(&l.sock_ino) {
                l.undetected = l.undetected.max(*n);
            }
            placed += l.undetected;
        }
        ns.undetected = ns.undetected.max(placed);
        let name = r.name.clone();
        model.reconciled.namespaces.insert(
            netns,
            NetnsCounts {
                name,
                baseline: ns.origin.name(),
                listen_drops: kernel.listen_drops,
                listen_overflows: kernel.listen_overflows,
                reqq_full_drop: kernel.reqq_full_drop,
                detected,
                undetected: ns.undetected,
                unplaced: ns.undetected - placed,
                gone: false,
            },
        );
    }

    fn expected_at_ask(&self, netns: u32, ino: u64) -> u64 {
        self.asked_expected.get(&netns).and_then(|m| m.get(&ino)).copied().unwrap_or(0)
    }

    /// The namespace is gone: its counts are final. Kept in the model while it has
    /// undetected drops and few are kept; otherwise summed.
    fn release(&mut self, inode: u32, model: &mut Model) {
        self.live.remove(&inode);
        self.done.insert(inode);
        let rec = &mut model.reconciled;
        let Some(counts) = rec.namespaces.get_mut(&inode) else { return };
        counts.gone = true;
        self.gone.push(inode);
        let fold_now = counts.undetected == 0;
        let mut fold = |inode: u32, f: &mut Folded| {
            if let Some(c) = rec.namespaces.remove(&inode) {
                f.namespaces += 1;
                f.listen_drops += c.listen_drops;
                f.detected += c.detected;
                f.undetected += c.undetected;
            }
        };
        let mut folded = rec.folded;
        if fold_now {
            self.gone.pop();
            fold(inode, &mut folded);
        }
        while self.gone.len() > GONE_KEPT {
            let oldest = self.gone.remove(0);
            fold(oldest, &mut folded);
        }
        model.reconciled.folded = folded;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::diag::SockEntry;

    const NS: u32 = 4026532000;

    fn tcp(drops: u64) -> Tcp {
        Tcp { listen_drops: drops, listen_overflows: drops, reqq_full_drop: 0 }
    }

    fn reading(drops: u64, sockets: &[(u64, u32)], first: Option<Origin>) -> Reading {
        Reading {
            namespaces: vec![NsReading {
                inode: NS,
                name: Some("blue".into()),
                tcp: tcp(drops),
                listeners: sockets
                    .iter()
                    .map(|&(ino, drops)| SockEntry {
                        listening: true,
                        addr: std::net::Ipv4Addr::LOCALHOST.into(),
                        port: 8000 + ino as u16,
                        rqueue: 0,
                        wqueue: 8,
                        inode: ino as u32,
                        drops: Some(drops),
                    })
                    .collect(),
                first,
                last: false,
            }],
            unreadable: vec![],
        }
    }

    /// A listener with `syn` SYN drops and `ack` final-ACK overflows detected.
    fn detect(m: &mut Model, ino: u64, syn: u64, ack: u64) {
        let l = m.listeners.entry(ListenerKey { sk: ino, ino }).or_default();
        (l.sk, l.sock_ino, l.netns, l.port) = (ino, ino, NS, 8000 + ino as u16);
        l.drops = [syn, 0, ack, 0];
    }

    fn counts(m: &Model) -> &NetnsCounts {
        &m.reconciled.namespaces[&NS]
    }

    #[test]
    fn drops_before_attach_and_missed_ones_are_undetected_and_in_flight_ones_are_not() {
        let mut m = Model::default();
        // Baseline: the namespace had 100 drops before the session.
        let mut r = Reconciler::new(&[], reading(100, &[(1, 50)], Some(Origin::Start)), &mut m);
        assert_eq!((counts(&m).listen_drops, counts(&m).undetected, counts(&m).baseline), (0, 0, "start"));
        r.asked(&m);
        // 10 drops before the reading; the maps, read later, hold 13 (3 since): none missed.
        detect(&mut m, 1, 13, 0);
        r.apply(reading(110, &[(1, 60)], None), &mut m);
        assert_eq!((counts(&m).listen_drops, counts(&m).detected, counts(&m).undetected), (10, 13, 0));
        r.asked(&m);
        // 20 more counted by the kernel, 15 detected: 5 missed (110+20 - 100 = 30 vs 13+12 = 25).
        detect(&mut m, 1, 25, 0);
        r.apply(reading(130, &[(1, 80)], None), &mut m);
        assert_eq!(counts(&m).undetected, 5);
        // The socket counter rose 30, its detected drops explain 13 (asked before):
        // the one listener takes all 5.
        assert_eq!(m.listeners.values().next().unwrap().undetected, 5);
        assert_eq!(counts(&m).unplaced, 0);
        // Never goes down when detections catch up with the kernel's reading.
        r.asked(&m);
        detect(&mut m, 1, 40, 0);
        r.apply(reading(131, &[(1, 81)], None), &mut m);
        assert_eq!(counts(&m).undetected, 5);
    }

    #[test]
    fn placement_charges_only_what_other_sockets_cannot_explain() {
        let mut m = Model::default();
        let mut r = Reconciler::new(&[], reading(0, &[(1, 0), (2, 0)], Some(Origin::Start)), &mut m);
        detect(&mut m, 1, 10, 0);
        // Socket 2 detected 5 final-ACK overflows: 10 on its socket counter.
        detect(&mut m, 2, 0, 5);
        r.asked(&m);
        // Kernel 18 = 15 detected + 3 missed. Socket 1 rose 13 (3 unexplained),
        // socket 2 rose 11 (1 unexplained, e.g. a filter discard).
        r.apply(reading(18, &[(1, 13), (2, 11)], None), &mut m);
        let c = counts(&m);
        assert_eq!(c.undetected, 3);
        let by = |ino| m.listeners[&ListenerKey { sk: ino, ino }].undetected;
        // Socket 2 can explain at most 1: socket 1 missed at least 2.
        assert_eq!((by(1), by(2), c.unplaced), (2, 0, 1));
    }

    #[test]
    fn a_closed_listener_stops_placement_and_gone_namespaces_fold() {
        let mut m = Model::default();
        let mut r = Reconciler::new(&[], reading(0, &[(1, 0), (2, 0)], Some(Origin::Start)), &mut m);
        detect(&mut m, 1, 1, 0);
        r.asked(&m);
        // Listener 2 closed; 4 drops the kernel side missed, somewhere.
        r.apply(reading(5, &[(1, 5)], None), &mut m);
        assert_eq!((counts(&m).undetected, counts(&m).unplaced), (4, 4));
        r.asked(&m);
        let mut last = reading(6, &[(1, 6)], None);
        last.namespaces[0].last = true;
        r.apply(last, &mut m);
        // Kept: it has undetected drops.
        assert_eq!((counts(&m).undetected, counts(&m).gone), (5, true));
        assert_eq!(m.reconciled.undetected(&[]), 5);
    }

    #[test]
    fn latecomers_count_from_their_first_reading() {
        let mut m = Model::default();
        let mut r = Reconciler::new(&[], Reading::default(), &mut m);
        detect(&mut m, 1, 6, 0);
        r.asked(&m);
        // Found later, may predate the session: from its first reading on.
        r.apply(reading(500, &[(1, 9)], Some(Origin::FirstSeen)), &mut m);
        assert_eq!((counts(&m).baseline, counts(&m).undetected), ("first_seen", 0));
        r.asked(&m);
        detect(&mut m, 1, 8, 0);
        r.apply(reading(503, &[(1, 12)], None), &mut m);
        assert_eq!((counts(&m).listen_drops, counts(&m).detected, counts(&m).undetected), (3, 2, 1));
        assert_eq!(counts(&m).unplaced, 1, "first_seen namespaces are not placed");
    }

    #[test]
    fn namespaces_never_read_are_reported() {
        let mut m = Model::default();
        let mut r = Reconciler::new(&[], Reading::default(), &mut m);
        detect(&mut m, 1, 3, 0);
        r.apply(Reading { namespaces: vec![], unreadable: vec![(7, "could not enter it: EPERM".into())] }, &mut m);
        assert!(m.reconciled.unreconciled[&NS].contains("no process in it"));
        assert!(m.reconciled.unreconciled[&7].contains("EPERM"));
        // Out of scope: not reported.
        let mut m2 = Model::default();
        let mut r2 = Reconciler::new(&[1], Reading::default(), &mut m2);
        detect(&mut m2, 1, 3, 0);
        r2.apply(Reading::default(), &mut m2);
        assert!(m2.reconciled.unreconciled.is_empty());
    }
}
