//! deploy/weft.yml against what weft relies on: every document is a Kubernetes object of a
//! known kind (no misspelt field), the ConfigMap's files parse with weft's own parsers, the
//! containers' command lines parse with weft's CLI, the paths the agent and the CNI plugin
//! use sit on the right host paths, and RBAC grants exactly the API calls the agent makes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use weft::cli::{Cli, Command};
use weft::config::AgentArgs;
use weft::install::{InstallCniArgs, MountBpffsArgs};

const MANIFEST: &str = "deploy/weft.yml";

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Default)]
struct Manifest {
    namespaces: Vec<Namespace>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

/// Deserializes one document as `T` (which checks apiVersion and kind) and requires that
/// serializing it back gives the document: a field k8s-openapi does not know (a typo such
/// as `mountPropagaton`) would otherwise be dropped without a word.
fn typed<T: Serialize + DeserializeOwned>(index: usize, document: &serde_yaml::Value) -> T {
    let original = serde_json::to_value(document).unwrap();
    let object: T = serde_yaml::from_value(document.clone())
        .unwrap_or_else(|e| panic!("{MANIFEST} document {index}: {e}"));
    let round_trip = serde_json::to_value(&object).unwrap();
    assert_eq!(
        round_trip, original,
        "{MANIFEST} document {index}: fields were lost in parsing (unknown or misspelt)"
    );
    object
}

fn load() -> Manifest {
    let text = repo_file(MANIFEST);
    let mut manifest = Manifest::default();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let document = serde_yaml::Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{MANIFEST} document {index}: {e}"));
        if document.is_null() {
            continue; // only comments
        }
        let kind = document["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "Namespace" => manifest.namespaces.push(typed(index, &document)),
            "ClusterRole" => manifest.cluster_roles.push(typed(index, &document)),
            "ClusterRoleBinding" => manifest.cluster_role_bindings.push(typed(index, &document)),
            "Role" => manifest.roles.push(typed(index, &document)),
            "RoleBinding" => manifest.role_bindings.push(typed(index, &document)),
            "ServiceAccount" => manifest.service_accounts.push(typed(index, &document)),
            "ConfigMap" => manifest.config_maps.push(typed(index, &document)),
            "DaemonSet" => manifest.daemon_sets.push(typed(index, &document)),
            other => panic!("{MANIFEST} document {index}: unexpected kind {other:?}"),
        }
    }
    manifest
}

fn namespace_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or_default()
}

fn name_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    metadata.name.as_deref().unwrap_or_default()
}

impl Manifest {
    fn daemon_set(&self) -> &DaemonSet {
        assert_eq!(self.daemon_sets.len(), 1, "one DaemonSet");
        &self.daemon_sets[0]
    }

    fn pod(&self) -> &PodSpec {
        self.daemon_set()
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("the DaemonSet has a pod template")
    }

    fn namespace(&self) -> &str {
        namespace_of(&self.daemon_set().metadata)
    }
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name:?}"))
}

fn init_container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    container(pod.init_containers.as_deref().unwrap_or_default(), name)
}

fn main_container(pod: &PodSpec) -> &Container {
    container(&pod.containers, "weft")
}

/// The container's command line, parsed as the `weft` binary parses it.
fn command_line(c: &Container) -> Command {
    let command = c.command.clone().unwrap_or_default();
    assert_eq!(
        command,
        ["/usr/local/bin/weft"],
        "{}: runs the image's weft",
        c.name
    );
    let argv = command.iter().chain(c.args.iter().flatten());
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.command,
        Err(e) => panic!("{}: its args do not parse: {e}", c.name),
    }
}

fn agent_args(c: &Container) -> AgentArgs {
    match command_line(c) {
        Command::Agent(args) => *args,
        other => panic!("{}: expected `weft agent`, got {other:?}", c.name),
    }
}

fn install_cni_args(c: &Container) -> InstallCniArgs {
    match command_line(c) {
        Command::InstallCni(args) => args,
        other => panic!("{}: expected `weft install-cni`, got {other:?}", c.name),
    }
}

fn mount_bpffs_args(c: &Container) -> MountBpffsArgs {
    match command_line(c) {
        Command::MountBpffs(args) => args,
        other => panic!("{}: expected `weft mount-bpffs`, got {other:?}", c.name),
    }
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("volume {name:?} is mounted but not defined"))
}

/// The mount of `c` that holds `path` (the deepest one) and its volume.
fn mount_holding<'a>(
    pod: &'a PodSpec,
    c: &'a Container,
    path: &Path,
) -> (&'a VolumeMount, &'a Volume) {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| Path::new(&m.mount_path).components().count())
        .unwrap_or_else(|| panic!("{}: {} is on no mounted volume", c.name, path.display()));
    (mount, volume(pod, &mount.name))
}

/// Where `path` (inside container `c`) is on the host; fails unless it is on a hostPath.
fn host_path(pod: &PodSpec, c: &Container, path: &Path) -> PathBuf {
    let (mount, volume) = mount_holding(pod, c, path);
    let host = volume.host_path.as_ref().unwrap_or_else(|| {
        panic!(
            "{}: {} is on volume {:?}, which is not a hostPath",
            c.name,
            path.display(),
            volume.name
        )
    });
    let inside = path.strip_prefix(&mount.mount_path).unwrap();
    Path::new(&host.path).join(inside)
}

/// The ConfigMap file `path` (inside container `c`) comes from.
fn config_map_file<'a>(manifest: &'a Manifest, c: &Container, path: &Path) -> &'a str {
    let pod = manifest.pod();
    let (mount, volume) = mount_holding(pod, c, path);
    let source = volume.config_map.as_ref().unwrap_or_else(|| {
        panic!(
            "{}: {} is on volume {:?}, not a ConfigMap",
            c.name,
            path.display(),
            volume.name
        )
    });
    let config_map = manifest
        .config_maps
        .iter()
        .find(|cm| {
            name_of(&cm.metadata) == source.name
                && namespace_of(&cm.metadata) == manifest.namespace()
        })
        .unwrap_or_else(|| panic!("ConfigMap {:?} is not in {MANIFEST}", source.name));
    let key = path.strip_prefix(&mount.mount_path).unwrap();
    let key = key.to_str().unwrap();
    config_map
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap {:?} has no key {key:?}", source.name))
}

fn conflist_plugin_entry(conflist: &serde_json::Value, index: usize) -> serde_json::Value {
    // As libcni passes an entry on stdin: with the list's name and cniVersion.
    let mut entry = conflist["plugins"][index].clone();
    entry["name"] = conflist["name"].clone();
    entry["cniVersion"] = conflist["cniVersion"].clone();
    entry
}

#[test]
fn objects_live_in_the_weft_namespace() {
    let m = load();
    assert_eq!(m.namespaces.len(), 1);
    let namespace = &m.namespaces[0];
    assert_eq!(name_of(&namespace.metadata), "weft");
    let labels = namespace.metadata.labels.clone().unwrap_or_default();
    // The pods use the host network, host paths and a privileged init container.
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
    let namespaced = m
        .roles
        .iter()
        .map(|o| &o.metadata)
        .chain(m.role_bindings.iter().map(|o| &o.metadata))
        .chain(m.service_accounts.iter().map(|o| &o.metadata))
        .chain(m.config_maps.iter().map(|o| &o.metadata))
        .chain(m.daemon_sets.iter().map(|o| &o.metadata));
    for metadata in namespaced {
        assert_eq!(namespace_of(metadata), "weft", "{metadata:?}");
    }
}

#[test]
fn config_map_files_parse_with_weft() {
    let m = load();
    let pod = m.pod();
    let agent_container = main_container(pod);
    let agent = agent_args(agent_container);

    // net-conf.json, where --net-config-path reads it.
    let net_conf = config_map_file(&m, agent_container, &agent.net_config_path);
    let net_conf = weft::config::NetConf::parse(net_conf).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(net_conf.network.to_string(), "10.244.0.0/16");
    assert_eq!(net_conf.backend.type_name(), "vxlan");
    assert!(net_conf.warnings.is_empty(), "{:?}", net_conf.warnings);

    // cni-conf.json, where install-cni reads it.
    let installer = init_container(pod, "install-cni");
    let install = install_cni_args(installer);
    let conflist_text = config_map_file(&m, installer, &install.conflist);
    weft::install::validate_conflist(
        &install.conflist,
        conflist_text.as_bytes(),
        &install.plugin_name,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let conflist: serde_json::Value = serde_json::from_str(conflist_text).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "flannel");
    assert_eq!(install.plugin_name, "flannel");
    let entry = conflist_plugin_entry(&conflist, 0);
    let cni_conf = weft::cni::NetConf::parse(entry.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("cni-conf.json plugins[0]: {}", e.msg));
    // The plugin runs on the host and reads the subnet.env the agent writes in its pod.
    assert_eq!(
        host_path(pod, agent_container, &agent.subnet_file),
        cni_conf.subnet_file,
        "--subnet-file (through its hostPath) and the conflist's subnetFile must be one file"
    );
}

#[test]
fn daemon_set_runs_on_every_node_with_the_host_network() {
    let m = load();
    let pod = m.pod();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists")
                && t.effect.as_deref() == Some("NoSchedule")
                && t.key.is_none()
        }),
        "tolerates every NoSchedule taint"
    );
    let account = pod.service_account_name.as_deref().unwrap_or_default();
    assert!(
        m.service_accounts
            .iter()
            .any(|sa| name_of(&sa.metadata) == account),
        "serviceAccountName {account:?} is defined"
    );
    let selector = m.daemon_set().spec.as_ref().unwrap().selector.clone();
    let labels = m
        .daemon_set()
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .clone();
    let labels = labels.and_then(|l| l.labels).unwrap_or_default();
    for (key, value) in selector.match_labels.unwrap_or_default() {
        assert_eq!(
            labels.get(&key),
            Some(&value),
            "the selector matches the pods"
        );
    }
    // One image for all: install-cni installs the weft-cni of the agent's own build.
    let images: BTreeSet<_> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .map(|c| c.image.clone().unwrap_or_default())
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
}

#[test]
fn the_agent_gets_its_flags_environment_and_probes() {
    let m = load();
    let pod = m.pod();
    let c = main_container(pod);
    let agent = agent_args(c);
    assert!(agent.kube_subnet_mgr && agent.ip_masq);
    assert_ne!(agent.healthz_port, 0, "the probes need the health server");

    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let from = env
            .get(name)
            .and_then(|v| v.value_from.as_ref())
            .and_then(|s| s.field_ref.as_ref())
            .unwrap_or_else(|| panic!("{name} is not set from the downward API"));
        assert_eq!(from.field_path, field, "{name}");
    }
    // The flags above are all there is: no FLANNELD_* / WEFT_* variable changes them.
    for name in env.keys() {
        assert!(
            !name.starts_with("FLANNELD_") && !name.starts_with("WEFT_"),
            "{name}: put agent settings in args, where this test checks them"
        );
    }

    // Both probes reach the health server.
    let port = |port: &IntOrString| match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("probe port {name:?} is not a container port"))
                .container_port
        }
    };
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(port(&get.port), i32::from(agent.healthz_port), "{path}");
    }
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
    assert!(requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));
}

#[test]
fn the_agent_has_only_the_capabilities_it_uses() {
    let m = load();
    let pod = m.pod();
    let security = main_container(pod)
        .security_context
        .clone()
        .unwrap_or_default();
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.unwrap_or_default();
    let added: BTreeSet<_> = capabilities.add.unwrap_or_default().into_iter().collect();
    let expected: BTreeSet<_> = ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON"]
        .map(String::from)
        .into();
    assert_eq!(added, expected);
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));

    // install-cni writes files as root: it needs no capability at all.
    let installer = init_container(pod, "install-cni")
        .security_context
        .clone()
        .unwrap_or_default();
    assert_ne!(installer.privileged, Some(true));
    let capabilities = installer.capabilities.unwrap_or_default();
    assert_eq!(capabilities.add, None);
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
}

#[test]
fn paths_the_agent_uses_are_host_paths() {
    let m = load();
    let pod = m.pod();
    let c = main_container(pod);
    let agent = agent_args(c);

    // Every mount of every container has its volume.
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for mount in container.volume_mounts.iter().flatten() {
            volume(pod, &mount.name);
        }
    }
    assert_eq!(
        host_path(pod, c, &agent.subnet_file),
        Path::new("/run/flannel/subnet.env")
    );
    let lock = Path::new("/run/xtables.lock");
    assert_eq!(host_path(pod, c, lock), lock, "shared with kube-proxy");
    let (_, lock_volume) = mount_holding(pod, c, lock);
    assert_eq!(
        lock_volume.host_path.as_ref().unwrap().type_.as_deref(),
        Some("FileOrCreate"),
        "a missing lock file must not become a directory"
    );
    // The pins live on the host's bpffs, which the init container mounts.
    assert!(host_path(pod, c, &agent.bpf_dir).starts_with("/sys/fs/bpf"));
    let (bpf_mount, _) = mount_holding(pod, c, &agent.bpf_dir);
    assert_eq!(
        bpf_mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "the agent sees a bpffs mounted on the host after it started"
    );
    let mounter = init_container(pod, "mount-bpffs");
    let mount_args = mount_bpffs_args(mounter);
    assert_eq!(mount_args.bpf_dir, agent.bpf_dir);
    assert_eq!(
        mounter.security_context.as_ref().and_then(|s| s.privileged),
        Some(true),
        "only a privileged container may propagate a mount to the host"
    );
    let (mounter_mount, _) = mount_holding(pod, mounter, &mount_args.bpf_dir);
    assert_eq!(
        mounter_mount.mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_eq!(mounter_mount.mount_path, "/sys/fs/bpf");
    assert_eq!(
        host_path(pod, mounter, &mount_args.bpf_dir),
        host_path(pod, c, &agent.bpf_dir)
    );
    // net-conf.json comes from the ConfigMap (checked in config_map_files_parse_with_weft).
    config_map_file(&m, c, &agent.net_config_path);
}

#[test]
fn install_cni_writes_where_the_container_runtime_looks() {
    let m = load();
    let pod = m.pod();
    let c = init_container(pod, "install-cni");
    let install = install_cni_args(c);
    assert_eq!(
        host_path(pod, c, &install.plugin_dir),
        Path::new("/opt/cni/bin")
    );
    assert_eq!(
        host_path(pod, c, &install.conf_dir),
        Path::new("/etc/cni/net.d")
    );
    assert_eq!(install.conf_name, "10-flannel.conflist");
    assert_eq!(
        install.plugin_src, None,
        "the image's weft-cni, next to weft"
    );
    config_map_file(&m, c, &install.conflist);

    // The image puts weft-cni next to weft, where install-cni looks for it.
    let dockerfile = repo_file("Dockerfile");
    let copies = |binary: &str| {
        dockerfile.lines().any(|line| {
            line.starts_with("COPY --from=build")
                && line.contains(&format!("/{binary} "))
                && line.ends_with(" /usr/local/bin/")
        })
    };
    assert!(
        copies("weft")
            && copies("weft-cni")
            && dockerfile.contains("target/static/x86_64-unknown-linux-gnu/release/weft-cni "),
        "the Dockerfile copies weft and the static weft-cni into /usr/local/bin/"
    );
}

/// (verb, resource) pairs granted by `rules`; wildcards and other API groups are refused.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert_eq!(
            rule.api_groups,
            Some(vec![String::new()]),
            "{rule:?}: core group only"
        );
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                assert!(verb != "*" && resource != "*", "{rule:?}: no wildcards");
                granted.insert((verb.clone(), resource.clone()));
            }
        }
    }
    granted
}

fn binds_account(
    role_ref: &RoleRef,
    subjects: &Option<Vec<Subject>>,
    kind: &str,
    role: &str,
    namespace: &str,
    account: &str,
) -> bool {
    role_ref.kind == kind
        && role_ref.name == role
        && subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(namespace)
        })
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_agent_makes() {
    let m = load();
    let namespace = m.namespace();
    let account = m.pod().service_account_name.clone().unwrap_or_default();

    let mut cluster_wide = BTreeSet::new();
    for role in &m.cluster_roles {
        let name = name_of(&role.metadata);
        assert!(
            m.cluster_role_bindings.iter().any(|b| binds_account(
                &b.role_ref,
                &b.subjects,
                "ClusterRole",
                name,
                namespace,
                &account
            )),
            "ClusterRole {name} is bound to the ServiceAccount {namespace}/{account}"
        );
        cluster_wide.extend(grants(role.rules.as_deref().unwrap_or_default()));
    }
    let mut in_namespace = BTreeSet::new();
    for role in &m.roles {
        let name = name_of(&role.metadata);
        assert!(
            m.role_bindings
                .iter()
                .any(|b| namespace_of(&b.metadata) == namespace
                    && binds_account(&b.role_ref, &b.subjects, "Role", name, namespace, &account)),
            "Role {name} is bound to the ServiceAccount {namespace}/{account}"
        );
        in_namespace.extend(grants(role.rules.as_deref().unwrap_or_default()));
    }

    let needed: BTreeSet<(String, String)> = weft::subnet::kube::API_CALLS
        .iter()
        .map(|(verb, resource)| (verb.to_string(), resource.to_string()))
        .collect();
    for (verb, resource) in &needed {
        let call = (verb.clone(), resource.clone());
        // Nodes are cluster-scoped; the agent reads only its own pod, in its namespace.
        let granted = if resource.starts_with("nodes") {
            cluster_wide.contains(&call)
        } else {
            cluster_wide.contains(&call) || in_namespace.contains(&call)
        };
        assert!(granted, "RBAC does not grant {verb} {resource}");
    }
    let all: BTreeSet<_> = cluster_wide.union(&in_namespace).cloned().collect();
    let extra: Vec<_> = all.difference(&needed).collect();
    assert!(
        extra.is_empty(),
        "RBAC grants more than the agent uses: {extra:?}"
    );
    assert!(
        cluster_wide.iter().all(|(_, r)| r.starts_with("nodes")),
        "only cluster-scoped resources in the ClusterRole: {cluster_wide:?}"
    );
}
