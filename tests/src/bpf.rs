//! Looking at a node's BPF dataplane from outside the agent: the lab's bpffs, the pinned
//! maps (read with aya straight from their pins, independently of the agent's code) and
//! weft's TC filters (as `tc` lists them).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, Map, MapData, MapInfo, PerCpuArray};
use serde_json::Value;
use weft_common::{
    Counter, EndpointEntry, EndpointKey, LeaseEntry, PeerEntry, PeerKey, ALL_MAPS, ALL_PROGRAMS,
    MAP_COUNTERS, MAP_ENDPOINTS, MAP_LEASES, MAP_PEERS,
};

use crate::exec::{run, Cmd};

/// The `pref` (priority) of weft's TC filters: 0x7765, "we" in ASCII.
pub const WEFT_FILTER_PRIORITY: u64 = 0x7765;

/// A bpffs instance mounted on a directory of the lab; unmounted on drop, which releases
/// every pin under it (maps still used by attached programs live on with them).
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    /// Mounts a new bpffs instance at `path` (created if missing).
    pub fn mount(path: &Path) -> Result<Bpffs> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let target = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: mount(2) with valid NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting a bpffs at {} (`mount -t bpf bpf <dir>`; needs root): {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Bpffs {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        unmount(&self.path);
    }
}

/// A bpffs instance of its own in a fresh temporary directory, for tests that load the
/// object outside a lab (the machine has none at /sys/fs/bpf, and a test must not touch one
/// that exists). Unmounted, then removed, on drop.
#[derive(Debug)]
pub struct TempBpffs {
    // Field order is drop order: unmount before the directory goes.
    mount: Bpffs,
    _dir: tempfile::TempDir,
}

impl TempBpffs {
    pub fn mount() -> Result<TempBpffs> {
        let dir = tempfile::Builder::new().prefix("weft-bpffs-").tempdir()?;
        Ok(TempBpffs {
            mount: Bpffs::mount(dir.path())?,
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        self.mount.path()
    }
}

/// Detaches the mount at `path` (lazily: it goes once nothing uses it). Errors are ignored:
/// this runs in teardown and in the sweep of leftovers.
pub fn unmount(path: &Path) {
    if let Ok(target) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: umount2(2) on a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Mount points (from /proc/self/mountinfo) below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        // "36 35 98:0 /mnt1 /mnt/parent rw,... - ext3 ...": the 5th field is the mount point.
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|mount_point| mount_point.starts_with(dir) && mount_point != dir)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// The datapath counters of one node, each summed over CPUs, in [`Counter::ALL`] order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfCounters {
    values: Vec<(Counter, u64)>,
}

impl BpfCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, n)| *n)
    }

    /// How much each counter grew since `earlier`.
    pub fn since(&self, earlier: &BpfCounters) -> BpfCounters {
        BpfCounters {
            values: self
                .values
                .iter()
                .map(|&(c, n)| (c, n.saturating_sub(earlier.get(c))))
                .collect(),
        }
    }

    /// Sum of the counters of drops (every `drop_*` counter).
    pub fn drops(&self) -> u64 {
        self.values
            .iter()
            .filter(|(c, _)| c.name().starts_with("drop_"))
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for BpfCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .values
            .iter()
            .map(|(c, n)| format!("{}={n}", c.name()))
            .collect();
        f.write_str(&parts.join(" "))
    }
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
}

/// The counters pinned under `dir` (a node's `--bpf-dir`).
pub fn read_counters(dir: &Path) -> Result<BpfCounters> {
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open_pinned(dir, MAP_COUNTERS)?)
        .context("the counters map is not a per-CPU array")?;
    let values = Counter::ALL
        .into_iter()
        .map(|counter| {
            let per_cpu = map
                .get(&counter.index(), 0)
                .with_context(|| format!("reading counter {}", counter.name()))?;
            Ok((counter, per_cpu.iter().sum()))
        })
        .collect::<Result<_>>()?;
    Ok(BpfCounters { values })
}

/// The `leases` map pinned under `dir`: (subnet, prefix length) → entry.
pub fn read_leases(dir: &Path) -> Result<BTreeMap<(Ipv4Addr, u8), LeaseEntry>> {
    let map: LpmTrie<MapData, [u8; 4], LeaseEntry> =
        LpmTrie::try_from(open_pinned(dir, MAP_LEASES)?)
            .context("the leases map is not an LPM trie")?;
    map.iter()
        .map(|item| {
            let (key, entry) = item.context("reading the leases map")?;
            Ok(((Ipv4Addr::from(key.data()), key.prefix_len() as u8), entry))
        })
        .collect()
}

/// The `endpoints` map pinned under `dir`: local pod IP → entry.
pub fn read_endpoints(dir: &Path) -> Result<BTreeMap<Ipv4Addr, EndpointEntry>> {
    let map: HashMap<MapData, EndpointKey, EndpointEntry> =
        HashMap::try_from(open_pinned(dir, MAP_ENDPOINTS)?)
            .context("the endpoints map is not a hash map")?;
    map.iter()
        .map(|item| {
            let (key, entry) = item.context("reading the endpoints map")?;
            Ok((Ipv4Addr::from(key.pod_ip), entry))
        })
        .collect()
}

/// The `peers` map pinned under `dir`: public IP → number of leases.
pub fn read_peers(dir: &Path) -> Result<BTreeMap<Ipv4Addr, u32>> {
    let map: HashMap<MapData, PeerKey, PeerEntry> = HashMap::try_from(open_pinned(dir, MAP_PEERS)?)
        .context("the peers map is not a hash map")?;
    map.iter()
        .map(|item| {
            let (key, entry) = item.context("reading the peers map")?;
            Ok((Ipv4Addr::from(key.public_ip), entry.leases))
        })
        .collect()
}

/// The kernel ids of the maps pinned under `dir` (a map that is adopted keeps its id),
/// by name, for the pins that exist.
pub fn pinned_map_ids(dir: &Path) -> BTreeMap<&'static str, u32> {
    ALL_MAPS
        .into_iter()
        .filter_map(|name| {
            let info = MapInfo::from_pin(dir.join(name)).ok()?;
            Some((name, info.id()))
        })
        .collect()
}

/// Entries (files) under `dir`; empty if it does not exist.
pub fn pins(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A weft TC filter on an interface's ingress or egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub iface: String,
    /// `ingress` or `egress`.
    pub hook: &'static str,
    /// The program name (`from_pod`, `to_pod`, `from_netdev` or `to_netdev`).
    pub program: String,
    pub prog_id: u64,
}

/// Every TC filter on every interface of namespace `ns` that is weft's: at weft's
/// priority, or running one of weft's programs.
pub fn weft_filters(ns: &str) -> Result<Vec<TcFilter>> {
    let out = run(&["ip", "-n", ns, "-j", "link", "show"])?;
    let links: Vec<Value> = serde_json::from_str(&out).context("`ip -j link show`")?;
    let mut found = Vec::new();
    for link in links {
        let Some(iface) = link["ifname"].as_str() else {
            continue;
        };
        found.extend(weft_filters_of(ns, iface)?);
    }
    Ok(found)
}

/// weft's TC filters on `iface` in `ns`, ingress then egress (see [`weft_filters`]).
pub fn weft_filters_of(ns: &str, iface: &str) -> Result<Vec<TcFilter>> {
    let mut found = Vec::new();
    for hook in ["ingress", "egress"] {
        let out =
            Cmd::new(["tc", "-n", ns, "-j", "filter", "show", "dev", iface, hook]).output()?;
        if !out.status.success() || out.stdout.trim().is_empty() {
            // No clsact qdisc (or the interface just went away): no filters.
            continue;
        }
        let filters: Vec<Value> = serde_json::from_str(&out.stdout).with_context(|| {
            format!(
                "`tc -j filter show dev {iface} {hook}` in {ns}: {}",
                out.stdout
            )
        })?;
        found.extend(
            filters
                .iter()
                .filter(|f| f["kind"].as_str() == Some("bpf") && f.get("options").is_some())
                .filter_map(|f| {
                    let options = &f["options"];
                    let program = options["prog"]["name"]
                        .as_str()
                        .or_else(|| options["bpf_name"].as_str())
                        .unwrap_or_default()
                        .to_string();
                    let ours = f["pref"].as_u64() == Some(WEFT_FILTER_PRIORITY)
                        || ALL_PROGRAMS
                            .iter()
                            .any(|(name, _)| program.starts_with(name));
                    ours.then(|| TcFilter {
                        iface: iface.to_string(),
                        hook,
                        program,
                        prog_id: options["prog"]["id"].as_u64().unwrap_or(0),
                    })
                }),
        );
    }
    Ok(found)
}
