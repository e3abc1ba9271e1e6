//! The control-plane benchmark (`weft-bench`'s control-plane section): how fast an agent
//! turns a large cluster's Node objects into its dataplane, and what memory that costs.
//!
//! A 1-node kube-mode lab (vxlan backend) on one dataplane: the API server emulator holds
//! `nodes` other Nodes, annotated as flanneld publishes them, before the agent starts. The
//! agent lists them all; the figure is the time from its log line "lease table (re)listed"
//! (the initial list complete) to the dataplane holding every lease: the BPF `leases` map
//! has `nodes` entries, or (kernel) the main table has `nodes` routes via flannel.1. Then
//! single changes (one Node's public-ip annotation moves), each timed from the patch request
//! to the dataplane showing the new address: the node's `leases` map entry (BPF), or its
//! flannel.1 FDB entry (kernel). Last, the agent's peak RSS (VmHWM).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};
use serde_json::json;
use weft_common::{LeaseEntry, MAP_LEASES};

use crate::exec::{wait_until, Cmd};
use crate::kube_lab::{self, PUBLIC_IP};
use crate::lab::{Backend, Dataplane, Lab, LabConfig, SubnetManager};
use crate::process::tail;

/// A Network with room for thousands of /24 podCIDRs (10.244.0.0/16 holds 255).
pub const CP_NETWORK: &str = "10.128.0.0/9";
/// The most peer Nodes the benchmark creates: the /9 holds 32767 /24s after the own node's,
/// the BPF `leases` map 16384 entries.
pub const MAX_CP_NODES: usize = 16_000;
/// The peers' public IPs: 198.19.0.1 and up; the changes move them to 198.19.128.1 and up
/// (both in 198.18.0.0/15, outside the lab's underlay 198.18.0.0/24).
const PEER_IP_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const CHANGED_IP_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
/// The VXLAN device of the lab's network (VNI 1).
const VXLAN_DEVICE: &str = "flannel.1";
const VNI: u32 = 1;
/// The agent's log line once the initial list is complete (agent.rs).
const LISTED_LINE: &str = "lease table (re)listed";
/// How long the agent may take to program every lease.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one change may take to show before it counts as lost.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between changes, so that each one finds the agent idle.
const CHANGE_GAP: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug)]
pub struct CpOptions {
    /// Peer Nodes in the cluster.
    pub nodes: usize,
    /// Single changes timed.
    pub changes: usize,
}

impl Default for CpOptions {
    fn default() -> Self {
        CpOptions {
            nodes: 5000,
            changes: 200,
        }
    }
}

/// What one dataplane measured.
#[derive(Clone, Debug)]
pub struct CpResult {
    pub dataplane: Dataplane,
    pub nodes: usize,
    /// From the agent's initial list completing to every lease programmed (None: the list
    /// line was not found in the agent log).
    pub programmed_after_list: Option<Duration>,
    /// From spawning the agent to every lease programmed (connect, list, program).
    pub programmed_after_start: Duration,
    /// Each change's time from the patch request to the dataplane showing it.
    pub changes: Vec<Duration>,
    /// Changes that did not show within [`CHANGE_TIMEOUT`] (counted in `changes` as it).
    pub lost_changes: usize,
    /// The agent's peak resident set (VmHWM), KiB.
    pub peak_rss_kib: u64,
}

impl CpResult {
    /// The `q` quantile (0..=1, nearest rank) of the change times.
    pub fn change_quantile(&self, q: f64) -> Option<Duration> {
        quantile(&self.changes, q)
    }
}

pub fn label(dataplane: Dataplane) -> &'static str {
    match dataplane {
        Dataplane::Bpf | Dataplane::Auto => "weft BPF",
        Dataplane::Kernel => "kernel (flannel.1)",
    }
}

/// Nearest-rank quantile of `values`.
pub fn quantile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// A peer Node as the benchmark creates it: `index` (from 1) names it, its podCIDR is the
/// lab's allocation for node `index + 1` (node 1 is the one under test).
struct Peer {
    name: String,
    subnet: Ipv4Addr,
    cidr: String,
    public_ip: Ipv4Addr,
    vtep_mac: String,
}

impl Peer {
    fn new(lab: &Lab, index: usize) -> Result<Peer> {
        let cidr = lab.assigned_pod_cidr(index + 1)?;
        let subnet = cidr
            .split_once('/')
            .and_then(|(ip, _)| ip.parse().ok())
            .with_context(|| format!("podCIDR {cidr:?}"))?;
        let [_, _, hi, lo] = (index as u32).to_be_bytes();
        Ok(Peer {
            name: format!("cp-{index:05}"),
            subnet,
            cidr,
            public_ip: offset(PEER_IP_BASE, index),
            vtep_mac: format!("0e:cb:00:00:{hi:02x}:{lo:02x}"),
        })
    }

    fn node_object(&self) -> Result<k8s_openapi::api::core::v1::Node> {
        let mut node = kube_lab::node_object(&self.name, self.public_ip, Some(&self.cidr))?;
        let annotations = kube_lab::flanneld_vxlan_annotations(self.public_ip, VNI, &self.vtep_mac);
        node.metadata.annotations = Some(serde_json::from_value(annotations)?);
        Ok(node)
    }
}

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

/// Looks at node 1's dataplane from outside the agent.
enum Probe {
    /// The pinned `leases` map, opened once.
    Bpf(LpmTrie<MapData, [u8; 4], LeaseEntry>),
    /// The node's namespace, seen through the agent's /proc entry (routes) and `bridge`.
    Kernel { ns: String, agent_pid: u32 },
}

impl Probe {
    fn open(lab: &Lab, dataplane: Dataplane, agent_pid: u32) -> Result<Probe> {
        Ok(match dataplane {
            Dataplane::Bpf | Dataplane::Auto => {
                let pin = lab.bpf_dir(1).join(MAP_LEASES);
                let data = MapData::from_pin(&pin)
                    .with_context(|| format!("opening the pinned map {}", pin.display()))?;
                let map = LpmTrie::try_from(Map::from_map_data(data)?)
                    .context("the leases map is not an LPM trie")?;
                Probe::Bpf(map)
            }
            Dataplane::Kernel => Probe::Kernel {
                ns: lab.node_ns(1).to_string(),
                agent_pid,
            },
        })
    }

    /// How many leases the dataplane holds.
    fn programmed(&self) -> Result<usize> {
        match self {
            Probe::Bpf(map) => Ok(map.keys().filter(|k| k.is_ok()).count()),
            Probe::Kernel { agent_pid, .. } => {
                // The main table of the agent's namespace, without spawning anything.
                let path = format!("/proc/{agent_pid}/net/route");
                let table =
                    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                Ok(table
                    .lines()
                    .filter(|l| l.split_whitespace().next() == Some(VXLAN_DEVICE))
                    .count())
            }
        }
    }

    /// Whether `peer`'s lease is programmed (cheap: one lookup).
    fn has(&self, peer: &Peer) -> Result<bool> {
        match self {
            Probe::Bpf(map) => Ok(map.get(&Key::new(24, peer.subnet.octets()), 0).is_ok()),
            Probe::Kernel { .. } => Ok(true),
        }
    }

    /// Whether the dataplane sends `peer`'s subnet to `public_ip`.
    fn points_to(&self, peer: &Peer, public_ip: Ipv4Addr) -> Result<bool> {
        match self {
            Probe::Bpf(map) => Ok(map
                .get(&Key::new(24, peer.subnet.octets()), 0)
                .is_ok_and(|entry| entry.public_ip == public_ip.octets())),
            Probe::Kernel { ns, .. } => {
                let out = Cmd::new([
                    "bridge",
                    "-n",
                    ns.as_str(),
                    "fdb",
                    "get",
                    peer.vtep_mac.as_str(),
                    "dev",
                    VXLAN_DEVICE,
                    "self",
                ])
                .output()?;
                Ok(out.stdout.contains(&format!("dst {public_ip} ")))
            }
        }
    }
}

/// Runs the control-plane benchmark on `dataplane`.
pub fn run(dataplane: Dataplane, options: &CpOptions) -> Result<CpResult> {
    if !(1..=MAX_CP_NODES).contains(&options.nodes) {
        bail!(
            "--cp-nodes {}: give 1 to {MAX_CP_NODES} nodes",
            options.nodes
        );
    }
    let mut lab = Lab::start(LabConfig {
        nodes: 1,
        backend: Backend::Vxlan,
        dataplane,
        network: CP_NETWORK.to_string(),
        subnet_manager: SubnetManager::Kube,
        start_agents: false,
        ..Default::default()
    })?;
    let peers: Vec<Peer> = (1..=options.nodes)
        .map(|i| Peer::new(&lab, i))
        .collect::<Result<_>>()?;
    let objects: Vec<_> = peers.iter().map(Peer::node_object).collect::<Result<_>>()?;
    for chunk in objects.chunks(1000) {
        lab.api()?
            .create_nodes(chunk)
            .context("creating the peer Nodes")?;
    }
    drop(objects);

    let (started, before) = lab.spawn_agent(1)?;
    let spawned_at = SystemTime::now() - started.elapsed();
    lab.wait_agent_ready(1, before)?;
    let agent_pid = agent_pid(&lab.node(1).subnet_file)?;
    // Where the lab writes the agent's log (Lab::add_node).
    let log = lab.node(1).dir.join("agent.log");
    if dataplane == Dataplane::Bpf {
        let pin = lab.bpf_dir(1).join(MAP_LEASES);
        wait_until(
            "the agent to pin its leases map",
            Duration::from_secs(15),
            || Ok(pin.exists()),
        )?;
    }
    let probe = Probe::open(&lab, dataplane, agent_pid)?;
    let last = peers.last().context("no peers")?;
    let programmed = poll(PROGRAM_TIMEOUT, Duration::from_millis(10), || {
        if !lab_agent_alive(agent_pid) {
            bail!("the agent exited");
        }
        Ok(probe.has(last)? && probe.programmed()? >= peers.len())
    })
    .and_then(|done| {
        if !done {
            bail!(
                "the {} dataplane holds {} of {} leases after {PROGRAM_TIMEOUT:?}",
                label(dataplane),
                probe.programmed()?,
                peers.len()
            );
        }
        Ok(())
    });
    programmed.with_context(|| format!("agent log (tail):\n{}", tail(&log, 30)))?;
    let done_at = SystemTime::now();
    let listed_at = listed_at(&log, peers.len());
    let programmed_after_list = listed_at.and_then(|t| done_at.duration_since(t).ok());
    let programmed_after_start = done_at.duration_since(spawned_at).unwrap_or_default();

    let mut changes = Vec::with_capacity(options.changes);
    let mut lost_changes = 0;
    let stride = (peers.len() / options.changes.max(1)).max(1);
    for change in 0..options.changes {
        let peer = &peers[(change * stride) % peers.len()];
        let new_ip = offset(CHANGED_IP_BASE, change + 1);
        std::thread::sleep(CHANGE_GAP);
        let patch = json!({"metadata": {"annotations": {PUBLIC_IP: new_ip.to_string()}}});
        let sent = Instant::now();
        lab.api()?
            .patch_node(&peer.name, &patch)
            .with_context(|| format!("patching Node {}", peer.name))?;
        if poll(CHANGE_TIMEOUT, Duration::from_micros(500), || {
            probe.points_to(peer, new_ip)
        })? {
            changes.push(sent.elapsed());
        } else {
            lost_changes += 1;
            changes.push(CHANGE_TIMEOUT);
        }
    }
    let peak_rss_kib = peak_rss_kib(agent_pid)?;
    Ok(CpResult {
        dataplane,
        nodes: peers.len(),
        programmed_after_list,
        programmed_after_start,
        changes,
        lost_changes,
        peak_rss_kib,
    })
}

/// Checks `condition` every `every` until it holds (true) or `timeout` passes (false).
fn poll(
    timeout: Duration,
    every: Duration,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let start = Instant::now();
    loop {
        if condition()? {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(every);
    }
}

fn lab_agent_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The PID of the agent whose command line names `subnet_file` (`ip netns exec` execs the
/// agent, so it is the process itself).
fn agent_pid(subnet_file: &Path) -> Result<u32> {
    let wanted = subnet_file.to_string_lossy();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_agent = args.get(1).is_some_and(|a| a == "agent")
            && args.first().is_some_and(|a| a.ends_with("/weft"));
        if is_agent && args.iter().any(|a| *a == wanted) {
            return Ok(pid);
        }
    }
    bail!("no `weft agent` process with --subnet-file {wanted}")
}

/// VmHWM of process `pid`, KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in {path}"))
}

/// When the agent logged its initial list of `leases` leases (the first such line).
fn listed_at(log: &Path, leases: usize) -> Option<SystemTime> {
    let text = std::fs::read_to_string(log).ok()?;
    let count = format!("leases={leases}");
    text.lines()
        .filter(|l| l.contains(LISTED_LINE) && l.contains(&count))
        .find_map(|l| parse_log_time(l.split_whitespace().next()?))
}

/// The RFC 3339 UTC time tracing puts first on a line, e.g. `2025-06-01T10:20:30.123456Z`
/// (ANSI colour codes around it are skipped).
pub fn parse_log_time(token: &str) -> Option<SystemTime> {
    let token = strip_ansi(token);
    let (date, time) = token.trim().split_once('T')?;
    let time = &time[..time.find('Z')?];
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, min, s) = (hms.next()??, hms.next()??, hms.next()??);
    let nanos: u32 = if fraction.is_empty() {
        0
    } else {
        let digits = &fraction[..fraction.len().min(9)];
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    let seconds = days * 86_400 + h * 3600 + min * 60 + s;
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The targets of the control plane, checked on the BPF dataplane.
const PROGRAM_TARGET: Duration = Duration::from_secs(2);
const CHANGE_P99_TARGET: Duration = Duration::from_millis(100);
const RSS_TARGET_KIB: u64 = 64 * 1024;

fn seconds(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn millis(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// One target: `measure` (in the unit of `limit`) must stay below `limit`.
struct TargetRow {
    wording: String,
    measure: fn(&CpResult) -> Option<f64>,
    limit: f64,
    show: fn(Option<f64>) -> String,
}

/// The markdown section: `machine` says where it ran.
pub fn render(machine: &str, options: &CpOptions, results: &[CpResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Control-plane benchmark\n");
    let _ = writeln!(
        out,
        "{machine}. A 1-node kube-mode lab (vxlan backend, Network {CP_NETWORK}) whose agent \
         starts against the API server emulator holding {} other Nodes with flannel's \
         annotations; leases programmed = from the agent's log line \"{LISTED_LINE}\" to the \
         dataplane holding every lease (BPF: entries of the `leases` map; kernel: routes via \
         {VXLAN_DEVICE}). Then {} single changes (one Node's public-ip annotation), each \
         timed from the patch request to the dataplane showing it (BPF: the node's `leases` \
         entry; kernel: its {VXLAN_DEVICE} FDB entry, seen by `bridge fdb get`, which adds a \
         few ms). Peak RSS: the agent's VmHWM at the end.\n",
        options.nodes, options.changes
    );
    let _ = writeln!(
        out,
        "| dataplane | leases programmed in | from agent start | change p50 | change p99 | change max | peak RSS |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for r in results {
        let lost = if r.lost_changes > 0 {
            format!(" ({} lost)", r.lost_changes)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {}{lost} | {} |",
            label(r.dataplane),
            seconds(r.programmed_after_list),
            seconds(Some(r.programmed_after_start)),
            millis(r.change_quantile(0.5)),
            millis(r.change_quantile(0.99)),
            millis(r.change_quantile(1.0)),
            mib(r.peak_rss_kib),
        );
    }
    let of = |dataplane| results.iter().find(|r| r.dataplane == dataplane);
    let (bpf, kernel) = (of(Dataplane::Bpf), of(Dataplane::Kernel));
    let _ = writeln!(
        out,
        "\n### Control-plane targets (BPF dataplane; the kernel path for reference)\n"
    );
    let _ = writeln!(out, "| target | BPF | result | kernel |");
    let _ = writeln!(out, "|---|---|---|---|");
    let rows = [
        TargetRow {
            wording: format!(
                "{} leases programmed in under {} s",
                options.nodes,
                PROGRAM_TARGET.as_secs()
            ),
            measure: |r| r.programmed_after_list.map(|d| d.as_secs_f64()),
            limit: PROGRAM_TARGET.as_secs_f64(),
            show: |v| seconds(v.map(Duration::from_secs_f64)),
        },
        TargetRow {
            wording: format!(
                "one change applied in under {} ms p99",
                CHANGE_P99_TARGET.as_millis()
            ),
            measure: |r| r.change_quantile(0.99).map(|d| d.as_secs_f64()),
            limit: CHANGE_P99_TARGET.as_secs_f64(),
            show: |v| millis(v.map(Duration::from_secs_f64)),
        },
        TargetRow {
            wording: format!("agent peak RSS under {}", mib(RSS_TARGET_KIB)),
            measure: |r| Some(r.peak_rss_kib as f64),
            limit: RSS_TARGET_KIB as f64,
            show: |v| v.map_or("-".into(), |k| mib(k as u64)),
        },
    ];
    for TargetRow {
        wording,
        measure,
        limit,
        show,
    } in rows
    {
        let bpf_value = bpf.and_then(measure);
        let verdict = match bpf_value {
            None => "not measured",
            Some(v) if v < limit => "PASS",
            Some(_) => "MISS",
        };
        let _ = writeln!(
            out,
            "| {wording} | {} | {verdict} | {} |",
            show(bpf_value),
            show(kernel.and_then(measure)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let values = ms(&(1..=200).rev().collect::<Vec<_>>());
        assert_eq!(quantile(&values, 0.5), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&values, 0.99), Some(Duration::from_millis(198)));
        assert_eq!(quantile(&values, 1.0), Some(Duration::from_millis(200)));
        assert_eq!(quantile(&ms(&[7]), 0.99), Some(Duration::from_millis(7)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn parses_tracing_timestamps() {
        let t = parse_log_time("2025-06-01T10:20:30.123456Z").unwrap();
        let since = t.duration_since(UNIX_EPOCH).unwrap();
        // date -u -d 2025-06-01T10:20:30Z +%s
        assert_eq!(since.as_secs(), 1_748_773_230);
        assert_eq!(since.subsec_micros(), 123_456);
        let colored = "\u{1b}[2m2024-02-29T00:00:00.5Z\u{1b}[0m";
        let leap = parse_log_time(colored).unwrap();
        assert_eq!(
            leap.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_709_164_800_500)
        );
        assert_eq!(parse_log_time("INFO"), None);
    }

    #[test]
    fn renders_targets() {
        let result = |dataplane, list_ms: u64, change_ms: u64, rss_kib| CpResult {
            dataplane,
            nodes: 5000,
            programmed_after_list: Some(Duration::from_millis(list_ms)),
            programmed_after_start: Duration::from_millis(list_ms + 1000),
            changes: vec![Duration::from_millis(change_ms); 10],
            lost_changes: 0,
            peak_rss_kib: rss_kib,
        };
        let results = [
            result(Dataplane::Kernel, 3000, 20, 40 * 1024),
            result(Dataplane::Bpf, 1500, 150, 30 * 1024),
        ];
        let report = render("today", &CpOptions::default(), &results);
        assert!(
            report.contains(
                "| weft BPF | 1.50 s | 2.50 s | 150.0 ms | 150.0 ms | 150.0 ms | 30.0 MiB |"
            ),
            "{report}"
        );
        assert!(
            report.contains("| 5000 leases programmed in under 2 s | 1.50 s | PASS | 3.00 s |"),
            "{report}"
        );
        assert!(
            report
                .contains("| one change applied in under 100 ms p99 | 150.0 ms | MISS | 20.0 ms |"),
            "{report}"
        );
        assert!(
            report.contains("| agent peak RSS under 64.0 MiB | 30.0 MiB | PASS | 40.0 MiB |"),
            "{report}"
        );
    }
}
