//! `cargo xtask bench`: build the agent (release, with the eBPF object embedded) and the
//! benchmark, then run `weft-bench` (package weft-tests), which measures pod-to-pod
//! throughput and ping-pong rate on every path in namespace labs, then a pod to the external
//! host through each source NAT (BPF, nftables, iptables), then the control plane
//! (5,000 Nodes through the API server emulator into an agent, BPF and kernel dataplane),
//! and writes a markdown report (default target/bench/bench.md).

use anyhow::Result;

use crate::{cargo, ebpf, execute, setup, target_dir};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    ebpf::build()?;
    // Release binaries: the numbers are meant to be what users get.
    execute(cargo().args(["build", "--release", "-p", "weft", "--bins"]))?;
    execute(cargo().args([
        "build",
        "--release",
        "-p",
        "weft-tests",
        "--bin",
        "weft-bench",
        // The control-plane section's API server.
        "--bin",
        "weft-apiserver",
    ]))?;
    let release = target_dir().join("release");
    execute(
        std::process::Command::new(release.join("weft-bench"))
            .args(args)
            .env("WEFT_BIN_DIR", &release),
    )
}
