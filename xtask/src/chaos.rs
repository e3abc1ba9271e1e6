//! `cargo xtask chaos`: build the agent and `weft-chaos`, then run every chaos scenario
//! (faults on a node under traffic) and write target/chaos/chaos.md.

use anyhow::Result;

use crate::{cargo, ebpf, execute, setup, target_dir};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    ebpf::build()?;
    execute(cargo().args(["build", "-p", "weft", "--bins"]))?;
    execute(cargo().args([
        "build",
        "-p",
        "weft-tests",
        "--bin",
        "weft-chaos",
        "--bin",
        "weft-apiserver",
    ]))?;
    let debug = target_dir().join("debug");
    execute(
        std::process::Command::new(debug.join("weft-chaos"))
            .args(args)
            .env("WEFT_BIN_DIR", &debug),
    )
}
