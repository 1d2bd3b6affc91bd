//! What the running kernel offers the attach modes beyond BTF field offsets, probed
//! from its BTF rather than guessed from its version: a backported or a
//! reduced-configuration kernel says what it has, a version number does not.
use btf_rs::{Btf, Type};

/// The kernel features the attach modes depend on and do not find at attach time
/// with a clear error of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Whether `enum bpf_func_id` has BPF_FUNC_get_func_ret: the fexit programs read
    /// the hooked function's return value with it (Linux 5.17+).
    pub get_func_ret: bool,
    /// Arguments tp_btf/kfree_skb passes: (skb, location) before Linux 5.17, then a
    /// drop reason, then the receiving socket. `None`: the tracepoint is not in BTF.
    pub kfree_skb_args: Option<usize>,
}

/// tracepoint mode tells a final ACK dropped by a full accept queue from one
/// discarded for other causes by kfree_skb's reason: (skb, location, reason).
pub const KFREE_SKB_ARGS_WITH_REASON: usize = 3;

impl Features {
    pub fn probe(btf: &Btf) -> Features {
        Features {
            get_func_ret: enum_has(btf, "bpf_func_id", "BPF_FUNC_get_func_ret"),
            kfree_skb_args: tracepoint_args(btf, "kfree_skb"),
        }
    }

    /// Why the fexit programs cannot load here, if they cannot.
    pub fn fexit_unavailable(&self) -> Option<String> {
        (!self.get_func_ret).then(|| {
            "this kernel has no bpf_get_func_ret helper (BPF_FUNC_get_func_ret, Linux 5.17+), which backlog-trace's \
             fexit programs use to read return values: use --mode kprobe"
                .to_string()
        })
    }

    /// Why tracepoint mode's kfree_skb program cannot load here, if it cannot.
    pub fn kfree_skb_unavailable(&self) -> Option<String> {
        match self.kfree_skb_args {
            Some(n) if n >= KFREE_SKB_ARGS_WITH_REASON => None,
            Some(n) => Some(format!(
                "tp_btf/kfree_skb passes no drop reason on this kernel ({n} arguments; the reason came in Linux \
                 5.17), which tracepoint mode needs to tell a final ACK dropped by a full accept queue from other \
                 discards: use --mode kprobe or fentry"
            )),
            None => Some(
                "the kernel's BTF has no kfree_skb tracepoint (btf_trace_kfree_skb), which tracepoint mode hooks: \
                 use --mode kprobe or fentry"
                    .to_string(),
            ),
        }
    }
}

/// Whether `enum enum_name` has `enumerator`.
fn enum_has(btf: &Btf, enum_name: &str, enumerator: &str) -> bool {
    btf.resolve_types_by_name(enum_name).unwrap_or_default().iter().any(|ty| match ty {
        Type::Enum(e) => e.members.iter().any(|m| btf.resolve_name(m).is_ok_and(|n| n == enumerator)),
        _ => false,
    })
}

/// The arguments a raw tracepoint passes to tp_btf programs: its `btf_trace_<name>`
/// typedef is a pointer to `void (void *__data, args...)`.
fn tracepoint_args(btf: &Btf, name: &str) -> Option<usize> {
    let types = btf.resolve_types_by_name(&format!("btf_trace_{name}")).ok()?;
    let Some(Type::Typedef(td)) = types.into_iter().find(|t| matches!(t, Type::Typedef(_))) else {
        return None;
    };
    let Type::Ptr(ptr) = btf.resolve_chained_type(&td).ok()? else {
        return None;
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&ptr).ok()? else {
        return None;
    };
    proto.parameters.len().checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn btf() -> Btf {
        Btf::from_file(super::super::btf::VMLINUX).expect("these unit tests read the build machine's kernel BTF")
    }

    #[test]
    fn tracepoint_arguments_come_from_the_btf_trace_typedef() {
        let b = btf();
        // inet_sock_set_state(sk, oldstate, newstate) on every kernel with BTF.
        assert_eq!(tracepoint_args(&b, "inet_sock_set_state"), Some(3));
        assert!(tracepoint_args(&b, "kfree_skb").is_some_and(|n| n >= 2));
        assert_eq!(tracepoint_args(&b, "no_such_tracepoint_xyz"), None);
    }

    #[test]
    fn enumerators_are_found_by_name() {
        let b = btf();
        assert!(enum_has(&b, "bpf_func_id", "BPF_FUNC_map_lookup_elem"));
        assert!(!enum_has(&b, "bpf_func_id", "BPF_FUNC_no_such_helper_xyz"));
        assert!(!enum_has(&b, "no_such_enum_xyz", "BPF_FUNC_map_lookup_elem"));
    }

    #[test]
    fn a_kernel_without_the_features_is_told_in_one_line_each() {
        // What Linux 5.10's BTF says (measured on Debian's 5.10.0-46-amd64).
        let old = Features { get_func_ret: false, kfree_skb_args: Some(2) };
        for why in [old.fexit_unavailable(), old.kfree_skb_unavailable()] {
            let why = why.expect("5.10 lacks both");
            assert!(!why.contains('\n') && why.contains("use --mode"), "{why}");
        }
        assert!(old.kfree_skb_unavailable().unwrap().contains("2 arguments"));
        let none = Features { get_func_ret: true, kfree_skb_args: None };
        assert!(none.kfree_skb_unavailable().unwrap().contains("btf_trace_kfree_skb"));
        let new = Features { get_func_ret: true, kfree_skb_args: Some(4) };
        assert_eq!((new.fexit_unavailable(), new.kfree_skb_unavailable()), (None, None));
    }
}
