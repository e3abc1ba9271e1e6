//! net-conf.json: flannel's network configuration, with flannel's fields and defaults.
//!
//! Parsing is strict where flannel is lenient in ways that hurt: every error names the
//! field and says how to fix it.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::Deserialize;
use serde_json::Value;

/// The kernel's default VXLAN port, which flannel uses when `Port` is 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// A validated network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConf {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// Whether net-conf.json sets SubnetMin or SubnetMax (rather than leaving flannel's
    /// defaults): only then are peers' leases held to the range.
    pub subnet_range_set: bool,
    /// `EnableNFTables`: Some(true) requires nftables, Some(false) iptables (as flannel);
    /// unset lets `--firewall` decide.
    pub enable_nftables: Option<bool>,
    pub backend: BackendConf,
    /// Said once at start-up (e.g. a defaulted backend).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendConf {
    Vxlan(VxlanConf),
    HostGw,
}

impl BackendConf {
    /// flannel's `BackendType` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendConf::Vxlan(_) => "vxlan",
            BackendConf::HostGw => "host-gw",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanConf {
    pub vni: u32,
    /// UDP destination port (8472 when net-conf.json says 0 or nothing).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// Underlay MTU to assume; 0 means the interface's MTU.
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("net-conf.json: {0}")]
pub struct NetConfError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, NetConfError> {
    Err(NetConfError(msg.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetConf {
    #[serde(rename = "Network")]
    network: Option<String>,
    #[serde(rename = "IPv6Network")]
    _ipv6_network: Option<String>,
    #[serde(rename = "EnableIPv4")]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(rename = "EnableNFTables")]
    enable_nftables: Option<bool>,
    #[serde(rename = "SubnetLen")]
    subnet_len: Option<u8>,
    #[serde(rename = "SubnetMin")]
    subnet_min: Option<String>,
    #[serde(rename = "SubnetMax")]
    subnet_max: Option<String>,
    #[serde(rename = "IPv6SubnetLen")]
    _ipv6_subnet_len: Option<u8>,
    #[serde(rename = "IPv6SubnetMin")]
    _ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax")]
    _ipv6_subnet_max: Option<String>,
    #[serde(rename = "Backend")]
    backend: Option<Value>,
}

impl NetConf {
    /// Parses and validates net-conf.json text.
    pub fn parse(text: &str) -> Result<NetConf, NetConfError> {
        let raw: RawNetConf = serde_json::from_str(text).map_err(|e| {
            NetConfError(format!(
                "{e} (expected a JSON object such as {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}})"
            ))
        })?;
        if raw.enable_ipv4 == Some(false) {
            return err("EnableIPv4 is false, but weft supports IPv4 networks only: remove EnableIPv4 or set it to true");
        }
        if raw.enable_ipv6 == Some(true) {
            return err(
                "EnableIPv6 is true, but weft does not support IPv6 yet: set EnableIPv6 to false",
            );
        }
        let Some(network) = raw.network else {
            return err("Network is missing: set it to the cluster's pod CIDR, e.g. \"Network\": \"10.244.0.0/16\"");
        };
        let network: Ipv4Network = network
            .contains('/')
            .then(|| network.parse().ok())
            .flatten()
            .ok_or_else(|| {
                NetConfError(format!(
                    "Network {network:?} is not an IPv4 CIDR: write it like \"10.244.0.0/16\""
                ))
            })?;
        if network.ip() != network.network() {
            return err(format!(
                "Network {network} has host bits set: did you mean {}/{}?",
                network.network(),
                network.prefix()
            ));
        }
        if network.prefix() > 28 {
            return err(format!(
                "Network {network} is too small: the smallest useful network is a /28"
            ));
        }
        let subnet_len = match raw.subnet_len {
            Some(0) | None if network.prefix() < 22 => 24,
            Some(0) | None => network.prefix() + 2,
            Some(l) => l,
        };
        if subnet_len > 30 {
            return err(format!(
                "SubnetLen {subnet_len} is too long: it must be 30 or less"
            ));
        }
        if subnet_len < network.prefix() + 2 {
            return err(format!(
                "SubnetLen {subnet_len} leaves room for fewer than four subnets in Network {network}: use a SubnetLen of at least {}",
                network.prefix() + 2
            ));
        }
        let size = 1u32 << (32 - subnet_len);
        let base = u32::from(network.network());
        let last = base + (1u32 << (32 - network.prefix())) - size;
        let mask = u32::MAX << (32 - subnet_len);
        let bound =
            |field: &str, value: Option<String>, default: u32| -> Result<Ipv4Addr, NetConfError> {
                let Some(text) = value else {
                    return Ok(Ipv4Addr::from(default));
                };
                let ip: Ipv4Addr = text.parse().map_err(|_| {
                    NetConfError(format!(
                        "{field} {text:?} is not an IPv4 address: write it like \"10.244.10.0\""
                    ))
                })?;
                if !network.contains(ip) {
                    return err(format!("{field} {ip} is not inside Network {network}"));
                }
                if u32::from(ip) & mask != u32::from(ip) {
                    return err(format!(
                        "{field} {ip} is not on a /{subnet_len} boundary (SubnetLen): use {}",
                        Ipv4Addr::from(u32::from(ip) & mask)
                    ));
                }
                Ok(ip)
            };
        let subnet_range_set = raw.subnet_min.is_some() || raw.subnet_max.is_some();
        let subnet_min = bound("SubnetMin", raw.subnet_min, base + size)?;
        let subnet_max = bound("SubnetMax", raw.subnet_max, last)?;
        if subnet_min > subnet_max {
            return err(format!("SubnetMin {subnet_min} is above SubnetMax {subnet_max}: swap them or widen the range"));
        }
        let mut warnings = Vec::new();
        let backend = match raw.backend {
            None => {
                warnings.push(
                    "net-conf.json has no Backend: using vxlan (flannel would fall back to its udp backend, which weft does not implement)".into(),
                );
                BackendConf::Vxlan(VxlanConf::parse(&serde_json::Map::new())?)
            }
            Some(Value::Object(map)) => match map.get("Type") {
                None => {
                    warnings.push("Backend has no Type: using vxlan".into());
                    BackendConf::Vxlan(VxlanConf::parse(&map)?)
                }
                Some(Value::String(t)) => match t.as_str() {
                    "vxlan" => BackendConf::Vxlan(VxlanConf::parse(&map)?),
                    "host-gw" => {
                        only_fields(&map, "host-gw", &["Type"])?;
                        BackendConf::HostGw
                    }
                    other => {
                        return err(format!(
                            "Backend.Type {other:?} is not supported: weft implements \"vxlan\" and \"host-gw\""
                        ))
                    }
                },
                Some(_) => return err("Backend.Type must be a string: \"vxlan\" or \"host-gw\""),
            },
            Some(_) => return err("Backend must be an object, e.g. {\"Type\": \"vxlan\"}"),
        };
        Ok(NetConf {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            subnet_range_set,
            enable_nftables: raw.enable_nftables,
            backend,
            warnings,
        })
    }
}

fn only_fields(
    map: &serde_json::Map<String, Value>,
    backend: &str,
    known: &[&str],
) -> Result<(), NetConfError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => err(format!(
            "Backend.{k} is not an option of the {backend} backend (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

impl VxlanConf {
    fn parse(map: &serde_json::Map<String, Value>) -> Result<VxlanConf, NetConfError> {
        only_fields(
            map,
            "vxlan",
            &[
                "Type",
                "VNI",
                "Port",
                "GBP",
                "Learning",
                "DirectRouting",
                "MTU",
                "MacPrefix",
            ],
        )?;
        let uint = |field: &str, max: u64, default: u64| -> Result<u64, NetConfError> {
            match map.get(field) {
                None => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if n <= max => Ok(n),
                    _ => err(format!(
                        "Backend.{field} must be a whole number from 0 to {max}, got {v}"
                    )),
                },
            }
        };
        let flag = |field: &str| -> Result<bool, NetConfError> {
            match map.get(field) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => err(format!("Backend.{field} must be true or false, got {v}")),
            }
        };
        let vni = uint("VNI", (1 << 24) - 1, 1)? as u32;
        let port = match uint("Port", 65535, 0)? {
            0 => DEFAULT_VXLAN_PORT,
            p => p as u16,
        };
        let mtu = uint("MTU", 65535, 0)? as u32;
        if mtu != 0 && mtu < 1280 {
            return err(format!("Backend.MTU {mtu} is too small: the underlay MTU must be at least 1280 (or 0 for the interface's MTU)"));
        }
        Ok(VxlanConf {
            vni,
            port,
            gbp: flag("GBP")?,
            learning: flag("Learning")?,
            direct_routing: flag("DirectRouting")?,
            mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> NetConf {
        NetConf::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn fails(s: &str) -> String {
        NetConf::parse(s).expect_err(s).to_string()
    }

    #[test]
    fn flannel_defaults() {
        let c = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#);
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert!(!c.subnet_range_set);
        assert_eq!(c.enable_nftables, None);
        assert_eq!(
            c.backend,
            BackendConf::Vxlan(VxlanConf {
                vni: 1,
                port: 8472,
                gbp: false,
                learning: false,
                direct_routing: false,
                mtu: 0
            })
        );
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn every_field() {
        let c = parse(
            r#"{"Network": "10.5.0.0/16", "EnableIPv4": true, "EnableIPv6": false, "EnableNFTables": true,
                "SubnetLen": 26, "SubnetMin": "10.5.1.0", "SubnetMax": "10.5.20.192",
                "Backend": {"Type": "vxlan", "VNI": 4096, "Port": 4789, "GBP": true, "Learning": true,
                            "DirectRouting": true, "MTU": 9000}}"#,
        );
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 20, 192));
        assert!(c.subnet_range_set);
        assert_eq!(c.enable_nftables, Some(true));
        assert_eq!(
            c.backend,
            BackendConf::Vxlan(VxlanConf {
                vni: 4096,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: 9000
            })
        );
        assert_eq!(
            parse(r#"{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}"#).backend,
            BackendConf::HostGw
        );
    }

    #[test]
    fn small_networks_get_prefix_plus_two() {
        let c = parse(r#"{"Network": "10.1.0.0/22", "Backend": {"Type": "host-gw"}}"#);
        assert_eq!(c.subnet_len, 24);
        let c = parse(r#"{"Network": "10.1.0.0/24", "Backend": {"Type": "host-gw"}}"#);
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 1, 0, 64));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 1, 0, 192));
        assert_eq!(parse(r#"{"Network": "10.1.0.0/21"}"#).subnet_len, 24);
    }

    #[test]
    fn missing_backend_defaults_to_vxlan_and_says_so() {
        let c = parse(r#"{"Network": "10.244.0.0/16"}"#);
        assert!(matches!(c.backend, BackendConf::Vxlan(_)));
        assert!(c.warnings[0].contains("no Backend"), "{:?}", c.warnings);
    }

    #[test]
    fn port_zero_is_kernel_default() {
        let c = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 0}}"#);
        let BackendConf::Vxlan(v) = c.backend else {
            panic!()
        };
        assert_eq!(v.port, 8472);
    }

    #[test]
    fn invalid_inputs_name_the_field_and_the_fix() {
        let cases: &[(&str, &str)] = &[
            ("{", "expected a JSON object"),
            ("[]", "expected a JSON object"),
            (r#"{"Backend": {"Type": "vxlan"}}"#, "Network is missing"),
            (
                r#"{"Network": "10.244.0.0"}"#,
                "Network \"10.244.0.0\" is not an IPv4 CIDR",
            ),
            (r#"{"Network": "banana"}"#, "is not an IPv4 CIDR"),
            (
                r#"{"Network": "10.244.0.1/16"}"#,
                "did you mean 10.244.0.0/16",
            ),
            (
                r#"{"Network": "10.244.0.0/29"}"#,
                "smallest useful network is a /28",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetLen": 31}"#,
                "SubnetLen 31 is too long",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetLen": 17}"#,
                "use a SubnetLen of at least 18",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}"#,
                "SubnetMin 10.245.0.0 is not inside Network",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.3.7"}"#,
                "SubnetMax 10.244.3.7 is not on a /24 boundary (SubnetLen): use 10.244.3.0",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetMin": "x"}"#,
                "SubnetMin \"x\" is not an IPv4 address",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.2.0"}"#,
                "SubnetMin 10.244.9.0 is above SubnetMax",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}"#,
                "Backend.Type \"udp\" is not supported: weft implements \"vxlan\" and \"host-gw\"",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": 3}}"#,
                "Backend.Type must be a string",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": "vxlan"}"#,
                "Backend must be an object",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": -1}}"#,
                "Backend.VNI must be a whole number from 0 to 16777215",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#,
                "Backend.VNI must be a whole number",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}"#,
                "Backend.Port must be a whole number from 0 to 65535",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": "yes"}}"#,
                "Backend.DirectRouting must be true or false",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "MTU": 500}}"#,
                "Backend.MTU 500 is too small",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Vni": 2}}"#,
                "Backend.Vni is not an option of the vxlan backend",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw", "VNI": 2}}"#,
                "Backend.VNI is not an option of the host-gw backend",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Netwrok": "x"}"#,
                "unknown field `Netwrok`",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "EnableIPv6": true}"#,
                "EnableIPv6 is true",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "EnableIPv4": false}"#,
                "EnableIPv4 is false",
            ),
        ];
        for (input, want) in cases {
            let got = fails(input);
            assert!(got.starts_with("net-conf.json: "), "{input}: {got}");
            assert!(
                got.contains(want),
                "{input}:\n  got:  {got}\n  want: {want}"
            );
        }
    }
}
