//! The BPF dataplane: weft's eBPF programs as a fast path on top of the kernel backend.
//!
//! - [`object`]: loading the embedded object, maps pinned (and adopted) under `--bpf-dir`,
//! - [`dataplane`]: [`BpfDataplane`], a [`Backend`] that wraps the kernel backend and keeps
//!   the `leases`, `peers` and `config` maps in step with it,
//! - [`endpoints`]: the pod watcher (`from_pod` on every pod veth, the `endpoints` map),
//! - [`tc`]: weft's TC filters, [`bpffs`]: the pin directory.
//!
//! Programs, filters and pins stay in place when the agent stops, so pods keep their
//! connectivity while it restarts; the next run adopts the maps and replaces the filters
//! in place.

pub mod bpffs;
pub mod dataplane;
pub mod endpoints;
pub mod flows;
pub mod nat;
pub mod object;
pub mod policy;
pub mod tc;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use rtnetlink::Handle;
use tracing::{info, warn};

use weft_common::{Counter, MAP_COUNTERS};

pub use dataplane::BpfDataplane;
pub use object::EMBEDDED_OBJECT;

use crate::backend::{self, Backend};
use crate::config::NetConf;
use crate::iface::ExtIface;

/// Where maps are pinned unless `--bpf-dir` says otherwise.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/weft";

/// `--dataplane`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneChoice {
    /// The eBPF fast path if the kernel accepts the programs, else the kernel path.
    Auto,
    /// The eBPF fast path, or fail saying why not.
    Bpf,
    /// The kernel path only (removes what an earlier BPF run left).
    Kernel,
}

/// The node-local settings of the BPF dataplane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfOptions {
    /// `--bpf-dir`: where the maps are pinned (on a bpffs).
    pub dir: PathBuf,
    /// `--pod-bridge`: the bridge whose ports are pod veths.
    pub pod_bridge: String,
    /// `--cni-records-dir`: where the pod records are (see [`crate::cni::record`]).
    pub records_dirs: Vec<PathBuf>,
    /// `--dataplane=bpf`: keep the fast path on even where netfilter rules filter
    /// forwarded traffic (`auto` switches it off there).
    pub force_fast_path: bool,
    /// `--bpf-stale-after`: how long the programs trust maps the agent no longer refreshes
    /// (zero: forever).
    pub stale_after: std::time::Duration,
    /// Source NAT by the programs (`--ip-masq` with `--masquerade bpf`).
    pub nat: Option<nat::NatSettings>,
    /// `--bpf-stack-flows-size` (None: from the kernel's conntrack size).
    pub stack_flows: Option<u32>,
}

impl BpfOptions {
    /// How often the agent refreshes the programs' config: a third of `stale_after`, at
    /// most every 5 s.
    pub fn heartbeat(&self) -> std::time::Duration {
        let third = self.stale_after / 3;
        if third.is_zero() {
            std::time::Duration::from_secs(5)
        } else {
            third.min(std::time::Duration::from_secs(5))
        }
    }
}

/// Builds the dataplane `choice` asks for on top of the kernel backend of `conf`. Returns it
/// with a sentence for the log saying which and why (`kernel (BPF unavailable: ...)`).
/// `object` is the eBPF object ([`EMBEDDED_OBJECT`] in the agent).
pub async fn select_dataplane(
    choice: DataplaneChoice,
    object: &[u8],
    conf: &NetConf,
    ext: &ExtIface,
    handle: Handle,
    options: &BpfOptions,
) -> Result<(Box<dyn Backend>, String)> {
    let kernel = backend::kernel_backend(conf, ext, handle.clone());
    let why_kernel = match choice {
        DataplaneChoice::Kernel => "kernel (chosen by --dataplane=kernel)".to_string(),
        DataplaneChoice::Auto | DataplaneChoice::Bpf => match object::load(
            object,
            &options.dir,
            object::MapSizes::for_network(conf.network.prefix(), conf.subnet_len)
                .with_nat(options.nat.as_ref().map(|n| n.table_size))
                .with_stack_flows(options.stack_flows),
        ) {
            Ok(ebpf) => {
                let dataplane =
                    BpfDataplane::new(kernel, ebpf, conf, ext, handle, options.clone())?;
                let why = format!(
                    "bpf (the kernel accepted the programs; eBPF fast path over the kernel {} path, maps pinned under {})",
                    conf.backend.type_name(),
                    options.dir.display()
                );
                return Ok((Box::new(dataplane), why));
            }
            Err(e) if choice == DataplaneChoice::Bpf => {
                return Err(e.context(
                    "--dataplane=bpf: the BPF dataplane is unavailable (--dataplane=auto falls back to the kernel path)",
                ))
            }
            Err(e) => format!("kernel (BPF unavailable: {e:#})"),
        },
    };
    // Switching modes must leave nothing stale: filters of an earlier BPF run would keep
    // running programs the agent no longer feeds.
    if let Err(e) = remove_leftovers(&handle, &options.dir).await {
        warn!("removing what an earlier BPF run left failed: {e:#}");
    }
    Ok((kernel, why_kernel))
}

/// Removes weft's TC filters from every interface and its pinned maps under `dir`.
pub async fn remove_leftovers(handle: &Handle, dir: &Path) -> Result<()> {
    for (iface, program) in tc::detach_everywhere(handle).await? {
        info!("removed weft's TC filter ({program}) from {iface}");
    }
    if bpffs::remove_pins(dir)? {
        info!("removed weft's pinned maps under {}", dir.display());
    }
    Ok(())
}

/// The datapath counters pinned under `dir`, each summed over CPUs.
pub fn read_counters(dir: &Path) -> Result<Vec<(Counter, u64)>> {
    let path = bpffs::pin_path(dir, MAP_COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data)?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(map).context("the counters map is not a per-CPU array")?;
    Counter::ALL
        .into_iter()
        .map(|counter| {
            let per_cpu = counters
                .get(&counter.index(), 0)
                .with_context(|| format!("reading counter {}", counter.name()))?;
            Ok((counter, per_cpu.iter().sum()))
        })
        .collect()
}
