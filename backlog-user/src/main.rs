//! backlog-trace: catch and explain TCP listen-queue drops.
//!
//! Three places to read first: backlog-ebpf/src/drops/ (where a drop is detected),
//! src/sys/procs.rs with src/session/owners.rs (where it is attributed to the
//! processes holding the listener), src/output/ (where it is printed).
//!
//! Layers, each importing only those below it: cli (arguments -> settings) and this
//! file (dispatch, exit codes) on top; then record, check and export; session (the
//! live loop); output; model; event (raw kernel events -> types), kernel (load and
//! attach), time; and sys, the OS readers, in the library.
mod check;
mod cli;
mod escape;
mod event;
mod export;
mod kernel;
mod model;
mod output;
mod record;
mod session;
#[cfg(test)]
mod testing;
mod time;

use std::io::Write;

use anyhow::Result;
use backlog_user::sys;
use clap::Parser;

use session::observer::Observer;

fn main() {
    let cli = cli::Cli::parse();
    let code = match cli.command {
        Some(cli::Command::Check(args)) => match args.settings() {
            Ok(settings) => or_exit("check", 2, check::run(&settings, &mut std::io::stdout().lock())),
            Err(e) => usage("backlog-trace check", &e),
        },
        Some(cli::Command::Record(args)) => live(&args.trace, Some(args.settings())),
        Some(cli::Command::Report(args)) => {
            or_exit("report", 2, record::report(&args.settings(), &mut std::io::stdout().lock()))
        }
        Some(cli::Command::Completions { shell }) => match cli::completions(shell, &mut std::io::stdout().lock()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("backlog-trace completions: cannot write the script to stdout: {e}");
                1
            }
        },
        Some(cli::Command::Man { dir }) => {
            let mut out = std::io::stdout().lock();
            // The pages written, a path a line (a closed stdout is an error, not a panic).
            let listed = cli::man(dir.as_deref(), &mut out)
                .and_then(|pages| pages.iter().try_for_each(|p| writeln!(out, "{}", p.display())));
            match listed {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("backlog-trace man: cannot write the man pages: {e}");
                    1
                }
            }
        }
        None => live(&cli.trace, None),
    };
    std::process::exit(code);
}

/// A flag value that cannot work: one line, exit 2 (clap's code for bad usage).
fn usage(prefix: &str, e: &str) -> i32 {
    eprintln!("{prefix}: {e}");
    2
}

/// A command's exit code, or one line naming what failed and `code`.
fn or_exit(command: &str, code: i32, r: Result<i32>) -> i32 {
    r.unwrap_or_else(|e| {
        eprintln!("backlog-trace {command}: {e:#}");
        code
    })
}

/// Runs a live session, recording it when `record` is given, to its exit code:
/// 3 when the kernel lacks a forced mode, 1 for any other failure.
fn live(args: &cli::TraceArgs, record: Option<record::RecordSettings>) -> i32 {
    let settings = match args.live() {
        Ok(s) => s,
        Err(e) => return usage(if record.is_some() { "backlog-trace record" } else { "backlog-trace" }, &e),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    // Room for what a busy host or a hostile client makes the tracer open (rotations,
    // /proc scans, metrics connections): soft RLIMIT_NOFILE up to the hard limit.
    if let Err(e) = sys::limits::raise_nofile() {
        eprintln!("backlog-trace: cannot raise the open-file limit ({e}); going on with the current one");
    }
    let run = async {
        // Recorder first: a recording is what outlives the terminal.
        let mut observers: Vec<Box<dyn Observer>> = Vec::new();
        if let Some(r) = &record {
            observers.push(Box::new(record::Recorder::create(r, &settings.session.filter)?));
        }
        let stdout: Box<dyn Write> = Box::new(std::io::stdout());
        // Queue gauges are bounded like the tables: the --top fullest sockets.
        let top = settings.view.top;
        observers.push(Box::new(output::Printer::new(settings.view, stdout)));
        if let Some(addr) = settings.prometheus {
            observers.push(Box::new(export::Prometheus::serve(addr, settings.session.filter.clone(), top).await?));
        }
        session::run(settings.session, observers).await
    };
    match rt.block_on(run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("backlog-trace: {e:#}");
            if e.chain().any(|c| c.is::<kernel::ModeUnavailable>()) {
                kernel::ModeUnavailable::EXIT_CODE
            } else {
                1
            }
        }
    }
}
