//! The agent's observable state: what readiness waits for, and the Prometheus metrics
//! (text exposition format 0.0.4) that `/metrics` renders from it.
//!
//! The agent updates an [`AgentState`] shared through an `Arc`: the updates on the lease
//! path are atomics, so the event loop never waits for a scrape. The BPF datapath counters
//! are not copied into it: they are read from the pinned `counters` map at scrape time.

use std::fmt::{Display, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};
use weft_common::Counter;

/// What the agent must have in place before `/readyz` answers 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyPart {
    /// This node's subnet lease is acquired.
    Lease,
    /// The dataplane (devices, routes, programs) and the firewall rules are installed.
    Dataplane,
    /// subnet.env is written, so the CNI plugin can configure pods.
    SubnetEnv,
    /// The last resync programmed every peer of the plan, and everything fit.
    Peers,
}

impl ReadyPart {
    pub const ALL: [ReadyPart; 4] = [
        ReadyPart::Lease,
        ReadyPart::Dataplane,
        ReadyPart::SubnetEnv,
        ReadyPart::Peers,
    ];

    /// The `condition` label of `weft_ready_condition`.
    pub const fn name(self) -> &'static str {
        match self {
            ReadyPart::Lease => "lease",
            ReadyPart::Dataplane => "dataplane",
            ReadyPart::SubnetEnv => "subnet_env",
            ReadyPart::Peers => "peers",
        }
    }

    /// What `/readyz` says while this part is missing.
    pub const fn missing(self) -> &'static str {
        match self {
            ReadyPart::Lease => "lease not acquired",
            ReadyPart::Dataplane => "dataplane not installed",
            ReadyPart::SubnetEnv => "subnet.env not written",
            ReadyPart::Peers => "peers not all programmed",
        }
    }
}

/// The dataplane in use, as `weft_dataplane_info` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneInfo {
    /// `bpf` or `kernel`.
    pub mode: String,
    /// Why this mode (for `kernel` under `--dataplane=auto`: why BPF is unavailable).
    pub reason: String,
    /// Where the BPF maps are pinned (BPF mode only): the datapath counters are read there.
    pub pin_dir: Option<PathBuf>,
}

impl DataplaneInfo {
    /// From the sentence `bpf::select_dataplane` returns, `<mode> (<reason>)`, and
    /// `--bpf-dir` (used only in BPF mode).
    pub fn from_selection(why: &str, bpf_dir: &Path) -> DataplaneInfo {
        let (mode, reason) = match why.split_once(" (") {
            Some((mode, rest)) => (mode, rest.strip_suffix(')').unwrap_or(rest)),
            None => (why, ""),
        };
        DataplaneInfo {
            mode: mode.trim().to_string(),
            reason: reason.trim().to_string(),
            pin_dir: (mode.trim() == "bpf").then(|| bpf_dir.to_path_buf()),
        }
    }
}

/// Upper bounds of the `weft_lease_apply_seconds` buckets: in nanoseconds (compared on
/// the hot path) and as the `le` label. A netlink round trip is ~0.1 ms; seconds mean
/// something is stuck.
const APPLY_BUCKETS: [(u64, &str); 13] = [
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
];

/// A histogram of durations over [`APPLY_BUCKETS`]. Each slot counts the observations of
/// its own bucket (the last one: above every bound); rendering makes them cumulative, so
/// `+Inf` always equals `_count`.
struct DurationHistogram {
    slots: [AtomicU64; APPLY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    fn new() -> Self {
        DurationHistogram {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let slot = APPLY_BUCKETS
            .iter()
            .position(|(bound, _)| nanos <= *bound)
            .unwrap_or(APPLY_BUCKETS.len());
        self.slots[slot].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn render(&self, out: &mut Exposition, name: &str) {
        let mut cumulative = 0;
        for ((_, le), slot) in APPLY_BUCKETS.iter().zip(&self.slots) {
            cumulative += slot.load(Relaxed);
            out.sample(&format!("{name}_bucket"), &[("le", le)], cumulative);
        }
        cumulative += self.slots[APPLY_BUCKETS.len()].load(Relaxed);
        out.sample(&format!("{name}_bucket"), &[("le", "+Inf")], cumulative);
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        out.sample(&format!("{name}_sum"), &[], sum);
        out.sample(&format!("{name}_count"), &[], cumulative);
    }
}

type CounterSource = Box<dyn Fn() -> u64 + Send + Sync>;

/// The agent's state for `/readyz` and `/metrics`. Share it as `Arc<AgentState>`.
pub struct AgentState {
    ready: [AtomicBool; ReadyPart::ALL.len()],
    leases_known: AtomicU64,
    dataplane: Mutex<Option<DataplaneInfo>>,
    /// The BPF fast path's state and why (BPF dataplane only).
    fast_path: Mutex<Option<(bool, String)>>,
    lease_apply: DurationHistogram,
    lease_apply_failures: AtomicU64,
    watch_restarts: Mutex<Option<CounterSource>>,
    /// Whether the last scrape could read the datapath counters (to log changes only).
    counters_readable: AtomicBool,
    peers: Mutex<PeerHealth>,
    resync_failures: AtomicU64,
    /// BPF source NAT: the table's size and the mappings at the last collection.
    nat: Mutex<Option<(u32, u64)>>,
    /// The fast path's record of the stack's connections (BPF dataplane only).
    stack_flows: Mutex<Option<StackFlows>>,
}

/// The fast path's record of the stack's connections, as its keeper last left it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackFlows {
    /// Connections recorded.
    pub entries: u64,
    /// Pods on the kernel path because a connection of theirs found no room.
    pub pods_on_stack: u64,
    /// Passes that could not read conntrack or the maps (nothing was removed then).
    pub failures: u64,
}

/// What the last plan and resync left: rejected leases, peers without room, the error.
#[derive(Clone, Debug, Default)]
pub struct PeerHealth {
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
    pub overflow: Vec<(&'static str, u64)>,
    pub resync_error: Option<String>,
}

impl PeerHealth {
    /// Why peers are not all programmed, if they are not (for /readyz).
    pub fn problem(&self) -> Option<String> {
        let full: Vec<String> = self
            .overflow
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(map, n)| format!("BPF map {map} full ({n} peers on the kernel path)"))
            .collect();
        let mut parts = full;
        if let Some(e) = &self.resync_error {
            parts.insert(0, format!("last resync failed: {e}"));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

impl Default for AgentState {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentState {
    pub fn new() -> Self {
        AgentState {
            ready: std::array::from_fn(|_| AtomicBool::new(false)),
            leases_known: AtomicU64::new(0),
            dataplane: Mutex::new(None),
            fast_path: Mutex::new(None),
            lease_apply: DurationHistogram::new(),
            lease_apply_failures: AtomicU64::new(0),
            watch_restarts: Mutex::new(None),
            counters_readable: AtomicBool::new(true),
            peers: Mutex::new(PeerHealth {
                rejected: crate::plan::Plan::default().rejected_by_reason(),
                ..PeerHealth::default()
            }),
            resync_failures: AtomicU64::new(0),
            nat: Mutex::new(None),
            stack_flows: Mutex::new(None),
        }
    }

    /// BPF source NAT runs with a table of `size` mappings.
    pub fn set_nat_table_size(&self, size: u32) {
        let mut nat = lock(&self.nat);
        *nat = Some((size, nat.map_or(0, |n| n.1)));
    }

    /// What the stack-flow keeper's last pass left (`None`: the pass failed).
    pub fn set_stack_flows(&self, kept: Option<(u64, u64)>) {
        let mut state = lock(&self.stack_flows);
        let mut now = state.unwrap_or_default();
        match kept {
            Some((entries, pods_on_stack)) => {
                now.entries = entries;
                now.pods_on_stack = pods_on_stack;
            }
            None => now.failures += 1,
        }
        *state = Some(now);
    }

    /// The mappings counted by the last collection.
    pub fn set_nat_entries(&self, entries: u64) {
        let mut nat = lock(&self.nat);
        *nat = Some((nat.map_or(0, |n| n.0), entries));
    }

    /// The outcome of a plan and resync (`resync_error: None` after a successful one).
    pub fn set_peer_health(&self, health: PeerHealth) {
        if health.resync_error.is_some() {
            self.resync_failures.fetch_add(1, Relaxed);
        }
        self.set_ready(ReadyPart::Peers, health.problem().is_none());
        *lock(&self.peers) = health;
    }

    /// After an incremental change: the rejected leases and overflow, keeping the last
    /// resync's error (the next resync decides about it).
    pub fn update_peer_counts(
        &self,
        rejected: std::collections::BTreeMap<&'static str, u64>,
        overflow: Vec<(&'static str, u64)>,
    ) {
        let mut peers = lock(&self.peers);
        peers.rejected = rejected;
        peers.overflow = overflow;
        self.set_ready(ReadyPart::Peers, peers.problem().is_none());
    }

    /// What /readyz says: each missing part, with details where there are any.
    pub fn not_ready(&self) -> Vec<String> {
        self.missing()
            .into_iter()
            .map(|part| match (part, lock(&self.peers).problem()) {
                (ReadyPart::Peers, Some(why)) => why,
                (part, _) => part.missing().to_string(),
            })
            .collect()
    }

    /// Marks one part of readiness as in place (or no longer).
    pub fn set_ready(&self, part: ReadyPart, in_place: bool) {
        self.ready[part as usize].store(in_place, Relaxed);
    }

    /// The parts readiness still waits for (empty: ready).
    pub fn missing(&self) -> Vec<ReadyPart> {
        ReadyPart::ALL
            .into_iter()
            .filter(|part| !self.ready[*part as usize].load(Relaxed))
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.missing().is_empty()
    }

    /// The size of the agent's lease table.
    pub fn set_leases_known(&self, leases: usize) {
        self.leases_known.store(leases as u64, Relaxed);
    }

    /// The dataplane in use; in BPF mode its pin dir is where the counters are read.
    pub fn set_dataplane(&self, info: DataplaneInfo) {
        *lock(&self.dataplane) = Some(info);
    }

    /// Whether the BPF fast path is on, and why (`None`: no fast path).
    pub fn set_fast_path(&self, state: Option<(bool, String)>) {
        *lock(&self.fast_path) = state;
    }

    /// One lease change applied to the dataplane in `took`.
    pub fn observe_lease_apply(&self, took: Duration) {
        self.lease_apply.observe(took);
    }

    /// One lease change the dataplane failed to apply.
    pub fn count_lease_apply_failure(&self) {
        self.lease_apply_failures.fetch_add(1, Relaxed);
    }

    /// Where `weft_watch_restarts_total` comes from (read at scrape time). Without a
    /// source (the etcd subnet manager) the metric is left out.
    pub fn set_watch_restarts_source(&self, source: impl Fn() -> u64 + Send + Sync + 'static) {
        *lock(&self.watch_restarts) = Some(Box::new(source));
    }

    /// [`Self::set_watch_restarts_source`] for a process-wide counter.
    pub fn set_watch_restarts_counter(&self, counter: &'static AtomicU64) {
        self.set_watch_restarts_source(move || counter.load(Relaxed));
    }

    /// The metrics in the Prometheus text format 0.0.4. In BPF mode this reads the pinned
    /// counters map (a few syscalls): call it off the async executor.
    pub fn render(&self) -> String {
        let pin_dir = lock(&self.dataplane)
            .as_ref()
            .and_then(|d| d.pin_dir.clone());
        let counters = pin_dir.map(|dir| {
            let read = crate::bpf::read_counters(&dir);
            self.log_counter_readability(&dir, &read);
            read
        });
        self.render_with_counters(counters)
    }

    fn log_counter_readability(&self, dir: &Path, read: &Result<Vec<(Counter, u64)>>) {
        let readable = read.is_ok();
        if self.counters_readable.swap(readable, Relaxed) != readable {
            match read {
                Ok(_) => info!("the datapath counters under {} are readable again", dir.display()),
                Err(e) => warn!("metrics: the datapath counters are unreadable (weft_datapath_packets_total is left out): {e:#}"),
            }
        }
    }

    /// Renders the state, with the datapath counters already read (None: kernel mode).
    fn render_with_counters(&self, counters: Option<Result<Vec<(Counter, u64)>>>) -> String {
        let mut out = Exposition::default();
        out.family("weft_build_info", "gauge", "The weft version running.");
        out.sample(
            "weft_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );

        out.family(
            "weft_ready",
            "gauge",
            "1 once the lease, the dataplane, subnet.env and every peer are in place (as /readyz).",
        );
        out.sample("weft_ready", &[], u8::from(self.is_ready()));
        out.family(
            "weft_ready_condition",
            "gauge",
            "Each part of readiness: 1 when in place.",
        );
        for part in ReadyPart::ALL {
            let in_place = self.ready[part as usize].load(Relaxed);
            out.sample(
                "weft_ready_condition",
                &[("condition", part.name())],
                u8::from(in_place),
            );
        }

        out.family(
            "weft_leases_known",
            "gauge",
            "Subnet leases in the agent's lease table.",
        );
        out.sample("weft_leases_known", &[], self.leases_known.load(Relaxed));

        if let Some(dataplane) = lock(&self.dataplane).as_ref() {
            out.family(
                "weft_dataplane_info",
                "gauge",
                "The dataplane in use (mode bpf or kernel) and why.",
            );
            out.sample(
                "weft_dataplane_info",
                &[("mode", &dataplane.mode), ("reason", &dataplane.reason)],
                1,
            );
        }

        if let Some((on, why)) = lock(&self.fast_path).as_ref() {
            out.family(
                "weft_fast_path_info",
                "gauge",
                "Whether the BPF fast path carries pod traffic (state on or off) and why.",
            );
            let state = if *on { "on" } else { "off" };
            out.sample(
                "weft_fast_path_info",
                &[("state", state), ("reason", why)],
                1,
            );
            out.family(
                "weft_fast_path_enabled",
                "gauge",
                "1 while the BPF fast path carries pod traffic, 0 while every packet takes the kernel path.",
            );
            out.sample("weft_fast_path_enabled", &[], u8::from(*on));
            out.family(
                "weft_policy_probe_undecided",
                "gauge",
                "1 when the last policy probe could not read the node's netfilter rules (the fast path is off then, unless --dataplane=bpf).",
            );
            out.sample(
                "weft_policy_probe_undecided",
                &[],
                u8::from(crate::bpf::policy::last_undecided()),
            );
            out.family(
                "weft_policy_probe_failures_total",
                "counter",
                "Runs of a policy probe tool that gave no answer, by tool and reason (missing, spawn, exit, timeout, parse).",
            );
            for (tool, reason, n) in crate::bpf::policy::failure_counts() {
                out.sample(
                    "weft_policy_probe_failures_total",
                    &[("tool", tool.name()), ("reason", reason.name())],
                    n,
                );
            }
        }

        if let Some(flows) = *lock(&self.stack_flows) {
            out.family(
                "weft_stack_flows",
                "gauge",
                "Connections the node's stack carries for local pods with a peer, recorded so that the fast path leaves them to the stack (kept until conntrack forgets them).",
            );
            out.sample("weft_stack_flows", &[], flows.entries);
            out.family(
                "weft_pods_on_kernel_path",
                "gauge",
                "Local pods whose traffic all takes the kernel path because a connection of theirs found no room in stack_flows.",
            );
            out.sample("weft_pods_on_kernel_path", &[], flows.pods_on_stack);
            out.family(
                "weft_stack_flows_keeper_failures_total",
                "counter",
                "Passes of the stack-flow keeper that could not read conntrack or the maps (it removed nothing then).",
            );
            out.sample(
                "weft_stack_flows_keeper_failures_total",
                &[],
                flows.failures,
            );
        }
        if let Some((size, entries)) = *lock(&self.nat) {
            out.family(
                "weft_nat_table_size",
                "gauge",
                "Mappings the BPF source NAT table holds (new flows go to the kernel's masquerade beyond 7/8 of it).",
            );
            out.sample("weft_nat_table_size", &[], size);
            out.family(
                "weft_nat_entries",
                "gauge",
                "BPF source NAT mappings at the last collection (allocations, failures and fallbacks are in weft_datapath_packets_total: nat_alloc, nat_alloc_failed, nat_fallback).",
            );
            out.sample("weft_nat_entries", &[], entries);
        }

        out.family(
            "weft_lease_apply_seconds",
            "histogram",
            "Time to apply one lease change to the dataplane.",
        );
        self.lease_apply
            .render(&mut out, "weft_lease_apply_seconds");
        out.family(
            "weft_lease_apply_failures_total",
            "counter",
            "Lease changes the dataplane failed to apply (the next resync retries them).",
        );
        out.sample(
            "weft_lease_apply_failures_total",
            &[],
            self.lease_apply_failures.load(Relaxed),
        );

        let peers = lock(&self.peers).clone();
        out.family(
            "weft_leases_rejected",
            "gauge",
            "Leases of other nodes ignored by validation, by reason (see the agent's log for the keys).",
        );
        for (reason, n) in &peers.rejected {
            out.sample("weft_leases_rejected", &[("reason", reason)], n);
        }
        if !peers.overflow.is_empty() {
            out.family(
                "weft_map_overflow",
                "gauge",
                "Peers a full BPF map has no room for (they stay on the kernel path).",
            );
            for (map, n) in &peers.overflow {
                out.sample("weft_map_overflow", &[("map", map)], n);
            }
        }
        out.family(
            "weft_resync_failures_total",
            "counter",
            "Resyncs that left something unprogrammed (retried at the next interval).",
        );
        out.sample(
            "weft_resync_failures_total",
            &[],
            self.resync_failures.load(Relaxed),
        );

        if let Some(source) = lock(&self.watch_restarts).as_ref() {
            out.family(
                "weft_watch_restarts_total",
                "counter",
                "Restarts of the Kubernetes API watch of the nodes.",
            );
            out.sample("weft_watch_restarts_total", &[], source());
        }

        if let Some(read) = counters {
            out.family(
                "weft_datapath_counters_readable",
                "gauge",
                "1 if the BPF counters map could be read at this scrape.",
            );
            out.sample(
                "weft_datapath_counters_readable",
                &[],
                u8::from(read.is_ok()),
            );
            if let Ok(counters) = read {
                out.family(
                    "weft_datapath_packets_total",
                    "counter",
                    "Packets the eBPF programs handled, by what they did with them.",
                );
                for (counter, packets) in counters {
                    out.sample(
                        "weft_datapath_packets_total",
                        &[("reason", counter.name())],
                        packets,
                    );
                }
            }
        }
        out.text
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data is plain values: a panic elsewhere while holding the lock leaves it usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A writer of the Prometheus text format 0.0.4.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label_value(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Label values escape `\`, `"` and line feeds.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str(r"\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str(r"\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn a_small_state_renders_exactly() {
        let state = AgentState::new();
        state.set_ready(ReadyPart::Lease, true);
        state.set_leases_known(3);
        state.set_dataplane(DataplaneInfo::from_selection(
            "kernel (chosen by --dataplane=kernel)",
            Path::new("/sys/fs/bpf/weft"),
        ));
        state.observe_lease_apply(Duration::from_micros(300));
        state.count_lease_apply_failure();
        let version = env!("CARGO_PKG_VERSION");
        let expected = format!(
            r#"# HELP weft_build_info The weft version running.
# TYPE weft_build_info gauge
weft_build_info{{version="{version}"}} 1
# HELP weft_ready 1 once the lease, the dataplane, subnet.env and every peer are in place (as /readyz).
# TYPE weft_ready gauge
weft_ready 0
# HELP weft_ready_condition Each part of readiness: 1 when in place.
# TYPE weft_ready_condition gauge
weft_ready_condition{{condition="lease"}} 1
weft_ready_condition{{condition="dataplane"}} 0
weft_ready_condition{{condition="subnet_env"}} 0
weft_ready_condition{{condition="peers"}} 0
# HELP weft_leases_known Subnet leases in the agent's lease table.
# TYPE weft_leases_known gauge
weft_leases_known 3
# HELP weft_dataplane_info The dataplane in use (mode bpf or kernel) and why.
# TYPE weft_dataplane_info gauge
weft_dataplane_info{{mode="kernel",reason="chosen by --dataplane=kernel"}} 1
# HELP weft_lease_apply_seconds Time to apply one lease change to the dataplane.
# TYPE weft_lease_apply_seconds histogram
weft_lease_apply_seconds_bucket{{le="0.0001"}} 0
weft_lease_apply_seconds_bucket{{le="0.00025"}} 0
weft_lease_apply_seconds_bucket{{le="0.0005"}} 1
weft_lease_apply_seconds_bucket{{le="0.001"}} 1
weft_lease_apply_seconds_bucket{{le="0.0025"}} 1
weft_lease_apply_seconds_bucket{{le="0.005"}} 1
weft_lease_apply_seconds_bucket{{le="0.01"}} 1
weft_lease_apply_seconds_bucket{{le="0.025"}} 1
weft_lease_apply_seconds_bucket{{le="0.05"}} 1
weft_lease_apply_seconds_bucket{{le="0.1"}} 1
weft_lease_apply_seconds_bucket{{le="0.25"}} 1
weft_lease_apply_seconds_bucket{{le="0.5"}} 1
weft_lease_apply_seconds_bucket{{le="1"}} 1
weft_lease_apply_seconds_bucket{{le="+Inf"}} 1
weft_lease_apply_seconds_sum 0.0003
weft_lease_apply_seconds_count 1
# HELP weft_lease_apply_failures_total Lease changes the dataplane failed to apply (the next resync retries them).
# TYPE weft_lease_apply_failures_total counter
weft_lease_apply_failures_total 1
# HELP weft_leases_rejected Leases of other nodes ignored by validation, by reason (see the agent's log for the keys).
# TYPE weft_leases_rejected gauge
weft_leases_rejected{{reason="backend_type"}} 0
weft_leases_rejected{{reason="covers_node"}} 0
weft_leases_rejected{{reason="default_route"}} 0
weft_leases_rejected{{reason="not_on_link"}} 0
weft_leases_rejected{{reason="outside_network"}} 0
weft_leases_rejected{{reason="overlap"}} 0
weft_leases_rejected{{reason="public_ip"}} 0
weft_leases_rejected{{reason="subnet_len"}} 0
weft_leases_rejected{{reason="subnet_range"}} 0
weft_leases_rejected{{reason="vtep_mac"}} 0
weft_leases_rejected{{reason="vtep_mac_shared"}} 0
# HELP weft_resync_failures_total Resyncs that left something unprogrammed (retried at the next interval).
# TYPE weft_resync_failures_total counter
weft_resync_failures_total 0
"#
        );
        assert_eq!(lines(&state.render()), lines(&expected));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_counts_everything() {
        let state = AgentState::new();
        for micros in [50, 100, 101, 700, 3_000, 2_000_000] {
            state.observe_lease_apply(Duration::from_micros(micros));
        }
        let text = state.render();
        let bucket = |le: &str| -> u64 {
            let prefix = format!("weft_lease_apply_seconds_bucket{{le=\"{le}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap();
            line[prefix.len()..].parse().unwrap()
        };
        // 0.1 ms is inclusive (le = "less or equal"); 2 s lands only in +Inf.
        assert_eq!(bucket("0.0001"), 2);
        assert_eq!(bucket("0.00025"), 3);
        assert_eq!(bucket("0.001"), 4);
        assert_eq!(bucket("0.005"), 5);
        assert_eq!(bucket("1"), 5);
        assert_eq!(bucket("+Inf"), 6);
        let mut previous = 0;
        for (_, le) in APPLY_BUCKETS {
            assert!(bucket(le) >= previous, "bucket {le} decreased");
            previous = bucket(le);
        }
        assert!(text.contains("\nweft_lease_apply_seconds_count 6\n"));
        assert!(
            text.contains("\nweft_lease_apply_seconds_sum 2.003951\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("one\ntwo"), r"one\ntwo");
        let state = AgentState::new();
        state.set_dataplane(DataplaneInfo::from_selection(
            "kernel (BPF unavailable: loading \"weft.bpf.o\": C:\\x\nverifier says no)",
            Path::new("/sys/fs/bpf/weft"),
        ));
        let text = state.render();
        assert!(
            text.contains(
                r#"weft_dataplane_info{mode="kernel",reason="BPF unavailable: loading \"weft.bpf.o\": C:\\x\nverifier says no"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn the_selection_sentence_gives_mode_reason_and_pin_dir() {
        let dir = Path::new("/sys/fs/bpf/weft-test");
        let bpf = DataplaneInfo::from_selection(
            "bpf (the kernel accepted the programs; eBPF fast path over the kernel vxlan path, maps pinned under /sys/fs/bpf/weft-test)",
            dir,
        );
        assert_eq!(bpf.mode, "bpf");
        assert!(bpf.reason.starts_with("the kernel accepted") && bpf.reason.ends_with("weft-test"));
        assert_eq!(bpf.pin_dir.as_deref(), Some(dir));
        let kernel =
            DataplaneInfo::from_selection("kernel (BPF unavailable: (nested) reason)", dir);
        assert_eq!(kernel.mode, "kernel");
        assert_eq!(kernel.reason, "BPF unavailable: (nested) reason");
        assert_eq!(kernel.pin_dir, None);
    }

    #[test]
    fn datapath_counters_and_watch_restarts_are_read_at_scrape_time() {
        static RESTARTS: AtomicU64 = AtomicU64::new(0);
        let state = AgentState::new();
        state.set_watch_restarts_counter(&RESTARTS);
        RESTARTS.store(4, Relaxed);
        let counters = Counter::ALL
            .iter()
            .map(|c| (*c, c.index() as u64 * 10))
            .collect();
        let text = state.render_with_counters(Some(Ok(counters)));
        assert!(text
            .contains("\n# TYPE weft_watch_restarts_total counter\nweft_watch_restarts_total 4\n"));
        assert!(text.contains("\nweft_datapath_counters_readable 1\n"));
        assert!(text.contains("\n# TYPE weft_datapath_packets_total counter\n"));
        assert!(text.contains("\nweft_datapath_packets_total{reason=\"encap\"} 0\n"));
        assert!(text.contains("\nweft_datapath_packets_total{reason=\"decap\"} 20\n"));
        assert!(text.contains("\nweft_datapath_packets_total{reason=\"drop_unknown_peer\"} 50\n"));

        let text = state.render_with_counters(Some(Err(anyhow::anyhow!("gone"))));
        assert!(text.contains("\nweft_datapath_counters_readable 0\n"));
        assert!(!text.contains("weft_datapath_packets_total"));
    }

    #[test]
    fn bpf_mode_with_missing_pins_says_the_counters_are_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let state = AgentState::new();
        state.set_dataplane(DataplaneInfo::from_selection("bpf (test)", dir.path()));
        let text = state.render();
        assert!(
            text.contains("\nweft_datapath_counters_readable 0\n"),
            "{text}"
        );
        assert!(text.contains("weft_dataplane_info{mode=\"bpf\",reason=\"test\"} 1"));
    }
}
