//! weft's datapath programs (`from_pod`, `from_netdev`, `to_pod`, `to_netdev`) run on
//! crafted frames with BPF_PROG_TEST_RUN, checked byte by byte.
//!
//! Each test loads the object built by `cargo xtask build-ebpf` into a fresh
//! bpffs, fills the maps as the agent would, and runs the programs from a
//! thread inside a network namespace of its own: the programs' FIB lookups
//! see that namespace's uplink `up0` (198.18.0.11/24), its permanent
//! neighbour entry for the peer 198.18.0.12 and its routes, so they answer
//! the same way every run.

use anyhow::{ensure, Context, Result};
use weft_common::{
    Counter, FlowKey, ALL_MAPS, CONFIG_FAST_PATH_OFF, CONFIG_LEASES_INCOMPLETE, FAST_PATH_MARK,
    MAP_LEASES, PROG_FROM_NETDEV, PROG_FROM_POD, PROG_TO_NETDEV, PROG_TO_POD, RECORDED_TO_NETDEV,
    RECORDED_TO_POD, VXLAN_OVERHEAD,
};
use weft_tests::datapath::*;
use weft_tests::exec::Cmd;

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
                tunnelled_from_peer(UNRESOLVED_VXLAN_POD, LOCAL_POD),
                Counter::DropSpoofedInner,
            ),
            (
                "from a peer, inner source in no lease",
                tunnelled_from_peer(STRANGER_IP, LOCAL_POD),
                Counter::DropSpoofedInner,
            ),
            (
                "from a peer, inner source outside every lease, to the node itself",
                tunnelled_from_peer([192, 0, 2, 1], OTHER_LOCAL_IP),
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
        let frame = tunnelled_from_peer(STRANGER_IP, LOCAL_POD);
        check_passed(dp, PROG_FROM_NETDEV, &[("inner source in no lease", frame)])?;
        // A source in another peer's lease is still forged.
        let forged = tunnelled_from_peer(UNRESOLVED_VXLAN_POD, LOCAL_POD);
        ensure!(dp.run(PROG_FROM_NETDEV, &forged)?.action == TC_ACT_SHOT);
        Ok(())
    })
}
