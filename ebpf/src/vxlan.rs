//! VXLAN (RFC 7348) as flannel's `vxlan` backend puts it on the wire, so that
//! kernel flannel.<VNI> devices and weft nodes exchange packets both ways.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_ENCAP_L2_SHIFT,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::generated::bpf_get_hash_recalc,
    programs::TcContext,
};
use weft_common::{DataplaneConfig, EndpointEntry, LeaseEntry, VXLAN_OVERHEAD};

use crate::{
    csum,
    parse::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr, ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN},
    route::Macs,
};

/// The I flag: "the VNI field is valid", the only flag VXLAN defines.
const VXLAN_FLAG_VNI: u8 = 0x08;
/// Outer TTL, as the kernel's vxlan driver uses by default.
const OUTER_TTL: u8 = 64;
/// Outer UDP source ports: the kernel's default local port range
/// (net.ipv4.ip_local_port_range), which its vxlan driver spreads flows over.
const SPORT_MIN: u32 = 32768;
const SPORT_END: u32 = 61000;

/// How a rewrite failed.
pub enum RewriteError {
    /// The kernel refused to resize the packet (e.g. a GSO type it cannot
    /// re-segment after the change); the packet is as it was.
    Refused,
    /// Writing failed after the resize; the packet is half rewritten.
    Partial,
}

/// Everything encapsulation writes, in one store: the headers it puts in
/// front of the inner IP packet (outer Ethernet, IPv4, UDP, VXLAN, inner
/// Ethernet) and the inner IPv4 header with its TTL decremented.
#[repr(C)]
#[derive(Clone, Copy)]
struct EncapHeaders {
    outer_eth: EthHdr,
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
    inner_ip: Ipv4Hdr,
}

// The inserted room is the common contract's VXLAN_OVERHEAD (outer Ethernet is kept).
const _: () = assert!(size_of::<EncapHeaders>() == ETH_HLEN + VXLAN_OVERHEAD as usize + IPV4_HLEN);

/// Encapsulates the Ethernet frame, whose IPv4 header with the TTL already
/// decremented is `inner_ip`, in VXLAN to `lease`, with outer MACs `macs`
/// (zero when the kernel will resolve them at redirect).
#[inline(always)]
pub fn encap(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    lease: &LeaseEntry,
    macs: &Macs,
    inner_ip: &Ipv4Hdr,
) -> Result<(), RewriteError> {
    // Hash the inner flow before the headers change: the outer source port
    // spreads flows over the underlay's ECMP paths and the receiver's RSS queues.
    // SAFETY: a helper call on this program's own skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };

    // MAC mode keeps the outer Ethernet header where it is and opens room
    // behind it. The ENCAP flags tell the kernel what the new headers are, so
    // GSO packets are segmented as UDP tunnel packets. FIXED_GSO keeps gso_size:
    // the pods' MTU already leaves room for the 50 bytes.
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO
        | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH;
    let inner_l2_len = (ETH_HLEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT;
    ctx.adjust_room(
        VXLAN_OVERHEAD as i32,
        BPF_ADJ_ROOM_MAC,
        u64::from(flags) | inner_l2_len,
    )
    .map_err(|_| RewriteError::Refused)?;

    let ip_len = ctx.len() - ETH_HLEN as u32;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (ip_len as u16).to_be_bytes(),
        id: [0; 2],
        // DF clear, as the kernel vxlan driver sends by default (flannel sets no df).
        frag_off: [0; 2],
        ttl: OUTER_TTL,
        protocol: IPPROTO_UDP,
        check: [0; 2],
        saddr: cfg.node_ip,
        daddr: lease.public_ip,
    };
    ip.check = csum::ipv4_header(&ip);

    let headers = EncapHeaders {
        outer_eth: EthHdr {
            dst: macs.dst,
            src: macs.src,
            proto: ETH_P_IP,
        },
        ip,
        udp: UdpHdr {
            source: source_port(hash).to_be_bytes(),
            dest: cfg.vxlan_port.to_be_bytes(),
            len: ((ip_len - IPV4_HLEN as u32) as u16).to_be_bytes(),
            // Zero: no UDP checksum (RFC 7348 allows it over IPv4); the inner
            // packet carries its own.
            check: [0; 2],
        },
        vxlan: VxlanHdr {
            flags: [VXLAN_FLAG_VNI, 0, 0, 0],
            vni: (cfg.vni << 8).to_be_bytes(),
        },
        inner_eth: EthHdr {
            // What flannel.<VNI> on the peer expects: its own VTEP MAC.
            dst: lease.vtep_mac,
            src: cfg.vtep_mac,
            proto: ETH_P_IP,
        },
        inner_ip: *inner_ip,
    };
    ctx.store(0, &headers, 0).map_err(|_| RewriteError::Partial)
}

/// Maps a flow hash into the source port range the way the kernel's
/// `udp_flow_src_port` does (fold the high bits in, scale, no modulo).
#[inline(always)]
fn source_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    let port = SPORT_MIN + ((u64::from(hash) * u64::from(SPORT_END - SPORT_MIN)) >> 32) as u32;
    port as u16
}

/// The headers that follow the outer UDP header of a VXLAN packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanPayload {
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

impl VxlanPayload {
    /// Whether the VNI flag is set and the VNI is this node's.
    #[inline(always)]
    pub fn is_vni(&self, vni: u32) -> bool {
        self.vxlan.flags[0] & VXLAN_FLAG_VNI != 0 && u32::from_be_bytes(self.vxlan.vni) >> 8 == vni
    }
}

/// Bytes from the end of the outer Ethernet header to the inner IP header.
#[inline(always)]
pub fn encap_len(outer_ip: &Ipv4Hdr) -> usize {
    outer_ip.header_len() + size_of::<UdpHdr>() + size_of::<VxlanPayload>()
}

/// Strips the outer IPv4, UDP and VXLAN headers and the inner Ethernet header,
/// then writes an Ethernet header addressed to the local pod `endpoint`, as
/// the node's bridge port would. The frame's own Ethernet header is reused,
/// so the packet ends up a plain frame for the pod.
#[inline(always)]
pub fn decap(
    ctx: &TcContext,
    outer_ip: &Ipv4Hdr,
    endpoint: &EndpointEntry,
) -> Result<(), RewriteError> {
    // FIXED_GSO: a GRO-merged tunnel packet keeps its segment size; the inner
    // headers it is segmented by are the ones left.
    ctx.adjust_room(
        -(encap_len(outer_ip) as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO.into(),
    )
    .map_err(|_| RewriteError::Refused)?;
    let eth = EthHdr {
        dst: endpoint.pod_mac,
        src: endpoint.host_mac,
        proto: ETH_P_IP,
    };
    ctx.store(0, &eth, 0).map_err(|_| RewriteError::Partial)
}
