//! weft's eBPF datapath: two TC classifiers that take the pod-to-pod fast
//! path past the kernel's VXLAN device and routing, and leave everything
//! else to the kernel path flannel sets up (which stays in place as the
//! fallback and the slow path).
//!
//! - `from_pod`, TC ingress of each pod's host-side veth: packets to remote
//!   leases are encapsulated in VXLAN or routed, and redirected to the uplink.
//! - `from_netdev`, TC ingress of the uplink: VXLAN from known peers and
//!   routed packets for local pods are delivered straight into the pod.
//!
//! Whatever a program cannot handle completely it passes (TC_ACT_OK)
//! unchanged, to the kernel path; packets are dropped only for a reason that
//! has a counter. Each packet is rewritten with a single store where possible.
#![no_std]
#![no_main]

mod counters;
mod csum;
mod maps;
mod parse;
mod route;
mod vxlan;

use core::mem::size_of;

use aya_ebpf::{helpers::generated::bpf_redirect_peer, macros::classifier, programs::TcContext};
use weft_common::{Counter, DataplaneConfig, LeaseEntry, LEASE_DIRECT, LEASE_VXLAN};

use crate::{
    counters::{drop, pass, redirected},
    parse::{Ipv4Hdr, UdpHdr, ETH_HLEN, ETH_P_IP, IPPROTO_UDP},
    route::Macs,
    vxlan::{RewriteError, VxlanPayload},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let Some(ip) = parse::ipv4(&ctx) else {
        return pass();
    };
    let Some(cfg) = maps::config() else {
        return pass();
    };
    let Some(lease) = maps::lease(ip.daddr) else {
        return pass();
    };
    // The kernel answers TTL expiry with ICMP time-exceeded.
    if ip.ttl <= 1 {
        return pass();
    }
    match lease.mode {
        LEASE_VXLAN => to_tunnel(&ctx, &cfg, &lease, ip),
        LEASE_DIRECT => to_route(&ctx, &cfg, ip),
        _ => pass(),
    }
}

/// Encapsulates a pod packet to the node holding `lease`.
#[inline(always)]
fn to_tunnel(ctx: &TcContext, cfg: &DataplaneConfig, lease: &LeaseEntry, mut ip: Ipv4Hdr) -> i32 {
    // A packet too big for the tunnel is the kernel's to fragment or answer
    // with fragmentation-needed (flannel.<VNI> has the tunnel MTU); redirected,
    // it would vanish at the uplink. GSO packets are segmented to the pod MTU
    // later and fit.
    // SAFETY: reading a field of this program's own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 && ip.total_len() > cfg.inner_mtu {
        return pass();
    }
    let Some(next) = route::lookup(ctx, cfg.node_ip, lease.public_ip, cfg.uplink_ifindex) else {
        return pass();
    };
    csum::dec_ttl(&mut ip);
    let macs = next.macs.unwrap_or(Macs {
        src: [0; 6],
        dst: [0; 6],
    });
    match vxlan::encap(ctx, cfg, lease, &macs, &ip) {
        Ok(()) => redirected(Counter::Encap, route::redirect(&next)),
        Err(RewriteError::Refused) => pass(),
        Err(RewriteError::Partial) => drop(Counter::DropHelperFailed),
    }
}

/// Routes a pod packet unencapsulated, by the kernel route the agent keeps
/// for the lease (`<subnet> via <public ip>`).
#[inline(always)]
fn to_route(ctx: &TcContext, cfg: &DataplaneConfig, mut ip: Ipv4Hdr) -> i32 {
    // Looked up as if arriving on the uplink, like the tunnel's outer packets:
    // the node forwards through it, and pod veths (bridge ports) have no
    // IPv4 settings of their own that should decide.
    let Some(next) = route::lookup(ctx, ip.saddr, ip.daddr, cfg.uplink_ifindex) else {
        return pass();
    };
    csum::dec_ttl(&mut ip);
    // A failed store changed nothing: the kernel can still route the packet.
    if route::rewrite(ctx, next.macs, &ip).is_err() {
        return pass();
    }
    redirected(Counter::DirectOut, route::redirect(&next))
}

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    let Some(ip) = parse::ipv4(&ctx) else {
        return pass();
    };
    let Some(cfg) = maps::config() else {
        return pass();
    };
    let l4_off = ETH_HLEN + ip.header_len();
    if ip.protocol == IPPROTO_UDP && ip.carries_l4_header() {
        if let Some(udp) = parse::read::<UdpHdr>(&ctx, l4_off) {
            if u16::from_be_bytes(udp.dest) == cfg.vxlan_port {
                return from_tunnel(&ctx, &cfg, &ip, l4_off + size_of::<UdpHdr>());
            }
        }
    }
    from_route(&ctx, ip)
}

/// A UDP packet to the VXLAN port, whose UDP payload starts at `payload_off`.
#[inline(always)]
fn from_tunnel(ctx: &TcContext, cfg: &DataplaneConfig, ip: &Ipv4Hdr, payload_off: usize) -> i32 {
    // flannel.<VNI> decapsulates from anyone who can reach the port; weft
    // accepts tunnels only from nodes that hold a lease.
    if !maps::is_peer(ip.saddr) {
        return drop(Counter::DropUnknownPeer);
    }
    // The kernel reassembles fragmented tunnel packets and decapsulates them.
    if ip.is_fragment() {
        return pass();
    }
    let Some(payload) = parse::read::<VxlanPayload>(ctx, payload_off) else {
        return drop(Counter::DropMalformed);
    };
    if !payload.is_vni(cfg.vni) {
        return drop(Counter::DropWrongVni);
    }
    if payload.inner_eth.proto != ETH_P_IP {
        return pass();
    }
    let inner_off = payload_off + size_of::<VxlanPayload>();
    let Some(inner) = parse::read::<Ipv4Hdr>(ctx, inner_off) else {
        return drop(Counter::DropMalformed);
    };
    // Not for a local pod (the node itself, say): flannel.<VNI> takes it.
    let Some(endpoint) = maps::endpoint(inner.daddr) else {
        return pass();
    };
    match vxlan::decap(ctx, ip, &endpoint) {
        Ok(()) => redirected(Counter::Decap, deliver(endpoint.ifindex)),
        Err(RewriteError::Refused) => pass(),
        Err(RewriteError::Partial) => drop(Counter::DropHelperFailed),
    }
}

/// An unencapsulated packet: routed (host-gw, DirectRouting) traffic for a
/// local pod is delivered into it, anything else goes to the kernel.
#[inline(always)]
fn from_route(ctx: &TcContext, mut ip: Ipv4Hdr) -> i32 {
    let Some(endpoint) = maps::endpoint(ip.daddr) else {
        return pass();
    };
    if ip.ttl <= 1 {
        return pass();
    }
    csum::dec_ttl(&mut ip);
    let macs = Macs {
        src: endpoint.host_mac,
        dst: endpoint.pod_mac,
    };
    // A failed store changed nothing: the kernel can still deliver the packet.
    if route::rewrite(ctx, Some(macs), &ip).is_err() {
        return pass();
    }
    redirected(Counter::DirectIn, deliver(endpoint.ifindex))
}

/// Delivers the frame into the pod behind host-side veth `ifindex`:
/// `bpf_redirect_peer` switches to the pod's namespace and enters its
/// ingress directly, skipping the host's backlog queue.
#[inline(always)]
fn deliver(ifindex: u32) -> i64 {
    // SAFETY: a helper call with plain integer arguments.
    unsafe { bpf_redirect_peer(ifindex, 0) }
}

/// The kernel checks GPL-only helpers against this; aya defaults to "GPL"
/// when the section is missing, so state it explicitly.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to here.
    loop {}
}
