//! The few libc calls std does not wrap.
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use backlog_tests::sys::sockaddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use libc::{SIGINT, SIGKILL};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C sets a flag instead of killing us, so the bench can stop nginx and delete
/// its namespaces on the way out (the children get the same SIGINT and exit).
pub fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(SIGINT, on_sigint as extern "C" fn(i32) as libc::sighandler_t) };
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// An error once Ctrl-C was pressed, so `?` unwinds through the cleanup guards.
pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

pub fn interrupt(pid: u32) {
    send(pid, SIGINT);
}

pub fn terminate(pid: u32) {
    send(pid, libc::SIGTERM);
}

pub fn send(pid: u32, sig: i32) {
    // SAFETY: plain syscall; a stale pid only yields ESRCH.
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn is_root() -> bool {
    // SAFETY: plain syscall, no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// User + system CPU of every child this process has waited for, so far.
pub fn children_cpu() -> Duration {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU of one process (all its threads), from /proc/PID/stat.
pub fn process_cpu(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm: utime is field 14, stime 15.
    let f: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (field(11), field(12)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("malformed /proc/{pid}/stat")));
    };
    Ok(Duration::from_secs_f64((utime + stime) as f64 / clock_ticks_per_sec() as f64))
}

/// The parent of process `pid`, from /proc/PID/stat.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: plain libc query.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Changes a listening socket's backlog (listen() again only updates it).
pub fn set_backlog(fd: RawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: valid fd owned by the caller.
    if unsafe { libc::listen(fd, backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SO_LINGER with a zero timeout: close() then resets the connection instead of
/// leaving it in TIME_WAIT, so a loop of connections does not run out of ports.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: valid fd owned by the caller; `l` lives for the call and its size is passed.
    if unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l as *const _ as *const libc::c_void, len) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An IPv4 raw socket that sends whole packets, IP header included.
pub struct RawSocket(OwnedFd);

impl RawSocket {
    pub fn new() -> io::Result<RawSocket> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket() and is ours.
        Ok(RawSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn send(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let (sa, len) = sockaddr(SocketAddr::from((dst, 0)));
        // SAFETY: buffer and address are valid for the stated lengths.
        let n = unsafe {
            libc::sendto(self.0.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0, &sa as *const _ as *const _, len)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
