//! `--prometheus ADDR`: the model's exact counters as Prometheus metrics.
//!
//! Counters and the wait histogram are labelled by network namespace, port and
//! owning command, summed over the sockets that share those (SO_REUSEPORT groups,
//! IPv4 and IPv6 listeners on one port): a count adds up across sockets, and the
//! number of series stays bounded by the listeners, never by the peers. A port of
//! the ephemeral range is labelled `ephemeral` for a listener's whole life, and
//! closed listeners' counts stay in their series through their merge into
//! aggregates (retired.rs), so neither churn on port 0 nor closing adds series or
//! moves counts between them.
//!
//! Queue gauges are never summed: two reuseport members of limit 4 with 5 queued
//! each are not one queue of limit 8 with 10, and a sum would show a fill the kernel
//! never allows. They are per open socket (`socket` = its inode, as `ss -e` and
//! /proc/PID/fd name it), so `length / limit <= (limit + 1) / limit` holds for every
//! series; at most `--top` sockets (the fullest) get them, the rest are counted in
//! `backlog_queue_sockets_omitted`, and a closed socket's gauges go with it.
//!
//! Values are copied from the model at each sync; a body is encoded at the first
//! scrape after a sync that asks for its format, and shared by every scrape until
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
use prometheus_client::metrics::info::Info;
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
    wait: Vec<u64>,
    /// Estimated from bucket midpoints: the kernel keeps counts, not a sum.
    wait_sum_us: f64,
}

/// One open listening socket's accept queue.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Queue {
    labels: Labels,
    /// The socket's inode: what tells reuseport members (and an IPv4 and an IPv6
    /// listener of one port) apart.
    socket: u64,
    len: u32,
    limit: u32,
    /// Only to rank sockets when more than `--top` are open.
    drops: u64,
}

impl Queue {
    /// Fill as a comparison of len/limit, without division (a limit of 0 with
    /// anything queued is fuller than any other).
    fn fuller(&self, other: &Queue) -> std::cmp::Ordering {
        let a = u64::from(self.len) * u64::from(other.limit);
        let b = u64::from(other.len) * u64::from(self.limit);
        a.cmp(&b).then(self.len.cmp(&other.len))
    }
}

/// What the tracer is: `backlog_build_info`'s labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    pub version: &'static str,
    /// The attach mode, "starting" until the programs are attached.
    pub mode: String,
    pub kernel: String,
}

impl Default for Build {
    fn default() -> Build {
        Build { version: env!("CARGO_PKG_VERSION"), mode: "starting".into(), kernel: String::new() }
    }
}

#[derive(Debug, Default)]
struct Values {
    build: Build,
    series: BTreeMap<Labels, Series>,
    /// Open sockets' queues, at most `--top` of them, in label order.
    queues: Vec<Queue>,
    /// Open sockets in scope whose queues are not exported (beyond `--top`).
    queues_omitted: u64,
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
    s.wait.resize(WAIT_SLOTS, 0);
    for (i, n) in l.wait.buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
        s.wait[wait_slot(i)] += n;
        let (lo, hi) = hist::bounds(i);
        s.wait_sum_us += *n as f64 * (lo + hi) as f64 / 2.0;
    }
}

/// The queues of the open listeners among `listeners`: one per socket (two entries
/// of one socket, which only an unknown inode of 0 can make, keep the fuller, never
/// a sum), the `top` fullest when `top` > 0, and how many were left out.
fn queues<'a>(listeners: impl Iterator<Item = (Labels, &'a Listener)>, top: usize) -> (Vec<Queue>, u64) {
    let mut by_socket: BTreeMap<(Labels, u64), Queue> = BTreeMap::new();
    for (labels, l) in listeners.filter(|(_, l)| !l.closed) {
        let q = Queue {
            labels: labels.clone(),
            socket: l.sock_ino,
            len: l.queue_len,
            limit: l.queue_max,
            drops: l.total_drops(),
        };
        by_socket
            .entry((labels, l.sock_ino))
            .and_modify(|have| {
                if q.fuller(have).is_gt() {
                    *have = q.clone();
                }
            })
            .or_insert(q);
    }
    let mut queues: Vec<Queue> = by_socket.into_values().collect();
    let mut omitted = 0;
    if top > 0 && queues.len() > top {
        queues.sort_by(|a, b| b.fuller(a).then(b.drops.cmp(&a.drops)));
        omitted = (queues.len() - top) as u64;
        queues.truncate(top);
        queues.sort_by(|a, b| (&a.labels, a.socket).cmp(&(&b.labels, b.socket)));
    }
    (queues, omitted)
}

impl Values {
    fn of(model: &Model, filters: &Filter, top: usize, build: &Build) -> Values {
        let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
        let policy = model.retired.policy();
        let labelled = || {
            model
                .matching(filters)
                .map(|l| (Labels { netns: l.netns, port: policy.class(l.port), comm: comm_label(l) }, l))
        };
        for (labels, l) in labelled() {
            add(series.entry(labels).or_default(), l);
        }
        let (queues, queues_omitted) = queues(labelled(), top);
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
            build: build.clone(),
            series,
            queues,
            queues_omitted,
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
        let b = &snap.build;
        Info::new(vec![("version", b.version.to_string()), ("mode", b.mode.clone()), ("kernel", b.kernel.clone())])
            .encode(enc.encode_descriptor(
                "backlog_build",
                "The tracer's version, attach mode (\"starting\" until attached) and kernel release; always 1",
                None,
                MetricType::Info,
            )?)?;
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
                "Accept-queue length of one open listening socket when last seen (never summed over sockets)",
                (|q: &Queue| q.len) as fn(&Queue) -> u32,
            ),
            (
                "backlog_queue_limit",
                "Accept-queue limit of one open listening socket: min(backlog, somaxconn); the kernel queues up to \
                 limit + 1",
                |q: &Queue| q.limit,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for q in &snap.queues {
                let mut ls = labels(&q.labels);
                ls.push(("socket", q.socket.to_string()));
                ConstGauge::new(i64::from(get(q))).encode(m.encode_family(&ls)?)?;
            }
        }
        let m = enc.encode_descriptor(
            "backlog_queue_sockets_omitted",
            "Open listening sockets in scope without queue gauges: beyond --top (the fullest are shown)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snap.queues_omitted as i64).encode(m)?;
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
    /// The bodies encoded from the current snapshot, once a scrape asked for them.
    bodies: Arc<Mutex<Bodies>>,
    filters: Filter,
    /// Sockets that get queue gauges (`--top`; 0: all).
    top: usize,
    build: Build,
}

/// An exposition format, chosen per scrape from its Accept header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: what every scraper reads, so the default.
    Text,
    /// OpenMetrics 1.0.0, only for a client that names it.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format for an Accept header (RFC 9110 12.5.1): OpenMetrics when the client
    /// names it (version 1.0.0, 0.0.1 or none) with a quality above that of the most
    /// specific range covering text/plain, or equal to that of a wildcard; the text
    /// format otherwise, also for no header or one naming neither.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else { return Format::Text };
        let (mut om, mut plain, mut text_any, mut any) = (None::<f32>, None::<f32>, None::<f32>, None::<f32>);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let (mut q, mut version_ok) = (Some(1.0f32), true);
            for p in parts {
                let Some((k, v)) = p.split_once('=') else { continue };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    // A malformed quality makes the range unusable, not preferred.
                    "q" => q = v.parse().ok().filter(|q: &f32| (0.0..=1.0).contains(q)),
                    "version" if media == "application/openmetrics-text" => version_ok = matches!(v, "1.0.0" | "0.0.1"),
                    _ => {}
                }
            }
            let Some(q) = q else { continue };
            let slot = match media.as_str() {
                "application/openmetrics-text" if version_ok => &mut om,
                "text/plain" => &mut plain,
                "text/*" => &mut text_any,
                "*/*" => &mut any,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |have| have.max(q)));
        }
        let Some(om) = om.filter(|q| *q > 0.0) else { return Format::Text };
        let wins = match (plain, text_any.or(any)) {
            (Some(text), _) => om > text,
            (None, Some(wildcard)) => om >= wildcard,
            (None, None) => true,
        };
        if wins {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// Each format's body of the current snapshot, once asked for.
#[derive(Default)]
struct Bodies {
    open_metrics: Option<Bytes>,
    text: Option<Bytes>,
}

/// The text format 0.0.4 of an OpenMetrics body. The samples are the same; what
/// differs is metadata: 0.0.4 names no families, so a counter's HELP and TYPE name
/// its `_total` samples and an info metric becomes the gauge `NAME_info`; it has no
/// `# UNIT` and no `# EOF`. Nothing else OpenMetrics-only (exemplars, `_created`)
/// is ever encoded here.
fn text_format(open_metrics: &str) -> String {
    let mut types = std::collections::HashMap::new();
    for l in open_metrics.lines() {
        if let Some((name, kind)) = l.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            types.insert(name, kind);
        }
    }
    let mut out = String::with_capacity(open_metrics.len());
    for l in open_metrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, l.strip_prefix(p)?.split_once(' ')?)));
        match meta.map(|(p, (name, rest))| (p, name, rest, types.get(name).copied())) {
            Some((p, name, _, Some("info"))) if p == "# TYPE " => out += &format!("{p}{name}_info gauge"),
            Some((p, name, rest, Some("info"))) => out += &format!("{p}{name}_info {rest}"),
            Some((p, name, rest, Some("counter"))) => out += &format!("{p}{name}_total {rest}"),
            _ => out += l,
        }
        out.push('\n');
    }
    out
}

/// The body of the current snapshot in `format`: encoded by the first scrape after
/// a sync that asks for that format, then shared (a reference count, not a copy) by
/// every scrape until the next sync.
fn cached(bodies: &Mutex<Bodies>, registry: &Registry, format: Format) -> Bytes {
    let mut cache = bodies.lock().unwrap_or_else(|p| p.into_inner());
    let om = cache
        .open_metrics
        .get_or_insert_with(|| {
            let mut text = String::new();
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, registry);
            Bytes::from(text)
        })
        .clone();
    match format {
        Format::OpenMetrics => om,
        Format::Text => cache
            .text
            .get_or_insert_with(|| Bytes::from(text_format(std::str::from_utf8(&om).unwrap_or_default())))
            .clone(),
    }
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
    pub async fn serve(addr: SocketAddr, filters: Filter, top: usize) -> Result<Prometheus> {
        // The fd limit in force (raised to the hard limit at start) sizes the cap.
        let limits = Limits::for_nofile(crate::sys::limits::nofile().map_or(1024, |(soft, _)| soft));
        let (prom, render, stats) = Prometheus::new(filters, top);
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

    fn new(filters: Filter, top: usize) -> (Prometheus, Render, Arc<Stats>) {
        let values = Arc::new(Mutex::new(Values::default()));
        let stats = Arc::new(Stats::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Metrics(values.clone(), stats.clone())));
        let bodies = Arc::new(Mutex::new(Bodies::default()));
        let shared = bodies.clone();
        let render: Render = Arc::new(move |accept| {
            let format = Format::negotiate(accept);
            (format.content_type(), cached(&shared, &registry, format))
        });
        (Prometheus { values, bodies, filters, top, build: Build::default() }, render, stats)
    }

    fn update(&self, model: &Model) {
        let snap = Values::of(model, &self.filters, self.top, &self.build);
        *self.values.lock().unwrap_or_else(|p| p.into_inner()) = snap;
        *self.bodies.lock().unwrap_or_else(|p| p.into_inner()) = Bodies::default();
    }
}

impl Observer for Prometheus {
    fn name(&self) -> &'static str {
        "the metrics endpoint"
    }

    fn started(&mut self, s: &Started) -> Result<()> {
        self.build.mode = s.mode.to_string();
        self.build.kernel = s.kernel.to_string();
        // Until the first sync, the snapshot keeps its (empty) counts.
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.build = self.build.clone();
        drop(values);
        *self.bodies.lock().unwrap_or_else(|p| p.into_inner()) = Bodies::default();
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
        let (prom, render, _) = Prometheus::new(Filter { ports: vec![8080], ..Default::default() }, 0);
        prom.update(&model);
        let text = String::from_utf8(render(Some(OM)).1.to_vec()).unwrap();
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
        has("backlog_lost_events_total 0");
        assert!(!text.contains("9090"), "filtered out by port");
        assert!(text.ends_with("# EOF\n"));
    }

    const OM: &str = "application/openmetrics-text; version=1.0.0";

    fn listener(sk: u64, port: u16, len: u32, limit: u32) -> Listener {
        let mut l = Listener {
            sk,
            sock_ino: 5000 + sk,
            netns: 7,
            port,
            queue_len: len,
            queue_max: limit,
            ..Default::default()
        };
        l.owners.insert(100, "srv".into());
        l
    }

    fn encoded(model: &Model, top: usize, accept: Option<&str>) -> (&'static str, String) {
        let (prom, render, _) = Prometheus::new(Filter::default(), top);
        prom.update(model);
        let (ctype, body) = render(accept);
        (ctype, String::from_utf8(body.to_vec()).unwrap())
    }

    /// (socket, length, limit) of every queue series.
    fn queue_series(text: &str) -> Vec<(String, u64, u64)> {
        let value = |metric: &str, socket: &str| {
            let prefix = format!("{metric}{{");
            let l = text.lines().find(|l| l.starts_with(&prefix) && l.contains(&format!("socket=\"{socket}\"")));
            l.and_then(|l| l.rsplit(' ').next()).map(|v| v.parse().unwrap()).unwrap()
        };
        text.lines()
            .filter(|l| l.starts_with("backlog_queue_limit{"))
            .map(|l| l.split("socket=\"").nth(1).unwrap().split('"').next().unwrap().to_string())
            .map(|s| (s.clone(), value("backlog_queue_length", &s), value("backlog_queue_limit", &s)))
            .collect()
    }

    #[test]
    fn reuseport_members_get_a_queue_series_each_never_a_sum() {
        let mut model = Model::default();
        // Two reuseport members of limit 4, both full (the kernel queues limit + 1),
        // and a closed listener on the same port, whose queue is gone.
        for l in
            [listener(1, 8080, 5, 4), listener(2, 8080, 5, 4), Listener { closed: true, ..listener(3, 8080, 9, 8) }]
        {
            model.listeners.insert(l.key(), l);
        }
        let (_, text) = encoded(&model, 0, None);
        let got = queue_series(&text);
        assert_eq!(got, vec![("5001".into(), 5, 4), ("5002".into(), 5, 4)], "{text}");
        for (socket, len, limit) in &got {
            assert!(*len <= limit + 1, "socket {socket}: {len}/{limit}");
        }
        assert!(text.contains("backlog_queue_length{netns=\"7\",port=\"8080\",comm=\"srv\",socket=\"5001\"} 5\n"));
        assert!(text.contains("backlog_queue_sockets_omitted 0\n"));
    }

    #[test]
    fn queue_gauges_are_bounded_by_top_and_the_rest_counted() {
        let mut model = Model::default();
        // Fill 1/8, 8/8, 0/8, 3/4, 1/0 (a listen(fd, 0) with one queued: fullest).
        for l in [
            listener(1, 8001, 1, 8),
            listener(2, 8002, 8, 8),
            listener(3, 8003, 0, 8),
            listener(4, 8004, 3, 4),
            listener(5, 8005, 1, 0),
        ] {
            model.listeners.insert(l.key(), l);
        }
        let (_, text) = encoded(&model, 3, None);
        let sockets: Vec<String> = queue_series(&text).into_iter().map(|q| q.0).collect();
        assert_eq!(sockets, ["5002", "5004", "5005"], "{text}");
        assert!(text.contains("backlog_queue_sockets_omitted 2\n"), "{text}");
        let (_, all) = encoded(&model, 0, None);
        assert_eq!(queue_series(&all).len(), 5);
        assert!(all.contains("backlog_queue_sockets_omitted 0\n"));
    }

    #[test]
    fn two_entries_of_one_socket_keep_the_fuller_queue() {
        // Only an unknown inode (0) can make two listeners one series: still no sum.
        let mut model = Model::default();
        for (sk, len) in [(1, 2), (2, 5)] {
            let l = Listener { sock_ino: 0, ..listener(sk, 8080, len, 4) };
            model.listeners.insert(l.key(), l);
        }
        let (_, text) = encoded(&model, 0, None);
        assert_eq!(queue_series(&text), vec![("0".into(), 5, 4)], "{text}");
    }

    #[test]
    fn accept_headers_choose_the_format() {
        use Format::{OpenMetrics as Om, Text};
        for (accept, want) in [
            (None, Text),
            (Some(""), Text),
            (Some("*/*"), Text),
            (Some("text/plain"), Text),
            (Some("application/json"), Text),
            (Some("application/openmetrics-text"), Om),
            (Some("Application/OpenMetrics-Text; Version=1.0.0; charset=utf-8"), Om),
            // What Prometheus 2.x sends by default.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                     text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Om,
            ),
            // Prometheus with scrape_protocols preferring the text format.
            (Some("text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5"), Text),
            (Some("application/openmetrics-text; q=0"), Text),
            (Some("application/openmetrics-text;version=2.0.0"), Text),
            (Some("application/openmetrics-text;q=abc"), Text),
            (Some("application/openmetrics-text, text/plain"), Text),
            (Some("application/openmetrics-text, */*"), Om),
            (Some("application/openmetrics-text;q=0.2, text/*;q=0.9"), Text),
            (Some("application/openmetrics-text;q=0.9, text/*;q=0.2"), Om),
        ] {
            assert_eq!(Format::negotiate(accept), want, "Accept: {accept:?}");
        }
    }

    #[test]
    fn the_text_format_has_the_same_samples_and_0_0_4_metadata() {
        let mut model = Model::default();
        let mut l = listener(1, 8080, 5, 4);
        l.drops = [3, 0, 1, 0];
        l.wait.record(1_500_000);
        model.listeners.insert(l.key(), l);
        let (om_type, om) = encoded(&model, 0, Some(OM));
        let (text_type, text) = encoded(&model, 0, Some("text/plain;version=0.0.4"));
        assert_eq!(om_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
        assert_eq!(text_type, "text/plain; version=0.0.4; charset=utf-8");
        assert_eq!(encoded(&model, 0, None).1, text, "the text format is the default");
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(samples(&om), samples(&text));
        assert!(om.ends_with("# EOF\n") && !text.contains("# EOF"), "{text}");
        for (om_line, text_line) in [
            ("# TYPE backlog_drops counter", "# TYPE backlog_drops_total counter"),
            ("# TYPE backlog_build info", "# TYPE backlog_build_info gauge"),
            ("# TYPE backlog_queue_length gauge", "# TYPE backlog_queue_length gauge"),
            ("# TYPE backlog_accept_wait_seconds histogram", "# TYPE backlog_accept_wait_seconds histogram"),
        ] {
            assert!(om.lines().any(|l| l == om_line), "no {om_line:?} in\n{om}");
            assert!(text.lines().any(|l| l == text_line), "no {text_line:?} in\n{text}");
        }
        assert!(text.lines().any(|l| l.starts_with("# HELP backlog_drops_total Connections dropped")), "{text}");
        // Every sample's metadata names it (or its histogram) in the text format.
        let typed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        for s in samples(&text) {
            let name = s.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|x| name.strip_suffix(x)).unwrap_or(name);
            assert!(typed.contains(&name) || typed.contains(&family), "{name} has no TYPE in\n{text}");
        }
    }

    #[test]
    fn build_info_names_the_version_and_the_mode_once_attached() {
        let (mut prom, render, _) = Prometheus::new(Filter::default(), 0);
        prom.update(&Model::default());
        let body = |accept| String::from_utf8(render(accept).1.to_vec()).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        let starting = format!("backlog_build_info{{version=\"{version}\",mode=\"starting\",kernel=\"\"}} 1");
        assert!(body(None).lines().any(|l| l == starting), "{}", body(None));
        let started = Started { mode: "tracepoint", kernel: "6.18.44", fallbacks: &[], scope: "" };
        prom.started(&started).unwrap();
        let line = format!("backlog_build_info{{version=\"{version}\",mode=\"tracepoint\",kernel=\"6.18.44\"}} 1");
        for accept in [None, Some(OM)] {
            assert!(body(accept).lines().any(|l| l == line), "{}", body(accept));
        }
        // A sync keeps it.
        prom.update(&Model::default());
        assert!(body(None).lines().any(|l| l == line));
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
        let (prom, render, _) = Prometheus::new(Filter::default(), 0);
        let now = Instant::now();
        // 500 port-0 listeners (ephemeral ports) and 500 on port 8080, each one accept.
        for sk in 0..1000u64 {
            let port = if sk % 2 == 0 { 33000 + sk as u16 } else { 8080 };
            let mut l = Listener { sk, netns: 7, port, accepts: 1, closed: true, ..Default::default() };
            l.wait.record(1_000);
            model.listeners.insert(l.key(), l);
        }
        prom.update(&model);
        let before = render(None).1;
        let want = vec![
            "backlog_accepts_total{netns=\"7\",port=\"8080\",comm=\"\"} 500".to_string(),
            "backlog_accepts_total{netns=\"7\",port=\"ephemeral\",comm=\"\"} 500".to_string(),
        ];
        assert_eq!(series_lines(&before), want);
        // Concurrent scrapes between two syncs share one encoding.
        assert_eq!(render(None).1.as_ptr(), before.as_ptr());
        // Every listener closed and merged: same series, same values.
        for sk in 0..1000u64 {
            model.retired.released(backlog_common::ListenerKey { sk, ino: 0 }, now);
        }
        model.retired.merge_due(&mut model.listeners, &HashSet::new(), now);
        assert!(model.listeners.is_empty());
        prom.update(&model);
        let after = render(None).1;
        assert_ne!(after.as_ptr(), before.as_ptr(), "a sync makes a new body");
        assert_eq!(series_lines(&after), want);
        assert_eq!(after, before);
    }
}
