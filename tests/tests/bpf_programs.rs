//! weft's datapath programs (`from_pod`, `from_netdev`, `to_pod`, `to_netdev`) run on
//! crafted frames with BPF_PROG_TEST_RUN, checked byte by byte.
//!
//! Each test loads the object built by `cargo xtask build-ebpf` into a fresh
//! bpffs, fills the maps as the agent would, and runs the programs from a
//! thread inside a network namespace of its own: the programs' FIB lookups
//! see that namespace's uplink `up0` (198.18.0.11/24), its permanent
//! neighbour entry for the peer 198.18.0.12 and its routes, so they answer
//! the same way every run.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, PerCpuArray,
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use weft_common::{
    Counter, DataplaneConfig, EndpointEntry, EndpointKey, FlowEntry, FlowKey, LeaseEntry,
    PeerEntry, PeerKey, ALL_MAPS, ALL_PROGRAMS, CONFIG_FAST_PATH_OFF, CONFIG_LEASES_INCOMPLETE,
    FAST_PATH_MARK, LEASE_DIRECT, LEASE_VXLAN, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS, MAP_LEASES,
    MAP_PEERS, MAP_STACK_FLOWS, PROG_FROM_NETDEV, PROG_FROM_POD, PROG_TO_NETDEV, PROG_TO_POD,
    RECORDED_TO_NETDEV, RECORDED_TO_POD, VXLAN_OVERHEAD,
};
use weft_tests::bpf::TempBpffs;
use weft_tests::{
    exec::{ip, Cmd},
    icmp, netns,
};

// TC verdicts (linux/pkt_cls.h).
/// TC_ACT_UNSPEC (-1): "not mine", later filters on the hook run, then the stack.
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

// The node under test and its uplink.
const UPLINK: &str = "up0";
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const NODE_IP: [u8; 4] = [198, 18, 0, 11];
const OWN_VTEP_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x11];
const VNI: u32 = 1;
const VXLAN_PORT: u16 = 8472;
const INNER_MTU: u32 = 1450;

// Peers: one with a permanent neighbour entry, one on-link but unresolved,
// one without any route, and a host that holds no lease.
const PEER_IP: [u8; 4] = [198, 18, 0, 12];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const PEER_VTEP_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x12];
const UNRESOLVED_PEER_IP: [u8; 4] = [198, 18, 0, 13];
const UNROUTABLE_PEER_IP: [u8; 4] = [198, 51, 100, 99];
const STRANGER_IP: [u8; 4] = [198, 18, 0, 99];

// Remote leases, one per way of reaching them.
const VXLAN_POD: [u8; 4] = [10, 244, 2, 7];
const DIRECT_POD: [u8; 4] = [10, 244, 3, 7];
const UNRESOLVED_VXLAN_POD: [u8; 4] = [10, 244, 4, 7];
const UNRESOLVED_DIRECT_POD: [u8; 4] = [10, 244, 5, 7];
const UNROUTABLE_POD: [u8; 4] = [10, 244, 6, 7];
const UNLEASED_POD: [u8; 4] = [10, 244, 9, 7];

// The local pod, as the CNI plugin wired it.
const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
const OTHER_LOCAL_IP: [u8; 4] = [10, 244, 1, 99];
const LOCAL_POD_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];
const LOCAL_POD_HOST_MAC: [u8; 6] = [0x0a, 0x58, 0xee, 0xee, 0xee, 0x05];
const GATEWAY_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 1];
/// The pod's host-side veth in the test bed: from_pod runs as if on its ingress.
const POD_VETH: &str = "pod0";

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Outer UDP source ports: the kernel's default ephemeral range.
const SPORT_RANGE: std::ops::RangeInclusive<u16> = 32768..=60999;

// ---------------------------------------------------------------------------
// from_pod

#[test]
fn vxlan_lease_is_encapsulated_as_flannel_does() -> Result<()> {
    with_datapath(|dp| {
        let frame = pod_frame(VXLAN_POD, 64, 100);
        let out = dp.run(PROG_FROM_POD, &frame)?;
        ensure!(out.action == TC_ACT_REDIRECT, "action {}", out.action);
        check_encap(&frame, &out.frame, PEER_IP, PEER_MAC, UPLINK_MAC)?;
        ensure!(dp.counter(Counter::Encap)? == 1, "Encap counter");

        // One flow, one outer source port: a flow stays on one underlay path.
        let again = dp.run(PROG_FROM_POD, &frame)?;
        ensure!(
            again.frame[34..36] == out.frame[34..36],
            "the outer source port changed between two packets of one flow"
        );
        Ok(())
    })
}

#[test]
fn vxlan_to_unresolved_neighbour_lets_the_kernel_resolve_it() -> Result<()> {
    with_datapath(|dp| {
        let frame = pod_frame(UNRESOLVED_VXLAN_POD, 64, 100);
        let out = dp.run(PROG_FROM_POD, &frame)?;
        ensure!(out.action == TC_ACT_REDIRECT, "action {}", out.action);
        // bpf_redirect_neigh fills in the outer MACs after ARP.
        check_encap(&frame, &out.frame, UNRESOLVED_PEER_IP, [0; 6], [0; 6])?;
        ensure!(dp.counter(Counter::Encap)? == 1, "Encap counter");
        Ok(())
    })
}

#[test]
fn gso_packet_the_kernel_cannot_resize_is_passed_unchanged() -> Result<()> {
    with_datapath(|dp| {
        // A superpacket bigger than the tunnel MTU gets past the MTU check
        // (GSO segments it later) to bpf_skb_adjust_room. BPF_PROG_TEST_RUN
        // cannot set a gso_type, and the kernel refuses to grow GSO packets
        // that are neither TCP nor UDP_L4: the program must leave such a
        // packet to the kernel unchanged rather than drop it.
        let frame = pod_frame(VXLAN_POD, 64, 2000);
        let out = dp.run_gso(PROG_FROM_POD, &frame, 1400)?;
        ensure!(out.action == TC_ACT_UNSPEC, "action {}", out.action);
        ensure!(out.frame == frame, "the refused packet was changed");
        ensure!(dp.counter(Counter::Passed)? == 1, "Passed counter");
        ensure!(
            dp.counter(Counter::DropHelperFailed)? == 0,
            "DropHelperFailed counter"
        );
        Ok(())
    })
}

#[test]
fn largest_packet_the_tunnel_carries_is_encapsulated() -> Result<()> {
    with_datapath(|dp| {
        let frame = pod_frame_of_ip_len(VXLAN_POD, 64, INNER_MTU as usize);
        let out = dp.run(PROG_FROM_POD, &frame)?;
        ensure!(out.action == TC_ACT_REDIRECT, "action {}", out.action);
        check_encap(&frame, &out.frame, PEER_IP, PEER_MAC, UPLINK_MAC)?;
        ensure!(
            out.frame.len() == 14 + 1500,
            "the encapsulated frame must fit the uplink MTU, is {} bytes",
            out.frame.len()
        );
        Ok(())
    })
}

#[test]
fn direct_lease_is_routed_with_the_fib_neighbour() -> Result<()> {
    with_datapath(|dp| {
        let frame = pod_frame(DIRECT_POD, 64, 100);
        let out = dp.run(PROG_FROM_POD, &frame)?;
        ensure!(out.action == TC_ACT_REDIRECT, "action {}", out.action);
        check_routed(&frame, &out.frame, PEER_MAC, UPLINK_MAC)?;
        ensure!(dp.counter(Counter::DirectOut)? == 1, "DirectOut counter");
        Ok(())
    })
}

#[test]
fn direct_lease_via_unresolved_gateway_keeps_macs_for_the_kernel() -> Result<()> {
    with_datapath(|dp| {
        let frame = pod_frame(UNRESOLVED_DIRECT_POD, 64, 100);
        let out = dp.run(PROG_FROM_POD, &frame)?;
        ensure!(out.action == TC_ACT_REDIRECT, "action {}", out.action);
        // bpf_redirect_neigh replaces the Ethernet header once ARP resolves.
        check_routed(
            &frame,
            &out.frame,
            frame[0..6].try_into()?,
            frame[6..12].try_into()?,
        )?;
        ensure!(dp.counter(Counter::DirectOut)? == 1, "DirectOut counter");
        Ok(())
    })
}

#[test]
fn from_pod_passes_what_the_kernel_must_handle() -> Result<()> {
    with_datapath(|dp| {
        let mut oversize = pod_frame_of_ip_len(VXLAN_POD, 64, INNER_MTU as usize + 1);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("ARP", arp_frame()),
            ("IPv6", ipv6_frame()),
            (
                "IPv4 to an address without lease",
                pod_frame(UNLEASED_POD, 64, 100),
            ),
            ("IPv4 to the node", pod_frame(NODE_IP, 64, 100)),
            ("TTL 1 (time exceeded)", pod_frame(VXLAN_POD, 1, 100)),
            ("TTL 0", pod_frame(VXLAN_POD, 0, 100)),
            ("TTL 1 on a direct lease", pod_frame(DIRECT_POD, 1, 100)),
            (
                "non-GSO packet over the tunnel MTU (fragmentation needed)",
                std::mem::take(&mut oversize),
            ),
            (
                "lease whose node has no route",
                pod_frame(UNROUTABLE_POD, 64, 100),
            ),
            ("IHL 4", with_ihl(pod_frame(VXLAN_POD, 64, 100), 4)),
            ("IHL 0", with_ihl(pod_frame(VXLAN_POD, 64, 100), 0)),
            (
                "IHL 15, header past the end",
                with_ihl(pod_frame(VXLAN_POD, 64, 8), 15),
            ),
            (
                "IPv4 version 6",
                with_version(pod_frame(VXLAN_POD, 64, 100), 6),
            ),
            (
                "IP total length beyond the frame",
                with_total_len(pod_frame(VXLAN_POD, 64, 100), 200),
            ),
        ];
        check_passed(dp, PROG_FROM_POD, &cases)
    })
}

#[test]
fn a_pod_sending_from_another_address_takes_the_kernel_path() -> Result<()> {
    with_datapath(|dp| {
        let mut forged = pod_frame(VXLAN_POD, 64, 100);
        forged[26..30].copy_from_slice(&OTHER_LOCAL_IP);
        fix_ip_checksum(&mut forged);
        let mut another_pods = pod_frame(DIRECT_POD, 64, 100);
        another_pods[26..30].copy_from_slice(&[10, 244, 1, 6]);
        fix_ip_checksum(&mut another_pods);
        check_passed_as(
            dp,
            PROG_FROM_POD,
            Counter::SourceNotPod,
            &[
                ("a source that is no local pod", forged),
                ("another local pod's address", another_pods),
            ],
        )?;
        // The pod's own address on another veth is not the pod either.
        let frame = pod_frame(VXLAN_POD, 64, 100);
        let mut skb = [0u8; SKB_CTX_LEN];
        skb[SKB_IFINDEX_OFFSET..][..4].copy_from_slice(&1u32.to_ne_bytes());
        let out = dp.run_with_context(PROG_FROM_POD, &frame, Some(&skb))?;
        ensure!(
            out.action == TC_ACT_UNSPEC && out.frame == frame,
            "action {}",
            out.action
        );
        ensure!(
            dp.counter(Counter::SourceNotPod)? == 3,
            "SourceNotPod counter"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// from_netdev

#[test]
fn vxlan_from_a_peer_is_decapsulated_into_the_pod() -> Result<()> {
    with_datapath(|dp| {
        let inner = inner_ip(LOCAL_POD, 63);
        for (what, outer_options) in [("plain", &[][..]), ("outer IPv4 options", &[1, 1, 1, 0])] {
            let frame = vxlan_frame(PEER_IP, 0x08, VNI, &peer_inner_frame(&inner), outer_options);
            let out = dp.run(PROG_FROM_NETDEV, &frame)?;
            ensure!(
                out.action == TC_ACT_REDIRECT,
                "{what}: action {}",
                out.action
            );
            let expected = ethernet(LOCAL_POD_MAC, LOCAL_POD_HOST_MAC, ETH_P_IP, &inner);
            ensure!(
                out.frame == expected,
                "{what}: the decapsulated frame differs\n got  {:02x?}\n want {:02x?}",
                out.frame,
                expected
            );
        }
        // From the peer's own address (a reply its stack un-DNATed): also the peer's.
        let inner = ipv4(
            PEER_IP,
            LOCAL_POD,
            63,
            IPPROTO_UDP,
            &udp(8080, 40000, b"reply"),
        );
        let frame = vxlan_frame(PEER_IP, 0x08, VNI, &peer_inner_frame(&inner), &[]);
        let out = dp.run(PROG_FROM_NETDEV, &frame)?;
        ensure!(
            out.action == TC_ACT_REDIRECT,
            "from the peer's address: action {}",
            out.action
        );
        ensure!(dp.counter(Counter::Decap)? == 3, "Decap counter");
        Ok(())
    })
}

#[test]
fn vxlan_from_strangers_or_with_forged_inner_sources_is_dropped() -> Result<()> {
    with_datapath(|dp| {
        let inner = peer_inner_frame(&inner_ip(LOCAL_POD, 63));
        let cases = [
            (
                "from a host without lease",
                vxlan_frame(STRANGER_IP, 0x08, VNI, &inner, &[]),
                Counter::DropUnknownPeer,
            ),
            (
                "from a peer, inner source in another peer's lease",
                vxlan_frame(
                    PEER_IP,
                    0x08,
                    VNI,
                    &peer_inner_frame(&ipv4(
                        UNRESOLVED_VXLAN_POD,
                        LOCAL_POD,
                        64,
                        IPPROTO_UDP,
                        &udp(1, 2, b"x"),
                    )),
                    &[],
                ),
                Counter::DropSpoofedInner,
            ),
            (
                "from a peer, inner source in no lease",
                vxlan_frame(
                    PEER_IP,
                    0x08,
                    VNI,
                    &peer_inner_frame(&ipv4(
                        STRANGER_IP,
                        LOCAL_POD,
                        64,
                        IPPROTO_UDP,
                        &udp(1, 2, b"x"),
                    )),
                    &[],
                ),
                Counter::DropSpoofedInner,
            ),
            (
                "from a peer, inner source outside every lease, to the node itself",
                vxlan_frame(
                    PEER_IP,
                    0x08,
                    VNI,
                    &peer_inner_frame(&ipv4(
                        [192, 0, 2, 1],
                        OTHER_LOCAL_IP,
                        64,
                        IPPROTO_UDP,
                        &udp(1, 2, b"x"),
                    )),
                    &[],
                ),
                Counter::DropSpoofedInner,
            ),
            (
                "VXLAN header cut short",
                udp_to_node(PEER_IP, VXLAN_PORT, &[0x08, 0, 0, 0, 0, 0]),
                Counter::DropMalformed,
            ),
            (
                "inner Ethernet cut short",
                vxlan_frame(PEER_IP, 0x08, VNI, &inner[..10], &[]),
                Counter::DropMalformed,
            ),
            (
                "inner IPv4 header cut short",
                vxlan_frame(PEER_IP, 0x08, VNI, &inner[..14 + 12], &[]),
                Counter::DropMalformed,
            ),
        ];
        for (what, frame, reason) in cases {
            let before = dp.counter(reason)?;
            let out = dp.run(PROG_FROM_NETDEV, &frame)?;
            ensure!(
                out.action == TC_ACT_SHOT,
                "{what}: action {}, expected TC_ACT_SHOT",
                out.action
            );
            ensure!(
                dp.counter(reason)? == before + 1,
                "{what}: counter {} did not count the drop",
                reason.name()
            );
        }
        ensure!(
            dp.counter(Counter::Decap)? == 0,
            "nothing may be decapsulated"
        );
        Ok(())
    })
}

#[test]
fn routed_packet_for_a_local_pod_is_delivered_into_it() -> Result<()> {
    with_datapath(|dp| {
        for (what, ip) in [
            (
                "ICMP",
                ipv4(
                    DIRECT_POD,
                    LOCAL_POD,
                    63,
                    IPPROTO_ICMP,
                    &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
                ),
            ),
            (
                "UDP to another port",
                ipv4(
                    DIRECT_POD,
                    LOCAL_POD,
                    63,
                    IPPROTO_UDP,
                    &udp(40000, 5201, b"hi"),
                ),
            ),
        ] {
            let frame = ethernet(UPLINK_MAC, PEER_MAC, ETH_P_IP, &ip);
            let out = dp.run(PROG_FROM_NETDEV, &frame)?;
            ensure!(
                out.action == TC_ACT_REDIRECT,
                "{what}: action {}",
                out.action
            );
            check_routed(&frame, &out.frame, LOCAL_POD_MAC, LOCAL_POD_HOST_MAC)
                .with_context(|| what.to_string())?;
        }
        ensure!(dp.counter(Counter::DirectIn)? == 2, "DirectIn counter");
        Ok(())
    })
}

#[test]
fn from_netdev_passes_what_is_not_for_a_local_pod() -> Result<()> {
    with_datapath(|dp| {
        let to_other = peer_inner_frame(&inner_ip(OTHER_LOCAL_IP, 63));
        let inner_arp = ethernet(OWN_VTEP_MAC, PEER_VTEP_MAC, ETH_P_ARP, &[0; 28]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("ARP", arp_frame()),
            ("IPv6", ipv6_frame()),
            ("UDP to the node", udp_to_node(PEER_IP, 53, b"query")),
            (
                "VXLAN for an address without endpoint (the node's flannel.1)",
                vxlan_frame(PEER_IP, 0x08, VNI, &to_other, &[]),
            ),
            (
                "VXLAN carrying ARP",
                vxlan_frame(PEER_IP, 0x08, VNI, &inner_arp, &[]),
            ),
            (
                "routed packet for a local pod with TTL 1",
                ethernet(
                    UPLINK_MAC,
                    PEER_MAC,
                    ETH_P_IP,
                    &ipv4(VXLAN_POD, LOCAL_POD, 1, IPPROTO_UDP, &udp(1, 2, b"x")),
                ),
            ),
            (
                "IHL 4",
                with_ihl(vxlan_frame(PEER_IP, 0x08, VNI, &to_other, &[]), 4),
            ),
            // Replies to sources outside every lease leave through the stack (from_pod
            // passes them), so these must enter through it too: one path per connection.
            (
                "routed packet for a local pod from a node address (kubelet, NodePort SNAT)",
                ethernet(
                    UPLINK_MAC,
                    PEER_MAC,
                    ETH_P_IP,
                    &ipv4(PEER_IP, LOCAL_POD, 64, IPPROTO_UDP, &udp(1, 2, b"x")),
                ),
            ),
        ];
        check_passed(dp, PROG_FROM_NETDEV, &cases)?;

        // Another VNI on our port, or VXLAN to another address, is not weft's: the kernel
        // decides (another VXLAN device may own it), even from strangers.
        let inner = peer_inner_frame(&inner_ip(LOCAL_POD, 63));
        let mut to_other_host = vxlan_frame(STRANGER_IP, 0x08, VNI, &inner, &[]);
        to_other_host[30..34].copy_from_slice(&[198, 18, 0, 77]);
        fix_ip_checksum(&mut to_other_host);
        check_passed_as(
            dp,
            PROG_FROM_NETDEV,
            Counter::ForeignVni,
            &[
                (
                    "another VNI",
                    vxlan_frame(PEER_IP, 0x08, VNI + 1, &inner, &[]),
                ),
                (
                    "VNI flag clear",
                    vxlan_frame(PEER_IP, 0x00, VNI, &inner, &[]),
                ),
                (
                    "another VNI from a stranger",
                    vxlan_frame(STRANGER_IP, 0x08, VNI + 7, &inner, &[]),
                ),
            ],
        )?;
        check_passed(
            dp,
            PROG_FROM_NETDEV,
            &[("VXLAN to another host", to_other_host)],
        )?;

        // Routed packets are delivered by the fast path only from a direct lease's node.
        let routed = |src: [u8; 4], src_mac: [u8; 6]| {
            ethernet(
                UPLINK_MAC,
                src_mac,
                ETH_P_IP,
                &ipv4(src, LOCAL_POD, 64, IPPROTO_UDP, &udp(1, 2, b"x")),
            )
        };
        check_passed_as(
            dp,
            PROG_FROM_NETDEV,
            Counter::NotFromLeaseNode,
            &[
                ("routed from a VXLAN lease", routed(VXLAN_POD, PEER_MAC)),
                (
                    "routed from a direct lease, sent by another host",
                    routed(DIRECT_POD, [0x02, 0, 0, 0, 0, 0x99]),
                ),
                (
                    "routed from a direct lease whose node is unresolved",
                    routed(UNRESOLVED_DIRECT_POD, PEER_MAC),
                ),
            ],
        )
    })
}

// ---------------------------------------------------------------------------
// Both programs

#[test]
fn truncated_frames_pass_untouched_at_every_length() -> Result<()> {
    with_datapath(|dp| {
        let inner = peer_inner_frame(&inner_ip(LOCAL_POD, 63));
        let frames = [
            pod_frame(VXLAN_POD, 64, 40),
            pod_frame(DIRECT_POD, 64, 40),
            vxlan_frame(PEER_IP, 0x08, VNI, &inner, &[]),
            ethernet(
                UPLINK_MAC,
                PEER_MAC,
                ETH_P_IP,
                &ipv4(
                    VXLAN_POD,
                    LOCAL_POD,
                    63,
                    IPPROTO_UDP,
                    &udp(1, 2, b"payload"),
                ),
            ),
        ];
        let mut runs = 0;
        for frame in &frames {
            for len in 0..frame.len() {
                let cut = &frame[..len];
                for program in [PROG_FROM_POD, PROG_FROM_NETDEV] {
                    let result = dp.run(program, cut);
                    // The kernel builds no skb of an Ethernet header alone, and
                    // newer kernels none of an IPv4 frame cut inside the IP header.
                    if result.is_err() && len < 14 + 20 {
                        continue;
                    }
                    let out = result.with_context(|| format!("{len} of {} bytes", frame.len()))?;
                    ensure!(
                        out.action == TC_ACT_UNSPEC && out.frame == cut,
                        "{program}: {len} of {} bytes gave action {} (changed: {})",
                        frame.len(),
                        out.action,
                        out.frame != cut
                    );
                    runs += 1;
                }
            }
        }
        ensure!(runs > 0, "the kernel ran none of the truncated frames");
        ensure!(dp.counter(Counter::Passed)? == runs, "Passed counter");
        Ok(())
    })
}

#[test]
fn programs_load_with_pinned_btf_maps() -> Result<()> {
    with_datapath(|dp| {
        for name in ALL_MAPS {
            let pin = dp.bpffs.path().join(name);
            ensure!(
                pin.exists(),
                "map {name} is not pinned at {}",
                pin.display()
            );
        }
        for name in [PROG_FROM_POD, PROG_FROM_NETDEV] {
            let info = dp.program(name)?.info()?;
            ensure!(info.btf_id().is_some(), "{name} was loaded without BTF");
            eprintln!(
                "{name}: {} instructions verified, {} translated",
                info.verified_instruction_count().unwrap_or(0),
                info.size_translated().unwrap_or(0) / 8
            );
        }
        // The maps carry their key and value types: bpftool prints named fields.
        let pin = dp.bpffs.path().join(MAP_LEASES);
        let dump = Cmd::new([
            "bpftool",
            "-j",
            "map",
            "dump",
            "pinned",
            &pin.to_string_lossy(),
        ])
        .run()?;
        ensure!(
            dump.contains("\"vtep_mac\"") && dump.contains("\"public_ip\""),
            "bpftool shows no LeaseEntry fields: {dump}"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Checks

/// `out` is `frame` encapsulated to `peer` with outer MACs `dst_mac`/`src_mac`,
/// headers as flannel's kernel VXLAN device writes them, inner TTL one less.
fn check_encap(
    frame: &[u8],
    out: &[u8],
    peer: [u8; 4],
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Result<()> {
    ensure!(
        out.len() == frame.len() + VXLAN_OVERHEAD as usize,
        "encapsulated length {} for a {}-byte frame",
        out.len(),
        frame.len()
    );
    ensure!(
        out[0..6] == dst_mac,
        "outer destination MAC {:02x?}",
        &out[0..6]
    );
    ensure!(
        out[6..12] == src_mac,
        "outer source MAC {:02x?}",
        &out[6..12]
    );
    ensure!(be16(&out[12..]) == ETH_P_IP, "outer EtherType");

    let outer = &out[14..34];
    ensure!(outer[0] == 0x45, "outer version/IHL {:#x}", outer[0]);
    ensure!(outer[1] == 0, "outer TOS");
    ensure!(
        usize::from(be16(&outer[2..])) == out.len() - 14,
        "outer total length"
    );
    ensure!(be16(&outer[4..]) == 0, "outer IP id");
    ensure!(
        be16(&outer[6..]) == 0,
        "outer DF/fragment bits must be clear"
    );
    ensure!(outer[8] == 64, "outer TTL {}", outer[8]);
    ensure!(outer[9] == IPPROTO_UDP, "outer protocol {}", outer[9]);
    ensure!(
        checksum(outer) == 0,
        "outer IPv4 checksum is wrong: {outer:02x?}"
    );
    ensure!(
        outer[12..16] == NODE_IP,
        "outer source {:?}",
        &outer[12..16]
    );
    ensure!(
        outer[16..20] == peer,
        "outer destination {:?}",
        &outer[16..20]
    );

    let udp = &out[34..42];
    ensure!(
        SPORT_RANGE.contains(&be16(udp)),
        "UDP source port {}",
        be16(udp)
    );
    ensure!(
        be16(&udp[2..]) == VXLAN_PORT,
        "UDP destination port {}",
        be16(&udp[2..])
    );
    ensure!(usize::from(be16(&udp[4..])) == out.len() - 34, "UDP length");
    ensure!(be16(&udp[6..]) == 0, "UDP checksum must be 0");

    ensure!(
        out[42..50] == [0x08, 0, 0, 0, 0, 0, VNI as u8, 0],
        "VXLAN header {:02x?}",
        &out[42..50]
    );
    ensure!(
        out[50..56] == PEER_VTEP_MAC,
        "inner destination MAC (peer VTEP)"
    );
    ensure!(out[56..62] == OWN_VTEP_MAC, "inner source MAC (own VTEP)");
    ensure!(be16(&out[62..]) == ETH_P_IP, "inner EtherType");
    check_ttl_decremented(&frame[14..], &out[64..])
}

/// `out` is `frame` with the given MACs and TTL one less, all else unchanged.
fn check_routed(frame: &[u8], out: &[u8], dst_mac: [u8; 6], src_mac: [u8; 6]) -> Result<()> {
    ensure!(out.len() == frame.len(), "length changed");
    ensure!(out[0..6] == dst_mac, "destination MAC {:02x?}", &out[0..6]);
    ensure!(out[6..12] == src_mac, "source MAC {:02x?}", &out[6..12]);
    ensure!(out[12..14] == frame[12..14], "EtherType changed");
    check_ttl_decremented(&frame[14..], &out[14..])
}

/// `out` is the IPv4 packet `ip` with TTL one less and a valid checksum.
fn check_ttl_decremented(ip: &[u8], out: &[u8]) -> Result<()> {
    ensure!(out.len() == ip.len(), "IP packet length changed");
    ensure!(out[8] == ip[8] - 1, "TTL {} after {}", out[8], ip[8]);
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    ensure!(
        checksum(&out[..header_len]) == 0,
        "IPv4 checksum wrong after the TTL decrement: {:02x?}",
        &out[..header_len]
    );
    let unchanged = |packet: &[u8]| [&packet[..8], &packet[9..10], &packet[12..]].concat();
    ensure!(
        unchanged(out) == unchanged(ip),
        "the IP packet changed beyond TTL and checksum"
    );
    Ok(())
}

/// Every case passes (TC_ACT_UNSPEC) untouched and counts as Passed.
fn check_passed(dp: &Datapath, program: &str, cases: &[(&str, Vec<u8>)]) -> Result<()> {
    check_passed_as(dp, program, Counter::Passed, cases)
}

/// Every case passes (TC_ACT_UNSPEC) untouched and counts under `reason`.
fn check_passed_as(
    dp: &Datapath,
    program: &str,
    reason: Counter,
    cases: &[(&str, Vec<u8>)],
) -> Result<()> {
    for (what, frame) in cases {
        let before = dp.counter(reason)?;
        let out = dp.run(program, frame)?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "{program}, {what}: action {}, expected TC_ACT_UNSPEC",
            out.action
        );
        ensure!(
            &out.frame == frame,
            "{program}, {what}: a passed frame was changed"
        );
        ensure!(
            dp.counter(reason)? == before + 1,
            "{program}, {what}: not counted as {}",
            reason.name()
        );
    }
    let sent: u64 = [
        Counter::Encap,
        Counter::DirectOut,
        Counter::Decap,
        Counter::DirectIn,
    ]
    .into_iter()
    .map(|c| dp.counter(c))
    .sum::<Result<u64>>()?;
    ensure!(
        sent == 0,
        "{program} sent {sent} packets it should have passed"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Connections the node's stack carries (stack_flows)

/// A TCP segment from `src:sport` to `dst:dport` in an Ethernet frame.
fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    // Ports, sequence and ack numbers, data offset 5, flags ACK, window, checksum, urgent.
    let mut segment = [&sport.to_be_bytes()[..], &dport.to_be_bytes()].concat();
    segment.extend_from_slice(&[
        0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0x12, 0x34, 0, 0,
    ]);
    segment.extend_from_slice(b"payload");
    ethernet(
        GATEWAY_MAC,
        LOCAL_POD_MAC,
        ETH_P_IP,
        &ipv4(src, dst, 64, IPPROTO_TCP, &segment),
    )
}

#[test]
fn a_connection_the_stack_delivered_into_a_pod_stays_on_the_kernel_path() -> Result<()> {
    with_datapath(|dp| {
        // portmap's hostPort: a pod on the peer reached node:8080, the stack DNATed it to
        // the local pod's port 80 and delivered it: to_pod sees it after the DNAT.
        let delivered = tcp_frame(VXLAN_POD, 41000, LOCAL_POD, 80);
        let out = dp.run(PROG_TO_POD, &delivered)?;
        ensure!(out.action == TC_ACT_UNSPEC, "to_pod verdict {}", out.action);
        ensure!(out.frame == delivered, "to_pod changed the frame");
        let expected = FlowKey::new(
            IPPROTO_TCP,
            LOCAL_POD,
            [0, 80],
            VXLAN_POD,
            41000u16.to_be_bytes(),
        );
        ensure!(
            dp.stack_flows()? == vec![(expected, RECORDED_TO_POD)],
            "stack_flows: {:?}",
            dp.stack_flows()?
        );
        ensure!(
            dp.counter(Counter::FlowRecorded)? == 1,
            "FlowRecorded counter"
        );
        // The same connection again is not a new record.
        dp.run(PROG_TO_POD, &delivered)?;
        ensure!(dp.counter(Counter::FlowRecorded)? == 1, "recorded twice");

        // The pod's reply must meet the stack that translated the request: passed, not
        // encapsulated, although its destination is a VXLAN lease.
        let reply = tcp_frame(LOCAL_POD, 80, VXLAN_POD, 41000);
        let out = dp.run(PROG_FROM_POD, &reply)?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "from_pod verdict {}",
            out.action
        );
        ensure!(out.frame == reply, "from_pod changed a stack packet");
        ensure!(dp.counter(Counter::StackFlow)? == 1, "StackFlow counter");
        ensure!(
            dp.counter(Counter::Encap)? == 0,
            "encapsulated a stack packet"
        );

        // Another connection of the same pod (other client port) takes the fast path.
        let other = tcp_frame(LOCAL_POD, 80, VXLAN_POD, 41001);
        let out = dp.run(PROG_FROM_POD, &other)?;
        ensure!(
            out.action == TC_ACT_REDIRECT,
            "other connection: verdict {}",
            out.action
        );
        ensure!(
            out.mark & FAST_PATH_MARK != 0,
            "a redirected packet carries no fast-path mark (mark {:#x})",
            out.mark
        );

        // The client's next segment arrives over VXLAN: flannel.<VNI> must decapsulate it
        // into the stack (conntrack), not the program into the pod.
        let inner = ipv4(
            VXLAN_POD,
            LOCAL_POD,
            64,
            IPPROTO_TCP,
            &tcp_frame(VXLAN_POD, 41000, LOCAL_POD, 80)[34..],
        );
        let tunnel = vxlan_frame(PEER_IP, 0x08, VNI, &peer_inner_frame(&inner), &[]);
        let out = dp.run(PROG_FROM_NETDEV, &tunnel)?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "from_netdev verdict {}",
            out.action
        );
        ensure!(out.frame == tunnel, "from_netdev changed a stack packet");
        ensure!(
            dp.counter(Counter::Decap)? == 0,
            "decapsulated a stack packet"
        );
        ensure!(dp.counter(Counter::StackFlow)? == 2, "StackFlow counter");
        Ok(())
    })
}

#[test]
fn a_connection_the_stack_sent_to_a_peer_gets_its_replies_through_the_stack() -> Result<()> {
    with_datapath(|dp| {
        // kube-proxy DNATed the local pod's request to a ClusterIP to a pod on the peer,
        // and flannel.<VNI> encapsulated it: to_netdev sees the tunnel packet.
        let request = ipv4(
            LOCAL_POD,
            VXLAN_POD,
            63,
            IPPROTO_UDP,
            &udp(40000, 53, b"query"),
        );
        let kernel_tunnel = {
            let mut vxlan = vec![0x08, 0, 0, 0];
            vxlan.extend_from_slice(&(VNI << 8).to_be_bytes());
            vxlan.extend_from_slice(&ethernet(PEER_VTEP_MAC, OWN_VTEP_MAC, ETH_P_IP, &request));
            let outer = ipv4(
                NODE_IP,
                PEER_IP,
                64,
                IPPROTO_UDP,
                &udp(51234, VXLAN_PORT, &vxlan),
            );
            ethernet(PEER_MAC, UPLINK_MAC, ETH_P_IP, &outer)
        };
        let out = dp.run(PROG_TO_NETDEV, &kernel_tunnel)?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "to_netdev verdict {}",
            out.action
        );
        ensure!(out.frame == kernel_tunnel, "to_netdev changed the frame");
        let expected = FlowKey::new(
            IPPROTO_UDP,
            LOCAL_POD,
            40000u16.to_be_bytes(),
            VXLAN_POD,
            [0, 53],
        );
        ensure!(
            dp.stack_flows()? == vec![(expected, RECORDED_TO_NETDEV)],
            "stack_flows: {:?}",
            dp.stack_flows()?
        );

        // The backend's reply, fast-pathed by the peer, reaches this node's uplink: it
        // must go to flannel.<VNI> and conntrack (which turns its source back into the
        // ClusterIP), not straight into the pod.
        let reply = ipv4(
            VXLAN_POD,
            LOCAL_POD,
            64,
            IPPROTO_UDP,
            &udp(53, 40000, b"answer"),
        );
        let tunnel = vxlan_frame(PEER_IP, 0x08, VNI, &peer_inner_frame(&reply), &[]);
        let out = dp.run(PROG_FROM_NETDEV, &tunnel)?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "from_netdev verdict {}",
            out.action
        );
        ensure!(
            dp.counter(Counter::Decap)? == 0,
            "decapsulated the reply into the pod"
        );

        // host-gw: the stack routes the DNATed request out unencapsulated.
        let routed = tcp_frame(LOCAL_POD, 40001, DIRECT_POD, 8080);
        dp.run(PROG_TO_NETDEV, &routed)?;
        let reply = {
            let mut frame = tcp_frame(DIRECT_POD, 8080, LOCAL_POD, 40001);
            frame[0..6].copy_from_slice(&UPLINK_MAC);
            frame[6..12].copy_from_slice(&PEER_MAC);
            frame
        };
        let out = dp.run(PROG_FROM_NETDEV, &reply)?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "routed reply: verdict {}",
            out.action
        );
        ensure!(
            dp.counter(Counter::DirectIn)? == 0,
            "delivered the routed reply into the pod"
        );
        ensure!(dp.counter(Counter::StackFlow)? == 2, "StackFlow counter");
        Ok(())
    })
}

#[test]
fn to_netdev_ignores_the_fast_paths_packets_and_clears_their_mark() -> Result<()> {
    with_datapath(|dp| {
        // What from_pod redirected: marked. Not the stack's, so not recorded; the mark
        // must not leave the node (nor reach anything after this hook).
        let encapsulated = dp.run(PROG_FROM_POD, &pod_frame(VXLAN_POD, 64, 100))?;
        ensure!(encapsulated.action == TC_ACT_REDIRECT, "from_pod verdict");
        let other_bits = 0x4000;
        let out = dp.run_marked(
            PROG_TO_NETDEV,
            &encapsulated.frame,
            FAST_PATH_MARK | other_bits,
        )?;
        ensure!(
            out.action == TC_ACT_UNSPEC,
            "to_netdev verdict {}",
            out.action
        );
        ensure!(
            out.mark == other_bits,
            "mark after to_netdev: {:#x}",
            out.mark
        );
        ensure!(dp.stack_flows()?.is_empty(), "recorded a fast-path packet");

        // The stack's packets from the node itself (not from a pod) are not recorded:
        // their replies are for no pod, and from_netdev leaves those to the kernel anyway.
        let host = ipv4(NODE_IP, VXLAN_POD, 64, IPPROTO_UDP, &udp(45000, 53, b"q"));
        dp.run(
            PROG_TO_NETDEV,
            &ethernet(PEER_MAC, UPLINK_MAC, ETH_P_IP, &host),
        )?;
        ensure!(
            dp.stack_flows()?.is_empty(),
            "recorded the node's own connection"
        );
        ensure!(
            dp.counter(Counter::FlowRecorded)? == 0,
            "FlowRecorded counter"
        );
        Ok(())
    })
}

#[test]
fn fragments_and_icmp_errors_to_a_lease_take_the_kernel_path() -> Result<()> {
    with_datapath(|dp| {
        let fragment = {
            let mut frame = pod_frame(VXLAN_POD, 64, 100);
            // More fragments, offset 0: conntrack reassembles before it can tell the flow.
            frame[20] = 0x20;
            frame[24..26].copy_from_slice(&[0, 0]);
            let sum = checksum(&frame[14..34]);
            frame[24..26].copy_from_slice(&sum.to_be_bytes());
            frame
        };
        let port_unreachable = {
            let quoted = ipv4(VXLAN_POD, LOCAL_POD, 64, IPPROTO_UDP, &udp(53, 40000, b""));
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&quoted);
            ethernet(
                GATEWAY_MAC,
                LOCAL_POD_MAC,
                ETH_P_IP,
                &ipv4(LOCAL_POD, VXLAN_POD, 64, IPPROTO_ICMP, &icmp),
            )
        };
        check_passed(
            dp,
            PROG_FROM_POD,
            &[
                ("a first fragment", fragment),
                ("an ICMP error (port unreachable)", port_unreachable),
            ],
        )?;
        // An echo request is a connection of its own (its identifier as the port).
        let echo = ethernet(
            GATEWAY_MAC,
            LOCAL_POD_MAC,
            ETH_P_IP,
            &ipv4(
                LOCAL_POD,
                VXLAN_POD,
                64,
                IPPROTO_ICMP,
                &[8, 0, 0, 0, 0x12, 0x34, 0, 1],
            ),
        );
        let out = dp.run(PROG_FROM_POD, &echo)?;
        ensure!(
            out.action == TC_ACT_REDIRECT,
            "echo request: verdict {}",
            out.action
        );
        Ok(())
    })
}

#[test]
fn with_the_fast_path_off_everything_takes_the_kernel_path() -> Result<()> {
    with_datapath(|dp| {
        dp.set_flags(CONFIG_FAST_PATH_OFF)?;
        let routed_in = ethernet(
            UPLINK_MAC,
            PEER_MAC,
            ETH_P_IP,
            &ipv4(DIRECT_POD, LOCAL_POD, 64, IPPROTO_UDP, &udp(1, 2, b"x")),
        );
        let tunnel_in = vxlan_frame(
            PEER_IP,
            0x08,
            VNI,
            &peer_inner_frame(&inner_ip(LOCAL_POD, 63)),
            &[],
        );
        check_passed(
            dp,
            PROG_FROM_POD,
            &[
                ("to a VXLAN lease", pod_frame(VXLAN_POD, 64, 100)),
                ("to a direct lease", pod_frame(DIRECT_POD, 64, 100)),
            ],
        )?;
        check_passed(
            dp,
            PROG_FROM_NETDEV,
            &[
                ("VXLAN for a local pod", tunnel_in),
                ("routed packet for a local pod", routed_in),
            ],
        )?;
        // The port stays closed to strangers all the same.
        let stranger = vxlan_frame(
            STRANGER_IP,
            0x08,
            VNI,
            &peer_inner_frame(&inner_ip(LOCAL_POD, 63)),
            &[],
        );
        ensure!(
            dp.run(PROG_FROM_NETDEV, &stranger)?.action == TC_ACT_SHOT,
            "a stranger's VXLAN"
        );
        Ok(())
    })
}

#[test]
fn when_the_agent_stops_refreshing_everything_takes_the_kernel_path() -> Result<()> {
    with_datapath(|dp| {
        // Refreshed at boot time, trusted for 1 ns: long gone.
        dp.set_freshness(1, 1)?;
        let stranger = vxlan_frame(
            STRANGER_IP,
            0x08,
            VNI,
            &peer_inner_frame(&inner_ip(LOCAL_POD, 63)),
            &[],
        );
        check_passed_as(
            dp,
            PROG_FROM_POD,
            Counter::AgentGone,
            &[("to a VXLAN lease", pod_frame(VXLAN_POD, 64, 100))],
        )?;
        check_passed_as(
            dp,
            PROG_FROM_NETDEV,
            Counter::AgentGone,
            &[
                (
                    "VXLAN for a local pod",
                    vxlan_frame(
                        PEER_IP,
                        0x08,
                        VNI,
                        &peer_inner_frame(&inner_ip(LOCAL_POD, 63)),
                        &[],
                    ),
                ),
                // A node that joined after the agent died is no peer in the stale maps.
                ("VXLAN from a node the maps do not know", stranger),
            ],
        )?;
        // Refreshed just now and trusted for an hour: the fast path is back.
        dp.set_freshness(monotonic_ns(), 3_600_000_000_000)?;
        let out = dp.run(PROG_FROM_POD, &pod_frame(VXLAN_POD, 64, 100))?;
        ensure!(out.action == TC_ACT_REDIRECT, "action {}", out.action);
        Ok(())
    })
}

#[test]
fn with_leases_missing_from_the_map_unknown_inner_sources_take_the_kernel_path() -> Result<()> {
    with_datapath(|dp| {
        dp.set_flags(CONFIG_LEASES_INCOMPLETE)?;
        let frame = vxlan_frame(
            PEER_IP,
            0x08,
            VNI,
            &peer_inner_frame(&ipv4(
                STRANGER_IP,
                LOCAL_POD,
                64,
                IPPROTO_UDP,
                &udp(1, 2, b"x"),
            )),
            &[],
        );
        check_passed(dp, PROG_FROM_NETDEV, &[("inner source in no lease", frame)])?;
        // A source in another peer's lease is still forged.
        let forged = vxlan_frame(
            PEER_IP,
            0x08,
            VNI,
            &peer_inner_frame(&ipv4(
                UNRESOLVED_VXLAN_POD,
                LOCAL_POD,
                64,
                IPPROTO_UDP,
                &udp(1, 2, b"x"),
            )),
            &[],
        );
        ensure!(dp.run(PROG_FROM_NETDEV, &forged)?.action == TC_ACT_SHOT);
        Ok(())
    })
}

/// CLOCK_MONOTONIC in nanoseconds, the programs' clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------
// The datapath under test

/// The loaded programs and their maps, filled as the agent would for this
/// test bed. Lives in the thread that entered the test namespace.
struct Datapath {
    ebpf: Ebpf,
    bpffs: TempBpffs,
    /// ifindex of the pod's host-side veth [`POD_VETH`].
    pod_ifindex: u32,
}

struct Outcome {
    action: u32,
    frame: Vec<u8>,
    /// `skb->mark` after the program ran.
    mark: u32,
}

/// Byte offset of `mark` in struct __sk_buff (uapi/linux/bpf.h).
const SKB_MARK_OFFSET: usize = 8;
/// Byte offset of `ifindex` in struct __sk_buff: the device the program runs on.
const SKB_IFINDEX_OFFSET: usize = 40;
/// The part of struct __sk_buff BPF_PROG_TEST_RUN takes and gives back.
const SKB_CTX_LEN: usize = 192;

impl Datapath {
    fn load(uplink_ifindex: u32, pod_ifindex: u32) -> Result<Self> {
        let object = object_path();
        let bytes = std::fs::read(&object).with_context(|| {
            format!(
                "cannot read the eBPF object {}: run `cargo xtask build-ebpf` first",
                object.display()
            )
        })?;
        let bpffs = TempBpffs::mount()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs.path())
            .load(&bytes)
            .context("loading the eBPF object")?;
        for (name, _) in ALL_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("the object has no program {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        let mut datapath = Datapath {
            ebpf,
            bpffs,
            pod_ifindex,
        };
        datapath.fill_maps(uplink_ifindex)?;
        Ok(datapath)
    }

    fn fill_maps(&mut self, uplink_ifindex: u32) -> Result<()> {
        let mut config: Array<_, DataplaneConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        config.set(
            0,
            DataplaneConfig {
                vni: VNI,
                vxlan_port: VXLAN_PORT,
                flags: 0,
                node_ip: NODE_IP,
                uplink_ifindex,
                inner_mtu: INNER_MTU,
                vtep_mac: OWN_VTEP_MAC,
                _pad2: [0; 2],
                _pad3: [0; 4],
                refreshed_ns: 0,
                stale_after_ns: 0,
            },
            0,
        )?;

        let mut leases: LpmTrie<_, [u8; 4], LeaseEntry> = LpmTrie::try_from(self.map(MAP_LEASES)?)?;
        for (pod, public_ip, mode) in [
            (VXLAN_POD, PEER_IP, LEASE_VXLAN),
            (DIRECT_POD, PEER_IP, LEASE_DIRECT),
            (UNRESOLVED_VXLAN_POD, UNRESOLVED_PEER_IP, LEASE_VXLAN),
            (UNRESOLVED_DIRECT_POD, UNRESOLVED_PEER_IP, LEASE_DIRECT),
            (UNROUTABLE_POD, UNROUTABLE_PEER_IP, LEASE_VXLAN),
        ] {
            let subnet = [pod[0], pod[1], pod[2], 0];
            let lease = LeaseEntry {
                public_ip,
                mode,
                vtep_mac: PEER_VTEP_MAC,
                _pad: [0; 2],
            };
            leases.insert(&Key::new(24, subnet), lease, 0)?;
        }

        let mut peers: HashMap<_, PeerKey, PeerEntry> = HashMap::try_from(self.map(MAP_PEERS)?)?;
        for public_ip in [PEER_IP, UNRESOLVED_PEER_IP, UNROUTABLE_PEER_IP] {
            peers.insert(PeerKey { public_ip }, PeerEntry { leases: 1 }, 0)?;
        }

        let pod_ifindex = self.pod_ifindex;
        let mut endpoints: HashMap<_, EndpointKey, EndpointEntry> =
            HashMap::try_from(self.map(MAP_ENDPOINTS)?)?;
        endpoints.insert(
            EndpointKey { pod_ip: LOCAL_POD },
            EndpointEntry {
                ifindex: pod_ifindex,
                pod_mac: LOCAL_POD_MAC,
                host_mac: LOCAL_POD_HOST_MAC,
            },
            0,
        )?;
        Ok(())
    }

    /// Rewrites the config's flags (as the agent does when the fast path switches).
    fn set_flags(&mut self, flags: u16) -> Result<()> {
        let mut config: Array<_, DataplaneConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        let mut value = config.get(&0, 0)?;
        value.flags = flags;
        config.set(0, value, 0)?;
        Ok(())
    }

    /// Sets when the agent last refreshed the config and for how long that holds.
    fn set_freshness(&mut self, refreshed_ns: u64, stale_after_ns: u64) -> Result<()> {
        let mut config: Array<_, DataplaneConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        let mut value = config.get(&0, 0)?;
        value.refreshed_ns = refreshed_ns;
        value.stale_after_ns = stale_after_ns;
        config.set(0, value, 0)?;
        Ok(())
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the object has no map {name}"))
    }

    fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("the object has no program {name}"))?
            .try_into()?)
    }

    fn run(&self, program: &str, frame: &[u8]) -> Result<Outcome> {
        self.run_with_context(program, frame, None)
    }

    /// Runs `program` on `frame` as a GSO packet of `gso_size`-byte segments.
    fn run_gso(&self, program: &str, frame: &[u8], gso_size: u32) -> Result<Outcome> {
        // struct __sk_buff: gso_segs at byte 164, gso_size at 176 (uapi/linux/bpf.h).
        let mut skb = [0u8; SKB_CTX_LEN];
        let segments = (frame.len() as u32).div_ceil(gso_size);
        skb[164..168].copy_from_slice(&segments.to_ne_bytes());
        skb[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        self.run_with_context(program, frame, Some(&skb))
    }

    /// Runs `program` on `frame` with `skb->mark` set to `mark`.
    fn run_marked(&self, program: &str, frame: &[u8], mark: u32) -> Result<Outcome> {
        let mut skb = [0u8; SKB_CTX_LEN];
        skb[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        self.run_with_context(program, frame, Some(&skb))
    }

    fn run_with_context(&self, program: &str, frame: &[u8], skb: Option<&[u8]>) -> Result<Outcome> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        if let Some(skb) = skb {
            ctx_in.copy_from_slice(skb);
        }
        // from_pod runs on the ingress of the pod's veth: the skb's device.
        if program == PROG_FROM_POD && ctx_in[SKB_IFINDEX_OFFSET..][..4] == [0; 4] {
            ctx_in[SKB_IFINDEX_OFFSET..][..4].copy_from_slice(&self.pod_ifindex.to_ne_bytes());
        }
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let result = self
            .program(program)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                // Always pass a context, so that the kernel hands one back.
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes(
            ctx_out[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4]
                .try_into()
                .expect("4 bytes"),
        );
        Ok(Outcome {
            action: result.return_value,
            frame: out,
            mark,
        })
    }

    /// The connections recorded in `stack_flows`, with who recorded them.
    fn stack_flows(&self) -> Result<Vec<(FlowKey, u32)>> {
        let map = self
            .ebpf
            .map(MAP_STACK_FLOWS)
            .with_context(|| format!("the object has no map {MAP_STACK_FLOWS}"))?;
        let flows: HashMap<_, FlowKey, FlowEntry> = HashMap::try_from(map)?;
        flows
            .iter()
            .map(|item| Ok(item.map(|(key, entry)| (key, entry.recorded_by))?))
            .collect()
    }

    /// `counter` summed over CPUs.
    fn counter(&self, counter: Counter) -> Result<u64> {
        let map = self
            .ebpf
            .map(MAP_COUNTERS)
            .with_context(|| format!("the object has no map {MAP_COUNTERS}"))?;
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(counters.get(&counter.index(), 0)?.iter().sum())
    }
}

/// Builds the test bed, loads the datapath inside it and runs `check`.
fn with_datapath<F>(check: F) -> Result<()>
where
    F: FnOnce(&mut Datapath) -> Result<()> + Send + 'static,
{
    let bed = TestBed::create()?;
    icmp::in_netns(&bed.namespace, move || {
        let ifindex = |name: &str| -> Result<u32> {
            let c = CString::new(name)?;
            // SAFETY: if_nametoindex(3) on a valid C string.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            ensure!(index != 0, "no {name} in the test namespace");
            Ok(index)
        };
        let mut datapath = Datapath::load(ifindex(UPLINK)?, ifindex(POD_VETH)?)?;
        check(&mut datapath)
    })
}

/// A namespace holding the node's uplink `up0` (its veth peer `up1` stays
/// without address, so the peer's addresses are remote), a permanent
/// neighbour for the peer, routes for the direct leases, and forwarding on
/// (the FIB helper refuses to route for interfaces that do not forward).
struct TestBed {
    namespace: String,
}

impl TestBed {
    fn create() -> Result<Self> {
        let prefix = netns::unique_prefix();
        netns::sweep_leftovers(&prefix, &std::env::temp_dir());
        let bed = TestBed {
            namespace: format!("{prefix}bpf"),
        };
        netns::add(&bed.namespace)?;
        let ns = bed.namespace.as_str();
        let mac = |mac: [u8; 6]| {
            mac.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        ip(ns, &format!("link add {UPLINK} type veth peer name up1"))?;
        ip(
            ns,
            &format!("link set {UPLINK} address {}", mac(UPLINK_MAC)),
        )?;
        ip(
            ns,
            &format!("addr add {}/24 dev {UPLINK}", Ipv4Addr::from(NODE_IP)),
        )?;
        ip(ns, &format!("link set {UPLINK} up"))?;
        ip(ns, "link set up1 up")?;
        ip(ns, &format!("link add {POD_VETH} type veth peer name pod1"))?;
        ip(ns, &format!("link set {POD_VETH} up"))?;
        ip(
            ns,
            &format!(
                "neigh replace {} lladdr {} dev {UPLINK} nud permanent",
                Ipv4Addr::from(PEER_IP),
                mac(PEER_MAC)
            ),
        )?;
        for (pod, gateway) in [
            (DIRECT_POD, PEER_IP),
            (UNRESOLVED_DIRECT_POD, UNRESOLVED_PEER_IP),
        ] {
            let subnet = Ipv4Addr::from([pod[0], pod[1], pod[2], 0]);
            let gateway = Ipv4Addr::from(gateway);
            ip(
                ns,
                &format!("route add {subnet}/24 via {gateway} dev {UPLINK}"),
            )?;
        }
        Cmd::new(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .netns(ns)
            .run()?;
        Ok(bed)
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let _ = netns::delete(&self.namespace);
    }
}

fn object_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/weft.bpf.o")
}

// ---------------------------------------------------------------------------
// Frames

/// A UDP packet from the local pod to `dst` with `payload_len` payload bytes,
/// as it enters the pod's host-side veth (addressed to the bridge gateway).
fn pod_frame(dst: [u8; 4], ttl: u8, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let ip = ipv4(
        LOCAL_POD,
        dst,
        ttl,
        IPPROTO_UDP,
        &udp(40000, 5201, &payload),
    );
    ethernet(GATEWAY_MAC, LOCAL_POD_MAC, ETH_P_IP, &ip)
}

/// A pod frame whose IPv4 packet is exactly `ip_len` bytes long.
fn pod_frame_of_ip_len(dst: [u8; 4], ttl: u8, ip_len: usize) -> Vec<u8> {
    pod_frame(dst, ttl, ip_len - 20 - 8)
}

/// An IPv4 packet from a pod of the peer to `dst`.
fn inner_ip(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    ipv4(
        VXLAN_POD,
        dst,
        ttl,
        IPPROTO_UDP,
        &udp(5201, 40000, b"inner payload"),
    )
}

/// `ip` as the peer's flannel.<VNI> frames it: between the two VTEP MACs.
fn peer_inner_frame(ip: &[u8]) -> Vec<u8> {
    ethernet(OWN_VTEP_MAC, PEER_VTEP_MAC, ETH_P_IP, ip)
}

/// A VXLAN packet from `src` to this node carrying `inner`, with a UDP
/// checksum as kernel VXLAN devices send it, and optional outer IP options.
fn vxlan_frame(src: [u8; 4], flags: u8, vni: u32, inner: &[u8], options: &[u8]) -> Vec<u8> {
    let mut vxlan = vec![flags, 0, 0, 0];
    vxlan.extend_from_slice(&(vni << 8).to_be_bytes());
    vxlan.extend_from_slice(inner);
    let mut datagram = udp(45678, VXLAN_PORT, &vxlan);
    datagram[6..8].copy_from_slice(&[0x12, 0x34]);
    let ip = ipv4_with_options(src, NODE_IP, 64, IPPROTO_UDP, options, &datagram);
    ethernet(UPLINK_MAC, PEER_MAC, ETH_P_IP, &ip)
}

/// A UDP datagram from `src` to this node's port `dport`.
fn udp_to_node(src: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let ip = ipv4(src, NODE_IP, 64, IPPROTO_UDP, &udp(45678, dport, payload));
    ethernet(UPLINK_MAC, PEER_MAC, ETH_P_IP, &ip)
}

fn arp_frame() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&LOCAL_POD_MAC);
    arp.extend_from_slice(&LOCAL_POD);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VXLAN_POD);
    ethernet([0xff; 6], LOCAL_POD_MAC, ETH_P_ARP, &arp)
}

fn ipv6_frame() -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64];
    ip.extend_from_slice(&[0xfd; 32]);
    ip.extend_from_slice(&udp(1, 2, b""));
    ethernet(GATEWAY_MAC, LOCAL_POD_MAC, ETH_P_IPV6, &ip)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src[..], &ethertype.to_be_bytes(), payload].concat()
}

fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, protocol: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with_options(src, dst, ttl, protocol, &[], payload)
}

/// An IPv4 packet (DF set, as pods send) with a valid header checksum.
fn ipv4_with_options(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    protocol: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IPv4 options come in 32-bit words");
    let header_len = 20 + options.len();
    let total = (header_len + payload.len()) as u16;
    let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, protocol, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(options);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

/// A UDP datagram; its checksum is an arbitrary fixed value, which the
/// programs must carry through untouched.
fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    [
        &sport.to_be_bytes()[..],
        &dport.to_be_bytes(),
        &len.to_be_bytes(),
        &[0xab, 0xcd],
        payload,
    ]
    .concat()
}

fn with_ihl(mut frame: Vec<u8>, ihl: u8) -> Vec<u8> {
    frame[14] = (frame[14] & 0xf0) | ihl;
    frame
}

fn with_version(mut frame: Vec<u8>, version: u8) -> Vec<u8> {
    frame[14] = (version << 4) | (frame[14] & 0x0f);
    frame
}

fn with_total_len(mut frame: Vec<u8>, extra: u16) -> Vec<u8> {
    let total = be16(&frame[16..]) + extra;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame
}

/// Recomputes the IPv4 header checksum of an Ethernet frame after an edit.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// The Internet checksum (RFC 1071): 0 over a header that carries a valid one.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}
