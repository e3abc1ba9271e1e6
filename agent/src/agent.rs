//! The agent's main loop: config → interface → lease → dataplane → subnet.env → watch.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn};

use crate::backend::netlink as nl;
use crate::bpf::nat::NatSettings;
use crate::bpf::{self, BpfOptions};
use crate::config::{AgentArgs, NetConf};
use crate::dataplane::Dataplane;
use crate::health;
use crate::iface::{self, IfaceSelection};
use crate::lease::{subnet_key, Lease, LeaseEvent, LeaseWatchEvent};
use crate::masq::{self, Firewall, MasqSpec};
use crate::metrics::{AgentState, DataplaneInfo, PeerHealth, ReadyPart};
use crate::status;
use crate::subnet::etcd::{EtcdOptions, EtcdSubnetManager};
use crate::subnet::kube::{KubeOptions, KubeSubnetManager};
use crate::subnet::SubnetManager;
use crate::subnet_env::SubnetEnv;
use crate::systemd;
use std::sync::Arc;

/// Runs `weft agent` until a signal or a fatal error.
pub async fn run(args: AgentArgs) -> Result<()> {
    if args.cleanup {
        return cleanup(&args).await;
    }
    // Serve /healthz before connecting anywhere, so probes answer while etcd or the API is slow.
    let state = Arc::new(AgentState::new());
    let _health = health::start(args.healthz_ip, args.healthz_port, state.clone()).await?;
    if args.kube_subnet_mgr {
        state.set_watch_restarts_counter(&crate::subnet::kube::WATCH_RESTARTS);
    }
    systemd::status("connecting to the subnet store");
    let (subnets, selection, selection_reason) = subnet_manager(&args).await?;
    let conf = subnets.network_config().await?;
    for w in &conf.warnings {
        warn!("{w}");
    }
    info!(network = %conf.network, backend = conf.backend.type_name(), "network config");

    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(connection);
    let ext = iface::select_ext_iface(&handle, &selection).await;
    let ext = match selection_reason {
        Some(why) => ext.context(why)?,
        None => ext?,
    };
    info!(iface = %ext.name, addr = %ext.addr, public_ip = %ext.public_ip, mtu = ext.mtu, "using interface");

    let nat = nat_settings(&args)?;
    let (backend, why) = bpf::select_dataplane(
        args.dataplane,
        bpf::EMBEDDED_OBJECT,
        &conf,
        &ext,
        handle.clone(),
        &bpf_options(&args, nat.clone()),
    )
    .await?;
    info!("dataplane: {why}");
    // The programs translate only where they run.
    let bpf_runs = why.starts_with("bpf");
    let nat = nat.filter(|_| bpf_runs);
    if bpf_runs {
        tokio::spawn(keep_stack_flows(args.bpf_dir.clone(), state.clone()));
    }
    if nat.is_none() && args.ip_masq && args.masquerade == masq::MasqueradeChoice::Bpf {
        warn!(
            "--masquerade=bpf: the BPF dataplane is not running here, so the firewall masquerades"
        );
    }
    let why_dataplane = why.clone();
    let mut dataplane = Dataplane::for_netconf(backend, &conf, &ext, handle.clone());
    let info = DataplaneInfo::from_selection(&why, &args.bpf_dir);
    let healthz =
        (args.healthz_port != 0).then(|| format!("{}:{}", args.healthz_ip, args.healthz_port));
    // For `weft status`, which reads it while the agent is down too.
    if let Err(e) = status::record_agent(
        &args.subnet_file,
        &info,
        &args.bpf_dir,
        conf.backend.type_name(),
        &ext,
        healthz,
    ) {
        warn!("cannot record the agent's state for `weft status`: {e:#}");
    }
    state.set_dataplane(info);
    let previous = subnets.previous_lease(ext.public_ip).await?;
    let attrs = dataplane.register(previous.as_ref()).await?;
    // From the first config on, on a task of its own: nothing the event loop waits for
    // (a firewall tool, the policy probe, a slow API) may let the programs see the agent
    // as gone.
    let heartbeat = dataplane
        .heartbeat()
        .map(|beat| tokio::spawn(heartbeat_task(beat, bpf_options(&args, None).heartbeat())));
    let own = subnets.acquire_lease(&attrs).await?;
    info!(subnet = %own.subnet, "acquired lease");
    systemd::status(&format!(
        "lease {} acquired; programming the dataplane",
        own.subnet
    ));
    state.set_ready(ReadyPart::Lease, true);
    dataplane.configure(&own).await?;
    if args.ip_blackhole_route {
        nl::ensure_blackhole_route(&handle, own.subnet).await?;
    } else {
        nl::delete_blackhole_route(&handle, own.subnet).await?;
    }

    let (mut firewall, why) = masq::select_firewall(
        args.masquerade.firewall(args.firewall)?,
        conf.enable_nftables,
    )?;
    info!("firewall: {why}");
    match &nat {
        Some(n) if n.drain => info!(
            "masquerade: the {} rule; the BPF programs keep translating the flows they mapped in an earlier run until those end",
            firewall.name()
        ),
        Some(n) => info!(
            ports = %format!("{}-{}", n.ports.0, n.ports.1),
            table_size = n.table_size,
            "masquerade: the BPF programs translate pod traffic leaving the cluster; the {} rule is their fallback",
            firewall.name()
        ),
        None if args.ip_masq => info!("masquerade: the {} rule", firewall.name()),
        None => {}
    }
    // Rules an earlier run (or flanneld) left in the other firewall would double ours.
    if let Err(e) = masq::remove_leftovers(firewall.name()) {
        warn!("removing leftover rules of the other firewall failed: {e:#}");
    }
    let bpf_nat = nat.as_ref().map(|n| masq::BpfNatRule {
        uplink: ext.name.clone(),
        mark: weft_common::NAT_MARK,
        ports: bpf::nat::fallback_ports(n.ports),
    });
    let spec = masq_spec(&args, &conf, own.subnet, bpf_nat);
    if let Some(n) = &nat {
        state.set_nat_table_size(n.table_size);
        tokio::spawn(collect_nat(args.bpf_dir.clone(), state.clone()));
    }
    tokio::task::block_in_place(|| firewall.ensure(&spec))
        .with_context(|| format!("installing {} rules", firewall.name()))?;
    state.set_ready(ReadyPart::Dataplane, true);

    SubnetEnv {
        network: conf.network,
        subnet: own.subnet,
        mtu: dataplane.pod_mtu(),
        ipmasq: args.ip_masq,
    }
    .write(&args.subnet_file)?;
    info!(path = %args.subnet_file.display(), "wrote subnet.env; ready");
    state.set_ready(ReadyPart::SubnetEnv, true);
    systemd::ready(&format!(
        "ready: lease {}, {}, subnet.env written",
        own.subnet, why_dataplane
    ));

    let (tx, rx) = mpsc::channel(1024);
    let watch = {
        let own = own.clone();
        tokio::spawn(async move { subnets.watch_leases(own, tx).await })
    };
    let uplink = UplinkWatch {
        handle: handle.clone(),
        ext: ext.clone(),
    };
    let result = event_loop(
        &args,
        &uplink,
        &mut dataplane,
        firewall.as_mut(),
        &spec,
        &state,
        rx,
    )
    .await;
    if let Some(task) = heartbeat {
        task.abort();
    }
    if watch.is_finished() {
        // The watch ended on its own: its error says why better than the closed channel.
        if let Ok(Err(e)) = watch.await {
            return Err(e.context("watching the leases"));
        }
    } else {
        watch.abort();
    }
    result
}

/// The subnet manager the flags ask for (Kubernetes with --kube-subnet-mgr, else etcd),
/// the interface selection (the Kubernetes node's node-public-ip annotation can take part)
/// and, when the selection is not the flags' own, why.
async fn subnet_manager(
    args: &AgentArgs,
) -> Result<(Box<dyn SubnetManager>, IfaceSelection, Option<String>)> {
    let flags = iface_selection(args);
    if args.kube_subnet_mgr {
        let kube = KubeSubnetManager::connect(kube_options(args)).await?;
        let (selection, why) = kube.iface_selection(flags);
        Ok((Box::new(kube), selection, why))
    } else {
        let etcd = EtcdSubnetManager::connect(etcd_options(args)).await?;
        Ok((Box::new(etcd), flags, None))
    }
}

/// Applies lease events as they come and repairs drift on timers, until a signal.
async fn event_loop(
    args: &AgentArgs,
    uplink: &UplinkWatch,
    dataplane: &mut Dataplane,
    firewall: &mut dyn Firewall,
    spec: &MasqSpec,
    state: &AgentState,
    mut rx: mpsc::Receiver<LeaseWatchEvent>,
) -> Result<()> {
    let mut leases: BTreeMap<Ipv4Network, Lease> = BTreeMap::new();
    // Until the first complete list arrives, `leases` is not the cluster's table: a resync
    // against it would delete every peer's routes and map entries (traffic loss on restart).
    let mut listed = false;
    let resync_period = Duration::from_secs(args.resync_interval.max(1));
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + resync_period, resync_period);
    let mut firewall_resync =
        tokio::time::interval(Duration::from_secs(args.iptables_resync.max(1)));
    let watchdog_every = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(mut event) = event else {
                    bail!("the lease watch stopped; exiting so that the agent is restarted");
                };
                loop {
                    match event {
                        LeaseWatchEvent::OwnLeaseRevoked => {
                            bail!("Lease has been revoked: this node's lease was deleted from the subnet store; restart weft to acquire a new one")
                        }
                        LeaseWatchEvent::Snapshot(all) => {
                            info!(leases = all.len(), "lease table (re)listed");
                            listed = true;
                            leases = all.into_iter().map(|l| (l.subnet, l)).collect();
                            state.set_leases_known(leases.len());
                            resync_dataplane(dataplane, &leases, state).await;
                            break;
                        }
                        LeaseWatchEvent::Event(first) => {
                            // What is queued behind it is applied with it: one plan for a
                            // burst (5,000 Nodes listed one by one, say), not one per event.
                            let mut batch = vec![first];
                            let mut after = None;
                            while batch.len() < MAX_BATCH {
                                match rx.try_recv() {
                                    Ok(LeaseWatchEvent::Event(next)) => batch.push(next),
                                    Ok(other) => {
                                        after = Some(other);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            for event in &batch {
                                match event {
                                    LeaseEvent::Added(l) => { leases.insert(l.subnet, l.clone()); }
                                    LeaseEvent::Removed(s) => { leases.remove(s); }
                                }
                            }
                            state.set_leases_known(leases.len());
                            apply_batch(dataplane, &batch, state).await;
                            match after {
                                Some(next) => event = next,
                                None => break,
                            }
                        }
                    }
                }
            }
            _ = resync.tick(), if listed => {
                uplink.check().await?;
                resync_dataplane(dataplane, &leases, state).await
            }
            _ = watchdog.tick(), if watchdog_every.is_some() => systemd::watchdog(),
            _ = firewall_resync.tick() => {
                // The tools run with deadlines; off the runtime's queue meanwhile.
                if let Err(e) = tokio::task::block_in_place(|| firewall.ensure(spec)) {
                    error!("repairing {} rules failed: {e:#}", firewall.name());
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Leave the dataplane in place: pods keep their connectivity while weft restarts.
    info!("stopping; the dataplane stays in place");
    systemd::stopping();
    Ok(())
}

/// The uplink and its address as the agent selected them at start: the lease publishes
/// that address, and every peer sends to it.
struct UplinkWatch {
    handle: rtnetlink::Handle,
    ext: crate::iface::ExtIface,
}

impl UplinkWatch {
    /// Fails when the address is gone from the interface (the node's IP changed, the
    /// interface was replaced): the published lease is wrong, and peers send into the void.
    /// The agent exits so that it is restarted (kubelet, systemd) and publishes the new one.
    async fn check(&self) -> Result<()> {
        let addrs = nl::ipv4_addrs(&self.handle, Some(self.ext.index)).await?;
        if !addrs.iter().any(|a| a.net.ip() == self.ext.addr) {
            bail!(
                "the address {} of {} (published in this node's lease) is gone from the \
                 interface: exiting so that weft restarts and publishes the node's new address",
                self.ext.addr,
                self.ext.name
            );
        }
        Ok(())
    }
}

/// Refreshes the dataplane's config every `period` (see [`crate::backend::Backend::heartbeat`]),
/// saying so when it fails and when it works again.
async fn heartbeat_task(beat: crate::backend::Heartbeat, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match beat() {
            Ok(()) if failing => {
                info!("refreshing the dataplane's config works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                error!("refreshing the dataplane's config failed: {e:#}");
                failing = true;
            }
        }
    }
}

/// Most lease events applied with one plan.
const MAX_BATCH: usize = 4096;

/// Applies `batch` to the dataplane, with a span and a log line per lease.
async fn apply_batch(dataplane: &mut Dataplane, batch: &[LeaseEvent], state: &AgentState) {
    let started = Instant::now();
    let result = dataplane.apply_events(batch).await;
    let took = started.elapsed();
    for event in batch {
        let subnet = match event {
            LeaseEvent::Added(l) => l.subnet,
            LeaseEvent::Removed(s) => *s,
        };
        let span = info_span!("lease", subnet = %subnet_key(&subnet));
        match &result {
            Ok(()) => {
                state.observe_lease_apply(took);
                span.in_scope(|| {
                    info!(
                        event = kind(event),
                        batch = batch.len(),
                        took_us = took.as_micros() as u64,
                        "applied"
                    )
                });
            }
            Err(_) => state.count_lease_apply_failure(),
        }
    }
    if let Err(e) = result {
        error!("applying lease events failed (the next resync retries): {e:#}");
    }
    let plan = dataplane.plan();
    state.update_peer_counts(plan.rejected_by_reason(), dataplane.overflow());
}

async fn resync_dataplane(
    dataplane: &mut Dataplane,
    leases: &BTreeMap<Ipv4Network, Lease>,
    state: &AgentState,
) {
    let all: Vec<Lease> = leases.values().cloned().collect();
    let result = dataplane.resync(&all).await;
    if let Err(e) = &result {
        error!("resync failed (retrying at the next interval): {e:#}");
    }
    state.set_peer_health(PeerHealth {
        rejected: dataplane.plan().rejected_by_reason(),
        overflow: dataplane.overflow(),
        resync_error: result.err().map(|e| format!("{e:#}")),
    });
    state.set_fast_path(dataplane.fast_path());
}

/// `weft agent --cleanup`: removes everything weft installed on this node, and nothing
/// else. Works from node-local facts only (no etcd), so it also works when the cluster is
/// gone: the network comes from subnet.env, the VXLAN devices are the `flannel.<VNI>` ones.
pub async fn cleanup(args: &AgentArgs) -> Result<()> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(connection);
    let mut failures = Vec::new();
    let mut step = |what: &str, result: Result<()>| {
        if let Err(e) = result {
            error!("cleanup: {what} failed: {e:#}");
            failures.push(what.to_string());
        }
    };

    step(
        "removing the eBPF programs and pinned maps",
        bpf::remove_leftovers(&handle, &args.bpf_dir).await,
    );
    step(
        "removing flannel.<VNI>",
        remove_vxlan_devices(&handle).await,
    );
    step(
        "removing the routes to other nodes' subnets",
        remove_lease_routes(&handle, args).await,
    );
    step(
        "removing the masquerade and forward rules",
        masq::remove_all().map(|()| info!("cleanup: removed weft's masquerade and forward rules")),
    );
    // subnet.env and, beside it, the agent's record for `weft status`.
    for (what, path) in [
        ("removing subnet.env", args.subnet_file.clone()),
        (
            "removing the agent's record",
            crate::inspect::AgentRecord::path(&args.subnet_file),
        ),
    ] {
        step(
            what,
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    info!("cleanup: removed {}", path.display());
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
            },
        );
    }
    if !failures.is_empty() {
        bail!(
            "cleanup incomplete: {} (see the errors above)",
            failures.join(", ")
        );
    }
    info!("cleanup: done");
    Ok(())
}

/// Deletes the VXLAN devices called `flannel.<number>` (flannel's and weft's naming).
async fn remove_vxlan_devices(handle: &rtnetlink::Handle) -> Result<()> {
    for link in nl::links(handle).await? {
        let ours = link
            .name
            .strip_prefix("flannel.")
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()));
        if ours && link.kind == Some(netlink_packet_route::link::InfoKind::Vxlan) {
            nl::delete_link(handle, link.index).await?;
            info!("cleanup: deleted {}", link.name);
        }
    }
    Ok(())
}

/// Deletes the routes host-gw (or vxlan DirectRouting) programs: inside the pod network
/// (from subnet.env), through the uplink, with a gateway.
async fn remove_lease_routes(handle: &rtnetlink::Handle, args: &AgentArgs) -> Result<()> {
    let env = match std::fs::read_to_string(&args.subnet_file) {
        Ok(text) => SubnetEnv::parse(&text)
            .with_context(|| format!("--subnet-file {}", args.subnet_file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(
                "cleanup: no {} (--subnet-file): the pod network is unknown, routes to other nodes are left in place",
                args.subnet_file.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.subnet_file.display())),
    };
    let ext = iface::select_ext_iface(handle, &iface_selection(args)).await?;
    let table = nl::routes(handle).await?;
    for dst in nl::prune_routes(handle, &table, env.network, ext.index, |_| false).await? {
        info!("cleanup: removed the route to {dst} via {}", ext.name);
    }
    nl::delete_blackhole_route(handle, env.subnet).await
}

fn bpf_options(args: &AgentArgs, nat: Option<NatSettings>) -> BpfOptions {
    BpfOptions {
        dir: args.bpf_dir.clone(),
        pod_bridge: args.pod_bridge.clone(),
        records_dirs: args.cni_records_dirs.clone(),
        force_fast_path: args.dataplane == bpf::DataplaneChoice::Bpf,
        stale_after: Duration::from_secs(args.bpf_stale_after),
        nat,
        stack_flows: (args.bpf_stack_flows_size != 0).then_some(args.bpf_stack_flows_size),
    }
}

/// The BPF source NAT wanted by the flags (if the BPF dataplane runs): `--ip-masq` with
/// `--masquerade bpf` (experimental; `auto` is the firewall's masquerade). Without it, if an
/// earlier run's BPF source NAT left flows holding mappings, the programs keep translating
/// those until they end (drain): switched off at once, their packets would leave with the
/// pod's address, since the node's conntrack made their entries without NAT.
fn nat_settings(args: &AgentArgs) -> Result<Option<NatSettings>> {
    let wanted = args.ip_masq && args.masquerade == masq::MasqueradeChoice::Bpf;
    if !wanted {
        if args.dataplane == bpf::DataplaneChoice::Kernel {
            return Ok(None);
        }
        return Ok(bpf::nat::leftover(&args.bpf_dir).map(|(ports, table_size, flows)| {
            warn!(
                flows,
                "BPF source NAT is not wanted (--masquerade={:?}{}), but flows of an earlier run hold BPF mappings: they keep them until they end; new flows take the firewall's masquerade",
                args.masquerade,
                if args.ip_masq { "" } else { ", no --ip-masq" },
            );
            NatSettings {
                ports,
                table_size,
                exclude: args.masquerade_exclude.clone(),
                fast_path: false,
                drain: true,
            }
        }));
    }
    if args.dataplane == bpf::DataplaneChoice::Kernel {
        bail!("--masquerade=bpf needs the BPF dataplane, but --dataplane=kernel: use --dataplane=auto or bpf, or --masquerade=nftables|iptables");
    }
    let ports = bpf::nat::port_range(args.masquerade_ports.as_deref())?;
    warn!("--masquerade=bpf is experimental: BPF source NAT does not yet hold every invariant of the kernel's masquerade (see the README's \"Failure and attack\")");
    Ok(Some(NatSettings {
        ports,
        table_size: args.masquerade_table_size,
        exclude: args.masquerade_exclude.clone(),
        fast_path: args.masquerade_fast_path,
        drain: false,
    }))
}

/// How often the record of the stack's connections is checked against conntrack.
const STACK_FLOWS_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the stack-flow keeper (see [`bpf::flows`]) every [`STACK_FLOWS_INTERVAL`].
async fn keep_stack_flows(dir: std::path::PathBuf, state: Arc<AgentState>) {
    let mut tick = tokio::time::interval(STACK_FLOWS_INTERVAL);
    let mut failing = false;
    loop {
        tick.tick().await;
        let dir = dir.clone();
        let started = Instant::now();
        let kept = tokio::task::spawn_blocking(move || {
            bpf::flows::keep(&dir, bpf::dataplane::monotonic_ns())
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the keeper panicked: {e}")));
        match kept {
            Ok(k) => {
                if failing {
                    info!("the stack-flow keeper reads conntrack again");
                }
                failing = false;
                if k.pods_on_stack > 0 {
                    warn!(
                        pods = k.pods_on_stack,
                        entries = k.entries,
                        "stack_flows is full: pods with connections it could not record take the kernel path"
                    );
                }
                debug!(
                    removed = k.removed,
                    entries = k.entries,
                    took_ms = started.elapsed().as_millis() as u64,
                    "stack flows kept"
                );
                state.set_stack_flows(Some((k.entries, k.pods_on_stack)));
            }
            Err(e) => {
                if !failing {
                    warn!("keeping the stack's connections failed; nothing is removed until it works again: {e:#}");
                }
                failing = true;
                state.set_stack_flows(None);
            }
        }
    }
}

/// How often idle NAT mappings are collected.
const NAT_COLLECT_INTERVAL: Duration = Duration::from_secs(10);

/// Removes idle NAT mappings every [`NAT_COLLECT_INTERVAL`] and publishes the count.
async fn collect_nat(dir: std::path::PathBuf, state: Arc<AgentState>) {
    let mut tick = tokio::time::interval(NAT_COLLECT_INTERVAL);
    loop {
        tick.tick().await;
        let dir = dir.clone();
        let collected = tokio::task::spawn_blocking(move || {
            bpf::nat::collect(&dir, bpf::dataplane::monotonic_ns())
        })
        .await;
        match collected {
            Ok(Ok(c)) => {
                if c.removed > 0 {
                    debug!(
                        removed = c.removed,
                        entries = c.entries,
                        "collected idle NAT mappings"
                    );
                }
                state.set_nat_entries(c.entries);
            }
            Ok(Err(e)) => warn!("collecting idle NAT mappings failed: {e:#}"),
            Err(e) => warn!("the NAT collector panicked: {e}"),
        }
    }
}

fn kind(event: &LeaseEvent) -> &'static str {
    match event {
        LeaseEvent::Added(_) => "added",
        LeaseEvent::Removed(_) => "removed",
    }
}

fn masq_spec(
    args: &AgentArgs,
    conf: &NetConf,
    lease: Ipv4Network,
    bpf_nat: Option<masq::BpfNatRule>,
) -> MasqSpec {
    MasqSpec {
        network: conf.network,
        lease,
        masquerade: args.ip_masq,
        random_fully: !args.ip_masq_fully_random_disable,
        forward_accept: args.iptables_forward_rules,
        exclude: args.masquerade_exclude.clone(),
        bpf_nat,
    }
}

fn iface_selection(args: &AgentArgs) -> IfaceSelection {
    IfaceSelection {
        iface: args.iface.clone(),
        iface_regex: args.iface_regex.clone(),
        iface_can_reach: args.iface_can_reach,
        public_ip: args.public_ip,
    }
}

fn etcd_options(args: &AgentArgs) -> EtcdOptions {
    EtcdOptions {
        endpoints: args
            .etcd_endpoints
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        prefix: args.etcd_prefix.trim_end_matches('/').to_string(),
        keyfile: args.etcd_keyfile.clone(),
        certfile: args.etcd_certfile.clone(),
        cafile: args.etcd_cafile.clone(),
        username: args.etcd_username.clone(),
        password: args.etcd_password.clone(),
        subnet_file: args.subnet_file.clone(),
        renew_margin: Duration::from_secs(args.subnet_lease_renew_margin * 60),
    }
}

fn kube_options(args: &AgentArgs) -> KubeOptions {
    KubeOptions {
        node_name: None,
        api_url: args.kube_api_url.clone(),
        kubeconfig: args.kubeconfig_file.clone(),
        annotation_prefix: args.kube_annotation_prefix.clone(),
        net_config_path: args.net_config_path.clone(),
        set_node_network_unavailable: args.set_node_network_unavailable,
    }
}
