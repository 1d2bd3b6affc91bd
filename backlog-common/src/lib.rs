//! Types shared by the kernel programs (backlog-ebpf) and user space (backlog-user).
//!
//! This crate plays the role of libbpf-tools' shared header: every struct here is
//! `#[repr(C)]`, has no pointers, and is laid out identically on both sides. The
//! recorder writes `Event` and `ListenerStats` to disk field by field, so changing
//! their fields is a file-format change (bump `record::VERSION` in backlog-user).
#![no_std]

/// Why the kernel dropped a connection at the listener.
///
/// The numbering is the index into `ListenerStats::drops` and is stable: it is
/// part of the recorder's file format.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A SYN arrived while the accept queue was full (counts ListenOverflows).
    AcceptQueueFull = 0,
    /// A SYN arrived while the SYN queue was full and syncookies were off
    /// (counts TCPReqQFullDrop).
    SynQueueFull = 1,
    /// The final ACK of a handshake arrived while the accept queue was full
    /// (counts ListenOverflows).
    AckOverflow = 2,
    /// Any other tcp_listendrop(): allocation, route or security failures,
    /// the tcp_max_syn_backlog quarter reserved for proven peers.
    Other = 3,
}

pub const N_REASONS: usize = 4;

impl DropReason {
    pub const ALL: [DropReason; N_REASONS] =
        [DropReason::AcceptQueueFull, DropReason::SynQueueFull, DropReason::AckOverflow, DropReason::Other];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    /// The name used in JSON, tables and Prometheus labels.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::AcceptQueueFull => "accept_queue_full",
            DropReason::SynQueueFull => "syn_queue_full",
            DropReason::AckOverflow => "ack_overflow",
            DropReason::Other => "other",
        }
    }

    /// Whether the kernel also counted this drop in TcpExt ListenOverflows.
    pub fn is_overflow(self) -> bool {
        matches!(self, DropReason::AcceptQueueFull | DropReason::AckOverflow)
    }
}

/// What a ring-buffer record describes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A connection dropped at a listener (`reason` says why).
    Drop = 1,
    /// A socket entered LISTEN (pid/comm are the task that called listen()).
    Listen = 2,
    /// A listening socket left LISTEN (closed or shut down; pid/comm are the task
    /// that did it).
    Unlisten = 3,
    /// An established connection was taken off the accept queue.
    Accept = 4,
    /// A queued connection left the accept queue without being accepted.
    Abandon = 5,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => EventKind::Drop,
            2 => EventKind::Listen,
            3 => EventKind::Unlisten,
            4 => EventKind::Accept,
            5 => EventKind::Abandon,
            _ => return None,
        })
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const COMM_LEN: usize = 16;

/// One record in the ring buffer, and in the recorder's file.
///
/// A single fixed-size record for every kind keeps the kernel side simple (one
/// reserve/submit path) and lets `record`/`report` share one reader.
/// Addresses are in network byte order as on the wire; an IPv4 address sits in
/// the first four bytes. Ports are host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns); user space converts to wall time.
    pub ts_ns: u64,
    /// Kernel address of the listening socket: the identity of a listener while it
    /// lives. Never printed; addresses are reused after close.
    pub sk: u64,
    /// Inode of the listener's `struct socket` (what /proc/PID/fd links name).
    pub sock_ino: u64,
    /// Kind-specific: ns the child spent on the accept queue for `Accept` (its wait)
    /// and `Abandon` (until it left); 0 otherwise.
    pub value: u64,
    /// Network namespace inode (`ip netns identify`, /proc/PID/ns/net).
    pub netns: u32,
    /// For `Listen` and `Unlisten`, the task whose call moved the socket into or out
    /// of LISTEN (listen(), close(), shutdown()); 0 otherwise.
    pub pid: u32,
    pub kind: u8,
    pub reason: u8,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    /// Accept-queue length and limit (sk_ack_backlog / sk_max_ack_backlog).
    pub queue_len: u32,
    pub queue_max: u32,
    /// SYN-queue length (request socks not yet acknowledged).
    pub syn_queue_len: u32,
    /// Backlog asked of listen() (for `Listen`), 0 when not seen.
    pub requested_backlog: u32,
    /// That task's command name (`Listen`, `Unlisten`), NUL-padded; zeros otherwise.
    pub comm: [u8; COMM_LEN],
}

impl Event {
    pub const fn zeroed() -> Self {
        Event {
            ts_ns: 0,
            sk: 0,
            sock_ino: 0,
            value: 0,
            netns: 0,
            pid: 0,
            kind: 0,
            reason: 0,
            family: 0,
            lport: 0,
            rport: 0,
            laddr: [0; 16],
            raddr: [0; 16],
            queue_len: 0,
            queue_max: 0,
            syn_queue_len: 0,
            requested_backlog: 0,
            comm: [0; COMM_LEN],
        }
    }
}

/// Per-listener counters, one copy per CPU (summed in user space).
///
/// These are the source of truth for counts: they stay exact when the ring buffer
/// is full and events are lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    pub drops: [u64; N_REASONS],
    /// The listener's identity, so user space can name a listener whose every event
    /// was lost.
    pub sock_ino: u64,
    pub netns: u32,
    pub family: u16,
    pub lport: u16,
    pub laddr: [u8; 16],
    /// Connections taken by accept(), and their longest wait.
    pub accepts: u64,
    pub wait_max_ns: u64,
    /// Queued connections that left the queue without being accepted.
    pub abandoned: u64,
    /// Highest accept-queue length seen on this CPU since user space last reset it.
    pub queue_peak: u32,
    pub queue_max: u32,
    /// Drops whose line was not sent because this CPU had already sent
    /// `Config::max_drop_lines` lines for the listener this second (exact: every drop
    /// either gets its line, is a lost event, or is counted here).
    pub suppressed: u64,
    /// This CPU's line budget for the listener: the second (ktime / 1e9) it counts,
    /// and the lines sent in it. Meaningless summed over CPUs; user space ignores them.
    pub lines_sec: u64,
    pub lines_in_sec: u64,
}

/// Accept-queue wait histogram buckets: exact below 8 µs, then 8 linear sub-buckets
/// per power of two (each bucket at most 1/8 of its lower bound wide, so a bucket's
/// midpoint is within 6.25% of any value in it). Covers up to ~2^31 µs (35 min);
/// longer waits land in the last bucket.
pub mod hist {
    pub const SUB: u64 = 8;
    pub const BUCKETS: usize = 8 + 28 * 8;

    /// Bucket index of a wait in microseconds. Written without loops over the
    /// value so the verifier sees a fixed, small instruction count.
    #[inline(always)]
    pub fn bucket(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        // floor(log2(us)) by binary search, 6 fixed steps.
        let mut v = us;
        let mut e = 0u64;
        let mut shift = 32u64;
        while shift > 0 {
            if v >> shift != 0 {
                v >>= shift;
                e += shift;
            }
            shift >>= 1;
        }
        let m = (us >> (e - 3)) - SUB; // 0..=7
        let idx = (SUB + (e - 3) * SUB + m) as usize;
        if idx >= BUCKETS {
            BUCKETS - 1
        } else {
            idx
        }
    }

    /// [low, high) bounds of a bucket in microseconds.
    pub fn bounds(idx: usize) -> (u64, u64) {
        let i = idx as u64;
        if i < SUB {
            return (i, i + 1);
        }
        let e = (i - SUB) / SUB + 3;
        let m = (i - SUB) % SUB;
        let width = 1u64 << (e - 3);
        let lo = (SUB + m) * width;
        (lo, lo + width)
    }
}

/// A child on its listener's accept queue, timed from when it joined: one slot of
/// the ENQUEUED table. `child` 0 is an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// The child socket's address.
    pub child: u64,
    /// CLOCK_MONOTONIC nanoseconds when the child joined the queue.
    pub ts_ns: u64,
    pub listener: ListenerKey,
}

/// Slots of one ENQUEUED entry: a child's address picks an entry, and the child may
/// sit in any of its slots (a 4-way set-associative table).
pub const ENQUEUED_WAYS: usize = 4;

/// One entry of the ENQUEUED array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnqueuedSet {
    pub slots: [Enqueued; ENQUEUED_WAYS],
}

/// log2 of the ENQUEUED array's entries: 16,384 entries of 4 slots (65,536 queued
/// children, 2 MiB), the capacity of the LRU hash it replaced.
pub const ENQUEUED_SETS_LOG2: u32 = 14;
pub const ENQUEUED_SETS: u32 = 1 << ENQUEUED_SETS_LOG2;

/// What segment a drop window (backlog-ebpf/src/drops/window.rs) covers; the
/// segment's kind decides which drop reasons it can have.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// A SYN handled by the listener (tcp_conn_request).
    Syn = 1,
    /// A final ACK (or SYN-cookie ACK) handled by the listener (syn_recv_sock).
    Ack = 2,
}

/// Key of the accept-wait histogram map: one counter per (listener, bucket). A map
/// of small counters rather than one array per listener, because indexing a map
/// value by a computed bucket trips older verifiers (6.1) on its bounds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HistKey {
    pub listener: ListenerKey,
    pub bucket: u32,
    pub _pad: u32,
}

/// Identity of a listener in every kernel map and in the model. The socket's address
/// alone is not enough: the kernel reuses a closed listener's memory for the next
/// socket, whose counts must not land on the dead one's. The socket inode tells the
/// two apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub sk: u64,
    pub ino: u64,
}

/// Key of the ACCEPTORS map: a process (tgid) that took connections from a listener
/// by accept().
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AcceptorKey {
    pub listener: ListenerKey,
    pub tgid: u32,
    pub _pad: u32,
}

/// Value of the ACCEPTORS map (per CPU): connections that process took, and its
/// command name as the accepting task had it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Acceptor {
    pub accepts: u64,
    pub comm: [u8; COMM_LEN],
}

/// (listener, process) pairs ACCEPTORS holds at once: a listener has a few
/// acceptors (its workers); a failed insert is counted (`global::ACCEPTORS_FULL`).
pub const ACCEPTORS_MAX_ENTRIES: u32 = 16384;

/// Key of the PEERS map: a peer address whose connections a listener dropped, as the
/// drop's segment carried it (IPv4 in the first four bytes at an IPv4 listener,
/// v4-mapped at an IPv6 one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub listener: ListenerKey,
    pub addr: [u8; 16],
}

/// (listener, peer) pairs PEERS holds at once. Counted per drop in the kernel, so
/// that every drop names its peer whether or not it got a line; a spoofed-source
/// flood fills it, and drops from peers without an entry are counted
/// (`global::PEERS_FULL`) and shown per listener as drops with no peer entry.
pub const PEERS_MAX_ENTRIES: u32 = 4096;

/// Counters that are not per listener (index into the `GLOBAL` per-CPU array). Each
/// is a way the kernel side can see less than everything; user space reports every
/// one that is not zero (the JSON summary's `diagnostics`).
pub mod global {
    /// Ring-buffer records that could not be reserved (counts stay exact).
    pub const LOST_EVENTS: u32 = 0;
    /// Windows still open when the next segment on their CPU opened one: their
    /// segment's end was never seen (a skipped program run, a free no tracepoint
    /// reports). They are settled then, from the CPU's own listen counters.
    pub const WINDOWS_REPLACED: u32 = 1;
    /// Drops at listeners whose stats entry could not be created (map full): in
    /// the namespace's totals, as undetected.
    pub const STATS_FULL: u32 = 2;
    /// Accept-queue children that were never timed (tracer started after enqueue).
    pub const UNMATCHED_ACCEPT: u32 = 3;
    /// Drops found by settling a window late (next segment, or a flush) rather than
    /// at its segment's end: detected, but through the fallback path.
    pub const SETTLED_LATE: u32 = 4;
    /// Listen drops a CPU counted while a window was open whose listener's own drop
    /// counter did not move: the drop was at another listener of the namespace
    /// that no window covered. Not attributed; undetected in the namespace's totals.
    pub const UNATTRIBUTED: u32 = 5;
    /// Flushes of a CPU's window skipped because one of our programs was updating
    /// it at that instant (user space flushes again at the next sync).
    pub const FLUSH_BUSY: u32 = 6;
    /// Accept waits not counted in a histogram because WAIT_HIST was full.
    pub const HIST_FULL: u32 = 7;
    /// Drop lines not sent because their listener was over `--max-drop-lines` on
    /// that CPU in that second; the drops themselves are counted in STATS as ever.
    pub const SUPPRESSED_LINES: u32 = 8;
    /// Accepts whose (listener, process) pair found ACCEPTORS full: that process is
    /// missing from the listener's "accepted by" (its accepts still count).
    pub const ACCEPTORS_FULL: u32 = 9;
    /// Drops whose (listener, peer) pair found PEERS full: counted at their
    /// listener as ever, under no peer.
    pub const PEERS_FULL: u32 = 10;
    /// Queued children whose ENQUEUED entry was full, so that the oldest child there
    /// lost its slot: that child's accept is counted as unmatched, and an abandon
    /// of it goes uncounted.
    pub const ENQUEUED_EVICTED: u32 = 11;
    pub const N: u32 = 12;

    /// JSON names of the diagnostics, by index (`LOST_EVENTS` and
    /// `UNMATCHED_ACCEPT` are reported under their own names).
    pub const DIAGNOSTICS: [(u32, &str); 10] = [
        (WINDOWS_REPLACED, "windows_replaced"),
        (SETTLED_LATE, "settled_late"),
        (UNATTRIBUTED, "unattributed"),
        (STATS_FULL, "stats_full"),
        (FLUSH_BUSY, "flush_busy"),
        (HIST_FULL, "hist_full"),
        (SUPPRESSED_LINES, "suppressed_lines"),
        (ACCEPTORS_FULL, "acceptors_full"),
        (PEERS_FULL, "peers_full"),
        (ENQUEUED_EVICTED, "enqueued_evicted"),
    ];
}

/// Field offsets and constants read from the running kernel's BTF at load time and
/// written into the eBPF object's `.rodata` before it is loaded, so the verifier
/// sees them as constants. No offset is ever compiled in from one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock_common
    pub skc_family: u32,
    pub skc_num: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    // struct sock
    pub sk_drops: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    pub sk_socket: u32,
    // struct inet_connection_sock: &icsk_accept_queue.qlen
    pub icsk_accept_queue_qlen: u32,
    // struct socket -> file -> f_inode -> i_ino
    pub socket_file: u32,
    pub file_f_inode: u32,
    pub inode_i_ino: u32,
    // struct net
    pub net_ns_inum: u32,
    // struct sk_buff
    pub skb_head: u32,
    pub skb_transport_header: u32,
    pub skb_network_header: u32,
    // The namespace's TcpExt counters: `net.mib.net_statistics` is a per-CPU
    // `struct linux_mib` (an array of unsigned long indexed by LINUX_MIB_*). Each CPU
    // only ever adds to its own copy, so this CPU's copy, read before and after a
    // segment is handled, says exactly how many listen drops handling it made.
    pub net_mib_net_statistics: u32,
    /// Byte offsets in `struct linux_mib` of LINUX_MIB_LISTENDROPS,
    /// LINUX_MIB_LISTENOVERFLOWS and LINUX_MIB_TCPREQQFULLDROP (enum values × 8).
    pub mib_listen_drops: u32,
    pub mib_listen_overflows: u32,
    pub mib_reqq_full_drop: u32,
    /// `net.ipv4.sysctl_tcp_syncookies` (a u8 on 6.x, an int before: its first
    /// byte holds the value either way on little-endian machines). TCPReqQFullDrop
    /// moves only while it is 0.
    pub net_syncookies: u32,
    /// `struct bpf_array.pptrs`: with it a program finds its CPU's per-CPU offset
    /// from a per-CPU map of its own (this CPU's element minus the map's percpu
    /// base), with no kernel symbol.
    pub bpf_array_pptrs: u32,
    // fd -> sock: task_struct.files -> files_struct.fdt -> fdtable.{max_fds, fd}
    // -> file.private_data (struct socket) -> socket.sk
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
}

/// Run-time settings written into `.rodata` next to the offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Offset of `backlog` in the syscalls:sys_enter_listen record (from its format file).
    pub listen_backlog_off: u32,
    /// Offset of `ret` in the syscalls:sys_exit_accept(4) records.
    pub accept_ret_off: u32,
    /// 1 to send an event per accept (the recorder wants them; live views read maps).
    pub emit_accepts: u32,
    /// Parameters of inet_csk_accept: its fexit program's context holds them, then
    /// the return value (read so, not with bpf_get_func_ret, which 5.10 lacks).
    pub accept_nargs: u32,
    /// Drop lines (ring-buffer events) per listener, per CPU, per second; 0 = no
    /// limit. Above it a drop is still counted in STATS, and its line in `suppressed`.
    pub max_drop_lines: u32,
    /// 1 when the kernel has bpf_get_current_task_btf (5.11): the accept exit then
    /// walks task -> files -> fdtable with plain loads. 0 leaves that branch dead,
    /// and the verifier removes it before it would look the helper up.
    pub task_btf: u32,
    /// 1 when something sees accept() (every mode but tracepoint mode with
    /// `--no-accept-timing`): queued children are then remembered in ENQUEUED. With
    /// nothing to take them out at accept, each accepted child would only be found
    /// there at its close and counted as accepted unseen (`unmatched_accepts`).
    pub time_accepts: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), plain old data, valid for any bit pattern.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::ListenerStats {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::HistKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::Enqueued {}
    unsafe impl aya::Pod for super::EnqueuedSet {}
    unsafe impl aya::Pod for super::AcceptorKey {}
    unsafe impl aya::Pod for super::Acceptor {}
    unsafe impl aya::Pod for super::PeerKey {}
}

/// Listeners the STATS map holds at most (the loader may size it lower to fit its
/// preallocation budget on hosts with many CPUs). Entries are deleted by user space
/// once a closed listener's final counts are read; an insert into a full map fails
/// and is counted (`global::STATS_FULL`), never evicting a live listener.
pub const STATS_MAX_ENTRIES: u32 = 65536;

/// (listener, bucket) counters WAIT_HIST holds at once: a listener fills a few
/// dozen of its buckets. Allocated on use like STATS; a failed insert is counted
/// (`global::HIST_FULL`), never evicting another listener's waits.
pub const HIST_MAX_ENTRIES: u32 = 4 * STATS_MAX_ENTRIES;

/// Bytes of the EVENTS ring buffer: the kernel side sizes it, user space bounds one
/// drain by what it can hold.
pub const EVENTS_RING_BYTES: u32 = 4 << 20;

/// Map names, shared so the loader cannot drift from the object.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const GLOBAL: &str = "GLOBAL";
    pub const OFFSETS: &str = "OFFSETS";
    pub const CONFIG: &str = "CONFIG";
    pub const WAIT_HIST: &str = "WAIT_HIST";
    pub const ENQUEUED: &str = "ENQUEUED";
    pub const ACCEPTORS: &str = "ACCEPTORS";
    pub const PEERS: &str = "PEERS";
}

/// Program names: the loader finds each program by these. aya-ebpf's macros name a
/// program after its function, so each is the name of a function in
/// backlog-ebpf/src/main.rs; a test in backlog-user checks the embedded object has
/// exactly these programs.
pub mod programs {
    // ---- every mode ----
    /// Never attached: user space runs it on each CPU (BPF_PROG_TEST_RUN) to settle
    /// that CPU's open window.
    pub const FLUSH: &str = "bt_flush";
    /// tp_btf/inet_sock_set_state: listeners, accept-queue children.
    pub const SET_STATE: &str = "bt_set_state";
    /// syscalls:sys_enter_listen: listen()'s backlog (tracepoint mode, and the other
    /// modes' fallback).
    pub const LISTEN: &str = "bt_listen";

    // ---- tracepoint mode ----
    pub const TP_INGRESS: &str = "bt_tp_ingress";
    pub const TP_CONSUME: &str = "bt_tp_consume";
    pub const TP_KFREE: &str = "bt_tp_kfree";
    pub const TP_ACCEPT4: &str = "bt_tp_accept4";
    pub const TP_ACCEPT: &str = "bt_tp_accept";

    // ---- fentry mode: one program per kernel function ----
    pub const FE_CONN4: &str = "bt_fe_conn4";
    pub const FX_CONN4: &str = "bt_fx_conn4";
    pub const FE_CONN6: &str = "bt_fe_conn6";
    pub const FX_CONN6: &str = "bt_fx_conn6";
    pub const FE_RECV4: &str = "bt_fe_recv4";
    pub const FX_RECV4: &str = "bt_fx_recv4";
    pub const FE_RECV6: &str = "bt_fe_recv6";
    pub const FX_RECV6: &str = "bt_fx_recv6";
    pub const FE_LISTEN: &str = "bt_fe_listen";
    pub const FE_LISTEN_SOCKET: &str = "bt_fe_listen_socket";
    pub const FX_ACCEPT: &str = "bt_fx_accept";

    // ---- kprobe mode: one program attaches to the v4 and v6 functions ----
    pub const KP_CONN: &str = "bt_kp_conn";
    pub const KR_CONN: &str = "bt_kr_conn";
    pub const KP_RECV: &str = "bt_kp_recv";
    pub const KR_RECV: &str = "bt_kr_recv";
    pub const KP_LISTEN: &str = "bt_kp_listen";
    pub const KR_ACCEPT: &str = "bt_kr_accept";

    /// Every program in the object.
    pub const ALL: [&str; 25] = [
        FLUSH,
        SET_STATE,
        LISTEN,
        TP_INGRESS,
        TP_CONSUME,
        TP_KFREE,
        TP_ACCEPT4,
        TP_ACCEPT,
        FE_CONN4,
        FX_CONN4,
        FE_CONN6,
        FX_CONN6,
        FE_RECV4,
        FX_RECV4,
        FE_RECV6,
        FX_RECV6,
        FE_LISTEN,
        FE_LISTEN_SOCKET,
        FX_ACCEPT,
        KP_CONN,
        KR_CONN,
        KP_RECV,
        KR_RECV,
        KP_LISTEN,
        KR_ACCEPT,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_overflow_split() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_u8(r as u8), Some(r));
        }
        assert_eq!(DropReason::from_u8(4), None);
        let overflows: usize = DropReason::ALL.iter().filter(|r| r.is_overflow()).count();
        assert_eq!(overflows, 2);
    }

    #[test]
    fn histogram_buckets_are_contiguous_and_fine() {
        let mut prev_hi = 0;
        for i in 0..hist::BUCKETS {
            let (lo, hi) = hist::bounds(i);
            assert_eq!(lo, prev_hi, "bucket {i} starts where {} ended", i.saturating_sub(1));
            assert_eq!(hist::bucket(lo), i);
            assert_eq!(hist::bucket(hi - 1), i);
            // Width at most 1/8 of the lower bound beyond the exact range.
            if lo >= hist::SUB {
                assert!((hi - lo) * 8 <= lo, "bucket {i} [{lo},{hi}) too wide");
            }
            prev_hi = hi;
        }
        assert_eq!(hist::bucket(u64::MAX), hist::BUCKETS - 1);
        assert_eq!(hist::bucket(1000), hist::bucket(1023));
        assert_ne!(hist::bucket(1000), hist::bucket(1160));
    }

    #[test]
    fn event_layout_is_stable() {
        // The recorder's file format depends on this size.
        assert_eq!(core::mem::size_of::<Event>(), 112);
    }
}
