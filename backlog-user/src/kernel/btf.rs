//! Field offsets and enum values from the running kernel's BTF.
//!
//! Nothing about kernel struct layout is compiled into backlog-trace: each offset the
//! eBPF programs use is looked up here by name, walking anonymous unions and structs
//! the way the C compiler would, and handed to the programs through `.rodata`.
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use anyhow::{anyhow, bail, Context, Result};
use backlog_common::KernelOffsets;
use btf_rs::{Backend, Btf, Type};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's BTF, mapped rather than parsed: the few dozen lookups the tracer
/// makes cost less than parsing every one of the ~130k types up front (btf-rs's
/// cached backend took ~190 ms and ~30 MB of heap on a 6.18 kernel; mapped, opening
/// takes a few ms). Dropping it unmaps everything.
pub struct KernelBtf {
    btf: Btf,
    /// Struct name -> type id: each name lookup scans every type name.
    composites: RefCell<HashMap<String, u32>>,
}

impl KernelBtf {
    pub fn open(path: &str) -> Result<Self> {
        match Btf::from_file_with_backend(path, Backend::Mmap) {
            Ok(btf) => Ok(Self::new(btf)),
            // Older kernels refuse to map the sysfs file.
            Err(_) => Self::open_copy(path),
        }
    }

    /// Maps a copy of `path` kept in a memfd, which maps on every kernel; its pages
    /// go away with the mapping.
    fn open_copy(path: &str) -> Result<Self> {
        let copy = memfd_copy(path).with_context(|| format!("reading kernel BTF from {path}"))?;
        let btf = Btf::from_file_with_backend(format!("/proc/self/fd/{}", copy.as_raw_fd()), Backend::Mmap)
            .with_context(|| format!("reading kernel BTF from {path}"))?;
        Ok(Self::new(btf))
    }

    fn new(btf: Btf) -> Self {
        KernelBtf { btf, composites: RefCell::new(HashMap::new()) }
    }

    /// Strips typedefs and qualifiers.
    fn resolve(&self, mut ty: Type) -> Result<Type> {
        for _ in 0..16 {
            match &ty {
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                    let inner = ty.as_btf_type().ok_or_else(|| anyhow!("untyped qualifier"))?;
                    ty = self.btf.resolve_chained_type(inner)?;
                }
                _ => return Ok(ty),
            }
        }
        bail!("type chain too deep")
    }

    fn composite(&self, name: &str) -> Result<btf_rs::Struct> {
        if let Some(id) = self.composites.borrow().get(name) {
            if let Type::Struct(s) | Type::Union(s) = self.btf.resolve_type_by_id(*id)? {
                return Ok(s);
            }
        }
        let ids = self.btf.resolve_ids_by_name(name).with_context(|| format!("no type '{name}' in kernel BTF"))?;
        for id in ids {
            match self.btf.resolve_type_by_id(id)? {
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => {
                    self.composites.borrow_mut().insert(name.to_string(), id);
                    return Ok(s);
                }
                _ => {}
            }
        }
        bail!("'{name}' is not a struct in kernel BTF")
    }

    /// Finds `name` in `s`, descending into anonymous members; returns its bit offset
    /// from the start of `s` and its type.
    fn find(&self, s: &btf_rs::Struct, name: &str, depth: u32) -> Result<Option<(u32, Type)>> {
        if depth > 8 {
            return Ok(None);
        }
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let mty = self.resolve(self.btf.resolve_chained_type(m)?)?;
            if mname == name {
                return Ok(Some((m.bit_offset(), mty)));
            }
            if mname.is_empty() {
                if let Type::Struct(inner) | Type::Union(inner) = &mty {
                    if let Some((off, t)) = self.find(inner, name, depth + 1)? {
                        return Ok(Some((m.bit_offset() + off, t)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` (e.g. ["icsk_accept_queue", "qlen"]) inside `strukt`.
    pub fn offset(&self, strukt: &str, path: &[&str]) -> Result<u32> {
        let mut cur = self.composite(strukt)?;
        let mut bits = 0u32;
        for (i, field) in path.iter().enumerate() {
            let (off, ty) = self
                .find(&cur, field, 0)?
                .ok_or_else(|| anyhow!("kernel BTF: struct {strukt} has no field {}", path[..=i].join(".")))?;
            bits += off;
            if i + 1 < path.len() {
                cur = match ty {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => bail!("kernel BTF: {strukt}.{} is not a struct", path[..=i].join(".")),
                };
            }
        }
        if bits % 8 != 0 {
            bail!("kernel BTF: {strukt}.{} is a bitfield", path.join("."));
        }
        Ok(bits / 8)
    }

    /// Values of enumerators of an anonymous enum (like the LINUX_MIB_* indices),
    /// which no type name leads to: the first enum that has `names[0]` answers for all.
    pub fn anonymous_enum_values<const N: usize>(&self, names: [&str; N]) -> Result<[u32; N]> {
        use fallible_iterator::FallibleIterator;
        let mut types = self.btf.type_iter();
        while let Some(ty) = types.next()? {
            let Type::Enum(e) = ty else { continue };
            let value = |name: &str| {
                e.members.iter().find(|m| self.btf.resolve_name(*m).ok().as_deref() == Some(name)).map(|m| m.val())
            };
            if value(names[0]).is_none() {
                continue;
            }
            let mut out = [0; N];
            for (o, n) in out.iter_mut().zip(names) {
                *o = value(n).ok_or_else(|| anyhow!("kernel BTF: enum of {} has no {n}", names[0]))?;
            }
            return Ok(out);
        }
        bail!("kernel BTF has no enumerator {}", names[0])
    }

    /// What the attach modes need beyond offsets (see features.rs).
    pub fn features(&self) -> super::features::Features {
        super::features::Features::probe(&self.btf)
    }

    /// Everything the eBPF programs read from kernel memory.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets> {
        let sk_common = |f: &str| self.offset("sock", &["__sk_common", f]);
        let [listen_drops, listen_overflows, reqq_full_drop] = self.anonymous_enum_values([
            "LINUX_MIB_LISTENDROPS",
            "LINUX_MIB_LISTENOVERFLOWS",
            "LINUX_MIB_TCPREQQFULLDROP",
        ])?;
        // struct linux_mib is an array of unsigned long.
        let mib = |index: u32| index * 8;
        Ok(KernelOffsets {
            skc_family: sk_common("skc_family")?,
            skc_num: sk_common("skc_num")?,
            skc_rcv_saddr: sk_common("skc_rcv_saddr")?,
            skc_v6_rcv_saddr: sk_common("skc_v6_rcv_saddr")?,
            skc_net: sk_common("skc_net")?,
            sk_drops: self.offset("sock", &["sk_drops"])?,
            sk_ack_backlog: self.offset("sock", &["sk_ack_backlog"])?,
            sk_max_ack_backlog: self.offset("sock", &["sk_max_ack_backlog"])?,
            sk_socket: self.offset("sock", &["sk_socket"])?,
            icsk_accept_queue_qlen: self.offset("inet_connection_sock", &["icsk_accept_queue", "qlen"])?,
            socket_file: self.offset("socket", &["file"])?,
            file_f_inode: self.offset("file", &["f_inode"])?,
            inode_i_ino: self.offset("inode", &["i_ino"])?,
            net_ns_inum: self.offset("net", &["ns", "inum"])?,
            skb_head: self.offset("sk_buff", &["head"])?,
            skb_transport_header: self.offset("sk_buff", &["transport_header"])?,
            skb_network_header: self.offset("sk_buff", &["network_header"])?,
            net_mib_net_statistics: self.offset("net", &["mib", "net_statistics"])?,
            mib_listen_drops: mib(listen_drops),
            mib_listen_overflows: mib(listen_overflows),
            mib_reqq_full_drop: mib(reqq_full_drop),
            net_syncookies: self.offset("net", &["ipv4", "sysctl_tcp_syncookies"])?,
            bpf_array_pptrs: self.offset("bpf_array", &["pptrs"])?,
            task_files: self.offset("task_struct", &["files"])?,
            files_fdt: self.offset("files_struct", &["fdt"])?,
            fdtable_max_fds: self.offset("fdtable", &["max_fds"])?,
            fdtable_fd: self.offset("fdtable", &["fd"])?,
            file_private_data: self.offset("file", &["private_data"])?,
            socket_sk: self.offset("socket", &["sk"])?,
        })
    }
}

/// An anonymous in-memory copy of `path`.
fn memfd_copy(path: &str) -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name and valid flags; the fd is checked before use.
    let fd = unsafe { libc::memfd_create(c"backlog-trace-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut copy = unsafe { File::from_raw_fd(fd) };
    std::io::copy(&mut File::open(path)?, &mut copy)?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn btf() -> KernelBtf {
        KernelBtf::open(VMLINUX).expect("these unit tests read the build machine's /sys/kernel/btf/vmlinux")
    }

    #[test]
    fn offsets_walk_anonymous_members() {
        let b = btf();
        // __sk_common is the first member of struct sock on every kernel.
        assert_eq!(b.offset("sock", &["__sk_common"]).unwrap(), 0);
        // skc_num sits in an anonymous struct inside an anonymous union; it follows
        // skc_dport in the same 4-byte port pair.
        let dport = b.offset("sock_common", &["skc_dport"]).unwrap();
        let num = b.offset("sock_common", &["skc_num"]).unwrap();
        assert_eq!(num, dport + 2);
        let o = b.kernel_offsets().unwrap();
        assert_eq!(o.skc_num, num);
        assert_eq!(o.sk_max_ack_backlog, o.sk_ack_backlog + 4);
        assert!(o.icsk_accept_queue_qlen > o.sk_drops);
        // The per-CPU array's elements follow struct bpf_map and three more fields.
        assert!(o.bpf_array_pptrs > b.offset("bpf_array", &["aux"]).unwrap());
    }

    #[test]
    fn listen_counters_are_found_in_the_anonymous_mib_enum() {
        // /proc/net/netstat prints TcpExt in LINUX_MIB_* order: ListenOverflows is
        // followed by ListenDrops there and in the enum.
        let [drops, overflows] =
            btf().anonymous_enum_values(["LINUX_MIB_LISTENDROPS", "LINUX_MIB_LISTENOVERFLOWS"]).unwrap();
        assert_eq!(drops, overflows + 1);
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap();
        let names: Vec<&str> = netstat.lines().next().unwrap().split_whitespace().skip(1).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap() as u32;
        // The TcpExt line starts with SyncookiesSent = LINUX_MIB_SYNCOOKIESSENT (1).
        assert_eq!(pos("ListenDrops") + 1, drops);
        assert!(btf().anonymous_enum_values(["NO_SUCH_ENUMERATOR_XYZ"]).is_err());
    }

    #[test]
    fn a_memfd_copy_reads_like_the_mapped_file() {
        let copy = KernelBtf::open_copy(VMLINUX).unwrap().kernel_offsets().unwrap();
        let mapped = btf().kernel_offsets().unwrap();
        assert_eq!(copy, mapped);
    }

    #[test]
    fn missing_fields_are_errors_not_zero() {
        let b = btf();
        let e = b.offset("sock", &["no_such_field"]).unwrap_err().to_string();
        assert!(e.contains("no field no_such_field"), "{e}");
        assert!(b.offset("no_such_struct_xyz", &["a"]).is_err());
    }
}
