//! Hostile and careless input on a running lab: leases written into etcd by anyone with
//! write access must never touch the node's own routes, on any backend or dataplane; a pod
//! that claims a neighbour's address never becomes its fast-path endpoint.
//! Needs root and the binaries (`cargo build -p weft --bins`).

use std::net::SocketAddrV4;
use std::time::Duration;

use serde_json::json;
use weft_common::Counter;
use weft_tests::echo::{self, EchoServer};
use weft_tests::kube_proxy::Protocol;
use weft_tests::lab::metric;
use weft_tests::{wait_until, Backend, Dataplane, Lab, LabConfig, EXTERNAL_HOST, FABRIC_IP};

const HEALTHZ_PORT: u16 = 8471;

/// A lease value as flanneld writes it, for `backend`, with its own VtepMAC.
fn lease_value(backend: Backend, public_ip: &str, mac: &str) -> String {
    let mut value = json!({"PublicIP": public_ip, "BackendType": backend.type_name()});
    if backend == Backend::Vxlan {
        value["BackendData"] = json!({"VNI": 1, "VtepMAC": mac});
    }
    value.to_string()
}

/// The routes of node 1 as `dst via gw dev d proto p` lines, sorted.
fn routes(lab: &Lab) -> Vec<String> {
    let mut routes: Vec<String> = lab
        .ip_json(lab.node_ns(1), &["route", "show"])
        .expect("ip route")
        .iter()
        .map(|r| {
            format!(
                "{} via {} dev {} proto {}",
                r["dst"].as_str().unwrap_or("?"),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("?"),
                r["protocol"].as_str().unwrap_or("boot"),
            )
        })
        .collect();
    routes.sort();
    routes
}

fn hostile_leases_never_touch_the_nodes_routes(backend: Backend, dataplane: Dataplane) {
    let mut lab = Lab::start(LabConfig {
        nodes: 2,
        backend,
        dataplane,
        ip_masq: true,
        extra_agent_args: vec![format!("--healthz-port={HEALTHZ_PORT}")],
        ..Default::default()
    })
    .expect("lab starts");
    let pods = lab.add_pods(1).expect("pods attach");
    let reach = |lab: &Lab| lab.ping(&pods[0], pods[1].ip) && lab.ping(&pods[0], EXTERNAL_HOST);
    wait_until(
        "pods reach each other and the outside",
        Duration::from_secs(15),
        || Ok(reach(&lab)),
    )
    .expect("the lab works before the attack");
    let before = routes(&lab);
    assert!(
        before.contains(&format!("default via {FABRIC_IP} dev eth0 proto boot")),
        "{before:?}"
    );

    // The keys of the report, and more of their kind; last, a /25 over node 2's /24 (it used
    // to take node 2's lease down with it: both overlapped, both were rejected).
    let node2 = pods[1].ip.octets();
    let over_node2 = format!("{}.{}.{}.0-25", node2[0], node2[1], node2[2]);
    let hostile = [
        ("0.0.0.0-0", "198.18.0.99", "default_route"),
        ("198.18.0.0-24", "198.18.0.98", "outside_network"),
        ("10.244.0.0-16", "198.18.0.97", "subnet_len"),
        ("10.244.200.0-24", "127.0.0.1", "public_ip"),
        (over_node2.as_str(), "198.18.0.96", "subnet_len"),
    ];
    for (i, (key, ip, _)) in hostile.iter().enumerate() {
        let mac = format!("0e:00:00:00:00:9{i}");
        lab.put_raw_lease(key, &lease_value(backend, ip, &mac))
            .expect("etcdctl put");
    }
    lab.put_raw_lease("10.244.201.0-24", "{\"PublicIP\":")
        .expect("etcdctl put");

    let mut metrics = String::new();
    wait_until(
        "node 1 counts the rejected leases",
        Duration::from_secs(15),
        || {
            metrics = lab.http_get(1, HEALTHZ_PORT, "/metrics")?.1;
            Ok(hostile.iter().all(|(_, _, reason)| {
                let expected = hostile.iter().filter(|(_, _, r)| r == reason).count();
                metric(
                    &metrics,
                    &format!("weft_leases_rejected{{reason=\"{reason}\"}}"),
                ) == Some(expected as f64)
            }))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{metrics}"));

    let log = lab.agent_log_tail(1, 400);
    for (key, ip, _) in &hostile {
        assert!(
            log.contains(&format!("ignoring the lease {key} (node {ip}): ")),
            "no warning for {key}:\n{log}"
        );
    }
    assert!(
        log.contains("ignoring the lease 0.0.0.0-0 (node 198.18.0.99): it is the default route"),
        "{log}"
    );
    assert_eq!(routes(&lab), before, "node 1's routes changed");
    assert!(reach(&lab), "traffic broke after the hostile leases");
    let (status, body) = lab.http_get(1, HEALTHZ_PORT, "/readyz").expect("/readyz");
    assert_eq!(
        (status, body.trim()),
        (200, "ok"),
        "rejected leases are not a failure"
    );
}

#[test]
fn host_gw_kernel_ignores_hostile_leases() {
    hostile_leases_never_touch_the_nodes_routes(Backend::HostGw, Dataplane::Kernel);
}

#[test]
fn host_gw_bpf_ignores_hostile_leases() {
    hostile_leases_never_touch_the_nodes_routes(Backend::HostGw, Dataplane::Bpf);
}

#[test]
fn vxlan_kernel_ignores_hostile_leases() {
    hostile_leases_never_touch_the_nodes_routes(Backend::Vxlan, Dataplane::Kernel);
}

#[test]
fn vxlan_bpf_ignores_hostile_leases() {
    hostile_leases_never_touch_the_nodes_routes(Backend::Vxlan, Dataplane::Bpf);
}

/// Pod A claims pod B's address on their node (a secondary address, an ARP request from it
/// that moves the node's neighbour entry to A's MAC, packets from it). The endpoint comes
/// from B's CNI record: it stays on B's veth, a pod on another node still reaches B (A has
/// no server and would reset the connection), and A's packets from B's address are not
/// carried by the fast path.
#[test]
fn vxlan_bpf_a_pod_cannot_take_a_neighbours_endpoint() {
    let mut lab = Lab::start(LabConfig {
        nodes: 2,
        backend: Backend::Vxlan,
        dataplane: Dataplane::Bpf,
        ..Default::default()
    })
    .expect("lab starts");
    let a = lab.add_pod(1).expect("pod A");
    let b = lab.add_pod(1).expect("pod B");
    let c = lab.add_pod(2).expect("pod C");
    let pods = [a.clone(), b.clone(), c.clone()];
    lab.assert_all_pairs_ping(&pods, "before the attack", Duration::from_secs(15));
    for node in [1, 2] {
        lab.wait_bpf_synced(node, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    }
    let (veth_b, veth_b_name) = lab.host_veth_index(&b).expect("B's veth");
    let (veth_a, veth_a_name) = lab.host_veth_index(&a).expect("A's veth");
    let mac_a = lab.link_mac(&a.ns, "eth0").expect("A's MAC");
    let endpoint_b = |lab: &Lab| {
        lab.bpf_endpoint(1, b.ip)
            .expect("node 1's endpoints map")
            .unwrap_or_else(|| panic!("no endpoint for B ({})", b.ip))
    };
    let before = endpoint_b(&lab);
    assert_eq!(
        u64::from(before.ifindex),
        veth_b,
        "B's endpoint before the attack"
    );

    let server = EchoServer::start(&b.ns, SocketAddrV4::new(b.ip, 7007), Protocol::Tcp)
        .expect("echo server in B");
    let reach_b = |lab: &Lab| {
        echo::call(&c.ns, server.addr, Protocol::Tcp, Duration::from_secs(3))
            .map_err(|e| format!("{e:#}\n{}", lab.diagnostics()))
    };
    reach_b(&lab).expect("C reaches B before the attack");

    lab.claim_address(&a, b.ip).expect("A claims B's address");
    assert_eq!(
        lab.pod_neighbour_mac(1, b.ip).expect("ip neigh").as_deref(),
        Some(mac_a.as_str()),
        "the claim moved node 1's neighbour entry for {} to A's MAC",
        b.ip
    );
    // The agent saw the claim: it logged its refusal, or (the old behaviour) moved B's
    // endpoint to A's veth.
    let refusal = format!("on {veth_a_name} claims {}", b.ip);
    wait_until(
        "node 1's agent to react to the claim",
        Duration::from_secs(10),
        || {
            Ok(lab.agent_log_tail(1, 200).contains(&refusal)
                || endpoint_b(&lab).ifindex != before.ifindex)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    let after = endpoint_b(&lab);
    assert_eq!(
        (u64::from(after.ifindex), after.pod_mac),
        (veth_b, before.pod_mac),
        "B's endpoint must stay on B's veth {veth_b_name} (#{veth_b}) with B's MAC, \
         not A's {veth_a_name} (#{veth_a})"
    );

    // A pod on another node still reaches B, not A.
    let reply = reach_b(&lab).expect("C reaches B after the attack");
    assert_eq!(*reply.seen_by_server.ip(), c.ip);

    // A's packets from B's address: not the fast path's (no encapsulation on node 1).
    let counters = lab.bpf_counters(1).expect("counters");
    let (from, to) = (b.ip.to_string(), c.ip.to_string());
    let spoofed = ["ping", "-c", "5", "-i", "0.2", "-W", "1", "-I", &from, &to];
    let _ = weft_tests::Cmd::new(spoofed)
        .netns(&a.ns)
        .timeout(Duration::from_secs(10))
        .output()
        .expect("ping from A");
    let grew = lab.bpf_counters(1).expect("counters").since(&counters);
    assert!(
        grew.get(Counter::SourceNotPod) >= 5,
        "A's packets from B's address were not left to the kernel: {grew}"
    );
    assert_eq!(
        grew.get(Counter::Encap),
        0,
        "the fast path encapsulated A's packets from B's address: {grew}"
    );
    let log = lab.agent_log_tail(1, 400);
    assert_eq!(
        log.matches(&refusal).count(),
        1,
        "the refusal is logged once:\n{log}"
    );
}
