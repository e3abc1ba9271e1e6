//! The CNI plugin, installed as `flannel` next to the real reference plugins, run the way a
//! container runtime runs it: inside a "node" network namespace, wiring "pod" namespaces
//! to the node's cni0 bridge. Needs root. Everything lives in per-test namespaces.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Once};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::{json, Value};

const PREFIX: &str = "wt-cni-";
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const HOST_LOCAL_STATE: &str = "/var/lib/cni/networks";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 1);
const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a command to completion with `stdin`, killing it (by its PID) after a timeout.
fn run_bounded(command: &mut Command, stdin: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
    let pid = child.id();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match finished.recv_timeout(COMMAND_TIMEOUT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // Not reaped yet (its waiter is still blocked), so the PID is still our child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{command:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// Runs a command that must succeed; returns its stdout.
fn sh(args: &[&str]) -> String {
    let output = run_bounded(Command::new(args[0]).args(&args[1..]), "");
    assert!(
        output.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn ip_json(args: &[&str]) -> Value {
    let mut full = vec!["ip", "-j"];
    full.extend_from_slice(args);
    serde_json::from_str(&sh(&full)).unwrap()
}

/// Runs `work` on a new thread that has joined network namespace `ns`. Sockets it creates
/// stay in that namespace after the thread ends.
fn in_netns<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
        let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            joined,
            0,
            "setns {path}: {}",
            std::io::Error::last_os_error()
        );
        work()
    })
    .join()
    .unwrap()
}

/// A TCP round trip from namespace `client_ns` to `server` (an address in `server_ns`),
/// as a ping would do (there is no ping binary here). Returns the source the server saw.
fn tcp_round_trip(client_ns: &str, server_ns: &str, server: Ipv4Addr) -> Ipv4Addr {
    let timeout = Duration::from_secs(5);
    let listener = in_netns(server_ns, move || TcpListener::bind((server, 0))).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = in_netns(client_ns, move || {
        TcpStream::connect_timeout(&(server, port).into(), timeout)
    })
    .unwrap_or_else(|e| panic!("{client_ns} cannot reach {server}:{port}: {e}"));
    // Connected, so the connection already waits in the listener's queue.
    let (mut accepted, peer) = listener.accept().unwrap();
    for stream in [&client, &accepted] {
        stream.set_read_timeout(Some(timeout)).unwrap();
    }
    let mut buf = [0u8; 4];
    client.write_all(b"ping").unwrap();
    accepted.read_exact(&mut buf).unwrap();
    accepted.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    match peer.ip() {
        IpAddr::V4(source) => source,
        other => panic!("IPv6 peer {other}"),
    }
}

/// Removes namespaces and host-local state left by earlier test processes that died.
fn sweep_leftovers() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let dead = |name: &str| {
            let pid = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next());
            pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists())
        };
        for line in sh(&["ip", "netns", "list"]).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if dead(name) {
                let _ = run_bounded(Command::new("ip").args(["netns", "del", name]), "");
            }
        }
        for entry in std::fs::read_dir(HOST_LOCAL_STATE)
            .into_iter()
            .flatten()
            .flatten()
        {
            if dead(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// The result of one plugin run.
struct PluginRun {
    success: bool,
    stdout: String,
    stderr: String,
}

impl PluginRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for PluginRun {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "success={} stdout={} stderr={}",
            self.success, self.stdout, self.stderr
        )
    }
}

/// A node namespace with pod namespaces, a CNI bin dir holding the plugin as `flannel`,
/// and a unique network name (host-local keeps its state per network name on the shared
/// filesystem). Drop removes all of it.
struct Lab {
    network: String,
    node: String,
    pods: Vec<String>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(pod_count: usize) -> Lab {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        sweep_leftovers();
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            node: format!("{tag}-node"),
            pods: (0..pod_count).map(|i| format!("{tag}-pod{i}")).collect(),
            network: tag,
            dir: tempfile::tempdir().unwrap(),
        };
        for ns in std::iter::once(&lab.node).chain(&lab.pods) {
            sh(&["ip", "netns", "add", ns]);
        }
        let bin = lab.bin_dir();
        std::fs::create_dir(&bin).unwrap();
        // A link, not a copy: a copy's write descriptor can leak into a child another test
        // thread forks at that moment, and exec then fails with "Text file busy".
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weft-cni"), bin.join("flannel")).unwrap();
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            std::os::unix::fs::symlink(Path::new(REFERENCE_PLUGINS).join(plugin), bin.join(plugin))
                .unwrap();
        }
        lab
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("run/flannel/subnet.env")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("var/lib/cni/flannel")
    }

    fn records_dir(&self) -> PathBuf {
        self.dir.path().join("var/lib/cni/weft")
    }

    /// The pod record ADD wrote for the agent (`<network>-<containerID>-eth0`).
    fn record(&self, pod: usize) -> PathBuf {
        let name = format!("{}-{}-eth0", self.network, self.container_id(pod));
        self.records_dir().join(name)
    }

    fn write_subnet_env(&self) {
        std::fs::create_dir_all(self.subnet_file().parent().unwrap()).unwrap();
        std::fs::write(self.subnet_file(), SUBNET_ENV).unwrap();
    }

    fn container_id(&self, pod: usize) -> String {
        format!("{}{pod}", self.network.replace('-', ""))
    }

    /// flannel's 10-flannel.conflist entry, as libcni passes it (with name and cniVersion).
    fn conf(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "name": self.network,
            "type": "flannel",
            "delegate": { "hairpinMode": true, "isDefaultGateway": true },
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
            "recordsDir": self.records_dir(),
        })
    }

    /// Runs the installed `flannel` plugin in the node namespace for pod `pod`.
    fn plugin(&self, command: &str, pod: usize, conf: &Value) -> PluginRun {
        let output = run_bounded(
            Command::new("ip")
                .args(["netns", "exec", &self.node])
                .arg(self.bin_dir().join("flannel"))
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", self.container_id(pod))
                .env("CNI_NETNS", format!("/var/run/netns/{}", self.pods[pod]))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", self.bin_dir())
                .env_remove("CNI_ARGS"),
            &conf.to_string(),
        );
        PluginRun {
            success: output.status.success(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn node_veths(&self) -> Vec<Value> {
        ip_json(&["-n", &self.node, "-d", "link", "show", "type", "veth"])
            .as_array()
            .unwrap()
            .clone()
    }

    fn pod_has_eth0(&self, pod: usize) -> bool {
        run_bounded(
            Command::new("ip").args(["-n", &self.pods[pod], "link", "show", "eth0"]),
            "",
        )
        .status
        .success()
    }

    fn host_local_reservation(&self, ip: Ipv4Addr) -> PathBuf {
        Path::new(HOST_LOCAL_STATE)
            .join(&self.network)
            .join(ip.to_string())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.node).chain(&self.pods) {
            let _ = run_bounded(Command::new("ip").args(["netns", "del", ns]), "");
        }
        let _ = std::fs::remove_dir_all(Path::new(HOST_LOCAL_STATE).join(&self.network));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The pod address of an ADD result (0.3.x and 1.0.0 results both list `ips`).
fn result_address(result: &Value) -> Ipv4Network {
    let ips = result["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("no ips in {result}"));
    assert_eq!(ips.len(), 1, "{result}");
    assert_eq!(ips[0]["gateway"], GATEWAY.to_string(), "{result}");
    ips[0]["address"].as_str().unwrap().parse().unwrap()
}

/// ADD, what the pod and the node see, CHECK, DEL twice: flannel's conflist unchanged.
fn lifecycle(cni_version: &str, pod_count: usize) {
    let lab = Lab::new(pod_count);
    lab.write_subnet_env();
    let conf = lab.conf(cni_version);
    let subnet: Ipv4Network = "10.244.7.0/24".parse().unwrap();

    let mut results = Vec::new();
    for pod in 0..pod_count {
        let add = lab.plugin("ADD", pod, &conf);
        assert!(add.success, "ADD: {add}");
        let result = add.json();
        assert_eq!(result["cniVersion"], cni_version, "{result}");
        let address = result_address(&result);
        assert!(
            subnet.contains(address.ip()) && address.ip() != GATEWAY,
            "{address}"
        );
        assert_eq!(address.prefix(), 24);

        let pod_ns = lab.pods[pod].as_str();
        let eth0 = &ip_json(&["-n", pod_ns, "addr", "show", "dev", "eth0"])[0];
        assert_eq!(eth0["mtu"], 1450, "FLANNEL_MTU: {eth0}");
        let addresses: Vec<_> = eth0["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| {
                (
                    a["local"].as_str().unwrap().to_owned(),
                    a["prefixlen"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(addresses, [(address.ip().to_string(), 24)], "{eth0}");
        let routes = ip_json(&["-n", pod_ns, "route", "show"]);
        for dst in ["default", "10.244.0.0/16"] {
            let via_gateway = |r: &&Value| {
                r["dst"] == dst && r["gateway"] == GATEWAY.to_string() && r["dev"] == "eth0"
            };
            assert!(
                routes.as_array().unwrap().iter().any(|r| via_gateway(&r)),
                "no {dst} via {GATEWAY}: {routes}"
            );
        }
        let source = tcp_round_trip(pod_ns, &lab.node, GATEWAY);
        assert_eq!(
            source,
            address.ip(),
            "the pod reaches its gateway from its own address"
        );

        let stored = lab.data_dir().join(lab.container_id(pod));
        assert_eq!(mode(&stored), 0o600);
        assert_eq!(mode(&lab.data_dir()), 0o700);
        let stored: Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
        assert_eq!(
            stored,
            json!({
                "cniVersion": cni_version,
                "name": lab.network,
                "type": "bridge",
                "hairpinMode": true,
                "isDefaultGateway": true,
                "isGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": "10.244.7.0/24" }]],
                    "routes": [{ "dst": "10.244.0.0/16" }]
                }
            })
        );
        // The record names the pod's address, its MAC and the veth the bridge plugin made.
        assert_eq!(mode(&lab.record(pod)), 0o600);
        let record = weft::cni::record::parse(&std::fs::read(lab.record(pod)).unwrap())
            .unwrap_or_else(|why| panic!("the pod record {why}"));
        assert_eq!(record.container_id, lab.container_id(pod));
        assert_eq!(record.ips, [address.ip()]);
        let eth0_mac: weft::lease::MacAddr = eth0["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(record.pod_mac, Some(eth0_mac));
        let peer = ip_json(&["-n", pod_ns, "link", "show", "dev", "eth0"])[0]["link_index"].clone();
        let veth = lab
            .node_veths()
            .into_iter()
            .find(|v| v["ifindex"] == peer)
            .unwrap_or_else(|| panic!("no veth #{peer}"));
        assert!(
            record
                .host_ifaces
                .contains(veth["ifname"].as_str().unwrap()),
            "{record:?} {veth}"
        );
        let reservation =
            std::fs::read_to_string(lab.host_local_reservation(address.ip())).unwrap();
        assert!(
            reservation.starts_with(&lab.container_id(pod)),
            "{reservation}"
        );
        results.push((result, address));
    }

    let cni0 = &ip_json(&["-n", &lab.node, "addr", "show", "dev", "cni0"])[0];
    let gateway_addresses: Vec<_> = cni0["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .collect();
    assert_eq!(gateway_addresses.len(), 1, "{cni0}");
    assert_eq!(
        (
            &gateway_addresses[0]["local"],
            &gateway_addresses[0]["prefixlen"]
        ),
        (&json!("10.244.7.1"), &json!(24))
    );
    let veths = lab.node_veths();
    assert_eq!(veths.len(), pod_count, "{veths:?}");
    for veth in &veths {
        assert_eq!(
            (&veth["master"], &veth["mtu"]),
            (&json!("cni0"), &json!(1450)),
            "{veth}"
        );
        assert_eq!(
            veth["linkinfo"]["info_slave_data"]["hairpin"], true,
            "delegate hairpinMode: {veth}"
        );
    }
    if pod_count > 1 {
        let source = tcp_round_trip(&lab.pods[0], &lab.pods[1], results[1].1.ip());
        assert_eq!(
            source,
            results[0].1.ip(),
            "pod to pod across cni0, not masqueraded"
        );
    }

    for (pod, (result, _)) in results.iter().enumerate() {
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = result.clone();
        let check = lab.plugin("CHECK", pod, &check_conf);
        if matches!(cni_version, "0.3.0" | "0.3.1") {
            assert!(
                !check.success,
                "CHECK is not part of spec {cni_version}: {check}"
            );
            assert_eq!(check.json()["code"], 1, "{check}");
        } else {
            assert!(check.success, "CHECK: {check}");
            assert_eq!(check.stdout, "");
            // A pod that lost its route to the cluster network fails CHECK.
            sh(&["ip", "-n", &lab.pods[pod], "route", "del", "10.244.0.0/16"]);
            let broken = lab.plugin("CHECK", pod, &check_conf);
            assert!(!broken.success, "CHECK of a broken pod: {broken}");
            let msg = broken.json()["msg"].as_str().unwrap().to_owned();
            assert!(
                msg.starts_with("delegate plugin bridge failed on CHECK: ")
                    && msg.contains("10.244.0.0"),
                "{msg}"
            );
        }
    }

    for (pod, (_, address)) in results.iter().enumerate() {
        let del = lab.plugin("DEL", pod, &conf);
        assert!(del.success, "DEL: {del}");
        assert_eq!(del.stdout, "");
        assert!(
            !lab.data_dir().join(lab.container_id(pod)).exists(),
            "stored config removed"
        );
        assert!(!lab.record(pod).exists(), "pod record removed");
        assert!(!lab.pod_has_eth0(pod), "pod's eth0 removed");
        assert!(
            !lab.host_local_reservation(address.ip()).exists(),
            "address released"
        );
        let again = lab.plugin("DEL", pod, &conf);
        assert!(
            again.success && again.stdout.is_empty(),
            "second DEL: {again}"
        );
    }
    assert_eq!(lab.node_veths(), Vec::<Value>::new());
}

#[test]
fn flannel_conflist_lifecycle_with_cni_1_0_0_and_two_pods() {
    lifecycle("1.0.0", 2);
}

#[test]
fn flannel_conflist_lifecycle_with_cni_0_3_1() {
    lifecycle("0.3.1", 1);
}

#[test]
fn add_without_subnet_env_says_the_agent_is_not_running() {
    let lab = Lab::new(1);
    let add = lab.plugin("ADD", 0, &lab.conf("1.0.0"));
    assert!(!add.success, "{add}");
    let error = add.json();
    assert_eq!(error["code"], 11, "{error}");
    assert_eq!(
        error["msg"],
        format!(
            "{} does not exist: is the weft agent (or flanneld) running on this node? check its logs (kubectl -n weft logs -l app=weft --field-selector spec.nodeName=<this node>, or kubectl -n kube-flannel logs -l app=flannel for flanneld)",
            lab.subnet_file().display()
        )
    );
    assert!(!lab.data_dir().exists());
    assert!(!lab.pod_has_eth0(0));
    assert_eq!(lab.node_veths(), Vec::<Value>::new());
    let del = lab.plugin("DEL", 0, &lab.conf("1.0.0"));
    assert!(del.success, "DEL after a failed ADD: {del}");
}

#[test]
fn failing_delegate_is_reported_and_del_cleans_up() {
    let lab = Lab::new(1);
    lab.write_subnet_env();
    let mut conf = lab.conf("1.0.0");
    // Longer than IFNAMSIZ: the bridge plugin cannot create it.
    conf["delegate"]["bridge"] = json!("bridge-name-too-long");
    let add = lab.plugin("ADD", 0, &conf);
    assert!(!add.success, "{add}");
    let msg = add.json()["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.starts_with("delegate plugin bridge failed on ADD: "),
        "{msg}"
    );
    assert!(msg.contains("bridge-name-too-long"), "{msg}");
    let stored = lab.data_dir().join(lab.container_id(0));
    assert!(
        stored.exists(),
        "kept for the DEL that follows a failed ADD"
    );
    let del = lab.plugin("DEL", 0, &conf);
    assert!(del.success, "{del}");
    assert!(!stored.exists());
}

#[test]
fn version_answers_under_the_flannel_name() {
    let lab = Lab::new(0);
    let output = run_bounded(
        Command::new(lab.bin_dir().join("flannel")).env("CNI_COMMAND", "VERSION"),
        "",
    );
    assert!(output.status.success());
    let info: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        info,
        json!({ "cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] })
    );
    let unknown = run_bounded(
        Command::new(lab.bin_dir().join("flannel")).env("CNI_COMMAND", "STATUS"),
        "",
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        serde_json::from_slice::<Value>(&unknown.stdout).unwrap()["code"],
        4
    );
}
