//! kube-proxy's rules on a lab node, built from a small description of Services and their
//! endpoints, in the shapes kube-proxy itself writes them: iptables mode (KUBE-SERVICES →
//! KUBE-SVC-* → KUBE-SEP-* DNAT, KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-NODEPORTS →
//! KUBE-EXT-* / KUBE-SVL-*, KUBE-FORWARD) and nftables mode (table `ip kube-proxy` with the
//! `service-ips` / `service-nodeports` verdict maps). With these, a lab node carries what a
//! Kubernetes node's stack does to Service traffic, so that a fast path that skips the
//! stack is tested where it can go wrong.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::exec::Cmd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `spec.externalTrafficPolicy` of a NodePort Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any endpoint on any node; the client's address is masqueraded to the node's.
    Cluster,
    /// Endpoints on the receiving node only; the client's address is kept.
    Local,
}

/// kube-proxy's `--proxy-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// The node the endpoint's pod runs on (for externalTrafficPolicy Local).
    pub node: usize,
}

/// A Service with one port, as the API server would hold it with its EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name`.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
    pub node_port: Option<u16>,
    pub traffic_policy: TrafficPolicy,
    pub endpoints: Vec<Endpoint>,
    /// Marked for kube-proxy's masquerade whatever the client, as kube-proxy's
    /// `--masquerade-all` does (else only clients outside the cluster CIDR are).
    pub masquerade_all: bool,
}

impl Service {
    /// A ClusterIP Service.
    pub fn cluster_ip(name: &str, ip: Ipv4Addr, port: u16, protocol: Protocol) -> Service {
        Service {
            name: format!("default/{name}"),
            cluster_ip: ip,
            port,
            protocol,
            target_port: port,
            node_port: None,
            traffic_policy: TrafficPolicy::Cluster,
            endpoints: Vec::new(),
            masquerade_all: false,
        }
    }

    /// Also reachable on every node's address at `node_port`.
    pub fn node_port(mut self, node_port: u16, policy: TrafficPolicy) -> Service {
        self.node_port = Some(node_port);
        self.traffic_policy = policy;
        self
    }

    /// Adds an endpoint: a pod on `node` serving `target_port`.
    pub fn endpoint(mut self, ip: Ipv4Addr, node: usize, target_port: u16) -> Service {
        self.target_port = target_port;
        self.endpoints.push(Endpoint { ip, node });
        self
    }

    /// The 16-character suffix kube-proxy derives from a chain's purpose (a hash of the
    /// service port name); any stable name of the same shape does here.
    fn hash(&self, salt: &str) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in salt.bytes().chain(self.name.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        (0..16)
            .map(|i| ALPHABET[((h >> ((i * 4) % 60)) as usize + i) % 32] as char)
            .collect()
    }

    fn port_name(&self) -> String {
        format!("{}:{}", self.name, self.protocol.name())
    }
}

/// The iptables-restore input kube-proxy (iptables mode) writes on node `node`
/// (`--cluster-cidr cluster_cidr`). Loaded with `--noflush`: the built-in chains keep
/// what others (portmap, flannel's masquerade) put there.
pub fn iptables_rules(services: &[Service], cluster_cidr: &str, node: usize) -> String {
    let mut nat_chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-POSTROUTING".to_string(),
        "KUBE-MARK-MASQ".to_string(),
        "KUBE-NODEPORTS".to_string(),
    ];
    let mut nat = String::new();
    let w = &mut nat;
    let _ = writeln!(
        w,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        w,
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        w,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    );
    let _ = writeln!(w, "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000");
    let _ = writeln!(
        w,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    );
    let _ = writeln!(w, "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0");
    let _ = writeln!(w, "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    for svc in services {
        let (proto, name) = (svc.protocol.name(), svc.port_name());
        let svc_chain = format!("KUBE-SVC-{}", svc.hash("svc"));
        nat_chains.push(svc_chain.clone());
        let _ = writeln!(w, "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {} -j {svc_chain}", svc.cluster_ip, svc.port);
        let clients = if svc.masquerade_all {
            String::new()
        } else {
            format!("! -s {cluster_cidr} ")
        };
        let _ = writeln!(w, "-A {svc_chain} {clients}-d {}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ", svc.cluster_ip, svc.port);
        let seps: Vec<(String, &Endpoint)> = svc
            .endpoints
            .iter()
            .map(|e| (format!("KUBE-SEP-{}", svc.hash(&e.ip.to_string())), e))
            .collect();
        write_endpoint_choice(w, &svc_chain, &seps, &name, svc.target_port);
        for (sep, endpoint) in &seps {
            nat_chains.push(sep.clone());
            let _ = writeln!(
                w,
                "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                endpoint.ip
            );
            let _ = writeln!(w, "-A {sep} -p {proto} -m comment --comment \"{name}\" -m {proto} -j DNAT --to-destination {}:{}", endpoint.ip, svc.target_port);
        }
        if let Some(node_port) = svc.node_port {
            let ext = format!("KUBE-EXT-{}", svc.hash("ext"));
            nat_chains.push(ext.clone());
            let _ = writeln!(w, "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{name}\" -m {proto} --dport {node_port} -j {ext}");
            match svc.traffic_policy {
                TrafficPolicy::Cluster => {
                    let _ = writeln!(w, "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ");
                    let _ = writeln!(w, "-A {ext} -j {svc_chain}");
                }
                TrafficPolicy::Local => {
                    let svl = format!("KUBE-SVL-{}", svc.hash("svl"));
                    nat_chains.push(svl.clone());
                    let _ = writeln!(w, "-A {ext} -s {cluster_cidr} -m comment --comment \"pod traffic for {name} external destinations\" -j {svc_chain}");
                    let _ = writeln!(w, "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ");
                    let _ = writeln!(w, "-A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}");
                    let _ = writeln!(w, "-A {ext} -j {svl}");
                    let local: Vec<(String, &Endpoint)> = seps
                        .iter()
                        .filter(|(_, e)| e.node == node)
                        .cloned()
                        .collect();
                    write_endpoint_choice(w, &svl, &local, &name, svc.target_port);
                }
            }
        }
    }
    let _ = writeln!(w, "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS");

    let mut out = String::from("*filter\n");
    for chain in [
        "KUBE-FORWARD",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n*nat\n",
    );
    for chain in &nat_chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&nat);
    out.push_str("COMMIT\n");
    out
}

/// `-m statistic` spreading over `seps`, as kube-proxy does (the last without a test).
fn write_endpoint_choice(
    w: &mut String,
    chain: &str,
    seps: &[(String, &Endpoint)],
    name: &str,
    port: u16,
) {
    let n = seps.len();
    for (i, (sep, endpoint)) in seps.iter().enumerate() {
        let comment = format!("-m comment --comment \"{name} -> {}:{port}\"", endpoint.ip);
        if i + 1 < n {
            let probability = 1.0 / (n - i) as f64;
            let _ = writeln!(w, "-A {chain} {comment} -m statistic --mode random --probability {probability:.11} -j {sep}");
        } else {
            let _ = writeln!(w, "-A {chain} {comment} -j {sep}");
        }
    }
}

/// The nft script kube-proxy (nftables mode) writes on node `node`: table `ip kube-proxy`.
pub fn nft_rules(services: &[Service], cluster_cidr: &str, node: usize) -> String {
    let mut s = String::new();
    let w = &mut s;
    let t = "ip kube-proxy";
    let _ = writeln!(w, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(w, "flush table {t}");
    let _ = writeln!(w, "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}");
    let _ = writeln!(w, "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    let _ = writeln!(
        w,
        "add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"
    );
    let _ = writeln!(
        w,
        "add chain {t} nat-output {{ type nat hook output priority -100 ; }}"
    );
    let _ = writeln!(
        w,
        "add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}"
    );
    let _ = writeln!(
        w,
        "add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}"
    );
    for chain in ["services", "masquerading", "mark-for-masquerade"] {
        let _ = writeln!(w, "add chain {t} {chain}");
    }
    let _ = writeln!(w, "add rule {t} nat-prerouting jump services");
    let _ = writeln!(w, "add rule {t} nat-output jump services");
    let _ = writeln!(w, "add rule {t} nat-postrouting jump masquerading");
    let _ = writeln!(w, "add rule {t} filter-forward ct state invalid drop");
    let _ = writeln!(
        w,
        "add rule {t} mark-for-masquerade mark set mark or 0x4000"
    );
    let _ = writeln!(w, "add rule {t} masquerading mark and 0x4000 == 0 return");
    let _ = writeln!(w, "add rule {t} masquerading mark set mark xor 0x4000");
    let _ = writeln!(w, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        w,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(w, "add rule {t} services fib daddr type local meta l4proto . th dport vmap @service-nodeports");
    for svc in services {
        let proto = svc.protocol.name();
        let id = svc.name.replace('/', "-");
        let chain = format!(
            "service-{}-{id}/{proto}/p{}",
            &svc.hash("svc")[..8],
            svc.port
        );
        let _ = writeln!(w, "add chain {t} {chain}");
        let clients = if svc.masquerade_all {
            String::new()
        } else {
            format!(" ip saddr != {cluster_cidr}")
        };
        let _ = writeln!(
            w,
            "add rule {t} {chain} ip daddr {} {proto} dport {}{clients} jump mark-for-masquerade",
            svc.cluster_ip, svc.port
        );
        let endpoint_chains: Vec<(String, &Endpoint)> = svc
            .endpoints
            .iter()
            .map(|e| {
                let c = format!(
                    "endpoint-{}-{id}/{proto}/p{}__{}/{}",
                    &svc.hash(&e.ip.to_string())[..8],
                    svc.port,
                    e.ip,
                    svc.target_port
                );
                (c, e)
            })
            .collect();
        for (c, endpoint) in &endpoint_chains {
            let _ = writeln!(w, "add chain {t} {c}");
            let _ = writeln!(
                w,
                "add rule {t} {c} ip saddr {} jump mark-for-masquerade",
                endpoint.ip
            );
            let _ = writeln!(
                w,
                "add rule {t} {c} meta l4proto {proto} dnat to {}:{}",
                endpoint.ip, svc.target_port
            );
        }
        write_numgen(w, t, &chain, &endpoint_chains);
        let _ = writeln!(
            w,
            "add element {t} service-ips {{ {} . {proto} . {} : goto {chain} }}",
            svc.cluster_ip, svc.port
        );
        if let Some(node_port) = svc.node_port {
            let ext = format!(
                "external-{}-{id}/{proto}/p{}",
                &svc.hash("ext")[..8],
                svc.port
            );
            let _ = writeln!(w, "add chain {t} {ext}");
            match svc.traffic_policy {
                TrafficPolicy::Cluster => {
                    let _ = writeln!(w, "add rule {t} {ext} jump mark-for-masquerade");
                    let _ = writeln!(w, "add rule {t} {ext} goto {chain}");
                }
                TrafficPolicy::Local => {
                    let local_chain =
                        format!("local-{}-{id}/{proto}/p{}", &svc.hash("svl")[..8], svc.port);
                    let _ = writeln!(w, "add chain {t} {local_chain}");
                    let _ = writeln!(w, "add rule {t} {ext} ip saddr {cluster_cidr} goto {chain}");
                    let _ = writeln!(
                        w,
                        "add rule {t} {ext} fib saddr type local jump mark-for-masquerade"
                    );
                    let _ = writeln!(w, "add rule {t} {ext} fib saddr type local goto {chain}");
                    let _ = writeln!(w, "add rule {t} {ext} goto {local_chain}");
                    let local: Vec<(String, &Endpoint)> = endpoint_chains
                        .iter()
                        .filter(|(_, e)| e.node == node)
                        .cloned()
                        .collect();
                    write_numgen(w, t, &local_chain, &local);
                }
            }
            let _ = writeln!(
                w,
                "add element {t} service-nodeports {{ {proto} . {node_port} : goto {ext} }}"
            );
        }
    }
    s
}

fn write_numgen(w: &mut String, table: &str, chain: &str, endpoints: &[(String, &Endpoint)]) {
    if endpoints.is_empty() {
        let _ = writeln!(w, "add rule {table} {chain} drop");
        return;
    }
    let arms: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (c, _))| format!("{i} : goto {c}"))
        .collect();
    let _ = writeln!(
        w,
        "add rule {table} {chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        arms.join(", ")
    );
}

/// Installs kube-proxy's rules for `services` in node namespace `ns` (node `node`).
pub fn install(
    ns: &str,
    mode: ProxyMode,
    services: &[Service],
    cluster_cidr: &str,
    node: usize,
) -> Result<()> {
    match mode {
        ProxyMode::Iptables => Cmd::new(["iptables-restore", "-w", "--noflush"])
            .netns(ns)
            .stdin(iptables_rules(services, cluster_cidr, node))
            .run()
            .with_context(|| format!("loading kube-proxy's iptables rules on node {node}"))?,
        ProxyMode::Nftables => Cmd::new(["nft", "-f", "-"])
            .netns(ns)
            .stdin(nft_rules(services, cluster_cidr, node))
            .run()
            .with_context(|| format!("loading kube-proxy's nftables rules on node {node}"))?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Service {
        Service::cluster_ip("web", Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp)
            .node_port(30080, TrafficPolicy::Local)
            .endpoint(Ipv4Addr::new(10, 244, 1, 2), 1, 8080)
            .endpoint(Ipv4Addr::new(10, 244, 2, 2), 2, 8080)
    }

    #[test]
    fn iptables_mode_chains_services_to_endpoints_as_kube_proxy_does() {
        let rules = iptables_rules(&[web()], "10.244.0.0/16", 1);
        let svc = rules
            .lines()
            .find(|l| l.starts_with("-A KUBE-SERVICES -d 10.96.0.10/32"))
            .expect("a KUBE-SERVICES rule for the ClusterIP");
        let svc_chain = svc.rsplit(' ').next().unwrap();
        assert!(svc_chain.starts_with("KUBE-SVC-") && svc_chain.len() == "KUBE-SVC-".len() + 16);
        assert!(svc.contains("-p tcp") && svc.contains("--dport 80"));
        // Two endpoints: the first picked with probability 1/2, the second the rest.
        let picks: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc_chain} -m comment")))
            .collect();
        assert_eq!(picks.len(), 2, "{rules}");
        assert!(picks[0].contains("--probability 0.50000000000"));
        assert!(rules.contains("-j DNAT --to-destination 10.244.2.2:8080"));
        // Local: the KUBE-SVL chain of node 1 holds node 1's endpoint only.
        let svl = rules
            .lines()
            .find(|l| l.contains("-j KUBE-SVL-"))
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string();
        let svl_rules: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svl} ")))
            .collect();
        assert_eq!(svl_rules.len(), 1, "{rules}");
        assert!(svl_rules[0].contains("10.244.1.2:8080"));
        // The NodePort dispatch is the last rule of KUBE-SERVICES.
        let last = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
            .unwrap();
        assert!(last.ends_with("--dst-type LOCAL -j KUBE-NODEPORTS"));
    }

    #[test]
    fn nftables_mode_dispatches_through_verdict_maps() {
        let rules = nft_rules(&[web()], "10.244.0.0/16", 2);
        assert!(rules.contains(
            "add element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 : goto service-"
        ));
        assert!(rules.contains(
            "add element ip kube-proxy service-nodeports { tcp . 30080 : goto external-"
        ));
        assert!(
            rules.contains("dnat to 10.244.1.2:8080") && rules.contains("dnat to 10.244.2.2:8080")
        );
        let local = rules
            .lines()
            .find(|l| l.contains(" local-") && l.contains("numgen"))
            .unwrap();
        assert!(
            local.contains("numgen random mod 1"),
            "node 2's local endpoints: {local}"
        );
    }
}
