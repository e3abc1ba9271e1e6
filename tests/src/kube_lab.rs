//! The lab's Kubernetes control plane in kube mode (`SubnetManager::Kube`): the API
//! server emulator (`weft-apiserver`) as a process in the fabric namespace, one user per
//! node with weft's RBAC rules, the Node objects the lab creates as kubelet and the
//! kube-controller-manager would, and flannel's node annotations read back as leases.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};

use crate::apiserver::{kubeconfig_file_name, ControlClient, Rule, User};
use crate::exec::wait_until;
use crate::lab::Lease;
use crate::process::{tail, NetnsProcess};

/// Where the lab's API server listens (the fabric bridge's address).
pub const API_LISTEN: &str = "198.18.0.254:6443";
/// flannel's annotation prefix (`--kube-annotation-prefix` default), with its slash.
pub const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";
pub const KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// The namespace of weft's service account in deploy/weft.yml.
const SERVICE_ACCOUNT_NAMESPACE: &str = "weft";
/// deploy/weft.yml, whose ClusterRole and Role give every node's user its rules.
const WEFT_MANIFEST: &str = include_str!("../../deploy/weft.yml");

/// The RBAC user of node `node_name`'s agent: a service account per node (one token each),
/// e.g. `system:serviceaccount:weft:weft-n1`.
pub fn agent_user(node_name: &str) -> String {
    format!("system:serviceaccount:{SERVICE_ACCOUNT_NAMESPACE}:weft-{node_name}")
}

/// The core-group rules of deploy/weft.yml's ClusterRole and Role `weft`: exactly what the
/// manifest grants the agent (nodes get/list/watch, nodes/status patch, pods get).
pub fn weft_rbac_rules() -> Result<Vec<Rule>> {
    rbac_rules_of(WEFT_MANIFEST, "weft")
}

fn rbac_rules_of(manifest: &str, role: &str) -> Result<Vec<Rule>> {
    let mut rules = Vec::new();
    for document in serde_yaml::Deserializer::from_str(manifest) {
        let doc: serde_yaml::Value = serde::Deserialize::deserialize(document)
            .context("deploy/weft.yml is not valid YAML")?;
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "ClusterRole" | "Role") || doc["metadata"]["name"].as_str() != Some(role)
        {
            continue;
        }
        let strings = |v: &serde_yaml::Value| -> Vec<String> {
            v.as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        for rule in doc["rules"].as_sequence().into_iter().flatten() {
            if strings(&rule["apiGroups"]).iter().any(|g| g.is_empty()) {
                rules.push(Rule {
                    verbs: strings(&rule["verbs"]),
                    resources: strings(&rule["resources"]),
                });
            }
        }
    }
    if rules.is_empty() {
        bail!("deploy/weft.yml has no core-group rules in a ClusterRole or Role named {role:?}");
    }
    Ok(rules)
}

/// A random bearer token.
pub fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Node object of a lab node, as kubelet registers it and the kube-controller-manager
/// (`--allocate-node-cidrs`) completes it: podCIDR (None: not allocated), InternalIP and
/// Hostname addresses, Ready.
pub fn node_object(name: &str, internal_ip: Ipv4Addr, pod_cidr: Option<&str>) -> Result<Node> {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
        },
        "spec": {},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
            }],
        },
    });
    if let Some(cidr) = pod_cidr {
        node["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    }
    serde_json::from_value(node).context("the lab's Node object does not decode as a Node")
}

/// The annotations flanneld (kube subnet manager, IPv4 only) writes on its Node for a
/// vxlan lease: exactly these four keys, backend-data as Go's json.Marshal prints it.
pub fn flanneld_vxlan_annotations(public_ip: Ipv4Addr, vni: u32, vtep_mac: &str) -> Value {
    json!({
        KUBE_SUBNET_MANAGER: "true",
        BACKEND_TYPE: "vxlan",
        BACKEND_DATA: format!("{{\"VNI\":{vni},\"VtepMAC\":\"{vtep_mac}\"}}"),
        PUBLIC_IP: public_ip.to_string(),
    })
}

/// The annotations of `node` under flannel's prefix.
pub fn flannel_annotations(node: &Node) -> BTreeMap<String, String> {
    node.metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The condition `type_` of `node`, if it has one.
pub fn node_condition<'a>(
    node: &'a Node,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The lease a Node's flannel annotations publish, in the etcd lease's shape (key: the
/// Node's name; value: `{"PublicIP", "BackendType", "BackendData"}`). None for a node
/// that publishes none (no `kube-subnet-manager=true`, no podCIDR or no public-ip), as
/// flannel's peers see it.
pub fn lease_of_node(node: &Node) -> Result<Option<Lease>> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let annotations = flannel_annotations(node);
    let get = |key: &str| {
        annotations
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    if get(KUBE_SUBNET_MANAGER) != Some("true") {
        return Ok(None);
    }
    let pod_cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref());
    let (Some(pod_cidr), Some(public_ip)) = (pod_cidr, get(PUBLIC_IP)) else {
        return Ok(None);
    };
    let (subnet, prefix_len) = pod_cidr
        .split_once('/')
        .with_context(|| format!("node {name}: podCIDR {pod_cidr:?} is not a CIDR"))?;
    let backend_data: Value = match get(BACKEND_DATA) {
        Some(text) => serde_json::from_str(text)
            .with_context(|| format!("node {name}: {BACKEND_DATA} is not JSON: {text}"))?,
        None => Value::Null,
    };
    let backend_type = get(BACKEND_TYPE).unwrap_or_default().to_string();
    Ok(Some(Lease {
        key: name.clone(),
        subnet: subnet
            .parse()
            .with_context(|| format!("node {name}: podCIDR {pod_cidr:?}"))?,
        prefix_len: prefix_len
            .parse()
            .with_context(|| format!("node {name}: podCIDR {pod_cidr:?}"))?,
        public_ip: public_ip
            .parse()
            .with_context(|| format!("node {name}: {PUBLIC_IP}={public_ip:?}"))?,
        vtep_mac: backend_data["VtepMAC"].as_str().map(str::to_string),
        value: json!({
            "PublicIP": public_ip,
            "BackendType": backend_type,
            "BackendData": backend_data,
        }),
        backend_type,
    }))
}

/// `weft-apiserver` running in a namespace, driven through its control socket.
pub struct ApiServer {
    process: NetnsProcess,
    dir: PathBuf,
    control: ControlClient,
    url: String,
}

impl ApiServer {
    /// Starts `binary` in namespace `ns` on `listen` with state in `dir` (kubeconfigs,
    /// control socket) and `users` (admin is added by the server), its output in `log`;
    /// waits (at most 20 s) until it serves.
    pub fn start(
        binary: &Path,
        ns: &str,
        listen: SocketAddr,
        dir: &Path,
        users: &[User],
        log: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let users_file = dir.join("users.json");
        std::fs::write(&users_file, serde_json::to_string_pretty(users)?)
            .with_context(|| format!("cannot write {}", users_file.display()))?;
        let args: Vec<String> = vec![
            binary.to_string_lossy().into_owned(),
            "--listen".into(),
            listen.to_string(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
            "--users".into(),
            users_file.to_string_lossy().into_owned(),
        ];
        let process = NetnsProcess::spawn("weft-apiserver", ns, &args, &[], log)?;
        let mut server = ApiServer {
            process,
            dir: dir.to_path_buf(),
            control: ControlClient::new(dir),
            url: format!("https://{listen}"),
        };
        let ready_line = format!("ready {}", server.url);
        let ready = wait_until("weft-apiserver to serve", Duration::from_secs(20), || {
            if let Some(status) = server.process.exit_status() {
                bail!("weft-apiserver exited ({status})");
            }
            let printed = std::fs::read_to_string(log).unwrap_or_default();
            Ok(printed.lines().any(|l| l.trim() == ready_line))
        });
        ready.with_context(|| format!("weft-apiserver log tail:\n{}", tail(log, 20)))?;
        Ok(server)
    }

    pub fn control(&self) -> &ControlClient {
        &self.control
    }

    /// `https://<listen>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The kubeconfig the server wrote for `user`.
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.join(kubeconfig_file_name(user))
    }

    pub fn log(&self) -> &Path {
        self.process.log()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// A Node by name through `control`, or an error naming it.
pub fn get_node(control: &ControlClient, name: &str) -> Result<Node> {
    control
        .node(name)?
        .ok_or_else(|| anyhow!("the API server has no Node {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_the_manifests() {
        let rules = weft_rbac_rules().unwrap();
        let user = User::new("u", "t", rules);
        for (verb, resource) in [
            ("get", "nodes"),
            ("list", "nodes"),
            ("watch", "nodes"),
            ("patch", "nodes/status"),
            ("get", "pods"),
        ] {
            assert!(user.can(verb, resource), "{verb} {resource}");
        }
        assert!(!user.can("patch", "nodes"));
        assert!(!user.can("update", "nodes/status"));
        assert!(!user.can("delete", "nodes"));
    }

    #[test]
    fn flanneld_annotations_become_a_lease() {
        let mut node =
            node_object("n3", Ipv4Addr::new(198, 18, 0, 13), Some("10.244.3.0/24")).unwrap();
        assert_eq!(lease_of_node(&node).unwrap(), None, "not annotated yet");
        let annotations =
            flanneld_vxlan_annotations(Ipv4Addr::new(198, 18, 0, 13), 1, "0e:00:5e:fa:fa:03");
        assert_eq!(
            annotations[BACKEND_DATA],
            r#"{"VNI":1,"VtepMAC":"0e:00:5e:fa:fa:03"}"#
        );
        node.metadata.annotations = Some(serde_json::from_value(annotations).unwrap());
        let lease = lease_of_node(&node).unwrap().unwrap();
        assert_eq!(lease.key, "n3");
        assert_eq!(lease.cidr(), "10.244.3.0/24");
        assert_eq!(lease.public_ip, Ipv4Addr::new(198, 18, 0, 13));
        assert_eq!(lease.backend_type, "vxlan");
        assert_eq!(lease.vtep_mac.as_deref(), Some("0e:00:5e:fa:fa:03"));
        assert_eq!(lease.value["BackendData"]["VNI"], 1);

        let no_cidr = node_object("n4", Ipv4Addr::new(198, 18, 0, 14), None).unwrap();
        assert!(no_cidr.spec.as_ref().unwrap().pod_cidr.is_none());
    }

    #[test]
    fn agent_users_are_per_node_service_accounts() {
        assert_eq!(agent_user("n1"), "system:serviceaccount:weft:weft-n1");
        assert_ne!(random_token(), random_token());
    }
}
