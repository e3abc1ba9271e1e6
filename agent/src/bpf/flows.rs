//! Keeps the programs' record of the stack's connections (`stack_flows`, `stack_pods`) in
//! step with the kernel's conntrack, the state it stands for.
//!
//! The programs record a connection the node's stack carries for a local pod when they
//! see one of its packets leave the stack; they never forget one (an entry lost while the
//! connection lives would send its replies past the stack that translates them). This
//! keeper removes an entry once conntrack no longer knows the connection: conntrack moved
//! it only on packets it validated, so a spoofed RST cannot shorten it, and when it is gone
//! the stack has no translation left to apply. When the table is full, the programs put
//! the pod whose connection found no room on the kernel path for all its traffic; the
//! keeper copies that pod's connections from conntrack and, once all are recorded, lets
//! the fast path have the pod again.
//!
//! When conntrack cannot be read, nothing is removed and no pod is let back: the safe side.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use weft_common::{
    Counter, EndpointEntry, EndpointKey, FlowEntry, FlowKey, StackPod, MAP_ENDPOINTS,
    MAP_STACK_FLOWS, MAP_STACK_PODS, RECORDED_BY_AGENT,
};

use super::{bpffs, dataplane::remove_ok, read_counters};
use crate::conntrack::{self, Tuple4};

/// BPF_NOEXIST (linux/bpf.h): insert only if the key is new.
const BPF_NOEXIST: u64 = 1;

/// The size `stack_flows` gets: as many connections as the kernel's conntrack can hold
/// (`nf_conntrack_max`), within bounds; entries are allocated as they come.
pub fn table_size() -> u32 {
    const MIN: u32 = 65_536;
    const MAX: u32 = 1 << 21;
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(MIN)
        .clamp(MIN, MAX)
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Connections recorded after the pass.
    pub entries: u64,
    /// Entries removed: conntrack had forgotten their connection.
    pub removed: u64,
    /// Pods still on the kernel path for all their traffic.
    pub pods_on_stack: u64,
    /// Pods given back to the fast path in this pass.
    pub pods_released: u64,
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = bpffs::pin_path(dir, name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// The key the programs give the connection `t` belongs to (either direction).
fn key(t: &Tuple4) -> FlowKey {
    FlowKey::new(
        t.protocol,
        t.src.octets(),
        t.sport.to_be_bytes(),
        t.dst.octets(),
        t.dport.to_be_bytes(),
    )
}

/// One pass at `now_ns` (CLOCK_MONOTONIC, the programs' clock), taken before conntrack is
/// read: entries recorded after that may be missing from the dump and are kept.
pub fn keep(dir: &Path, now_ns: u64) -> Result<Kept> {
    let mut flows: BpfHashMap<MapData, FlowKey, FlowEntry> =
        open(dir, MAP_STACK_FLOWS)?.try_into()?;
    let mut pods: BpfHashMap<MapData, EndpointKey, StackPod> =
        open(dir, MAP_STACK_PODS)?.try_into()?;
    let endpoints: BpfHashMap<MapData, EndpointKey, EndpointEntry> =
        open(dir, MAP_ENDPOINTS)?.try_into()?;
    let full_before = flow_table_full(dir)?;
    let dump = conntrack::dump_ipv4().context("reading the kernel's conntrack table")?;
    let known: HashSet<FlowKey> = dump
        .iter()
        .flat_map(|e| [key(&e.original), key(&e.reply)])
        .collect();

    let mut kept = Kept::default();
    let mut forgotten = Vec::new();
    let mut recorded = 0u64;
    for item in flows.iter() {
        let (k, entry) = item.context("reading stack_flows")?;
        recorded += 1;
        if entry.recorded_ns < now_ns && !known.contains(&k) {
            forgotten.push(k);
        }
    }
    for k in &forgotten {
        remove_ok(flows.remove(k)).context("removing a stack_flows entry")?;
        kept.removed += 1;
    }

    let on_stack: Vec<(EndpointKey, StackPod)> = pods
        .iter()
        .collect::<Result<_, _>>()
        .context("reading stack_pods")?;
    for (pod, since) in on_stack {
        // A pod that is gone takes nothing with it; its address's next pod starts afresh.
        if endpoints.get(&pod, 0).is_err() {
            remove_ok(pods.remove(&pod)).context("removing a stack_pods entry")?;
            continue;
        }
        // A recording that failed after conntrack was read may be missing from the dump.
        let (complete, added) = record_all(&mut flows, &dump, pod.pod_ip, now_ns)?;
        recorded += added;
        if since.since_ns >= now_ns || !complete {
            kept.pods_on_stack += 1;
            continue;
        }
        remove_ok(pods.remove(&pod)).context("removing a stack_pods entry")?;
        // A program may have failed to record (and put the pod back) between the check
        // above and the removal: then the pod stays on the kernel path.
        if flow_table_full(dir)? != full_before {
            pods.insert(pod, since, 0)
                .context("restoring a stack_pods entry")?;
            kept.pods_on_stack += 1;
            continue;
        }
        tracing::info!(
            pod = %Ipv4Addr::from(pod.pod_ip),
            "every connection of the pod is recorded again: its traffic may take the fast path"
        );
        kept.pods_released += 1;
    }
    // As of this pass: what the programs recorded meanwhile shows in the next.
    kept.entries = recorded - kept.removed;
    Ok(kept)
}

/// Records every connection of `dump` that has `pod` at one end; whether all fit, and how
/// many entries it added.
fn record_all(
    flows: &mut BpfHashMap<MapData, FlowKey, FlowEntry>,
    dump: &[conntrack::Entry],
    pod: [u8; 4],
    now_ns: u64,
) -> Result<(bool, u64)> {
    let pod = Ipv4Addr::from(pod);
    let entry = FlowEntry {
        recorded_by: RECORDED_BY_AGENT,
        _pad: 0,
        recorded_ns: now_ns,
    };
    let mut added = 0;
    for e in dump {
        for t in [&e.original, &e.reply] {
            if t.src != pod && t.dst != pod {
                continue;
            }
            match flows.insert(key(t), entry, BPF_NOEXIST) {
                Ok(()) => added += 1,
                Err(MapError::SyscallError(s))
                    if s.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) if super::dataplane::map_full(&e) => return Ok((false, added)),
                Err(MapError::SyscallError(s))
                    if s.io_error.raw_os_error() == Some(libc::ENOMEM) =>
                {
                    return Ok((false, added))
                }
                Err(e) => return Err(e).context("recording a connection in stack_flows"),
            }
        }
    }
    Ok((true, added))
}

fn flow_table_full(dir: &Path) -> Result<u64> {
    Ok(read_counters(dir)?
        .into_iter()
        .find(|(c, _)| *c == Counter::FlowTableFull)
        .map_or(0, |(_, n)| n))
}
