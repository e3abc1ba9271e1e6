//! Types shared by the weft agent (userspace, feature `user`) and its eBPF
//! programs (`weft-ebpf`): map names, map keys and values, constants.
//!
//! Everything here is `#[repr(C)]` plain data so that both sides agree on the
//! layout byte for byte. Addresses are stored as they appear on the wire
//! (network byte order, as `[u8; 4]`), so neither side converts per packet.
//! Map key/value structs get `unsafe impl aya::Pod` under `feature = "user"`.
//!
//! Map layouts (pinned under the agent's bpffs directory, default
//! `/sys/fs/bpf/weft/`, with BTF so `bpftool map dump pinned ...` names fields):
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | `leases` | LPM trie | `{ prefix_len: u32, subnet: [u8; 4] }` (aya's `lpm_trie::Key<[u8; 4]>`) | [`LeaseEntry`] |
//! | `peers` | hash | [`PeerKey`] (a lease's public IP) | [`PeerEntry`] |
//! | `endpoints` | hash | [`EndpointKey`] (local pod IP) | [`EndpointEntry`] |
//! | `config` | array[1] | `u32` 0 | [`DataplaneConfig`] |
//! | `counters` | per-CPU array | `u32` [`Counter`] index | `u64` packets |
//! | `stack_flows` | hash (no eviction; sized from `nf_conntrack_max`) | [`FlowKey`] (a connection, either direction) | [`FlowEntry`] |
//! | `stack_pods` | hash | [`EndpointKey`] (a local pod whose stack connection could not be recorded) | [`StackPod`] |
//! | `nat` | hash | [`NatKey`] (a pod's flow: pod → outside) | [`NatEntry`] (the node's address and port) |
//! | `nat_reverse` | hash | [`NatKey`] (its replies: outside → node) | [`NatEntry`] (the pod's address and port) |
//! | `nat_exclude` | LPM trie | `{ prefix_len: u32, net: [u8; 4] }` | `u32` (1): destinations that keep pod addresses |
//! | `nat_state` | array[1] | `u32` 0 | [`NatState`] |
//! | `nat_claims` | LRU hash | [`NatClaim`] (a port's replies' key and its holder as read) | `u8` (1) |
#![no_std]

/// Map names, as the programs declare them and as they are pinned.
pub const MAP_LEASES: &str = "leases";
pub const MAP_PEERS: &str = "peers";
pub const MAP_ENDPOINTS: &str = "endpoints";
pub const MAP_CONFIG: &str = "config";
pub const MAP_COUNTERS: &str = "counters";
pub const MAP_STACK_FLOWS: &str = "stack_flows";
pub const MAP_STACK_PODS: &str = "stack_pods";
pub const MAP_NAT: &str = "nat";
pub const MAP_NAT_REVERSE: &str = "nat_reverse";
pub const MAP_NAT_EXCLUDE: &str = "nat_exclude";
pub const MAP_NAT_STATE: &str = "nat_state";
pub const MAP_NAT_CLAIMS: &str = "nat_claims";
/// Every pinned map, for the agent's adoption and cleanup.
pub const ALL_MAPS: [&str; 12] = [
    MAP_LEASES,
    MAP_PEERS,
    MAP_ENDPOINTS,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_STACK_FLOWS,
    MAP_STACK_PODS,
    MAP_NAT,
    MAP_NAT_REVERSE,
    MAP_NAT_EXCLUDE,
    MAP_NAT_STATE,
    MAP_NAT_CLAIMS,
];

/// TC ingress of each pod's host-side veth: encapsulate or route to remote leases.
pub const PROG_FROM_POD: &str = "from_pod";
/// TC egress of each pod's host-side veth: sees exactly what the node's stack delivers
/// into the pod (the fast path enters pods with `bpf_redirect_peer`, past this hook) and
/// records those connections as the stack's.
pub const PROG_TO_POD: &str = "to_pod";
/// TC ingress of the uplink: decapsulate VXLAN from peers, deliver to local pods.
pub const PROG_FROM_NETDEV: &str = "from_netdev";
/// TC egress of the uplink: records the connections the node's stack sends to other
/// nodes (after its NAT), and clears the fast path's mark from the packets `from_pod`
/// redirected.
pub const PROG_TO_NETDEV: &str = "to_netdev";

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    PodIngress,
    PodEgress,
    UplinkIngress,
    UplinkEgress,
}

impl Attach {
    /// TC egress rather than ingress.
    pub const fn egress(self) -> bool {
        matches!(self, Attach::PodEgress | Attach::UplinkEgress)
    }
}

/// Every program of the object and where it runs.
pub const ALL_PROGRAMS: [(&str, Attach); 4] = [
    (PROG_FROM_POD, Attach::PodIngress),
    (PROG_TO_POD, Attach::PodEgress),
    (PROG_FROM_NETDEV, Attach::UplinkIngress),
    (PROG_TO_NETDEV, Attach::UplinkEgress),
];

/// The bit of `skb->mark` that `from_pod` sets on the packets it redirects to the uplink,
/// so that `to_netdev` tells them from the stack's own and clears it: the packet never
/// leaves the node, nor meets netfilter, with it. Chosen clear of the marks Kubernetes
/// components use (kube-proxy 0x4000 and 0x8000, portmap 0x2000, Calico 0xffff0000).
pub const FAST_PATH_MARK: u32 = 0x0000_1000;

/// The bit of `skb->mark` that `from_pod` sets on pod packets whose source NAT the BPF
/// programs will do at the uplink (`to_netdev`): the masquerade rule skips them. Packets
/// without it (the NAT table near full, the agent gone, another protocol) are masqueraded
/// by the kernel's rule, the fallback. Clear of the marks above and of Istio's 0x539.
pub const NAT_MARK: u32 = 0x0000_0800;

/// Capacity of the lease and peer maps in the object (one entry per node of the cluster).
/// The agent sizes them at load time from Network and SubnetLen.
pub const MAX_LEASES: u32 = 16384;
/// Capacity of the endpoint map in the object (local pods); sized at load time from
/// SubnetLen.
pub const MAX_ENDPOINTS: u32 = 4096;
/// Capacity of the stack-flow map in the object: connections this node's stack carries
/// for its pods with a peer. The agent sizes it at load time from the kernel's
/// `nf_conntrack_max`, so that it can hold whatever conntrack holds; entries are allocated
/// as they come (BPF_F_NO_PREALLOC) and never evicted.
pub const MAX_STACK_FLOWS: u32 = 65536;

/// Bytes VXLAN adds in front of the inner IP packet: outer Ethernet is kept, so
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Reach the lease over VXLAN (encapsulate to `public_ip`).
pub const LEASE_VXLAN: u32 = 1;
/// Reach the lease by routing the pod packet unencapsulated (host-gw, DirectRouting).
pub const LEASE_DIRECT: u32 = 2;

/// A remote node's lease.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    /// The node's public (underlay) IP, network byte order.
    pub public_ip: [u8; 4],
    /// `LEASE_VXLAN` or `LEASE_DIRECT`.
    pub mode: u32,
    /// The node's VTEP MAC: the inner destination MAC, as flannel.<VNI> expects.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Key of the `peers` map: the public IP of a node that holds a lease.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerKey {
    pub public_ip: [u8; 4],
}

/// A known VXLAN peer: only these may send us VXLAN.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// How many leases name this public IP (normally 1).
    pub leases: u32,
}

/// Key of the `endpoints` map: a local pod's IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointKey {
    pub pod_ip: [u8; 4],
}

/// A local pod: where to deliver a packet addressed to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// ifindex of the pod's host-side veth (the target of `bpf_redirect_peer`).
    pub ifindex: u32,
    /// The pod's MAC (destination of delivered frames).
    pub pod_mac: [u8; 6],
    /// The host-side veth's MAC (source of delivered frames, as the gateway).
    pub host_mac: [u8; 6],
}

/// The node's datapath settings: entry 0 of the `config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// VXLAN network identifier (host byte order).
    pub vni: u32,
    /// VXLAN UDP destination port (host byte order).
    pub vxlan_port: u16,
    /// `CONFIG_*` bits.
    pub flags: u16,
    /// The uplink's address: outer source IP of encapsulated packets (network order).
    pub node_ip: [u8; 4],
    /// ifindex of the uplink (input interface of the programs' FIB lookups).
    pub uplink_ifindex: u32,
    /// Largest inner IPv4 packet the tunnel carries unfragmented (underlay MTU - 50).
    pub inner_mtu: u32,
    /// This node's VTEP MAC: inner source MAC of encapsulated packets.
    pub vtep_mac: [u8; 6],
    pub _pad2: [u8; 2],
    pub _pad3: [u8; 4],
    /// When the agent last wrote this entry (CLOCK_MONOTONIC ns, `bpf_ktime_get_ns`'s clock).
    pub refreshed_ns: u64,
    /// How long after `refreshed_ns` the agent counts as gone and every packet takes the
    /// kernel path (0: never).
    pub stale_after_ns: u64,
    /// The pod network (Network of net-conf.json) and its mask, network order.
    pub network: [u8; 4],
    pub network_mask: [u8; 4],
    /// `NAT_*` bits.
    pub nat_flags: u32,
    /// New flows are marked for BPF source NAT only while the table holds fewer entries.
    pub nat_limit: u32,
    /// The ports (ICMP echo identifiers) source NAT allocates from, host byte order:
    /// outside the node's ephemeral range, so they never meet the node's own connections.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub _pad4: [u8; 4],
}

/// `DataplaneConfig::nat_flags`: pod traffic leaving the cluster is source-NATed by the
/// programs (`--masquerade bpf`).
pub const NAT_ENABLED: u32 = 1;
/// `DataplaneConfig::nat_flags`: a translated flow's later packets skip the node's stack:
/// translated and sent from the pod's veth, replies delivered into the pod
/// (`--masquerade-fast-path`, experimental).
pub const NAT_FAST: u32 = 2;
/// `DataplaneConfig::nat_flags`: BPF source NAT was switched off while flows held
/// mappings: those keep them until they end, new flows are left to the kernel's
/// masquerade (`from_pod` marks only mapped flows).
pub const NAT_DRAIN: u32 = 4;

/// A flow as the NAT maps key it: for `nat`, the pod's packet (pod → outside); for
/// `nat_reverse`, its replies (outside → the node's address and allocated port). Ports
/// are TCP/UDP ports or the ICMP echo identifier (in both), network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl NatKey {
    #[inline(always)]
    pub const fn new(
        protocol: u8,
        src_ip: [u8; 4],
        src_port: [u8; 2],
        dst_ip: [u8; 4],
        dst_port: [u8; 2],
    ) -> Self {
        NatKey {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// The other side of a NAT mapping: in `nat`, the node's address and port the pod's
/// packets leave with; in `nat_reverse`, the pod's address and port replies go back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// `NAT_SEEN_*` bits, set by the programs.
    pub state: u8,
    pub _pad: u8,
    /// When a packet of this direction last passed (CLOCK_MONOTONIC ns).
    pub last_seen_ns: u64,
}

/// `NatEntry::state`: a reply came back (set in `nat_reverse`).
pub const NAT_SEEN_REPLY: u8 = 1;
/// `NatEntry::state`: a TCP FIN or RST passed.
pub const NAT_SEEN_CLOSE: u8 = 2;
/// `NatEntry::state` of `nat_reverse`: `from_pod` found the mapping under the packet as the
/// pod sent it, so the stack did not rewrite the flow (no Service DNAT): its replies may
/// skip the stack (`--masquerade-fast-path`).
pub const NAT_FAST_OK: u8 = 4;

/// A claim on a NAT port (`nat_claims`): the key of the port's replies and the
/// `nat_reverse` entry of its holder as the claiming program read it. A port changes hands
/// (a finished flow's port taken over by a new flow, or reopened by a SYN on it) only for
/// the CPU whose claim is new: of programs racing for one port on several CPUs, one wins.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatClaim {
    pub reply: NatKey,
    pub holder: NatEntry,
}

/// The programs' NAT bookkeeping, entry 0 of `nat_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatState {
    /// Mappings in the table: incremented by the programs as they allocate (without
    /// atomics, so it may lag), set exactly by the agent after each collection.
    pub entries: u64,
}

/// Capacity of the NAT maps in the object; sized at load time from `--masquerade-table-size`.
pub const MAX_NAT: u32 = 65536;
/// `nat_claims`: claims live only while a port changes hands, so a few suffice.
pub const MAX_NAT_CLAIMS: u32 = 4096;
/// Capacity of `nat_exclude` (`--masquerade-exclude` CIDRs).
pub const MAX_NAT_EXCLUDE: u32 = 256;

/// A connection, the same key for both of its directions: the two ends ordered, the one
/// with the smaller (address, port) first. Ports are TCP/UDP ports, or the ICMP echo
/// identifier in both; zero for other protocols.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub a_ip: [u8; 4],
    pub b_ip: [u8; 4],
    pub a_port: [u8; 2],
    pub b_port: [u8; 2],
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of the connection a packet from `src:sport` to `dst:dport` belongs to.
    #[inline(always)]
    pub fn new(protocol: u8, src: [u8; 4], sport: [u8; 2], dst: [u8; 4], dport: [u8; 2]) -> Self {
        let src_first = u32::from_be_bytes(src) < u32::from_be_bytes(dst)
            || (src == dst && u16::from_be_bytes(sport) <= u16::from_be_bytes(dport));
        let ((a_ip, a_port), (b_ip, b_port)) = if src_first {
            ((src, sport), (dst, dport))
        } else {
            ((dst, dport), (src, sport))
        };
        FlowKey {
            a_ip,
            b_ip,
            a_port,
            b_port,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// `to_pod`: the stack delivered one of the connection's packets into a local pod.
pub const RECORDED_TO_POD: u32 = 1;
/// `to_netdev`: the stack sent one of the connection's packets to another node.
pub const RECORDED_TO_NETDEV: u32 = 2;

/// A connection the node's stack carries: its packets stay on the kernel path here. The
/// entry lives until the kernel's conntrack has forgotten the connection (the agent
/// checks), never evicted for a new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    /// Which program recorded it first: `RECORDED_TO_POD` or `RECORDED_TO_NETDEV`
    /// (`RECORDED_BY_AGENT` when the agent copied it from conntrack).
    pub recorded_by: u32,
    pub _pad: u32,
    /// When it was recorded (CLOCK_MONOTONIC ns, `bpf_ktime_get_ns`).
    pub recorded_ns: u64,
}

/// The agent copied the connection from the kernel's conntrack table (see `stack_pods`).
pub const RECORDED_BY_AGENT: u32 = 3;

/// A local pod whose stack connection could not be recorded (`stack_flows` full): all of
/// its traffic takes the kernel path until the agent has recorded every connection
/// conntrack holds for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackPod {
    /// When a recording last failed (CLOCK_MONOTONIC ns).
    pub since_ns: u64,
}

/// `DataplaneConfig::flags`: the fast path is off, every packet takes the kernel path
/// (the agent found netfilter rules that filter forwarded pod traffic, which the fast path
/// would bypass). Zero, the default, is "on".
pub const CONFIG_FAST_PATH_OFF: u16 = 1;
/// `DataplaneConfig::flags`: some peers' leases did not fit in the `leases` map, so a
/// VXLAN packet whose inner source is in no lease may be theirs: it goes to the kernel
/// path instead of being dropped as spoofed.
pub const CONFIG_LEASES_INCOMPLETE: u16 = 2;
/// `DataplaneConfig::flags`: the agent's policy probe could not read the node's netfilter
/// rules (a tool failed), so whether anything filters forwarded pod traffic is unknown:
/// with `CONFIG_FAST_PATH_OFF` (`--dataplane=auto`) that is why it is off. For `weft
/// status`; the programs do not read it.
pub const CONFIG_POLICY_UNKNOWN: u16 = 4;

/// Index of one datapath counter in the `counters` map. Each slot holds a `u64`
/// per CPU; readers sum over CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Pod packets encapsulated to a remote lease (from_pod).
    Encap = 0,
    /// Pod packets routed unencapsulated to a remote lease (from_pod).
    DirectOut = 1,
    /// VXLAN packets decapsulated and delivered to a local pod (from_netdev).
    Decap = 2,
    /// Unencapsulated packets delivered straight to a local pod (from_netdev).
    DirectIn = 3,
    /// Packets handed to the kernel stack unchanged (not ours, or the kernel path serves them).
    Passed = 4,
    /// VXLAN from an address that holds no lease.
    DropUnknownPeer = 5,
    /// VXLAN on our port with another VNI or without the VNI flag: another device's, left
    /// to the kernel.
    ForeignVni = 6,
    /// VXLAN on our port too short to hold its headers.
    DropMalformed = 7,
    /// A kernel helper refused to resize or rewrite the packet.
    DropHelperFailed = 8,
    /// Packets for a lease or a local pod left to the kernel path because the node's
    /// stack carries their connection (it translated or tracked it).
    StackFlow = 9,
    /// Connections recorded as the stack's (to_pod, to_netdev).
    FlowRecorded = 10,
    /// VXLAN from a peer whose inner source lies outside that peer's lease (dropped).
    DropSpoofedInner = 11,
    /// Pod packets whose source is not the pod behind the veth (from_pod): kernel path.
    SourceNotPod = 12,
    /// Unencapsulated packets for a local pod not sent by a direct lease's node from its
    /// public IP (from_netdev): kernel path.
    NotFromLeaseNode = 13,
    /// Packets handed to the kernel path because the agent stopped refreshing the
    /// dataplane (fail-safe).
    AgentGone = 14,
    /// Pod packets source-NATed at the uplink (to_netdev).
    NatOut = 15,
    /// Replies translated back to the pod at the uplink (from_netdev), ICMP errors included.
    NatIn = 16,
    /// NAT mappings allocated (new flows).
    NatAlloc = 17,
    /// Packets dropped because no port could be allocated (the table full, or every
    /// tried port taken): they must not leave with a pod address.
    NatAllocFailed = 18,
    /// Pod packets left to the kernel's masquerade because the NAT table was near full
    /// or the agent gone (from_pod).
    NatFallback = 19,
    /// Pod packets of a translated flow translated and sent from the pod's veth (from_pod,
    /// `--masquerade-fast-path`).
    NatFastOut = 20,
    /// Replies of a translated flow delivered straight into the pod (from_netdev).
    NatFastIn = 21,
    /// A connection of the stack's that `stack_flows` had no room for: its pod was put
    /// on the kernel path (`stack_pods`) instead of risking a wrong redirect.
    FlowTableFull = 22,
    /// Packets of a pod in `stack_pods` left to the kernel path.
    PodOnStack = 23,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 24] = [
        Counter::Encap,
        Counter::DirectOut,
        Counter::Decap,
        Counter::DirectIn,
        Counter::Passed,
        Counter::DropUnknownPeer,
        Counter::ForeignVni,
        Counter::DropMalformed,
        Counter::DropHelperFailed,
        Counter::StackFlow,
        Counter::FlowRecorded,
        Counter::DropSpoofedInner,
        Counter::SourceNotPod,
        Counter::NotFromLeaseNode,
        Counter::AgentGone,
        Counter::NatOut,
        Counter::NatIn,
        Counter::NatAlloc,
        Counter::NatAllocFailed,
        Counter::NatFallback,
        Counter::NatFastOut,
        Counter::NatFastIn,
        Counter::FlowTableFull,
        Counter::PodOnStack,
    ];

    /// The slot of this counter in the `counters` map.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Encap => "encap",
            Counter::DirectOut => "direct_out",
            Counter::Decap => "decap",
            Counter::DirectIn => "direct_in",
            Counter::Passed => "passed",
            Counter::DropUnknownPeer => "drop_unknown_peer",
            Counter::ForeignVni => "foreign_vni",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropHelperFailed => "drop_helper_failed",
            Counter::StackFlow => "stack_flow",
            Counter::FlowRecorded => "flow_recorded",
            Counter::DropSpoofedInner => "drop_spoofed_inner",
            Counter::SourceNotPod => "source_not_pod",
            Counter::NotFromLeaseNode => "not_from_lease_node",
            Counter::AgentGone => "agent_gone",
            Counter::NatOut => "nat_out",
            Counter::NatIn => "nat_in",
            Counter::NatAlloc => "nat_alloc",
            Counter::NatAllocFailed => "nat_alloc_failed",
            Counter::NatFallback => "nat_fallback",
            Counter::NatFastOut => "nat_fast_out",
            Counter::NatFastIn => "nat_fast_in",
            Counter::FlowTableFull => "flow_table_full",
            Counter::PodOnStack => "pod_on_stack",
        }
    }
}

/// Number of slots in the `counters` map (its `max_entries`).
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data without padding holes, valid for any bit pattern.
    unsafe impl aya::Pod for LeaseEntry {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerEntry {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointEntry {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for StackPod {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for NatState {}
    unsafe impl aya::Pod for NatClaim {}
}
