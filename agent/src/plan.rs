//! The peer plan: the one place that decides what the dataplanes program.
//!
//! Every lease from etcd or the API is hostile until checked here. [`plan`] is pure: from
//! the lease table, the node's config and a few facts read off the kernel ([`NodeFacts`]),
//! it decides which leases become peers (subnet, public IP, VTEP MAC, path) and which are
//! rejected, and why. The kernel backends (routes, neighbours, FDB) and the BPF maps are
//! reconcilers of that plan; none of them repeats a decision.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use anyhow::Result;
use ipnetwork::Ipv4Network;

use crate::backend::netlink;
use crate::config::{BackendConf, NetConf, VxlanConf};
use crate::iface::ExtIface;
use crate::lease::{subnet_key, Lease, MacAddr};

/// How a peer's pod subnet is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// Encapsulated in VXLAN through `flannel.<VNI>`.
    Overlay,
    /// A plain route via the peer's public IP (host-gw, DirectRouting on a shared L2).
    Direct,
}

/// One remote lease the dataplanes program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    /// The peer's VTEP MAC (vxlan leases; `None` for host-gw).
    pub vtep_mac: Option<MacAddr>,
    pub path: Path,
}

/// A change of the plan, applied by a dataplane incrementally. Idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// The peer appeared or changed.
    Set(Peer),
    /// No peer for this subnet any more (lease gone or now rejected).
    Removed(Ipv4Network),
}

/// Why a lease is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    WrongBackend(String),
    NoVtepMac,
    BadVtepMac(MacAddr),
    DefaultRoute,
    OutsideNetwork(Ipv4Network),
    /// Its prefix length (first) is not the one every lease of the network has (second).
    WrongSubnetLen(u8, u8),
    /// It lies outside SubnetMin..=SubnetMax.
    OutsideSubnetRange(Ipv4Addr, Ipv4Addr),
    OverlapsOwn(Ipv4Network),
    OverlapsLease(Ipv4Network),
    CoversNodeNetwork(Ipv4Network),
    CoversNodeIp(Ipv4Addr),
    BadPublicIp(&'static str),
    VtepMacShared(Ipv4Network),
    VtepMacIsOurs,
    NotOnLink(String),
}

impl Rejection {
    /// The `reason` label of `weft_leases_rejected`.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::WrongBackend(_) => "backend_type",
            Rejection::NoVtepMac | Rejection::BadVtepMac(_) => "vtep_mac",
            Rejection::DefaultRoute => "default_route",
            Rejection::OutsideNetwork(_) => "outside_network",
            Rejection::WrongSubnetLen(..) => "subnet_len",
            Rejection::OutsideSubnetRange(..) => "subnet_range",
            Rejection::OverlapsOwn(_) | Rejection::OverlapsLease(_) => "overlap",
            Rejection::CoversNodeNetwork(_) | Rejection::CoversNodeIp(_) => "covers_node",
            Rejection::BadPublicIp(_) => "public_ip",
            Rejection::VtepMacShared(_) | Rejection::VtepMacIsOurs => "vtep_mac_shared",
            Rejection::NotOnLink(_) => "not_on_link",
        }
    }

    /// Every label, so that /metrics shows zeros too.
    pub const LABELS: [&'static str; 11] = [
        "backend_type",
        "vtep_mac",
        "default_route",
        "outside_network",
        "subnet_len",
        "subnet_range",
        "overlap",
        "covers_node",
        "public_ip",
        "vtep_mac_shared",
        "not_on_link",
    ];
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::WrongBackend(t) => write!(f, "its BackendType is {t:?}, not this network's"),
            Rejection::NoVtepMac => write!(f, "its BackendData has no valid VtepMAC"),
            Rejection::BadVtepMac(mac) => {
                write!(f, "its VtepMAC {mac} is not a unicast address")
            }
            Rejection::DefaultRoute => write!(f, "it is the default route 0.0.0.0/0"),
            Rejection::OutsideNetwork(net) => write!(f, "it is not inside Network {net}"),
            Rejection::WrongSubnetLen(len, want) => write!(
                f,
                "its prefix length /{len} is not the /{want} of this network's leases (SubnetLen; \
                 with --kube-subnet-mgr, the size of this node's podCIDR): no node allocates such \
                 a lease, so delete it, or make SubnetLen (or the podCIDR size) agree"
            ),
            Rejection::OutsideSubnetRange(min, max) => write!(
                f,
                "it lies outside SubnetMin {min} .. SubnetMax {max} of the network config: \
                 delete the lease, or widen SubnetMin/SubnetMax"
            ),
            Rejection::OverlapsOwn(own) => write!(f, "it overlaps this node's lease {own}"),
            Rejection::OverlapsLease(other) => write!(
                f,
                "it overlaps the lease {} (both are ignored until one is removed)",
                subnet_key(other)
            ),
            Rejection::CoversNodeNetwork(net) => write!(
                f,
                "it overlaps {net}, a network this node is attached to (underlay or loopback)"
            ),
            Rejection::CoversNodeIp(ip) => write!(f, "it contains the node address {ip}"),
            Rejection::BadPublicIp(why) => write!(f, "its PublicIP {why}"),
            Rejection::VtepMacShared(other) => write!(
                f,
                "its VtepMAC is also claimed by the lease {} of another node (both are ignored)",
                subnet_key(other)
            ),
            Rejection::VtepMacIsOurs => write!(f, "its VtepMAC is this node's own"),
            Rejection::NotOnLink(why) => write!(f, "{why}"),
        }
    }
}

/// What the planner needs to know about this node.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub network: Ipv4Network,
    pub backend: BackendConf,
    pub own: Option<Ipv4Network>,
    /// This node's own addresses (uplink address and published public IP).
    pub own_ips: Vec<Ipv4Addr>,
    /// This node's VTEP MAC, once registered.
    pub own_vtep_mac: Option<MacAddr>,
    pub uplink: String,
    /// The prefix length every lease has, when checked: SubnetLen (with the Kubernetes
    /// subnet manager, the size of this node's podCIDR, which the kube-controller-manager
    /// gives every node).
    pub subnet_len: Option<u8>,
    /// SubnetMin..=SubnetMax (network addresses), when the network config sets them.
    pub subnet_range: Option<(Ipv4Addr, Ipv4Addr)>,
}

impl PlanConfig {
    pub fn new(network: Ipv4Network, backend: BackendConf, ext: &ExtIface) -> Self {
        PlanConfig {
            network,
            backend,
            own: None,
            own_ips: vec![ext.addr, ext.public_ip],
            own_vtep_mac: None,
            uplink: ext.name.clone(),
            subnet_len: None,
            subnet_range: None,
        }
    }

    /// [`PlanConfig::new`] holding leases to net-conf.json's SubnetLen, and to SubnetMin
    /// and SubnetMax where it sets them.
    pub fn for_netconf(conf: &NetConf, ext: &ExtIface) -> Self {
        PlanConfig {
            subnet_len: Some(conf.subnet_len),
            subnet_range: conf
                .subnet_range_set
                .then_some((conf.subnet_min, conf.subnet_max)),
            ..PlanConfig::new(conf.network, conf.backend.clone(), ext)
        }
    }

    /// Whether the plan depends on which public IPs are on the uplink's L2 segment.
    pub fn needs_on_link(&self) -> bool {
        match &self.backend {
            BackendConf::HostGw => true,
            BackendConf::Vxlan(vx) => vx.direct_routing,
        }
    }
}

/// Facts read off the kernel: the networks the node is attached to, and which public IPs
/// are directly reachable on the uplink.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    /// The node's addresses with their prefixes (outside the pod network), and 127/8.
    pub attached: Vec<Ipv4Network>,
    /// Public IP → on the uplink's L2 segment (no gateway).
    pub on_link: HashMap<Ipv4Addr, bool>,
}

impl NodeFacts {
    /// Reads the attached networks; `on_link` is filled by [`NodeFacts::learn_on_link`].
    pub async fn read(handle: &rtnetlink::Handle, pod_network: Ipv4Network) -> Result<Self> {
        let mut attached: Vec<Ipv4Network> = netlink::ipv4_addrs(handle, None)
            .await?
            .into_iter()
            .map(|a| a.net)
            .filter(|net| !pod_network.contains(net.ip()))
            .map(|net| Ipv4Network::new(net.network(), net.prefix()).expect("same prefix"))
            .collect();
        attached.push("127.0.0.0/8".parse().expect("a valid prefix"));
        attached.sort();
        attached.dedup();
        Ok(NodeFacts {
            attached,
            on_link: HashMap::new(),
        })
    }

    /// Asks the kernel about the public IPs of `leases` not asked about yet (all of them
    /// when `refresh`).
    pub async fn learn_on_link<'a>(
        &mut self,
        handle: &rtnetlink::Handle,
        uplink: u32,
        leases: impl Iterator<Item = &'a Lease>,
        refresh: bool,
    ) {
        if refresh {
            self.on_link.clear();
        }
        for lease in leases {
            let ip = lease.attrs.public_ip;
            if self.on_link.contains_key(&ip) || !usable_unicast(ip) {
                continue;
            }
            // No route at all (e.g. the uplink is down) answers "not on link".
            let on_link = netlink::on_link(handle, ip, uplink).await.unwrap_or(false);
            self.on_link.insert(ip, on_link);
        }
    }
}

/// What the dataplanes program, and what they must not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub peers: BTreeMap<Ipv4Network, Peer>,
    pub rejected: BTreeMap<Ipv4Network, (Ipv4Addr, Rejection)>,
}

impl Plan {
    /// The changes that turn `self` into `next`.
    pub fn diff(&self, next: &Plan) -> Vec<PeerChange> {
        let mut changes = Vec::new();
        for subnet in self.peers.keys() {
            if !next.peers.contains_key(subnet) {
                changes.push(PeerChange::Removed(*subnet));
            }
        }
        for (subnet, peer) in &next.peers {
            if self.peers.get(subnet) != Some(peer) {
                changes.push(PeerChange::Set(*peer));
            }
        }
        changes
    }

    /// Rejected leases per reason label (every label present).
    pub fn rejected_by_reason(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> =
            Rejection::LABELS.iter().map(|l| (*l, 0)).collect();
        for (_, why) in self.rejected.values() {
            *counts.entry(why.label()).or_insert(0) += 1;
        }
        counts
    }
}

/// Why `ip` cannot be a tunnel endpoint or next hop, if it cannot.
fn public_ip_problem(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("is 0.0.0.0")
    } else if ip.is_loopback() {
        Some("is a loopback address")
    } else if ip.is_multicast() {
        Some("is a multicast address")
    } else if ip.is_broadcast() {
        Some("is the broadcast address")
    } else if ip.octets()[0] >= 240 {
        Some("is in the reserved range 240.0.0.0/4")
    } else if ip.octets()[0] == 0 {
        Some("is in 0.0.0.0/8 (this network)")
    } else {
        None
    }
}

fn usable_unicast(ip: Ipv4Addr) -> bool {
    public_ip_problem(ip).is_none()
}

fn overlaps(a: &Ipv4Network, b: &Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Decides, for every lease of other nodes, whether and how it is programmed.
pub fn plan<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    config: &PlanConfig,
    facts: &NodeFacts,
) -> Plan {
    let mut out = Plan::default();
    let reject = |out: &mut Plan, lease: &Lease, why: Rejection| {
        out.peers.remove(&lease.subnet);
        out.rejected
            .insert(lease.subnet, (lease.attrs.public_ip, why));
    };
    let leases: Vec<&Lease> = leases
        .into_iter()
        .filter(|l| Some(l.subnet) != config.own)
        .collect();
    // Node addresses, sorted: whether a subnet holds one is a range query.
    let mut node_ips: Vec<u32> = leases
        .iter()
        .map(|l| l.attrs.public_ip)
        .chain(config.own_ips.iter().copied())
        .map(u32::from)
        .collect();
    node_ips.sort_unstable();
    let node_ip_in = |subnet: &Ipv4Network| {
        let start = u32::from(subnet.network());
        let at = node_ips.partition_point(|ip| *ip < start);
        node_ips
            .get(at)
            .filter(|ip| **ip <= u32::from(subnet.broadcast()))
            .map(|ip| Ipv4Addr::from(*ip))
    };

    // Checks of one lease on its own.
    let mut candidates: Vec<(&Lease, Peer)> = Vec::new();
    'lease: for lease in &leases {
        let (subnet, attrs) = (lease.subnet, &lease.attrs);
        let single = || -> Result<Option<MacAddr>, Rejection> {
            if attrs.backend_type != config.backend.type_name() {
                return Err(Rejection::WrongBackend(attrs.backend_type.clone()));
            }
            if subnet.prefix() == 0 {
                return Err(Rejection::DefaultRoute);
            }
            if subnet.prefix() < config.network.prefix()
                || !config.network.contains(subnet.network())
            {
                return Err(Rejection::OutsideNetwork(config.network));
            }
            if let Some(want) = config.subnet_len.filter(|l| *l != subnet.prefix()) {
                return Err(Rejection::WrongSubnetLen(subnet.prefix(), want));
            }
            if let Some((min, max)) = config.subnet_range {
                if !(min..=max).contains(&subnet.network()) {
                    return Err(Rejection::OutsideSubnetRange(min, max));
                }
            }
            if let Some(own) = config.own.filter(|own| overlaps(own, &subnet)) {
                return Err(Rejection::OverlapsOwn(own));
            }
            if let Some(net) = facts.attached.iter().find(|n| overlaps(n, &subnet)) {
                return Err(Rejection::CoversNodeNetwork(*net));
            }
            if let Some(ip) = node_ip_in(&subnet) {
                return Err(Rejection::CoversNodeIp(ip));
            }
            let ip = attrs.public_ip;
            if let Some(why) = public_ip_problem(ip) {
                return Err(Rejection::BadPublicIp(why));
            }
            if config.own_ips.contains(&ip) {
                return Err(Rejection::BadPublicIp("is this node's own address"));
            }
            if config.network.contains(ip) {
                return Err(Rejection::BadPublicIp("lies inside the pod network"));
            }
            match &config.backend {
                BackendConf::HostGw => Ok(None),
                BackendConf::Vxlan(_) => {
                    let mac = attrs.vxlan().ok_or(Rejection::NoVtepMac)?.vtep_mac;
                    if mac == MacAddr::default() || mac.0[0] & 1 == 1 {
                        return Err(Rejection::BadVtepMac(mac));
                    }
                    if Some(mac) == config.own_vtep_mac {
                        return Err(Rejection::VtepMacIsOurs);
                    }
                    Ok(Some(mac))
                }
            }
        };
        let vtep_mac = match single() {
            Ok(mac) => mac,
            Err(why) => {
                reject(&mut out, lease, why);
                continue 'lease;
            }
        };
        let on_link = facts
            .on_link
            .get(&attrs.public_ip)
            .copied()
            .unwrap_or(false);
        let path = match &config.backend {
            BackendConf::HostGw if !on_link => {
                reject(
                    &mut out,
                    lease,
                    Rejection::NotOnLink(format!(
                        "node {} is not on the same L2 segment as {} (its route has a gateway or \
                         another interface); host-gw needs all nodes on one L2 network, use the \
                         vxlan backend (with DirectRouting) otherwise",
                        attrs.public_ip, config.uplink
                    )),
                );
                continue 'lease;
            }
            BackendConf::HostGw => Path::Direct,
            BackendConf::Vxlan(vx) if vx.direct_routing && on_link => Path::Direct,
            BackendConf::Vxlan(_) => Path::Overlay,
        };
        candidates.push((
            lease,
            Peer {
                subnet,
                public_ip: attrs.public_ip,
                vtep_mac,
                path,
            },
        ));
    }

    // Checks across leases: overlapping subnets, one VTEP MAC claimed by two nodes.
    // Neither side can be told genuine, so both are left out. Only leases valid on their
    // own take part, so a malformed lease (say a /25 inside a peer's /24) never takes a
    // valid one down with it.
    let mut bad: BTreeMap<Ipv4Network, Rejection> = BTreeMap::new();
    candidates.sort_by_key(|(l, _)| (l.subnet.network(), l.subnet.prefix()));
    let mut widest: Option<Ipv4Network> = None;
    for (lease, _) in &candidates {
        if let Some(prev) = widest.filter(|w| overlaps(w, &lease.subnet)) {
            bad.entry(lease.subnet)
                .or_insert(Rejection::OverlapsLease(prev));
            bad.entry(prev)
                .or_insert(Rejection::OverlapsLease(lease.subnet));
        }
        if widest.is_none_or(|w| u32::from(w.broadcast()) < u32::from(lease.subnet.broadcast())) {
            widest = Some(lease.subnet);
        }
    }
    let mut by_mac: HashMap<MacAddr, (Ipv4Addr, Ipv4Network)> = HashMap::new();
    for (_, peer) in &candidates {
        let Some(mac) = peer.vtep_mac else { continue };
        match by_mac.get(&mac) {
            Some(&(ip, other)) if ip != peer.public_ip => {
                bad.entry(peer.subnet)
                    .or_insert(Rejection::VtepMacShared(other));
                bad.entry(other)
                    .or_insert(Rejection::VtepMacShared(peer.subnet));
            }
            Some(_) => {}
            None => {
                by_mac.insert(mac, (peer.public_ip, peer.subnet));
            }
        }
    }
    for (lease, peer) in candidates {
        match bad.remove(&lease.subnet) {
            Some(why) => reject(&mut out, lease, why),
            None => {
                out.peers.insert(peer.subnet, peer);
            }
        }
    }
    out
}

/// The MTU pods get: flannel.<VNI>'s (underlay minus 50 bytes of VXLAN over IPv4, the
/// underlay being Backend.MTU if set) or, for host-gw, the uplink's.
pub fn pod_mtu(conf: &NetConf, ext: &ExtIface) -> u32 {
    match &conf.backend {
        BackendConf::Vxlan(vx) => vxlan_mtu(vx, ext),
        BackendConf::HostGw => ext.mtu,
    }
}

/// flannel.<VNI>'s MTU.
pub fn vxlan_mtu(vx: &VxlanConf, ext: &ExtIface) -> u32 {
    let underlay = if vx.mtu != 0 { vx.mtu } else { ext.mtu };
    underlay.saturating_sub(VXLAN_OVERHEAD)
}

/// Bytes VXLAN over IPv4 adds: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseAttrs, VxlanBackendData};

    fn vxlan(direct_routing: bool) -> BackendConf {
        BackendConf::Vxlan(VxlanConf {
            vni: 1,
            port: 8472,
            gbp: false,
            learning: false,
            direct_routing,
            mtu: 0,
        })
    }

    fn config(backend: BackendConf) -> PlanConfig {
        PlanConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            backend,
            own: Some("10.244.1.0/24".parse().unwrap()),
            own_ips: vec!["198.18.0.11".parse().unwrap()],
            own_vtep_mac: Some("0e:00:00:00:00:11".parse().unwrap()),
            uplink: "eth0".into(),
            subnet_len: Some(24),
            subnet_range: None,
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            attached: vec![
                "198.18.0.0/24".parse().unwrap(),
                "127.0.0.0/8".parse().unwrap(),
            ],
            on_link: [("198.18.0.12".parse().unwrap(), true)]
                .into_iter()
                .collect(),
        }
    }

    fn lease(key: &str, ip: &str, backend: &str, mac: Option<&str>) -> Lease {
        let (net, len) = key.split_once('-').unwrap();
        Lease {
            subnet: Ipv4Network::new(net.parse().unwrap(), len.parse().unwrap()).unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: backend.into(),
                backend_data: mac.map(|m| {
                    serde_json::to_value(VxlanBackendData {
                        vni: 1,
                        vtep_mac: m.parse().unwrap(),
                    })
                    .unwrap()
                }),
                backend_v6_data: None,
            },
        }
    }

    fn vx(key: &str, ip: &str, mac: &str) -> Lease {
        lease(key, ip, "vxlan", Some(mac))
    }

    fn reason(plan: &Plan, key: &str) -> Option<&'static str> {
        let l = vx(key, "198.18.0.1", "0e:00:00:00:00:01");
        plan.rejected.get(&l.subnet).map(|(_, why)| why.label())
    }

    #[test]
    fn good_leases_become_peers_with_their_path() {
        let leases = [
            vx("10.244.2.0-24", "198.18.0.12", "0e:00:00:00:00:12"),
            vx("10.244.3.0-24", "203.0.113.13", "0e:00:00:00:00:13"),
        ];
        let plan = plan(&leases, &config(vxlan(true)), &facts());
        assert!(plan.rejected.is_empty(), "{:?}", plan.rejected);
        let paths: Vec<Path> = plan.peers.values().map(|p| p.path).collect();
        assert_eq!(paths, [Path::Direct, Path::Overlay]);
        let plain = super::plan(&leases, &config(vxlan(false)), &facts());
        assert!(plain.peers.values().all(|p| p.path == Path::Overlay));
    }

    #[test]
    fn hostile_leases_are_rejected_with_a_reason() {
        let cases = [
            (
                vx("0.0.0.0-0", "198.18.0.99", "0e:00:00:00:00:99"),
                "default_route",
            ),
            (
                vx("198.18.0.0-24", "198.18.0.99", "0e:00:00:00:00:98"),
                "outside_network",
            ),
            (
                vx("10.245.0.0-24", "198.18.0.97", "0e:00:00:00:00:97"),
                "outside_network",
            ),
            (
                vx("10.244.0.0-16", "198.18.0.96", "0e:00:00:00:00:96"),
                "subnet_len",
            ),
            (
                vx("10.244.1.128-25", "198.18.0.95", "0e:00:00:00:00:95"),
                "subnet_len",
            ),
            (
                vx("10.244.5.0-24", "0.0.0.0", "0e:00:00:00:00:94"),
                "public_ip",
            ),
            (
                vx("10.244.6.0-24", "127.0.0.1", "0e:00:00:00:00:93"),
                "public_ip",
            ),
            (
                vx("10.244.7.0-24", "224.0.0.1", "0e:00:00:00:00:92"),
                "public_ip",
            ),
            (
                vx("10.244.8.0-24", "198.18.0.11", "0e:00:00:00:00:91"),
                "public_ip",
            ),
            (
                vx("10.244.9.0-24", "10.244.2.5", "0e:00:00:00:00:90"),
                "public_ip",
            ),
            (
                vx("10.244.10.0-24", "198.18.0.20", "01:00:5e:00:00:01"),
                "vtep_mac",
            ),
            (
                vx("10.244.11.0-24", "198.18.0.21", "0e:00:00:00:00:11"),
                "vtep_mac_shared",
            ),
            (
                lease("10.244.12.0-24", "198.18.0.22", "host-gw", None),
                "backend_type",
            ),
            (
                lease("10.244.13.0-24", "198.18.0.23", "vxlan", None),
                "vtep_mac",
            ),
        ];
        let leases: Vec<Lease> = cases.iter().map(|(l, _)| l.clone()).collect();
        let plan = plan(&leases, &config(vxlan(false)), &facts());
        for (lease, want) in &cases {
            let got = plan.rejected.get(&lease.subnet).map(|(_, w)| w.label());
            assert_eq!(got, Some(*want), "{}", subnet_key(&lease.subnet));
        }
        assert!(plan.peers.is_empty(), "{:?}", plan.peers);
    }

    #[test]
    fn a_lease_overlapping_ours_is_rejected() {
        let mut c = config(vxlan(false));
        c.subnet_len = None; // as in a plan without SubnetLen
        let plan = plan(
            &[vx("10.244.1.128-25", "198.18.0.95", "0e:00:00:00:00:95")],
            &c,
            &facts(),
        );
        assert_eq!(reason(&plan, "10.244.1.128-25"), Some("overlap"));
    }

    #[test]
    fn a_lease_covering_the_underlay_or_a_node_is_rejected() {
        let mut c = config(vxlan(false));
        c.network = "0.0.0.0/0".parse().unwrap(); // a careless Network lets it through
        c.subnet_len = None;
        let leases = [
            vx("198.18.0.0-25", "203.0.113.1", "0e:00:00:00:00:01"),
            vx("203.0.113.0-24", "203.0.113.1", "0e:00:00:00:00:02"),
            vx("127.0.0.0-8", "203.0.113.3", "0e:00:00:00:00:03"),
        ];
        let plan = plan(&leases, &c, &facts());
        assert_eq!(reason(&plan, "198.18.0.0-25"), Some("covers_node"));
        assert_eq!(reason(&plan, "203.0.113.0-24"), Some("covers_node"));
        assert_eq!(reason(&plan, "127.0.0.0-8"), Some("covers_node"));
    }

    #[test]
    fn overlapping_leases_and_shared_macs_reject_both_sides() {
        let leases = [
            vx("10.244.2.0-23", "198.18.0.12", "0e:00:00:00:00:12"),
            vx("10.244.3.0-24", "198.18.0.13", "0e:00:00:00:00:13"),
            vx("10.244.8.0-24", "198.18.0.14", "0e:00:00:00:00:14"),
            vx("10.244.9.0-24", "198.18.0.15", "0e:00:00:00:00:14"),
            vx("10.244.10.0-24", "198.18.0.16", "0e:00:00:00:00:16"),
        ];
        // Without a SubnetLen to check, the /23 is valid on its own and meets the /24.
        let mut c = config(vxlan(false));
        c.subnet_len = None;
        let plan = plan(&leases, &c, &facts());
        assert_eq!(reason(&plan, "10.244.2.0-23"), Some("overlap"));
        assert_eq!(reason(&plan, "10.244.3.0-24"), Some("overlap"));
        assert_eq!(reason(&plan, "10.244.8.0-24"), Some("vtep_mac_shared"));
        assert_eq!(reason(&plan, "10.244.9.0-24"), Some("vtep_mac_shared"));
        assert_eq!(plan.peers.len(), 1);
        assert!(plan.peers.contains_key(&"10.244.10.0/24".parse().unwrap()));
    }

    #[test]
    fn a_lease_of_the_wrong_length_never_takes_a_valid_peer_down() {
        // A /25 written over node 2's /24 (the hostile-lease report on host-gw).
        let leases = [
            lease("10.244.2.0-24", "198.18.0.12", "host-gw", None),
            lease("10.244.2.128-25", "198.18.0.99", "host-gw", None),
            lease("10.244.4.0-23", "198.18.0.98", "host-gw", None),
        ];
        let mut facts = facts();
        facts.on_link.extend(
            ["198.18.0.99", "198.18.0.98"]
                .iter()
                .map(|ip| (ip.parse().unwrap(), true)),
        );
        let plan = plan(&leases, &config(BackendConf::HostGw), &facts);
        assert_eq!(reason(&plan, "10.244.2.128-25"), Some("subnet_len"));
        assert_eq!(reason(&plan, "10.244.4.0-23"), Some("subnet_len"));
        let peers: Vec<String> = plan.peers.keys().map(subnet_key).collect();
        assert_eq!(peers, ["10.244.2.0-24"]);
        let why = &plan.rejected[&leases[1].subnet].1;
        assert_eq!(
            why.to_string(),
            "its prefix length /25 is not the /24 of this network's leases (SubnetLen; with \
             --kube-subnet-mgr, the size of this node's podCIDR): no node allocates such a \
             lease, so delete it, or make SubnetLen (or the podCIDR size) agree"
        );
        // Without the length check (no SubnetLen known), both would have been lost.
        let mut c = config(BackendConf::HostGw);
        c.subnet_len = None;
        let unchecked = super::plan(&leases[..2], &c, &facts);
        assert!(unchecked.peers.is_empty(), "{:?}", unchecked.peers);
    }

    #[test]
    fn leases_outside_subnet_min_max_are_rejected_where_set() {
        let leases = [
            vx("10.244.2.0-24", "198.18.0.12", "0e:00:00:00:00:12"),
            vx("10.244.10.0-24", "198.18.0.13", "0e:00:00:00:00:13"),
            vx("10.244.20.0-24", "198.18.0.14", "0e:00:00:00:00:14"),
            vx("10.244.21.0-24", "198.18.0.15", "0e:00:00:00:00:15"),
        ];
        let mut c = config(vxlan(false));
        let all = plan(&leases, &c, &facts());
        assert_eq!(all.peers.len(), 4, "no range set: {:?}", all.rejected);
        c.subnet_range = Some((
            "10.244.10.0".parse().unwrap(),
            "10.244.20.0".parse().unwrap(),
        ));
        let ranged = plan(&leases, &c, &facts());
        assert_eq!(reason(&ranged, "10.244.2.0-24"), Some("subnet_range"));
        assert_eq!(reason(&ranged, "10.244.21.0-24"), Some("subnet_range"));
        let peers: Vec<String> = ranged.peers.keys().map(subnet_key).collect();
        assert_eq!(peers, ["10.244.10.0-24", "10.244.20.0-24"]);
        assert_eq!(
            ranged.rejected[&leases[0].subnet].1.to_string(),
            "it lies outside SubnetMin 10.244.10.0 .. SubnetMax 10.244.20.0 of the network \
             config: delete the lease, or widen SubnetMin/SubnetMax"
        );
    }

    #[test]
    fn the_config_holds_leases_to_subnet_len_and_a_set_range_only() {
        let ext = ExtIface {
            name: "eth0".into(),
            index: 2,
            addr: "198.18.0.11".parse().unwrap(),
            public_ip: "198.18.0.11".parse().unwrap(),
            mtu: 1500,
        };
        let conf = NetConf::parse(r#"{"Network": "10.244.0.0/16", "SubnetLen": 25}"#).unwrap();
        let c = PlanConfig::for_netconf(&conf, &ext);
        assert_eq!((c.subnet_len, c.subnet_range), (Some(25), None));
        let conf =
            NetConf::parse(r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.9.0"}"#).unwrap();
        let c = PlanConfig::for_netconf(&conf, &ext);
        let range = Some(("10.244.1.0".parse().unwrap(), "10.244.9.0".parse().unwrap()));
        assert_eq!((c.subnet_len, c.subnet_range), (Some(24), range));
    }

    #[test]
    fn host_gw_needs_peers_on_link() {
        let leases = [
            lease("10.244.2.0-24", "198.18.0.12", "host-gw", None),
            lease("10.244.3.0-24", "203.0.113.13", "host-gw", None),
        ];
        let plan = plan(&leases, &config(BackendConf::HostGw), &facts());
        assert_eq!(plan.peers.len(), 1);
        assert_eq!(reason(&plan, "10.244.3.0-24"), Some("not_on_link"));
        let peer = plan.peers.values().next().unwrap();
        assert_eq!((peer.path, peer.vtep_mac), (Path::Direct, None));
    }

    #[test]
    fn diff_names_what_changed() {
        let a = vx("10.244.2.0-24", "198.18.0.12", "0e:00:00:00:00:12");
        let b = vx("10.244.3.0-24", "198.18.0.13", "0e:00:00:00:00:13");
        let c = config(vxlan(false));
        let before = plan([&a, &b], &c, &facts());
        let mut moved = b.clone();
        moved.attrs.public_ip = "198.18.0.33".parse().unwrap();
        let after = plan([&moved], &c, &facts());
        let changes = before.diff(&after);
        assert_eq!(changes.len(), 2);
        assert!(changes.contains(&PeerChange::Removed(a.subnet)));
        assert!(matches!(changes[1], PeerChange::Set(p) if p.public_ip == moved.attrs.public_ip));
        assert!(after.diff(&after).is_empty());
    }
}
