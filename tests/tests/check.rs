//! `backlog-trace check` against network namespaces these tests create: exact limits,
//! exact member counts, exact counter deltas and exit codes.
//!
//! Needs root (ip netns, setns). Run with `--test-threads=1`: the tests are timing
//! sensitive and each one samples for a couple of seconds.
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use backlog_tests::netns::Netns;
use backlog_tests::scenario::{fence, settled, HeldAcks};
use backlog_tests::sys::{check, connect_nonblocking, set_sockopt, sockaddr, tcp_socket};
use backlog_tests::tracer::{tracer_bin, tracer_command};
use backlog_tests::workload::{Clients, Server, ServerSpec};
use serde_json::Value;

/// A TCP listener on 127.0.0.1:port in `ns`, made with listen(backlog): std's
/// TcpListener always listens with 128 and the tests need exact backlogs.
fn listen(ns: &Netns, port: u16, backlog: i32, reuseport: bool) -> TcpListener {
    ns.inside(move || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let fd = tcp_socket(&addr, 0);
        set_sockopt(fd, if reuseport { libc::SO_REUSEPORT } else { libc::SO_REUSEADDR }, 1, "setsockopt");
        let (sa, len) = sockaddr(addr);
        // SAFETY: `sa` is a valid sockaddr of length `len`; the fd goes to TcpListener.
        unsafe {
            check(libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len), "bind");
            check(libc::listen(fd, backlog), "listen");
            TcpListener::from_raw_fd(fd)
        }
    })
}

/// `n` non-blocking connects to 127.0.0.1:port in `ns`; the SYNs are on the wire on return.
fn connect_many(ns: &Netns, port: u16, n: usize) -> Vec<OwnedFd> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // SAFETY: each fd is a fresh socket this closure owns.
    ns.inside(move || (0..n).map(|_| unsafe { OwnedFd::from_raw_fd(connect_nonblocking(addr)) }).collect())
}

// ---------- the binary ----------

fn spawn_check(args: &[&str]) -> Child {
    tracer_command()
        .arg("check")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting backlog-trace")
}

/// Blocks until the binary says its sampling window is open (its stderr line), then
/// hands back the rest of stderr through the returned receiver.
fn wait_window_open(child: &mut Child) -> mpsc::Receiver<String> {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.starts_with("sampling "), "unexpected stderr: {line}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        let _ = tx.send(rest);
    });
    rx
}

fn check_json(args: &[&str]) -> (i32, Value) {
    let out = tracer_command().arg("check").args(args).arg("--json").output().expect("running backlog-trace");
    parse(out)
}

fn parse(out: Output) -> (i32, Value) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): stdout {stdout} stderr {}", String::from_utf8_lossy(&out.stderr)));
    assert_schema(&doc);
    (out.status.code().expect("exit code"), doc)
}

fn listeners_on(doc: &Value, port: u16) -> Vec<&Value> {
    doc["listeners"].as_array().unwrap().iter().filter(|l| l["port"] == port).collect()
}

fn counter(doc: &Value, ns: usize, name: &str) -> u64 {
    let c = doc["namespaces"][ns]["counters"].as_array().unwrap().iter().find(|c| c["name"] == name);
    c.unwrap_or_else(|| panic!("no counter {name}"))["delta"].as_u64().unwrap()
}

// ---------- the JSON schema ----------

/// Every object has exactly the fields of `spec` ("name:type …") with those types:
/// u (u64), n (number), s (string), b (boolean), a (array), o (object); a trailing
/// `?` also allows null.
fn fields(obj: &Value, what: &str, spec: &str) {
    let map = obj.as_object().unwrap_or_else(|| panic!("{what} is not an object: {obj}"));
    let spec: Vec<(&str, &str)> = spec.split_whitespace().map(|f| f.split_once(':').expect("name:type")).collect();
    let mut want: Vec<&str> = spec.iter().map(|(k, _)| *k).collect();
    let mut got: Vec<&str> = map.keys().map(String::as_str).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{what} fields");
    for (k, ty) in spec {
        let v = &map[k];
        let ok = match ty.trim_end_matches('?') {
            "u" => v.is_u64(),
            "n" => v.is_number(),
            "s" => v.is_string(),
            "b" => v.is_boolean(),
            "a" => v.is_array(),
            "o" => v.is_object(),
            other => panic!("unknown type {other} in the spec of {what}"),
        };
        assert!(ok || (ty.ends_with('?') && v.is_null()), "{what}.{k} has the wrong type: {v}");
    }
}

fn assert_schema(doc: &Value) {
    let report = "schema_version:u sample_seconds:n namespaces:a listeners:a findings:a not_visible:a exit_code:u";
    fields(doc, "report", report);
    assert_eq!(doc["schema_version"], 1);
    for ns in doc["namespaces"].as_array().unwrap() {
        fields(ns, "namespace", "inode:u name:s? sysctls:o counters:a drops:o");
        fields(&ns["drops"], "drops", "listen_drops:u socket_drops:u? socket_excess:u? all_listeners_seen:b");
        let sysctls =
            "somaxconn:u? tcp_max_syn_backlog:u? tcp_syncookies:u? tcp_abort_on_overflow:u? tcp_timestamps:u?";
        fields(&ns["sysctls"], "sysctls", sysctls);
        let names: Vec<&str> = ns["counters"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent"]
        );
        for c in ns["counters"].as_array().unwrap() {
            fields(c, "counter", "name:s start:u end:u delta:u per_second:n");
            assert_eq!(c["end"].as_u64().unwrap() - c["start"].as_u64().unwrap(), c["delta"].as_u64().unwrap());
        }
    }
    for l in doc["listeners"].as_array().unwrap() {
        let listener = "netns:u address:s port:u reuseport:b members:a syn_queue_now:u syn_queue_peak:u listen_drops:o";
        fields(l, "listener", listener);
        fields(&l["listen_drops"], "listen_drops", "min:u max:u");
        assert!(l["listen_drops"]["min"].as_u64() <= l["listen_drops"]["max"].as_u64(), "{l}");
        for m in l["members"].as_array().unwrap() {
            let member = "inode:u limit:u queue_now:u queue_peak:u samples:u samples_full:u full_seconds:n \
                          drops_total:u? drops_window:u? owners:a";
            fields(m, "member", member);
            for o in m["owners"].as_array().unwrap() {
                fields(o, "owner", "pid:u comm:s cpu:o?");
                if o["cpu"].is_object() {
                    fields(&o["cpu"], "cpu", "total_percent:n busiest_thread_percent:n threads:u");
                }
            }
        }
    }
    for f in doc["findings"].as_array().unwrap() {
        fields(f, "finding", "severity:s kind:s netns:u listener:s? summary:s evidence:s fix:s");
        assert!(["info", "warning", "critical"].contains(&f["severity"].as_str().unwrap()));
    }
    for n in doc["not_visible"].as_array().unwrap() {
        assert!(n.is_string());
    }
    let warned = doc["findings"].as_array().unwrap().iter().any(|f| f["severity"] != "info");
    assert_eq!(doc["exit_code"], i32::from(warned), "exit_code follows the findings");
}

// ---------- the tests ----------

#[test]
fn somaxconn_caps_listen_511_to_128() {
    let ns = Netns::new("chk");
    ns.sysctl("net.core.somaxconn", "128");
    let _l = listen(&ns, 8511, 511, false);

    let (code, doc) = check_json(&["--netns", ns.name(), "--sample", "1s"]);
    assert_eq!(code, 1);
    assert_eq!(doc["namespaces"].as_array().unwrap().len(), 1);
    assert_eq!(doc["namespaces"][0]["name"], ns.name());
    assert_eq!(doc["namespaces"][0]["sysctls"]["somaxconn"], 128);
    let l = listeners_on(&doc, 8511);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["address"], "127.0.0.1");
    assert_eq!(l[0]["members"][0]["limit"], 128);
    let me = std::process::id();
    assert!(l[0]["members"][0]["owners"].as_array().unwrap().iter().any(|o| o["pid"] == me), "owner is this test");
    let capped: Vec<&Value> =
        doc["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "capped_by_somaxconn").collect();
    assert_eq!(capped.len(), 1);
    assert_eq!(capped[0]["severity"], "warning");
    assert_eq!(capped[0]["listener"], "127.0.0.1:8511");
    assert!(capped[0]["summary"].as_str().unwrap().contains("capped by net.core.somaxconn at 128"));

    // The text report says the same to a person.
    let out = tracer_command().args(["check", "--netns", ns.name(), "--sample", "200ms"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("net.core.somaxconn=128"), "{text}");
    assert!(text.contains("limit 128"), "{text}");
    assert!(text.contains("capped by net.core.somaxconn at 128"), "{text}");
}

#[test]
fn overflowing_listener_is_named_and_its_drops_counted() {
    let ns = Netns::new("chk");
    let _full = listen(&ns, 8404, 4, false); // never accepts
    let _quiet = listen(&ns, 8405, 4, false); // no traffic: must not be blamed
    let overflows_before = ns.netstat().get("ListenOverflows");

    let mut child = spawn_check(&["--netns", ns.name(), "--sample", "3s", "--json"]);
    let stderr = wait_window_open(&mut child);
    // 50 handshakes at a queue that holds 5: the rest overflow. Closing the clients a
    // moment later stops SYN retransmits, so every drop falls inside the window.
    let clients = connect_many(&ns, 8404, 50);
    std::thread::sleep(Duration::from_millis(500));
    drop(clients);
    let out = child.wait_with_output().unwrap();
    let (code, doc) = parse(out);
    let overflows = ns.netstat().get("ListenOverflows") - overflows_before;
    let _ = stderr.recv_timeout(Duration::from_secs(5));

    assert!(overflows >= 40, "the kernel saw only {overflows} overflows");
    assert_eq!(counter(&doc, 0, "ListenOverflows"), overflows, "reported delta equals the kernel's");
    let rate = doc["namespaces"][0]["counters"][0]["per_second"].as_f64().unwrap();
    let secs = doc["sample_seconds"].as_f64().unwrap();
    assert!((rate - overflows as f64 / secs).abs() < 1e-6, "rate {rate} over {secs}s");
    assert_eq!(code, 1);

    let full = listeners_on(&doc, 8404);
    let m = &full[0]["members"][0];
    assert_eq!(m["limit"], 4);
    assert_eq!(m["queue_peak"], 5, "a listen(4) queue holds 5 before it drops");
    assert!(m["samples_full"].as_u64().unwrap() > 0);
    assert_eq!(m["drops_window"].as_u64().unwrap(), overflows, "the socket's own drop counter");
    // Every drop here is a SYN's, counted once by the socket: the share is exact.
    let drops_delta = counter(&doc, 0, "ListenDrops");
    assert_eq!(full[0]["listen_drops"], serde_json::json!({"min": drops_delta, "max": drops_delta}));
    assert_eq!(listeners_on(&doc, 8405)[0]["listen_drops"], serde_json::json!({"min": 0, "max": 0}));

    let drops: Vec<&Value> =
        doc["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "listen_drops").collect();
    assert_eq!(drops.len(), 1);
    assert_eq!(drops[0]["severity"], "critical");
    assert_eq!(drops[0]["listener"], "127.0.0.1:8404");
    let evidence = drops[0]["evidence"].as_str().unwrap();
    assert!(evidence.contains(&format!("ListenOverflows +{overflows}")), "{evidence}");
    assert!(!doc["findings"].as_array().unwrap().iter().any(|f| f["listener"] == "127.0.0.1:8405"));
}

#[test]
fn healthy_namespace_with_accepting_server_exits_0() {
    let ns = Netns::new("chk");
    let server = listen(&ns, 8080, 128, false);
    server.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    let acceptor = std::thread::spawn(move || {
        let mut accepted = 0;
        while accepted < 20 && Instant::now() < deadline {
            match server.accept() {
                Ok(_) => accepted += 1,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        accepted
    });

    let mut child = spawn_check(&["--netns", ns.name(), "--sample", "2s", "--json"]);
    let _stderr = wait_window_open(&mut child);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.extend(connect_many(&ns, 8080, 1));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, doc) = parse(child.wait_with_output().unwrap());
    drop(clients);
    let accepted = acceptor.join().unwrap();

    assert_eq!(accepted, 20, "the server accepted every client");
    assert_eq!(doc["findings"], Value::Array(Vec::new()));
    assert_eq!(code, 0);
    assert_eq!(counter(&doc, 0, "ListenOverflows"), 0);
    let l = listeners_on(&doc, 8080);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["members"][0]["limit"], 128);
    assert_eq!(l[0]["members"][0]["drops_window"], 0);
}

#[test]
fn reuseport_group_of_four_is_one_listener() {
    let ns = Netns::new("chk");
    let backlogs = [16, 32, 64, 100];
    let _members: Vec<TcpListener> = backlogs.iter().map(|&b| listen(&ns, 8443, b, true)).collect();

    let (_, doc) = check_json(&["--netns", ns.name(), "--sample", "500ms", "--port", "8443"]);
    assert_eq!(doc["listeners"].as_array().unwrap().len(), 1, "--port keeps only the group");
    let g = listeners_on(&doc, 8443);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0]["reuseport"], true);
    let members = g[0]["members"].as_array().unwrap();
    assert_eq!(members.len(), 4);
    let mut limits: Vec<u64> = members.iter().map(|m| m["limit"].as_u64().unwrap()).collect();
    limits.sort();
    assert_eq!(limits, [16, 32, 64, 100]);
    let me = std::process::id();
    assert!(members.iter().all(|m| m["owners"][0]["pid"] == me));
    let small: Vec<&Value> =
        doc["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "reuseport_small_members").collect();
    assert_eq!(small.len(), 1);
    assert!(small[0]["evidence"].as_str().unwrap().contains("member limits"), "{}", small[0]);
}

#[test]
fn syn_queue_counts_pending_handshakes() {
    let ns = Netns::new("chk");
    let _l = listen(&ns, 8600, 64, false);
    // Drop the handshakes' last ACK so every request stays in SYN_RECV.
    ns.exec(&[
        "nft",
        "add table inet bt; add chain inet bt in { type filter hook input priority 0; }; \
         add rule inet bt in tcp dport 8600 tcp flags & (syn|ack) == ack drop",
    ]);
    let _clients = connect_many(&ns, 8600, 10);

    let (_, doc) = check_json(&["--netns", ns.name(), "--sample", "500ms"]);
    let l = listeners_on(&doc, 8600);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["syn_queue_now"], 10);
    assert_eq!(l[0]["syn_queue_peak"], 10);
    assert_eq!(l[0]["members"][0]["queue_peak"], 0, "nothing completed the handshake");
}

/// As an unprivileged user (no capabilities) the check still reports our own
/// namespace's sysctls and counters, and says what it could not see.
#[test]
fn without_privileges_reports_what_it_can() {
    let ns = Netns::new("chk");
    let setpriv =
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"];
    let bin = tracer_bin();
    let bin = bin.to_str().unwrap();

    let mut cmd = setpriv.to_vec();
    cmd.extend_from_slice(&[bin, "check", "--sample", "300ms", "--json"]);
    let (code, doc) = parse(Command::new(cmd[0]).args(&cmd[1..]).output().unwrap());
    assert!(code == 0 || code == 1, "exit {code}");
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    let namespaces = doc["namespaces"].as_array().unwrap();
    assert_eq!(namespaces.len(), 1, "only its own namespace");
    assert_eq!(namespaces[0]["inode"], own);
    let want = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse::<u64>().unwrap();
    assert_eq!(namespaces[0]["sysctls"]["somaxconn"], want);
    assert_eq!(namespaces[0]["counters"].as_array().unwrap().len(), 5);
    let hidden: Vec<&str> = doc["not_visible"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(
        hidden.iter().any(|h| h.contains(ns.name()) && h.contains("could not enter")),
        "names the namespace it could not enter: {hidden:?}"
    );
    assert!(hidden.iter().any(|h| h.contains("open files of")), "says owners were hidden: {hidden:?}");

    // Asking for only that namespace leaves nothing to check: exit 2, one clear line.
    let mut cmd = setpriv.to_vec();
    cmd.extend_from_slice(&[bin, "check", "--netns", ns.name(), "--sample", "100ms"]);
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("run as root"), "{err}");
}

#[test]
fn bad_input_exits_2_without_panicking() {
    for args in [&["--netns", "no-such-netns-bt"][..], &["--sample", "soon"], &["--port", "0"], &["--netns", "4"]] {
        let out = tracer_command().arg("check").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

fn findings_for<'a>(doc: &'a Value, listener: &str, kind: &str) -> Vec<&'a Value> {
    doc["findings"].as_array().unwrap().iter().filter(|f| f["listener"] == listener && f["kind"] == kind).collect()
}

/// Final-ACK overflows at pending requests move the listener's own drop counter
/// twice (the listen drop, then the segment's discard), so check's drop count must
/// come from ListenDrops, not from that counter: it equals the namespace's
/// ListenDrops delta exactly, and the counter's excess is shown and explained.
#[test]
fn final_ack_overflow_drops_equal_listen_drops() {
    const PORT: u16 = 8090;
    let h = HeldAcks::new("1", PORT);
    // listen(8), never accepting.
    let _server = Server::start(&h.server_ns, ServerSpec::new(&h.server_addr, PORT));
    let mut child = spawn_check(&["--netns", h.server_ns.name(), "--sample", "15s", "--json"]);
    let stderr = wait_window_open(&mut child);
    let before = h.server_ns.netstat();
    // 9 handshakes held half-open: pending requests whose final ACK has not arrived.
    let held = Clients { send: true, hold_secs: 4, ..Clients::new(&h.server_addr, PORT, 9) };
    let held = held.start(&h.client_ns);
    assert_eq!(held.sent, Some(9), "harness problem: not every held handshake was answered");
    // Local clients (their ACKs not held) fill the accept queue past the requests.
    let local = Clients { hold_secs: 2, ..Clients::new(&h.server_addr, PORT, 20) }.start(&h.server_ns);
    std::thread::sleep(Duration::from_millis(300));
    // The held ACKs (and their retransmissions) now meet a full accept queue.
    h.release();
    held.finish();
    local.finish();
    fence(&h.server_ns);
    let d = settled(&h.server_ns).since(&before);
    assert!(
        child.try_wait().unwrap().is_none(),
        "harness problem: check's 15 s window closed before the workload settled (kernel deltas {d})"
    );
    let (code, doc) = parse(child.wait_with_output().unwrap());
    let _ = stderr.recv_timeout(Duration::from_secs(5));
    let ld = d.get("ListenDrops");
    assert!(ld > 0 && d.get("ListenOverflows") > 0, "harness problem: nothing overflowed: {d}");
    assert_eq!(code, 1);
    assert_eq!(counter(&doc, 0, "ListenDrops"), ld, "check's reading vs the test's: {d}");

    let endpoint = format!("{}:{PORT}", h.server_addr);
    let g = listeners_on(&doc, PORT);
    assert_eq!(g.len(), 1, "{doc:#}");
    let rise: u64 = g[0]["members"].as_array().unwrap().iter().map(|m| m["drops_window"].as_u64().unwrap()).sum();
    println!("ListenDrops +{ld}, ListenOverflows +{}, socket drop counter +{rise}", d.get("ListenOverflows"));
    assert!(rise > ld, "the scenario must make the socket count final-ACK overflows twice: +{rise} vs {d}");
    assert_eq!(g[0]["listen_drops"], serde_json::json!({"min": ld, "max": ld}), "the share is ListenDrops exactly");
    let drops = &doc["namespaces"][0]["drops"];
    assert_eq!(
        drops,
        &serde_json::json!({"listen_drops": ld, "socket_drops": rise, "socket_excess": rise - ld,
                            "all_listeners_seen": true})
    );
    let found = findings_for(&doc, &endpoint, "listen_drops");
    assert_eq!(found.len(), 1, "{doc:#}");
    let summary = found[0]["summary"].as_str().unwrap();
    assert!(summary.contains(&format!("dropped {ld} connection attempt(s): all of")), "{summary}");
    assert!(!summary.contains(&rise.to_string()), "{summary}");
    let evidence = found[0]["evidence"].as_str().unwrap();
    let explained = format!("rose by {rise}: {ld} listen drops and {} more", rise - ld);
    assert!(evidence.contains(&explained) && evidence.contains("twice"), "{evidence}");
}

/// An owner that never accepts, idle, with its queue full in every sample: check
/// says the application is stuck and that a deeper queue would only add latency.
#[test]
fn idle_owner_with_a_queue_always_full_is_a_stuck_application() {
    const PORT: u16 = 8091;
    let ns = Netns::new("chk");
    let _server = Server::start(&ns, ServerSpec::new("127.0.0.1", PORT));
    // Full before the window opens (listen(8) holds 9); the rest retransmit SYNs.
    let _clients = connect_many(&ns, PORT, 30);
    std::thread::sleep(Duration::from_millis(500));
    let (code, doc) = check_json(&["--netns", ns.name(), "--sample", "2s"]);
    assert_eq!(code, 1);
    let m = &listeners_on(&doc, PORT)[0]["members"][0];
    assert_eq!(m["samples_full"], m["samples"], "full in every sample: {m}");
    let cpu = m["owners"][0]["cpu"]["total_percent"].as_f64().expect("the owner's CPU was read");
    assert!(cpu < 1.0, "bt-server sleeps: {m}");
    let fill = findings_for(&doc, &format!("127.0.0.1:{PORT}"), "accept_queue_filling");
    assert_eq!(fill.len(), 1, "{doc:#}");
    assert!(fill[0]["summary"].as_str().unwrap().contains("the application is not accepting"), "{}", fill[0]);
    let fix = fill[0]["fix"].as_str().unwrap();
    assert!(fix.contains("stuck, not slow") && fix.contains("only make clients wait longer"), "{fix}");
    assert!(!fix.contains("Raise the listen backlog"), "{fix}");
}

/// A SO_REUSEPORT group whose members all overflow is one listener: one filling
/// finding naming every member, one drops finding with the group's exact share.
#[test]
fn a_reuseport_group_gets_one_finding_per_kind() {
    const PORT: u16 = 8092;
    let ns = Netns::new("chk");
    let _members: Vec<TcpListener> = (0..3).map(|_| listen(&ns, PORT, 2, true)).collect();
    let mut child = spawn_check(&["--netns", ns.name(), "--sample", "3s", "--json"]);
    let stderr = wait_window_open(&mut child);
    // 90 handshakes over three queues that hold 3 each: all three overflow.
    let clients = connect_many(&ns, PORT, 90);
    std::thread::sleep(Duration::from_millis(500));
    drop(clients);
    let (_, doc) = parse(child.wait_with_output().unwrap());
    let _ = stderr.recv_timeout(Duration::from_secs(5));

    let endpoint = format!("127.0.0.1:{PORT}");
    let g = listeners_on(&doc, PORT);
    assert_eq!(g.len(), 1);
    let members = g[0]["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["queue_peak"] == 3), "every member filled: {members:#?}");
    let fill = findings_for(&doc, &endpoint, "accept_queue_filling");
    assert_eq!(fill.len(), 1, "one finding for the group: {doc:#}");
    assert!(
        fill[0]["summary"].as_str().unwrap().contains("SO_REUSEPORT group of 3): 3 member queue(s)"),
        "{}",
        fill[0]
    );
    assert_eq!(fill[0]["evidence"].as_str().unwrap().matches("socket inode").count(), 3, "{}", fill[0]);
    let drops = findings_for(&doc, &endpoint, "listen_drops");
    assert_eq!(drops.len(), 1, "{doc:#}");
    let ld = counter(&doc, 0, "ListenDrops");
    assert!(ld > 0);
    assert_eq!(g[0]["listen_drops"], serde_json::json!({"min": ld, "max": ld}));
}
