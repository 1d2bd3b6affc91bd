//! `backlog-trace check`: the operator's diagnosis, automated. (Owned by the check work.)
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Only listeners on this local port (repeatable).
    #[arg(long = "port", short = 'p', value_parser = clap::value_parser!(u16).range(1..=65535))]
    pub ports: Vec<u16>,
    /// Emit one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: &CheckArgs) -> anyhow::Result<i32> {
    anyhow::bail!("check: under construction in this tree")
}
