//! The datapath test bed: weft's eBPF object loaded into a fresh bpffs, its maps filled
//! as the agent would for a fixed node (uplink `up0` 198.18.0.11/24, a resolved peer, an
//! unresolved one, an unroutable one, one local pod), run with BPF_PROG_TEST_RUN from a
//! thread inside a network namespace of its own, so that the programs' FIB lookups answer
//! the same way every run; and builders of the frames such a node sees. Used by the
//! program tests (`tests/bpf_programs.rs`) and the differential fuzzer ([`crate::fuzz`]).

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
    Counter, DataplaneConfig, EndpointEntry, EndpointKey, FlowEntry, FlowKey, LeaseEntry, NatClaim,
    NatEntry, NatKey, NatState, PeerEntry, PeerKey, StackPod, ALL_PROGRAMS, LEASE_DIRECT,
    LEASE_VXLAN, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS, MAP_LEASES, MAP_NAT, MAP_NAT_CLAIMS,
    MAP_NAT_EXCLUDE, MAP_NAT_REVERSE, MAP_NAT_STATE, MAP_PEERS, MAP_STACK_FLOWS, MAP_STACK_PODS,
    NAT_ENABLED, PROG_FROM_POD,
};

use crate::bpf::TempBpffs;
use crate::exec::{ip, Cmd};
use crate::{icmp, netns};

// TC verdicts (linux/pkt_cls.h).
/// TC_ACT_UNSPEC (-1): "not mine", later filters on the hook run, then the stack.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

// The node under test and its uplink.
pub const UPLINK: &str = "up0";
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const NODE_IP: [u8; 4] = [198, 18, 0, 11];
pub const OWN_VTEP_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x11];
pub const VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
pub const INNER_MTU: u32 = 1450;

// Peers: one with a permanent neighbour entry, one on-link but unresolved,
// one without any route, and a host that holds no lease.
pub const PEER_IP: [u8; 4] = [198, 18, 0, 12];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
pub const PEER_VTEP_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x12];
pub const UNRESOLVED_PEER_IP: [u8; 4] = [198, 18, 0, 13];
pub const UNROUTABLE_PEER_IP: [u8; 4] = [198, 51, 100, 99];
pub const STRANGER_IP: [u8; 4] = [198, 18, 0, 99];

// Remote leases, one per way of reaching them.
pub const VXLAN_POD: [u8; 4] = [10, 244, 2, 7];
pub const DIRECT_POD: [u8; 4] = [10, 244, 3, 7];
pub const UNRESOLVED_VXLAN_POD: [u8; 4] = [10, 244, 4, 7];
pub const UNRESOLVED_DIRECT_POD: [u8; 4] = [10, 244, 5, 7];
pub const UNROUTABLE_POD: [u8; 4] = [10, 244, 6, 7];
pub const UNLEASED_POD: [u8; 4] = [10, 244, 9, 7];

// The local pod, as the CNI plugin wired it.
/// The leases in the bed's map: a pod address of each /24, its node, its mode.
pub const BED_LEASES: [([u8; 4], [u8; 4], u32); 5] = [
    (VXLAN_POD, PEER_IP, LEASE_VXLAN),
    (DIRECT_POD, PEER_IP, LEASE_DIRECT),
    (UNRESOLVED_VXLAN_POD, UNRESOLVED_PEER_IP, LEASE_VXLAN),
    (UNRESOLVED_DIRECT_POD, UNRESOLVED_PEER_IP, LEASE_DIRECT),
    (UNROUTABLE_POD, UNROUTABLE_PEER_IP, LEASE_VXLAN),
];
/// The bed's peers map.
pub const BED_PEERS: [[u8; 4]; 3] = [PEER_IP, UNRESOLVED_PEER_IP, UNROUTABLE_PEER_IP];

pub const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
pub const OTHER_LOCAL_IP: [u8; 4] = [10, 244, 1, 99];
pub const LOCAL_POD_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];
pub const LOCAL_POD_HOST_MAC: [u8; 6] = [0x0a, 0x58, 0xee, 0xee, 0xee, 0x05];
pub const GATEWAY_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 1];
/// The pod's host-side veth in the test bed: from_pod runs as if on its ingress.
pub const POD_VETH: &str = "pod0";

/// The pod network (a /16) when BPF source NAT is on ([`Datapath::set_nat`]), and the /24
/// of destinations excluded from it.
pub const POD_NETWORK: [u8; 4] = [10, 244, 0, 0];
pub const NAT_EXCLUDED: [u8; 4] = [203, 0, 113, 0];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Outer UDP source ports: the kernel's default ephemeral range.
pub const SPORT_RANGE: std::ops::RangeInclusive<u16> = 32768..=60999;

// ---------------------------------------------------------------------------
// The datapath under test

/// The loaded programs and their maps, filled as the agent would for this
/// test bed. Lives in the thread that entered the test namespace.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub bpffs: TempBpffs,
    /// ifindex of the pod's host-side veth [`POD_VETH`].
    pub pod_ifindex: u32,
}

pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
    /// `skb->mark` after the program ran.
    pub mark: u32,
}

/// Byte offset of `mark` in struct __sk_buff (uapi/linux/bpf.h).
pub const SKB_MARK_OFFSET: usize = 8;
/// Byte offset of `ifindex` in struct __sk_buff: the device the program runs on.
pub const SKB_IFINDEX_OFFSET: usize = 40;
/// The part of struct __sk_buff BPF_PROG_TEST_RUN takes and gives back.
pub const SKB_CTX_LEN: usize = 192;

impl Datapath {
    pub fn load(uplink_ifindex: u32, pod_ifindex: u32) -> Result<Self> {
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

    pub fn fill_maps(&mut self, uplink_ifindex: u32) -> Result<()> {
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
                ..Default::default()
            },
            0,
        )?;

        let mut leases: LpmTrie<_, [u8; 4], LeaseEntry> = LpmTrie::try_from(self.map(MAP_LEASES)?)?;
        for (pod, public_ip, mode) in BED_LEASES {
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
        for public_ip in BED_PEERS {
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
    pub fn set_flags(&mut self, flags: u16) -> Result<()> {
        let mut config: Array<_, DataplaneConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        let mut value = config.get(&0, 0)?;
        value.flags = flags;
        config.set(0, value, 0)?;
        Ok(())
    }

    /// Sets when the agent last refreshed the config and for how long that holds.
    pub fn set_freshness(&mut self, refreshed_ns: u64, stale_after_ns: u64) -> Result<()> {
        let mut config: Array<_, DataplaneConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        let mut value = config.get(&0, 0)?;
        value.refreshed_ns = refreshed_ns;
        value.stale_after_ns = stale_after_ns;
        config.set(0, value, 0)?;
        Ok(())
    }

    pub fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the object has no map {name}"))
    }

    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("the object has no program {name}"))?
            .try_into()?)
    }

    pub fn run(&self, program: &str, frame: &[u8]) -> Result<Outcome> {
        self.run_with_context(program, frame, None)
    }

    /// Runs `program` on `frame` as a GSO packet of `gso_size`-byte segments.
    pub fn run_gso(&self, program: &str, frame: &[u8], gso_size: u32) -> Result<Outcome> {
        // struct __sk_buff: gso_segs at byte 164, gso_size at 176 (uapi/linux/bpf.h).
        let mut skb = [0u8; SKB_CTX_LEN];
        let segments = (frame.len() as u32).div_ceil(gso_size);
        skb[164..168].copy_from_slice(&segments.to_ne_bytes());
        skb[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        self.run_with_context(program, frame, Some(&skb))
    }

    /// Runs `program` on `frame` with `skb->mark` set to `mark`.
    pub fn run_marked(&self, program: &str, frame: &[u8], mark: u32) -> Result<Outcome> {
        let mut skb = [0u8; SKB_CTX_LEN];
        skb[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        self.run_with_context(program, frame, Some(&skb))
    }

    pub fn run_with_context(
        &self,
        program: &str,
        frame: &[u8],
        skb: Option<&[u8]>,
    ) -> Result<Outcome> {
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

    /// BPF source NAT on (`--masquerade=bpf`) for the pod network [`POD_NETWORK`]/16 with
    /// ports `ports` and table limit `limit`, or off (`None`); destinations in
    /// [`NAT_EXCLUDED`]/24 keep pod addresses. Every mapping, claim and the count go.
    pub fn set_nat(&mut self, nat: Option<((u16, u16), u32)>) -> Result<()> {
        let mut config: Array<_, DataplaneConfig> = Array::try_from(self.map(MAP_CONFIG)?)?;
        let mut value = config.get(&0, 0)?;
        let ((port_min, port_max), limit) = nat.unwrap_or(((0, 0), 0));
        value.network = POD_NETWORK;
        value.network_mask = [255, 255, 0, 0];
        value.nat_flags = if nat.is_some() { NAT_ENABLED } else { 0 };
        value.nat_limit = limit;
        value.nat_port_min = port_min;
        value.nat_port_max = port_max;
        config.set(0, value, 0)?;
        let mut exclude: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(self.map(MAP_NAT_EXCLUDE)?)?;
        exclude.insert(&Key::new(24, NAT_EXCLUDED), 1, 0)?;
        self.clear::<NatKey, NatEntry>(MAP_NAT)?;
        self.clear::<NatKey, NatEntry>(MAP_NAT_REVERSE)?;
        self.clear::<NatClaim, u8>(MAP_NAT_CLAIMS)?;
        let mut state: Array<_, NatState> = Array::try_from(self.map(MAP_NAT_STATE)?)?;
        state.set(0, NatState { entries: 0 }, 0)?;
        Ok(())
    }

    /// Removes every entry of the hash map `name`.
    pub fn clear<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> Result<()> {
        let mut map: HashMap<_, K, V> = HashMap::try_from(self.map(name)?)?;
        let keys = map.keys().collect::<Result<Vec<_>, _>>()?;
        for key in keys {
            map.remove(&key)?;
        }
        Ok(())
    }

    /// Forgets the connections `to_netdev` recorded (`stack_flows`, `stack_pods`), so the
    /// fast path's verdicts stay the ones of an empty table.
    pub fn clear_stack_flows(&mut self) -> Result<()> {
        self.clear::<FlowKey, FlowEntry>(MAP_STACK_FLOWS)?;
        self.clear::<EndpointKey, StackPod>(MAP_STACK_PODS)
    }

    /// The mappings of `nat` (`reverse` false) or `nat_reverse`.
    pub fn nat_table(&self, reverse: bool) -> Result<Vec<(NatKey, NatEntry)>> {
        let name = if reverse { MAP_NAT_REVERSE } else { MAP_NAT };
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("the object has no map {name}"))?;
        let table: HashMap<_, NatKey, NatEntry> = HashMap::try_from(map)?;
        Ok(table.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Writes a mapping of `nat` (`reverse` false) or `nat_reverse`, as the agent may.
    pub fn set_nat_entry(&mut self, reverse: bool, key: NatKey, entry: NatEntry) -> Result<()> {
        let name = if reverse { MAP_NAT_REVERSE } else { MAP_NAT };
        let mut table: HashMap<_, NatKey, NatEntry> = HashMap::try_from(self.map(name)?)?;
        table.insert(key, entry, 0)?;
        Ok(())
    }

    /// The programs' count of mappings (`nat_state`).
    pub fn nat_count(&self) -> Result<u64> {
        let map = self
            .ebpf
            .map(MAP_NAT_STATE)
            .with_context(|| format!("the object has no map {MAP_NAT_STATE}"))?;
        let state: Array<_, NatState> = Array::try_from(map)?;
        Ok(state.get(&0, 0)?.entries)
    }

    /// The connections recorded in `stack_flows`, with who recorded them.
    pub fn stack_flows(&self) -> Result<Vec<(FlowKey, u32)>> {
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
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        let map = self
            .ebpf
            .map(MAP_COUNTERS)
            .with_context(|| format!("the object has no map {MAP_COUNTERS}"))?;
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(counters.get(&counter.index(), 0)?.iter().sum())
    }
}

/// Builds the test bed, loads the datapath inside it and runs `check`.
pub fn with_datapath<T, F>(check: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Datapath) -> Result<T> + Send + 'static,
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
pub struct TestBed {
    pub namespace: String,
}

impl TestBed {
    pub fn create() -> Result<Self> {
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

/// CLOCK_MONOTONIC in nanoseconds, the programs' clock (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn object_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/weft.bpf.o")
}

// ---------------------------------------------------------------------------
// Frames

/// A UDP packet from the local pod to `dst` with `payload_len` payload bytes,
/// as it enters the pod's host-side veth (addressed to the bridge gateway).
pub fn pod_frame(dst: [u8; 4], ttl: u8, payload_len: usize) -> Vec<u8> {
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
pub fn pod_frame_of_ip_len(dst: [u8; 4], ttl: u8, ip_len: usize) -> Vec<u8> {
    pod_frame(dst, ttl, ip_len - 20 - 8)
}

/// An IPv4 packet from a pod of the peer to `dst`.
pub fn inner_ip(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    ipv4(
        VXLAN_POD,
        dst,
        ttl,
        IPPROTO_UDP,
        &udp(5201, 40000, b"inner payload"),
    )
}

/// `ip` as the peer's flannel.<VNI> frames it: between the two VTEP MACs.
pub fn peer_inner_frame(ip: &[u8]) -> Vec<u8> {
    ethernet(OWN_VTEP_MAC, PEER_VTEP_MAC, ETH_P_IP, ip)
}

/// A VXLAN packet from `src` to this node carrying `inner`, with a UDP
/// checksum as kernel VXLAN devices send it, and optional outer IP options.
pub fn vxlan_frame(src: [u8; 4], flags: u8, vni: u32, inner: &[u8], options: &[u8]) -> Vec<u8> {
    let mut vxlan = vec![flags, 0, 0, 0];
    vxlan.extend_from_slice(&(vni << 8).to_be_bytes());
    vxlan.extend_from_slice(inner);
    let mut datagram = udp(45678, VXLAN_PORT, &vxlan);
    datagram[6..8].copy_from_slice(&[0x12, 0x34]);
    let ip = ipv4_with_options(src, NODE_IP, 64, IPPROTO_UDP, options, &datagram);
    ethernet(UPLINK_MAC, PEER_MAC, ETH_P_IP, &ip)
}

/// VXLAN from the peer carrying a small UDP datagram from `inner_src` to `inner_dst`.
pub fn tunnelled_from_peer(inner_src: [u8; 4], inner_dst: [u8; 4]) -> Vec<u8> {
    let inner = ipv4(inner_src, inner_dst, 64, IPPROTO_UDP, &udp(1, 2, b"x"));
    vxlan_frame(PEER_IP, 0x08, VNI, &peer_inner_frame(&inner), &[])
}

/// A UDP datagram from `src` to this node's port `dport`.
pub fn udp_to_node(src: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let ip = ipv4(src, NODE_IP, 64, IPPROTO_UDP, &udp(45678, dport, payload));
    ethernet(UPLINK_MAC, PEER_MAC, ETH_P_IP, &ip)
}

pub fn arp_frame() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&LOCAL_POD_MAC);
    arp.extend_from_slice(&LOCAL_POD);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VXLAN_POD);
    ethernet([0xff; 6], LOCAL_POD_MAC, ETH_P_ARP, &arp)
}

pub fn ipv6_frame() -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64];
    ip.extend_from_slice(&[0xfd; 32]);
    ip.extend_from_slice(&udp(1, 2, b""));
    ethernet(GATEWAY_MAC, LOCAL_POD_MAC, ETH_P_IPV6, &ip)
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src[..], &ethertype.to_be_bytes(), payload].concat()
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, protocol: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with_options(src, dst, ttl, protocol, &[], payload)
}

/// An IPv4 packet (DF set, as pods send) with a valid header checksum.
pub fn ipv4_with_options(
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
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
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

pub fn with_ihl(mut frame: Vec<u8>, ihl: u8) -> Vec<u8> {
    frame[14] = (frame[14] & 0xf0) | ihl;
    frame
}

pub fn with_version(mut frame: Vec<u8>, version: u8) -> Vec<u8> {
    frame[14] = (version << 4) | (frame[14] & 0x0f);
    frame
}

pub fn with_total_len(mut frame: Vec<u8>, extra: u16) -> Vec<u8> {
    let total = be16(&frame[16..]) + extra;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame
}

/// Recomputes the IPv4 header checksum of an Ethernet frame after an edit.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// The Internet checksum (RFC 1071): 0 over a header that carries a valid one.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}
