//! Subnet allocation, flannel's way, as a pure function of the lease table.
//!
//! Order of preference: the lease this node (same PublicIP) already holds, then the subnet
//! recorded in subnet.env by the previous run, then a random free subnet among the first
//! 100 free ones between SubnetMin and SubnetMax (random so that nodes starting together
//! rarely race for the same key; among the first ones so that the pool stays compact).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use rand::Rng;

use crate::config::NetConf;
use crate::lease::{LeaseAttrs, MacAddr};

/// How many free subnets, from SubnetMin upwards, the random pick chooses among.
pub const RANDOM_POOL: usize = 100;

/// What the allocator sees.
#[derive(Clone, Copy, Debug)]
pub struct AllocInput<'a> {
    pub conf: &'a NetConf,
    /// Every subnet that has a key, whether or not its value parses.
    pub taken: &'a BTreeSet<Ipv4Network>,
    /// The leases whose value parses.
    pub leases: &'a BTreeMap<Ipv4Network, LeaseAttrs>,
    pub public_ip: Ipv4Addr,
    /// This node's VTEP MAC (vxlan; kept on flannel.<VNI> across restarts).
    pub vtep_mac: Option<MacAddr>,
    /// The subnet recorded in subnet.env, if any.
    pub previous_subnet: Option<Ipv4Network>,
    /// Where leases live (`<prefix>/subnets`), for the error message.
    pub subnets_dir: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The existing lease with our PublicIP.
    Reuse(Ipv4Network),
    /// The subnet from subnet.env, free again.
    Previous(Ipv4Network),
    /// A random free subnet.
    Random(Ipv4Network),
}

impl Choice {
    pub fn subnet(&self) -> Ipv4Network {
        match *self {
            Choice::Reuse(s) | Choice::Previous(s) | Choice::Random(s) => s,
        }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Reuse(_) => f.write_str("reusing the lease with our PublicIP"),
            Choice::Previous(_) => f.write_str("the subnet from subnet.env"),
            Choice::Random(_) => f.write_str("a random free subnet"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub choice: Choice,
    /// Leases with our PublicIP that no longer fit the configuration (other length, outside
    /// SubnetMin..SubnetMax): flannel deletes them, and the choice assumes they are gone.
    pub incompatible_own: Vec<Ipv4Network>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no free subnet between SubnetMin {min} and SubnetMax {max} ({taken} taken): widen the range or remove stale leases under {subnets_dir}")]
pub struct NoFreeSubnet {
    pub min: Ipv4Addr,
    pub max: Ipv4Addr,
    pub taken: usize,
    pub subnets_dir: String,
}

/// Whether a lease subnet fits the configuration (flannel's `isSubnetConfigCompat`).
pub fn fits_config(conf: &NetConf, subnet: Ipv4Network) -> bool {
    subnet.prefix() == conf.subnet_len
        && subnet.ip() == subnet.network()
        && conf.network.contains(subnet.network())
        && (conf.subnet_min..=conf.subnet_max).contains(&subnet.network())
}

/// Chooses this node's subnet.
pub fn choose_subnet(input: &AllocInput, rng: &mut impl Rng) -> Result<Allocation, NoFreeSubnet> {
    let conf = input.conf;
    // Ours: the lease with our public IP, or (after the node's IP changed) the lease of the
    // subnet in our subnet.env that carries our own VTEP MAC, which no other node has.
    let ours = |subnet: &Ipv4Network, attrs: &LeaseAttrs| {
        attrs.public_ip == input.public_ip
            || (Some(*subnet) == input.previous_subnet
                && input.vtep_mac.is_some()
                && attrs.vxlan().map(|d| d.vtep_mac) == input.vtep_mac)
    };
    let (own_fitting, incompatible_own): (Vec<Ipv4Network>, Vec<Ipv4Network>) = input
        .leases
        .iter()
        .filter(|(subnet, attrs)| ours(subnet, attrs))
        .map(|(subnet, _)| *subnet)
        .partition(|subnet| fits_config(conf, *subnet));
    let allocation = |choice| Allocation {
        choice,
        incompatible_own: incompatible_own.clone(),
    };
    if let Some(subnet) = own_fitting.first() {
        return Ok(allocation(Choice::Reuse(*subnet)));
    }

    let taken = TakenRanges::new(input.taken.iter().filter(|s| !incompatible_own.contains(s)));
    if let Some(prev) = input.previous_subnet {
        if fits_config(conf, prev) && !taken.overlaps(prev) {
            return Ok(allocation(Choice::Previous(prev)));
        }
    }

    let size = 1u32 << (32 - conf.subnet_len);
    let free: Vec<Ipv4Network> = (u32::from(conf.subnet_min)..=u32::from(conf.subnet_max))
        .step_by(size as usize)
        .map(|ip| Ipv4Network::new(Ipv4Addr::from(ip), conf.subnet_len).expect("subnet_len <= 32"))
        .filter(|candidate| !taken.overlaps(*candidate))
        .take(RANDOM_POOL)
        .collect();
    if free.is_empty() {
        return Err(NoFreeSubnet {
            min: conf.subnet_min,
            max: conf.subnet_max,
            taken: input.taken.len(),
            subnets_dir: input.subnets_dir.to_string(),
        });
    }
    Ok(allocation(Choice::Random(
        free[rng.random_range(0..free.len())],
    )))
}

/// Taken subnets as sorted address ranges: a candidate is free when it overlaps none (a lease
/// of another length, left from an older SubnetLen, blocks every subnet it overlaps).
struct TakenRanges(Vec<(u32, u32)>);

impl TakenRanges {
    fn new<'a>(subnets: impl Iterator<Item = &'a Ipv4Network>) -> Self {
        let mut ranges: Vec<(u32, u32)> = subnets.map(|s| range(*s)).collect();
        ranges.sort_unstable();
        TakenRanges(ranges)
    }

    fn overlaps(&self, subnet: Ipv4Network) -> bool {
        let (start, end) = range(subnet);
        // Ranges starting after `end` cannot overlap; of the others, one overlaps if it
        // reaches `start`.
        let after = self.0.partition_point(|&(s, _)| s <= end);
        self.0[..after].iter().any(|&(_, e)| e >= start)
    }
}

fn range(subnet: Ipv4Network) -> (u32, u32) {
    (u32::from(subnet.network()), u32::from(subnet.broadcast()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn conf(text: &str) -> NetConf {
        NetConf::parse(text).unwrap()
    }
    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    const OUR_IP: &str = "198.18.0.10";

    struct Table {
        conf: NetConf,
        taken: BTreeSet<Ipv4Network>,
        leases: BTreeMap<Ipv4Network, LeaseAttrs>,
    }

    impl Table {
        fn new(conf_text: &str, leases: &[(&str, &str)]) -> Table {
            let leases: BTreeMap<_, _> = leases.iter().map(|(s, ip)| (net(s), attrs(ip))).collect();
            Table {
                conf: conf(conf_text),
                taken: leases.keys().copied().collect(),
                leases,
            }
        }
        fn choose(&self, previous: Option<&str>, seed: u64) -> Result<Allocation, NoFreeSubnet> {
            let input = AllocInput {
                conf: &self.conf,
                taken: &self.taken,
                leases: &self.leases,
                public_ip: OUR_IP.parse().unwrap(),
                vtep_mac: None,
                previous_subnet: previous.map(net),
                subnets_dir: "/coreos.com/network/subnets",
            };
            choose_subnet(&input, &mut StdRng::seed_from_u64(seed))
        }
    }

    const NET16: &str = r#"{"Network": "10.244.0.0/16"}"#;

    #[test]
    fn reuses_the_lease_with_our_public_ip_before_anything_else() {
        let t = Table::new(
            NET16,
            &[("10.244.7.0/24", "198.18.0.11"), ("10.244.9.0/24", OUR_IP)],
        );
        let a = t.choose(Some("10.244.3.0/24"), 1).unwrap();
        assert_eq!(a.choice, Choice::Reuse(net("10.244.9.0/24")));
        assert!(a.incompatible_own.is_empty());
    }

    #[test]
    fn after_an_ip_change_the_subnet_env_lease_with_our_vtep_mac_is_ours() {
        let mac: MacAddr = "0e:00:00:00:00:42".parse().unwrap();
        let mut leases = BTreeMap::new();
        let mut old = attrs("198.18.0.12");
        old.backend_type = "vxlan".into();
        old.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac.to_string()}));
        leases.insert(net("10.244.9.0/24"), old);
        let conf = conf(NET16);
        let taken = leases.keys().copied().collect();
        let choose = |vtep_mac, previous: &str| {
            let input = AllocInput {
                conf: &conf,
                taken: &taken,
                leases: &leases,
                public_ip: OUR_IP.parse().unwrap(),
                vtep_mac,
                previous_subnet: Some(net(previous)),
                subnets_dir: "/coreos.com/network/subnets",
            };
            choose_subnet(&input, &mut StdRng::seed_from_u64(1))
                .unwrap()
                .choice
        };
        assert_eq!(
            choose(Some(mac), "10.244.9.0/24"),
            Choice::Reuse(net("10.244.9.0/24"))
        );
        // Another MAC, or another subnet in subnet.env: someone else's lease.
        let other: MacAddr = "0e:00:00:00:00:43".parse().unwrap();
        assert_ne!(
            choose(Some(other), "10.244.9.0/24"),
            Choice::Reuse(net("10.244.9.0/24"))
        );
        assert_ne!(
            choose(Some(mac), "10.244.8.0/24"),
            Choice::Reuse(net("10.244.9.0/24"))
        );
    }

    #[test]
    fn own_lease_that_no_longer_fits_is_dropped_and_not_reused() {
        // SubnetLen changed from 24 to 25, and another own lease sits below SubnetMin.
        let t = Table::new(
            r#"{"Network": "10.244.0.0/16", "SubnetLen": 25, "SubnetMin": "10.244.2.0"}"#,
            &[
                ("10.244.1.0/24", OUR_IP),
                ("10.244.2.0/24", OUR_IP),
                ("10.244.3.0/25", "198.18.0.11"),
            ],
        );
        let a = t.choose(None, 1).unwrap();
        assert_eq!(
            a.incompatible_own,
            vec![net("10.244.1.0/24"), net("10.244.2.0/24")]
        );
        // The stale /24 at 10.244.2.0 will be deleted, so its /25s are candidates again.
        let Choice::Random(s) = a.choice else {
            panic!("{a:?}")
        };
        assert_eq!(s.prefix(), 25);
        assert_ne!(s, net("10.244.3.0/25"));
        assert!(s.network() >= "10.244.2.0".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn previous_subnet_from_subnet_env_when_free_and_valid() {
        let t = Table::new(NET16, &[("10.244.7.0/24", "198.18.0.11")]);
        assert_eq!(
            t.choose(Some("10.244.3.0/24"), 1).unwrap().choice,
            Choice::Previous(net("10.244.3.0/24"))
        );
        // Taken by another node, outside Network, misaligned, wrong length, below SubnetMin:
        for bad in [
            "10.244.7.0/24",
            "10.9.3.0/24",
            "10.244.3.0/25",
            "10.244.2.128/25",
            "10.244.0.0/24",
        ] {
            let a = t.choose(Some(bad), 1).unwrap();
            assert!(matches!(a.choice, Choice::Random(_)), "{bad}: {a:?}");
        }
        let t = Table::new(
            r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.10.0"}"#,
            &[],
        );
        assert!(matches!(
            t.choose(Some("10.244.11.0/24"), 1).unwrap().choice,
            Choice::Random(_)
        ));
    }

    #[test]
    fn random_pick_is_free_and_among_the_first_hundred_free() {
        // Every other subnet from SubnetMin up is taken.
        let taken: Vec<(String, &str)> = (1..=200)
            .step_by(2)
            .map(|i| {
                (
                    format!("10.244.{}.{}/26", i / 4, (i % 4) * 64),
                    "198.18.0.11",
                )
            })
            .collect();
        let taken: Vec<(&str, &str)> = taken.iter().map(|(s, ip)| (s.as_str(), *ip)).collect();
        let t = Table::new(r#"{"Network": "10.244.0.0/16", "SubnetLen": 26}"#, &taken);
        let first_hundred_free: BTreeSet<Ipv4Network> = (2..=200)
            .step_by(2)
            .map(|i| net(&format!("10.244.{}.{}/26", i / 4, (i % 4) * 64)))
            .collect();
        assert_eq!(first_hundred_free.len(), RANDOM_POOL);
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let Choice::Random(s) = t.choose(None, seed).unwrap().choice else {
                panic!()
            };
            assert!(
                first_hundred_free.contains(&s),
                "{s} is not among the first 100 free subnets"
            );
            seen.insert(s);
        }
        assert!(seen.len() > 20, "the pick is not random: {seen:?}");
    }

    #[test]
    fn lease_of_an_older_subnet_len_blocks_the_subnets_it_overlaps() {
        let t = Table::new(
            r#"{"Network": "10.244.0.0/24", "SubnetLen": 26}"#,
            &[("10.244.0.128/25", "198.18.0.12")],
        );
        for seed in 0..20 {
            assert_eq!(
                t.choose(Some("10.244.0.192/26"), seed).unwrap().choice,
                Choice::Random(net("10.244.0.64/26"))
            );
        }
    }

    #[test]
    fn exhaustion_names_the_range_the_count_and_the_fix() {
        let t = Table::new(
            r#"{"Network": "10.244.0.0/24", "SubnetLen": 26}"#,
            &[
                ("10.244.0.64/26", "198.18.0.11"),
                ("10.244.0.128/26", "198.18.0.12"),
                ("10.244.0.192/26", "198.18.0.13"),
            ],
        );
        let err = t.choose(Some("10.244.0.128/26"), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free subnet between SubnetMin 10.244.0.64 and SubnetMax 10.244.0.192 (3 taken): widen the range or remove stale leases under /coreos.com/network/subnets"
        );
    }
}
