//! `cargo xtask demo`: build everything, then run the lab demo (`weft-demo`
//! in package weft-tests), which builds a cluster in network namespaces.

use anyhow::Result;

use crate::{cargo, ebpf, execute, setup};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    ebpf::build()?;
    execute(cargo().args(["build", "--workspace", "--bins"]))?;
    execute(
        cargo()
            .args(["run", "-p", "weft-tests", "--bin", "weft-demo", "--"])
            .args(args),
    )
}
