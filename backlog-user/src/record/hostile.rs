//! Issue 11's crafted recordings: files that are valid to the byte but built to
//! make `report` slow or large (128k sysctl names in snapshots, 50k listeners
//! with owners, counters, queue samples, undetected drops and one event each).
//! Written with the format's own encoders; reported by a child process (this test
//! binary run again on one test) so that its peak memory is the report's alone.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use backlog_common::{Event, EventKind, ListenerStats, AF_INET};

use super::format::{
    frame, header, CounterSync, ListenerState, NetnsSnapshot, Owners, Phase, QueueRow, Queues, Reconcile, Record,
    Recording, Snapshot,
};
use super::report::{run, ReportSettings};
use crate::event as typed;
use crate::model::{Filter, Folded};

/// 2026-12-01T00:00:00Z: the recording's start.
const START_WALL: u64 = 1_796_083_200_000_000_000;
const MONO0: u64 = 1_000_000_000_000;

pub(crate) fn session(id: u64, part: u32) -> Record {
    Record::Recording(Recording {
        id,
        part,
        mono_to_wall_ns: id - MONO0,
        mode: "fentry".into(),
        kernel: "6.18.0".into(),
        scope: "every listener in all network namespaces".into(),
        filter: Filter::default(),
    })
}

pub(crate) fn write_file(path: &Path, records: &[Record]) {
    let mut out = header().to_vec();
    for r in records {
        out.extend_from_slice(&frame(r));
    }
    std::fs::write(path, out).unwrap();
}

/// 128k sysctl names, every one of them in the start and end snapshots, half of
/// them changed by the end; 4k TcpExt counters likewise.
pub(crate) fn sysctl_records(n: usize) -> Vec<Record> {
    let snap = |phase: Phase, ts: u64| {
        let sysctls = (0..n)
            .map(|i| {
                let v = if phase == Phase::End && i % 2 == 0 { i + 1 } else { i };
                (format!("net.ipv4.conf.bt{i:07}.rp_filter"), Some(v as u32))
            })
            .collect();
        let counters = (0..4096).map(|i| (format!("TcpExtCounter{i:05}"), ts + i as u64)).collect();
        Record::Snapshot(Snapshot {
            ts_ns: ts,
            phase,
            namespaces: vec![NetnsSnapshot { inode: 4026531840, name: None, sysctls, counters }],
        })
    };
    vec![session(START_WALL, 0), snap(Phase::Start, MONO0), snap(Phase::End, MONO0 + 5_000_000_000), end(5)]
}

fn end(secs: u64) -> Record {
    Record::End { ts_ns: MONO0 + secs * 1_000_000_000 }
}

/// `n` listeners, each with an owner, exact counters, a queue sample, undetected
/// drops and one drop event from its own peer in its own second.
pub(crate) fn listener_records(n: usize) -> Vec<Record> {
    let sk = |i: usize| 0xffff_8880_0000_0000 + i as u64 * 64;
    let ino = |i: usize| 100_000 + i as u64;
    let port = |i: usize| 1024 + (i % 60_000) as u16;
    let mut recs = vec![session(START_WALL, 0)];
    for i in 0..n {
        recs.push(Record::Owners(Owners { sk: sk(i), ino: ino(i), owners: vec![(1000 + i as u32, "server".into())] }));
    }
    for i in 0..n {
        let mut ev = Event::zeroed();
        ev.ts_ns = MONO0 + i as u64 * 1_000_000_000;
        ev.sk = sk(i);
        ev.sock_ino = ino(i);
        ev.netns = 4026531840;
        ev.kind = EventKind::Drop as u8;
        ev.family = AF_INET;
        ev.lport = port(i);
        ev.rport = 40000;
        ev.laddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.raddr[..4].copy_from_slice(&(0x0a00_0000u32 + i as u32).to_be_bytes());
        ev.queue_len = 9;
        ev.queue_max = 8;
        recs.push(Record::Event(typed::decode(&ev).expect("a drop")));
    }
    let ts = MONO0 + n as u64 * 1_000_000_000;
    let listeners = (0..n)
        .map(|i| {
            let mut laddr = [0u8; 16];
            laddr[..4].copy_from_slice(&[10, 0, 0, 1]);
            let stats = ListenerStats {
                sock_ino: ino(i),
                netns: 4026531840,
                family: AF_INET,
                lport: port(i),
                laddr,
                drops: [1, 0, 0, 0],
                accepts: 3,
                queue_max: 8,
                ..Default::default()
            };
            ListenerState { sk: sk(i), stats, pending: 0, wait: vec![(40, 3)], peers: vec![] }
        })
        .collect();
    recs.push(Record::CounterSync(CounterSync {
        ts_ns: ts,
        lost_events: 0,
        unmatched_accepts: 0,
        pending_enqueued: Some(0),
        listeners,
    }));
    let rows = (0..n)
        .map(|i| QueueRow { netns: 4026531840, sock_ino: ino(i) as u32, port: port(i), len: 1 + i as u32 % 7, max: 8 })
        .collect();
    recs.push(Record::Queues(Queues { ts_ns: ts, rows }));
    recs.push(Record::Reconcile(Reconcile {
        ts_ns: ts,
        missed_runs: 0,
        diagnostics: vec![],
        namespaces: vec![],
        folded: Folded::default(),
        placed: (0..n).map(|i| (sk(i), ino(i), 1)).collect(),
        unreconciled: vec![],
        detached: vec![],
    }));
    recs.push(Record::End { ts_ns: ts + 1_000_000_000 });
    recs
}

fn settings(files: Vec<PathBuf>, json: bool) -> ReportSettings {
    ReportSettings { files, filter: Filter::default(), since: None, until: None, json, hist: false, top: 50 }
}

/// kB from /proc/self/status.
fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes the crafted files to $BT_CRAFT_DIR, to run `backlog-trace report` on
/// them by hand (`cargo test -p backlog-user craft_files -- --ignored`).
#[test]
#[ignore]
fn craft_files() {
    let dir = PathBuf::from(std::env::var("BT_CRAFT_DIR").expect("BT_CRAFT_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    write_file(&dir.join("sysctls.btr"), &sysctl_records(128 << 10));
    write_file(&dir.join("listeners.btr"), &listener_records(50_000));
}

/// The child half of `crafted_recordings_report_in_linear_time`: reports the file
/// named by $BT_CRAFTED_REPORT and prints its time and peak memory.
#[test]
fn crafted_child() {
    let Ok(spec) = std::env::var("BT_CRAFTED_REPORT") else { return };
    let (json, path) = spec.split_once(':').unwrap();
    let before = status_kb("VmHWM:");
    let (t, cpu) = (Instant::now(), cpu_ms());
    let mut out = CountingSink(0);
    run(&settings(vec![path.into()], json == "json"), &mut out).unwrap();
    let (wall, cpu) = (t.elapsed().as_millis(), cpu_ms() - cpu);
    println!("CRAFTED ms={cpu} wall_ms={wall} hwm_kb={} before_kb={before} out_bytes={}", status_kb("VmHWM:"), out.0);
}

/// CPU time (user + system) this process has used, in ms: unlike wall time, it
/// does not grow with what else runs on a shared host.
fn cpu_ms() -> u64 {
    // SAFETY: plain syscall into a local struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

struct CountingSink(u64);

impl std::io::Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// (CPU ms, wall ms, peak RSS kB, peak RSS before the report kB, output bytes).
fn report_in_child(path: &Path, json: bool) -> (u64, u64, u64, u64, u64) {
    let spec = format!("{}:{}", if json { "json" } else { "text" }, path.display());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "record::hostile::crafted_child", "--nocapture", "--test-threads=1"])
        .env("BT_CRAFTED_REPORT", spec)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The harness prints the test's name on the same line, before it.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CRAFTED ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("child printed no result: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let field = |name: &str| -> u64 {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap()
    };
    (field("ms"), field("wall_ms"), field("hwm_kb"), field("before_kb"), field("out_bytes"))
}

/// The must-show: both crafted recordings report in under 2 s, text and JSON, and
/// the report's peak memory stays within a small multiple of what the file holds
/// plus what it prints.
#[test]
fn crafted_recordings_report_in_linear_time() {
    let dir = std::env::temp_dir().join(format!("bt-crafted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        ("sysctls", dir.join("sysctls.btr"), sysctl_records(128 << 10)),
        ("listeners", dir.join("listeners.btr"), listener_records(50_000)),
    ];
    for (name, path, recs) in &files {
        write_file(path, recs);
        let size_kb = std::fs::metadata(path).unwrap().len() / 1024;
        for json in [false, true] {
            let (ms, wall, hwm, before, out) = report_in_child(path, json);
            let grew = hwm.saturating_sub(before);
            eprintln!(
                "{name} ({size_kb} kB, json {json}): {ms} ms CPU ({wall} ms wall), peak +{grew} kB, printed {} kB",
                out / 1024
            );
            // Unoptimised builds get ten times the time.
            let limit = if cfg!(debug_assertions) { 20_000 } else { 2000 };
            assert!(ms < limit, "{name} (json {json}) took {ms} ms of CPU");
            // The model holds a bounded amount per listener and per record (the
            // largest part a listener's 232-bucket wait histogram, 1.8 kB, when it
            // has waits); what is printed is streamed, not built up first.
            let bound = 16 * size_kb + 2 * out / 1024 + 16 * 1024;
            assert!(grew < bound, "{name} (json {json}): peak grew {grew} kB, bound {bound} kB");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
