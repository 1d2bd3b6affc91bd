//! `--prometheus ADDR`: the model's exact counters as Prometheus metrics.
//!
//! Series are labelled by network namespace, port and owning command, summed over
//! the sockets that share those (SO_REUSEPORT groups, IPv4 and IPv6 listeners on
//! one port), so the number of series stays bounded by the listeners, never by the
//! peers. A port of the ephemeral range is labelled `ephemeral` for a listener's
//! whole life, and closed listeners' counts stay in their series through their merge
//! into aggregates (retired.rs), so neither churn on port 0 nor closing adds series
//! or moves counts between them. Values are copied from the model at each sync; the
//! body is encoded at the first scrape after a sync and shared by every scrape until
//! the next one.
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use backlog_common::{hist, DropReason, N_REASONS};
use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::http::{self, Limits, Render, Stats};
use crate::event::ListenerEvent;
use crate::model::retired::{comm_label, PortClass};
use crate::model::{Filter, Listener, Model};
use crate::session::observer::{Observer, Started};

/// "9464" means 127.0.0.1:9464: metrics stay on the host unless an address is given.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| format!("'{s}' is neither a port nor an address:port (e.g. 9464, 0.0.0.0:9464, [::1]:9464)"))
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Labels {
    netns: u32,
    port: PortClass,
    comm: String,
}

/// Wait buckets by power-of-two upper bound in µs (1, 2, 4 … 2^31), then +Inf.
const WAIT_SLOTS: usize = 33;

#[derive(Clone, Debug, Default)]
struct Series {
    drops: [u64; N_REASONS],
    accepts: u64,
    abandoned: u64,
    queue_len: u64,
    queue_max: u64,
    wait: Vec<u64>,
    /// Estimated from bucket midpoints: the kernel keeps counts, not a sum.
    wait_sum_us: f64,
}

#[derive(Debug, Default)]
struct Values {
    series: BTreeMap<Labels, Series>,
    lost_events: u64,
    missed_runs: u64,
    /// Undetected drops by namespace label (an inode, or "gone" for namespaces
    /// summed after they went away).
    undetected: Vec<(String, u64)>,
    diagnostics: Vec<(&'static str, u64)>,
    detached: u64,
}

fn wait_slot(bucket: usize) -> usize {
    if bucket == hist::BUCKETS - 1 {
        return WAIT_SLOTS - 1; // the catch-all bucket
    }
    let (_, hi) = hist::bounds(bucket);
    hi.next_power_of_two().trailing_zeros() as usize
}

fn add(s: &mut Series, l: &Listener) {
    for (a, b) in s.drops.iter_mut().zip(l.drops) {
        *a += b;
    }
    s.accepts += l.accepts;
    s.abandoned += l.abandoned;
    s.queue_len += u64::from(l.queue_len);
    s.queue_max += u64::from(l.queue_max);
    s.wait.resize(WAIT_SLOTS, 0);
    for (i, n) in l.wait.buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
        s.wait[wait_slot(i)] += n;
        let (lo, hi) = hist::bounds(i);
        s.wait_sum_us += *n as f64 * (lo + hi) as f64 / 2.0;
    }
}

impl Values {
    fn of(model: &Model, filters: &Filter) -> Values {
        let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
        let policy = model.retired.policy();
        for l in model.matching(filters) {
            let labels = Labels { netns: l.netns, port: policy.class(l.port), comm: comm_label(l) };
            add(series.entry(labels).or_default(), l);
        }
        for (k, a) in model.retired.matching() {
            let labels = Labels { netns: k.netns, port: k.port, comm: k.comm.clone() };
            add(series.entry(labels).or_default(), &a.sum);
        }
        let r = &model.reconciled;
        let mut undetected: Vec<(String, u64)> =
            r.selected(&filters.netns).map(|(inode, n)| (inode.to_string(), n.undetected)).collect();
        if filters.netns.is_empty() && r.folded.namespaces > 0 {
            undetected.push(("gone".into(), r.folded.undetected));
        }
        Values {
            series,
            lost_events: model.totals.lost_events,
            missed_runs: model.missed_runs,
            undetected,
            diagnostics: model.diagnostics.clone(),
            detached: model.detached.len() as u64,
        }
    }
}

#[derive(Debug)]
struct Metrics(Arc<Mutex<Values>>, Arc<Stats>);

fn labels(l: &Labels) -> Vec<(&'static str, String)> {
    vec![("netns", l.netns.to_string()), ("port", l.port.label()), ("comm", l.comm.clone())]
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, get: &dyn Fn(&Series) -> u64| {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (l, s) in &snap.series {
                ConstCounter::new(get(s)).encode(m.encode_family(&labels(l))?)?;
            }
            Ok::<(), fmt::Error>(())
        };
        let mut m = enc.encode_descriptor(
            "backlog_drops",
            "Connections dropped at the listener, by reason (exact kernel counts)",
            None,
            MetricType::Counter,
        )?;
        for (l, s) in &snap.series {
            for r in DropReason::ALL {
                let mut ls = labels(l);
                ls.push(("reason", r.name().to_string()));
                ConstCounter::new(s.drops[r as usize]).encode(m.encode_family(&ls)?)?;
            }
        }
        counter(&mut enc, "backlog_accepts", "Connections taken off the accept queue by accept()", &|s| s.accepts)?;
        counter(&mut enc, "backlog_abandoned", "Queued connections that left the queue unaccepted", &|s| s.abandoned)?;
        let mut m = enc.encode_descriptor(
            "backlog_accept_wait_seconds",
            "Time connections waited in the accept queue (sum estimated from bucket midpoints)",
            None,
            MetricType::Histogram,
        )?;
        for (l, s) in &snap.series {
            let buckets: Vec<(f64, u64)> = (0..WAIT_SLOTS)
                .map(|i| {
                    let le = if i == WAIT_SLOTS - 1 { f64::INFINITY } else { (1u64 << i) as f64 / 1e6 };
                    (le, s.wait.get(i).copied().unwrap_or(0))
                })
                .collect();
            let count = buckets.iter().map(|b| b.1).sum();
            m.encode_family(&labels(l))?.encode_histogram::<NoLabelSet>(s.wait_sum_us / 1e6, count, &buckets, None)?;
        }
        for (name, help, get) in [
            (
                "backlog_queue_length",
                "Accept-queue length when last seen",
                (|s: &Series| s.queue_len) as fn(&Series) -> u64,
            ),
            ("backlog_queue_limit", "Accept-queue limit (min(backlog, somaxconn))", |s: &Series| s.queue_max),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (l, s) in &snap.series {
                ConstGauge::new(get(s) as i64).encode(m.encode_family(&labels(l))?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "backlog_undetected_drops",
            "Listen drops the namespace's TcpExt ListenDrops counted that the tracer did not detect",
            None,
            MetricType::Counter,
        )?;
        for (netns, n) in &snap.undetected {
            ConstCounter::new(*n).encode(m.encode_family(&[("netns", netns.as_str())])?)?;
        }
        let mut m = enc.encode_descriptor(
            "backlog_diagnostics",
            "Ways the kernel side saw less than everything, by kind (see README)",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in &snap.diagnostics {
            ConstCounter::new(*n).encode(m.encode_family(&[("kind", *kind)])?)?;
        }
        for (name, help, v) in [
            ("backlog_lost_events", "Events the ring buffer could not take (counters stay exact)", snap.lost_events),
            (
                "backlog_missed_runs",
                "Runs of the tracer's programs the kernel skipped (each may hide a drop)",
                snap.missed_runs,
            ),
        ] {
            ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let m = enc.encode_descriptor(
            "backlog_programs_detached",
            "The tracer's programs detached from outside (their drops count as undetected)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snap.detached as i64).encode(m)?;
        let endpoint = &self.1;
        for (name, help, v) in [
            (
                "backlog_metrics_refused",
                "Metrics connections closed at once: the endpoint's connection cap was reached",
                &endpoint.refused,
            ),
            (
                "backlog_metrics_timeouts",
                "Metrics connections cut off at a deadline (request head or whole exchange)",
                &endpoint.timed_out,
            ),
            (
                "backlog_metrics_accept_errors",
                "Failed accepts on the metrics port (EMFILE and the like), each followed by a back-off",
                &endpoint.accept_errors,
            ),
        ] {
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(enc.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

pub struct Prometheus {
    values: Arc<Mutex<Values>>,
    /// The body encoded from the current snapshot, once a scrape asked for it.
    body: Arc<Mutex<Option<Bytes>>>,
    filters: Filter,
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The body of the current snapshot: encoded by the first scrape after a sync, then
/// shared (a reference count, not a copy) by every scrape until the next sync.
fn cached(body: &Mutex<Option<Bytes>>, registry: &Registry) -> Bytes {
    let mut cache = body.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .get_or_insert_with(|| {
            let mut text = String::new();
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, registry);
            Bytes::from(text)
        })
        .clone()
}

/// Connections the kernel may queue for the endpoint: a burst of them waits there
/// while the tracer's thread is busy, rather than having its SYNs dropped (a bare
/// bind queues 128).
const LISTEN_BACKLOG: u32 = 1024;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Prometheus {
    /// Starts serving http://ADDR/metrics on a thread of its own, with its own
    /// runtime: a session busy in a system call (a BPF map walk, an RCU grace period
    /// on a loaded host) never leaves scrapes or the accept queue waiting, and
    /// nothing on the endpoint (a flood of clients, a panic) can stall or end the
    /// session's loop.
    pub async fn serve(addr: SocketAddr, filters: Filter) -> Result<Prometheus> {
        // The fd limit in force (raised to the hard limit at start) sizes the cap.
        let limits = Limits::for_nofile(crate::sys::limits::nofile().map_or(1024, |(soft, _)| soft));
        let (prom, render, stats) = Prometheus::new(filters);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return drop(bound_tx.send(Err(e))),
                };
                rt.block_on(async move {
                    let listener = match listen(addr) {
                        Ok(l) => l,
                        Err(e) => return drop(bound_tx.send(Err(e))),
                    };
                    let _ = bound_tx.send(listener.local_addr());
                    http::serve(listener, render, limits, stats).await
                });
            })
            .context("starting the metrics thread")?;
        let bound = bound_rx
            .recv()
            .context("the metrics thread ended before listening")?
            .with_context(|| format!("cannot listen on {addr} for --prometheus (choose a free port)"))?;
        eprintln!(
            "backlog-trace: Prometheus metrics on http://{bound}/metrics (at most {} connections at once)",
            limits.max_connections
        );
        Ok(prom)
    }

    fn new(filters: Filter) -> (Prometheus, Render, Arc<Stats>) {
        let values = Arc::new(Mutex::new(Values::default()));
        let stats = Arc::new(Stats::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Metrics(values.clone(), stats.clone())));
        let body = Arc::new(Mutex::new(None));
        let shared = body.clone();
        let render: Render = Arc::new(move || (CONTENT_TYPE, cached(&shared, &registry)));
        (Prometheus { values, body, filters }, render, stats)
    }

    fn update(&self, model: &Model) {
        let snap = Values::of(model, &self.filters);
        *self.values.lock().unwrap_or_else(|p| p.into_inner()) = snap;
        *self.body.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Observer for Prometheus {
    fn name(&self) -> &'static str {
        "the metrics endpoint"
    }

    fn started(&mut self, _s: &Started) -> Result<()> {
        Ok(())
    }

    fn event(&mut self, _ev: &ListenerEvent, _l: &Listener) {}

    fn synced(&mut self, model: &Model) -> Result<()> {
        self.update(model);
        Ok(())
    }

    fn finish(&mut self, model: &Model, _secs: f64) -> Result<()> {
        self.update(model);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(parse_listen_addr("9464"), Ok("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(parse_listen_addr("0.0.0.0:9100"), Ok("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(parse_listen_addr("[::1]:9100"), Ok("[::1]:9100".parse().unwrap()));
        assert!(parse_listen_addr("localhost").is_err());
    }

    #[test]
    fn wait_slots_are_power_of_two_bounds() {
        assert_eq!(wait_slot(0), 0); // [0, 1) µs fits le=1µs
        assert_eq!(wait_slot(hist::bucket(3)), 2); // [3, 4) fits le=4
        assert_eq!(wait_slot(hist::bucket(1000)), 10); // [960, 1024) fits le=1024
        assert_eq!(wait_slot(hist::BUCKETS - 1), WAIT_SLOTS - 1);
        for b in 0..hist::BUCKETS - 1 {
            assert!((hist::bounds(b).1 - 1) < 1u64 << wait_slot(b) || wait_slot(b) == 0);
        }
    }

    #[test]
    fn listeners_sharing_labels_are_summed_and_encoded() {
        let mut model = Model::default();
        for (sk, drops) in [(1u64, [3, 0, 1, 0]), (2, [2, 0, 0, 0]), (3, [5, 5, 5, 5])] {
            let l = model.listeners.entry(backlog_common::ListenerKey { sk, ino: 0 }).or_default();
            l.sk = sk;
            l.port = if sk == 3 { 9090 } else { 8080 };
            l.netns = 7;
            l.drops = drops;
            l.accepts = 10;
            l.owners.insert(100 + sk as u32, "srv".into());
            l.wait.record(1_500_000); // 1.5 ms
        }
        model.missed_runs = 4;
        model.diagnostics = vec![("windows_replaced", 2)];
        let blue = crate::model::NetnsCounts { undetected: 3, ..Default::default() };
        model.reconciled.namespaces.insert(7, blue);
        let (prom, render, _) = Prometheus::new(Filter { ports: vec![8080], ..Default::default() });
        prom.update(&model);
        let text = String::from_utf8(render().1.to_vec()).unwrap();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        has("backlog_drops_total{netns=\"7\",port=\"8080\",comm=\"srv\",reason=\"accept_queue_full\"} 5");
        has("backlog_drops_total{netns=\"7\",port=\"8080\",comm=\"srv\",reason=\"ack_overflow\"} 1");
        has("backlog_accepts_total{netns=\"7\",port=\"8080\",comm=\"srv\"} 20");
        has("backlog_accept_wait_seconds_bucket{le=\"0.001024\",netns=\"7\",port=\"8080\",comm=\"srv\"} 0");
        has("backlog_accept_wait_seconds_bucket{le=\"0.002048\",netns=\"7\",port=\"8080\",comm=\"srv\"} 2");
        has("backlog_accept_wait_seconds_count{netns=\"7\",port=\"8080\",comm=\"srv\"} 2");
        has("backlog_undetected_drops_total{netns=\"7\"} 3");
        has("backlog_diagnostics_total{kind=\"windows_replaced\"} 2");
        has("backlog_missed_runs_total 4");
        has("backlog_programs_detached 0");
        assert!(!text.contains("9090"), "filtered out by port");
        assert!(text.ends_with("# EOF\n"));
    }

    fn series_lines(body: &Bytes) -> Vec<String> {
        let text = std::str::from_utf8(body).unwrap();
        text.lines().filter(|l| l.starts_with("backlog_accepts_total{")).map(str::to_string).collect()
    }

    #[test]
    fn churn_adds_no_series_and_keeps_every_count() {
        use std::collections::HashSet;
        use std::time::Instant;

        use crate::model::retired::{Policy, Retired};
        let mut model = Model::default();
        model.retired = Retired::new(Policy { keep_max: 0, ..Policy::default() });
        let (prom, render, _) = Prometheus::new(Filter::default());
        let now = Instant::now();
        // 500 port-0 listeners (ephemeral ports) and 500 on port 8080, each one accept.
        for sk in 0..1000u64 {
            let port = if sk % 2 == 0 { 33000 + sk as u16 } else { 8080 };
            let mut l = Listener { sk, netns: 7, port, accepts: 1, closed: true, ..Default::default() };
            l.wait.record(1_000);
            model.listeners.insert(l.key(), l);
        }
        prom.update(&model);
        let before = render().1;
        let want = vec![
            "backlog_accepts_total{netns=\"7\",port=\"8080\",comm=\"\"} 500".to_string(),
            "backlog_accepts_total{netns=\"7\",port=\"ephemeral\",comm=\"\"} 500".to_string(),
        ];
        assert_eq!(series_lines(&before), want);
        // Concurrent scrapes between two syncs share one encoding.
        assert_eq!(render().1.as_ptr(), before.as_ptr());
        // Every listener closed and merged: same series, same values.
        for sk in 0..1000u64 {
            model.retired.released(backlog_common::ListenerKey { sk, ino: 0 }, now);
        }
        model.retired.merge_due(&mut model.listeners, &HashSet::new(), now);
        assert!(model.listeners.is_empty());
        prom.update(&model);
        let after = render().1;
        assert_ne!(after.as_ptr(), before.as_ptr(), "a sync makes a new body");
        assert_eq!(series_lines(&after), want);
        assert_eq!(after, before);
    }
}
