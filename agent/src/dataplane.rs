//! The dataplane as the agent drives it: the lease table, the planner that validates it
//! ([`crate::plan`]) and the backend that reconciles the plan (kernel or BPF).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use tracing::{info, warn};

use crate::backend::{Backend, Failures};
use crate::config::NetConf;
use crate::iface::ExtIface;
use crate::lease::{subnet_key, Lease, LeaseAttrs, LeaseEvent};
use crate::plan::{self, NodeFacts, PeerChange, Plan, PlanConfig};

pub struct Dataplane {
    backend: Box<dyn Backend>,
    config: PlanConfig,
    facts: NodeFacts,
    handle: rtnetlink::Handle,
    uplink: u32,
    /// Other nodes' leases as last listed or changed.
    leases: BTreeMap<Ipv4Network, Lease>,
    plan: Plan,
}

impl Dataplane {
    /// Drives `backend` for the network `config` describes, on the uplink `ext`.
    pub fn new(
        backend: Box<dyn Backend>,
        config: PlanConfig,
        ext: &ExtIface,
        handle: rtnetlink::Handle,
    ) -> Self {
        Dataplane {
            backend,
            config,
            facts: NodeFacts::default(),
            handle,
            uplink: ext.index,
            leases: BTreeMap::new(),
            plan: Plan::default(),
        }
    }

    /// [`Dataplane::new`] for the network of net-conf.json.
    pub fn for_netconf(
        backend: Box<dyn Backend>,
        conf: &NetConf,
        ext: &ExtIface,
        handle: rtnetlink::Handle,
    ) -> Self {
        let config = PlanConfig::for_netconf(conf, ext);
        Self::new(backend, config, ext, handle)
    }

    /// Prepares the node and returns the attributes to publish (see [`Backend::register`]).
    pub async fn register(&mut self, previous: Option<&Lease>) -> Result<LeaseAttrs> {
        let attrs = self.backend.register(previous).await?;
        self.config.own_vtep_mac = attrs.vxlan().map(|d| d.vtep_mac);
        Ok(attrs)
    }

    /// Configures the node for its own lease (see [`Backend::configure`]).
    pub async fn configure(&mut self, own: &Lease) -> Result<()> {
        self.config.own = Some(own.subnet);
        if let Some(len) = self.config.subnet_len.filter(|l| *l != own.subnet.prefix()) {
            // Only with --kube-subnet-mgr (an etcd lease always has SubnetLen): the
            // kube-controller-manager's podCIDR size is what every node's lease has.
            info!(
                subnet_len = len,
                podcidr = %own.subnet,
                "this node's lease is not a /{len} (SubnetLen): peers' leases must have its size, /{}",
                own.subnet.prefix()
            );
            self.config.subnet_len = Some(own.subnet.prefix());
        }
        self.backend.configure(own).await
    }

    /// Applies one lease event: re-plans and hands the backend what changed.
    pub async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        self.apply_events(std::slice::from_ref(event)).await
    }

    /// Applies lease events in order, re-planning once for all of them.
    pub async fn apply_events(&mut self, events: &[LeaseEvent]) -> Result<()> {
        let mut removed = Vec::new();
        for event in events {
            match event {
                LeaseEvent::Added(lease) => {
                    self.leases.insert(lease.subnet, lease.clone());
                }
                LeaseEvent::Removed(subnet) => {
                    self.leases.remove(subnet);
                    removed.push(*subnet);
                }
            }
        }
        if self.config.needs_on_link() {
            let added = events.iter().filter_map(|e| match e {
                LeaseEvent::Added(lease) => Some(lease),
                LeaseEvent::Removed(_) => None,
            });
            (self.facts)
                .learn_on_link(&self.handle, self.uplink, added, false)
                .await;
        }
        let next = plan::plan(self.leases.values(), &self.config, &self.facts);
        let mut changes = self.plan.diff(&next);
        for subnet in removed {
            // What an earlier run programmed is not in this run's plan until the first
            // resync: remove it anyway (the backends remove only what weft programmed),
            // unless a peer in the plan shares its network address.
            let unplanned = !self.plan.peers.contains_key(&subnet);
            let shared = next.peers.keys().any(|p| p.network() == subnet.network());
            let listed = changes.contains(&PeerChange::Removed(subnet));
            if unplanned && !shared && !listed && !self.leases.contains_key(&subnet) {
                changes.push(PeerChange::Removed(subnet));
            }
        }
        self.report(&next);
        self.plan = next;
        let mut failures = Failures::default();
        for change in &changes {
            let result = self.backend.apply(change).await;
            failures.record(result.with_context(|| describe(change)));
        }
        failures.into_result("applying the lease events")
    }

    /// Makes the dataplane hold exactly what `leases` (the complete table of other nodes'
    /// leases) plans, re-reading the node's facts first.
    pub async fn resync(&mut self, leases: &[Lease]) -> Result<()> {
        self.leases = leases.iter().map(|l| (l.subnet, l.clone())).collect();
        self.facts = NodeFacts::read(&self.handle, self.config.network)
            .await
            .context("reading the node's addresses")?;
        if self.config.needs_on_link() {
            (self.facts)
                .learn_on_link(&self.handle, self.uplink, self.leases.values(), true)
                .await;
        }
        let next = plan::plan(self.leases.values(), &self.config, &self.facts);
        self.report(&next);
        self.plan = next;
        self.backend.resync(&self.plan).await
    }

    /// Warns about leases newly rejected (or rejected for a new reason), once each.
    fn report(&self, next: &Plan) {
        for (subnet, (node, why)) in &next.rejected {
            if self.plan.rejected.get(subnet) != Some(&(*node, why.clone())) {
                warn!(
                    "ignoring the lease {} (node {node}): {why}",
                    subnet_key(subnet)
                );
            }
        }
        for subnet in self.plan.rejected.keys() {
            if !next.rejected.contains_key(subnet) && next.peers.contains_key(subnet) {
                info!("the lease {} is now used", subnet_key(subnet));
            }
        }
    }

    /// The current plan (peers and rejected leases).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn pod_mtu(&self) -> u32 {
        self.backend.pod_mtu()
    }

    pub fn fast_path(&self) -> Option<(bool, String)> {
        self.backend.fast_path()
    }

    pub fn heartbeat(&self) -> Option<crate::backend::Heartbeat> {
        self.backend.heartbeat()
    }

    pub fn overflow(&self) -> Vec<(&'static str, u64)> {
        self.backend.overflow()
    }
}

fn describe(change: &PeerChange) -> String {
    match change {
        PeerChange::Set(peer) => format!(
            "programming the lease {} (node {})",
            subnet_key(&peer.subnet),
            peer.public_ip
        ),
        PeerChange::Removed(subnet) => format!("removing the lease {}", subnet_key(subnet)),
    }
}
