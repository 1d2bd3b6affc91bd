//! Kernel field reads through offsets taken from the running kernel's BTF.
//!
//! User space fills `OFFSETS` before loading; the verifier then sees every offset as
//! a constant. All reads go through bpf_probe_read_kernel on plain addresses, which
//! works the same from cgroup_skb, tp_btf, kprobe and fentry programs and never
//! trips the verifier's rules on pointer arithmetic over socket pointers.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use backlog_common::{Config, KernelOffsets, AF_INET, AF_INET6};

#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_state: 0,
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
    net_ipv4_sysctl_tcp_syncookies: 0,
    skb_head: 0,
    skb_transport_header: 0,
    skb_network_header: 0,
    reason_listen_overflow: u32::MAX,
    reason_no_socket: u32::MAX,
    reason_not_specified: u32::MAX,
    kfree_has_rx_sk: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
};

#[no_mangle]
static CONFIG: Config = Config { filter_ports: 0, listen_backlog_off: 24, accept_ret_off: 16, emit_accepts: 0 };

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of a .rodata global; volatile so the compiler does not
    // fold the zero initialiser in.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub fn config() -> Config {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

#[inline(always)]
pub fn read<T: Copy>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address; a fault yields Err.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
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
    QueueState {
        ack_backlog: read::<u32>(sk, o.sk_ack_backlog).unwrap_or(0),
        max_ack_backlog: read::<u32>(sk, o.sk_max_ack_backlog).unwrap_or(0),
        syn_qlen: read::<u32>(sk, o.icsk_accept_queue_qlen).unwrap_or(0),
    }
}

#[inline(always)]
pub fn sk_drops(sk: u64, o: &KernelOffsets) -> u32 {
    read::<u32>(sk, o.sk_drops).unwrap_or(0)
}

/// The sock behind file descriptor `fd` of the current task (what accept() returned).
#[inline(always)]
pub fn current_fd_sock(fd: u64, o: &KernelOffsets) -> u64 {
    // SAFETY: no preconditions; the task pointer is only used as an address to read.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let files = read::<u64>(task, o.task_files).unwrap_or(0);
    let fdt = read::<u64>(files, o.files_fdt).unwrap_or(0);
    let max = read::<u32>(fdt, o.fdtable_max_fds).unwrap_or(0);
    if fd >= max as u64 {
        return 0;
    }
    let fds = read::<u64>(fdt, o.fdtable_fd).unwrap_or(0);
    let file = read::<u64>(fds, (fd * 8) as u32).unwrap_or(0);
    let socket = read::<u64>(file, o.file_private_data).unwrap_or(0);
    read::<u64>(socket, o.socket_sk).unwrap_or(0)
}

#[inline(always)]
pub fn has_socket(sk: u64, o: &KernelOffsets) -> bool {
    read::<u64>(sk, o.sk_socket).unwrap_or(0) != 0
}

#[inline(always)]
pub fn sk_net(sk: u64, o: &KernelOffsets) -> u64 {
    read::<u64>(sk, o.skc_net).unwrap_or(0)
}

#[inline(always)]
pub fn netns_inum(net: u64, o: &KernelOffsets) -> u32 {
    read::<u32>(net, o.net_ns_inum).unwrap_or(0)
}

#[inline(always)]
pub fn syncookies(net: u64, o: &KernelOffsets) -> u8 {
    read::<u8>(net, o.net_ipv4_sysctl_tcp_syncookies).unwrap_or(1)
}

/// Inode of the `struct socket` behind a sock: what /proc/PID/fd/N links to.
#[inline(always)]
pub fn socket_inode(sk: u64, o: &KernelOffsets) -> u64 {
    let sock = read::<u64>(sk, o.sk_socket).unwrap_or(0);
    let file = read::<u64>(sock, o.socket_file).unwrap_or(0);
    let inode = read::<u64>(file, o.file_f_inode).unwrap_or(0);
    read::<u64>(inode, o.inode_i_ino).unwrap_or(0)
}

/// The listener's own (bound) address: family, address bytes, local port.
#[inline(always)]
pub fn local_addr(sk: u64, o: &KernelOffsets) -> (u16, [u8; 16], u16) {
    let family = read::<u16>(sk, o.skc_family).unwrap_or(0);
    let port = read::<u16>(sk, o.skc_num).unwrap_or(0);
    let mut addr = [0u8; 16];
    if family == AF_INET6 {
        addr = read::<[u8; 16]>(sk, o.skc_v6_rcv_saddr).unwrap_or([0; 16]);
    } else if family == AF_INET {
        let a = read::<[u8; 4]>(sk, o.skc_rcv_saddr).unwrap_or([0; 4]);
        addr[..4].copy_from_slice(&a);
    }
    (family, addr, port)
}

/// The TCP ports (raw, network order) and flags of the segment an skb carries,
/// through its transport header.
#[derive(Clone, Copy)]
pub struct TcpHead {
    pub sport_be: u16,
    pub dport_be: u16,
    pub flags: u8,
}

/// An IPv4 address as an IPv4-mapped IPv6 address (how a dual-stack listener sees it).
#[inline(always)]
pub fn v4_mapped(a: &[u8; 16]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// The source address of the IP packet an skb carries, and whether it is IPv4.
#[inline(always)]
pub fn skb_peer(skb: u64, o: &KernelOffsets) -> Option<([u8; 16], bool)> {
    let head = read::<u64>(skb, o.skb_head)?;
    let nh = read::<u16>(skb, o.skb_network_header)?;
    let ip = head + nh as u64;
    let version = read::<u8>(ip, 0)? >> 4;
    let mut peer = [0u8; 16];
    if version == 4 {
        let a = read::<[u8; 4]>(ip, 12)?;
        peer[..4].copy_from_slice(&a);
        Some((peer, true))
    } else {
        Some((read::<[u8; 16]>(ip, 8)?, false))
    }
}

pub const TH_SYN: u8 = 0x02;
pub const TH_RST: u8 = 0x04;
pub const TH_ACK: u8 = 0x10;

#[inline(always)]
pub fn skb_tcp_head(skb: u64, o: &KernelOffsets) -> Option<TcpHead> {
    let head = read::<u64>(skb, o.skb_head)?;
    let th = read::<u16>(skb, o.skb_transport_header)?;
    if th == u16::MAX {
        return None;
    }
    let hdr = read::<[u8; 14]>(head, th as u32)?;
    Some(TcpHead {
        sport_be: u16::from_ne_bytes([hdr[0], hdr[1]]),
        dport_be: u16::from_ne_bytes([hdr[2], hdr[3]]),
        flags: hdr[13],
    })
}
