//! Test workload: listeners by the thousand.
//!
//! bt-listeners --mode many|churn --count N [--addr IP] [--first-port P] [--queued K]
//!              [--ready-file PATH] [--lifetime SECS]
//!
//! many: N listeners on ports P, P+1, ... (below the ephemeral range: the clients'
//! connections take their ports from it) with listen(K-1), each left with one accepted
//! connection, K connections on its accept queue (filling it) and one client whose SYN
//! the full queue drops (and keeps dropping as the client retransmits). K+2 fds per
//! listener: the work is split over as many forked processes as the hard fd limit
//! needs. Writes the ready file (`listening N`) once all of them are set up and holds
//! everything until killed.
//!
//! churn: N times in a row, a listener on a port the kernel picks (bind to port 0)
//! accepts one connection and everything closes (the client with a RST, so that no
//! TIME_WAIT is left behind); exits 0 when done.
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use backlog_tests::sys::{
    check, connect_nonblocking, fork_worker, nofile_hard_limit, raise_nofile, sockaddr, tcp_socket, write_ready_file,
    Flags,
};

/// A listener on `ip` and `port` (0: one the kernel picks); returns it and its address.
fn listen_on(ip: IpAddr, port: u16, backlog: i32) -> (RawFd, SocketAddr) {
    let fd = tcp_socket(&SocketAddr::new(ip, port), 0);
    let (sa, len) = sockaddr(SocketAddr::new(ip, port));
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

/// Sets up `count` listeners over forked workers; returns once all are set up.
fn many(ip: IpAddr, first_port: u16, count: usize, queued: usize) {
    // Per listener: itself, the queued clients and the dropped one; plus room for
    // raise_nofile's slack and stdio.
    let fds_per_listener = queued + 2;
    let per_process = (nofile_hard_limit().min(1 << 20) - 128) / fds_per_listener;
    let mut workers = Vec::new();
    for start in (0..count).step_by(per_process) {
        let share = per_process.min(count - start);
        let Some(pid) = fork_worker() else {
            listeners_with_drops(ip, first_port + start as u16, share, queued);
            // Stopped: the parent sees the share is ready (waitpid WUNTRACED).
            // SAFETY: plain syscalls.
            unsafe {
                libc::raise(libc::SIGSTOP);
                libc::_exit(0);
            }
        };
        workers.push(pid);
    }
    for pid in workers {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        check(unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) }, "waitpid");
        assert!(libc::WIFSTOPPED(status), "worker {pid} ended before its listeners were set up (status {status})");
    }
}

fn listeners_with_drops(ip: IpAddr, first_port: u16, count: usize, queued: usize) {
    raise_nofile(count * (queued + 2) + 16);
    for i in 0..count {
        let (l, addr) = listen_on(ip, first_port + i as u16, queued as i32 - 1);
        accept_one(l, addr);
        // listen(K-1) queues K connections; the next SYN finds the queue full. Every
        // fd stays open until the process ends.
        for _ in 0..queued {
            connect_blocking(addr);
        }
        connect_nonblocking(addr);
    }
}

fn churn(ip: IpAddr, count: usize) {
    for _ in 0..count {
        let (l, addr) = listen_on(ip, 0, 1);
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
            let first_port: u16 = flags.get("first-port", 10000);
            assert!(
                usize::from(first_port) + count <= 65536,
                "--first-port {first_port} leaves no room for {count} ports"
            );
            let queued: usize = flags.get("queued", 1);
            assert!(queued >= 1, "--queued must be at least 1");
            many(ip, first_port, count, queued);
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
