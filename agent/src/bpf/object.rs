//! Loading weft's eBPF object: maps created or adopted from their pins, programs verified.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Map, MapData, MapInfo};
use aya::programs::{ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, warn};

use weft_common::{
    ALL_MAPS, ALL_PROGRAMS, MAP_ENDPOINTS, MAP_LEASES, MAP_NAT, MAP_NAT_REVERSE, MAP_PEERS,
    MAP_STACK_FLOWS, MAP_STACK_PODS,
};

use super::bpffs;

/// The object `cargo xtask build-ebpf` made when this binary was built (empty if there
/// was none: see build.rs).
pub static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft.bpf.o"));

/// Why BPF cannot be used when the binary carries no object.
pub const NOT_BUILT_IN: &str = "this weft binary was built without the eBPF object: \
     run `cargo xtask build-ebpf` before building";

/// Loads `object` with its maps pinned under `dir` and every program verified by the
/// kernel. Maps already pinned there are adopted (their contents survive a restart) unless
/// their layout differs from the object's: those are unpinned and created afresh.
/// How many entries the sized maps hold: they follow from net-conf.json, so that a
/// cluster's every possible lease and a node's every possible pod fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `leases` and `peers`: one entry per possible subnet of Network at SubnetLen.
    pub leases: u32,
    /// `endpoints`: one per address of a SubnetLen subnet.
    pub endpoints: u32,
    /// `nat` and `nat_reverse`: `--masquerade-table-size`, the minimum when the programs
    /// do no source NAT.
    pub nat: u32,
    /// `stack_flows`: what the kernel's conntrack can hold (see [`super::flows`]).
    pub stack_flows: u32,
}

impl MapSizes {
    pub const MIN: u32 = 256;
    pub const MAX_LEASES: u32 = 1 << 18;
    pub const MAX_ENDPOINTS: u32 = 1 << 16;

    pub fn for_network(network_prefix: u8, subnet_len: u8) -> MapSizes {
        let pow = |bits: u32| 1u64.checked_shl(bits).unwrap_or(u64::MAX);
        let subnets = pow(u32::from(subnet_len.saturating_sub(network_prefix)));
        let addresses = pow(u32::from(32u8.saturating_sub(subnet_len)));
        let clamp = |n: u64, max: u32| n.clamp(u64::from(Self::MIN), u64::from(max)) as u32;
        MapSizes {
            leases: clamp(subnets, Self::MAX_LEASES),
            endpoints: clamp(addresses, Self::MAX_ENDPOINTS),
            nat: Self::MIN,
            stack_flows: super::flows::table_size(),
        }
    }

    /// With the NAT table of `size` entries (None: no source NAT, the minimum).
    pub fn with_nat(self, size: Option<u32>) -> MapSizes {
        MapSizes {
            nat: size.unwrap_or(Self::MIN),
            ..self
        }
    }

    /// With a `stack_flows` of `size` entries (None: [`super::flows::table_size`]).
    pub fn with_stack_flows(self, size: Option<u32>) -> MapSizes {
        MapSizes {
            stack_flows: size.unwrap_or(self.stack_flows),
            ..self
        }
    }

    fn apply(&self, loader: &mut EbpfLoader) {
        loader.map_max_entries(MAP_LEASES, self.leases);
        loader.map_max_entries(MAP_PEERS, self.leases);
        loader.map_max_entries(MAP_ENDPOINTS, self.endpoints);
        // One entry per possible local pod: putting a pod on the kernel path cannot fail.
        loader.map_max_entries(MAP_STACK_PODS, self.endpoints);
        loader.map_max_entries(MAP_STACK_FLOWS, self.stack_flows);
        loader.map_max_entries(MAP_NAT, self.nat);
        loader.map_max_entries(MAP_NAT_REVERSE, self.nat);
    }
}

pub fn load(object: &[u8], dir: &Path, sizes: MapSizes) -> Result<Ebpf> {
    if object.is_empty() {
        bail!(NOT_BUILT_IN);
    }
    bpffs::ensure_pin_dir(dir)?;
    unpin_incompatible(object, dir, sizes)?;
    let pins: Vec<_> = ALL_MAPS
        .iter()
        .map(|name| (*name, bpffs::pin_path(dir, name)))
        .collect();
    let mut loader = EbpfLoader::new();
    // Maps the object marks "pin by name" go to `dir` too, never to /sys/fs/bpf.
    loader.default_map_pin_directory(dir);
    sizes.apply(&mut loader);
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(object).with_context(|| {
        format!(
            "loading the eBPF object (maps pinned under {})",
            dir.display()
        )
    })?;
    for name in ALL_MAPS {
        if ebpf.map(name).is_none() {
            bail!("the eBPF object has no map {name:?}: it does not match this weft (rebuild it with `cargo xtask build-ebpf`)");
        }
    }
    for (name, _) in ALL_PROGRAMS {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(|e| refused(name, e))?;
    }
    Ok(ebpf)
}

/// The TC program `name` of `ebpf`.
pub fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not a TC classifier"))
}

/// "The kernel refused ...", with the end of the verifier log (where the reason is).
fn refused(name: &str, e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            debug!("verifier log of {name}:\n{log}");
            // The reason is in the last lines before the statistics.
            let statistics = ["verification time", "stack depth", "processed "];
            let lines: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !statistics.iter().any(|s| l.starts_with(s)))
                .collect();
            let tail = lines[lines.len().saturating_sub(2)..].join(" | ");
            anyhow!("the kernel refused program {name} ({io_error}): {tail}")
        }
        other => anyhow!(other).context(format!("loading program {name} into the kernel")),
    }
}

/// The kernel's view of a map: what must match for a pinned map to be adopted.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl Layout {
    fn of(info: &MapInfo) -> Layout {
        Layout {
            map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::Unsupported(d) => Some(d),
        _ => None,
    }
}

/// Unpins the maps under `dir` whose layout differs from the one `object` declares (a weft
/// upgrade that changed a map), so that loading creates them afresh.
fn unpin_incompatible(object: &[u8], dir: &Path, sizes: MapSizes) -> Result<()> {
    let pinned: Vec<&str> = ALL_MAPS
        .into_iter()
        .filter(|name| bpffs::pin_path(dir, name).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    // Creating the object's maps (dropped right after) tells what the kernel makes of
    // their definitions; no program is loaded. Maps the object marks "pin by name" are
    // pinned while they exist, in a scratch directory.
    // (bpffs refuses names with a dot.)
    let scratch = dir.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&scratch);
    sizes.apply(&mut loader);
    let fresh = loader.load(object);
    if let Ok(entries) = std::fs::read_dir(&scratch) {
        for entry in entries.flatten() {
            bpffs::unpin(&entry.path())?;
        }
    }
    std::fs::remove_dir(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    let fresh = fresh.context("loading the eBPF object's maps")?;
    for name in pinned {
        let path = bpffs::pin_path(dir, name);
        let want = fresh
            .map(name)
            .and_then(map_data)
            .map(|d| d.info().map(|i| Layout::of(&i)))
            .transpose()?;
        let have = MapInfo::from_pin(&path).map(|i| Layout::of(&i));
        let why = match (&want, &have) {
            (Some(want), Ok(have)) if want == have => {
                debug!("adopting the pinned map {}", path.display());
                continue;
            }
            (None, _) => "the eBPF object no longer has it".to_string(),
            (Some(want), Ok(have)) => format!("it has {have:?}, the new layout is {want:?}"),
            (Some(_), Err(e)) => format!("it cannot be opened: {e}"),
        };
        warn!(
            "the pinned map {} is incompatible ({why}): unpinning it and creating it afresh",
            path.display()
        );
        bpffs::unpin(&path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_follow_network_and_subnet_len() {
        let sizes = |p, l| {
            let s = MapSizes::for_network(p, l);
            (s.leases, s.endpoints)
        };
        assert_eq!(sizes(16, 24), (256, 256));
        assert_eq!(sizes(8, 24), (65536, 256));
        assert_eq!(sizes(16, 26), (1024, 256));
        assert_eq!(sizes(12, 20), (256, 4096));
        assert_eq!(sizes(0, 32), (MapSizes::MAX_LEASES, 256));
        assert_eq!(sizes(16, 8), (256, MapSizes::MAX_ENDPOINTS));
    }
}
