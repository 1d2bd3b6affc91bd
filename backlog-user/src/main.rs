mod check;
mod cli;
mod netns;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match &cli.command {
        Some(cli::Command::Check(args)) => match check::run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("backlog-trace check: {e:#}");
                2
            }
        },
        None => {
            eprintln!("backlog-trace: tracer not wired yet");
            1
        }
    };
    std::process::exit(code);
}
