//! Backends: how the lease table becomes kernel state.
//!
//! `vxlan` and `host-gw` program exactly what flanneld programs (through rtnetlink).
//! Events are diffs; applying one twice changes nothing; `resync` repairs drift.

pub mod hostgw;
pub mod netlink;
pub mod vxlan;

use anyhow::Result;
use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use crate::config::{BackendConf, NetConf};
use crate::iface::ExtIface;
use crate::lease::{Lease, LeaseAttrs, LeaseEvent};

#[async_trait]
pub trait Backend: Send {
    /// Prepares the node before its lease exists (e.g. creates or adopts `flannel.<VNI>`,
    /// keeping the VtepMAC of `previous` if given) and returns the attributes to publish.
    async fn register(&mut self, previous: Option<&Lease>) -> Result<LeaseAttrs>;

    /// Configures the node for its own lease (e.g. the address on `flannel.<VNI>`, removing
    /// addresses that belong to no current lease, and saying so in the log).
    async fn configure(&mut self, own: &Lease) -> Result<()>;

    /// Applies one change of another node's lease. Idempotent.
    async fn apply(&mut self, event: &LeaseEvent) -> Result<()>;

    /// Makes the kernel state match exactly `leases` (other nodes'): adds what is missing,
    /// replaces what differs, removes routes/neighbours/FDB entries of leases not listed,
    /// re-creates a deleted device.
    async fn resync(&mut self, leases: &[Lease]) -> Result<()>;

    /// The MTU pods must use (written to subnet.env as FLANNEL_MTU).
    fn pod_mtu(&self) -> u32;

    /// How the kernel state this backend programmed reaches `subnet`: through the overlay
    /// device or by a direct route; `None` if it does not route it (skipped lease, own lease).
    fn reach(&self, subnet: Ipv4Network) -> Option<Reach>;

    /// For a dataplane with a fast path: whether it is on, and why. `None` otherwise.
    fn fast_path(&self) -> Option<(bool, String)> {
        None
    }
}

/// How a remote lease is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Encapsulated through `flannel.<VNI>`.
    Overlay,
    /// A plain route via the peer's public IP (host-gw, DirectRouting).
    Direct,
}

/// Builds the kernel backend the config asks for.
pub fn kernel_backend(
    conf: &NetConf,
    ext: &ExtIface,
    handle: rtnetlink::Handle,
) -> Box<dyn Backend> {
    match &conf.backend {
        BackendConf::Vxlan(vx) => Box::new(vxlan::VxlanBackend::new(
            vx.clone(),
            conf.network,
            ext.clone(),
            handle,
        )),
        BackendConf::HostGw => Box::new(hostgw::HostGwBackend::new(
            conf.network,
            ext.clone(),
            handle,
        )),
    }
}
