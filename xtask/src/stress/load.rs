//! The concurrent loads a stress run happens under. Each is started just before a
//! run and stopped right after it; every loop in them is bounded in count and in
//! time, and their traffic stays on loopback or in a namespace they create.
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::harness::netns::{self, Netns};
use crate::harness::nginx::Nginx;
use crate::harness::probe::{last_line, Probe};
use crate::harness::wrk::Wrk;
use crate::harness::{sys, PEER_SCRIPT};

/// No load outlives this, whatever happens to the run it was started for.
const MAX_LOAD_TIME: Duration = Duration::from_secs(600);
/// Listeners opened and closed per second by the churn load, and at most per run:
/// more than the tracer's 16,384-entry listener map within one run.
const CHURN_PER_SEC: u32 = 2000;
const CHURN_MAX: u32 = 200_000;
/// How long each tracer of the restart load stays attached, and the cap on cycles.
const RESTART_HOLD: Duration = Duration::from_millis(500);
const RESTART_MAX: u32 = 1000;
/// nginx's port in its namespace, its listen backlog (nginx's default), and wrk's
/// connections: both cores busy serving.
const NGINX_PORT: u16 = 18090;
const NGINX_BACKLOG: u32 = 511;
const WRK_CONNECTIONS: u32 = 400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Load {
    /// Nothing else running: the baseline.
    None,
    /// A second `backlog-trace --json --prometheus 0`, on every namespace, started just before.
    SecondTracer,
    /// backlog-trace started and stopped over and over during the run.
    TracerRestarts,
    /// bpftrace on the tracepoints tracepoint mode uses.
    Bpftrace,
    /// nginx in its own namespace under wrk at full rate.
    Nginx,
    /// Listeners opened, connected to once and closed, on loopback.
    Churn,
    /// One busy-looping thread per core.
    Cpu,
    /// All of the above at once.
    All,
}

impl Load {
    /// Every load but none, in the order the default run uses.
    pub const DEFAULT: [Load; 7] =
        [Load::SecondTracer, Load::TracerRestarts, Load::Bpftrace, Load::Nginx, Load::Churn, Load::Cpu, Load::All];

    pub fn name(self) -> String {
        self.to_possible_value().expect("no skipped variants").get_name().to_string()
    }

    fn parts(self) -> Vec<Load> {
        match self {
            Load::All => {
                vec![Load::SecondTracer, Load::Bpftrace, Load::Nginx, Load::TracerRestarts, Load::Churn, Load::Cpu]
            }
            Load::None => vec![],
            l => vec![l],
        }
    }

    /// The commands this load runs besides the tracer.
    pub fn commands(self) -> Vec<&'static str> {
        let mut c = Vec::new();
        for l in self.parts() {
            match l {
                Load::Bpftrace => c.push("bpftrace"),
                Load::Nginx => c.extend(["nginx", "wrk", "ip"]),
                _ => {}
            }
        }
        c
    }

    /// Starts the load with `tracer` as the binary for the tracer loads. The parts
    /// that attach (second tracer, bpftrace) start first, side by side, as they take
    /// seconds; then nginx+wrk and the busy loops (restarts, churn, CPU hogs), which
    /// would otherwise keep a kernel-matrix guest's emulated CPUs from attaching
    /// them within their timeouts.
    pub fn start(self, tracer: &Path) -> Result<Running> {
        let (first, then): (Vec<Load>, Vec<Load>) =
            self.parts().into_iter().partition(|l| matches!(l, Load::SecondTracer | Load::Bpftrace));
        let started: Vec<Result<Part>> = thread::scope(|s| {
            let handles: Vec<_> = first.into_iter().map(|l| s.spawn(move || l.start_part(tracer))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("starting a load panicked"))))
                .collect()
        });
        // Parts that did start are stopped by their drop if another failed.
        let mut running = Running { parts: Vec::new() };
        for part in started {
            running.parts.push(part?);
        }
        for l in then {
            running.parts.push(l.start_part(tracer)?);
        }
        Ok(running)
    }

    fn start_part(self, tracer: &Path) -> Result<Part> {
        Ok(match self {
            Load::SecondTracer => Part::Probe("second tracer", Probe::tracer(tracer, &["--prometheus", "0"])?),
            Load::TracerRestarts => Part::Thread(restarts(tracer.to_path_buf())),
            Load::Bpftrace => Part::Probe("bpftrace", Probe::bpftrace(PEER_SCRIPT)?),
            Load::Nginx => Part::Server(Server::start()?),
            Load::Churn => Part::Thread(Background::spawn("churn", "listeners", 1, churn)),
            Load::Cpu => Part::Thread(cpu_hogs()),
            Load::None | Load::All => unreachable!("parts() expands these"),
        })
    }
}

/// A started load; [`Running::stop`] ends it and says what it did.
pub struct Running {
    parts: Vec<Part>,
}

enum Part {
    Probe(&'static str, Probe),
    Thread(Background),
    Server(Server),
}

impl Running {
    /// Stops every part (the last started first) and returns what they did, e.g.
    /// "churn: 21000 listeners". An error names a part that failed or ended before
    /// it was stopped: the run did not happen under the load it claims.
    pub fn stop(mut self) -> Result<String> {
        let mut notes = Vec::new();
        let mut errors = Vec::new();
        while let Some(part) = self.parts.pop() {
            match part.stop() {
                Ok(Some(note)) => notes.push(note),
                Ok(None) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        notes.reverse();
        Ok(notes.join(", "))
    }
}

impl Part {
    fn stop(self) -> Result<Option<String>> {
        match self {
            Part::Probe(name, p) => {
                let stopped = p.stop()?;
                // bpftrace may be ended by the SIGINT that Probe::stop repeats.
                let by_sigint = stopped.status.signal() == Some(sys::SIGINT);
                if !(stopped.status.success() || name == "bpftrace" && by_sigint) {
                    bail!("{name} ended with {}: {}", stopped.status, last_line(&stopped.stderr));
                }
                // What backlog-trace saw on every namespace (bpftrace prints no drops).
                Ok((stopped.drop_lines > 0).then(|| format!("{name}: {} drop lines", stopped.drop_lines)))
            }
            Part::Thread(b) => b.stop().map(Some),
            Part::Server(s) => s.stop().map(Some),
        }
    }
}

/// A thread that loops until told to stop (or MAX_LOAD_TIME passes) and reports
/// what it did.
struct Background {
    name: &'static str,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Result<u64>>>,
    unit: &'static str,
}

impl Background {
    /// `n` threads running `f(stop flag, deadline)`; each returns how many `unit`s
    /// it did, summed in the report.
    fn spawn<F>(name: &'static str, unit: &'static str, n: usize, f: F) -> Background
    where
        F: Fn(&AtomicBool, Instant) -> Result<u64> + Clone + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + MAX_LOAD_TIME;
        let handles = (0..n)
            .map(|_| {
                let (stop, f) = (stop.clone(), f.clone());
                thread::spawn(move || f(&stop, deadline))
            })
            .collect();
        Background { name, stop, handles, unit }
    }

    fn stop(mut self) -> Result<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for h in std::mem::take(&mut self.handles) {
            match h.join() {
                Ok(r) => total += r.with_context(|| format!("{} load", self.name))?,
                Err(_) => bail!("{} load panicked", self.name),
            }
        }
        Ok(format!("{}: {total} {}", self.name, self.unit))
    }
}

impl Drop for Background {
    /// On an error path the threads are told to stop, not waited for.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens a listener on 127.0.0.1, connects to it once, accepts, and closes all
/// three, CHURN_PER_SEC times a second. Returns how many listeners it opened.
fn churn(stop: &AtomicBool, deadline: Instant) -> Result<u64> {
    let t0 = Instant::now();
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) && n < CHURN_MAX && Instant::now() < deadline {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a churn listener on 127.0.0.1")?;
        let client = TcpStream::connect(listener.local_addr()?).context("connecting to a churn listener")?;
        let (accepted, _) = listener.accept().context("accepting on a churn listener")?;
        // A reset instead of TIME_WAIT: 2000 connections a second would otherwise
        // use up loopback's ephemeral ports within the TIME_WAIT period.
        sys::set_linger_zero(client.as_raw_fd()).context("SO_LINGER on a churn client")?;
        drop((client, accepted, listener));
        n += 1;
        // Paced against the start, so a slow iteration is caught up on.
        let due = t0 + Duration::from_secs_f64(f64::from(n) / f64::from(CHURN_PER_SEC));
        thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    Ok(u64::from(n))
}

/// Starts backlog-trace (all namespaces), holds it RESTART_HOLD, stops it, again.
fn restarts(tracer: PathBuf) -> Background {
    Background::spawn("tracer restarts", "tracers started and stopped", 1, move |stop, deadline| {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && n < RESTART_MAX && Instant::now() < deadline {
            let p = Probe::tracer(&tracer, &[])?;
            thread::sleep(RESTART_HOLD);
            let stopped = p.stop()?;
            if !stopped.status.success() {
                bail!("a restarted backlog-trace ended with {}: {}", stopped.status, last_line(&stopped.stderr));
            }
            n += 1;
        }
        Ok(u64::from(n))
    })
}

/// One spinning thread per core.
fn cpu_hogs() -> Background {
    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    Background::spawn("cpu", "hog threads", cores, |stop, deadline| {
        let mut spins: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            spins = std::hint::black_box(spins.wrapping_add(1));
            if spins.is_multiple_of(1 << 20) && Instant::now() >= deadline {
                break;
            }
        }
        Ok(1)
    })
}

/// nginx in a namespace of its own, under wrk from the same namespace.
struct Server {
    wrk: Child,
    /// Always Some until dropped (taken so it stops before its directory goes).
    nginx: Option<Nginx>,
    dir: PathBuf,
    started: Instant,
    /// The namespace's PassiveOpens at the start: connections nginx accepted since.
    opened: u64,
    // Declared last: deleted after nginx and wrk have stopped.
    netns: Netns,
}

impl Server {
    fn start() -> Result<Server> {
        let pid = std::process::id();
        let netns = Netns::create(&format!("btstress-nginx-{pid}"));
        // Under the temp dir, a tmpfs in the kernel matrix's guests (their / is read-only).
        let dir = std::env::temp_dir().join(format!("backlog-stress-nginx-{pid}"));
        let nginx = Nginx::start(&dir, NGINX_PORT, NGINX_BACKLOG, Some(&netns))?;
        let threads = thread::available_parallelism().map_or(2, |n| n.get());
        let wrk =
            Wrk { url: nginx.url.clone(), seconds: MAX_LOAD_TIME.as_secs(), connections: WRK_CONNECTIONS, threads };
        let wrk = wrk
            .command(Some(&netns))
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting wrk (install it with scripts/bench-deps.sh)")?;
        let opened = netns::tcp(&netns, "PassiveOpens")?;
        Ok(Server { wrk, nginx: Some(nginx), dir, started: Instant::now(), opened, netns })
    }

    /// What it did; an error if nginx or wrk ended before the run did. Drop ends both.
    fn stop(mut self) -> Result<String> {
        if let Some(st) = self.nginx.as_mut().expect("running").exited()? {
            bail!("nginx ended ({st}) before the run did; see {}", self.dir.join("error.log").display());
        }
        if let Some(st) = self.wrk.try_wait()? {
            bail!("wrk ended ({st}) before the run did");
        }
        let served = netns::tcp(&self.netns, "PassiveOpens")? - self.opened;
        Ok(format!("nginx+wrk: {served} connections in {} s", self.started.elapsed().as_secs()))
    }
}

impl Drop for Server {
    /// Kills wrk, stops nginx, removes its directory; the namespace goes last, with
    /// its field.
    fn drop(&mut self) {
        sys::send(self.wrk.id(), sys::SIGKILL);
        let _ = self.wrk.wait();
        drop(self.nginx.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
