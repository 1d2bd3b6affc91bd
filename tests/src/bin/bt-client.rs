//! Test workload: many concurrent TCP connects, held open for a while.
//!
//! bt-client --port P [--addr IP] [--count N] [--sources] [--hold SECS] [--send] [--ready-file PATH]
//!
//! Issues N non-blocking connects at once (with --sources, IPv4 only, the i-th from
//! 127.1.x.y, its own loopback source address: N peers); with --send, writes one byte on each
//! socket as soon as its connect completes (waiting at most SECS for that).
//! Then writes the ready file, keeps the sockets open for SECS more and exits.
//! Counting the hold from the ready point keeps the window after it the same
//! however slow the machine (the VM runner emulates its CPU).
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use backlog_tests::sys::{connect_nonblocking_from, raise_nofile, write_ready_file, Flags};

/// Waits (until `deadline`) for each connect to finish and sends one byte on
/// those that succeeded. Returns how many sent.
fn send_when_connected(fds: &[RawFd], deadline: Instant) -> usize {
    let mut pending: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }).collect();
    let mut sent = 0;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // SAFETY: `pending` is a valid array of its length.
        unsafe { libc::poll(pending.as_mut_ptr(), pending.len() as libc::nfds_t, left.as_millis() as i32) };
        pending.retain(|p| {
            if p.revents == 0 {
                return true;
            }
            let mut err: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: out-pointers valid for the sizes given.
            unsafe {
                libc::getsockopt(
                    p.fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    &mut err as *mut _ as *mut libc::c_void,
                    &mut len,
                );
                if err == 0 && libc::write(p.fd, b"x".as_ptr() as *const libc::c_void, 1) == 1 {
                    sent += 1;
                }
            }
            false
        });
    }
    sent
}

fn main() {
    let flags = Flags::from_env();
    let ip: IpAddr = flags.get("addr", IpAddr::from([127, 0, 0, 1]));
    let addr = SocketAddr::new(ip, flags.required("port"));
    let count: usize = flags.get("count", 100);
    let hold = Duration::from_secs(flags.get("hold", 5));
    raise_nofile(count);

    let many = flags.opt("sources").is_some();
    let source = |i: usize| many.then(|| IpAddr::from([127, 1, (i >> 8) as u8, i as u8]));
    let fds: Vec<RawFd> = (0..count).map(|i| connect_nonblocking_from(addr, source(i))).collect();
    let report = if flags.opt("send").is_some() {
        format!("sent {}\n", send_when_connected(&fds, Instant::now() + hold))
    } else {
        format!("connecting {count}\n")
    };
    if let Some(path) = flags.opt("ready-file") {
        write_ready_file(path, &report);
    }
    std::thread::sleep(hold);
    // Exiting closes every socket.
}
