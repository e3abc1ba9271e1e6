//! `cargo xtask fuzz`: build the eBPF object and `weft-fuzz` (release), then run a million
//! generated frames through the datapath programs against the reference model
//! (`tests/src/fuzz.rs`), and a million more in NAT sequences (`tests/src/fuzz/nat.rs`),
//! reporting frames per second and any disagreement.

use anyhow::Result;

use crate::{cargo, ebpf, execute, setup, target_dir};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    ebpf::build()?;
    execute(cargo().args([
        "build",
        "--release",
        "-p",
        "weft-tests",
        "--bin",
        "weft-fuzz",
    ]))?;
    execute(std::process::Command::new(target_dir().join("release/weft-fuzz")).args(args))
}
