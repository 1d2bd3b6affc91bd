//! The kernel's own counters (TcpExt per namespace) against the drops detected at
//! the listeners: what `session::reconcile` computes and every output shows.
use std::collections::BTreeMap;

/// One network namespace's drops as the kernel counted them (TcpExt deltas since
/// its baseline) against the drops detected at its listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsCounts {
    pub name: Option<String>,
    /// Where counting starts: "start" (read before the programs attached) or
    /// "first_seen" (found later: from its first reading).
    pub baseline: &'static str,
    /// TcpExt ListenDrops, ListenOverflows, TCPReqQFullDrop since the baseline, as
    /// of the latest reading.
    pub listen_drops: u64,
    pub listen_overflows: u64,
    pub reqq_full_drop: u64,
    /// Drops detected at the namespace's listeners over the same span.
    pub detected: u64,
    /// Drops the kernel counted and the kernel side did not detect (placed at a
    /// listener or not). Only ever grows.
    pub undetected: u64,
    /// The part of `undetected` no listener's own counter could be charged with.
    pub unplaced: u64,
    /// The namespace is gone; these are its final counts.
    pub gone: bool,
}

/// Gone namespaces summed, once they are too many to keep one by one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub namespaces: u64,
    pub listen_drops: u64,
    pub detected: u64,
    pub undetected: u64,
}

/// How the kernel side's counts compare with the kernel's own counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Namespaces read, by inode.
    pub namespaces: BTreeMap<u32, NetnsCounts>,
    pub folded: Folded,
    /// Namespaces with detected drops whose counters could not be read, and why
    /// (no process in them and no /run/netns name, or entering them failed).
    pub unreconciled: BTreeMap<u32, String>,
}

impl Reconciled {
    /// Undetected drops over the namespaces `netns` selects (all when empty).
    pub fn undetected(&self, netns: &[u32]) -> u64 {
        let kept: u64 = self.selected(netns).map(|(_, n)| n.undetected).sum();
        kept + if netns.is_empty() { self.folded.undetected } else { 0 }
    }

    pub fn selected<'a>(&'a self, netns: &'a [u32]) -> impl Iterator<Item = (&'a u32, &'a NetnsCounts)> + 'a {
        self.namespaces.iter().filter(move |(i, _)| netns.is_empty() || netns.contains(i))
    }
}
