//! backlog-trace: catch and explain TCP listen-queue drops.
//!
//! Three files to read first: backlog-ebpf/src/drops/ (where a drop is detected),
//! src/attribute/ (where it is attributed to processes), src/output/ (where it is
//! printed).
mod attribute;
mod check;
mod cli;
mod kernel;
mod model;
mod netns;
mod output;
mod trace;

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
        None => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(trace::run(cli.trace)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("backlog-trace: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
