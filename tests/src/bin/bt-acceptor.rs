//! Test workload: a listener and its clients in one process, so the accept-queue
//! wait of every connection is bracketed on one clock.
//!
//! bt-acceptor --port P [--addr IP] [--backlog N] [--clients N]
//!             [--accept blocking|epoll|accept4|none] [--interval-ms MS]
//!             --ready-file PATH --result-file PATH
//!
//! One client thread connects N times, one connection after the other. Once every
//! connection is on the accept queue, the server thread accepts the k-th no
//! earlier than k * MS later, in the chosen style: accept(2) on a blocking
//! listener, accept(2) on a non-blocking listener after epoll_wait, or
//! accept4(SOCK_NONBLOCK). The ready file is written once every connection is on
//! the queue. With --accept none nothing is accepted: after the ready file the
//! process waits for SIGUSR1, then closes the listener with the connections still
//! queued. The result file, written last, is
//! `{"accepted": N, "waits_us": [[lo, hi], ...]}`: per accepted connection, bounds
//! of its true accept-queue wait (see `Bracket`).
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::mpsc;
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

/// One accept in `style`; returns the peer's port once a connection was taken,
/// and the moment the accept call that took it was made.
fn accept_one(lfd: RawFd, epfd: RawFd, style: Style) -> (u16, Instant) {
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
        // Read last before the call: the dequeue happens inside the call that
        // succeeds, never in an earlier, failed one.
        let called = Instant::now();
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
        return (peer_port(&ss), called);
    }
}

/// One accepted connection: its peer port, and the moments its accept call was
/// made and returned.
struct Accepted {
    port: u16,
    called: Instant,
    returned: Instant,
}

/// Accepts `count` connections paced `interval` apart from now.
fn serve(lfd: RawFd, style: Style, count: usize, interval: Duration) -> Vec<Accepted> {
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
    let start = Instant::now();
    (0..count)
        .map(|k| {
            thread::sleep((start + interval * k as u32).saturating_duration_since(Instant::now()));
            let (port, called) = accept_one(lfd, epfd, style);
            Accepted { port, called, returned: Instant::now() }
        })
        .collect()
}

/// How many children wait on `lfd`'s accept queue: a listener's TCP_INFO reports
/// its queue length as tcpi_unacked.
fn queue_len(lfd: RawFd) -> usize {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let ptr = &mut info as *mut _ as *mut libc::c_void;
    // SAFETY: `ptr` and `len` describe `info`.
    check(unsafe { libc::getsockopt(lfd, libc::IPPROTO_TCP, libc::TCP_INFO, ptr, &mut len) }, "TCP_INFO");
    info.tcpi_unacked as usize
}

/// One client connection and the moments that bracket when the kernel queued it.
struct Connected {
    port: u16,
    /// Read before connect(): the SYN, so the child, comes later.
    called: Instant,
    /// Read once the listener's queue counts this connection. connect() returning
    /// does not bound the enqueue: the final ACK goes through the loopback backlog,
    /// whose softirq may run after the woken client. The queue length tells which
    /// connection joined only because one is in flight at a time.
    queued: Instant,
    /// Kept open until the end: the connection must not close under the server.
    _stream: TcpStream,
}

/// Connects to `addr` and waits (bounded) until the listener's queue holds
/// `queued_before` + 1 children. Nothing accepts while clients connect.
fn connect_one(addr: SocketAddr, lfd: RawFd, queued_before: usize) -> Connected {
    let called = Instant::now();
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let deadline = called + STEP_TIMEOUT;
    while queue_len(lfd) <= queued_before {
        assert!(Instant::now() < deadline, "connection {} not queued within {STEP_TIMEOUT:?}", queued_before + 1);
        // Lets a softirq thread deferred on this CPU deliver the final ACK.
        thread::yield_now();
    }
    let queued = Instant::now();
    let port = stream.local_addr().expect("local address").port();
    Connected { port, called, queued, _stream: stream }
}

/// Bounds, in microseconds, of the wait of a connection queued within `c`'s
/// bracket and dequeued within `a`'s: the earliest dequeue minus the latest
/// enqueue (at least 0), and the latest dequeue minus the earliest enqueue.
fn bracket_us(c: &Connected, a: &Accepted) -> [f64; 2] {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    [us(a.called.saturating_duration_since(c.queued)), us(a.returned.duration_since(c.called))]
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
    let (go, started) = mpsc::channel::<()>();
    let server = (style != Style::None).then(|| {
        thread::spawn(move || {
            // A closed channel (the client phase panicked) ends the thread too.
            started.recv().ok().map(|()| serve(lfd, style, clients, interval))
        })
    });
    let connected: Vec<Connected> = (0..clients).map(|k| connect_one(addr, lfd, k)).collect();
    let _ = go.send(());
    write_ready_file(&ready, &format!("connected {clients}\n"));

    let accepted = match server {
        Some(server) => server.join().expect("server thread").expect("server started"),
        None => {
            wait_for_sigusr1(&set);
            // SAFETY: we own `lfd`; closing the last reference stops the listener.
            check(unsafe { libc::close(lfd) }, "close listener");
            Vec::new()
        }
    };
    let waits_us: Vec<[f64; 2]> = accepted
        .iter()
        .map(|a| {
            let c = connected
                .iter()
                .find(|c| c.port == a.port)
                .unwrap_or_else(|| panic!("accepted a connection from port {}, not one of ours", a.port));
            bracket_us(c, a)
        })
        .collect();
    let report = serde_json::json!({"accepted": accepted.len(), "waits_us": waits_us});
    write_ready_file(&result, &format!("{report}\n"));
}
