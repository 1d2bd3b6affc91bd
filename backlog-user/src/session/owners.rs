//! Attribution off the event loop: a /proc pass (`sys::procs::scan`) takes ~150 ms on
//! a busy host, so it runs on a helper thread and the loop keeps draining the ring
//! and serving metrics meanwhile. A listener whose socket the last pass did not see
//! waits for the next one (at most one in flight, one per `MIN_GAP`).
use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backlog_common::ListenerKey;

use crate::model::{Listener, Model, Owners};
use crate::sys::procs::{self, OwnerScan};

/// At most one /proc pass this often, however many listeners are unknown.
const MIN_GAP: Duration = Duration::from_millis(500);

pub struct Resolver {
    table: HashMap<u64, Owners>,
    /// Listeners to attribute when the next pass arrives.
    waiting: HashSet<ListenerKey>,
    requests: mpsc::SyncSender<()>,
    results: tokio::sync::mpsc::Receiver<OwnerScan>,
    in_flight: bool,
    last: Option<Instant>,
    /// Processes whose open files the latest pass could not read.
    pub unreadable: usize,
}

impl Resolver {
    /// Starts the scanning thread, which ends when the resolver is dropped.
    pub fn start() -> Resolver {
        let (requests, rx) = mpsc::sync_channel::<()>(1);
        let (tx, results) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("owners".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    if tx.blocking_send(procs::scan(None)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the owner-scan thread");
        Resolver {
            table: HashMap::new(),
            waiting: HashSet::new(),
            requests,
            results,
            in_flight: false,
            last: None,
            unreadable: 0,
        }
    }

    /// Asks for a pass unless one is running or the last began under `MIN_GAP` ago.
    pub fn request(&mut self) {
        if self.in_flight || self.last.is_some_and(|t| t.elapsed() < MIN_GAP) {
            return;
        }
        if self.requests.try_send(()).is_ok() {
            self.in_flight = true;
            self.last = Some(Instant::now());
        }
    }

    /// Gives `l` the owners the latest pass found. The listen() caller is known from
    /// the event; forked workers and sockets older than the tracer come from /proc:
    /// `listen` (a socket that just entered LISTEN) looks again even when some owner
    /// is known. A socket the pass did not see waits for the next.
    pub fn attribute(&mut self, l: &mut Listener, listen: bool) {
        if !l.owners.is_empty() && !listen {
            return;
        }
        match self.table.get(&l.sock_ino) {
            Some(o) => l.owners.extend(o.clone()),
            None if l.sock_ino != 0 => {
                self.waiting.insert(l.key());
                self.request();
            }
            None => {}
        }
    }

    /// Listeners still waiting ask again (a pass refused by `MIN_GAP` is not lost).
    pub fn tick(&mut self) {
        if !self.waiting.is_empty() {
            self.request();
        }
    }

    /// The next pass, for the event loop's `select!`.
    pub async fn next(&mut self) -> Option<OwnerScan> {
        self.results.recv().await
    }

    /// Takes a pass in: the waiting listeners get their owners.
    pub fn apply(&mut self, scan: OwnerScan, model: &mut Model) {
        self.in_flight = false;
        self.table = scan.owners;
        self.unreadable = scan.unreadable;
        for key in std::mem::take(&mut self.waiting) {
            if let Some(l) = model.listeners.get_mut(&key) {
                if let Some(o) = self.table.get(&l.sock_ino) {
                    l.owners.extend(o.clone());
                }
            }
        }
    }

    /// A pass now, on this thread (the session is over), for every listener.
    pub fn finish(&mut self, model: &mut Model) {
        let scan = procs::scan(None);
        self.unreadable = scan.unreadable;
        for l in model.listeners.values_mut() {
            if let Some(o) = scan.owners.get(&l.sock_ino) {
                l.owners.extend(o.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_listener_unknown_to_the_last_pass_gets_its_owners_from_the_next() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", sock.as_raw_fd())).unwrap().ino();
        let mut model = Model::default();
        let l = Listener { sk: 1, sock_ino: ino, ..Default::default() };
        let key = l.key();
        model.listeners.insert(key, l);

        let mut r = Resolver::start();
        // Nothing scanned yet: the listener waits and a pass is asked for.
        r.attribute(model.listeners.get_mut(&key).unwrap(), false);
        assert!(model.listeners[&key].owners.is_empty());
        let scan = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), r.next()).await });
        r.apply(scan.expect("a pass within 20 s").expect("the thread answers"), &mut model);
        let owners = &model.listeners[&key].owners;
        assert!(owners.contains_key(&std::process::id()), "{owners:?}");
        // A second pass is not asked for within MIN_GAP, and nothing waits any more.
        r.request();
        assert!(!r.in_flight && r.waiting.is_empty());
    }
}
