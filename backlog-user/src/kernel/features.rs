//! What the running kernel offers the attach modes beyond BTF field offsets, probed
//! from its BTF rather than guessed from its version: a backported or a
//! reduced-configuration kernel says what it has, a version number does not.
use btf_rs::{Btf, Type};

/// The kernel features the attach modes depend on and do not find at attach time
/// with a clear error of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Parameters of inet_csk_accept (4 before Linux 6.10, then 2): an fexit
    /// program finds the return value right after them in its context, which works
    /// on kernels without the bpf_get_func_ret helper (before 5.17). `None`: the
    /// function is not in BTF.
    pub accept_args: Option<usize>,
    /// Arguments tp_btf/kfree_skb passes: (skb, location) before Linux 5.17, then a
    /// drop reason, then the receiving socket; only the skb is read. `None`: the
    /// tracepoint is not in BTF.
    pub kfree_skb_args: Option<usize>,
    /// Whether tracing programs may use maps allocated at run time: the BPF memory
    /// allocator (`struct bpf_mem_alloc`, Linux 6.1) made that safe; before it the
    /// kernel warns (and PREEMPT_RT refuses), so STATS is preallocated (object.rs).
    pub run_time_alloc_safe: bool,
    /// Whether the kernel has the bpf_get_current_task_btf helper (5.11): the accept
    /// exit's descriptor walk then reads with plain loads (`Config::task_btf`).
    pub task_btf: bool,
}

impl Features {
    pub fn probe(btf: &Btf) -> Features {
        Features {
            accept_args: function_args(btf, "inet_csk_accept"),
            kfree_skb_args: tracepoint_args(btf, "kfree_skb"),
            run_time_alloc_safe: btf.resolve_ids_by_name("bpf_mem_alloc").is_ok_and(|ids| !ids.is_empty()),
            task_btf: enum_has(btf, "bpf_func_id", "BPF_FUNC_get_current_task_btf"),
        }
    }

    /// Why the fexit program on inet_csk_accept cannot find its return value here.
    pub fn fexit_unavailable(&self) -> Option<String> {
        self.accept_args.is_none().then(|| {
            "the kernel's BTF has no inet_csk_accept, whose return fentry mode times accepts by: use --mode kprobe"
                .to_string()
        })
    }

    /// Why tracepoint mode's kfree_skb program cannot load here, if it cannot.
    pub fn kfree_skb_unavailable(&self) -> Option<String> {
        self.kfree_skb_args.is_none().then(|| {
            "the kernel's BTF has no kfree_skb tracepoint (btf_trace_kfree_skb), which tracepoint mode hooks: \
             use --mode kprobe or fentry"
                .to_string()
        })
    }
}

/// The parameters of kernel function `name`, from its BTF prototype.
fn function_args(btf: &Btf, name: &str) -> Option<usize> {
    let types = btf.resolve_types_by_name(name).ok()?;
    let Some(Type::Func(f)) = types.into_iter().find(|t| matches!(t, Type::Func(_))) else {
        return None;
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&f).ok()? else {
        return None;
    };
    Some(proto.parameters.len())
}

/// Whether the kernel's enum `name` has enumerator `value` (the helpers a kernel
/// offers are the members of its enum bpf_func_id).
fn enum_has(btf: &Btf, name: &str, value: &str) -> bool {
    let Ok(types) = btf.resolve_types_by_name(name) else { return false };
    types.iter().any(|t| match t {
        Type::Enum(e) => e.members.iter().any(|m| btf.resolve_name(m).is_ok_and(|n| n == value)),
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
    fn function_arguments_come_from_the_btf_prototype() {
        let b = btf();
        // inet_csk_accept(sk, arg) since 6.10 (this machine's kernel is newer).
        assert_eq!(function_args(&b, "inet_csk_accept"), Some(2));
        assert_eq!(function_args(&b, "no_such_function_xyz"), None);
        assert!(Features::probe(&b).run_time_alloc_safe, "this machine's 6.18 has the BPF memory allocator");
        assert!(Features::probe(&b).task_btf, "this machine's 6.18 has bpf_get_current_task_btf");
        assert!(!enum_has(&b, "bpf_func_id", "BPF_FUNC_no_such_helper_xyz"));
    }

    #[test]
    fn a_kernel_without_the_features_is_told_in_one_line_each() {
        // What Linux 5.10's BTF says (measured on Debian's 5.10.0-46-amd64) is enough.
        let old =
            Features { accept_args: Some(4), kfree_skb_args: Some(2), run_time_alloc_safe: false, task_btf: false };
        assert_eq!((old.fexit_unavailable(), old.kfree_skb_unavailable()), (None, None));
        let none = Features { accept_args: None, kfree_skb_args: None, run_time_alloc_safe: true, task_btf: true };
        for why in [none.fexit_unavailable(), none.kfree_skb_unavailable()] {
            let why = why.expect("neither is there");
            assert!(!why.contains('\n') && why.contains("use --mode"), "{why}");
        }
        assert!(none.kfree_skb_unavailable().unwrap().contains("btf_trace_kfree_skb"));
    }
}
