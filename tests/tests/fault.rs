//! Never silent: when one of the tracer's programs is taken away from outside while
//! drops happen, the tracer names the program, reports the drops it could no longer
//! detect as undetected, and detected + undetected still equals ListenDrops.
//!
//! Tracepoint mode, whose cgroup_skb ingress program opens every detection window
//! and is the one program an operator can detach (`bpftool link detach`); the other
//! modes' links (tracing, perf_event) have no detach operation.
//!
//!   cargo test -p backlog-tests --test fault -- --test-threads=1
use std::time::Duration;

use backlog_tests::bpf::{cgroup_links_of, detach_link};
use backlog_tests::netns::Netns;
use backlog_tests::scenario::traced_with;
use backlog_tests::workload::{Clients, Server, ServerSpec};
use backlog_tests::{require_root, wait_for};

const PORT: u16 = 8080;

#[test]
fn a_program_detached_from_outside_is_named_and_its_drops_are_undetected_not_lost() {
    require_root();
    let mode = std::env::var("BACKLOG_MODE").ok();
    assert!(
        mode.as_deref().is_none_or(|m| m == "tracepoint"),
        "this test detaches the tracepoint mode's cgroup_skb program: run it without BACKLOG_MODE or with \
         BACKLOG_MODE=tracepoint (got {mode:?})"
    );
    let extra: &[&str] = if mode.is_none() { &["--mode", "tracepoint"] } else { &[] };
    let ns = Netns::new("fault");
    let _server = Server::start(&ns, ServerSpec::new("127.0.0.1", PORT));
    let flood = || Clients::new("127.0.0.1", PORT, 300).run(&ns);
    let run = traced_with(&[&ns], extra, |tracer| {
        // Detected while attached.
        flood();
        let links = cgroup_links_of(tracer.pid());
        let [link] = links.as_slice() else { panic!("expected one cgroup link held by the tracer, got {links:?}") };
        detach_link(*link);
        wait_for("the tracer to name the detached program", Duration::from_secs(10), || {
            tracer.stderr().contains("bt_tp_ingress").then_some(())
        });
        // Missed: nothing opens a detection window any more.
        flood();
    });
    let d = run.delta(&ns);
    run.expect_kernel(&ns, "ListenOverflows");
    run.assert_accounted(&ns);
    let s = run.summary();
    let n = s.netns(ns.inode());
    println!("kernel {d}; tracer: detected {}, undetected {} ({} unplaced)", n.detected, n.undetected, n.unplaced);
    assert!(n.detected > 0, "drops before the detach are detected: {n:#?}");
    assert!(n.undetected > 0, "drops after the detach are undetected: {n:#?}");
    assert_eq!(s.undetected, n.undetected, "the total is this namespace's: {s:#?}");
    assert!(s.detached.iter().any(|l| l.contains("bt_tp_ingress")), "{:?}", s.detached);
    // One listener, alive throughout: its own drop counter places every missed drop at it.
    let l = run.listener(&ns, PORT);
    assert_eq!((l.undetected, n.unplaced), (n.undetected, 0), "{l:#?}");
    assert_eq!(l.drops + l.undetected, d.get("ListenDrops"), "{l:#?}");
    // Every detected drop printed a line; the undetected ones could not.
    let lines = run.drops().iter().filter(|e| e.netns == ns.inode()).count() as u64;
    assert_eq!(lines, n.detected);
    assert!(run.stderr().contains("stopped running"), "{}", run.stderr());
}
