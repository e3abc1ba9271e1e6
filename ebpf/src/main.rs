//! weft's eBPF datapath: two TC classifiers that take the pod-to-pod fast
//! path past the kernel's VXLAN device and routing, and leave everything
//! else to the kernel path flannel sets up (which stays in place as the
//! fallback and the slow path).
//!
//! - `from_pod`, TC ingress of each pod's host-side veth: packets to remote
//!   leases are encapsulated in VXLAN or routed, and redirected to the uplink.
//! - `from_netdev`, TC ingress of the uplink: VXLAN from known peers and
//!   routed packets for local pods are delivered straight into the pod.
//! - `to_pod` and `to_netdev`, TC egress of the pod veths and of the uplink:
//!   they see what the node's stack hands on and record those connections
//!   (see `flow`), which the two above then leave to the stack.
//! - Source NAT of pod traffic leaving the cluster (see `nat`): `to_netdev`
//!   translates, `from_netdev` translates replies back, `from_pod` marks what
//!   is ours so the kernel's masquerade rule leaves it alone.
//!
//! Whatever a program cannot handle completely it passes (TC_ACT_UNSPEC)
//! unchanged, to the kernel path; packets are dropped only for a reason that
//! has a counter. Each packet is rewritten with a single store where possible.
//!
//! What the fast path accepts is narrow on purpose: a pod may send only from its own
//! address, a peer may tunnel only packets from its own lease, and routed packets are
//! delivered only from a direct lease's node. If the agent stops refreshing the config
//! (uninstalled, crash-looping), every program hands every packet to the kernel path.
#![no_std]
#![no_main]

mod counters;
mod csum;
mod flow;
mod maps;
mod nat;
mod parse;
mod route;
mod vxlan;

use core::mem::size_of;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::generated::{bpf_ktime_get_ns, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};
use weft_common::{
    Counter, DataplaneConfig, LeaseEntry, CONFIG_FAST_PATH_OFF, CONFIG_LEASES_INCOMPLETE,
    FAST_PATH_MARK, LEASE_DIRECT, LEASE_VXLAN, RECORDED_TO_NETDEV, RECORDED_TO_POD,
};

use crate::{
    counters::{count, drop, pass, pass_as, redirected, stack_flow},
    parse::{EthHdr, Ipv4Hdr, UdpHdr, ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP},
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
    // Whether this packet's source NAT, should it leave the cluster, is ours or the
    // kernel's masquerade's.
    let gone = agent_gone(&cfg);
    nat::mark_from_pod(&ctx, &cfg, &ip, gone);
    if gone {
        return pass_as(Counter::AgentGone);
    }
    if cfg.flags & CONFIG_FAST_PATH_OFF != 0 {
        return pass();
    }
    let Some(lease) = maps::lease(ip.daddr) else {
        // Leaving the cluster: a translated flow may skip the stack (--masquerade-fast-path).
        if let Some(verdict) = nat::fast_out(&ctx, &cfg, &ip) {
            return verdict;
        }
        return pass();
    };
    // The kernel answers TTL expiry with ICMP time-exceeded.
    if ip.ttl <= 1 {
        return pass();
    }
    // Only the pod behind this veth sends with its address; anything else is for
    // rp_filter and the firewall on the kernel path to judge.
    // SAFETY: reading a field of this program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if maps::endpoint(ip.saddr).is_none_or(|e| e.ifindex != ifindex) {
        return pass_as(Counter::SourceNotPod);
    }
    if let Some(verdict) = stack_verdict(&ctx, &ip, ETH_HLEN, ip.saddr) {
        return verdict;
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
    // it would vanish at the uplink. For a GSO packet that is each segment.
    // SAFETY: reading a field of this program's own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let too_big = if gso_size == 0 {
        ip.total_len() > cfg.inner_mtu
    } else {
        gso_segment_len(ctx, &ip, gso_size).is_none_or(|len| len > cfg.inner_mtu)
    };
    if too_big {
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
        Ok(()) => redirected(Counter::Encap, to_uplink(ctx, &next)),
        Err(RewriteError::Refused) => pass(),
        Err(RewriteError::Partial) => drop(Counter::DropHelperFailed),
    }
}

/// The IP length of each segment of a GSO packet whose payload segments are `gso_size`
/// bytes: headers (IP, TCP with options, or UDP) plus `gso_size`. `None` if unknown.
#[inline(always)]
fn gso_segment_len(ctx: &TcContext, ip: &Ipv4Hdr, gso_size: u32) -> Option<u32> {
    let l4_off = ETH_HLEN + ip.header_len();
    let l4_len = match ip.protocol {
        IPPROTO_TCP => {
            // The data offset: the high nibble of byte 12, in 32-bit words.
            let tcp: [u8; 13] = parse::read(ctx, l4_off)?;
            u32::from(tcp[12] >> 4) * 4
        }
        IPPROTO_UDP => size_of::<UdpHdr>() as u32,
        _ => return None,
    };
    Some(ip.header_len() as u32 + l4_len + gso_size)
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
    redirected(Counter::DirectOut, to_uplink(ctx, &next))
}

/// Redirects a pod packet to the uplink, marked so that `to_netdev` knows it for the fast
/// path's and not the stack's.
#[inline(always)]
pub(crate) fn to_uplink(ctx: &TcContext, next: &route::Nexthop) -> i64 {
    // SAFETY: reading a field of this program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | FAST_PATH_MARK);
    route::redirect(next)
}

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    let Some(ip) = parse::ipv4(&ctx) else {
        return pass();
    };
    let Some(cfg) = maps::config() else {
        return pass();
    };
    // Replies of translated flows, also while the agent is gone: the flows live on.
    if ip.daddr == cfg.node_ip {
        if let Some(verdict) = nat::reverse(&ctx, &cfg, &ip) {
            return verdict;
        }
    }
    if agent_gone(&cfg) {
        return pass_as(Counter::AgentGone);
    }
    let l4_off = ETH_HLEN + ip.header_len();
    // Tunnel packets to this node; to another address they are not ours.
    if ip.protocol == IPPROTO_UDP && ip.carries_l4_header() && ip.daddr == cfg.node_ip {
        if let Some(udp) = parse::read::<UdpHdr>(&ctx, l4_off) {
            if u16::from_be_bytes(udp.dest) == cfg.vxlan_port {
                return from_tunnel(&ctx, &cfg, &ip, l4_off + size_of::<UdpHdr>());
            }
        }
    }
    if cfg.flags & CONFIG_FAST_PATH_OFF != 0 {
        return pass();
    }
    from_route(&ctx, &cfg, ip)
}

/// Whether the agent stopped refreshing the config for longer than it allows: then the
/// maps may be stale (a new node not yet a peer, say), and the kernel path, which needs no
/// agent to decapsulate, takes everything.
#[inline(always)]
pub(crate) fn agent_gone(cfg: &DataplaneConfig) -> bool {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    cfg.stale_after_ns != 0 && now.wrapping_sub(cfg.refreshed_ns) > cfg.stale_after_ns
}

/// A UDP packet to the VXLAN port, whose UDP payload starts at `payload_off`.
#[inline(always)]
fn from_tunnel(ctx: &TcContext, cfg: &DataplaneConfig, ip: &Ipv4Hdr, payload_off: usize) -> i32 {
    // The kernel reassembles fragmented tunnel packets and decapsulates them.
    if ip.is_fragment() {
        return pass();
    }
    let Some(payload) = parse::read::<VxlanPayload>(ctx, payload_off) else {
        return drop(Counter::DropMalformed);
    };
    // Another VNI on the same port belongs to another device, if any: the kernel's call.
    if !payload.is_vni(cfg.vni) {
        return pass_as(Counter::ForeignVni);
    }
    // flannel.<VNI> decapsulates from anyone who can reach the port; weft
    // accepts tunnels only from nodes that hold a lease.
    if !maps::is_peer(ip.saddr) {
        return drop(Counter::DropUnknownPeer);
    }
    if payload.inner_eth.proto != ETH_P_IP {
        return pass();
    }
    let inner_off = payload_off + size_of::<VxlanPayload>();
    let Some(inner) = parse::read::<Ipv4Hdr>(ctx, inner_off) else {
        return drop(Counter::DropMalformed);
    };
    // A peer tunnels only what comes from its own lease, or from its own address (a reply
    // its stack un-DNATed, a hostPort's say): an outer source is easy to forge on the
    // underlay, and flannel.<VNI> would deliver whatever is inside.
    match maps::lease(inner.saddr) {
        _ if inner.saddr == ip.saddr => {}
        Some(lease) if lease.public_ip == ip.saddr => {}
        // The lease may be one the map had no room for: the kernel path decides.
        None if cfg.flags & CONFIG_LEASES_INCOMPLETE != 0 => return pass(),
        _ => return drop(Counter::DropSpoofedInner),
    }
    if cfg.flags & CONFIG_FAST_PATH_OFF != 0 {
        return pass();
    }
    // Not for a local pod (the node itself, say): flannel.<VNI> takes it.
    let Some(endpoint) = maps::endpoint(inner.daddr) else {
        return pass();
    };
    // The stack's connections are decapsulated by flannel.<VNI>, into the stack.
    if let Some(verdict) = stack_verdict(ctx, &inner, inner_off, inner.daddr) {
        return verdict;
    }
    match vxlan::decap(ctx, ip, &endpoint) {
        Ok(()) => redirected(Counter::Decap, deliver(endpoint.ifindex)),
        Err(RewriteError::Refused) => pass(),
        Err(RewriteError::Partial) => drop(Counter::DropHelperFailed),
    }
}

/// An unencapsulated packet: routed (host-gw, DirectRouting) traffic for a
/// local pod from a direct lease's node is delivered into it, anything else
/// goes to the kernel.
#[inline(always)]
fn from_route(ctx: &TcContext, cfg: &DataplaneConfig, mut ip: Ipv4Hdr) -> i32 {
    let Some(endpoint) = maps::endpoint(ip.daddr) else {
        return pass();
    };
    if ip.ttl <= 1 {
        return pass();
    }
    // From a source the node reaches otherwise (itself, a NodePort client), replies
    // leave through the stack: the connection's packets must enter through it too.
    let Some(lease) = maps::lease(ip.saddr) else {
        return pass();
    };
    if !from_lease_node(ctx, cfg, &ip, &lease) {
        return pass_as(Counter::NotFromLeaseNode);
    }
    if let Some(verdict) = stack_verdict(ctx, &ip, ETH_HLEN, ip.daddr) {
        return verdict;
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

/// Whether a routed packet from a pod of `lease` was sent by that lease's node: the lease
/// is direct, and the frame comes from the MAC the node's neighbour table has for the
/// next hop towards the lease, which is the lease's public IP.
#[inline(always)]
fn from_lease_node(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    ip: &Ipv4Hdr,
    lease: &LeaseEntry,
) -> bool {
    if lease.mode != LEASE_DIRECT {
        return false;
    }
    let Some(eth) = parse::read::<EthHdr>(ctx, 0) else {
        return false;
    };
    let Some(back) = route::lookup(ctx, cfg.node_ip, ip.saddr, cfg.uplink_ifindex) else {
        return false;
    };
    back.ip == lease.public_ip && back.macs.is_some_and(|m| m.dst == eth.src)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // Only the stack's packets get here: the fast path enters the pod past this hook.
    if let Some(ip) = parse::ipv4(&ctx) {
        record(&ctx, &ip, ETH_HLEN, ip.daddr, ip.saddr, RECORDED_TO_POD);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of this program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & FAST_PATH_MARK != 0 {
        ctx.set_mark(mark & !FAST_PATH_MARK);
        return TC_ACT_UNSPEC;
    }
    let (Some(ip), Some(cfg)) = (parse::ipv4(&ctx), maps::config()) else {
        return TC_ACT_UNSPEC;
    };
    // Pod traffic leaving the cluster, after the stack: source NAT.
    if let Some(verdict) = nat::snat(&ctx, &cfg, &ip) {
        return verdict;
    }
    // flannel.<VNI>'s own tunnel packets: the connection is the inner packet's.
    let l4_off = ETH_HLEN + ip.header_len();
    if ip.saddr == cfg.node_ip && ip.protocol == IPPROTO_UDP && ip.carries_l4_header() {
        if let Some(udp) = parse::read::<UdpHdr>(&ctx, l4_off) {
            if u16::from_be_bytes(udp.dest) == cfg.vxlan_port {
                let inner_off = l4_off + size_of::<UdpHdr>() + size_of::<VxlanPayload>();
                if let Some(inner) = parse::read::<Ipv4Hdr>(&ctx, inner_off) {
                    record_from_pod(&ctx, &inner, inner_off);
                }
                return TC_ACT_UNSPEC;
            }
        }
    }
    record_from_pod(&ctx, &ip, ETH_HLEN);
    TC_ACT_UNSPEC
}

/// Records the connection of a packet the stack sends from a local pod to another node:
/// its replies come back for that pod and must meet the stack that translated it.
#[inline(always)]
fn record_from_pod(ctx: &TcContext, ip: &Ipv4Hdr, l3_off: usize) {
    if maps::endpoint(ip.saddr).is_none() {
        return;
    }
    record(ctx, ip, l3_off, ip.saddr, ip.daddr, RECORDED_TO_NETDEV);
}

/// Records the connection of a packet the stack carries between the local pod `pod` and
/// `remote`, if the fast path could otherwise carry its other packets: only a remote in a
/// lease (a pod on another node) or a peer node's own address can be redirected, so the
/// rest (the outside, the underlay) never takes room. With no room left, the pod takes
/// the kernel path for all its traffic (`stack_pods`) rather than have this connection's
/// packets redirected past the stack that translates them.
#[inline(always)]
fn record(ctx: &TcContext, ip: &Ipv4Hdr, l3_off: usize, pod: [u8; 4], remote: [u8; 4], by: u32) {
    let Some(key) = flow::key_of(ctx, ip, l3_off) else {
        return;
    };
    // Most of the stack's packets belong to a connection already recorded: one lookup.
    if flow::is_stack_flow(&key) {
        return;
    }
    if maps::lease(remote).is_none() && !maps::is_peer(remote) {
        return;
    }
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match maps::record_stack_flow(&key, by, now) {
        maps::Recorded::New => count(Counter::FlowRecorded),
        maps::Recorded::Known => {}
        maps::Recorded::NoRoom => {
            maps::put_pod_on_stack(pod, now);
            count(Counter::FlowTableFull);
        }
    }
}

/// `Some(verdict)` for a packet of the local pod `pod` that the kernel path must carry:
/// one whose connection the stack carries, of a pod whose connections could not all be
/// recorded, or that cannot be told apart (fragments, ICMP errors).
#[inline(always)]
fn stack_verdict(ctx: &TcContext, ip: &Ipv4Hdr, l3_off: usize, pod: [u8; 4]) -> Option<i32> {
    if maps::pod_on_stack(pod) {
        return Some(pass_as(Counter::PodOnStack));
    }
    match flow::key_of(ctx, ip, l3_off) {
        None => Some(pass()),
        Some(key) if flow::is_stack_flow(&key) => Some(stack_flow()),
        Some(_) => None,
    }
}

/// Delivers the frame into the pod behind host-side veth `ifindex`:
/// `bpf_redirect_peer` switches to the pod's namespace and enters its
/// ingress directly, skipping the host's backlog queue.
#[inline(always)]
pub(crate) fn deliver(ifindex: u32) -> i64 {
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
