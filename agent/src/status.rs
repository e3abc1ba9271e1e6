//! `weft status` and `weft bpf ...`: the node's network as an operator needs to see it,
//! from what stays on the node (subnet.env, the agent's record, the pinned maps, weft's
//! routes), so that it answers while the agent is down; the agent's /readyz when it runs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::backend::netlink as nl;
use crate::inspect::{
    self, nonzero_counters, table, AgentRecord, ConfigView, CounterRow, EndpointRow,
};
use crate::subnet_env::SubnetEnv;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The agent's subnet file (its --subnet-file); its record lies beside it.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// The pin directory, if not the one the agent recorded (its --bpf-dir).
    #[arg(long)]
    pub bpf_dir: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug, Clone)]
pub struct BpfArgs {
    #[command(subcommand)]
    pub map: BpfMap,
    /// Where the agent pins its maps (its --bpf-dir).
    #[arg(long, env = "WEFT_BPF_DIR", default_value = crate::bpf::DEFAULT_BPF_DIR, global = true)]
    pub bpf_dir: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Output,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpfMap {
    /// Remote subnets and how the fast path reaches them (the `leases` map).
    Leases,
    /// Nodes allowed to send VXLAN to this one (the `peers` map).
    Peers,
    /// Local pods the fast path delivers to (the `endpoints` map).
    Endpoints,
    /// Packets per datapath outcome (the `counters` map, summed over CPUs).
    Counters,
    /// The programs' settings and whether the fast path is active (the `config` map).
    Config,
    /// Source NAT mappings: pod flow, the node's address and port, state, idle time
    /// (the `nat` and `nat_reverse` maps).
    Nat,
}

/// `weft bpf <map>`: the map decoded, as a table or JSON.
pub fn bpf(args: &BpfArgs) -> Result<String> {
    let dir = &args.bpf_dir;
    let json = args.output == Output::Json;
    match args.map {
        BpfMap::Leases => shown(json, &inspect::leases(dir)?, |rows| {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let ip = r.public_ip.to_string();
                    vec![r.subnet.clone(), ip, r.path.clone(), r.vtep_mac.clone()]
                })
                .collect();
            table(&["SUBNET", "PUBLIC IP", "PATH", "VTEP MAC"], &cells)
        }),
        BpfMap::Peers => shown(json, &inspect::peers(dir)?, |rows| {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.public_ip.to_string(), r.leases.to_string()])
                .collect();
            table(&["PUBLIC IP", "LEASES"], &cells)
        }),
        BpfMap::Endpoints => shown(json, &inspect::endpoints(dir)?, |rows| endpoint_table(rows)),
        BpfMap::Counters => shown(json, &inspect::counters(dir)?, |rows| {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.name.clone(), r.packets.to_string()])
                .collect();
            table(&["COUNTER", "PACKETS"], &cells)
        }),
        BpfMap::Config => shown(json, &inspect::config(dir)?, config_lines),
        BpfMap::Nat => shown(json, &inspect::nat(dir)?, |rows| {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let idle = format!("{:.0}", r.idle_secs);
                    let (proto, state) = (r.protocol.clone(), r.state.clone());
                    vec![
                        proto,
                        r.pod.clone(),
                        r.outside.clone(),
                        r.node.clone(),
                        state,
                        idle,
                    ]
                })
                .collect();
            table(
                &["PROTO", "POD", "OUTSIDE", "NODE", "STATE", "IDLE S"],
                &cells,
            )
        }),
    }
}

/// `value` as JSON, or as `text` renders it.
fn shown<T: Serialize + ?Sized>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<String> {
    if json {
        to_json(value)
    } else {
        Ok(text(value))
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

fn endpoint_table(rows: &[EndpointRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.pod_ip.to_string(),
                r.interface
                    .clone()
                    .unwrap_or_else(|| format!("#{} (gone)", r.ifindex)),
                r.pod_mac.clone(),
                r.host_mac.clone(),
            ]
        })
        .collect();
    table(&["POD IP", "HOST VETH", "POD MAC", "HOST MAC"], &cells)
}

fn config_lines(c: &ConfigView) -> String {
    let uplink = c
        .uplink
        .clone()
        .unwrap_or_else(|| format!("#{}", c.uplink_ifindex));
    format!(
        "fast path:   {}\nVNI:         {} (UDP port {})\nnode IP:     {} on {uplink}\ninner MTU:   {}\nVTEP MAC:    {}\nleases:      {}\nsource NAT:  {}\n",
        fast_path_line(c),
        c.vni,
        c.vxlan_port,
        c.node_ip,
        c.inner_mtu,
        c.vtep_mac,
        if c.leases_complete {
            "all in the map"
        } else {
            "some did not fit in the map: those peers take the kernel path"
        },
        match &c.source_nat {
            Some(n) => format!(
                "on, ports {}-{}, {} mappings (limit {})",
                n.port_min, n.port_max, n.mappings, n.limit
            ),
            None => "off (the firewall masquerades, if --ip-masq)".to_string(),
        },
    )
}

/// Whether the programs act on packets now, and why not.
fn fast_path_line(c: &ConfigView) -> String {
    let refreshed = format!(
        "refreshed {:.1} s ago{}",
        c.refreshed_secs_ago,
        c.stale_after_secs
            .map(|s| format!(", stale after {s:.0} s"))
            .unwrap_or_default()
    );
    if c.stale {
        format!("inactive: the agent stopped refreshing the maps ({refreshed}); every packet takes the kernel path until it is back")
    } else if !c.fast_path_on && !c.policy_known {
        format!("off: the agent could not read the node's netfilter rules (its policy probe failed: the agent's log names the tool and the fix), so rules that filter forwarded pod traffic may exist; every packet takes the kernel path ({refreshed})")
    } else if !c.fast_path_on {
        format!("off: the agent found netfilter rules that filter forwarded pod traffic, which the fast path would bypass; every packet takes the kernel path ({refreshed})")
    } else if !c.policy_known {
        format!("on, forced by --dataplane=bpf although the agent could not read the node's netfilter rules (its policy probe failed) ({refreshed})")
    } else {
        format!("on ({refreshed})")
    }
}

/// `weft status`, as data (`-o json`) and as text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent: AgentStatus,
    pub dataplane: DataplaneStatus,
    pub lease: Option<LeaseStatus>,
    pub peers: Vec<PeerStatus>,
    /// Local pods the fast path knows (BPF dataplane only).
    pub pods: Vec<EndpointRow>,
    pub counters: Vec<CounterRow>,
    /// What needs attention, each with what to do; empty when healthy.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    /// `running`, `not running` or `unknown` (no record).
    pub state: String,
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    /// The agent's /readyz answer (`200 ok`, `503 ...`), when it serves one.
    pub readyz: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataplaneStatus {
    /// `bpf`, `kernel` or `unknown`.
    pub mode: String,
    pub reason: String,
    pub backend: Option<String>,
    pub bpf_dir: Option<PathBuf>,
    /// The `config` map, in BPF mode.
    pub fast_path: Option<ConfigView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub network: String,
    pub subnet: String,
    pub mtu: u32,
    pub ip_masq: bool,
}

/// A remote subnet and how this node reaches it, as each dataplane has it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub subnet: String,
    pub public_ip: Option<Ipv4Addr>,
    /// The fast path's way (`vxlan`, `direct`), from the `leases` map.
    pub fast_path: Option<String>,
    /// weft's kernel route (`via 10.244.2.0 dev flannel.1 onlink`).
    pub kernel_route: Option<String>,
}

pub fn status(args: &StatusArgs) -> Result<StatusReport> {
    let mut problems = Vec::new();
    let record = AgentRecord::read(&args.subnet_file)?;
    let lease = match SubnetEnv::read(&args.subnet_file) {
        Ok(Some(env)) => Some(LeaseStatus {
            network: env.network.to_string(),
            subnet: env.subnet.to_string(),
            mtu: env.mtu,
            ip_masq: env.ipmasq,
        }),
        Ok(None) => {
            problems.push(format!(
                "no subnet.env at {}: the agent has not acquired a lease on this node (see its log), or it uses another --subnet-file (give it)",
                args.subnet_file.display()
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{e:#}"));
            None
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")?;

    let mut agent = AgentStatus {
        state: "unknown".into(),
        pid: None,
        started_at: None,
        iface: None,
        public_ip: None,
        readyz: None,
    };
    if let Some(r) = &record {
        agent.pid = Some(r.pid);
        agent.started_at = Some(r.started_at);
        agent.iface = Some(r.iface.clone());
        agent.public_ip = Some(r.public_ip);
        if r.running() {
            agent.state = "running".into();
            if let Some(addr) = &r.healthz {
                let answer = runtime.block_on(readyz(addr));
                match &answer {
                    Ok((200, _)) => {}
                    Ok((code, body)) => problems.push(format!(
                        "the agent is not ready (/readyz {code}): {}",
                        body.trim()
                    )),
                    Err(e) => problems.push(format!(
                        "the agent runs but its /readyz on {addr} does not answer: {e:#}"
                    )),
                }
                agent.readyz = answer
                    .ok()
                    .map(|(code, body)| format!("{code} {}", body.trim()));
            }
        } else {
            agent.state = "not running".into();
            problems.push(format!(
                "the agent (pid {}) is not running: what it programmed stays in place, but new leases and pods are not picked up; start it again (systemctl start flanneld, or the DaemonSet's pod)",
                r.pid
            ));
        }
    } else {
        problems.push(format!(
            "no agent record at {}: weft has not started on this node with this --subnet-file",
            AgentRecord::path(&args.subnet_file).display()
        ));
    }

    let bpf_dir = args
        .bpf_dir
        .clone()
        .or_else(|| record.as_ref().map(|r| r.bpf_dir.clone()))
        .unwrap_or_else(|| PathBuf::from(crate::bpf::DEFAULT_BPF_DIR));
    let recorded_mode = record.as_ref().map(|r| r.mode.clone());
    let fast_path = inspect::config(&bpf_dir).ok();
    let mode = match (&recorded_mode, &fast_path) {
        (Some(mode), _) => mode.clone(),
        (None, Some(_)) => "bpf".into(),
        (None, None) => "unknown".into(),
    };
    if let Some(c) = &fast_path {
        if c.stale || !c.fast_path_on || !c.policy_known {
            problems.push(format!("fast path {}", fast_path_line(c)));
        }
        if let Some(nat) = c
            .source_nat
            .as_ref()
            .filter(|n| n.mappings >= u64::from(n.limit))
        {
            problems.push(format!(
                "the BPF source NAT table holds {} mappings, its limit: new flows go to the kernel's masquerade (nat_fallback); raise --masquerade-table-size",
                nat.mappings
            ));
        }
        if !c.leases_complete {
            problems.push("some leases did not fit in the BPF leases map: those peers take the kernel path (weft_bpf_overflow on /metrics)".into());
        }
    }
    let dataplane = DataplaneStatus {
        reason: record
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or_default(),
        backend: record.as_ref().map(|r| r.backend.clone()),
        bpf_dir: fast_path.as_ref().map(|_| bpf_dir.clone()),
        mode,
        fast_path,
    };
    let in_bpf = dataplane.fast_path.is_some();

    // Peers: the fast path's leases joined with weft's kernel routes, by subnet.
    let mut peers: Vec<PeerStatus> = Vec::new();
    if in_bpf {
        for l in inspect::leases(&bpf_dir)? {
            peers.push(PeerStatus {
                subnet: l.subnet,
                public_ip: Some(l.public_ip),
                fast_path: Some(l.path),
                kernel_route: None,
            });
        }
    }
    match runtime.block_on(weft_routes()) {
        Ok(routes) => {
            for (subnet, route) in routes {
                match peers.iter_mut().find(|p| p.subnet == subnet) {
                    Some(peer) => peer.kernel_route = Some(route),
                    None => peers.push(PeerStatus {
                        subnet,
                        public_ip: None,
                        fast_path: None,
                        kernel_route: Some(route),
                    }),
                }
            }
        }
        Err(e) => problems.push(format!("cannot read the routing table: {e:#}")),
    }
    peers.sort_by_key(|p| {
        p.subnet
            .split('/')
            .next()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .map(u32::from)
    });
    let (pods, counters) = if in_bpf {
        (inspect::endpoints(&bpf_dir)?, inspect::counters(&bpf_dir)?)
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(StatusReport {
        agent,
        dataplane,
        lease,
        peers,
        pods,
        counters,
        problems,
    })
}

/// weft's routes (proto 87): destination → `via X dev Y [onlink]`.
async fn weft_routes() -> Result<Vec<(String, String)>> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    let task = tokio::spawn(connection);
    let dumps = (nl::routes(&handle).await, nl::links(&handle).await);
    task.abort();
    let (routes, links) = (dumps.0?, dumps.1?);
    Ok(routes
        .into_iter()
        .filter(|r| r.is_weft())
        .map(|r| {
            let dev = r
                .oif
                .and_then(|i| links.iter().find(|l| l.index == i))
                .map(|l| l.name.clone())
                .unwrap_or_else(|| "?".into());
            let via = r.gateway.map(|g| format!("via {g} ")).unwrap_or_default();
            (r.dst.to_string(), format!("{via}dev {dev}"))
        })
        .collect())
}

/// GET /readyz from the agent's health server: status code and body.
async fn readyz(addr: &str) -> Result<(u16, String)> {
    let addr = addr.replace("0.0.0.0", "127.0.0.1");
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(&addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get("/readyz")
            .header("host", &addr)
            .body(String::new())?;
        let response = sender.send_request(request).await?;
        let code = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok::<_, anyhow::Error>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .context("no answer within 3 s")?
}

impl StatusReport {
    /// The report for people, like `cilium status`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let a = &self.agent;
        let mut agent = a.state.clone();
        if let Some(pid) = a.pid {
            agent.push_str(&format!(" (pid {pid})"));
        }
        if let Some(readyz) = &a.readyz {
            agent.push_str(&format!(", /readyz: {readyz}"));
        }
        out.push_str(&format!("Agent:       {agent}\n"));
        if let (Some(iface), Some(ip)) = (&a.iface, a.public_ip) {
            out.push_str(&format!("Interface:   {iface}, public IP {ip}\n"));
        }
        let d = &self.dataplane;
        let mut dataplane = d.mode.clone();
        if !d.reason.is_empty() {
            dataplane.push_str(&format!(" ({})", d.reason));
        }
        out.push_str(&format!("Dataplane:   {dataplane}\n"));
        if let Some(backend) = &d.backend {
            out.push_str(&format!("Backend:     {backend}\n"));
        }
        if let Some(c) = &d.fast_path {
            out.push_str(&format!("Fast path:   {}\n", fast_path_line(c)));
            if let Some(nat) = &c.source_nat {
                out.push_str(&format!(
                    "Source NAT:  BPF, {} mappings (new flows to the kernel's masquerade from {}), ports {}-{}\n",
                    nat.mappings, nat.limit, nat.port_min, nat.port_max
                ));
            }
        }
        match &self.lease {
            Some(l) => out.push_str(&format!(
                "Lease:       {} of {}, MTU {}, ip-masq {}\n",
                l.subnet, l.network, l.mtu, l.ip_masq
            )),
            None => out.push_str("Lease:       none (no subnet.env)\n"),
        }
        out.push_str(&format!("Peers:       {}\n", self.peers.len()));
        if !self.peers.is_empty() {
            let cells: Vec<Vec<String>> = self
                .peers
                .iter()
                .map(|p| {
                    vec![
                        p.subnet.clone(),
                        p.public_ip.map(|ip| ip.to_string()).unwrap_or("-".into()),
                        p.fast_path.clone().unwrap_or("-".into()),
                        p.kernel_route.clone().unwrap_or("-".into()),
                    ]
                })
                .collect();
            for line in table(
                &["SUBNET", "PUBLIC IP", "FAST PATH", "KERNEL ROUTE"],
                &cells,
            )
            .lines()
            {
                out.push_str(&format!("  {line}\n"));
            }
        }
        if d.fast_path.is_some() {
            out.push_str(&format!("Pods:        {} learned\n", self.pods.len()));
            for line in endpoint_table(&self.pods).lines().skip(1) {
                out.push_str(&format!("  {line}\n"));
            }
            out.push_str(&format!(
                "Counters:    {}\n",
                nonzero_counters(&self.counters)
            ));
        }
        if self.problems.is_empty() {
            out.push_str("Health:      OK\n");
        } else {
            out.push_str("Health:      needs attention\n");
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

/// The agent's record, written once it knows its dataplane.
pub fn record_agent(
    subnet_file: &Path,
    dataplane: &crate::metrics::DataplaneInfo,
    bpf_dir: &Path,
    backend: &str,
    ext: &crate::iface::ExtIface,
    healthz: Option<String>,
) -> Result<()> {
    AgentRecord {
        pid: std::process::id(),
        mode: dataplane.mode.clone(),
        reason: dataplane.reason.clone(),
        bpf_dir: bpf_dir.to_path_buf(),
        backend: backend.to_string(),
        iface: ext.name.clone(),
        public_ip: ext.public_ip,
        healthz,
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
    .write(subnet_file)
}
