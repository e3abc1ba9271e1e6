//! The host-gw backend: a plain route per remote lease via the peer's public IP, as
//! flanneld programs it. All nodes must share one L2 segment.

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tracing::info;

use super::netlink::{self, Route};
use super::{Backend, Failures};
use crate::iface::ExtIface;
use crate::lease::{Lease, LeaseAttrs};
use crate::plan::{Peer, PeerChange, Plan};

const BACKEND_TYPE: &str = "host-gw";

pub struct HostGwBackend {
    network: Ipv4Network,
    ext: ExtIface,
    handle: Handle,
    own: Option<Ipv4Network>,
}

impl HostGwBackend {
    pub fn new(network: Ipv4Network, ext: ExtIface, handle: Handle) -> Self {
        HostGwBackend {
            network,
            ext,
            handle,
            own: None,
        }
    }

    fn route(&self, peer: &Peer) -> Route {
        Route {
            dst: peer.subnet,
            gateway: Some(peer.public_ip),
            oif: self.ext.index,
            onlink: false,
        }
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

    async fn apply(&mut self, change: &PeerChange) -> Result<()> {
        match change {
            PeerChange::Set(peer) => {
                let table = netlink::routes(&self.handle).await?;
                netlink::ensure_route(&self.handle, &table, &self.route(peer))
                    .await
                    .with_context(|| format!("routing {} via node {}", peer.subnet, peer.public_ip))
            }
            PeerChange::Removed(subnet) => {
                netlink::delete_routes_to(&self.handle, *subnet, &[self.ext.index])
                    .await
                    .with_context(|| format!("removing the route to {subnet}"))
            }
        }
    }

    async fn resync(&mut self, plan: &Plan) -> Result<()> {
        let wanted: Vec<Route> = plan.peers.values().map(|p| self.route(p)).collect();
        let table = netlink::routes(&self.handle).await?;
        let mut failures = Failures::default();
        for route in &wanted {
            if !netlink::route_in_place(&table, route) {
                info!(
                    "resync: restoring the route to {} via {}",
                    route.dst, self.ext.name
                );
                failures.record(netlink::ensure_route(&self.handle, &table, route).await);
            }
        }
        let keep = |dst: &Ipv4Network| plan.peers.contains_key(dst) || Some(*dst) == self.own;
        for dst in
            netlink::prune_routes(&self.handle, &table, self.network, self.ext.index, keep).await?
        {
            info!(
                "resync: removed the route to {dst} via {}: no lease has it",
                self.ext.name
            );
        }
        failures.into_result("host-gw resync")
    }

    fn pod_mtu(&self) -> u32 {
        self.ext.mtu
    }
}
