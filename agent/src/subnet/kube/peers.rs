//! The table of other nodes' leases, fed by the node watcher's events: a `Snapshot` once a
//! (re-)list is complete, then the diffs of each change. Never a snapshot from a partial
//! or failed list, so an unreachable API server leaves the dataplane as it is. Two Nodes
//! with one podCIDR: the older Node (creationTimestamp, then name) holds the subnet.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::watcher::Event;
use tracing::{debug, info, info_span, warn};

use super::node::{node_name, peer_lease, Annotations};
use super::WATCH_RESTARTS;
use crate::lease::{subnet_key, Lease, LeaseEvent, LeaseWatchEvent};
use crate::subnet::claims::Claims;

/// A Node's age: older Nodes (lower) win a subnet; one without a creationTimestamp last.
type Age = (bool, Option<Time>);

fn age(node: &Node) -> Age {
    let created = node.metadata.creation_timestamp.clone();
    (created.is_none(), created)
}

pub struct PeerTable {
    own_name: String,
    own_subnet: Ipv4Network,
    annotations: Annotations,
    /// The last-known lease of every peer, by node name; one winner per subnet.
    known: Claims<Age>,
    /// The leases listed so far while a (re-)list is in progress.
    listing: Option<BTreeMap<String, (Age, Lease)>>,
    /// How many lists have started.
    lists: u64,
}

impl PeerTable {
    pub fn new(own_name: &str, own_subnet: Ipv4Network, annotations: Annotations) -> Self {
        PeerTable {
            own_name: own_name.to_string(),
            own_subnet,
            annotations,
            known: Claims::new("node"),
            listing: None,
            lists: 0,
        }
    }

    /// The lease events one watcher event amounts to (the own node is not a peer).
    pub fn on_event(&mut self, event: Event<Node>) -> Vec<LeaseWatchEvent> {
        match event {
            Event::Init => {
                if self.lists > 0 {
                    WATCH_RESTARTS.fetch_add(1, Ordering::Relaxed);
                    debug!("re-listing nodes");
                }
                self.lists += 1;
                self.listing = Some(BTreeMap::new());
                Vec::new()
            }
            Event::InitApply(node) => {
                if let Some(lease) = self.peer(&node, false) {
                    if let Some(listing) = self.listing.as_mut() {
                        listing.insert(node_name(&node).to_string(), (age(&node), lease));
                    }
                }
                Vec::new()
            }
            Event::InitDone => {
                let Some(listing) = self.listing.take() else {
                    return Vec::new();
                };
                let listed = listing
                    .into_iter()
                    .map(|(name, (age, lease))| (name, age, lease));
                vec![LeaseWatchEvent::Snapshot(self.known.replace(listed))]
            }
            Event::Apply(node) => self.apply(&node),
            Event::Delete(node) => {
                let name = node_name(&node);
                if let Some(old) = self.known.claim(name) {
                    peer_span(name, &old.subnet).in_scope(|| info!("node deleted; lease removed"));
                }
                events(self.known.set(name, None))
            }
        }
    }

    fn apply(&mut self, node: &Node) -> Vec<LeaseWatchEvent> {
        let name = node_name(node).to_string();
        let old = self.known.claim(&name).cloned();
        let new = self.peer(node, old.is_some());
        match (&old, &new) {
            (Some(old), Some(new)) if old == new => {}
            (old, Some(new)) => {
                let span = peer_span(&name, &new.subnet);
                match old {
                    Some(old) if old.subnet != new.subnet => {
                        span.in_scope(|| info!(old = %old.subnet, "podCIDR changed"))
                    }
                    Some(_) => {
                        span.in_scope(|| info!(public_ip = %new.attrs.public_ip, "lease changed"))
                    }
                    None => {
                        span.in_scope(|| info!(public_ip = %new.attrs.public_ip, "lease added"))
                    }
                }
            }
            _ => {}
        }
        events(self.known.set(&name, new.map(|lease| (age(node), lease))))
    }

    /// The node's lease if it is a peer. `was_peer` raises the log level of why not.
    fn peer(&self, node: &Node, was_peer: bool) -> Option<Lease> {
        let name = node_name(node);
        if name == self.own_name {
            return None;
        }
        match peer_lease(node, &self.annotations) {
            Ok(lease) if lease.subnet == self.own_subnet => {
                peer_span(name, &lease.subnet).in_scope(|| {
                    warn!(
                        "node claims this node's subnet; ignoring it (two nodes with one podCIDR?)"
                    )
                });
                None
            }
            Ok(lease) => Some(lease),
            Err(why) if was_peer => {
                info!(node = %name, "no longer a peer ({why}); lease removed");
                None
            }
            Err(why) => {
                debug!(node = %name, "not a peer: {why}");
                None
            }
        }
    }
}

fn events(changes: Vec<LeaseEvent>) -> Vec<LeaseWatchEvent> {
    changes.into_iter().map(LeaseWatchEvent::Event).collect()
}

fn peer_span(node: &str, subnet: &Ipv4Network) -> tracing::Span {
    info_span!("peer", node = %node, subnet = %subnet_key(subnet))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "flannel.alpha.coreos.com/";

    fn node(name: &str, cidr: &str, ip: &str, mac: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {
                format!("{P}kube-subnet-manager"): "true",
                format!("{P}backend-type"): "vxlan",
                format!("{P}backend-data"): format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
                format!("{P}public-ip"): ip,
            }},
            "spec": {"podCIDR": cidr}
        }))
        .unwrap()
    }

    fn table() -> PeerTable {
        PeerTable::new(
            "self",
            "10.244.1.0/24".parse().unwrap(),
            Annotations::new("flannel.alpha.coreos.com").unwrap(),
        )
    }

    fn subnets(events: &[LeaseWatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                LeaseWatchEvent::Snapshot(all) => format!(
                    "snapshot[{}]",
                    all.iter()
                        .map(|l| l.subnet.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                LeaseWatchEvent::Event(LeaseEvent::Added(l)) => format!("+{}", l.subnet),
                LeaseWatchEvent::Event(LeaseEvent::Removed(s)) => format!("-{s}"),
                LeaseWatchEvent::OwnLeaseRevoked => "revoked".into(),
            })
            .collect()
    }

    fn feed(t: &mut PeerTable, events: Vec<Event<Node>>) -> Vec<String> {
        subnets(
            &events
                .into_iter()
                .flat_map(|e| t.on_event(e))
                .collect::<Vec<_>>(),
        )
    }

    const MAC: &str = "de:ad:be:ef:00:02";

    #[test]
    fn snapshot_after_init_done_without_own_or_foreign_nodes() {
        let mut t = table();
        let mut bare = node("bare", "10.244.9.0/24", "198.18.0.19", MAC);
        bare.metadata.annotations = None;
        let out = feed(
            &mut t,
            vec![
                Event::Init,
                Event::InitApply(node("self", "10.244.1.0/24", "198.18.0.11", MAC)),
                Event::InitApply(node("n2", "10.244.2.0/24", "198.18.0.12", MAC)),
                Event::InitApply(bare),
            ],
        );
        assert!(out.is_empty(), "nothing before InitDone: {out:?}");
        assert_eq!(
            feed(&mut t, vec![Event::InitDone]),
            ["snapshot[10.244.2.0/24]"]
        );
    }

    #[test]
    fn apply_and_delete_become_diffs() {
        let mut t = table();
        feed(&mut t, vec![Event::Init, Event::InitDone]);
        let n2 = node("n2", "10.244.2.0/24", "198.18.0.12", MAC);
        assert_eq!(
            feed(&mut t, vec![Event::Apply(n2.clone())]),
            ["+10.244.2.0/24"]
        );
        // A status-only update (same lease) says nothing.
        assert!(feed(&mut t, vec![Event::Apply(n2.clone())]).is_empty());
        // A new MAC is a changed lease.
        let n2_new_mac = node("n2", "10.244.2.0/24", "198.18.0.12", "de:ad:be:ef:00:03");
        assert_eq!(
            feed(&mut t, vec![Event::Apply(n2_new_mac)]),
            ["+10.244.2.0/24"]
        );
        // A new podCIDR removes the old subnet first.
        let moved = node("n2", "10.244.3.0/24", "198.18.0.12", MAC);
        assert_eq!(
            feed(&mut t, vec![Event::Apply(moved.clone())]),
            ["-10.244.2.0/24", "+10.244.3.0/24"]
        );
        // Losing the annotations removes the lease.
        let mut stripped = moved.clone();
        stripped
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(&format!("{P}public-ip"));
        assert_eq!(
            feed(&mut t, vec![Event::Apply(stripped)]),
            ["-10.244.3.0/24"]
        );
        assert_eq!(
            feed(&mut t, vec![Event::Apply(moved.clone())]),
            ["+10.244.3.0/24"]
        );
        assert_eq!(
            feed(&mut t, vec![Event::Delete(moved.clone())]),
            ["-10.244.3.0/24"]
        );
        assert!(feed(&mut t, vec![Event::Delete(moved)]).is_empty());
    }

    #[test]
    fn relist_counts_a_restart_and_replaces_the_table() {
        let mut t = table();
        feed(
            &mut t,
            vec![
                Event::Init,
                Event::InitApply(node("n2", "10.244.2.0/24", "198.18.0.12", MAC)),
                Event::InitDone,
            ],
        );
        let before = WATCH_RESTARTS.load(Ordering::Relaxed);
        // A failed re-list (Init, then errors, then Init again) emits nothing.
        assert!(feed(&mut t, vec![Event::Init, Event::Init]).is_empty());
        assert!(WATCH_RESTARTS.load(Ordering::Relaxed) >= before + 2);
        let out = feed(
            &mut t,
            vec![
                Event::InitApply(node("n3", "10.244.3.0/24", "198.18.0.13", MAC)),
                Event::InitDone,
            ],
        );
        assert_eq!(out, ["snapshot[10.244.3.0/24]"]);
        // The table is the re-listed one: deleting n2 now is no event.
        assert!(feed(
            &mut t,
            vec![Event::Delete(node(
                "n2",
                "10.244.2.0/24",
                "198.18.0.12",
                MAC
            ))]
        )
        .is_empty());
    }

    #[test]
    fn a_peer_claiming_our_subnet_is_ignored() {
        let mut t = table();
        feed(&mut t, vec![Event::Init, Event::InitDone]);
        let imposter = node("n9", "10.244.1.0/24", "198.18.0.19", MAC);
        assert!(feed(&mut t, vec![Event::Apply(imposter)]).is_empty());
    }
}
