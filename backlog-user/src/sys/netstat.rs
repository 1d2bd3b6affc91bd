//! The namespace-wide TcpExt counters from /proc/net/netstat that `nstat` shows.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// The counters the check compares across the window, in display order.
pub const COUNTERS: [&str; 5] =
    ["ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent"];

pub type Counters = BTreeMap<&'static str, u64>;

/// An open /proc/<thread>/net/netstat. The file answers for the namespace it was opened
/// in, so it is opened once inside the namespace and re-read from the start each time.
pub struct Netstat(File);

impl Netstat {
    /// Opens the calling thread's view. /proc/self/net would follow the main thread's
    /// namespace, not the one a helper thread entered with setns, hence thread-self.
    pub fn open() -> io::Result<Netstat> {
        File::open("/proc/thread-self/net/netstat").map(Netstat)
    }

    pub fn read(&mut self) -> io::Result<Counters> {
        let mut text = String::new();
        self.0.seek(SeekFrom::Start(0))?;
        self.0.read_to_string(&mut text)?;
        parse(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/net/netstat has no TcpExt section"))
    }
}

/// The file is pairs of lines, "TcpExt: Name1 Name2 …" then "TcpExt: 1 2 …".
/// A counter missing on this kernel reads as 0, as nstat shows it.
fn parse(text: &str) -> Option<Counters> {
    let found = section(text, "TcpExt")?;
    Some(COUNTERS.iter().map(|&c| (c, found.get(c).copied().unwrap_or(0))).collect())
}

/// Every counter of one section of /proc/net/netstat or /proc/net/snmp ("TcpExt",
/// "Tcp", "IpExt", …): its pair of lines "Prefix: Name1 Name2 …" then "Prefix: 1 2 …".
/// None when the section is missing; a value that is not a u64 (snmp's MaxConn -1)
/// reads as 0.
pub fn section(text: &str, prefix: &str) -> Option<BTreeMap<String, u64>> {
    let mut rows = text.lines().filter_map(|l| l.strip_prefix(prefix)?.strip_prefix(':'));
    let (names, values) = (rows.next()?, rows.next()?);
    Some(
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .map(|(n, v)| (n.into(), v.parse().unwrap_or(0)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpext_pairs() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 3 0 17 19\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let c = parse(text).unwrap();
        assert_eq!(c["ListenOverflows"], 17);
        assert_eq!(c["ListenDrops"], 19);
        assert_eq!(c["SyncookiesSent"], 3);
        assert_eq!(c["TCPReqQFullDrop"], 0);
        assert_eq!(c.len(), COUNTERS.len());
        assert!(parse("IpExt: A\nIpExt: 1\n").is_none());
        assert!(parse("").is_none());
        let snmp = "Tcp: RtoAlgorithm MaxConn PassiveOpens\nTcp: 1 -1 42\nUdp: InDatagrams\nUdp: 3\n";
        let tcp = section(snmp, "Tcp").unwrap();
        assert_eq!((tcp["PassiveOpens"], tcp["MaxConn"]), (42, 0));
        assert!(section(text, "Tcp").is_none(), "TcpExt is not Tcp");
    }

    #[test]
    fn reads_own_namespace_twice() {
        let mut n = Netstat::open().unwrap();
        let a = n.read().unwrap();
        let b = n.read().unwrap();
        assert!(b["ListenDrops"] >= a["ListenDrops"]);
    }
}
