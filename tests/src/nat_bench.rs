//! The masquerade section of weft-bench: a pod's traffic to the external host through each
//! source NAT, measured in one run: the default (`--masquerade auto`), weft's BPF programs
//! (`--masquerade bpf`, both shapes), nftables' masquerade and iptables' MASQUERADE (all on
//! the same BPF dataplane, so only the NAT differs). Each gets a 1-node lab; per run and in
//! alternating order: iperf3 throughput, sockperf TCP ping-pong, new TCP connections per
//! second (see `conn_rate`), and a DNS-like load (new UDP flows to one resolver, answered %).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddrV4;

use anyhow::{bail, Context, Result};
use weft_common::Counter;

use crate::conn_rate::{connection_rate, ConnRate, ConnServer};
use crate::echo::{dns_like_load, EchoServer, QueryLoad};
use crate::exec::Cmd;
use crate::kube_proxy::Protocol;
use crate::lab::{Backend, Dataplane, Lab, LabConfig, Pod, EXTERNAL_HOST};
use crate::load::{sockperf_via, summary, PingPong};
use crate::traffic::IperfReport;

/// Port of the connection-rate server on the external host.
const CONN_PORT: u16 = 8090;
/// Port of the DNS-like load's resolver on the external host.
const DNS_PORT: u16 = 53;
/// New UDP flows per second of the DNS-like load (its target: all answered at this rate).
pub const DNS_RATE: u32 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Masquerade {
    /// No `--masquerade` flag: what users get.
    Default,
    /// At the uplink, after the stack.
    Bpf,
    /// The same, later packets of a flow skipping the stack (`--masquerade-fast-path`).
    BpfFast,
    Nftables,
    Iptables,
}

impl Masquerade {
    pub const ALL: [Masquerade; 5] = [
        Masquerade::Default,
        Masquerade::Bpf,
        Masquerade::BpfFast,
        Masquerade::Nftables,
        Masquerade::Iptables,
    ];

    /// The agent's flags for it.
    pub fn flags(self) -> Vec<String> {
        let value = match self {
            Masquerade::Default => return Vec::new(),
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
            Masquerade::Default => "default (--masquerade auto)",
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
    Dns,
}

/// What one source NAT measured.
#[derive(Debug, Default)]
pub struct NatResults {
    pub throughput: Vec<IperfReport>,
    pub ping_pong: Vec<PingPong>,
    pub connections: Vec<ConnRate>,
    pub dns: Vec<QueryLoad>,
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
    for tool in [
        Tool::Throughput,
        Tool::PingPong,
        Tool::Connections,
        Tool::Dns,
    ] {
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
                    Tool::Dns => {
                        // Started per run: an echo server serves for five minutes.
                        let _resolver = EchoServer::start(
                            l.lab.fabric_ns(),
                            SocketAddrV4::new(EXTERNAL_HOST, DNS_PORT),
                            Protocol::Udp,
                        )?;
                        let d = dns_like_load(
                            &l.client.ns,
                            SocketAddrV4::new(EXTERNAL_HOST, DNS_PORT),
                            DNS_RATE,
                            options.seconds,
                        )?;
                        let shown = format!(
                            "{:8.0} new UDP flows/s, {}/{} answered ({:.2}%)",
                            d.per_second,
                            d.answered,
                            d.sent,
                            d.answered_percent()
                        );
                        entry.dns.push(d);
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
    fn dns_rate(&self) -> Option<f64> {
        median(self.dns.iter().map(|d| d.per_second).collect())
    }
    /// Answered queries of all runs, in percent (None: not measured).
    fn dns_answered(&self) -> Option<f64> {
        let sent: u64 = self.dns.iter().map(|d| d.sent).sum();
        let answered: u64 = self.dns.iter().map(|d| d.answered).sum();
        (sent > 0).then(|| 100.0 * answered as f64 / sent as f64)
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
        "{where_}. A pod to the external host (198.51.100.1, on the fabric) through each source NAT, on a 1-node BPF VXLAN lab each: iperf3 TCP {s} s, sockperf TCP ping-pong {s} s, new TCP connections per second for {s} s ({p} client threads; each connection sends a line, reads the answer and closes first), and a DNS-like load for {s} s (a new UDP flow per query to one resolver, paced at {d}/s, each answer awaited 0.5 s); {r} run(s), alternating order; medians.\n",
        s = options.seconds,
        p = options.parallel,
        d = DNS_RATE,
        r = options.runs
    );
    let _ = writeln!(
        out,
        "| source NAT | Gbit/s | TCP RR/s | p50 RTT us | new conn/s | failed conns | DNS-like flows/s | answered | vs nftables (Gbit/s, RR, conn/s) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}, {}, {} |",
            masquerade.label(),
            fmt(r.gbit(), 2),
            fmt(r.rate(), 0),
            fmt(r.p50(), 1),
            fmt(r.conns(), 0),
            failed,
            fmt(r.dns_rate(), 0),
            r.dns_answered().map_or("-".into(), |p| format!("{p:.2}%")),
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
    let ratio = |r: &NatResults, metric: MetricOf| match (metric(r), base.and_then(metric)) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    };
    let mut row = |wording: String, measured: Option<f64>, factor: f64, unit: &str| {
        let verdict = match measured {
            None => "not measured",
            Some(x) if x >= factor => "PASS",
            Some(_) => "MISS",
        };
        let shown = measured.map_or("-".into(), |x| match unit {
            "x" => format!("{x:.3}x"),
            _ => format!("{x:.2}{unit}"),
        });
        let _ = writeln!(out, "| {wording} | {shown} | {verdict} |");
    };
    // The DNS-like load: every shape answers every query at the paced rate.
    for (masquerade, r) in results {
        let at_rate = r
            .dns_rate()
            .is_some_and(|v| v >= 0.95 * f64::from(DNS_RATE));
        row(
            format!(
                "{} answers 100% of a DNS-like load at {DNS_RATE} new flows/s",
                masquerade.label()
            ),
            r.dns_answered().map(|p| if at_rate { p } else { 0.0 }),
            100.0,
            "%",
        );
    }
    // The default against nftables on the three rates.
    let same_run: [(&str, MetricOf); 3] = [
        ("throughput", NatResults::gbit),
        ("ping-pong rate", NatResults::rate),
        ("new connections/s", NatResults::conns),
    ];
    if let Some(default) = results.get(&Masquerade::Default) {
        for (wording, metric) in same_run {
            row(
                format!(
                    "{} {wording} >= 1.00x nftables",
                    Masquerade::Default.label()
                ),
                ratio(default, metric),
                1.00,
                "x",
            );
        }
    }
    // The goal for new connections: whichever shape is fastest.
    if let Some((fastest, r)) = results
        .iter()
        .filter(|(m, _)| **m != Masquerade::Nftables)
        .max_by(|a, b| {
            let rate = |r: &NatResults| r.conns().unwrap_or(0.0);
            rate(a.1).total_cmp(&rate(b.1))
        })
    {
        row(
            format!(
                "fastest shape ({}) new connections/s >= 1.20x nftables",
                fastest.label()
            ),
            ratio(r, NatResults::conns),
            1.20,
            "x",
        );
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

    fn measured(gbit: f64, rate: f64, conns: f64, answered: u64) -> NatResults {
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
            dns: vec![QueryLoad {
                sent: 10_000,
                answered,
                per_second: 1_000.0,
                seen: Default::default(),
            }],
        }
    }

    #[test]
    fn renders_ratios_against_nftables_and_the_targets() {
        let results = BTreeMap::from([
            (
                Masquerade::Default,
                measured(12.0, 19_500.0, 4_900.0, 10_000),
            ),
            (Masquerade::Bpf, measured(12.0, 20_000.0, 6_000.0, 9_966)),
            (
                Masquerade::Nftables,
                measured(12.0, 19_000.0, 5_000.0, 10_000),
            ),
        ]);
        let options = NatBenchOptions {
            seconds: 10,
            runs: 3,
            parallel: 4,
        };
        let report = render("here", &options, &results, &[]);
        for line in [
            "| weft BPF source NAT | 12.00 | 20000 | 50.0 | 6000 | 0 | 1000 | 99.66% | 1.00x, 1.05x, 1.20x |",
            "| weft BPF source NAT answers 100% of a DNS-like load at 1000 new flows/s | 99.66% | MISS |",
            "| default (--masquerade auto) answers 100% of a DNS-like load at 1000 new flows/s | 100.00% | PASS |",
            "| default (--masquerade auto) ping-pong rate >= 1.00x nftables | 1.026x | PASS |",
            "| default (--masquerade auto) new connections/s >= 1.00x nftables | 0.980x | MISS |",
            "| fastest shape (weft BPF source NAT) new connections/s >= 1.20x nftables | 1.200x | PASS |",
        ] {
            assert!(report.contains(line), "{line}\nnot in\n{report}");
        }
    }
}
