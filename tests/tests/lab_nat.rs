//! Source NAT by the BPF programs (`--ip-masq --masquerade bpf`): pod traffic leaving the
//! cluster, in the lab, with real TCP, UDP and ICMP to the external host.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use serde_json::Value;
use weft_common::Counter;
use weft_tests::conn_rate::{connection_rate, ConnRate, ConnServer};
use weft_tests::echo::{call, dns_like_load, EchoServer, HeldConnection};
use weft_tests::exec::{ip, Cmd};
use weft_tests::kube_proxy::{Protocol, ProxyMode, Service, TrafficPolicy};
use weft_tests::lab::EXTERNAL_HOST;
use weft_tests::{wait_until, Backend, Dataplane, Lab, LabConfig, Pod};

/// An address of the fabric (like the external host) that `--masquerade-exclude` names:
/// pods reach it with their own address.
const EXCLUDED_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The lab nodes' ephemeral ports are Linux's default 32768-60999: BPF NAT takes the rest.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;
const WAIT: Duration = Duration::from_secs(10);

fn nat_lab(backend: Backend, extra: &[&str]) -> Lab {
    let mut args = vec![
        "--masquerade=bpf".to_string(),
        format!("--masquerade-exclude={EXCLUDED_HOST}/32"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let lab = Lab::start(LabConfig {
        nodes: 2,
        backend,
        ip_masq: true,
        dataplane: Dataplane::Bpf,
        extra_agent_args: args,
        ..Default::default()
    })
    .expect("lab starts");
    ip(
        lab.fabric_ns(),
        &format!("addr add {EXCLUDED_HOST}/32 dev lo"),
    )
    .unwrap();
    lab
}

/// Pods that have talked (so their node learned them) and programs complete on every node.
fn ready(lab: &Lab, pods: &[Pod]) {
    lab.assert_all_pairs_ping(pods, "before NAT", WAIT);
    for node in 1..=lab.node_count() {
        lab.wait_bpf_synced(node, WAIT).unwrap();
    }
}

/// A capture of everything that leaves toward the outside with a pod source (for at most
/// 60 s): none may show up (the excluded host is the one destination that keeps it).
fn leak_capture(lab: &Lab) -> weft_tests::process::Capture {
    let leak_filter = format!(
        "ip and src net 10.244.0.0/16 and not dst net 10.244.0.0/16 and not dst host {EXCLUDED_HOST}"
    );
    lab.tcpdump(
        lab.fabric_ns(),
        "br0",
        &leak_filter,
        1,
        Duration::from_secs(60),
    )
    .expect("tcpdump on the fabric")
}

/// Fails if `leaks` saw a packet.
fn assert_no_leak(leaks: weft_tests::process::Capture) {
    let leaked = leaks.stop();
    assert!(
        !leaked.lines().any(|l| l.starts_with("IP ")),
        "packets left toward the outside with a pod source:\n{leaked}"
    );
}

fn server(lab: &Lab, protocol: Protocol, host: Ipv4Addr, port: u16) -> EchoServer {
    EchoServer::start(lab.fabric_ns(), SocketAddrV4::new(host, port), protocol)
        .expect("echo server on the fabric")
}

fn weft_bpf_nat(lab: &Lab, node: usize) -> Vec<Value> {
    let bpf_dir = lab.bpf_dir(node).to_string_lossy().into_owned();
    let weft = lab.binary("weft").unwrap().to_string_lossy().into_owned();
    let out = Cmd::new([
        weft.as_str(),
        "bpf",
        "nat",
        "--bpf-dir",
        &bpf_dir,
        "-o",
        "json",
    ])
    .netns(lab.node_ns(node))
    .run()
    .unwrap();
    serde_json::from_str(&out).unwrap()
}

fn translates_tcp_udp_and_icmp_and_leaks_no_pod_address(backend: Backend) {
    let mut lab = nat_lab(backend, &[]);
    let pods = lab.add_pods(1).expect("pods attach");
    ready(&lab, &pods);
    let pod: &Pod = &pods[0];
    let node = pod.node;
    let leaks = leak_capture(&lab);
    let before = lab.bpf_counters(node).unwrap();

    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 8080);
    let udp = server(&lab, Protocol::Udp, EXTERNAL_HOST, 8081);
    for (protocol, port) in [(Protocol::Tcp, 8080), (Protocol::Udp, 8081)] {
        let reply = call(
            &pod.ns,
            SocketAddrV4::new(EXTERNAL_HOST, port),
            protocol,
            WAIT,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{} from the pod: {e:#}\n{}",
                protocol.name(),
                lab.diagnostics()
            )
        });
        assert_eq!(*reply.seen_by_server.ip(), lab.node_ip(node), "{reply:?}");
        assert!(
            NAT_PORTS.contains(&reply.seen_by_server.port()),
            "{} left from port {}, not one of BPF NAT's {NAT_PORTS:?}",
            protocol.name(),
            reply.seen_by_server.port()
        );
    }
    // ICMP echo: the reply arrives, the fabric sees the node's address.
    let filter = format!("icmp[icmptype] == icmp-echo and dst host {EXTERNAL_HOST}");
    let source = lab
        .first_packet_source(lab.fabric_ns(), "br0", &filter, || {
            lab.ping(pod, EXTERNAL_HOST);
        })
        .unwrap();
    assert_eq!(source, lab.node_ip(node));
    assert!(
        lab.ping(pod, EXTERNAL_HOST),
        "no echo reply through BPF NAT"
    );
    // The excluded destination sees the pod.
    let filter = format!("icmp[icmptype] == icmp-echo and dst host {EXCLUDED_HOST}");
    let source = lab
        .first_packet_source(lab.fabric_ns(), "br0", &filter, || {
            lab.ping(pod, EXCLUDED_HOST);
        })
        .unwrap();
    assert_eq!(
        source, pod.ip,
        "--masquerade-exclude keeps the pod's address"
    );

    let grew = lab.bpf_counters(node).unwrap().since(&before);
    assert!(grew.get(Counter::NatAlloc) >= 3, "{grew:?}");
    assert!(
        grew.get(Counter::NatOut) >= 3 && grew.get(Counter::NatIn) >= 3,
        "{grew:?}"
    );
    assert_eq!(grew.get(Counter::NatAllocFailed), 0, "{grew:?}");
    // `weft bpf nat` shows the TCP mapping, replied.
    let rows = weft_bpf_nat(&lab, node);
    assert!(
        rows.iter().any(|r| r["protocol"] == "tcp"
            && r["pod"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", pod.ip))
            && r["outside"] == format!("{EXTERNAL_HOST}:8080")
            && r["node"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", lab.node_ip(node)))),
        "{rows:#?}"
    );
    // `weft status` shows the source NAT and its mappings.
    let weft = lab.binary("weft").unwrap().to_string_lossy().into_owned();
    let subnet_file = lab.node(node).subnet_file.to_string_lossy().into_owned();
    let status = Cmd::new([weft.as_str(), "status", "--subnet-file", &subnet_file])
        .netns(lab.node_ns(node))
        .run()
        .unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Source NAT:  BPF, ")
            && l.ends_with("ports 61000-65535")
            && !l.contains(" 0 mappings")),
        "{status}"
    );
    // Pod to pod keeps pod addresses (across nodes).
    let other = &pods[1];
    let source = lab
        .first_packet_source(&other.ns, "eth0", "icmp[icmptype] == icmp-echo", || {
            lab.ping(pod, other.ip);
        })
        .unwrap();
    assert_eq!(source, pod.ip);
    assert_no_leak(leaks);
    drop((tcp, udp));
}

#[test]
fn vxlan_bpf_nat_translates_tcp_udp_and_icmp_and_leaks_no_pod_address() {
    translates_tcp_udp_and_icmp_and_leaks_no_pod_address(Backend::Vxlan);
}

#[test]
fn host_gw_bpf_nat_translates_tcp_udp_and_icmp_and_leaks_no_pod_address() {
    translates_tcp_udp_and_icmp_and_leaks_no_pod_address(Backend::HostGw);
}

/// With the table made tiny, flows beyond it go to the kernel's masquerade (other
/// ports), every one of them answered, and the counters say so.
fn a_full_table_hands_new_flows_to_the_kernels_masquerade(firewall: &str) {
    let mut lab = nat_lab(
        Backend::Vxlan,
        &[
            "--masquerade-table-size=8",
            &format!("--firewall={firewall}"),
        ],
    );
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let pod = &pods[0];
    let udp = server(&lab, Protocol::Udp, EXTERNAL_HOST, 9000);
    let before = lab.bpf_counters(1).unwrap();
    let mut by_bpf = 0;
    let mut by_kernel = 0;
    for _ in 0..16 {
        // Each call is a new socket: a new flow.
        let reply = call(&pod.ns, udp.addr, Protocol::Udp, WAIT)
            .unwrap_or_else(|e| panic!("a flow got no answer: {e:#}"));
        assert_eq!(*reply.seen_by_server.ip(), lab.node_ip(1));
        if NAT_PORTS.contains(&reply.seen_by_server.port()) {
            by_bpf += 1;
        } else {
            by_kernel += 1;
        }
    }
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    assert_eq!(by_bpf, 7, "the table takes 7/8 of 8 mappings");
    assert_eq!(by_kernel, 9);
    assert!(grew.get(Counter::NatFallback) >= 9, "{grew:?}");
    assert_eq!(grew.get(Counter::NatAllocFailed), 0, "{grew:?}");
}

#[test]
fn a_full_table_hands_new_flows_to_nftables_masquerade() {
    a_full_table_hands_new_flows_to_the_kernels_masquerade("nftables");
}

#[test]
fn a_full_table_hands_new_flows_to_iptables_masquerade() {
    a_full_table_hands_new_flows_to_the_kernels_masquerade("iptables");
}

/// Two pods on one node sending from the same port to the same destination, and the node
/// itself to the same destination port at the same time: every flow gets its answers.
#[test]
fn pods_and_the_node_share_a_destination_without_colliding() {
    let mut lab = nat_lab(Backend::Vxlan, &[]);
    let a = lab.add_pod(1).unwrap();
    let b = lab.add_pod(1).unwrap();
    // A pod on the other node, so that the two talk through their gateway and are learned.
    let c = lab.add_pod(2).unwrap();
    ready(&lab, &[a.clone(), b.clone(), c]);
    let udp = server(&lab, Protocol::Udp, EXTERNAL_HOST, 9100);
    let src_port = 40000;
    let seen: Vec<SocketAddrV4> = std::thread::scope(|s| {
        let calls: Vec<_> = [&a.ns, &b.ns, &lab.node_ns(1).to_string()]
            .into_iter()
            .map(|ns| {
                let ns = ns.clone();
                let dst = udp.addr;
                s.spawn(move || {
                    weft_tests::echo::call_from_port(&ns, src_port, dst, Protocol::Udp, WAIT)
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{e:#}"))
                    .seen_by_server
            })
            .collect()
    });
    assert!(seen.iter().all(|s| *s.ip() == lab.node_ip(1)), "{seen:?}");
    let mut ports: Vec<u16> = seen.iter().map(|s| s.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "three flows, three ports: {seen:?}");
    // The node's own socket kept its port; the pods' got BPF NAT ports.
    assert_eq!(seen[2].port(), src_port, "{seen:?}");
    assert!(NAT_PORTS.contains(&seen[0].port()) && NAT_PORTS.contains(&seen[1].port()));
}

/// A host behind a link with a smaller MTU answers a pod's 1,400-byte DF packet with
/// fragmentation-needed, sent to the node's address: translated back, quoted packet
/// included, it reaches the pod, whose path MTU discovery learns 1280.
#[test]
fn fragmentation_needed_reaches_the_pod_through_bpf_nat() {
    let mut lab = nat_lab(Backend::Vxlan, &[]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let pod = &pods[0];
    // fabric ─(MTU 1280)─ far (203.0.113.2)
    let far = lab.create_ns("far").unwrap();
    let fab = lab.fabric_ns().to_string();
    ip(
        &fab,
        &format!("link add vfar mtu 1280 type veth peer name eth0 netns {far}"),
    )
    .unwrap();
    ip(&fab, "addr add 203.0.113.1/30 dev vfar").unwrap();
    ip(&fab, "link set vfar up").unwrap();
    ip(&far, "link set eth0 mtu 1280 up").unwrap();
    ip(&far, "addr add 203.0.113.2/30 dev eth0").unwrap();
    ip(&far, "route add default via 203.0.113.1").unwrap();
    Cmd::new(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .netns(&fab)
        .run()
        .unwrap();
    assert!(
        lab.ping(pod, Ipv4Addr::new(203, 0, 113, 2)),
        "the far host answers small pings"
    );
    let before = lab.bpf_counters(1).unwrap();
    let out = Cmd::new([
        "ping",
        "-n",
        "-M",
        "do",
        "-s",
        "1372",
        "-c",
        "3",
        "-i",
        "0.3",
        "-W",
        "1",
        "203.0.113.2",
    ])
    .netns(&pod.ns)
    .timeout(WAIT)
    .output()
    .unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("mtu = 1280") || text.contains("mtu=1280"),
        "the pod never learned the path MTU:\n{text}"
    );
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    assert!(grew.get(Counter::NatIn) >= 1, "{grew:?}");
    let route = Cmd::new(["ip", "route", "get", "203.0.113.2"])
        .netns(&pod.ns)
        .run()
        .unwrap();
    assert!(route.contains("mtu 1280"), "{route}");
}

/// A TCP conversation through BPF NAT goes on, every line answered, while the agent
/// restarts: the pinned table and the attached programs carry it.
#[test]
fn a_tcp_stream_through_bpf_nat_survives_an_agent_restart() {
    let mut lab = nat_lab(Backend::Vxlan, &[]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 9200);
    let ns = pods[0].ns.clone();
    let dst = tcp.addr;
    let conversation = std::thread::spawn(move || {
        weft_tests::echo::converse(
            &ns,
            dst,
            60,
            Duration::from_millis(100),
            Duration::from_secs(30),
        )
    });
    // The flow has a mapping before the agent goes.
    wait_until("the conversation's mapping", WAIT, || {
        Ok(weft_bpf_nat(&lab, 1)
            .iter()
            .any(|r| r["outside"] == format!("{EXTERNAL_HOST}:9200")))
    })
    .unwrap();
    lab.stop_agent(1);
    lab.start_agent(1).expect("the agent comes back");
    let exchanged = conversation
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(exchanged, 60);
    drop(tcp);
}

/// A Service whose endpoint is outside the cluster: translated once. As kube-proxy runs by
/// default (clients in the cluster CIDR not marked), the DNATed packet is pod traffic
/// leaving the cluster and BPF NAT translates it; with `--masquerade-all`, kube-proxy marks
/// it 0x4000 and masquerades it itself, and the programs leave it alone.
fn a_service_with_an_outside_endpoint_is_masqueraded_once(mode: ProxyMode) {
    let mut lab = nat_lab(Backend::Vxlan, &[]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let pod = &pods[0];
    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 9300);
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    let service = Service::cluster_ip("outside", cluster_ip, 80, Protocol::Tcp).endpoint(
        EXTERNAL_HOST,
        0,
        9300,
    );
    let through_service = |lab: &Lab| {
        let before = lab.bpf_counters(1).unwrap();
        let reply = call(
            &pod.ns,
            SocketAddrV4::new(cluster_ip, 80),
            Protocol::Tcp,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("pod → Service → outside: {e:#}\n{}", lab.diagnostics()));
        assert_eq!(*reply.seen_by_server.ip(), lab.node_ip(1), "{reply:?}");
        (reply, lab.bpf_counters(1).unwrap().since(&before))
    };

    lab.install_kube_proxy(mode, std::slice::from_ref(&service))
        .unwrap();
    let (reply, grew) = through_service(&lab);
    assert!(
        NAT_PORTS.contains(&reply.seen_by_server.port()),
        "{reply:?}"
    );
    assert_eq!(grew.get(Counter::NatAlloc), 1, "{grew:?}");

    let all = Service {
        masquerade_all: true,
        ..service
    };
    lab.install_kube_proxy(mode, &[all]).unwrap();
    let (reply, grew) = through_service(&lab);
    assert_eq!(
        (grew.get(Counter::NatAlloc), grew.get(Counter::NatOut)),
        (0, 0),
        "kube-proxy's masquerade had it: {reply:?} {grew:?}"
    );
    drop(tcp);
}

#[test]
fn a_service_with_an_outside_endpoint_is_masqueraded_once_iptables_proxy() {
    a_service_with_an_outside_endpoint_is_masqueraded_once(ProxyMode::Iptables);
}

#[test]
fn a_service_with_an_outside_endpoint_is_masqueraded_once_nftables_proxy() {
    a_service_with_an_outside_endpoint_is_masqueraded_once(ProxyMode::Nftables);
}

/// A UDP datagram to a closed port outside: the port-unreachable answer, sent to the
/// node's address, is translated back and the pod's connected socket hears "refused".
#[test]
fn port_unreachable_reaches_the_pods_socket() {
    let mut lab = nat_lab(Backend::Vxlan, &[]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let before = lab.bpf_counters(1).unwrap();
    // One datagram, one answer: the host rate-limits its ICMP errors.
    let heard = weft_tests::icmp::in_netns(&pods[0].ns, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(SocketAddrV4::new(EXTERNAL_HOST, 9400))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send(b"anyone?")?;
        let mut buf = [0u8; 16];
        Ok(socket.recv(&mut buf).map(drop))
    })
    .unwrap();
    let err = heard.expect_err("nothing listens on 9400");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    assert!(grew.get(Counter::NatIn) >= 1, "{grew:?}");
}

/// The node's own sockets keep their ports: a port a node socket holds toward the
/// destination is never given to a pod's flow, and replies to a node connection on a port
/// a pod's mapping also names go to the node.
#[test]
fn ports_the_nodes_sockets_hold_are_left_to_them() {
    let mut lab = nat_lab(Backend::Vxlan, &["--masquerade-ports=61000-61003"]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let udp = server(&lab, Protocol::Udp, EXTERNAL_HOST, 9500);
    let dst = udp.addr;
    // Node sockets on three of the four NAT ports, connected to the destination.
    let held: Vec<std::net::UdpSocket> = weft_tests::icmp::in_netns(lab.node_ns(1), move || {
        (61000..61003)
            .map(|port| {
                let socket = std::net::UdpSocket::bind(("0.0.0.0", port))?;
                socket.connect(dst)?;
                Ok(socket)
            })
            .collect()
    })
    .unwrap();
    let reply = call(&pods[0].ns, dst, Protocol::Udp, WAIT).unwrap();
    assert_eq!(
        reply.seen_by_server,
        SocketAddrV4::new(lab.node_ip(1), 61003),
        "the pod got a port a node socket holds"
    );
    // Each node socket still gets its own answers.
    for socket in &held {
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket.send(b"node\n").unwrap();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).expect("the node socket's answer");
        let port = socket.local_addr().unwrap().port();
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]).trim(),
            format!("seen {}:{port}", lab.node_ip(1))
        );
    }
    drop(held);
    // A node connection made later on the pod's port: its answers are the node's.
    let node = weft_tests::echo::call_from_port(lab.node_ns(1), 61003, dst, Protocol::Udp, WAIT)
        .expect("the node's socket on the pod's NAT port gets its answer");
    assert_eq!(node.seen_by_server.port(), 61003);
}

/// `--masquerade-fast-path`: after a flow's first packets crossed the stack, its later
/// packets are translated at the pod's veth and its replies delivered straight into the
/// pod; a Service to an outside endpoint (DNATed by the stack) keeps taking the stack.
#[test]
fn with_the_fast_path_a_flows_later_packets_skip_the_stack() {
    let mut lab = nat_lab(Backend::Vxlan, &["--masquerade-fast-path"]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let pod = &pods[0];
    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 9600);
    let before = lab.bpf_counters(1).unwrap();
    let exchanged = weft_tests::echo::converse(
        &pod.ns,
        tcp.addr,
        40,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    assert_eq!(exchanged, 40);
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    assert!(
        grew.get(Counter::NatFastOut) >= 30 && grew.get(Counter::NatFastIn) >= 30,
        "the conversation skipped the stack: {grew:?}"
    );
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let udp = server(&lab, Protocol::Udp, EXTERNAL_HOST, 9601);
        let dst = if protocol == Protocol::Tcp {
            tcp.addr
        } else {
            udp.addr
        };
        let reply = call(&pod.ns, dst, protocol, WAIT).unwrap();
        assert_eq!(*reply.seen_by_server.ip(), lab.node_ip(1));
    }
    assert!(lab.ping(pod, EXTERNAL_HOST));
    // Through a Service: answered (the stack un-DNATs the replies), never fast.
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 11);
    let service = Service::cluster_ip("outside", cluster_ip, 80, Protocol::Tcp).endpoint(
        EXTERNAL_HOST,
        0,
        9600,
    );
    lab.install_kube_proxy(ProxyMode::Iptables, &[service])
        .unwrap();
    let before = lab.bpf_counters(1).unwrap();
    let exchanged = weft_tests::echo::converse(
        &pod.ns,
        SocketAddrV4::new(cluster_ip, 80),
        20,
        Duration::ZERO,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("pod → Service → outside with the fast path: {e:#}"));
    assert_eq!(exchanged, 20);
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    assert_eq!(
        (grew.get(Counter::NatFastOut), grew.get(Counter::NatFastIn)),
        (0, 0),
        "{grew:?}"
    );
    assert!(grew.get(Counter::NatOut) >= 20, "{grew:?}");
}

/// A flow on the NAT fast path when the agent dies: after `--bpf-stale-after` (60 s) its
/// packets go back through the node's stack, which had seen only its first packets; with
/// kube-proxy's rules (which drop conntrack-invalid packets) the conversation goes on,
/// every line answered, through the same NAT port.
#[test]
fn a_fast_path_flow_survives_the_agent_going_away() {
    let mut lab = nat_lab(Backend::Vxlan, &["--masquerade-fast-path"]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    // kube-proxy's rules: KUBE-FORWARD drops what conntrack judges invalid.
    let service = Service::cluster_ip("unrelated", Ipv4Addr::new(10, 96, 0, 12), 80, Protocol::Tcp)
        .endpoint(pods[1].ip, 2, 80);
    lab.install_kube_proxy(ProxyMode::Iptables, &[service])
        .unwrap();
    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 9700);
    let (ns, dst) = (pods[0].ns.clone(), tcp.addr);
    // 75 s of conversation, a line every 500 ms.
    let conversation = std::thread::spawn(move || {
        weft_tests::echo::converse(
            &ns,
            dst,
            150,
            Duration::from_millis(500),
            Duration::from_secs(100),
        )
    });
    wait_until("the conversation on the fast path", WAIT, || {
        Ok(lab.bpf_counters(1)?.get(Counter::NatFastOut) > 0)
    })
    .unwrap();
    lab.kill_agent(1);
    let exchanged = conversation
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(exchanged, 150);
    let counters = lab.bpf_counters(1).unwrap();
    assert!(
        counters.get(Counter::AgentGone) > 0,
        "the fallback never came: {counters}"
    );
}

/// A vxlan lab with NAT ports `ports` and two pods on node 1, learned and ready.
fn two_pods_on_node_1(ports: &str, extra: &[&str]) -> (Lab, Pod, Pod) {
    let mut args = vec![format!("--masquerade-ports={ports}")];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut lab = nat_lab(Backend::Vxlan, &args);
    let a = lab.add_pod(1).unwrap();
    let b = lab.add_pod(1).unwrap();
    let c = lab.add_pod(2).unwrap();
    ready(&lab, &[a.clone(), b.clone(), c]);
    (lab, a, b)
}

/// A pod that reuses its source port for a new connection to the same destination (as
/// clients with `tcp_tw_reuse` do under load) starts a new flow on the old, closed mapping:
/// its NAT port is its own again, not free for another pod's flow to take over.
fn a_reused_source_port_keeps_its_nat_port(extra: &[&str]) {
    let (lab, a, b) = two_pods_on_node_1("61000-61000", extra);
    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 9700);
    let nat_port = SocketAddrV4::new(lab.node_ip(1), 61000);
    let mut first = HeldConnection::open(&a.ns, 40000, tcp.addr, WAIT).unwrap();
    assert_eq!(first.request().unwrap().seen_by_server, nat_port);
    first.reset().unwrap();
    // A port whose flow was reset may serve another flow 200 ms later: wait until the
    // mapping shows it closed and idle past that.
    let pod = format!("{}:40000", a.ip);
    wait_until("the reset flow's port free to take over", WAIT, || {
        Ok(weft_bpf_nat(&lab, 1).iter().any(|r| {
            r["pod"] == pod.as_str()
                && r["state"] == "closing"
                && r["idle_secs"].as_f64().is_some_and(|idle| idle > 0.25)
        }))
    })
    .unwrap();
    let mut again = HeldConnection::open(&a.ns, 40000, tcp.addr, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    assert_eq!(again.request().unwrap().seen_by_server, nat_port);
    // Another pod's new flow finds the only NAT port held by a live flow.
    let before = lab.bpf_counters(1).unwrap();
    if let Ok(reply) = call(&b.ns, tcp.addr, Protocol::Tcp, Duration::from_secs(2)) {
        panic!("another pod's flow took the NAT port of a live flow: {reply:?}");
    }
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    assert!(grew.get(Counter::NatAllocFailed) >= 1, "{grew:?}");
    // The reused port's flow keeps its mapping and its answers.
    for _ in 0..3 {
        let reply = again
            .request()
            .unwrap_or_else(|e| panic!("the reused port's flow: {e:#}"));
        assert_eq!(reply.seen_by_server, nat_port);
    }
}

#[test]
fn a_reused_source_port_keeps_its_nat_port_at_the_uplink() {
    a_reused_source_port_keeps_its_nat_port(&[]);
}

#[test]
fn a_reused_source_port_keeps_its_nat_port_on_the_fast_path() {
    a_reused_source_port_keeps_its_nat_port(&["--masquerade-fast-path"]);
}

/// A storm of short connections from two pods, reusing their source ports (`tcp_tw_reuse`)
/// over a small NAT port range, so that ports change hands between flows many times a
/// second on both CPUs: every connection is answered. (Before ports were claimed, two CPUs
/// could hand one port to two flows at once: the bench lost a few connections a run.)
fn a_connection_storm_loses_no_connection(extra: &[&str]) {
    let (lab, a, b) = two_pods_on_node_1("61000-62023", extra);
    let server =
        ConnServer::start(lab.fabric_ns(), SocketAddrV4::new(EXTERNAL_HOST, 9800), 4).unwrap();
    let before = lab.bpf_counters(1).unwrap();
    let rates: Vec<ConnRate> = std::thread::scope(|s| {
        let loads: Vec<_> = [&a, &b]
            .into_iter()
            .map(|pod| {
                Cmd::new(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
                    .netns(&pod.ns)
                    .run()
                    .unwrap();
                let (ns, addr) = (pod.ns.clone(), server.addr);
                s.spawn(move || connection_rate(&ns, addr, 4, 2))
            })
            .collect();
        loads
            .into_iter()
            .map(|l| l.join().unwrap().unwrap())
            .collect()
    });
    let grew = lab.bpf_counters(1).unwrap().since(&before);
    let completed: u64 = rates.iter().map(|r| r.completed).sum();
    assert!(
        rates.iter().all(|r| r.failed == 0),
        "connections failed: {rates:?}\n{grew:?}"
    );
    // Far more connections than ports: ports went from flow to flow.
    assert!(completed > 3 * 1024, "{rates:?}");
    assert!(grew.get(Counter::NatOut) > 0, "{grew:?}");
}

#[test]
fn a_connection_storm_loses_no_connection_at_the_uplink() {
    a_connection_storm_loses_no_connection(&[]);
}

#[test]
fn a_connection_storm_loses_no_connection_on_the_fast_path() {
    a_connection_storm_loses_no_connection(&["--masquerade-fast-path"]);
}

/// A 1-node lab with `--ip-masq` on `dataplane`, a pod that has reached the outside (so
/// it is learned), and a UDP resolver on the external host's port 53.
fn masquerading_node(backend: Backend, dataplane: Dataplane) -> (Lab, Pod, EchoServer) {
    let mut lab = Lab::start(LabConfig {
        nodes: 1,
        backend,
        ip_masq: true,
        dataplane,
        ..Default::default()
    })
    .expect("lab starts");
    let pod = lab.add_pod(1).expect("a pod");
    wait_until("the pod reaches the outside", WAIT, || {
        Ok(lab.ping(&pod, EXTERNAL_HOST))
    })
    .unwrap();
    let resolver = server(&lab, Protocol::Udp, EXTERNAL_HOST, 53);
    (lab, pod, resolver)
}

/// The default, as users run it (`--ip-masq`, `--dataplane=auto`, `--masquerade auto`): the
/// kernel's masquerade, next to the BPF dataplane. A DNS-like load (a new UDP flow per
/// query to one resolver outside the cluster, 1,000 a second for 8 s: more flows than BPF
/// source NAT has ports toward one destination) is answered in full, every query leaving
/// with the node's address, and the BPF programs translated none of it.
fn the_default_masquerade_answers_a_dns_like_load(backend: Backend, dataplane: Dataplane) {
    let (lab, pod, _resolver) = masquerading_node(backend, dataplane);
    let bpf = dataplane != Dataplane::Kernel;
    if bpf {
        lab.wait_bpf_synced(1, WAIT)
            .expect("the BPF dataplane runs under auto");
    }
    let before = bpf.then(|| lab.bpf_counters(1).unwrap());
    let load = dns_like_load(&pod.ns, SocketAddrV4::new(EXTERNAL_HOST, 53), 1_000, 8)
        .expect("the load runs");
    let grew = before.map(|b| lab.bpf_counters(1).unwrap().since(&b));
    eprintln!(
        "{} queries at {:.0}/s, {:.2}% answered; BPF counters: {grew:?}",
        load.sent,
        load.per_second,
        load.answered_percent()
    );
    assert_eq!(load.sent, 8_000);
    assert_eq!(load.answered, load.sent, "every query is answered");
    assert!(
        load.per_second >= 900.0,
        "the load ran at {:.0}/s",
        load.per_second
    );
    assert_eq!(
        load.seen,
        [lab.node_ip(1)].into_iter().collect(),
        "the resolver saw only the node's address"
    );
    if let Some(grew) = grew {
        assert_eq!(
            grew.get(Counter::NatOut) + grew.get(Counter::NatAlloc),
            0,
            "auto must not pick BPF source NAT: {grew}"
        );
    }
}

/// The default next to kube-proxy's own masquerade (`--random-fully`, ports from all of
/// 1024-65535) toward the same destination: a pod's DNS-like load to the resolver outside,
/// and at the same time a client on the underlay asking the same resolver through a
/// NodePort Service (externalTrafficPolicy Cluster, so kube-proxy masquerades it to the
/// node's address). Both translations share the node's address and the resolver's port;
/// one conntrack table keeps their ports apart, so every query of both is answered.
fn the_default_masquerade_shares_a_destination_with_kube_proxys(mode: ProxyMode, backend: Backend) {
    let (lab, pod, _resolver) = masquerading_node(backend, Dataplane::Auto);
    let node_port = 30053;
    let service = Service::cluster_ip("resolver", Ipv4Addr::new(10, 96, 0, 53), 53, Protocol::Udp)
        .node_port(node_port, TrafficPolicy::Cluster)
        .endpoint(EXTERNAL_HOST, 0, 53);
    lab.install_kube_proxy(mode, &[service]).unwrap();
    let resolver = SocketAddrV4::new(EXTERNAL_HOST, 53);
    let via_node_port = SocketAddrV4::new(lab.node_ip(1), node_port);
    let (from_pod, from_underlay) = std::thread::scope(|scope| {
        let underlay = scope.spawn(|| dns_like_load(lab.fabric_ns(), via_node_port, 500, 6));
        let pod = dns_like_load(&pod.ns, resolver, 1_000, 6);
        (pod, underlay.join().expect("the underlay client"))
    });
    let (from_pod, from_underlay) = (from_pod.unwrap(), from_underlay.unwrap());
    eprintln!(
        "pod: {}/{} answered; underlay via NodePort: {}/{} answered",
        from_pod.answered, from_pod.sent, from_underlay.answered, from_underlay.sent
    );
    assert_eq!(from_pod.answered, from_pod.sent, "the pod's queries");
    assert_eq!(
        from_underlay.answered, from_underlay.sent,
        "the NodePort client's queries"
    );
    let node = [lab.node_ip(1)].into_iter().collect();
    assert_eq!(from_pod.seen, node, "the resolver saw the pod as the node");
    assert_eq!(
        from_underlay.seen, node,
        "kube-proxy masqueraded the NodePort client"
    );
}

#[test]
fn the_default_masquerade_shares_a_destination_with_kube_proxys_iptables_rules_on_vxlan() {
    the_default_masquerade_shares_a_destination_with_kube_proxys(
        ProxyMode::Iptables,
        Backend::Vxlan,
    );
}

#[test]
fn the_default_masquerade_shares_a_destination_with_kube_proxys_nftables_rules_on_host_gw() {
    the_default_masquerade_shares_a_destination_with_kube_proxys(
        ProxyMode::Nftables,
        Backend::HostGw,
    );
}

#[test]
fn the_default_masquerade_answers_a_dns_like_load_on_vxlan() {
    the_default_masquerade_answers_a_dns_like_load(Backend::Vxlan, Dataplane::Auto);
}

#[test]
fn the_default_masquerade_answers_a_dns_like_load_on_host_gw() {
    the_default_masquerade_answers_a_dns_like_load(Backend::HostGw, Dataplane::Auto);
}

/// The same load on the kernel path (flannel's), side by side.
#[test]
fn the_kernel_path_answers_the_same_dns_like_load() {
    the_default_masquerade_answers_a_dns_like_load(Backend::Vxlan, Dataplane::Kernel);
}

/// BPF source NAT switched off (the agent restarted without `--masquerade=bpf`, as an
/// upgrade to the new default does) while a pod's connection to the outside holds a
/// mapping: the node's conntrack made that connection's entry without NAT, so the programs
/// keep translating it until it ends (drain); new flows take the kernel's masquerade. A
/// capture on the fabric sees no pod source all along.
fn switching_bpf_nat_off_drains_live_flows_and_leaks_nothing(backend: Backend) {
    let mut lab = nat_lab(backend, &[]);
    let pods = lab.add_pods(1).unwrap();
    ready(&lab, &pods);
    let pod = &pods[0];
    let leaks = leak_capture(&lab);
    let tcp = server(&lab, Protocol::Tcp, EXTERNAL_HOST, 9300);
    let mut held = HeldConnection::open(&pod.ns, 0, tcp.addr, WAIT).expect("a connection out");
    let first = held.request().expect("answered through BPF NAT");
    assert_eq!(*first.seen_by_server.ip(), lab.node_ip(pod.node));
    assert!(
        NAT_PORTS.contains(&first.seen_by_server.port()),
        "{first:?}"
    );

    lab.restart_agent_with(pod.node, |args| args.retain(|a| a != "--masquerade=bpf"))
        .expect("the agent restarts with the default masquerade");
    assert!(
        lab.agent_log_tail(pod.node, 200)
            .contains("flows of an earlier run hold BPF mappings"),
        "{}",
        lab.agent_log_tail(pod.node, 40)
    );
    let before = lab.bpf_counters(pod.node).unwrap();
    let again = held
        .request()
        .expect("the live connection is still answered");
    assert_eq!(
        again.seen_by_server, first.seen_by_server,
        "the same translation"
    );
    let fresh = call(&pod.ns, tcp.addr, Protocol::Tcp, WAIT).expect("a new connection out");
    assert_eq!(*fresh.seen_by_server.ip(), lab.node_ip(pod.node));
    let grew = lab.bpf_counters(pod.node).unwrap().since(&before);
    assert_eq!(
        grew.get(Counter::NatAlloc),
        0,
        "a new flow got a BPF mapping after BPF NAT was switched off: {grew}"
    );
    assert!(
        grew.get(Counter::NatOut) > 0,
        "the live flow was not translated: {grew}"
    );
    assert_no_leak(leaks);
}

#[test]
fn switching_bpf_nat_off_drains_live_flows_and_leaks_nothing_on_vxlan() {
    switching_bpf_nat_off_drains_live_flows_and_leaks_nothing(Backend::Vxlan);
}

#[test]
fn switching_bpf_nat_off_drains_live_flows_and_leaks_nothing_on_host_gw() {
    switching_bpf_nat_off_drains_live_flows_and_leaks_nothing(Backend::HostGw);
}
