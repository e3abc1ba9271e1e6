//! The masquerade section of weft-bench: a pod's traffic to the external host through each
//! source NAT, measured in one run: weft's BPF programs (`--masquerade bpf`), nftables'
//! masquerade and iptables' MASQUERADE (both on the same BPF dataplane, so only the NAT
//! differs). Each gets a 1-node lab; per run and in alternating order: iperf3 throughput,
//! sockperf TCP ping-pong, and new TCP connections per second (see `conn_rate`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddrV4;

use anyhow::{bail, Context, Result};
use weft_common::Counter;

use crate::conn_rate::{connection_rate, ConnRate, ConnServer};
use crate::exec::Cmd;
use crate::lab::{Backend, Dataplane, Lab, LabConfig, Pod, EXTERNAL_HOST};
use crate::load::{sockperf_via, summary, PingPong};
use crate::traffic::IperfReport;

/// Port of the connection-rate server on the external host.
const CONN_PORT: u16 = 8090;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Masquerade {
    /// At the uplink, after the stack.
    Bpf,
    /// The same, later packets of a flow skipping the stack (`--masquerade-fast-path`).
    BpfFast,
    Nftables,
    Iptables,
}

impl Masquerade {
    pub const ALL: [Masquerade; 4] = [
        Masquerade::Bpf,
        Masquerade::BpfFast,
        Masquerade::Nftables,
        Masquerade::Iptables,
    ];

    /// The agent's flags for it.
    pub fn flags(self) -> Vec<String> {
        let value = match self {
            Masquerade::Bpf | Masquerade::BpfFast => "bpf",
            Masquerade::Nftables => "nftables",
            Masquerade::Iptables => "iptables",
        };
        let mut flags = vec![format!("--masquerade={value}")];
        if self == Masquerade::BpfFast {
            flags.push("--masquerade-fast-path".into());
        }
        flags
    }

    fn bpf(self) -> bool {
        matches!(self, Masquerade::Bpf | Masquerade::BpfFast)
    }

    pub fn label(self) -> &'static str {
        match self {
            Masquerade::Bpf => "weft BPF source NAT",
            Masquerade::BpfFast => "weft BPF source NAT, fast path",
            Masquerade::Nftables => "nftables masquerade",
            Masquerade::Iptables => "iptables MASQUERADE",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct NatBenchOptions {
    pub seconds: u32,
    pub runs: usize,
    /// Client threads of the connection-rate load.
    pub parallel: usize,
}

/// The measurements, each run over every lab before the next.
#[derive(Clone, Copy)]
enum Tool {
    Throughput,
    PingPong,
    Connections,
}

/// What one source NAT measured.
#[derive(Debug, Default)]
pub struct NatResults {
    pub throughput: Vec<IperfReport>,
    pub ping_pong: Vec<PingPong>,
    pub connections: Vec<ConnRate>,
}

struct NatLab {
    lab: Lab,
    client: Pod,
    /// The external host, as the harness's load functions address a server.
    external: Pod,
    conn_server: ConnServer,
}

impl NatLab {
    fn start(masquerade: Masquerade) -> Result<NatLab> {
        let mut lab = Lab::start(LabConfig {
            nodes: 1,
            backend: Backend::Vxlan,
            ip_masq: true,
            dataplane: Dataplane::Bpf,
            extra_agent_args: masquerade.flags(),
            ..Default::default()
        })?;
        let client = lab.add_pod(1)?;
        // Connections closed by the client leave it in TIME_WAIT for a minute: let it
        // reuse those ports, as load generators do, so runs do not run out of them.
        Cmd::new(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
            .netns(&client.ns)
            .run()?;
        let external = Pod {
            name: "external".into(),
            ns: lab.fabric_ns().to_string(),
            ip: EXTERNAL_HOST,
            node: 0,
        };
        let conn_server = ConnServer::start(
            lab.fabric_ns(),
            SocketAddrV4::new(EXTERNAL_HOST, CONN_PORT),
            4,
        )?;
        let nat_lab = NatLab {
            lab,
            client,
            external,
            conn_server,
        };
        nat_lab.check(masquerade)?;
        Ok(nat_lab)
    }

    /// Fails unless the pod's traffic leaves with the node's address, translated by the
    /// source NAT this lab is for: the programs' counters rise on the BPF lab only.
    fn check(&self, masquerade: Masquerade) -> Result<()> {
        let before = self.lab.bpf_counters(1)?;
        let probe = connection_rate(&self.client.ns, self.conn_server.addr, 1, 1)?;
        if probe.completed == 0 {
            bail!(
                "the pod cannot connect to {} through {}\n{}",
                self.conn_server.addr,
                masquerade.label(),
                self.lab.diagnostics()
            );
        }
        let grew = self.lab.bpf_counters(1)?.since(&before);
        let by_bpf = grew.get(Counter::NatOut) + grew.get(Counter::NatFastOut) > 0;
        if by_bpf != masquerade.bpf() {
            bail!(
                "the {} lab's traffic {} the BPF source NAT (nat_out {})",
                masquerade.label(),
                if by_bpf {
                    "went through"
                } else {
                    "did not go through"
                },
                grew.get(Counter::NatOut)
            );
        }
        Ok(())
    }
}

/// Measures every source NAT `options.runs` times (alternating order); returns the results
/// and, per lab, the BPF counters' growth. `hold` runs before the labs go, after their
/// namespaces were printed (weft-bench's `--hold`, to look inside).
pub fn run(
    options: &NatBenchOptions,
    hold: Option<&dyn Fn()>,
) -> Result<(BTreeMap<Masquerade, NatResults>, Vec<String>)> {
    let mut labs = BTreeMap::new();
    for masquerade in Masquerade::ALL {
        let lab = NatLab::start(masquerade)
            .with_context(|| format!("starting the {} lab", masquerade.label()))?;
        labs.insert(masquerade, lab);
    }
    let before: BTreeMap<Masquerade, _> = labs
        .iter()
        .map(|(m, l)| Ok((*m, l.lab.bpf_counters(1)?)))
        .collect::<Result<_>>()?;
    let mut results: BTreeMap<Masquerade, NatResults> = BTreeMap::new();
    // One tool at a time over every lab: a connection load leaves some 100,000 TIME_WAIT
    // sockets and conntrack entries behind, whose expiry work would land on whichever
    // lab's throughput or ping-pong ran next.
    for tool in [Tool::Throughput, Tool::PingPong, Tool::Connections] {
        for round in 0..options.runs {
            let mut order = Masquerade::ALL.to_vec();
            if round % 2 == 1 {
                order.reverse();
            }
            for masquerade in order {
                let l = &labs[&masquerade];
                let entry = results.entry(masquerade).or_default();
                let shown = match tool {
                    Tool::Throughput => {
                        let t = l
                            .lab
                            .iperf3_via(&l.client, &l.external, EXTERNAL_HOST, options.seconds, &[])
                            .with_context(|| format!("iperf3 through {}", masquerade.label()))?;
                        let shown = format!("{:6.2} Gbit/s", t.bits_per_second / 1e9);
                        entry.throughput.push(t);
                        shown
                    }
                    Tool::PingPong => {
                        let p = sockperf_via(
                            &l.lab,
                            &l.client,
                            &l.external,
                            EXTERNAL_HOST,
                            options.seconds,
                        )
                        .with_context(|| format!("sockperf through {}", masquerade.label()))?;
                        entry.ping_pong.push(p);
                        format!("{:8.0} RR/s", p.rate)
                    }
                    Tool::Connections => {
                        let c = connection_rate(
                            &l.client.ns,
                            l.conn_server.addr,
                            options.seconds,
                            options.parallel,
                        )?;
                        let mut shown =
                            format!("{:8.0} conn/s ({} failed)", c.per_second, c.failed);
                        if !c.failures.is_empty() {
                            shown += &format!(": {}", c.failures.join("; "));
                        }
                        entry.connections.push(c);
                        shown
                    }
                };
                println!(
                    "  run {}/{} {:<30} {shown}",
                    round + 1,
                    options.runs,
                    masquerade.label(),
                );
            }
        }
    }
    let mut deltas = Vec::new();
    for (masquerade, l) in &labs {
        let grew = l.lab.bpf_counters(1)?.since(&before[masquerade]);
        let shown: Vec<String> = Counter::ALL
            .into_iter()
            .filter(|&c| grew.get(c) > 0 && c.name().starts_with("nat"))
            .map(|c| format!("{}={}", c.name(), grew.get(c)))
            .collect();
        deltas.push(format!(
            "{}: {}",
            masquerade.label(),
            if shown.is_empty() {
                "none".into()
            } else {
                shown.join(" ")
            }
        ));
    }
    if let Some(hold) = hold {
        for (masquerade, l) in &labs {
            println!(
                "weft-bench: {}: pod {} ({}), node {}, external host {}",
                masquerade.label(),
                l.client.ns,
                l.client.ip,
                l.lab.node_ns(1),
                l.lab.fabric_ns()
            );
        }
        hold();
    }
    Ok((results, deltas))
}

/// One metric's median of a source NAT's runs.
type MetricOf = fn(&NatResults) -> Option<f64>;

fn median(values: Vec<f64>) -> Option<f64> {
    summary(values).map(|(median, _, _)| median)
}

impl NatResults {
    fn gbit(&self) -> Option<f64> {
        median(
            self.throughput
                .iter()
                .map(|t| t.bits_per_second / 1e9)
                .collect(),
        )
    }
    fn rate(&self) -> Option<f64> {
        median(self.ping_pong.iter().map(|p| p.rate).collect())
    }
    fn p50(&self) -> Option<f64> {
        median(self.ping_pong.iter().map(|p| p.p50_us).collect())
    }
    fn conns(&self) -> Option<f64> {
        median(self.connections.iter().map(|c| c.per_second).collect())
    }
}

/// The section for the report: a table per source NAT and the targets, BPF
/// against nftables in this run.
pub fn render(
    where_: &str,
    options: &NatBenchOptions,
    results: &BTreeMap<Masquerade, NatResults>,
    deltas: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Masquerade benchmark
"
    );
    let _ = writeln!(
        out,
        "{where_}. A pod to the external host (198.51.100.1, on the fabric) through each source NAT, on a 1-node BPF VXLAN lab each: iperf3 TCP {s} s, sockperf TCP ping-pong {s} s, new TCP connections per second for {s} s ({p} client threads; each connection sends a line, reads the answer and closes first); {r} run(s), alternating order; medians.\n",
        s = options.seconds,
        p = options.parallel,
        r = options.runs
    );
    let _ = writeln!(
        out,
        "| source NAT | Gbit/s | TCP RR/s | p50 RTT us | new conn/s | failed conns | vs nftables (Gbit/s, RR, conn/s) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let base = results.get(&Masquerade::Nftables);
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
    for (masquerade, r) in results {
        let vs = |f: fn(&NatResults) -> Option<f64>| match (f(r), base.and_then(f)) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
            _ => "-".into(),
        };
        let failed: u64 = r.connections.iter().map(|c| c.failed).sum();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {}, {}, {} |",
            masquerade.label(),
            fmt(r.gbit(), 2),
            fmt(r.rate(), 0),
            fmt(r.p50(), 1),
            fmt(r.conns(), 0),
            failed,
            vs(NatResults::gbit),
            vs(NatResults::rate),
            vs(NatResults::conns),
        );
    }
    let _ = writeln!(
        out,
        "\n### Masquerade targets (ratios measured in this run)\n"
    );
    let _ = writeln!(out, "| target | measured | result |");
    let _ = writeln!(out, "|---|---|---|");
    let targets: [(&str, MetricOf, f64); 3] = [
        (
            "new connections/s >= 1.20x nftables",
            NatResults::conns,
            1.20,
        ),
        ("throughput >= 1.00x nftables", NatResults::gbit, 1.00),
        ("ping-pong rate >= 1.00x nftables", NatResults::rate, 1.00),
    ];
    for shape in [Masquerade::Bpf, Masquerade::BpfFast] {
        let Some(bpf) = results.get(&shape) else {
            continue;
        };
        for (wording, metric, factor) in targets {
            let measured = match (metric(bpf), base.and_then(metric)) {
                (Some(v), Some(b)) if b > 0.0 => Some(v / b),
                _ => None,
            };
            let verdict = match measured {
                None => "not measured",
                Some(x) if x >= factor => "PASS",
                Some(_) => "MISS",
            };
            let _ = writeln!(
                out,
                "| {} {wording} | {} | {verdict} |",
                shape.label(),
                measured.map_or("-".into(), |x| format!("{x:.3}x"))
            );
        }
    }
    let _ = writeln!(
        out,
        "\nBPF NAT counters over all measurements: {}.",
        deltas.join("; ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(gbit: f64, rate: f64, conns: f64) -> NatResults {
        NatResults {
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
                p50_us: 50.0,
                p99_us: 90.0,
            }],
            connections: vec![ConnRate {
                per_second: conns,
                completed: conns as u64 * 10,
                failed: 0,
                failures: Vec::new(),
            }],
        }
    }

    #[test]
    fn renders_ratios_against_nftables_and_the_targets() {
        let results = BTreeMap::from([
            (Masquerade::Bpf, measured(12.0, 20_000.0, 6_000.0)),
            (Masquerade::Nftables, measured(12.0, 19_000.0, 5_000.0)),
        ]);
        let options = NatBenchOptions {
            seconds: 10,
            runs: 3,
            parallel: 4,
        };
        let report = render("here", &options, &results, &[]);
        assert!(
            report.contains(
                "| weft BPF source NAT | 12.00 | 20000 | 50.0 | 6000 | 0 | 1.00x, 1.05x, 1.20x |"
            ),
            "{report}"
        );
        assert!(
            report.contains(
                "| weft BPF source NAT new connections/s >= 1.20x nftables | 1.200x | PASS |"
            ),
            "{report}"
        );
        assert!(
            report.contains(
                "| weft BPF source NAT ping-pong rate >= 1.00x nftables | 1.053x | PASS |"
            ),
            "{report}"
        );
        let slower = BTreeMap::from([
            (Masquerade::Bpf, measured(12.0, 19_000.0, 5_000.0)),
            (Masquerade::Nftables, measured(12.0, 19_000.0, 5_000.0)),
        ]);
        let report = render("here", &options, &slower, &[]);
        assert!(
            report.contains(
                "| weft BPF source NAT new connections/s >= 1.20x nftables | 1.000x | MISS |"
            ),
            "{report}"
        );
    }
}
