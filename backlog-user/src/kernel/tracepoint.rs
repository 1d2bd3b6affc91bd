//! Tracepoint mode: the programs of backlog-ebpf/src/drops/tracepoint.rs, for
//! kernels without kprobes or fentry. Needs only tracepoints, tp_btf and cgroup_skb.
use std::fs::File;

use anyhow::{Context, Result};
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint};
use aya::{Btf, Ebpf};
use backlog_common::programs;

use super::attach::{self, AttachMode};
use super::env;

pub struct Tracepoint {
    /// Attach the accept/accept4 exit and listen entry syscall tracepoints. Any
    /// program on a syscall tracepoint puts every task of the host on the syscall
    /// tracing path (BENCH.md: the getppid loop), so `--no-accept-timing` leaves
    /// them out: drops only, no accept waits, no requested backlog.
    pub syscalls: bool,
}

/// The start line's note on the syscall tax, either way.
pub const SYSCALL_TAX: &str = "accept timing and listen() backlog from syscall tracepoints: every syscall on the host \
                               takes the tracing path (+60-100 ns on a 250 ns getppid(), BENCH.md); --no-accept-timing leaves them out";
pub const NO_ACCEPT_TIMING: &str =
    "--no-accept-timing: no syscall tracepoints, so no accept-wait times, accept counts or requested backlog";

const TP_BTF: [(&str, &str); 2] = [(programs::TP_CONSUME, "consume_skb"), (programs::TP_KFREE, "kfree_skb")];

/// accept() has no tracepoint: its syscall exits give the descriptor of the child.
const SYSCALLS: [(&str, &str); 2] =
    [(programs::TP_ACCEPT4, "sys_exit_accept4"), (programs::TP_ACCEPT, "sys_exit_accept")];

impl AttachMode for Tracepoint {
    fn unavailable(&self, features: &super::features::Features) -> Option<String> {
        features.kfree_skb_unavailable()
    }

    fn sees_accepts(&self) -> bool {
        self.syscalls
    }

    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<String>> {
        // The free hooks close windows, so they attach first; the ingress hook that
        // opens windows attaches last.
        for (prog, tp) in TP_BTF {
            let p: &mut BtfTracePoint = ebpf.program_mut(prog).context(prog)?.try_into()?;
            p.load(tp, btf).with_context(|| format!("loading {prog} for tp_btf/{tp}"))?;
            p.attach().with_context(|| format!("attaching {prog} to tp_btf/{tp}"))?;
        }
        let note = if self.syscalls {
            for (prog, tp) in SYSCALLS {
                let p: &mut TracePoint = ebpf.program_mut(prog).context(prog)?.try_into()?;
                p.load().with_context(|| format!("loading {prog}"))?;
                p.attach("syscalls", tp).with_context(|| format!("attaching {prog} to syscalls:{tp}"))?;
            }
            attach::attach_listen_tracepoint(ebpf)?;
            SYSCALL_TAX
        } else {
            NO_ACCEPT_TIMING
        };
        let root = env::cgroup2_root()?;
        let cg = File::open(&root).with_context(|| format!("opening cgroup {}", root.display()))?;
        let p: &mut CgroupSkb = ebpf.program_mut(programs::TP_INGRESS).context(programs::TP_INGRESS)?.try_into()?;
        p.load().context("loading the cgroup_skb ingress program")?;
        // aya attaches through a bpf_link, which always coexists with other programs
        // on the cgroup (multi semantics) and rejects the ALLOW_MULTI flag itself.
        p.attach(&cg, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .with_context(|| format!("attaching to cgroup {} (ingress)", root.display()))?;
        Ok(vec![note.to_string()])
    }
}
