//! The host-gw backend: a plain route per remote lease via the peer's public IP, as
//! flanneld programs it. All nodes must share one L2 segment.

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tracing::{error, info, warn};

use super::netlink::{self, Route, SkipLog};
use super::{Backend, Reach};
use crate::iface::ExtIface;
use crate::lease::{Lease, LeaseAttrs, LeaseEvent};
use std::collections::HashSet;

const BACKEND_TYPE: &str = "host-gw";

pub struct HostGwBackend {
    network: Ipv4Network,
    ext: ExtIface,
    handle: Handle,
    own: Option<Ipv4Network>,
    /// The subnets routed, as programmed by `apply` and `resync`.
    routed: HashSet<Ipv4Network>,
    skipped: SkipLog,
}

impl HostGwBackend {
    pub fn new(network: Ipv4Network, ext: ExtIface, handle: Handle) -> Self {
        HostGwBackend {
            network,
            ext,
            handle,
            own: None,
            routed: HashSet::new(),
            skipped: SkipLog::default(),
        }
    }

    /// The route to `lease`, or None (logged once) if it cannot or must not be programmed.
    async fn route_for(&mut self, lease: &Lease) -> Result<Option<Route>> {
        if Some(lease.subnet) == self.own {
            return Ok(None);
        }
        let public_ip = lease.attrs.public_ip;
        if lease.attrs.backend_type != BACKEND_TYPE {
            let why = format!("its backend is {:?}, not host-gw", lease.attrs.backend_type);
            if self.skipped.report(lease.subnet, &why) {
                warn!(
                    "ignoring the lease of {} (node {public_ip}): {why}",
                    lease.subnet
                );
            }
            return Ok(None);
        }
        if !netlink::on_link(&self.handle, public_ip, self.ext.index).await? {
            let why = format!("not directly reachable on {}", self.ext.name);
            if self.skipped.report(lease.subnet, &why) {
                error!(
                    "cannot route {} via node {public_ip}: the node is not on the same L2 segment as {} \
                     (its route has a gateway or another interface); host-gw needs all nodes on one L2 network, \
                     use the vxlan backend (with DirectRouting) otherwise",
                    lease.subnet, self.ext.name
                );
            }
            return Ok(None);
        }
        self.skipped.clear(&lease.subnet);
        Ok(Some(Route {
            dst: lease.subnet,
            gateway: Some(public_ip),
            oif: self.ext.index,
            onlink: false,
        }))
    }
}

#[async_trait]
impl Backend for HostGwBackend {
    async fn register(&mut self, _previous: Option<&Lease>) -> Result<LeaseAttrs> {
        if self.ext.public_ip != self.ext.addr {
            bail!(
                "--public-ip {} differs from the address {} of {}: the host-gw backend routes to the interface's \
                 own address (a node behind NAT cannot be reached), so drop --public-ip or use the vxlan backend",
                self.ext.public_ip,
                self.ext.addr,
                self.ext.name
            );
        }
        Ok(LeaseAttrs {
            public_ip: self.ext.public_ip,
            public_ipv6: None,
            backend_type: BACKEND_TYPE.to_string(),
            backend_data: None,
            backend_v6_data: None,
        })
    }

    async fn configure(&mut self, own: &Lease) -> Result<()> {
        self.own = Some(own.subnet);
        netlink::remove_stale_bridge_addrs(&self.handle, own.subnet).await?;
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        match event {
            LeaseEvent::Added(lease) => {
                let Some(route) = self.route_for(lease).await? else {
                    self.routed.remove(&lease.subnet);
                    return Ok(());
                };
                let table = netlink::routes(&self.handle).await?;
                netlink::ensure_route(&self.handle, &table, &route)
                    .await
                    .with_context(|| {
                        format!(
                            "routing {} via node {}",
                            lease.subnet, lease.attrs.public_ip
                        )
                    })?;
                self.routed.insert(lease.subnet);
                Ok(())
            }
            LeaseEvent::Removed(subnet) => {
                self.skipped.clear(subnet);
                self.routed.remove(subnet);
                netlink::delete_routes_to(&self.handle, *subnet, &[self.ext.index])
                    .await
                    .with_context(|| format!("removing the route to {subnet}"))
            }
        }
    }

    async fn resync(&mut self, leases: &[Lease]) -> Result<()> {
        let mut wanted = Vec::new();
        for lease in leases {
            if let Some(route) = self.route_for(lease).await? {
                wanted.push(route);
            }
        }
        let table = netlink::routes(&self.handle).await?;
        for route in &wanted {
            if !netlink::route_in_place(&table, route) {
                info!(
                    "resync: restoring the route to {} via {}",
                    route.dst, self.ext.name
                );
                netlink::ensure_route(&self.handle, &table, route).await?;
            }
        }
        let keep =
            |dst: &Ipv4Network| wanted.iter().any(|r| r.dst == *dst) || Some(*dst) == self.own;
        for dst in
            netlink::prune_routes(&self.handle, &table, self.network, self.ext.index, keep).await?
        {
            info!(
                "resync: removed the route to {dst} via {}: no lease has it",
                self.ext.name
            );
        }
        self.routed = wanted.iter().map(|r| r.dst).collect();
        Ok(())
    }

    fn pod_mtu(&self) -> u32 {
        self.ext.mtu
    }

    fn reach(&self, subnet: Ipv4Network) -> Option<Reach> {
        self.routed.contains(&subnet).then_some(Reach::Direct)
    }
}
