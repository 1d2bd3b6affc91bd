//! Test workload: a TCP listener whose accept behaviour the tests control.
//!
//! bt-server --port P [--addr IP] [--backlog N] [--accept none|all|delay=MS]
//!           [--fork N] [--reuseport N] [--pin] [--ready-file PATH] [--lifetime SECS]
//!
//! --fork N: listen in the parent, then fork N workers that accept (nginx-style);
//! the parent keeps the listening fds open. --reuseport N: N SO_REUSEPORT sockets
//! on the port, each with listen(backlog). --pin: worker i accepts from socket i
//! only, though every process holds every socket. The ready file, written once
//! everything listens, lists the pids of every process holding the listener(s), a
//! pinned worker's followed by the inode of its socket.
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use backlog_tests::sys::{check, fork_worker, set_sockopt, sockaddr, tcp_socket, write_ready_file, Flags};

#[derive(Clone, Copy)]
enum Accept {
    None,
    All,
    Delay(Duration),
}

fn parse_accept(s: &str) -> Accept {
    match s {
        "none" => Accept::None,
        "all" => Accept::All,
        _ => match s.strip_prefix("delay=").and_then(|ms| ms.parse().ok()) {
            Some(ms) => Accept::Delay(Duration::from_millis(ms)),
            None => panic!("--accept must be none, all or delay=MS, not '{s}'"),
        },
    }
}

/// The socket's inode, as /proc/PID/fd and the tracer name it.
fn inode(fd: RawFd) -> u64 {
    // SAFETY: all-zero is a valid stat; fstat fills it for our own descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd, &mut st) }, "fstat");
    st.st_ino
}

fn listener(addr: SocketAddr, backlog: i32, reuseport: bool) -> RawFd {
    let fd = tcp_socket(&addr, 0);
    set_sockopt(fd, libc::SO_REUSEADDR, 1, "SO_REUSEADDR");
    if reuseport {
        set_sockopt(fd, libc::SO_REUSEPORT, 1, "SO_REUSEPORT");
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr of length `len`.
    check(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) }, "bind");
    // SAFETY: plain syscall.
    check(unsafe { libc::listen(fd, backlog) }, "listen");
    fd
}

/// Accepts according to `mode` until the process is killed.
fn serve(fds: &[RawFd], mode: Accept) -> ! {
    let delay = match mode {
        // Only signals (SIGKILL from the test, SIGALRM from --lifetime) end us.
        Accept::None => loop {
            // SAFETY: plain syscall.
            unsafe { libc::pause() };
        },
        Accept::All => Duration::ZERO,
        Accept::Delay(d) => d,
    };
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        // SAFETY: `pfds` is a valid array of its length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue; // EINTR
        }
        for p in pfds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            // Non-blocking: forked workers race for the same connection.
            // SAFETY: null address pointers are allowed.
            let c = unsafe { libc::accept4(p.fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK) };
            if c >= 0 {
                // SAFETY: we own `c`.
                unsafe { libc::close(c) };
                std::thread::sleep(delay);
            }
        }
    }
}

fn main() {
    let flags = Flags::from_env();
    let ip: IpAddr = flags.get("addr", IpAddr::from([127, 0, 0, 1]));
    let addr = SocketAddr::new(ip, flags.required("port"));
    let backlog: i32 = flags.get("backlog", 8);
    let mode = parse_accept(flags.opt("accept").unwrap_or("none"));
    let workers: usize = flags.get("fork", 0);
    let reuseport: usize = flags.get("reuseport", 0);
    // A bounded default lifetime: a server leaked by a crashed test still ends.
    // SAFETY: plain syscall; SIGALRM's default action terminates the process.
    unsafe { libc::alarm(flags.get("lifetime", 600)) };

    let fds: Vec<RawFd> = (0..reuseport.max(1)).map(|_| listener(addr, backlog, reuseport > 0)).collect();
    let pin = flags.opt("pin").is_some();
    // SAFETY: plain syscall.
    let mut lines = vec![unsafe { libc::getpid() }.to_string()];
    for i in 0..workers {
        let own = fds[i % fds.len()];
        match fork_worker() {
            None if pin => serve(&[own], mode),
            None => serve(&fds, mode),
            Some(pid) if pin => lines.push(format!("{pid} {}", inode(own))),
            Some(pid) => lines.push(pid.to_string()),
        }
    }
    if let Some(path) = flags.opt("ready-file") {
        write_ready_file(path, &(lines.join("\n") + "\n"));
    }
    if workers > 0 {
        // Like nginx's master: hold the listening fds, leave accepting to workers.
        serve(&fds, Accept::None);
    }
    serve(&fds, mode);
}
