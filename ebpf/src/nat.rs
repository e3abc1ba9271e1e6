//! Source NAT of pod traffic leaving the cluster: flannel's `--ip-masq`, in BPF.
//!
//! - `from_pod` marks a pod's packet (`NAT_MARK`) when these programs will translate it:
//!   TCP, UDP or ICMP echo, unfragmented, while the table has room and the agent is
//!   there. The kernel's masquerade rule skips marked packets and keeps the rest: the
//!   fallback. Conntrack decides NAT on a flow's first packet, so each flow has one owner.
//! - `to_netdev`, after the stack (kube-proxy's DNAT and masquerade, policy, routing),
//!   translates what still leaves the uplink with a pod source toward the outside: to the
//!   uplink's address and a port from `nat_port_min..=nat_port_max`, outside the node's
//!   ephemeral range. An existing mapping is always applied, so a flow keeps its address
//!   while the agent is gone; nothing leaves with a pod address unless
//!   the destination is excluded or masquerading is off.
//! - `from_netdev` translates replies, and ICMP errors quoting a translated packet (inner
//!   header included: path MTU discovery keeps working), back to the pod before the
//!   stack sees them: conntrack then finds the flow as the pod sent it.
//!
//! Checksums are updated incrementally by the kernel's helpers (pseudo header included),
//! which keeps CHECKSUM_PARTIAL (GSO) and CHECKSUM_COMPLETE packets right.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        BPF_F_CURRENT_NETNS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC,
    },
    helpers::generated::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use weft_common::{
    Counter, DataplaneConfig, NatEntry, NatKey, CONFIG_FAST_PATH_OFF, NAT_DRAIN, NAT_ENABLED, NAT_FAST,
    NAT_FAST_OK, NAT_MARK, NAT_SEEN_CLOSE, NAT_SEEN_REPLY,
};

use crate::{
    counters::{count, drop, redirected},
    csum, maps,
    parse::{
        self, read, Ipv4Hdr, ETH_HLEN, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP,
    },
    route::{self, Macs},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Ports tried for a new mapping before the packet is dropped.
const ALLOC_TRIES: u32 = 16;
/// How stale a timestamp may get before a packet rewrites it (fewer writes to shared
/// cache lines; the collector's timeouts are seconds to hours).
const TOUCH_NS: u64 = 1_000_000_000;

/// Offsets of the fields NAT rewrites.
const IP_CHECK: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
const TCP_CHECK: usize = 16;
const TCP_FLAGS: usize = 13;
const UDP_CHECK: usize = 6;
const ICMP_CHECK: usize = 2;
const ICMP_ID: usize = 4;
/// The header of an ICMP error before the quoted packet.
const ICMP_HLEN: usize = 8;

#[inline(always)]
fn be32(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr)
}

#[inline(always)]
fn in_network(cfg: &DataplaneConfig, addr: [u8; 4]) -> bool {
    be32(addr) & be32(cfg.network_mask) == be32(cfg.network)
}

/// Whether a packet from a pod to `daddr` is one flannel's rules masquerade: out of the
/// pod network, not multicast, and not excluded by the operator.
#[inline(always)]
fn leaves_cluster(cfg: &DataplaneConfig, daddr: [u8; 4]) -> bool {
    !in_network(cfg, daddr) && daddr[0] & 0xf0 != 0xe0 && !maps::nat_excluded(daddr)
}

/// `from_pod`: marks a pod packet whose source NAT these programs will do, or counts it
/// as left to the kernel's masquerade when the table is near full. A packet of a flow that
/// has a mapping is always marked, also with the agent gone (`agent_gone`): should the
/// node's conntrack take the flow for a new one (its entry expired while the fast path
/// carried it), the masquerade rule must not give it another port.
#[inline(always)]
pub fn mark_from_pod(ctx: &TcContext, cfg: &DataplaneConfig, ip: &Ipv4Hdr, agent_gone: bool) {
    if cfg.nat_flags & NAT_ENABLED == 0 || ip.is_fragment() || !in_network(cfg, ip.saddr) {
        return;
    }
    // The destination may still change (a Service's DNAT); the mark only says who will
    // translate if the packet leaves the cluster.
    if in_network(cfg, ip.daddr) {
        return;
    }
    let l4_off = ETH_HLEN + ip.header_len();
    let translatable = match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => true,
        IPPROTO_ICMP => icmp_type(ctx, l4_off) == Some(ICMP_ECHO_REQUEST),
        _ => false,
    };
    if !translatable {
        return;
    }
    let mapped = ports(ctx, ip, l4_off).is_some_and(|(sport, dport)| {
        maps::nat(&NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport)).is_some()
    });
    if !mapped {
        if agent_gone || cfg.nat_flags & NAT_DRAIN != 0 {
            return;
        }
        if maps::nat_entries() >= u64::from(cfg.nat_limit) {
            count(Counter::NatFallback);
            return;
        }
    }
    // SAFETY: reading a field of this program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | NAT_MARK);
}

/// What identifies a packet's flow for NAT: its ports (ICMP echo: the identifier, as both).
#[inline(always)]
fn ports(ctx: &TcContext, ip: &Ipv4Hdr, l4_off: usize) -> Option<([u8; 2], [u8; 2])> {
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP => parse::ports(ctx, ip.protocol, l4_off),
        _ => None,
    }
}

/// `to_netdev`: translates a packet leaving with a pod source toward the outside.
/// `None` when the packet is not one to translate.
#[inline(always)]
pub fn snat(ctx: &TcContext, cfg: &DataplaneConfig, ip: &Ipv4Hdr) -> Option<i32> {
    if !in_network(cfg, ip.saddr) || !leaves_cluster(cfg, ip.daddr) {
        return None;
    }
    // Without BPF NAT there are no mappings to apply: the agent writes no port range then,
    // so `from_netdev` could not translate their replies either.
    if cfg.nat_flags & NAT_ENABLED == 0 {
        return None;
    }
    let l4_off = ETH_HLEN + ip.header_len();
    // A later fragment of a translated datagram: only its address can (and must) change.
    if !ip.carries_l4_header() {
        return Some(verdict(
            rewrite_saddr(ctx, ip, cfg.node_ip),
            Counter::NatOut,
        ));
    }
    // ICMP errors and other protocols are the kernel's (conntrack relates them).
    let (sport, dport) = ports(ctx, ip, l4_off)?;
    let key = NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport);
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mapping = match maps::nat(&key) {
        Some(entry) => {
            let opening = ip.protocol == IPPROTO_TCP && opens_flow(ctx, ip, l4_off);
            // SAFETY: a non-null lookup result points at the map's value.
            let still_held = unsafe {
                touch(entry, now, closing(ctx, ip, l4_off));
                !opening || reopen(&key, entry, now)
            };
            if still_held {
                // SAFETY: as above.
                unsafe { *entry }
            } else {
                // The port went to another flow after this one closed: a new one.
                maps::nat_forget(&key);
                match allocate(ctx, cfg, &key, now) {
                    Some(mapping) => mapping,
                    None => return Some(drop(Counter::NatAllocFailed)),
                }
            }
        }
        // Only what starts a flow from the pod gets a mapping, as conntrack translates
        // only a connection's first packet: the answers of a pod's server to a client
        // that reached it unmasqueraded keep the pod's address.
        None if !opens_flow(ctx, ip, l4_off) => return None,
        None => match allocate(ctx, cfg, &key, now) {
            Some(mapping) => mapping,
            None => return Some(drop(Counter::NatAllocFailed)),
        },
    };
    Some(verdict(
        rewrite(
            ctx,
            ip,
            l4_off,
            IP_SADDR,
            ip.saddr,
            mapping.addr,
            sport,
            mapping.port,
            PortAt::Source,
        ),
        Counter::NatOut,
    ))
}

/// The verdict after a rewrite: on to the stack, counted; a helper that failed midway
/// left the packet half-translated, so it is dropped.
#[inline(always)]
fn verdict<E>(done: Result<(), E>, counter: Counter) -> i32 {
    match done {
        Ok(()) => {
            count(counter);
            TC_ACT_UNSPEC
        }
        Err(_) => drop(Counter::DropHelperFailed),
    }
}

/// Whether the packet can open a flow: a TCP SYN (without ACK), an ICMP echo request,
/// any UDP datagram.
#[inline(always)]
fn opens_flow(ctx: &TcContext, ip: &Ipv4Hdr, l4_off: usize) -> bool {
    match ip.protocol {
        IPPROTO_TCP => tcp_flags(ctx, l4_off).is_some_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN),
        IPPROTO_ICMP => icmp_type(ctx, l4_off) == Some(ICMP_ECHO_REQUEST),
        _ => true,
    }
}

/// Whether a TCP packet carries FIN or RST.
#[inline(always)]
fn closing(ctx: &TcContext, ip: &Ipv4Hdr, l4_off: usize) -> bool {
    ip.protocol == IPPROTO_TCP
        && tcp_flags(ctx, l4_off).is_some_and(|f| f & (TCP_FIN | TCP_RST) != 0)
}

// Single bytes are read as pairs: the bounds check LLVM emits for a one-byte read
// (`ptr >= end`) proves no bytes to the verifier.

/// The TCP flags byte (with the data offset before it).
#[inline(always)]
fn tcp_flags(ctx: &TcContext, l4_off: usize) -> Option<u8> {
    read::<[u8; 2]>(ctx, l4_off + TCP_FLAGS - 1).map(|b| b[1])
}

/// The ICMP type (with the code after it).
#[inline(always)]
fn icmp_type(ctx: &TcContext, l4_off: usize) -> Option<u8> {
    read::<[u8; 2]>(ctx, l4_off).map(|b| b[0])
}

/// Refreshes an entry's timestamp (at most once a second) and records a close (with its
/// time).
///
/// # Safety
/// `entry` must point at a NAT map value.
#[inline(always)]
unsafe fn touch(entry: *mut NatEntry, now: u64, close: bool) {
    if now.wrapping_sub((*entry).last_seen_ns) > TOUCH_NS {
        (*entry).last_seen_ns = now;
    }
    // The close's own time: a closed port is reused soon after it.
    if close && (*entry).state & NAT_SEEN_CLOSE == 0 {
        (*entry).state |= NAT_SEEN_CLOSE;
        (*entry).last_seen_ns = now;
    }
}

/// A TCP SYN on a mapping whose flow has closed starts a new flow on it (a client that
/// reuses its source port, as `tcp_tw_reuse` does): both directions lose their close and
/// reply marks, so the port is no longer free to take over, and a fast-path mark, so the
/// new flow's first packets cross the node's stack. False when the port is no longer this
/// flow's (another flow took it over once it had closed).
///
/// # Safety
/// `entry` must point at the `nat` map value of `key`.
#[inline(always)]
unsafe fn reopen(key: &NatKey, entry: *mut NatEntry, now: u64) -> bool {
    let reply = reply_key(key, &*entry);
    let Some(back) = maps::nat_reverse(&reply) else {
        return false;
    };
    let held = *back;
    if held.addr != key.src_ip || held.port != key.src_port {
        return false;
    }
    if ((*entry).state | held.state) & NAT_SEEN_CLOSE == 0 {
        return true;
    }
    // Another CPU claimed the port since: a retransmitted SYN reopened it (then it is
    // still this flow's, and the SYN goes on), or a new flow took it over (it is not).
    if !maps::nat_claim(&reply, &held) {
        return maps::nat_reverse(&reply).is_some_and(|b| {
            (*b).addr == key.src_ip && (*b).port == key.src_port && (*b).state & NAT_SEEN_CLOSE == 0
        });
    }
    let reopened = NatEntry {
        state: 0,
        last_seen_ns: now,
        ..held
    };
    if !maps::nat_reverse_set(&reply, &reopened) {
        return false;
    }
    (*entry).state = 0;
    (*entry).last_seen_ns = now;
    true
}

/// The key of the replies of flow `key`, mapped to `mapping` (ICMP echo: the identifier is
/// both "ports" of the reply).
#[inline(always)]
fn reply_key(key: &NatKey, mapping: &NatEntry) -> NatKey {
    let reply_src = if key.protocol == IPPROTO_ICMP {
        mapping.port
    } else {
        key.dst_port
    };
    NatKey::new(
        key.protocol,
        key.dst_ip,
        reply_src,
        mapping.addr,
        mapping.port,
    )
}

/// A new mapping for `key`: the uplink's address and the first free port of a few tried
/// from a random start (or the one another CPU just made for the same flow). A port the
/// node's own sockets hold toward that destination (or listen or are bound on) is skipped.
#[inline(always)]
fn allocate(ctx: &TcContext, cfg: &DataplaneConfig, key: &NatKey, now: u64) -> Option<NatEntry> {
    let min = u32::from(cfg.nat_port_min);
    let max = u32::from(cfg.nat_port_max);
    if min == 0 || max < min {
        return None;
    }
    let span = max - min + 1;
    // Spelled out, so the compiler emits no division-by-zero panic (the verifier refuses
    // a program that can end in a call).
    if span == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    let mut i = 0;
    while i < ALLOC_TRIES {
        let port = ((min + (start + i) % span) as u16).to_be_bytes();
        let out = NatEntry {
            addr: cfg.node_ip,
            port,
            state: 0,
            _pad: 0,
            last_seen_ns: now,
        };
        let reverse_key = reply_key(key, &out);
        if host_socket(ctx, &reverse_key, false) {
            i += 1;
            continue;
        }
        let back = NatEntry {
            addr: key.src_ip,
            port: key.src_port,
            state: 0,
            _pad: 0,
            last_seen_ns: now,
        };
        if let Some(mapping) = maps::nat_insert(key, &out, &reverse_key, &back) {
            if mapping.port == port {
                count(Counter::NatAlloc);
            }
            return Some(mapping);
        }
        // The port is held toward this destination: free if its flow has ended.
        if let Some(mapping) = take_over_finished(key, &out, &reverse_key, &back, now) {
            if mapping.port == port {
                count(Counter::NatAlloc);
            }
            return Some(mapping);
        }
        i += 1;
    }
    None
}

/// How long after a TCP close a port may serve another flow toward the same destination:
/// after FINs both ways only the last ACK may still be on its way; after a FIN or RST one
/// way, a little longer. The pod keeps its own TIME_WAIT for its address and port.
const CLOSED_BOTH_WAYS_REUSE_NS: u64 = 20_000_000;
const CLOSED_REUSE_NS: u64 = 200_000_000;

/// Whether the flow of a mapping has ended: closed (`out_state` is the pod's direction's
/// state, `back_state` the replies'), or idle past conntrack's timeout since
/// `last_seen_ns`. The collector's rules, inline.
#[inline(always)]
fn finished(protocol: u8, out_state: u8, back_state: u8, last_seen_ns: u64, now: u64) -> bool {
    let idle = now.wrapping_sub(last_seen_ns);
    let secs: u64 = 1_000_000_000;
    let state = out_state | back_state;
    match protocol {
        IPPROTO_TCP if out_state & back_state & NAT_SEEN_CLOSE != 0 => {
            idle > CLOSED_BOTH_WAYS_REUSE_NS
        }
        IPPROTO_TCP if state & NAT_SEEN_CLOSE != 0 => idle > CLOSED_REUSE_NS,
        IPPROTO_TCP if state & NAT_SEEN_REPLY != 0 => idle > 432_000 * secs,
        IPPROTO_TCP => idle > 120 * secs,
        IPPROTO_UDP if state & NAT_SEEN_REPLY != 0 => idle > 120 * secs,
        _ => idle > 30 * secs,
    }
}

/// Takes over the port `reverse_key` names when the flow holding it has finished.
#[inline(always)]
fn take_over_finished(
    key: &NatKey,
    out: &NatEntry,
    reverse_key: &NatKey,
    back: &NatEntry,
    now: u64,
) -> Option<NatEntry> {
    // SAFETY: a non-null lookup result points at the map's value.
    let held = unsafe { *maps::nat_reverse(reverse_key)? };
    // The holder's own mapping: its pod's address and port toward this destination.
    let held_dst_port = if key.protocol == IPPROTO_ICMP {
        held.port
    } else {
        key.dst_port
    };
    let old_key = NatKey::new(
        key.protocol,
        held.addr,
        held.port,
        key.dst_ip,
        held_dst_port,
    );
    let (out_state, last) = match maps::nat(&old_key) {
        // SAFETY: as above.
        Some(old) => unsafe { ((*old).state, (*old).last_seen_ns.max(held.last_seen_ns)) },
        None => (NAT_SEEN_CLOSE, held.last_seen_ns),
    };
    if !finished(key.protocol, out_state, held.state, last, now) {
        return None;
    }
    // Unless another CPU took the port over or reopened its flow since `held` was read.
    if !maps::nat_claim(reverse_key, &held) || !maps::nat_reverse_set(reverse_key, back) {
        return None;
    }
    maps::nat_take_over(&old_key, key, out)
}

/// TCP's LISTEN state as `struct bpf_sock` reports it.
const BPF_TCP_LISTEN: u32 = 10;

/// Whether the node has a socket for packets of `key` (a reply's key: outside → node):
/// with `connected`, a TCP connection or a connected UDP socket; else also a TCP listener
/// or a bound UDP socket on the port. ICMP has no sockets to ask.
#[inline(always)]
fn host_socket(ctx: &TcContext, key: &NatKey, connected: bool) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(key.src_ip),
                daddr: u32::from_ne_bytes(key.dst_ip),
                sport: u16::from_ne_bytes(key.src_port),
                dport: u16::from_ne_bytes(key.dst_port),
            },
        },
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let skb = ctx.skb.skb.cast::<c_void>();
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: helper calls with this program's own context and a tuple on the stack; the
    // socket they return is read, then released on every path.
    unsafe {
        let sk = match key.protocol {
            IPPROTO_TCP => bpf_skc_lookup_tcp(skb, &mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(skb, &mut tuple, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        let held = match key.protocol {
            _ if !connected => true,
            IPPROTO_TCP => (*sk).state != BPF_TCP_LISTEN,
            _ => (*sk).dst_port != 0,
        };
        bpf_sk_release(sk.cast());
        held
    }
}

/// Which port field a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PortAt {
    Source,
    Destination,
}

/// Rewrites the address at `addr_off` of the IP header (`old_addr` → `new_addr`) and the
/// source or destination port (ICMP echo: the identifier), with every checksum.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    l4_off: usize,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    old_port: [u8; 2],
    new_port: [u8; 2],
    at: PortAt,
) -> Result<(), ()> {
    let (old_a, new_a) = (
        u64::from(u32::from_ne_bytes(old_addr)),
        u64::from(u32::from_ne_bytes(new_addr)),
    );
    let (old_p, new_p) = (
        u64::from(u16::from_ne_bytes(old_port)),
        u64::from(u16::from_ne_bytes(new_port)),
    );
    let port_off = match (ip.protocol, at) {
        (IPPROTO_ICMP, _) => l4_off + ICMP_ID,
        (_, PortAt::Source) => l4_off,
        (_, PortAt::Destination) => l4_off + 2,
    };
    match ip.protocol {
        IPPROTO_TCP => {
            let check = l4_off + TCP_CHECK;
            ctx.l4_csum_replace(check, old_a, new_a, u64::from(BPF_F_PSEUDO_HDR) | 4)
                .map_err(|_| ())?;
            ctx.l4_csum_replace(check, old_p, new_p, 2)
                .map_err(|_| ())?;
        }
        IPPROTO_UDP => {
            let check = l4_off + UDP_CHECK;
            let flags = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
            ctx.l4_csum_replace(check, old_a, new_a, flags | 4)
                .map_err(|_| ())?;
            ctx.l4_csum_replace(check, old_p, new_p, u64::from(BPF_F_MARK_MANGLED_0) | 2)
                .map_err(|_| ())?;
        }
        // ICMP's checksum has no pseudo header: only the identifier counts.
        _ => {
            ctx.l4_csum_replace(l4_off + ICMP_CHECK, old_p, new_p, 2)
                .map_err(|_| ())?;
        }
    }
    ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + addr_off, &new_addr, 0)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(ETH_HLEN + IP_CHECK, old_a, new_a, 4)
        .map_err(|_| ())
}

/// `from_pod`, `--masquerade-fast-path`: a later packet of a translated flow, translated
/// and sent to the uplink from here. Only flows that have a mapping qualify, and the
/// mapping is keyed by the packet as it left the stack: a flow the stack rewrote (a
/// Service's DNAT) does not match it here and keeps taking the stack.
#[inline(always)]
pub fn fast_out(ctx: &TcContext, cfg: &DataplaneConfig, ip: &Ipv4Hdr) -> Option<i32> {
    let both = NAT_ENABLED | NAT_FAST;
    if cfg.nat_flags & both != both || ip.ttl <= 1 || ip.is_fragment() {
        return None;
    }
    if !in_network(cfg, ip.saddr) || !leaves_cluster(cfg, ip.daddr) {
        return None;
    }
    // SAFETY: reading a field of this program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if maps::endpoint(ip.saddr).is_none_or(|e| e.ifindex != ifindex) {
        return None;
    }
    let l4_off = ETH_HLEN + ip.header_len();
    let (sport, dport) = ports(ctx, ip, l4_off)?;
    // A connection's opening crosses the stack (conntrack, a Service's DNAT), also on a
    // port the pod reuses.
    if ip.protocol == IPPROTO_TCP && opens_flow(ctx, ip, l4_off) {
        return None;
    }
    let key = NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport);
    let entry = maps::nat(&key)?;
    let next = route::lookup(ctx, cfg.node_ip, ip.daddr, cfg.uplink_ifindex)?;
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a non-null lookup result points at the map's value.
    let mapping = unsafe {
        touch(entry, now, closing(ctx, ip, l4_off));
        *entry
    };
    // Found under the packet as the pod sent it: the stack did not rewrite this flow, so
    // its replies may skip the stack too.
    if let Some(back) = maps::nat_reverse(&reply_key(&key, &mapping)) {
        // SAFETY: as above.
        unsafe {
            if (*back).state & NAT_FAST_OK == 0 {
                (*back).state |= NAT_FAST_OK;
            }
        }
    }
    let (new, port) = (mapping.addr, (sport, mapping.port));
    if !forward_translated(ctx, ip, next.macs, l4_off, PortAt::Source, new, port)? {
        return Some(drop(Counter::DropHelperFailed));
    }
    Some(redirected(
        Counter::NatFastOut,
        crate::to_uplink(ctx, &next),
    ))
}

/// `from_netdev`, `--masquerade-fast-path`: a reply of a translated flow, translated and
/// delivered straight into its pod.
#[inline(always)]
fn fast_in(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    ip: &Ipv4Hdr,
    l4_off: usize,
    dport: [u8; 2],
    pod: &NatEntry,
) -> Option<i32> {
    if cfg.nat_flags & NAT_FAST == 0
        || pod.state & NAT_FAST_OK == 0
        || cfg.flags & CONFIG_FAST_PATH_OFF != 0
        || crate::agent_gone(cfg)
        || ip.ttl <= 1
    {
        return None;
    }
    let endpoint = maps::endpoint(pod.addr)?;
    let macs = Macs {
        src: endpoint.host_mac,
        dst: endpoint.pod_mac,
    };
    let port = (dport, pod.port);
    if !forward_translated(
        ctx,
        ip,
        Some(macs),
        l4_off,
        PortAt::Destination,
        pod.addr,
        port,
    )? {
        return Some(drop(Counter::DropHelperFailed));
    }
    Some(redirected(
        Counter::NatFastIn,
        crate::deliver(endpoint.ifindex),
    ))
}

/// Forwards and translates in place: the header with its TTL decremented and the new MACs
/// first (one store; if it fails nothing changed: `None`), then the source (`at` Source)
/// or destination address becomes `new` and its port `port.0` becomes `port.1`.
/// `Some(false)` when a helper failed midway.
#[inline(always)]
fn forward_translated(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    macs: Option<Macs>,
    l4_off: usize,
    at: PortAt,
    new: [u8; 4],
    port: ([u8; 2], [u8; 2]),
) -> Option<bool> {
    let mut forwarded = *ip;
    csum::dec_ttl(&mut forwarded);
    route::rewrite(ctx, macs, &forwarded).ok()?;
    let (addr_off, old) = match at {
        PortAt::Source => (IP_SADDR, ip.saddr),
        PortAt::Destination => (IP_DADDR, ip.daddr),
    };
    Some(rewrite(ctx, ip, l4_off, addr_off, old, new, port.0, port.1, at).is_ok())
}

/// Rewrites only the source address (packets without ports).
#[inline(always)]
fn rewrite_saddr(ctx: &TcContext, ip: &Ipv4Hdr, new_addr: [u8; 4]) -> Result<(), ()> {
    let (old_a, new_a) = (
        u64::from(u32::from_ne_bytes(ip.saddr)),
        u64::from(u32::from_ne_bytes(new_addr)),
    );
    ctx.store(ETH_HLEN + IP_SADDR, &new_addr, 0)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(ETH_HLEN + IP_CHECK, old_a, new_a, 4)
        .map_err(|_| ())
}

/// `from_netdev`: translates a packet for the node that answers a translated flow back to
/// the pod. `None` when it is not one.
#[inline(always)]
pub fn reverse(ctx: &TcContext, cfg: &DataplaneConfig, ip: &Ipv4Hdr) -> Option<i32> {
    if cfg.nat_port_max == 0 || !ip.carries_l4_header() {
        return None;
    }
    let l4_off = ETH_HLEN + ip.header_len();
    if ip.protocol == IPPROTO_ICMP {
        let kind = icmp_type(ctx, l4_off)?;
        if matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
        ) {
            return reverse_icmp_error(ctx, ip, l4_off);
        }
        // Of the rest, only echo replies answer a translated flow.
        if kind != ICMP_ECHO_REPLY {
            return None;
        }
    }
    let (sport, dport) = ports(ctx, ip, l4_off)?;
    let port = u16::from_be_bytes(dport);
    if port < cfg.nat_port_min || port > cfg.nat_port_max {
        return None;
    }
    let key = NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport);
    let entry = maps::nat_reverse(&key)?;
    // A connection of the node's own on that port (made after the mapping) is the node's.
    if host_socket(ctx, &key, true) {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a non-null lookup result points at the map's value.
    let pod = unsafe {
        touch(entry, now, closing(ctx, ip, l4_off));
        if (*entry).state & NAT_SEEN_REPLY == 0 {
            (*entry).state |= NAT_SEEN_REPLY;
        }
        *entry
    };
    if let Some(verdict) = fast_in(ctx, cfg, ip, l4_off, dport, &pod) {
        return Some(verdict);
    }
    Some(verdict(
        rewrite(
            ctx,
            ip,
            l4_off,
            IP_DADDR,
            ip.daddr,
            pod.addr,
            dport,
            pod.port,
            PortAt::Destination,
        ),
        Counter::NatIn,
    ))
}

/// An ICMP error quoting a packet the node sent for a translated flow: the outer
/// destination and the quoted source (address and port) go back to the pod's.
#[inline(always)]
fn reverse_icmp_error(ctx: &TcContext, ip: &Ipv4Hdr, l4_off: usize) -> Option<i32> {
    let inner_off = l4_off + ICMP_HLEN;
    let inner: Ipv4Hdr = read(ctx, inner_off)?;
    if inner.saddr != ip.daddr || inner.version_ihl >> 4 != 4 || inner.header_len() < 20 {
        return None;
    }
    let inner_l4 = inner_off + inner.header_len();
    let (sport, dport) = ports(ctx, &inner, inner_l4)?;
    // The quoted packet went node:port → outside; its replies' key is the other way round.
    let key = NatKey::new(inner.protocol, inner.daddr, dport, inner.saddr, sport);
    let pod = maps::nat_reverse(&key)?;
    // SAFETY: a non-null lookup result points at the map's value.
    let pod = unsafe { *pod };
    let (old_a, new_a) = (
        u64::from(u32::from_ne_bytes(inner.saddr)),
        u64::from(u32::from_ne_bytes(pod.addr)),
    );
    let (old_p, new_p) = (
        u64::from(u16::from_ne_bytes(sport)),
        u64::from(u16::from_ne_bytes(pod.port)),
    );
    let inner_port_off = if inner.protocol == IPPROTO_ICMP {
        inner_l4 + ICMP_ID
    } else {
        inner_l4
    };
    let done = (|| {
        // The quoted source address and its header checksum change together: the sum
        // over the quoted header, hence the ICMP checksum, stays the same.
        ctx.store(inner_off + IP_SADDR, &pod.addr, 0)?;
        ctx.l3_csum_replace(inner_off + IP_CHECK, old_a, new_a, 4)?;
        // The quoted port is covered by the ICMP checksum only (the quoted L4 checksum
        // is left as it is, as the kernel's NAT does for a partial quote).
        ctx.store(inner_port_off, &pod.port, 0)?;
        ctx.l4_csum_replace(l4_off + ICMP_CHECK, old_p, new_p, 2)?;
        // The outer destination: the node → the pod (no pseudo header in ICMP).
        ctx.store(ETH_HLEN + IP_DADDR, &pod.addr, 0)?;
        ctx.l3_csum_replace(
            ETH_HLEN + IP_CHECK,
            u64::from(u32::from_ne_bytes(ip.daddr)),
            new_a,
            4,
        )
    })();
    Some(verdict(done, Counter::NatIn))
}
