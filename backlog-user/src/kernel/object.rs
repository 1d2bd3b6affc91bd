//! The embedded eBPF object, adjusted to the running kernel before it is loaded.
//!
//! STATS is declared without preallocation (`BPF_F_NO_PREALLOC`: an idle tracer
//! pays nothing per possible listener). Kernels before the BPF memory allocator
//! (`struct bpf_mem_alloc`, Linux 6.1) consider run-time allocation in tracing
//! programs unsafe: they print a kernel warning for it, and PREEMPT_RT kernels refuse
//! the program. There the map is preallocated instead, sized to a memory budget.
//! aya 0.14's loader sets no map flags, so they are patched in the object's
//! legacy `maps` section (`bpf_map_def`: type, key_size, value_size, max_entries,
//! map_flags, ...).
use std::borrow::Cow;

use anyhow::{anyhow, Context, Result};
use backlog_common::{names, ListenerStats, STATS_MAX_ENTRIES};
use object::{Object, ObjectSection, ObjectSymbol};

/// Byte offset of `map_flags` in `struct bpf_map_def`.
const MAP_FLAGS_OFFSET: u64 = 16;

/// Kernel memory a preallocated STATS may take: its per-CPU values, times the CPUs.
const PREALLOC_BUDGET_BYTES: u64 = 32 << 20;

/// How STATS is created on this kernel.
pub struct StatsMap {
    pub prealloc: bool,
    pub max_entries: u32,
}

impl StatsMap {
    pub fn for_kernel(run_time_alloc_safe: bool, cpus: usize) -> StatsMap {
        if run_time_alloc_safe {
            return StatsMap { prealloc: false, max_entries: STATS_MAX_ENTRIES };
        }
        let per_entry = (std::mem::size_of::<ListenerStats>() as u64) * cpus.max(1) as u64;
        let fit = (PREALLOC_BUDGET_BYTES / per_entry).clamp(1024, STATS_MAX_ENTRIES as u64) as u32;
        StatsMap { prealloc: true, max_entries: fit }
    }
}

/// `obj` as this kernel should load it.
pub fn adjusted<'a>(obj: &'a [u8], stats: &StatsMap) -> Result<Cow<'a, [u8]>> {
    if !stats.prealloc {
        return Ok(Cow::Borrowed(obj));
    }
    let at = map_flags_offset(obj, names::STATS)?;
    let mut copy = obj.to_vec();
    copy[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    Ok(Cow::Owned(copy))
}

/// File offset of map `name`'s `map_flags`.
fn map_flags_offset(obj: &[u8], name: &str) -> Result<usize> {
    let file = object::File::parse(obj).context("parsing the embedded eBPF object")?;
    let sym =
        file.symbols().find(|s| s.name() == Ok(name)).ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    let section = file
        .section_by_index(sym.section_index().ok_or_else(|| anyhow!("map {name} has no section"))?)
        .context("the section of map {name}")?;
    let (start, _) = section.file_range().ok_or_else(|| anyhow!("map {name}'s section has no data"))?;
    Ok((start + sym.address() - section.address() + MAP_FLAGS_OFFSET) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_flags_are_found_and_cleared_in_the_embedded_object() {
        let obj = super::super::OBJECT;
        let at = map_flags_offset(obj, names::STATS).unwrap();
        let flags = u32::from_le_bytes(obj[at..at + 4].try_into().unwrap());
        assert_eq!(flags, 1, "STATS is declared BPF_F_NO_PREALLOC");
        // The four u32 before it: type (BPF_MAP_TYPE_PERCPU_HASH = 5), key, value, entries.
        let word = |i: usize| u32::from_le_bytes(obj[at - 16 + 4 * i..at - 12 + 4 * i].try_into().unwrap());
        assert_eq!(word(0), 5);
        assert_eq!(word(2), std::mem::size_of::<ListenerStats>() as u32);
        assert_eq!(word(3), STATS_MAX_ENTRIES);
        let patched = adjusted(obj, &StatsMap::for_kernel(false, 2)).unwrap();
        assert_eq!(u32::from_le_bytes(patched[at..at + 4].try_into().unwrap()), 0);
        assert!(matches!(adjusted(obj, &StatsMap::for_kernel(true, 2)).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn a_preallocated_map_fits_the_budget() {
        assert_eq!(StatsMap::for_kernel(false, 2).max_entries, STATS_MAX_ENTRIES);
        let big = StatsMap::for_kernel(false, 256);
        assert!(big.prealloc && big.max_entries < STATS_MAX_ENTRIES && big.max_entries >= 1024);
    }
}
