//! The BPF dataplane on a real kernel, inside network namespaces this test creates: maps
//! filled and readable with named fields, programs attached to the uplink and to pod veths
//! (also to veths created later), endpoints from pod records, a restart that adopts the
//! maps and replaces the filters in place, `--cleanup`, and the fallback of
//! `--dataplane=auto`. Needs root and the eBPF object (`cargo xtask build-ebpf`).

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use futures::StreamExt;
use ipnetwork::Ipv4Network;
use serde_json::Value;

use weft::backend;
use weft::bpf::{self, BpfOptions, DataplaneChoice};
use weft::config::netconf::DEFAULT_VXLAN_PORT;
use weft::config::{AgentArgs, BackendConf, NetConf, VxlanConf};
use weft::dataplane::Dataplane;
use weft::iface::{self, ExtIface, IfaceSelection};
use weft::lease::{Lease, LeaseAttrs, LeaseEvent};
use weft_common::{
    Counter, NatClaim, NatEntry, NatKey, LEASE_DIRECT, LEASE_VXLAN, MAP_CONFIG, MAP_ENDPOINTS,
    MAP_LEASES, MAP_NAT, MAP_NAT_CLAIMS, MAP_NAT_REVERSE, MAP_PEERS, NAT_SEEN_CLOSE,
    NAT_SEEN_REPLY,
};

const PREFIX: &str = "wt-bpd-";
const UPLINK: &str = "eth0";
const POD_VETH: &str = "vethpod1";
/// `pref` of weft's TC filters (0x7765).
const WEFT_PREF: &str = "pref 30565";

// ---------------------------------------------------------------------------------------
// The lab: namespaces and a private bpffs, removed on every exit path.

struct Lab {
    namespaces: Vec<String>,
    tag: String,
    bpffs: PathBuf,
    /// Holds the mount point and the test's files; removed after the unmount in `drop`.
    tmp: tempfile::TempDir,
}

impl Lab {
    /// Namespaces `wt-bpd-<pid>-<test>-<role>` and a bpffs mounted in a temporary directory.
    fn new(test: &str) -> Result<Lab> {
        sweep_leftovers();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-{test}-", std::process::id()))
            .tempdir()?;
        let bpffs = tmp.path().join("bpffs");
        std::fs::create_dir(&bpffs)?;
        let mut lab = Lab {
            namespaces: Vec::new(),
            tag: format!("{PREFIX}{}-{test}-", std::process::id()),
            bpffs: PathBuf::new(),
            tmp,
        };
        run(&["mount", "-t", "bpf", "bpf", path_str(&bpffs)?])?;
        lab.bpffs = bpffs;
        Ok(lab)
    }

    fn ns(&mut self, role: &str) -> Result<String> {
        let name = format!("{}{role}", self.tag);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn pin_dir(&self) -> PathBuf {
        self.bpffs.join("weft")
    }

    /// A fabric bridge and nodes `node<i>` with uplink eth0 = 198.18.0.1<i>/24, a pod
    /// bridge cni0 = 10.244.<i>.1/24 and one pod (10.244.<i>.2) on veth `vethpod<i>`.
    fn cluster(&mut self, nodes: u8) -> Result<Vec<Node>> {
        let fabric = self.ns("fabric")?;
        ip(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip(&fabric, &["link", "set", "br0", "up"])?;
        let mut out = Vec::new();
        for i in 1..=nodes {
            let node = self.ns(&format!("node{i}"))?;
            let port = format!("n{i}");
            ip(
                &fabric,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", UPLINK, "netns", &node,
                ],
            )?;
            ip(&fabric, &["link", "set", &port, "master", "br0", "up"])?;
            ip(
                &node,
                &["addr", "add", &format!("198.18.0.1{i}/24"), "dev", UPLINK],
            )?;
            ip(&node, &["link", "set", UPLINK, "up"])?;
            ip(&node, &["link", "add", "cni0", "type", "bridge"])?;
            ip(
                &node,
                &["addr", "add", &format!("10.244.{i}.1/24"), "dev", "cni0"],
            )?;
            ip(&node, &["link", "set", "cni0", "up"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            let pod = self.ns(&format!("pod{i}"))?;
            let veth = format!("vethpod{i}");
            ip(
                &node,
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod,
                ],
            )?;
            ip(&node, &["link", "set", &veth, "master", "cni0", "up"])?;
            ip(
                &pod,
                &["addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"],
            )?;
            ip(&pod, &["link", "set", "eth0", "up"])?;
            ip(
                &pod,
                &["route", "add", "default", "via", &format!("10.244.{i}.1")],
            )?;
            self.write_pod_record(&pod, &veth, &format!("10.244.{i}.2"))?;
            out.push(Node {
                ns: node,
                pod,
                subnet: format!("10.244.{i}.0/24").parse()?,
            });
        }
        Ok(out)
    }
}

impl Lab {
    /// The pod record the CNI plugin would write for a pod (`pod` its namespace and
    /// container ID) with address `address` on eth0 behind host veth `veth`.
    fn write_pod_record(&self, pod: &str, veth: &str, address: &str) -> Result<()> {
        let mac = link_field(pod, "eth0", "address")?;
        let result = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0"},
                {"name": veth},
                {"name": "eth0", "mac": mac, "sandbox": format!("/var/run/netns/{pod}")}
            ],
            "ips": [{"interface": 2, "address": format!("{address}/24")}]
        });
        let dir = records_dir(&self.pin_dir());
        std::fs::create_dir_all(&dir)?;
        let name = weft::cni::record::file_name("cbr0", pod, "eth0");
        let record = weft::cni::record::encode("cbr0", pod, "eth0", &result);
        std::fs::write(dir.join(name), record)?;
        Ok(())
    }
}

/// The pod records of the lab whose pins are under `pin_dir` (next to its bpffs).
fn records_dir(pin_dir: &Path) -> PathBuf {
    pin_dir
        .parent()
        .and_then(Path::parent)
        .expect("the pin dir is <tmp>/bpffs/weft")
        .join("records")
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.bpffs).status();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

struct Node {
    ns: String,
    pod: String,
    subnet: Ipv4Network,
}

/// Deletes namespaces (and unmounts bpffs) of runs of this test whose process is gone.
fn sweep_leftovers() {
    let dead = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .is_some_and(|pid| !Path::new("/proc").join(pid).exists())
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(entry.path().join("bpffs"))
                    .status();
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running code inside a node.

/// Runs `f` on a thread that entered namespace `ns` (it and the processes it starts see
/// that namespace's interfaces), on a single-threaded runtime so that every task of the
/// dataplane runs there too.
fn in_node<T, F, Fut>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: a plain syscall on an open namespace file descriptor.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(f())
    })
    .join()
    .expect("the namespace thread panicked")
}

fn netlink() -> Result<rtnetlink::Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

fn host_gw_conf() -> NetConf {
    NetConf {
        backend: BackendConf::HostGw,
        ..vxlan_conf(false)
    }
}

fn vxlan_conf(direct_routing: bool) -> NetConf {
    NetConf {
        network: "10.244.0.0/16".parse().unwrap(),
        subnet_len: 24,
        subnet_min: Ipv4Addr::new(10, 244, 1, 0),
        subnet_max: Ipv4Addr::new(10, 244, 255, 0),
        subnet_range_set: false,
        enable_nftables: None,
        backend: BackendConf::Vxlan(VxlanConf {
            vni: 1,
            port: DEFAULT_VXLAN_PORT,
            gbp: false,
            learning: false,
            direct_routing,
            mtu: 0,
        }),
        warnings: Vec::new(),
    }
}

async fn uplink(handle: &rtnetlink::Handle) -> Result<ExtIface> {
    let selection = IfaceSelection {
        iface: vec![UPLINK.to_string()],
        ..Default::default()
    };
    iface::select_ext_iface(handle, &selection).await
}

fn options(dir: &Path) -> BpfOptions {
    BpfOptions {
        dir: dir.to_path_buf(),
        pod_bridge: "cni0".to_string(),
        records_dirs: vec![records_dir(dir)],
        force_fast_path: true,
        stale_after: std::time::Duration::from_secs(60),
        nat: None,
        stack_flows: None,
    }
}

/// A node running the BPF dataplane, registered and configured for `subnet`.
async fn bpf_node(
    dir: &Path,
    subnet: Ipv4Network,
    conf: &NetConf,
    previous: Option<&Lease>,
) -> Result<(Dataplane, Lease)> {
    let handle = netlink()?;
    let ext = uplink(&handle).await?;
    let (backend, why) = bpf::select_dataplane(
        DataplaneChoice::Bpf,
        bpf::EMBEDDED_OBJECT,
        conf,
        &ext,
        handle.clone(),
        &options(dir),
    )
    .await?;
    ensure!(why.starts_with("bpf ("), "dataplane: {why}");
    let mut dataplane = Dataplane::for_netconf(backend, conf, &ext, handle);
    let attrs = dataplane.register(previous).await?;
    let own = Lease { subnet, attrs };
    dataplane.configure(&own).await?;
    Ok((dataplane, own))
}

/// A node running the kernel backend of `conf` (as flanneld would), with these peers.
async fn kernel_node(
    conf: NetConf,
    subnet: Ipv4Network,
    previous: Option<Lease>,
    peers: Vec<Lease>,
) -> Result<Lease> {
    let handle = netlink()?;
    let ext = uplink(&handle).await?;
    let backend = backend::kernel_backend(&conf, &ext, handle.clone());
    let mut kernel = Dataplane::for_netconf(backend, &conf, &ext, handle);
    let attrs = kernel.register(previous.as_ref()).await?;
    let own = Lease { subnet, attrs };
    kernel.configure(&own).await?;
    kernel.resync(&peers).await?;
    Ok(own)
}

fn synthetic_lease(subnet: &str, public_ip: &str) -> Lease {
    let attrs: LeaseAttrs = serde_json::from_value(serde_json::json!({
        "PublicIP": public_ip,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "0e:00:00:00:00:99"},
    }))
    .unwrap();
    Lease {
        subnet: subnet.parse().unwrap(),
        attrs,
    }
}

// ---------------------------------------------------------------------------------------
// What a user would look at: bpftool, tc, ip.

fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {}", argv[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend_from_slice(args);
    run(&argv)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("a non-UTF-8 path")
}

/// `bpftool map dump pinned <dir>/<map> -j`: the BTF-formatted entries.
fn dump(dir: &Path, map: &str) -> Result<Vec<Value>> {
    let path = dir.join(map);
    let out = run(&["bpftool", "map", "dump", "pinned", path_str(&path)?, "-j"])?;
    let entries: Vec<Value> =
        serde_json::from_str(&out).with_context(|| format!("bpftool output: {out}"))?;
    entries
        .into_iter()
        .map(|e| {
            e.get("formatted").cloned().with_context(|| {
                format!("{map}: bpftool shows no BTF-formatted entry (no BTF for the map?): {e}")
            })
        })
        .collect()
}

fn bytes(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn octets(ip: Ipv4Addr) -> Vec<u64> {
    ip.octets().iter().map(|&b| u64::from(b)).collect()
}

fn mac_bytes(mac: &str) -> Vec<u64> {
    mac.split(':')
        .map(|b| u64::from_str_radix(b, 16).unwrap())
        .collect()
}

fn tc_ingress(ns: &str, dev: &str) -> Result<String> {
    run(&["tc", "-n", ns, "filter", "show", "dev", dev, "ingress"])
}

/// The program id of weft's filter in `tc filter show` output.
fn filter_prog_id(listing: &str) -> Option<u32> {
    let line = listing
        .lines()
        .find(|l| l.contains(WEFT_PREF) && l.contains(" id "))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "id")?;
    words.next()?.parse().ok()
}

fn link_field(ns: &str, dev: &str, field: &str) -> Result<Value> {
    let out = ip(ns, &["-j", "link", "show", "dev", dev])?;
    let links: Vec<Value> = serde_json::from_str(&out)?;
    links
        .first()
        .and_then(|l| l.get(field))
        .cloned()
        .with_context(|| format!("{dev} has no {field}"))
}

async fn wait_for(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if check()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn counter(dir: &Path, which: Counter) -> Result<u64> {
    let counters = bpf::read_counters(dir)?;
    Ok(counters
        .iter()
        .find(|(c, _)| *c == which)
        .map_or(0, |(_, n)| *n))
}

fn counters_total(dir: &Path) -> Result<u64> {
    Ok(bpf::read_counters(dir)?.iter().map(|(_, n)| n).sum())
}

// ---------------------------------------------------------------------------------------

#[test]
fn maps_programs_and_endpoints_follow_leases_and_pods() -> Result<()> {
    let mut lab = Lab::new("main")?;
    let nodes = lab.cluster(2)?;
    let dir = lab.pin_dir();
    let (node1, node2) = (&nodes[0], &nodes[1]);
    let (subnet1, subnet2) = (node1.subnet, node2.subnet);
    let node2_ns = node2.ns.clone();
    let lease2 = in_node(&node2_ns, move || {
        kernel_node(vxlan_conf(false), subnet2, None, Vec::new())
    })?;

    let (ns, pod1, pod2_ip) = (node1.ns.clone(), node1.pod.clone(), "10.244.2.2");
    in_node(&node1.ns.clone(), move || async move {
        let conf = vxlan_conf(false);
        let (mut dataplane, lease1) = bpf_node(&dir, subnet1, &conf, None).await?;
        dataplane.resync(std::slice::from_ref(&lease2)).await?;

        // leases: the other node's subnet, with named fields.
        let leases = dump(&dir, MAP_LEASES)?;
        ensure!(leases.len() == 1, "leases: {leases:?}");
        let value = &leases[0]["value"];
        ensure!(
            bytes(&value["public_ip"]) == octets(lease2.attrs.public_ip),
            "{value}"
        );
        ensure!(
            value["mode"].as_u64() == Some(u64::from(LEASE_VXLAN)),
            "{value}"
        );
        let mac2 = lease2.attrs.vxlan().unwrap().vtep_mac.to_string();
        ensure!(bytes(&value["vtep_mac"]) == mac_bytes(&mac2), "{value}");
        ensure!(
            leases[0]["key"].to_string().contains("24"),
            "key {}",
            leases[0]["key"]
        );

        let peers = dump(&dir, MAP_PEERS)?;
        ensure!(peers.len() == 1, "peers: {peers:?}");
        ensure!(
            bytes(&peers[0]["key"]["public_ip"]) == octets(lease2.attrs.public_ip),
            "{peers:?}"
        );
        ensure!(peers[0]["value"]["leases"].as_u64() == Some(1), "{peers:?}");

        let config = dump(&dir, MAP_CONFIG)?;
        let config = &config[0]["value"];
        let mac1 = lease1.attrs.vxlan().unwrap().vtep_mac.to_string();
        let uplink_index = link_field(&ns, UPLINK, "ifindex")?;
        ensure!(config["vni"].as_u64() == Some(1), "{config}");
        ensure!(config["vxlan_port"].as_u64() == Some(8472), "{config}");
        ensure!(
            bytes(&config["node_ip"]) == octets(Ipv4Addr::new(198, 18, 0, 11)),
            "{config}"
        );
        ensure!(config["uplink_ifindex"] == uplink_index, "{config}");
        ensure!(config["inner_mtu"].as_u64() == Some(1450), "{config}");
        ensure!(bytes(&config["vtep_mac"]) == mac_bytes(&mac1), "{config}");

        // Programs: from_netdev on the uplink, from_pod on the pod's veth.
        let uplink_filters = tc_ingress(&ns, UPLINK)?;
        ensure!(
            uplink_filters.contains("from_netdev") && uplink_filters.contains(WEFT_PREF),
            "uplink: {uplink_filters}"
        );
        let pod_filters = tc_ingress(&ns, POD_VETH)?;
        ensure!(
            pod_filters.contains("from_pod") && pod_filters.contains(WEFT_PREF),
            "{pod_filters}"
        );

        // A veth that joins cni0 later gets from_pod within a second.
        ip(
            &ns,
            &[
                "link",
                "add",
                "vethlate",
                "type",
                "veth",
                "peer",
                "name",
                "vethlatep",
            ],
        )?;
        ip(&ns, &["link", "set", "vethlate", "master", "cni0", "up"])?;
        let took = wait_for("from_pod on a new veth", Duration::from_secs(1), || {
            Ok(tc_ingress(&ns, "vethlate")?.contains("from_pod"))
        })
        .await?;
        eprintln!("from_pod attached to a new veth after {took:?}");

        // The pod's endpoint, learned from the bridge once the pod has talked.
        let before = counters_total(&dir)?;
        run(&[
            "ip",
            "netns",
            "exec",
            &pod1,
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "10.244.1.1",
        ])?;
        let veth_index = link_field(&ns, POD_VETH, "ifindex")?;
        let veth_mac = link_field(&ns, POD_VETH, "address")?;
        let pod_mac = link_field(&pod1, "eth0", "address")?;
        wait_for("the pod's endpoint", Duration::from_secs(2), || {
            let endpoints = dump(&dir, MAP_ENDPOINTS)?;
            Ok(endpoints.iter().any(|e| {
                bytes(&e["key"]["pod_ip"]) == octets(Ipv4Addr::new(10, 244, 1, 2))
                    && e["value"]["ifindex"] == veth_index
                    && bytes(&e["value"]["pod_mac"]) == mac_bytes(pod_mac.as_str().unwrap())
                    && bytes(&e["value"]["host_mac"]) == mac_bytes(veth_mac.as_str().unwrap())
            }))
        })
        .await?;
        ensure!(
            counters_total(&dir)? > before,
            "from_pod counted nothing while the pod pinged"
        );

        // Mixed cluster: pod1 (BPF node) reaches pod2 (kernel node) and back.
        let lease1_for_node2 = lease1.clone();
        let previous2 = lease2.clone();
        in_node(&node2_ns, move || {
            kernel_node(
                vxlan_conf(false),
                subnet2,
                Some(previous2),
                vec![lease1_for_node2],
            )
        })?;
        run(&[
            "ip", "netns", "exec", &pod1, "ping", "-c", "3", "-i", "0.2", "-W", "2", pod2_ip,
        ])
        .context("pod1 (BPF node) cannot reach pod2 (kernel node)")?;
        // ... through the programs: encapsulated by from_pod, replies decapsulated by from_netdev.
        let (encap, decap) = (
            counter(&dir, Counter::Encap)?,
            counter(&dir, Counter::Decap)?,
        );
        ensure!(
            encap >= 3 && decap >= 3,
            "encap {encap}, decap {decap}: the fast path was not used"
        );

        // A removed lease leaves the maps.
        dataplane.apply(&LeaseEvent::Removed(subnet2)).await?;
        ensure!(dump(&dir, MAP_LEASES)?.is_empty(), "leases after removal");
        ensure!(dump(&dir, MAP_PEERS)?.is_empty(), "peers after removal");

        // A deleted veth drops its endpoint.
        ip(&ns, &["link", "del", POD_VETH])?;
        wait_for(
            "the endpoint to go with its veth",
            Duration::from_secs(1),
            || Ok(dump(&dir, MAP_ENDPOINTS)?.is_empty()),
        )
        .await?;
        Ok(())
    })
}

#[test]
fn a_restarted_dataplane_adopts_the_maps_and_replaces_filters_in_place() -> Result<()> {
    let mut lab = Lab::new("restart")?;
    let nodes = lab.cluster(1)?;
    let dir = lab.pin_dir();
    let node = &nodes[0];
    let (ns, subnet) = (node.ns.clone(), node.subnet);
    in_node(&ns.clone(), move || async move {
        let conf = vxlan_conf(false);
        let peer = synthetic_lease("10.244.7.0/24", "198.18.0.17");
        // A map of an older layout under the pin name is replaced, not adopted.
        std::fs::create_dir_all(&dir)?;
        let stale = dir.join(MAP_PEERS);
        run(&[
            "bpftool",
            "map",
            "create",
            path_str(&stale)?,
            "type",
            "hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "4",
            "name",
            "peers",
        ])?;
        let (mut first, own) = bpf_node(&dir, subnet, &conf, None).await?;
        first.resync(std::slice::from_ref(&peer)).await?;
        let peers = dump(&dir, MAP_PEERS)?;
        ensure!(
            peers.len() == 1 && peers[0]["value"]["leases"].as_u64() == Some(1),
            "the incompatible pinned peers map was not replaced: {peers:?}"
        );
        let old_uplink = filter_prog_id(&tc_ingress(&ns, UPLINK)?).context("no uplink filter")?;
        let old_pod = filter_prog_id(&tc_ingress(&ns, POD_VETH)?).context("no pod filter")?;
        // The agent stops (SIGTERM): programs, filters and pins stay.
        drop(first);
        ensure!(filter_prog_id(&tc_ingress(&ns, UPLINK)?) == Some(old_uplink));

        // Watch TC notifications while the next run starts.
        let (connection, _, mut tc_events) =
            rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Tc])?;
        tokio::spawn(connection);

        let (mut second, _) = bpf_node(&dir, subnet, &conf, Some(&own)).await?;
        let leases = dump(&dir, MAP_LEASES)?;
        ensure!(
            leases.len() == 1
                && bytes(&leases[0]["value"]["public_ip"]) == octets(Ipv4Addr::new(198, 18, 0, 17)),
            "the restarted dataplane did not keep the lease map: {leases:?}"
        );
        second.resync(std::slice::from_ref(&peer)).await?;
        let new_uplink = filter_prog_id(&tc_ingress(&ns, UPLINK)?).context("no uplink filter")?;
        let new_pod = filter_prog_id(&tc_ingress(&ns, POD_VETH)?).context("no pod filter")?;
        ensure!(
            new_uplink != old_uplink && new_pod != old_pod,
            "the filters still run the old programs"
        );

        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut created, mut deleted) = (0, 0);
        while let Ok(Some((msg, _))) =
            tokio::time::timeout(Duration::from_millis(50), tc_events.next()).await
        {
            use rtnetlink::packet_core::NetlinkPayload::InnerMessage;
            use rtnetlink::packet_route::RouteNetlinkMessage as M;
            match msg.payload {
                InnerMessage(M::NewTrafficFilter(_)) => created += 1,
                InnerMessage(M::DelTrafficFilter(_)) => deleted += 1,
                _ => {}
            }
        }
        ensure!(
            created >= 2,
            "expected the two filters to be replaced, saw {created} notifications"
        );
        ensure!(deleted == 0, "a filter was deleted during the restart ({deleted} deletions): traffic had a moment without a program");
        Ok(())
    })
}

#[test]
fn peers_beyond_the_lease_map_stay_on_the_kernel_path_and_are_counted() -> Result<()> {
    let mut lab = Lab::new("overflow")?;
    let nodes = lab.cluster(1)?;
    let dir = lab.pin_dir();
    let (ns, subnet) = (nodes[0].ns.clone(), nodes[0].subnet);
    in_node(&ns.clone(), move || async move {
        // Network /16 at SubnetLen 24: the lease map holds 256 entries. This node's lease
        // is a /28 (as a podCIDR from a /28 node mask, with --kube-subnet-mgr), so peers'
        // /28 leases are valid, and 300 of them cannot all fit.
        let conf = vxlan_conf(false);
        let own = Ipv4Network::new(subnet.network(), 28)?;
        let (mut dataplane, _) = bpf_node(&dir, own, &conf, None).await?;
        let leases: Vec<Lease> = (0..300u32)
            .map(|i| {
                let net = format!("10.244.{}.{}/28", 100 + i / 16, (i % 16) * 16);
                synthetic_lease(&net, "198.18.0.12")
            })
            .collect();
        dataplane.resync(&leases).await?;
        ensure!(
            dataplane.overflow() == vec![(MAP_LEASES, 44)],
            "{:?}",
            dataplane.overflow()
        );
        ensure!(dump(&dir, MAP_LEASES)?.len() == 256);
        // Every peer has its kernel route: the 44 without room keep the kernel path.
        let routes = ip(&ns, &["route", "show", "proto", "87"])?;
        ensure!(routes.lines().count() == 300, "{routes}");
        // Removing peers makes room again.
        dataplane.resync(&leases[..200]).await?;
        ensure!(dataplane.overflow() == vec![(MAP_LEASES, 0)]);
        ensure!(dump(&dir, MAP_LEASES)?.len() == 200);
        Ok(())
    })
}

#[test]
fn cleanup_removes_what_weft_installed_and_nothing_else() -> Result<()> {
    let mut lab = Lab::new("cleanup")?;
    let nodes = lab.cluster(1)?;
    let dir = lab.pin_dir();
    let subnet_file = lab.tmp.path().join("subnet.env");
    let node = &nodes[0];
    let (ns, subnet) = (node.ns.clone(), node.subnet);
    in_node(&ns.clone(), move || async move {
        let conf = vxlan_conf(true);
        let (mut dataplane, own) = bpf_node(&dir, subnet, &conf, None).await?;
        // A peer on the same L2 segment: DirectRouting routes it via the uplink.
        dataplane
            .resync(&[synthetic_lease("10.244.2.0/24", "198.18.0.12")])
            .await?;
        ensure!(ip(&ns, &["route", "show", "10.244.2.0/24"])?.contains("via 198.18.0.12 dev eth0"));
        let leases = dump(&dir, MAP_LEASES)?;
        ensure!(
            leases.len() == 1
                && leases[0]["value"]["mode"].as_u64() == Some(u64::from(LEASE_DIRECT)),
            "a DirectRouting peer on the uplink's segment must be direct: {leases:?}"
        );
        weft::subnet_env::SubnetEnv {
            network: conf.network,
            subnet: own.subnet,
            mtu: dataplane.pod_mtu(),
            ipmasq: false,
        }
        .write(&subnet_file)?;
        drop(dataplane);
        // A foreign filter in the same clsact qdisc and a foreign route must survive.
        run(&[
            "tc", "-n", &ns, "filter", "add", "dev", UPLINK, "egress", "protocol", "ip", "u32",
            "match", "u32", "0", "0",
        ])?;
        ip(
            &ns,
            &["route", "add", "198.51.100.0/24", "via", "198.18.0.1"],
        )?;

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: AgentArgs,
        }
        let args = Cli::try_parse_from([
            "weft",
            "--cleanup",
            "--iface",
            UPLINK,
            "--bpf-dir",
            path_str(&dir)?,
            "--subnet-file",
            path_str(&subnet_file)?,
        ])?
        .args;
        weft::agent::cleanup(&args).await?;

        ensure!(
            !tc_ingress(&ns, UPLINK)?.contains(WEFT_PREF),
            "uplink filter left"
        );
        ensure!(
            !tc_ingress(&ns, POD_VETH)?.contains(WEFT_PREF),
            "pod filter left"
        );
        let qdiscs = run(&["tc", "-n", &ns, "qdisc", "show", "dev", POD_VETH])?;
        ensure!(
            !qdiscs.contains("clsact"),
            "clsact left on the pod veth: {qdiscs}"
        );
        let egress = run(&["tc", "-n", &ns, "filter", "show", "dev", UPLINK, "egress"])?;
        ensure!(
            egress.contains("u32"),
            "a foreign filter was removed: {egress}"
        );
        ensure!(!dir.exists(), "pins left under {}", dir.display());
        ensure!(
            ip(&ns, &["link", "show", "flannel.1"]).is_err(),
            "flannel.1 left"
        );
        ensure!(
            ip(&ns, &["route", "show", "10.244.2.0/24"])?.is_empty(),
            "lease route left"
        );
        ensure!(
            !ip(&ns, &["route", "show", "198.51.100.0/24"])?.is_empty(),
            "a foreign route was removed"
        );
        ensure!(!subnet_file.exists(), "subnet.env left");
        Ok(())
    })
}

/// Flips the first instruction of program `name` in `object` to `exit` with r0 unset: an
/// object the verifier refuses.
fn refused_object(object: &[u8], name: &str) -> Result<Vec<u8>> {
    let u16_at = |o: usize| u16::from_le_bytes(object[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(object[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(object[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let symtab = (0..shnum)
        .find(|&i| u32_at(section(i) + 4) == 2)
        .context("no symbol table")?;
    let (sym_off, sym_size) = (
        u64_at(section(symtab) + 0x18),
        u64_at(section(symtab) + 0x20),
    );
    let strtab = u64_at(section(u32_at(section(symtab) + 0x28)) + 0x18);
    for sym in (sym_off..sym_off + sym_size).step_by(24) {
        let name_at = strtab + u32_at(sym);
        let end = object[name_at..].iter().position(|&b| b == 0).unwrap();
        if &object[name_at..name_at + end] != name.as_bytes() {
            continue;
        }
        let shndx = u16_at(sym + 6);
        let at = u64_at(section(shndx) + 0x18) + u64_at(sym + 8);
        ensure!(
            object[at] != 0x18,
            "{name} starts with a 16-byte load: pick another patch"
        );
        let mut patched = object.to_vec();
        patched[at..at + 8].copy_from_slice(&[0x95, 0, 0, 0, 0, 0, 0, 0]);
        return Ok(patched);
    }
    bail!("no symbol {name} in the object")
}

#[test]
fn auto_falls_back_to_the_kernel_path_and_says_why() -> Result<()> {
    let mut lab = Lab::new("auto")?;
    let nodes = lab.cluster(1)?;
    let dir = lab.pin_dir();
    let ns = nodes[0].ns.clone();
    let subnet = nodes[0].subnet;
    in_node(&ns.clone(), move || async move {
        let handle = netlink()?;
        let ext = uplink(&handle).await?;
        let conf = vxlan_conf(false);
        let select = |choice, object: Vec<u8>| {
            let (conf, ext, handle, options) =
                (conf.clone(), ext.clone(), handle.clone(), options(&dir));
            async move { bpf::select_dataplane(choice, &object, &conf, &ext, handle, &options).await }
        };

        let (kernel, why) = select(DataplaneChoice::Auto, Vec::new()).await?;
        ensure!(
            why == "kernel (BPF unavailable: this weft binary was built without the eBPF object: \
                    run `cargo xtask build-ebpf` before building)",
            "{why}"
        );
        ensure!(kernel.pod_mtu() == 1450);

        let refused = refused_object(bpf::EMBEDDED_OBJECT, weft_common::PROG_FROM_POD)?;
        let (_, why) = select(DataplaneChoice::Auto, refused.clone()).await?;
        ensure!(
            why.starts_with("kernel (BPF unavailable: the kernel refused program from_pod"),
            "{why}"
        );
        eprintln!("dataplane: {why}");
        let err = match select(DataplaneChoice::Bpf, refused).await {
            Ok(_) => bail!("--dataplane=bpf accepted a program the kernel refuses"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains("--dataplane=bpf") && err.contains("refused program from_pod"),
            "{err}"
        );

        // Kernel mode after a BPF run: no weft filter and no pin is left.
        let (mut dataplane, _) = bpf_node(&dir, subnet, &conf, None).await?;
        dataplane.resync(&[]).await?;
        drop(dataplane);
        ensure!(tc_ingress(&ns, UPLINK)?.contains(WEFT_PREF) && dir.join(MAP_LEASES).exists());
        let (_, why) = select(DataplaneChoice::Kernel, bpf::EMBEDDED_OBJECT.to_vec()).await?;
        ensure!(why == "kernel (chosen by --dataplane=kernel)", "{why}");
        ensure!(
            !tc_ingress(&ns, UPLINK)?.contains(WEFT_PREF),
            "uplink filter left"
        );
        ensure!(
            !tc_ingress(&ns, POD_VETH)?.contains(WEFT_PREF),
            "pod filter left"
        );
        ensure!(!dir.exists(), "pins left");
        Ok(())
    })
}

#[test]
fn backend_mtu_sets_the_tunnel_mtu_of_the_programs_as_of_flannel_1() -> Result<()> {
    let mut lab = Lab::new("mtu")?;
    let nodes = lab.cluster(1)?;
    let dir = lab.pin_dir();
    let (ns, subnet) = (nodes[0].ns.clone(), nodes[0].subnet);
    in_node(&ns.clone(), move || async move {
        // Backend.MTU is the underlay's: flannel.1 gets 50 bytes less, and so must the
        // largest inner packet the programs encapsulate.
        let mut conf = vxlan_conf(false);
        if let BackendConf::Vxlan(vx) = &mut conf.backend {
            vx.mtu = 1400;
        }
        let (dataplane, _) = bpf_node(&dir, subnet, &conf, None).await?;
        ensure!(
            dataplane.pod_mtu() == 1350,
            "pod MTU {}",
            dataplane.pod_mtu()
        );
        ensure!(link_field(&ns, "flannel.1", "mtu")?.as_u64() == Some(1350));
        let config = &dump(&dir, MAP_CONFIG)?[0]["value"];
        ensure!(config["inner_mtu"].as_u64() == Some(1350), "{config}");
        Ok(())
    })
}

#[test]
fn host_gw_leases_are_routed_directly_by_the_programs() -> Result<()> {
    let mut lab = Lab::new("hostgw")?;
    let nodes = lab.cluster(2)?;
    let dir = lab.pin_dir();
    let (node1, node2) = (&nodes[0], &nodes[1]);
    let (subnet1, subnet2) = (node1.subnet, node2.subnet);
    let node2_ns = node2.ns.clone();
    let lease2 = in_node(&node2_ns, move || {
        kernel_node(host_gw_conf(), subnet2, None, Vec::new())
    })?;
    let (ns, pod1) = (node1.ns.clone(), node1.pod.clone());
    in_node(&ns.clone(), move || async move {
        let (mut dataplane, lease1) = bpf_node(&dir, subnet1, &host_gw_conf(), None).await?;
        dataplane.resync(std::slice::from_ref(&lease2)).await?;
        ensure!(dataplane.pod_mtu() == 1500);

        let leases = dump(&dir, MAP_LEASES)?;
        ensure!(
            leases.len() == 1
                && leases[0]["value"]["mode"].as_u64() == Some(u64::from(LEASE_DIRECT)),
            "{leases:?}"
        );
        let config = &dump(&dir, MAP_CONFIG)?[0]["value"];
        ensure!(
            config["inner_mtu"].as_u64() == Some(1500) && config["vni"].as_u64() == Some(0),
            "{config}"
        );
        ensure!(bytes(&config["vtep_mac"]) == vec![0; 6], "{config}");

        in_node(&node2_ns, move || {
            kernel_node(host_gw_conf(), subnet2, Some(lease2), vec![lease1])
        })?;
        // The pod talks first so that its endpoint is known for the replies.
        run(&[
            "ip",
            "netns",
            "exec",
            &pod1,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.244.1.1",
        ])?;
        wait_for("the pod's endpoint", Duration::from_secs(2), || {
            Ok(!dump(&dir, MAP_ENDPOINTS)?.is_empty())
        })
        .await?;
        run(&[
            "ip",
            "netns",
            "exec",
            &pod1,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "10.244.2.2",
        ])
        .context("pod1 (BPF node) cannot reach pod2 (kernel host-gw node)")?;
        let (out, inbound) = (
            counter(&dir, Counter::DirectOut)?,
            counter(&dir, Counter::DirectIn)?,
        );
        ensure!(
            out >= 3 && inbound >= 3,
            "direct_out {out}, direct_in {inbound}: the fast path was not used"
        );
        Ok(())
    })
}

/// The NAT collector removes mappings idle past their timeout and reverse entries left
/// without a mapping, keeps live mappings, and leaves alone a port that a program claimed
/// (to give it to a new flow) after the collector read it.
#[test]
fn the_nat_collector_removes_idle_mappings_and_leaves_claimed_ports() -> Result<()> {
    let mut lab = Lab::new("natgc")?;
    let nodes = lab.cluster(1)?;
    let dir = lab.pin_dir();
    let (ns, subnet) = (nodes[0].ns.clone(), nodes[0].subnet);
    in_node(&ns, move || async move {
        let (_dataplane, _) = bpf_node(&dir, subnet, &vxlan_conf(false), None).await?;
        let pin = |name: &str| -> Result<aya::maps::Map> {
            let data = aya::maps::MapData::from_pin(dir.join(name))?;
            Ok(aya::maps::Map::from_map_data(data)?)
        };
        let mut nat: aya::maps::HashMap<_, NatKey, NatEntry> = pin(MAP_NAT)?.try_into()?;
        let mut reverse: aya::maps::HashMap<_, NatKey, NatEntry> =
            pin(MAP_NAT_REVERSE)?.try_into()?;
        let mut claims: aya::maps::HashMap<_, NatClaim, u8> = pin(MAP_NAT_CLAIMS)?.try_into()?;
        let now = bpf::dataplane::monotonic_ns();
        let ago = |secs: u64| now - secs * 1_000_000_000;
        let node = [198, 18, 0, 11];
        let outside = [198, 51, 100, 1];
        let entry = |addr, port: u16, state, last_seen_ns| NatEntry {
            addr,
            port: port.to_be_bytes(),
            state,
            _pad: 0,
            last_seen_ns,
        };
        let closed = NAT_SEEN_CLOSE | NAT_SEEN_REPLY;
        // Pod port → (NAT port, state, seconds idle): closed 11 s ago (past conntrack's
        // 10 s), talking 1 s ago, closed 11 s ago but claimed by a program.
        let flows = [
            (40000u16, 61000u16, closed, 11),
            (40001, 61001, NAT_SEEN_REPLY, 1),
            (40003, 61003, closed, 11),
        ];
        let mut reply_keys = Vec::new();
        for (pod_port, nat_port, state, idle) in flows {
            let key = NatKey::new(6, [10, 244, 1, 2], pod_port.to_be_bytes(), outside, [0, 80]);
            let rkey = NatKey::new(6, outside, [0, 80], node, nat_port.to_be_bytes());
            nat.insert(key, entry(node, nat_port, state, ago(idle)), 0)?;
            let back = entry([10, 244, 1, 2], pod_port, state, ago(idle));
            reverse.insert(rkey, back, 0)?;
            reply_keys.push((key, rkey, back));
        }
        // A reverse entry whose mapping is gone (a lost race), idle 11 s.
        let orphan = NatKey::new(6, outside, [0, 80], node, 61002u16.to_be_bytes());
        reverse.insert(orphan, entry([10, 244, 1, 2], 40002, 0, ago(11)), 0)?;
        let (_, claimed_rkey, claimed_back) = reply_keys[2];
        let claim = NatClaim {
            reply: claimed_rkey,
            holder: claimed_back,
        };
        claims.insert(claim, 1, 0)?;

        let collected = bpf::nat::collect(&dir, now)?;
        ensure!(collected.removed == 1, "{collected:?}");
        let mut left: Vec<u16> = nat
            .keys()
            .map(|k| Ok(u16::from_be_bytes(k?.src_port)))
            .collect::<Result<_>>()?;
        left.sort();
        ensure!(left == [40001, 40003], "mappings left: {left:?}");
        let mut ports: Vec<u16> = reverse
            .keys()
            .map(|k| Ok(u16::from_be_bytes(k?.dst_port)))
            .collect::<Result<_>>()?;
        ports.sort();
        ensure!(ports == [61001, 61003], "reverse entries left: {ports:?}");
        Ok(())
    })
}
