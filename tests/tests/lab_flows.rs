//! The fast path's record of the connections the node's stack carries (`stack_flows`)
//! under load: it must hold every live translated connection as the kernel's conntrack
//! does, whatever floods it. On the Kubernetes node of `weft_tests::workload` (kube-proxy's
//! iptables rules, portmap), with node 1's table made small so that a burst fills it.

use std::net::SocketAddrV4;
use std::time::Duration;

use weft_common::Counter;
use weft_tests::echo::{udp_queries, HeldConnection};
use weft_tests::exec::{run_in, wait_until};
use weft_tests::kube_proxy::ProxyMode;
use weft_tests::lab::EXTERNAL_HOST;
use weft_tests::workload::{
    SecondNode, Workload, DNS_PORT, EXTERNAL_PORT, HOST_PORT, HTTP_PORT, SVC_DNS, SVC_REMOTE,
};
use weft_tests::{Backend, Dataplane, Lab, LabConfig};

const CONVERGENCE: Duration = Duration::from_secs(15);
const BPF_SYNC: Duration = Duration::from_secs(20);
/// Node 1's `stack_flows` capacity in these tests.
const TABLE: u16 = 64;

fn lab(backend: Backend, dataplane: Dataplane) -> Lab {
    let mut config = LabConfig {
        nodes: 2,
        backend,
        dataplane,
        ..Default::default()
    };
    config.node_agent_args.insert(
        1,
        vec![
            "--ip-masq".to_string(),
            format!("--bpf-stack-flows-size={TABLE}"),
        ],
    );
    Lab::start(config).expect("the lab starts")
}

/// A pod on node 1 sends a burst of DNS-like queries through a Service, each from a new
/// source port (a new DNATed connection each), eight times what node 1's `stack_flows`
/// holds; every one is answered. Meanwhile another pod holds a TCP connection through another Service to a pod on
/// node 2. The held connection is still answered after the burst (its entry was never
/// evicted: its replies still meet the stack that un-DNATs them), the flooding pod's
/// traffic takes the kernel path and crosses, and once conntrack has forgotten the burst
/// the pod rides the fast path again.
fn a_flood_of_new_flows_keeps_established_translated_connections(
    backend: Backend,
    dataplane: Dataplane,
) {
    let bpf = dataplane == Dataplane::Bpf;
    let mut lab = lab(backend, dataplane);
    // The burst's (and the pings') conntrack entries expire in seconds (default 30 s).
    for sysctl in [
        "net.netfilter.nf_conntrack_udp_timeout=2",
        "net.netfilter.nf_conntrack_udp_timeout_stream=2",
        "net.netfilter.nf_conntrack_icmp_timeout=2",
    ] {
        run_in(lab.node_ns(1), &["sysctl", "-qw", sysctl]).expect("conntrack's UDP timeouts");
    }
    let workload = Workload::deploy(&mut lab, SecondNode::Weft, ProxyMode::Iptables)
        .expect("the workload deploys");
    let flooder = lab.add_pod(1).expect("the flooding pod");
    let pods = [
        &workload.client,
        &workload.web1,
        &workload.web2,
        &workload.client2,
        &flooder,
    ]
    .map(|p| p.clone());
    lab.assert_all_pairs_ping(&pods, "the workload's pods", CONVERGENCE);
    if bpf {
        lab.wait_bpf_synced(1, BPF_SYNC)
            .expect("node 1's BPF dataplane is complete");
    }

    let hold = |ns: &str, to: SocketAddrV4, what: &str| {
        let mut held = HeldConnection::open(ns, 0, to, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let first = held.request().unwrap_or_else(|e| panic!("{what}: {e:#}"));
        (held, first, what.to_string())
    };
    let mut held = [
        hold(
            &workload.client.ns,
            SocketAddrV4::new(SVC_REMOTE, HTTP_PORT),
            "through a Service to node 2 (DNAT)",
        ),
        hold(
            &workload.client2.ns,
            SocketAddrV4::new(lab.node_ip(1), HOST_PORT),
            "from node 2 to node 1's hostPort (portmap)",
        ),
        hold(
            &workload.client.ns,
            SocketAddrV4::new(EXTERNAL_HOST, EXTERNAL_PORT),
            "to the outside (masquerade)",
        ),
    ];
    let mut ask_all = |when: &str| {
        for (connection, first, what) in held.iter_mut() {
            let reply = connection
                .request()
                .unwrap_or_else(|e| panic!("the connection {what} {when}: {e:#}"));
            assert_eq!(reply.local, first.local, "{what}: the same connection");
            assert_eq!(
                reply.seen_by_server, first.seen_by_server,
                "{what}: the same translation"
            );
        }
    };

    let before = bpf.then(|| lab.bpf_counters(1).unwrap());
    let queries = 8 * TABLE;
    let answered = udp_queries(
        &flooder.ns,
        SocketAddrV4::new(SVC_DNS, DNS_PORT),
        20_000..20_000 + queries,
    )
    .expect("the burst is sent");
    // Queries past the table's room are answered too: their pod took the kernel path.
    assert_eq!(answered, usize::from(queries), "queries answered");
    let Some(before) = before else {
        // The kernel path, side by side: the same connections are answered.
        ask_all("after the flood");
        assert!(lab.ping(&flooder, workload.web2.ip));
        return;
    };
    wait_until(
        "node 1's stack_flows to overflow",
        Duration::from_secs(10),
        || {
            Ok(lab
                .bpf_counters(1)?
                .since(&before)
                .get(Counter::FlowTableFull)
                > 0)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));

    ask_all("after the flood");
    assert!(
        lab.ping(&flooder, workload.web2.ip),
        "the flooding pod's traffic crosses on the kernel path"
    );
    let during = lab.bpf_counters(1).unwrap().since(&before);
    assert!(
        during.get(Counter::PodOnStack) > 0,
        "the flooding pod was not put on the kernel path: {during}"
    );
    assert!(
        during.get(Counter::StackFlow) > 0,
        "the translated replies did not take the stack: {during}"
    );
    assert_eq!(during.drops(), 0, "drops: {during}");

    // Conntrack forgets the burst within seconds; the agent's keeper (every 10 s) then
    // records the pod's remaining connections and gives it back to the fast path.
    wait_until(
        "node 1's agent to give the flooding pod back to the fast path",
        Duration::from_secs(60),
        || {
            Ok(lab
                .agent_log_tail(1, 100_000)
                .contains("every connection of the pod is recorded again"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));
    let before = lab.bpf_counters(1).unwrap();
    assert!(lab.ping(&flooder, workload.web2.ip));
    let after = lab.bpf_counters(1).unwrap().since(&before);
    assert!(
        after.get(Counter::PodOnStack) == 0
            && after.get(Counter::Encap) + after.get(Counter::DirectOut) > 0,
        "the released pod's ping did not take the fast path: {after}"
    );
    ask_all("after the pod's release");
}

#[test]
fn a_flood_of_new_flows_keeps_established_translated_connections_on_vxlan() {
    a_flood_of_new_flows_keeps_established_translated_connections(Backend::Vxlan, Dataplane::Bpf);
}

#[test]
fn a_flood_of_new_flows_keeps_established_translated_connections_on_host_gw() {
    a_flood_of_new_flows_keeps_established_translated_connections(Backend::HostGw, Dataplane::Bpf);
}

/// The same flood on the kernel path (flannel's), side by side.
#[test]
fn a_flood_of_new_flows_keeps_established_translated_connections_on_the_kernel_path() {
    a_flood_of_new_flows_keeps_established_translated_connections(
        Backend::Vxlan,
        Dataplane::Kernel,
    );
}
