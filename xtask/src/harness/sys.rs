//! The few libc calls std does not wrap. std already links libc, so declaring them
//! here spares xtask a dependency for five functions.
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const AF_INET: i32 = 2;
const SOCK_RAW: i32 = 3;
const IPPROTO_RAW: i32 = 255;
const SC_CLK_TCK: i32 = 2;
const SOL_SOCKET: i32 = 1;
const SO_LINGER: i32 = 13;

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// struct linger: SO_LINGER's value.
#[repr(C)]
struct Linger {
    onoff: i32,
    secs: i32,
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn sendto(fd: i32, buf: *const u8, len: usize, flags: i32, addr: *const SockaddrIn, addrlen: u32) -> isize;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn sysconf(name: i32) -> i64;
    fn geteuid() -> u32;
    fn getrusage(who: i32, usage: *mut [i64; 18]) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const Linger, len: u32) -> i32;
}

const RUSAGE_CHILDREN: i32 = -1;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C sets a flag instead of killing us, so the bench can stop nginx and delete
/// its namespaces on the way out (the children get the same SIGINT and exit).
pub fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { signal(SIGINT, on_sigint) };
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
    send(pid, SIGTERM);
}

pub fn send(pid: u32, sig: i32) {
    // SAFETY: plain syscall; a stale pid only yields ESRCH.
    unsafe { kill(pid as i32, sig) };
}

pub fn is_root() -> bool {
    // SAFETY: plain syscall, no arguments.
    unsafe { geteuid() == 0 }
}

/// User + system CPU of every child this process has waited for, so far.
pub fn children_cpu() -> Duration {
    let mut ru = [0i64; 18];
    // SAFETY: struct rusage is 144 bytes on 64-bit Linux; ru_utime and ru_stime (two
    // struct timeval) come first.
    if unsafe { getrusage(RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |s: i64, us: i64| Duration::from_secs(s as u64) + Duration::from_micros(us as u64);
    tv(ru[0], ru[1]) + tv(ru[2], ru[3])
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
    let t = unsafe { sysconf(SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Changes a listening socket's backlog (listen() again only updates it).
pub fn set_backlog(fd: RawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: valid fd owned by the caller.
    if unsafe { listen(fd, backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SO_LINGER with a zero timeout: close() then resets the connection instead of
/// leaving it in TIME_WAIT, so a loop of connections does not run out of ports.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let l = Linger { onoff: 1, secs: 0 };
    // SAFETY: valid fd owned by the caller; `l` lives for the call and its size is passed.
    if unsafe { setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, std::mem::size_of::<Linger>() as u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An IPv4 raw socket that sends whole packets, IP header included.
pub struct RawSocket(OwnedFd);

impl RawSocket {
    pub fn new() -> io::Result<RawSocket> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { socket(AF_INET, SOCK_RAW, IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket() and is ours.
        Ok(RawSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn send(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let sa = SockaddrIn { family: AF_INET as u16, port_be: 0, addr: dst.octets(), zero: [0; 8] };
        // SAFETY: buffer and address are valid for the stated lengths.
        let n = unsafe {
            sendto(self.0.as_raw_fd(), packet.as_ptr(), packet.len(), 0, &sa, std::mem::size_of::<SockaddrIn>() as u32)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
