//! The per-CPU *window*: what one CPU knows about the listener segment it is
//! handling right now. Every attach mode opens it where it first sees the listener
//! and the segment, and closes it where the segment's handling is over.
//!
//! Whether the segment was dropped is not guessed from side effects: the kernel
//! counts every listen drop in the namespace's TcpExt counters, which are per CPU
//! (`net.mib.net_statistics`), and a CPU only ever adds to its own copy. The window
//! keeps this CPU's ListenDrops, ListenOverflows and TCPReqQFullDrop as they were
//! when it opened; when it closes, their deltas say exactly how many listen drops
//! handling the segment made, and which kind — no other CPU can move them.
//!
//! A window whose end we never see (a skipped program run, a segment freed where no
//! tracepoint reports it) is settled the same way when the next segment on this CPU
//! opens a window, or when user space flushes the CPU; the counters make a late
//! settlement as exact as a timely one.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use backlog_common::{global, DropReason, ListenerKey, PeerKey, WindowKind};

use crate::fields::{self, Mem, QueueState};
use crate::{listeners, maps};

/// The window's TCPReqQFullDrop when it was not read: an ACK's window, or a SYN's
/// while syncookies are on. The counter cannot move then.
const REQQ_UNREAD: u64 = u64::MAX;

/// `WindowKind`s as the window stores them (a zeroed slot is no kind at all).
const SYN: u8 = WindowKind::Syn as u8;
const ACK: u8 = WindowKind::Ack as u8;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Window {
    pub sk: u64,
    /// The segment's skb (its address: only ever compared, never read through).
    pub skb: u64,
    /// This CPU's `struct linux_mib` in the listener's namespace: the namespace
    /// (`struct net`), and the listener generation when `mib` was read from it, folded
    /// with both into `mib_check` (see `mib_of`).
    mib: u64,
    mib_net: u64,
    mib_gen: u64,
    mib_check: u64,
    /// This CPU's counters when the window opened or was last settled.
    listen_drops: u64,
    overflows: u64,
    reqq_full: u64,
    /// This CPU's per-CPU offset, once `cpu_off_known`.
    cpu_off: u64,
    /// The listener's own drop counter, likewise: a drop this CPU counted while the
    /// window was open belongs to its listener only if this moved too.
    sk_drops: u32,
    pub ack_backlog: u32,
    max_ack_backlog: u32,
    pub syn_qlen: u32,
    /// The segment's TCP source port, raw (network order): the peer's.
    sport_be: u16,
    /// The listener's bound port (host order): whether a child is the listener's.
    lport: u16,
    pub open: u8,
    /// A `WindowKind`, once opened.
    kind: u8,
    /// Set while a program updates the window, so that a flush arriving in an
    /// interrupt leaves it alone.
    busy: u8,
    cpu_off_known: u8,
    /// The last listener whose key this CPU computed, its socket inode, and the
    /// listener generation then (see `key`).
    key_sk: u64,
    key_ino: u64,
    key_gen: u64,
    /// The three above folded together: a program interrupting another's update on
    /// this CPU can leave them torn, and a torn entry fails this check.
    key_check: u64,
    /// The highest accept-queue length and the limit this CPU has noted in that
    /// listener's STATS (which only ever keeps maxima): a child's birth that shows
    /// neither a longer queue nor another limit skips the STATS lookup.
    folded_peak: u32,
    folded_max: u32,
    /// The segment's peer (`addr`, set when the window opens) and, once a drop is
    /// being recorded, its listener: the PEERS map's key. Here rather than on the
    /// stack, which 5.10 limits to 512 bytes for a call chain.
    drop_peer: PeerKey,
    /// Drops held back from the maps while the listener is over its line budget
    /// (see `super::Run`); drained by `flush` too, so user space reads them.
    run: super::Run,
}

#[map(name = "WINDOW")]
static WINDOW: PerCpuArray<Window> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn slot() -> Option<&'static mut Window> {
    // SAFETY: this CPU's slot; programs touching it run on this CPU and do not
    // migrate, and `busy` fences off the one that can interrupt the others (flush).
    WINDOW.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's per-CPU offset: the address of this CPU's copy of WINDOW's only
/// element minus the map's percpu base (`struct bpf_array.pptrs[0]`). Computed once
/// per CPU and kept in the window.
#[inline(always)]
fn cpu_offset(w: &mut Window) -> u64 {
    if w.cpu_off_known == 0 {
        let map = fields::address_of(&WINDOW as *const _);
        let base = fields::read::<u64>(map, fields::offsets().bpf_array_pptrs);
        w.cpu_off = fields::address_of(w as *const Window).wrapping_sub(base);
        w.cpu_off_known = 1;
    }
    w.cpu_off
}

/// This CPU's `struct linux_mib` of namespace `net`. A per-CPU pointer, which the
/// helper must read (the verifier types it apart): each CPU keeps the last one, valid
/// while `net` is the same and no listener anywhere has closed since. A namespace's
/// memory can be reused for another only after its listeners closed, and a window
/// only ever opens on a listener, so a closed listener (`listeners::generation`)
/// comes between; the generation is read first, as in `key`. Saves a helper call
/// per window: two per connection, one per dropped SYN. Not inlined: in `open` its
/// locals took the call chain through `settle` past 5.10's 512 bytes.
#[inline(never)]
fn mib_of<M: Mem>(w: &mut Window, net: u64) -> u64 {
    // `net` may be a pointer the verifier typed, on which it allows no arithmetic.
    let id = M::number(net);
    let gen = listeners::generation();
    let cached = w.mib;
    if w.mib_net == id && w.mib_gen == gen && w.mib_check == fold(id, cached, gen) {
        return cached;
    }
    let stats = fields::read::<u64>(net, fields::offsets().net_mib_net_statistics);
    let mib = stats.wrapping_add(cpu_offset(w));
    w.mib_net = id;
    w.mib_gen = gen;
    w.mib_check = fold(id, mib, gen);
    mib
}

/// A segment at a listener, as a window opens on it. Aligned to 8 so that it can be
/// zeroed with word stores (`maps::zero`): it is built for every segment a listener
/// gets, SYN floods included.
#[repr(C, align(8))]
pub struct Segment {
    pub peer: [u8; 16],
    /// The skb's address: whether a freed skb is this segment's.
    pub skb: u64,
    /// The listener's bound port, host order.
    pub lport: u16,
    /// The segment's TCP source port, raw (network order).
    pub sport_be: u16,
}

/// Opens this CPU's window on listener `sk` for segment `seg`, settling a window
/// its segment's end left open. `M` says how the caller's `sk` can be read (a
/// BTF-typed tcp_sock in tracepoint mode). A function of its own: the callers' packet
/// parsing and the settlement's recording each need much of the 512-byte stack, and a
/// call chain adds its frames up.
#[inline(never)]
pub fn open<M: Mem>(sk: u64, kind: WindowKind, seg: &Segment) {
    let Some(w) = slot() else { return };
    w.busy = 1;
    if w.open != 0 {
        maps::count(global::WINDOWS_REPLACED);
        settle(w, true);
    }
    let o = fields::offsets();
    let net = M::get::<u64>(sk, o.skc_net);
    w.mib = mib_of::<M>(w, net);
    (w.overflows, w.listen_drops) = fields::read_pair::<u64>(w.mib, o.mib_listen_overflows, o.mib_listen_drops);
    // Only a SYN can be dropped for a full SYN queue, and TCPReqQFullDrop only moves
    // while syncookies are off (tcp_syn_flood_action): with the sysctl at hand in
    // one load, the counter's read is spared on hosts that keep cookies on. A SYN
    // handled in the instant the sysctl turns to 0 would show its drop as `other`.
    let cookies = M::LOAD && M::get::<u8>(net, o.net_syncookies) != 0;
    w.reqq_full = if kind == WindowKind::Syn && !cookies {
        fields::read::<u64>(w.mib, o.mib_reqq_full_drop)
    } else {
        REQQ_UNREAD
    };
    w.sk = sk;
    w.sk_drops = M::get::<u32>(sk, o.sk_drops);
    (w.ack_backlog, w.max_ack_backlog) = M::pair::<u32>(sk, o.sk_ack_backlog, o.sk_max_ack_backlog);
    w.syn_qlen = M::get::<u32>(sk, o.icsk_accept_queue_qlen);
    w.lport = seg.lport;
    w.skb = seg.skb;
    w.sport_be = seg.sport_be;
    w.kind = kind as u8;
    w.drop_peer.addr = seg.peer;
    w.open = 1;
    w.busy = 0;
}

/// This CPU's open window.
#[inline(always)]
pub fn current() -> Option<&'static mut Window> {
    slot().filter(|w| w.open != 0)
}

impl Window {
    /// Whether the window covers a `kind` segment.
    #[inline(always)]
    pub fn is(&self, kind: WindowKind) -> bool {
        self.kind == kind as u8
    }
}

/// The segment's handling is over: settle and close.
#[inline(always)]
pub fn close(w: &mut Window) {
    w.busy = 1;
    settle(w, false);
    w.open = 0;
    w.busy = 0;
}

/// User space's flush, run on each CPU in turn: settles the open window without
/// closing it (its segment may still be in hand on this CPU, interrupted; whatever
/// it drops later is still counted at its close), and drains the held-back run.
/// False when it interrupted a program updating the window: nothing was done, and
/// user space tries again.
#[inline(always)]
pub fn flush() -> bool {
    let Some(w) = slot() else { return true };
    if w.busy != 0 {
        maps::count(global::FLUSH_BUSY);
        return false;
    }
    if w.open != 0 {
        settle(w, true);
    }
    super::drain(&mut w.run);
    w.run.flushed_sec = maps::now_ns() / 1_000_000_000;
    true
}

/// Records the listen drops this CPU counted since the window opened or was last
/// settled, and moves the window's baselines up to now. A function of its own (a
/// BPF-to-BPF call): open, close and flush all settle, and inlining the recording
/// path into each overflowed the 512-byte stack.
#[inline(never)]
fn settle(w: &mut Window, late: bool) {
    let o = fields::offsets();
    // Both in one read: the pair sits side by side in the MIB.
    let (overflows, drops) = fields::read_pair::<u64>(w.mib, o.mib_listen_overflows, o.mib_listen_drops);
    let made = drops.wrapping_sub(w.listen_drops);
    if made == 0 {
        return;
    }
    let overflowed = overflows != w.overflows;
    // A SYN drop adds to ListenOverflows or to TCPReqQFullDrop, never both, and
    // always to ListenDrops: one drop that overflowed leaves the other as it was.
    let reqq_full = if w.kind == SYN && w.reqq_full != REQQ_UNREAD && !(overflowed && made == 1) {
        fields::read::<u64>(w.mib, o.mib_reqq_full_drop)
    } else {
        w.reqq_full
    };
    let syn_queue_full = reqq_full != w.reqq_full;
    w.listen_drops = drops;
    w.overflows = overflows;
    w.reqq_full = reqq_full;
    let sk_drops = fields::sk_drops(w.sk, o);
    if sk_drops == w.sk_drops {
        maps::add(global::UNATTRIBUTED, made);
        return;
    }
    w.sk_drops = sk_drops;
    if late {
        maps::count(global::SETTLED_LATE);
    }
    // One segment makes one listen drop; more means segments handled inside this
    // one's handling that no window of theirs covered.
    if made > 1 {
        maps::add(global::UNATTRIBUTED, made - 1);
    }
    let reason = match (w.kind, overflowed, syn_queue_full) {
        (SYN, _, true) => DropReason::SynQueueFull,
        (SYN, true, false) => DropReason::AcceptQueueFull,
        (ACK, true, _) => DropReason::AckOverflow,
        _ => DropReason::Other,
    };
    let q = queues_at_drop(w, reason);
    w.drop_peer.listener = key(w);
    super::record(&mut w.run, &w.drop_peer, u16::from_be(w.sport_be), reason, &q, o);
}

/// The window's listener's key. Its inode takes four dependent reads (sock ->
/// socket -> file -> inode), so each CPU keeps the last one it computed, valid while
/// no listener anywhere has closed since (`listeners::generation`): a closed
/// listener's sock can be reused for a new listener at the same address, with a new
/// inode, only after its close bumped the generation. The generation is read before
/// the inode, so a close racing the reads leaves a stale generation behind, not a
/// stale inode. (A close whose program run the kernel skipped would not bump it; the
/// kernel counts such skipped runs, and they are reported.)
#[inline(always)]
fn key(w: &mut Window) -> ListenerKey {
    let (sk, gen) = (w.sk, listeners::generation());
    let cached = w.key_ino;
    if w.key_sk == sk && w.key_gen == gen && w.key_check == fold(sk, cached, gen) {
        return ListenerKey { sk, ino: cached };
    }
    let ino = fields::socket_inode(sk, &fields::offsets());
    w.key_sk = sk;
    w.key_ino = ino;
    w.key_gen = gen;
    w.key_check = fold(sk, ino, gen);
    w.folded_peak = 0;
    w.folded_max = 0;
    ListenerKey { sk, ino }
}

#[inline(always)]
fn fold(sk: u64, ino: u64, gen: u64) -> u64 {
    (sk ^ ino.rotate_left(21) ^ gen.rotate_left(42)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Whether `child` belongs to the listener of window `w` (same local port). `child`
/// is inet_sock_set_state's BTF-typed argument, in every mode.
#[inline(always)]
fn owns(w: &Window, child: u64) -> bool {
    fields::load::<u16>(child, fields::offsets().skc_num) == w.lport
}

/// inet_sock_set_state LISTEN -> SYN_RECV: a child was born from the final ACK this
/// CPU is handling. Returns the listener, which is about to queue the child, and its
/// queues as this ACK found them (read when the window opened, in this softirq) when
/// they show this CPU a longer queue or another limit than it has noted for that
/// listener; the caller notes them then (`maps::note_queue`).
#[inline(always)]
pub fn child_born(child: u64) -> Option<(ListenerKey, Option<QueueState>)> {
    let w = current()?;
    if w.kind != ACK || !owns(w, child) {
        return None;
    }
    w.busy = 1;
    let k = key(w);
    let new = w.ack_backlog > w.folded_peak || w.max_ack_backlog != w.folded_max;
    if new {
        w.folded_peak = max(w.folded_peak, w.ack_backlog);
        w.folded_max = w.max_ack_backlog;
    }
    w.busy = 0;
    let q = QueueState { ack_backlog: w.ack_backlog, max_ack_backlog: w.max_ack_backlog, syn_qlen: w.syn_qlen };
    Some((k, new.then_some(q)))
}

/// A child turned ESTABLISHED: its final ACK's story is over, so the window closes
/// (an admitted ACK is freed by __kfree_skb, which no tracepoint reports).
#[inline(always)]
pub fn finish_ack(child: u64) {
    if let Some(w) = current() {
        if w.kind == ACK && owns(w, child) {
            close(w);
        }
    }
}

/// The listener's queues for the drop's record: the kernel tested them between our
/// two looks, so take the fuller of the two. The SYN queue is looked at again only
/// when it is what the kernel found full (one read less per drop under a flood of
/// accept-queue overflows).
#[inline(always)]
fn queues_at_drop(w: &Window, reason: DropReason) -> QueueState {
    let o = fields::offsets();
    let (ack_backlog, max_ack_backlog) = fields::read_pair::<u32>(w.sk, o.sk_ack_backlog, o.sk_max_ack_backlog);
    let syn_qlen = match reason {
        DropReason::SynQueueFull => max(w.syn_qlen, fields::read::<u32>(w.sk, o.icsk_accept_queue_qlen)),
        _ => w.syn_qlen,
    };
    QueueState { ack_backlog: max(w.ack_backlog, ack_backlog), max_ack_backlog, syn_qlen }
}

#[inline(always)]
pub(super) fn max(a: u32, b: u32) -> u32 {
    if a > b {
        a
    } else {
        b
    }
}
