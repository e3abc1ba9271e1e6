//! End to end on the kernel path (`--dataplane=kernel`): real `weft agent`s in node
//! namespaces, etcd, pods attached by weft-cni, checked the way a user would (ping, ip,
//! bridge, tcpdump, tshark).
//! Needs root and the binaries (`cargo build -p weft --bins`).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::lab::first_pod_on;
use weft_tests::plain_flannel::VXLAN_DEVICE;
use weft_tests::Cmd;
use weft_tests::{
    icmp, wait_until, Backend, Dataplane, Lab, LabConfig, Lease, PlainFlannelNode, Pod,
    EXTERNAL_HOST,
};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;
/// How long after the agents are ready every pod pair must ping.
const CONVERGENCE: Duration = Duration::from_secs(10);

fn lab(backend: Backend, ip_masq: bool, nodes: usize) -> Lab {
    let started = Instant::now();
    let lab = Lab::start(LabConfig {
        nodes,
        backend,
        ip_masq,
        // Explicitly: the agent's own default (auto) would pick the eBPF fast path here.
        dataplane: Dataplane::Kernel,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the {} lab does not start: {e:#}", backend.type_name()));
    eprintln!("lab with {nodes} ready agents in {:?}", started.elapsed());
    lab
}

fn lab_with_pods(backend: Backend, ip_masq: bool) -> (Lab, Vec<Pod>) {
    let mut lab = lab(backend, ip_masq, NODES);
    let pods = lab.add_pods(PODS_PER_NODE).expect("pods are attached");
    (lab, pods)
}

// ---------------------------------------------------------------------------------------
// Every pod pair pings; the pod MTU leaves room for the encapsulation.

fn pods_ping_each_other_with_backend_mtu(backend: Backend) {
    let (lab, pods) = lab_with_pods(backend, true);
    lab.assert_all_pairs_ping(&pods, "fresh lab", CONVERGENCE);
    let expected = u64::from(backend.pod_mtu());
    for pod in &pods {
        let mtu = lab.link_mtu(&pod.ns, "eth0").expect("pod eth0");
        assert_eq!(mtu, expected, "MTU of eth0 in pod {}", pod.name);
    }
    for node in 1..=NODES {
        let env = lab.subnet_env(node).expect("subnet.env");
        assert_eq!(
            env.get("FLANNEL_MTU").map(String::as_str),
            Some(expected.to_string().as_str()),
            "FLANNEL_MTU of node {node}: {env:?}"
        );
    }
}

#[test]
fn vxlan_pods_ping_each_other_with_mtu_1450() {
    pods_ping_each_other_with_backend_mtu(Backend::Vxlan);
}

#[test]
fn host_gw_pods_ping_each_other_with_mtu_1500() {
    pods_ping_each_other_with_backend_mtu(Backend::HostGw);
}

// ---------------------------------------------------------------------------------------
// --ip-masq: traffic leaving the cluster carries the node's address, pod-to-pod traffic
// keeps the pod's.

fn ip_masq_hides_pods_only_from_outside(backend: Backend) {
    let (lab, pods) = lab_with_pods(backend, true);
    lab.assert_all_pairs_ping(&pods, "fresh lab", CONVERGENCE);
    for node in 1..=NODES {
        let pod = first_pod_on(&pods, node);
        let filter = format!("icmp[icmptype] == icmp-echo and dst host {EXTERNAL_HOST}");
        let source = lab
            .first_packet_source(lab.fabric_ns(), "br0", &filter, || {
                lab.ping(pod, EXTERNAL_HOST);
            })
            .expect("the fabric sees the pod's ping to the external host");
        assert_eq!(
            source,
            lab.node_ip(node),
            "pod {} ({}) reaches {EXTERNAL_HOST} from a source that is not its node's IP",
            pod.name,
            pod.ip
        );
        assert!(
            lab.ping(pod, EXTERNAL_HOST),
            "pod {} gets no reply from {EXTERNAL_HOST}",
            pod.name
        );
    }
    // Pod to pod across nodes, and on the same node: the receiver sees the sender's IP.
    for (from, to) in [
        (&pods[0], &pods[2]),
        (&pods[5], &pods[1]),
        (&pods[0], &pods[1]),
    ] {
        let source = lab
            .first_packet_source(&to.ns, "eth0", "icmp[icmptype] == icmp-echo", || {
                lab.ping(from, to.ip);
            })
            .expect("the destination pod sees the ping");
        assert_eq!(
            source, from.ip,
            "pod {} sees {}'s ping from {source}, not from the pod's IP",
            to.name, from.name
        );
    }
}

#[test]
fn vxlan_ip_masq_hides_pods_only_from_outside() {
    ip_masq_hides_pods_only_from_outside(Backend::Vxlan);
}

#[test]
fn host_gw_ip_masq_hides_pods_only_from_outside() {
    ip_masq_hides_pods_only_from_outside(Backend::HostGw);
}

// ---------------------------------------------------------------------------------------
// A node that joins is reachable from every pod within 2 s of its agent starting.

/// Polls (100 ms echoes, all sources in parallel) until every pod in `sources` got a reply
/// from `target`, or `deadline`. Returns the pods that never got one.
fn reach_from_all(sources: &[Pod], target: Ipv4Addr, deadline: Instant) -> Vec<String> {
    let mut waiting: Vec<&Pod> = sources.iter().collect();
    while !waiting.is_empty() && Instant::now() < deadline {
        let replied: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = waiting
                .iter()
                .map(|pod| {
                    scope.spawn(move || {
                        icmp::ping(&pod.ns, target, 1, Duration::from_millis(100))
                            .is_ok_and(|rtt| rtt.is_some())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(false))
                .collect()
        });
        let mut still = replied.iter().map(|ok| !ok);
        waiting.retain(|_| still.next().unwrap_or(true));
    }
    waiting.iter().map(|p| p.name.clone()).collect()
}

fn new_node_is_reachable_within_2s(backend: Backend) {
    let (mut lab, pods) = lab_with_pods(backend, true);
    lab.assert_all_pairs_ping(&pods, "before the new node", CONVERGENCE);
    let new_node = lab.add_node().expect("a 4th node");

    let (spawned, before) = lab.spawn_agent(new_node).expect("agent starts");
    lab.wait_agent_ready(new_node, before)
        .expect("the new agent gets ready");
    let agent_ready = spawned.elapsed();
    let new_pod = lab.add_pod(new_node).expect("a pod on the new node");
    let pod_attached = spawned.elapsed();
    let unreached = reach_from_all(&pods, new_pod.ip, spawned + Duration::from_secs(10));
    let reachable = spawned.elapsed();
    eprintln!(
        "{}: agent ready {agent_ready:?}, pod attached {pod_attached:?}, reachable from all \
         pods {reachable:?} after the agent's spawn",
        backend.type_name()
    );
    assert!(
        unreached.is_empty(),
        "pod {} on the new node is unreachable from {unreached:?} 10 s after its agent started",
        new_pod.name
    );
    assert!(
        reachable < Duration::from_secs(2),
        "the new node's pod became reachable from all pods {reachable:?} after the agent \
         started (limit 2 s; agent ready {agent_ready:?}, pod attached {pod_attached:?})"
    );
}

#[test]
fn vxlan_new_node_is_reachable_within_2s() {
    new_node_is_reachable_within_2s(Backend::Vxlan);
}

#[test]
fn host_gw_new_node_is_reachable_within_2s() {
    new_node_is_reachable_within_2s(Backend::HostGw);
}

// ---------------------------------------------------------------------------------------
// Deleting a lease in etcd removes the node's routes, neighbour and FDB entries everywhere.

/// Which of the kernel entries for `lease` node `node` holds, as (what, present).
fn peer_entries(
    lab: &Lab,
    node: usize,
    lease: &Lease,
) -> anyhow::Result<Vec<(&'static str, bool)>> {
    let ns = lab.node_ns(node);
    let cidr = lease.cidr();
    let routes = lab.ip_json(ns, &["route"])?;
    let route = routes
        .iter()
        .any(|r| r["dst"].as_str() == Some(cidr.as_str()));
    let mut entries = vec![("route", route)];
    if let Some(mac) = &lease.vtep_mac {
        let subnet = lease.subnet.to_string();
        let neighbours = lab.ip_json(ns, &["neigh", "show", "dev", VXLAN_DEVICE])?;
        let neighbour = neighbours
            .iter()
            .any(|n| n["dst"].as_str() == Some(subnet.as_str()));
        let fdb = lab.bridge_json(ns, &["fdb", "show", "dev", VXLAN_DEVICE])?;
        let has_mac = |entry: &Value| {
            entry["mac"]
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case(mac))
        };
        entries.push(("neighbour", neighbour));
        entries.push(("fdb", fdb.iter().any(has_mac)));
    }
    Ok(entries)
}

fn deleting_a_lease_removes_its_routes_everywhere(backend: Backend) {
    let mut lab = lab(backend, false, NODES);
    let leaving = NODES;
    let lease = lab.lease_of(leaving).expect("lease of the leaving node");
    assert_eq!(
        lease.vtep_mac.is_some(),
        backend == Backend::Vxlan,
        "VtepMAC in {lease:?}"
    );
    let others: Vec<usize> = (1..=NODES).filter(|&n| n != leaving).collect();
    for &node in &others {
        wait_until(
            &format!("node {node} to program the lease {}", lease.cidr()),
            CONVERGENCE,
            || Ok(peer_entries(&lab, node, &lease)?.iter().all(|e| e.1)),
        )
        .unwrap_or_else(|e| {
            panic!("{e:#}: {:?}", peer_entries(&lab, node, &lease));
        });
    }

    // The node goes away (its agent stopped), then its lease is deleted.
    lab.stop_agent(leaving);
    let deleted = lab.etcdctl(&["del", &lease.key]).expect("etcdctl del");
    assert_eq!(
        deleted.trim(),
        "1",
        "the lease {} was no longer in etcd after its agent stopped: an agent must not \
         revoke its lease on shutdown (its pods would lose their subnet)",
        lease.key
    );
    let deleted_at = Instant::now();
    for &node in &others {
        wait_until(
            &format!(
                "node {node} to drop the entries of the deleted lease {}",
                lease.cidr()
            ),
            CONVERGENCE,
            || Ok(peer_entries(&lab, node, &lease)?.iter().all(|e| !e.1)),
        )
        .unwrap_or_else(|e| {
            panic!("{e:#}: {:?}", peer_entries(&lab, node, &lease));
        });
    }
    eprintln!(
        "entries removed on all nodes {:?} after the delete",
        deleted_at.elapsed()
    );
}

#[test]
fn vxlan_deleting_a_lease_removes_its_routes_everywhere() {
    deleting_a_lease_removes_its_routes_everywhere(Backend::Vxlan);
}

#[test]
fn host_gw_deleting_a_lease_removes_its_routes_everywhere() {
    deleting_a_lease_removes_its_routes_everywhere(Backend::HostGw);
}

// ---------------------------------------------------------------------------------------
// An agent restart keeps the node's subnet and VtepMAC; the pods keep pinging.

fn agent_restart_keeps_subnet_and_vtep_mac(backend: Backend) {
    let (mut lab, pods) = lab_with_pods(backend, true);
    lab.assert_all_pairs_ping(&pods, "before the restart", CONVERGENCE);
    let node = 2;
    let ns = lab.node_ns(node).to_string();
    let lease_before = lab.lease_of(node).expect("lease");
    let subnet_before = lab.subnet_env(node).expect("subnet.env")["FLANNEL_SUBNET"].clone();
    let mac_before = (backend == Backend::Vxlan).then(|| {
        let mac = lab.link_mac(&ns, VXLAN_DEVICE).expect("flannel.1");
        assert_eq!(
            lease_before.vtep_mac.as_deref(),
            Some(mac.as_str()),
            "the lease's VtepMAC is not flannel.1's MAC"
        );
        mac
    });

    lab.kill_agent(node);
    let took = lab.start_agent(node).expect("the agent restarts");
    eprintln!("agent restarted and ready in {took:?}");

    let lease_after = lab.lease_of(node).expect("lease after the restart");
    assert_eq!(
        lease_after.key, lease_before.key,
        "the subnet lease changed"
    );
    assert_eq!(
        lease_after.vtep_mac, lease_before.vtep_mac,
        "the VtepMAC in etcd changed"
    );
    let subnet_after = lab.subnet_env(node).expect("subnet.env")["FLANNEL_SUBNET"].clone();
    assert_eq!(subnet_after, subnet_before, "FLANNEL_SUBNET changed");
    if let Some(mac_before) = mac_before {
        let mac_after = lab.link_mac(&ns, VXLAN_DEVICE).expect("flannel.1");
        assert_eq!(mac_after, mac_before, "flannel.1's MAC changed");
    }
    assert_eq!(
        lab.leases().expect("leases").len(),
        NODES,
        "a lease was added or lost"
    );
    lab.assert_all_pairs_ping(&pods, "after the restart", CONVERGENCE);
}

#[test]
fn vxlan_agent_restart_keeps_subnet_and_vtep_mac() {
    agent_restart_keeps_subnet_and_vtep_mac(Backend::Vxlan);
}

#[test]
fn host_gw_agent_restart_keeps_subnet() {
    agent_restart_keeps_subnet_and_vtep_mac(Backend::HostGw);
}

// ---------------------------------------------------------------------------------------
// On the wire: flannel's VXLAN (port 8472, VNI 1, inner MACs = the VtepMACs in etcd).

#[test]
fn vxlan_wire_format_is_flannels() {
    let (lab, pods) = lab_with_pods(Backend::Vxlan, true);
    lab.assert_all_pairs_ping(&pods, "fresh lab", CONVERGENCE);
    let (from, to) = (first_pod_on(&pods, 1), first_pod_on(&pods, 2));
    let packet = lab
        .capture_vxlan(from, to)
        .expect("a VXLAN packet on the underlay");
    let local = lab.lease_of(1).expect("lease of node 1");
    let remote = lab.lease_of(2).expect("lease of node 2");
    assert_eq!(packet.udp_dst_port, 8472, "{packet:?}");
    assert_eq!(packet.vni, 1, "{packet:?}");
    assert_eq!(
        (packet.outer_src, packet.outer_dst),
        (lab.node_ip(1), lab.node_ip(2))
    );
    assert_eq!((packet.inner_src, packet.inner_dst), (from.ip, to.ip));
    assert_eq!(
        Some(packet.inner_dst_mac.as_str()),
        remote.vtep_mac.as_deref()
    );
    assert_eq!(
        Some(packet.inner_src_mac.as_str()),
        local.vtep_mac.as_deref()
    );
}

// ---------------------------------------------------------------------------------------
// Interop: a node configured exactly as flanneld would (no weft) and weft nodes connect
// their pods both ways.

#[test]
fn vxlan_weft_nodes_interoperate_with_a_flannel_node() {
    let mut lab = lab(Backend::Vxlan, true, 2);
    let mut pods = lab.add_pods(PODS_PER_NODE).expect("pods on the weft nodes");
    let flannel_node = lab.add_node().expect("a node without weft");
    let flannel_mac = "0e:00:5e:fa:fa:01";
    let flannel = PlainFlannelNode::setup(
        &mut lab,
        flannel_node,
        Ipv4Addr::new(10, 244, 250, 0),
        flannel_mac,
    )
    .expect("the flannel-style node is configured");
    assert_eq!(
        flannel.sync(&lab).expect("sync"),
        2,
        "weft leases seen by the flannel node"
    );
    for _ in 0..PODS_PER_NODE {
        pods.push(flannel.add_pod(&mut lab).expect("pod on the flannel node"));
    }
    lab.assert_all_pairs_ping(&pods, "weft and flannel nodes", CONVERGENCE);

    let from = first_pod_on(&pods, 1);
    let to = first_pod_on(&pods, flannel_node);
    let packet = lab
        .capture_vxlan(from, to)
        .expect("VXLAN to the flannel node");
    assert_eq!((packet.vni, packet.udp_dst_port), (1, 8472));
    assert_eq!(packet.inner_dst_mac, flannel_mac);
}

// ---------------------------------------------------------------------------------------
// A host whose iptables FORWARD policy is DROP (Docker sets it) still forwards pod traffic,
// whichever firewall weft programs.

fn forward_policy_drop_keeps_pods_talking(firewall: &str) {
    let mut lab = Lab::start(LabConfig {
        nodes: 2,
        backend: Backend::Vxlan,
        dataplane: Dataplane::Kernel,
        extra_agent_args: vec![
            format!("--firewall={firewall}"),
            "--iptables-resync=1".into(),
        ],
        ..Default::default()
    })
    .expect("lab starts");
    let pods = lab.add_pods(1).expect("pods attach");
    for node in 1..=2 {
        Cmd::new(["iptables", "-w", "-P", "FORWARD", "DROP"])
            .netns(lab.node_ns(node))
            .run()
            .expect("iptables -P FORWARD DROP");
    }
    lab.assert_all_pairs_ping(
        &pods,
        &format!("FORWARD policy DROP, {firewall}"),
        CONVERGENCE,
    );
    let rules = Cmd::new(["iptables", "-w", "-S", "FORWARD"])
        .netns(lab.node_ns(1))
        .run()
        .expect("iptables -S FORWARD");
    assert!(
        rules.contains("-P FORWARD DROP") && rules.contains("-j FLANNEL-FWD"),
        "the forward rules must sit in the chain that drops: {rules}"
    );
}

#[test]
fn forward_policy_drop_keeps_pods_talking_with_nftables() {
    forward_policy_drop_keeps_pods_talking("nftables");
}

#[test]
fn forward_policy_drop_keeps_pods_talking_with_iptables() {
    forward_policy_drop_keeps_pods_talking("iptables");
}
