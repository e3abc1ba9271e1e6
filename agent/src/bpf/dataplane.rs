//! `BpfDataplane`: the eBPF fast path on top of a kernel backend.
//!
//! The kernel backend (flannel.<VNI> + neighbours/FDB/routes, or host-gw routes) stays
//! installed exactly as in kernel mode: host traffic, unknown endpoints and everything the
//! programs pass go through it, nodes without BPF interoperate, and falling back is trivial.
//! On top of it the maps hold the same peer plan the kernel backend reconciles
//! ([`crate::plan`]): a lease is in `leases` exactly when the plan has it as a peer, in the
//! path it gives (through flannel.<VNI>: VXLAN; by a direct route: direct). A peer that
//! does not fit in the map stays on the kernel path, and is counted.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use async_trait::async_trait;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError};
use aya::Ebpf;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tracing::{debug, info, warn};

use weft_common::{
    DataplaneConfig, EndpointEntry, EndpointKey, LeaseEntry, PeerEntry, PeerKey,
    CONFIG_FAST_PATH_OFF, CONFIG_LEASES_INCOMPLETE, CONFIG_POLICY_UNKNOWN, LEASE_DIRECT,
    LEASE_VXLAN, MAP_CONFIG, MAP_ENDPOINTS, MAP_LEASES, MAP_NAT_EXCLUDE, MAP_PEERS, NAT_DRAIN,
    NAT_ENABLED, NAT_FAST, PROG_FROM_NETDEV, PROG_TO_NETDEV,
};

use super::endpoints::PodWatcher;
use super::{policy, read_counters, tc, BpfOptions};
use crate::backend::Backend;
use crate::config::{BackendConf, NetConf, VxlanConf};
use crate::iface::ExtIface;
use crate::lease::{Lease, LeaseAttrs};
use crate::plan::{Path, Peer, PeerChange, Plan};

pub(crate) type LeaseMap = LpmTrie<MapData, [u8; 4], LeaseEntry>;
pub(crate) type PeerMap = HashMap<MapData, PeerKey, PeerEntry>;
pub(crate) type EndpointMap = HashMap<MapData, EndpointKey, EndpointEntry>;
type ConfigMap = Array<MapData, DataplaneConfig>;

/// Takes map `name` out of `ebpf` as a typed handle.
pub(crate) fn take_map<M>(ebpf: &mut Ebpf, name: &str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    M::try_from(map).with_context(|| format!("map {name} does not have the expected type"))
}

pub struct BpfDataplane {
    kernel: Box<dyn Backend>,
    /// The loaded programs (shared with the pod watcher, which attaches `from_pod`).
    ebpf: Arc<Mutex<Ebpf>>,
    leases: LeaseMap,
    peers: PeerMap,
    /// The `config` map, shared with the heartbeat task.
    config: ConfigWriter,
    /// Handed to the pod watcher when the node's own lease is known.
    endpoints: Option<EndpointMap>,
    /// What `leases` holds, as this process wrote or last read it.
    programmed: BTreeMap<Ipv4Network, LeaseEntry>,
    vxlan: Option<VxlanConf>,
    ext: ExtIface,
    handle: Handle,
    options: BpfOptions,
    own: Option<Ipv4Network>,
    watcher: Option<PodWatcher>,
    /// Whether `from_netdev` was attached to the uplink by this process.
    uplink_attached: bool,
    /// What `register` returned (the config is rewritten when the fast path switches).
    attrs: Option<LeaseAttrs>,
    fast_path: FastPath,
    /// Peers of the last plan that the lease map had no room for.
    lease_overflow: u64,
    /// Network of net-conf.json: the programs' source NAT translates what leaves it.
    network: Ipv4Network,
}

impl BpfDataplane {
    /// Wraps `kernel` with the maps and programs of `ebpf` (from [`super::object::load`]).
    pub fn new(
        kernel: Box<dyn Backend>,
        mut ebpf: Ebpf,
        conf: &NetConf,
        ext: &ExtIface,
        handle: Handle,
        options: BpfOptions,
    ) -> Result<Self> {
        let leases: LeaseMap = take_map(&mut ebpf, MAP_LEASES)?;
        let peers: PeerMap = take_map(&mut ebpf, MAP_PEERS)?;
        let config: ConfigMap = take_map(&mut ebpf, MAP_CONFIG)?;
        let endpoints: EndpointMap = take_map(&mut ebpf, MAP_ENDPOINTS)?;
        let mut exclude: LpmTrie<MapData, [u8; 4], u32> = take_map(&mut ebpf, MAP_NAT_EXCLUDE)?;
        let wanted: Vec<Ipv4Network> = options
            .nat
            .as_ref()
            .map(|n| n.exclude.clone())
            .unwrap_or_default();
        sync_exclusions(&mut exclude, &wanted)?;
        let programmed = read_leases(&leases)?;
        if !programmed.is_empty() {
            info!(
                leases = programmed.len(),
                "adopted the BPF maps of the previous run under {}",
                options.dir.display()
            );
        }
        Ok(BpfDataplane {
            kernel,
            ebpf: Arc::new(Mutex::new(ebpf)),
            leases,
            peers,
            config: ConfigWriter(Arc::new(Mutex::new((config, None)))),
            endpoints: Some(endpoints),
            programmed,
            vxlan: match &conf.backend {
                BackendConf::Vxlan(vx) => Some(vx.clone()),
                BackendConf::HostGw => None,
            },
            ext: ext.clone(),
            handle,
            options,
            own: None,
            watcher: None,
            uplink_attached: false,
            attrs: None,
            fast_path: FastPath::on("not checked yet"),
            lease_overflow: 0,
            network: conf.network,
        })
    }

    /// The `CONFIG_*` flags of the current state.
    fn config_flags(&self) -> u16 {
        let mut flags = 0;
        if !self.fast_path.on {
            flags |= CONFIG_FAST_PATH_OFF;
        }
        if self.lease_overflow > 0 {
            flags |= CONFIG_LEASES_INCOMPLETE;
        }
        if self.fast_path.undecided {
            flags |= CONFIG_POLICY_UNKNOWN;
        }
        flags
    }

    fn write_config(&mut self, attrs: &LeaseAttrs) -> Result<()> {
        // The pods' MTU is flannel.<VNI>'s (Backend.MTU honoured) or the uplink's.
        let inner_mtu = self.kernel.pod_mtu();
        let (vni, port) = match &self.vxlan {
            Some(vx) => (vx.vni, vx.port),
            None => (0, 0),
        };
        let config = DataplaneConfig {
            vni,
            vxlan_port: port,
            flags: self.config_flags(),
            node_ip: self.ext.addr.octets(),
            uplink_ifindex: self.ext.index,
            inner_mtu,
            vtep_mac: attrs.vxlan().map(|d| d.vtep_mac.0).unwrap_or_default(),
            _pad2: [0; 2],
            _pad3: [0; 4],
            refreshed_ns: 0,
            stale_after_ns: self.options.stale_after.as_nanos() as u64,
            network: self.network.network().octets(),
            network_mask: self.network.mask().octets(),
            nat_flags: match &self.options.nat {
                Some(n) if n.drain => NAT_ENABLED | NAT_DRAIN,
                Some(n) if n.fast_path => NAT_ENABLED | NAT_FAST,
                Some(_) => NAT_ENABLED,
                None => 0,
            },
            nat_limit: self.options.nat.as_ref().map_or(0, |n| n.limit()),
            nat_port_min: self.options.nat.as_ref().map_or(0, |n| n.ports.0),
            nat_port_max: self.options.nat.as_ref().map_or(0, |n| n.ports.1),
            _pad4: [0; 4],
        };
        self.config.write(config)?;
        debug!(?config, "BPF dataplane config written");
        Ok(())
    }

    /// The lease entries of the plan's peers.
    fn wanted_entries(plan: &Plan) -> BTreeMap<Ipv4Network, LeaseEntry> {
        plan.peers
            .iter()
            .map(|(subnet, peer)| (*subnet, lease_entry(peer)))
            .collect()
    }

    /// Puts `entry` (or nothing) in `leases` for `subnet`, and fixes the peer counts.
    fn set_lease(&mut self, subnet: Ipv4Network, entry: Option<LeaseEntry>) -> Result<()> {
        let old = self.programmed.get(&subnet).copied();
        if old == entry {
            return Ok(());
        }
        let key = lease_key(subnet);
        match entry {
            Some(entry) => {
                match self.leases.insert(&key, entry, 0) {
                    Err(e) if map_full(&e) => {
                        self.note_overflow(self.lease_overflow + 1);
                        // Its node still tunnels to us (the kernel path takes it); the
                        // next resync sets the exact count.
                        let key = PeerKey {
                            public_ip: entry.public_ip,
                        };
                        if self.peers.get(&key, 0).is_err() {
                            self.peers.insert(key, PeerEntry { leases: 1 }, 0)?;
                        }
                        return Ok(());
                    }
                    other => other,
                }
                .with_context(|| format!("adding {subnet} to the BPF lease map"))?;
                self.programmed.insert(subnet, entry);
                debug!(%subnet, node = %Ipv4Addr::from(entry.public_ip), mode = mode_name(entry.mode), "BPF lease set");
            }
            None => {
                remove_ok(self.leases.remove(&key))
                    .with_context(|| format!("removing {subnet} from the BPF lease map"))?;
                self.programmed.remove(&subnet);
                debug!(%subnet, "BPF lease removed");
            }
        }
        let counts = peer_counts(&self.programmed);
        for ip in [old, entry].into_iter().flatten().map(|e| e.public_ip) {
            let key = PeerKey { public_ip: ip };
            match counts.get(&ip) {
                Some(&leases) => self.peers.insert(key, PeerEntry { leases }, 0),
                None => remove_ok(self.peers.remove(&key)),
            }
            .with_context(|| format!("updating peer {} in the BPF peer map", Ipv4Addr::from(ip)))?;
        }
        Ok(())
    }

    /// Makes `leases` and `peers` hold exactly `wanted` (and its peer counts).
    fn sync_maps(&mut self, wanted: BTreeMap<Ipv4Network, LeaseEntry>) -> Result<()> {
        let actual = read_leases(&self.leases)?;
        for (subnet, entry) in &actual {
            if !wanted.contains_key(subnet) {
                remove_ok(self.leases.remove(&lease_key(*subnet)))?;
                info!("resync: removed {subnet} from the BPF lease map: no lease routes it (entry {entry:?})");
            }
        }
        // Peers whose lease has no room still tunnel to us: the kernel path carries them.
        let counts = peer_counts(&wanted);
        let mut wanted = wanted;
        let mut overflow = Vec::new();
        for (subnet, entry) in &wanted {
            if actual.get(subnet) != Some(entry) {
                match self.leases.insert(&lease_key(*subnet), *entry, 0) {
                    Err(e) if map_full(&e) => overflow.push(*subnet),
                    Err(e) => {
                        return Err(e).context(format!("adding {subnet} to the BPF lease map"))
                    }
                    Ok(()) if actual.contains_key(subnet) => {
                        info!("resync: corrected {subnet} in the BPF lease map")
                    }
                    Ok(()) => {}
                }
            }
        }
        for subnet in &overflow {
            wanted.remove(subnet);
        }
        self.note_overflow(overflow.len() as u64);
        let actual_peers: BTreeMap<[u8; 4], u32> = self
            .peers
            .iter()
            .map(|r| r.map(|(k, v)| (k.public_ip, v.leases)))
            .collect::<Result<_, _>>()
            .context("reading the BPF peer map")?;
        for ip in actual_peers.keys() {
            if !counts.contains_key(ip) {
                remove_ok(self.peers.remove(&PeerKey { public_ip: *ip }))?;
            }
        }
        for (ip, &leases) in &counts {
            if actual_peers.get(ip) != Some(&leases) {
                self.peers
                    .insert(PeerKey { public_ip: *ip }, PeerEntry { leases }, 0)?;
            }
        }
        self.programmed = wanted;
        Ok(())
    }

    /// Records how many peers the lease map has no room for, saying so when it changes.
    fn note_overflow(&mut self, peers: u64) {
        let flag_changes = (peers > 0) != (self.lease_overflow > 0);
        if peers != self.lease_overflow {
            if peers > 0 {
                warn!(
                    "the BPF lease map is full: {peers} peers stay on the kernel path (their \
                     traffic works, without the fast path); the map is sized for the subnets \
                     of Network at SubnetLen in net-conf.json"
                );
            } else {
                info!("every peer fits in the BPF lease map again");
            }
        }
        self.lease_overflow = peers;
        if flag_changes {
            if let Some(attrs) = self.attrs.clone() {
                if let Err(e) = self.write_config(&attrs) {
                    warn!("updating the BPF config after the lease map filled: {e:#}");
                }
            }
        }
    }

    /// Attaches `from_netdev` and `to_netdev` to the uplink unless they already run there.
    async fn ensure_uplink_program(&mut self) -> Result<()> {
        let (index, name) = (self.ext.index, &self.ext.name);
        for program in [PROG_FROM_NETDEV, PROG_TO_NETDEV] {
            if let Some(how) =
                tc::ensure_attached(&self.handle, &self.ebpf, program, index, name).await?
            {
                if self.uplink_attached {
                    warn!("resync: re-attached {program} to {name}: its TC filter was gone");
                } else {
                    info!("attached {program} to {name} ({how})");
                }
            }
        }
        self.uplink_attached = true;
        Ok(())
    }

    /// Looks for netfilter rules that filter forwarded pod traffic (see [`policy`]) and
    /// switches the fast path off while there are any, or while the probe cannot tell,
    /// unless `--dataplane=bpf` forces it. Logs changes only.
    async fn check_forward_filters(&mut self) -> Result<()> {
        // Its tools run with deadlines; off the async runtime meanwhile.
        let probe = tokio::task::spawn_blocking(policy::probe)
            .await
            .context("the policy probe panicked")?;
        let wanted = decide(&probe, self.options.force_fast_path);
        if wanted == self.fast_path {
            return Ok(());
        }
        if wanted.on && !matches!(probe, policy::Probe::None) {
            warn!("fast path on: {}", wanted.why)
        } else if wanted.on {
            info!("fast path on: {}", wanted.why)
        } else {
            warn!(
                "fast path off: {}; pod traffic takes the kernel path",
                wanted.why
            )
        }
        let flags_change =
            (wanted.on, wanted.undecided) != (self.fast_path.on, self.fast_path.undecided);
        self.fast_path = wanted;
        if flags_change {
            if let Some(attrs) = self.attrs.clone() {
                self.write_config(&attrs)?;
            }
        }
        Ok(())
    }

    fn log_counters(&self) {
        match read_counters(&self.options.dir) {
            Ok(counters) => {
                let summary: Vec<String> = counters
                    .iter()
                    .map(|(c, n)| format!("{}={n}", c.name()))
                    .collect();
                debug!("BPF counters: {}", summary.join(" "));
            }
            Err(e) => debug!("reading the BPF counters failed: {e:#}"),
        }
    }
}

fn mode_name(mode: u32) -> &'static str {
    match mode {
        LEASE_VXLAN => "vxlan",
        LEASE_DIRECT => "direct",
        _ => "unknown",
    }
}

fn lease_entry(peer: &Peer) -> LeaseEntry {
    LeaseEntry {
        public_ip: peer.public_ip.octets(),
        mode: match peer.path {
            Path::Overlay => LEASE_VXLAN,
            Path::Direct => LEASE_DIRECT,
        },
        vtep_mac: peer.vtep_mac.map(|m| m.0).unwrap_or_default(),
        _pad: [0; 2],
    }
}

/// Whether an insert failed because the map has no room (hash maps: E2BIG; LPM tries:
/// ENOSPC).
pub(crate) fn map_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

fn lease_key(subnet: Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}

fn read_leases(map: &LeaseMap) -> Result<BTreeMap<Ipv4Network, LeaseEntry>> {
    let mut leases = BTreeMap::new();
    for item in map.iter() {
        let (key, entry) = item.context("reading the BPF lease map")?;
        let subnet = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
            .context("a malformed key in the BPF lease map")?;
        leases.insert(subnet, entry);
    }
    Ok(leases)
}

/// Makes `nat_exclude` hold exactly `wanted` (`--masquerade-exclude`).
fn sync_exclusions(map: &mut LpmTrie<MapData, [u8; 4], u32>, wanted: &[Ipv4Network]) -> Result<()> {
    let keys: Vec<Key<[u8; 4]>> = map.keys().collect::<Result<_, _>>()?;
    for key in keys {
        let net = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8);
        if !net.is_ok_and(|net| wanted.contains(&net)) {
            map.remove(&key)?;
        }
    }
    for net in wanted {
        map.insert(
            &Key::new(u32::from(net.prefix()), net.network().octets()),
            1,
            0,
        )
        .with_context(|| format!("adding {net} to the BPF masquerade exclusions"))?;
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How many leases name each public IP.
fn peer_counts(leases: &BTreeMap<Ipv4Network, LeaseEntry>) -> BTreeMap<[u8; 4], u32> {
    let mut counts = BTreeMap::new();
    for entry in leases.values() {
        *counts.entry(entry.public_ip).or_insert(0) += 1;
    }
    counts
}

/// A removal that found nothing is fine.
pub(crate) fn remove_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[async_trait]
impl Backend for BpfDataplane {
    async fn register(&mut self, previous: Option<&Lease>) -> Result<LeaseAttrs> {
        let attrs = self.kernel.register(previous).await?;
        self.attrs = Some(attrs.clone());
        // Before any program sees a packet: off from the start where policy rules exist.
        self.check_forward_filters().await?;
        self.write_config(&attrs)?;
        Ok(attrs)
    }

    async fn configure(&mut self, own: &Lease) -> Result<()> {
        self.kernel.configure(own).await?;
        self.own = Some(own.subnet);
        // Our own subnet is never a remote lease.
        self.set_lease(own.subnet, None)?;
        // The endpoint map is here until the watcher starts, then the watcher owns it.
        let endpoints = match (self.endpoints.take(), self.watcher.take()) {
            (Some(map), _) => map,
            (None, Some(watcher)) => watcher.stop().await,
            (None, None) => unreachable!("the endpoint map is either here or in the watcher"),
        };
        self.watcher = Some(PodWatcher::start(
            self.handle.clone(),
            self.ebpf.clone(),
            endpoints,
            self.options.pod_bridge.clone(),
            self.options.records_dirs.clone(),
            own.subnet,
        )?);
        Ok(())
    }

    async fn apply(&mut self, change: &PeerChange) -> Result<()> {
        let kernel = self.kernel.apply(change).await;
        let maps = match change {
            PeerChange::Set(peer) => self.set_lease(peer.subnet, Some(lease_entry(peer))),
            PeerChange::Removed(subnet) => self.set_lease(*subnet, None),
        };
        kernel.and(maps)
    }

    async fn resync(&mut self, plan: &Plan) -> Result<()> {
        let kernel = self.kernel.resync(plan).await;
        self.sync_maps(Self::wanted_entries(plan))?;
        // After the maps: the check runs three short processes, and `register` made the
        // first decision before any program ran.
        self.check_forward_filters().await?;
        // After the maps hold the lease table: from_netdev admits VXLAN from peers only.
        self.ensure_uplink_program().await?;
        if let Some(watcher) = &self.watcher {
            watcher.resync().await?;
        }
        self.log_counters();
        kernel
    }

    fn pod_mtu(&self) -> u32 {
        self.kernel.pod_mtu()
    }

    fn heartbeat(&self) -> Option<crate::backend::Heartbeat> {
        let config = self.config.clone();
        Some(Arc::new(move || config.refresh()))
    }

    fn overflow(&self) -> Vec<(&'static str, u64)> {
        vec![(MAP_LEASES, self.lease_overflow)]
    }

    fn fast_path(&self) -> Option<(bool, String)> {
        Some((self.fast_path.on, self.fast_path.why.clone()))
    }
}

/// The `config` map and what was last written to it. The dataplane writes whole configs;
/// the heartbeat task only refreshes `refreshed_ns` of the last one, under the same lock,
/// so it can never put back an older config over a newer one.
#[derive(Clone)]
struct ConfigWriter(Arc<Mutex<(ConfigMap, Option<DataplaneConfig>)>>);

impl ConfigWriter {
    /// Writes `config`, stamped now.
    fn write(&self, config: DataplaneConfig) -> Result<()> {
        Self::stamp(
            &mut self.0.lock().unwrap_or_else(|e| e.into_inner()),
            config,
        )
    }

    /// Re-stamps the last config written (nothing before the first), in one lock hold.
    fn refresh(&self) -> Result<()> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match guard.1 {
            Some(config) => Self::stamp(&mut guard, config),
            None => Ok(()),
        }
    }

    fn stamp(
        (map, last): &mut (ConfigMap, Option<DataplaneConfig>),
        mut config: DataplaneConfig,
    ) -> Result<()> {
        config.refreshed_ns = monotonic_ns();
        map.set(0, config, 0)
            .context("writing the BPF dataplane config")?;
        *last = Some(config);
        Ok(())
    }
}

/// Whether the programs redirect pod traffic, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FastPath {
    on: bool,
    why: String,
    /// The policy probe could not read every hook.
    undecided: bool,
}

impl FastPath {
    fn on(why: impl Into<String>) -> Self {
        FastPath {
            on: true,
            why: why.into(),
            undecided: false,
        }
    }

    fn off(why: impl Into<String>) -> Self {
        FastPath {
            on: false,
            why: why.into(),
            undecided: false,
        }
    }
}

/// The fast path's state after `probe`: off where rules filter forwarded pod traffic or
/// the probe could not tell, unless `force` (`--dataplane=bpf`).
fn decide(probe: &policy::Probe, force: bool) -> FastPath {
    let rules = |found: &[String]| match found.first() {
        Some(first) => format!("{first}{}", more(found)),
        None => String::new(),
    };
    match (probe, force) {
        (policy::Probe::None, _) => FastPath::on("no netfilter rule filters forwarded pod traffic"),
        (policy::Probe::Found(found), false) => FastPath::off(format!(
            "netfilter filters forwarded traffic ({}), which the fast path would bypass",
            rules(found)
        )),
        (policy::Probe::Found(found), true) => FastPath::on(format!(
            "forced by --dataplane=bpf although netfilter filters forwarded traffic ({}): \
             those rules do not see pod traffic between nodes",
            rules(found)
        )),
        (policy::Probe::Undecided { failures, found }, force) => {
            let failed: Vec<String> = failures
                .iter()
                .map(|f| format!("{}: {f}", f.tool.name()))
                .collect();
            let also = if found.is_empty() {
                String::new()
            } else {
                format!("; the other tools found {}", rules(found))
            };
            let why = format!(
                "the policy probe could not read the node's netfilter rules, so rules that \
                 filter forwarded pod traffic may exist unseen ({}{also})",
                failed.join("; ")
            );
            let mut state = if force {
                FastPath::on(format!(
                    "forced by --dataplane=bpf although {why}: such rules would not see pod traffic between nodes"
                ))
            } else {
                FastPath::off(format!(
                    "{why}; or run with --dataplane=bpf to keep the fast path on regardless"
                ))
            };
            state.undecided = true;
            state
        }
    }
}

/// ", and N more" for a list whose first item was named.
fn more(items: &[String]) -> String {
    match items.len() {
        0 | 1 => String::new(),
        n => format!(", and {} more", n - 1),
    }
}
