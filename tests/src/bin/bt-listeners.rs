//! Test workload: listeners by the thousand, on ports the kernel picks (bind to port 0).
//!
//! bt-listeners --mode many|churn --count N [--addr IP] [--ready-file PATH] [--lifetime SECS]
//!
//! many: N listeners with listen(0), each left with one accepted connection, one
//! connection on its accept queue (the queue's only slot) and one client whose SYN the
//! full queue drops (and keeps dropping as the client retransmits). Writes the ready
//! file (`listening N`) and holds everything until killed.
//!
//! churn: N times in a row, a listener accepts one connection and everything closes
//! (the client with a RST, so that no TIME_WAIT is left behind); exits 0 when done.
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use backlog_tests::sys::{check, connect_nonblocking, raise_nofile, sockaddr, tcp_socket, write_ready_file, Flags};

/// A listener on `ip` and a port the kernel picks; returns it and the port.
fn listen_any(ip: IpAddr, backlog: i32) -> (RawFd, SocketAddr) {
    let fd = tcp_socket(&SocketAddr::new(ip, 0), 0);
    let (sa, len) = sockaddr(SocketAddr::new(ip, 0));
    // SAFETY: `sa` is a valid sockaddr of length `len`.
    check(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) }, "bind");
    // SAFETY: plain syscall.
    check(unsafe { libc::listen(fd, backlog) }, "listen");
    // SAFETY: sockaddr_storage is plain old data; getsockname fills at most `len`.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` and `len` are valid out-pointers.
    check(unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) }, "getsockname");
    // The port sits at the same offset in sockaddr_in and sockaddr_in6.
    // SAFETY: `ss` holds a sockaddr_in or sockaddr_in6, both starting family, port.
    let port = u16::from_be(unsafe { (*(&ss as *const _ as *const libc::sockaddr_in)).sin_port });
    (fd, SocketAddr::new(ip, port))
}

/// A connect that returns once the handshake is done (the server has the connection
/// queued: loopback delivers the final ACK before connect returns).
fn connect_blocking(addr: SocketAddr) -> RawFd {
    let fd = tcp_socket(&addr, 0);
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr of length `len`.
    check(unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) }, "connect");
    fd
}

fn accept(fd: RawFd) -> RawFd {
    // SAFETY: null address pointers are allowed.
    check(unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) }, "accept")
}

/// Closes with a RST: the connection leaves no TIME_WAIT socket behind.
fn close_reset(fd: RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `linger` lives for the call and its size is passed.
    check(
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        },
        "SO_LINGER",
    );
    close(fd);
}

fn close(fd: RawFd) {
    // SAFETY: we own `fd`.
    unsafe { libc::close(fd) };
}

/// One connection accepted and closed on `l` at `addr`.
fn accept_one(l: RawFd, addr: SocketAddr) {
    let client = connect_blocking(addr);
    let child = accept(l);
    close_reset(client);
    close(child);
}

fn many(ip: IpAddr, count: usize) {
    // Per listener: itself, the queued client and the dropped one.
    raise_nofile(count * 3 + 16);
    for _ in 0..count {
        let (l, addr) = listen_any(ip, 0);
        accept_one(l, addr);
        // listen(0) queues one connection; the next SYN finds the queue full. All
        // three fds stay open until the process ends.
        connect_blocking(addr);
        connect_nonblocking(addr);
    }
}

fn churn(ip: IpAddr, count: usize) {
    for _ in 0..count {
        let (l, addr) = listen_any(ip, 1);
        accept_one(l, addr);
        close(l);
    }
}

fn main() {
    let flags = Flags::from_env();
    let ip: IpAddr = flags.get("addr", IpAddr::from([127, 0, 0, 1]));
    let count: usize = flags.required("count");
    // A bounded default lifetime: a workload leaked by a crashed test still ends.
    // SAFETY: plain syscall; SIGALRM's default action terminates the process.
    unsafe { libc::alarm(flags.get("lifetime", 600)) };
    match flags.opt("mode") {
        Some("many") => {
            many(ip, count);
            write_ready_file(&flags.required::<String>("ready-file"), &format!("listening {count}\n"));
            loop {
                // SAFETY: plain syscall; returns only when a signal is handled.
                unsafe { libc::pause() };
            }
        }
        Some("churn") => churn(ip, count),
        other => panic!("--mode must be many or churn, not {other:?}"),
    }
}
