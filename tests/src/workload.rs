//! A small Kubernetes workload on a two-node lab, and the traffic a real cluster carries
//! through it: pods with servers, Services (ClusterIP, NodePort with both traffic
//! policies, a UDP "DNS" Service), a hostPort through kube-flannel's chained portmap,
//! kube-proxy's rules on every node, and the matrix of requests (each [`Cell`]) whose
//! replies must come back with the right addresses on every dataplane.
//!
//! Layout: node 1 runs `client` (n1p1, also its own backend through a Service: hairpin) and
//! `web1` (hostPort 8080 → 80); node 2 runs `web2` (TCP 80, UDP 53) and `client2`. Node 1's
//! agent masquerades (`--ip-masq`, as kube-flannel.yml runs it). Node 2's does not (so the
//! bridge plugin masquerades its pods, as flannel's CNI plugin asks it to), with an
//! ip-masq-agent style exception: its pods reach node addresses with their own address.
//! So a pod of node 2 reaches node 1's hostPort unmasqueraded, and the reply, DNATed back
//! by node 1's stack, is pod to pod: the case a fast path that skips the stack breaks.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::echo::{self, EchoServer, Reply};
use crate::kube_proxy::{Protocol, ProxyMode, Service, TrafficPolicy};
use crate::lab::{Lab, Pod, PortMapping, EXTERNAL_HOST};
use crate::plain_flannel::PlainFlannelNode;

pub const HTTP_PORT: u16 = 80;
pub const DNS_PORT: u16 = 53;
pub const HAIRPIN_PORT: u16 = 8081;
pub const HOST_PORT: u16 = 8080;
pub const NODE_PORT_CLUSTER: u16 = 30080;
pub const NODE_PORT_LOCAL: u16 = 30081;
/// A port the nodes serve on (the kubelet's, for probes the other way).
pub const NODE_SERVICE_PORT: u16 = 10250;
/// The external host's server (pod → outside, masqueraded).
pub const EXTERNAL_PORT: u16 = 9000;

pub const SVC_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SVC_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const SVC_HAIRPIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
pub const SVC_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
pub const SVC_NODE_PORT_CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const SVC_NODE_PORT_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a request is sent from.
#[derive(Debug, Clone)]
pub enum Client {
    Pod(Pod),
    /// A node's own namespace (the kubelet).
    Node(usize),
    /// The external host on the fabric (198.51.100.1).
    External,
}

/// Which source address the server must see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Exactly(Ipv4Addr),
    /// Any address of node N (masqueraded to whichever interface faces the server).
    NodeAddress(usize),
}

/// One request of the matrix.
#[derive(Debug, Clone)]
pub struct Cell {
    pub name: &'static str,
    pub from: Client,
    pub to: SocketAddrV4,
    pub protocol: Protocol,
    pub seen: Seen,
}

/// The deployed workload; its servers stop when it is dropped.
pub struct Workload {
    pub client: Pod,
    pub web1: Pod,
    pub web2: Pod,
    pub client2: Pod,
    pub services: Vec<Service>,
    /// Serving until the workload is dropped.
    _servers: Vec<EchoServer>,
}

/// Node 2: a weft node of the lab, or a plain flannel node (no agent).
pub enum SecondNode<'a> {
    Weft,
    PlainFlannel(&'a PlainFlannelNode),
}

impl Workload {
    /// Creates the pods (node 1 through kube-flannel's conflist with portmap), starts their
    /// servers, and installs kube-proxy's rules in `mode` on every node of `lab`.
    pub fn deploy(lab: &mut Lab, second: SecondNode, mode: ProxyMode) -> Result<Workload> {
        let client = lab.add_pod(1)?;
        let web1 = lab.add_pod_with_ports(
            1,
            &[PortMapping {
                host_port: HOST_PORT,
                container_port: HTTP_PORT,
                protocol: Protocol::Tcp,
            }],
        )?;
        let (web2, client2) = match second {
            SecondNode::Weft => {
                // ip-masq-agent's nonMasqueradeCIDRs, for the node network.
                let exception = format!(
                    "-t nat -I POSTROUTING 1 -s {} -d {}/24 -j RETURN",
                    lab.config().network,
                    lab.node_ip(1)
                );
                let mut line = vec!["iptables", "-w"];
                line.extend(exception.split(' '));
                crate::exec::run_in(lab.node_ns(2), &line)?;
                (lab.add_pod(2)?, lab.add_pod(2)?)
            }
            SecondNode::PlainFlannel(node) => (node.add_pod(lab)?, node.add_pod(lab)?),
        };
        let services = vec![
            Service::cluster_ip("web-remote", SVC_REMOTE, HTTP_PORT, Protocol::Tcp)
                .endpoint(web2.ip, 2, HTTP_PORT),
            Service::cluster_ip("web-local", SVC_LOCAL, HTTP_PORT, Protocol::Tcp)
                .endpoint(web1.ip, 1, HTTP_PORT),
            Service::cluster_ip("hairpin", SVC_HAIRPIN, HAIRPIN_PORT, Protocol::Tcp).endpoint(
                client.ip,
                1,
                HAIRPIN_PORT,
            ),
            Service::cluster_ip("dns", SVC_DNS, DNS_PORT, Protocol::Udp)
                .endpoint(web2.ip, 2, DNS_PORT),
            Service::cluster_ip(
                "np-cluster",
                SVC_NODE_PORT_CLUSTER,
                HTTP_PORT,
                Protocol::Tcp,
            )
            .node_port(NODE_PORT_CLUSTER, TrafficPolicy::Cluster)
            .endpoint(web2.ip, 2, HTTP_PORT),
            Service::cluster_ip("np-local", SVC_NODE_PORT_LOCAL, HTTP_PORT, Protocol::Tcp)
                .node_port(NODE_PORT_LOCAL, TrafficPolicy::Local)
                .endpoint(web1.ip, 1, HTTP_PORT),
        ];
        lab.install_kube_proxy(mode, &services)?;

        let any = Ipv4Addr::UNSPECIFIED;
        let mut servers = Vec::new();
        for (ns, port, protocol) in [
            (&web1.ns, HTTP_PORT, Protocol::Tcp),
            (&web2.ns, HTTP_PORT, Protocol::Tcp),
            (&web2.ns, DNS_PORT, Protocol::Udp),
            (&client.ns, HAIRPIN_PORT, Protocol::Tcp),
            (
                &lab.node_ns(1).to_string(),
                NODE_SERVICE_PORT,
                Protocol::Tcp,
            ),
            (
                &lab.node_ns(2).to_string(),
                NODE_SERVICE_PORT,
                Protocol::Tcp,
            ),
        ] {
            servers.push(EchoServer::start(
                ns,
                SocketAddrV4::new(any, port),
                protocol,
            )?);
        }
        servers.push(EchoServer::start(
            lab.fabric_ns(),
            SocketAddrV4::new(EXTERNAL_HOST, EXTERNAL_PORT),
            Protocol::Tcp,
        )?);
        Ok(Workload {
            client,
            web1,
            web2,
            client2,
            services,
            _servers: servers,
        })
    }

    /// Every request of the matrix; the stream that starts before its endpoint is learned
    /// is separate ([`Workload::stream_to_a_new_pod`]).
    pub fn cells(&self, lab: &Lab) -> Vec<Cell> {
        let node1 = lab.node_ip(1);
        let node2 = lab.node_ip(2);
        let pod = |p: &Pod| Client::Pod(p.clone());
        let at = |ip: Ipv4Addr, port: u16| SocketAddrV4::new(ip, port);
        let tcp = Protocol::Tcp;
        let client = self.client.ip;
        vec![
            Cell {
                name: "pod → pod, same node",
                from: pod(&self.client),
                to: at(self.web1.ip, HTTP_PORT),
                protocol: tcp,
                seen: Seen::Exactly(client),
            },
            Cell {
                name: "pod → pod, other node",
                from: pod(&self.client),
                to: at(self.web2.ip, HTTP_PORT),
                protocol: tcp,
                seen: Seen::Exactly(client),
            },
            Cell {
                name: "pod → ClusterIP, backend on the other node",
                from: pod(&self.client),
                to: at(SVC_REMOTE, HTTP_PORT),
                protocol: tcp,
                seen: Seen::Exactly(client),
            },
            Cell {
                name: "pod → ClusterIP, backend on the same node",
                from: pod(&self.client),
                to: at(SVC_LOCAL, HTTP_PORT),
                protocol: tcp,
                seen: Seen::Exactly(client),
            },
            Cell {
                name: "pod → ClusterIP, backend is the client (hairpin)",
                from: pod(&self.client),
                to: at(SVC_HAIRPIN, HAIRPIN_PORT),
                protocol: tcp,
                seen: Seen::NodeAddress(1),
            },
            Cell {
                name: "pod → ClusterIP over UDP (DNS), backend on the other node",
                from: pod(&self.client),
                to: at(SVC_DNS, DNS_PORT),
                protocol: Protocol::Udp,
                seen: Seen::Exactly(client),
            },
            Cell {
                name: "external host → NodePort on node 1 (Cluster) → backend on node 2",
                from: Client::External,
                to: at(node1, NODE_PORT_CLUSTER),
                protocol: tcp,
                seen: Seen::NodeAddress(1),
            },
            Cell {
                name: "external host → NodePort on node 1 (Local) → backend on node 1",
                from: Client::External,
                to: at(node1, NODE_PORT_LOCAL),
                protocol: tcp,
                seen: Seen::Exactly(EXTERNAL_HOST),
            },
            Cell {
                name: "pod on node 2 → hostPort on node 1",
                from: pod(&self.client2),
                to: at(node1, HOST_PORT),
                protocol: tcp,
                seen: Seen::Exactly(self.client2.ip),
            },
            Cell {
                name: "external host → hostPort on node 1",
                from: Client::External,
                to: at(node1, HOST_PORT),
                protocol: tcp,
                seen: Seen::Exactly(EXTERNAL_HOST),
            },
            Cell {
                name: "pod → external host, masqueraded (--ip-masq)",
                from: pod(&self.client),
                to: at(EXTERNAL_HOST, EXTERNAL_PORT),
                protocol: tcp,
                seen: Seen::Exactly(node1),
            },
            Cell {
                name: "node → pod on the same node (kubelet probe)",
                from: Client::Node(1),
                to: at(self.web1.ip, HTTP_PORT),
                protocol: tcp,
                seen: Seen::NodeAddress(1),
            },
            Cell {
                name: "node → pod on the other node",
                from: Client::Node(1),
                to: at(self.web2.ip, HTTP_PORT),
                protocol: tcp,
                seen: Seen::NodeAddress(1),
            },
            Cell {
                name: "pod → its node",
                from: pod(&self.client),
                to: at(node1, NODE_SERVICE_PORT),
                protocol: tcp,
                seen: Seen::Exactly(client),
            },
            Cell {
                name: "pod → the other node, masqueraded",
                from: pod(&self.client),
                to: at(node2, NODE_SERVICE_PORT),
                protocol: tcp,
                seen: Seen::NodeAddress(1),
            },
        ]
    }

    /// Sends `cell`'s request and checks the reply. Err says what went wrong.
    pub fn run(&self, lab: &Lab, cell: &Cell) -> Result<Reply> {
        let reply = match &cell.from {
            Client::Pod(pod) => echo::call(&pod.ns, cell.to, cell.protocol, CALL_TIMEOUT),
            Client::Node(node) => {
                echo::call(lab.node_ns(*node), cell.to, cell.protocol, CALL_TIMEOUT)
            }
            Client::External => echo::call_from(
                lab.fabric_ns(),
                EXTERNAL_HOST,
                cell.to,
                cell.protocol,
                CALL_TIMEOUT,
            ),
        }?;
        let ok = match &cell.seen {
            Seen::Exactly(ip) => reply.seen_by_server.ip() == ip,
            Seen::NodeAddress(node) => {
                node_addresses(lab, *node)?.contains(reply.seen_by_server.ip())
            }
        };
        anyhow::ensure!(
            ok,
            "the server saw the request from {}, expected {:?}",
            reply.seen_by_server,
            cell.seen
        );
        Ok(reply)
    }

    /// Runs every cell; returns the failures, one line each (empty when all passed).
    pub fn failures(&self, lab: &Lab) -> Vec<String> {
        self.cells(lab)
            .iter()
            .filter_map(|cell| {
                self.run(lab, cell)
                    .err()
                    .map(|e| format!("{}: {e:#}", cell.name))
            })
            .collect()
    }

    /// A TCP conversation from `client` to a new pod on node 2 that has sent nothing yet,
    /// so no dataplane has learned its endpoint when the connection starts (it is learned
    /// mid-stream, once the pod answers). 100 lines, each answered, within `duration`.
    /// Returns the number of exchanges.
    pub fn stream_to_a_new_pod(
        &self,
        lab: &mut Lab,
        second: SecondNode,
        duration: Duration,
    ) -> Result<u64> {
        let pod = match second {
            SecondNode::Weft => lab.add_pod(2)?,
            SecondNode::PlainFlannel(node) => node.add_pod(lab)?,
        };
        let _server = EchoServer::start(
            &pod.ns,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HTTP_PORT),
            Protocol::Tcp,
        )?;
        // 100 exchanges 20 ms apart: the pod answers the first, and is learned meanwhile.
        echo::converse(
            &self.client.ns,
            SocketAddrV4::new(pod.ip, HTTP_PORT),
            100,
            Duration::from_millis(20),
            duration,
        )
        .with_context(|| {
            format!(
                "the TCP conversation from {} to the new pod {}",
                self.client.name, pod.name
            )
        })
    }
}

/// The IPv4 addresses of node `node`'s namespace.
pub fn node_addresses(lab: &Lab, node: usize) -> Result<Vec<Ipv4Addr>> {
    let links = lab.ip_json(lab.node_ns(node), &["-4", "addr", "show"])?;
    let mut found = Vec::new();
    for link in links {
        for info in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(local) = info["local"].as_str() {
                found.push(local.parse().with_context(|| format!("address {local}"))?);
            }
        }
    }
    Ok(found)
}
