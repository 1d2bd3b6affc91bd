//! Network namespaces that clean up after themselves, veth links between them,
//! nftables rules inside them, and their TcpExt counters.
use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use backlog_user::sys::netns::run_at;
use backlog_user::sys::netstat;

use crate::workload::Spawned;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs a command to completion; panics with its stderr when it fails.
pub fn run(argv: &[&str]) -> Output {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    if !out.status.success() {
        panic!("{argv:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    out
}

/// A named network namespace (`ip netns add bt-<tag>-<pid>-<n>`), deleted on
/// drop together with every process still running inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Netns::create(&format!("bt-{tag}-{}-{n}", std::process::id()))
    }

    /// A namespace of a fixed name, first deleting one of that name a killed run left.
    pub fn create(name: &str) -> Netns {
        crate::require_root();
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(&["ip", "netns", "add", name]);
        let ns = Netns { name: name.to_string() };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that pins the namespace, to enter it by.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a helper thread that has entered this namespace; sockets it creates
    /// stay in the namespace wherever they are used afterwards.
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_at(&self.path(), || Ok(f())).unwrap_or_else(|e| panic!("inside netns {}: {e}", self.name))
    }

    /// The namespace's inode number, as the kernel (and the tracer) report it.
    pub fn inode(&self) -> u64 {
        let path = self.path();
        std::fs::metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).ino()
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace to completion; panics if it fails.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// Starts `argv` inside the namespace. `ip netns exec` execs the program
    /// in place, so the child's pid is the program's pid.
    pub fn spawn(&self, argv: &[&str]) -> Spawned {
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?} in {}: {e}", self.name));
        Spawned::new(format!("{argv:?}"), child)
    }

    pub fn sysctl(&self, key: &str, val: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={val}")]);
    }

    /// TcpExt counters of this namespace (ListenDrops, ListenOverflows,
    /// TCPReqQFullDrop, TCPReqQFullDoCookies, SyncookiesSent, ...).
    pub fn netstat(&self) -> Netstat {
        Netstat(self.counters("/proc/net/netstat", "TcpExt"))
    }

    /// Every counter of one section ("TcpExt", "Tcp", …) of `file` (/proc/net/netstat,
    /// /proc/net/snmp) in this namespace.
    pub fn counters(&self, file: &str, section: &str) -> BTreeMap<String, u64> {
        let out = self.exec(&["cat", file]);
        let text = String::from_utf8_lossy(&out.stdout);
        let map = netstat::section(&text, section).unwrap_or_default();
        assert!(!map.is_empty(), "no {section} counters in {file} of {}:\n{text}", self.name);
        map
    }

    /// Pids of every process whose network namespace is this one.
    fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", &self.name]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Every process in a namespace this harness created was started by it
        // (servers, clients, forked workers): end them so nothing outlives the test.
        for pid in self.pids() {
            // SAFETY: plain syscall on a pid from our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Addresses of a veth link between a server and a client namespace.
pub struct VethPair {
    pub server_addr: Ipv4Addr,
    pub client_addr: Ipv4Addr,
}

/// Links two namespaces with a veth pair numbered from 198.18.0.0/15 (reserved
/// for benchmarking), so test traffic never leaves the namespaces.
pub fn veth_pair(server: &Netns, client: &Netns) -> VethPair {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let (third, fourth) = ((n / 64 % 256) as u8, (n % 64 * 4) as u8);
    let server_addr = Ipv4Addr::new(198, 18, third, fourth + 1);
    let client_addr = Ipv4Addr::new(198, 18, third, fourth + 2);
    run(&[
        "ip",
        "link",
        "add",
        "bt-srv",
        "netns",
        server.name(),
        "type",
        "veth",
        "peer",
        "name",
        "bt-cli",
        "netns",
        client.name(),
    ]);
    for (ns, dev, addr) in [(server, "bt-srv", server_addr), (client, "bt-cli", client_addr)] {
        ns.exec(&["ip", "addr", "add", &format!("{addr}/30"), "dev", dev]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }
    VethPair { server_addr, client_addr }
}

/// Applies an nftables ruleset (`nft -f` syntax) inside `ns`.
pub fn nft(ns: &Netns, ruleset: &str) {
    let mut child = ns
        .command(&["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nft in {}: {e}", ns.name));
    child.stdin.take().expect("piped").write_all(ruleset.as_bytes()).expect("write ruleset to nft");
    let out = child.wait_with_output().expect("wait for nft");
    if !out.status.success() {
        panic!("nft in {} rejected:\n{ruleset}\n{}", ns.name, String::from_utf8_lossy(&out.stderr).trim());
    }
}

/// The TcpExt counters listen-queue drops move; what a [`Netstat`] displays.
pub const LISTEN_COUNTERS: [&str; 6] =
    ["ListenDrops", "ListenOverflows", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent", "SyncookiesRecv"];

/// Snapshot of the TcpExt counters of /proc/net/netstat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netstat(BTreeMap<String, u64>);

impl Netstat {
    /// /proc/net/netstat holds pairs of lines: "TcpExt: Name Name ..." then
    /// "TcpExt: value value ...".
    pub fn parse(text: &str) -> Netstat {
        let map = netstat::section(text, "TcpExt").unwrap_or_default();
        assert!(map.contains_key("ListenDrops"), "no TcpExt counters in:\n{text}");
        Netstat(map)
    }

    /// A counter's value; panics on an unknown name (a typo must not read as 0).
    pub fn get(&self, name: &str) -> u64 {
        *self.0.get(name).unwrap_or_else(|| panic!("no TcpExt counter named {name}"))
    }

    /// Counter increments from `before` to `self`.
    pub fn since(&self, before: &Netstat) -> Netstat {
        Netstat(self.0.iter().map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0))).collect())
    }
}

impl std::fmt::Display for Netstat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = LISTEN_COUNTERS.iter().map(|c| format!("{c} {}", self.get(c))).collect();
        f.write_str(&shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::Netstat;

    #[test]
    fn parses_tcpext_pairs_and_deltas() {
        let before = Netstat::parse(
            "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 2 3\n\
             IpExt: InNoRoutes\nIpExt: 9\n",
        );
        let after = Netstat::parse("TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 7 10\n");
        let d = after.since(&before);
        assert_eq!((d.get("ListenOverflows"), d.get("ListenDrops"), d.get("SyncookiesSent")), (5, 7, 0));
    }
}
