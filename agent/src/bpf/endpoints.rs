//! The pod watcher: attaches `from_pod` to every port of the pod bridge and keeps the
//! `endpoints` map (local pod IP → host-side veth, pod MAC, veth MAC) in step with the
//! kernel, learned from netlink so that it works with any CNI plugin:
//!
//! - neighbour entries on the bridge for addresses in the node's lease: pod IP → pod MAC,
//! - the bridge's FDB (learned, not permanent, entries): pod MAC → port,
//! - the port's link: the veth's own MAC.
//!
//! It recomputes on link and neighbour notifications (debounced), and on every resync.
//! An endpoint stays while its veth exists even if its FDB entry aged out; it goes when the
//! veth is deleted or its neighbour entry is deleted or changes to a MAC the bridge has not
//! seen.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
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
use crate::lease::MacAddr;

/// Quiet time after a notification before recomputing (events come in bursts).
const DEBOUNCE: Duration = Duration::from_millis(5);
/// Longest wait for a recompute while notifications keep coming.
const MAX_DELAY: Duration = Duration::from_millis(50);
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

    async fn wanted_endpoints(
        &self,
        bridge: u32,
        ports: &BTreeMap<u32, Link>,
    ) -> Result<BTreeMap<Ipv4Addr, EndpointEntry>> {
        let pods: Vec<(Ipv4Addr, MacAddr)> = nl::neighbours(&self.handle, bridge)
            .await?
            .into_iter()
            .filter(|n| self.own.contains(n.ip))
            .filter_map(|n| Some((n.ip, n.mac?)))
            .collect();
        let fdb = bridge_fdb(&self.handle, bridge).await?;
        let mut wanted = BTreeMap::new();
        for (ip, mac) in pods {
            let port = fdb
                .get(&mac)
                .filter(|index| ports.contains_key(index))
                .copied()
                // The FDB entry aged out: the pod is where it was while its veth exists.
                .or_else(|| {
                    self.learned
                        .get(&ip)
                        .filter(|e| e.pod_mac == mac.0 && ports.contains_key(&e.ifindex))
                        .map(|e| e.ifindex)
                });
            let Some(port) = port else { continue };
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
        Ok(wanted)
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
