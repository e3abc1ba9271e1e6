//! Tests of the lab itself, with no weft running: the underlay, etcd, teardown, the
//! hand-configured flannel node and the capture helpers.

use std::net::Ipv4Addr;

use weft_tests::lab::{ping_ns, ETCD_PREFIX};
use weft_tests::{netns, Backend, Lab, LabConfig, PlainFlannelNode, EXTERNAL_HOST, FABRIC_IP};

fn lab_without_agents(nodes: usize) -> Lab {
    Lab::start(LabConfig {
        nodes,
        backend: Backend::Vxlan,
        start_agents: false,
        ..Default::default()
    })
    .expect("lab starts")
}

fn lab_namespaces(prefix: &str) -> Vec<String> {
    netns::list()
        .expect("ip netns list")
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[test]
fn underlay_connects_nodes_fabric_and_external_host() {
    let lab = lab_without_agents(3);
    for a in 1..=3 {
        for b in (1..=3).filter(|&b| b != a) {
            assert!(
                ping_ns(lab.node_ns(a), lab.node_ip(b)),
                "node {a} cannot ping node {b}"
            );
        }
        assert!(ping_ns(lab.node_ns(a), FABRIC_IP), "node {a} -> fabric");
        assert!(
            ping_ns(lab.node_ns(a), EXTERNAL_HOST),
            "node {a} -> external host"
        );
    }
    // Nothing answers where nothing is.
    assert!(!ping_ns(lab.node_ns(1), Ipv4Addr::new(198, 18, 0, 99)));

    let config = lab
        .etcdctl(&[
            "get",
            "--print-value-only",
            &format!("{ETCD_PREFIX}/config"),
        ])
        .expect("etcdctl get");
    assert_eq!(config.trim(), lab.config().net_conf());
    assert!(lab.leases().expect("leases").is_empty());
    assert_eq!(lab_namespaces(lab.prefix()).len(), 4, "fabric + 3 nodes");
}

#[test]
fn teardown_removes_every_namespace_on_drop_and_on_panic() {
    let lab = lab_without_agents(2);
    let prefix = lab.prefix().to_string();
    let dir = lab.dir().to_path_buf();
    assert_eq!(lab_namespaces(&prefix).len(), 3);
    drop(lab);
    assert!(lab_namespaces(&prefix).is_empty());
    assert!(!dir.exists(), "{} left behind", dir.display());

    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let lab = lab_without_agents(1);
        tx.send(lab.prefix().to_string()).unwrap();
        panic!("deliberate panic with a running lab");
    })
    .join();
    assert!(panicked.is_err());
    let prefix = rx.recv().expect("the lab started");
    assert!(lab_namespaces(&prefix).is_empty());
}

/// Validates the hand-configured flannel node (the interop test's reference) against
/// itself: two such nodes connect their pods over VXLAN as flanneld's vxlan backend programs them.
#[test]
fn plain_flannel_nodes_connect_their_pods_over_vxlan() {
    let mut lab = lab_without_agents(2);
    let macs = ["0e:00:5e:fa:01:01", "0e:00:5e:fa:02:01"];
    let subnets = [
        Ipv4Addr::new(10, 244, 201, 0),
        Ipv4Addr::new(10, 244, 202, 0),
    ];
    let plain: Vec<PlainFlannelNode> = (0..2)
        .map(|i| PlainFlannelNode::setup(&mut lab, i + 1, subnets[i], macs[i]).expect("setup"))
        .collect();
    for node in &plain {
        assert_eq!(node.sync(&lab).expect("sync"), 1);
    }
    let leases = lab.leases().expect("leases");
    assert_eq!(leases.len(), 2);
    assert_eq!(lab.lease_of(2).unwrap().vtep_mac.as_deref(), Some(macs[1]));

    let mut pods = Vec::new();
    for node in &plain {
        for _ in 0..2 {
            pods.push(node.add_pod(&mut lab).expect("pod"));
        }
    }
    let matrix = lab.ping_matrix(&pods);
    assert!(matrix.all_ok(), "\n{}", matrix.render());

    let packet = lab.capture_vxlan(&pods[0], &pods[2]).expect("capture");
    assert_eq!(packet.udp_dst_port, 8472);
    assert_eq!(packet.vni, 1);
    assert_eq!(packet.outer_src, lab.node_ip(1));
    assert_eq!(packet.outer_dst, lab.node_ip(2));
    assert_eq!(packet.inner_dst, pods[2].ip);
    assert_eq!(packet.inner_dst_mac, macs[1]);
    assert_eq!(packet.inner_src_mac, macs[0]);

    let source = lab
        .first_packet_source(&pods[2].ns, "eth0", "icmp[icmptype] == icmp-echo", || {
            lab.ping(&pods[0], pods[2].ip);
        })
        .expect("tcpdump");
    assert_eq!(source, pods[0].ip);
}
