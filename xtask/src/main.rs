//! Project automation: `cargo xtask <task>` (alias in .cargo/config.toml).

mod apt;
mod bench;
mod harness;
mod initramfs;
mod kernels;
mod qemu;
mod stress;
mod vmlinux;
mod vmtest;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "backlog-trace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Boot stock Debian kernels under qemu (TCG) and run COMMAND in each, once per mode.
    ///
    /// The guest sees the host's root read-only (cwd = the workspace root), a tmpfs /tmp
    /// and /run, and a writable $BACKLOG_VM_OUT (host: target/vm/results/<kernel>/<mode>/,
    /// which also gets console.log and exit-status). BACKLOG_VM_KERNEL and BACKLOG_MODE are
    /// set. Exits non-zero if any run fails. Kernels and package lists are cached in
    /// target/vm/; only the first run (or --refresh) uses the network.
    VmTest {
        /// Kernel: a line (5.10, 6.1, 6.12, 7 = newest 7.x), optionally with a flavour
        /// (6.12-rt, 6.1-cloud: built without 9p, it gets the host over virtiofs, which
        /// needs virtiofsd), or all (5.10, 6.1, 6.12, 7, 6.12-rt, 6.1-cloud);
        /// comma-separated for several.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Attach modes, each run in its own boot with BACKLOG_MODE set.
        #[arg(long, value_delimiter = ',', default_value = "fentry,kprobe,tracepoint",
              value_parser = ["fentry", "kprobe", "tracepoint"])]
        mode: Vec<String>,
        /// Only print the resolved kernel releases.
        #[arg(long)]
        list: bool,
        /// Re-resolve the newest kernels (fetches package lists).
        #[arg(long)]
        refresh: bool,
        /// Seconds before a guest is killed and its run reported as "timeout".
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Guests booted at the same time (each has 2 vCPUs and 1 GiB).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        jobs: u64,
        /// Program and arguments run in the guest (no shell: use `sh -c '...'` for one).
        /// A command whose mode cannot run on the kernel writes why to
        /// $BACKLOG_VM_OUT/unsupported and exits 77 ($BACKLOG_VM_UNSUPPORTED): the cell
        /// then reads "unsupported" with that reason, and does not fail the run.
        #[arg(last = true, default_values = ["target/release/backlog-trace", "--help"])]
        command: Vec<String>,
    },
    /// Boot one kernel with its console on this terminal and run COMMAND (default: bash).
    /// Same guest as vm-test; quit qemu with Ctrl-A X.
    VmShell {
        /// Kernel: 5.10, 6.1, 6.12 or 7, optionally with -rt or -cloud.
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Value of BACKLOG_MODE in the guest.
        #[arg(long, default_value = "fentry", value_parser = ["fentry", "kprobe", "tracepoint"])]
        mode: String,
        /// Program and arguments run in the guest.
        #[arg(last = true, default_values = ["bash"])]
        command: Vec<String>,
    },
    /// Print, one per line, the apt-get options that install from this machine's
    /// <codename>-backports through a private sources dir (the machine's Debian entries
    /// plus backports on the same mirror) and private lists under DIR, leaving /etc/apt
    /// and /var/lib/apt/lists alone (scripts/vm-deps.sh: qemu comes from backports).
    AptBackports {
        /// Directory for the private sources and lists.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Measure what backlog-trace costs (nginx + wrk connection rate with/without it and
    /// beside a bpftrace peer; SYN-flood drop throughput, lost events, CPU, RSS, start
    /// time) and print each figure beside its target. Needs root; deps: scripts/bench-deps.sh.
    Bench {
        /// Tracer binary to measure [default: build and use the workspace's release build].
        #[arg(long)]
        tracer: Option<PathBuf>,
        /// Alternating without/with pairs per configuration.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        pairs: u64,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
        /// wrk's concurrent connections.
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// nginx's port on 127.0.0.1.
        #[arg(long, default_value_t = 18080)]
        port: u16,
        /// Seconds per SYN-flood run.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        flood_seconds: u64,
        /// SYN sender threads (default: one per core).
        #[arg(long)]
        flood_threads: Option<usize>,
        /// getppid() calls per syscall-loop measurement (fewer in an emulated guest).
        #[arg(long, default_value_t = bench::SYSCALL_CALLS, value_parser = clap::value_parser!(u64).range(1000..))]
        syscall_calls: u64,
        /// Replace the run recorded in BENCH.md with this one.
        #[arg(long)]
        record: bool,
        /// Run only these parts: rate (nginx+wrk), flood (SYN flood), syscall (getppid loop),
        /// profile (rate's per-program run alone, with one pair for the estimate: ~1 min).
        #[arg(long, value_delimiter = ',', value_parser = ["rate", "flood", "syscall", "profile"])]
        only: Vec<String>,
    },
    /// Repeat the exact-count drop scenarios (tests/tests/drops.rs) under concurrent load and
    /// check every run: drop lines == ListenDrops delta == the summary's drops, undetected 0.
    /// Prints a line per run and a scenario × load table; exits non-zero if any run was not
    /// exact. Needs root; deps: scripts/bench-deps.sh. Logs: target/stress/ (in a vm-test
    /// guest: $BACKLOG_VM_OUT/stress/).
    Stress {
        /// Runs of each scenario under each load.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: u32,
        /// Scenarios, comma-separated [default: all].
        #[arg(long, value_delimiter = ',', value_enum)]
        scenario: Vec<stress::Scenario>,
        /// Loads, comma-separated; each is started before every run and stopped after it
        /// [default: all but none].
        #[arg(long, value_delimiter = ',', value_enum)]
        load: Vec<stress::Load>,
        /// Tracer binary [default: build and use the workspace's release build].
        #[arg(long)]
        tracer: Option<PathBuf>,
        /// The tests/tests/drops.rs executable [default: build it].
        #[arg(long)]
        drops_test: Option<PathBuf>,
        /// Build nothing: use target/release's tracer and newest drops test executable (for
        /// vm-test guests, where cargo cannot write target/).
        #[arg(long)]
        no_build: bool,
        /// Directory for each run's test log and counts [default: target/stress].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    // xtask lives one level below the workspace root.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent dir");
    match Cli::parse().task {
        Task::VmTest { kernel, mode, list, refresh, timeout, jobs, command } => {
            let mut series = Vec::new();
            for k in kernel.split(',') {
                for s in kernels::Series::parse(k.trim())? {
                    if !series.contains(&s) {
                        series.push(s);
                    }
                }
            }
            let opts = vmtest::Options {
                series,
                modes: mode,
                list,
                refresh,
                timeout: Duration::from_secs(timeout),
                jobs: jobs as usize,
                command,
            };
            vmtest::run(workspace, &opts)
        }
        Task::VmShell { kernel, mode, command } => {
            let [series] = kernels::Series::parse(&kernel)?[..] else {
                anyhow::bail!("vm-shell boots one kernel: name one (5.10, 6.12-rt, ...), not '{kernel}'");
            };
            vmtest::shell(workspace, series, &mode, &command)
        }
        Task::AptBackports { dir } => {
            for opt in apt::backports_options(&dir)? {
                println!("{opt}");
            }
            Ok(true)
        }
        Task::Bench {
            tracer,
            pairs,
            seconds,
            connections,
            port,
            flood_seconds,
            flood_threads,
            syscall_calls,
            record,
            only,
        } => bench::run(
            workspace,
            &bench::Options {
                tracer,
                pairs: pairs as usize,
                seconds,
                connections,
                port,
                flood_seconds,
                flood_threads: flood_threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                syscall_calls,
                record,
                only,
            },
        ),
        Task::Stress { runs, scenario, load, tracer, drops_test, no_build, out } => stress::run(
            workspace,
            &stress::Options {
                runs,
                scenarios: if scenario.is_empty() { stress::Scenario::ALL.to_vec() } else { scenario },
                loads: if load.is_empty() { stress::Load::DEFAULT.to_vec() } else { load },
                tracer,
                drops_test,
                no_build,
                out,
            },
        ),
    }
}
