//! The namespace lab as a Kubernetes node: kube-proxy's rules (iptables and nftables mode),
//! kube-flannel's conflist with portmap, Services of every kind and the traffic a cluster
//! carries through them (`weft_tests::workload`). Every cell of the matrix must get its
//! reply with the right addresses on every dataplane, and pod-to-pod traffic across nodes
//! must still take the BPF fast path with all of that installed.

use std::net::Ipv4Addr;
use std::time::Duration;

use weft_common::Counter;
use weft_tests::kube_proxy::ProxyMode;
use weft_tests::workload::{SecondNode, Workload};
use weft_tests::{Backend, Dataplane, Lab, LabConfig, PlainFlannelNode};

const CONVERGENCE: Duration = Duration::from_secs(15);
const BPF_SYNC: Duration = Duration::from_secs(20);
const STREAM: Duration = Duration::from_secs(10);

fn config(backend: Backend, dataplane: Dataplane, direct_routing: bool) -> LabConfig {
    let mut config = LabConfig {
        nodes: 2,
        backend,
        dataplane,
        direct_routing,
        ..Default::default()
    };
    // kube-flannel.yml runs flanneld with --ip-masq; node 2 without, so that its pods
    // reach node 1's hostPort with their own address.
    config
        .node_agent_args
        .insert(1, vec!["--ip-masq".to_string()]);
    // Node 1 as users run it: `auto` must keep the fast path on next to kube-proxy and
    // portmap (it switches it off only for rules that filter). Checked every second.
    if dataplane == Dataplane::Bpf {
        config.node_dataplanes.insert(1, Dataplane::Auto);
        config
            .extra_agent_args
            .push("--resync-interval=1".to_string());
    }
    config
}

/// Deploys the workload, runs every cell and the new-pod stream, and (BPF) checks that
/// pod-to-pod traffic across nodes rides the fast path on node 1.
fn matrix(config: LabConfig, mode: ProxyMode) {
    let bpf = config.dataplane == Dataplane::Bpf;
    let mut lab = Lab::start(config).expect("the lab starts");
    let workload =
        Workload::deploy(&mut lab, SecondNode::Weft, mode).expect("the workload deploys");
    check_matrix(
        &mut lab,
        &workload,
        SecondNode::Weft,
        if bpf { &[1, 2] } else { &[] },
    );
}

fn check_matrix(lab: &mut Lab, workload: &Workload, second: SecondNode, bpf_nodes: &[usize]) {
    let pods = [
        &workload.client,
        &workload.web1,
        &workload.web2,
        &workload.client2,
    ]
    .map(|p| p.clone())
    .to_vec();
    lab.assert_all_pairs_ping(&pods, "the workload's pods", CONVERGENCE);
    for &node in bpf_nodes {
        lab.wait_bpf_synced(node, BPF_SYNC)
            .expect("the BPF dataplane is complete");
    }
    let before: Vec<_> = bpf_nodes
        .iter()
        .map(|&n| lab.bpf_counters(n).unwrap())
        .collect();

    let failures = workload.failures(lab);
    assert!(
        failures.is_empty(),
        "{} of {} cells failed:\n{}\n{}",
        failures.len(),
        workload.cells(lab).len(),
        failures.join("\n"),
        lab.diagnostics()
    );
    let exchanged = workload
        .stream_to_a_new_pod(lab, second, STREAM)
        .expect("a TCP stream that starts before its endpoint is learned");
    assert!(exchanged >= 20, "only {exchanged} exchanges");

    // The fast path still carries pod-to-pod traffic on node 1, with kube-proxy, portmap
    // and weft's masquerade installed; Service replies took the stack (stack_flow).
    if let Some(&node) = bpf_nodes.first() {
        // Two more resyncs of node 1's `auto` agent, each of which looked at the rules.
        let resyncs = |lab: &Lab| {
            lab.agent_log_tail(node, 100_000)
                .matches("BPF counters:")
                .count()
        };
        let seen = resyncs(lab);
        weft_tests::wait_until(
            "two resyncs of node 1 (its debug log)",
            Duration::from_secs(10),
            || Ok(resyncs(lab) >= seen + 2),
        )
        .expect("node 1 resyncs every second");
        let missing = lab.bpf_missing(node).unwrap();
        assert!(missing.is_empty(), "node 1's fast path lost: {missing:?}");
        assert!(lab.ping(&workload.client, workload.web2.ip));
        let delta = lab.bpf_counters(node).unwrap().since(&before[0]);
        eprintln!("node {node} during the matrix: {delta}");
        let out = delta.get(Counter::Encap) + delta.get(Counter::DirectOut);
        let inbound = delta.get(Counter::Decap) + delta.get(Counter::DirectIn);
        assert!(
            out >= 5 && inbound >= 5,
            "pod-to-pod traffic did not take the fast path: {delta}"
        );
        assert!(
            delta.get(Counter::StackFlow) >= 2,
            "Service replies should have been left to the stack: {delta}"
        );
        assert_eq!(delta.drops(), 0, "drops: {delta}");
    }
}

#[test]
fn kubernetes_traffic_on_bpf_vxlan_with_iptables_kube_proxy() {
    matrix(
        config(Backend::Vxlan, Dataplane::Bpf, false),
        ProxyMode::Iptables,
    );
}

/// The same matrix with `--masquerade-fast-path` on node 1 (its pods' flows to the outside
/// skip the stack once the stack has seen them).
#[test]
fn kubernetes_traffic_on_bpf_vxlan_with_the_masquerade_fast_path() {
    let mut config = config(Backend::Vxlan, Dataplane::Bpf, false);
    config.node_agent_args.get_mut(&1).unwrap().extend([
        "--masquerade=bpf".to_string(),
        "--masquerade-fast-path".to_string(),
    ]);
    matrix(config, ProxyMode::Iptables);
}

#[test]
fn kubernetes_traffic_on_bpf_vxlan_with_nftables_kube_proxy() {
    matrix(
        config(Backend::Vxlan, Dataplane::Bpf, false),
        ProxyMode::Nftables,
    );
}

#[test]
fn kubernetes_traffic_on_bpf_host_gw() {
    matrix(
        config(Backend::HostGw, Dataplane::Bpf, false),
        ProxyMode::Iptables,
    );
}

#[test]
fn kubernetes_traffic_on_bpf_vxlan_direct_routing() {
    matrix(
        config(Backend::Vxlan, Dataplane::Bpf, true),
        ProxyMode::Iptables,
    );
}

#[test]
fn kubernetes_traffic_on_kernel_vxlan() {
    matrix(
        config(Backend::Vxlan, Dataplane::Kernel, false),
        ProxyMode::Iptables,
    );
}

#[test]
fn kubernetes_traffic_on_kernel_host_gw() {
    matrix(
        config(Backend::HostGw, Dataplane::Kernel, false),
        ProxyMode::Nftables,
    );
}

#[test]
fn kubernetes_traffic_between_a_bpf_node_and_a_plain_flannel_node() {
    let mut config = config(Backend::Vxlan, Dataplane::Bpf, false);
    config.nodes = 1;
    let mut lab = Lab::start(config).expect("the lab starts");
    let node = lab.add_node().expect("a node without weft");
    let flannel = PlainFlannelNode::setup(
        &mut lab,
        node,
        Ipv4Addr::new(10, 244, 250, 0),
        "0e:00:5e:fa:fa:02",
    )
    .expect("the flannel-style node");
    let workload = Workload::deploy(
        &mut lab,
        SecondNode::PlainFlannel(&flannel),
        ProxyMode::Iptables,
    )
    .expect("the workload deploys");
    flannel
        .sync(&lab)
        .expect("the flannel node learns node 1's lease");
    check_matrix(
        &mut lab,
        &workload,
        SecondNode::PlainFlannel(&flannel),
        &[1],
    );
}

/// A NetworkPolicy engine's FORWARD chain, shaped as Calico's felix writes it (canal):
/// jumped to first, dropping one pod pair.
fn install_policy_drop(lab: &Lab, node: usize, from: Ipv4Addr, to: Ipv4Addr) {
    let ns = lab.node_ns(node);
    let rules = format!(
        "*filter\n:cali-FORWARD - [0:0]\n\
         -I FORWARD 1 -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD\n\
         -A cali-FORWARD -s {from}/32 -d {to}/32 -m comment --comment \"cali:policy-deny\" -j DROP\nCOMMIT\n"
    );
    weft_tests::Cmd::new(["iptables-restore", "-w", "--noflush"])
        .netns(ns)
        .stdin(rules)
        .run()
        .expect("the policy rule is installed");
}

/// Packets the policy's DROP rule on `node` has matched.
fn policy_drops(lab: &Lab, node: usize) -> u64 {
    let out = weft_tests::exec::run_in(
        lab.node_ns(node),
        &[
            "iptables",
            "-w",
            "-t",
            "filter",
            "-L",
            "cali-FORWARD",
            "-v",
            "-x",
            "-n",
        ],
    )
    .expect("iptables -L cali-FORWARD");
    out.lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Two nodes, node 1 `auto` and node 2 `node2`, resyncing every second, with pods a, b on
/// node 1 and c on node 2, every pair pinging and both dataplanes complete.
fn policy_lab(backend: Backend, node2: Dataplane) -> (Lab, [weft_tests::Pod; 3]) {
    let mut config = config(backend, Dataplane::Auto, false);
    config.node_dataplanes.insert(2, node2);
    config
        .extra_agent_args
        .push("--resync-interval=1".to_string());
    let mut lab = Lab::start(config).expect("the lab starts");
    let pods = lab.add_pods(2).expect("pods");
    lab.assert_all_pairs_ping(&pods, "before any policy", CONVERGENCE);
    for node in [1, 2] {
        lab.wait_bpf_synced(node, BPF_SYNC)
            .expect("the BPF dataplane is complete");
    }
    let pods = [pods[0].clone(), pods[1].clone(), pods[2].clone()];
    (lab, pods)
}

#[test]
fn a_policy_engines_forward_rules_are_never_bypassed_in_silence() {
    // Node 1 as users run it (auto); node 2 forced (--dataplane=bpf).
    let (lab, [a, b, c]) = policy_lab(Backend::Vxlan, Dataplane::Bpf);
    let before = lab.bpf_counters(1).unwrap();
    assert!(lab.ping(&a, c.ip));
    let delta = lab.bpf_counters(1).unwrap().since(&before);
    assert!(
        delta.get(Counter::Encap) >= 1,
        "the fast path was on before the policy: {delta}"
    );

    // The engine denies a → c (pods of node 1 and node 2), on every node.
    for node in [1, 2] {
        install_policy_drop(&lab, node, a.ip, c.ip);
    }
    // What the agent last said about its fast path.
    let log_has = |node: usize, text: &str| {
        lab.agent_log_tail(node, 400)
            .lines()
            .rfind(|l| l.contains("fast path o"))
            .is_some_and(|l| l.contains(text))
    };
    weft_tests::wait_until("node 1 to switch its fast path off", Duration::from_secs(10), || {
        Ok(log_has(1, "fast path off: netfilter filters forwarded traffic (iptables (nf_tables): -A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD)"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));
    weft_tests::wait_until("node 2 to warn that --dataplane=bpf keeps it on", Duration::from_secs(10), || {
        Ok(log_has(2, "fast path on: forced by --dataplane=bpf although netfilter filters forwarded traffic"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(2, 40)));

    // The denied pair is dropped, by the policy's rule; the other pair still talks, over
    // node 1's kernel path.
    let drops = policy_drops(&lab, 1);
    let before = lab.bpf_counters(1).unwrap();
    assert!(lab.ping(&b, c.ip), "an allowed pair must still ping");
    assert!(
        !lab.ping(&a, c.ip),
        "the denied pair pings: the policy was bypassed"
    );
    assert!(
        policy_drops(&lab, 1) > drops,
        "node 1's policy rule dropped nothing"
    );
    let delta = lab.bpf_counters(1).unwrap().since(&before);
    assert_eq!(
        delta.get(Counter::Encap) + delta.get(Counter::Decap),
        0,
        "node 1 redirected pod traffic with its fast path off: {delta}"
    );

    // Without the rules, node 1's fast path comes back.
    weft_tests::exec::run_in(
        lab.node_ns(1),
        &[
            "iptables",
            "-w",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "cali:wUHhoiAYhphO9Mso",
            "-j",
            "cali-FORWARD",
        ],
    )
    .expect("the policy jump is removed");
    weft_tests::wait_until(
        "node 1 to switch its fast path back on",
        Duration::from_secs(10),
        || {
            Ok(log_has(
                1,
                "fast path on: no netfilter rule filters forwarded pod traffic",
            ))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));
    let before = lab.bpf_counters(1).unwrap();
    assert!(lab.ping(&b, c.ip));
    let delta = lab.bpf_counters(1).unwrap().since(&before);
    assert!(
        delta.get(Counter::Encap) >= 1,
        "the fast path did not come back: {delta}"
    );
}

#[test]
fn a_pod_shaped_by_the_bandwidth_plugin_stays_shaped() {
    const LIMIT_BITS: u64 = 20_000_000;
    // (config() has node 1 check every second.)
    let mut lab =
        Lab::start(config(Backend::Vxlan, Dataplane::Bpf, false)).expect("the lab starts");
    let shaped = lab
        .add_pod_with_ingress_bandwidth(1, LIMIT_BITS)
        .expect("a shaped pod");
    let plain = lab.add_pod(1).expect("a pod without shaping");
    let client = lab.add_pod(2).expect("a client pod");
    let pods = [shaped.clone(), plain.clone(), client.clone()];
    lab.assert_all_pairs_ping(&pods, "fresh lab", CONVERGENCE);
    let veth = lab.host_veth(&shaped).expect("the shaped pod's veth");
    weft_tests::wait_until("node 1 to leave the shaped pod to the kernel path", Duration::from_secs(10), || {
        Ok(lab
            .agent_log_tail(1, 400)
            .contains(&format!("{veth} has traffic control of its own (qdisc tbf): its pod stays on the kernel path")))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));

    // Into the shaped pod from another node: the tbf on its veth holds it near the limit
    // (the fast path would deliver past it, at Gbit/s).
    let report =
        weft_tests::TcpFlow::start(&client, &shaped, 7200, 200 << 20, Duration::from_secs(3))
            .expect("a TCP stream into the shaped pod")
            .run_out()
            .expect("the TCP stream");
    let bits_per_second = report.received as f64 * 8.0 / report.elapsed.as_secs_f64();
    eprintln!(
        "into the shaped pod: {report:?}, {:.1} Mbit/s",
        bits_per_second / 1e6
    );
    assert!(report.complete(), "{report:?}");
    assert!(
        bits_per_second < 2.0 * LIMIT_BITS as f64,
        "the shaped pod received {:.1} Mbit/s, over twice its limit of {} Mbit/s",
        bits_per_second / 1e6,
        LIMIT_BITS / 1_000_000
    );

    // Its neighbour keeps the fast path.
    let before = lab.bpf_counters(1).unwrap();
    assert!(lab.ping(&client, plain.ip));
    let delta = lab.bpf_counters(1).unwrap().since(&before);
    assert!(
        delta.get(Counter::Decap) >= 1,
        "the unshaped pod lost the fast path: {delta}"
    );
    let endpoints = weft_tests::bpf::read_endpoints(lab.bpf_dir(1)).unwrap();
    assert!(
        !endpoints.contains_key(&shaped.ip) && endpoints.contains_key(&plain.ip),
        "{endpoints:?}"
    );
}

/// Writes an executable `name` into `dir` that runs `script` (sh).
fn fake_tool(dir: &std::path::Path, name: &str, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("the fake tool is written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The real `nft` in PATH (the fake one hands everything but `-j` to it).
fn real_nft() -> String {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| std::path::Path::new(dir).join("nft"))
        .find(|p| p.exists())
        .expect("nft is installed")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_native_nft_forward_rule_is_seen_and_a_broken_probe_turns_the_fast_path_off_on_vxlan() {
    a_native_nft_forward_rule_is_seen_and_a_broken_probe_turns_the_fast_path_off(Backend::Vxlan);
}

#[test]
fn a_native_nft_forward_rule_is_seen_and_a_broken_probe_turns_the_fast_path_off_on_host_gw() {
    a_native_nft_forward_rule_is_seen_and_a_broken_probe_turns_the_fast_path_off(Backend::HostGw);
}

fn a_native_nft_forward_rule_is_seen_and_a_broken_probe_turns_the_fast_path_off(backend: Backend) {
    let (mut lab, [a, b, c]) = policy_lab(backend, Dataplane::Auto);
    let last_said = |lab: &Lab, text: &str| {
        lab.agent_log_tail(1, 400)
            .lines()
            .rfind(|l| l.contains("fast path o"))
            .is_some_and(|l| l.contains(text))
    };
    let fast_path_off_and_pair_dropped = |lab: &Lab| {
        let before = lab.bpf_counters(1).unwrap();
        assert!(lab.ping(&b, c.ip), "an allowed pair must still ping");
        assert!(
            !lab.ping(&a, c.ip),
            "the denied pair pings: the policy was bypassed"
        );
        let delta = lab.bpf_counters(1).unwrap().since(&before);
        let redirected = [
            Counter::Encap,
            Counter::Decap,
            Counter::DirectOut,
            Counter::DirectIn,
        ]
        .map(|c| delta.get(c))
        .iter()
        .sum::<u64>();
        assert_eq!(
            redirected, 0,
            "node 1 redirected pod traffic with its fast path off: {delta}"
        );
    };

    // A policy engine's native nftables rule, in its own table on the forward hook.
    let rules = format!(
        "table inet netpol {{\n chain forward {{\n  type filter hook forward priority 0; policy accept;\n  \
         ip saddr {} ip daddr {} drop\n }}\n}}\n",
        a.ip, c.ip
    );
    weft_tests::Cmd::new(["nft", "-f", "-"])
        .netns(lab.node_ns(1))
        .stdin(rules)
        .run()
        .expect("the nft rule is installed");
    weft_tests::wait_until("node 1 to switch its fast path off", Duration::from_secs(10), || {
        Ok(last_said(
            &lab,
            "fast path off: netfilter filters forwarded traffic (nftables: chain inet netpol forward (hook forward, 1 of 1 rules can drop, policy accept))",
        ))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));
    fast_path_off_and_pair_dropped(&lab);

    // The same with an nft that cannot list in JSON: the probe cannot see the rule, and
    // must not take that for "no rules".
    let fake = tempfile::tempdir().expect("a temp dir");
    fake_tool(
        fake.path(),
        "nft",
        &format!(
            "case \"$1\" in -j) echo 'Error: JSON support not compiled-in' >&2; exit 1;; esac\nexec {} \"$@\"",
            real_nft()
        ),
    );
    lab.restart_agent_with_path_first(1, fake.path())
        .expect("node 1's agent restarts with the fake nft");
    weft_tests::wait_until(
        "node 1 to say its probe failed",
        Duration::from_secs(10),
        || {
            Ok(last_said(
                &lab,
                "fast path off: the policy probe could not read the node's netfilter rules",
            ))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));
    let said = lab.agent_log_tail(1, 400);
    assert!(
        said.contains("`nft -j list ruleset` failed (exit status: 1): Error: JSON support not compiled-in (exit); fix: install nftables with JSON support"),
        "{said}"
    );
    lab.wait_bpf_synced(1, BPF_SYNC)
        .expect("the BPF dataplane is complete");
    fast_path_off_and_pair_dropped(&lab);
}
