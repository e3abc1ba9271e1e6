//! `weft status` and `weft bpf ...` on lab nodes, with the agent running and after it
//! stopped: what an operator reads when something is wrong.

use std::time::Duration;

use serde_json::Value;
use weft_tests::exec::Cmd;
use weft_tests::{wait_until, Dataplane, Lab, LabConfig};

const HEALTHZ_PORT: u16 = 8471;

/// Runs `weft <command> <args>` on node `index`; returns stdout, failing unless it exits 0.
fn weft(lab: &Lab, index: usize, command: &str, args: &[&str]) -> String {
    let mut argv = vec![lab.binary("weft").unwrap().to_string_lossy().into_owned()];
    argv.extend(command.split_whitespace().map(str::to_string));
    argv.extend(args.iter().map(|a| a.to_string()));
    Cmd::new(argv)
        .netns(lab.node_ns(index))
        .timeout(Duration::from_secs(20))
        .run()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn status_json(lab: &Lab, index: usize) -> Value {
    let subnet_file = lab.node(index).subnet_file.to_string_lossy().into_owned();
    let out = weft(
        lab,
        index,
        "status",
        &["--subnet-file", &subnet_file, "-o", "json"],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn peer<'a>(status: &'a Value, subnet: &str) -> &'a Value {
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["subnet"] == subnet)
        .unwrap_or_else(|| panic!("no peer {subnet} in {status:#}"))
}

#[test]
fn status_and_bpf_maps_read_the_node_while_the_agent_runs_and_after_it_stopped() {
    let mut lab = Lab::start(LabConfig {
        nodes: 2,
        dataplane: Dataplane::Bpf,
        node_dataplanes: [(2, Dataplane::Kernel)].into_iter().collect(),
        extra_agent_args: vec![format!("--healthz-port={HEALTHZ_PORT}")],
        ..Default::default()
    })
    .expect("lab starts");
    let pods = lab.add_pods(1).expect("pods attach");
    let (bpf_node, kernel_node) = (1, 2);
    wait_until("pods ping both ways", Duration::from_secs(20), || {
        Ok(lab.ping(&pods[0], pods[1].ip) && lab.ping(&pods[1], pods[0].ip))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    let lease1 = lab.lease_of(bpf_node).unwrap().cidr();
    let lease2 = lab.lease_of(kernel_node).unwrap().cidr();

    // The BPF node, agent running: learned pods and encapsulated packets show up.
    let mut status = Value::Null;
    wait_until(
        "node 1's status to show its pod and encapsulated packets",
        Duration::from_secs(15),
        || {
            lab.ping(&pods[0], pods[1].ip);
            status = status_json(&lab, bpf_node);
            let pod_known = status["pods"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pod_ip"] == pods[0].ip.to_string());
            let encap = status["counters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "encap" && c["packets"].as_u64() > Some(0));
            Ok(pod_known && encap)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{status:#}"));
    assert_eq!(status["agent"]["state"], "running", "{status:#}");
    assert!(
        status["agent"]["readyz"]
            .as_str()
            .unwrap()
            .starts_with("200"),
        "{status:#}"
    );
    assert_eq!(status["dataplane"]["mode"], "bpf", "{status:#}");
    assert_eq!(status["dataplane"]["fast_path"]["fast_path_on"], true);
    assert_eq!(status["lease"]["network"], "10.244.0.0/16");
    let to_node2 = peer(&status, &lease2);
    assert_eq!(to_node2["fast_path"], "vxlan", "{status:#}");
    assert_eq!(to_node2["public_ip"], lab.node_ip(kernel_node).to_string());
    assert!(
        to_node2["kernel_route"]
            .as_str()
            .unwrap()
            .ends_with("dev flannel.1"),
        "{status:#}"
    );
    assert_eq!(status["problems"], Value::Array(vec![]), "{status:#}");
    let subnet_file = lab
        .node(bpf_node)
        .subnet_file
        .to_string_lossy()
        .into_owned();
    let text = weft(&lab, bpf_node, "status", &["--subnet-file", &subnet_file]);
    for expected in [
        "Agent:       running",
        "Dataplane:   bpf (the kernel accepted the programs",
        "Backend:     vxlan",
        "Fast path:   on",
        &lease2,
        &pods[0].ip.to_string(),
        "Health:      OK",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }

    // The agent stopped: everything is still read from the node, and the report says so.
    lab.stop_agent(bpf_node);
    let status = status_json(&lab, bpf_node);
    assert_eq!(status["agent"]["state"], "not running", "{status:#}");
    assert_eq!(peer(&status, &lease2)["fast_path"], "vxlan");
    assert!(
        status["problems"][0]
            .as_str()
            .unwrap()
            .contains("is not running"),
        "{status:#}"
    );
    let bpf_dir = lab.bpf_dir(bpf_node).to_string_lossy().into_owned();
    let leases: Value = serde_json::from_str(&weft(
        &lab,
        bpf_node,
        "bpf leases",
        &["--bpf-dir", &bpf_dir, "-o", "json"],
    ))
    .unwrap();
    assert_eq!(
        leases,
        serde_json::json!([{
            "subnet": lease2,
            "public_ip": lab.node_ip(kernel_node).to_string(),
            "path": "vxlan",
            "vtep_mac": lab.link_mac(lab.node_ns(kernel_node), "flannel.1").unwrap(),
        }])
    );
    let endpoints = weft(&lab, bpf_node, "bpf endpoints", &["--bpf-dir", &bpf_dir]);
    assert!(
        endpoints.starts_with("POD IP") && endpoints.contains(&pods[0].ip.to_string()),
        "{endpoints}"
    );
    let peers = weft(&lab, bpf_node, "bpf peers", &["--bpf-dir", &bpf_dir]);
    assert!(
        peers.contains(&lab.node_ip(kernel_node).to_string()),
        "{peers}"
    );
    let counters = weft(&lab, bpf_node, "bpf counters", &["--bpf-dir", &bpf_dir]);
    assert!(
        counters.lines().any(|l| l.starts_with("encap ")),
        "{counters}"
    );
    let config = weft(&lab, bpf_node, "bpf config", &["--bpf-dir", &bpf_dir]);
    assert!(
        config.contains("VNI:         1 (UDP port 8472)") && config.contains("source NAT:  off"),
        "{config}"
    );

    // The kernel node: its dataplane and why, peers by kernel route, no maps to read.
    let status = status_json(&lab, kernel_node);
    assert_eq!(status["dataplane"]["mode"], "kernel", "{status:#}");
    assert_eq!(
        status["dataplane"]["reason"],
        "chosen by --dataplane=kernel"
    );
    let to_node1 = peer(&status, &lease1);
    assert_eq!(to_node1["fast_path"], Value::Null);
    assert!(
        to_node1["kernel_route"]
            .as_str()
            .unwrap()
            .contains("dev flannel.1"),
        "{status:#}"
    );
    let bpf_dir2 = lab.bpf_dir(kernel_node).to_string_lossy().into_owned();
    let mut argv = vec![lab.binary("weft").unwrap().to_string_lossy().into_owned()];
    argv.extend("bpf leases --bpf-dir".split(' ').map(String::from));
    argv.push(bpf_dir2);
    let out = Cmd::new(argv)
        .netns(lab.node_ns(kernel_node))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no weft map pinned") && out.stderr.contains("kernel dataplane"),
        "{}",
        out.stderr
    );
}
