//! Kernel field reads through offsets taken from the running kernel's BTF.
//!
//! User space fills `OFFSETS` before loading; the verifier then sees every offset as
//! a constant. All reads go through bpf_probe_read_kernel on plain addresses, which
//! works the same from cgroup_skb, tp_btf, kprobe and fentry programs and never
//! trips the verifier's rules on pointer arithmetic over socket pointers.
//!
//! A read never branches on failure: the helper zero-fills its destination when the
//! address is bad, and zero is what every caller wants then. Branching on each of
//! the dozens of reads in a path multiplied the states older verifiers explore
//! (6.1 gave up at a million instructions).
use aya_ebpf::{helpers::generated::bpf_probe_read_kernel, macros::map, maps::PerCpuArray};
use backlog_common::{Config, KernelOffsets, ListenerKey, AF_INET6};

#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_num: 0,
    skc_rcv_saddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    sk_drops: 0,
    sk_ack_backlog: 0,
    sk_max_ack_backlog: 0,
    sk_socket: 0,
    icsk_accept_queue_qlen: 0,
    socket_file: 0,
    file_f_inode: 0,
    inode_i_ino: 0,
    net_ns_inum: 0,
    skb_head: 0,
    skb_transport_header: 0,
    skb_network_header: 0,
    net_mib_net_statistics: 0,
    mib_listen_drops: 0,
    mib_listen_overflows: 0,
    mib_reqq_full_drop: 0,
    net_syncookies: 0,
    bpf_array_pptrs: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
};

#[no_mangle]
static CONFIG: Config = Config {
    listen_backlog_off: 24,
    accept_ret_off: 16,
    emit_accepts: 0,
    accept_nargs: 0,
    max_drop_lines: 0,
    task_btf: 0,
    time_accepts: 0,
};

/// The offsets, read in place. The pointer is laundered through a volatile stack
/// slot so the compiler cannot fold the zero initialiser into the loads, while each
/// field is still loaded alone: a volatile read of the whole struct copied every
/// field onto the stack at every call site. The verifier still sees constants, since
/// .rodata is a frozen read-only map.
#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    launder(&OFFSETS)
}

#[inline(always)]
pub fn config() -> &'static Config {
    launder(&CONFIG)
}

#[inline(always)]
fn launder<T>(r: &'static T) -> &'static T {
    let p: *const T = r;
    // SAFETY: reads back the pointer just stored; it points at a 'static global.
    unsafe { &*core::ptr::read_volatile(&p) }
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_LISTEN: u8 = 10;

/// The `T` at `base + off` in kernel memory, or zeroes if it cannot be read.
#[inline(always)]
pub fn read<T: Copy>(base: u64, off: u32) -> T {
    // Not zeroed first: the helper fills all of `v` either way, and zeroing a
    // 16-byte array became a call to `memset`, a frame of its own on the drop path.
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes size_of::<T>() bytes into `v`, the value read or
    // zeroes on failure, so `v` is initialised either way; T is plain old data.
    unsafe {
        bpf_probe_read_kernel(
            v.as_mut_ptr() as *mut core::ffi::c_void,
            core::mem::size_of::<T>() as u32,
            (base + off as u64) as *const core::ffi::c_void,
        );
        v.assume_init()
    }
}

/// The `T` at `base + off`, where `base` is a pointer the verifier knows the BTF type
/// of (a tp_btf argument, a `bpf_skc_to_tcp_sock` result): one load, which the
/// verifier checks against the type and the JIT guards (a fault reads zeroes), instead
/// of a helper call (~50 ns each on the bench host; the drop and accept paths made
/// a dozen). The offset comes from the frozen .rodata, so the verifier sees a
/// constant. Only for fields inside `base`'s own type: a `struct sock *` argument
/// cannot reach inet_connection_sock's fields this way, so those keep `read`.
#[inline(always)]
pub fn load<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: the verifier rejects the program unless `base + off` is a `T`-sized
    // member of `base`'s BTF type, and faults on it read as zeroes.
    unsafe { core::ptr::read_volatile((base as *const u8).wrapping_add(off as usize) as *const T) }
}

/// How a path reads the fields of a kernel object: the attach modes hand their
/// pointers over in different forms (see `load`), and the shared logic is written
/// once for both.
pub trait Mem {
    /// Whether `get` is a plain load (else a helper call).
    const LOAD: bool;

    fn get<T: Copy>(base: u64, off: u32) -> T;

    /// The address `p` holds, as a plain number (see `number`).
    fn number(p: u64) -> u64;

    /// Two fields; `Probe` reads a side-by-side pair at once (`read_pair`).
    #[inline(always)]
    fn pair<T: Copy>(base: u64, a: u32, b: u32) -> (T, T) {
        (Self::get(base, a), Self::get(base, b))
    }
}

/// Any address, through the helper: kprobe arguments, pointers kept in maps.
pub struct Probe;

/// A pointer the verifier knows the BTF type of: plain loads.
pub struct Btf;

impl Mem for Probe {
    const LOAD: bool = false;

    #[inline(always)]
    fn get<T: Copy>(base: u64, off: u32) -> T {
        read(base, off)
    }

    #[inline(always)]
    fn number(p: u64) -> u64 {
        p
    }

    #[inline(always)]
    fn pair<T: Copy>(base: u64, a: u32, b: u32) -> (T, T) {
        read_pair(base, a, b)
    }
}

impl Mem for Btf {
    const LOAD: bool = true;

    #[inline(always)]
    fn get<T: Copy>(base: u64, off: u32) -> T {
        load(base, off)
    }

    #[inline(always)]
    fn number(p: u64) -> u64 {
        number(p)
    }
}

/// The address a pointer holds, as a plain number. The verifier forbids arithmetic
/// between pointers of different kinds (a map, a map value): reading the pointer
/// back from the stack through the helper launders it into a scalar.
#[inline(always)]
pub fn address_of<T>(p: *const T) -> u64 {
    let slot = p;
    read::<u64>(&slot as *const *const T as u64, 0)
}

/// Each CPU's anchor: the address of its own copy, once `number` has needed it.
#[map(name = "ANCHOR")]
static ANCHOR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `address_of` for a pointer the verifier typed (a tp_btf argument), without the
/// helper call on every use: the verifier allows a privileged program one piece of
/// arithmetic on two pointers, their difference, which it treats as a plain number.
/// The difference with this CPU's anchor plus the anchor's address (read through
/// the helper once per CPU) is the address itself, as every mode spells it.
#[inline(always)]
pub fn number(p: u64) -> u64 {
    let Some(anchor) = ANCHOR.get_ptr_mut(0) else { return address_of(p as *const u8) };
    // SAFETY: this CPU's copy. Any program on this CPU that writes it writes the
    // same value.
    let own = unsafe {
        if *anchor == 0 {
            *anchor = address_of(anchor);
        }
        *anchor
    };
    p.wrapping_sub(anchor as u64).wrapping_add(own)
}

/// Two `T`s at `base + a` and `base + b`: one read when they sit side by side (the
/// offsets are load-time constants, so the verifier drops the other branch), as
/// ListenOverflows/ListenDrops and sk_ack_backlog/sk_max_ack_backlog do on every
/// kernel we run on.
#[inline(always)]
pub fn read_pair<T: Copy>(base: u64, a: u32, b: u32) -> (T, T) {
    if b as usize == a as usize + core::mem::size_of::<T>() {
        let v = read::<[T; 2]>(base, a);
        (v[0], v[1])
    } else {
        (read::<T>(base, a), read::<T>(base, b))
    }
}

/// What the drop logic needs to know about a listener at one instant.
#[derive(Clone, Copy)]
pub struct QueueState {
    pub ack_backlog: u32,
    pub max_ack_backlog: u32,
    /// SYN queue (request socks awaiting the final ACK).
    pub syn_qlen: u32,
}

#[inline(always)]
pub fn queue_state(sk: u64, o: &KernelOffsets) -> QueueState {
    let (ack_backlog, max_ack_backlog) = read_pair::<u32>(sk, o.sk_ack_backlog, o.sk_max_ack_backlog);
    QueueState { ack_backlog, max_ack_backlog, syn_qlen: read::<u32>(sk, o.icsk_accept_queue_qlen) }
}

#[inline(always)]
pub fn sk_drops(sk: u64, o: &KernelOffsets) -> u32 {
    read::<u32>(sk, o.sk_drops)
}

/// The sock behind file descriptor `fd` of the current task (what accept() returned).
/// With a BTF-typed task (5.11+, `Config::task_btf`) the first four steps are plain
/// loads; the fd array holds pointers to pointers, which the verifier does not type,
/// so the rest takes the helper either way.
#[inline(always)]
pub fn current_fd_sock(fd: u64, o: &KernelOffsets) -> u64 {
    if config().task_btf != 0 {
        // SAFETY: no preconditions; the result is a task_struct the verifier knows.
        let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() } as u64;
        fd_sock::<Btf>(task, fd, o)
    } else {
        // SAFETY: no preconditions; the task pointer is only used as an address to read.
        let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
        fd_sock::<Probe>(task, fd, o)
    }
}

#[inline(always)]
fn fd_sock<M: Mem>(task: u64, fd: u64, o: &KernelOffsets) -> u64 {
    let files = M::get::<u64>(task, o.task_files);
    let fdt = M::get::<u64>(files, o.files_fdt);
    let max = M::get::<u32>(fdt, o.fdtable_max_fds);
    if fd >= max as u64 {
        return 0;
    }
    let fds = M::get::<u64>(fdt, o.fdtable_fd);
    let file = read::<u64>(fds, (fd * 8) as u32);
    let socket = read::<u64>(file, o.file_private_data);
    read::<u64>(socket, o.socket_sk)
}

#[inline(always)]
pub fn has_socket(sk: u64, o: &KernelOffsets) -> bool {
    read::<u64>(sk, o.sk_socket) != 0
}

#[inline(always)]
pub fn sk_net(sk: u64, o: &KernelOffsets) -> u64 {
    read::<u64>(sk, o.skc_net)
}

#[inline(always)]
pub fn netns_inum(net: u64, o: &KernelOffsets) -> u32 {
    read::<u32>(net, o.net_ns_inum)
}

/// Inode of the `struct socket` behind a sock: what /proc/PID/fd/N links to.
#[inline(always)]
pub fn socket_inode(sk: u64, o: &KernelOffsets) -> u64 {
    let sock = read::<u64>(sk, o.sk_socket);
    let file = read::<u64>(sock, o.socket_file);
    let inode = read::<u64>(file, o.file_f_inode);
    read::<u64>(inode, o.inode_i_ino)
}

/// A listener's identity in the maps (see `ListenerKey`).
#[inline(always)]
pub fn listener_key(sk: u64, o: &KernelOffsets) -> ListenerKey {
    ListenerKey { sk, ino: socket_inode(sk, o) }
}

/// The listener's own (bound) address: family, address bytes, local port.
#[inline(always)]
pub fn local_addr(sk: u64, o: &KernelOffsets) -> (u16, [u8; 16], u16) {
    let family = read::<u16>(sk, o.skc_family);
    let port = read::<u16>(sk, o.skc_num);
    let addr = if family == AF_INET6 {
        read::<[u8; 16]>(sk, o.skc_v6_rcv_saddr)
    } else {
        let a = read::<[u8; 4]>(sk, o.skc_rcv_saddr);
        [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    };
    (family, addr, port)
}

/// An IPv4 address as an IPv4-mapped IPv6 address (how a dual-stack listener sees it).
#[inline(always)]
pub fn v4_mapped(a: &[u8; 16]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// The source address of the IP packet an skb carries, and whether it is IPv4.
#[inline(always)]
pub fn skb_peer(skb: u64, o: &KernelOffsets) -> ([u8; 16], bool) {
    let head = read::<u64>(skb, o.skb_head);
    let nh = read::<u16>(skb, o.skb_network_header);
    let ip = head + nh as u64;
    if read::<u8>(ip, 0) >> 4 == 4 {
        let a = read::<[u8; 4]>(ip, 12);
        ([a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], true)
    } else {
        (read::<[u8; 16]>(ip, 8), false)
    }
}

pub const TH_SYN: u8 = 0x02;
pub const TH_RST: u8 = 0x04;
pub const TH_ACK: u8 = 0x10;

/// The TCP source port (raw, network order) of the segment an skb carries, through
/// its transport header. `M` says how `skb` itself can be read; the header behind it
/// always takes the helper.
#[inline(always)]
pub fn skb_source_port<M: Mem>(skb: u64, o: &KernelOffsets) -> Option<u16> {
    let head = M::get::<u64>(skb, o.skb_head);
    let th = M::get::<u16>(skb, o.skb_transport_header);
    if th == u16::MAX {
        return None;
    }
    Some(u16::from_ne_bytes(read::<[u8; 2]>(head, th as u32)))
}
