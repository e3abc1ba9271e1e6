//! `cargo xtask chaos`: every chaos scenario of `weft_tests::chaos` in its own lab, printed
//! as a markdown table (also written to target/chaos/chaos.md). Needs root.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use weft_tests::chaos::{self, Fault, Outcome};

fn main() -> Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let mut table = format!(
        "Chaos, {} UTC: two-node BPF/VXLAN lab, resync interval {} s; a 5 ms ping flood and a \
         1 MB/s TCP stream from a pod on node 1 to a pod on node 2 while node 2 suffers the \
         fault.\n\n{}\n",
        now(),
        chaos::RESYNC_INTERVAL.as_secs(),
        Outcome::HEADER
    );
    for fault in Fault::ALL {
        let name = format!("{fault:?}");
        if !only.is_empty() && !only.iter().any(|o| name.eq_ignore_ascii_case(o)) {
            continue;
        }
        eprintln!("chaos: {}", fault.describe());
        match chaos::run_scenario(fault) {
            Ok(outcome) => {
                eprintln!("{}", outcome.row());
                writeln!(table, "{}", outcome.row())?;
            }
            Err(e) => {
                eprintln!("chaos: {name} failed: {e:#}");
                writeln!(
                    table,
                    "| {} | scenario failed: {e:#} | | | |",
                    fault.describe()
                )?;
            }
        }
    }
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/chaos");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("chaos.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("chaos: written to {}", path.display());
    Ok(())
}

fn now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
