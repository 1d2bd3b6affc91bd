//! Drop throughput: raw SYNs, as fast as this machine sends them, from one namespace
//! over a veth pair at a listener in another whose accept queue is full and that
//! never accepts. The kernel refuses each SYN before creating any state for it, so
//! every SYN is exactly one listen drop (ListenOverflows and ListenDrops).
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use backlog_user::sys::netns;

use crate::harness::netns::{veth_pair, Netns, VethPair};
use crate::harness::probe::Probe;
use crate::harness::sys::{self, RawSocket};

const PORT: u16 = 9000;
/// Upper bound on packets per generator thread and second, far above what a core
/// can send: it only keeps the loop bounded in count as well as in time.
const MAX_PPS: u64 = 20_000_000;
/// How often the probe's resident size is sampled during a flood.
const RSS_EVERY: Duration = Duration::from_millis(250);
/// Time for the receive backlog to drain after the last send, before counting.
const DRAIN: Duration = Duration::from_millis(200);
/// A spoofed-source flood's addresses: 198.18.0.0/15, the range RFC 2544 sets aside
/// for benchmarks. The listener refuses each SYN before answering it, so nothing
/// is ever sent to them.
const SPOOF_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
pub const SPOOF_MAX: u32 = 1 << 17;

pub struct Flood {
    client: Netns,
    server: Netns,
    /// The veth pair's addresses: SYNs go from the client's to the server's.
    addrs: VethPair,
    /// Kept open for the flood's lifetime: the listener, and the connections that
    /// fill its accept queue.
    _listener: TcpListener,
    _held: Vec<TcpStream>,
    threads: usize,
    duration: Duration,
}

pub struct Outcome {
    pub secs: f64,
    pub listen_drops: u64,
    pub sent: u64,
    /// Sends refused by the stack (ENOBUFS when the receive backlog is full).
    pub refused: u64,
    /// What the probe, when there was one, cost during the flood.
    pub cost: Option<Cost>,
}

pub struct Cost {
    /// Share of one CPU.
    pub cpu_pct: f64,
    pub wakeups_per_sec: f64,
    /// The largest resident size sampled during the flood.
    pub rss_kb: u64,
    /// Since the probe started, start-up included.
    pub peak_rss_kb: u64,
}

impl Outcome {
    pub fn drops_per_sec(&self) -> f64 {
        self.listen_drops as f64 / self.secs
    }
}

impl Flood {
    pub fn setup(threads: usize, duration: Duration) -> Result<Flood> {
        let (client, server) = (Netns::create("btbench-c"), Netns::create("btbench-s"));
        let addrs = veth_pair(&server, &client);
        let server_addr = addrs.server_addr;
        let listener = server.inside(move || -> Result<TcpListener> {
            let l = TcpListener::bind((server_addr, PORT))?;
            // The smallest queue: two connections fill it.
            sys::set_backlog(l.as_raw_fd(), 1)?;
            Ok(l)
        })?;
        let held = client.inside(move || fill(server_addr))?;
        Ok(Flood { client, server, addrs, _listener: listener, _held: held, threads, duration })
    }

    /// The listener's namespace, for `backlog-trace --netns`.
    pub fn server_netns(&self) -> &str {
        self.server.name()
    }

    /// One flood from the client's own address; with `probe` (already attached),
    /// also what it cost.
    pub fn run(&self, probe: Option<&Probe>) -> Result<Outcome> {
        self.run_from(probe, 1)
    }

    /// One flood whose SYNs come from `sources` addresses in turn (1: the client's
    /// own; more: spoofed, at most `SPOOF_MAX`), as a real SYN flood's do: every
    /// one a peer the tracer has not seen.
    pub fn run_from(&self, probe: Option<&Probe>, sources: u32) -> Result<Outcome> {
        if sources == 0 || sources > SPOOF_MAX {
            bail!("a flood's source count must be 1..={SPOOF_MAX}, not {sources}");
        }
        let before = self.server.netstat().get("ListenDrops");
        let usage0 = probe.map(Probe::usage).transpose()?;
        let t0 = Instant::now();
        let deadline = t0 + self.duration;
        let limit = MAX_PPS * self.duration.as_secs().max(1);
        let mut workers = Vec::new();
        for i in 0..self.threads {
            let ns = File::open(self.client.path()).context("opening the flood client netns")?;
            let (threads, addrs) = (self.threads as u64, (self.addrs.client_addr, self.addrs.server_addr));
            let sender = Sender { index: i as u64, threads, sources, deadline, limit };
            workers.push(thread::spawn(move || generate(ns, addrs, sender)));
        }
        let mut rss_kb = 0;
        while !workers.iter().all(|w| w.is_finished()) {
            if let Some(p) = probe {
                rss_kb = rss_kb.max(p.usage()?.rss_kb);
            }
            thread::sleep(RSS_EVERY);
        }
        let (mut sent, mut refused) = (0, 0);
        for w in workers {
            let (s, r) = w.join().map_err(|_| anyhow!("a flood thread panicked"))??;
            sent += s;
            refused += r;
        }
        sys::check_interrupt()?;
        let secs = t0.elapsed().as_secs_f64();
        let usage1 = probe.map(Probe::usage).transpose()?;
        thread::sleep(DRAIN);
        let listen_drops = self.server.netstat().get("ListenDrops") - before;
        let cost = usage0.zip(usage1).map(|(u0, u1)| Cost {
            cpu_pct: (u1.cpu.saturating_sub(u0.cpu)).as_secs_f64() / secs * 100.0,
            wakeups_per_sec: u1.wakeups.saturating_sub(u0.wakeups) as f64 / secs,
            rss_kb: rss_kb.max(u1.rss_kb),
            peak_rss_kb: u1.peak_rss_kb,
        });
        Ok(Outcome { secs, listen_drops, sent, refused, cost })
    }
}

/// Connects until a SYN goes unanswered: the accept queue is then full.
fn fill(server: Ipv4Addr) -> Result<Vec<TcpStream>> {
    let addr = SocketAddr::from((server, PORT));
    let mut held = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut && !held.is_empty() => return Ok(held),
            Err(e) => bail!("connecting to the flood listener {addr}: {e}"),
        }
    }
    bail!("the flood listener's accept queue did not fill after 8 connections")
}

/// One sender thread's share: `index` of `threads` interleaves source ports (and
/// addresses) so no two threads send the same segment.
struct Sender {
    index: u64,
    threads: u64,
    sources: u32,
    deadline: Instant,
    limit: u64,
}

/// One sender thread: returns (sent, refused).
fn generate(ns: File, (client, server): (Ipv4Addr, Ipv4Addr), s: Sender) -> Result<(u64, u64)> {
    netns::join(&ns).context("entering the flood client netns")?;
    let sock = RawSocket::new().context("opening a raw socket")?;
    let (mut sent, mut refused) = (0u64, 0u64);
    for n in 0..s.limit {
        // Reading the clock costs more than a send's bookkeeping: look every 256.
        if n % 256 == 0 && (Instant::now() >= s.deadline || sys::interrupted()) {
            break;
        }
        let k = n * s.threads + s.index;
        let sport = 1024 + (k % 64_000) as u16;
        let src = match s.sources {
            1 => client,
            m => Ipv4Addr::from(SPOOF_BASE + (k % u64::from(m)) as u32),
        };
        let pkt = syn(src, server, sport, PORT, (n as u32).wrapping_mul(2_654_435_761));
        match sock.send(&pkt, server) {
            Ok(()) => sent += 1,
            Err(e) if e.raw_os_error() == Some(105) => refused += 1, // ENOBUFS
            Err(e) => return Err(e).context("sending a SYN"),
        }
    }
    Ok((sent, refused))
}

/// An IPv4 TCP SYN without options. The kernel fills the IP checksum and id.
fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[..12].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4; // data offset: 5 words
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let csum = tcp_checksum(src, dst, t);
    t[16..18].copy_from_slice(&csum.to_be_bytes());
    p
}

/// RFC 793 checksum over the pseudo-header and the segment.
fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> u16 {
    let mut sum: u32 = 6 + seg.len() as u32;
    for b in [src.octets(), dst.octets()] {
        sum += u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]));
    }
    for w in seg.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksum_verifies() {
        let (client, server) = (Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 1));
        let p = syn(client, server, 4242, PORT, 7);
        // Summing a segment with its checksum in place gives 0xffff, i.e. 0 complemented.
        assert_eq!(tcp_checksum(client, server, &p[20..]), 0);
        assert_eq!(p[33], 0x02);
    }
}
