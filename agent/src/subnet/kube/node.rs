//! Node objects as flannel reads and writes them: the annotation names, a Node → Lease
//! conversion, the podCIDR rules and the bodies of the strategic-merge patches.
//! Pure functions: the API calls live in the parent module.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use ipnetwork::{IpNetwork, Ipv4Network};
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::config::NetConf;
use crate::lease::{Lease, LeaseAttrs};

/// The node condition weft clears once the node's network works (flannel's wording for
/// the reason, which tools match on).
pub const NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
pub const NETWORK_UP_REASON: &str = "FlannelIsUp";
pub const NETWORK_UP_MESSAGE: &str = "weft is running on this node";

/// The full names of flannel's node annotations under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotations {
    /// `"true"` on every node whose lease a flannel-compatible agent published.
    pub kube_subnet_manager: String,
    pub backend_type: String,
    /// The backend's JSON (`{"VNI":1,"VtepMAC":"..."}`; `null` for host-gw) as a string.
    pub backend_data: String,
    /// The address peers reach this node at.
    pub public_ip: String,
    /// Set by the user: the address published as public-ip (e.g. behind NAT).
    pub public_ip_overwrite: String,
    /// Set by the user: the local address (and so the interface) to use.
    pub node_public_ip: String,
}

impl Annotations {
    /// flannel's rules for `--kube-annotation-prefix`: `example.com` becomes
    /// `example.com/<name>`, `example.com/net` becomes `example.com/net-<name>`.
    pub fn new(prefix: &str) -> Result<Self> {
        let mut full = prefix.to_string();
        match prefix.matches('/').count() {
            0 => full.push('/'),
            1 => {}
            _ => bail!("--kube-annotation-prefix {prefix:?} contains more than one slash: use a DNS name, optionally followed by /<word>, e.g. flannel.alpha.coreos.com"),
        }
        if !full.ends_with('/') && !full.ends_with('-') {
            full.push('-');
        }
        // flannel's pattern, unanchored at the start like flannel's regexp.MatchString.
        let valid = regex::Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")
            .expect("static regex")
            .is_match(&full);
        if !valid {
            bail!("--kube-annotation-prefix {prefix:?} is not a valid annotation prefix: use a lowercase DNS name, optionally followed by /<word>, e.g. flannel.alpha.coreos.com");
        }
        let name = |suffix: &str| format!("{full}{suffix}");
        Ok(Annotations {
            kube_subnet_manager: name("kube-subnet-manager"),
            backend_type: name("backend-type"),
            backend_data: name("backend-data"),
            public_ip: name("public-ip"),
            public_ip_overwrite: name("public-ip-overwrite"),
            node_public_ip: name("node-public-ip"),
        })
    }
}

pub fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("")
}

/// An annotation's value; an empty value counts as absent (as in flannel).
pub fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// An annotation that must hold an IPv4 address, if present.
pub fn ipv4_annotation(node: &Node, key: &str) -> Result<Option<Ipv4Addr>> {
    annotation(node, key)
        .map(|v| {
            v.parse::<Ipv4Addr>().with_context(|| {
                format!(
                    "annotation {key}={v:?} of node {:?} is not an IPv4 address: correct or remove it",
                    node_name(node)
                )
            })
        })
        .transpose()
}

/// Every podCIDR of the node (`spec.podCIDRs`, else `spec.podCIDR`).
fn pod_cidrs(node: &Node) -> Vec<&str> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    match spec.pod_cidrs.as_deref() {
        Some(all) if !all.is_empty() => all.iter().map(String::as_str).collect(),
        _ => spec.pod_cidr.as_deref().into_iter().collect(),
    }
}

/// The node's IPv4 pod subnet: the first IPv4 entry of its podCIDRs; None if it has none.
pub fn pod_subnet(node: &Node) -> Result<Option<Ipv4Network>, String> {
    for cidr in pod_cidrs(node) {
        match cidr.trim().parse::<IpNetwork>() {
            Ok(IpNetwork::V4(net)) => {
                let subnet = Ipv4Network::new(net.network(), net.prefix())
                    .map_err(|e| format!("podCIDR {cidr:?}: {e}"))?;
                return Ok(Some(subnet));
            }
            Ok(IpNetwork::V6(_)) => continue,
            Err(_) => return Err(format!("podCIDR {cidr:?} is not a CIDR")),
        }
    }
    Ok(None)
}

/// This node's lease subnet: its podCIDR, which must lie inside the configured Network.
pub fn own_subnet(node: &Node, conf: &NetConf) -> Result<Ipv4Network> {
    let name = node_name(node);
    let network = conf.network;
    let subnet = pod_subnet(node).map_err(|e| anyhow::anyhow!("node {name:?}: {e}"))?;
    let Some(subnet) = subnet else {
        let cidrs = pod_cidrs(node);
        if cidrs.is_empty() {
            bail!("node \"{name}\" has no podCIDR: the kube-controller-manager must allocate pod CIDRs (--allocate-node-cidrs=true --cluster-cidr={network})");
        }
        bail!(
            "node \"{name}\" has no IPv4 podCIDR (it has {}), but weft supports IPv4 only: the kube-controller-manager must allocate IPv4 pod CIDRs (--allocate-node-cidrs=true --cluster-cidr={network})",
            cidrs.join(", ")
        );
    };
    let inside = network.prefix() <= subnet.prefix() && network.contains(subnet.network());
    if !inside {
        bail!("node \"{name}\" has podCIDR {subnet}, which is outside the Network {network} of net-conf.json: the kube-controller-manager's --cluster-cidr and net-conf.json's Network must agree");
    }
    Ok(subnet)
}

/// Another node's lease, or why that node is not (or no longer) a peer.
pub fn peer_lease(node: &Node, ann: &Annotations) -> Result<Lease, String> {
    let missing = |key: &str| format!("annotation {key} is missing");
    if annotation(node, &ann.kube_subnet_manager) != Some("true") {
        return Err(format!(
            "not managed by flannel or weft ({}=true is missing)",
            ann.kube_subnet_manager
        ));
    }
    let subnet = pod_subnet(node)?.ok_or("it has no IPv4 podCIDR")?;
    let backend_type =
        annotation(node, &ann.backend_type).ok_or_else(|| missing(&ann.backend_type))?;
    let public_ip = ipv4_annotation(node, &ann.public_ip_overwrite)
        .and_then(|overwrite| match overwrite {
            Some(ip) => Ok(Some(ip)),
            None => ipv4_annotation(node, &ann.public_ip),
        })
        .map_err(|e| e.to_string())?
        .ok_or_else(|| missing(&ann.public_ip))?;
    let backend_data = match annotation(node, &ann.backend_data) {
        None => None,
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Null) => None,
            Ok(value) => Some(value),
            Err(e) => return Err(format!("annotation {} is not JSON: {e}", ann.backend_data)),
        },
    };
    Ok(Lease {
        subnet,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.to_string(),
            backend_data,
            backend_v6_data: None,
        },
    })
}

/// What this node published last time (its podCIDR and backend data), so the backend can
/// keep its VtepMAC; None when there is nothing to reuse.
pub fn stored_lease(node: &Node, ann: &Annotations, public_ip: Ipv4Addr) -> Option<Lease> {
    let subnet = pod_subnet(node).ok().flatten()?;
    let backend_data = serde_json::from_str::<Value>(annotation(node, &ann.backend_data)?)
        .ok()
        .filter(|v| !v.is_null())?;
    Some(Lease {
        subnet,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: annotation(node, &ann.backend_type)
                .unwrap_or_default()
                .to_string(),
            backend_data: Some(backend_data),
            backend_v6_data: None,
        },
    })
}

/// The annotations this node must carry for `attrs`, as flannel writes them: backend-data
/// is the JSON text (`null` without data, like flannel's host-gw), public-ip is the
/// node's public-ip-overwrite when set.
pub fn published_annotations(
    node: &Node,
    ann: &Annotations,
    attrs: &LeaseAttrs,
) -> Result<BTreeMap<String, String>> {
    let public_ip = ipv4_annotation(node, &ann.public_ip_overwrite)?.unwrap_or(attrs.public_ip);
    Ok(BTreeMap::from([
        (ann.kube_subnet_manager.clone(), "true".to_string()),
        (ann.backend_type.clone(), attrs.backend_type.clone()),
        (
            ann.backend_data.clone(),
            serde_json::to_string(&attrs.backend_data)?,
        ),
        (ann.public_ip.clone(), public_ip.to_string()),
    ]))
}

/// The strategic-merge patch (for nodes/status) that publishes `attrs`, with only the
/// annotations that differ; None when the node already carries them all.
pub fn annotation_patch(
    node: &Node,
    ann: &Annotations,
    attrs: &LeaseAttrs,
) -> Result<Option<Value>> {
    let current = node.metadata.annotations.as_ref();
    let changed: serde_json::Map<String, Value> = published_annotations(node, ann, attrs)?
        .into_iter()
        .filter(|(k, v)| current.and_then(|c| c.get(k)) != Some(v))
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok((!changed.is_empty()).then(|| json!({ "metadata": { "annotations": changed } })))
}

/// The strategic-merge patch (for nodes/status) that sets NetworkUnavailable=False;
/// conditions merge by `type`, so the node's other conditions stay.
pub fn network_available_patch(now: Timestamp) -> Value {
    let condition = NodeCondition {
        type_: NETWORK_UNAVAILABLE.to_string(),
        status: "False".to_string(),
        reason: Some(NETWORK_UP_REASON.to_string()),
        message: Some(NETWORK_UP_MESSAGE.to_string()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    };
    json!({ "status": { "conditions": [condition] } })
}

/// Whether the node already says NetworkUnavailable=False because flannel/weft is up.
pub fn network_marked_available(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == NETWORK_UNAVAILABLE
                && c.status == "False"
                && c.reason.as_deref() == Some(NETWORK_UP_REASON)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetConf;

    const PREFIX: &str = "flannel.alpha.coreos.com";

    fn ann() -> Annotations {
        Annotations::new(PREFIX).unwrap()
    }

    /// A Node as flannel leaves it (annotations copied from a flannel v0.28 cluster).
    fn flannel_node(name: &str, pod_cidr: &str, extra: &[(&str, &str)]) -> Node {
        let mut value = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"b6:3c:8e:1a:47:0d\"}",
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/public-ip": "198.18.0.12",
                    "node.alpha.kubernetes.io/ttl": "0"
                }
            },
            "spec": { "podCIDR": pod_cidr, "podCIDRs": [pod_cidr] }
        });
        for (k, v) in extra {
            value["metadata"]["annotations"][*k] = json!(v);
        }
        serde_json::from_value(value).unwrap()
    }

    fn without(mut node: Node, key: &str) -> Node {
        node.metadata.annotations.as_mut().unwrap().remove(key);
        node
    }

    fn conf() -> NetConf {
        NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    fn vxlan_attrs(ip: &str, mac: &str) -> LeaseAttrs {
        serde_json::from_value(json!({
            "PublicIP": ip, "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": mac}
        }))
        .unwrap()
    }

    #[test]
    fn annotation_prefix_follows_flannel() {
        let a = ann();
        assert_eq!(
            a.kube_subnet_manager,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        assert_eq!(a.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(
            a.public_ip_overwrite,
            "flannel.alpha.coreos.com/public-ip-overwrite"
        );
        assert_eq!(a.node_public_ip, "flannel.alpha.coreos.com/node-public-ip");
        assert_eq!(
            Annotations::new("example.com/net").unwrap().backend_type,
            "example.com/net-backend-type"
        );
        assert_eq!(
            Annotations::new("example.com/net-").unwrap().public_ip,
            "example.com/net-public-ip"
        );
        for bad in ["a/b/c", "noDots", "UPPER.CASE.COM"] {
            let e = Annotations::new(bad).unwrap_err().to_string();
            assert!(e.contains("--kube-annotation-prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn flannel_node_becomes_a_lease() {
        let lease = peer_lease(&flannel_node("n2", "10.244.2.0/24", &[]), &ann()).unwrap();
        assert_eq!(lease.subnet, "10.244.2.0/24".parse().unwrap());
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 12));
        assert_eq!(lease.attrs.backend_type, "vxlan");
        let vx = lease.attrs.vxlan().unwrap();
        assert_eq!(
            (vx.vni, vx.vtep_mac.to_string().as_str()),
            (1, "b6:3c:8e:1a:47:0d")
        );
    }

    #[test]
    fn public_ip_overwrite_takes_precedence() {
        let node = flannel_node(
            "n2",
            "10.244.2.0/24",
            &[(
                "flannel.alpha.coreos.com/public-ip-overwrite",
                "203.0.113.7",
            )],
        );
        let lease = peer_lease(&node, &ann()).unwrap();
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(203, 0, 113, 7));
        // Even without public-ip, the overwrite suffices.
        let node = without(node, "flannel.alpha.coreos.com/public-ip");
        assert_eq!(
            peer_lease(&node, &ann()).unwrap().attrs.public_ip,
            Ipv4Addr::new(203, 0, 113, 7)
        );
    }

    #[test]
    fn host_gw_null_backend_data_is_no_data() {
        let node = flannel_node(
            "n3",
            "10.244.3.0/24",
            &[
                ("flannel.alpha.coreos.com/backend-type", "host-gw"),
                ("flannel.alpha.coreos.com/backend-data", "null"),
            ],
        );
        let lease = peer_lease(&node, &ann()).unwrap();
        assert_eq!(lease.attrs.backend_type, "host-gw");
        assert_eq!(lease.attrs.backend_data, None);
    }

    #[test]
    fn incomplete_nodes_are_not_peers_and_say_why() {
        let a = ann();
        let base = flannel_node("n4", "10.244.4.0/24", &[]);
        let cases = [
            (
                without(base.clone(), &a.kube_subnet_manager),
                "kube-subnet-manager",
            ),
            (
                flannel_node("n4", "10.244.4.0/24", &[(&a.kube_subnet_manager, "false")]),
                "kube-subnet-manager",
            ),
            (without(base.clone(), &a.backend_type), "backend-type"),
            (without(base.clone(), &a.public_ip), "public-ip"),
            (
                flannel_node("n4", "10.244.4.0/24", &[(&a.public_ip, "not-an-ip")]),
                "public-ip",
            ),
            (
                flannel_node("n4", "10.244.4.0/24", &[(&a.backend_data, "{broken")]),
                "backend-data",
            ),
            (flannel_node("n4", "fd00:1::/64", &[]), "podCIDR"),
            (flannel_node("n4", "garbage", &[]), "garbage"),
        ];
        for (node, expected) in cases {
            let why = peer_lease(&node, &a).unwrap_err();
            assert!(why.contains(expected), "{expected}: {why}");
        }
        let mut no_cidr = base;
        no_cidr.spec = None;
        assert!(peer_lease(&no_cidr, &a).unwrap_err().contains("podCIDR"));
    }

    #[test]
    fn pod_subnet_prefers_the_first_ipv4_of_pod_cidrs() {
        let mut node = flannel_node("n5", "10.244.5.0/24", &[]);
        node.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["fd00:5::/64".into(), "10.244.5.0/24".into()]);
        node.spec.as_mut().unwrap().pod_cidr = Some("fd00:5::/64".into());
        assert_eq!(
            pod_subnet(&node).unwrap(),
            Some("10.244.5.0/24".parse().unwrap())
        );
        // Host bits are cleared.
        node.spec.as_mut().unwrap().pod_cidrs = None;
        node.spec.as_mut().unwrap().pod_cidr = Some("10.244.5.9/24".into());
        assert_eq!(
            pod_subnet(&node).unwrap(),
            Some("10.244.5.0/24".parse().unwrap())
        );
    }

    #[test]
    fn own_subnet_errors_say_what_to_fix() {
        let mut node = flannel_node("worker-1", "10.244.7.0/24", &[]);
        assert_eq!(
            own_subnet(&node, &conf()).unwrap(),
            "10.244.7.0/24".parse().unwrap()
        );

        node.spec = None;
        let e = own_subnet(&node, &conf()).unwrap_err().to_string();
        assert_eq!(e, "node \"worker-1\" has no podCIDR: the kube-controller-manager must allocate pod CIDRs (--allocate-node-cidrs=true --cluster-cidr=10.244.0.0/16)");

        let node = flannel_node("worker-1", "10.99.7.0/24", &[]);
        let e = own_subnet(&node, &conf()).unwrap_err().to_string();
        assert!(
            e.contains("10.99.7.0/24")
                && e.contains("10.244.0.0/16")
                && e.contains("--cluster-cidr"),
            "{e}"
        );

        // A podCIDR larger than the Network is not inside it either.
        let node = flannel_node("worker-1", "10.0.0.0/8", &[]);
        assert!(own_subnet(&node, &conf()).is_err());

        let node = flannel_node("worker-1", "fd00:7::/64", &[]);
        let e = own_subnet(&node, &conf()).unwrap_err().to_string();
        assert!(
            e.contains("no IPv4 podCIDR") && e.contains("fd00:7::/64"),
            "{e}"
        );
    }

    #[test]
    fn patch_has_flannels_shape_and_only_what_changed() {
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "annotations": {"unrelated": "x"}},
            "spec": {"podCIDR": "10.244.1.0/24"}
        }))
        .unwrap();
        let attrs = vxlan_attrs("198.18.0.11", "de:ad:be:ef:00:01");
        let patch = annotation_patch(&node, &ann(), &attrs).unwrap().unwrap();
        assert_eq!(
            patch,
            json!({"metadata": {"annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"de:ad:be:ef:00:01\"}",
                "flannel.alpha.coreos.com/public-ip": "198.18.0.11"
            }}})
        );

        // Applied, nothing remains to patch.
        let published = patch["metadata"]["annotations"].as_object().unwrap();
        let current = node.metadata.annotations.as_mut().unwrap();
        for (k, v) in published {
            current.insert(k.clone(), v.as_str().unwrap().to_string());
        }
        assert_eq!(annotation_patch(&node, &ann(), &attrs).unwrap(), None);

        // A new MAC patches only backend-data.
        let attrs = vxlan_attrs("198.18.0.11", "de:ad:be:ef:00:02");
        let patch = annotation_patch(&node, &ann(), &attrs).unwrap().unwrap();
        assert_eq!(
            patch["metadata"]["annotations"].as_object().unwrap().len(),
            1
        );
    }

    #[test]
    fn host_gw_publishes_null_and_overwrite_is_published_as_public_ip() {
        let node = flannel_node(
            "n1",
            "10.244.1.0/24",
            &[(
                "flannel.alpha.coreos.com/public-ip-overwrite",
                "203.0.113.9",
            )],
        );
        let attrs = LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, 0, 11),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: None,
            backend_v6_data: None,
        };
        let published = published_annotations(&node, &ann(), &attrs).unwrap();
        assert_eq!(published["flannel.alpha.coreos.com/backend-data"], "null");
        assert_eq!(
            published["flannel.alpha.coreos.com/public-ip"],
            "203.0.113.9"
        );

        let bad = flannel_node(
            "n1",
            "10.244.1.0/24",
            &[("flannel.alpha.coreos.com/public-ip-overwrite", "nat-box")],
        );
        let e = published_annotations(&bad, &ann(), &attrs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("public-ip-overwrite") && e.contains("nat-box"),
            "{e}"
        );
    }

    #[test]
    fn condition_patch_is_flannels() {
        let now: Timestamp = "2025-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(
            network_available_patch(now),
            json!({"status": {"conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "FlannelIsUp",
                "message": "weft is running on this node",
                "lastHeartbeatTime": "2025-01-02T03:04:05Z",
                "lastTransitionTime": "2025-01-02T03:04:05Z"
            }]}})
        );
        let mut node = flannel_node("n1", "10.244.1.0/24", &[]);
        assert!(!network_marked_available(&node));
        node.status = Some(
            serde_json::from_value(json!({"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}
            ]}))
            .unwrap(),
        );
        assert!(network_marked_available(&node));
    }

    #[test]
    fn stored_lease_keeps_the_vtep_mac() {
        let node = flannel_node("n1", "10.244.1.0/24", &[]);
        let lease = stored_lease(&node, &ann(), Ipv4Addr::new(198, 18, 0, 11)).unwrap();
        assert_eq!(
            lease.attrs.vxlan().unwrap().vtep_mac.to_string(),
            "b6:3c:8e:1a:47:0d"
        );
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        let fresh = without(node, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(
            stored_lease(&fresh, &ann(), Ipv4Addr::new(198, 18, 0, 11)),
            None
        );
    }
}
