//! weft-bench: pod-to-pod performance across nodes on every path, measured in one run so
//! that the ratios between paths are fair: same node (the ceiling), kernel host-gw, kernel
//! VXLAN (flannel.1), weft BPF VXLAN and weft BPF direct route. Each path gets a 2-node
//! namespace lab (all labs live side by side; runs go round-robin over the paths, in
//! alternating order, to spread drift), iperf3 for throughput and sockperf TCP ping-pong
//! for the request/response rate and latency. Prints a markdown table with the ratios and
//! the targets, and writes it to a file. Then the control-plane section (see
//! `weft_tests::cp_bench`): 5,000 Nodes through the API server emulator into the agent of
//! a kube-mode lab, on the BPF and the kernel dataplane; its table is appended to the file.
//!
//! Run as root after `cargo build --release -p weft --bins` (or `cargo xtask bench`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use weft_common::Counter;
use weft_tests::cp_bench::{self, CpOptions, MAX_CP_NODES};
use weft_tests::exec::run;
use weft_tests::nat_bench;

use weft_tests::kube_proxy::{Protocol, ProxyMode, Service, TrafficPolicy};
use weft_tests::load::SOCKPERF_PORT;
use weft_tests::traffic::{tcp_counters, Retransmits, IPERF_PORT};
use weft_tests::{
    icmp, Backend, BpfCounters, Dataplane, IperfReport, Lab, LabConfig, Pod, PortMapping,
};

use weft_tests::load::{self, summary, PingPong};

/// How long the BPF counters may take to show that traffic takes the BPF path (the agent
/// learns a pod's endpoint once the node has its neighbour entry).
const BPF_PATH_TIMEOUT: Duration = Duration::from_secs(20);

const USAGE: &str = "\
usage: weft-bench [--quick] [--duration SECONDS] [--runs N] [--paths NAME,...] [--out FILE]
                  [--hold SECONDS] [--control-plane] [--cp-nodes N]

  --duration   seconds per iperf3 and per sockperf run (default 10)
  --runs       runs per path and tool; medians are reported (default 3)
  --quick      --duration 3 --runs 1, for development
  --paths      only these paths: same-node, kernel-host-gw, kernel-vxlan, bpf-vxlan,
               bpf-direct, kernel-vxlan-service, bpf-vxlan-service, masquerade,
               control-plane (default all)
  --control-plane  only the control-plane section (same as --paths control-plane)
  --masquerade     only the masquerade section (same as --paths masquerade): a pod to the
               external host through BPF source NAT, nftables and iptables masquerade
  --cp-nodes   Nodes the control-plane section feeds the agent (default 5000)
  --out        where to write the markdown report (default target/bench/bench.md; the
               control-plane section is appended to it)
  --hold       keep the labs this many seconds after measuring (to look inside them)";

/// The `--paths` name of the control-plane section.
const CONTROL_PLANE: &str = "control-plane";
/// The `--paths` name of the masquerade section.
const MASQUERADE: &str = "masquerade";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PathKind {
    SameNode,
    KernelHostGw,
    KernelVxlan,
    BpfVxlan,
    BpfDirect,
    /// Pod → ClusterIP → pod on the other node (kube-proxy's DNAT), kernel VXLAN.
    ServiceKernelVxlan,
    /// The same on BPF VXLAN.
    ServiceBpfVxlan,
}

impl PathKind {
    const ALL: [PathKind; 7] = [
        PathKind::SameNode,
        PathKind::KernelHostGw,
        PathKind::KernelVxlan,
        PathKind::BpfVxlan,
        PathKind::BpfDirect,
        PathKind::ServiceKernelVxlan,
        PathKind::ServiceBpfVxlan,
    ];

    fn name(self) -> &'static str {
        match self {
            PathKind::SameNode => "same-node",
            PathKind::KernelHostGw => "kernel-host-gw",
            PathKind::KernelVxlan => "kernel-vxlan",
            PathKind::BpfVxlan => "bpf-vxlan",
            PathKind::BpfDirect => "bpf-direct",
            PathKind::ServiceKernelVxlan => "kernel-vxlan-service",
            PathKind::ServiceBpfVxlan => "bpf-vxlan-service",
        }
    }

    fn label(self) -> &'static str {
        match self {
            PathKind::SameNode => "same node (ceiling)",
            PathKind::KernelHostGw => "kernel host-gw",
            PathKind::KernelVxlan => "kernel VXLAN (flannel.1)",
            PathKind::BpfVxlan => "weft BPF VXLAN",
            PathKind::BpfDirect => "weft BPF direct route",
            PathKind::ServiceKernelVxlan => "Service (ClusterIP), kernel VXLAN",
            PathKind::ServiceBpfVxlan => "Service (ClusterIP), weft BPF VXLAN",
        }
    }

    /// Whether the client connects to the remote pod's Service instead of the pod.
    fn through_service(self) -> bool {
        matches!(
            self,
            PathKind::ServiceKernelVxlan | PathKind::ServiceBpfVxlan
        )
    }

    /// The lab this path runs in: same-node shares the kernel host-gw lab.
    fn lab(self) -> LabKind {
        match self {
            PathKind::SameNode | PathKind::KernelHostGw => LabKind::KernelHostGw,
            PathKind::KernelVxlan | PathKind::ServiceKernelVxlan => LabKind::KernelVxlan,
            PathKind::BpfVxlan | PathKind::ServiceBpfVxlan => LabKind::BpfVxlan,
            PathKind::BpfDirect => LabKind::BpfDirect,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum LabKind {
    KernelHostGw,
    KernelVxlan,
    BpfVxlan,
    BpfDirect,
}

impl LabKind {
    fn backend(self) -> Backend {
        match self {
            LabKind::KernelHostGw | LabKind::BpfDirect => Backend::HostGw,
            LabKind::KernelVxlan | LabKind::BpfVxlan => Backend::Vxlan,
        }
    }

    fn bpf(self) -> bool {
        matches!(self, LabKind::BpfVxlan | LabKind::BpfDirect)
    }

    /// The counters that show the BPF path carries the traffic: (sender, receiver).
    fn bpf_counters(self) -> Option<(Counter, Counter)> {
        match self {
            LabKind::BpfVxlan => Some((Counter::Encap, Counter::Decap)),
            LabKind::BpfDirect => Some((Counter::DirectOut, Counter::DirectIn)),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Options {
    /// Seconds per iperf3 and per sockperf run.
    seconds: u32,
    runs: usize,
    paths: Vec<PathKind>,
    /// Whether the control-plane section runs.
    control_plane: bool,
    /// Whether the masquerade section runs.
    masquerade: bool,
    cp: CpOptions,
    out: PathBuf,
    /// How long to keep the labs after measuring, for a look inside.
    hold: Duration,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options> {
        let mut options = Options {
            seconds: 10,
            runs: 3,
            paths: PathKind::ALL.to_vec(),
            control_plane: true,
            masquerade: true,
            cp: CpOptions::default(),
            out: workspace_root().join("target/bench/bench.md"),
            hold: Duration::ZERO,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--quick" => {
                    options.seconds = 3;
                    options.runs = 1;
                }
                "--duration" => {
                    let seconds: u32 = value()?
                        .parse()
                        .context("--duration: give whole seconds, e.g. --duration 10")?;
                    if !(1..=600).contains(&seconds) {
                        bail!("--duration {seconds}: give 1 to 600 seconds");
                    }
                    options.seconds = seconds;
                }
                "--runs" => {
                    let runs: usize = value()?
                        .parse()
                        .context("--runs: give a count, e.g. --runs 3")?;
                    if !(1..=20).contains(&runs) {
                        bail!("--runs {runs}: give 1 to 20 runs");
                    }
                    options.runs = runs;
                }
                "--paths" => {
                    let names = value()?;
                    let names: Vec<&str> = names.split(',').map(str::trim).collect();
                    options.control_plane = names.contains(&CONTROL_PLANE);
                    options.masquerade = names.contains(&MASQUERADE);
                    options.paths = names
                        .iter()
                        .filter(|&&name| name != CONTROL_PLANE && name != MASQUERADE)
                        .map(|&name| {
                            PathKind::ALL
                                .into_iter()
                                .find(|p| p.name() == name)
                                .with_context(|| format!("--paths: unknown path {name:?}\n{USAGE}"))
                        })
                        .collect::<Result<_>>()?;
                    options.paths.sort();
                    options.paths.dedup();
                }
                "--control-plane" => {
                    options.paths.clear();
                    options.control_plane = true;
                    options.masquerade = false;
                }
                "--masquerade" => {
                    options.paths.clear();
                    options.control_plane = false;
                    options.masquerade = true;
                }
                "--cp-nodes" => {
                    let nodes: usize = value()?
                        .parse()
                        .context("--cp-nodes: give a count, e.g. --cp-nodes 5000")?;
                    if !(1..=MAX_CP_NODES).contains(&nodes) {
                        bail!("--cp-nodes {nodes}: give 1 to {MAX_CP_NODES} nodes");
                    }
                    options.cp.nodes = nodes;
                }
                "--out" => options.out = PathBuf::from(value()?),
                "--hold" => {
                    let seconds: u64 = value()?
                        .parse()
                        .context("--hold: give whole seconds, e.g. --hold 600")?;
                    if seconds > 3600 {
                        bail!("--hold {seconds}: at most 3600 seconds");
                    }
                    options.hold = Duration::from_secs(seconds);
                }
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

fn main() -> ExitCode {
    // The agents log at info, as deployed (the lab's default adds weft=debug: a line per
    // lease, which the control-plane figures would pay for). Set before any thread starts.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info");
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Each run's report starts empty; the sections append to it.
    let _ = std::fs::remove_file(&options.out);
    let result = if options.paths.is_empty() {
        Ok(())
    } else {
        bench(&options)
    };
    match result
        .and_then(|()| masquerade_bench(&options))
        .and_then(|()| control_plane_bench(&options))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A 2-node lab for one dataplane, with one pod per node (two on node 1).
struct BenchLab {
    kind: LabKind,
    /// Client pod (node 1), server pod on node 2, second pod on node 1.
    client: Pod,
    remote: Pod,
    local: Pod,
    lab: Lab,
}

impl BenchLab {
    fn start(kind: LabKind) -> Result<BenchLab> {
        let mut lab = Lab::start(LabConfig {
            nodes: 2,
            backend: kind.backend(),
            dataplane: if kind.bpf() {
                Dataplane::Bpf
            } else {
                Dataplane::Kernel
            },
            ..Default::default()
        })?;
        let client = lab.add_pod(1)?;
        let remote = lab.add_pod(2)?;
        // A hostPort pod, so that portmap's rules are on the node as on a real one.
        let local = lab.add_pod_with_ports(
            1,
            &[PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
            }],
        )?;
        // kube-proxy's rules on every node of every lab: the load's Services, whose
        // endpoint is the remote pod, and a NodePort.
        let services = [
            Service::cluster_ip("iperf3", IPERF_SERVICE, IPERF_PORT, Protocol::Tcp)
                .node_port(30201, TrafficPolicy::Cluster)
                .endpoint(remote.ip, 2, IPERF_PORT),
            Service::cluster_ip("sockperf", SOCKPERF_SERVICE, SOCKPERF_PORT, Protocol::Tcp)
                .endpoint(remote.ip, 2, SOCKPERF_PORT),
        ];
        lab.install_kube_proxy(ProxyMode::Iptables, &services)?;
        let pods = [client.clone(), remote.clone(), local.clone()];
        let (matrix, _) = lab.wait_for_matrix(&pods, Duration::from_secs(15));
        if !matrix.all_ok() {
            bail!(
                "pods of the {kind:?} lab do not ping: {}\n{}",
                matrix.failures().join(", "),
                lab.diagnostics()
            );
        }
        let bench_lab = BenchLab {
            kind,
            client,
            remote,
            local,
            lab,
        };
        bench_lab.check_dataplane()?;
        Ok(bench_lab)
    }

    /// Fails unless traffic between the pods takes the dataplane this lab is for: on a BPF
    /// lab the programs' counters rise in both directions, a kernel lab has no weft filter.
    fn check_dataplane(&self) -> Result<()> {
        let Some((out, into)) = self.kind.bpf_counters() else {
            for node in 1..=2 {
                let filters = self.lab.weft_filters(node)?;
                if !filters.is_empty() {
                    bail!(
                        "node {node} of the kernel {:?} lab runs weft's BPF programs: {filters:?}",
                        self.kind
                    );
                }
            }
            return Ok(());
        };
        for node in 1..=2 {
            self.lab.wait_bpf_synced(node, BPF_PATH_TIMEOUT)?;
        }
        let before = self.counters()?;
        for (from, to) in [(&self.client, &self.remote), (&self.remote, &self.client)] {
            icmp::ping(&from.ns, to.ip, 3, Duration::from_millis(500))?
                .with_context(|| format!("{} does not answer {}", to.name, from.name))?;
        }
        let after = self.counters()?;
        let rose = |node: usize, counter: Counter| {
            after[node - 1].since(&before[node - 1]).get(counter) > 0
        };
        if !(rose(1, out) && rose(2, into) && rose(2, out) && rose(1, into)) {
            bail!(
                "pod traffic does not take the BPF path in the {:?} lab: {} and {} should \
                 rise on both nodes; node 1 {} -> {}, node 2 {} -> {}\n{}",
                self.kind,
                out.name(),
                into.name(),
                before[0],
                after[0],
                before[1],
                after[1],
                self.lab.diagnostics()
            );
        }
        Ok(())
    }

    /// The BPF counters of each node.
    fn counters(&self) -> Result<Vec<BpfCounters>> {
        (1..=2).map(|node| self.lab.bpf_counters(node)).collect()
    }

    fn pods(&self, path: PathKind) -> (&Pod, &Pod) {
        match path {
            PathKind::SameNode => (&self.client, &self.local),
            _ => (&self.client, &self.remote),
        }
    }
}

/// ClusterIPs of the load's Services (endpoint: the remote pod).
const IPERF_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 201);
const SOCKPERF_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 202);

/// What one path measured.
#[derive(Debug, Default)]
struct PathResults {
    throughput: Vec<IperfReport>,
    ping_pong: Vec<PingPong>,
    /// The iperf3 senders' retransmits, classified, over all runs.
    retransmits: Retransmits,
}

fn bench(options: &Options) -> Result<()> {
    let started = Instant::now();
    let machine = Machine::read();
    println!(
        "weft-bench: {} paths, {} run(s) of {}s per tool, on {} ({} cores, kernel {})",
        options.paths.len(),
        options.runs,
        options.seconds,
        machine.cpu,
        machine.cores,
        machine.kernel
    );
    let mut lab_kinds: Vec<LabKind> = options.paths.iter().map(|p| p.lab()).collect();
    lab_kinds.sort();
    lab_kinds.dedup();
    let mut labs: BTreeMap<LabKind, BenchLab> = BTreeMap::new();
    for kind in lab_kinds {
        let lab_started = Instant::now();
        let lab = BenchLab::start(kind).with_context(|| format!("starting the {kind:?} lab"))?;
        println!(
            "  lab {kind:?} ready in {:.1?}: pods {} {}, {} {}, {} {}",
            lab_started.elapsed(),
            lab.client.ns,
            lab.client.ip,
            lab.remote.ns,
            lab.remote.ip,
            lab.local.ns,
            lab.local.ip
        );
        labs.insert(kind, lab);
    }
    let counters_before: BTreeMap<LabKind, _> = labs
        .iter()
        .filter(|(kind, _)| kind.bpf())
        .map(|(kind, lab)| Ok((*kind, lab.counters()?)))
        .collect::<Result<_>>()?;

    let mut results: BTreeMap<PathKind, PathResults> = BTreeMap::new();
    for round in 0..options.runs {
        // Alternate the order so that no path always runs first or last.
        let mut order = options.paths.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for &path in &order {
            let lab = &labs[&path.lab()];
            let (client, server) = lab.pods(path);
            let (iperf_to, sockperf_to) = if path.through_service() {
                (IPERF_SERVICE, SOCKPERF_SERVICE)
            } else {
                (server.ip, server.ip)
            };
            let tcp_before = tcp_counters(&client.ns)?;
            let throughput = lab
                .lab
                .iperf3_via(client, server, iperf_to, options.seconds, &[])
                .with_context(|| format!("iperf3 on path {}", path.name()))?;
            let retransmits = Retransmits::between(&tcp_before, &tcp_counters(&client.ns)?);
            let ping_pong =
                load::sockperf_via(&lab.lab, client, server, sockperf_to, options.seconds)
                    .with_context(|| format!("sockperf on path {}", path.name()))?;
            println!(
                "  run {}/{} {:<15} {:6.2} Gbit/s ({:>4} retr)  {:8.0} RR/s  p50 {:6.1} us  p99 {:6.1} us",
                round + 1,
                options.runs,
                path.name(),
                gbit(&throughput),
                throughput.retransmits,
                ping_pong.rate,
                ping_pong.p50_us,
                ping_pong.p99_us
            );
            let entry = results.entry(path).or_default();
            entry.throughput.push(throughput);
            entry.ping_pong.push(ping_pong);
            entry.retransmits.add(retransmits);
        }
    }

    let mut counter_deltas = Vec::new();
    for (kind, before) in &counters_before {
        let after = labs[kind].counters()?;
        for (node, (before, after)) in before.iter().zip(&after).enumerate() {
            let delta = after.since(before);
            let delta: Vec<String> = Counter::ALL
                .into_iter()
                .filter(|&c| delta.get(c) > 0)
                .map(|c| format!("{}={}", c.name(), delta.get(c)))
                .collect();
            counter_deltas.push(format!("{kind:?} node {}: {}", node + 1, delta.join(" ")));
        }
    }
    if !options.hold.is_zero() {
        println!(
            "weft-bench: keeping the labs for {:?}; a line on stdin removes them now",
            options.hold
        );
        hold(options.hold);
    }
    drop(labs);

    let report = render(options, &machine, &results, &counter_deltas);
    println!("\n{report}");
    if let Some(dir) = options.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&options.out, &report)
        .with_context(|| format!("writing {}", options.out.display()))?;
    println!(
        "weft-bench: report written to {} ({:.0?} in all)",
        options.out.display(),
        started.elapsed()
    );
    Ok(())
}

/// The masquerade section (see `weft_tests::nat_bench`); appended to the report.
fn masquerade_bench(options: &Options) -> Result<()> {
    if !options.masquerade {
        return Ok(());
    }
    let started = Instant::now();
    let machine = Machine::read();
    let nat_options = nat_bench::NatBenchOptions {
        seconds: options.seconds,
        runs: options.runs,
        parallel: 4,
    };
    println!("weft-bench: masquerade, a pod to the external host through each source NAT");
    let keep = || hold(options.hold);
    let (results, deltas) = nat_bench::run(
        &nat_options,
        (!options.hold.is_zero()).then_some(&keep as &dyn Fn()),
    )?;
    let where_ = format!(
        "{}; {} ({} cores); kernel {}",
        machine.date, machine.cpu, machine.cores, machine.kernel
    );
    let section = nat_bench::render(&where_, &nat_options, &results, &deltas);
    println!("\n{section}");
    append_section(&options.out, &section)?;
    println!(
        "weft-bench: masquerade section appended to {} ({:.0?})",
        options.out.display(),
        started.elapsed()
    );
    Ok(())
}

/// Appends `section` to the report at `out` (creating it).
fn append_section(out: &Path, section: &str) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut report = std::fs::read_to_string(out).unwrap_or_default();
    if !report.is_empty() {
        report.push('\n');
    }
    report.push_str(section);
    std::fs::write(out, report).with_context(|| format!("writing {}", out.display()))
}

/// The control-plane section, on the BPF and the kernel dataplane; appended to the report.
fn control_plane_bench(options: &Options) -> Result<()> {
    if !options.control_plane {
        return Ok(());
    }
    let started = Instant::now();
    let machine = Machine::read();
    println!(
        "weft-bench: control plane, {} Nodes and {} changes per dataplane",
        options.cp.nodes, options.cp.changes
    );
    let mut results = Vec::new();
    for dataplane in [Dataplane::Bpf, Dataplane::Kernel] {
        let result = cp_bench::run(dataplane, &options.cp).with_context(|| {
            format!(
                "control plane on the {} dataplane",
                cp_bench::label(dataplane)
            )
        })?;
        println!(
            "  {:<18} {} leases programmed in {} after the list ({:.2} s after start); \
             change p50 {:.1} ms p99 {:.1} ms; peak RSS {:.1} MiB",
            cp_bench::label(dataplane),
            result.nodes,
            result
                .programmed_after_list
                .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            result.programmed_after_start.as_secs_f64(),
            result
                .change_quantile(0.5)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            result
                .change_quantile(0.99)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            result.peak_rss_kib as f64 / 1024.0
        );
        results.push(result);
    }
    let where_ = format!(
        "{}; {} ({} cores); kernel {}",
        machine.date, machine.cpu, machine.cores, machine.kernel
    );
    let section = cp_bench::render(&where_, &options.cp, &results);
    println!("\n{section}");
    append_section(&options.out, &section)?;
    println!(
        "weft-bench: control-plane section appended to {} ({:.0?})",
        options.out.display(),
        started.elapsed()
    );
    Ok(())
}

/// Waits `max`, or until a line arrives on stdin (end of input does not end the wait).
fn hold(max: Duration) {
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    // Left blocked in read_line if no line comes; it ends with the process.
    std::thread::spawn(move || {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            let _ = line_tx.send(());
        }
    });
    let started = Instant::now();
    if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = line_rx.recv_timeout(max) {
        // stdin ended (or is /dev/null): only the time ends the wait.
        std::thread::sleep(max.saturating_sub(started.elapsed()));
    }
}

/// Where the numbers were measured.
struct Machine {
    date: String,
    kernel: String,
    cpu: String,
    cores: usize,
}

impl Machine {
    fn read() -> Machine {
        let first_line = |args: &[&str]| {
            run(args)
                .ok()
                .and_then(|out| out.lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown".into())
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        Machine {
            date: first_line(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: first_line(&["uname", "-r"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

/// The workspace this benchmark was built in (tests/ is one level below it).
fn workspace_root() -> &'static Path {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests)
}

fn gbit(report: &IperfReport) -> f64 {
    report.bits_per_second / 1e9
}

impl PathResults {
    fn gbit(&self) -> Option<f64> {
        summary(self.throughput.iter().map(gbit)).map(|s| s.0)
    }

    fn rate(&self) -> Option<f64> {
        summary(self.ping_pong.iter().map(|p| p.rate)).map(|s| s.0)
    }
}

/// One target of the issue: `path`'s `metric` at least `factor` times `baseline`'s.
struct Target {
    path: PathKind,
    baseline: PathKind,
    metric: Metric,
    factor: f64,
    /// "above" targets need more than `factor`, the others at least it.
    strictly: bool,
    wording: &'static str,
}

#[derive(Clone, Copy)]
enum Metric {
    Throughput,
    PingPong,
}

const TARGETS: [Target; 6] = [
    Target {
        path: PathKind::BpfVxlan,
        baseline: PathKind::KernelVxlan,
        metric: Metric::PingPong,
        factor: 1.30,
        strictly: false,
        wording: "BPF VXLAN ping-pong rate >= 1.30x kernel VXLAN",
    },
    Target {
        path: PathKind::BpfVxlan,
        baseline: PathKind::KernelVxlan,
        metric: Metric::Throughput,
        factor: 1.20,
        strictly: false,
        wording: "BPF VXLAN throughput >= 1.20x kernel VXLAN",
    },
    Target {
        path: PathKind::BpfVxlan,
        baseline: PathKind::KernelHostGw,
        metric: Metric::PingPong,
        factor: 1.0,
        strictly: true,
        wording: "BPF VXLAN ping-pong rate above kernel host-gw",
    },
    Target {
        path: PathKind::BpfVxlan,
        baseline: PathKind::KernelHostGw,
        metric: Metric::Throughput,
        factor: 0.95,
        strictly: false,
        wording: "BPF VXLAN throughput within 5% of kernel host-gw (>= 0.95x)",
    },
    Target {
        path: PathKind::BpfDirect,
        baseline: PathKind::KernelHostGw,
        metric: Metric::PingPong,
        factor: 1.12,
        strictly: false,
        wording: "BPF direct route ping-pong rate >= 1.12x kernel host-gw",
    },
    Target {
        path: PathKind::BpfDirect,
        baseline: PathKind::KernelHostGw,
        metric: Metric::Throughput,
        factor: 1.08,
        strictly: false,
        wording: "BPF direct route throughput >= 1.08x kernel host-gw",
    },
];

fn metric_of(results: &PathResults, metric: Metric) -> Option<f64> {
    match metric {
        Metric::Throughput => results.gbit(),
        Metric::PingPong => results.rate(),
    }
}

/// `path`'s metric over `baseline`'s, if both were measured.
fn ratio(
    results: &BTreeMap<PathKind, PathResults>,
    path: PathKind,
    baseline: PathKind,
    metric: Metric,
) -> Option<f64> {
    let value = metric_of(results.get(&path)?, metric)?;
    let base = metric_of(results.get(&baseline)?, metric)?;
    (base > 0.0).then(|| value / base)
}

fn render(
    options: &Options,
    machine: &Machine,
    results: &BTreeMap<PathKind, PathResults>,
    counter_deltas: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Pod-to-pod benchmark\n");
    let _ = writeln!(
        out,
        "{}; {} ({} cores); kernel {}. 2-node namespace labs on a veth underlay, one \
         client pod and one server pod, kube-proxy's iptables rules (two ClusterIP Services, \
         a NodePort) and a portmap hostPort pod on every node; iperf3 TCP {} s and sockperf \
         TCP ping-pong {} s, {} run(s) per path in alternating order; medians (min-max).\n",
        machine.date,
        machine.cpu,
        machine.cores,
        machine.kernel,
        options.seconds,
        options.seconds,
        options.runs
    );
    let _ = writeln!(
        out,
        "| path | Gbit/s | retransmits | TCP RR/s | p50 RTT us | p99 RTT us | vs kernel VXLAN (Gbit/s, RR) | vs host-gw (Gbit/s, RR) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (&path, r) in results {
        let gbit = summary(r.throughput.iter().map(gbit));
        let rate = summary(r.ping_pong.iter().map(|p| p.rate));
        let p50 = summary(r.ping_pong.iter().map(|p| p.p50_us));
        let p99 = summary(r.ping_pong.iter().map(|p| p.p99_us));
        let retransmits: Vec<String> = r
            .throughput
            .iter()
            .map(|t| t.retransmits.to_string())
            .collect();
        let versus = |baseline: PathKind| {
            if path == baseline {
                return "1.00x, 1.00x".to_string();
            }
            let both = [Metric::Throughput, Metric::PingPong].map(|m| {
                ratio(results, path, baseline, m).map_or("-".into(), |x| format!("{x:.2}x"))
            });
            format!("{}, {}", both[0], both[1])
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            path.label(),
            range(gbit, 2),
            retransmits.join(", "),
            range(rate, 0),
            p50.map_or("-".into(), |s| format!("{:.1}", s.0)),
            p99.map_or("-".into(), |s| format!("{:.1}", s.0)),
            versus(PathKind::KernelVxlan),
            versus(PathKind::KernelHostGw),
        );
    }
    let _ = writeln!(
        out,
        "\nWhat the iperf3 senders' retransmits were (nstat in the client pod, all runs): \
         spurious = the receiver reported the original arrived (D-SACK), reordering = \
         reordering events the sender detected, timeouts and lost retransmits = real loss.\n"
    );
    let _ = writeln!(out, "| path | retransmitted segments | spurious (D-SACK) | reordering events | timeouts | lost retransmits |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (&path, r) in results {
        let t = r.retransmits;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            path.label(),
            t.segments,
            t.spurious,
            t.reordering,
            t.timeouts,
            t.lost_retransmits
        );
    }
    if let (Some(x), Some(y)) = (
        ratio(
            results,
            PathKind::ServiceBpfVxlan,
            PathKind::ServiceKernelVxlan,
            Metric::Throughput,
        ),
        ratio(
            results,
            PathKind::ServiceBpfVxlan,
            PathKind::ServiceKernelVxlan,
            Metric::PingPong,
        ),
    ) {
        let _ = writeln!(
            out,
            "\nService row, pod → ClusterIP → pod on the other node (kube-proxy iptables DNAT): \
             BPF VXLAN {x:.2}x kernel VXLAN throughput, {y:.2}x ping-pong rate. The request \
             leaves through the stack (DNAT) and its replies are left to the stack (stack_flows)."
        );
    }
    let _ = writeln!(out, "\n### Targets (ratios measured in this run)\n");
    let _ = writeln!(out, "| target | measured | result |");
    let _ = writeln!(out, "|---|---|---|");
    for target in &TARGETS {
        let measured = ratio(results, target.path, target.baseline, target.metric);
        let verdict = match measured {
            None => "not measured",
            Some(x) if x > target.factor || (!target.strictly && x >= target.factor) => "PASS",
            Some(_) => "MISS",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {verdict} |",
            target.wording,
            // Three decimals: a ratio just under the target must not print as the target.
            measured.map_or("-".into(), |x| format!("{x:.3}x"))
        );
    }
    if !counter_deltas.is_empty() {
        let _ = writeln!(
            out,
            "\nBPF counters over all measurements (packets, per node): {}.",
            counter_deltas.join("; ")
        );
    }
    out
}

/// "median (min-max)" with `decimals`, or "-".
fn range(summary: Option<(f64, f64, f64)>, decimals: usize) -> String {
    match summary {
        None => "-".into(),
        Some((median, min, max)) if min == max => format!("{median:.decimals$}"),
        Some((median, min, max)) => {
            format!("{median:.decimals$} ({min:.decimals$}-{max:.decimals$})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Result<Options> {
        Options::parse(line.split_whitespace().map(str::to_string))
    }

    #[test]
    fn parses_options() {
        let o = args("").unwrap();
        assert_eq!((o.seconds, o.runs, o.paths.len()), (10, 3, 7));
        assert!(o.out.ends_with("target/bench/bench.md"));
        let o = args("--quick --paths bpf-vxlan,kernel-vxlan --out=/tmp/b.md").unwrap();
        assert_eq!((o.seconds, o.runs), (3, 1));
        assert_eq!(o.paths, vec![PathKind::KernelVxlan, PathKind::BpfVxlan]);
        assert_eq!(o.out, PathBuf::from("/tmp/b.md"));
        let o = args("--duration 5 --runs=2").unwrap();
        assert_eq!((o.seconds, o.runs), (5, 2));
        assert!(args("--paths xdp").unwrap_err().to_string().contains("xdp"));
        assert!(o.control_plane && o.cp.nodes == 5000);
        let o = args("--paths bpf-vxlan").unwrap();
        assert!(!o.control_plane);
        let o = args("--paths control-plane,kernel-vxlan --cp-nodes 300").unwrap();
        assert_eq!(
            (o.paths.clone(), o.control_plane),
            (vec![PathKind::KernelVxlan], true)
        );
        assert_eq!(o.cp.nodes, 300);
        let o = args("--control-plane").unwrap();
        assert!(o.paths.is_empty() && o.control_plane && !o.masquerade);
        let o = args("--masquerade").unwrap();
        assert!(o.paths.is_empty() && !o.control_plane && o.masquerade);
        let o = args("--paths masquerade,bpf-vxlan").unwrap();
        assert!(o.masquerade && !o.control_plane && o.paths == vec![PathKind::BpfVxlan]);
        assert!(args("--cp-nodes 0").is_err());
        assert!(args("--cp-nodes 20000").is_err());
        assert!(args("--runs 0").is_err());
        assert!(args("--duration").is_err());
        assert!(args("--fast").is_err());
    }

    #[test]
    fn medians_and_ranges() {
        assert_eq!(summary([3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(summary([4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(summary([]), None);
        assert_eq!(range(Some((2.0, 1.0, 3.0)), 1), "2.0 (1.0-3.0)");
        assert_eq!(range(Some((2.0, 2.0, 2.0)), 0), "2");
    }

    fn measured(gbit: f64, rate: f64) -> PathResults {
        PathResults {
            throughput: vec![IperfReport {
                sent_bytes: 1,
                received_bytes: 1,
                bits_per_second: gbit * 1e9,
                retransmits: 0,
                seconds: 10.0,
            }],
            ping_pong: vec![PingPong {
                rate,
                avg_us: 1e6 / rate,
                p50_us: 30.0,
                p99_us: 50.0,
            }],
            retransmits: Retransmits::default(),
        }
    }

    #[test]
    fn renders_ratios_and_targets() {
        let results = BTreeMap::from([
            (PathKind::KernelHostGw, measured(20.0, 30_000.0)),
            (PathKind::KernelVxlan, measured(15.0, 24_000.0)),
            (PathKind::BpfVxlan, measured(19.5, 33_000.0)),
        ]);
        let options = args("").unwrap();
        let machine = Machine {
            date: "2025-01-01 00:00 UTC".into(),
            kernel: "6.18".into(),
            cpu: "cpu".into(),
            cores: 2,
        };
        let report = render(&options, &machine, &results, &[]);
        // 19.5 / 15 = 1.30, 33000 / 24000 = 1.375; against host-gw 0.975 and 1.10.
        assert!(report.contains("| weft BPF VXLAN | 19.50 | 0 | 33000 | 30.0 | 50.0 | 1.30x, 1.38x | 0.97x, 1.10x |"), "{report}");
        assert!(
            report.contains("| BPF VXLAN ping-pong rate >= 1.30x kernel VXLAN | 1.375x | PASS |"),
            "{report}"
        );
        assert!(
            report.contains("| BPF VXLAN ping-pong rate above kernel host-gw | 1.100x | PASS |"),
            "{report}"
        );
        assert!(
            report.contains(
                "| BPF direct route throughput >= 1.08x kernel host-gw | - | not measured |"
            ),
            "{report}"
        );
        let slow = BTreeMap::from([
            (PathKind::KernelHostGw, measured(20.0, 30_000.0)),
            (PathKind::BpfDirect, measured(20.0, 30_000.0)),
        ]);
        let report = render(&options, &machine, &slow, &[]);
        assert!(
            report.contains(
                "| BPF direct route ping-pong rate >= 1.12x kernel host-gw | 1.000x | MISS |"
            ),
            "{report}"
        );
    }
}
