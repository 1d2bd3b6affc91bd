//! fentry and kprobe modes: hook the functions around tcp_listendrop()'s call sites
//! (backlog-ebpf/src/drops/fentry_kprobe.rs) and inet_csk_accept(). Both modes hook the
//! same functions; they differ only in the program type, so they share one table.
use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use aya::programs::{FEntry, FExit, KProbe, ProgramType};
use aya::sys::is_program_supported;
use aya::{Btf, Ebpf};
use aya_obj::btf::BtfKind;
use backlog_common::programs;

use super::attach::{self, AttachMode};
use super::features::Features;

/// What a hooked function is for, and the programs each mode uses for it.
struct Hook {
    function: &'static str,
    /// IPv6 functions live in the ipv6 module, which may be absent or not loaded.
    optional: bool,
    fentry: Option<&'static str>,
    fexit: Option<&'static str>,
    kprobe: Option<&'static str>,
    kretprobe: Option<&'static str>,
}

const HOOKS: [Hook; 7] = [
    Hook {
        function: "tcp_v4_conn_request",
        optional: false,
        fentry: Some(programs::FE_CONN4),
        fexit: Some(programs::FX_CONN4),
        kprobe: Some(programs::KP_CONN),
        kretprobe: Some(programs::KR_CONN),
    },
    Hook {
        function: "tcp_v6_conn_request",
        optional: true,
        fentry: Some(programs::FE_CONN6),
        fexit: Some(programs::FX_CONN6),
        kprobe: Some(programs::KP_CONN),
        kretprobe: Some(programs::KR_CONN),
    },
    Hook {
        function: "tcp_v4_syn_recv_sock",
        optional: false,
        fentry: Some(programs::FE_RECV4),
        fexit: Some(programs::FX_RECV4),
        kprobe: Some(programs::KP_RECV),
        kretprobe: Some(programs::KR_RECV),
    },
    Hook {
        function: "tcp_v6_syn_recv_sock",
        optional: true,
        fentry: Some(programs::FE_RECV6),
        fexit: Some(programs::FX_RECV6),
        kprobe: Some(programs::KP_RECV),
        kretprobe: Some(programs::KR_RECV),
    },
    Hook {
        function: "inet_csk_accept",
        optional: false,
        fentry: None,
        fexit: Some(programs::FX_ACCEPT),
        kprobe: None,
        kretprobe: Some(programs::KR_ACCEPT),
    },
    // listen()'s backlog before somaxconn caps it: __sys_listen has it on every
    // kernel; __sys_listen_socket (6.11+) for io_uring's listen too, and for
    // listen(2) where it is not inlined into __sys_listen (Debian's 6.12 and 7.3
    // inline it there, keeping a copy for io_uring). Both may see one call: the
    // second remembers the same value. Without either, the syscall tracepoint
    // stands in (see `listen_backlog_fallback`).
    Hook {
        function: "__sys_listen",
        optional: true,
        fentry: Some(programs::FE_LISTEN),
        fexit: None,
        kprobe: Some(programs::KP_LISTEN),
        kretprobe: None,
    },
    Hook {
        function: "__sys_listen_socket",
        optional: true,
        fentry: Some(programs::FE_LISTEN_SOCKET),
        fexit: None,
        kprobe: Some(programs::KP_LISTEN),
        kretprobe: None,
    },
];

/// Which hooked functions the kernel has, to tell a missing function from a failing
/// attach. Vmlinux BTF answers for built-in functions at once; /proc/kallsyms (~5 MB,
/// ~70 ms to read) is read once, and only for functions BTF lacks (those in modules).
struct Functions<'a> {
    btf: &'a Btf,
    kallsyms: Option<HashSet<String>>,
}

impl<'a> Functions<'a> {
    fn new(btf: &'a Btf) -> Self {
        Functions { btf, kallsyms: None }
    }

    fn has(&mut self, name: &str) -> bool {
        if self.btf.id_by_type_name_kind(name, BtfKind::Func).is_ok() {
            return true;
        }
        self.kallsyms.get_or_insert_with(hooked_kallsyms).contains(name)
    }

    /// The function `h` hooks, if this kernel has it.
    fn pick(&mut self, h: &Hook) -> Result<Option<&'static str>> {
        if self.has(h.function) {
            return Ok(Some(h.function));
        }
        if h.optional {
            return Ok(None);
        }
        bail!("kernel function {} not found (is this a TCP/IPv4 kernel?)", h.function)
    }
}

/// The hooked functions among the kernel's text symbols.
fn hooked_kallsyms() -> HashSet<String> {
    let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|n| HOOKS.iter().any(|h| h.function == *n))
        .map(str::to_string)
        .collect()
}

pub struct Fentry;

impl AttachMode for Fentry {
    /// Whether tracing programs load at all only loading tells (some kernels refuse
    /// them: EPERM); see `probe`.
    fn unavailable(&self, features: &Features) -> Option<String> {
        features.fexit_unavailable()
    }

    /// A two-instruction fentry program on the kernel's own test function, loaded and
    /// attached: kernels that refuse fentry (EPERM, no trampolines) fail it the same
    /// way, for a fraction of loading the object. Kernels whose trampolines refuse
    /// only some functions pass it; `attach` hooks those with kprobes.
    fn probe(&self) -> Option<String> {
        match is_program_supported(ProgramType::Tracing) {
            Ok(true) => None,
            Ok(false) => Some("this kernel cannot attach fentry programs: use --mode kprobe or tracepoint".to_string()),
            Err(e) => Some(format!(
                "a test fentry program failed ({:#}): use --mode kprobe or tracepoint",
                anyhow::Error::from(e)
            )),
        }
    }

    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let mut kprobes = Kprobes::default();
        let mut functions = Functions::new(btf);
        for h in HOOKS.iter() {
            let Some(function) = functions.pick(h)? else { continue };
            match attach_fentry(ebpf, btf, h, function) {
                Ok(()) => {}
                // Some kernels' trampolines refuse particular functions (ENOTSUPP:
                // Linux 6.1 with tcp_v4_syn_recv_sock, for one); the same programs'
                // kprobe twins observe the same calls.
                Err(e) if is_enotsupp(&e) => {
                    kprobes.attach(ebpf, h, function)?;
                    notes.push(format!("fentry: {function} hooked with a kprobe (trampoline refused it)"));
                }
                Err(e) => return Err(e),
            }
        }
        notes.extend(listen_backlog_fallback(ebpf, &mut functions)?);
        Ok(notes)
    }
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf, h: &Hook, function: &str) -> Result<()> {
    // Exits first: an entry without its exit would open windows nobody closes.
    if let Some(name) = h.fexit {
        let p: &mut FExit = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load(function, btf).with_context(|| format!("loading fexit/{function}"))?;
        p.attach().with_context(|| format!("attaching fexit/{function}"))?;
    }
    if let Some(name) = h.fentry {
        let p: &mut FEntry = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load(function, btf).with_context(|| format!("loading fentry/{function}"))?;
        p.attach().with_context(|| format!("attaching fentry/{function}"))?;
    }
    Ok(())
}

/// Where the kernel has no function that still sees listen()'s backlog, the syscall
/// tracepoint gives it, at the cost the README describes (every syscall of every
/// task takes the tracing path); the start line says so.
fn listen_backlog_fallback(ebpf: &mut Ebpf, functions: &mut Functions) -> Result<Option<String>> {
    let listen: Vec<&Hook> = HOOKS.iter().filter(|h| h.kprobe == Some(programs::KP_LISTEN)).collect();
    for h in &listen {
        if functions.pick(h)?.is_some() {
            return Ok(None);
        }
    }
    attach::attach_listen_tracepoint(ebpf)?;
    let names: Vec<&str> = listen.iter().map(|h| h.function).collect();
    Ok(Some(format!("listen() backlog from the syscall tracepoint ({} not found)", names.join(", "))))
}

const ENOTSUPP: i32 = 524;

fn is_enotsupp(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) == Some(ENOTSUPP))
}

/// kprobe programs, each loaded once and attached to as many functions as need it.
#[derive(Default)]
struct Kprobes {
    loaded: HashSet<&'static str>,
}

impl Kprobes {
    fn attach(&mut self, ebpf: &mut Ebpf, h: &Hook, function: &str) -> Result<()> {
        let progs = [h.kretprobe, h.kprobe];
        for name in progs.into_iter().flatten() {
            let p: &mut KProbe = ebpf.program_mut(name).context(name)?.try_into()?;
            if self.loaded.insert(name) {
                p.load().with_context(|| format!("loading {name}"))?;
            }
            p.attach(function, 0).with_context(|| format!("attaching {name} to {function}"))?;
        }
        Ok(())
    }
}

pub struct Kprobe;

impl AttachMode for Kprobe {
    fn unavailable(&self, _: &Features) -> Option<String> {
        let pmu = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
        let events = std::path::Path::new("/sys/kernel/tracing/kprobe_events").exists()
            || std::path::Path::new("/sys/kernel/debug/tracing/kprobe_events").exists();
        (!pmu && !events).then(|| {
            "this kernel has no kprobes (CONFIG_KPROBES is not set): use --mode fentry or tracepoint".to_string()
        })
    }

    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<String>> {
        let mut kprobes = Kprobes::default();
        let mut functions = Functions::new(btf);
        for h in HOOKS.iter() {
            if let Some(function) = functions.pick(h)? {
                kprobes.attach(ebpf, h, function)?;
            }
        }
        Ok(listen_backlog_fallback(ebpf, &mut functions)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trampoline's refusal reaches us as aya errors wrapping the syscall's
    /// io::Error (attach: ProgramError::SyscallError, forwarding its source; load:
    /// LoadError's source), under our context.
    #[test]
    fn enotsupp_is_found_through_the_error_sources() {
        let refused = |errno| {
            let syscall = aya::sys::SyscallError {
                call: "bpf_raw_tracepoint_open",
                io_error: std::io::Error::from_raw_os_error(errno),
            };
            anyhow::Error::from(aya::programs::ProgramError::from(syscall))
                .context("attaching fexit/tcp_v4_syn_recv_sock")
        };
        assert!(is_enotsupp(&refused(ENOTSUPP)));
        assert!(!is_enotsupp(&refused(libc::EPERM)));
    }
}
