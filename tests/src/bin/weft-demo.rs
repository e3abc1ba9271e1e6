//! weft-demo: a 3-node VXLAN cluster in network namespaces, built from nothing: etcd, a
//! `weft agent` per node run as users run it (`--dataplane=auto`), two pods per node,
//! kube-proxy's rules for a Service; prints the lease table, the dataplane each node chose,
//! the pod-to-pod ping matrix with the fast-path counters that carried it, and a call to
//! the Service from a pod on another node than its backend, and a call to a host outside the
//! cluster (`--ip-masq`: the firewall's masquerade). Removes everything, and exits
//! non-zero if anything failed.
//! Run as root after `cargo build -p weft --bins` (or with WEFT_BIN_DIR set).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use weft_common::Counter;
use weft_tests::echo::{self, EchoServer};
use weft_tests::kube_proxy::{Protocol, ProxyMode, Service};
use weft_tests::{Backend, Dataplane, Lab, LabConfig, EXTERNAL_HOST};

/// The demo's Service: a ClusterIP whose one endpoint is the first pod of node 2.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;

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
        dataplane: Dataplane::Auto,
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

    println!("\nDataplane each agent chose (--dataplane=auto):");
    for node in 1..=lab.node_count() {
        let log = lab.agent_log_tail(node, 200);
        let said = |what: &str| {
            log.lines()
                .rfind(|l| l.contains(what))
                .and_then(|l| l.split_once(what).map(|(_, rest)| rest.trim().to_string()))
                .unwrap_or_else(|| "?".into())
        };
        println!("  n{node}: {}", said("agent: dataplane: "));
        println!("       fast path {}", said("fast path "));
    }

    // The first round lets every agent learn its pods; the second is the one counted.
    let (first, took) = lab.wait_for_matrix(&pods, Duration::from_secs(10));
    let bpf_nodes: Vec<usize> = (1..=lab.node_count())
        .filter(|&n| lab.wait_bpf_synced(n, Duration::from_secs(10)).is_ok())
        .collect();
    let before: Vec<_> = bpf_nodes
        .iter()
        .map(|&n| lab.bpf_counters(n))
        .collect::<Result<_>>()?;
    let matrix = lab.ping_matrix(&pods);
    println!("\nPod-to-pod ping (row pings column):\n{}", matrix.render());
    let mut ok = first.all_ok() && matrix.all_ok();
    if ok {
        println!(
            "All {} pairs reply (converged in {took:.2?}).",
            matrix.results.len()
        );
    } else {
        println!("Pairs without reply:\n  {}", matrix.failures().join("\n  "));
        println!("\n{}", lab.diagnostics());
    }
    println!("\nFast-path counters during that round (packets the eBPF programs carried):");
    for (&node, before) in bpf_nodes.iter().zip(&before) {
        let delta = lab.bpf_counters(node)?.since(before);
        println!(
            "  n{node}: encapsulated {}, decapsulated into pods {}, left to the kernel {}",
            delta.get(Counter::Encap),
            delta.get(Counter::Decap),
            delta.get(Counter::Passed) + delta.get(Counter::StackFlow)
        );
    }
    if bpf_nodes.is_empty() {
        println!("  (no node runs the BPF dataplane: see the reasons above)");
    }

    // A Service across nodes: kube-proxy's DNAT on the client's node, the backend elsewhere.
    let (client, backend) = (&pods[0], &pods[PODS_PER_NODE]);
    let service = Service::cluster_ip("web", SERVICE_IP, SERVICE_PORT, Protocol::Tcp).endpoint(
        backend.ip,
        backend.node,
        SERVICE_PORT,
    );
    lab.install_kube_proxy(ProxyMode::Iptables, &[service])?;
    let _server = EchoServer::start(
        &backend.ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVICE_PORT),
        Protocol::Tcp,
    )?;
    let target = SocketAddrV4::new(SERVICE_IP, SERVICE_PORT);
    println!(
        "\nService call: {} (n{}) → ClusterIP {target} → {} (n{}), through kube-proxy's iptables rules:",
        client.name, client.node, backend.name, backend.node
    );
    match echo::call(&client.ns, target, Protocol::Tcp, Duration::from_secs(5)) {
        Ok(reply) => println!(
            "  answered from {target}; the backend saw the client as {}",
            reply.seen_by_server
        ),
        Err(e) => {
            ok = false;
            println!("  no answer: {e:#}");
        }
    }
    // Leaving the cluster: --ip-masq, the firewall's masquerade (BPF source NAT only with
    // --masquerade=bpf, experimental).
    let outside = SocketAddrV4::new(EXTERNAL_HOST, SERVICE_PORT);
    let _external = EchoServer::start(lab.fabric_ns(), outside, Protocol::Tcp)?;
    let before = lab.bpf_counters(client.node).ok();
    println!(
        "\nTo the outside: {} (n{}, {}) → {outside} (a host on the underlay), with --ip-masq:",
        client.name, client.node, client.ip
    );
    match echo::call(&client.ns, outside, Protocol::Tcp, Duration::from_secs(5)) {
        Ok(reply) => {
            let by = match (before, lab.bpf_counters(client.node).ok()) {
                (Some(before), Some(after)) if after.since(&before).get(Counter::NatOut) > 0 => {
                    "weft's BPF source NAT"
                }
                _ => "the firewall's masquerade rule",
            };
            println!(
                "  answered; the host saw the pod as {} (translated by {by})",
                reply.seen_by_server
            );
        }
        Err(e) => {
            ok = false;
            println!("  no answer: {e:#}");
        }
    }
    drop(lab);
    println!("Lab removed; total {:.2?}.", started.elapsed());
    Ok(ok)
}
