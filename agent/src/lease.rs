//! Leases: which node owns which pod subnet, and how to reach it.
//!
//! The JSON shapes are flannel's, so that etcd keys and node annotations written by
//! weft and by flanneld are interchangeable.

use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// A 48-bit Ethernet address, printed and parsed as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random, locally administered, unicast address (what flannel gives flannel.<VNI>).
    pub fn random_local() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        anyhow::ensure!(
            parts.len() == 6,
            "invalid MAC address {s:?}: expected aa:bb:cc:dd:ee:ff"
        );
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            b[i] = u8::from_str_radix(p, 16).map_err(|_| {
                anyhow::anyhow!("invalid MAC address {s:?}: {p:?} is not a hex byte")
            })?;
        }
        Ok(MacAddr(b))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// flannel's vxlan `BackendData`: `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// flannel's `LeaseAttrs`, the value stored under `<prefix>/subnets/<key>` and, split into
/// annotations, on the Node object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    /// The vxlan backend data, if this lease carries one that parses.
    pub fn vxlan(&self) -> Option<VxlanBackendData> {
        self.backend_data
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }
}

/// One node's lease on a pod subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub attrs: LeaseAttrs,
}

/// A change in the lease table. Applying an event is idempotent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease appeared or changed (same subnet, new attributes).
    Added(Lease),
    /// The lease on this subnet is gone.
    Removed(Ipv4Network),
}

/// What a subnet manager's watch reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseWatchEvent {
    /// The complete table of other nodes' leases (initial list, or re-list after the
    /// watch was lost): whatever is not in it must go.
    Snapshot(Vec<Lease>),
    /// An incremental change.
    Event(LeaseEvent),
    /// Our own lease was deleted or taken by someone else: the agent must stop.
    OwnLeaseRevoked,
}

/// flannel's etcd key for a subnet: `10.244.1.0-24`.
pub fn subnet_key(subnet: &Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

/// Parses flannel's etcd key for a subnet (`10.244.1.0-24`; a dual-stack key
/// `10.244.1.0-24&fc00::-64` yields its IPv4 part).
pub fn parse_subnet_key(key: &str) -> Option<Ipv4Network> {
    let v4 = key.split('&').next()?;
    let (ip, len) = v4.split_once('-')?;
    let net = Ipv4Network::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.network() == net.ip()).then_some(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_attrs_round_trip_flannel_json() {
        let json = r#"{"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"de:ad:be:ef:00:01"}}"#;
        let attrs: LeaseAttrs = serde_json::from_str(json).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        let vx = attrs.vxlan().unwrap();
        assert_eq!(vx.vni, 1);
        assert_eq!(vx.vtep_mac.to_string(), "de:ad:be:ef:00:01");
        assert_eq!(serde_json::to_string(&attrs).unwrap(), json);
    }

    #[test]
    fn subnet_keys() {
        let net: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key(&net), "10.244.3.0-24");
        assert_eq!(parse_subnet_key("10.244.3.0-24"), Some(net));
        assert_eq!(parse_subnet_key("10.244.3.0-24&fc00::-64"), Some(net));
        assert_eq!(parse_subnet_key("10.244.3.1-24"), None);
        assert_eq!(parse_subnet_key("garbage"), None);
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for _ in 0..32 {
            let m = MacAddr::random_local();
            assert_eq!(m.0[0] & 0x03, 0x02);
        }
    }
}
