//! The Kubernetes subnet manager (`--kube-subnet-mgr`), flannel's way: the node's lease is
//! its `spec.podCIDR` (allocated by the kube-controller-manager), published as
//! `<prefix>/...` annotations on the Node by a strategic-merge patch of nodes/status; the
//! other nodes' leases come from a watch of all Nodes. The network configuration is
//! net-conf.json from the kube-flannel-cfg ConfigMap.

mod node;
mod peers;

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{error, info, info_span, warn, Instrument};

pub use node::Annotations;
use node::{
    annotation_patch, ipv4_annotation, network_available_patch, network_marked_available,
    own_subnet, pod_subnet, stored_lease,
};
use peers::PeerTable;

use super::SubnetManager;
use crate::config::NetConf;
use crate::iface::IfaceSelection;
use crate::lease::{Lease, LeaseAttrs, LeaseWatchEvent};

/// Every (verb, resource) the agent asks the API server for: the ClusterRole must grant
/// them all.
pub const API_CALLS: &[(&str, &str)] = &[
    ("get", "nodes"),
    ("list", "nodes"),
    ("watch", "nodes"),
    ("patch", "nodes/status"),
    ("get", "pods"),
];

/// How many times the node watch had to start over with a fresh list (after the first).
pub static WATCH_RESTARTS: AtomicU64 = AtomicU64::new(0);

/// Bounds of the delay between attempts while the API server cannot be reached.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one request may take before it counts as a failure (the client has no read
/// timeout of its own).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the RBAC rules weft needs are written down.
const RBAC_MANIFEST: &str = "deploy/weft.yml";

#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name; None: NODE_NAME, else the node of the pod POD_NAMESPACE/POD_NAME
    /// (flannel's environment variables).
    pub node_name: Option<String>,
    /// `--kube-api-url`: overrides the server of the kubeconfig / in-cluster config.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`; else KUBECONFIG, ~/.kube/config, then the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// `--net-config-path`.
    pub net_config_path: PathBuf,
    /// `--set-node-network-unavailable`: clear the NetworkUnavailable condition.
    pub set_node_network_unavailable: bool,
}

impl Default for KubeOptions {
    /// flanneld's defaults.
    fn default() -> Self {
        KubeOptions {
            node_name: None,
            api_url: None,
            kubeconfig: None,
            annotation_prefix: "flannel.alpha.coreos.com".into(),
            net_config_path: PathBuf::from("/etc/kube-flannel/net-conf.json"),
            set_node_network_unavailable: true,
        }
    }
}

pub struct KubeSubnetManager {
    nodes: Api<Node>,
    node_name: String,
    annotations: Annotations,
    net_config_path: PathBuf,
    set_node_network_unavailable: bool,
    /// The own node's `<prefix>/node-public-ip` when connecting.
    node_public_ip: Option<Ipv4Addr>,
    /// For messages about an unreachable API server.
    server: String,
}

/// Where this node's name comes from (flannel's rules).
#[derive(Clone, Debug, PartialEq, Eq)]
enum NodeNameSource {
    NodeName(String),
    Pod { namespace: String, name: String },
}

fn node_name_source(env: impl Fn(&str) -> Option<String>) -> Result<NodeNameSource> {
    let var = |key: &str| {
        env(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if let Some(name) = var("NODE_NAME") {
        return Ok(NodeNameSource::NodeName(name));
    }
    match (var("POD_NAME"), var("POD_NAMESPACE")) {
        (Some(name), Some(namespace)) => Ok(NodeNameSource::Pod { namespace, name }),
        _ => bail!("NODE_NAME is not set: set it to this node's Kubernetes name (in a DaemonSet: env NODE_NAME from fieldRef spec.nodeName), or set POD_NAME and POD_NAMESPACE so that weft finds the node from its pod"),
    }
}

impl KubeSubnetManager {
    /// Builds the client, finds this node and reads it once. Waits (retrying with backoff)
    /// while the API server cannot be reached; fails on errors retrying cannot fix.
    pub async fn connect(opts: KubeOptions) -> Result<Self> {
        let annotations = Annotations::new(&opts.annotation_prefix)?;
        let config = client_config(&opts).await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).context("building the Kubernetes client")?;
        let source = match opts.node_name {
            Some(name) => NodeNameSource::NodeName(name),
            None => node_name_source(|k| std::env::var(k).ok())?,
        };
        let node_name = match source {
            NodeNameSource::NodeName(name) => name,
            NodeNameSource::Pod { namespace, name } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
                let pod = call(&server, "get", "pods", || pods.get(&name))
                    .await
                    .with_context(|| format!("finding this node from its pod {namespace}/{name} (POD_NAME, POD_NAMESPACE)"))?;
                pod.spec
                    .and_then(|s| s.node_name)
                    .filter(|n| !n.is_empty())
                    .with_context(|| format!("pod {namespace}/{name} (POD_NAME, POD_NAMESPACE) is not scheduled to a node: set NODE_NAME instead"))?
            }
        };
        let mut manager = KubeSubnetManager {
            nodes: Api::all(client),
            node_name,
            annotations,
            net_config_path: opts.net_config_path,
            set_node_network_unavailable: opts.set_node_network_unavailable,
            node_public_ip: None,
            server,
        };
        let node = manager.own_node().await?;
        manager.node_public_ip = ipv4_annotation(&node, &manager.annotations.node_public_ip)?;
        info!(node = %manager.node_name, server = %manager.server, "connected to the Kubernetes API server");
        Ok(manager)
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The own node's `<prefix>/node-public-ip` annotation, read when connecting.
    pub fn node_public_ip(&self) -> Option<Ipv4Addr> {
        self.node_public_ip
    }

    /// Applies the node's `<prefix>/node-public-ip` annotation to the interface selection,
    /// as flannel does: it acts as `--public-ip` (which wins when given) and, without
    /// interface flags, picks the interface holding that address. The second value says
    /// why the selection changed, for errors.
    pub fn iface_selection(&self, base: IfaceSelection) -> (IfaceSelection, Option<String>) {
        let annotation = &self.annotations.node_public_ip;
        match (self.node_public_ip, base.public_ip) {
            (Some(annotated), Some(flag)) => {
                info!("--public-ip {flag} overrides the node annotation {annotation}={annotated}");
                (base, None)
            }
            (Some(annotated), None) => {
                info!("the node annotation {annotation}={annotated} sets the public IP (as --public-ip would)");
                (
                    with_node_public_ip(base, annotated),
                    Some(format!("the node annotation {annotation}={annotated} chose this address: it must belong to a local interface, or remove the annotation")),
                )
            }
            (None, _) => (base, None),
        }
    }

    async fn own_node(&self) -> Result<Node> {
        let name = &self.node_name;
        call(&self.server, "get", "nodes", || self.nodes.get_opt(name))
            .await
            .with_context(|| format!("reading this node ({name})"))?
            .with_context(|| format!("node \"{name}\" does not exist: NODE_NAME must be this node's Kubernetes name (kubectl get nodes)"))
    }

    async fn patch_own_status(&self, what: &str, patch: &Value) -> Result<Node> {
        let params = PatchParams {
            field_manager: Some("weft".into()),
            ..Default::default()
        };
        let patch = Patch::Strategic(patch);
        let name = &self.node_name;
        call(&self.server, "patch", "nodes/status", || {
            self.nodes.patch_status(name, &params, &patch)
        })
        .await
        .with_context(|| format!("{what} on node {name}"))
    }

    /// Publishes `attrs` on the node unless it already carries them; true if it patched.
    async fn publish(&self, node: &Node, attrs: &LeaseAttrs) -> Result<bool> {
        let Some(patch) = annotation_patch(node, &self.annotations, attrs)? else {
            return Ok(false);
        };
        self.patch_own_status("publishing the lease annotations", &patch)
            .await?;
        info!(public_ip = %attrs.public_ip, backend = %attrs.backend_type, "published the lease annotations");
        Ok(true)
    }

    /// Sets NetworkUnavailable=False (when enabled and not set yet).
    async fn mark_network_available(&self, node: &Node) -> Result<()> {
        if !self.set_node_network_unavailable || network_marked_available(node) {
            return Ok(());
        }
        let patch = network_available_patch(k8s_openapi::jiff::Timestamp::now());
        self.patch_own_status("setting the NetworkUnavailable condition", &patch)
            .await?;
        info!("set the node condition NetworkUnavailable=False");
        Ok(())
    }

    /// What to do when the watch shows this node: keep its annotations and condition in
    /// place (a re-created Node lost them); a new podCIDR means the lease is gone.
    async fn check_own_node(&self, node: &Node, own: &Lease) -> OwnNode {
        if let Ok(Some(subnet)) = pod_subnet(node) {
            if subnet != own.subnet {
                error!(podcidr = %subnet, "this node's podCIDR is no longer the lease's subnet (was the Node re-created?)");
                return OwnNode::Revoked;
            }
        }
        if let Err(e) = self.publish(node, &own.attrs).await {
            error!("re-publishing the lease annotations failed (retried at the node's next change): {e:#}");
        }
        if let Err(e) = self.mark_network_available(node).await {
            error!("setting NetworkUnavailable=False failed (retried at the node's next change): {e:#}");
        }
        OwnNode::Fine
    }

    /// Follows all Nodes until the receiver goes away or the own lease is revoked.
    async fn watch_nodes(&self, own: &Lease, tx: &mpsc::Sender<LeaseWatchEvent>) -> Result<()> {
        let mut table = PeerTable::new(&self.node_name, own.subnet, self.annotations.clone());
        let stream = watcher(self.nodes.clone(), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = tx.closed() => return Ok(()),
            };
            let event = match item {
                Some(Ok(event)) => event,
                Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                    info!("the node watch's history expired (410); listing the nodes again");
                    continue;
                }
                Some(Err(e)) => {
                    warn!(
                        "node watch failed, retrying with backoff (the dataplane keeps its current state): {}",
                        explain_watch_error(&self.server, &e)
                    );
                    continue;
                }
                None => bail!("the node watch ended"),
            };
            let own_node = match &event {
                watcher::Event::Apply(n) | watcher::Event::InitApply(n) => Some(n),
                watcher::Event::Delete(n) if node::node_name(n) == self.node_name => {
                    warn!("this node's Node object was deleted; its annotations are published again when it is re-created");
                    None
                }
                _ => None,
            }
            .filter(|n| node::node_name(n) == self.node_name);
            if let Some(node) = own_node {
                if let OwnNode::Revoked = self.check_own_node(node, own).await {
                    let _ = tx.send(LeaseWatchEvent::OwnLeaseRevoked).await;
                    return Ok(());
                }
            }
            for out in table.on_event(event) {
                if tx.send(out).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

enum OwnNode {
    Fine,
    Revoked,
}

/// `--public-ip` semantics for an annotated address: published, and without interface
/// flags the interface holding it is the one used.
fn with_node_public_ip(mut selection: IfaceSelection, ip: Ipv4Addr) -> IfaceSelection {
    selection.public_ip = Some(ip);
    if selection.iface.is_empty()
        && selection.iface_regex.is_empty()
        && selection.iface_can_reach.is_none()
    {
        selection.iface = vec![ip.to_string()];
    }
    selection
}

/// The client configuration, as flannel's BuildConfigFromFlags: the kubeconfig file if
/// given, else KUBECONFIG/~/.kube/config, else in-cluster; --kube-api-url overrides the
/// server (and suffices alone).
async fn client_config(opts: &KubeOptions) -> Result<Config> {
    let from_url = opts
        .api_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            // Like client-go, a bare host:port means https.
            let full = if u.contains("://") {
                u.to_string()
            } else {
                format!("https://{u}")
            };
            let uri = full.parse().with_context(|| {
                format!("--kube-api-url {u:?} is not a URL: write it like https://10.96.0.1:443")
            })?;
            Ok::<_, anyhow::Error>(Config::new(uri))
        })
        .transpose()?;
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig-file {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig-file {}", path.display()))?
        }
        None => match (Config::infer().await, &from_url) {
            (Ok(config), _) => config,
            (Err(_), Some(url_only)) => url_only.clone(),
            (Err(e), None) => bail!("no Kubernetes client configuration: weft is not running in a pod (no in-cluster service account) and finds no kubeconfig (KUBECONFIG, ~/.kube/config): give --kubeconfig-file or --kube-api-url ({e})"),
        },
    };
    if let Some(url) = from_url {
        config.cluster_url = url.cluster_url;
    }
    Ok(config)
}

/// One API request, retried with backoff (forever, logging each failure) while the API
/// server cannot be reached or is overloaded; other errors say what to fix.
async fn call<T, F, Fut>(server: &str, verb: &str, resource: &str, mut request: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = RETRY_MIN;
    loop {
        let failure = match tokio::time::timeout(REQUEST_TIMEOUT, request()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if !is_transient(&e) => return Err(explain(server, verb, resource, &e)),
            Ok(Err(e)) => explain(server, verb, resource, &e).to_string(),
            Err(_) => format!("{verb} {resource}: no answer from the API server at {server} within {REQUEST_TIMEOUT:?}"),
        };
        warn!(retry_in = ?backoff, "{failure}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// Whether retrying may help: the server is unreachable, overloaded or failing.
fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// A user-facing error for a failed request: what was refused and how to fix it.
fn explain(server: &str, verb: &str, resource: &str, e: &kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(status) if status.code == 403 => anyhow!(
            "the service account may not {verb} {resource} (RBAC): add it to the ClusterRole (see {RBAC_MANIFEST}): {}",
            status.message
        ),
        kube::Error::Api(status) if status.code == 401 => anyhow!(
            "{verb} {resource}: the API server at {server} rejected weft's credentials (401 Unauthorized): check the service account token or the kubeconfig (--kubeconfig-file)"
        ),
        kube::Error::Api(status) => anyhow!(
            "{verb} {resource}: the API server answered {} {}: {}",
            status.code,
            status.reason,
            status.message
        ),
        kube::Error::HyperError(_) | kube::Error::Service(_) => anyhow!(
            "{verb} {resource}: cannot reach the Kubernetes API server at {server} (--kube-api-url, --kubeconfig-file or the in-cluster config): {}",
            causes(e)
        ),
        _ => anyhow!("{verb} {resource}: {e}"),
    }
}

/// An error and its sources ("client error (Connect): Connection refused").
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text = format!("{text}: {line}");
        }
        source = cause.source();
    }
    text
}

fn explain_watch_error(server: &str, e: &watcher::Error) -> String {
    let explained = |verb: &str, e: &kube::Error| explain(server, verb, "nodes", e).to_string();
    match e {
        watcher::Error::InitialListFailed(e) => explained("list", e),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            explained("watch", e)
        }
        watcher::Error::WatchError(status) => explained("watch", &kube::Error::Api(status.clone())),
        other => other.to_string(),
    }
}

#[async_trait]
impl SubnetManager for KubeSubnetManager {
    async fn network_config(&self) -> Result<NetConf> {
        let path = &self.net_config_path;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "the network configuration {} (--net-config-path) does not exist: it comes from the kube-flannel-cfg ConfigMap (key net-conf.json); check that the DaemonSet mounts it there",
                path.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading {} (--net-config-path)", path.display())
                })
            }
        };
        let mut conf = NetConf::parse(&text)
            .with_context(|| format!("{} (--net-config-path)", path.display()))?;
        if conf.subnet_range_set {
            // As flannel: the kube-controller-manager allocates podCIDRs, not SubnetMin/Max.
            conf.subnet_range_set = false;
            conf.warnings.push(format!(
                "{}: SubnetMin and SubnetMax are ignored with --kube-subnet-mgr (the \
                 kube-controller-manager allocates podCIDRs from its --cluster-cidr): remove them",
                path.display()
            ));
        }
        Ok(conf)
    }

    async fn previous_lease(&self, public_ip: Ipv4Addr) -> Result<Option<Lease>> {
        let node = self.own_node().await?;
        Ok(stored_lease(&node, &self.annotations, public_ip))
    }

    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> Result<Lease> {
        let conf = self.network_config().await?;
        let node = self.own_node().await?;
        let subnet = own_subnet(&node, &conf)?;
        let span = info_span!("lease", node = %self.node_name, subnet = %subnet);
        let patched = self.publish(&node, attrs).instrument(span.clone()).await?;
        span.in_scope(|| {
            info!(
                annotations_updated = patched,
                "lease acquired (the node's podCIDR)"
            )
        });
        Ok(Lease {
            subnet,
            attrs: attrs.clone(),
        })
    }

    async fn watch_leases(&self, own: Lease, tx: mpsc::Sender<LeaseWatchEvent>) -> Result<()> {
        let span = info_span!("lease", node = %self.node_name, subnet = %own.subnet);
        self.watch_nodes(&own, &tx).instrument(span).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn node_name_from_env_or_pod() {
        assert_eq!(
            node_name_source(env(&[("NODE_NAME", "w1"), ("POD_NAME", "p")])).unwrap(),
            NodeNameSource::NodeName("w1".into())
        );
        assert_eq!(
            node_name_source(env(&[
                ("NODE_NAME", ""),
                ("POD_NAME", "p"),
                ("POD_NAMESPACE", "kube-flannel")
            ]))
            .unwrap(),
            NodeNameSource::Pod {
                namespace: "kube-flannel".into(),
                name: "p".into()
            }
        );
        let e = node_name_source(env(&[("POD_NAME", "p")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("NODE_NAME") && e.contains("POD_NAMESPACE"),
            "{e}"
        );
    }

    #[test]
    fn node_public_ip_acts_as_public_ip() {
        let ip = Ipv4Addr::new(198, 18, 0, 21);
        let chosen = with_node_public_ip(IfaceSelection::default(), ip);
        assert_eq!(chosen.public_ip, Some(ip));
        assert_eq!(chosen.iface, vec!["198.18.0.21".to_string()]);
        // With interface flags, only the published address changes.
        let base = IfaceSelection {
            iface: vec!["eth1".into()],
            ..Default::default()
        };
        let chosen = with_node_public_ip(base, ip);
        assert_eq!(chosen.iface, vec!["eth1".to_string()]);
        assert_eq!(chosen.public_ip, Some(ip));
    }

    #[test]
    fn errors_say_what_to_fix() {
        let status = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("nodes is forbidden", "Forbidden")
                    .with_code(code)
                    .boxed(),
            )
        };
        let e = explain("https://k", "patch", "nodes/status", &status(403)).to_string();
        assert!(
            e.starts_with("the service account may not patch nodes/status (RBAC): add it to the ClusterRole (see deploy/weft.yml)"),
            "{e}"
        );
        assert!(!is_transient(&status(403)));
        assert!(!is_transient(&status(404)));
        assert!(is_transient(&status(503)));
        assert!(is_transient(&status(429)));
        let e = explain("https://k", "get", "nodes", &status(401)).to_string();
        assert!(e.contains("401") && e.contains("--kubeconfig-file"), "{e}");
    }

    #[tokio::test]
    async fn missing_net_conf_names_the_path_and_the_configmap() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("net-conf.json");
        let manager = KubeSubnetManager {
            nodes: Api::all(
                Client::try_from(Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap(),
            ),
            node_name: "n1".into(),
            annotations: Annotations::new("flannel.alpha.coreos.com").unwrap(),
            net_config_path: missing.clone(),
            set_node_network_unavailable: true,
            node_public_ip: None,
            server: "http://127.0.0.1:9".into(),
        };
        let e = format!("{:#}", manager.network_config().await.unwrap_err());
        assert!(
            e.contains(&missing.display().to_string()) && e.contains("kube-flannel-cfg"),
            "{e}"
        );
        std::fs::write(
            &missing,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(
            manager.network_config().await.unwrap().network,
            "10.244.0.0/16".parse().unwrap()
        );
        // SubnetMin/Max mean nothing to the kube-controller-manager: ignored, said so.
        std::fs::write(
            &missing,
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.8.0","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        let conf = manager.network_config().await.unwrap();
        assert!(!conf.subnet_range_set);
        assert!(
            conf.warnings
                .iter()
                .any(|w| w.contains("SubnetMin and SubnetMax are ignored")),
            "{:?}",
            conf.warnings
        );
        std::fs::write(&missing, r#"{"Backend":{"Type":"vxlan"}}"#).unwrap();
        let e = format!("{:#}", manager.network_config().await.unwrap_err());
        assert!(
            e.contains("--net-config-path") && e.contains("Network"),
            "{e}"
        );
    }
}
