//! weft-demo: a 3-node VXLAN cluster in network namespaces, built from nothing: etcd, a
//! `weft agent` per node, two pods per node; prints the lease table and the pod-to-pod
//! ping matrix, removes everything, and exits non-zero if any pair failed.
//! Run as root after `cargo build -p weft --bins` (or with WEFT_BIN_DIR set).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use weft_tests::{Backend, Lab, LabConfig};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;

fn main() -> ExitCode {
    match demo() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether every pod pair pinged. The lab is removed when it goes out of scope.
fn demo() -> Result<bool> {
    let started = Instant::now();
    println!("Starting a {NODES}-node VXLAN lab (fabric bridge, etcd, one weft agent per node)...");
    let mut lab = Lab::start(LabConfig {
        nodes: NODES,
        backend: Backend::Vxlan,
        ip_masq: true,
        ..Default::default()
    })?;
    println!("  agents ready after {:.2?}", started.elapsed());
    let pods = lab.add_pods(PODS_PER_NODE)?;
    println!("  {} pods attached by weft-cni", pods.len());

    println!("\nLeases in etcd:");
    println!(
        "  {:<6} {:<16} {:<14} {:<10} VtepMAC",
        "node", "subnet", "public IP", "backend"
    );
    let mut leases = lab.leases()?;
    leases.sort_by_key(|lease| lease.public_ip);
    for lease in &leases {
        let node = (1..=lab.node_count())
            .find(|&i| lab.node_ip(i) == lease.public_ip)
            .map(|i| format!("n{i}"))
            .unwrap_or_else(|| "?".into());
        println!(
            "  {:<6} {:<16} {:<14} {:<10} {}",
            node,
            lease.cidr(),
            lease.public_ip.to_string(),
            lease.backend_type,
            lease.vtep_mac.as_deref().unwrap_or("-")
        );
    }

    println!("\nPods:");
    for pod in &pods {
        println!(
            "  {:<6} {:<14} on n{}",
            pod.name,
            pod.ip.to_string(),
            pod.node
        );
    }

    let (matrix, took) = lab.wait_for_matrix(&pods, Duration::from_secs(10));
    println!("\nPod-to-pod ping (row pings column):\n{}", matrix.render());
    let ok = matrix.all_ok();
    if ok {
        println!(
            "All {} pairs reply (converged in {took:.2?}).",
            matrix.results.len()
        );
    } else {
        println!("Pairs without reply:\n  {}", matrix.failures().join("\n  "));
        println!("\n{}", lab.diagnostics());
    }
    drop(lab);
    println!("Lab removed; total {:.2?}.", started.elapsed());
    Ok(ok)
}
