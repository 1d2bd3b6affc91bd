//! Driving the workload binaries (bt-server, bt-client) inside namespaces.
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use crate::netns::Netns;
use crate::{scratch_path, wait_for};

/// A started process, killed and reaped on drop unless it already ended.
pub struct Spawned {
    what: String,
    child: Child,
}

impl Spawned {
    pub(crate) fn new(what: String, child: Child) -> Spawned {
        Spawned { what, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
    }

    /// Waits for the process to end by itself, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.what);
        wait_for(&what, timeout, || self.try_wait())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // No panicking here: drop also runs while a failed test unwinds.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Path of a workload binary. Cargo builds a package's binaries before its
/// integration tests, into the directory above the test binary's deps/.
pub fn workload_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "workload binary {} missing: build with `cargo build -p backlog-tests --tests`",
        path.display()
    );
    path
}

/// How a bt-server listens and accepts.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub addr: String,
    pub port: u16,
    pub backlog: u32,
    /// none | all | delay=MS
    pub accept: String,
    /// Worker processes sharing the listener (0: the listening process accepts).
    pub fork: u32,
    /// SO_REUSEPORT sockets on the port (0: one plain socket).
    pub reuseport: u32,
    /// Forked worker i accepts from socket i only (every process still holds every
    /// socket, as nginx's workers do).
    pub pin: bool,
}

impl ServerSpec {
    /// listen(8), never accepting: the shape that overflows.
    pub fn new(addr: &str, port: u16) -> ServerSpec {
        ServerSpec { addr: addr.into(), port, backlog: 8, accept: "none".into(), fork: 0, reuseport: 0, pin: false }
    }
}

/// A listening bt-server.
pub struct Server {
    proc: Spawned,
    /// Every process holding the listener: the listening process first, then
    /// forked workers.
    pub pids: Vec<u32>,
    /// With `pin`: each worker's pid and the inode of the one socket it accepts from.
    pub pinned: Vec<(u32, u64)>,
}

impl Server {
    /// Starts bt-server in `ns` and returns once it listens (bounded wait on
    /// its ready file).
    pub fn start(ns: &Netns, spec: ServerSpec) -> Server {
        let mut flags = vec![
            format!("--addr={}", spec.addr),
            format!("--port={}", spec.port),
            format!("--backlog={}", spec.backlog),
            format!("--accept={}", spec.accept),
            format!("--fork={}", spec.fork),
            format!("--reuseport={}", spec.reuseport),
        ];
        if spec.pin {
            flags.push("--pin".into());
        }
        // A line per process: its pid, then (a pinned worker) its socket's inode.
        let (proc, lines): (Spawned, Vec<(u32, Option<u64>)>) = launch(ns, "bt-server", flags, |text| {
            text.lines()
                .map(|l| {
                    let mut it = l.split_whitespace().map(|v| v.parse::<u64>().expect("number in server ready file"));
                    (it.next().expect("pid in server ready file") as u32, it.next())
                })
                .collect()
        });
        let pids: Vec<u32> = lines.iter().map(|l| l.0).collect();
        let pinned = lines.iter().filter_map(|&(pid, ino)| Some((pid, ino?))).collect();
        assert_eq!(pids[0], proc.pid(), "bt-server should listen in the process we started");
        Server { proc, pids, pinned }
    }

    /// The process that created the listening socket(s).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// A batch of concurrent connects (bt-client).
#[derive(Clone, Debug)]
pub struct Clients {
    pub addr: String,
    pub port: u16,
    pub count: u32,
    /// How long the sockets stay open once all connects were issued (and,
    /// with `send`, sent).
    pub hold_secs: u32,
    /// Send one byte on each socket once connected.
    pub send: bool,
    /// Each connect from a source address of its own (127.1.x.y; at most 65,536).
    pub sources: bool,
}

impl Clients {
    pub fn new(addr: &str, port: u16, count: u32) -> Clients {
        Clients { addr: addr.into(), port, count, hold_secs: 5, send: false, sources: false }
    }

    /// Starts the batch in `ns`; returns once every connect has been issued
    /// (with `send`: once every socket connected and sent, or the hold ran out).
    pub fn start(&self, ns: &Netns) -> ClientBatch {
        let mut flags = vec![
            format!("--addr={}", self.addr),
            format!("--port={}", self.port),
            format!("--count={}", self.count),
            format!("--hold={}", self.hold_secs),
        ];
        if self.send {
            flags.push("--send".into());
        }
        if self.sources {
            flags.push("--sources".into());
        }
        let (proc, sent) = launch(ns, "bt-client", flags, |text| {
            text.strip_prefix("sent ").map(|n| n.trim().parse().expect("count in client ready file"))
        });
        ClientBatch { proc, spec: self.clone(), sent }
    }

    /// Runs the batch in `ns` to its end.
    pub fn run(&self, ns: &Netns) {
        self.start(ns).finish();
    }
}

/// A started batch of clients.
pub struct ClientBatch {
    proc: Spawned,
    spec: Clients,
    /// With `send`: how many sockets connected and sent their byte.
    pub sent: Option<u32>,
}

impl ClientBatch {
    /// Waits for the batch to end (bounded: the hold time, counted from the
    /// ready point, plus a margin).
    pub fn finish(mut self) {
        let status = self.proc.wait(Duration::from_secs(u64::from(self.spec.hold_secs) + 60));
        assert!(status.success(), "bt-client {:?} failed: {status}", self.spec);
    }
}

/// `count` listeners on ports `first_port`, `first_port + 1`, ..., each with one
/// accept, one queued connection and one client whose SYNs its full queue drops
/// (bt-listeners many); held until dropped.
pub fn many_listeners(ns: &Netns, addr: &str, first_port: u16, count: usize) -> Spawned {
    let flags = vec![
        "--mode=many".into(),
        format!("--count={count}"),
        format!("--addr={addr}"),
        format!("--first-port={first_port}"),
    ];
    launch(ns, "bt-listeners", flags, |_| ()).0
}

/// Opens `count` listeners one after the other, each accepting one connection, and
/// closes everything (bt-listeners churn); returns once done, at most `timeout`.
pub fn churn_listeners(ns: &Netns, addr: &str, count: usize, timeout: Duration) {
    let bin = workload_bin("bt-listeners");
    let argv =
        [bin.to_str().expect("utf-8 path"), "--mode=churn", &format!("--count={count}"), &format!("--addr={addr}")];
    let status = ns.spawn(&argv).wait(timeout);
    assert!(status.success(), "bt-listeners churn of {count} listeners failed: {status}");
}

/// Starts workload binary `name` in `ns` with `flags` and a ready file, waits
/// (bounded) for the ready file and parses it; fails early if the process
/// exits first.
fn launch<T>(ns: &Netns, name: &str, flags: Vec<String>, parse: impl Fn(&str) -> T) -> (Spawned, T) {
    let ready = scratch_path(name);
    let bin = workload_bin(name);
    let mut argv = vec![bin.to_str().expect("utf-8 path").to_string()];
    argv.extend(flags);
    argv.push(format!("--ready-file={}", ready.display()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut proc = ns.spawn(&argv);
    let what = format!("{name} to write {}", ready.display());
    let text = wait_for(&what, Duration::from_secs(60), || {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            return Some(text);
        }
        if let Some(status) = proc.try_wait() {
            panic!("{} exited ({status}) before it was ready", proc.what);
        }
        None
    });
    let _ = std::fs::remove_file(&ready);
    let parsed = parse(&text);
    (proc, parsed)
}
