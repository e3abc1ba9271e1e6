//! `cargo xtask fuzz`: the differential fuzzer of the datapath programs at scale.
//!
//! `weft-fuzz [--frames N] [--nat-frames M] [--seed S]`: N generated frames (default one
//! million) from seed S (default: from the clock, printed, so a failure can be replayed)
//! through `from_pod` and `from_netdev`, then M (default one million) in NAT sequences
//! through `from_pod`, `to_netdev` and `from_netdev` with BPF source NAT on, each compared
//! with the reference model. Exits 1 on any disagreement, printing the first ones (with
//! their sequence). Needs root and the eBPF object.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use weft_tests::fuzz;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut frames: u64 = 1_000_000;
    let mut nat_frames: u64 = 1_000_000;
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            let text = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.with_context(|| format!("{name} {text}: not a number"))
        };
        match arg.as_str() {
            "--frames" => frames = value("--frames")?,
            "--nat-frames" => nat_frames = value("--nat-frames")?,
            "--seed" => seed = value("--seed")?,
            other => {
                bail!("unknown argument {other:?}: use --frames N, --nat-frames M and --seed S")
            }
        }
    }
    println!("weft-fuzz: {frames} frames and {nat_frames} NAT frames from seed {seed:#x}");
    let report = fuzz::run(frames, nat_frames, seed)?;
    println!("weft-fuzz: {}", report.summary());
    for mismatch in &report.mismatches {
        println!("{mismatch}");
    }
    Ok(report.disagreements == 0)
}
