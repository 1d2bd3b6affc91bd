//! Loading and attaching the kernel side.
//!
//! Each attach mode (how drops are detected) is a sibling module implementing
//! [`AttachMode`]; this file owns what every mode shares: checks, BTF offsets, the
//! listener hooks, maps, and choosing a mode.
mod affinity;
mod attach;
mod btf;
pub mod env;
mod features;
mod fentry_kprobe;
mod links;
mod mode;
mod object;
mod objinfo;
mod progstats;
mod tracepoint;

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{BtfTracePoint, RawTracePoint, RawTracePointRunOptions, TestRun};
use aya::{Btf, Ebpf, EbpfLoader};
use backlog_common::{
    global, names, programs, Acceptor, AcceptorKey, Config, EnqueuedSet, HistKey, KernelOffsets, ListenerKey,
    ListenerStats, PeerKey, COMM_LEN, ENQUEUED_SETS,
};

use attach::AttachMode;
use features::Features;
pub use mode::Mode;

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/backlog"));

/// A forced attach mode that this kernel cannot run, as found by probing it (not by
/// trying): the process exits with [`ModeUnavailable::EXIT_CODE`], so scripts can tell
/// "not on this kernel" from a failure.
#[derive(Debug)]
pub struct ModeUnavailable(pub String);

impl ModeUnavailable {
    pub const EXIT_CODE: i32 = 3;
}

impl std::fmt::Display for ModeUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ModeUnavailable {}

fn implementation(mode: Mode, opts: &StartOptions) -> Box<dyn AttachMode> {
    match mode {
        Mode::Tracepoint => Box::new(tracepoint::Tracepoint { syscalls: opts.accept_timing }),
        Mode::Fentry => Box::new(fentry_kprobe::Fentry),
        Mode::Kprobe => Box::new(fentry_kprobe::Kprobe),
    }
}

/// Preference order when no mode is forced.
const PREFERENCE: [Mode; 3] = [Mode::Fentry, Mode::Kprobe, Mode::Tracepoint];

pub struct StartOptions {
    pub mode: Option<Mode>,
    /// Send one event per accept (for the recorder); live views read the maps.
    pub emit_accepts: bool,
    /// Drop lines per listener, per CPU, per second (0: every drop gets its line).
    pub max_drop_lines: u32,
    /// Tracepoint mode: time accepts (and read listen()'s backlog) from syscall
    /// tracepoints, which every syscall of every task on the host pays for.
    pub accept_timing: bool,
}

/// The user-side diagnostic beside the kernel side's `global::DIAGNOSTICS`.
const FLUSHES_SKIPPED: &str = "flushes_skipped";

/// Flushes of one CPU tried before what it holds is left for the next sync.
const FLUSH_TRIES: usize = 16;

/// Every diagnostic's name, as `Session::diagnostics` reports them.
pub fn diagnostic_names() -> impl Iterator<Item = &'static str> {
    global::DIAGNOSTICS.iter().map(|(_, name)| *name).chain([FLUSHES_SKIPPED])
}

/// A loaded and attached tracer. Dropping it detaches everything.
pub struct Session {
    /// Our own descriptors of the programs' links, to see them detached from
    /// outside. Declared first so they close before `ebpf` detaches.
    links: links::Links,
    ebpf: Ebpf,
    pub mode: &'static str,
    pub kernel: String,
    /// Modes tried and passed over, and hooks attached another way, for the start line.
    pub fallbacks: Vec<String>,
    /// CPUs a flush could not reach (the tracer confined to that one CPU).
    flushes_skipped: u64,
    /// The kernel's ENQUEUED table, mapped read-only.
    enqueued: memmap2::Mmap,
}

impl Session {
    pub fn start(opts: &StartOptions) -> Result<Session> {
        if OBJECT.is_empty() {
            bail!("this binary was built with AYA_BUILD_SKIP and carries no eBPF programs: rebuild it without that variable");
        }
        env::require_privileges()?;
        env::require_btf()?;
        large_blocks_from_mmap();
        // The mapped BTF is released as soon as the offsets and features are known.
        let (offsets, features) = {
            let kbtf = btf::KernelBtf::open(btf::VMLINUX)?;
            (kbtf.kernel_offsets().context("this kernel's BTF lacks a field backlog-trace reads")?, kbtf.features())
        };
        let tracefs = env::ensure_tracefs()?;
        let config = Config {
            listen_backlog_off: env::tracepoint_field_offset(&tracefs, "syscalls", "sys_enter_listen", "backlog")?,
            accept_ret_off: env::tracepoint_field_offset(&tracefs, "syscalls", "sys_exit_accept4", "ret")?,
            emit_accepts: u32::from(opts.emit_accepts),
            accept_nargs: features.accept_args.unwrap_or(0) as u32,
            max_drop_lines: opts.max_drop_lines,
            task_btf: u32::from(features.task_btf),
            time_accepts: 1,
        };
        let (mut ebpf, mode, fallbacks) = attach_best(opts, &features, &offsets, &config)?;
        let p: &mut RawTracePoint = ebpf.program_mut(programs::FLUSH).context(programs::FLUSH)?.try_into()?;
        p.load().context("loading the flush program (raw_tracepoint, run through BPF_PROG_TEST_RUN)")?;
        let links = links::Links::of(&ebpf).context("finding the links of the attached programs")?;
        let enqueued = map_enqueued(&ebpf)?;
        release_freed_heap();
        Ok(Session { links, ebpf, mode, kernel: env::kernel_release(), fallbacks, flushes_skipped: 0, enqueued })
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let m = self.ebpf.take_map(names::EVENTS).context("EVENTS map")?;
        Ok(RingBuf::try_from(m)?)
    }

    pub fn stats(&mut self) -> Result<PerCpuHashMap<&mut MapData, ListenerKey, ListenerStats>> {
        let m = self.ebpf.map_mut(names::STATS).context("STATS map")?;
        Ok(PerCpuHashMap::try_from(m)?)
    }

    /// Accept-wait histograms: listener -> (bucket, count) summed over CPUs.
    pub fn wait_hist(&self) -> Result<std::collections::HashMap<ListenerKey, Vec<(usize, u64)>>> {
        let m = self.ebpf.map(names::WAIT_HIST).context("WAIT_HIST map")?;
        let h: PerCpuHashMap<&MapData, HistKey, u64> = PerCpuHashMap::try_from(m)?;
        let mut out: std::collections::HashMap<ListenerKey, Vec<(usize, u64)>> = std::collections::HashMap::new();
        for (k, per_cpu) in h.iter().filter_map(|r| r.ok()) {
            out.entry(k.listener).or_default().push((k.bucket as usize, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Deletes a released listener's wait buckets (`buckets` as `wait_hist` gave
    /// them). A bucket already gone (evicted since the read) is no error.
    pub fn forget_hist(&mut self, listener: ListenerKey, buckets: &[(usize, u64)]) -> Result<()> {
        let m = self.ebpf.map_mut(names::WAIT_HIST).context("WAIT_HIST map")?;
        let mut h: PerCpuHashMap<&mut MapData, HistKey, u64> = PerCpuHashMap::try_from(m)?;
        for &(b, _) in buckets {
            let _ = h.remove(&HistKey { listener, bucket: b as u32, _pad: 0 });
        }
        Ok(())
    }

    /// Who took connections from each listener by accept(): (tgid, comm, accepts)
    /// summed over CPUs, the comm from whichever CPU's copy has one.
    pub fn acceptors(&self) -> Result<std::collections::HashMap<ListenerKey, Vec<(u32, [u8; COMM_LEN], u64)>>> {
        let m = self.ebpf.map(names::ACCEPTORS).context("ACCEPTORS map")?;
        let h: PerCpuHashMap<&MapData, AcceptorKey, Acceptor> = PerCpuHashMap::try_from(m)?;
        let mut out: std::collections::HashMap<ListenerKey, Vec<(u32, [u8; COMM_LEN], u64)>> =
            std::collections::HashMap::new();
        for (k, per_cpu) in h.iter().filter_map(|r| r.ok()) {
            let comm = per_cpu.iter().map(|a| a.comm).find(|c| c[0] != 0).unwrap_or([0; COMM_LEN]);
            out.entry(k.listener).or_default().push((k.tgid, comm, per_cpu.iter().map(|a| a.accepts).sum()));
        }
        Ok(out)
    }

    /// Deletes a released listener's acceptor entries (tgids as `acceptors` gave them).
    pub fn forget_acceptors(&mut self, listener: ListenerKey, tgids: impl Iterator<Item = u32>) -> Result<()> {
        let m = self.ebpf.map_mut(names::ACCEPTORS).context("ACCEPTORS map")?;
        let mut h: PerCpuHashMap<&mut MapData, AcceptorKey, Acceptor> = PerCpuHashMap::try_from(m)?;
        for tgid in tgids {
            let _ = h.remove(&AcceptorKey { listener, tgid, _pad: 0 });
        }
        Ok(())
    }

    /// Drops per (listener, peer address), summed over CPUs.
    pub fn peers(&self) -> Result<std::collections::HashMap<ListenerKey, Vec<([u8; 16], u64)>>> {
        let m = self.ebpf.map(names::PEERS).context("PEERS map")?;
        let h: PerCpuHashMap<&MapData, PeerKey, u64> = PerCpuHashMap::try_from(m)?;
        let mut out: std::collections::HashMap<ListenerKey, Vec<([u8; 16], u64)>> = std::collections::HashMap::new();
        for (k, per_cpu) in h.iter().filter_map(|r| r.ok()) {
            out.entry(k.listener).or_default().push((k.addr, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Deletes a released listener's peer entries (addresses as `peers` gave them).
    pub fn forget_peers(&mut self, listener: ListenerKey, addrs: impl Iterator<Item = [u8; 16]>) -> Result<()> {
        let m = self.ebpf.map_mut(names::PEERS).context("PEERS map")?;
        let mut h: PerCpuHashMap<&mut MapData, PeerKey, u64> = PerCpuHashMap::try_from(m)?;
        for addr in addrs {
            let _ = h.remove(&PeerKey { listener, addr });
        }
        Ok(())
    }

    /// Children still timed as queued, counted per listener: read in place from the
    /// mapped table (2 MiB), not with a syscall per slot.
    pub fn enqueued_by_listener(&self) -> std::collections::HashMap<ListenerKey, u64> {
        let sets = self.enqueued.as_ptr().cast::<EnqueuedSet>();
        let mut out = std::collections::HashMap::new();
        for i in 0..ENQUEUED_SETS as usize {
            // SAFETY: within the mapping, aligned (page-aligned start, 128-byte sets);
            // a slot a program is writing may be copied half old, half new, which
            // at worst counts one child under the wrong listener for this reading.
            let set = unsafe { std::ptr::read_volatile(sets.add(i)) };
            for slot in set.slots.iter().filter(|s| s.child != 0) {
                *out.entry(slot.listener).or_insert(0) += 1;
            }
        }
        out
    }

    /// Settles every CPU's open window: a drop whose segment's end no program saw
    /// (a skipped run, a free no tracepoint reports) is counted now instead of when
    /// the next segment reaches that CPU. Call before reading the counts.
    ///
    /// The flush runs on each CPU through an interrupt sent from another CPU, so
    /// that it can never be interrupted itself by the softirq programs whose window
    /// it settles; this thread moves off each CPU in turn to make that so. A CPU with
    /// no other CPU to send from (the tracer confined to it, a single-CPU machine) is
    /// skipped and counted (`flushes_skipped`).
    pub fn flush(&mut self) -> Result<()> {
        let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let p: &RawTracePoint = self.ebpf.program(programs::FLUSH).context(programs::FLUSH)?.try_into()?;
        let pinned = affinity::Pinned::save()?;
        for cpu in cpus {
            // Confined to this one CPU (or a single-CPU machine): its window is
            // settled by its next segment instead; counted, never silent.
            let Some(from) = pinned.other_than(cpu) else {
                self.flushes_skipped += 1;
                continue;
            };
            pinned.run_on(from)?;
            // A flush that found a program updating what it flushes (the CPU's drop
            // window, its held-back accepts) left that part (counted, `flush_busy`);
            // an update takes well under a microsecond, so a few more tries do it.
            for _ in 0..FLUSH_TRIES {
                let run = p
                    .test_run(RawTracePointRunOptions { cpu: Some(cpu), ..RawTracePointRunOptions::new() })
                    .with_context(|| format!("flushing CPU {cpu}'s window (BPF_PROG_TEST_RUN)"))?;
                if run.return_value == 0 {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Runs of our programs the kernel skipped (see progstats).
    pub fn missed_runs(&self) -> Result<u64> {
        progstats::total_misses(&self.ebpf).context("reading our programs' run statistics")
    }

    /// The kernel side's diagnostics (`global::DIAGNOSTICS`), by name.
    pub fn diagnostics(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut all: Vec<(&'static str, u64)> =
            global::DIAGNOSTICS.iter().map(|&(index, name)| Ok((name, self.global(index)?))).collect::<Result<_>>()?;
        all.push((FLUSHES_SKIPPED, self.flushes_skipped));
        Ok(all)
    }

    /// Programs found detached from outside since the last call, a line each.
    pub fn newly_detached(&mut self) -> Vec<String> {
        self.links.newly_detached()
    }

    /// Sum over CPUs of one global counter.
    pub fn global(&self, index: u32) -> Result<u64> {
        let m = self.ebpf.map(names::GLOBAL).context("GLOBAL map")?;
        let a: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(m)?;
        Ok(a.get(&index, 0)?.iter().sum())
    }
}

/// Loads the object and attaches the first mode that works (or the forced one);
/// returns it with the modes passed over and the hooks done another way.
fn attach_best(
    opts: &StartOptions,
    features: &Features,
    offsets: &KernelOffsets,
    config: &Config,
) -> Result<(Ebpf, &'static str, Vec<String>)> {
    let candidates: Vec<Mode> = match opts.mode {
        Some(m) => vec![m],
        None => PREFERENCE.to_vec(),
    };
    // Every mode's cheap checks first: a probe parses BTF of its own, which need not
    // coexist with the loader's. A forced mode is probed too, so that a kernel lacking
    // what it needs is told apart (ModeUnavailable, one line) from a failing attach.
    let mut verdicts = Vec::new();
    for mode in candidates {
        let imp = implementation(mode, opts);
        let why = imp.unavailable(features).or_else(|| imp.probe());
        if let (Some(why), Some(_)) = (&why, opts.mode) {
            return Err(ModeUnavailable(format!("{} mode is unavailable: {why}", mode.name())).into());
        }
        verdicts.push((mode, imp, why));
    }
    // One loader for every attempt: creating one parses the kernel's BTF, which is
    // dropped before parsing the copy the programs' loads need too, so that the two
    // (~20 MB each) never coexist.
    // A mode that cannot see accept() must not remember queued children.
    let untimed = Config { time_accepts: 0, ..*config };
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let aya_btf = Btf::from_sys_fs().context("parsing kernel BTF")?;
    loader.btf(Some(&aya_btf));
    loader.override_global(names::OFFSETS, offsets, true);
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let sizings = object::sizings(features.run_time_alloc_safe, cpus);
    for m in &sizings {
        loader.map_max_entries(m.name, m.max_entries);
    }
    let obj = object::adjusted(OBJECT, &sizings)?;
    let mut fallbacks = Vec::new();
    if let Some(m) = sizings.iter().find(|m| m.prealloc && m.name == names::WAIT_HIST) {
        fallbacks.push(format!(
            "accept-wait histograms preallocated ({} buckets; this kernel predates run-time allocation in tracing \
             programs)",
            m.max_entries
        ));
    }
    for (mode, imp, unavailable) in verdicts {
        if let Some(why) = unavailable {
            fallbacks.push(format!("{} mode unavailable: {why}", mode.name()));
            continue;
        }
        loader.override_global(names::CONFIG, if imp.sees_accepts() { config } else { &untimed }, true);
        // A fresh load per attempt: a half-attached mode must leave nothing behind.
        let mut ebpf = loader.load(&obj).context("loading the eBPF object")?;
        let attached = attach_listeners(&mut ebpf, &aya_btf).and_then(|()| imp.attach(&mut ebpf, &aya_btf));
        match attached {
            Ok(notes) => {
                fallbacks.extend(notes);
                return Ok((ebpf, mode.name(), fallbacks));
            }
            Err(e) if opts.mode.is_none() && mode != Mode::Tracepoint => {
                fallbacks.push(format!("{} mode unavailable: {e:#}", mode.name()));
            }
            Err(e) => return Err(e.context(format!("{} mode", mode.name()))),
        }
    }
    bail!("no attach mode works on this kernel: {}", fallbacks.join("; "))
}

/// The ENQUEUED table mapped read-only into this process, for
/// `Session::enqueued_by_listener`.
fn map_enqueued(ebpf: &Ebpf) -> Result<memmap2::Mmap> {
    let m = ebpf.map(names::ENQUEUED).context("ENQUEUED map")?;
    let aya::maps::Map::Array(data) = m else { bail!("the ENQUEUED map is not an array") };
    let len = ENQUEUED_SETS as usize * std::mem::size_of::<EnqueuedSet>();
    // SAFETY: an array map created BPF_F_MMAPABLE, `len` bytes long, mapped read-only;
    // its slots are only copied out with volatile reads, since the kernel's programs
    // write them meanwhile.
    unsafe { memmap2::MmapOptions::new().len(len).map(data.fd().as_fd().as_raw_fd()) }
        .context("mapping the ENQUEUED table into memory (BPF_F_MMAPABLE arrays need Linux 5.5)")
}

/// Makes every heap block of 128 KiB or more a mapping of its own, for the rest of
/// the run. glibc's default threshold rises to the largest block freed so far, so
/// after the first BTF parse freed its tables the next parse's grew inside the heap,
/// where a growing Vec is copied beside its old self and the space freed stays
/// resident; as mappings, a Vec grows by mremap and a freed one leaves at once.
/// Start-up peak RSS on 6.18 (5.5 MB of BTF): 29.2 → 24.7 MB. After start-up such
/// blocks are rare (a map read over many listeners), and a mapping each is cheap.
fn large_blocks_from_mmap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's policy for later allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Hands the heap that start-up freed back to the kernel. Parsing BTF and loading
/// the object peak at tens of MB that are garbage once the programs are attached;
/// glibc keeps freed memory below its trim threshold resident for reuse, which a
/// tracer that runs for days never needs. The same holds after a burst of closed
/// listeners is merged away.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The listener registry runs in every mode: socket state changes. Each mode adds
/// where listen()'s backlog comes from.
fn attach_listeners(ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
    let p: &mut BtfTracePoint = ebpf.program_mut(programs::SET_STATE).context(programs::SET_STATE)?.try_into()?;
    p.load("inet_sock_set_state", btf).context("loading tp_btf/inet_sock_set_state")?;
    p.attach().context("attaching tp_btf/inet_sock_set_state").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's names against the embedded object: aya-ebpf names each program
    /// after its function and each map after its `#[map(name)]`, neither of which
    /// can use backlog-common's constants, so this is where a drift shows.
    #[test]
    fn the_object_has_exactly_the_programs_and_maps_common_names() {
        let obj = aya_obj::Object::parse(OBJECT).expect("parsing the embedded eBPF object");
        let mut in_object: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        in_object.sort_unstable();
        let mut named = programs::ALL.to_vec();
        named.sort_unstable();
        assert_eq!(in_object, named, "programs in the object vs backlog_common::programs::ALL");
        // OFFSETS and CONFIG are globals in .rodata, not maps.
        for map in [
            names::EVENTS,
            names::STATS,
            names::GLOBAL,
            names::WAIT_HIST,
            names::ENQUEUED,
            names::ACCEPTORS,
            names::PEERS,
        ] {
            assert!(obj.maps.contains_key(map), "the object has no map {map}");
        }
    }
}
