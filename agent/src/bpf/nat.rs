//! The agent's side of BPF source NAT (the programs' side is `ebpf/src/nat.rs`): the
//! settings the programs get, the ports they allocate from, and the collector that removes
//! mappings whose flow went quiet, with conntrack's timeouts.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use ipnetwork::Ipv4Network;

use weft_common::{
    DataplaneConfig, NatClaim, NatEntry, NatKey, NatState, MAP_CONFIG, MAP_NAT, MAP_NAT_CLAIMS,
    MAP_NAT_REVERSE, MAP_NAT_STATE, NAT_SEEN_CLOSE, NAT_SEEN_REPLY,
};

use super::bpffs;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// What the BPF source NAT is told by the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSettings {
    /// Ports (ICMP identifiers) mappings take, inclusive.
    pub ports: (u16, u16),
    /// Entries of each NAT map (`--masquerade-table-size`).
    pub table_size: u32,
    /// Destinations that keep pod addresses (`--masquerade-exclude`).
    pub exclude: Vec<Ipv4Network>,
    /// `--masquerade-fast-path`.
    pub fast_path: bool,
    /// BPF source NAT is no longer wanted, but flows of an earlier run still hold
    /// mappings: they keep them until they end, new flows go to the kernel's masquerade.
    pub drain: bool,
}

impl NatSettings {
    /// New flows go to the kernel's masquerade once the table holds this many mappings,
    /// leaving room for the flows already marked for BPF on their way to the uplink.
    pub fn limit(&self) -> u32 {
        (self.table_size - self.table_size / 8).max(1)
    }
}

/// The NAT port range: `--masquerade-ports` if given, else the ports above the node's
/// ephemeral range (`net.ipv4.ip_local_port_range`, read in the agent's namespace), so
/// that mappings never take a port the node's own connections use.
pub fn port_range(flag: Option<&str>) -> Result<(u16, u16)> {
    if let Some(text) = flag {
        let parsed = text.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
        });
        return match parsed {
            Some((lo, hi)) if 1024 <= lo && lo <= hi && (lo, hi) != (1024, 65535) => Ok((lo, hi)),
            _ => bail!("--masquerade-ports {text:?} is not a range like 61000-65535 (from 1024, low before high, leaving ports for the kernel's masquerade)"),
        };
    }
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(_lo)), Some(Ok(hi))) = (numbers.next(), numbers.next()) else {
        bail!("{path} does not hold two ports: {text:?}");
    };
    if hi > 65535 - 1024 {
        bail!(
            "the node's ephemeral ports (net.ipv4.ip_local_port_range, {}) leave fewer than 1024 ports above them for BPF source NAT: give --masquerade-ports (a range the node's connections do not use), or --masquerade=nftables",
            text.trim()
        );
    }
    Ok((hi + 1, 65535))
}

/// The ports of the kernel masquerade's fallback: the rest (the larger side of the BPF
/// range), so that both never pick the same port toward the same destination. `port_range`
/// never returns a range that leaves none.
pub fn fallback_ports(nat: (u16, u16)) -> (u16, u16) {
    let below = nat.0.saturating_sub(1024);
    let above = 65535 - nat.1;
    if below >= above {
        (1024, nat.0 - 1)
    } else {
        (nat.1 + 1, 65535)
    }
}

/// What an earlier run's BPF source NAT left pinned under `dir`: its port range, its
/// table's size and how many flows still hold mappings. `None` when no flow does.
pub fn leftover(dir: &Path) -> Option<((u16, u16), u32, usize)> {
    let nat: NatMap = open(dir, MAP_NAT).ok()?.try_into().ok()?;
    let mappings = nat.keys().filter(Result::is_ok).count();
    if mappings == 0 {
        return None;
    }
    let size = aya::maps::MapInfo::from_pin(bpffs::pin_path(dir, MAP_NAT))
        .ok()?
        .max_entries();
    let config: Array<MapData, DataplaneConfig> = open(dir, MAP_CONFIG).ok()?.try_into().ok()?;
    let c = config.get(&0, 0).ok()?;
    (c.nat_port_min != 0).then_some(((c.nat_port_min, c.nat_port_max), size, mappings))
}

/// The key of the replies of the flow `key` mapped to `out` (the node's address and port).
pub fn reverse_key(key: &NatKey, out: &NatEntry) -> NatKey {
    // ICMP echo: the identifier is both "ports".
    let src_port = if key.protocol == IPPROTO_ICMP {
        out.port
    } else {
        key.dst_port
    };
    NatKey::new(key.protocol, key.dst_ip, src_port, out.addr, out.port)
}

/// How long a mapping lives after its last packet: conntrack's defaults, but 10 s after a
/// FIN or RST (the pod keeps its own TIME_WAIT; the programs may even give the port to a
/// new flow toward the same destination half a second after the close).
pub fn timeout(protocol: u8, state: u8) -> Duration {
    let secs = match protocol {
        IPPROTO_TCP if state & NAT_SEEN_CLOSE != 0 => 10,
        IPPROTO_TCP if state & NAT_SEEN_REPLY != 0 => 432_000,
        IPPROTO_TCP => 120,
        IPPROTO_UDP if state & NAT_SEEN_REPLY != 0 => 120,
        IPPROTO_UDP => 30,
        _ => 30,
    };
    Duration::from_secs(secs)
}

/// One mapping, both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub key: NatKey,
    pub out: NatEntry,
    pub back: Option<NatEntry>,
}

impl Mapping {
    pub fn state(&self) -> u8 {
        self.out.state | self.back.map_or(0, |b| b.state)
    }

    pub fn last_seen_ns(&self) -> u64 {
        self.out
            .last_seen_ns
            .max(self.back.map_or(0, |b| b.last_seen_ns))
    }

    pub fn pod(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(self.key.src_ip),
            u16::from_be_bytes(self.key.src_port),
        )
    }

    pub fn outside(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(self.key.dst_ip),
            u16::from_be_bytes(self.key.dst_port),
        )
    }

    pub fn node(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(self.out.addr),
            u16::from_be_bytes(self.out.port),
        )
    }
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = bpffs::pin_path(dir, name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

type NatMap = BpfHashMap<MapData, NatKey, NatEntry>;

/// Every mapping pinned under `dir`.
pub fn mappings(dir: &Path) -> Result<Vec<Mapping>> {
    let nat: NatMap = open(dir, MAP_NAT)?.try_into()?;
    let reverse: NatMap = open(dir, MAP_NAT_REVERSE)?.try_into()?;
    let mut out = Vec::new();
    for item in nat.iter() {
        let (key, entry) = item.context("reading the nat map")?;
        let back = reverse.get(&reverse_key(&key, &entry), 0).ok();
        out.push(Mapping {
            key,
            out: entry,
            back,
        });
    }
    Ok(out)
}

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Mappings left.
    pub entries: u64,
    /// Mappings removed.
    pub removed: u64,
}

/// Removes the mappings idle for longer than their timeout at `now_ns` (CLOCK_MONOTONIC),
/// and reverse entries whose mapping is gone, then sets the exact count the programs
/// compare with their limit.
pub fn collect(dir: &Path, now_ns: u64) -> Result<Collected> {
    let mut nat: NatMap = open(dir, MAP_NAT)?.try_into()?;
    let mut reverse: NatMap = open(dir, MAP_NAT_REVERSE)?.try_into()?;
    let mut state: Array<MapData, NatState> = open(dir, MAP_NAT_STATE)?.try_into()?;
    let mut claims: BpfHashMap<MapData, NatClaim, u8> = open(dir, MAP_NAT_CLAIMS)?.try_into()?;
    // The programs count each mapping they make into nat_state while this pass runs; those
    // are added back when the count is written (a mapping made before the walk reached it
    // is counted twice: a new flow then goes to the kernel's masquerade a little early,
    // and the next pass corrects it). Written as counted, they were lost: one flow too
    // many was marked for a full table.
    let made_before = state.get(&0, 0)?.entries;
    let mut expired = Vec::new();
    let mut live_reverse = std::collections::HashSet::new();
    let mut entries = 0u64;
    for item in nat.iter() {
        let (key, out) = item.context("reading the nat map")?;
        let rkey = reverse_key(&key, &out);
        let back = reverse.get(&rkey, 0).ok();
        let mapping = Mapping { key, out, back };
        let idle = Duration::from_nanos(now_ns.saturating_sub(mapping.last_seen_ns()));
        if idle > timeout(key.protocol, mapping.state()) {
            expired.push(mapping);
        } else {
            entries += 1;
            live_reverse.insert(rkey);
        }
    }
    // A reverse entry without its mapping: a port a lost race left taken.
    let mut orphans = Vec::new();
    for item in reverse.iter() {
        let (rkey, back) = item.context("reading the nat_reverse map")?;
        let idle = Duration::from_nanos(now_ns.saturating_sub(back.last_seen_ns));
        if !live_reverse.contains(&rkey) && idle > Duration::from_secs(10) {
            orphans.push((rkey, back));
        }
    }
    // The programs may give a port to a new flow, or reopen its flow, while this runs:
    // a port is removed only by claiming it as read (as the programs claim ports, so only
    // one side wins) and only while its entries are still what was read.
    let mut removed = 0;
    for mapping in &expired {
        let rkey = reverse_key(&mapping.key, &mapping.out);
        if let Some(back) = &mapping.back {
            if !remove_claimed(&mut claims, &mut reverse, &rkey, back) {
                continue;
            }
        }
        if nat.get(&mapping.key, 0).ok() == Some(mapping.out) && nat.remove(&mapping.key).is_ok() {
            removed += 1;
        }
    }
    for (rkey, back) in &orphans {
        remove_claimed(&mut claims, &mut reverse, rkey, back);
    }
    let made_during = state.get(&0, 0)?.entries.saturating_sub(made_before);
    let entries = entries + made_during;
    state.set(0, NatState { entries }, 0)?;
    Ok(Collected { entries, removed })
}

/// Removes the reverse entry `reply` if it still holds `holder`, having claimed it as the
/// programs claim a port they take over or reopen: of the two, only one wins.
fn remove_claimed(
    claims: &mut BpfHashMap<MapData, NatClaim, u8>,
    reverse: &mut NatMap,
    reply: &NatKey,
    holder: &NatEntry,
) -> bool {
    const BPF_NOEXIST: u64 = 1;
    let claim = NatClaim {
        reply: *reply,
        holder: *holder,
    };
    claims.insert(claim, 1, BPF_NOEXIST).is_ok()
        && reverse.get(reply, 0).ok().as_ref() == Some(holder)
        && reverse.remove(reply).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_given_are_checked() {
        assert_eq!(port_range(Some("61000-65535")).unwrap(), (61000, 65535));
        let err = port_range(Some("70-60")).unwrap_err().to_string();
        assert!(err.contains("--masquerade-ports \"70-60\""), "{err}");
    }

    #[test]
    fn the_fallback_takes_the_other_ports() {
        assert_eq!(fallback_ports((61000, 65535)), (1024, 60999));
        assert_eq!(fallback_ports((1024, 2047)), (2048, 65535));
        assert_eq!(fallback_ports((1025, 65535)), (1024, 1024));
        assert_eq!(fallback_ports((30000, 65534)), (1024, 29999));
        assert!(
            port_range(Some("1024-65535")).is_err(),
            "no room for the fallback"
        );
    }

    #[test]
    fn timeouts_follow_conntrack() {
        assert_eq!(timeout(IPPROTO_TCP, 0), Duration::from_secs(120));
        assert_eq!(
            timeout(IPPROTO_TCP, NAT_SEEN_REPLY),
            Duration::from_secs(432_000)
        );
        assert_eq!(
            timeout(IPPROTO_TCP, NAT_SEEN_REPLY | NAT_SEEN_CLOSE),
            Duration::from_secs(10)
        );
        assert_eq!(timeout(IPPROTO_UDP, 0), Duration::from_secs(30));
        assert_eq!(
            timeout(IPPROTO_UDP, NAT_SEEN_REPLY),
            Duration::from_secs(120)
        );
        assert_eq!(timeout(IPPROTO_ICMP, 0), Duration::from_secs(30));
    }

    #[test]
    fn an_echo_mapping_is_keyed_by_its_identifier_both_ways() {
        let key = NatKey {
            src_ip: [10, 244, 1, 2],
            dst_ip: [198, 51, 100, 1],
            src_port: 7u16.to_be_bytes(),
            dst_port: 7u16.to_be_bytes(),
            protocol: IPPROTO_ICMP,
            _pad: [0; 3],
        };
        let out = NatEntry {
            addr: [198, 18, 0, 11],
            port: 61234u16.to_be_bytes(),
            state: 0,
            _pad: 0,
            last_seen_ns: 0,
        };
        let r = reverse_key(&key, &out);
        assert_eq!((r.src_port, r.dst_port), (out.port, out.port));
        assert_eq!((r.src_ip, r.dst_ip), ([198, 51, 100, 1], [198, 18, 0, 11]));
    }
}
