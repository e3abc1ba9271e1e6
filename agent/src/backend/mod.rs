//! Backends: how the lease table becomes kernel state.
//!
//! `vxlan` and `host-gw` program exactly what flanneld programs (through rtnetlink).
//! They reconcile the peer plan ([`crate::plan`]): they never decide which lease is used
//! or how it is reached. Changes are diffs; applying one twice changes nothing; `resync`
//! repairs drift, and one peer the kernel refuses never stops the others.

pub mod hostgw;
pub mod netlink;
pub mod vxlan;

use anyhow::Result;
use async_trait::async_trait;

use crate::config::{BackendConf, NetConf};
use crate::iface::ExtIface;
use crate::lease::{Lease, LeaseAttrs};
use crate::plan::{PeerChange, Plan};

/// See [`Backend::heartbeat`].
pub type Heartbeat = std::sync::Arc<dyn Fn() -> Result<()> + Send + Sync>;

#[async_trait]
pub trait Backend: Send {
    /// Prepares the node before its lease exists (e.g. creates or adopts `flannel.<VNI>`,
    /// keeping the VtepMAC of `previous` if given) and returns the attributes to publish.
    async fn register(&mut self, previous: Option<&Lease>) -> Result<LeaseAttrs>;

    /// Configures the node for its own lease (e.g. the address on `flannel.<VNI>`, removing
    /// addresses that belong to no current lease, and saying so in the log).
    async fn configure(&mut self, own: &Lease) -> Result<()>;

    /// Applies one change of the plan. Idempotent.
    async fn apply(&mut self, change: &PeerChange) -> Result<()>;

    /// Makes the state match exactly `plan`: adds what is missing, replaces what differs,
    /// removes what weft programmed for peers not in it, re-creates a deleted device. A
    /// peer that fails is reported in the error after all the others were programmed.
    async fn resync(&mut self, plan: &Plan) -> Result<()>;

    /// The MTU pods must use (written to subnet.env as FLANNEL_MTU).
    fn pod_mtu(&self) -> u32;

    /// What tells the dataplane the agent is alive (the BPF programs fall back to the
    /// kernel path when it stops), for a task of its own: called every few seconds, it
    /// must stay cheap and never wait on the dataplane's other work. None: nothing to tell.
    fn heartbeat(&self) -> Option<Heartbeat> {
        None
    }

    /// Peers that did not fit in a fixed-size table (BPF maps), per table: they stay on
    /// the kernel path.
    fn overflow(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// For a dataplane with a fast path: whether it is on, and why. `None` otherwise.
    fn fast_path(&self) -> Option<(bool, String)> {
        None
    }
}

/// Runs every step, then fails with all the failures named (one refused peer must not
/// keep the others from being programmed).
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    pub fn record(&mut self, result: Result<()>) {
        if let Err(e) = result {
            self.0.push(format!("{e:#}"));
        }
    }

    pub fn into_result(self, what: &str) -> Result<()> {
        match self.0.len() {
            0 => Ok(()),
            1 => anyhow::bail!("{what}: {}", self.0[0]),
            n => anyhow::bail!("{what}: {n} failures: {}", self.0.join("; ")),
        }
    }
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
