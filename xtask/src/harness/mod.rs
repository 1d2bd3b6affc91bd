//! What `cargo xtask bench` and `cargo xtask stress` both drive: nginx and wrk,
//! tracing processes (backlog-trace, bpftrace), network namespaces, a few libc
//! calls, and the checks and build step that come before them.
pub mod netns;
pub mod nginx;
pub mod probe;
pub mod sys;
pub mod wrk;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The peer: bpftrace on the tracepoints backlog-trace's tracepoint mode uses (its
/// cgroup_skb program has no bpftrace equivalent), each doing what a typical script
/// does there, a per-CPU count.
pub const PEER_SCRIPT: &str = "
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ { @state[args->oldstate, args->newstate] = count(); }
tracepoint:skb:kfree_skb { @kfree[args->reason] = count(); }
tracepoint:skb:consume_skb { @consume = count(); }
tracepoint:net:net_dev_queue { @xmit = count(); }
tracepoint:syscalls:sys_enter_listen { @listen = count(); }
tracepoint:syscalls:sys_exit_accept4, tracepoint:syscalls:sys_exit_accept { @accept = count(); }
";

/// Fails unless root and every command in `commands` is on PATH; `task` and `deps`
/// name the task and the script that installs the commands.
pub fn preflight(task: &str, commands: &[&str], deps: &str) -> Result<()> {
    if !sys::is_root() {
        bail!("{task} loads eBPF programs and creates namespaces: run it as root (sudo -E cargo xtask {task})");
    }
    let missing: Vec<&str> = commands.iter().copied().filter(|c| !on_path(c)).collect();
    if !missing.is_empty() {
        bail!("{} not found: run {deps}", missing.join(", "));
    }
    Ok(())
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// `given`, or the workspace's release build, rebuilt first so the task runs the
/// tree as it is (a no-op when it is fresh).
pub fn tracer(workspace: &Path, given: Option<&Path>, task: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("--tracer {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    eprintln!("{task}: building backlog-trace (release)");
    cargo(workspace, &["build", "--release", "-p", "backlog-user"])
        .with_context(|| "building backlog-trace failed; fix the build or pass --tracer PATH".to_string())?;
    Ok(target_dir(workspace).join("release/backlog-trace"))
}

/// Runs cargo (the one running xtask) in the workspace; returns its stdout.
pub fn cargo(workspace: &Path, args: &[&str]) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(workspace)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or(workspace.join("target"), |d| workspace.join(d))
}
