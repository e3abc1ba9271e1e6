//! End to end on the eBPF dataplane (`--dataplane=bpf`, never `auto`: a silent fallback to
//! the kernel path fails these tests): real `weft agent`s in node namespaces, pods attached
//! by weft-cni, traffic checked the way a user sees it (ping, iperf3, tshark, TCP streams)
//! and the programs' own counters read from their pins to show which path it took.
//! Needs root, the binaries (`cargo build -p weft --bins`) and the eBPF object they embed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use weft_common::{Counter, ALL_MAPS};
use weft_tests::bpf::{mounts_under, pinned_map_ids, pins, read_leases, Bpffs, TcFilter};
use weft_tests::exec::{ip, run, run_in, Cmd};
use weft_tests::icmp::{self, ProbeOutcome};
use weft_tests::packet::{
    parse_mac, send_forged_udp, send_udp, vxlan_payload, InnerUdp, UdpReceiver,
};
use weft_tests::plain_flannel::VXLAN_DEVICE;
use weft_tests::{
    netns, wait_until, Backend, BpfCounters, Dataplane, Flood, Lab, LabConfig, PlainFlannelNode,
    Pod, TcpFlow,
};

/// How long after the pods are attached every pod pair must ping.
const CONVERGENCE: Duration = Duration::from_secs(15);
/// How long a node may take to attach its programs and learn its pods and leases.
const BPF_SYNC: Duration = Duration::from_secs(20);
const VXLAN_PORT: u16 = 8472;
const VNI: u32 = 1;

fn start_lab(config: LabConfig) -> Lab {
    let started = Instant::now();
    let what = format!(
        "{} lab of {} nodes ({:?}, exceptions {:?})",
        config.backend.type_name(),
        config.nodes,
        config.dataplane,
        config.node_dataplanes
    );
    let lab = Lab::start(config).unwrap_or_else(|e| panic!("the {what} does not start: {e:#}"));
    eprintln!("{what}: agents ready in {:?}", started.elapsed());
    lab
}

/// A lab whose nodes all run the BPF dataplane.
fn bpf_config(nodes: usize, backend: Backend) -> LabConfig {
    LabConfig {
        nodes,
        backend,
        ip_masq: true,
        dataplane: Dataplane::Bpf,
        ..Default::default()
    }
}

/// One round of pings between every pod pair, which must all succeed at once.
fn assert_one_round_pings(lab: &Lab, pods: &[Pod], when: &str) {
    let matrix = lab.ping_matrix(pods);
    assert!(
        matrix.all_ok(),
        "{when}: these pod pairs do not ping:\n{}\n{}",
        matrix.failures().join("\n"),
        matrix.render()
    );
}

fn wait_bpf_synced(lab: &Lab, nodes: impl IntoIterator<Item = usize>) {
    for node in nodes {
        let took = lab
            .wait_bpf_synced(node, BPF_SYNC)
            .unwrap_or_else(|e| panic!("node {node}: {e:#}"));
        eprintln!("node {node}: BPF dataplane complete ({took:?})");
    }
}

fn counters(lab: &Lab, node: usize) -> BpfCounters {
    lab.bpf_counters(node)
        .unwrap_or_else(|e| panic!("node {node}: {e:#}"))
}

fn all_counters(lab: &Lab, nodes: &[usize]) -> BTreeMap<usize, BpfCounters> {
    nodes.iter().map(|&n| (n, counters(lab, n))).collect()
}

/// The lab's pods and the BPF state of every BPF node once all pairs ping.
fn converged_lab(config: LabConfig, pods_per_node: usize) -> (Lab, Vec<Pod>) {
    let bpf_nodes: Vec<usize> = (1..=config.nodes)
        .filter(|&n| config.dataplane_of(n) == Dataplane::Bpf)
        .collect();
    let mut lab = start_lab(config);
    let pods = lab.add_pods(pods_per_node).expect("pods are attached");
    lab.assert_all_pairs_ping(&pods, "fresh lab", CONVERGENCE);
    wait_bpf_synced(&lab, bpf_nodes);
    (lab, pods)
}

// ---------------------------------------------------------------------------------------
// 1. Every pod pair pings through the programs; hosts and remote pods reach each other.

#[test]
fn vxlan_bpf_pods_ping_each_other_through_the_programs() {
    const NODES: usize = 3;
    let nodes: Vec<usize> = (1..=NODES).collect();
    let (lab, pods) = converged_lab(bpf_config(NODES, Backend::Vxlan), 2);

    let before = all_counters(&lab, &nodes);
    assert_one_round_pings(&lab, &pods, "second round");
    // Per node: 2 pods each ping 4 remote pods (requests out, replies in), and answer
    // the 8 requests of remote pods (requests in, replies out).
    let expected = 16;
    for &node in &nodes {
        let now = counters(&lab, node);
        let delta = now.since(&before[&node]);
        eprintln!("node {node} during one ping round: {delta}");
        assert!(
            delta.get(Counter::Encap) >= expected && delta.get(Counter::Decap) >= expected,
            "node {node}: one round of pod pings should encapsulate and decapsulate at least \
             {expected} packets each in BPF, counters grew by: {delta}"
        );
        assert_eq!(
            now.drops(),
            0,
            "node {node} dropped packets of a healthy lab: {now}"
        );
    }

    // Hosts to remote pods and remote pods to hosts (node IP and flannel.1 address) take
    // the kernel path on one side; they must work too.
    for node in 1..=NODES {
        for pod in pods.iter().filter(|p| p.node != node) {
            assert!(
                icmp::ping(lab.node_ns(node), pod.ip, 3, Duration::from_secs(1))
                    .is_ok_and(|rtt| rtt.is_some()),
                "node {node} cannot ping pod {} ({})",
                pod.name,
                pod.ip
            );
            let lease = lab.lease_of(node).expect("lease");
            for host in [lab.node_ip(node), lease.subnet] {
                assert!(
                    lab.ping(pod, host),
                    "pod {} cannot ping node {node} at {host}",
                    pod.name
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. TCP both ways through the programs.

#[test]
fn vxlan_bpf_tcp_iperf3_both_ways() {
    let (lab, pods) = converged_lab(bpf_config(2, Backend::Vxlan), 1);
    let (a, b) = (&pods[0], &pods[1]);
    for (from, to) in [(a, b), (b, a)] {
        let before = all_counters(&lab, &[from.node, to.node]);
        let report = lab
            .iperf3(from, to, 3, &[])
            .unwrap_or_else(|e| panic!("iperf3 {} -> {}: {e:#}", from.name, to.name));
        let sender = counters(&lab, from.node).since(&before[&from.node]);
        let receiver = counters(&lab, to.node).since(&before[&to.node]);
        eprintln!(
            "iperf3 {} -> {}: {:.2} Gbit/s, {} bytes sent, {} received, {} retransmits; \
             sender node: {sender}; receiver node: {receiver}",
            from.name,
            to.name,
            report.bits_per_second / 1e9,
            report.sent_bytes,
            report.received_bytes,
            report.retransmits
        );
        assert!(
            report.received_bytes > 0 && report.bits_per_second > 0.0,
            "iperf3 {} -> {} moved nothing: {report:?}",
            from.name,
            to.name
        );
        // GSO: one count per superpacket (up to 64 KiB), so far fewer than segments.
        assert!(
            sender.get(Counter::Encap) >= 100 && receiver.get(Counter::Decap) >= 100,
            "the transfer did not take the BPF path: sender node {sender}, receiver node \
             {receiver}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. The frames the programs put on the wire are valid VXLAN, as tshark decodes them.

#[test]
fn vxlan_bpf_frames_decode_as_valid_vxlan() {
    let (lab, pods) = converged_lab(bpf_config(2, Backend::Vxlan), 1);
    let (a, b) = (&pods[0], &pods[1]);
    let pcap = lab.dir().join("bpf-vxlan.pcap");
    let pcap_arg = pcap.to_string_lossy().into_owned();
    let filter = format!(
        "udp dst port {VXLAN_PORT} and src host {}",
        lab.node_ip(a.node)
    );
    let port = lab.node(b.node).fabric_port.clone();
    let before = counters(&lab, a.node);
    let capture = lab
        .tshark(
            lab.fabric_ns(),
            &port,
            &["-c", "300", "-f", &filter, "-w", &pcap_arg],
            Duration::from_secs(30),
        )
        .expect("tshark captures on the fabric");
    // Pings (small frames) and a TCP transfer (GSO superpackets, full-size segments).
    for _ in 0..5 {
        lab.ping(a, b.ip);
    }
    let iperf = lab.iperf3(a, b, 1, &[]);
    let mut rounds = 0;
    let _ = capture.finish_while(|| {
        rounds += 1;
        lab.ping(a, b.ip);
        std::thread::sleep(Duration::from_millis(50));
    });
    let encapsulated = counters(&lab, a.node).since(&before).get(Counter::Encap);
    iperf.expect("iperf3 during the capture");

    let decode = format!("udp.port=={VXLAN_PORT},vxlan");
    let tshark_read = |extra: &[&str]| {
        let mut line = vec![
            "tshark",
            "-n",
            "-r",
            &pcap_arg,
            "-d",
            &decode,
            "-o",
            "ip.check_checksum:TRUE",
        ];
        line.extend_from_slice(extra);
        Cmd::new(line)
            .timeout(Duration::from_secs(60))
            .run()
            .expect("tshark reads the capture")
    };
    let fields = tshark_read(&[
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "udp.dstport",
        "-e",
        "vxlan.vni",
        "-e",
        "eth.src",
        "-e",
        "eth.dst",
        "-e",
        "ip.checksum.status",
    ]);
    let frames: Vec<Vec<Vec<String>>> = fields
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split('|')
                .map(|f| f.split(',').map(str::to_string).collect())
                .collect()
        })
        .collect();
    eprintln!(
        "captured {} VXLAN frames from node {} ({} encapsulated by BPF meanwhile, {rounds} \
         extra pings)",
        frames.len(),
        a.node,
        encapsulated
    );
    assert!(frames.len() >= 10, "too few frames captured: {fields}");
    assert!(
        encapsulated >= frames.len() as u64,
        "node {} encapsulated {encapsulated} packets in BPF but {} VXLAN frames left it: \
         some came from the kernel path",
        a.node,
        frames.len()
    );
    let local_mac = lab.lease_of(a.node).unwrap().vtep_mac.unwrap();
    let remote_mac = lab.lease_of(b.node).unwrap().vtep_mac.unwrap();
    let (node_a, node_b) = (
        lab.node_ip(a.node).to_string(),
        lab.node_ip(b.node).to_string(),
    );
    for (i, frame) in frames.iter().enumerate() {
        let field = |k: usize, occurrence: usize| {
            frame
                .get(k)
                .and_then(|f| f.get(occurrence))
                .map(String::as_str)
                .unwrap_or("")
        };
        let context = format!("frame {}: {frame:?}", i + 1);
        assert_eq!(
            (field(0, 0), field(1, 0)),
            (node_a.as_str(), node_b.as_str()),
            "outer addresses, {context}"
        );
        assert_eq!(field(2, 0), VXLAN_PORT.to_string(), "UDP port, {context}");
        assert_eq!(field(3, 0), VNI.to_string(), "VNI, {context}");
        assert_eq!(field(4, 1), local_mac, "inner source MAC, {context}");
        assert_eq!(field(5, 1), remote_mac, "inner destination MAC, {context}");
        let inner = (field(0, 1), field(1, 1));
        assert_eq!(
            inner,
            (a.ip.to_string().as_str(), b.ip.to_string().as_str()),
            "inner addresses, {context}"
        );
        // 0 = bad, 1 = good (2 = unverified): both IPv4 headers must be verified good.
        assert_eq!(
            frame.get(6).map(Vec::len),
            Some(2),
            "two IPv4 headers, {context}"
        );
        assert!(
            frame[6].iter().all(|status| status == "1"),
            "an IPv4 header checksum is not good, {context}"
        );
    }
    let malformed = tshark_read(&["-Y", "_ws.malformed || _ws.expert.severity == error"]);
    assert!(
        malformed.trim().is_empty(),
        "tshark reports malformed or erroneous frames:\n{malformed}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Path MTU: the largest DF packet that fits crosses; a bigger one is answered with
// "fragmentation needed", never dropped silently.

#[test]
fn vxlan_bpf_path_mtu_fits_or_is_answered_with_frag_needed() {
    let (lab, pods) = converged_lab(bpf_config(2, Backend::Vxlan), 1);
    let (a, b) = (&pods[0], &pods[1]);
    let pod_mtu = Backend::Vxlan.pod_mtu() as usize;
    let largest = pod_mtu - 28;
    let wait = Duration::from_secs(2);

    let before = counters(&lab, a.node);
    let outcome = icmp::probe(&a.ns, b.ip, largest, true, wait).expect("probe");
    assert!(
        matches!(outcome, ProbeOutcome::Reply(_)),
        "a {pod_mtu}-byte DF ping ({largest} bytes of payload) from {} to {} got {outcome:?}",
        a.name,
        b.name
    );
    let delta = counters(&lab, a.node).since(&before);
    assert!(
        delta.get(Counter::Encap) >= 1,
        "the {pod_mtu}-byte ping did not take the BPF path: {delta}"
    );
    // The pod's own stack refuses a bigger DF packet (its eth0 has the pod MTU).
    let outcome = icmp::probe(&a.ns, b.ip, largest + 1, true, wait).expect("probe");
    assert!(
        matches!(outcome, ProbeOutcome::NotSent(_)),
        "a DF ping one byte above the pod MTU left the pod: {outcome:?}"
    );

    // A pod whose MTU was raised by hand: its 1500-byte DF packet does not fit the tunnel.
    let veth = lab.host_veth(a).expect("host-side veth");
    ip(&a.ns, "link set eth0 mtu 1500").unwrap();
    ip(lab.node_ns(a.node), &format!("link set {veth} mtu 1500")).unwrap();
    let before = counters(&lab, a.node);
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let outcome = icmp::probe(&a.ns, b.ip, 1472, true, wait).expect("probe");
        let done = outcome.is_frag_needed(pod_mtu as u16);
        outcomes.push(outcome);
        if done {
            break;
        }
    }
    let delta = counters(&lab, a.node).since(&before);
    eprintln!(
        "1500-byte DF ping from a 1500-MTU pod: {outcomes:?}; node {}: {delta}",
        a.node
    );
    assert!(
        outcomes.last().unwrap().is_frag_needed(pod_mtu as u16),
        "a 1500-byte DF ping through the tunnel must be answered with ICMP fragmentation \
         needed (type 3 code 4, MTU {pod_mtu}), got {outcomes:?}"
    );
    assert!(
        delta.get(Counter::Passed) >= 1,
        "the oversize packet was not passed to the kernel: {delta}"
    );
    // TCP between 1500-MTU pods: GSO packets whose segments (1448 bytes of payload plus 52
    // of headers) do not fit the tunnel go to the kernel, whose fragmentation-needed
    // lowers the path MTU; redirected, they would leave the uplink as oversize frames.
    // Both ends at 1500, so that the MSS they agree on makes segments too big for the
    // tunnel; and forget the path MTU the pings above taught the pod.
    let b_veth = lab.host_veth(b).expect("host-side veth");
    ip(&b.ns, "link set eth0 mtu 1500").unwrap();
    ip(lab.node_ns(b.node), &format!("link set {b_veth} mtu 1500")).unwrap();
    ip(&a.ns, "route flush cache").unwrap();
    let before = counters(&lab, a.node);
    let report = TcpFlow::start(a, b, 7100, 10 << 20, Duration::from_secs(2))
        .expect("a TCP stream from the 1500-MTU pod")
        .run_out()
        .expect("the TCP stream");
    assert!(
        report.complete() && report.received >= 10 << 20,
        "the TCP stream from the 1500-MTU pod stalled: {report:?}"
    );
    // The kernel answered the oversize segments with fragmentation-needed: the pod learned
    // the tunnel's path MTU (on a veth underlay oversize GSO packets would cross anyway;
    // on a NIC with TSO they would be dropped on the wire).
    let route = run_in(&a.ns, &["ip", "route", "get", &b.ip.to_string()]).unwrap();
    assert!(
        route.contains(&format!("mtu {pod_mtu}")),
        "after the TCP stream the pod has no path MTU of {pod_mtu} for {}: {route}",
        b.ip
    );
    eprintln!(
        "TCP from the 1500-MTU pod: {report:?}; node {}: {}",
        a.node,
        counters(&lab, a.node).since(&before)
    );

    // Without DF the kernel fragments it, and the ping crosses.
    let outcome = icmp::probe(&a.ns, b.ip, 1472, false, wait).expect("probe");
    assert!(
        matches!(outcome, ProbeOutcome::Reply(_)),
        "a 1500-byte ping without DF from the 1500-MTU pod got {outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Mixed lab: BPF nodes, a kernel-path weft node and a flannel-style node.

#[test]
fn vxlan_bpf_kernel_and_flannel_nodes_reach_each_other() {
    let mut config = bpf_config(3, Backend::Vxlan);
    config.node_dataplanes.insert(3, Dataplane::Kernel);
    let mut lab = start_lab(config);
    let mut pods = lab.add_pods(2).expect("pods on the weft nodes");
    let flannel_node = lab.add_node().expect("a node without weft");
    let flannel = PlainFlannelNode::setup(
        &mut lab,
        flannel_node,
        Ipv4Addr::new(10, 244, 250, 0),
        "0e:00:5e:fa:fa:01",
    )
    .expect("the flannel-style node is configured");
    assert_eq!(flannel.sync(&lab).expect("sync"), 3, "weft leases");
    for _ in 0..2 {
        pods.push(flannel.add_pod(&mut lab).expect("pod on the flannel node"));
    }
    lab.assert_all_pairs_ping(&pods, "BPF, kernel and flannel nodes", CONVERGENCE);
    wait_bpf_synced(&lab, [1, 2]);
    assert!(
        lab.weft_filters(3).expect("filters").is_empty(),
        "the kernel-path node runs weft's programs"
    );

    let before = all_counters(&lab, &[1, 2]);
    assert_one_round_pings(&lab, &pods, "second round");
    // Per BPF node: 2 pods ping 6 remote pods and answer 12 requests.
    for node in [1, 2] {
        let delta = counters(&lab, node).since(&before[&node]);
        eprintln!("BPF node {node} during one ping round: {delta}");
        assert!(
            delta.get(Counter::Encap) >= 24 && delta.get(Counter::Decap) >= 24,
            "node {node}: traffic with every kind of node should take the BPF path: {delta}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Routed modes (DirectRouting, host-gw): the programs route, no encapsulation.

fn routed_bpf_pods_ping_without_encapsulation(config: LabConfig) {
    let nodes: Vec<usize> = (1..=config.nodes).collect();
    let (lab, pods) = converged_lab(config, 2);
    let before = all_counters(&lab, &nodes);
    assert_one_round_pings(&lab, &pods, "second round");
    for &node in &nodes {
        let now = counters(&lab, node);
        let delta = now.since(&before[&node]);
        eprintln!("node {node} during one ping round: {delta}");
        assert!(
            delta.get(Counter::DirectOut) >= 16 && delta.get(Counter::DirectIn) >= 16,
            "node {node}: pod traffic should be routed by the programs: {delta}"
        );
        assert_eq!(
            (delta.get(Counter::Encap), delta.get(Counter::Decap)),
            (0, 0),
            "node {node} encapsulated in a routed mode: {delta}"
        );
        assert_eq!(now.drops(), 0, "node {node} dropped packets: {now}");
    }
}

#[test]
fn vxlan_direct_routing_bpf_routes_without_encapsulation() {
    let mut config = bpf_config(3, Backend::Vxlan);
    config.direct_routing = true;
    routed_bpf_pods_ping_without_encapsulation(config);
}

#[test]
fn host_gw_bpf_routes_pods() {
    routed_bpf_pods_ping_without_encapsulation(bpf_config(3, Backend::HostGw));
}

// ---------------------------------------------------------------------------------------
// 7. A host on the underlay without a lease cannot inject frames into pods.

/// Sends `count` crafted VXLAN packets from `rogue_ns` to the node of `pod`, each carrying
/// a UDP datagram for `pod`, and returns how many datagrams reached it.
fn inject_into(lab: &Lab, rogue_ns: &str, pod: &Pod, count: u32) -> usize {
    // A pod address nobody holds.
    inject_forged(
        lab,
        rogue_ns,
        None,
        Ipv4Addr::new(10, 244, 251, 9),
        pod,
        count,
    )
}

/// [`inject_into`] with the outer source forged to `outer_src` (if given) and the inner
/// datagram from `inner_src`.
fn inject_forged(
    lab: &Lab,
    rogue_ns: &str,
    outer_src: Option<Ipv4Addr>,
    inner_src: Ipv4Addr,
    pod: &Pod,
    count: u32,
) -> usize {
    const POD_PORT: u16 = 9999;
    let vtep_mac = lab.lease_of(pod.node).unwrap().vtep_mac.unwrap();
    let inner = InnerUdp {
        src_mac: [0x02, 0, 0x5e, 0, 0, 0x99],
        dst_mac: parse_mac(&vtep_mac).unwrap(),
        src: SocketAddr::from((inner_src, 4000)),
        dst: SocketAddr::from((pod.ip, POD_PORT)),
        payload: b"injected by a host without a lease".to_vec(),
    };
    let payload = vxlan_payload(VNI, &inner).unwrap();
    let receiver = UdpReceiver::start(
        &pod.ns,
        SocketAddr::from((pod.ip, POD_PORT)),
        Duration::from_secs(3),
    )
    .expect("a UDP receiver in the pod");
    let target = SocketAddr::from((lab.node_ip(pod.node), VXLAN_PORT));
    let interval = Duration::from_millis(20);
    let sent = match outer_src {
        None => send_udp(rogue_ns, target, payload, count, interval),
        Some(src) => {
            let src = SocketAddr::from((src, 45678));
            send_forged_udp(rogue_ns, src, target, payload, count, interval)
        }
    }
    .expect("the rogue host sends");
    assert_eq!(sent, count);
    receiver.finish().expect("the receiver ends").len()
}

#[test]
fn vxlan_bpf_drops_vxlan_from_hosts_without_a_lease() {
    let mut config = bpf_config(3, Backend::Vxlan);
    config.node_dataplanes.insert(3, Dataplane::Kernel);
    let (mut lab, pods) = converged_lab(config, 1);
    let rogue = lab
        .add_underlay_host("rogue", Ipv4Addr::new(198, 18, 0, 99))
        .expect("a host on the underlay");
    const FRAMES: u32 = 20;

    let bpf_pod = &pods[1];
    let before = counters(&lab, bpf_pod.node);
    let reached = inject_into(&lab, &rogue, bpf_pod, FRAMES);
    let delta = counters(&lab, bpf_pod.node).since(&before);
    eprintln!(
        "{FRAMES} crafted frames to BPF node {}: {reached} reached the pod; {delta}",
        bpf_pod.node
    );
    assert_eq!(
        reached, 0,
        "VXLAN from a host without a lease reached pod {} on a BPF node",
        bpf_pod.name
    );
    assert!(
        delta.get(Counter::DropUnknownPeer) >= u64::from(FRAMES),
        "the BPF node should count every frame as drop_unknown_peer: {delta}"
    );

    // The contrast: the kernel's flannel.1 decapsulates from anyone.
    let kernel_pod = &pods[2];
    let reached = inject_into(&lab, &rogue, kernel_pod, FRAMES);
    eprintln!(
        "{FRAMES} crafted frames to kernel-path node {}: {reached} reached the pod",
        kernel_pod.node
    );
    assert!(
        reached > 0,
        "the same frames sent to a kernel-path node should reach its pod (flannel's \
         weakness), or the frames are not valid VXLAN"
    );
}

#[test]
fn vxlan_bpf_drops_vxlan_forging_a_peers_address() {
    let (mut lab, pods) = converged_lab(bpf_config(3, Backend::Vxlan), 1);
    let rogue = lab
        .add_underlay_host("forger", Ipv4Addr::new(198, 18, 0, 98))
        .expect("a host on the underlay");
    const FRAMES: u32 = 20;
    let target = &pods[0];
    let peer = lab.node_ip(2);
    let other_peers_pod = pods[2].ip;
    let before = counters(&lab, target.node);
    for (what, inner_src) in [
        (
            "an address outside every lease",
            Ipv4Addr::new(192, 0, 2, 9),
        ),
        (
            "an address in no lease of the pod network",
            Ipv4Addr::new(10, 244, 251, 9),
        ),
        ("another peer's pod", other_peers_pod),
    ] {
        let reached = inject_forged(&lab, &rogue, Some(peer), inner_src, target, FRAMES);
        eprintln!("{FRAMES} frames forged as {peer} from {what}: {reached} reached the pod");
        assert_eq!(
            reached, 0,
            "VXLAN forged as peer {peer} from {what} reached the pod"
        );
    }
    let delta = counters(&lab, target.node).since(&before);
    assert!(
        delta.get(Counter::DropSpoofedInner) >= 3 * u64::from(FRAMES),
        "every forged frame is counted as drop_spoofed_inner: {delta}"
    );
    // The genuine peer's traffic still flows.
    assert!(
        lab.ping(&pods[1], target.ip),
        "the real peer's pod no longer reaches the target"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Restarting the agent does not interrupt traffic.

/// weft's filters on node `node`, by interface and program.
fn filters_by_hook(lab: &Lab, node: usize) -> BTreeMap<(String, String), TcFilter> {
    lab.weft_filters(node)
        .expect("tc filter show")
        .into_iter()
        .map(|f| ((f.iface.clone(), f.program.clone()), f))
        .collect()
}

/// The (interface, program) pairs of a node with one pod behind host veth `veth`.
fn hooks(veth: &str) -> Vec<(String, String)> {
    [
        ("eth0", "from_netdev"),
        ("eth0", "to_netdev"),
        (veth, "from_pod"),
        (veth, "to_pod"),
    ]
    .into_iter()
    .map(|(iface, program)| (iface.to_string(), program.to_string()))
    .collect()
}

fn log_since(lab: &Lab, node: usize, marker_count: usize) -> String {
    let log = lab.agent_log_tail(node, 10_000);
    log.split("--- lab: starting")
        .nth(marker_count)
        .unwrap_or_default()
        .to_string()
}

fn restart_keeps_traffic_flowing(signal: libc::c_int) {
    let (mut lab, pods) = converged_lab(bpf_config(2, Backend::Vxlan), 1);
    let (a, b) = (pods[0].clone(), pods[1].clone());
    let node = b.node;
    let dir = lab.bpf_dir(node).to_path_buf();
    let veth = lab.host_veth(&b).expect("host-side veth");
    let map_ids = pinned_map_ids(&dir);
    assert_eq!(
        map_ids.len(),
        ALL_MAPS.len(),
        "pins under {}",
        dir.display()
    );
    let leases = read_leases(&dir).expect("leases map");
    let filters = filters_by_hook(&lab, node);
    for hook in hooks(&veth) {
        assert!(
            filters.contains_key(&hook),
            "no weft filter {hook:?}: {filters:?}"
        );
    }
    let counters_before = counters(&lab, node);

    let flow = TcpFlow::start(&a, &b, 7000, 20 << 20, Duration::from_secs(60))
        .expect("a TCP stream between the pods");
    let flood = Flood::start(&a.ns, b.ip, 20_000, Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    match signal {
        libc::SIGKILL => lab.kill_agent(node),
        _ => lab.stop_agent(node),
    }
    assert!(!lab.agent_running(node));
    let stopped = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let while_down = filters_by_hook(&lab, node);
    assert_eq!(
        while_down, filters,
        "weft's filters changed while the agent was down"
    );
    assert_eq!(
        pinned_map_ids(&dir),
        map_ids,
        "the pins changed while the agent was down"
    );

    lab.start_agent(node).expect("the agent restarts");
    let ready = started.elapsed();
    // The new agent replaces each filter in place with its own programs.
    let replaced = wait_until(
        "the restarted agent to replace its filters",
        BPF_SYNC,
        || {
            let now = filters_by_hook(&lab, node);
            Ok(hooks(&veth).iter().all(|hook| {
                now.get(hook)
                    .zip(filters.get(hook))
                    .is_some_and(|(new, old)| new.prog_id != old.prog_id)
            }))
        },
    )
    .map(|_| started.elapsed())
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", filters_by_hook(&lab, node)));
    let counters_replaced = counters(&lab, node);
    std::thread::sleep(Duration::from_millis(1000));

    let flood = flood.stop().expect("the ping flood");
    let flow = flow.finish().expect("the TCP stream");
    let counters_after = counters(&lab, node);
    eprintln!(
        "agent {} after {stopped:?}, ready {ready:?}, filters replaced {replaced:?} after \
         the signal",
        if signal == libc::SIGKILL {
            "killed"
        } else {
            "stopped"
        }
    );
    eprintln!("ping flood: {flood}");
    eprintln!(
        "TCP stream: {} bytes sent, {} received, intact {}, longest stall {:?}, {:?}",
        flow.sent, flow.received, flow.intact, flow.longest_stall, flow.elapsed
    );
    assert!(flood.sent >= 1000, "the flood sent too little: {flood}");
    // Packets the programs dropped while the restart went on (TCP hides them by
    // retransmitting; the flood may slip between them).
    let dropped = counters_after.since(&counters_before);
    let log = log_since(&lab, node, 2);
    let removals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resync: removed"))
        .collect();
    assert_eq!(
        dropped.drops(),
        0,
        "node {node} dropped packets across the restart: {dropped}; ping flood: {flood}; \
         what the restarted agent removed:\n{}",
        removals.join("\n")
    );
    assert_eq!(flood.lost(), 0, "echoes lost across the restart: {flood}");
    assert!(
        flow.complete(),
        "the TCP stream lost or corrupted data across the restart: {flow:?}"
    );

    // The new agent adopted the pinned maps: same maps, same content, counters continue.
    assert_eq!(
        pinned_map_ids(&dir),
        map_ids,
        "the restarted agent replaced pinned maps"
    );
    assert_eq!(
        read_leases(&dir).expect("leases map"),
        leases,
        "the leases map changed across the restart"
    );
    let delta = counters_after.since(&counters_replaced);
    assert!(
        counters_replaced.get(Counter::Decap) >= counters_before.get(Counter::Decap)
            && delta.get(Counter::Decap) > 0
            && delta.get(Counter::Encap) > 0,
        "the new programs do not count into the adopted counters: before {counters_before}, \
         at replacement {counters_replaced}, after {counters_after}"
    );
    for expected in [
        "adopted the BPF maps of the previous run",
        "replaced the filter of the previous run in place",
    ] {
        assert!(
            log.contains(expected),
            "the restarted agent's log does not say '{expected}':\n{log}"
        );
    }
}

#[test]
fn vxlan_bpf_agent_stop_and_restart_loses_no_packet() {
    restart_keeps_traffic_flowing(libc::SIGTERM);
}

#[test]
fn vxlan_bpf_agent_crash_and_restart_loses_no_packet() {
    restart_keeps_traffic_flowing(libc::SIGKILL);
}

// ---------------------------------------------------------------------------------------
// 8b. An agent gone for good does not leave stale maps deciding.

#[test]
fn vxlan_bpf_without_its_agent_hands_everything_to_the_kernel_path() {
    const STALE_AFTER: &str = "--bpf-stale-after=2";
    let mut config = bpf_config(2, Backend::Vxlan);
    config.extra_agent_args.push(STALE_AFTER.into());
    let (mut lab, pods) = converged_lab(config, 1);
    let target = pods[0].clone();
    let before = counters(&lab, target.node);

    // Node 1's agent dies and stays dead; a node joins afterwards. Node 1's pinned maps
    // do not know the newcomer, whose VXLAN the programs would drop as a stranger's.
    lab.kill_agent(target.node);
    wait_until(
        "node 1's programs notice the agent is gone",
        Duration::from_secs(15),
        || {
            lab.ping(&pods[1], target.ip);
            Ok(counters(&lab, target.node)
                .since(&before)
                .get(Counter::AgentGone)
                > 0)
        },
    )
    .expect("the programs fall back to the kernel path");
    let newcomer = lab.add_node().expect("a third node");
    lab.start_agent(newcomer).expect("its agent");
    let pod = lab.add_pod(newcomer).expect("a pod on the new node");

    // One way only: node 1 has no route back to the newcomer without its agent.
    const PORT: u16 = 9999;
    let receiver = UdpReceiver::start(
        &target.ns,
        SocketAddr::from((target.ip, PORT)),
        Duration::from_secs(6),
    )
    .expect("a UDP receiver in node 1's pod");
    let sent = icmp::in_netns(&pod.ns, move || {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        for _ in 0..20 {
            socket.send_to(b"from a node born after the agent died", (target.ip, PORT))?;
            std::thread::sleep(Duration::from_millis(200));
        }
        anyhow::Ok(20)
    })
    .expect("the new pod sends");
    let received = receiver.finish().expect("the receiver ends").len();
    let delta = counters(&lab, 1).since(&before);
    eprintln!("{received} of {sent} datagrams from the new node arrived; node 1: {delta}");
    assert!(
        received > 0,
        "the new node's pod cannot reach node 1's pod: {delta}"
    );
    assert_eq!(
        delta.get(Counter::DropUnknownPeer),
        0,
        "node 1 dropped the new node's VXLAN as a stranger's: {delta}"
    );

    // The agent comes back: the fast path resumes.
    lab.start_agent(1).expect("node 1's agent restarts");
    wait_bpf_synced(&lab, [1]);
    let back = counters(&lab, 1);
    wait_until(
        "the fast path carries node 2's pings again",
        Duration::from_secs(15),
        || {
            lab.ping(&pods[1], target.ip);
            Ok(counters(&lab, 1).since(&back).get(Counter::Decap) > 0)
        },
    )
    .expect("the fast path resumes after the restart");
}

// ---------------------------------------------------------------------------------------
// 9. --cleanup removes everything; switching a node to the kernel path removes the
// programs and keeps its pods connected.

fn nft_tables(ns: &str) -> String {
    run_in(ns, &["nft", "list", "tables"]).expect("nft list tables")
}

fn links(ns: &str) -> Vec<String> {
    let out = run(&["ip", "-n", ns, "-o", "link", "show"]).expect("ip link");
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect()
}

fn assert_no_weft_bpf(lab: &Lab, node: usize, dir: &Path, when: &str) {
    let filters = lab.weft_filters(node).expect("tc filter show");
    assert!(
        filters.is_empty(),
        "{when}: weft's filters are left on node {node}: {filters:?}"
    );
    let left = pins(dir);
    assert!(
        left.is_empty(),
        "{when}: pins are left under {}: {left:?}",
        dir.display()
    );
}

#[test]
fn vxlan_bpf_cleanup_and_switch_to_kernel_leave_no_programs() {
    let (mut lab, pods) = converged_lab(bpf_config(3, Backend::Vxlan), 1);

    // Node 2: stopped, then `weft agent --cleanup` with the same flags.
    let cleaned = 2;
    let ns = lab.node_ns(cleaned).to_string();
    let dir = lab.bpf_dir(cleaned).to_path_buf();
    assert!(!lab.weft_filters(cleaned).unwrap().is_empty());
    assert!(!pins(&dir).is_empty(), "no pins under {}", dir.display());
    assert!(links(&ns).contains(&VXLAN_DEVICE.to_string()));
    assert!(
        nft_tables(&ns).contains("flannel-ipv4"),
        "{}",
        nft_tables(&ns)
    );
    lab.stop_agent(cleaned);
    let printed = lab
        .run_agent_cleanup(cleaned)
        .expect("weft agent --cleanup");
    eprintln!("cleanup of node {cleaned}:\n{printed}");
    assert_no_weft_bpf(&lab, cleaned, &dir, "after --cleanup");
    assert!(
        !links(&ns).contains(&VXLAN_DEVICE.to_string()),
        "flannel.1 is left after --cleanup: {:?}",
        links(&ns)
    );
    let tables = nft_tables(&ns);
    assert!(
        !tables.contains("flannel-ipv4"),
        "weft's nftables table is left after --cleanup: {tables}"
    );

    // Node 3: restarted with --dataplane=kernel.
    let switched = 3;
    let dir = lab.bpf_dir(switched).to_path_buf();
    lab.set_dataplane(switched, Dataplane::Kernel);
    lab.stop_agent(switched);
    lab.start_agent(switched)
        .expect("the agent restarts on the kernel path");
    assert_no_weft_bpf(
        &lab,
        switched,
        &dir,
        "after switching to --dataplane=kernel",
    );
    let remaining = [pods[0].clone(), pods[2].clone()];
    lab.assert_all_pairs_ping(&remaining, "BPF node 1 and kernel node 3", CONVERGENCE);
    let before = counters(&lab, 1);
    assert_one_round_pings(&lab, &remaining, "second round");
    let delta = counters(&lab, 1).since(&before);
    assert!(
        delta.get(Counter::Encap) >= 2 && delta.get(Counter::Decap) >= 2,
        "BPF node 1 no longer serves the traffic with the kernel node: {delta}"
    );
}

// ---------------------------------------------------------------------------------------
// The lab's bpffs (which keeps the pins across agent restarts) goes with the lab, also on
// panic, and the sweep unmounts the one a dead test process left.

#[test]
fn lab_bpffs_is_unmounted_on_panic_and_by_the_sweep() {
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let lab = Lab::start(LabConfig {
            nodes: 1,
            start_agents: false,
            ..Default::default()
        })
        .expect("lab starts");
        let mounts = mounts_under(lab.dir());
        tx.send((lab.dir().to_path_buf(), mounts)).unwrap();
        panic!("deliberate panic with a mounted bpffs");
    })
    .join();
    assert!(panicked.is_err());
    let (dir, mounts) = rx.recv().expect("the lab started");
    assert_eq!(mounts, vec![dir.join("bpffs")], "the lab's mounts");
    assert!(
        mounts_under(&dir).is_empty(),
        "the bpffs of a lab that panicked is still mounted"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());

    // A lab directory of a process that cannot exist (pid above pid_max), bpffs mounted.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    let base = dir.parent().expect("the labs' base directory");
    let stale = base.join(format!("weft-wl{}-1-sweep", pid_max + 1));
    std::mem::forget(Bpffs::mount(&stale.join("bpffs")).expect("a bpffs"));
    assert_eq!(mounts_under(&stale).len(), 1);
    netns::sweep_leftovers(&netns::unique_prefix(), base);
    assert!(
        mounts_under(&stale).is_empty(),
        "the sweep left the bpffs of a dead lab mounted"
    );
    assert!(!stale.exists(), "the sweep left {}", stale.display());
}
