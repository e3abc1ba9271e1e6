//! The pod watcher: attaches `from_pod` to every port of the pod bridge and keeps the
//! `endpoints` map (local pod IP → host-side veth, pod MAC, veth MAC) in step with the
//! pods' CNI records and the kernel:
//!
//! - the pod records ([`crate::cni::record`]): which addresses the CNI ADD gave a pod, its
//!   host-side veth (by name) and its MAC. They are the only source of an address's veth:
//!   no record, no endpoint (the pod's packets take the kernel path);
//! - neighbour entries on the bridge (pod IP → MAC) with the bridge's FDB (MAC → port) may
//!   confirm a newer MAC for an address, only on the port its record names. A claim from
//!   another port (a pod answering ARP for a neighbour's address) is never installed and
//!   is logged once;
//! - the port's link: the veth's own MAC.
//!
//! It recomputes on link and neighbour notifications and when a records directory changes
//! (debounced), and on every resync. An endpoint goes when its record or its veth does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use aya::Ebpf;
use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::SocketAddr;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use weft_common::{EndpointEntry, EndpointKey, PROG_FROM_POD, PROG_TO_POD};

use super::dataplane::{remove_ok, EndpointMap};
use super::tc;
use crate::backend::netlink::{self as nl, Link};
use crate::cni::record;
use crate::lease::MacAddr;

/// Quiet time after a notification before recomputing (events come in bursts).
const DEBOUNCE: Duration = Duration::from_millis(5);
/// Longest wait for a recompute while notifications keep coming.
const MAX_DELAY: Duration = Duration::from_millis(50);
/// How often the records directories are looked at for changes (names and inodes only).
const RECORDS_POLL: Duration = Duration::from_millis(200);
/// How long a resync waits for the watcher.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(30);

type Events = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;
type ResyncAck = oneshot::Sender<Result<()>>;

/// Handle of the running watcher task.
pub struct PodWatcher {
    /// Closing it ends the task (see [`PodWatcher::stop`]).
    control: Option<mpsc::Sender<ResyncAck>>,
    task: Option<JoinHandle<EndpointMap>>,
    connection: JoinHandle<()>,
}

impl PodWatcher {
    /// Subscribes to link and neighbour notifications and starts the watcher task, which
    /// owns `endpoints` until [`PodWatcher::stop`].
    pub fn start(
        handle: Handle,
        ebpf: Arc<Mutex<Ebpf>>,
        endpoints: EndpointMap,
        bridge: String,
        records_dirs: Vec<PathBuf>,
        own: Ipv4Network,
    ) -> Result<PodWatcher> {
        let (connection, _, events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .context("subscribing to link and neighbour notifications")?;
        let connection = tokio::spawn(connection);
        let learned = read_endpoints(&endpoints)?;
        let (control, requests) = mpsc::channel(4);
        let watcher = Watcher {
            handle,
            ebpf,
            endpoints,
            bridge,
            records_dirs,
            records_seen: Vec::new(),
            reported: BTreeSet::new(),
            own,
            bridge_index: None,
            learned,
            attached: BTreeSet::new(),
            kernel_path: BTreeMap::new(),
        };
        let task = tokio::spawn(watcher.run(events, requests));
        Ok(PodWatcher {
            control: Some(control),
            task: Some(task),
            connection,
        })
    }

    /// Recomputes everything now (and checks every port's filter); returns its outcome.
    pub async fn resync(&self) -> Result<()> {
        let (ack, done) = oneshot::channel();
        let control = self.control.as_ref().context("the pod watcher stopped")?;
        control.send(ack).await.context("the pod watcher stopped")?;
        tokio::time::timeout(RESYNC_TIMEOUT, done)
            .await
            .context("the pod watcher did not answer in time")?
            .context("the pod watcher stopped")?
    }

    /// Stops the task and returns the endpoint map it owned.
    pub async fn stop(mut self) -> EndpointMap {
        self.control = None;
        let task = self.task.take().expect("a running watcher has its task");
        task.await.expect("the pod watcher task panicked")
    }
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.connection.abort();
    }
}

struct Watcher {
    handle: Handle,
    ebpf: Arc<Mutex<Ebpf>>,
    endpoints: EndpointMap,
    bridge: String,
    /// Where the pod records are, and what they held at the last look.
    records_dirs: Vec<PathBuf>,
    records_seen: Vec<(usize, OsString, u64)>,
    /// Problems logged already (claims refused, unusable records), so each is logged once
    /// while it lasts.
    reported: BTreeSet<String>,
    own: Ipv4Network,
    bridge_index: Option<u32>,
    /// What the endpoint map holds.
    learned: BTreeMap<Ipv4Addr, EndpointEntry>,
    /// Ports `from_pod` and `to_pod` were attached to by this process.
    attached: BTreeSet<u32>,
    /// Ports left to the kernel path, and why (see `check_foreign_tc`).
    kernel_path: BTreeMap<u32, String>,
}

impl Watcher {
    async fn run(
        mut self,
        mut events: Events,
        mut requests: mpsc::Receiver<ResyncAck>,
    ) -> EndpointMap {
        if let Err(e) = self.sync(true).await {
            warn!("pod watcher: first sync failed (retrying on events and at resync): {e:#}");
        }
        let mut events_open = true;
        // (first unprocessed notification, latest notification)
        let mut pending: Option<(Instant, Instant)> = None;
        let mut poll = tokio::time::interval(RECORDS_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = pending.map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DELAY));
            tokio::select! {
                event = events.next(), if events_open => match event {
                    Some((msg, _)) => if self.relevant(&msg) {
                        let now = Instant::now();
                        pending = Some((pending.map_or(now, |(first, _)| first), now));
                    },
                    None => {
                        warn!("pod watcher: the netlink notification stream ended; pods are now picked up at resync only");
                        events_open = false;
                    }
                },
                request = requests.recv() => match request {
                    Some(ack) => {
                        pending = None;
                        let _ = ack.send(self.sync(true).await);
                    }
                    None => break,
                },
                _ = poll.tick() => if record::fingerprint(&self.records_dirs) != self.records_seen {
                    let now = Instant::now();
                    pending = Some((pending.map_or(now, |(first, _)| first), now));
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    pending = None;
                    if let Err(e) = self.sync(false).await {
                        warn!("pod watcher: recomputing after a netlink notification failed (retrying at resync): {e:#}");
                    }
                }
            }
        }
        self.endpoints
    }

    /// Whether a notification can change ports or endpoints.
    fn relevant(&self, msg: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
        let NetlinkPayload::InnerMessage(msg) = &msg.payload else {
            return false;
        };
        match msg {
            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => true,
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                let Some(bridge) = self.bridge_index else {
                    return false;
                };
                n.header.ifindex == bridge || controller(n) == Some(bridge)
            }
            _ => false,
        }
    }

    /// Recomputes ports and endpoints. `verify_filters` also checks the filters of ports
    /// this process attached already (a resync); otherwise only new ports get one.
    async fn sync(&mut self, verify_filters: bool) -> Result<()> {
        let links = port_links(&self.handle).await?;
        self.bridge_index = links
            .iter()
            .find(|(link, _)| link.name == self.bridge)
            .map(|(link, _)| link.index);
        let ports: BTreeMap<u32, Link> = links
            .into_iter()
            .filter(|(_, master)| master.is_some() && *master == self.bridge_index)
            .map(|(link, _)| (link.index, link))
            .collect();

        self.attached.retain(|index| ports.contains_key(index));
        self.kernel_path
            .retain(|index, _| ports.contains_key(index));
        for port in ports.values() {
            // Checked on new ports and at every resync (a qdisc change sends no event).
            if verify_filters || !self.attached.contains(&port.index) {
                self.check_foreign_tc(port).await?;
            }
            if self.kernel_path.contains_key(&port.index) {
                continue;
            }
            if self.attached.contains(&port.index) && !verify_filters {
                continue;
            }
            let mut complete = true;
            for program in [PROG_FROM_POD, PROG_TO_POD] {
                let attached =
                    tc::ensure_attached(&self.handle, &self.ebpf, program, port.index, &port.name)
                        .await;
                match attached {
                    Ok(Some(how)) => info!("attached {program} to {} ({how})", port.name),
                    Ok(None) => {}
                    // The veth may be gone already; the next event or resync says.
                    Err(e) => {
                        warn!("attaching {program} to {} failed: {e:#}", port.name);
                        complete = false;
                    }
                }
            }
            if !complete {
                continue;
            }
            self.attached.insert(port.index);
        }

        let fast_ports: BTreeMap<u32, Link> = ports
            .into_iter()
            .filter(|(index, _)| !self.kernel_path.contains_key(index))
            .collect();
        let wanted = match self.bridge_index {
            Some(bridge) => self.wanted_endpoints(bridge, &fast_ports).await?,
            None => BTreeMap::new(),
        };
        self.write(wanted)
    }

    /// A pod veth that carries another component's traffic control (the bandwidth
    /// plugin's shaping, say) keeps its pod on the kernel path: the fast path's redirects
    /// would pass that configuration by. weft's filters come off it, its endpoint is not
    /// learned (so nothing is delivered into the pod past the veth's qdisc). Logs changes.
    async fn check_foreign_tc(&mut self, port: &Link) -> Result<()> {
        match tc::foreign_tc(&self.handle, port.index).await? {
            Some(what) => {
                if self.kernel_path.get(&port.index) != Some(&what) {
                    info!(
                        "{} has traffic control of its own ({what}): its pod stays on the kernel path so that it applies",
                        port.name
                    );
                    for program in tc::detach(&self.handle, port).await? {
                        info!("removed {program} from {}", port.name);
                    }
                    self.attached.remove(&port.index);
                    self.kernel_path.insert(port.index, what);
                }
            }
            None => {
                if self.kernel_path.remove(&port.index).is_some() {
                    info!(
                        "{} has no traffic control of its own any more: fast path",
                        port.name
                    );
                }
            }
        }
        Ok(())
    }

    /// The endpoints the records give, on the fast ports: an address of the node's lease
    /// on the port its record names, with the MAC a neighbour entry confirms on that port,
    /// else the record's, else the one it had.
    async fn wanted_endpoints(
        &mut self,
        bridge: u32,
        ports: &BTreeMap<u32, Link>,
    ) -> Result<BTreeMap<Ipv4Addr, EndpointEntry>> {
        let mut problems = BTreeSet::new();
        let owners = self.record_owners(ports, &mut problems)?;
        let neighbours: HashMap<Ipv4Addr, MacAddr> = nl::neighbours(&self.handle, bridge)
            .await?
            .into_iter()
            .filter(|n| self.own.contains(n.ip))
            .filter_map(|n| Some((n.ip, n.mac?)))
            .collect();
        let fdb = bridge_fdb(&self.handle, bridge).await?;
        let mut wanted = BTreeMap::new();
        for (&ip, &mac) in &neighbours {
            let Some(&port) = fdb.get(&mac).filter(|port| ports.contains_key(port)) else {
                continue;
            };
            if owners.get(&ip).map(|owner| owner.0) != Some(port) {
                let why = match owners.get(&ip) {
                    Some((owner, _)) => format!("its record puts it on {}", ports[owner].name),
                    None => "no pod record gives it that address".to_string(),
                };
                problems.insert(format!(
                    "{mac} on {} claims {ip}, but {why}: not a fast-path endpoint from there",
                    ports[&port].name
                ));
            }
        }
        for (ip, (port, record_mac)) in owners {
            let confirmed = neighbours
                .get(&ip)
                .filter(|mac| fdb.get(mac) == Some(&port))
                .copied();
            let previous = self
                .learned
                .get(&ip)
                .filter(|e| e.ifindex == port)
                .map(|e| MacAddr(e.pod_mac));
            let Some(mac) = confirmed.or(record_mac).or(previous) else {
                continue;
            };
            let host_mac = ports[&port].mac.unwrap_or_default();
            wanted.insert(
                ip,
                EndpointEntry {
                    ifindex: port,
                    pod_mac: mac.0,
                    host_mac: host_mac.0,
                },
            );
        }
        for problem in problems.difference(&self.reported) {
            warn!("pod endpoints: {problem}");
        }
        self.reported = problems;
        Ok(wanted)
    }

    /// Address → (port, MAC) from the pod records, for the addresses of the node's lease
    /// whose record names one of `ports`. An address two records give to different ports
    /// has no owner (reported in `problems`, with unusable records).
    fn record_owners(
        &mut self,
        ports: &BTreeMap<u32, Link>,
        problems: &mut BTreeSet<String>,
    ) -> Result<BTreeMap<Ipv4Addr, (u32, Option<MacAddr>)>> {
        self.records_seen = record::fingerprint(&self.records_dirs);
        let by_name: HashMap<&str, u32> = ports
            .values()
            .map(|link| (link.name.as_str(), link.index))
            .collect();
        let mut claims: BTreeMap<Ipv4Addr, BTreeMap<u32, Option<MacAddr>>> = BTreeMap::new();
        for dir in &self.records_dirs {
            let (records, unusable) = record::read_dir(dir)?;
            problems.extend(unusable.into_iter().map(|u| format!("ignoring {u}")));
            for record in records {
                let Some(&port) = record
                    .host_ifaces
                    .iter()
                    .find_map(|n| by_name.get(n.as_str()))
                else {
                    continue; // another network's, or its veth is gone (or not ours)
                };
                for &ip in record.ips.iter().filter(|ip| self.own.contains(**ip)) {
                    let mac = claims.entry(ip).or_default().entry(port).or_default();
                    *mac = mac.or(record.pod_mac);
                }
            }
        }
        let mut owners = BTreeMap::new();
        for (ip, claims) in claims {
            if claims.len() == 1 {
                owners.extend(claims.into_iter().map(|claim| (ip, claim)));
            } else {
                let names: Vec<&str> = claims.keys().map(|p| ports[p].name.as_str()).collect();
                problems.insert(format!(
                    "pod records give {ip} to several veths ({}): none of them gets it",
                    names.join(", ")
                ));
            }
        }
        Ok(owners)
    }

    /// Makes the endpoint map hold exactly `wanted`.
    fn write(&mut self, wanted: BTreeMap<Ipv4Addr, EndpointEntry>) -> Result<()> {
        for ip in self.learned.keys() {
            if !wanted.contains_key(ip) {
                remove_ok(self.endpoints.remove(&EndpointKey {
                    pod_ip: ip.octets(),
                }))
                .with_context(|| format!("removing endpoint {ip}"))?;
                debug!(pod = %ip, "endpoint removed");
            }
        }
        let mut wanted = wanted;
        let mut no_room = Vec::new();
        for (ip, entry) in &wanted {
            if self.learned.get(ip) != Some(entry) {
                let key = EndpointKey {
                    pod_ip: ip.octets(),
                };
                match self.endpoints.insert(key, *entry, 0) {
                    // The map is sized for every address of the node's subnet: this only
                    // happens with pods outside it. They keep the kernel path.
                    Err(e) if super::dataplane::map_full(&e) => no_room.push(*ip),
                    other => other.with_context(|| format!("adding endpoint {ip}"))?,
                }
                debug!(pod = %ip, ifindex = entry.ifindex, pod_mac = %MacAddr(entry.pod_mac), "endpoint learned");
            }
        }
        if !no_room.is_empty() {
            warn!("the BPF endpoint map is full: pods {no_room:?} stay on the kernel path");
        }
        for ip in no_room {
            wanted.remove(&ip);
        }
        self.learned = wanted;
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn controller(n: &NeighbourMessage) -> Option<u32> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

/// Every interface with the index of its master (bridge), if it has one.
async fn port_links(handle: &Handle) -> Result<Vec<(Link, Option<u32>)>> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing interfaces")?;
    Ok(msgs
        .into_iter()
        .map(|msg| {
            let master = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Controller(index) => Some(*index),
                _ => None,
            });
            (Link::from(msg), master)
        })
        .collect())
}

/// The MACs the bridge `bridge` learned, and on which port (`bridge fdb show br <bridge>`,
/// without permanent entries, which are the ports' own addresses).
async fn bridge_fdb(handle: &Handle, bridge: u32) -> Result<HashMap<MacAddr, u32>> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .context("listing the bridge FDB")?;
    Ok(msgs
        .iter()
        .filter(|m| controller(m) == Some(bridge) && !nl::is_permanent(m.header.state))
        .filter_map(|m| Some((nl::lladdr(&m.attributes)?, m.header.ifindex)))
        .collect())
}

fn read_endpoints(map: &EndpointMap) -> Result<BTreeMap<Ipv4Addr, EndpointEntry>> {
    map.iter()
        .map(|r| r.map(|(k, v)| (Ipv4Addr::from(k.pod_ip), v)))
        .collect::<Result<_, _>>()
        .context("reading the BPF endpoint map")
}
