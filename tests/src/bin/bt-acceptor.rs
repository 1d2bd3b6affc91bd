//! Test workload: a listener and its clients in one process, so the accept-queue
//! wait of every connection is measured on one clock.
//!
//! bt-acceptor --port P [--addr IP] [--backlog N] [--clients N]
//!             [--accept blocking|epoll|accept4|none] [--interval-ms MS]
//!             --ready-file PATH --result-file PATH
//!
//! N client threads connect at once (blocking connect). Meanwhile the server
//! thread accepts the k-th connection no earlier than k * MS after the clients
//! were released, in the chosen style: accept(2) on a blocking listener,
//! accept(2) on a non-blocking listener after epoll_wait, or
//! accept4(SOCK_NONBLOCK). The ready file is written once every client has
//! connected. With --accept none nothing is accepted: after the ready file the
//! process waits for SIGUSR1, then closes the listener with the connections still
//! queued. The result file, written last, is
//! `{"accepted": N, "waits_us": [...]}`: per accepted connection, the time from
//! its client's connect() returning to the server's accept returning it.
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use backlog_tests::sys::{check, set_sockopt, sockaddr, tcp_socket, write_ready_file, Flags};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Blocking,
    Epoll,
    Accept4,
    None,
}

fn parse_style(s: &str) -> Style {
    match s {
        "blocking" => Style::Blocking,
        "epoll" => Style::Epoll,
        "accept4" => Style::Accept4,
        "none" => Style::None,
        _ => panic!("--accept must be blocking, epoll, accept4 or none, not '{s}'"),
    }
}

/// How long the SIGUSR1 wait and every epoll_wait may take: a workload left
/// behind by a broken test must still end.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn listener(addr: SocketAddr, backlog: i32, style: Style) -> RawFd {
    // epoll's style is the event-loop server's: a non-blocking listener.
    let extra = if style == Style::Epoll { libc::SOCK_NONBLOCK } else { 0 };
    let fd = tcp_socket(&addr, extra);
    set_sockopt(fd, libc::SO_REUSEADDR, 1, "SO_REUSEADDR");
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr of length `len`.
    check(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) }, "bind");
    // SAFETY: plain syscall.
    check(unsafe { libc::listen(fd, backlog) }, "listen");
    fd
}

/// Port of a peer address returned by accept (v4 and v6 keep it at the same offset).
fn peer_port(ss: &libc::sockaddr_storage) -> u16 {
    // SAFETY: sockaddr_in and sockaddr_in6 both start with family, then port.
    u16::from_be(unsafe { (*(ss as *const _ as *const libc::sockaddr_in)).sin_port })
}

/// One accept in `style`; returns the peer's port once a connection was taken.
fn accept_one(lfd: RawFd, epfd: RawFd, style: Style) -> u16 {
    loop {
        if style == Style::Epoll {
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: `ev` is a valid one-element array.
            let n = unsafe { libc::epoll_wait(epfd, &mut ev, 1, STEP_TIMEOUT.as_millis() as i32) };
            assert!(n != 0, "no connection became acceptable within {STEP_TIMEOUT:?}");
        }
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&ss) as libc::socklen_t;
        let sa = &mut ss as *mut _ as *mut libc::sockaddr;
        // SAFETY: `sa` and `len` describe `ss`.
        let fd = unsafe {
            match style {
                Style::Accept4 => libc::accept4(lfd, sa, &mut len, libc::SOCK_NONBLOCK),
                _ => libc::accept(lfd, sa, &mut len),
            }
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                // A spurious wakeup (epoll) or a signal: try again.
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => panic!("accept: {err}"),
            }
        }
        if style == Style::Accept4 {
            // SAFETY: plain syscall on our fd.
            let fl = check(unsafe { libc::fcntl(fd, libc::F_GETFL) }, "F_GETFL");
            assert!(fl & libc::O_NONBLOCK != 0, "accept4(SOCK_NONBLOCK) returned a blocking socket");
        }
        // SAFETY: we own `fd`; only the moment it was returned matters.
        unsafe { libc::close(fd) };
        return peer_port(&ss);
    }
}

/// Accepts `count` connections paced `interval` apart from `start`; returns each
/// one's peer port and the moment accept returned it.
fn serve(lfd: RawFd, style: Style, count: usize, interval: Duration, start: Instant) -> Vec<(u16, Instant)> {
    let epfd = if style == Style::Epoll {
        // SAFETY: plain syscalls; `ev` lives for the call.
        unsafe {
            let epfd = check(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1");
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
            check(libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, lfd, &mut ev), "epoll_ctl");
            epfd
        }
    } else {
        -1
    };
    (0..count)
        .map(|k| {
            thread::sleep((start + interval * k as u32).saturating_duration_since(Instant::now()));
            let port = accept_one(lfd, epfd, style);
            (port, Instant::now())
        })
        .collect()
}

/// Blocks until SIGUSR1 arrives (bounded). The signal must already be blocked in
/// every thread, or one of them would take it and die of its default action.
fn wait_for_sigusr1(set: &libc::sigset_t) {
    let ts = libc::timespec { tv_sec: STEP_TIMEOUT.as_secs() as libc::time_t, tv_nsec: 0 };
    // SAFETY: `set` and `ts` are valid for the call.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    assert_eq!(sig, libc::SIGUSR1, "no SIGUSR1 within {STEP_TIMEOUT:?}");
}

fn main() {
    let flags = Flags::from_env();
    let ip: IpAddr = flags.get("addr", IpAddr::from([127, 0, 0, 1]));
    let addr = SocketAddr::new(ip, flags.required("port"));
    let backlog: i32 = flags.get("backlog", 64);
    let clients: usize = flags.get("clients", 1);
    // A final ACK dropped by a full queue would leave a client connected that the
    // server never sees, and the run waiting for it.
    assert!(clients <= backlog as usize, "--clients must fit the accept queue (--backlog {backlog})");
    let style = parse_style(flags.opt("accept").unwrap_or("blocking"));
    let interval = Duration::from_millis(flags.get("interval-ms", 0));
    let ready: String = flags.required("ready-file");
    let result: String = flags.required("result-file");
    // A workload leaked by a crashed test still ends.
    // SAFETY: plain syscall; SIGALRM's default action terminates the process.
    unsafe { libc::alarm(300) };

    // Blocked before any thread exists, so every thread inherits the mask.
    // SAFETY: `set` is initialised by sigemptyset before use.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let lfd = listener(addr, backlog, style);
    // The server thread (when accepting) and the clients start together.
    let accepting = style != Style::None;
    let go = Arc::new(Barrier::new(clients + usize::from(accepting)));
    let server = accepting.then(|| {
        let go = go.clone();
        thread::spawn(move || {
            go.wait();
            serve(lfd, style, clients, interval, Instant::now())
        })
    });
    let connects: Vec<_> = (0..clients)
        .map(|_| {
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                // Instant is CLOCK_MONOTONIC, the clock the server thread reads too.
                let connected = Instant::now();
                let port = s.local_addr().expect("local address").port();
                // The stream is returned, not dropped: the connection stays open.
                (port, connected, s)
            })
        })
        .collect();
    let connected: Vec<(u16, Instant, TcpStream)> =
        connects.into_iter().map(|t| t.join().expect("client thread")).collect();
    write_ready_file(&ready, &format!("connected {clients}\n"));

    let accepted = match server {
        Some(server) => server.join().expect("server thread"),
        None => {
            wait_for_sigusr1(&set);
            // SAFETY: we own `lfd`; closing the last reference stops the listener.
            check(unsafe { libc::close(lfd) }, "close listener");
            Vec::new()
        }
    };
    let waits_us: Vec<f64> = accepted
        .iter()
        .map(|(port, at)| {
            let (_, connected, _) = connected
                .iter()
                .find(|(p, ..)| p == port)
                .unwrap_or_else(|| panic!("accepted a connection from port {port}, not one of ours"));
            // Signed: a client thread scheduled late may read its clock after the accept.
            match at.checked_duration_since(*connected) {
                Some(d) => d.as_secs_f64() * 1e6,
                None => -(connected.duration_since(*at).as_secs_f64() * 1e6),
            }
        })
        .collect();
    let report = serde_json::json!({"accepted": accepted.len(), "waits_us": waits_us});
    write_ready_file(&result, &format!("{report}\n"));
}
