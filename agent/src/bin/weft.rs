//! `weft`: the node agent and its tools (the command line is [`weft::cli`]).

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(weft::cli::normalize_args(std::env::args_os()));
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the tokio runtime")
            .block_on(weft::agent::run(*args)),
        Command::InstallCni(args) => weft::install::install_cni(&args).map(|installed| {
            for file in installed {
                println!("weft install-cni: {file}");
            }
        }),
        Command::MkDockerOpts(args) => weft::docker_opts::run(&args).map(drop),
        Command::Status(args) => weft::status::status(&args).and_then(|report| {
            match args.output {
                weft::status::Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&report)?)
                }
                weft::status::Output::Table => print!("{}", report.render()),
            }
            Ok(())
        }),
        Command::Bpf(args) => weft::status::bpf(&args).map(|text| print!("{text}")),
        Command::MountBpffs(args) => {
            weft::install::mount_bpffs(&args).map(|done| println!("weft mount-bpffs: {done}"))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
