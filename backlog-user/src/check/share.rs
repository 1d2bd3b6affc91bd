//! Whose are the namespace's ListenDrops: the sockets' own drop counters, read
//! without eBPF, turned into each listener's share of the kernel's count.
//!
//! A listening socket's drop counter (SK_MEMINFO_DROPS, `ss -tlnm`'s `d`) is not a
//! count of listen drops: a final-ACK overflow at a pending request moves it by 2
//! (the listen drop, then the segment's discard in tcp_v4_rcv), a SYN dropped at the
//! listener or a SYN-cookie ACK that overflows moves it by 1, and a few other
//! discards (socket filter, MD5, a full socket backlog) by 1 without a listen drop.
//! So the counters are not scaled by a guessed factor; what they prove is used:
//! every listen drop moves its listener's counter at least once, so when every
//! listener of the namespace was watched over the whole window, the counters exceed
//! ListenDrops by E = Σ rises − ListenDrops, and a listener with rise D had between
//! D − E and D of the listen drops (fewer where the others' lower bounds leave less).
//! One dropping listener thus gets exactly ListenDrops; several get exact shares or
//! honest bounds.
use serde::Serialize;

/// A listener's (or SO_REUSEPORT group's) share of its namespace's ListenDrops
/// over the window: exact when `min == max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Share {
    pub min: u64,
    pub max: u64,
}

impl Share {
    pub fn is_exact(self) -> bool {
        self.min == self.max
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_exact() {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

/// A namespace's listen drops against its sockets' drop counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NsDrops {
    /// TcpExt ListenDrops over the window.
    pub listen_drops: u64,
    /// Sum of the watched sockets' drop-counter rises; None when the kernel reports
    /// no socket counters.
    pub socket_drops: Option<u64>,
    /// `socket_drops - listen_drops` when every listener was watched: what the
    /// socket counters count beyond listen drops (a final-ACK overflow at a pending
    /// request twice, other discards once).
    pub socket_excess: Option<u64>,
    /// Every listener of the namespace was watched over the whole window (no
    /// --port, none opened or closed): only then are the shares' lower bounds known.
    pub all_listeners_seen: bool,
}

/// Each listener's share of `listen_drops`, given its socket counter's rise
/// (None: not reported), and the namespace's totals.
pub fn apportion(listen_drops: u64, rises: &[Option<u64>], all_seen: bool) -> (Vec<Share>, NsDrops) {
    let total: Option<u64> = rises.iter().copied().sum();
    let mut ns = NsDrops { listen_drops, socket_drops: total, socket_excess: None, all_listeners_seen: all_seen };
    let cap = |d: Option<u64>| d.map_or(listen_drops, |d| d.min(listen_drops));
    let Some(excess) = total.filter(|_| all_seen).and_then(|t| t.checked_sub(listen_drops)) else {
        // Listen drops may sit at listeners not watched (or counters were not
        // reported, or moved less than ListenDrops): only upper bounds hold.
        return (rises.iter().map(|&d| Share { min: 0, max: cap(d) }).collect(), ns);
    };
    ns.socket_excess = Some(excess);
    let lows: Vec<u64> = rises.iter().map(|d| d.unwrap_or(0).saturating_sub(excess)).collect();
    let low_sum: u64 = lows.iter().sum();
    let shares = rises
        .iter()
        .zip(&lows)
        .map(|(&d, &min)| {
            // What the others' lower bounds leave of ListenDrops.
            let left = listen_drops.saturating_sub(low_sum - min);
            Share { min, max: cap(d).min(left).max(min) }
        })
        .collect();
    (shares, ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(ld: u64, rises: &[u64], all: bool) -> Vec<(u64, u64)> {
        let r: Vec<Option<u64>> = rises.iter().map(|&d| Some(d)).collect();
        apportion(ld, &r, all).0.iter().map(|s| (s.min, s.max)).collect()
    }

    #[test]
    fn one_dropping_listener_gets_exactly_listen_drops() {
        // 179 listen drops, 48 of them final-ACK overflows at pending requests.
        let (s, ns) = apportion(179, &[Some(227), Some(0)], true);
        assert_eq!(s, [Share { min: 179, max: 179 }, Share { min: 0, max: 0 }]);
        assert_eq!((ns.socket_drops, ns.socket_excess), (Some(227), Some(48)));
        assert_eq!(s[0].to_string(), "179");
    }

    #[test]
    fn several_get_exact_shares_or_bounds() {
        // No excess: every counter rise is a listen drop.
        assert_eq!(shares(10, &[4, 6], true), [(4, 4), (6, 6)]);
        // Excess 3: somewhere 3 counts beyond listen drops.
        assert_eq!(shares(10, &[5, 8], true), [(2, 5), (5, 8)]);
        // The sum of the bounds always brackets ListenDrops.
        let s = shares(10, &[5, 8], true);
        assert!(s.iter().map(|x| x.0).sum::<u64>() <= 10 && s.iter().map(|x| x.1).sum::<u64>() >= 10);
    }

    #[test]
    fn unseen_listeners_leave_only_upper_bounds() {
        assert_eq!(shares(10, &[4, 2], false), [(0, 4), (0, 2)]);
        // Counters moved less than ListenDrops: some drops were elsewhere.
        let (s, ns) = apportion(10, &[Some(4)], true);
        assert_eq!((s[0].min, s[0].max, ns.socket_excess), (0, 4, None));
        let (s, ns) = apportion(10, &[None, Some(30)], true);
        assert_eq!((s[0], s[1], ns.socket_drops), (Share { min: 0, max: 10 }, Share { min: 0, max: 10 }, None));
        assert_eq!(apportion(0, &[], true).0, []);
    }
}
