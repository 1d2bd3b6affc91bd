//! Whether every program the tracer attached is still attached.
//!
//! Anyone with CAP_SYS_ADMIN can detach a bpf_link from outside the process that
//! holds it (`bpftool link detach id N`, BPF_LINK_DETACH): the link object lives on
//! while our descriptor does, but the program no longer runs. The kernel says so in
//! the link's info: a detached cgroup link reports cgroup_id 0 (checked on 6.18).
//! Tracing, raw tracepoint and perf-event links have no detach operation, so they
//! cannot be taken away short of killing the tracer.
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_obj::generated::{bpf_link_info, bpf_link_type};

use super::objinfo;

/// One of our programs' links, held by a descriptor of our own.
struct Held {
    program: String,
    id: u32,
    fd: OwnedFd,
    /// Already reported detached.
    gone: bool,
}

pub struct Links(Vec<Held>);

fn info(fd: &OwnedFd) -> std::io::Result<bpf_link_info> {
    // SAFETY: bpf_link_info is plain old data; all-zero is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    objinfo::get(fd.as_fd(), &mut info)?;
    Ok(info)
}

impl Links {
    /// Finds the links of every loaded program of `ebpf` among the system's links.
    pub fn of(ebpf: &Ebpf) -> Result<Links> {
        let mut programs = std::collections::HashMap::new();
        for (name, p) in ebpf.programs() {
            if let Ok(info) = p.info() {
                programs.insert(info.id(), name.to_string());
            }
        }
        let mut held = Vec::new();
        for link in aya::programs::loaded_links() {
            let link = link.context("listing the system's BPF links")?;
            let Some(program) = programs.get(&link.program_id()) else { continue };
            // A link that went away between listing and opening was not ours to keep.
            let Ok(fd) = objinfo::link_by_id(link.id()) else { continue };
            held.push(Held { program: program.clone(), id: link.id(), fd, gone: false });
        }
        Ok(Links(held))
    }

    /// Links found detached since the last call, one line each naming the program.
    pub fn newly_detached(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for h in self.0.iter_mut().filter(|h| !h.gone) {
            let why = match info(&h.fd) {
                // SAFETY: the union member matching the link's type.
                Ok(i)
                    if i.type_ == bpf_link_type::BPF_LINK_TYPE_CGROUP as u32
                        && unsafe { i.__bindgen_anon_1.cgroup.cgroup_id } == 0 =>
                {
                    "its cgroup link was detached from outside the tracer".to_string()
                }
                Ok(_) => continue,
                Err(e) => format!("its link can no longer be read ({e})"),
            };
            h.gone = true;
            out.push(format!(
                "program {} (link {}) stopped running: {why}; the drops it would have detected count as undetected \
                 from now on (restart backlog-trace to attach it again)",
                h.program, h.id
            ));
        }
        out
    }
}
