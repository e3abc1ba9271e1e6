//! Subnet managers: where leases come from and where this node's lease is published.
//!
//! Like flannel's, the interface is narrow: read the network config, acquire this node's
//! lease, then keep it alive while reporting every other node's lease as diffs.

pub mod alloc;
pub mod claims;
pub mod etcd;
pub mod etcd_tls;
pub mod kube;

use std::net::Ipv4Addr;

use anyhow::Result;
use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::config::NetConf;
use crate::lease::{Lease, LeaseAttrs, LeaseWatchEvent};

#[async_trait]
pub trait SubnetManager: Send + Sync {
    /// The cluster's network configuration (etcd: `<prefix>/config`; kube: net-conf.json).
    async fn network_config(&self) -> Result<NetConf>;

    /// The lease this node held before (same public IP), if any: lets the backend keep its
    /// VtepMAC across restarts and device loss.
    async fn previous_lease(&self, public_ip: Ipv4Addr) -> Result<Option<Lease>>;

    /// Acquires (or re-acquires) this node's lease, publishing `attrs` with it.
    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> Result<Lease>;

    /// Runs for the agent's lifetime: renews `own` before it expires and sends every other
    /// node's lease: first a `Snapshot`, then `Event`s, and a new `Snapshot` whenever the
    /// watch had to be re-established. Sends `OwnLeaseRevoked` and returns if `own` is
    /// deleted. Returns an error only when it cannot go on.
    async fn watch_leases(&self, own: Lease, tx: mpsc::Sender<LeaseWatchEvent>) -> Result<()>;
}
