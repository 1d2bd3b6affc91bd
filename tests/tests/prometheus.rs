//! Issue 12's Prometheus part, held against the kernel and promtool: reuseport
//! members' queue gauges are one series per socket, each what sock_diag says of it,
//! never a sum; /metrics is the text format unless OpenMetrics is asked for, and
//! names its build; the shipped alerting rules (contrib/prometheus) pass `promtool
//! check rules` and, in `promtool test rules` on series scraped from a tracer during
//! a drop scenario, fire exactly where the scraped counts say they must; the shipped
//! dashboard (contrib/grafana) queries only metrics the tracer exports.
//!
//! Run as root, serially, once backlog-trace is built in release mode:
//!   cargo test -p backlog-tests --test prometheus -- --test-threads=1
//! Needs promtool (Debian's prometheus package: scripts/test-deps-prometheus.sh).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use backlog_tests::bpf::{cgroup_links_of, detach_link};
use backlog_tests::http::{free_port, http_get_with, Answer};
use backlog_tests::netns::Netns;
use backlog_tests::scenario::settled;
use backlog_tests::tracer::Tracer;
use backlog_tests::workload::{many_listeners, Clients, Server, ServerSpec};
use backlog_tests::{require_root, scratch_path, wait_for, workspace_root};
use backlog_user::sys::diag::Diag;
use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

const PORT: u16 = 8080;
/// Bound on the tracer's metrics catching up with the kernel (a sync a second).
const CATCH_UP: Duration = Duration::from_secs(30);
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPEN_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Accept header Prometheus 2.x scrapes with.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// One sample of an exposition.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> &str {
        self.labels.get(k).map_or("", String::as_str)
    }

    /// Name and labels in PromQL notation, with `extra` labels added.
    fn series(&self, extra: &[(&str, &str)]) -> String {
        let mut labels = self.labels.clone();
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        format!("{}{{{}}}", self.name, inner.join(","))
    }

    /// The labels, to match a queue length with its limit.
    fn key(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }
}

fn bad(line: &str) -> ! {
    panic!("unreadable sample line {line:?}")
}

/// The samples of a text 0.0.4 or OpenMetrics body; panics on a line it cannot read.
fn parse(body: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in body.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad(line));
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end = loop {
                let Some((i, c)) = chars.next() else { bad(line) };
                if c == '}' {
                    break i + 1;
                }
                if c == ',' {
                    continue;
                }
                let mut key = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|x| x.1) != Some('"') {
                    bad(line);
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|x| x.1) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|x| x.1) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => bad(line),
                        },
                        Some(c) => value.push(c),
                        None => bad(line),
                    }
                }
                labels.insert(key, value);
            };
            rest = &r[end..];
        }
        let value = rest.split_whitespace().next().unwrap_or_else(|| bad(line)).parse().unwrap_or_else(|_| bad(line));
        out.push(Sample { name, labels, value });
    }
    out
}

/// GET /metrics with an Accept header (or none); panics if the exchange fails.
fn scrape(exporter: &str, accept: Option<&str>) -> Answer {
    let field = accept.map(|a| format!("Accept: {a}"));
    let fields: Vec<&str> = field.iter().map(String::as_str).collect();
    let a = http_get_with(exporter, "/metrics", &fields).unwrap_or_else(|| panic!("no answer from {exporter}"));
    assert_eq!(a.status, 200, "GET /metrics: {}", a.body);
    a
}

/// The sum of `name` over the samples of namespace `netns` (and `port`, if given).
fn sum(samples: &[Sample], name: &str, netns: u64, port: Option<u16>) -> f64 {
    let (netns, port) = (netns.to_string(), port.map(|p| p.to_string()));
    samples
        .iter()
        .filter(|s| s.name == name && s.label("netns") == netns)
        .filter(|s| port.as_ref().is_none_or(|p| s.label("port") == p))
        .map(|s| s.value)
        .sum()
}

fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// (length, limit) by socket label of the queue series of `port` in `netns`.
fn queues(samples: &[Sample], netns: u64, port: u16) -> BTreeMap<String, (f64, f64)> {
    let of = |s: &Sample| s.label("netns") == netns.to_string() && s.label("port") == port.to_string();
    samples
        .iter()
        .filter(|s| s.name == "backlog_queue_length" && of(s))
        .map(|s| (s.label("socket").to_string(), (s.value, queues_limit(samples, s))))
        .collect()
}

/// Every queue series is one queue the kernel allows: at most limit + 1 queued.
fn assert_no_queue_above_its_limit(samples: &[Sample]) {
    for len in samples.iter().filter(|s| s.name == "backlog_queue_length") {
        assert!(!len.label("socket").is_empty(), "a queue series without its socket: {len:?}");
        let limit = queues_limit(samples, len);
        assert!(len.value <= limit + 1.0, "queue {} above its limit {limit}: {len:?}", len.value);
    }
}

#[test]
fn reuseport_members_each_get_their_own_queue_series_never_a_sum() {
    require_root();
    let ns = Netns::new("promrp");
    let spec = ServerSpec { backlog: 4, reuseport: 2, ..ServerSpec::new("127.0.0.1", PORT) };
    let _server = Server::start(&ns, spec);
    let exporter = format!("127.0.0.1:{}", free_port());
    let mut tracer = Tracer::start(&["--netns", ns.name(), "--prometheus", &exporter]);
    let before = ns.netstat();
    // 60 connects hashed over two sockets that never accept: both fill.
    Clients { hold_secs: 2, ..Clients::new("127.0.0.1", PORT, 60) }.run(&ns);
    let delta = settled(&ns).since(&before);
    let drops = delta.get("ListenDrops");
    assert!(delta.get("ListenOverflows") > 0, "the workload must overflow: {delta}");
    let members = ns.inside(|| Diag::open().and_then(|mut d| d.listeners())).expect("sock_diag of the namespace");
    let kernel: BTreeMap<String, (f64, f64)> = members
        .iter()
        .filter(|e| e.port == PORT)
        .map(|e| (e.inode.to_string(), (f64::from(e.rqueue), f64::from(e.wqueue))))
        .collect();
    assert_eq!(kernel.len(), 2, "two reuseport members: {members:?}");
    assert!(kernel.values().all(|q| *q == (5.0, 4.0)), "both members full (limit 4 queues 5): {kernel:?}");

    let mut scrapes = 0;
    let samples = wait_for("per-socket queue series equal to sock_diag's", CATCH_UP, || {
        let samples = parse(&scrape(&exporter, None).body);
        scrapes += 1;
        assert_no_queue_above_its_limit(&samples);
        let exact = queues(&samples, ns.inode(), PORT) == kernel
            && sum(&samples, "backlog_drops_total", ns.inode(), Some(PORT)) == drops as f64;
        exact.then_some(samples)
    });
    // The counters stay one group per listener: summed over the members.
    let groups: BTreeSet<String> = samples
        .iter()
        .filter(|s| s.name == "backlog_accepts_total" && s.label("netns") == ns.inode().to_string())
        .map(|s| s.series(&[]))
        .collect();
    assert_eq!(groups.len(), 1, "one counter series for the reuseport group: {groups:?}");
    assert!(groups.iter().all(|g| !g.contains("socket=")), "{groups:?}");
    assert_eq!(value(&samples, "backlog_queue_sockets_omitted"), Some(0.0));
    let status = tracer.stop_sigint();
    assert!(status.success(), "{}", tracer.stderr());
    println!("{scrapes} scrapes; per socket (len, limit) {kernel:?} as sock_diag; {drops} drops = ListenDrops");
}

#[test]
fn queue_series_are_bounded_by_top_each_as_sock_diag_sees_its_socket() {
    require_root();
    const LISTENERS: usize = 30;
    const TOP: usize = 5;
    let ns = Netns::new("promtop");
    let exporter = format!("127.0.0.1:{}", free_port());
    let mut tracer = Tracer::start(&["--netns", ns.name(), "--prometheus", &exporter, "--top", &TOP.to_string()]);
    // Each listener: one accepted, its queue full, one client's SYNs dropped.
    let _held = many_listeners(&ns, "127.0.0.1", 9000, LISTENERS);
    let inode = ns.inode().to_string();
    let kernel: BTreeMap<String, (f64, f64)> = ns
        .inside(|| Diag::open().and_then(|mut d| d.listeners()))
        .expect("sock_diag of the namespace")
        .iter()
        .map(|e| (e.inode.to_string(), (f64::from(e.rqueue), f64::from(e.wqueue))))
        .collect();
    assert_eq!(kernel.len(), LISTENERS, "{kernel:?}");
    let samples = wait_for("every listener counted and the fullest sockets' queues", CATCH_UP, || {
        let samples = parse(&scrape(&exporter, None).body);
        assert_no_queue_above_its_limit(&samples);
        let accepts = sum(&samples, "backlog_accepts_total", ns.inode(), None);
        let queues: BTreeMap<String, (f64, f64)> = samples
            .iter()
            .filter(|s| s.name == "backlog_queue_length" && s.label("netns") == inode)
            .map(|s| (s.label("socket").to_string(), (s.value, queues_limit(&samples, s))))
            .collect();
        let as_kernel = queues.iter().all(|(socket, q)| kernel.get(socket) == Some(q));
        (accepts == LISTENERS as f64 && queues.len() == TOP && as_kernel).then_some(samples)
    });
    assert_eq!(value(&samples, "backlog_queue_sockets_omitted"), Some((LISTENERS - TOP) as f64));
    let status = tracer.stop_sigint();
    assert!(status.success(), "{}", tracer.stderr());
    println!("{LISTENERS} listeners, --top {TOP}: {TOP} queue series as sock_diag, {} omitted", LISTENERS - TOP);
}

/// The limit of the socket whose length is `len`.
fn queues_limit(samples: &[Sample], len: &Sample) -> f64 {
    let found = samples.iter().find(|s| s.name == "backlog_queue_limit" && s.key() == len.key());
    found.unwrap_or_else(|| panic!("no backlog_queue_limit for {len:?}")).value
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child.stdin.take().expect("piped").write_all(input.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn promtool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("promtool"))
        .find(|p| p.exists())
        .expect("promtool not installed: run scripts/test-deps-prometheus.sh")
}

#[test]
fn metrics_are_text_0_0_4_unless_openmetrics_is_asked_for_and_name_the_build() {
    require_root();
    let ns = Netns::new("promfmt");
    let _server = Server::start(&ns, ServerSpec::new("127.0.0.1", PORT));
    let exporter = format!("127.0.0.1:{}", free_port());
    let mut tracer = Tracer::start(&["--netns", ns.name(), "--prometheus", &exporter]);
    let before = ns.netstat();
    Clients { hold_secs: 2, ..Clients::new("127.0.0.1", PORT, 40) }.run(&ns);
    let drops = settled(&ns).since(&before).get("ListenDrops");
    assert!(drops > 0, "the workload must drop");
    wait_for("the drops in /metrics", CATCH_UP, || {
        let samples = parse(&scrape(&exporter, None).body);
        (sum(&samples, "backlog_drops_total", ns.inode(), Some(PORT)) == drops as f64).then_some(())
    });

    let text = scrape(&exporter, None);
    for accept in [None, Some("text/plain"), Some("*/*"), Some("text/plain;version=0.0.4"), Some("application/json")] {
        let a = scrape(&exporter, accept);
        assert_eq!(a.header("content-type"), Some(TEXT), "Accept {accept:?}");
        assert!(!a.body.contains("# EOF"), "Accept {accept:?}: {}", a.body);
        assert!(a.body.lines().any(|l| l == "# TYPE backlog_drops_total counter"), "{}", a.body);
    }
    for accept in [PROMETHEUS_ACCEPT, "application/openmetrics-text"] {
        let a = scrape(&exporter, Some(accept));
        assert_eq!(a.header("content-type"), Some(OPEN_METRICS), "Accept {accept}");
        assert!(a.body.ends_with("# EOF\n"), "Accept {accept}: {}", a.body);
        assert!(a.body.lines().any(|l| l == "# TYPE backlog_drops counter"), "{}", a.body);
        let series = |b: &str| parse(b).iter().map(|s| s.series(&[])).collect::<BTreeSet<_>>();
        assert_eq!(series(&a.body), series(&text.body), "both formats carry the same series");
    }
    // Prometheus' own linter reads the default body as the text format.
    let lint = run_with_stdin(Command::new(promtool()).args(["check", "metrics"]), &text.body);
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let samples = parse(&text.body);
    let info: Vec<&Sample> = samples.iter().filter(|s| s.name == "backlog_build_info").collect();
    let [info] = info.as_slice() else { panic!("one backlog_build_info: {info:?}") };
    assert_eq!(info.value, 1.0);
    for k in ["version", "mode", "kernel"] {
        assert_eq!(Some(info.label(k)), tracer.start[k].as_str(), "{k}: {info:?} vs {}", tracer.start);
    }
    for name in ["backlog_lost_events_total", "backlog_missed_runs_total"] {
        assert_eq!(value(&samples, name), Some(0.0), "{name}");
    }
    assert_eq!(sum(&samples, "backlog_undetected_drops_total", ns.inode(), None), 0.0);
    let status = tracer.stop_sigint();
    assert!(status.success(), "{}", tracer.stderr());
    println!("text 0.0.4 by default, OpenMetrics when asked; {info:?}");
}

/// One rule of the shipped rules file.
struct Rule {
    alert: String,
    expr: String,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

fn shipped_rules() -> (PathBuf, Vec<Rule>) {
    let path = workspace_root().join("contrib/prometheus/backlog-trace.rules.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = |y: &Yaml| -> BTreeMap<String, String> {
        y.as_hash()
            .map(|h| {
                h.iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string())).collect()
            })
            .unwrap_or_default()
    };
    let mut rules = Vec::new();
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for r in group["rules"].as_vec().expect("rules") {
            rules.push(Rule {
                alert: r["alert"].as_str().expect("alerting rules only").to_string(),
                expr: r["expr"].as_str().expect("expr").to_string(),
                annotations: map(&r["annotations"]),
                labels: map(&r["labels"]),
            });
        }
    }
    (path, rules)
}

/// `{{ $labels.NAME }}` replaced by the alert's labels: what the shipped annotations
/// use, and all they may use (numbers would make them depend on evaluation details).
fn render(template: &str, labels: &BTreeMap<String, String>) -> String {
    let mut out = template.to_string();
    for (k, v) in labels {
        out = out.replace(&format!("{{{{ $labels.{k} }}}}"), v);
    }
    assert!(!out.contains("{{"), "annotation uses more than labels: {template:?}");
    out
}

/// Names of `backlog_` metrics a PromQL (or Grafana) query refers to.
fn metrics_in(query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("backlog_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every `expr` and variable query in a Grafana dashboard.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// Metric names a body exports: its samples' and those its metadata announces
/// (a family with no sample yet, such as diagnostics before the first).
fn exported(body: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = parse(body).into_iter().map(|s| s.name).collect();
    for l in body.lines() {
        if let Some((name, kind)) = l.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            names.insert(name.to_string());
            if kind == "histogram" {
                names.extend(["_bucket", "_sum", "_count"].map(|x| format!("{name}{x}")));
            }
        }
    }
    names
}

/// One-minute steps each scrape stands for in the rule tests, and how many follow
/// with the tracer gone.
const STEPS: usize = 10;
const GONE_STEPS: usize = 70;

#[test]
fn shipped_rules_fire_where_a_real_scrape_says_and_the_dashboard_uses_only_exported_metrics() {
    require_root();
    let (rules_path, rules) = shipped_rules();
    let check = Command::new(promtool()).args(["check", "rules"]).arg(&rules_path).output().expect("promtool");
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mode = std::env::var("BACKLOG_MODE").ok();
    assert!(
        mode.as_deref().is_none_or(|m| m == "tracepoint"),
        "this test detaches the tracepoint mode's cgroup_skb program: run it without BACKLOG_MODE or with \
         BACKLOG_MODE=tracepoint (got {mode:?})"
    );

    // The scenario: a listener the tracer sees created, a flood it detects, then
    // its ingress program detached from outside and a flood it cannot see.
    let ns = Netns::new("promrules");
    let inode = ns.inode();
    let exporter = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--netns", ns.name(), "--prometheus", &exporter];
    if mode.is_none() {
        args.extend(["--mode", "tracepoint"]);
    }
    let mut tracer = Tracer::start(&args);
    let before = ns.netstat();
    let _server = Server::start(&ns, ServerSpec::new("127.0.0.1", PORT));
    let body_when = |what: &str, done: &dyn Fn(&[Sample]) -> bool| {
        wait_for(what, CATCH_UP, || {
            let body = scrape(&exporter, None).body;
            done(&parse(&body)).then_some(body)
        })
    };
    let quiet = body_when("the new listener's series", &|s| !queues(s, inode, PORT).is_empty());
    Clients::new("127.0.0.1", PORT, 300).run(&ns);
    let first = settled(&ns).since(&before).get("ListenDrops");
    assert!(first > 0, "the first flood must drop");
    let detected =
        body_when("the first flood's drops", &|s| sum(s, "backlog_drops_total", inode, Some(PORT)) == first as f64);
    let links = cgroup_links_of(tracer.pid());
    let [link] = links.as_slice() else { panic!("expected one cgroup link held by the tracer, got {links:?}") };
    detach_link(*link);
    wait_for("the tracer to name the detached program", Duration::from_secs(10), || {
        tracer.stderr().contains("bt_tp_ingress").then_some(())
    });
    Clients { hold_secs: 2, ..Clients::new("127.0.0.1", PORT, 100) }.run(&ns);
    let all = settled(&ns).since(&before).get("ListenDrops");
    assert!(all > first, "the second flood must drop");
    let blind = body_when("the second flood as undetected drops", &|s| {
        let counted =
            sum(s, "backlog_drops_total", inode, None) + sum(s, "backlog_undetected_drops_total", inode, None);
        counted == all as f64 && value(s, "backlog_programs_detached") == Some(1.0)
    });
    let status = tracer.stop_sigint();
    assert!(status.success(), "{}", tracer.stderr());

    // The scraped samples as promtool input: each scrape held for STEPS minutes,
    // then the tracer gone. job/instance are what a scrape config adds.
    let instance = exporter.as_str();
    let target = [("job", "backlog-trace"), ("instance", instance)];
    let phases: Vec<Vec<Sample>> = [&quiet, &detected, &blind].iter().map(|b| parse(b)).collect();
    let mut series: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    for (i, samples) in phases.iter().enumerate() {
        for s in samples {
            series.entry(s.series(&target)).or_insert_with(|| vec![None; phases.len()])[i] = Some(s.value);
        }
    }
    let input_series: Vec<Value> = series
        .iter()
        .map(|(name, values)| {
            let mut steps: Vec<String> = Vec::new();
            for v in values {
                let v = v.map_or("_".to_string(), |v| v.to_string());
                steps.extend(std::iter::repeat_n(v, STEPS));
            }
            steps.extend(std::iter::repeat_n("_".to_string(), GONE_STEPS));
            json!({"series": name, "values": steps.join(" ")})
        })
        .collect();

    // Where each alert must fire, from the scraped values alone.
    let with = |s: &Sample, keep: &[&str]| -> BTreeMap<String, String> {
        let mut l: BTreeMap<String, String> = keep.iter().map(|k| (k.to_string(), s.label(k).to_string())).collect();
        l.extend(target.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        l
    };
    let job_labels = || with(&Sample { name: String::new(), labels: BTreeMap::new(), value: 0.0 }, &[]);
    // Series of `name` that rose from phase i - 1 to phase i (increase() sees no
    // rise in a series that did not exist before).
    let rose = |name: &str, i: usize| -> Vec<Sample> {
        if i == 0 {
            return Vec::new();
        }
        phases[i]
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| phases[i - 1].iter().any(|p| p.name == s.name && p.labels == s.labels && p.value < s.value))
            .cloned()
            .collect()
    };
    let expected = |alert: &str, i: usize| -> BTreeSet<BTreeMap<String, String>> {
        let p = &phases[i];
        match alert {
            "BacklogListenDrops" => {
                rose("backlog_drops_total", i).iter().map(|s| with(s, &["netns", "port", "comm", "reason"])).collect()
            }
            "BacklogQueueNearLimit" => p
                .iter()
                .filter(|s| s.name == "backlog_queue_length")
                .filter(|len| {
                    let limit = p.iter().find(|l| l.name == "backlog_queue_limit" && l.labels == len.labels);
                    limit.is_some_and(|l| l.value > 0.0 && len.value / l.value >= 0.9)
                })
                .map(|s| with(s, &["netns", "port", "comm", "socket"]))
                .collect(),
            "BacklogUndetectedDrops" => {
                rose("backlog_undetected_drops_total", i).iter().map(|s| with(s, &["netns"])).collect()
            }
            "BacklogTracerBlind" => {
                let blind = value(p, "backlog_programs_detached").is_some_and(|d| d > 0.0)
                    || !rose("backlog_missed_runs_total", i).is_empty();
                if blind {
                    [job_labels()].into()
                } else {
                    BTreeSet::new()
                }
            }
            "BacklogTracerLosingEvents" => {
                if rose("backlog_lost_events_total", i).is_empty() {
                    BTreeSet::new()
                } else {
                    [job_labels()].into()
                }
            }
            "BacklogTracerDown" => BTreeSet::new(),
            other => panic!("the test does not know alert {other}: say where it must fire"),
        }
    };
    // Evaluated late in each phase (past every `for:`), and long after the end.
    let evals: Vec<(String, Option<usize>)> =
        vec![("5m".into(), Some(0)), ("12m".into(), Some(1)), ("22m".into(), Some(2)), ("40m".into(), None)];
    let mut tests = Vec::new();
    let mut fired: BTreeMap<String, usize> = BTreeMap::new();
    for (at, phase) in &evals {
        for rule in &rules {
            let want: BTreeSet<BTreeMap<String, String>> = match phase {
                Some(i) => expected(&rule.alert, *i),
                None if rule.alert == "BacklogTracerDown" => [job_labels()].into(),
                None => BTreeSet::new(),
            };
            *fired.entry(rule.alert.clone()).or_default() += want.len();
            let exp: Vec<Value> = want
                .iter()
                .map(|expr_labels| {
                    let annotations: BTreeMap<String, String> =
                        rule.annotations.iter().map(|(k, t)| (k.clone(), render(t, expr_labels))).collect();
                    let mut labels = expr_labels.clone();
                    labels.extend(rule.labels.clone());
                    json!({"exp_labels": labels, "exp_annotations": annotations})
                })
                .collect();
            tests.push(json!({"eval_time": at, "alertname": rule.alert, "exp_alerts": exp}));
        }
    }
    // The scenario itself must make the rules that matter fire, or the comparison proves little.
    for alert in [
        "BacklogListenDrops",
        "BacklogQueueNearLimit",
        "BacklogUndetectedDrops",
        "BacklogTracerBlind",
        "BacklogTracerDown",
    ] {
        assert!(fired.get(alert).copied().unwrap_or(0) > 0, "{alert} never expected to fire: {fired:?}");
    }
    let file = scratch_path("rules-test.yml");
    let doc = json!({
        "rule_files": [rules_path],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": tests}],
    });
    // JSON is YAML: promtool reads it as its test file.
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let out = Command::new(promtool()).args(["test", "rules"]).arg(&file).output().expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool test rules {} failed:\n{said}", file.display());
    let _ = std::fs::remove_file(&file);
    println!(
        "promtool: {} series from 3 scrapes, {} alert checks pass; expected firings {fired:?}; ListenDrops {first} \
         detected, {} after the detach",
        input_series.len(),
        tests.len(),
        all - first
    );

    // Rules and dashboard query only what the tracer exports.
    let exports: BTreeSet<String> = [&quiet, &detected, &blind].iter().flat_map(|b| exported(b)).collect();
    for rule in &rules {
        for m in metrics_in(&rule.expr) {
            assert!(
                exports.contains(&m),
                "rule {} uses {m}, which the tracer does not export: {exports:?}",
                rule.alert
            );
        }
    }
    check_dashboard(&workspace_root().join("contrib/grafana/backlog-trace.json"), &exports);
}

fn check_dashboard(path: &Path, exports: &BTreeSet<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    assert!(dash["title"].is_string() && dash["uid"].is_string(), "a dashboard has a title and uid");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 5, "{} panels", panels.len());
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metrics_in(q)).collect();
    assert!(used.len() >= 10, "the dashboard queries {used:?}");
    let unknown: Vec<&String> = used.iter().filter(|m| !exports.contains(*m)).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics the tracer does not export: {unknown:?}");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "panel without a query: {p}");
    }
    println!("dashboard: {} panels, {} metrics, all exported", panels.len(), used.len());
}
