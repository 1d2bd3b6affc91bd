//! The kernel's own listen-drop counters, per network namespace: TcpExt ListenDrops,
//! ListenOverflows and TCPReqQFullDrop, and every listening socket's drop counter
//! (sock_diag SK_MEMINFO_DROPS). The live session reconciles its detections with
//! them (`session::reconcile`).
//!
//! Entering namespaces and parsing /proc happen on one helper thread, never on the
//! event loop: the loop asks for a reading after a sync and picks it up at the next.
//! Cost per reading: one /proc/net/netstat read (~30 µs) and one sock_diag dump of
//! the listeners (~20 µs plus ~1 µs a listener) per namespace, plus one pass over
//! /proc/*/ns/net (a stat per process) to find namespaces that came or went.
//!
//! Each namespace is held by its open netstat file and sock_diag socket, which keep
//! the kernel's `struct net` alive: a namespace whose last process exits is read one
//! last time (its final counts) at the next reading and then released.
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::diag::{Diag, SockEntry};
use super::netns::{self, NetnsInfo};
use super::netstat::Netstat;

/// The namespace-wide listen counters (cumulative since the namespace was created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tcp {
    pub listen_drops: u64,
    pub listen_overflows: u64,
    pub reqq_full_drop: u64,
}

impl Tcp {
    pub fn since(&self, base: &Tcp) -> Tcp {
        Tcp {
            listen_drops: self.listen_drops.saturating_sub(base.listen_drops),
            listen_overflows: self.listen_overflows.saturating_sub(base.listen_overflows),
            reqq_full_drop: self.reqq_full_drop.saturating_sub(base.reqq_full_drop),
        }
    }
}

/// Where a namespace's reconciliation starts counting from.
///
/// A namespace found after start is counted from its first reading, not from 0:
/// nothing tells reliably that it did not exist at start (held then by a descriptor
/// or a mount elsewhere), and counting its earlier drops would report drops from
/// before the session as missed. Namespace cookies and ids (SO_NETNS_COOKIE,
/// NS_GET_ID) do not order creation: the kernel hands them out in per-CPU batches
/// of 4096 (6.18: namespaces created alternately on two CPUs got 434, 4573, 435,
/// 4574). Namespaces are looked for every second, so what goes unreconciled is at
/// most the drops the kernel side missed in a namespace's first second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read before the programs attached: every drop since then is the session's.
    Start,
    /// Found later: reconciled from its first reading on.
    FirstSeen,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Start => "start",
            Origin::FirstSeen => "first_seen",
        }
    }

    pub fn from_name(name: &str) -> Option<Origin> {
        [Origin::Start, Origin::FirstSeen].into_iter().find(|o| o.name() == name)
    }
}

/// One namespace at one reading.
#[derive(Clone, Debug, PartialEq)]
pub struct NsReading {
    pub inode: u32,
    pub name: Option<String>,
    pub tcp: Tcp,
    /// Every listening socket: address, port, queue length and limit, socket inode
    /// and its own drop counter (SK_MEMINFO_DROPS). Reconciliation reads the
    /// counters; the live session shows every listener from it, as `ss -lnt` would.
    pub listeners: Vec<SockEntry>,
    /// Set on a namespace's first reading: what its baseline is.
    pub first: Option<Origin>,
    /// The namespace is no longer in use (no process, no name): this is its final
    /// reading and it has been released.
    pub last: bool,
}

impl NsReading {
    /// (socket inode, SK_MEMINFO_DROPS) of every listening socket.
    pub fn sockets(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.listeners.iter().map(|e| (u64::from(e.inode), e.drops.unwrap_or(0)))
    }
}

/// Every namespace in scope at one moment, and those that could not be read.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub namespaces: Vec<NsReading>,
    /// Namespaces in scope that could not be entered or read, with why.
    pub unreadable: Vec<(u32, String)>,
}

/// Which namespaces to read.
#[derive(Clone, Debug)]
pub enum Scope {
    All,
    Only(Vec<u32>),
}

struct Held {
    info: NetnsInfo,
    netstat: Netstat,
    diag: Diag,
}

/// The helper thread's state: every namespace in scope, held open.
struct Reader {
    scope: Scope,
    current: u32,
    held: BTreeMap<u32, Held>,
}

fn read_tcp(netstat: &mut Netstat) -> io::Result<Tcp> {
    let c = netstat.read()?;
    Ok(Tcp {
        listen_drops: c["ListenDrops"],
        listen_overflows: c["ListenOverflows"],
        reqq_full_drop: c["TCPReqQFullDrop"],
    })
}

fn read_held(h: &mut Held) -> io::Result<NsReading> {
    let tcp = read_tcp(&mut h.netstat)?;
    let listeners = h.diag.listeners()?;
    Ok(NsReading { inode: h.info.inode, name: h.info.name.clone(), tcp, listeners, first: None, last: false })
}

impl Reader {
    fn wanted(&self, inode: u32) -> bool {
        match &self.scope {
            Scope::All => true,
            Scope::Only(list) => list.contains(&inode),
        }
    }

    /// Reads every held namespace, then looks for namespaces that came or went.
    /// `origin` is the baseline of the namespaces this pass finds.
    fn pass(&mut self, origin: Origin) -> io::Result<Reading> {
        let mut out = Reading::default();
        for h in self.held.values_mut() {
            match read_held(h) {
                Ok(r) => out.namespaces.push(r),
                Err(e) => out.unreadable.push((h.info.inode, format!("reading its counters failed: {e}"))),
            }
        }
        let all = netns::enumerate()?;
        let present: BTreeSet<u32> = all.namespaces.iter().map(|n| n.inode).collect();
        // Gone: this pass's reading was its last; release the kernel's namespace.
        let gone: Vec<u32> = self.held.keys().filter(|i| !present.contains(i)).copied().collect();
        for inode in gone {
            self.held.remove(&inode);
            if let Some(r) = out.namespaces.iter_mut().find(|r| r.inode == inode) {
                r.last = true;
            }
        }
        for info in all.namespaces {
            if !self.wanted(info.inode) || self.held.contains_key(&info.inode) {
                continue;
            }
            let inode = info.inode;
            let opened = netns::run_in(&info, self.current, || Ok((Netstat::open()?, Diag::open()?)));
            let (netstat, diag) = match opened {
                Ok(v) => v,
                Err(e) => {
                    out.unreadable.push((inode, format!("could not enter it: {e}")));
                    continue;
                }
            };
            let mut h = Held { info, netstat, diag };
            match read_held(&mut h) {
                Ok(mut r) => {
                    r.first = Some(origin);
                    out.namespaces.push(r);
                    self.held.insert(inode, h);
                }
                Err(e) => out.unreadable.push((inode, format!("reading its counters failed: {e}"))),
            }
        }
        Ok(out)
    }
}

/// Lets this process hold a file per namespace and socket on hosts with many
/// namespaces: the soft limit on open files goes up to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; failure leaves the old limit, which is only less room.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The helper thread, asked for readings by the live session.
pub struct Counters {
    ask: SyncSender<()>,
    answers: Receiver<io::Result<Reading>>,
    /// A reading was asked for and not yet picked up.
    outstanding: bool,
}

/// How long the end of a session waits for a reading before giving up on it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

impl Counters {
    /// Reads every namespace in scope now (the baseline, taken before the programs
    /// attach) and starts the helper thread.
    pub fn start(scope: Scope) -> Result<(Counters, Reading)> {
        raise_fd_limit();
        let current = netns::current().context("cannot read /proc/self/ns/net (is /proc mounted?)")?;
        if let Scope::Only(list) = &scope {
            let all = netns::enumerate().context("cannot list /proc (is /proc mounted?)")?;
            if let Some(missing) = list.iter().find(|w| !all.namespaces.iter().any(|n| n.inode == **w)) {
                anyhow::bail!(
                    "network namespace {missing} is not in use by any process nor named in /run/netns (check `ip netns list`)"
                );
            }
        }
        let mut reader = Reader { scope, current, held: BTreeMap::new() };
        let baseline = reader.pass(Origin::Start).context("reading the network namespaces' counters at start")?;
        let (ask, asked) = mpsc::sync_channel::<()>(1);
        let (answer, answers) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("bt-counters".into())
            .spawn(move || {
                while asked.recv().is_ok() {
                    let reading = reader.pass(Origin::FirstSeen);
                    if answer.send(reading).is_err() {
                        break;
                    }
                }
            })
            .context("starting the namespace counter thread")?;
        Ok((Counters { ask, answers, outstanding: false }, baseline))
    }

    /// Asks for a reading unless one is outstanding; true when asked. Never blocks.
    pub fn ask(&mut self) -> bool {
        if self.outstanding {
            return false;
        }
        self.outstanding = self.ask.try_send(()).is_ok();
        self.outstanding
    }

    /// The reading asked for, if it is ready. Never blocks.
    pub fn take(&mut self) -> Option<Result<Reading>> {
        if !self.outstanding {
            return None;
        }
        match self.answers.try_recv() {
            Ok(r) => {
                self.outstanding = false;
                Some(r.map_err(|e| anyhow!("listing network namespaces: {e}")))
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.outstanding = false;
                Some(Err(anyhow!("the namespace counter thread ended")))
            }
        }
    }

    /// Waits for the outstanding reading (bounded), if any.
    pub fn wait(&mut self) -> Option<Result<Reading>> {
        if !self.outstanding {
            return None;
        }
        self.outstanding = false;
        Some(match self.answers.recv_timeout(READ_TIMEOUT) {
            Ok(r) => r.map_err(|e| anyhow!("listing network namespaces: {e}")),
            Err(RecvTimeoutError::Timeout) => Err(anyhow!("no namespace counter reading within {READ_TIMEOUT:?}")),
            Err(RecvTimeoutError::Disconnected) => Err(anyhow!("the namespace counter thread ended")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_namespace_and_its_listener() {
        let (_l, ino) = crate::sys::own_listener();
        let me = netns::current().unwrap();
        let (mut c, base) = Counters::start(Scope::Only(vec![me])).unwrap();
        let own = base.namespaces.iter().find(|n| n.inode == me).expect("own namespace read");
        assert_eq!(own.first, Some(Origin::Start));
        assert!(own.sockets().any(|(i, d)| i == ino && d == 0), "{own:?}");
        let mine = own.listeners.iter().find(|e| u64::from(e.inode) == ino).expect("own listener listed");
        assert!(mine.wqueue > 0 && mine.port != 0, "{mine:?}");
        assert!(c.ask());
        assert!(!c.ask(), "one reading at a time");
        let next = c.wait().unwrap().unwrap();
        let again = next.namespaces.iter().find(|n| n.inode == me).unwrap();
        assert_eq!((again.first, again.last), (None, false));
        assert!(again.tcp.listen_drops >= own.tcp.listen_drops);
        assert!(c.take().is_none());
    }
}
