//! Every listener on screen (issue 12): listeners older than the tracer appear from
//! its first interval with the limits and queues sock_diag reports; text tables fit
//! 100 columns with IPv6 listeners; an unbound listen() shows the port the kernel
//! chose; SO_REUSEPORT sockets name the worker that accepts from each.
//!
//!   cargo test -p backlog-tests --test listeners -- --test-threads=1
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use backlog_tests::netns::Netns;
use backlog_tests::scenario::{traced, Run};
use backlog_tests::sys::{check, connect_nonblocking, sockaddr, tcp_socket};
use backlog_tests::tracer::Tracer;
use backlog_tests::wait_for;
use backlog_tests::workload::{Clients, Server, ServerSpec};
use backlog_user::sys::diag::Diag;

/// port -> (accept-queue length, limit) of every listener in `ns`, as `ss -lnt` sees them.
fn kernel_listeners(ns: &Netns) -> BTreeMap<u16, (u32, u32)> {
    let listed = ns.inside(|| Diag::open().and_then(|mut d| d.listeners()));
    let listed = listed.unwrap_or_else(|e| panic!("sock_diag in {}: {e}", ns.name()));
    listed.iter().map(|e| (e.port, (e.rqueue, e.wqueue))).collect()
}

/// Four listeners in a new namespace: IPv4 on two addresses, IPv6 (a long address),
/// and one stuck full (limit 4, 5 queued: `ss` shows LISTEN 5 4).
struct Four {
    ns: Netns,
    _servers: Vec<Server>,
    _clients: backlog_tests::workload::ClientBatch,
}

const V6: &str = "2001:db8:85a3:1234:5678:8a2e:370:7334";

fn four_listeners(tag: &str) -> Four {
    let ns = Netns::new(tag);
    ns.exec(&["ip", "-6", "addr", "add", &format!("{V6}/128"), "dev", "lo", "nodad"]);
    ns.exec(&["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"]);
    let specs = [("127.0.0.1", 7101, 3), ("127.0.0.2", 7102, 17), (V6, 7103, 64), ("127.0.0.1", 7104, 4)];
    let servers: Vec<Server> = specs
        .iter()
        .map(|&(addr, port, backlog)| Server::start(&ns, ServerSpec { backlog, ..ServerSpec::new(addr, port) }))
        .collect();
    // No accept: 5 connections stay queued, the 5th admitted at length 4 <= limit 4.
    let clients = Clients { hold_secs: 60, ..Clients::new("127.0.0.1", 7104, 5) }.start(&ns);
    wait_for("the full listener's queue to reach 5", Duration::from_secs(20), || {
        (kernel_listeners(&ns).get(&7104) == Some(&(5, 4))).then_some(())
    });
    Four { ns, _servers: servers, _clients: clients }
}

#[test]
fn listeners_older_than_the_tracer_appear_from_the_first_interval() {
    let four = four_listeners("old");
    let ns = &four.ns;
    let kernel = kernel_listeners(ns);
    assert_eq!(kernel.len(), 4, "harness: four listeners expected in {}: {kernel:?}", ns.name());
    let before = ns.netstat();
    let mut tracer = Tracer::start(&["--netns", ns.name(), "--interval", "1"]);
    let first = RefCell::new(None);
    tracer.wait_line("interval", Duration::from_secs(30), |v| {
        first.replace(Some(v.clone()));
        true
    });
    let first = first.into_inner().expect("an interval line");
    let status = tracer.stop_sigint();
    assert!(status.success(), "tracer ended {status}; stderr:\n{}", tracer.stderr());
    let after = ns.netstat();

    // The first interval lists every listener with the kernel's limit and queue now.
    let shown: BTreeMap<u16, (u32, u32)> = first["listeners"]
        .as_array()
        .expect("listeners array")
        .iter()
        .filter(|l| l["netns"] == ns.inode())
        .map(|l| {
            assert_eq!(l["netns_name"], ns.name(), "{l}");
            let n = |k: &str| l[k].as_u64().unwrap_or_else(|| panic!("{k} in {l}")) as u32;
            (n("port") as u16, (n("queue_len"), n("queue_max")))
        })
        .collect();
    assert_eq!(shown, kernel, "first interval vs sock_diag: {first}");
    assert!(first["ts_ns"].as_u64().is_some_and(|t| t > 1_700_000_000_000_000_000), "interval ts_ns: {first}");
    assert_eq!(first["totals"]["listeners"], 4, "{first}");

    // And the summary: four listeners with their limits; drops exactly the kernel's.
    let summary = tracer.summary();
    let mut limits: BTreeMap<u16, u32> = BTreeMap::new();
    for l in summary.listeners.iter().filter(|l| l.netns == ns.inode()) {
        assert!(!l.pids.is_empty(), "owners of {}: {l:?}", l.local);
        limits.insert(l.port, l.queue_max);
    }
    let expected: BTreeMap<u16, u32> = kernel.iter().map(|(p, (_, max))| (*p, *max)).collect();
    assert_eq!(limits, expected, "summary limits vs sock_diag");
    assert_eq!(summary.totals["listeners"], 4);
    let drops = after.since(&before).get("ListenDrops");
    assert_eq!(summary.totals["drops"], drops, "summary drops vs ListenDrops delta");
    assert_eq!(summary.netns(ns.inode()).listen_drops, drops);
    assert_eq!(summary.undetected, 0);
}

#[test]
fn text_table_fits_100_columns_with_ipv6_listeners() {
    let four = four_listeners("txt");
    let ns = &four.ns;
    let mut tracer = Tracer::spawn(&["--netns", ns.name(), "--interval", "1", "--duration", "3s"]);
    let status = tracer.wait_exit();
    assert!(status.success(), "tracer ended {status}; stderr:\n{}", tracer.stderr());
    let out = tracer.stdout();
    println!("{}", out.join("\n"));
    // Every line after the start line (which names the kernel): tables and summary.
    for line in &out[1..] {
        assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
    }
    let text = out.join("\n");
    // Every listener by address, the IPv6 one cut in its middle, its port kept.
    for local in ["127.0.0.1:7101", "127.0.0.2:7102", ":7334]:7103", "127.0.0.1:7104"] {
        assert!(text.contains(local), "{local} missing:\n{text}");
    }
    assert!(text.contains("5/4"), "the full listener's queue 5/4:\n{text}");
    assert!(text.contains(&format!(" {}", &ns.name()[..9])), "the netns name:\n{text}");
    assert!(text.contains("drops at 4 listeners"), "summary line:\n{text}");
    // Each interval table starts with its time (UTC).
    let stamped = out.iter().filter(|l| l.contains("Z  last ") && l.contains("s: ")).count();
    assert!(stamped >= 1, "no timestamped interval:\n{text}");
    assert!(!text.contains("ACCEPTQ"), "{text}");
}

/// A socket listening without bind(): the kernel picks its port inside listen().
fn unbound_listener(backlog: i32) -> (RawFd, u16) {
    let any: SocketAddr = "0.0.0.0:0".parse().expect("address");
    let fd = tcp_socket(&any, 0);
    // SAFETY: plain syscall on our socket.
    check(unsafe { libc::listen(fd, backlog) }, "listen");
    let (mut sa, mut len) = sockaddr(any);
    // SAFETY: `sa`/`len` describe a sockaddr_storage.
    check(unsafe { libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) }, "getsockname");
    // SAFETY: an AF_INET address.
    let port = u16::from_be(unsafe { (*(&sa as *const _ as *const libc::sockaddr_in)).sin_port });
    (fd, port)
}

#[test]
fn an_unbound_listen_shows_the_port_the_kernel_chose() {
    let ns = Netns::new("unb");
    let mut port = 0;
    let run = traced(&[&ns], &[], || {
        let (fd, p) = ns.inside(|| unbound_listener(1));
        port = p;
        assert_ne!(port, 0);
        // Three connects: two queued (limit 1 admits length 1), the rest dropped.
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let conns: Vec<RawFd> = ns.inside(move || (0..3).map(|_| connect_nonblocking(target)).collect());
        wait_for("the unbound listener's queue to fill", Duration::from_secs(20), || {
            (kernel_listeners(&ns).get(&port).map(|q| q.0) == Some(2)).then_some(())
        });
        std::thread::sleep(Duration::from_millis(1500));
        for c in conns.into_iter().chain([fd]) {
            // SAFETY: our sockets, closed once.
            unsafe { libc::close(c) };
        }
    });
    let listeners = run.listeners(&ns);
    assert!(listeners.iter().all(|l| l.port != 0), "a listener shown on port 0: {listeners:#?}");
    let l = run.listener(&ns, port);
    assert_eq!(l.queue_max, 1, "{l:?}");
    let drops = run.delta(&ns).get("ListenDrops");
    assert_eq!(l.drops, drops, "drops at the unbound listener vs ListenDrops");
}
/// Runs `spec`'s accepting server in `ns` under the tracer (with `extra`) while
/// `clients` connect; returns once every connection was accepted: the run, the
/// server, and how many connections the kernel made (PassiveOpens).
fn accepting_run(ns: &Netns, spec: ServerSpec, extra: &[&str], clients: impl FnOnce()) -> (Run, Server, u64) {
    let mut server = None;
    let mut passive = 0;
    let run = traced(&[ns], extra, || {
        let s = Server::start(ns, spec);
        let before = ns.counters("/proc/net/snmp", "Tcp")["PassiveOpens"];
        clients();
        wait_for("every connection accepted", Duration::from_secs(30), || {
            let q = kernel_listeners(ns);
            (q.values().all(|(len, _)| *len == 0)).then_some(())
        });
        passive = ns.counters("/proc/net/snmp", "Tcp")["PassiveOpens"] - before;
        std::thread::sleep(Duration::from_millis(1500));
        server = Some(s);
    });
    (run, server.expect("server started"), passive)
}

#[test]
fn reuseport_sockets_name_the_worker_that_accepts_from_each() {
    let ns = Netns::new("rup");
    let spec =
        ServerSpec { accept: "all".into(), fork: 2, reuseport: 2, pin: true, ..ServerSpec::new("127.0.0.1", 7201) };
    let connections = 40;
    let (run, server, passive) =
        accepting_run(&ns, spec, &[], || Clients::new("127.0.0.1", 7201, connections).run(&ns));
    assert_eq!(server.pinned.len(), 2, "{:?}", server.pinned);
    assert_eq!(passive, u64::from(connections), "harness: PassiveOpens");
    let on_port = run.listeners_on(&ns, 7201);
    assert_eq!(on_port.len(), 2, "{on_port:#?}");
    let mut total = 0;
    for l in &on_port {
        // Both sockets are held by the master and both workers, as `ss -tlnp` shows.
        let mut pids = l.pids.clone();
        pids.sort_unstable();
        let mut all = server.pids.clone();
        all.sort_unstable();
        assert_eq!(pids, all, "owners of {l:?}");
        // Only the worker pinned to this socket accepted from it.
        let (worker, _) = server.pinned.iter().find(|(_, ino)| *ino == l.inode).expect("a pinned worker per socket");
        let acceptors: Vec<(u32, u64)> = l.accepted_by.iter().map(|a| (a.pid, a.accepts)).collect();
        assert_eq!(acceptors, vec![(*worker, l.accepts)], "accepted_by of {l:?}");
        assert!(l.accepted_by[0].comm.starts_with("bt-server"), "{l:?}");
        total += l.accepts;
    }
    assert_eq!(total, passive, "accepts at both sockets vs PassiveOpens");
}

/// Six forked workers take turns accepting from one shared socket while the tracer
/// syncs every 200 ms: each CPU holds back the accepts of a few of them at a time
/// (backlog-ebpf/src/accept/batch.rs, four slots, more workers than that), and every
/// accept must still be counted, once, under a worker.
#[test]
fn many_workers_on_one_socket_are_each_counted_across_syncs() {
    let ns = Netns::new("wrk6");
    let spec = ServerSpec { accept: "all".into(), fork: 6, backlog: 128, ..ServerSpec::new("127.0.0.1", 7202) };
    let (batches, per_batch) = (5, 40);
    let (run, server, passive) = accepting_run(&ns, spec, &["--interval", "200ms"], || {
        for _ in 0..batches {
            Clients { hold_secs: 0, ..Clients::new("127.0.0.1", 7202, per_batch) }.run(&ns);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert_eq!(passive, u64::from(batches * per_batch), "harness: PassiveOpens");
    let l = run.listener(&ns, 7202);
    assert_eq!(l.accepts, passive, "accepts vs PassiveOpens: {l:#?}");
    let by_workers: u64 = l.accepted_by.iter().map(|a| a.accepts).sum();
    assert_eq!(by_workers, l.accepts, "accepted_by adds up to the accepts: {l:#?}");
    for a in &l.accepted_by {
        assert!(server.pids[1..].contains(&a.pid), "accepted by {} , not one of the workers {:?}", a.pid, server.pids);
        assert!(a.comm.starts_with("bt-server"), "{a:?}");
    }
}
