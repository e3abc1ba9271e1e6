//! Chaos in the lab: a two-node BPF/VXLAN lab carries a ping flood and a TCP stream from a
//! pod on node 1 to a pod on node 2 while node 2 suffers one fault; each scenario reports
//! what was lost (echoes, and the time they span) and how long after the fault weft's
//! state was whole again. `cargo xtask chaos` runs them all; the quick ones are also tests.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::bpf::read_leases;
use crate::exec::{run, wait_until, Cmd};
use crate::icmp::Flood;
use crate::lab::{Backend, Dataplane, Lab, LabConfig, Pod, SubnetManager};
use crate::traffic::TcpFlow;

/// The agents' resync interval in the chaos lab: repairs are due within it.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Echo requests every 5 ms: a gap of one interval is one lost echo.
const FLOOD_INTERVAL: Duration = Duration::from_millis(5);
/// How long to watch for a repair before calling it missing.
const REPAIR_LIMIT: Duration = Duration::from_secs(45);

/// One fault, done to node 2 (or to what it depends on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    UplinkFlap,
    VxlanDeviceDeleted,
    PodBridgeDeleted,
    TcFilterDeleted,
    MapEntryDeleted,
    EtcdRestarted,
    ApiServerDown,
    AgentKilledDuringChurn,
    NodeIpChanged,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::UplinkFlap,
        Fault::VxlanDeviceDeleted,
        Fault::PodBridgeDeleted,
        Fault::TcFilterDeleted,
        Fault::MapEntryDeleted,
        Fault::EtcdRestarted,
        Fault::ApiServerDown,
        Fault::AgentKilledDuringChurn,
        Fault::NodeIpChanged,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Fault::UplinkFlap => "uplink eth0 down for 1 s, then up",
            Fault::VxlanDeviceDeleted => "flannel.1 deleted by hand",
            Fault::PodBridgeDeleted => "pod bridge cni0 deleted by hand",
            Fault::TcFilterDeleted => "weft's tc filters on eth0 deleted",
            Fault::MapEntryDeleted => "the peer's entry deleted from the pinned leases map",
            Fault::EtcdRestarted => "etcd restarted",
            Fault::ApiServerDown => "API server unreachable for 30 s",
            Fault::AgentKilledDuringChurn => "agent SIGKILLed during lease churn, restarted",
            Fault::NodeIpChanged => "node 2's IP changed (198.18.0.12 to .42)",
        }
    }
}

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub fault: Fault,
    pub echoes_sent: u16,
    pub echoes_lost: usize,
    /// The stream arrived complete and intact.
    pub stream_intact: bool,
    pub longest_stall: Duration,
    /// From the end of the fault until weft's state was whole again (None: not repaired
    /// within the limit).
    pub repaired_after: Option<Duration>,
    /// What "whole" was checked as, and anything worth saying.
    pub note: String,
}

impl Outcome {
    /// The time the lost echoes span.
    pub fn lost_time(&self) -> Duration {
        FLOOD_INTERVAL * self.echoes_lost as u32
    }

    pub fn row(&self) -> String {
        format!(
            "| {} | {} of {} ({:.2} s) | {} (longest stall {:.2} s) | {} | {} |",
            self.fault.describe(),
            self.echoes_lost,
            self.echoes_sent,
            self.lost_time().as_secs_f64(),
            if self.stream_intact {
                "intact"
            } else {
                "broken"
            },
            self.longest_stall.as_secs_f64(),
            self.repaired_after
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not repaired".into()),
            self.note
        )
    }

    pub const HEADER: &'static str = "| fault | echoes lost (time) | TCP stream | weft's state whole again after | checked |\n|---|---|---|---|---|";
}

fn lab_for(fault: Fault) -> Result<Lab> {
    let kube = fault == Fault::ApiServerDown;
    Lab::start(LabConfig {
        nodes: 2,
        backend: Backend::Vxlan,
        dataplane: Dataplane::Bpf,
        ip_masq: true,
        subnet_manager: if kube {
            SubnetManager::Kube
        } else {
            SubnetManager::Etcd
        },
        extra_agent_args: vec![format!("--resync-interval={}", RESYNC_INTERVAL.as_secs())],
        ..Default::default()
    })
}

/// Runs `fault` in a fresh lab and measures it.
pub fn run_scenario(fault: Fault) -> Result<Outcome> {
    let mut lab = lab_for(fault)?;
    let pods = lab.add_pods(1)?;
    let (a, b) = (pods[0].clone(), pods[1].clone());
    wait_until("the pods ping", Duration::from_secs(15), || {
        Ok(lab.ping(&a, b.ip))
    })?;
    // Both pods learned first: a connection that starts before its pod is learned keeps
    // the kernel path for its life, and the scenarios are about the fast path's.
    for node in [1, 2] {
        lab.wait_bpf_synced(node, Duration::from_secs(15))?;
    }
    let counters_before = lab.bpf_counters(2)?;
    let flow = TcpFlow::start(&a, &b, 7000, 1 << 20, Duration::from_secs(120))?;
    let flood = Flood::start(&a.ns, b.ip, u16::MAX, FLOOD_INTERVAL);

    let (repaired_after, note) = inject(&mut lab, fault, &a, &b)?;
    // Traffic after the repair shows the path is whole, not just the state.
    wait_until("a ping crosses after the repair", REPAIR_LIMIT, || {
        Ok(lab.ping(&a, b.ip))
    })?;
    let flood = flood.stop()?;
    let stream = flow.finish();
    let (stream_intact, longest_stall) = match &stream {
        Ok(report) => (report.complete(), report.longest_stall),
        Err(_) => (false, Duration::ZERO),
    };
    let datapath = match lab.bpf_counters(2) {
        Ok(now) => format!("; node 2 datapath: {}", now.since(&counters_before)),
        Err(e) => format!("; node 2 counters unreadable: {e:#}"),
    };
    let note = note + &datapath;
    Ok(Outcome {
        fault,
        echoes_sent: flood.sent,
        echoes_lost: flood.lost(),
        stream_intact,
        longest_stall,
        repaired_after,
        note,
    })
}

/// Does `fault`, then waits for the repair; returns how long after the fault ended it
/// took, and what was checked.
fn inject(lab: &mut Lab, fault: Fault, a: &Pod, b: &Pod) -> Result<(Option<Duration>, String)> {
    let ns = lab.node_ns(2).to_string();
    let peer_lease = lab.lease_of(1)?;
    let peer_route_back = |lab: &Lab| -> Result<bool> {
        let routes = lab.ip_json(lab.node_ns(2), &["route", "show", &peer_lease.cidr()])?;
        Ok(!routes.is_empty())
    };
    let repaired = |what: &str, check: &mut dyn FnMut() -> Result<bool>| {
        let ended = Instant::now();
        wait_until(what, REPAIR_LIMIT, check)
            .ok()
            .map(|_| ended.elapsed())
    };
    Ok(match fault {
        Fault::UplinkFlap => {
            Cmd::new(["ip", "link", "set", "eth0", "down"])
                .netns(&ns)
                .run()?;
            std::thread::sleep(Duration::from_secs(1));
            Cmd::new(["ip", "link", "set", "eth0", "up"])
                .netns(&ns)
                .run()?;
            let when = repaired("pings cross again", &mut || Ok(lab.ping(a, b.ip)));
            (when, "pings cross again; peer routes in place".into())
        }
        Fault::VxlanDeviceDeleted => {
            Cmd::new(["ip", "link", "del", "flannel.1"])
                .netns(&ns)
                .run()?;
            let when = repaired("flannel.1 and the peer's route back", &mut || {
                let link = Cmd::new(["ip", "link", "show", "flannel.1"])
                    .netns(&ns)
                    .run();
                Ok(link.is_ok() && peer_route_back(lab)?)
            });
            (when, "flannel.1 re-created with the peer's route".into())
        }
        Fault::PodBridgeDeleted => {
            Cmd::new(["ip", "link", "del", "cni0"]).netns(&ns).run()?;
            let when = repaired("pings cross again", &mut || Ok(lab.ping(a, b.ip)));
            (
                when,
                "pings cross again (cni0 belongs to the CNI bridge plugin, which re-creates it \
                 at the next pod sandbox; weft does not)"
                    .into(),
            )
        }
        Fault::TcFilterDeleted => {
            for hook in ["ingress", "egress"] {
                Cmd::new(["tc", "filter", "del", "dev", "eth0", hook])
                    .netns(&ns)
                    .run()?;
            }
            let when = repaired("weft's filters back on eth0", &mut || {
                let filters = lab.weft_filters(2)?;
                Ok(["from_netdev", "to_netdev"]
                    .iter()
                    .all(|p| filters.iter().any(|f| f.iface == "eth0" && f.program == *p)))
            });
            (when, "from_netdev and to_netdev attached again".into())
        }
        Fault::MapEntryDeleted => {
            let net = peer_lease.subnet;
            let o = net.octets();
            let prefix = peer_lease.prefix_len;
            let key: Vec<String> = [prefix, 0, 0, 0, o[0], o[1], o[2], o[3]]
                .iter()
                .map(|b| b.to_string())
                .collect();
            let pin = lab.bpf_dir(2).join("leases");
            let mut args = vec!["bpftool", "map", "delete", "pinned"];
            let pin = pin.to_string_lossy().into_owned();
            args.push(&pin);
            args.push("key");
            args.extend(key.iter().map(String::as_str));
            run(&args)?;
            let dir = lab.bpf_dir(2).to_path_buf();
            let when = repaired("the peer's lease back in the map", &mut || {
                Ok(read_leases(&dir)?.contains_key(&(net, prefix)))
            });
            (when, "the lease entry written again".into())
        }
        Fault::EtcdRestarted => {
            let down = lab.restart_etcd()?;
            // The watch must work again: a lease written after the restart is programmed.
            let value = json!({"PublicIP": "198.18.0.50", "BackendType": "vxlan",
                "BackendData": {"VNI": 1, "VtepMAC": "0e:00:00:00:00:50"}});
            lab.put_raw_lease("10.244.250.0-24", &value.to_string())?;
            let when = repaired(
                "a lease written after the restart is programmed",
                &mut || {
                    let routes = lab.ip_json(&ns, &["route", "show", "10.244.250.0/24"])?;
                    Ok(!routes.is_empty())
                },
            );
            (
                when,
                format!(
                    "etcd gone {:.1} s; a new lease programmed",
                    down.as_secs_f64()
                ),
            )
        }
        Fault::ApiServerDown => {
            lab.freeze_api_server(true)?;
            // The outage's length, not a wait for anything.
            std::thread::sleep(Duration::from_secs(30));
            lab.freeze_api_server(false)?;
            let when = repaired(
                "the agent still runs and the peer's route stays",
                &mut || Ok(peer_route_back(lab)? && lab.ping(a, b.ip)),
            );
            let running = lab.agent_running(2);
            if !running {
                bail!("node 2's agent exited while the API server was down");
            }
            (when, "agent kept running; dataplane left as it was".into())
        }
        Fault::AgentKilledDuringChurn => churn_and_kill(lab)?,
        Fault::NodeIpChanged => {
            Cmd::new(["ip", "addr", "del", "198.18.0.12/24", "dev", "eth0"])
                .netns(&ns)
                .run()?;
            Cmd::new(["ip", "addr", "add", "198.18.0.42/24", "dev", "eth0"])
                .netns(&ns)
                .run()?;
            // The agent notices at its next resync and exits; kubelet or systemd would
            // restart it, as the lab does here.
            wait_until("node 2's agent to exit", RESYNC_INTERVAL * 3, || {
                Ok(!lab.agent_running(2))
            })
            .context("the agent did not notice its address is gone")?;
            let ended = Instant::now();
            lab.start_agent(2)?;
            let when = wait_until(
                "the peers to reach node 2 at its new address",
                REPAIR_LIMIT,
                || Ok(lab.ping(a, b.ip)),
            )
            .ok()
            .map(|_| ended.elapsed());
            (
                when,
                "agent exited at its next resync; restarted, new PublicIP published".into(),
            )
        }
    })
}

/// Churns 20 lease keys in etcd, kills node 2's agent in the middle, restarts it, and
/// waits until its routes are exactly the final table.
fn churn_and_kill(lab: &mut Lab) -> Result<(Option<Duration>, String)> {
    let keys: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("10.244.{}.0-24", 200 + i),
                format!("10.244.{}.0/24", 200 + i),
            )
        })
        .collect();
    let value = |i: usize| {
        json!({"PublicIP": format!("198.18.0.{}", 60 + i), "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": format!("0e:00:00:00:01:{:02x}", i)}})
        .to_string()
    };
    for round in 0..3 {
        for (i, (key, _)) in keys.iter().enumerate() {
            if (i + round) % 2 == 0 {
                lab.put_raw_lease(key, &value(i))?;
            } else {
                lab.etcdctl(&["del", &format!("{}/subnets/{key}", crate::lab::ETCD_PREFIX)])?;
            }
            if round == 1 && i == 10 {
                lab.kill_agent(2);
            }
        }
    }
    // The final table: round 2 put the keys with (i + 2) even.
    let ended = Instant::now();
    lab.start_agent(2)?;
    let ns = lab.node_ns(2).to_string();
    let exact = wait_until(
        "node 2's routes to match the final lease table",
        REPAIR_LIMIT,
        || {
            for (i, (_, cidr)) in keys.iter().enumerate() {
                let present = !lab.ip_json(&ns, &["route", "show", cidr])?.is_empty();
                if present != (i % 2 == 0) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    );
    Ok((
        exact.ok().map(|_| ended.elapsed()),
        "routes exactly the final table of 10 churned leases (from the restart)".into(),
    ))
}
