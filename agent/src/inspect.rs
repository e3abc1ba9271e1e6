//! What an operator reads off a node, also while the agent is down: the pinned BPF maps
//! decoded (`weft bpf leases|peers|endpoints|counters|config`), and `weft status`, which
//! puts them together with subnet.env, the agent's record of how it started, weft's routes
//! and the agent's /readyz.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use serde::{Deserialize, Serialize};

use weft_common::{
    DataplaneConfig, EndpointEntry, EndpointKey, LeaseEntry, PeerEntry, PeerKey,
    CONFIG_FAST_PATH_OFF, CONFIG_LEASES_INCOMPLETE, LEASE_DIRECT, MAP_CONFIG, MAP_ENDPOINTS,
    MAP_LEASES, MAP_PEERS,
};

use crate::bpf::bpffs;
use crate::lease::MacAddr;

fn mac(bytes: [u8; 6]) -> String {
    MacAddr(bytes).to_string()
}

/// The pin of map `name` under `dir`, with an error that says what its absence means.
fn pinned(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = bpffs::pin_path(dir, name);
    if !path.exists() {
        bail!(
            "no weft map pinned at {}: the agent there runs the kernel dataplane (or never ran the BPF one); if it uses another --bpf-dir, give it",
            path.display()
        );
    }
    Ok(path)
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = pinned(dir, name)?;
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// One entry of the `leases` map: a remote subnet and how the fast path reaches it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRow {
    pub subnet: String,
    pub public_ip: Ipv4Addr,
    /// `vxlan` or `direct`.
    pub path: String,
    pub vtep_mac: String,
}

pub fn leases(dir: &Path) -> Result<Vec<LeaseRow>> {
    let map: LpmTrie<MapData, [u8; 4], LeaseEntry> = open_pinned(dir, MAP_LEASES)?.try_into()?;
    let mut rows = Vec::new();
    for item in map.iter() {
        let (key, entry) = item.context("reading the leases map")?;
        rows.push(LeaseRow {
            subnet: format!("{}/{}", Ipv4Addr::from(key.data()), key.prefix_len()),
            public_ip: Ipv4Addr::from(entry.public_ip),
            path: if entry.mode == LEASE_DIRECT {
                "direct"
            } else {
                "vxlan"
            }
            .to_string(),
            vtep_mac: mac(entry.vtep_mac),
        });
    }
    rows.sort_by_key(|r| sort_key(&r.subnet));
    Ok(rows)
}

fn sort_key(cidr: &str) -> (u32, String) {
    let ip = cidr
        .split('/')
        .next()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        .map(u32::from)
        .unwrap_or(u32::MAX);
    (ip, cidr.to_string())
}

/// One entry of the `peers` map: a node allowed to send us VXLAN.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRow {
    pub public_ip: Ipv4Addr,
    pub leases: u32,
}

pub fn peers(dir: &Path) -> Result<Vec<PeerRow>> {
    let map: BpfHashMap<MapData, PeerKey, PeerEntry> = open_pinned(dir, MAP_PEERS)?.try_into()?;
    let mut rows = Vec::new();
    for item in map.iter() {
        let (key, entry) = item.context("reading the peers map")?;
        rows.push(PeerRow {
            public_ip: Ipv4Addr::from(key.public_ip),
            leases: entry.leases,
        });
    }
    rows.sort_by_key(|r| u32::from(r.public_ip));
    Ok(rows)
}

/// One entry of the `endpoints` map: a local pod the fast path delivers to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRow {
    pub pod_ip: Ipv4Addr,
    pub ifindex: u32,
    /// The host-side veth's name, when it still exists.
    pub interface: Option<String>,
    pub pod_mac: String,
    pub host_mac: String,
}

pub fn endpoints(dir: &Path) -> Result<Vec<EndpointRow>> {
    let map: BpfHashMap<MapData, EndpointKey, EndpointEntry> =
        open_pinned(dir, MAP_ENDPOINTS)?.try_into()?;
    let mut rows = Vec::new();
    for item in map.iter() {
        let (key, entry) = item.context("reading the endpoints map")?;
        rows.push(EndpointRow {
            pod_ip: Ipv4Addr::from(key.pod_ip),
            ifindex: entry.ifindex,
            interface: interface_name(entry.ifindex),
            pod_mac: mac(entry.pod_mac),
            host_mac: mac(entry.host_mac),
        });
    }
    rows.sort_by_key(|r| u32::from(r.pod_ip));
    Ok(rows)
}

fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// A datapath counter, summed over CPUs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterRow {
    pub name: String,
    pub packets: u64,
}

pub fn counters(dir: &Path) -> Result<Vec<CounterRow>> {
    pinned(dir, weft_common::MAP_COUNTERS)?;
    Ok(crate::bpf::read_counters(dir)?
        .into_iter()
        .map(|(counter, packets)| CounterRow {
            name: counter.name().to_string(),
            packets,
        })
        .collect())
}

/// The `config` map's entry, decoded, with what it means for traffic now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConfigView {
    pub vni: u32,
    pub vxlan_port: u16,
    pub node_ip: Ipv4Addr,
    pub uplink_ifindex: u32,
    pub uplink: Option<String>,
    pub inner_mtu: u32,
    pub vtep_mac: String,
    /// False when the agent found netfilter rules the fast path would bypass.
    pub fast_path_on: bool,
    /// False when some leases did not fit in the `leases` map.
    pub leases_complete: bool,
    /// False when the agent's policy probe could not read the node's netfilter rules.
    #[serde(default = "yes")]
    pub policy_known: bool,
    /// Seconds since the agent last refreshed the entry.
    pub refreshed_secs_ago: f64,
    /// After how long without a refresh the programs hand every packet to the kernel
    /// path (None: never).
    pub stale_after_secs: Option<f64>,
    /// The refresh is older than `stale_after_secs`: every packet takes the kernel path.
    pub stale: bool,
    /// BPF source NAT: its port range and the mappings beyond which new flows go to the
    /// kernel's masquerade (None: the programs translate nothing).
    pub source_nat: Option<SourceNat>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceNat {
    pub port_min: u16,
    pub port_max: u16,
    pub limit: u32,
    /// Mappings now (the programs' count, made exact by the agent's collector).
    pub mappings: u64,
}

fn yes() -> bool {
    true
}

pub fn config(dir: &Path) -> Result<ConfigView> {
    let map: Array<MapData, DataplaneConfig> = open_pinned(dir, MAP_CONFIG)?.try_into()?;
    let c = map.get(&0, 0).context("reading the config map")?;
    let age_ns = crate::bpf::dataplane::monotonic_ns().saturating_sub(c.refreshed_ns);
    let stale_after = (c.stale_after_ns > 0).then_some(c.stale_after_ns);
    Ok(ConfigView {
        vni: c.vni,
        vxlan_port: c.vxlan_port,
        node_ip: Ipv4Addr::from(c.node_ip),
        uplink_ifindex: c.uplink_ifindex,
        uplink: interface_name(c.uplink_ifindex),
        inner_mtu: c.inner_mtu,
        vtep_mac: mac(c.vtep_mac),
        fast_path_on: c.flags & CONFIG_FAST_PATH_OFF == 0,
        leases_complete: c.flags & CONFIG_LEASES_INCOMPLETE == 0,
        policy_known: c.flags & weft_common::CONFIG_POLICY_UNKNOWN == 0,
        refreshed_secs_ago: Duration::from_nanos(age_ns).as_secs_f64(),
        stale_after_secs: stale_after.map(|ns| Duration::from_nanos(ns).as_secs_f64()),
        stale: stale_after.is_some_and(|ns| age_ns > ns),
        source_nat: (c.nat_flags & weft_common::NAT_ENABLED != 0).then(|| SourceNat {
            port_min: c.nat_port_min,
            port_max: c.nat_port_max,
            limit: c.nat_limit,
            mappings: nat_mappings(dir).unwrap_or(0),
        }),
    })
}

/// The `nat_state` map's count of mappings.
fn nat_mappings(dir: &Path) -> Result<u64> {
    let map: Array<MapData, weft_common::NatState> =
        open_pinned(dir, weft_common::MAP_NAT_STATE)?.try_into()?;
    Ok(map.get(&0, 0)?.entries)
}

/// What the agent records about itself next to subnet.env when it starts, so that
/// `weft status` knows its dataplane and why, where its maps and health port are, and
/// whether it still runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentRecord {
    pub pid: u32,
    /// `bpf` or `kernel`.
    pub mode: String,
    /// Why that dataplane (e.g. why BPF was unavailable).
    pub reason: String,
    pub bpf_dir: PathBuf,
    pub backend: String,
    pub iface: String,
    pub public_ip: Ipv4Addr,
    /// `ip:port` of /healthz and /readyz, when served.
    pub healthz: Option<String>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
}

impl AgentRecord {
    /// Where the record of the agent writing `subnet_file` lives: beside it.
    pub fn path(subnet_file: &Path) -> PathBuf {
        subnet_file.with_file_name("weft-agent.json")
    }

    pub fn write(&self, subnet_file: &Path) -> Result<()> {
        let path = Self::path(subnet_file);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(subnet_file: &Path) -> Result<Option<AgentRecord>> {
        let path = Self::path(subnet_file);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not weft's agent record", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Whether the recorded process still runs and is weft (a reused PID is not).
    pub fn running(&self) -> bool {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid));
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        exe.is_ok() && (cmdline.contains("weft") || cmdline.contains("flanneld"))
    }
}

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The counters with a non-zero count, as `name value` pairs on one line.
pub fn nonzero_counters(rows: &[CounterRow]) -> String {
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r.packets > 0)
        .map(|r| format!("{} {}", r.name, r.packets))
        .collect();
    if parts.is_empty() {
        "none yet".to_string()
    } else {
        parts.join(", ")
    }
}

/// One source NAT mapping: the pod's flow and the node's address and port it leaves with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NatRow {
    /// `tcp`, `udp` or `icmp` (echo: ports are its identifier).
    pub protocol: String,
    pub pod: String,
    pub outside: String,
    pub node: String,
    /// `new`, `replied`, `closing`.
    pub state: String,
    /// Seconds since the flow's last packet, either way.
    pub idle_secs: f64,
}

pub fn nat(dir: &Path) -> Result<Vec<NatRow>> {
    use crate::bpf::nat::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
    pinned(dir, weft_common::MAP_NAT)?;
    let now = crate::bpf::dataplane::monotonic_ns();
    let mut rows: Vec<NatRow> = crate::bpf::nat::mappings(dir)?
        .into_iter()
        .map(|m| {
            let endpoint = |(ip, port): (Ipv4Addr, u16)| format!("{ip}:{port}");
            let state = m.state();
            NatRow {
                protocol: match m.key.protocol {
                    IPPROTO_TCP => "tcp".into(),
                    IPPROTO_UDP => "udp".into(),
                    IPPROTO_ICMP => "icmp".into(),
                    other => other.to_string(),
                },
                pod: endpoint(m.pod()),
                outside: endpoint(m.outside()),
                node: endpoint(m.node()),
                state: if state & weft_common::NAT_SEEN_CLOSE != 0 {
                    "closing"
                } else if state & weft_common::NAT_SEEN_REPLY != 0 {
                    "replied"
                } else {
                    "new"
                }
                .into(),
                idle_secs: Duration::from_nanos(now.saturating_sub(m.last_seen_ns())).as_secs_f64(),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.protocol, &a.pod, &a.outside).cmp(&(&b.protocol, &b.pod, &b.outside)));
    Ok(rows)
}
