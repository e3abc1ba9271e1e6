//! Hostile and careless input on a running lab: leases written into etcd by anyone with
//! write access must never touch the node's own routes, on any backend or dataplane.
//! Needs root and the binaries (`cargo build -p weft --bins`).

use std::time::Duration;

use serde_json::json;
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
