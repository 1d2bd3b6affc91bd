//! The web server under load: Debian's nginx with a private config, on loopback of
//! this namespace (the bench) or of a namespace of its own (the stress loads).
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backlog_user::sys::netns::run_at;

use crate::harness::netns::{self, Netns};
use crate::harness::sys;

/// The bench's peer figures were taken with this backlog; the same keeps them comparable.
pub const BACKLOG: u32 = 4096;

pub struct Nginx {
    child: Child,
    pub url: String,
}

impl Nginx {
    /// Starts nginx in the foreground (so it dies with us) on 127.0.0.1:`port` of
    /// `netns` (None: ours) with listen(`backlog`), answering every request with a
    /// fixed 200, logging no access. Config, logs and temp paths live in `dir`, so
    /// nothing outside it is written (a tmpfs dir works on a read-only root).
    pub fn start(dir: &Path, port: u16, backlog: u32, netns: Option<&Netns>) -> Result<Nginx> {
        if netns.is_none() && TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("127.0.0.1:{port} is in use; pick a free one with --port");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, port, backlog)).with_context(|| format!("writing {}", conf.display()))?;
        // The child is nginx's master (`ip netns exec` execs it in place).
        let mut cmd = netns::command(netns, "nginx");
        let child = cmd
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx (install it with scripts/bench-deps.sh)")?;
        let mut nginx = Nginx { child, url: format!("http://127.0.0.1:{port}/") };
        let t0 = Instant::now();
        while !accepts(netns, port) {
            if let Some(st) = nginx.child.try_wait()? {
                bail!("nginx exited ({st}) at start; see {}", dir.join("error.log").display());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not listen on 127.0.0.1:{port} within 10 s; see {}", dir.join("error.log").display());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }

    /// The master's exit status if it has ended.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// CPU used so far by the master and its workers (where loopback TCP and the
    /// probes' programs run on the server side).
    pub fn cpu(&self) -> Result<Duration> {
        let master = self.child.id();
        let mut total = sys::process_cpu(master)?;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if sys::parent(pid) == Some(master) {
                total += sys::process_cpu(pid).unwrap_or_default();
            }
        }
        Ok(total)
    }
}

/// Whether 127.0.0.1:`port` accepts a connection, in `netns` (None: ours).
fn accepts(netns: Option<&Netns>, port: u16) -> bool {
    let connect = move || TcpStream::connect(("127.0.0.1", port)).is_ok();
    match netns {
        None => connect(),
        Some(ns) => run_at(&ns.path(), move || Ok(connect())).unwrap_or(false),
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        sys::terminate(self.child.id());
        let t0 = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if t0.elapsed() > Duration::from_secs(5) {
                sys::send(self.child.id(), sys::SIGKILL);
                let _ = self.child.wait();
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn config(dir: &Path, port: u16, backlog: u32) -> String {
    let d = dir.display();
    // One worker per core, as a tuned server would run; temp paths inside `dir` so
    // nothing under /var is touched.
    format!(
        "daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
    )
}

/// Where the bench keeps nginx's config and logs.
pub fn dir(workspace: &Path) -> PathBuf {
    workspace.join("target/bench/nginx")
}
