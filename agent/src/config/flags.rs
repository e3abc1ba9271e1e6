//! `weft agent` flags: flanneld's names, defaults and `FLANNELD_*` environment variables.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Args;

/// A flanneld-style boolean: `--flag`, `--flag=true` and `--flag=false` all work, as with
/// Go's flag package, and so does `FLANNELD_FLAG=true`.
macro_rules! go_bool {
    () => {
        clap::ArgAction::Set
    };
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// IP accessible by other nodes for inter-host communication (default: the chosen interface's IP).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 accessible by other nodes (weft is IPv4-only for now: accepted and ignored).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<String>,

    /// Interface to use (IP or name) for inter-host communication. Repeat to give alternatives, tried in order.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex of the interface to use (name or IP). Repeatable; tried in order after --iface.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,

    /// Use the interface through which this address is routed.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// Filename where env variables (subnet, MTU, ...) will be written to.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Path to the network configuration file (kube subnet manager).
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,

    /// Renew the lease this many minutes before it expires.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60)]
    pub subnet_lease_renew_margin: u64,

    /// Set up IP masquerade for traffic leaving the pod network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = go_bool!(), num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub ip_masq: bool,

    /// Do not use --random-fully in the MASQUERADE rules.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", action = go_bool!(), num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub ip_masq_fully_random_disable: bool,

    /// Re-check the masquerade and forward rules every this many seconds.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,

    /// Add ACCEPT rules to the FORWARD chain for the pod network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = go_bool!(), num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    pub iptables_forward_rules: bool,

    /// Add a blackhole route for the node's own subnet (drops traffic to pods that do not exist).
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", action = go_bool!(), num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub ip_blackhole_route: bool,

    /// Comma-separated list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,

    /// etcd prefix of the network configuration and leases.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// Contact the Kubernetes API for subnet assignment instead of etcd.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = go_bool!(), num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub kube_subnet_mgr: bool,

    /// Kubernetes API server URL (default: in-cluster or kubeconfig).
    #[arg(long, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// kubeconfig file location.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,

    /// Prefix of the node annotations weft reads and writes.
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,

    /// Set the NetworkUnavailable=False condition on the node.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", action = go_bool!(), num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    pub set_node_network_unavailable: bool,

    /// Address the health server listens on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: Ipv4Addr,

    /// Port of the health server (0 = off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Firewall for --ip-masq and the forward rules: nftables unless unusable (auto), or forced.
    #[arg(long, env = "WEFT_FIREWALL", value_enum, default_value = "auto")]
    pub firewall: crate::masq::FirewallChoice,

    /// Who source-NATs pod traffic leaving the cluster (with --ip-masq): the firewall's
    /// masquerade rule (auto, nftables, iptables), or, experimental, the BPF programs
    /// (bpf; the BPF dataplane only), with the firewall's rule kept as their fallback.
    /// auto stays on the kernel's masquerade until BPF source NAT holds every invariant
    /// of conntrack's (ports unique against the node's other NAT, no drop when its ports
    /// run out, mappings that outlive their flows).
    #[arg(long, env = "WEFT_MASQUERADE", value_enum, default_value = "auto")]
    pub masquerade: crate::masq::MasqueradeChoice,

    /// A destination (CIDR) pod traffic reaches with its pod address, not masqueraded
    /// (peered VPCs, on-premises ranges). Repeatable, or comma-separated.
    #[arg(long, env = "WEFT_MASQUERADE_EXCLUDE", value_delimiter = ',')]
    pub masquerade_exclude: Vec<ipnetwork::Ipv4Network>,

    /// Mappings the BPF source NAT table holds; beyond 7/8 of it new flows go to the
    /// kernel's masquerade.
    #[arg(long, env = "WEFT_MASQUERADE_TABLE_SIZE", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(8..=4_194_304))]
    pub masquerade_table_size: u32,

    /// Experimental: once a flow has its BPF source NAT mapping (made after its first
    /// packet crossed the node's stack), its later packets skip the stack: translated and
    /// sent from the pod's veth, replies delivered straight into the pod.
    #[arg(long, env = "WEFT_MASQUERADE_FAST_PATH")]
    pub masquerade_fast_path: bool,

    /// Ports the BPF source NAT allocates, e.g. 61000-65535 (default: the ports above the
    /// node's net.ipv4.ip_local_port_range, which its own connections use).
    #[arg(long, env = "WEFT_MASQUERADE_PORTS")]
    pub masquerade_ports: Option<String>,

    /// How often to repair drift in routes, neighbours and devices, in seconds.
    #[arg(long, env = "WEFT_RESYNC_INTERVAL", default_value_t = 10)]
    pub resync_interval: u64,

    /// Dataplane: the eBPF fast path on top of the kernel path if the kernel accepts the
    /// programs (auto), required (bpf), or the kernel path only (kernel).
    #[arg(long, env = "WEFT_DATAPLANE", value_enum, default_value = "auto")]
    pub dataplane: crate::bpf::DataplaneChoice,

    /// Directory on a BPF filesystem where weft pins its maps (bpffs is mounted at
    /// /sys/fs/bpf if it is missing and the directory is below it).
    #[arg(long, env = "WEFT_BPF_DIR", default_value = crate::bpf::DEFAULT_BPF_DIR)]
    pub bpf_dir: PathBuf,

    /// Seconds without a refresh by the agent after which the eBPF programs hand every
    /// packet to the kernel path (an uninstalled or crash-looping agent never leaves stale
    /// maps deciding); 0 never gives up. The agent refreshes every few seconds, restarts
    /// are hitless.
    #[arg(long, env = "WEFT_BPF_STALE_AFTER", default_value_t = 60)]
    pub bpf_stale_after: u64,

    /// Connections the fast path can remember as the stack's (Service, hostPort and other
    /// translated connections of local pods with pods on other nodes); 0: as many as the
    /// kernel's conntrack holds (nf_conntrack_max). When it is full, a pod with a
    /// connection it could not record takes the kernel path until there is room.
    #[arg(long, env = "WEFT_BPF_STACK_FLOWS_SIZE", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=2_097_152))]
    pub bpf_stack_flows_size: u32,

    /// The bridge pods are attached to: its ports get the eBPF program `from_pod`.
    #[arg(long, env = "WEFT_POD_BRIDGE", default_value = "cni0")]
    pub pod_bridge: String,

    /// Directories of pod records (what each pod's CNI ADD produced): the only source of
    /// which pod owns which address on the fast path. libcni's result cache (written by
    /// containerd and CRI-O whatever the plugin) and weft-cni's `recordsDir`. Repeatable.
    #[arg(long = "cni-records-dir", env = "WEFT_CNI_RECORDS_DIR", value_delimiter = ',',
          default_values = [crate::cni::record::LIBCNI_RESULTS_DIR, crate::cni::record::DEFAULT_RECORDS_DIR])]
    pub cni_records_dirs: Vec<std::path::PathBuf>,

    /// Remove everything weft installed on this node (eBPF programs and pins, flannel.<VNI>,
    /// host-gw routes, masquerade and forward rules, subnet.env) and exit.
    #[arg(long, action = go_bool!(), num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub cleanup: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse(argv: &[&str]) -> AgentArgs {
        Cli::try_parse_from(std::iter::once("weft").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
            .args
    }

    // One test owns the FLANNELD_* variables: the environment is process-wide.
    #[test]
    fn flannel_defaults_flags_and_environment() {
        let a = parse(&[]);
        assert_eq!(a.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(
            a.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert_eq!(a.etcd_prefix, "/coreos.com/network");
        assert_eq!(
            a.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(a.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(a.subnet_lease_renew_margin, 60);
        assert_eq!(a.iptables_resync, 5);
        assert_eq!(a.healthz_port, 0);
        assert!(!a.ip_masq && !a.kube_subnet_mgr && !a.ip_blackhole_route);
        assert!(a.iptables_forward_rules && a.set_node_network_unavailable);
        assert_eq!(a.dataplane, crate::bpf::DataplaneChoice::Auto);
        assert_eq!(a.bpf_dir, PathBuf::from("/sys/fs/bpf/weft"));
        assert_eq!(a.pod_bridge, "cni0");
        assert_eq!(
            a.cni_records_dirs,
            [
                std::path::Path::new("/var/lib/cni/results"),
                std::path::Path::new("/var/lib/cni/weft")
            ]
        );
        assert!(!a.cleanup);

        // Go-style booleans and repeatable interfaces, in order.
        let a = parse(&[
            "--ip-masq",
            "--iptables-forward-rules=false",
            "--iface=eth1",
            "--iface",
            "10.0.0.5",
            "--iface-regex",
            "^en",
            "--public-ip",
            "198.18.0.11",
            "--etcd-prefix=/kube-centos/network",
        ]);
        assert!(a.ip_masq);
        assert!(!a.iptables_forward_rules);
        assert_eq!(a.iface, vec!["eth1", "10.0.0.5"]);
        assert_eq!(a.iface_regex, vec!["^en"]);
        assert_eq!(a.public_ip, Some(Ipv4Addr::new(198, 18, 0, 11)));
        assert_eq!(a.etcd_prefix, "/kube-centos/network");

        std::env::set_var("FLANNELD_IP_MASQ", "true");
        std::env::set_var("FLANNELD_IFACE", "eth2,eth3");
        std::env::set_var("FLANNELD_ETCD_PREFIX", "/env/network");
        std::env::set_var("FLANNELD_SUBNET_FILE", "/tmp/x.env");
        let a = parse(&[]);
        for v in [
            "FLANNELD_IP_MASQ",
            "FLANNELD_IFACE",
            "FLANNELD_ETCD_PREFIX",
            "FLANNELD_SUBNET_FILE",
        ] {
            std::env::remove_var(v);
        }
        assert!(a.ip_masq);
        assert_eq!(a.iface, vec!["eth2", "eth3"]);
        assert_eq!(a.etcd_prefix, "/env/network");
        assert_eq!(a.subnet_file, PathBuf::from("/tmp/x.env"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = Cli::try_parse_from(["weft", "--public-ip", "nope"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--public-ip"), "{e}");
        let e = Cli::try_parse_from(["weft", "--firewall", "pf"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--firewall") && e.contains("nftables"), "{e}");
        let e = Cli::try_parse_from(["weft", "--dataplane", "xdp"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--dataplane") && e.contains("bpf"), "{e}");
    }
}
