//! Small rtnetlink helpers shared by interface selection and the kernel backends.
//!
//! Everything here is IPv4 and the main routing table. Adds use `NLM_F_REPLACE` and
//! deletes ignore "already gone", so that callers are idempotent by construction.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::lease::MacAddr;

/// The bridge the CNI plugin attaches pods to (flannel's `cni0`).
pub const CNI_BRIDGE: &str = "cni0";

/// The errno of a netlink error reply (positive, e.g. `libc::EEXIST`).
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// True when a delete failed only because the object is already gone.
fn already_gone(err: &rtnetlink::Error) -> bool {
    matches!(
        errno(err),
        Some(libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL)
    )
}

/// Runs a delete request, treating "already gone" as success.
async fn delete(
    request: impl std::future::Future<Output = Result<(), rtnetlink::Error>>,
) -> Result<(), rtnetlink::Error> {
    match request.await {
        Err(e) if already_gone(&e) => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// Links

/// What the backends need to know about a network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    pub up: bool,
    pub kind: Option<InfoKind>,
    /// The VXLAN attributes, for a vxlan device.
    pub vxlan: Vec<InfoVxlan>,
}

impl From<LinkMessage> for Link {
    fn from(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            vxlan: Vec::new(),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                LinkAttribute::Address(bytes) => link.mac = mac_from_bytes(&bytes),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind),
                            LinkInfo::Data(InfoData::Vxlan(data)) => link.vxlan = data,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn mac_from_bytes(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

/// All interfaces, in index order.
pub async fn links(handle: &Handle) -> Result<Vec<Link>> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing interfaces")?;
    Ok(msgs.into_iter().map(Link::from).collect())
}

/// The interface called `name`, if there is one.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>> {
    let mut stream = handle.link().get().match_name(name).execute();
    match stream.try_next().await {
        Ok(msg) => Ok(msg.map(Link::from)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
    }
}

/// The interface with index `index`, if there is one.
pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<Link>> {
    let mut stream = handle.link().get().match_index(index).execute();
    match stream.try_next().await {
        Ok(msg) => Ok(msg.map(Link::from)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up interface #{index}")),
    }
}

/// Sets MAC address and MTU of interface `index` and brings it up.
pub async fn set_link(handle: &Handle, index: u32, mac: MacAddr, mtu: u32) -> Result<()> {
    let msg = LinkMessageBuilder::<LinkUnspec>::new()
        .index(index)
        .address(mac.0.to_vec())
        .mtu(mtu)
        .up()
        .build();
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .with_context(|| format!("setting MAC {mac} and MTU {mtu} on interface #{index}"))
}

/// Deletes interface `index` (fine if it is already gone).
pub async fn delete_link(handle: &Handle, index: u32) -> Result<()> {
    delete(handle.link().del(index).execute())
        .await
        .with_context(|| format!("deleting interface #{index}"))
}

// ---------------------------------------------------------------------------------------
// Addresses

/// One IPv4 address of an interface, with the message that deletes it.
#[derive(Clone, Debug)]
pub struct Addr {
    pub index: u32,
    pub net: Ipv4Network,
    message: AddressMessage,
}

/// The IPv4 addresses of every interface (or of interface `index` only), in kernel order.
pub async fn ipv4_addrs(handle: &Handle, index: Option<u32>) -> Result<Vec<Addr>> {
    let mut request = handle.address().get();
    if let Some(index) = index {
        request = request.set_link_index_filter(index);
    }
    let msgs: Vec<AddressMessage> = request
        .execute()
        .try_collect()
        .await
        .context("listing addresses")?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let net = Ipv4Network::new(local.or(address)?, m.header.prefix_len).ok()?;
            Some(Addr {
                index: m.header.index,
                net,
                message: m,
            })
        })
        .collect())
}

/// Adds `net` to interface `index` (fine if it is already there).
pub async fn add_addr(handle: &Handle, index: u32, net: Ipv4Network) -> Result<()> {
    handle
        .address()
        .add(index, IpAddr::V4(net.ip()), net.prefix())
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding address {net} to interface #{index}"))
}

/// Removes every IPv4 address of interface `ifname` for which `keep` is false, saying in
/// the log what went and why. A missing interface has nothing to remove.
pub async fn remove_addrs(
    handle: &Handle,
    ifname: &str,
    lease: Ipv4Network,
    keep: impl Fn(&Ipv4Network) -> bool,
) -> Result<Vec<Ipv4Network>> {
    let Some(link) = link_by_name(handle, ifname).await? else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for addr in ipv4_addrs(handle, Some(link.index)).await? {
        if keep(&addr.net) {
            continue;
        }
        delete(handle.address().del(addr.message).execute())
            .await
            .with_context(|| format!("removing stale address {} from {ifname}", addr.net))?;
        tracing::warn!(
            "removed address {} from {ifname}: it does not belong to this node's lease {lease} (left over from an earlier cluster or lease)",
            addr.net
        );
        removed.push(addr.net);
    }
    Ok(removed)
}

/// Removes addresses on the CNI bridge `cni0` outside the node's lease: after a subnet
/// change or a `kubeadm reset` the bridge keeps its old gateway address, and the CNI
/// bridge plugin then refuses to add pods. (Both backends do this in `configure`.)
pub async fn remove_stale_bridge_addrs(
    handle: &Handle,
    lease: Ipv4Network,
) -> Result<Vec<Ipv4Network>> {
    remove_addrs(handle, CNI_BRIDGE, lease, |addr| lease.contains(addr.ip())).await
}

// ---------------------------------------------------------------------------------------
// Routes

/// The route protocol number that marks routes weft programmed (`ip route ... proto 87`),
/// as routing daemons mark theirs: weft replaces and deletes only routes carrying it.
pub const RTPROT_WEFT: u8 = 87;

/// A route weft programs: `<dst> via <gateway> dev <oif> [onlink] proto 87`, metric 0,
/// main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub onlink: bool,
}

impl Route {
    fn message(&self) -> RouteMessage {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .output_interface(self.oif)
            .protocol(RouteProtocol::Other(RTPROT_WEFT));
        if let Some(gateway) = self.gateway {
            builder = builder.gateway(gateway);
        }
        if self.onlink {
            builder = builder.onlink();
        }
        builder.build()
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        write!(f, " dev #{}", self.oif)?;
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// A unicast IPv4 route of the main table, as the kernel reports it.
#[derive(Clone, Debug)]
pub struct KernelRoute {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    /// The output interface (of the first next hop, for a multipath route).
    pub oif: Option<u32>,
    pub metric: u32,
    /// The `proto` the route was added with.
    pub protocol: u8,
    message: RouteMessage,
}

impl KernelRoute {
    /// Whether weft programmed this route.
    pub fn is_weft(&self) -> bool {
        self.protocol == RTPROT_WEFT
    }

    /// Whether this route has `want`'s next hop and metric 0, whoever added it. The onlink
    /// flag is not compared: the kernel would have refused the route without it where it
    /// matters.
    pub fn same_path(&self, want: &Route) -> bool {
        self.dst == want.dst
            && self.gateway == want.gateway
            && self.oif == Some(want.oif)
            && self.metric == 0
    }

    /// Whether this route is exactly `want`, programmed by weft.
    pub fn is(&self, want: &Route) -> bool {
        self.same_path(want) && self.is_weft()
    }

    fn parse(msg: RouteMessage) -> Option<KernelRoute> {
        let h = &msg.header;
        let table = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(h.table as u32);
        if h.address_family != AddressFamily::Inet
            || table != RouteHeader::RT_TABLE_MAIN as u32
            || h.kind != RouteType::Unicast
        {
            return None;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let (mut gateway, mut oif, mut metric) = (None, None, 0);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::Priority(p) => metric = *p,
                RouteAttribute::MultiPath(hops) => {
                    if let Some(hop) = hops.first() {
                        oif = oif.or(Some(hop.interface_index));
                        gateway = gateway.or(hop.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                            _ => None,
                        }));
                    }
                }
                _ => {}
            }
        }
        let dst = Ipv4Network::new(dst, h.destination_prefix_length).ok()?;
        Some(KernelRoute {
            dst,
            gateway,
            oif,
            metric,
            protocol: u8::from(h.protocol),
            message: msg,
        })
    }
}

/// The unicast IPv4 routes of the main table.
pub async fn routes(handle: &Handle) -> Result<Vec<KernelRoute>> {
    let msgs: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    Ok(msgs.into_iter().filter_map(KernelRoute::parse).collect())
}

/// What `ip route get <dst>` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLookup {
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    pub prefsrc: Option<Ipv4Addr>,
}

/// Asks the kernel which route it would use to reach `dst`.
pub async fn route_get(handle: &Handle, dst: Ipv4Addr) -> Result<RouteLookup> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = 32;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    let reply = handle
        .route()
        .get(msg)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up the route to {dst}"))?
        .with_context(|| format!("the kernel returned no route to {dst}"))?;
    let mut lookup = RouteLookup {
        oif: None,
        gateway: None,
        prefsrc: None,
    };
    for attr in reply.attributes {
        match attr {
            RouteAttribute::Oif(index) => lookup.oif = Some(index),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => lookup.gateway = Some(ip),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => lookup.prefsrc = Some(ip),
            _ => {}
        }
    }
    Ok(lookup)
}

/// True when `ip` is directly reachable (no gateway) through interface `oif`: a peer on
/// the same L2 segment.
pub async fn on_link(handle: &Handle, ip: Ipv4Addr, oif: u32) -> Result<bool> {
    let lookup = route_get(handle, ip).await?;
    Ok(lookup.gateway.is_none() && lookup.oif == Some(oif))
}

/// Whether `table` holds `want` and no other route to the same destination.
pub fn route_in_place(table: &[KernelRoute], want: &Route) -> bool {
    let mut same_dst = table.iter().filter(|r| r.dst == want.dst).peekable();
    same_dst.peek().is_some() && same_dst.all(|r| r.is(want))
}

/// Another component's route to a destination weft wants to route: left alone, reported.
#[derive(Debug, thiserror::Error)]
#[error(
    "another component's route to {dst} is in place ({route}): weft leaves it alone and does \
     not route this lease; remove that route if it is stale, or take {dst} out of the pod network"
)]
pub struct ForeignRoute {
    pub dst: Ipv4Network,
    pub route: String,
}

impl std::fmt::Display for KernelRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev #{oif}")?;
        }
        write!(f, " proto {} metric {}", self.protocol, self.metric)
    }
}

/// Installs `want`, replacing weft's route with the same key, then deletes weft's other
/// routes to the same destination listed in `table` (e.g. with another metric), which
/// would compete with it. A route with `want`'s path that someone else added (flanneld
/// before a migration) is taken over; any other foreign route to the destination makes
/// this fail with [`ForeignRoute`], and nothing is changed.
pub async fn ensure_route(handle: &Handle, table: &[KernelRoute], want: &Route) -> Result<()> {
    if let Some(foreign) = table
        .iter()
        .find(|r| r.dst == want.dst && !r.is_weft() && !r.same_path(want))
    {
        return Err(ForeignRoute {
            dst: want.dst,
            route: foreign.to_string(),
        }
        .into());
    }
    handle
        .route()
        .add(want.message())
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding route {want}"))?;
    for conflicting in table
        .iter()
        .filter(|r| r.dst == want.dst && r.is_weft() && !r.is(want))
    {
        // The one with the same key was just replaced: deleting its old form finds nothing.
        delete_route(handle, conflicting).await?;
    }
    Ok(())
}

/// Deletes one route (fine if it is already gone).
pub async fn delete_route(handle: &Handle, route: &KernelRoute) -> Result<()> {
    delete(handle.route().del(route.message.clone()).execute())
        .await
        .with_context(|| format!("deleting route to {}", route.dst))
}

/// `blackhole <subnet>` (flannel's --ip-blackhole-route): traffic to addresses of the own
/// lease that no pod holds is dropped here instead of following the default route.
fn blackhole_route(subnet: Ipv4Network) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(subnet.network(), subnet.prefix())
        .kind(RouteType::BlackHole)
        .build()
}

/// Installs the blackhole route for `subnet` (idempotent).
pub async fn ensure_blackhole_route(handle: &Handle, subnet: Ipv4Network) -> Result<()> {
    handle
        .route()
        .add(blackhole_route(subnet))
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding blackhole route {subnet}"))
}

/// Deletes the blackhole route for `subnet` (fine if there is none).
pub async fn delete_blackhole_route(handle: &Handle, subnet: Ipv4Network) -> Result<()> {
    delete(handle.route().del(blackhole_route(subnet)).execute())
        .await
        .with_context(|| format!("deleting blackhole route {subnet}"))
}

/// Deletes weft's routes to exactly `dst` that have a gateway through one of `oifs`.
pub async fn delete_routes_to(handle: &Handle, dst: Ipv4Network, oifs: &[u32]) -> Result<()> {
    for route in routes(handle).await? {
        let through = route.oif.is_some_and(|oif| oifs.contains(&oif));
        if route.dst == dst && route.gateway.is_some() && through && route.is_weft() {
            delete_route(handle, &route).await?;
        }
    }
    Ok(())
}

/// Deletes the routes weft programmed through `oif` that `keep` does not list: marked
/// with weft's protocol, inside `network`, with a gateway. Returns the destinations removed.
pub async fn prune_routes(
    handle: &Handle,
    table: &[KernelRoute],
    network: Ipv4Network,
    oif: u32,
    keep: impl Fn(&Ipv4Network) -> bool,
) -> Result<Vec<Ipv4Network>> {
    let mut removed = Vec::new();
    for route in table {
        let ours = route.oif == Some(oif)
            && route.is_weft()
            && route.gateway.is_some()
            && route.dst.prefix() >= network.prefix()
            && network.contains(route.dst.network());
        if ours && !keep(&route.dst) {
            delete_route(handle, route).await?;
            removed.push(route.dst);
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------------------
// Neighbours (ARP) and FDB entries

/// An IPv4 neighbour entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: Option<MacAddr>,
    pub permanent: bool,
}

/// The IPv4 neighbour entries of interface `index`.
pub async fn neighbours(handle: &Handle, index: u32) -> Result<Vec<Neighbour>> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .context("listing neighbours")?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.ifindex == index && m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            Some(Neighbour {
                ip,
                mac: lladdr(&m.attributes),
                permanent: is_permanent(m.header.state),
            })
        })
        .collect())
}

/// NUD_PERMANENT may come with other bits (`bridge fdb add ... permanent` adds NUD_NOARP).
pub(crate) fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

pub(crate) fn lladdr(attrs: &[NeighbourAttribute]) -> Option<MacAddr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => mac_from_bytes(bytes),
        _ => None,
    })
}

/// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
pub async fn replace_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: MacAddr,
) -> Result<()> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding neighbour {ip} lladdr {mac} on interface #{index}"))
}

/// `ip neigh del <ip> dev <index>` (fine if it is already gone).
pub async fn delete_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr) -> Result<()> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    delete(handle.neighbours().del(msg).execute())
        .await
        .with_context(|| format!("deleting neighbour {ip} on interface #{index}"))
}

/// A forwarding database entry of a VXLAN device: frames to `mac` go to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
}

/// The FDB entries of interface `index` (`bridge fdb show dev <index>`).
pub async fn fdb_entries(handle: &Handle, index: u32) -> Result<Vec<FdbEntry>> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .context("listing FDB entries")?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.ifindex == index)
        .filter_map(|m| {
            let dst = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                    <[u8; 4]>::try_from(bytes.as_slice())
                        .ok()
                        .map(Ipv4Addr::from)
                }
                _ => None,
            });
            Some(FdbEntry {
                mac: lladdr(&m.attributes)?,
                dst,
                permanent: is_permanent(m.header.state),
            })
        })
        .collect())
}

/// `bridge fdb replace <mac> dev <index> dst <dst> self permanent`.
pub async fn replace_fdb(handle: &Handle, index: u32, mac: MacAddr, dst: Ipv4Addr) -> Result<()> {
    handle
        .neighbours()
        .add_bridge(index, &mac.0)
        .flags(NeighbourFlags::Own)
        .destination(IpAddr::V4(dst))
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding FDB entry {mac} dst {dst} on interface #{index}"))
}

/// `bridge fdb del <mac> dev <index> self`: the entry with all its destinations (fine if
/// it is already gone).
pub async fn delete_fdb(handle: &Handle, index: u32, mac: MacAddr) -> Result<()> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    delete(handle.neighbours().del(msg).execute())
        .await
        .with_context(|| format!("deleting FDB entry {mac} on interface #{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_route(dst: &str, gateway: Option<&str>, oif: u32, metric: u32) -> KernelRoute {
        KernelRoute {
            dst: dst.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            oif: Some(oif),
            metric,
            protocol: RTPROT_WEFT,
            message: RouteMessage::default(),
        }
    }

    #[test]
    fn route_in_place_needs_exactly_the_wanted_route() {
        let want = Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            gateway: Some("198.18.0.12".parse().unwrap()),
            oif: 2,
            onlink: false,
        };
        let ours = kernel_route("10.244.2.0/24", Some("198.18.0.12"), 2, 0);
        let other_gw = kernel_route("10.244.2.0/24", Some("198.18.0.13"), 2, 0);
        let other_metric = kernel_route("10.244.2.0/24", Some("198.18.0.12"), 2, 100);
        let unrelated = kernel_route("10.244.3.0/24", Some("198.18.0.13"), 2, 0);
        assert!(route_in_place(&[ours.clone(), unrelated.clone()], &want));
        assert!(!route_in_place(&[unrelated], &want));
        assert!(!route_in_place(&[other_gw], &want));
        assert!(!route_in_place(&[ours, other_metric], &want));
        // flanneld's route (proto boot) with the same path is not weft's yet: taken over.
        let flanneld = KernelRoute {
            protocol: 3,
            ..kernel_route("10.244.2.0/24", Some("198.18.0.12"), 2, 0)
        };
        assert!(!route_in_place(&[flanneld], &want));
    }
}
