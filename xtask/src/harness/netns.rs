//! Named network namespaces (`ip netns`), deleted when dropped, and their counters.
use std::fs::File;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name`, first deleting a namespace of that name left by a killed run.
    pub fn create(name: &str) -> Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn file(&self) -> Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// One TcpExt counter of this namespace (e.g. ListenDrops).
    pub fn tcp_ext(&self, key: &str) -> Result<u64> {
        self.counter("/proc/net/netstat", "TcpExt:", key)
    }

    /// One Tcp counter of this namespace (e.g. PassiveOpens).
    pub fn tcp(&self, key: &str) -> Result<u64> {
        self.counter("/proc/net/snmp", "Tcp:", key)
    }

    fn counter(&self, file: &str, prefix: &str, key: &str) -> Result<u64> {
        let out = Command::new("ip").args(["netns", "exec", &self.name, "cat", file]).output()?;
        counter(&String::from_utf8_lossy(&out.stdout), prefix, key)
            .with_context(|| format!("no {prefix} {key} in {file} of netns {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A command for `program` run in `netns` (None: ours). `ip netns exec` execs the
/// program in place, so the child's pid is the program's.
pub fn command(netns: Option<&Netns>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, program]);
            c
        }
        None => Command::new(program),
    }
}

/// Links `a` and `b` with a veth pair and addresses each end; deleting either
/// namespace deletes the pair.
pub fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> Result<()> {
    ip(&["link", "add", "btbench-a", "netns", &a.name, "type", "veth", "peer", "name", "btbench-b", "netns", &b.name])?;
    for (ns, dev, addr) in [(a, "btbench-a", a_addr), (b, "btbench-b", b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// /proc/net/netstat and /proc/net/snmp hold pairs of lines: "TcpExt: names…" then
/// "TcpExt: values…" (and so on for each `prefix`).
fn counter(text: &str, prefix: &str, key: &str) -> Option<u64> {
    let mut rows = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (rows.next()?, rows.next()?);
    let i = names.split_whitespace().position(|n| n == key)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcp_ext_by_name() {
        let t = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 5 7\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(super::counter(t, "TcpExt:", "ListenDrops"), Some(7));
        assert_eq!(super::counter(t, "TcpExt:", "Nope"), None);
        assert_eq!(super::counter(t, "IpExt:", "InNoRoutes"), Some(0));
    }
}
