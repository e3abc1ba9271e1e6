//! Which connections the node's stack carries.
//!
//! A redirect skips this node's conntrack, NAT and FORWARD chain. That is right only for a
//! connection none of whose packets the stack handles here: once the stack has translated
//! or tracked one packet of it (kube-proxy's Service DNAT, portmap's hostPort DNAT, a
//! connection that began before its pod was learned), every packet of it must take the
//! kernel path on this node, in both directions, for its whole life. The stack's packets
//! are seen where it hands them on: `to_pod` (delivered into a local pod) and `to_netdev`
//! (sent to another node, after NAT). Those record the connection in `stack_flows`;
//! `from_pod` and `from_netdev` look every packet up there before they redirect it.
//!
//! The table must never forget a live connection, so it is not an LRU: a flood of new
//! flows would evict a Service connection's entry and its replies would skip the un-DNAT.
//! Only connections with a remote the fast path could redirect (a lease or a peer node)
//! are recorded; the agent removes an entry once the kernel's conntrack no longer knows
//! the connection (conntrack validated every packet that moved it, so spoofed RSTs or
//! FINs cannot shorten it). If the table is full, the pod whose connection could not be
//! recorded takes the kernel path for all its traffic (`stack_pods`) until the agent has
//! copied its connections from conntrack: slower, never wrong.

use aya_ebpf::programs::TcContext;
use weft_common::FlowKey;

use crate::{
    maps,
    parse::{self, Ipv4Hdr, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};

/// The connection of the IPv4 packet whose header `ip` starts at `l3_off`; `None` for a
/// packet that cannot be told apart by its own headers: a fragment (conntrack reassembles
/// those first), an ICMP error (it belongs to the connection it quotes), a truncated
/// header. Those take the kernel path.
#[inline(always)]
pub fn key_of(ctx: &TcContext, ip: &Ipv4Hdr, l3_off: usize) -> Option<FlowKey> {
    if ip.is_fragment() {
        return None;
    }
    let l4_off = l3_off + ip.header_len();
    let (sport, dport) = match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP => {
            parse::ports(ctx, ip.protocol, l4_off)?
        }
        _ => ([0; 2], [0; 2]),
    };
    Some(FlowKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport))
}

/// Whether the stack carries the connection of `key` on this node.
#[inline(always)]
pub fn is_stack_flow(key: &FlowKey) -> bool {
    maps::stack_flow(key)
}
