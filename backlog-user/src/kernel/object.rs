//! The embedded eBPF object, adjusted to the running kernel before it is loaded.
//!
//! STATS and WAIT_HIST are declared without preallocation (`BPF_F_NO_PREALLOC`:
//! nothing is paid per possible listener at start, nothing is evicted).
//!
//! STATS is preallocated anyway, sized to a memory budget: an insert into a map
//! allocated on use can fail when a burst of new listeners outruns the kernel's
//! per-CPU allocation caches (52 of 20,000 listeners lost their counts that way
//! here), and STATS holds the counts. WAIT_HIST, where a failed insert only leaves a
//! wait out of a histogram (counted, `hist_full`), stays allocated on use where the
//! kernel allows it: before the BPF memory allocator (`struct bpf_mem_alloc`, Linux
//! 6.1) run-time allocation in tracing programs draws a kernel warning, and
//! PREEMPT_RT kernels refuse it. aya 0.14's loader sets no map flags, so they are
//! patched in the object's legacy `maps` section (`bpf_map_def`: type, key_size,
//! value_size, max_entries, map_flags, ...).
use std::borrow::Cow;

use anyhow::{anyhow, Context, Result};
use backlog_common::{
    names, Acceptor, ListenerStats, ACCEPTORS_MAX_ENTRIES, HIST_MAX_ENTRIES, PEERS_MAX_ENTRIES, STATS_MAX_ENTRIES,
};
use object::{Object, ObjectSection, ObjectSymbol};

/// Byte offset of `map_flags` in `struct bpf_map_def`.
const MAP_FLAGS_OFFSET: u64 = 16;

/// Kernel memory each preallocated map may take for its per-CPU values.
const PREALLOC_BUDGET_BYTES: u64 = 16 << 20;

/// A map allocated on use, and how this kernel gets it.
pub struct Sizing {
    pub name: &'static str,
    pub prealloc: bool,
    pub max_entries: u32,
}

/// How the maps allocated on use are created on this kernel.
pub fn sizings(run_time_alloc_safe: bool, cpus: usize) -> [Sizing; 4] {
    let size = |name, max: u32, value_bytes: usize, on_use: bool| {
        if on_use {
            return Sizing { name, prealloc: false, max_entries: max };
        }
        let per_entry = value_bytes as u64 * cpus.max(1) as u64;
        let fit = (PREALLOC_BUDGET_BYTES / per_entry).clamp(1024, max as u64) as u32;
        Sizing { name, prealloc: true, max_entries: fit }
    };
    [
        size(names::STATS, STATS_MAX_ENTRIES, std::mem::size_of::<ListenerStats>(), false),
        size(names::WAIT_HIST, HIST_MAX_ENTRIES, std::mem::size_of::<u64>(), run_time_alloc_safe),
        // Like WAIT_HIST: a failed insert only leaves a process out of "accepted by".
        size(names::ACCEPTORS, ACCEPTORS_MAX_ENTRIES, std::mem::size_of::<Acceptor>(), run_time_alloc_safe),
        // Likewise: a failed insert only leaves a peer out (`peers_full`).
        size(names::PEERS, PEERS_MAX_ENTRIES, std::mem::size_of::<u64>(), run_time_alloc_safe),
    ]
}

/// `obj` as this kernel should load it.
pub fn adjusted<'a>(obj: &'a [u8], sizings: &[Sizing]) -> Result<Cow<'a, [u8]>> {
    let mut out = Cow::Borrowed(obj);
    for s in sizings.iter().filter(|s| s.prealloc) {
        let at = map_flags_offset(obj, s.name)?;
        out.to_mut()[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    }
    Ok(out)
}

/// File offset of map `name`'s `map_flags`.
fn map_flags_offset(obj: &[u8], name: &str) -> Result<usize> {
    let file = object::File::parse(obj).context("parsing the embedded eBPF object")?;
    let sym =
        file.symbols().find(|s| s.name() == Ok(name)).ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    let index = sym.section_index().ok_or_else(|| anyhow!("map {name} has no section"))?;
    let section = file.section_by_index(index).with_context(|| format!("the section of map {name}"))?;
    let (start, _) = section.file_range().ok_or_else(|| anyhow!("map {name}'s section has no data"))?;
    Ok((start + sym.address() - section.address() + MAP_FLAGS_OFFSET) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(obj: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(obj[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn flags_are_found_and_cleared_in_the_embedded_object() {
        let obj = super::super::OBJECT;
        // The four u32 before map_flags: type (BPF_MAP_TYPE_PERCPU_HASH = 5), key,
        // value, max_entries.
        for (name, value, max) in [
            (names::STATS, std::mem::size_of::<ListenerStats>(), STATS_MAX_ENTRIES),
            (names::WAIT_HIST, 8, HIST_MAX_ENTRIES),
        ] {
            let at = map_flags_offset(obj, name).unwrap();
            assert_eq!(word(obj, at), 1, "{name} is declared BPF_F_NO_PREALLOC");
            assert_eq!((word(obj, at - 16), word(obj, at - 8), word(obj, at - 4)), (5, value as u32, max), "{name}");
        }
        let patched = adjusted(obj, &sizings(false, 2)).unwrap();
        for name in [names::STATS, names::WAIT_HIST] {
            assert_eq!(word(&patched, map_flags_offset(obj, name).unwrap()), 0, "{name}");
        }
        let on_use = adjusted(obj, &sizings(true, 2)).unwrap();
        assert_eq!(word(&on_use, map_flags_offset(obj, names::STATS).unwrap()), 0, "STATS is always preallocated");
        assert_eq!(word(&on_use, map_flags_offset(obj, names::WAIT_HIST).unwrap()), 1);
    }

    #[test]
    fn preallocated_maps_fit_the_budget() {
        let [stats, hist, _, peers] = sizings(false, 2);
        assert!(stats.prealloc && hist.prealloc && peers.prealloc && peers.max_entries == PEERS_MAX_ENTRIES);
        assert_eq!(stats.max_entries, STATS_MAX_ENTRIES);
        let [big, _, _, _] = sizings(false, 4096);
        assert!(big.max_entries < STATS_MAX_ENTRIES && big.max_entries >= 1024);
        let [stats, hist, acceptors, peers] = sizings(true, 4096);
        assert!(!acceptors.prealloc && !peers.prealloc);
        assert!(stats.prealloc && !hist.prealloc && hist.max_entries == HIST_MAX_ENTRIES);
    }
}
