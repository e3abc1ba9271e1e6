//! Project tasks: `cargo xtask setup | build-ebpf | test | demo | bench | fuzz | chaos`.
//!
//! The alias in `.cargo/config.toml` runs this binary with rustup's cargo; the
//! eBPF build switches to Debian's cargo/rustc (see [`ebpf`]).

mod bench;
mod chaos;
mod demo;
mod ebpf;
mod fuzz;
mod requirements;
mod setup;
#[cfg(test)]
mod source_scan;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "weft project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the apt packages and bpf-linker the build and the tests need
    /// (idempotent: only what is missing).
    Setup,
    /// Build the eBPF programs (release profile) and copy the object to
    /// target/bpf/weft.bpf.o.
    BuildEbpf,
    /// setup, build-ebpf, build every binary, run every test.
    Test,
    /// setup, build-ebpf, build every binary, run the lab demo.
    Demo {
        /// Arguments passed on to the demo binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// setup, build-ebpf, build the agent and the benchmark in release, and measure
    /// pod-to-pod throughput and ping-pong rate on every path (kernel host-gw, kernel
    /// VXLAN, weft BPF VXLAN and direct route, same node); writes target/bench/bench.md.
    Bench {
        /// Arguments passed on to weft-bench (--quick, --duration S, --runs N,
        /// --paths a,b, --out FILE).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// setup, build-ebpf, then run a million generated frames through the datapath
    /// programs and compare each result with the reference model, byte for byte.
    Fuzz {
        /// Arguments passed on to weft-fuzz (--frames N, --nat-frames M, --seed S).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// setup, build-ebpf, then fault a lab node under traffic in every way the chaos
    /// scenarios know (uplink flap, devices, filters and map entries deleted, etcd and API
    /// server outages, agent killed, node IP changed); writes target/chaos/chaos.md.
    Chaos {
        /// Scenario names to run (all when none), e.g. UplinkFlap.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => ebpf::build().map(drop),
        Task::Test => test(),
        Task::Demo { args } => demo::run(&args),
        Task::Bench { args } => bench::run(&args),
        Task::Fuzz { args } => fuzz::run(&args),
        Task::Chaos { args } => chaos::run(&args),
    }
}

fn test() -> Result<()> {
    setup::run()?;
    ebpf::build()?;
    execute(cargo().args(["build", "--workspace", "--bins"]))?;
    build_static_cni()?;
    // Network tests each build a small namespace lab; two at a time fits 2 cores.
    execute(
        cargo()
            .args(["test", "--workspace"])
            .env("RUST_TEST_THREADS", "2"),
    )
}

/// The host's target triple (the one rustup's toolchain builds for).
pub(crate) fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds weft-cni statically linked (glibc's crt-static), into
/// `target/static/<triple>/release/weft-cni`: the CNI plugin runs in the host's namespace
/// from /opt/cni/bin, where the image's C library is not. An explicit `--target` keeps
/// build scripts and proc macros dynamic; a target dir of its own keeps the flag from
/// invalidating the rest of the build.
pub(crate) fn build_static_cni() -> Result<()> {
    let triple = host_triple();
    execute(
        cargo()
            .args([
                "build",
                "--release",
                "-p",
                "weft",
                "--bin",
                "weft-cni",
                "--target",
            ])
            .arg(&triple)
            .arg("--target-dir")
            .arg(target_dir().join("static"))
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )
}

/// The root of the cargo workspace (the parent of xtask/).
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// The target directory of the root workspace (also holds the eBPF build).
pub(crate) fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

/// The cargo that runs this xtask (rustup's), for the userspace workspace.
pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, echoing it first; fails if it does not exit with 0.
pub(crate) fn execute(command: &mut Command) -> Result<()> {
    println!("xtask: running {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("cannot start {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(command));
    }
    Ok(())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
