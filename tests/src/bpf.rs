//! Which eBPF programs are loaded, to check the tracer leaves nothing behind.
use std::process::Command;

use serde::Deserialize;

/// Every program the tracer loads is named `bt_...`.
pub const PROGRAM_PREFIX: &str = "bt_";

#[derive(Deserialize, Debug)]
struct Holder {
    pid: u32,
    comm: String,
}

#[derive(Deserialize, Debug)]
struct Prog {
    id: u32,
    #[serde(default)]
    name: String,
    /// Processes holding an fd on the program (bpftool fills this in when the
    /// kernel supports BPF iterators).
    #[serde(default)]
    pids: Vec<Holder>,
}

/// The tracer's programs currently loaded in the kernel, as "name (id N)",
/// followed by " held by comm[pid] ..." when bpftool can tell.
pub fn our_programs_loaded() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["prog", "list", "-j"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool: {e}"));
    assert!(out.status.success(), "bpftool prog list failed: {}", String::from_utf8_lossy(&out.stderr));
    let progs: Vec<Prog> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool prog list -j: unexpected JSON ({e})"));
    progs
        .into_iter()
        .filter(|p| p.name.starts_with(PROGRAM_PREFIX))
        .map(|p| {
            let holders: Vec<String> = p.pids.iter().map(|h| format!("{}[{}]", h.comm, h.pid)).collect();
            let mut s = format!("{} (id {})", p.name, p.id);
            if !holders.is_empty() {
                s += &format!(" held by {}", holders.join(" "));
            }
            s
        })
        .collect()
}

/// Ids of the eBPF maps process `pid` holds (from /proc/PID/fdinfo, so another
/// tracer running on the machine is never read by mistake).
fn maps_held_by(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("map_id:")?.trim().parse().ok()))
        .collect()
}

#[derive(Deserialize, Debug)]
struct MapInfo {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize, Debug)]
struct PerCpuValue {
    value: Vec<String>,
}

#[derive(Deserialize, Debug)]
struct Lookup {
    values: Vec<PerCpuValue>,
}

fn bpftool_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> T {
    let out =
        Command::new("bpftool").arg("-j").args(args).output().unwrap_or_else(|e| panic!("cannot run bpftool: {e}"));
    assert!(out.status.success(), "bpftool {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {args:?}: unexpected JSON ({e})"))
}

/// Slot `index` of the GLOBAL per-CPU counters of the tracer with pid `pid`, summed
/// over CPUs (see `backlog_common::global`).
pub fn tracer_global(pid: u32, index: u32) -> u64 {
    let id = maps_held_by(pid)
        .into_iter()
        .find(|id| bpftool_json::<MapInfo>(&["map", "show", "id", &id.to_string()]).name == "GLOBAL")
        .unwrap_or_else(|| panic!("process {pid} holds no GLOBAL map: is it a running backlog-trace?"));
    let key: Vec<String> = index.to_le_bytes().iter().map(u8::to_string).collect();
    let mut args = vec!["map".to_string(), "lookup".into(), "id".into(), id.to_string(), "key".into()];
    args.extend(key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let found: Lookup = bpftool_json(&args);
    found
        .values
        .iter()
        .map(|v| {
            let bytes: Vec<u8> =
                v.value.iter().map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).unwrap()).collect();
            u64::from_le_bytes(bytes.try_into().expect("8-byte GLOBAL value"))
        })
        .sum()
}
