//! The Kubernetes subnet manager against the API server emulator (weft_tests::apiserver):
//! real HTTPS, a real kube-rs client built from a kubeconfig, RBAC as kube-flannel.yml's.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseWatchEvent};
use weft::subnet::kube::{KubeOptions, KubeSubnetManager, API_CALLS, WATCH_RESTARTS};
use weft::subnet::SubnetManager;
use weft_tests::apiserver::{
    kubeconfig_file_name, Emulator, EmulatorConfig, Rule, User, FLANNEL_USER,
};

const P: &str = "flannel.alpha.coreos.com/";
const OWN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const OWN_MAC: &str = "de:ad:be:ef:00:01";
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

struct Cluster {
    emulator: Emulator,
    dir: tempfile::TempDir,
    net_conf: PathBuf,
}

impl Cluster {
    async fn start(users: Vec<User>) -> Cluster {
        // The manager's log, shown for failing tests.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let mut users = users;
        users.push(User::flannel("flannel-token"));
        let emulator = Emulator::start(EmulatorConfig {
            users,
            ..Default::default()
        })
        .await
        .expect("emulator");
        let dir = tempfile::tempdir().unwrap();
        emulator.write_files(dir.path()).unwrap();
        let net_conf = dir.path().join("net-conf.json");
        std::fs::write(
            &net_conf,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        Cluster {
            emulator,
            dir,
            net_conf,
        }
    }

    fn options(&self, node: &str, user: &str) -> KubeOptions {
        KubeOptions {
            node_name: Some(node.into()),
            kubeconfig: Some(self.dir.path().join(kubeconfig_file_name(user))),
            net_config_path: self.net_conf.clone(),
            ..Default::default()
        }
    }

    async fn connect(&self, node: &str) -> Result<KubeSubnetManager> {
        KubeSubnetManager::connect(self.options(node, FLANNEL_USER)).await
    }

    fn create(&self, node: Node) {
        self.emulator
            .create_node(&node)
            .unwrap_or_else(|s| panic!("creating a node: {s:?}"));
    }

    fn patch(&self, name: &str, merge_patch: Value) {
        self.emulator
            .patch_node(name, &merge_patch)
            .unwrap_or_else(|s| panic!("patching {name}: {s:?}"));
    }

    fn annotations(&self, name: &str) -> BTreeMap<String, String> {
        self.emulator
            .node(name)
            .and_then(|n| n.metadata.annotations)
            .unwrap_or_default()
    }

    fn network_unavailable(&self, name: &str) -> Option<(String, Option<String>)> {
        let node = self.emulator.node(name)?;
        node.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable")
            .map(|c| (c.status, c.reason))
    }
}

fn node(name: &str, pod_cidr: Option<&str>) -> Node {
    let mut value = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    });
    if let Some(cidr) = pod_cidr {
        value["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    }
    serde_json::from_value(value).unwrap()
}

/// A node as a running flanneld leaves it.
fn flannel_node(name: &str, pod_cidr: &str, public_ip: &str, mac: &str) -> Node {
    let mut n = node(name, Some(pod_cidr));
    n.metadata.annotations = Some(BTreeMap::from([
        (format!("{P}kube-subnet-manager"), "true".into()),
        (format!("{P}backend-type"), "vxlan".into()),
        (
            format!("{P}backend-data"),
            format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
        ),
        (format!("{P}public-ip"), public_ip.into()),
    ]));
    n
}

fn vxlan_attrs(ip: Ipv4Addr, mac: &str) -> LeaseAttrs {
    serde_json::from_value(json!({
        "PublicIP": ip, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}
    }))
    .unwrap()
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn spawn_watch(
    manager: KubeSubnetManager,
    own: Lease,
) -> (mpsc::Receiver<LeaseWatchEvent>, JoinHandle<Result<()>>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move { manager.watch_leases(own, tx).await });
    (rx, task)
}

async fn next_event(rx: &mut mpsc::Receiver<LeaseWatchEvent>) -> LeaseWatchEvent {
    tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .expect("no lease event within 30 s")
        .expect("the watch ended")
}

/// Connects as `own_node` (podCIDR 10.244.1.0/24), acquires and watches: the first
/// snapshot, the events that follow and the watch.
async fn watch_as(
    c: &Cluster,
    own_node: &str,
) -> (
    Vec<Lease>,
    mpsc::Receiver<LeaseWatchEvent>,
    JoinHandle<Result<()>>,
) {
    let manager = c.connect(own_node).await.unwrap();
    let own = manager
        .acquire_lease(&vxlan_attrs(OWN_IP, OWN_MAC))
        .await
        .unwrap();
    let (mut rx, watch) = spawn_watch(manager, own);
    let LeaseWatchEvent::Snapshot(first) = next_event(&mut rx).await else {
        panic!("the watch must start with a snapshot");
    };
    (first, rx, watch)
}

/// The next event, which must add or change a lease.
async fn next_added(rx: &mut mpsc::Receiver<LeaseWatchEvent>, what: &str) -> Lease {
    match next_event(rx).await {
        LeaseWatchEvent::Event(LeaseEvent::Added(l)) => l,
        other => panic!("expected {what}, got {other:?}"),
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < EVENT_TIMEOUT,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn subnets(leases: &[Lease]) -> Vec<Ipv4Network> {
    let mut all: Vec<Ipv4Network> = leases.iter().map(|l| l.subnet).collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_publishes_flannels_annotations_and_marks_the_network_up() {
    let c = Cluster::start(vec![]).await;
    let mut own = node("n1", Some("10.244.1.0/24"));
    own.status = Some(
        serde_json::from_value(json!({"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
        ]}))
        .unwrap(),
    );
    c.create(own);

    let manager = c.connect("n1").await.unwrap();
    assert_eq!(
        manager.network_config().await.unwrap().network,
        net("10.244.0.0/16")
    );
    assert_eq!(manager.previous_lease(OWN_IP).await.unwrap(), None);
    let attrs = vxlan_attrs(OWN_IP, OWN_MAC);
    let lease = manager.acquire_lease(&attrs).await.unwrap();
    assert_eq!(lease.subnet, net("10.244.1.0/24"));
    assert_eq!(lease.attrs, attrs);

    let annotations = c.annotations("n1");
    let published = |k: &str| annotations.get(&format!("{P}{k}")).map(String::as_str);
    assert_eq!(published("kube-subnet-manager"), Some("true"));
    assert_eq!(published("backend-type"), Some("vxlan"));
    assert_eq!(
        published("backend-data"),
        Some(r#"{"VNI":1,"VtepMAC":"de:ad:be:ef:00:01"}"#)
    );
    assert_eq!(published("public-ip"), Some("198.18.0.11"));
    let patches: Vec<_> = c
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.is("patch", "nodes/status"))
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].user.as_deref(), Some(FLANNEL_USER));
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    // The condition is flannel's CompleteLease: once the node is set up and watching.
    assert_eq!(
        c.network_unavailable("n1"),
        Some(("True".into(), Some("NoRouteCreated".into())))
    );
    let (mut rx, watch) = spawn_watch(manager, lease.clone());
    assert_eq!(next_event(&mut rx).await, LeaseWatchEvent::Snapshot(vec![]));
    wait_until("NetworkUnavailable=False", || {
        c.network_unavailable("n1") == Some(("False".into(), Some("FlannelIsUp".into())))
    })
    .await;
    watch.abort();

    // A restart reads the VtepMAC back and writes nothing when nothing changed.
    let restarted = c.connect("n1").await.unwrap();
    let previous = restarted.previous_lease(OWN_IP).await.unwrap().unwrap();
    assert_eq!(
        previous.attrs.vxlan().unwrap().vtep_mac.to_string(),
        OWN_MAC
    );
    c.emulator.clear_requests();
    assert_eq!(restarted.acquire_lease(&attrs).await.unwrap(), lease);
    let writes: Vec<_> = c
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_in_api_calls() {
    let c = Cluster::start(vec![]).await;
    c.create(node("n1", Some("10.244.1.0/24")));
    c.create(flannel_node(
        "n2",
        "10.244.2.0/24",
        "198.18.0.12",
        "de:ad:be:ef:00:02",
    ));
    let manager = c.connect("n1").await.unwrap();
    manager.previous_lease(OWN_IP).await.unwrap();
    let own = manager
        .acquire_lease(&vxlan_attrs(OWN_IP, OWN_MAC))
        .await
        .unwrap();
    let (mut rx, watch) = spawn_watch(manager, own);
    next_event(&mut rx).await;
    wait_until("the condition is set", || {
        c.network_unavailable("n1").is_some()
    })
    .await;
    wait_until("the watch is open", || c.emulator.watcher_count() > 0).await;
    watch.abort();

    // The pod lookup (POD_NAME, POD_NAMESPACE): the emulator stores no pods.
    std::env::remove_var("NODE_NAME");
    std::env::set_var("POD_NAME", "kube-flannel-ds-x1");
    std::env::set_var("POD_NAMESPACE", "kube-flannel");
    let options = KubeOptions {
        node_name: None,
        ..c.options("n1", FLANNEL_USER)
    };
    let e = format!(
        "{:#}",
        KubeSubnetManager::connect(options).await.err().unwrap()
    );
    assert!(
        e.contains("kube-flannel/kube-flannel-ds-x1") && e.contains("404"),
        "{e}"
    );

    let calls: Vec<(String, String)> = c
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.user.as_deref() == Some(FLANNEL_USER))
        .map(|r| (r.verb, r.resource))
        .collect();
    for (verb, resource) in &calls {
        assert!(
            API_CALLS.contains(&(verb.as_str(), resource.as_str())),
            "{verb} {resource} is not in API_CALLS"
        );
    }
    for call in API_CALLS {
        assert!(
            calls.iter().any(|(v, r)| (v.as_str(), r.as_str()) == *call),
            "{call:?} was never made: {calls:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nodes_become_leases_and_go_away() {
    let c = Cluster::start(vec![]).await;
    c.create(node("n1", Some("10.244.1.0/24")));
    c.create(flannel_node(
        "n2",
        "10.244.2.0/24",
        "198.18.0.12",
        "de:ad:be:ef:00:02",
    ));
    // A node no flannel-compatible agent runs on yet.
    c.create(node("n4", Some("10.244.4.0/24")));
    let (first, mut rx, watch) = watch_as(&c, "n1").await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].subnet, net("10.244.2.0/24"));
    assert_eq!(first[0].attrs.public_ip, Ipv4Addr::new(198, 18, 0, 12));
    assert_eq!(
        first[0].attrs.vxlan().unwrap().vtep_mac.to_string(),
        "de:ad:be:ef:00:02"
    );

    c.create(flannel_node(
        "n3",
        "10.244.3.0/24",
        "198.18.0.13",
        "de:ad:be:ef:00:03",
    ));
    let l = next_added(&mut rx, "n3 added").await;
    assert_eq!(
        (l.subnet, l.attrs.public_ip),
        (net("10.244.3.0/24"), Ipv4Addr::new(198, 18, 0, 13))
    );
    // Losing an annotation makes the node no peer.
    c.patch(
        "n3",
        json!({"metadata": {"annotations": {format!("{P}public-ip"): null}}}),
    );
    assert_eq!(
        next_event(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Removed(net("10.244.3.0/24")))
    );
    // Changes that do not touch the lease (the own node, labels) say nothing: the next
    // event is the overwrite's.
    c.patch("n1", json!({"metadata": {"labels": {"touched": "yes"}}}));
    c.patch("n2", json!({"metadata": {"labels": {"touched": "yes"}}}));
    c.patch(
        "n2",
        json!({"metadata": {"annotations": {format!("{P}public-ip-overwrite"): "203.0.113.2"}}}),
    );
    let l = next_added(&mut rx, "n2 changed").await;
    assert_eq!(
        (l.subnet, l.attrs.public_ip),
        (net("10.244.2.0/24"), Ipv4Addr::new(203, 0, 113, 2))
    );
    c.emulator.delete_node("n2").unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Removed(net("10.244.2.0/24")))
    );
    // An agent starting on n4 makes it a peer.
    c.patch(
        "n4",
        json!({"metadata": {"annotations": {
            format!("{P}kube-subnet-manager"): "true",
            format!("{P}backend-type"): "host-gw",
            format!("{P}backend-data"): "null",
            format!("{P}public-ip"): "198.18.0.14"
        }}}),
    );
    let l = next_added(&mut rx, "n4 added").await;
    assert_eq!(l.subnet, net("10.244.4.0/24"));
    assert_eq!(l.attrs.backend_type, "host-gw");
    assert_eq!(l.attrs.backend_data, None);
    watch.abort();
}

/// Waits until the clock is past the second `name` was created in (creationTimestamp has
/// one-second resolution), so that a node created next is younger.
async fn after_creation_second_of(c: &Cluster, name: &str) {
    let created = c.emulator.node(name).unwrap().metadata.creation_timestamp;
    let created = created.expect("the API server sets creationTimestamp").0;
    wait_until("the next second", || {
        k8s_openapi::jiff::Timestamp::now().as_second() > created.as_second()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_one_pod_cidr_yield_the_older_ones_lease() {
    let c = Cluster::start(vec![]).await;
    c.create(node("n1", Some("10.244.1.0/24")));
    // The older node's name sorts last, so a tie-break by name alone would pick the other.
    c.create(flannel_node(
        "zz-old",
        "10.244.2.0/24",
        "198.18.0.12",
        "de:ad:be:ef:00:12",
    ));
    after_creation_second_of(&c, "zz-old").await;
    c.create(flannel_node(
        "aa-new",
        "10.244.2.0/24",
        "198.18.0.22",
        "de:ad:be:ef:00:22",
    ));
    // A younger node claiming this node's own subnet is no peer at all.
    c.create(flannel_node(
        "aa-own",
        "10.244.1.0/24",
        "198.18.0.21",
        "de:ad:be:ef:00:21",
    ));
    let (first, mut rx, watch) = watch_as(&c, "n1").await;
    let got: Vec<(Ipv4Network, Ipv4Addr)> = first
        .iter()
        .map(|l| (l.subnet, l.attrs.public_ip))
        .collect();
    assert_eq!(got, [(net("10.244.2.0/24"), Ipv4Addr::new(198, 18, 0, 12))]);

    // The younger node changing its lease changes nothing; the older one leaving brings
    // the younger one's (changed) lease in.
    c.patch(
        "aa-new",
        json!({"metadata": {"annotations": {format!("{P}public-ip-overwrite"): "203.0.113.22"}}}),
    );
    c.emulator.delete_node("zz-old").unwrap();
    let l = next_added(&mut rx, "aa-new's lease").await;
    assert_eq!(
        (l.subnet, l.attrs.public_ip),
        (net("10.244.2.0/24"), Ipv4Addr::new(203, 0, 113, 22))
    );
    // Nothing else came in between: the next event is a new node's.
    c.create(flannel_node(
        "n3",
        "10.244.3.0/24",
        "198.18.0.13",
        "de:ad:be:ef:00:03",
    ));
    let l = next_added(&mut rx, "n3 added").await;
    assert_eq!(l.subnet, net("10.244.3.0/24"));
    c.emulator.delete_node("aa-new").unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Removed(net("10.244.2.0/24")))
    );
    watch.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cidr_problems_say_what_to_fix_and_publish_nothing() {
    let c = Cluster::start(vec![]).await;
    c.create(node("bare", None));
    c.create(node("elsewhere", Some("10.99.0.0/24")));
    let attrs = vxlan_attrs(OWN_IP, OWN_MAC);

    let e = c
        .connect("bare")
        .await
        .unwrap()
        .acquire_lease(&attrs)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "node \"bare\" has no podCIDR: the kube-controller-manager must allocate pod CIDRs (--allocate-node-cidrs=true --cluster-cidr=10.244.0.0/16)"
    );
    let e = c
        .connect("elsewhere")
        .await
        .unwrap()
        .acquire_lease(&attrs)
        .await
        .unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("10.99.0.0/24") && e.contains("10.244.0.0/16"),
        "{e}"
    );
    assert!(c.annotations("bare").is_empty() && c.annotations("elsewhere").is_empty());

    let e = c.connect("ghost").await.err().unwrap().to_string();
    assert!(
        e.contains("node \"ghost\" does not exist") && e.contains("NODE_NAME"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_refusals_name_the_missing_permission() {
    let no_patch = "system:serviceaccount:kube-flannel:no-patch";
    let no_get = "system:serviceaccount:kube-flannel:no-get";
    let c = Cluster::start(vec![
        User::new(
            no_patch,
            "no-patch-token",
            vec![Rule::new(&["get", "list", "watch"], &["nodes"])],
        ),
        User::new(
            no_get,
            "no-get-token",
            vec![Rule::new(&["list"], &["nodes"])],
        ),
    ])
    .await;
    c.create(node("n1", Some("10.244.1.0/24")));

    let manager = KubeSubnetManager::connect(c.options("n1", no_patch))
        .await
        .unwrap();
    let e = format!(
        "{:#}",
        manager
            .acquire_lease(&vxlan_attrs(OWN_IP, OWN_MAC))
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("the service account may not patch nodes/status (RBAC): add it to the ClusterRole (see deploy/weft.yml)"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        KubeSubnetManager::connect(c.options("n1", no_get))
            .await
            .err()
            .unwrap()
    );
    assert!(
        e.contains("the service account may not get nodes (RBAC)"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_keeps_the_table_and_the_watch_recovers() {
    let c = Cluster::start(vec![]).await;
    c.create(node("n1", Some("10.244.1.0/24")));
    c.create(flannel_node(
        "n2",
        "10.244.2.0/24",
        "198.18.0.12",
        "de:ad:be:ef:00:02",
    ));
    let (first, mut rx, watch) = watch_as(&c, "n1").await;
    assert_eq!(subnets(&first), [net("10.244.2.0/24")]);
    wait_until("the watch is open", || c.emulator.watcher_count() > 0).await;

    c.emulator.stop_listening().await;
    // Meanwhile n2 goes, n3 comes, and the history the watch would resume from is gone.
    c.emulator.delete_node("n2").unwrap();
    c.create(flannel_node(
        "n3",
        "10.244.3.0/24",
        "198.18.0.13",
        "de:ad:be:ef:00:03",
    ));
    c.emulator.compact();
    let restarts = WATCH_RESTARTS.load(Ordering::Relaxed);
    match tokio::time::timeout(Duration::from_secs(4), rx.recv()).await {
        Err(_) => {}
        Ok(event) => panic!("the API server is down, yet the watch sent {event:?}"),
    }

    c.emulator.start_listening().await.unwrap();
    let mut table: BTreeMap<Ipv4Network, Lease> =
        first.into_iter().map(|l| (l.subnet, l)).collect();
    let mut relisted = false;
    let start = std::time::Instant::now();
    while table.keys().copied().collect::<Vec<_>>() != [net("10.244.3.0/24")] {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no recovery: {table:?}"
        );
        match next_event(&mut rx).await {
            LeaseWatchEvent::Snapshot(all) => {
                relisted = true;
                table = all.into_iter().map(|l| (l.subnet, l)).collect();
            }
            LeaseWatchEvent::Event(LeaseEvent::Added(l)) => {
                table.insert(l.subnet, l);
            }
            LeaseWatchEvent::Event(LeaseEvent::Removed(s)) => {
                table.remove(&s);
            }
            LeaseWatchEvent::OwnLeaseRevoked => panic!("own lease revoked"),
        }
    }
    assert!(relisted, "the compacted history forces a re-list");
    assert!(WATCH_RESTARTS.load(Ordering::Relaxed) > restarts);
    assert!(!watch.is_finished());
    watch.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_an_unreachable_api_server() {
    let c = Cluster::start(vec![]).await;
    c.create(node("n1", Some("10.244.1.0/24")));
    c.emulator.stop_listening().await;
    let options = c.options("n1", FLANNEL_USER);
    let connecting = tokio::spawn(KubeSubnetManager::connect(options));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !connecting.is_finished(),
        "connect gave up while the API server was down"
    );
    c.emulator.start_listening().await.unwrap();
    let manager = tokio::time::timeout(Duration::from_secs(40), connecting)
        .await
        .expect("connect did not recover")
        .unwrap()
        .unwrap();
    assert_eq!(manager.node_name(), "n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_own_node_gets_its_annotations_back_or_revokes_the_lease() {
    let c = Cluster::start(vec![]).await;
    c.create(node("n1", Some("10.244.1.0/24")));
    let manager = c.connect("n1").await.unwrap();
    let own = manager
        .acquire_lease(&vxlan_attrs(OWN_IP, OWN_MAC))
        .await
        .unwrap();
    let (mut rx, watch) = spawn_watch(manager, own);
    next_event(&mut rx).await;

    // Re-registered with the same podCIDR: published again.
    c.emulator.delete_node("n1").unwrap();
    c.create(node("n1", Some("10.244.1.0/24")));
    wait_until("the annotations are back", || {
        c.annotations("n1")
            .get(&format!("{P}public-ip"))
            .map(String::as_str)
            == Some("198.18.0.11")
    })
    .await;
    wait_until("the condition is back", || {
        c.network_unavailable("n1") == Some(("False".into(), Some("FlannelIsUp".into())))
    })
    .await;

    // Re-registered with another podCIDR: this lease is gone.
    c.emulator.delete_node("n1").unwrap();
    c.create(node("n1", Some("10.244.9.0/24")));
    assert_eq!(next_event(&mut rx).await, LeaseWatchEvent::OwnLeaseRevoked);
    let ended = tokio::time::timeout(EVENT_TIMEOUT, watch)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_public_ip_annotation_picks_the_address() {
    let c = Cluster::start(vec![]).await;
    let mut n1 = node("n1", Some("10.244.1.0/24"));
    n1.metadata.annotations = Some(BTreeMap::from([(
        format!("{P}node-public-ip"),
        "198.18.0.21".to_string(),
    )]));
    c.create(n1);
    let manager = c.connect("n1").await.unwrap();
    assert_eq!(
        manager.node_public_ip(),
        Some(Ipv4Addr::new(198, 18, 0, 21))
    );
    let (selection, why) = manager.iface_selection(Default::default());
    assert_eq!(selection.iface, ["198.18.0.21"]);
    assert_eq!(selection.public_ip, Some(Ipv4Addr::new(198, 18, 0, 21)));
    assert!(why.unwrap().contains("node-public-ip"));
    // --public-ip wins.
    let flags = weft::iface::IfaceSelection {
        public_ip: Some(OWN_IP),
        ..Default::default()
    };
    let (selection, why) = manager.iface_selection(flags.clone());
    assert_eq!((selection, why), (flags, None));
}

/// A network namespace of this test, deleted on every exit path.
struct Netns(String);

impl Netns {
    fn new(role: &str) -> Netns {
        let name = format!("{}{role}", weft_tests::netns::unique_prefix());
        weft_tests::netns::add(&name).unwrap();
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = weft_tests::netns::delete(&self.0);
    }
}

/// The emulator served from inside a namespace (on its own thread and runtime), so that
/// an agent in that namespace reaches it at 127.0.0.1.
struct EmulatorIn {
    emulator: Option<std::sync::Arc<Emulator>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmulatorIn {
    fn start(ns: &str) -> EmulatorIn {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{ns}");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let netns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns {path}");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let emulator = Emulator::start(EmulatorConfig {
                    users: vec![User::flannel("flannel-token")],
                    ..Default::default()
                })
                .await
                .unwrap();
                started_tx.send(std::sync::Arc::new(emulator)).unwrap();
                let _ = stopped.await;
            });
        });
        let emulator = started_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the emulator did not start");
        EmulatorIn {
            emulator: Some(emulator),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn get(&self) -> &Emulator {
        self.emulator.as_ref().unwrap()
    }
}

impl Drop for EmulatorIn {
    fn drop(&mut self) {
        self.emulator.take();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn link_mac(ns: &str, dev: &str) -> Result<Option<String>> {
    let out = weft_tests::Cmd::new(["ip", "-j", "link", "show", "dev", dev])
        .netns(ns)
        .output()?;
    if !out.status.success() {
        return Ok(None);
    }
    let links: Value = serde_json::from_str(&out.stdout)?;
    Ok(links[0]["address"].as_str().map(str::to_string))
}

fn published_mac(emulator: &Emulator, node: &str) -> Option<String> {
    let data = emulator
        .node(node)?
        .metadata
        .annotations?
        .remove(&format!("{P}backend-data"))?;
    let data: Value = serde_json::from_str(&data).ok()?;
    data["VtepMAC"].as_str().map(str::to_string)
}

/// `weft agent --kube-subnet-mgr` itself, in a namespace: it takes its address from the
/// node-public-ip annotation, publishes the VtepMAC of flannel.1, routes to a flannel
/// peer, and a restart after losing flannel.1 brings back the same MAC.
#[test]
fn weft_agent_in_kube_mode_programs_peers_and_keeps_its_vtep_mac() {
    let ns = Netns::new("kube");
    let n = ns.0.as_str();
    let ip = |args: &str| weft_tests::exec::ip(n, args).unwrap();
    ip("link set lo up");
    ip("link add eth0 type veth peer name eth1");
    ip("addr add 198.18.0.11/24 dev eth0");
    ip("link set eth0 up");
    ip("link set eth1 up");

    let served = EmulatorIn::start(n);
    let emulator = served.get();
    let dir = tempfile::tempdir().unwrap();
    emulator.write_files(dir.path()).unwrap();
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(
        &net_conf,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let mut n1 = node("n1", Some("10.244.1.0/24"));
    // No default route and no --iface: the annotation chooses eth0.
    n1.metadata.annotations = Some(BTreeMap::from([(
        format!("{P}node-public-ip"),
        "198.18.0.11".to_string(),
    )]));
    emulator.create_node(&n1).unwrap();
    emulator
        .create_node(&flannel_node(
            "n2",
            "10.244.2.0/24",
            "198.18.0.12",
            "de:ad:be:ef:00:02",
        ))
        .unwrap();

    let subnet_env = dir.path().join("subnet.env");
    let args: Vec<String> = [
        env!("CARGO_BIN_EXE_weft"),
        "agent",
        "--kube-subnet-mgr",
        "--dataplane",
        "kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--kubeconfig-file".into(),
        dir.path()
            .join(kubeconfig_file_name(FLANNEL_USER))
            .display()
            .to_string(),
        "--net-config-path".into(),
        net_conf.display().to_string(),
        "--subnet-file".into(),
        subnet_env.display().to_string(),
        "--bpf-dir".into(),
        dir.path().join("bpf").display().to_string(),
    ])
    .collect();
    let env = [
        ("NODE_NAME".to_string(), "n1".to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    let log = dir.path().join("agent.log");
    let start_agent =
        || weft_tests::process::NetnsProcess::spawn("weft", n, &args, &env, &log).unwrap();
    let failed = |what: &str, e: anyhow::Error| -> ! {
        let routes = weft_tests::exec::ip(n, "route show").unwrap_or_default();
        panic!(
            "{what}: {e:#}\nroutes:\n{routes}\nagent log:\n{}",
            weft_tests::process::tail(&log, 40)
        )
    };
    let wait = |what: &str, condition: &mut dyn FnMut() -> Result<bool>| {
        if let Err(e) = weft_tests::wait_until(what, EVENT_TIMEOUT, condition) {
            failed(what, e);
        }
    };

    let mut agent = start_agent();
    wait("subnet.env", &mut || Ok(subnet_env.exists()));
    let env_text = std::fs::read_to_string(&subnet_env).unwrap();
    assert!(
        env_text.contains("FLANNEL_SUBNET=10.244.1.1/24"),
        "{env_text}"
    );
    let mac = link_mac(n, "flannel.1").unwrap().expect("flannel.1 exists");
    assert_eq!(published_mac(emulator, "n1").as_deref(), Some(mac.as_str()));
    let annotations = emulator.node("n1").unwrap().metadata.annotations.unwrap();
    assert_eq!(annotations[&format!("{P}public-ip")], "198.18.0.11");
    wait("the route to n2", &mut || {
        let route = weft_tests::exec::ip(n, "route show 10.244.2.0/24")?;
        Ok(route.contains("via 10.244.2.0 dev flannel.1") && route.contains("onlink"))
    });
    wait("NetworkUnavailable=False", &mut || {
        Ok(emulator
            .node("n1")
            .and_then(|n| n.status?.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
            }))
    });

    // Restart without flannel.1: the MAC comes back from the node's backend-data.
    agent.stop();
    ip("link del flannel.1");
    agent = start_agent();
    wait("flannel.1 again", &mut || {
        Ok(link_mac(n, "flannel.1")?.is_some())
    });
    assert_eq!(link_mac(n, "flannel.1").unwrap(), Some(mac.clone()));
    wait("the route to n2 again", &mut || {
        Ok(weft_tests::exec::ip(n, "route show 10.244.2.0/24")?.contains("flannel.1"))
    });

    // The peer's agent goes away (its annotations are removed): so does the route.
    emulator
        .patch_node(
            "n2",
            &json!({"metadata": {"annotations": {format!("{P}kube-subnet-manager"): null}}}),
        )
        .unwrap();
    wait("the route to n2 removed", &mut || {
        Ok(weft_tests::exec::ip(n, "route show 10.244.2.0/24")?
            .trim()
            .is_empty())
    });
    assert!(
        agent.exit_status().is_none(),
        "the agent exited:\n{}",
        weft_tests::process::tail(&log, 40)
    );
    agent.stop();
}
