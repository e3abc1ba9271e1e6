//! The vxlan and host-gw backends and the external interface selection, against the real
//! kernel in network namespaces each test creates (never the root namespace). State is
//! read back the way a user would look at it: `ip -j ...` and `bridge -j fdb show`.
//!
//! Needs root. The backend runs in a thread that joined node A's namespace with setns(2),
//! on a current-thread tokio runtime with its own rtnetlink connection.

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use serde_json::Value;
use weft::backend::hostgw::HostGwBackend;
use weft::backend::vxlan::VxlanBackend;
use weft::backend::Backend as _;
use weft::config::{BackendConf, VxlanConf};
use weft::dataplane::Dataplane;
use weft::iface::{select_ext_iface, ExtIface, IfaceSelection};
use weft::lease::{Lease, LeaseAttrs, LeaseEvent, MacAddr};
use weft::plan::PlanConfig;

const PREFIX: &str = "wt-kb-";
const NETWORK: &str = "10.244.0.0/16";
const OWN: &str = "10.244.1.0/24";
const NODE_A: &str = "198.18.0.11";
const NODE_B: &str = "198.18.0.12";

// ---------------------------------------------------------------------------------------
// Namespaces

/// The namespaces of one test; dropping it deletes them (also when the test panics).
struct Lab {
    prefix: String,
    names: Vec<String>,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        sweep_stale_namespaces();
        Lab {
            prefix: format!("{PREFIX}{}-{tag}-", std::process::id()),
            names: Vec::new(),
        }
    }

    /// Creates namespace `<prefix><name>` with `lo` up and returns its full name.
    fn netns(&mut self, name: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        run("ip", &["netns", "add", &full]);
        self.names.push(full.clone());
        ip(&full, "link set lo up");
        full
    }

    /// Two nodes whose `eth0`s are a veth pair: A = 198.18.0.11/24, B = 198.18.0.12/24.
    fn two_nodes(&mut self) -> (String, String) {
        let a = self.netns("a");
        let b = self.netns("b");
        ip(
            &a,
            &format!("link add eth0 type veth peer name eth0 netns {b}"),
        );
        for (ns, addr) in [(&a, NODE_A), (&b, NODE_B)] {
            ip(ns, &format!("addr add {addr}/24 dev eth0"));
            ip(ns, "link set eth0 up");
        }
        (a, b)
    }

    /// A pod namespace behind `node` for `subnet`: pod .2 on `eth0`, node side .1 on
    /// `veth-pod`, default route via .1; forwarding on in the node.
    fn pod(&mut self, name: &str, node: &str, subnet: &str) -> String {
        let pod = self.netns(name);
        let net: Ipv4Network = subnet.parse().unwrap();
        let host = |n: u32| Ipv4Addr::from(u32::from(net.network()) + n);
        ip(
            &pod,
            &format!("link add eth0 type veth peer name veth-pod netns {node}"),
        );
        ip(&pod, &format!("addr add {}/24 dev eth0", host(2)));
        ip(&pod, "link set eth0 up");
        ip(&pod, &format!("route add default via {}", host(1)));
        ip(node, &format!("addr add {}/24 dev veth-pod", host(1)));
        ip(node, "link set veth-pod up");
        run(
            "ip",
            &[
                "netns",
                "exec",
                node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        pod
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Deletes namespaces that earlier runs of this test binary left (their process is gone).
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n <ns> <args>`; panics when it fails.
fn ip(ns: &str, args: &str) -> String {
    let mut all = vec!["-n", ns];
    all.extend(args.split_whitespace());
    run("ip", &all)
}

fn ip_json(ns: &str, args: &str) -> Value {
    serde_json::from_str(&ip(ns, &format!("-j {args}"))).unwrap()
}

/// Logs of the code under test, captured for assertions (and printed if the test fails).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Shows the captured logs in the test output, also when the test panics.
struct PrintOnDrop(Logs);

impl Drop for PrintOnDrop {
    fn drop(&mut self) {
        eprintln!("--- logs of the code under test:\n{}", self.0.text());
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `body` in a thread that joined namespace `ns`, on a current-thread runtime with an
/// rtnetlink connection opened in that namespace, with logs captured.
fn in_netns<T, F, Fut>(ns: &str, body: F) -> T
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle, Logs) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    let worker = std::thread::spawn(move || {
        let netns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns only changes this thread's network namespace.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let logs = Logs::default();
        let _print_logs = PrintOnDrop(logs.clone());
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let _log_guard = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(connection);
            body(handle, logs.clone()).await
        });
        result
    });
    worker
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// ---------------------------------------------------------------------------------------
// Reading kernel state the way a user does

/// `ip -d -j link show <dev>`, the single entry.
fn link(ns: &str, dev: &str) -> Value {
    ip_json(ns, &format!("-d link show dev {dev}"))[0].clone()
}

fn link_exists(ns: &str, dev: &str) -> bool {
    ip_json(ns, "link show")
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["ifname"] == dev)
}

/// IPv4 addresses of `dev` as `a.b.c.d/len`.
fn addrs(ns: &str, dev: &str) -> Vec<String> {
    let info = ip_json(ns, &format!("addr show dev {dev}"));
    info[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// Neighbours of `dev` as `ip lladdr mac state`.
fn neighbours(ns: &str, dev: &str) -> Vec<String> {
    let list = ip_json(ns, &format!("neigh show dev {dev}"));
    list.as_array()
        .unwrap()
        .iter()
        .map(|n| {
            format!(
                "{} lladdr {} {}",
                str_of(&n["dst"]),
                str_of(&n["lladdr"]),
                n["state"][0].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// FDB entries of `dev` as `mac dst ip state`.
fn fdb(ns: &str, dev: &str) -> Vec<String> {
    let out = run("bridge", &["-n", ns, "-j", "fdb", "show", "dev", dev]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} dst {} {}",
                str_of(&e["mac"]),
                str_of(&e["dst"]),
                str_of(&e["state"])
            )
        })
        .collect()
}

/// Main-table routes to `dst` as `dst via gw dev d [onlink] [metric m] [proto p]` (`ip`
/// leaves out proto boot, what `ip route add` sets).
fn routes_to(ns: &str, dst: &str) -> Vec<String> {
    let list = ip_json(ns, "route show");
    list.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dst"] == dst)
        .map(|r| {
            let mut s = dst.to_string();
            if let Some(gw) = r["gateway"].as_str() {
                s += &format!(" via {gw}");
            }
            s += &format!(" dev {}", str_of(&r["dev"]));
            if r["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "onlink"))
            {
                s += " onlink";
            }
            if let Some(metric) = r["metric"].as_u64() {
                s += &format!(" metric {metric}");
            }
            if let Some(proto) = r["protocol"].as_str() {
                s += &format!(" proto {proto}");
            }
            s
        })
        .collect()
}

fn str_of(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

// ---------------------------------------------------------------------------------------
// Leases and backends

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn vxlan_lease(subnet: &str, public_ip: &str, vtep_mac: &str) -> Lease {
    Lease {
        subnet: net(subnet),
        attrs: LeaseAttrs {
            public_ip: public_ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": vtep_mac})),
            backend_v6_data: None,
        },
    }
}

fn hostgw_lease(subnet: &str, public_ip: &str) -> Lease {
    Lease {
        subnet: net(subnet),
        attrs: LeaseAttrs {
            public_ip: public_ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: None,
            backend_v6_data: None,
        },
    }
}

fn vxlan_conf() -> VxlanConf {
    VxlanConf {
        vni: 1,
        port: 8472,
        gbp: false,
        learning: false,
        direct_routing: false,
        mtu: 0,
    }
}

async fn eth0(handle: &rtnetlink::Handle) -> ExtIface {
    let selection = IfaceSelection {
        iface: vec!["eth0".into()],
        ..Default::default()
    };
    select_ext_iface(handle, &selection).await.unwrap()
}

/// The vxlan backend as the agent drives it: behind the planner.
async fn vxlan_backend(handle: &rtnetlink::Handle, conf: VxlanConf) -> Dataplane {
    let ext = eth0(handle).await;
    let backend = VxlanBackend::new(conf.clone(), net(NETWORK), ext.clone(), handle.clone());
    let plan = PlanConfig::new(net(NETWORK), BackendConf::Vxlan(conf), &ext);
    Dataplane::new(Box::new(backend), plan, &ext, handle.clone())
}

fn added(lease: &Lease) -> LeaseEvent {
    LeaseEvent::Added(lease.clone())
}

fn vtep_mac_of(attrs: &LeaseAttrs) -> String {
    attrs
        .vxlan()
        .expect("vxlan backend data")
        .vtep_mac
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Interface selection

#[test]
fn iface_selection_follows_flanneld_rules() {
    let mut lab = Lab::new("iface");
    let node = lab.netns("node");
    let other = lab.netns("other");
    ip(
        &node,
        &format!("link add eth0 type veth peer name eth0 netns {other}"),
    );
    ip(
        &node,
        &format!("link add eth1 type veth peer name eth1 netns {other}"),
    );
    ip(&node, "addr add 198.18.0.11/24 dev eth0");
    ip(&node, "addr add 198.18.1.11/24 dev eth1");
    ip(&node, "link set eth1 mtu 9000");
    ip(&node, "link set eth0 up");
    ip(&node, "link set eth1 up");
    ip(&node, "route add default via 198.18.0.1 dev eth0");
    let eth0_index = link(&node, "eth0")["ifindex"].as_u64().unwrap() as u32;
    let eth1_index = link(&node, "eth1")["ifindex"].as_u64().unwrap() as u32;

    let ns = node.clone();
    in_netns(&node, move |handle, _| async move {
        let select = |sel: IfaceSelection| {
            let handle = handle.clone();
            async move { select_ext_iface(&handle, &sel).await }
        };
        let sel = |iface: &[&str], regex: &[&str]| IfaceSelection {
            iface: iface.iter().map(|s| s.to_string()).collect(),
            iface_regex: regex.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let a: Ipv4Addr = "198.18.0.11".parse().unwrap();
        let b: Ipv4Addr = "198.18.1.11".parse().unwrap();

        // No flag: the default route's interface.
        let ext = select(IfaceSelection::default()).await.unwrap();
        assert_eq!(
            ext,
            ExtIface {
                name: "eth0".into(),
                index: eth0_index,
                addr: a,
                public_ip: a,
                mtu: 1500
            }
        );

        // --iface by name, by IP, and tried in order.
        let want_eth1 = ExtIface {
            name: "eth1".into(),
            index: eth1_index,
            addr: b,
            public_ip: b,
            mtu: 9000,
        };
        assert_eq!(select(sel(&["eth1"], &[])).await.unwrap(), want_eth1);
        assert_eq!(select(sel(&["198.18.1.11"], &[])).await.unwrap(), want_eth1);
        assert_eq!(
            select(sel(&["missing0", "eth1", "eth0"], &[]))
                .await
                .unwrap(),
            want_eth1
        );
        // --iface wins over --iface-regex; the regexes are tried after the names.
        assert_eq!(
            select(sel(&["eth0"], &["eth1"])).await.unwrap().name,
            "eth0"
        );
        assert_eq!(
            select(sel(&["missing0"], &["eth1"])).await.unwrap(),
            want_eth1
        );

        // --iface-regex matches IPs first, then names, in order.
        assert_eq!(
            select(sel(&[], &[r"^198\.18\.1\."])).await.unwrap(),
            want_eth1
        );
        assert_eq!(
            select(sel(&[], &["^nomatch$", "^eth1$"])).await.unwrap(),
            want_eth1
        );
        // "lo" matches by name but has no usable IPv4 address: the next match is taken.
        assert_eq!(select(sel(&[], &["^(lo|eth1)$"])).await.unwrap(), want_eth1);

        // --iface-can-reach: the interface of the route to that address.
        let can_reach = IfaceSelection {
            iface_can_reach: Some("198.18.1.77".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(select(can_reach).await.unwrap(), want_eth1);

        // --public-ip is published; the interface address stays the VXLAN local address.
        let public = IfaceSelection {
            public_ip: Some("203.0.113.5".parse().unwrap()),
            ..Default::default()
        };
        let ext = select(public).await.unwrap();
        assert_eq!(
            (ext.addr, ext.public_ip),
            (a, "203.0.113.5".parse().unwrap())
        );

        // Errors name the entry and the reason.
        let err = format!("{:#}", select(sel(&["missing0"], &[])).await.unwrap_err());
        assert!(
            err.contains("--iface missing0: no interface has this name"),
            "{err}"
        );
        assert!(
            err.contains("eth1 (198.18.1.11)"),
            "lists the interfaces: {err}"
        );
        let err = format!("{:#}", select(sel(&["lo"], &[])).await.unwrap_err());
        assert!(err.contains("interface lo has no IPv4 address"), "{err}");
        let err = format!("{:#}", select(sel(&["10.9.9.9"], &[])).await.unwrap_err());
        assert!(
            err.contains("--iface 10.9.9.9: no interface has this address"),
            "{err}"
        );
        let err = format!("{:#}", select(sel(&[], &["^wlan"])).await.unwrap_err());
        assert!(
            err.contains("--iface-regex ^wlan: matches no interface"),
            "{err}"
        );
        let err = format!("{:#}", select(sel(&[], &["("])).await.unwrap_err());
        assert!(
            err.contains("--iface-regex \"(\" is not a valid regular expression"),
            "{err}"
        );
        let unreachable = IfaceSelection {
            iface_can_reach: Some("203.0.113.9".parse().unwrap()),
            ..Default::default()
        };
        ip(&ns, "route del default");
        let err = format!("{:#}", select(unreachable).await.unwrap_err());
        assert!(
            err.contains("--iface-can-reach 203.0.113.9: no route to it"),
            "{err}"
        );

        // No default route and no flag: say so, and say which flags fix it.
        let err = format!("{:#}", select(IfaceSelection::default()).await.unwrap_err());
        for needle in [
            "no default route",
            "--iface ",
            "--iface-regex",
            "--iface-can-reach",
            "--public-ip",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// vxlan

#[test]
fn vxlan_device_is_flannels_and_keeps_its_mac() {
    let mut lab = Lab::new("vxdev");
    let (a, _b) = lab.two_nodes();
    let ns = a.clone();
    in_netns(&a, move |handle, _| async move {
        let mut backend = vxlan_backend(&handle, vxlan_conf()).await;
        let attrs = backend.register(None).await.unwrap();
        let vtep_mac = vtep_mac_of(&attrs);
        assert_eq!(attrs.public_ip, NODE_A.parse::<Ipv4Addr>().unwrap());
        assert_eq!(attrs.backend_type, "vxlan");
        assert_eq!(
            attrs.backend_data,
            Some(serde_json::json!({"VNI": 1, "VtepMAC": vtep_mac}))
        );
        assert_eq!(backend.pod_mtu(), 1450);

        let dev = link(&ns, "flannel.1");
        let info = &dev["linkinfo"]["info_data"];
        assert_eq!(dev["linkinfo"]["info_kind"], "vxlan");
        assert_eq!(info["id"], 1);
        assert_eq!(info["port"], 8472);
        assert_eq!(info["local"], NODE_A);
        assert_eq!(info["link"], "eth0");
        assert_eq!(info["learning"], false);
        assert_eq!(dev["mtu"], 1450);
        assert_eq!(dev["address"], vtep_mac.as_str());
        assert_eq!(
            mac(&vtep_mac).0[0] & 0x03,
            0x02,
            "locally administered unicast"
        );
        assert!(
            dev["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "{dev}"
        );
        let accept_ra = run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "cat",
                "/proc/sys/net/ipv6/conf/flannel.1/accept_ra",
            ],
        );
        assert_eq!(accept_ra.trim(), "0");

        // A restart adopts the device and keeps its MAC; registering again changes nothing.
        let mut restarted = vxlan_backend(&handle, vxlan_conf()).await;
        assert_eq!(
            vtep_mac_of(&restarted.register(None).await.unwrap()),
            vtep_mac
        );
        assert_eq!(
            vtep_mac_of(&restarted.register(None).await.unwrap()),
            vtep_mac
        );

        // The previous lease's VtepMAC wins (the device was deleted, e.g. by a reboot).
        ip(&ns, "link del flannel.1");
        let previous = vxlan_lease(OWN, NODE_A, "02:00:00:aa:bb:cc");
        let attrs = vxlan_backend(&handle, vxlan_conf())
            .await
            .register(Some(&previous))
            .await
            .unwrap();
        assert_eq!(vtep_mac_of(&attrs), "02:00:00:aa:bb:cc");
        assert_eq!(link(&ns, "flannel.1")["address"], "02:00:00:aa:bb:cc");

        // An incompatible flannel.1 (another port) is recreated as configured, keeping its MAC.
        ip(&ns, "link del flannel.1");
        ip(&ns, "link add flannel.1 address 02:00:00:11:22:33 type vxlan id 1 dstport 4789 local 198.18.0.11 dev eth0 nolearning");
        let attrs = vxlan_backend(&handle, vxlan_conf())
            .await
            .register(None)
            .await
            .unwrap();
        assert_eq!(vtep_mac_of(&attrs), "02:00:00:11:22:33");
        let dev = link(&ns, "flannel.1");
        assert_eq!(dev["linkinfo"]["info_data"]["port"], 8472);
        assert_eq!(dev["address"], "02:00:00:11:22:33");

        // Net-conf MTU is the underlay MTU; a compatible device gets the new MTU.
        let mut backend = vxlan_backend(
            &handle,
            VxlanConf {
                mtu: 1400,
                ..vxlan_conf()
            },
        )
        .await;
        backend.register(None).await.unwrap();
        assert_eq!(backend.pod_mtu(), 1350);
        assert_eq!(link(&ns, "flannel.1")["mtu"], 1350);

        // Another VNI and port: flannel.<VNI> with them.
        let conf = VxlanConf {
            vni: 4096,
            port: 4789,
            learning: true,
            ..vxlan_conf()
        };
        vxlan_backend(&handle, conf)
            .await
            .register(None)
            .await
            .unwrap();
        let info = link(&ns, "flannel.4096")["linkinfo"]["info_data"].clone();
        assert_eq!(
            (
                info["id"].clone(),
                info["port"].clone(),
                info["learning"].clone()
            ),
            (4096.into(), 4789.into(), true.into())
        );
    });
}

#[test]
fn vxlan_programs_peers_and_cleans_up() {
    let mut lab = Lab::new("vxpeer");
    let (a, _b) = lab.two_nodes();
    let ns = a.clone();
    in_netns(&a, move |handle, logs| async move {
        let mut backend = vxlan_backend(&handle, vxlan_conf()).await;
        let attrs = backend.register(None).await.unwrap();
        let own = Lease {
            subnet: net(OWN),
            attrs,
        };

        // Leftovers of an earlier cluster on flannel.1 and cni0.
        ip(&ns, "addr add 10.244.9.0/32 dev flannel.1");
        ip(&ns, "link add cni0 type bridge");
        ip(&ns, "addr add 10.244.9.1/24 dev cni0");
        ip(&ns, "addr add 10.244.1.1/24 dev cni0");
        backend.configure(&own).await.unwrap();
        assert_eq!(addrs(&ns, "flannel.1"), ["10.244.1.0/32"]);
        assert_eq!(addrs(&ns, "cni0"), ["10.244.1.1/24"]);
        let log = logs.text();
        assert!(
            log.contains("removed address 10.244.9.0/32 from flannel.1"),
            "{log}"
        );
        assert!(
            log.contains("removed address 10.244.9.1/24 from cni0"),
            "{log}"
        );
        backend.configure(&own).await.unwrap();
        assert_eq!(addrs(&ns, "flannel.1"), ["10.244.1.0/32"]);

        // A peer: neighbour, FDB entry, onlink route. Applying twice is fine.
        let b = vxlan_lease("10.244.2.0/24", NODE_B, "02:00:00:00:00:b1");
        backend.apply(&added(&b)).await.unwrap();
        backend.apply(&added(&b)).await.unwrap();
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            ["10.244.2.0 lladdr 02:00:00:00:00:b1 PERMANENT"]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            ["02:00:00:00:00:b1 dst 198.18.0.12 permanent"]
        );
        assert_eq!(
            routes_to(&ns, "10.244.2.0/24"),
            ["10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink proto 87"]
        );

        let c = vxlan_lease("10.244.3.0/24", "198.18.0.13", "02:00:00:00:00:c1");
        backend.apply(&added(&c)).await.unwrap();
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink proto 87"]
        );

        // The peer's VtepMAC changes: new neighbour and FDB entry, the old one is gone.
        let b2 = vxlan_lease("10.244.2.0/24", NODE_B, "02:00:00:00:00:b2");
        backend.apply(&added(&b2)).await.unwrap();
        let n = neighbours(&ns, "flannel.1");
        assert!(
            n.contains(&"10.244.2.0 lladdr 02:00:00:00:00:b2 PERMANENT".to_string()),
            "{n:?}"
        );
        let f = fdb(&ns, "flannel.1");
        assert!(
            f.contains(&"02:00:00:00:00:b2 dst 198.18.0.12 permanent".to_string()),
            "{f:?}"
        );
        assert!(
            !f.iter().any(|e| e.starts_with("02:00:00:00:00:b1")),
            "{f:?}"
        );

        // Our own lease, a host-gw lease and a vxlan lease without VtepMAC are skipped.
        backend.apply(&added(&own)).await.unwrap();
        backend
            .apply(&added(&hostgw_lease("10.244.4.0/24", "198.18.0.14")))
            .await
            .unwrap();
        let mut no_mac = vxlan_lease("10.244.5.0/24", "198.18.0.15", "02:00:00:00:00:e1");
        no_mac.attrs.backend_data = Some(serde_json::json!({"VNI": 1}));
        backend.apply(&added(&no_mac)).await.unwrap();
        for dst in [OWN, "10.244.4.0/24", "10.244.5.0/24"] {
            assert!(
                routes_to(&ns, dst).iter().all(|r| !r.contains("flannel.1")),
                "{dst}: {:?}",
                routes_to(&ns, dst)
            );
        }
        let log = logs.text();
        assert!(log.contains("ignoring the lease 10.244.4.0-24 (node 198.18.0.14): its BackendType is \"host-gw\""), "{log}");
        assert!(
            log.contains("ignoring the lease 10.244.5.0-24 (node 198.18.0.15): its BackendData has no valid VtepMAC"),
            "{log}"
        );

        // Removal removes all three entries; removing twice is fine.
        backend
            .apply(&LeaseEvent::Removed(net("10.244.2.0/24")))
            .await
            .unwrap();
        backend
            .apply(&LeaseEvent::Removed(net("10.244.2.0/24")))
            .await
            .unwrap();
        assert!(routes_to(&ns, "10.244.2.0/24").is_empty());
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            ["10.244.3.0 lladdr 02:00:00:00:00:c1 PERMANENT"]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            ["02:00:00:00:00:c1 dst 198.18.0.13 permanent"]
        );

        // A removal after a restart (nothing remembered) still finds the MAC.
        let mut restarted = vxlan_backend(&handle, vxlan_conf()).await;
        restarted.register(None).await.unwrap();
        restarted.configure(&own).await.unwrap();
        restarted
            .apply(&LeaseEvent::Removed(net("10.244.3.0/24")))
            .await
            .unwrap();
        assert!(routes_to(&ns, "10.244.3.0/24").is_empty());
        assert!(neighbours(&ns, "flannel.1").is_empty());
        assert!(fdb(&ns, "flannel.1").is_empty());
    });
}

#[test]
fn vxlan_resync_repairs_drift() {
    let mut lab = Lab::new("vxsync");
    let (a, _b) = lab.two_nodes();
    let ns = a.clone();
    in_netns(&a, move |handle, _| async move {
        let mut backend = vxlan_backend(&handle, vxlan_conf()).await;
        let attrs = backend.register(None).await.unwrap();
        let vtep_mac = vtep_mac_of(&attrs);
        backend
            .configure(&Lease {
                subnet: net(OWN),
                attrs,
            })
            .await
            .unwrap();
        let b = vxlan_lease("10.244.2.0/24", NODE_B, "02:00:00:00:00:b1");
        let c = vxlan_lease("10.244.3.0/24", "198.18.0.13", "02:00:00:00:00:c1");
        backend.apply(&added(&b)).await.unwrap();

        // Someone deletes flannel.1: resync recreates it with the same MAC and address and
        // programs every listed lease.
        ip(&ns, "link del flannel.1");
        assert!(!link_exists(&ns, "flannel.1"));
        backend.resync(&[b.clone(), c.clone()]).await.unwrap();
        let dev = link(&ns, "flannel.1");
        assert_eq!(dev["address"], vtep_mac.as_str());
        assert_eq!(dev["mtu"], 1450);
        assert_eq!(addrs(&ns, "flannel.1"), ["10.244.1.0/32"]);
        assert_eq!(
            routes_to(&ns, "10.244.2.0/24"),
            ["10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink proto 87"]
        );
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink proto 87"]
        );
        let mut n = neighbours(&ns, "flannel.1");
        n.sort();
        assert_eq!(
            n,
            [
                "10.244.2.0 lladdr 02:00:00:00:00:b1 PERMANENT",
                "10.244.3.0 lladdr 02:00:00:00:00:c1 PERMANENT"
            ]
        );
        let mut f = fdb(&ns, "flannel.1");
        f.sort();
        assert_eq!(
            f,
            [
                "02:00:00:00:00:b1 dst 198.18.0.12 permanent",
                "02:00:00:00:00:c1 dst 198.18.0.13 permanent"
            ]
        );

        // Entries deleted by hand come back; entries of leases not listed (and weft's
        // leftovers) go; routes outside the network are not weft's and stay.
        ip(&ns, "route del 10.244.3.0/24");
        ip(&ns, "neigh del 10.244.3.0 dev flannel.1");
        ip(
            &ns,
            "route add 10.244.7.0/24 via 10.244.7.0 dev flannel.1 onlink proto 87",
        );
        ip(
            &ns,
            "neigh add 10.244.7.0 lladdr 02:00:00:00:00:71 dev flannel.1 nud permanent",
        );
        run(
            "bridge",
            &[
                "-n",
                &ns,
                "fdb",
                "add",
                "02:00:00:00:00:71",
                "dev",
                "flannel.1",
                "dst",
                "198.18.0.17",
                "self",
                "permanent",
            ],
        );
        ip(
            &ns,
            "route add 203.0.113.0/24 via 10.244.3.0 dev flannel.1 onlink",
        );
        ip(
            &ns,
            "route add 10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink metric 50 proto 87",
        );
        backend.resync(std::slice::from_ref(&c)).await.unwrap();
        backend.resync(std::slice::from_ref(&c)).await.unwrap();
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink proto 87"]
        );
        assert!(routes_to(&ns, "10.244.2.0/24").is_empty());
        assert!(routes_to(&ns, "10.244.7.0/24").is_empty());
        assert_eq!(
            routes_to(&ns, "203.0.113.0/24"),
            ["203.0.113.0/24 via 10.244.3.0 dev flannel.1 onlink"]
        );
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            ["10.244.3.0 lladdr 02:00:00:00:00:c1 PERMANENT"]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            ["02:00:00:00:00:c1 dst 198.18.0.13 permanent"]
        );

        // An empty table removes everything but the device and its address.
        backend.resync(&[]).await.unwrap();
        assert!(routes_to(&ns, "10.244.3.0/24").is_empty());
        assert!(neighbours(&ns, "flannel.1").is_empty());
        assert!(fdb(&ns, "flannel.1").is_empty());
        assert_eq!(addrs(&ns, "flannel.1"), ["10.244.1.0/32"]);
    });
}

#[test]
fn vxlan_direct_routing_uses_the_underlay_for_peers_on_the_same_l2() {
    let mut lab = Lab::new("vxdirect");
    let (a, _b) = lab.two_nodes();
    let ns = a.clone();
    // A peer behind a router: its route has a gateway.
    ip(&a, "route add 198.51.100.0/24 via 198.18.0.12 dev eth0");
    in_netns(&a, move |handle, _| async move {
        let mut backend = vxlan_backend(
            &handle,
            VxlanConf {
                direct_routing: true,
                ..vxlan_conf()
            },
        )
        .await;
        let attrs = backend.register(None).await.unwrap();
        backend
            .configure(&Lease {
                subnet: net(OWN),
                attrs,
            })
            .await
            .unwrap();
        let near = vxlan_lease("10.244.2.0/24", NODE_B, "02:00:00:00:00:b1");
        let far = vxlan_lease("10.244.3.0/24", "198.51.100.4", "02:00:00:00:00:d1");
        for event in [added(&near), added(&far), added(&near)] {
            backend.apply(&event).await.unwrap();
        }
        assert_eq!(
            routes_to(&ns, "10.244.2.0/24"),
            ["10.244.2.0/24 via 198.18.0.12 dev eth0 proto 87"]
        );
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink proto 87"]
        );
        assert_eq!(
            neighbours(&ns, "flannel.1"),
            ["10.244.3.0 lladdr 02:00:00:00:00:d1 PERMANENT"]
        );
        assert_eq!(
            fdb(&ns, "flannel.1"),
            ["02:00:00:00:00:d1 dst 198.51.100.4 permanent"]
        );

        // A stale direct route of weft's inside the network goes at resync; the listed
        // ones stay.
        ip(
            &ns,
            "route add 10.244.8.0/24 via 198.18.0.18 dev eth0 proto 87",
        );
        backend.resync(&[near.clone(), far.clone()]).await.unwrap();
        assert!(routes_to(&ns, "10.244.8.0/24").is_empty());
        assert_eq!(
            routes_to(&ns, "10.244.2.0/24"),
            ["10.244.2.0/24 via 198.18.0.12 dev eth0 proto 87"]
        );

        backend
            .apply(&LeaseEvent::Removed(near.subnet))
            .await
            .unwrap();
        assert!(routes_to(&ns, "10.244.2.0/24").is_empty());
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink proto 87"]
        );
    });
}

/// Sets up node `ns` (own lease `own`) with `make_backend` and programs `peer`; returns
/// the lease attributes it published.
fn run_node<F, Fut>(ns: &str, own: &'static str, peer: Option<Lease>, make_backend: F) -> LeaseAttrs
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Dataplane>,
{
    in_netns(ns, move |handle, _| async move {
        let mut backend = make_backend(handle).await;
        let attrs = backend.register(None).await.unwrap();
        backend
            .configure(&Lease {
                subnet: net(own),
                attrs: attrs.clone(),
            })
            .await
            .unwrap();
        if let Some(peer) = peer {
            backend.apply(&added(&peer)).await.unwrap();
        }
        attrs
    })
}

/// `ping` from `pod` to `dst`: true if any reply came back (3 probes, 2 s each at most).
fn ping(pod: &str, dst: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", pod, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst,
        ])
        .status()
        .unwrap()
        .success()
}

#[test]
fn vxlan_carries_pod_traffic_between_nodes() {
    let mut lab = Lab::new("vxping");
    let (a, b) = lab.two_nodes();
    let pod_a = lab.pod("pa", &a, OWN);
    let pod_b = lab.pod("pb", &b, "10.244.2.0/24");
    let make =
        |handle: rtnetlink::Handle| async move { vxlan_backend(&handle, vxlan_conf()).await };

    let attrs_a = run_node(&a, OWN, None, make);
    let lease_a = Lease {
        subnet: net(OWN),
        attrs: attrs_a,
    };
    let attrs_b = run_node(&b, "10.244.2.0/24", Some(lease_a), make);
    let lease_b = Lease {
        subnet: net("10.244.2.0/24"),
        attrs: attrs_b,
    };
    assert!(
        !ping(&pod_a, "10.244.2.2"),
        "no route to B's pods yet: the ping must fail"
    );
    run_node(&a, OWN, Some(lease_b), make);

    assert!(
        ping(&pod_a, "10.244.2.2"),
        "pod A cannot reach pod B across flannel.1"
    );
    assert!(
        ping(&pod_b, "10.244.1.2"),
        "pod B cannot reach pod A across flannel.1"
    );
    for ns in [&a, &b] {
        let stats = ip_json(ns, "-s link show dev flannel.1");
        let sent = stats[0]["stats64"]["tx"]["packets"].as_u64().unwrap();
        assert!(
            sent >= 3,
            "{ns}: the pings did not go through flannel.1: {stats}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// host-gw

async fn hostgw_backend(handle: &rtnetlink::Handle) -> Dataplane {
    let ext = eth0(handle).await;
    let backend = HostGwBackend::new(net(NETWORK), ext.clone(), handle.clone());
    let plan = PlanConfig::new(net(NETWORK), BackendConf::HostGw, &ext);
    Dataplane::new(Box::new(backend), plan, &ext, handle.clone())
}

#[test]
fn hostgw_routes_follow_the_leases() {
    let mut lab = Lab::new("hgw");
    let (a, _b) = lab.two_nodes();
    let ns = a.clone();
    ip(&a, "route add 198.51.100.0/24 via 198.18.0.12 dev eth0");
    in_netns(&a, move |handle, logs| async move {
        let mut backend = hostgw_backend(&handle).await;
        let attrs = backend.register(None).await.unwrap();
        assert_eq!(attrs, hostgw_lease(OWN, NODE_A).attrs);
        assert_eq!(backend.pod_mtu(), 1500);

        ip(&ns, "link add cni0 type bridge");
        ip(&ns, "addr add 10.244.9.1/24 dev cni0");
        ip(&ns, "addr add 10.244.1.1/24 dev cni0");
        backend
            .configure(&Lease {
                subnet: net(OWN),
                attrs,
            })
            .await
            .unwrap();
        assert_eq!(addrs(&ns, "cni0"), ["10.244.1.1/24"]);
        assert!(
            logs.text()
                .contains("removed address 10.244.9.1/24 from cni0"),
            "{}",
            logs.text()
        );

        // A peer's route; applying twice is fine.
        let b = hostgw_lease("10.244.2.0/24", NODE_B);
        backend.apply(&added(&b)).await.unwrap();
        backend.apply(&added(&b)).await.unwrap();
        assert_eq!(
            routes_to(&ns, "10.244.2.0/24"),
            ["10.244.2.0/24 via 198.18.0.12 dev eth0 proto 87"]
        );

        // weft's own routes to a peer's subnet that differ are replaced; another
        // component's route to it is left alone and the error names it.
        ip(
            &ns,
            "route add 10.244.3.0/24 via 198.18.0.14 dev eth0 proto 87",
        );
        ip(
            &ns,
            "route add 10.244.3.0/24 via 198.18.0.15 dev eth0 metric 100 proto 87",
        );
        backend
            .apply(&added(&hostgw_lease("10.244.3.0/24", "198.18.0.13")))
            .await
            .unwrap();
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 198.18.0.13 dev eth0 proto 87"]
        );
        ip(
            &ns,
            "route add 10.244.7.0/24 via 198.18.0.17 dev eth0 proto static",
        );
        let err = backend
            .apply(&added(&hostgw_lease("10.244.7.0/24", "198.18.0.13")))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("another component's route to 10.244.7.0/24 is in place"),
            "{err:#}"
        );
        assert_eq!(
            routes_to(&ns, "10.244.7.0/24"),
            ["10.244.7.0/24 via 198.18.0.17 dev eth0 proto static"]
        );
        backend
            .apply(&LeaseEvent::Removed(net("10.244.7.0/24")))
            .await
            .unwrap();
        assert_eq!(routes_to(&ns, "10.244.7.0/24").len(), 1);

        // A peer not on our L2 segment is ignored with a warning naming it; so is a vxlan lease.
        backend
            .apply(&added(&hostgw_lease("10.244.4.0/24", "198.51.100.4")))
            .await
            .unwrap();
        assert!(routes_to(&ns, "10.244.4.0/24").is_empty());
        let log = logs.text();
        assert!(
            log.contains("ignoring the lease 10.244.4.0-24 (node 198.51.100.4): node 198.51.100.4 is not on the same L2 segment as eth0"),
            "{log}"
        );
        backend
            .apply(&added(&vxlan_lease(
                "10.244.5.0/24",
                "198.18.0.15",
                "02:00:00:00:00:e1",
            )))
            .await
            .unwrap();
        assert!(routes_to(&ns, "10.244.5.0/24").is_empty());
        assert!(logs.text().contains(
            "ignoring the lease 10.244.5.0-24 (node 198.18.0.15): its BackendType is \"vxlan\""
        ));

        // Removal, twice.
        backend.apply(&LeaseEvent::Removed(b.subnet)).await.unwrap();
        backend.apply(&LeaseEvent::Removed(b.subnet)).await.unwrap();
        assert!(routes_to(&ns, "10.244.2.0/24").is_empty());

        // Resync: a deleted route comes back; a stale route of weft's goes; routes weft did
        // not add (another protocol, no gateway, outside the network) stay.
        ip(&ns, "route del 10.244.3.0/24");
        ip(
            &ns,
            "route add 10.244.8.0/24 via 198.18.0.18 dev eth0 proto 87",
        );
        ip(&ns, "route add 10.244.9.0/24 via 198.18.0.19 dev eth0");
        ip(&ns, "route add 10.244.6.0/24 dev eth0");
        ip(&ns, "route add 203.0.113.0/24 via 198.18.0.19 dev eth0");
        let c = hostgw_lease("10.244.3.0/24", "198.18.0.13");
        backend.resync(std::slice::from_ref(&c)).await.unwrap();
        backend.resync(std::slice::from_ref(&c)).await.unwrap();
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 198.18.0.13 dev eth0 proto 87"]
        );
        assert!(routes_to(&ns, "10.244.8.0/24").is_empty());
        assert_eq!(
            routes_to(&ns, "10.244.9.0/24"),
            ["10.244.9.0/24 via 198.18.0.19 dev eth0"]
        );
        assert_eq!(routes_to(&ns, "10.244.6.0/24"), ["10.244.6.0/24 dev eth0"]);
        assert_eq!(
            routes_to(&ns, "203.0.113.0/24"),
            ["203.0.113.0/24 via 198.18.0.19 dev eth0"]
        );

        // A peer the kernel cannot have (another component routes its subnet) does not keep
        // the others from being programmed, and the error names it.
        ip(&ns, "route del 10.244.3.0/24");
        let seven = hostgw_lease("10.244.7.0/24", "198.18.0.16");
        let err = backend.resync(&[seven, c]).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("another component's route to 10.244.7.0/24 is in place"),
            "{err:#}"
        );
        assert_eq!(
            routes_to(&ns, "10.244.3.0/24"),
            ["10.244.3.0/24 via 198.18.0.13 dev eth0 proto 87"]
        );

        // host-gw cannot publish an address other than the interface's.
        let mut ext = eth0(&handle).await;
        ext.public_ip = "203.0.113.5".parse().unwrap();
        let err = HostGwBackend::new(net(NETWORK), ext, handle.clone())
            .register(None)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("--public-ip 203.0.113.5 differs from the address 198.18.0.11 of eth0"),
            "{err}"
        );
    });
}

#[test]
fn hostgw_carries_pod_traffic_between_nodes() {
    let mut lab = Lab::new("hgwping");
    let (a, b) = lab.two_nodes();
    let pod_a = lab.pod("pa", &a, OWN);
    let pod_b = lab.pod("pb", &b, "10.244.2.0/24");
    let make = |handle: rtnetlink::Handle| async move { hostgw_backend(&handle).await };

    run_node(&a, OWN, Some(hostgw_lease("10.244.2.0/24", NODE_B)), make);
    assert!(
        !ping(&pod_a, "10.244.2.2"),
        "B has no route back yet: the ping must fail"
    );
    run_node(&b, "10.244.2.0/24", Some(hostgw_lease(OWN, NODE_A)), make);
    assert!(
        ping(&pod_a, "10.244.2.2"),
        "pod A cannot reach pod B over host-gw routes"
    );
    assert!(
        ping(&pod_b, "10.244.1.2"),
        "pod B cannot reach pod A over host-gw routes"
    );
}

#[test]
fn blackhole_route_for_the_own_lease_comes_and_goes() {
    let mut lab = Lab::new("blackhole");
    let (a, _b) = lab.two_nodes();
    let ns = a.clone();
    in_netns(&a, move |handle, _| async move {
        let own: Ipv4Network = "10.244.5.0/24".parse().unwrap();
        let blackholes = || {
            let routes: serde_json::Value =
                serde_json::from_str(&ip(&ns, "-j route show type blackhole")).unwrap();
            routes
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["dst"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert!(blackholes().is_empty());
        weft::backend::netlink::ensure_blackhole_route(&handle, own)
            .await
            .unwrap();
        weft::backend::netlink::ensure_blackhole_route(&handle, own)
            .await
            .unwrap();
        assert_eq!(blackholes(), vec!["10.244.5.0/24"]);
        weft::backend::netlink::delete_blackhole_route(&handle, own)
            .await
            .unwrap();
        weft::backend::netlink::delete_blackhole_route(&handle, own)
            .await
            .unwrap();
        assert!(blackholes().is_empty());
    });
}
