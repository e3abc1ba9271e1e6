//! The vxlan backend, programmed exactly as flanneld does so that weft and flanneld nodes
//! interoperate: device `flannel.<VNI>`, a permanent neighbour, FDB entry and onlink route
//! per remote lease (or a direct route with DirectRouting on a shared L2 segment).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{InfoKind, InfoVxlan};
use rtnetlink::{Handle, LinkVxlan};
use tracing::{info, warn};

use super::netlink::{self, KernelRoute, Link, Route};
use super::{Backend, Failures};
use crate::config::VxlanConf;
use crate::iface::ExtIface;
use crate::lease::{Lease, LeaseAttrs, MacAddr, VxlanBackendData};
use crate::plan::{self, Path, PeerChange, Plan};

const BACKEND_TYPE: &str = "vxlan";

/// How one remote lease is programmed: through `flannel.<VNI>` (neighbour + FDB entry +
/// onlink route) or, DirectRouting to a peer on the same L2 segment, a plain route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Overlay {
        vtep_mac: MacAddr,
        public_ip: Ipv4Addr,
    },
    Direct {
        public_ip: Ipv4Addr,
    },
}

impl From<&plan::Peer> for Peer {
    fn from(p: &plan::Peer) -> Self {
        match (p.path, p.vtep_mac) {
            (Path::Overlay, Some(vtep_mac)) => Peer::Overlay {
                vtep_mac,
                public_ip: p.public_ip,
            },
            // The planner gives every vxlan peer a MAC; without one only a route can work.
            _ => Peer::Direct {
                public_ip: p.public_ip,
            },
        }
    }
}

pub struct VxlanBackend {
    conf: VxlanConf,
    network: Ipv4Network,
    ext: ExtIface,
    handle: Handle,
    device: String,
    mtu: u32,
    /// The device's MAC (published as VtepMAC), known after `register`.
    vtep_mac: Option<MacAddr>,
    own: Option<Ipv4Network>,
    /// What was programmed per remote subnet, so that removal knows the MAC.
    programmed: HashMap<Ipv4Network, Peer>,
}

impl VxlanBackend {
    pub fn new(conf: VxlanConf, network: Ipv4Network, ext: ExtIface, handle: Handle) -> Self {
        VxlanBackend {
            device: format!("flannel.{}", conf.vni),
            mtu: plan::vxlan_mtu(&conf, &ext),
            conf,
            network,
            ext,
            handle,
            vtep_mac: None,
            own: None,
            programmed: HashMap::new(),
        }
    }

    /// Why an existing device cannot be adopted, if it cannot.
    fn incompatibility(&self, link: &Link) -> Option<String> {
        if link.kind != Some(InfoKind::Vxlan) {
            return Some(format!("kind {:?} instead of vxlan", link.kind));
        }
        let mut differences = Vec::new();
        let mut gbp = false;
        for attr in &link.vxlan {
            match attr {
                InfoVxlan::Id(id) if *id != self.conf.vni => {
                    differences.push(format!("VNI {id} (want {})", self.conf.vni))
                }
                InfoVxlan::Port(port) if *port != self.conf.port => {
                    differences.push(format!("port {port} (want {})", self.conf.port))
                }
                InfoVxlan::Local(local) if *local != self.ext.addr => {
                    differences.push(format!("local {local} (want {})", self.ext.addr))
                }
                InfoVxlan::Link(index) if *index != self.ext.index => differences.push(format!(
                    "dev #{index} (want {} #{})",
                    self.ext.name, self.ext.index
                )),
                InfoVxlan::Learning(learning) if *learning != self.conf.learning => {
                    differences.push(format!("learning {learning} (want {})", self.conf.learning))
                }
                InfoVxlan::Gbp => gbp = true,
                _ => {}
            }
        }
        if !link.vxlan.iter().any(|a| matches!(a, InfoVxlan::Local(_))) {
            differences.push(format!("no local address (want {})", self.ext.addr));
        }
        if !link.vxlan.iter().any(|a| matches!(a, InfoVxlan::Link(_))) {
            differences.push(format!("no underlay device (want {})", self.ext.name));
        }
        if gbp != self.conf.gbp {
            differences.push(format!("gbp {gbp} (want {})", self.conf.gbp));
        }
        (!differences.is_empty()).then(|| differences.join(", "))
    }

    /// Creates `flannel.<VNI>` or adopts a compatible existing one, with MAC `preferred`
    /// if given, else the existing device's MAC, else a new random one. Returns the device
    /// and whether it was created (a new device has no address, routes or entries).
    async fn ensure_device(&mut self, preferred: Option<MacAddr>) -> Result<(Link, bool)> {
        let existing = netlink::link_by_name(&self.handle, &self.device).await?;
        let mac = preferred
            .or(existing.as_ref().and_then(|l| l.mac))
            .unwrap_or_else(MacAddr::random_local);
        if let Some(link) = existing {
            match self.incompatibility(&link) {
                None => {
                    if link.mac != Some(mac) || link.mtu != self.mtu || !link.up {
                        netlink::set_link(&self.handle, link.index, mac, self.mtu).await?;
                    }
                    self.vtep_mac = Some(mac);
                    return Ok((
                        Link {
                            mac: Some(mac),
                            mtu: self.mtu,
                            up: true,
                            ..link
                        },
                        false,
                    ));
                }
                Some(why) => {
                    warn!(
                        "{} exists with {why}: deleting and recreating it",
                        self.device
                    );
                    netlink::delete_link(&self.handle, link.index).await?;
                }
            }
        }
        let mut builder = LinkVxlan::new(&self.device, self.conf.vni)
            .dev(self.ext.index)
            .local(self.ext.addr)
            .port(self.conf.port)
            .learning(self.conf.learning);
        if self.conf.gbp {
            builder = builder.gbp();
        }
        let msg = builder.mtu(self.mtu).address(mac.0.to_vec()).up().build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| {
                format!(
                    "creating {} (vxlan id {} local {} dev {} dstport {})",
                    self.device, self.conf.vni, self.ext.addr, self.ext.name, self.conf.port
                )
            })?;
        disable_accept_ra(&self.device);
        let link = netlink::link_by_name(&self.handle, &self.device)
            .await?
            .with_context(|| format!("{} vanished right after it was created", self.device))?;
        info!(mac = %mac, mtu = self.mtu, "created {}", self.device);
        self.vtep_mac = Some(mac);
        self.programmed.clear();
        Ok((link, true))
    }

    /// The device, re-created with its MAC and address if someone deleted it.
    async fn ready_device(&mut self) -> Result<Link> {
        let (link, created) = self.ensure_device(self.vtep_mac).await?;
        if created {
            if let Some(own) = self.own {
                netlink::add_addr(&self.handle, link.index, own_address(own)).await?;
            }
        }
        Ok(link)
    }

    fn overlay_route(subnet: Ipv4Network, dev: u32) -> Route {
        Route {
            dst: subnet,
            gateway: Some(subnet.network()),
            oif: dev,
            onlink: true,
        }
    }

    fn direct_route(&self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> Route {
        Route {
            dst: subnet,
            gateway: Some(public_ip),
            oif: self.ext.index,
            onlink: false,
        }
    }

    /// Programs `peer` for `subnet`, cleaning up what a different earlier state left.
    async fn program(
        &mut self,
        subnet: Ipv4Network,
        peer: Peer,
        dev: u32,
        table: &[KernelRoute],
    ) -> Result<()> {
        let h = &self.handle;
        if let Some(Peer::Overlay {
            vtep_mac: old_mac, ..
        }) = self.programmed.get(&subnet).copied()
        {
            match peer {
                Peer::Direct { .. } => {
                    netlink::delete_neighbour(h, dev, subnet.network()).await?;
                    netlink::delete_fdb(h, dev, old_mac).await?;
                }
                Peer::Overlay { vtep_mac, .. } if vtep_mac != old_mac => {
                    netlink::delete_fdb(h, dev, old_mac).await?
                }
                Peer::Overlay { .. } => {}
            }
        }
        match peer {
            Peer::Overlay {
                vtep_mac,
                public_ip,
            } => {
                netlink::replace_neighbour(h, dev, subnet.network(), vtep_mac).await?;
                netlink::replace_fdb(h, dev, vtep_mac, public_ip).await?;
                netlink::ensure_route(h, table, &Self::overlay_route(subnet, dev)).await?;
            }
            Peer::Direct { public_ip } => {
                netlink::ensure_route(h, table, &self.direct_route(subnet, public_ip)).await?;
            }
        }
        self.programmed.insert(subnet, peer);
        Ok(())
    }

    /// Removes the routes, neighbour and FDB entry of `subnet`, also those an earlier run
    /// programmed (the MAC then comes from the neighbour entry).
    async fn remove(&mut self, subnet: Ipv4Network) -> Result<()> {
        let remembered = self.programmed.remove(&subnet);
        let h = &self.handle;
        let dev = netlink::link_by_name(h, &self.device)
            .await?
            .map(|l| l.index);
        let mut oifs: Vec<u32> = dev.into_iter().collect();
        if self.conf.direct_routing {
            oifs.push(self.ext.index);
        }
        netlink::delete_routes_to(h, subnet, &oifs).await?;
        let Some(dev) = dev else { return Ok(()) };
        let neighbour = netlink::neighbours(h, dev)
            .await?
            .into_iter()
            .find(|n| n.ip == subnet.network());
        let mut macs: HashSet<MacAddr> = neighbour.and_then(|n| n.mac).into_iter().collect();
        if let Some(Peer::Overlay { vtep_mac, .. }) = remembered {
            macs.insert(vtep_mac);
        }
        netlink::delete_neighbour(h, dev, subnet.network()).await?;
        for mac in macs {
            netlink::delete_fdb(h, dev, mac).await?;
        }
        Ok(())
    }
}

/// The device address flannel uses: the lease's network address as a /32.
fn own_address(own: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(own.network(), 32).expect("a /32 is always valid")
}

/// flannel sets accept_ra 0 on the device; without IPv6 there is nothing to set.
fn disable_accept_ra(device: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{device}/accept_ra");
    if let Err(e) = std::fs::write(&path, "0") {
        tracing::debug!("could not set {path} to 0: {e}");
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn register(&mut self, previous: Option<&Lease>) -> Result<LeaseAttrs> {
        let previous_mac = previous.and_then(|l| l.attrs.vxlan()).map(|d| d.vtep_mac);
        let (link, _) = self.ensure_device(previous_mac.or(self.vtep_mac)).await?;
        let vtep_mac = link.mac.context("the vxlan device has no MAC address")?;
        let data = VxlanBackendData {
            vni: self.conf.vni,
            vtep_mac,
        };
        Ok(LeaseAttrs {
            public_ip: self.ext.public_ip,
            public_ipv6: None,
            backend_type: BACKEND_TYPE.to_string(),
            backend_data: Some(serde_json::to_value(data)?),
            backend_v6_data: None,
        })
    }

    async fn configure(&mut self, own: &Lease) -> Result<()> {
        self.own = Some(own.subnet);
        let link = self.ready_device().await?;
        let address = own_address(own.subnet);
        netlink::remove_addrs(&self.handle, &self.device, own.subnet, |a| *a == address).await?;
        netlink::add_addr(&self.handle, link.index, address).await?;
        netlink::remove_stale_bridge_addrs(&self.handle, own.subnet).await?;
        Ok(())
    }

    async fn apply(&mut self, change: &PeerChange) -> Result<()> {
        match change {
            PeerChange::Set(peer) => {
                let dev = self.ready_device().await?.index;
                let table = netlink::routes(&self.handle).await?;
                self.program(peer.subnet, peer.into(), dev, &table)
                    .await
                    .with_context(|| {
                        format!(
                            "programming the lease of {} (node {})",
                            peer.subnet, peer.public_ip
                        )
                    })
            }
            PeerChange::Removed(subnet) => self
                .remove(*subnet)
                .await
                .with_context(|| format!("removing the lease of {subnet}")),
        }
    }

    async fn resync(&mut self, plan: &Plan) -> Result<()> {
        let dev = self.ready_device().await?.index;
        if let Some(own) = self.own {
            netlink::add_addr(&self.handle, dev, own_address(own)).await?;
        }
        let wanted: HashMap<Ipv4Network, Peer> =
            plan.peers.iter().map(|(s, p)| (*s, p.into())).collect();
        let h = self.handle.clone();
        let table = netlink::routes(&h).await?;
        let neighbours = netlink::neighbours(&h, dev).await?;
        let fdb = netlink::fdb_entries(&h, dev).await?;

        let mut failures = Failures::default();
        for (&subnet, &peer) in &wanted {
            let in_place = match peer {
                Peer::Overlay {
                    vtep_mac,
                    public_ip,
                } => {
                    neighbours
                        .iter()
                        .any(|n| n.ip == subnet.network() && n.mac == Some(vtep_mac))
                        && fdb
                            .iter()
                            .any(|e| e.mac == vtep_mac && e.dst == Some(public_ip))
                        && netlink::route_in_place(&table, &Self::overlay_route(subnet, dev))
                }
                Peer::Direct { public_ip } => {
                    netlink::route_in_place(&table, &self.direct_route(subnet, public_ip))
                }
            };
            if !in_place {
                info!("resync: restoring the routes of {subnet} ({peer:?})");
                let result = self.program(subnet, peer, dev, &table).await;
                failures.record(result.with_context(|| format!("programming {subnet}")));
            }
        }

        let keep = |dst: &Ipv4Network| wanted.contains_key(dst) || Some(*dst) == self.own;
        for dst in netlink::prune_routes(&h, &table, self.network, dev, keep).await? {
            info!(
                "resync: removed the route to {dst} via {}: no lease has it",
                self.device
            );
        }
        if self.conf.direct_routing {
            for dst in netlink::prune_routes(&h, &table, self.network, self.ext.index, keep).await?
            {
                info!(
                    "resync: removed the direct route to {dst} via {}: no lease has it",
                    self.ext.name
                );
            }
        }
        let overlay: Vec<(Ipv4Addr, MacAddr)> = wanted
            .iter()
            .filter_map(|(subnet, peer)| match peer {
                Peer::Overlay { vtep_mac, .. } => Some((subnet.network(), *vtep_mac)),
                Peer::Direct { .. } => None,
            })
            .collect();
        for n in neighbours
            .iter()
            .filter(|n| n.permanent && !overlay.iter().any(|(ip, _)| *ip == n.ip))
        {
            netlink::delete_neighbour(&h, dev, n.ip).await?;
            info!(
                "resync: removed neighbour {} from {}: no lease has it",
                n.ip, self.device
            );
        }
        let stale_fdb = fdb.iter().filter(|e| {
            e.permanent
                && e.mac != MacAddr::default()
                && !overlay.iter().any(|(_, mac)| *mac == e.mac)
        });
        for e in stale_fdb {
            netlink::delete_fdb(&h, dev, e.mac).await?;
            info!(
                "resync: removed FDB entry {} from {}: no lease has it",
                e.mac, self.device
            );
        }
        // The kernel now holds `wanted`, also the entries found already in place.
        self.programmed = wanted;
        failures.into_result("vxlan resync")
    }

    fn pod_mtu(&self) -> u32 {
        self.mtu
    }
}
