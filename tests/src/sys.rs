//! Thin libc helpers shared by the workload binaries: socket addresses, checked
//! calls and a tiny `--flag value` parser (the binaries stay dependency-free).
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

/// Panics with the OS error when a libc call returns -1.
pub fn check(ret: libc::c_int, what: &str) -> libc::c_int {
    if ret < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    ret
}

/// A `sockaddr_in`/`sockaddr_in6` for `addr`, ready for bind/connect.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr.ip() {
        IpAddr::V4(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = addr.port().to_be();
            sin.sin_addr.s_addr = u32::from(ip).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(ip) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = addr.port().to_be();
            sin6.sin6_addr.s6_addr = ip.octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A TCP socket of the family of `addr`; `extra_type` is OR-ed into the type
/// (e.g. SOCK_NONBLOCK).
pub fn tcp_socket(addr: &SocketAddr, extra_type: libc::c_int) -> RawFd {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall.
    check(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | extra_type, 0) }, "socket")
}

/// Sets an integer socket option at SOL_SOCKET level.
pub fn set_sockopt(fd: RawFd, opt: libc::c_int, val: libc::c_int, what: &str) {
    // SAFETY: `val` lives for the call and its size is passed.
    check(
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &val as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        },
        what,
    );
}

/// Room for `count` fds plus stdio and slack: the default soft limit (1024) would cap
/// large counts.
pub fn raise_nofile(count: usize) {
    let want = count as libc::rlim_t + 64;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, "getrlimit");
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        lim.rlim_max = lim.rlim_max.max(want);
        // SAFETY: `lim` is valid for reading.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, "setrlimit");
    }
}

/// The hard limit on open fds: what a process can raise its own limit to without
/// CAP_SYS_RESOURCE (containers often withhold it).
pub fn nofile_hard_limit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, "getrlimit");
    usize::try_from(lim.rlim_max).unwrap_or(usize::MAX)
}

/// A non-blocking connect to `addr`, issued and not waited for.
pub fn connect_nonblocking(addr: SocketAddr) -> RawFd {
    connect_nonblocking_from(addr, None)
}

/// `connect_nonblocking` from source address `from` (any port) when given.
pub fn connect_nonblocking_from(addr: SocketAddr, from: Option<IpAddr>) -> RawFd {
    let fd = tcp_socket(&addr, libc::SOCK_NONBLOCK);
    if let Some(ip) = from {
        let (sa, len) = sockaddr(SocketAddr::new(ip, 0));
        // SAFETY: `sa` is a valid sockaddr of length `len`.
        check(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) }, "bind");
    }
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr of length `len`.
    let r = unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) };
    let err = std::io::Error::last_os_error();
    if r < 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
        panic!("connect {addr}: {err}");
    }
    fd
}

/// Forks a worker that dies with its parent (the process the test kills). Returns the
/// worker's pid in the parent and None in the worker. Call while single-threaded.
pub fn fork_worker() -> Option<libc::pid_t> {
    // SAFETY: plain syscall.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the caller is single-threaded, so fork is safe.
    match check(unsafe { libc::fork() }, "fork") {
        0 => {
            // SAFETY: plain syscalls; exits if the parent is already gone.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
            None
        }
        pid => Some(pid),
    }
}

/// `--name value` / `--name=value` pairs and bare `--switch`es from the command line.
pub struct Flags(BTreeMap<String, String>);

impl Flags {
    pub fn from_env() -> Flags {
        Flags::parse(std::env::args().skip(1).collect())
    }

    fn parse(args: Vec<String>) -> Flags {
        let mut map = BTreeMap::new();
        let mut i = 0;
        while i < args.len() {
            let name = args[i].strip_prefix("--").unwrap_or_else(|| panic!("unexpected argument '{}'", args[i]));
            if let Some((name, value)) = name.split_once('=') {
                map.insert(name.to_string(), value.to_string());
                i += 1;
                continue;
            }
            match args.get(i + 1).filter(|v| !v.starts_with("--")) {
                Some(value) => {
                    map.insert(name.to_string(), value.clone());
                    i += 2;
                }
                None => {
                    map.insert(name.to_string(), "true".to_string());
                    i += 1;
                }
            }
        }
        Flags(map)
    }

    /// The value of `--name` parsed as T, or `default` when absent.
    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.0.get(name) {
            Some(v) => v.parse().unwrap_or_else(|_| panic!("bad value '{v}' for --{name}")),
            None => default,
        }
    }

    pub fn opt(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn required<T: std::str::FromStr>(&self, name: &str) -> T {
        let v = self.opt(name).unwrap_or_else(|| panic!("--{name} is required"));
        v.parse().unwrap_or_else(|_| panic!("bad value '{v}' for --{name}"))
    }
}

/// Writes `content` to `path` atomically (temp file + rename), so a test polling
/// for the file never reads it half-written.
pub fn write_ready_file(path: &str, content: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {tmp}: {e}"));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {tmp}: {e}"));
}

#[cfg(test)]
mod tests {
    use super::Flags;

    #[test]
    fn flags_with_values_equals_and_switches() {
        let args = ["--port", "80", "--addr=::1", "--send", "--count", "3"];
        let f = Flags::parse(args.iter().map(|s| s.to_string()).collect());
        assert_eq!(f.required::<u16>("port"), 80);
        assert_eq!(f.opt("addr"), Some("::1"));
        assert!(f.opt("send").is_some());
        assert_eq!(f.get("count", 0u32), 3);
        assert_eq!(f.get("hold", 5u32), 5);
    }
}
