//! backlog-trace: catch and explain TCP listen-queue drops.
//!
//! Three files to read first: backlog-ebpf/src/drops/ (where a drop is detected),
//! src/attribute/ (where it is attributed to processes), src/output/ (where it is
//! printed).
mod attribute;
mod check;
mod cli;
mod export;
mod kernel;
mod model;
mod output;
mod reconcile;
mod record;
mod retired;
mod trace;

use backlog_user::sys;
use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match cli.command {
        Some(cli::Command::Check(args)) => match check::run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("backlog-trace check: {e:#}");
                2
            }
        },
        Some(cli::Command::Record(args)) => live(record::record(args)),
        Some(cli::Command::Report(args)) => match record::report(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("backlog-trace report: {e:#}");
                2
            }
        },
        None => live(trace::run(cli.trace, Vec::new())),
    };
    std::process::exit(code);
}

/// Runs a live session (plain or recording) to its exit code.
fn live(session: impl std::future::Future<Output = anyhow::Result<i32>>) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(session) {
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
