//! `weft`: the node agent and its tools.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    propagate_version = true,
    about = "A flannel-compatible overlay network with an eBPF dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (flanneld's flags and FLANNELD_* variables).
    Agent(Box<weft::config::AgentArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = match cli.command {
        Command::Agent(args) => runtime.block_on(weft::agent::run(*args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
