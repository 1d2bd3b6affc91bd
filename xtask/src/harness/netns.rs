//! The tests' network namespaces (`ip netns`, deleted when dropped, with their
//! counters), and running a program in one.
use std::process::Command;

pub use backlog_tests::netns::{veth_pair, Netns, VethPair};

/// A command for `program` run in `netns` (None: ours). `ip netns exec` execs the
/// program in place, so the child's pid is the program's.
pub fn command(netns: Option<&Netns>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name(), program]);
            c
        }
        None => Command::new(program),
    }
}

/// One Tcp counter of `ns` from /proc/net/snmp (e.g. PassiveOpens).
pub fn tcp(ns: &Netns, key: &str) -> anyhow::Result<u64> {
    let tcp = ns.counters("/proc/net/snmp", "Tcp");
    tcp.get(key).copied().ok_or_else(|| anyhow::anyhow!("no Tcp {key} in /proc/net/snmp of netns {}", ns.name()))
}
