//! A node that runs no weft: configured with plain `ip`/`bridge` commands exactly as
//! flanneld's vxlan backend leaves the kernel (`flannel.<VNI>` without learning, and a neighbour, an FDB entry and an onlink route per peer), with
//! its lease written by hand in flannel's JSON (in etcd, or in kube mode as flanneld's
//! Node annotations). It stands for a node still on flanneld.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::exec::{bridge, ip, run_in};
use crate::lab::{Lab, Pod, VXLAN_PORT};

pub const VXLAN_DEVICE: &str = "flannel.1";
const VNI: u32 = 1;
const UNDERLAY_MTU: u32 = 1500;
const VXLAN_OVERHEAD: u32 = 50;

pub struct PlainFlannelNode {
    pub node: usize,
    /// Network address of the node's /24 (e.g. 10.244.250.0).
    pub subnet: Ipv4Addr,
    pub vtep_mac: String,
    ns: String,
}

fn offset(net: Ipv4Addr, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net) + host)
}

impl PlainFlannelNode {
    /// Turns node `node` of `lab` (which must run no agent) into a flannel-style vxlan
    /// node for /24 `subnet` with VTEP MAC `vtep_mac`: flannel.1, cni0 and its lease as
    /// flanneld publishes it ([`Lab::publish_flanneld_lease`]; in kube mode `subnet` must
    /// be the node's podCIDR, [`Lab::assigned_pod_cidr`]).
    pub fn setup(lab: &mut Lab, node: usize, subnet: Ipv4Addr, vtep_mac: &str) -> Result<Self> {
        let ns = lab.node_ns(node).to_string();
        let public_ip = lab.node_ip(node);
        let mtu = UNDERLAY_MTU - VXLAN_OVERHEAD;
        let dev = VXLAN_DEVICE;
        ip(&ns, &format!("link add {dev} type vxlan id {VNI} local {public_ip} dev eth0 dstport {VXLAN_PORT} nolearning"))?;
        ip(&ns, &format!("link set {dev} address {vtep_mac} mtu {mtu}"))?;
        let accept_ra = format!("net.ipv6.conf.{}.accept_ra=0", dev.replace('.', "/"));
        run_in(&ns, &["sysctl", "-q", "-w", &accept_ra])?;
        ip(&ns, &format!("addr add {subnet}/32 dev {dev}"))?;
        ip(&ns, &format!("link set {dev} up"))?;
        ip(&ns, "link add cni0 type bridge")?;
        ip(&ns, &format!("addr add {}/24 dev cni0", offset(subnet, 1)))?;
        ip(&ns, "link set cni0 up")?;

        lab.publish_flanneld_lease(node, subnet, VNI, vtep_mac)?;
        Ok(PlainFlannelNode {
            node,
            subnet,
            vtep_mac: vtep_mac.to_string(),
            ns,
        })
    }

    /// Programs neighbour, FDB entry and route for every other vxlan lease in etcd, as
    /// flanneld does on a lease event. Returns how many peers were programmed.
    pub fn sync(&self, lab: &Lab) -> Result<usize> {
        let mut peers = 0;
        for lease in lab.leases()? {
            if lease.subnet == self.subnet || lease.backend_type != "vxlan" {
                continue;
            }
            let mac = lease
                .vtep_mac
                .as_deref()
                .with_context(|| format!("vxlan lease {} has no VtepMAC", lease.key))?;
            let (ns, dev, gateway, remote) =
                (&self.ns, VXLAN_DEVICE, lease.subnet, lease.public_ip);
            ip(
                ns,
                &format!("neigh replace {gateway} lladdr {mac} dev {dev} nud permanent"),
            )?;
            bridge(
                ns,
                &format!("fdb replace {mac} dev {dev} dst {remote} self permanent"),
            )?;
            ip(
                ns,
                &format!(
                    "route replace {} via {gateway} dev {dev} onlink",
                    lease.cidr()
                ),
            )?;
            peers += 1;
        }
        Ok(peers)
    }

    /// A pod on this node, attached with plain veth commands to cni0 (what the bridge
    /// plugin would do): address subnet + 1 + k, default route via cni0.
    pub fn add_pod(&self, lab: &mut Lab) -> Result<Pod> {
        let name = lab.next_pod_name(self.node);
        let k: u32 = name.rsplit('p').next().unwrap_or("1").parse().unwrap_or(1);
        let pod_ns = lab.create_ns(&name)?;
        let host_side = format!("vp{k}");
        let mtu = UNDERLAY_MTU - VXLAN_OVERHEAD;
        let pod_ip = offset(self.subnet, 1 + k);
        let gateway = offset(self.subnet, 1);
        let ns = &self.ns;
        ip(
            ns,
            &format!(
                "link add {host_side} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {pod_ns}"
            ),
        )?;
        ip(ns, &format!("link set {host_side} master cni0 up"))?;
        ip(&pod_ns, &format!("addr add {pod_ip}/24 dev eth0"))?;
        ip(&pod_ns, "link set eth0 up")?;
        ip(&pod_ns, &format!("route add default via {gateway}"))?;
        let pod = Pod {
            name,
            ns: pod_ns,
            ip: pod_ip,
            node: self.node,
        };
        lab.register_pod(pod.clone());
        Ok(pod)
    }
}
