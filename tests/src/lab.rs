//! The lab: a fabric namespace (the underlay switch, etcd or the Kubernetes API server, an
//! external host), node namespaces each running a `weft agent`, and pod namespaces attached
//! by the CNI plugin. Each agent runs the dataplane the config chooses for its node
//! (`--dataplane=kernel|bpf`) and pins its maps on a bpffs the lab mounts for all nodes, so
//! pins outlive restarts. The agents keep their leases in etcd (`SubnetManager::Etcd`) or,
//! as flannel in a cluster, in Node annotations (`SubnetManager::Kube`, see `kube_lab`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::apiserver::{ControlClient, Rule, User};
use crate::bpf::{self as bpf_maps, BpfCounters, Bpffs, TcFilter};
use crate::etcd::{Etcd, EtcdTlsFiles};
use crate::exec::{ip, run, run_in, wait_until, Cmd};
use crate::icmp;
use crate::kube_lab::{self, ApiServer};
use crate::kube_proxy::{self, Protocol, ProxyMode, Service};
use crate::netns::{self, HOST_LOCAL_STATE, TEMP_DIR_PREFIX};
use crate::pki::EtcdPki;
use crate::process::{tail, Capture, NetnsProcess};
use weft_common::EndpointEntry;

/// etcd prefix of the network config and leases (flannel's default).
pub const ETCD_PREFIX: &str = "/coreos.com/network";
/// The fabric bridge: default gateway of every node, where etcd listens.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// A host outside the cluster, held by the fabric namespace.
pub const EXTERNAL_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The bridge that joins the nodes, in the fabric namespace.
pub const FABRIC_BRIDGE: &str = "br0";
/// Standard plugins the flannel CNI plugin delegates to.
const STANDARD_CNI_PLUGINS: [&str; 5] =
    ["bridge", "host-local", "loopback", "portmap", "bandwidth"];
const STANDARD_CNI_DIR: &str = "/usr/lib/cni";
/// flanneld's etcd lease TTL (24 h).
const LEASE_TTL_SECONDS: &str = "86400";
/// In kube mode, the API server knows users for this many nodes beyond `LabConfig.nodes`
/// (its users are fixed when it starts), so that `add_node` works.
pub const KUBE_SPARE_NODES: usize = 4;
/// Prefix length of the podCIDRs the lab assigns in kube mode (node i: i-th /24).
const KUBE_POD_CIDR_LEN: u8 = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan,
    HostGw,
}

impl Backend {
    /// The `Type` of net-conf.json's `Backend`.
    pub fn type_name(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }

    /// MTU of a pod's eth0 on a 1500-byte underlay (VXLAN takes 50 bytes).
    pub fn pod_mtu(self) -> u32 {
        match self {
            Backend::Vxlan => 1450,
            Backend::HostGw => 1500,
        }
    }
}

/// The dataplane a node's agent runs (`--dataplane`). Tests of the fast path pass `bpf`, not
/// `auto`: a silent fallback to the kernel path must fail a BPF test, not pass it. `Auto`
/// is for the tests of auto's own decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    /// `--dataplane=kernel`: flannel's kernel path only.
    Kernel,
    /// `--dataplane=bpf`: the eBPF fast path (the agent fails if it cannot load it).
    Bpf,
    /// `--dataplane=auto`: BPF where the kernel takes it, with the fast path off where
    /// netfilter rules filter forwarded traffic.
    Auto,
}

impl Dataplane {
    /// The value of `--dataplane`.
    pub fn flag_value(self) -> &'static str {
        match self {
            Dataplane::Kernel => "kernel",
            Dataplane::Bpf => "bpf",
            Dataplane::Auto => "auto",
        }
    }
}

/// Where the agents keep their leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubnetManager {
    /// etcd in the fabric namespace (`--etcd-endpoints`), leases chosen by the agents.
    #[default]
    Etcd,
    /// The Kubernetes API server emulator in the fabric namespace (`--kube-subnet-mgr`):
    /// each node's lease is its Node's podCIDR, published as flannel's annotations.
    Kube,
}

/// Kube mode's exceptions, by node index (from 1; also for nodes added later).
#[derive(Debug, Clone, Default)]
pub struct KubeLabConfig {
    /// RBAC rules of a node's user instead of deploy/weft.yml's.
    pub node_rules: BTreeMap<usize, Vec<Rule>>,
    /// Nodes whose Node object gets no podCIDR (the controller-manager allocated none).
    pub without_pod_cidr: BTreeSet<usize>,
}

#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Nodes created at start (numbered from 1; node i has 198.18.0.(10+i)).
    pub nodes: usize,
    pub backend: Backend,
    /// Pass `--ip-masq` to the agents.
    pub ip_masq: bool,
    /// `Network` of net-conf.json.
    pub network: String,
    /// Start an agent on every node and wait until each is ready.
    pub start_agents: bool,
    /// More flags for every `weft agent` (not `--dataplane` or `--bpf-dir`: the lab sets them).
    pub extra_agent_args: Vec<String>,
    /// Environment variables added to every agent's (e.g. systemd's NOTIFY_SOCKET).
    pub extra_agent_env: Vec<(String, String)>,
    /// More flags for one node's agent: node index (from 1) → flags.
    pub node_agent_args: BTreeMap<usize, Vec<String>>,
    /// The dataplane of every node without an entry in `node_dataplanes`.
    pub dataplane: Dataplane,
    /// Per-node exceptions to `dataplane`: node index (from 1) → dataplane. Also applies
    /// to nodes added later with [`Lab::add_node`].
    pub node_dataplanes: BTreeMap<usize, Dataplane>,
    /// `"DirectRouting": true` in the vxlan backend config (ignored for host-gw).
    pub direct_routing: bool,
    /// etcd (default) or the Kubernetes API.
    pub subnet_manager: SubnetManager,
    /// Per-node exceptions in kube mode.
    pub kube: KubeLabConfig,
    /// etcd serves https only and requires client certificates (the lab's CA signs them);
    /// the agents get `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile`.
    pub etcd_tls: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 3,
            backend: Backend::Vxlan,
            ip_masq: false,
            network: "10.244.0.0/16".to_string(),
            start_agents: true,
            extra_agent_args: Vec::new(),
            extra_agent_env: Vec::new(),
            node_agent_args: BTreeMap::new(),
            dataplane: Dataplane::Kernel,
            node_dataplanes: BTreeMap::new(),
            direct_routing: false,
            subnet_manager: SubnetManager::Etcd,
            kube: KubeLabConfig::default(),
            etcd_tls: false,
        }
    }
}

impl LabConfig {
    /// The network config as stored at `<prefix>/config` (kube mode: net-conf.json).
    pub fn net_conf(&self) -> String {
        let mut backend = json!({"Type": self.backend.type_name()});
        if self.direct_routing && self.backend == Backend::Vxlan {
            backend["DirectRouting"] = json!(true);
        }
        json!({"Network": self.network, "Backend": backend}).to_string()
    }

    /// The dataplane node `index` starts with.
    pub fn dataplane_of(&self, index: usize) -> Dataplane {
        self.node_dataplanes
            .get(&index)
            .copied()
            .unwrap_or(self.dataplane)
    }
}

/// A node: a namespace whose eth0 is plugged into the fabric bridge.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    /// Its Kubernetes name (`n<index>`; kube mode: its Node object and NODE_NAME).
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Per-node files: subnet.env, agent log, CNI data.
    pub dir: PathBuf,
    pub subnet_file: PathBuf,
    /// Name of the node's underlay port in the fabric namespace.
    pub fabric_port: String,
    /// CNI network name (host-local keeps its state under this name).
    pub cni_network: String,
    /// The dataplane its agent is started with (see [`Lab::set_dataplane`]).
    pub dataplane: Dataplane,
    /// Its `--bpf-dir`: a directory on the lab's bpffs, which outlives agent restarts.
    pub bpf_dir: PathBuf,
    /// Kube mode: its `--net-config-path` (net-conf.json, as mounted from the ConfigMap).
    pub net_conf_file: PathBuf,
    agent: Option<NetnsProcess>,
    agent_log: PathBuf,
    pod_count: usize,
}

impl Node {
    /// Where weft-cni writes this node's pod records and its agent reads them.
    pub fn cni_records_dir(&self) -> PathBuf {
        self.dir.join("cni-records")
    }
}

/// A pod: a namespace with eth0 attached to its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Short name, e.g. `n2p1` (second node, first pod).
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub node: usize,
}

/// A subnet lease as stored in etcd by flanneld or weft; in kube mode, as a Node's
/// annotations publish it (see [`kube_lab::lease_of_node`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The etcd key; in kube mode the Node's name.
    pub key: String,
    /// Network address of the subnet (e.g. 10.244.3.0).
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub public_ip: Ipv4Addr,
    pub backend_type: String,
    pub vtep_mac: Option<String>,
    pub value: Value,
}

impl Lease {
    /// e.g. `10.244.3.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix_len)
    }
}

/// Identity of a file version: a rewrite (new inode or new mtime) changes it.
pub type FileStamp = (u64, i64, i64);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

/// Where the weft binaries are: `$WEFT_BIN_DIR`, else the cargo profile directory this
/// program was built into (so `cargo test` and `cargo run` find their siblings).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    match exe_dir {
        Some(dir) if dir.ends_with("deps") => dir.parent().map(Path::to_path_buf).unwrap_or(dir),
        Some(dir) => dir,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

pub struct Lab {
    prefix: String,
    config: LabConfig,
    bin_dir: PathBuf,
    cni_bin_dir: PathBuf,
    fabric: String,
    etcd: Option<Etcd>,
    /// The certificates of a TLS etcd (`config.etcd_tls`).
    etcd_pki: Option<EtcdPki>,
    /// Kube mode: the API server emulator in the fabric namespace.
    api: Option<ApiServer>,
    /// Kube mode: the bearer token of each node's user, by node index.
    kube_users: BTreeMap<usize, User>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Every namespace this lab created, in creation order.
    namespaces: Vec<String>,
    /// The bpffs holding every node's `--bpf-dir`. Agents run under `ip netns exec`, in
    /// private mount namespaces: one they mounted themselves would vanish with them, and
    /// the pins with it. This one is the lab's, mounted before any agent starts.
    bpffs: Option<Bpffs>,
    // Last field: removed after the teardown in Drop, which reads logs from it.
    dir: TempDir,
}

impl Lab {
    /// Builds the fabric and etcd (kube mode: the API server), stores the network config,
    /// creates `config.nodes` nodes (kube mode: and their Node objects) and (if
    /// `config.start_agents`) starts an agent on each and waits until all are ready.
    /// Everything is removed when the Lab is dropped, also on error or panic.
    /// Use a Lab from the thread that started it: its processes die with that thread.
    pub fn start(config: LabConfig) -> Result<Lab> {
        let prefix = netns::unique_prefix();
        let temp_base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        netns::sweep_leftovers(&prefix, &temp_base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TEMP_DIR_PREFIX}{prefix}"))
            .tempdir_in(&temp_base)
            .context("cannot create the lab's temporary directory")?;
        let bin_dir = bin_dir();
        let cni_bin_dir = dir.path().join("cni-bin");
        let mut lab = Lab {
            fabric: format!("{prefix}fab"),
            prefix,
            config,
            bin_dir,
            cni_bin_dir,
            etcd: None,
            etcd_pki: None,
            api: None,
            kube_users: BTreeMap::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            bpffs: None,
            dir,
        };
        lab.bpffs = Some(Bpffs::mount(&lab.dir.path().join("bpffs"))?);
        if lab.config.start_agents {
            lab.binary("weft")?;
        }
        lab.create_fabric()?;
        match lab.config.subnet_manager {
            SubnetManager::Etcd => {
                let etcd_dir = lab.dir.path().join("etcd");
                let etcd_log = lab.dir.path().join("etcd.log");
                if lab.config.etcd_tls {
                    let pki_dir = lab.dir.path().join("pki");
                    lab.etcd_pki = Some(EtcdPki::new(&pki_dir, &FABRIC_IP.to_string())?);
                }
                let tls = lab.etcd_pki.as_ref().map(EtcdTlsFiles::from);
                lab.etcd = Some(Etcd::start(&lab.fabric, &etcd_dir, &etcd_log, tls)?);
                let net_conf = lab.config.net_conf();
                lab.etcdctl(&["put", &format!("{ETCD_PREFIX}/config"), &net_conf])?;
            }
            SubnetManager::Kube => lab.start_api_server()?,
        }
        lab.install_cni_plugins()?;
        for _ in 0..lab.config.nodes {
            lab.add_node()?;
        }
        if lab.config.start_agents {
            let spawned: Vec<(usize, Option<FileStamp>)> = (1..=lab.nodes.len())
                .map(|i| Ok((i, lab.spawn_agent(i)?.1)))
                .collect::<Result<_>>()?;
            for (i, before) in spawned {
                lab.wait_agent_ready(i, before)?;
            }
        }
        Ok(lab)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    pub fn fabric_ns(&self) -> &str {
        &self.fabric
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of a weft binary, with the fix in the error if it is missing.
    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{name} binary not found at {}: build it with `cargo build -p weft --bins` \
                 or point WEFT_BIN_DIR at the directory that holds it",
                path.display()
            );
        }
        Ok(path)
    }

    /// Creates namespace `<prefix><suffix>` with its loopback up; it is deleted with the lab.
    pub fn create_ns(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}{suffix}", self.prefix);
        if self.namespaces.contains(&name) {
            bail!("namespace {name} already exists in this lab");
        }
        // Recorded before creation, so a half-made namespace is deleted too.
        self.namespaces.push(name.clone());
        netns::add(&name)?;
        ip(&name, "link set lo up")?;
        Ok(name)
    }

    fn create_fabric(&mut self) -> Result<()> {
        let fab = self.create_ns("fab")?;
        ip(&fab, &format!("addr add {EXTERNAL_HOST}/32 dev lo"))?;
        ip(&fab, &format!("link add {FABRIC_BRIDGE} type bridge"))?;
        ip(
            &fab,
            &format!("addr add {FABRIC_IP}/24 dev {FABRIC_BRIDGE}"),
        )?;
        ip(&fab, &format!("link set {FABRIC_BRIDGE} up"))?;
        Ok(())
    }

    /// Kube mode: users for nodes 1..=nodes + KUBE_SPARE_NODES (each its own token, the
    /// rules of deploy/weft.yml unless `config.kube.node_rules` says otherwise), then
    /// `weft-apiserver` in the fabric namespace on 198.18.0.254:6443.
    fn start_api_server(&mut self) -> Result<()> {
        let binary = self.binary("weft-apiserver")?;
        let weft_rules = kube_lab::weft_rbac_rules()?;
        for index in 1..=self.config.nodes + KUBE_SPARE_NODES {
            let rules = self
                .config
                .kube
                .node_rules
                .get(&index)
                .cloned()
                .unwrap_or_else(|| weft_rules.clone());
            let user = User::new(
                &kube_lab::agent_user(&node_name(index)),
                &kube_lab::random_token(),
                rules,
            );
            self.kube_users.insert(index, user);
        }
        let users: Vec<User> = self.kube_users.values().cloned().collect();
        let listen = kube_lab::API_LISTEN
            .parse()
            .context("the lab's API address")?;
        self.api = Some(ApiServer::start(
            &binary,
            &self.fabric,
            listen,
            &self.dir.path().join("apiserver"),
            &users,
            &self.dir.path().join("apiserver.log"),
        )?);
        Ok(())
    }

    /// A per-lab CNI bin dir: weft-cni installed as `flannel` next to the standard plugins.
    fn install_cni_plugins(&self) -> Result<()> {
        std::fs::create_dir_all(&self.cni_bin_dir)?;
        for plugin in STANDARD_CNI_PLUGINS {
            std::os::unix::fs::symlink(
                Path::new(STANDARD_CNI_DIR).join(plugin),
                self.cni_bin_dir.join(plugin),
            )?;
        }
        std::os::unix::fs::symlink(
            self.bin_dir.join("weft-cni"),
            self.cni_bin_dir.join("flannel"),
        )?;
        Ok(())
    }

    /// Adds a node (namespace, underlay port, forwarding on) without starting its agent;
    /// in kube mode also its net-conf.json and its Node object. Returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let index = self.nodes.len() + 1;
        if index > 200 {
            bail!("a lab holds at most 200 nodes");
        }
        if self.api.is_some() && !self.kube_users.contains_key(&index) {
            bail!(
                "the lab's API server has users for nodes 1..={} only (LabConfig.nodes + \
                 KUBE_SPARE_NODES): start the lab with more nodes",
                self.kube_users.len()
            );
        }
        let ns = self.create_ns(&format!("n{index}"))?;
        let node_ip = Ipv4Addr::new(198, 18, 0, 10 + index as u8);
        let fabric_port = format!("n{index}");
        let fab = &self.fabric;
        ip(
            &ns,
            &format!("link add eth0 type veth peer name {fabric_port} netns {fab}"),
        )?;
        ip(
            fab,
            &format!("link set {fabric_port} master {FABRIC_BRIDGE} up"),
        )?;
        ip(&ns, &format!("addr add {node_ip}/24 dev eth0"))?;
        ip(&ns, "link set eth0 up")?;
        ip(&ns, &format!("route add default via {FABRIC_IP}"))?;
        run_in(&ns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        let dir = self.dir.path().join(format!("n{index}"));
        std::fs::create_dir_all(&dir)?;
        let bpffs = self
            .bpffs
            .as_ref()
            .context("the lab's bpffs is not mounted")?;
        let bpf_dir = bpffs.path().join(format!("n{index}"));
        let name = node_name(index);
        let net_conf_file = dir.join("net-conf.json");
        if let Some(api) = &self.api {
            std::fs::write(&net_conf_file, self.config.net_conf())
                .with_context(|| format!("cannot write {}", net_conf_file.display()))?;
            let pod_cidr = (!self.config.kube.without_pod_cidr.contains(&index))
                .then(|| self.assigned_pod_cidr(index))
                .transpose()?;
            let object = kube_lab::node_object(&name, node_ip, pod_cidr.as_deref())?;
            api.control()
                .create_node(&object)
                .with_context(|| format!("creating the Node object {name}"))?;
        }
        self.nodes.push(Node {
            dataplane: self.config.dataplane_of(index),
            bpf_dir,
            net_conf_file,
            name,
            index,
            subnet_file: dir.join("subnet.env"),
            agent_log: dir.join("agent.log"),
            dir,
            ns,
            ip: node_ip,
            fabric_port,
            cni_network: format!("{}n{index}", self.prefix),
            agent: None,
            pod_count: 0,
        });
        Ok(index)
    }

    pub fn node(&self, index: usize) -> &Node {
        self.nodes
            .get(index.wrapping_sub(1))
            .unwrap_or_else(|| panic!("no node {index} in this lab (nodes count from 1)"))
    }

    fn node_mut(&mut self, index: usize) -> &mut Node {
        self.nodes
            .get_mut(index.wrapping_sub(1))
            .unwrap_or_else(|| panic!("no node {index} in this lab (nodes count from 1)"))
    }

    pub fn node_ns(&self, index: usize) -> &str {
        &self.node(index).ns
    }

    pub fn node_ip(&self, index: usize) -> Ipv4Addr {
        self.node(index).ip
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The command line of node `index`'s agent: weft's flags for the lab (etcd, or in kube
    /// mode `--kube-subnet-mgr` with the node's kubeconfig and net-conf.json; per-node
    /// subnet file, eth0, `--dataplane`, `--bpf-dir`) and the config's extra flags.
    pub fn agent_args(&self, index: usize) -> Result<Vec<String>> {
        let weft = self.binary("weft")?;
        let node = self.node(index);
        let mut args: Vec<String> = vec![weft.to_string_lossy().into_owned(), "agent".into()];
        match &self.api {
            None => {
                args.extend([
                    "--etcd-endpoints".into(),
                    self.etcd_endpoint()?.into(),
                    "--etcd-prefix".into(),
                    ETCD_PREFIX.into(),
                ]);
                if let Some(pki) = &self.etcd_pki {
                    for (flag, path) in [
                        ("--etcd-cafile", &pki.ca.cert),
                        ("--etcd-certfile", &pki.client.cert),
                        ("--etcd-keyfile", &pki.client.key),
                    ] {
                        args.push(flag.into());
                        args.push(path.to_string_lossy().into_owned());
                    }
                }
            }
            Some(api) => args.extend([
                "--kube-subnet-mgr".into(),
                "--kubeconfig-file".into(),
                api.kubeconfig(&self.kube_user(index)?)
                    .to_string_lossy()
                    .into_owned(),
                "--net-config-path".into(),
                node.net_conf_file.to_string_lossy().into_owned(),
            ]),
        }
        args.extend([
            "--subnet-file".into(),
            node.subnet_file.to_string_lossy().into_owned(),
            "--iface".into(),
            "eth0".into(),
            format!("--dataplane={}", node.dataplane.flag_value()),
            "--bpf-dir".into(),
            node.bpf_dir.to_string_lossy().into_owned(),
            "--cni-records-dir".into(),
            node.cni_records_dir().to_string_lossy().into_owned(),
        ]);
        if self.config.ip_masq {
            args.push("--ip-masq".into());
        }
        args.extend(self.config.extra_agent_args.iter().cloned());
        if let Some(extra) = self.config.node_agent_args.get(&index) {
            args.extend(extra.iter().cloned());
        }
        Ok(args)
    }

    /// The environment of node `index`'s agent: its log settings and, in kube mode,
    /// NODE_NAME (as the DaemonSet sets it from spec.nodeName).
    pub fn agent_env(&self, index: usize) -> Vec<(String, String)> {
        let mut env = vec![
            ("RUST_LOG".to_string(), agent_rust_log()),
            // Plain text in the log files.
            ("NO_COLOR".to_string(), "1".to_string()),
        ];
        if self.api.is_some() {
            env.push(("NODE_NAME".to_string(), self.node(index).name.clone()));
        }
        env.extend(self.config.extra_agent_env.iter().cloned());
        env
    }

    /// Restarts the agent of node `index` with its usual flags and `dir` first on its PATH
    /// (fake firewall tools a test made there), and waits until it is ready.
    pub fn restart_agent_with_path_first(&mut self, index: usize, dir: &Path) -> Result<()> {
        self.stop_agent(index);
        let args = self.agent_args(index)?;
        let mut env = self.agent_env(index);
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        env.push(("PATH".to_string(), format!("{}:{path}", dir.display())));
        let (_, before) = self.spawn_agent_command(index, args, env)?;
        self.wait_agent_ready(index, before).map(drop)
    }

    /// Restarts the agent of node `index` with its flags as `edit` leaves them (for a
    /// flag switched between runs, as an operator would), and waits until it is ready.
    pub fn restart_agent_with(
        &mut self,
        index: usize,
        edit: impl FnOnce(&mut Vec<String>),
    ) -> Result<()> {
        self.stop_agent(index);
        let mut args = self.agent_args(index)?;
        edit(&mut args);
        let env = self.agent_env(index);
        let (_, before) = self.spawn_agent_command(index, args, env)?;
        self.wait_agent_ready(index, before).map(drop)
    }

    /// Spawns `weft agent` on node `index` and returns at once: the instant just before
    /// the spawn and the subnet file's stamp before it (for `wait_agent_ready`).
    pub fn spawn_agent(&mut self, index: usize) -> Result<(Instant, Option<FileStamp>)> {
        let args = self.agent_args(index)?;
        let env = self.agent_env(index);
        self.spawn_agent_command(index, args, env)
    }

    /// Spawns `args` as the agent of node `index` (see [`Lab::spawn_agent`]).
    pub fn spawn_agent_command(
        &mut self,
        index: usize,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<(Instant, Option<FileStamp>)> {
        let node = self.node_mut(index);
        if node
            .agent
            .as_mut()
            .is_some_and(|agent| agent.exit_status().is_none())
        {
            bail!("the agent of node {index} is already running");
        }
        let before = file_stamp(&node.subnet_file);
        append_line(
            &node.agent_log,
            &format!("--- lab: starting {}", args.join(" ")),
        );
        let started = Instant::now();
        let agent = NetnsProcess::spawn(
            &format!("weft agent on node {index}"),
            &node.ns,
            &args,
            &env,
            &node.agent_log,
        )?;
        node.agent = Some(agent);
        Ok((started, before))
    }

    /// `argv` wrapped to run on node `index` with flannel's default paths, as on a host
    /// that runs flanneld by hand or from its unit: in a private mount namespace whose
    /// /run is a tmpfs with the node's directory bound at /run/flannel (so
    /// /run/flannel/subnet.env is the node's subnet file) and whose /sys/fs/bpf is a bpffs
    /// of its own; working directory /run/flannel. The machine's /run and bpffs stay untouched.
    pub fn host_paths_command(&self, index: usize, argv: &[String]) -> Vec<String> {
        let (unshare, shell) = ("unshare", "sh");
        let script = "mount -t tmpfs lab-run /run && mkdir /run/flannel \
            && mount --bind \"$0\" /run/flannel && mount -t bpf bpf /sys/fs/bpf \
            && cd /run/flannel && exec \"$@\"";
        let mut args: Vec<String> = vec![
            unshare.into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            shell.into(),
            "-c".into(),
            script.into(),
            self.node(index).dir.to_string_lossy().into_owned(),
        ];
        args.extend(argv.iter().cloned());
        args
    }

    /// A link named `name` to the weft binary in the lab's directory, as packages install
    /// weft under flannel's names (`flanneld`, `mk-docker-opts.sh`).
    pub fn weft_as(&self, name: &str) -> Result<PathBuf> {
        let link = self.dir.path().join("bin-as").join(name);
        if !link.exists() {
            std::fs::create_dir_all(link.parent().unwrap())?;
            std::os::unix::fs::symlink(self.binary("weft")?, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        Ok(link)
    }

    /// Waits (at most 15 s) until the agent of node `index` (re)wrote its subnet file,
    /// i.e. its stamp differs from `before`. Fails at once if the agent exits.
    pub fn wait_agent_ready(
        &mut self,
        index: usize,
        before: Option<FileStamp>,
    ) -> Result<Duration> {
        let node = self.node_mut(index);
        let subnet_file = node.subnet_file.clone();
        let log = node.agent_log.clone();
        let waited = wait_until(
            &format!(
                "the agent of node {index} to write {}",
                subnet_file.display()
            ),
            Duration::from_secs(15),
            || {
                if let Some(status) = node.agent.as_mut().and_then(|a| a.exit_status()) {
                    bail!("the agent exited ({status})");
                }
                let now = file_stamp(&subnet_file);
                Ok(now.is_some() && now != before)
            },
        );
        waited.with_context(|| format!("agent log of node {index} (tail):\n{}", tail(&log, 30)))
    }

    /// Starts the agent of node `index` and waits until it is ready; returns how long that took.
    pub fn start_agent(&mut self, index: usize) -> Result<Duration> {
        let (started, before) = self.spawn_agent(index)?;
        self.wait_agent_ready(index, before)?;
        Ok(started.elapsed())
    }

    /// Stops the agent of node `index` (SIGTERM, SIGKILL after 5 s).
    pub fn stop_agent(&mut self, index: usize) {
        if let Some(mut agent) = self.node_mut(index).agent.take() {
            agent.stop();
        }
    }

    /// Kills the agent of node `index` with SIGKILL, like a crash.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(mut agent) = self.node_mut(index).agent.take() {
            agent.kill();
        }
    }

    /// The dataplane node `index`'s agent starts with from now on (a running agent keeps
    /// its own until restarted).
    pub fn set_dataplane(&mut self, index: usize, dataplane: Dataplane) {
        self.node_mut(index).dataplane = dataplane;
    }

    /// Runs `weft agent --cleanup` with the agent's own flags on node `index` (whose agent
    /// must be stopped), at most 30 s; fails unless it exits 0. Returns what it printed
    /// (also appended to the agent log).
    pub fn run_agent_cleanup(&mut self, index: usize) -> Result<String> {
        if self.agent_running(index) {
            bail!("stop the agent of node {index} before running `weft agent --cleanup`");
        }
        let mut args = self.agent_args(index)?;
        args.push("--cleanup".into());
        let node = self.node(index);
        append_line(
            &node.agent_log,
            &format!("--- lab: running {}", args.join(" ")),
        );
        let mut cmd = Cmd::new(args.clone())
            .netns(&node.ns)
            .timeout(Duration::from_secs(30));
        for (key, value) in self.agent_env(index) {
            cmd = cmd.env(&key, value);
        }
        let out = cmd.output()?;
        let printed = format!("{}{}", out.stdout, out.stderr);
        append_line(&node.agent_log, printed.trim_end());
        if !out.status.success() {
            bail!(
                "`{}` on node {index} failed ({}):\n{printed}",
                args.join(" "),
                out.status
            );
        }
        Ok(printed)
    }

    /// Whether the agent of node `index` is running.
    pub fn agent_running(&mut self, index: usize) -> bool {
        self.node_mut(index)
            .agent
            .as_mut()
            .is_some_and(|agent| agent.exit_status().is_none())
    }

    /// Waits (at most `timeout`) until the agent of node `index` exits; returns how it ended.
    pub fn wait_agent_exit(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut status = None;
        let agent = self
            .node_mut(index)
            .agent
            .as_mut()
            .with_context(|| format!("node {index} has no agent"))?;
        wait_until(
            &format!("the agent of node {index} to exit"),
            timeout,
            || {
                status = agent.exit_status();
                Ok(status.is_some())
            },
        )?;
        status.context("no exit status")
    }

    pub fn agent_log_tail(&self, index: usize, lines: usize) -> String {
        tail(&self.node(index).agent_log, lines)
    }

    /// The KEY=VALUE pairs of node `index`'s subnet.env.
    pub fn subnet_env(&self, index: usize) -> Result<BTreeMap<String, String>> {
        let path = &self.node(index).subnet_file;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// Creates a pod on node `index`: a namespace attached by the CNI plugin (`flannel`,
    /// i.e. weft-cni) the way a container runtime calls it, inside the node's namespace.
    pub fn add_pod(&mut self, index: usize) -> Result<Pod> {
        self.add_pod_with_ports(index, &[])
    }

    /// Creates a pod on node `index` with hostPorts: the runtime runs kube-flannel's
    /// conflist (cni-conf.json) as libcni does, `flannel` then `portmap`, the latter with
    /// the pod's `portMappings` as runtime config and the former's result as prevResult.
    pub fn add_pod_with_ports(&mut self, index: usize, ports: &[PortMapping]) -> Result<Pod> {
        let mappings: Vec<Value> = ports
            .iter()
            .map(|p| json!({"hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol.name()}))
            .collect();
        self.add_pod_with(index, &[], &json!({ "portMappings": mappings }))
    }

    /// Creates a pod on node `index` whose traffic into it is shaped to `bits_per_second`
    /// by the bandwidth plugin, chained after kube-flannel's conflist (as a cluster that
    /// honours `kubernetes.io/ingress-bandwidth` does).
    pub fn add_pod_with_ingress_bandwidth(
        &mut self,
        index: usize,
        bits_per_second: u64,
    ) -> Result<Pod> {
        let bandwidth = json!({"type": "bandwidth", "capabilities": {"bandwidth": true}});
        let runtime = json!({
            "portMappings": [],
            "bandwidth": {"ingressRate": bits_per_second, "ingressBurst": bits_per_second / 10}
        });
        self.add_pod_with(index, &[bandwidth], &runtime)
    }

    /// Runs kube-flannel's conflist, with `extra_plugins` appended, for a new pod on node
    /// `index`, as libcni does: each plugin gets the list's name and cniVersion, the previous
    /// plugin's result as prevResult, and from `runtime` the config of each capability it
    /// declares.
    fn add_pod_with(
        &mut self,
        index: usize,
        extra_plugins: &[Value],
        runtime: &Value,
    ) -> Result<Pod> {
        self.binary("weft-cni")?;
        let node = self.node_mut(index);
        node.pod_count += 1;
        let name = format!("n{index}p{}", node.pod_count);
        let mut conflist = kube_flannel_conflist(
            &node.cni_network,
            &node.subnet_file,
            &node.dir.join("cni-data"),
        );
        // weft-cni's pod records, where this node's agent reads them (`--cni-records-dir`).
        conflist["plugins"][0]["recordsDir"] = json!(node.cni_records_dir());
        if let Some(plugins) = conflist["plugins"].as_array_mut() {
            plugins.extend(extra_plugins.iter().cloned());
        }
        let node_ns = node.ns.clone();
        let ns = self.create_ns(&name)?;
        let mut result: Option<Value> = None;
        for plugin in conflist["plugins"].as_array().context("plugins")? {
            let mut conf = plugin.clone();
            conf["name"] = conflist["name"].clone();
            conf["cniVersion"] = conflist["cniVersion"].clone();
            if let Some(previous) = &result {
                conf["prevResult"] = previous.clone();
            }
            let mut runtime_config = serde_json::Map::new();
            for (capability, on) in plugin["capabilities"].as_object().into_iter().flatten() {
                if *on == json!(true) && !runtime[capability].is_null() {
                    runtime_config.insert(capability.clone(), runtime[capability].clone());
                }
            }
            if !runtime_config.is_empty() {
                conf["runtimeConfig"] = Value::Object(runtime_config);
            }
            let kind = plugin["type"].as_str().context("plugin type")?;
            let out = Cmd::new([self.cni_bin_dir.join(kind).to_string_lossy().into_owned()])
                .netns(&node_ns)
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", format!("{}{name}", self.prefix))
                .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", self.cni_bin_dir.to_string_lossy())
                .stdin(conf.to_string())
                .timeout(Duration::from_secs(30))
                .output()?;
            if !out.status.success() {
                bail!(
                    "CNI ADD ({kind}) of pod {name} on node {index} failed ({}):\nstdout: {}\nstderr: {}",
                    out.status,
                    out.stdout.trim(),
                    out.stderr.trim()
                );
            }
            result = Some(serde_json::from_str(&out.stdout).with_context(|| {
                format!(
                    "CNI ADD ({kind}) result of pod {name}: {}",
                    out.stdout.trim()
                )
            })?);
        }
        let result = result.context("the conflist has no plugins")?.to_string();
        let ip = pod_ip_from_cni_result(&result)
            .with_context(|| format!("CNI ADD result of pod {name}: {result}"))?;
        let pod = Pod {
            name,
            ns,
            ip,
            node: index,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Installs kube-proxy's rules for `services` on every node (see [`kube_proxy`]).
    pub fn install_kube_proxy(&self, mode: ProxyMode, services: &[Service]) -> Result<()> {
        for node in &self.nodes {
            kube_proxy::install(&node.ns, mode, services, &self.config.network, node.index)?;
        }
        Ok(())
    }

    /// Adds `per_node` pods on every node, in node order.
    pub fn add_pods(&mut self, per_node: usize) -> Result<Vec<Pod>> {
        let mut pods = Vec::new();
        for index in 1..=self.nodes.len() {
            for _ in 0..per_node {
                pods.push(self.add_pod(index)?);
            }
        }
        Ok(pods)
    }

    /// Records a pod attached by other means (e.g. a hand-configured node); `pod.ns`
    /// must come from `create_ns`.
    pub fn register_pod(&mut self, pod: Pod) {
        self.pods.push(pod);
    }

    /// Next pod name on node `index` (`n<index>p<k>`), for pods attached by other means.
    pub fn next_pod_name(&mut self, index: usize) -> String {
        let node = self.node_mut(index);
        node.pod_count += 1;
        format!("n{index}p{}", node.pod_count)
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// `ping -c 2 -W 1` from the pod: true if an echo reply came.
    pub fn ping(&self, from: &Pod, to: Ipv4Addr) -> bool {
        ping_ns(&from.ns, to)
    }

    /// Pings every ordered pair of distinct `pods` (concurrently).
    pub fn ping_matrix(&self, pods: &[Pod]) -> PingMatrix {
        let pairs: Vec<(usize, usize)> = (0..pods.len())
            .flat_map(|a| {
                (0..pods.len())
                    .filter(move |&b| b != a)
                    .map(move |b| (a, b))
            })
            .collect();
        let ok: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|&(a, b)| scope.spawn(move || ping_ns(&pods[a].ns, pods[b].ip)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(false))
                .collect()
        });
        PingMatrix {
            pods: pods.to_vec(),
            results: pairs
                .into_iter()
                .zip(ok)
                .map(|((a, b), ok)| (a, b, ok))
                .collect(),
        }
    }

    /// Panics, listing the failing pairs and the matrix, unless every pod pair pings within
    /// `within`; `when` names the moment in the message.
    pub fn assert_all_pairs_ping(&self, pods: &[Pod], when: &str, within: Duration) {
        let (matrix, took) = self.wait_for_matrix(pods, within);
        assert!(
            matrix.all_ok(),
            "{when}: these pod pairs do not ping within {within:?}:\n{}\n{}",
            matrix.failures().join("\n"),
            matrix.render()
        );
        eprintln!(
            "{when}: all {} pod pairs ping ({took:?})",
            matrix.results.len()
        );
    }

    /// Repeats `ping_matrix` until every pair pings or `timeout` passes; returns the last
    /// matrix and the time it took.
    pub fn wait_for_matrix(&self, pods: &[Pod], timeout: Duration) -> (PingMatrix, Duration) {
        let start = Instant::now();
        loop {
            let matrix = self.ping_matrix(pods);
            if matrix.all_ok() || start.elapsed() >= timeout {
                return (matrix, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl <args>` against the lab's etcd; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcd
            .as_ref()
            .ok_or_else(|| anyhow!("the lab's etcd is not running"))?
            .ctl(args)
    }

    /// The lab etcd's client URL (`https://` with `config.etcd_tls`).
    pub fn etcd_endpoint(&self) -> Result<&'static str> {
        Ok(self
            .etcd
            .as_ref()
            .ok_or_else(|| anyhow!("the lab has no etcd"))?
            .endpoint())
    }

    /// The certificates of the lab's TLS etcd (`config.etcd_tls`): its CA makes more.
    pub fn etcd_pki(&self) -> Result<&EtcdPki> {
        self.etcd_pki
            .as_ref()
            .ok_or_else(|| anyhow!("the lab's etcd does not use TLS (LabConfig::etcd_tls)"))
    }

    /// Stops the lab's etcd and starts it again on the same data; returns when it is
    /// healthy, with how long it was gone.
    pub fn restart_etcd(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let mut etcd = self
            .etcd
            .take()
            .ok_or_else(|| anyhow!("the lab's etcd is not running"))?;
        etcd.stop();
        let etcd_dir = self.dir.path().join("etcd");
        let etcd_log = self.dir.path().join("etcd.log");
        let tls = self.etcd_pki.as_ref().map(EtcdTlsFiles::from);
        self.etcd = Some(Etcd::start(&self.fabric, &etcd_dir, &etcd_log, tls)?);
        Ok(started.elapsed())
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the lab's API server emulator: to its clients
    /// it is unreachable while frozen, as behind a partition.
    pub fn freeze_api_server(&self, frozen: bool) -> Result<()> {
        let api = self
            .api
            .as_ref()
            .ok_or_else(|| anyhow!("the lab has no API server"))?;
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on the PID of a process this lab started.
        if unsafe { libc::kill(api.pid() as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the API server");
        }
        Ok(())
    }

    /// Puts a lease value under `<prefix>/subnets/<key>` as a hostile or careless writer
    /// with etcd access would (`key` like `10.244.9.0-24`, `value` any text).
    pub fn put_raw_lease(&self, key: &str, value: &str) -> Result<()> {
        let full = format!("{ETCD_PREFIX}/subnets/{key}");
        self.etcdctl(&["put", &full, value]).map(|_| ())
    }

    /// One HTTP/1.1 GET of `path` on node `index`'s health server (`port`), from the fabric
    /// namespace as a kubelet probe or Prometheus would send it: (status, body).
    pub fn http_get(&self, index: usize, port: u16, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let node = self.node_ip(index);
        let request = format!("GET {path} HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\n\r\n");
        let reply = icmp::in_netns(self.fabric_ns(), move || {
            let addr = std::net::SocketAddr::from((node, port));
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            anyhow::Ok(reply)
        })
        .with_context(|| format!("GET http://{node}:{port}{path}"))?;
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP reply: {reply:?}"))?;
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// All subnet leases in etcd; in kube mode, those the Nodes' annotations publish.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        if let Some(api) = &self.api {
            let mut leases = Vec::new();
            for node in api.control().nodes()? {
                leases.extend(kube_lab::lease_of_node(&node)?);
            }
            return Ok(leases);
        }
        let out = self.etcdctl(&["get", "--prefix", &format!("{ETCD_PREFIX}/subnets/")])?;
        parse_leases(&out)
    }

    /// Publishes the lease of node `index` by hand, as flanneld would for a vxlan lease of
    /// /24 `subnet`: in etcd, `<prefix>/subnets/<subnet>-24` bound to a 24 h etcd lease;
    /// in kube mode, flannel's annotations (and condition) on its Node, whose podCIDR
    /// must be `subnet`. For nodes that run no agent.
    pub fn publish_flanneld_lease(
        &self,
        index: usize,
        subnet: Ipv4Addr,
        vni: u32,
        vtep_mac: &str,
    ) -> Result<()> {
        let public_ip = self.node_ip(index);
        let Some(api) = &self.api else {
            let grant = self.etcdctl(&["lease", "grant", LEASE_TTL_SECONDS])?;
            // "lease 694d7b3a9c1f2e0b granted with TTL(86400s)"
            let lease_id = grant
                .split_whitespace()
                .nth(1)
                .with_context(|| format!("unexpected `etcdctl lease grant` output: {grant}"))?
                .to_string();
            let key = format!("{ETCD_PREFIX}/subnets/{subnet}-24");
            let value = json!({
                "PublicIP": public_ip.to_string(),
                "BackendType": "vxlan",
                "BackendData": {"VNI": vni, "VtepMAC": vtep_mac},
            });
            self.etcdctl(&[
                "put",
                &format!("--lease={lease_id}"),
                &key,
                &value.to_string(),
            ])?;
            return Ok(());
        };
        let name = &self.node(index).name;
        let control = api.control();
        let node = kube_lab::get_node(control, name)?;
        let pod_cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
        let expected = format!("{subnet}/{KUBE_POD_CIDR_LEN}");
        if pod_cidr.as_deref() != Some(expected.as_str()) {
            bail!("node {name} has podCIDR {pod_cidr:?}, not {expected}: in kube mode a node's lease is its podCIDR (see Lab::assigned_pod_cidr)");
        }
        let annotations = kube_lab::flanneld_vxlan_annotations(public_ip, vni, vtep_mac);
        control.patch_node(name, &json!({"metadata": {"annotations": annotations}}))?;
        // flanneld then clears NetworkUnavailable (conditions merge by type).
        let mut conditions: Vec<Value> = node
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .filter(|c| c.type_ != "NetworkUnavailable")
            .map(|c| serde_json::to_value(c).expect("a NodeCondition serializes"))
            .collect();
        conditions.push(json!({
            "type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
        }));
        control.patch_node(name, &json!({"status": {"conditions": conditions}}))?;
        Ok(())
    }

    /// The lease whose PublicIP is node `index`'s address.
    pub fn lease_of(&self, index: usize) -> Result<Lease> {
        let ip = self.node_ip(index);
        let leases = self.leases()?;
        let mut mine = leases.iter().filter(|l| l.public_ip == ip);
        let lease = mine.next().cloned().ok_or_else(|| {
            anyhow!(
                "no lease with PublicIP {ip} (node {index}) in {}",
                self.lease_store()
            )
        })?;
        if mine.next().is_some() {
            bail!("more than one lease with PublicIP {ip} (node {index}): {leases:#?}");
        }
        Ok(lease)
    }

    fn lease_store(&self) -> &'static str {
        match self.config.subnet_manager {
            SubnetManager::Etcd => "etcd",
            SubnetManager::Kube => "the Node annotations",
        }
    }

    /// Kube mode: the control client of the lab's API server (nodes, faults, request log).
    pub fn api(&self) -> Result<&ControlClient> {
        self.api
            .as_ref()
            .map(ApiServer::control)
            .ok_or_else(|| anyhow!("the lab runs no API server: start it with LabConfig {{ subnet_manager: SubnetManager::Kube, .. }}"))
    }

    /// Kube mode: `https://198.18.0.254:6443`.
    pub fn api_url(&self) -> Result<&str> {
        self.api
            .as_ref()
            .map(ApiServer::url)
            .ok_or_else(|| anyhow!("the lab runs no API server"))
    }

    /// Kube mode: the RBAC user of node `index`'s agent (its own service account).
    pub fn kube_user(&self, index: usize) -> Result<String> {
        self.kube_users
            .get(&index)
            .map(|u| u.name.clone())
            .ok_or_else(|| anyhow!("the lab's API server has no user for node {index}"))
    }

    /// Kube mode: the Node object of node `index`.
    pub fn kube_node(&self, index: usize) -> Result<k8s_openapi::api::core::v1::Node> {
        kube_lab::get_node(self.api()?, &self.node(index).name)
    }

    /// The podCIDR the lab's "controller-manager" gives node `index` in kube mode: the
    /// `index`-th /24 of the Network (10.244.<index>.0/24 for 10.244.0.0/16).
    pub fn assigned_pod_cidr(&self, index: usize) -> Result<String> {
        let network = &self.config.network;
        let (base, len) = network
            .split_once('/')
            .with_context(|| format!("Network {network:?} is not a CIDR"))?;
        let base: Ipv4Addr = base
            .parse()
            .with_context(|| format!("Network {network:?}"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("Network {network:?}"))?;
        let capacity = 1usize << KUBE_POD_CIDR_LEN.saturating_sub(len).min(16);
        if len >= KUBE_POD_CIDR_LEN || index >= capacity {
            bail!(
                "Network {network} has no room for a /{KUBE_POD_CIDR_LEN} podCIDR for node {index}"
            );
        }
        let subnet = Ipv4Addr::from(u32::from(base) + ((index as u32) << 8));
        Ok(format!("{subnet}/{KUBE_POD_CIDR_LEN}"))
    }

    /// `ip -j <args>` in namespace `ns`, parsed (an empty output is an empty list).
    pub fn ip_json(&self, ns: &str, args: &[&str]) -> Result<Vec<Value>> {
        json_command("ip", ns, args)
    }

    /// `bridge -j <args>` in namespace `ns`, parsed.
    pub fn bridge_json(&self, ns: &str, args: &[&str]) -> Result<Vec<Value>> {
        json_command("bridge", ns, args)
    }

    /// MTU of `dev` in namespace `ns`.
    pub fn link_mtu(&self, ns: &str, dev: &str) -> Result<u64> {
        self.link_field(ns, dev, "mtu")?
            .as_u64()
            .ok_or_else(|| anyhow!("no MTU for {dev} in {ns}"))
    }

    /// MAC address of `dev` in namespace `ns`.
    pub fn link_mac(&self, ns: &str, dev: &str) -> Result<String> {
        self.link_field(ns, dev, "address")?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no MAC address for {dev} in {ns}"))
    }

    fn link_field(&self, ns: &str, dev: &str, field: &str) -> Result<Value> {
        let links = self.ip_json(ns, &["link", "show", "dev", dev])?;
        links
            .first()
            .and_then(|link| link.get(field))
            .cloned()
            .ok_or_else(|| anyhow!("`ip -n {ns} link show dev {dev}` has no {field}"))
    }

    /// Starts tcpdump (`-n -l -t -c count`) on `iface` in `ns` with `filter`, bounded by
    /// `max`; returns once it listens.
    pub fn tcpdump(
        &self,
        ns: &str,
        iface: &str,
        filter: &str,
        count: u32,
        max: Duration,
    ) -> Result<Capture> {
        let count = count.to_string();
        Capture::start(
            ns,
            &[
                "tcpdump", "-i", iface, "-n", "-l", "-t", "-c", &count, filter,
            ],
            "listening on",
            max,
        )
    }

    /// Starts tshark on `iface` in `ns` with extra `args`, bounded by `max`; returns once
    /// it captures.
    pub fn tshark(&self, ns: &str, iface: &str, args: &[&str], max: Duration) -> Result<Capture> {
        let mut line = vec!["tshark", "-i", iface, "-n", "-l"];
        line.extend_from_slice(args);
        Capture::start(ns, &line, "Capturing on", max)
    }

    /// Captures (tcpdump, at most 10 s) the first packet matching `filter` on `iface` in
    /// `ns` while `trigger` runs (repeatedly, until the packet is seen), and returns its
    /// IPv4 source address.
    pub fn first_packet_source(
        &self,
        ns: &str,
        iface: &str,
        filter: &str,
        trigger: impl FnMut(),
    ) -> Result<Ipv4Addr> {
        let capture = self.tcpdump(ns, iface, filter, 1, Duration::from_secs(10))?;
        let out = capture.finish_while(trigger)?;
        // "IP 198.18.0.11 > 198.51.100.1: ICMP echo request, ..."
        let source = out
            .lines()
            .find_map(|line| line.strip_prefix("IP "))
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("tcpdump in {ns} on {iface} saw no packet for '{filter}'"))?;
        source
            .parse()
            .with_context(|| format!("tcpdump printed an unexpected source: {out}"))
    }

    /// Pings `to` from `from` while tshark captures, on the fabric port of `to`'s node,
    /// the first VXLAN packet from `from`'s node, and returns it decoded.
    pub fn capture_vxlan(&self, from: &Pod, to: &Pod) -> Result<VxlanPacket> {
        let filter = format!(
            "udp dst port {VXLAN_PORT} and src host {}",
            self.node_ip(from.node)
        );
        let decode_as = format!("udp.port=={VXLAN_PORT},vxlan");
        let fields = [
            "ip.src",
            "ip.dst",
            "udp.dstport",
            "vxlan.vni",
            "eth.src",
            "eth.dst",
        ];
        let mut args = vec!["-c", "1", "-f", &filter, "-d", &decode_as, "-T", "fields"];
        for field in &fields {
            args.extend(["-e", field]);
        }
        args.extend([
            "-E",
            "separator=|",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=,",
        ]);
        let port = &self.node(to.node).fabric_port;
        let capture = self.tshark(&self.fabric, port, &args, Duration::from_secs(20))?;
        let mut pinged = false;
        let out = capture.finish_while(|| {
            pinged |= icmp::ping(&from.ns, to.ip, 1, Duration::from_millis(300))
                .is_ok_and(|rtt| rtt.is_some())
        })?;
        VxlanPacket::parse(&out).with_context(|| {
            format!(
                "tshark on {port} (fabric) decoded no VXLAN packet from node {} \
                 (ping {} -> {} replied: {pinged}); output: {out:?}",
                from.node, from.name, to.name
            )
        })
    }

    /// Node `index`'s `--bpf-dir` (on the lab's bpffs).
    pub fn bpf_dir(&self, index: usize) -> &Path {
        &self.node(index).bpf_dir
    }

    /// Node `index`'s datapath counters, read from their pin.
    pub fn bpf_counters(&self, index: usize) -> Result<BpfCounters> {
        bpf_maps::read_counters(self.bpf_dir(index))
            .with_context(|| format!("the BPF counters of node {index}"))
    }

    /// weft's TC filters on the interfaces of node `index`.
    pub fn weft_filters(&self, index: usize) -> Result<Vec<TcFilter>> {
        bpf_maps::weft_filters(self.node_ns(index))
    }

    /// The ports of node `index`'s pod bridge (cni0), by name.
    pub fn pod_bridge_ports(&self, index: usize) -> Result<Vec<String>> {
        let ports = self.ip_json(self.node_ns(index), &["link", "show", "master", "cni0"])?;
        Ok(ports
            .iter()
            .filter_map(|p| p["ifname"].as_str().map(str::to_string))
            .collect())
    }

    /// The host-side end (in the node's namespace) of `pod`'s eth0.
    pub fn host_veth(&self, pod: &Pod) -> Result<String> {
        let peer_index = self
            .link_field(&pod.ns, "eth0", "link_index")?
            .as_u64()
            .with_context(|| format!("eth0 of pod {} is not a veth", pod.name))?;
        let links = self.ip_json(self.node_ns(pod.node), &["link", "show"])?;
        links
            .iter()
            .find(|l| l["ifindex"].as_u64() == Some(peer_index))
            .and_then(|l| l["ifname"].as_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "no interface #{peer_index} (peer of pod {}'s eth0) on node {}",
                    pod.name, pod.node
                )
            })
    }

    /// The host-side veth of `pod` as node `pod.node`'s BPF `endpoints` map should hold it:
    /// (its ifindex, its name).
    pub fn host_veth_index(&self, pod: &Pod) -> Result<(u64, String)> {
        let veth = self.host_veth(pod)?;
        let index = self
            .link_field(self.node_ns(pod.node), &veth, "ifindex")?
            .as_u64()
            .with_context(|| format!("no ifindex for {veth}"))?;
        Ok((index, veth))
    }

    /// The entry for `addr` in the pinned `endpoints` map of node `index`.
    pub fn bpf_endpoint(&self, index: usize, addr: Ipv4Addr) -> Result<Option<EndpointEntry>> {
        Ok(bpf_maps::read_endpoints(self.bpf_dir(index))?.remove(&addr))
    }

    /// What a hostile pod does to take a neighbour's address, from inside its own netns:
    /// adds `addr` as a secondary address of its eth0, forgets its neighbours, and pings
    /// its gateway from `addr`, so that its ARP request tells the node `addr` is at its
    /// MAC. Returns the gateway it pinged.
    pub fn claim_address(&self, pod: &Pod, addr: Ipv4Addr) -> Result<Ipv4Addr> {
        let routes = self.ip_json(&pod.ns, &["route", "show", "default"])?;
        let gateway: Ipv4Addr = routes
            .first()
            .and_then(|r| r["gateway"].as_str())
            .with_context(|| format!("pod {} has no default route", pod.name))?
            .parse()?;
        ip(&pod.ns, &format!("addr add {addr}/32 dev eth0"))?;
        ip(&pod.ns, "neigh flush dev eth0")?;
        let gw = gateway.to_string();
        let src = addr.to_string();
        let args = ["ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", &src, &gw];
        // Whether the gateway answers does not matter: the ARP request went out.
        let _ = Cmd::new(args)
            .netns(&pod.ns)
            .timeout(Duration::from_secs(10))
            .output()?;
        Ok(gateway)
    }

    /// The MAC node `index`'s neighbour table has for `addr` on the pod bridge.
    pub fn pod_neighbour_mac(&self, index: usize, addr: Ipv4Addr) -> Result<Option<String>> {
        let addr = addr.to_string();
        let neighbours = self.ip_json(
            self.node_ns(index),
            &["neigh", "show", &addr, "dev", "cni0"],
        )?;
        Ok(neighbours
            .first()
            .and_then(|n| n["lladdr"].as_str())
            .map(str::to_string))
    }

    /// What node `index`'s BPF dataplane still lacks to serve every pod of the lab on it
    /// and every other lease: `from_netdev` on eth0, `from_pod` on every cni0 port, an
    /// endpoint per pod (from its CNI record), a lease
    /// entry per other lease in etcd. Empty when complete.
    pub fn bpf_missing(&self, index: usize) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        let filters = self.weft_filters(index)?;
        let has = |iface: &str, program: &str| {
            filters
                .iter()
                .any(|f| f.iface == iface && f.program == program)
        };
        for program in ["from_netdev", "to_netdev"] {
            if !has("eth0", program) {
                missing.push(format!("{program} on eth0"));
            }
        }
        for port in self.pod_bridge_ports(index)? {
            for program in ["from_pod", "to_pod"] {
                if !has(&port, program) {
                    missing.push(format!("{program} on {port}"));
                }
            }
        }
        let dir = self.bpf_dir(index);
        let endpoints = bpf_maps::read_endpoints(dir)?;
        for pod in self.pods.iter().filter(|p| p.node == index) {
            if !endpoints.contains_key(&pod.ip) {
                missing.push(format!("endpoint {} ({})", pod.ip, pod.name));
            }
        }
        let leases = bpf_maps::read_leases(dir)?;
        let own = self.node_ip(index);
        for lease in self.leases()?.iter().filter(|l| l.public_ip != own) {
            if !leases.contains_key(&(lease.subnet, lease.prefix_len)) {
                missing.push(format!("lease {}", lease.cidr()));
            }
        }
        Ok(missing)
    }

    /// Waits until [`Lab::bpf_missing`] is empty for node `index`; returns how long it took.
    pub fn wait_bpf_synced(&self, index: usize, timeout: Duration) -> Result<Duration> {
        let mut last = Vec::new();
        wait_until(
            &format!("node {index}'s BPF dataplane to be complete"),
            timeout,
            || {
                last = self.bpf_missing(index)?;
                Ok(last.is_empty())
            },
        )
        .with_context(|| format!("still missing: {}", last.join(", ")))
    }

    /// Plugs a host that is no node (no agent, no lease) into the underlay: namespace
    /// `<prefix><suffix>` with `addr`/24 on its eth0. Returns the namespace.
    pub fn add_underlay_host(&mut self, suffix: &str, addr: Ipv4Addr) -> Result<String> {
        let ns = self.create_ns(suffix)?;
        let port = format!("h-{suffix}");
        let fab = self.fabric.clone();
        ip(
            &ns,
            &format!("link add eth0 type veth peer name {port} netns {fab}"),
        )?;
        ip(&fab, &format!("link set {port} master {FABRIC_BRIDGE} up"))?;
        ip(&ns, &format!("addr add {addr}/24 dev eth0"))?;
        ip(&ns, "link set eth0 up")?;
        Ok(ns)
    }

    /// Agent and etcd log tails and each node's routes: printed when a test fails.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let _ = writeln!(
                out,
                "===== node {} ({}, {}) agent log (tail) =====\n{}",
                node.index,
                node.ns,
                node.ip,
                tail(&node.agent_log, 40)
            );
            let routes = Cmd::new(["ip", "-n", &node.ns, "route"]).output();
            let _ = writeln!(
                out,
                "----- routes -----\n{}",
                routes.map(|o| o.stdout).unwrap_or_default()
            );
            if node.dataplane != Dataplane::Kernel {
                let counters = bpf_maps::read_counters(&node.bpf_dir)
                    .map_or_else(|e| format!("{e:#}"), |c| c.to_string());
                let filters = bpf_maps::weft_filters(&node.ns)
                    .map_or_else(|e| format!("{e:#}"), |f| format!("{f:?}"));
                let _ = writeln!(
                    out,
                    "----- BPF -----\ncounters: {counters}\nfilters: {filters}"
                );
            }
        }
        if let Some(etcd) = &self.etcd {
            let _ = writeln!(out, "===== etcd log (tail) =====\n{}", tail(etcd.log(), 10));
        }
        if let Some(api) = &self.api {
            let _ = writeln!(
                out,
                "===== weft-apiserver log (tail) =====\n{}",
                tail(api.log(), 10)
            );
            match api.control().nodes() {
                Ok(nodes) => {
                    for node in nodes {
                        let _ = writeln!(
                            out,
                            "Node {}: podCIDR {:?}, {:?}",
                            node.metadata.name.as_deref().unwrap_or_default(),
                            node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()),
                            kube_lab::flannel_annotations(&node)
                        );
                    }
                }
                Err(e) => {
                    let _ = writeln!(out, "Nodes: {e:#}");
                }
            }
        }
        out
    }

    fn teardown(&mut self) {
        // Signal every agent first so that their shutdowns overlap.
        let mut agents: Vec<NetnsProcess> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.agent.take())
            .collect();
        for agent in &agents {
            // SAFETY: kill(2) on the PID of our own child.
            unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGTERM) };
        }
        for agent in &mut agents {
            agent.stop();
        }
        if let Some(mut etcd) = self.etcd.take() {
            etcd.stop();
        }
        if let Some(mut api) = self.api.take() {
            api.stop();
        }
        // Pods, then nodes, then the fabric: the reverse of creation.
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                eprintln!("lab teardown: {e:#}");
            }
        }
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(Path::new(HOST_LOCAL_STATE).join(&node.cni_network));
        }
        // After the agents are gone: releases every pin (and the maps with them).
        self.bpffs.take();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lab {} failed; diagnostics:\n{}",
                self.prefix,
                self.diagnostics()
            );
        }
        self.teardown();
    }
}

/// The Kubernetes name of node `index`.
fn node_name(index: usize) -> String {
    format!("n{index}")
}

/// RUST_LOG of the agents: the caller's, else info with weft's debug messages.
fn agent_rust_log() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "info,weft=debug".into())
}

/// `ping -c 2 -W 1` from namespace `ns`.
pub fn ping_ns(ns: &str, to: Ipv4Addr) -> bool {
    matches!(icmp::ping(ns, to, 2, Duration::from_secs(1)), Ok(Some(_)))
}

fn append_line(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

fn json_command(program: &str, ns: &str, args: &[&str]) -> Result<Vec<Value>> {
    let mut line = vec![program, "-n", ns, "-j"];
    line.extend_from_slice(args);
    let out = run(&line)?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(&out)
        .with_context(|| format!("`{}` printed no JSON: {out}", line.join(" ")))?;
    match value {
        Value::Array(items) => Ok(items),
        other => Ok(vec![other]),
    }
}

/// The pod address from a CNI ADD result (first entry of `ips`).
fn pod_ip_from_cni_result(result: &str) -> Result<Ipv4Addr> {
    let value: Value = serde_json::from_str(result).context("the result is not JSON")?;
    let address = value["ips"][0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("the result has no ips[0].address"))?;
    let ip = address.split('/').next().unwrap_or_default();
    ip.parse()
        .with_context(|| format!("ips[0].address {address} is not an IPv4 CIDR"))
}

/// A pod's hostPort, as the runtime passes it to portmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// kube-flannel.yml's cni-conf.json (`10-flannel.conflist`), with the lab's per-node
/// subnet file and data directory in the flannel entry (nodes share one filesystem here).
pub fn kube_flannel_conflist(network: &str, subnet_file: &Path, data_dir: &Path) -> Value {
    json!({
        "name": network,
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "flannel",
                "subnetFile": subnet_file,
                "dataDir": data_dir,
                "delegate": {"hairpinMode": true, "isDefaultGateway": true}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

/// Parses `etcdctl get --prefix <prefix>/subnets/` output (key and value lines alternate).
pub fn parse_leases(out: &str) -> Result<Vec<Lease>> {
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    if !lines.len().is_multiple_of(2) {
        bail!("etcdctl get printed an odd number of lines: {out}");
    }
    lines
        .chunks(2)
        .map(|pair| parse_lease(pair[0], pair[1]))
        .collect()
}

fn parse_lease(key: &str, value: &str) -> Result<Lease> {
    let name = key
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .split('&')
        .next()
        .unwrap_or_default();
    let (subnet, prefix_len) = name
        .split_once('-')
        .ok_or_else(|| anyhow!("lease key {key} is not <prefix>/subnets/<ip>-<len>"))?;
    let value: Value = serde_json::from_str(value)
        .with_context(|| format!("lease {key}: value is not JSON: {value}"))?;
    let public_ip = value["PublicIP"]
        .as_str()
        .ok_or_else(|| anyhow!("lease {key} has no PublicIP: {value}"))?;
    Ok(Lease {
        key: key.to_string(),
        subnet: subnet.parse().with_context(|| format!("lease key {key}"))?,
        prefix_len: prefix_len
            .parse()
            .with_context(|| format!("lease key {key}"))?,
        public_ip: public_ip
            .parse()
            .with_context(|| format!("lease {key} PublicIP"))?,
        backend_type: value["BackendType"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        vtep_mac: value["BackendData"]["VtepMAC"].as_str().map(str::to_string),
        value,
    })
}

/// UDP port of flannel's VXLAN (the kernel default).
pub const VXLAN_PORT: u16 = 8472;

/// A VXLAN packet as tshark decoded it: outer headers and the encapsulated frame's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPacket {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub inner_src: Ipv4Addr,
    pub inner_dst: Ipv4Addr,
    pub udp_dst_port: u16,
    pub vni: u32,
    pub inner_src_mac: String,
    pub inner_dst_mac: String,
}

impl VxlanPacket {
    /// Parses one line of `tshark -T fields -e ip.src -e ip.dst -e udp.dstport
    /// -e vxlan.vni -e eth.src -e eth.dst -E separator=|` (repeated fields: outer first,
    /// comma-separated).
    pub fn parse(out: &str) -> Result<Self> {
        let line = out
            .lines()
            .find(|l| !l.trim().is_empty())
            .context("no packet")?;
        let fields: Vec<Vec<&str>> = line.split('|').map(|f| f.split(',').collect()).collect();
        if fields.len() != 6 {
            bail!("expected 6 fields, got {}: {line}", fields.len());
        }
        let second = |i: usize, name: &str| -> Result<&str> {
            fields[i]
                .get(1)
                .copied()
                .with_context(|| format!("no inner {name} (not decoded as VXLAN?): {line}"))
        };
        Ok(VxlanPacket {
            outer_src: fields[0][0].parse().context("outer ip.src")?,
            outer_dst: fields[1][0].parse().context("outer ip.dst")?,
            inner_src: second(0, "ip.src")?.parse().context("inner ip.src")?,
            inner_dst: second(1, "ip.dst")?.parse().context("inner ip.dst")?,
            udp_dst_port: fields[2][0].parse().context("udp.dstport")?,
            vni: fields[3][0].parse().context("vxlan.vni")?,
            inner_src_mac: second(4, "eth.src")?.to_string(),
            inner_dst_mac: second(5, "eth.dst")?.to_string(),
        })
    }
}

/// Results of pinging every ordered pair of pods.
#[derive(Debug, Clone)]
pub struct PingMatrix {
    pub pods: Vec<Pod>,
    /// (from index, to index, replied)
    pub results: Vec<(usize, usize, bool)>,
}

impl PingMatrix {
    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|&(_, _, ok)| ok)
    }

    /// "n1p1 (10.244.3.2) -> n2p1 (10.244.7.2)" for each pair that failed.
    pub fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|&(a, b, _)| {
                let (a, b) = (&self.pods[a], &self.pods[b]);
                format!("{} ({}) -> {} ({})", a.name, a.ip, b.name, b.ip)
            })
            .collect()
    }

    /// A table, rows = source, columns = destination, ✓ / ✗.
    pub fn render(&self) -> String {
        let width = self
            .pods
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(4)
            .max(4)
            + 1;
        let mut out = format!("{:width$}", "from\\to");
        for pod in &self.pods {
            let _ = write!(out, " {:>width$}", pod.name);
        }
        out.push('\n');
        for (a, from) in self.pods.iter().enumerate() {
            let _ = write!(out, "{:width$}", from.name);
            for b in 0..self.pods.len() {
                let cell = match self.results.iter().find(|r| r.0 == a && r.1 == b) {
                    Some((_, _, true)) => "✓",
                    Some((_, _, false)) => "✗",
                    None => "·",
                };
                let _ = write!(out, " {cell:>width$}");
            }
            out.push('\n');
        }
        out
    }
}

/// The first pod of `pods` on node `node`.
/// The value of the first sample line of a /metrics text that starts with `series`
/// (e.g. `weft_leases_rejected{reason="overlap"}`).
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn first_pod_on(pods: &[Pod], node: usize) -> &Pod {
    pods.iter()
        .find(|p| p.node == node)
        .unwrap_or_else(|| panic!("no pod on node {node}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannel_leases() {
        let out = "/coreos.com/network/subnets/10.244.3.0-24\n\
                   {\"PublicIP\":\"198.18.0.11\",\"BackendType\":\"vxlan\",\"BackendData\":{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:01\"}}\n\
                   /coreos.com/network/subnets/10.244.9.0-24\n\
                   {\"PublicIP\":\"198.18.0.12\",\"BackendType\":\"host-gw\"}\n";
        let leases = parse_leases(out).unwrap();
        assert_eq!(leases.len(), 2);
        assert_eq!(leases[0].cidr(), "10.244.3.0/24");
        assert_eq!(leases[0].public_ip, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(leases[0].vtep_mac.as_deref(), Some("0e:00:00:00:00:01"));
        assert_eq!(leases[1].backend_type, "host-gw");
        assert_eq!(leases[1].vtep_mac, None);
        assert!(parse_leases("/x/subnets/10.244.1.0-24\n").is_err());
    }

    #[test]
    fn reads_pod_ip_from_cni_result() {
        let result =
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.3.2/24","gateway":"10.244.3.1"}]}"#;
        assert_eq!(
            pod_ip_from_cni_result(result).unwrap(),
            Ipv4Addr::new(10, 244, 3, 2)
        );
        assert!(pod_ip_from_cni_result(r#"{"ips":[]}"#).is_err());
    }

    #[test]
    fn parses_a_vxlan_packet() {
        let line = "198.18.0.11,10.244.1.2|198.18.0.12,10.244.2.2|8472|1|\
                    aa:aa:aa:aa:aa:01,0e:00:00:00:00:01|aa:aa:aa:aa:aa:02,0e:00:00:00:00:02\n";
        let packet = VxlanPacket::parse(line).unwrap();
        assert_eq!(packet.outer_src, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(packet.inner_dst, Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!((packet.udp_dst_port, packet.vni), (8472, 1));
        assert_eq!(packet.inner_dst_mac, "0e:00:00:00:00:02");
        assert_eq!(packet.inner_src_mac, "0e:00:00:00:00:01");
        // Not decoded as VXLAN: no inner headers.
        assert!(VxlanPacket::parse(
            "198.18.0.11|198.18.0.12|8472||aa:aa:aa:aa:aa:01|aa:aa:aa:aa:aa:02"
        )
        .is_err());
    }

    #[test]
    fn renders_the_matrix() {
        let pod = |name: &str, last: u8| Pod {
            name: name.into(),
            ns: String::new(),
            ip: Ipv4Addr::new(10, 244, 1, last),
            node: 1,
        };
        let matrix = PingMatrix {
            pods: vec![pod("n1p1", 2), pod("n1p2", 3)],
            results: vec![(0, 1, true), (1, 0, false)],
        };
        assert!(!matrix.all_ok());
        assert_eq!(
            matrix.failures(),
            vec!["n1p2 (10.244.1.3) -> n1p1 (10.244.1.2)"]
        );
        let table = matrix.render();
        assert!(table.contains('✓') && table.contains('✗'), "{table}");
    }
}
