//! One lease per subnet when several sources (Nodes, etcd keys) claim the same subnet.
//!
//! The agent keys its lease table by subnet, so two claims of one subnet would overwrite
//! each other in whatever order events arrive. The subnet managers decide here instead:
//! the claim of lowest rank (the older one) wins, ties go to the lower source name; the
//! other is logged once and takes the subnet over when the winner goes away.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::Ipv4Network;
use tracing::{info, warn};

use crate::lease::{subnet_key, Lease, LeaseEvent};

pub struct Claims<R> {
    /// "node" or "key": how the log names a source.
    what: &'static str,
    /// Every source's claim: its rank (lower wins) and lease.
    by_source: BTreeMap<String, (R, Lease)>,
    /// The claimants of each subnet, winner first.
    by_subnet: BTreeMap<Ipv4Network, BTreeSet<(R, String)>>,
    /// (winner, loser) pairs already logged.
    reported: BTreeSet<(String, String)>,
}

impl<R: Ord + Clone> Claims<R> {
    pub fn new(what: &'static str) -> Self {
        Claims {
            what,
            by_source: BTreeMap::new(),
            by_subnet: BTreeMap::new(),
            reported: BTreeSet::new(),
        }
    }

    /// The winning lease of every subnet.
    pub fn winners(&self) -> Vec<Lease> {
        self.by_subnet
            .keys()
            .filter_map(|s| self.winner(s).cloned())
            .collect()
    }

    /// What `source` claims, winning or not.
    pub fn claim(&self, source: &str) -> Option<&Lease> {
        self.by_source.get(source).map(|(_, lease)| lease)
    }

    fn winner(&self, subnet: &Ipv4Network) -> Option<&Lease> {
        let (_, source) = self.by_subnet.get(subnet)?.first()?;
        self.by_source.get(source).map(|(_, lease)| lease)
    }

    /// Replaces every claim with a complete listing; returns the winning leases.
    pub fn replace(&mut self, claims: impl IntoIterator<Item = (String, R, Lease)>) -> Vec<Lease> {
        self.by_source.clear();
        self.by_subnet.clear();
        for (source, rank, lease) in claims {
            self.insert(source, rank, lease);
        }
        let subnets: Vec<Ipv4Network> = self.by_subnet.keys().copied().collect();
        for subnet in subnets {
            self.report(&subnet);
        }
        self.winners()
    }

    /// Sets (`Some`) or drops (`None`) the claim of `source`; returns the lease events
    /// this changes, none when the winners stay the same.
    pub fn set(&mut self, source: &str, claim: Option<(R, Lease)>) -> Vec<LeaseEvent> {
        let old = self.by_source.get(source);
        if old.map(|(r, l)| (r, l)) == claim.as_ref().map(|(r, l)| (r, l)) {
            return Vec::new();
        }
        let mut subnets: Vec<Ipv4Network> = old.iter().map(|(_, l)| l.subnet).collect();
        subnets.extend(claim.iter().map(|(_, l)| l.subnet));
        subnets.dedup();
        let before: Vec<Option<Lease>> = subnets.iter().map(|s| self.winner(s).cloned()).collect();
        if let Some((rank, lease)) = self.by_source.remove(source) {
            self.remove_index(&lease.subnet, &(rank, source.to_string()));
        }
        if let Some((rank, lease)) = claim {
            let subnet = lease.subnet;
            self.insert(source.to_string(), rank, lease);
            self.report(&subnet);
        }
        let mut events = Vec::new();
        for (subnet, before) in subnets.iter().zip(before) {
            let after = self.winner(subnet).cloned();
            if after == before {
                continue;
            }
            match after {
                Some(lease) => {
                    if before.is_some() || self.by_subnet[subnet].len() > 1 {
                        info!(
                            subnet = %subnet_key(subnet),
                            "{} {} now holds the subnet",
                            self.what,
                            self.by_subnet[subnet].first().expect("a winner").1
                        );
                    }
                    events.push(LeaseEvent::Added(lease));
                }
                None => events.push(LeaseEvent::Removed(*subnet)),
            }
        }
        events
    }

    fn insert(&mut self, source: String, rank: R, lease: Lease) {
        self.by_subnet
            .entry(lease.subnet)
            .or_default()
            .insert((rank.clone(), source.clone()));
        self.by_source.insert(source, (rank, lease));
    }

    fn remove_index(&mut self, subnet: &Ipv4Network, entry: &(R, String)) {
        if let Some(set) = self.by_subnet.get_mut(subnet) {
            set.remove(entry);
            if set.is_empty() {
                self.by_subnet.remove(subnet);
            }
        }
    }

    /// Logs, once per pair, each claim of `subnet` that loses to the winner.
    fn report(&mut self, subnet: &Ipv4Network) {
        let Some(set) = self.by_subnet.get(subnet) else {
            return;
        };
        let mut names = set.iter().map(|(_, s)| s.clone());
        let Some(winner) = names.next() else { return };
        for loser in names {
            if self.reported.insert((winner.clone(), loser.clone())) {
                warn!(
                    subnet = %subnet_key(subnet),
                    "{what}s {winner} and {loser} claim the same subnet: using {winner} (the \
                     older), ignoring {loser} until {winner} lets the subnet go; give one of \
                     them another subnet",
                    what = self.what
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(subnet: &str, ip: &str) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: "host-gw".into(),
                backend_data: None,
                backend_v6_data: None,
            },
        }
    }

    fn ips(events: &[LeaseEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                LeaseEvent::Added(l) => format!("+{} {}", l.subnet, l.attrs.public_ip),
                LeaseEvent::Removed(s) => format!("-{s}"),
            })
            .collect()
    }

    #[test]
    fn the_older_claim_wins_in_any_order_and_the_other_takes_over() {
        let (old, new) = (
            lease("10.244.2.0/24", "198.18.0.12"),
            lease("10.244.2.0/24", "198.18.0.13"),
        );
        // The newer claim first, then the older: the older replaces it.
        let mut c = Claims::new("node");
        assert_eq!(
            ips(&c.set("b", Some((2, new.clone())))),
            ["+10.244.2.0/24 198.18.0.13"]
        );
        assert_eq!(
            ips(&c.set("a", Some((1, old.clone())))),
            ["+10.244.2.0/24 198.18.0.12"]
        );
        // The older first: the newer changes nothing.
        let mut d = Claims::new("node");
        assert_eq!(
            ips(&d.set("a", Some((1, old.clone())))),
            ["+10.244.2.0/24 198.18.0.12"]
        );
        assert!(d.set("b", Some((2, new.clone()))).is_empty());
        // A change of the loser says nothing; the winner leaving brings the loser in.
        let moved = lease("10.244.2.0/24", "198.18.0.23");
        assert!(d.set("b", Some((2, moved.clone()))).is_empty());
        assert_eq!(ips(&d.set("a", None)), ["+10.244.2.0/24 198.18.0.23"]);
        assert_eq!(ips(&d.set("b", None)), ["-10.244.2.0/24"]);
        assert!(d.set("b", None).is_empty());
    }

    #[test]
    fn ties_go_to_the_lower_name_and_a_move_frees_the_old_subnet() {
        let mut c = Claims::new("key");
        let winners = c.replace([
            ("z".to_string(), 5, lease("10.244.2.0/24", "198.18.0.26")),
            ("m".to_string(), 5, lease("10.244.2.0/24", "198.18.0.13")),
            ("q".to_string(), 1, lease("10.244.3.0/24", "198.18.0.14")),
        ]);
        let got: Vec<String> = winners
            .iter()
            .map(|l| l.attrs.public_ip.to_string())
            .collect();
        assert_eq!(got, ["198.18.0.13", "198.18.0.14"]);
        // "m" moves to another subnet: "z" gets 10.244.2.0/24.
        let events = c.set("m", Some((5, lease("10.244.4.0/24", "198.18.0.13"))));
        assert_eq!(
            ips(&events),
            ["+10.244.2.0/24 198.18.0.26", "+10.244.4.0/24 198.18.0.13"]
        );
    }
}
