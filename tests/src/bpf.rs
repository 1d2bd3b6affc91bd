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

fn loaded() -> Vec<Prog> {
    let out = Command::new("bpftool")
        .args(["prog", "list", "-j"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool: {e}"));
    assert!(out.status.success(), "bpftool prog list failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool prog list -j: unexpected JSON ({e})"))
}

/// Ids of the tracer's programs (`bt_...`) that process `pid` holds, found in
/// /proc/PID/fdinfo (a program's or a link's fdinfo names its program id; bpftool's
/// own `pids` needs BPF iterators it is not always built with). Another
/// backlog-trace may run on the machine meanwhile: its programs are not ours.
pub fn programs_held_by(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut held = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")).flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let id = text.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse::<u32>().ok());
        held.extend(id.filter(|i| !held.contains(i)));
    }
    loaded().into_iter().filter(|p| p.name.starts_with(PROGRAM_PREFIX) && held.contains(&p.id)).map(|p| p.id).collect()
}

/// Those of `ids` still loaded, as "name (id N)", followed by " held by
/// comm[pid] ..." when bpftool can tell.
pub fn still_loaded(ids: &[u32]) -> Vec<String> {
    loaded()
        .into_iter()
        .filter(|p| ids.contains(&p.id))
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

/// Ids of the cgroup links process `pid` holds a descriptor of, from
/// /proc/PID/fdinfo (a bpf link's fdinfo names its type and id).
pub fn cgroup_links_of(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")).flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        if field("link_type:") == Some("cgroup") {
            let id = field("link_id:").and_then(|v| v.parse().ok());
            ids.extend(id.filter(|i| !ids.contains(i)));
        }
    }
    ids
}

/// Detaches a BPF link from outside the process holding it, as an operator would.
pub fn detach_link(id: u32) {
    let out = Command::new("bpftool")
        .args(["link", "detach", "id", &id.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool: {e}"));
    assert!(out.status.success(), "bpftool link detach id {id} failed: {}", String::from_utf8_lossy(&out.stderr));
}
