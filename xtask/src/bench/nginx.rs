//! The web server under load: Debian's nginx with a private config, on loopback.
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::sys;

/// The peer figures were taken with this backlog; the same keeps them comparable.
const BACKLOG: u32 = 4096;

pub struct Nginx {
    child: Child,
    pub url: String,
}

impl Nginx {
    /// Starts nginx in the foreground (so it dies with us) on 127.0.0.1:`port`,
    /// answering every request with a fixed 200, logging no access.
    pub fn start(dir: &Path, port: u16) -> Result<Nginx> {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("127.0.0.1:{port} is in use; pick a free one with --port");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, port)).with_context(|| format!("writing {}", conf.display()))?;
        let child = Command::new("nginx")
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
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = nginx.child.try_wait()? {
                bail!("nginx exited ({st}) at start; see {}", dir.join("error.log").display());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not listen on 127.0.0.1:{port} within 10 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }
}

impl Nginx {
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

fn config(dir: &Path, port: u16) -> String {
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
        listen 127.0.0.1:{port} backlog={BACKLOG};
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
