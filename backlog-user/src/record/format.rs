//! The recording file format (version 2): what `record` writes and `report` reads.
//! Version 1's sync records lacked each listener's suppressed drop lines and peers.
//!
//! ```text
//! file   = header record*
//! header = magic "BLGTRACE" | version u16 | event size u16 | crc32 u32   (16 bytes)
//! record = kind u8 | length u32 | payload (length bytes) | crc32 u32
//! ```
//! Integers are little-endian; the header's crc32 covers its first 12 bytes, a
//! record's covers kind, length and payload. Records are only ever appended, so a
//! recorder killed mid-write leaves at most one torn record at the tail: the reader
//! keeps everything before it. A reader skips records of kinds it does not know (a
//! later writer may add some without a version bump); any change to an existing
//! payload bumps `VERSION`.
//!
//! Kinds: 1 session (opens every file, repeated after rotation), 2 event (the
//! 112-byte `Event`), 3 owners (pid/comm of a listener, when they change), 4 sync
//! (exact counters of listeners changed since the last sync, every second), 5
//! snapshot (sysctls and TcpExt counters per namespace, at start and end), 6 queues
//! (accept-queue depth of every listener, every second), 7 end (clean stop), 8
//! reconcile (the kernel's own counters against the detected drops: undetected per
//! namespace and listener, diagnostics, detached programs; at a sync when it changed).
//! After a rotation a file starts with session, start snapshot, the owners and
//! counters of live listeners and the latest reconcile, so each file can be reported on its
//! own. Kind 8 came later without a version bump: older readers skip it, and files
//! without it read as "nothing reconciled". Kind 9 (left out: what --max-size made
//! the recorder leave out, cumulative; in a rotated file's preamble when that
//! preamble could not repeat every live listener, and before the end mark) came
//! likewise. A rotated file's preamble repeats live listeners only, at most a
//! quarter of the file; lists too long for a file (syncs, queues) are cut into
//! several records of one instant.
use std::net::{IpAddr, Ipv6Addr};

use backlog_common::{Event, ListenerStats, COMM_LEN};

use crate::event::{self as typed, ListenerEvent};
use crate::model::{Filter, Folded, NetnsCounts};
use crate::sys::counters::Origin;
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: &[u8; 8] = b"BLGTRACE";
pub const VERSION: u16 = 2;
pub const HEADER_LEN: usize = 16;
/// kind + length before the payload, crc32 after it.
pub const RECORD_OVERHEAD: usize = 1 + 4 + 4;
/// Bounds what a corrupt length field can make the reader allocate. The largest
/// real record, a sync of every listener, is ~300 bytes per listener.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// `Event` as laid out in backlog-common, written field by field (no padding in it).
pub const EVENT_LEN: usize = std::mem::size_of::<Event>();

mod kind {
    pub const SESSION: u8 = 1;
    pub const EVENT: u8 = 2;
    pub const OWNERS: u8 = 3;
    pub const SYNC: u8 = 4;
    pub const SNAPSHOT: u8 = 5;
    pub const QUEUES: u8 = 6;
    pub const END: u8 = 7;
    pub const RECONCILE: u8 = 8;
    pub const LEFT_OUT: u8 = 9;
}

/// Opens every file of a recording: who recorded what, and where this file sits
/// among the rotated ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    /// Wall-clock ns when recording started; the same in every file of one recording.
    pub id: u64,
    /// 0 for the first file, +1 per rotation.
    pub part: u32,
    /// Add to an event's CLOCK_MONOTONIC `ts_ns` to get wall-clock ns.
    pub mono_to_wall_ns: u64,
    pub mode: String,
    pub kernel: String,
    pub scope: String,
    /// The listeners the session showed.
    pub filter: Filter,
}

/// The processes holding a listener's socket, as user space resolved them.
#[derive(Clone, Debug, PartialEq)]
pub struct Owners {
    pub sk: u64,
    pub ino: u64,
    pub owners: Vec<(u32, String)>,
}

/// One listener's exact kernel counters at a sync, folded over CPUs (the
/// per-CPU `wait_sum_ns` is not kept: nothing derives from it).
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerState {
    pub sk: u64,
    pub stats: ListenerStats,
    /// Connections in its accept queue that the tracer saw enqueued.
    pub pending: u64,
    /// Non-empty accept-wait histogram buckets: (bucket index, count).
    pub wait: Vec<(u16, u64)>,
    /// The peers it dropped most, with their drops (the rest: its drops minus these).
    pub peers: Vec<(IpAddr, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CounterSync {
    pub ts_ns: u64,
    pub lost_events: u64,
    pub unmatched_accepts: u64,
    pub pending_enqueued: Option<u64>,
    pub listeners: Vec<ListenerState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Start = 0,
    End = 1,
}

/// Sysctls and TcpExt counters of the recorded namespaces at start or end.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub ts_ns: u64,
    pub phase: Phase,
    pub namespaces: Vec<NetnsSnapshot>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NetnsSnapshot {
    pub inode: u32,
    pub name: Option<String>,
    /// (sysctl name, value); None when it could not be read.
    pub sysctls: Vec<(String, Option<u32>)>,
    pub counters: Vec<(String, u64)>,
}

/// Accept-queue depth of every listener of the recorded namespaces at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Queues {
    pub ts_ns: u64,
    pub rows: Vec<QueueRow>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRow {
    pub netns: u32,
    pub sock_ino: u32,
    pub port: u16,
    pub len: u32,
    pub max: u32,
}

/// The kernel's own counters against the detected drops (see `session::reconcile`),
/// as the live session last had them.
#[derive(Clone, Debug, PartialEq)]
pub struct Reconcile {
    pub ts_ns: u64,
    pub missed_runs: u64,
    /// Every kernel-side diagnostic, by name.
    pub diagnostics: Vec<(String, u64)>,
    pub namespaces: Vec<(u32, NetnsCounts)>,
    pub folded: Folded,
    /// Listeners charged with undetected drops: (sk, socket inode, count).
    pub placed: Vec<(u64, u64, u64)>,
    /// Namespaces that could not be read, and why.
    pub unreconciled: Vec<(u32, String)>,
    /// Programs found detached from outside, a line each.
    pub detached: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Recording(Recording),
    Event(ListenerEvent),
    Owners(Owners),
    CounterSync(CounterSync),
    Snapshot(Snapshot),
    Queues(Queues),
    /// The recorder stopped cleanly at this CLOCK_MONOTONIC time.
    End {
        ts_ns: u64,
    },
    Reconcile(Reconcile),
    LeftOut(LeftOut),
}

/// What the recorder left out to keep each file within --max-size, so far (all
/// counts cumulative but `preamble_listeners`). In a rotated file's preamble when
/// it left anything out, and before the end mark when anything was.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeftOut {
    pub ts_ns: u64,
    /// Records larger than a file can hold beside its session and start snapshot.
    pub records: u64,
    pub bytes: u64,
    /// Records left out because one sync round (a second) had already rotated
    /// --rotate + 1 times: more would delete files written in that same round.
    pub capped_records: u64,
    pub capped_bytes: u64,
    pub rotations: u64,
    /// Rotations whose new file could not repeat every live listener.
    pub short_preambles: u64,
    /// The most live listeners one preamble left out.
    pub listeners_max: u64,
    /// Preambles without the latest reconciliation (too large).
    pub reconciles: u64,
    /// Live listeners this file's preamble left out (0 outside a preamble).
    pub preamble_listeners: u64,
}

pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(EVENT_LEN as u16).to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a file is not a recording this build can read (as opposed to a damaged one).
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    Foreign,
    Corrupt,
    /// Another format version (found).
    Version(u16),
    /// This version, but events of another size (found): written by a build whose
    /// `Event` differs, so no event in it would decode right.
    EventSize(u16),
}

/// Checks a complete 16-byte header.
pub fn check_header(h: &[u8; HEADER_LEN]) -> Result<(), HeaderError> {
    if &h[..8] != MAGIC {
        return Err(HeaderError::Foreign);
    }
    if crc32fast::hash(&h[..12]).to_le_bytes() != h[12..] {
        return Err(HeaderError::Corrupt);
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    let event_len = u16::from_le_bytes([h[10], h[11]]);
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    if usize::from(event_len) != EVENT_LEN {
        return Err(HeaderError::EventSize(event_len));
    }
    Ok(())
}

/// The record framed for appending: kind, length, payload, crc32.
pub fn frame(rec: &Record) -> Bytes {
    let mut payload = BytesMut::new();
    let kind = encode(rec, &mut payload);
    let mut out = BytesMut::with_capacity(payload.len() + RECORD_OVERHEAD);
    out.put_u8(kind);
    out.put_u32_le(payload.len() as u32);
    out.put_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.put_u32_le(crc);
    out.freeze()
}

/// Whether the crc32 at the end of a framed record matches what precedes it.
pub fn crc_ok(framed: &[u8]) -> bool {
    let (body, crc) = framed.split_at(framed.len() - 4);
    crc32fast::hash(body).to_le_bytes() == crc
}

fn put_str(b: &mut BytesMut, s: &str) {
    // Strings here are comms, sysctl names, kernel releases: far below 64 KiB.
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

fn put_list<T>(b: &mut BytesMut, items: &[T], mut put: impl FnMut(&mut BytesMut, &T)) {
    b.put_u32_le(items.len() as u32);
    for i in items {
        put(b, i);
    }
}

fn put_event(b: &mut BytesMut, e: &Event) {
    b.put_u64_le(e.ts_ns);
    b.put_u64_le(e.sk);
    b.put_u64_le(e.sock_ino);
    b.put_u64_le(e.value);
    b.put_u32_le(e.netns);
    b.put_u32_le(e.pid);
    b.put_u8(e.kind);
    b.put_u8(e.reason);
    b.put_u16_le(e.family);
    b.put_u16_le(e.lport);
    b.put_u16_le(e.rport);
    b.put_slice(&e.laddr);
    b.put_slice(&e.raddr);
    b.put_u32_le(e.queue_len);
    b.put_u32_le(e.queue_max);
    b.put_u32_le(e.syn_queue_len);
    b.put_u32_le(e.requested_backlog);
    b.put_slice(&e.comm);
}

fn put_state(b: &mut BytesMut, l: &ListenerState) {
    let s = &l.stats;
    b.put_u64_le(l.sk);
    b.put_u64_le(s.sock_ino);
    b.put_u32_le(s.netns);
    b.put_u16_le(s.family);
    b.put_u16_le(s.lport);
    b.put_slice(&s.laddr);
    for d in s.drops {
        b.put_u64_le(d);
    }
    b.put_u64_le(s.accepts);
    b.put_u64_le(s.wait_max_ns);
    b.put_u64_le(s.abandoned);
    b.put_u32_le(s.queue_peak);
    b.put_u32_le(s.queue_max);
    b.put_u64_le(s.suppressed);
    b.put_u64_le(l.pending);
    put_list(b, &l.wait, |b, (i, n)| {
        b.put_u16_le(*i);
        b.put_u64_le(*n);
    });
    // IPv4 peers as v4-mapped IPv6, read back as IPv4.
    put_list(b, &l.peers, |b, (p, n)| {
        let v6 = match p {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => *a,
        };
        b.put_slice(&v6.octets());
        b.put_u64_le(*n);
    });
}

fn encode(rec: &Record, b: &mut BytesMut) -> u8 {
    match rec {
        Record::Recording(s) => {
            b.put_u64_le(s.id);
            b.put_u32_le(s.part);
            b.put_u64_le(s.mono_to_wall_ns);
            put_str(b, &s.mode);
            put_str(b, &s.kernel);
            put_str(b, &s.scope);
            put_list(b, &s.filter.ports, |b, p| b.put_u16_le(*p));
            put_list(b, &s.filter.pids, |b, p| b.put_u32_le(*p));
            put_list(b, &s.filter.netns, |b, n| b.put_u32_le(*n));
            kind::SESSION
        }
        Record::Event(e) => {
            put_event(b, &typed::encode(e));
            kind::EVENT
        }
        Record::Owners(o) => {
            b.put_u64_le(o.sk);
            b.put_u64_le(o.ino);
            put_list(b, &o.owners, |b, (pid, comm)| {
                b.put_u32_le(*pid);
                put_str(b, comm);
            });
            kind::OWNERS
        }
        Record::CounterSync(s) => {
            b.put_u64_le(s.ts_ns);
            b.put_u64_le(s.lost_events);
            b.put_u64_le(s.unmatched_accepts);
            b.put_u64_le(s.pending_enqueued.unwrap_or(u64::MAX));
            put_list(b, &s.listeners, put_state);
            kind::SYNC
        }
        Record::Snapshot(s) => {
            b.put_u64_le(s.ts_ns);
            b.put_u8(s.phase as u8);
            put_list(b, &s.namespaces, |b, n| {
                b.put_u32_le(n.inode);
                put_str(b, n.name.as_deref().unwrap_or(""));
                put_list(b, &n.sysctls, |b, (name, v)| {
                    put_str(b, name);
                    // u64::MAX stands for "could not be read".
                    b.put_u64_le(v.map_or(u64::MAX, u64::from));
                });
                put_list(b, &n.counters, |b, (name, v)| {
                    put_str(b, name);
                    b.put_u64_le(*v);
                });
            });
            kind::SNAPSHOT
        }
        Record::Queues(q) => {
            b.put_u64_le(q.ts_ns);
            put_list(b, &q.rows, |b, r| {
                b.put_u32_le(r.netns);
                b.put_u32_le(r.sock_ino);
                b.put_u16_le(r.port);
                b.put_u32_le(r.len);
                b.put_u32_le(r.max);
            });
            kind::QUEUES
        }
        Record::End { ts_ns } => {
            b.put_u64_le(*ts_ns);
            kind::END
        }
        Record::Reconcile(r) => {
            b.put_u64_le(r.ts_ns);
            b.put_u64_le(r.missed_runs);
            put_list(b, &r.diagnostics, |b, (name, v)| {
                put_str(b, name);
                b.put_u64_le(*v);
            });
            put_list(b, &r.namespaces, |b, (inode, n)| {
                b.put_u32_le(*inode);
                put_str(b, n.name.as_deref().unwrap_or(""));
                put_str(b, &n.baseline);
                for v in [n.listen_drops, n.listen_overflows, n.reqq_full_drop, n.detected, n.undetected, n.unplaced] {
                    b.put_u64_le(v);
                }
                b.put_u8(u8::from(n.gone));
            });
            let f = &r.folded;
            for v in [f.namespaces, f.listen_drops, f.detected, f.undetected] {
                b.put_u64_le(v);
            }
            put_list(b, &r.placed, |b, (sk, ino, n)| {
                b.put_u64_le(*sk);
                b.put_u64_le(*ino);
                b.put_u64_le(*n);
            });
            put_list(b, &r.unreconciled, |b, (inode, why)| {
                b.put_u32_le(*inode);
                put_str(b, why);
            });
            put_list(b, &r.detached, |b, line| put_str(b, line));
            kind::RECONCILE
        }
        Record::LeftOut(l) => {
            for v in [
                l.ts_ns,
                l.records,
                l.bytes,
                l.capped_records,
                l.capped_bytes,
                l.rotations,
                l.short_preambles,
                l.listeners_max,
                l.reconciles,
                l.preamble_listeners,
            ] {
                b.put_u64_le(v);
            }
            kind::LEFT_OUT
        }
    }
}

/// A payload whose checksum matched but whose contents do not parse: written by a
/// different program, or corrupted before it was checksummed.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

impl From<bytes::TryGetError> for Malformed {
    fn from(_: bytes::TryGetError) -> Self {
        Malformed
    }
}

type R<T> = Result<T, Malformed>;

fn get_str(b: &mut &[u8]) -> R<String> {
    let n = b.try_get_u16_le()? as usize;
    if b.remaining() < n {
        return Err(Malformed);
    }
    let s = std::str::from_utf8(&b[..n]).map_err(|_| Malformed)?.to_string();
    b.advance(n);
    Ok(s)
}

fn get_list<T>(b: &mut &[u8], mut get: impl FnMut(&mut &[u8]) -> R<T>) -> R<Vec<T>> {
    let n = b.try_get_u32_le()? as usize;
    // Every item takes a byte at least: a larger count is corruption. The list grows
    // as items decode, never by the count, so memory follows the bytes really there.
    if n > b.remaining() {
        return Err(Malformed);
    }
    let mut items = Vec::new();
    for _ in 0..n {
        items.push(get(b)?);
    }
    Ok(items)
}

fn get_array<const N: usize>(b: &mut &[u8]) -> R<[u8; N]> {
    let mut a = [0u8; N];
    b.try_copy_to_slice(&mut a)?;
    Ok(a)
}

fn get_event(b: &mut &[u8]) -> R<Event> {
    Ok(Event {
        ts_ns: b.try_get_u64_le()?,
        sk: b.try_get_u64_le()?,
        sock_ino: b.try_get_u64_le()?,
        value: b.try_get_u64_le()?,
        netns: b.try_get_u32_le()?,
        pid: b.try_get_u32_le()?,
        kind: b.try_get_u8()?,
        reason: b.try_get_u8()?,
        family: b.try_get_u16_le()?,
        lport: b.try_get_u16_le()?,
        rport: b.try_get_u16_le()?,
        laddr: get_array(b)?,
        raddr: get_array(b)?,
        queue_len: b.try_get_u32_le()?,
        queue_max: b.try_get_u32_le()?,
        syn_queue_len: b.try_get_u32_le()?,
        requested_backlog: b.try_get_u32_le()?,
        comm: get_array::<COMM_LEN>(b)?,
    })
}

fn get_state(b: &mut &[u8]) -> R<ListenerState> {
    let sk = b.try_get_u64_le()?;
    let mut s = ListenerStats {
        sock_ino: b.try_get_u64_le()?,
        netns: b.try_get_u32_le()?,
        family: b.try_get_u16_le()?,
        lport: b.try_get_u16_le()?,
        laddr: get_array(b)?,
        ..Default::default()
    };
    for d in s.drops.iter_mut() {
        *d = b.try_get_u64_le()?;
    }
    s.accepts = b.try_get_u64_le()?;
    s.wait_max_ns = b.try_get_u64_le()?;
    s.abandoned = b.try_get_u64_le()?;
    s.queue_peak = b.try_get_u32_le()?;
    s.queue_max = b.try_get_u32_le()?;
    s.suppressed = b.try_get_u64_le()?;
    let pending = b.try_get_u64_le()?;
    let wait = get_list(b, |b| Ok((b.try_get_u16_le()?, b.try_get_u64_le()?)))?;
    if wait.iter().any(|(i, _)| usize::from(*i) >= backlog_common::hist::BUCKETS) {
        return Err(Malformed);
    }
    let peers = get_list(b, |b| Ok((Ipv6Addr::from(get_array::<16>(b)?).to_canonical(), b.try_get_u64_le()?)))?;
    Ok(ListenerState { sk, stats: s, pending, wait, peers })
}

fn get_snapshot_ns(b: &mut &[u8]) -> R<NetnsSnapshot> {
    let inode = b.try_get_u32_le()?;
    let name = Some(get_str(b)?).filter(|n| !n.is_empty());
    let sysctls = get_list(b, |b| {
        let name = get_str(b)?;
        let v = b.try_get_u64_le()?;
        Ok((name, u32::try_from(v).ok()))
    })?;
    let counters = get_list(b, |b| Ok((get_str(b)?, b.try_get_u64_le()?)))?;
    Ok(NetnsSnapshot { inode, name, sysctls, counters })
}

/// Decodes one payload; `Ok(None)` for a kind this version does not know.
pub fn decode(kind: u8, mut b: &[u8]) -> R<Option<Record>> {
    let b = &mut b;
    let rec = match kind {
        kind::SESSION => Record::Recording(Recording {
            id: b.try_get_u64_le()?,
            part: b.try_get_u32_le()?,
            mono_to_wall_ns: b.try_get_u64_le()?,
            mode: get_str(b)?,
            kernel: get_str(b)?,
            scope: get_str(b)?,
            filter: Filter {
                ports: get_list(b, |b| Ok(b.try_get_u16_le()?))?,
                pids: get_list(b, |b| Ok(b.try_get_u32_le()?))?,
                netns: get_list(b, |b| Ok(b.try_get_u32_le()?))?,
            },
        }),
        // An event of a kind this version does not know is skipped like such a record.
        kind::EVENT => match typed::decode(&get_event(b)?) {
            Ok(e) => Record::Event(e),
            Err(_) => return Ok(None),
        },
        kind::OWNERS => Record::Owners(Owners {
            sk: b.try_get_u64_le()?,
            ino: b.try_get_u64_le()?,
            owners: get_list(b, |b| Ok((b.try_get_u32_le()?, get_str(b)?)))?,
        }),
        kind::SYNC => Record::CounterSync(CounterSync {
            ts_ns: b.try_get_u64_le()?,
            lost_events: b.try_get_u64_le()?,
            unmatched_accepts: b.try_get_u64_le()?,
            pending_enqueued: Some(b.try_get_u64_le()?).filter(|n| *n != u64::MAX),
            listeners: get_list(b, get_state)?,
        }),
        kind::SNAPSHOT => Record::Snapshot(Snapshot {
            ts_ns: b.try_get_u64_le()?,
            phase: match b.try_get_u8()? {
                0 => Phase::Start,
                1 => Phase::End,
                _ => return Err(Malformed),
            },
            namespaces: get_list(b, get_snapshot_ns)?,
        }),
        kind::QUEUES => Record::Queues(Queues {
            ts_ns: b.try_get_u64_le()?,
            rows: get_list(b, |b| {
                Ok(QueueRow {
                    netns: b.try_get_u32_le()?,
                    sock_ino: b.try_get_u32_le()?,
                    port: b.try_get_u16_le()?,
                    len: b.try_get_u32_le()?,
                    max: b.try_get_u32_le()?,
                })
            })?,
        }),
        kind::END => Record::End { ts_ns: b.try_get_u64_le()? },
        kind::RECONCILE => Record::Reconcile(Reconcile {
            ts_ns: b.try_get_u64_le()?,
            missed_runs: b.try_get_u64_le()?,
            diagnostics: get_list(b, |b| Ok((get_str(b)?, b.try_get_u64_le()?)))?,
            namespaces: get_list(b, |b| {
                let inode = b.try_get_u32_le()?;
                let name = Some(get_str(b)?).filter(|n| !n.is_empty());
                let baseline = Origin::from_name(&get_str(b)?).ok_or(Malformed)?.name();
                let mut v = [0u64; 6];
                for x in v.iter_mut() {
                    *x = b.try_get_u64_le()?;
                }
                let [listen_drops, listen_overflows, reqq_full_drop, detected, undetected, unplaced] = v;
                let gone = match b.try_get_u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(Malformed),
                };
                let counts = NetnsCounts {
                    name,
                    baseline,
                    listen_drops,
                    listen_overflows,
                    reqq_full_drop,
                    detected,
                    undetected,
                    unplaced,
                    gone,
                };
                Ok((inode, counts))
            })?,
            folded: Folded {
                namespaces: b.try_get_u64_le()?,
                listen_drops: b.try_get_u64_le()?,
                detected: b.try_get_u64_le()?,
                undetected: b.try_get_u64_le()?,
            },
            placed: get_list(b, |b| Ok((b.try_get_u64_le()?, b.try_get_u64_le()?, b.try_get_u64_le()?)))?,
            unreconciled: get_list(b, |b| Ok((b.try_get_u32_le()?, get_str(b)?)))?,
            detached: get_list(b, get_str)?,
        }),
        kind::LEFT_OUT => Record::LeftOut(LeftOut {
            ts_ns: b.try_get_u64_le()?,
            records: b.try_get_u64_le()?,
            bytes: b.try_get_u64_le()?,
            capped_records: b.try_get_u64_le()?,
            capped_bytes: b.try_get_u64_le()?,
            rotations: b.try_get_u64_le()?,
            short_preambles: b.try_get_u64_le()?,
            listeners_max: b.try_get_u64_le()?,
            reconciles: b.try_get_u64_le()?,
            preamble_listeners: b.try_get_u64_le()?,
        }),
        _ => return Ok(None),
    };
    // Trailing bytes mean the payload is not what this kind looks like.
    if b.has_remaining() {
        return Err(Malformed);
    }
    Ok(Some(rec))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use backlog_common::{EventKind, AF_INET};

    /// One record of every kind, with non-trivial field values.
    pub(crate) fn samples() -> Vec<Record> {
        let mut ev = Event::zeroed();
        ev.ts_ns = 1_234_567_890;
        ev.sk = 0xffff_8880_1234_5678;
        ev.kind = EventKind::Drop as u8;
        ev.family = AF_INET;
        ev.lport = 8080;
        ev.rport = 40000;
        ev.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.raddr[..4].copy_from_slice(&[10, 0, 0, 9]);
        ev.queue_len = 9;
        ev.queue_max = 8;
        let stats = ListenerStats {
            drops: [1, 2, 3, 4],
            lport: 8080,
            accepts: 7,
            wait_max_ns: 9,
            suppressed: 5,
            ..Default::default()
        };
        vec![
            Record::Recording(Recording {
                id: 17,
                part: 2,
                mono_to_wall_ns: 1 << 60,
                mode: "fentry".into(),
                kernel: "6.18.0".into(),
                scope: "port 8080 in all network namespaces".into(),
                filter: Filter { ports: vec![8080], pids: vec![], netns: vec![4026531840] },
            }),
            Record::Event(typed::decode(&ev).expect("a drop")),
            Record::Owners(Owners {
                sk: ev.sk,
                ino: ev.sock_ino,
                owners: vec![(42, "nginx".into()), (43, "nginx: worker".into())],
            }),
            Record::CounterSync(CounterSync {
                ts_ns: 5,
                lost_events: 1,
                unmatched_accepts: 2,
                pending_enqueued: Some(3),
                listeners: vec![ListenerState {
                    sk: ev.sk,
                    stats,
                    pending: 4,
                    wait: vec![(0, 3), (200, 1)],
                    peers: vec![("10.0.0.7".parse().unwrap(), 6), ("2001:db8::1".parse().unwrap(), 1)],
                }],
            }),
            Record::Snapshot(Snapshot {
                ts_ns: 6,
                phase: Phase::End,
                namespaces: vec![NetnsSnapshot {
                    inode: 4026531840,
                    name: Some("blue".into()),
                    sysctls: vec![("net.core.somaxconn".into(), Some(4096)), ("net.ipv4.tcp_syncookies".into(), None)],
                    counters: vec![("ListenDrops".into(), 12)],
                }],
            }),
            Record::Queues(Queues {
                ts_ns: 7,
                rows: vec![QueueRow { netns: 1, sock_ino: 2, port: 3, len: 4, max: 5 }],
            }),
            Record::End { ts_ns: 8 },
            Record::Reconcile(Reconcile {
                ts_ns: 9,
                missed_runs: 3,
                diagnostics: vec![("windows_replaced".into(), 2), ("stats_full".into(), 0)],
                namespaces: vec![(
                    4026531840,
                    NetnsCounts {
                        name: Some("blue".into()),
                        baseline: "first_seen",
                        listen_drops: 70,
                        listen_overflows: 60,
                        reqq_full_drop: 10,
                        detected: 65,
                        undetected: 5,
                        unplaced: 1,
                        gone: true,
                    },
                )],
                folded: Folded { namespaces: 1, listen_drops: 2, detected: 3, undetected: 4 },
                placed: vec![(ev.sk, 77, 4)],
                unreconciled: vec![(9, "could not enter it".into())],
                detached: vec!["program bt_tp_ingress (link 3) stopped running".into()],
            }),
            Record::LeftOut(LeftOut {
                ts_ns: 10,
                records: 1,
                bytes: 2,
                capped_records: 11,
                capped_bytes: 12,
                rotations: 3,
                short_preambles: 4,
                listeners_max: 5,
                reconciles: 6,
                preamble_listeners: 7,
            }),
        ]
    }

    fn unframe(f: &[u8]) -> Record {
        assert!(crc_ok(f));
        let len = u32::from_le_bytes(f[1..5].try_into().unwrap()) as usize;
        assert_eq!(f.len(), len + RECORD_OVERHEAD);
        decode(f[0], &f[5..5 + len]).unwrap().unwrap()
    }

    #[test]
    fn every_kind_round_trips() {
        for rec in samples() {
            assert_eq!(unframe(&frame(&rec)), rec);
        }
        let ev_frame = frame(&samples()[1]);
        assert_eq!(ev_frame.len(), EVENT_LEN + RECORD_OVERHEAD, "an event payload is the 112-byte Event");
    }

    #[test]
    fn header_checks() {
        let h = header();
        assert_eq!(check_header(&h), Ok(()));
        let mut foreign = h;
        foreign[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        assert_eq!(check_header(&foreign), Err(HeaderError::Foreign));
        let mut flipped = h;
        flipped[9] ^= 0x40;
        assert_eq!(check_header(&flipped), Err(HeaderError::Corrupt));
        let mut newer = h;
        newer[8..10].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let crc = crc32fast::hash(&newer[..12]);
        newer[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_header(&newer), Err(HeaderError::Version(VERSION + 1)));
        let mut wider = h;
        wider[10..12].copy_from_slice(&120u16.to_le_bytes());
        let crc = crc32fast::hash(&wider[..12]);
        wider[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_header(&wider), Err(HeaderError::EventSize(120)));
    }

    #[test]
    fn bad_payloads_are_malformed_not_panics() {
        for rec in samples() {
            let f = frame(&rec);
            let payload = &f[5..f.len() - 4];
            for cut in 0..payload.len() {
                assert_eq!(decode(f[0], &payload[..cut]), Err(Malformed), "{rec:?} cut at {cut}");
            }
            let mut longer = payload.to_vec();
            longer.push(0);
            assert_eq!(decode(f[0], &longer), Err(Malformed));
        }
        assert_eq!(decode(200, b"anything"), Ok(None));
        // A list count far beyond the payload is refused before allocating.
        let mut huge = 0u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(kind::SYNC, &huge), Err(Malformed));
    }
}
