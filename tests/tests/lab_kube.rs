//! End to end in kube mode (`--kube-subnet-mgr`): the whole lab against the Kubernetes API
//! server emulator (`weft-apiserver` in the fabric namespace), each agent with its own
//! service-account token and deploy/weft.yml's RBAC rules, each node's lease its Node's
//! podCIDR, published as flannel's annotations. Checked as a user would: pings, the Node
//! objects, the API server's request log, the kernel's entries and the BPF maps; and a
//! node still on flanneld (plain kernel config, flanneld's annotations) as a peer.
//! Needs root and the binaries (`cargo build -p weft --bins -p weft-tests`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_tests::apiserver::{RequestRecord, Rule};
use weft_tests::bpf::read_leases;
use weft_tests::kube_lab::{
    flannel_annotations, node_condition, node_object, weft_rbac_rules, BACKEND_DATA, BACKEND_TYPE,
    KUBE_SUBNET_MANAGER, PUBLIC_IP,
};
use weft_tests::lab::first_pod_on;
use weft_tests::plain_flannel::VXLAN_DEVICE;
use weft_tests::{
    wait_until, Backend, Dataplane, Flood, KubeLabConfig, Lab, LabConfig, Lease, PlainFlannelNode,
    Pod, SubnetManager,
};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;
/// How long after the pods are attached every pod pair must ping.
const CONVERGENCE: Duration = Duration::from_secs(15);
/// How long a change of a Node may take to reach every other node's dataplane.
const PROPAGATION: Duration = Duration::from_secs(10);
/// How long a node may take to attach its programs and learn its pods and leases.
const BPF_SYNC: Duration = Duration::from_secs(20);
/// What weft's agent may ask the API server for (deploy/weft.yml, API_CALLS).
const ALLOWED_CALLS: [(&str, &str); 5] = [
    ("get", "nodes"),
    ("list", "nodes"),
    ("watch", "nodes"),
    ("patch", "nodes/status"),
    ("get", "pods"),
];

fn kube_config(dataplane: Dataplane) -> LabConfig {
    LabConfig {
        nodes: NODES,
        backend: Backend::Vxlan,
        ip_masq: true,
        dataplane,
        subnet_manager: SubnetManager::Kube,
        ..Default::default()
    }
}

fn start_lab(config: LabConfig) -> Lab {
    let started = Instant::now();
    let what = format!(
        "kube-mode lab of {} nodes ({:?})",
        config.nodes, config.dataplane
    );
    let lab = Lab::start(config).unwrap_or_else(|e| panic!("the {what} does not start: {e:#}"));
    eprintln!("{what}: agents ready in {:?}", started.elapsed());
    lab
}

/// A kube-mode lab with pods on every node, every pair pinging (and, with BPF, every
/// node's maps complete).
fn converged_lab(config: LabConfig) -> (Lab, Vec<Pod>) {
    let dataplane = config.dataplane;
    let mut lab = start_lab(config);
    let pods = lab.add_pods(PODS_PER_NODE).expect("pods are attached");
    lab.assert_all_pairs_ping(&pods, "fresh lab", CONVERGENCE);
    if dataplane == Dataplane::Bpf {
        for node in 1..=lab.node_count() {
            lab.wait_bpf_synced(node, BPF_SYNC)
                .unwrap_or_else(|e| panic!("node {node}: {e:#}"));
        }
    }
    (lab, pods)
}

fn requests(lab: &Lab) -> Vec<RequestRecord> {
    lab.api()
        .and_then(|api| api.requests())
        .expect("the API server's request log")
}

fn user_of(lab: &Lab, node: usize) -> String {
    lab.kube_user(node).expect("the node's user")
}

fn patch_node(lab: &Lab, name: &str, patch: Value) {
    lab.api()
        .and_then(|api| api.patch_node(name, &patch))
        .unwrap_or_else(|e| panic!("patching Node {name}: {e:#}"));
}

/// Which of `lease`'s entries node `node`'s dataplane holds, as (what, present): the
/// route, neighbour and FDB entry on the kernel path; the `leases` map entry with BPF.
fn peer_entries(
    lab: &Lab,
    node: usize,
    lease: &Lease,
) -> anyhow::Result<Vec<(&'static str, bool)>> {
    if lab.node(node).dataplane == Dataplane::Bpf {
        let leases = read_leases(lab.bpf_dir(node))?;
        return Ok(vec![(
            "BPF leases map entry",
            leases.contains_key(&(lease.subnet, lease.prefix_len)),
        )]);
    }
    let ns = lab.node_ns(node);
    let cidr = lease.cidr();
    let routes = lab.ip_json(ns, &["route"])?;
    let route = routes
        .iter()
        .any(|r| r["dst"].as_str() == Some(cidr.as_str()));
    let subnet = lease.subnet.to_string();
    let neighbours = lab.ip_json(ns, &["neigh", "show", "dev", VXLAN_DEVICE])?;
    let neighbour = neighbours
        .iter()
        .any(|n| n["dst"].as_str() == Some(subnet.as_str()));
    let mac = lease.vtep_mac.as_deref().unwrap_or_default();
    let fdb = lab.bridge_json(ns, &["fdb", "show", "dev", VXLAN_DEVICE])?;
    let has_fdb = fdb.iter().any(|entry| {
        entry["mac"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case(mac))
    });
    Ok(vec![
        ("route", route),
        ("neighbour", neighbour),
        ("fdb", has_fdb),
    ])
}

/// Waits until every node in `nodes` holds all (`present`) or none (`!present`) of
/// `lease`'s entries; returns how long it took.
fn wait_peer_entries(
    lab: &Lab,
    nodes: &[usize],
    lease: &Lease,
    present: bool,
    what: &str,
) -> Duration {
    let started = Instant::now();
    for &node in nodes {
        wait_until(
            &format!("node {node} to {what} the entries of {}", lease.cidr()),
            PROPAGATION.saturating_sub(started.elapsed()),
            || {
                Ok(peer_entries(lab, node, lease)?
                    .iter()
                    .all(|e| e.1 == present))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}: {:?}", peer_entries(lab, node, lease)));
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------------
// 1. The whole lab in kube mode: pods ping; every Node carries flannel's annotations and
// condition, written by the node's own agent with a strategic-merge patch of nodes/status.

fn kube_mode_pods_ping_and_nodes_carry_flannels_annotations(dataplane: Dataplane) {
    let (lab, _pods) = converged_lab(kube_config(dataplane));
    let expected_keys: BTreeSet<&str> =
        BTreeSet::from([KUBE_SUBNET_MANAGER, BACKEND_TYPE, BACKEND_DATA, PUBLIC_IP]);
    for index in 1..=NODES {
        let name = lab.node(index).name.clone();
        // The condition follows the annotations (set once the agent's watch sees its node).
        wait_until(
            &format!("Node {name} to say NetworkUnavailable=False (FlannelIsUp)"),
            PROPAGATION,
            || {
                let node = lab.kube_node(index)?;
                Ok(
                    node_condition(&node, "NetworkUnavailable").is_some_and(|c| {
                        c.status == "False" && c.reason.as_deref() == Some("FlannelIsUp")
                    }),
                )
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: {:?}",
                lab.kube_node(index).ok().and_then(|n| n.status)
            )
        });
        let node = lab.kube_node(index).expect("the Node");
        let annotations = flannel_annotations(&node);
        let keys: BTreeSet<&str> = annotations.keys().map(String::as_str).collect();
        assert_eq!(
            keys, expected_keys,
            "flannel annotation keys of Node {name}"
        );
        let mac = lab
            .link_mac(lab.node_ns(index), VXLAN_DEVICE)
            .expect("flannel.1's MAC");
        assert_eq!(annotations[KUBE_SUBNET_MANAGER], "true", "Node {name}");
        assert_eq!(annotations[BACKEND_TYPE], "vxlan", "Node {name}");
        // Byte for byte what flanneld's json.Marshal writes, with flannel.1's MAC.
        assert_eq!(
            annotations[BACKEND_DATA],
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            "backend-data of Node {name}"
        );
        assert_eq!(
            annotations[PUBLIC_IP],
            lab.node_ip(index).to_string(),
            "public-ip of Node {name}"
        );
        // The lease is the podCIDR the controller-manager assigned.
        let pod_cidr = lab.assigned_pod_cidr(index).expect("podCIDR");
        assert_eq!(
            node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()),
            Some(pod_cidr.as_str())
        );
        let subnet = lab.subnet_env(index).expect("subnet.env")["FLANNEL_SUBNET"].clone();
        assert_eq!(
            subnet,
            pod_cidr.replace(".0/24", ".1/24"),
            "FLANNEL_SUBNET of node {index} is not its podCIDR's first address"
        );
    }

    let log = requests(&lab);
    let agent_users: BTreeMap<String, usize> = (1..=NODES).map(|i| (user_of(&lab, i), i)).collect();
    for index in 1..=NODES {
        let user = user_of(&lab, index);
        let name = &lab.node(index).name;
        let writes: Vec<&RequestRecord> = log
            .iter()
            .filter(|r| {
                r.name.as_deref() == Some(name.as_str())
                    && !matches!(r.verb.as_str(), "get" | "list" | "watch")
            })
            .collect();
        assert!(!writes.is_empty(), "nothing wrote Node {name}: {log:#?}");
        for write in &writes {
            assert_eq!(
                write.user.as_deref(),
                Some(user.as_str()),
                "a write of Node {name} by another user: {write:?}"
            );
            assert!(
                write.method == "PATCH"
                    && write.is("patch", "nodes/status")
                    && write.path == format!("/api/v1/nodes/{name}/status")
                    && write
                        .content_type
                        .as_deref()
                        .is_some_and(|t| t.starts_with("application/strategic-merge-patch+json"))
                    && write.code == 200,
                "node {index}'s agent wrote its Node other than by a strategic-merge PATCH of nodes/status: {write:?}"
            );
        }
        eprintln!(
            "node {index}: {} strategic-merge patches of nodes/{name}/status by {user}",
            writes.len()
        );
    }
    for record in log
        .iter()
        .filter(|r| r.user.as_ref().is_some_and(|u| agent_users.contains_key(u)))
    {
        assert!(
            ALLOWED_CALLS.iter().any(|&(v, r)| record.is(v, r)) && record.code < 400,
            "an agent request outside deploy/weft.yml's rules, or refused: {record:?}"
        );
    }
    assert!(
        log.iter().all(|r| r.user.is_some()),
        "unauthenticated requests: {:?}",
        log.iter().filter(|r| r.user.is_none()).collect::<Vec<_>>()
    );
}

#[test]
fn kube_kernel_pods_ping_and_nodes_carry_flannels_annotations() {
    kube_mode_pods_ping_and_nodes_carry_flannels_annotations(Dataplane::Kernel);
}

#[test]
fn kube_bpf_pods_ping_and_nodes_carry_flannels_annotations() {
    kube_mode_pods_ping_and_nodes_carry_flannels_annotations(Dataplane::Bpf);
}

// ---------------------------------------------------------------------------------------
// 2. A Node that loses its annotations, or is deleted, leaves every other dataplane.

fn removed_node_leaves_every_dataplane(dataplane: Dataplane) {
    let (mut lab, pods) = converged_lab(kube_config(dataplane));
    let leaving = NODES;
    let name = lab.node(leaving).name.clone();
    let others: Vec<usize> = (1..NODES).collect();
    let lease = lab.lease_of(leaving).expect("the leaving node's lease");
    wait_peer_entries(&lab, &others, &lease, true, "program");

    // Its agent stops (else it re-publishes at once), then its annotations go.
    lab.stop_agent(leaving);
    let stripped = json!({"metadata": {"annotations": {
        KUBE_SUBNET_MANAGER: null, BACKEND_TYPE: null, BACKEND_DATA: null, PUBLIC_IP: null,
    }}});
    patch_node(&lab, &name, stripped);
    let took = wait_peer_entries(&lab, &others, &lease, false, "drop");
    eprintln!("annotations removed: entries gone from every node in {took:?}");

    // Its agent comes back and publishes again: a peer again, its pods reachable.
    lab.start_agent(leaving).expect("the agent restarts");
    let again = lab.lease_of(leaving).expect("the re-published lease");
    assert_eq!(again.vtep_mac, lease.vtep_mac, "the VtepMAC changed");
    wait_peer_entries(&lab, &others, &again, true, "program again");
    lab.assert_all_pairs_ping(&pods, "after the node's annotations came back", CONVERGENCE);

    // The Node is deleted.
    lab.stop_agent(leaving);
    lab.api()
        .and_then(|api| api.delete_node(&name))
        .expect("deleting the Node");
    let took = wait_peer_entries(&lab, &others, &lease, false, "drop");
    eprintln!("Node deleted: entries gone from every node in {took:?}");
    let remaining: Vec<&Pod> = pods.iter().filter(|p| p.node != leaving).collect();
    let remaining: Vec<Pod> = remaining.into_iter().cloned().collect();
    lab.assert_all_pairs_ping(&remaining, "after the Node's deletion", CONVERGENCE);
}

#[test]
fn kube_kernel_removed_node_leaves_every_dataplane() {
    removed_node_leaves_every_dataplane(Dataplane::Kernel);
}

#[test]
fn kube_bpf_removed_node_leaves_every_dataplane() {
    removed_node_leaves_every_dataplane(Dataplane::Bpf);
}

// ---------------------------------------------------------------------------------------
// 3. A node without podCIDR, and a node whose service account may not patch nodes/status:
// their agents stop with an error that says what to fix; the cluster carries on.

#[test]
fn kube_missing_pod_cidr_and_missing_rbac_stop_the_agent_with_the_fix() {
    let no_cidr = NODES + 1;
    let no_patch = NODES + 2;
    let rules_without_patch: Vec<Rule> = weft_rbac_rules()
        .expect("deploy/weft.yml's rules")
        .into_iter()
        .filter(|r| !r.resources.iter().any(|res| res == "nodes/status"))
        .collect();
    let config = LabConfig {
        kube: KubeLabConfig {
            node_rules: BTreeMap::from([(no_patch, rules_without_patch)]),
            without_pod_cidr: BTreeSet::from([no_cidr]),
        },
        ..kube_config(Dataplane::Kernel)
    };
    let (mut lab, pods) = converged_lab(config);
    assert_eq!(lab.add_node().expect("node without podCIDR"), no_cidr);
    assert_eq!(
        lab.add_node().expect("node without the patch right"),
        no_patch
    );
    for node in [no_cidr, no_patch] {
        lab.spawn_agent(node).expect("the agent starts");
    }

    let status = lab
        .wait_agent_exit(no_cidr, Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "the agent without podCIDR keeps running: {e:#}\n{}",
                lab.agent_log_tail(no_cidr, 20)
            )
        });
    let log = lab.agent_log_tail(no_cidr, 30);
    assert!(
        !status.success(),
        "the agent without podCIDR exited {status}:\n{log}"
    );
    let name = lab.node(no_cidr).name.clone();
    for needle in [
        format!("node \"{name}\" has no podCIDR"),
        "--allocate-node-cidrs=true".to_string(),
        "--cluster-cidr=10.244.0.0/16".to_string(),
    ] {
        assert!(log.contains(&needle), "the error lacks {needle:?}:\n{log}");
    }

    let status = lab
        .wait_agent_exit(no_patch, Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "the agent without RBAC keeps running: {e:#}\n{}",
                lab.agent_log_tail(no_patch, 20)
            )
        });
    let log = lab.agent_log_tail(no_patch, 30);
    assert!(
        !status.success(),
        "the agent without RBAC exited {status}:\n{log}"
    );
    for needle in [
        "may not patch nodes/status",
        "ClusterRole",
        "deploy/weft.yml",
    ] {
        assert!(log.contains(needle), "the error lacks {needle:?}:\n{log}");
    }
    let user = user_of(&lab, no_patch);
    let refused: Vec<RequestRecord> = requests(&lab)
        .into_iter()
        .filter(|r| r.user.as_deref() == Some(user.as_str()) && r.code == 403)
        .collect();
    assert!(
        !refused.is_empty() && refused.iter().all(|r| r.is("patch", "nodes/status")),
        "the API server refused {user} other than its patch of nodes/status: {refused:?}"
    );

    // Neither published a lease; the others are untouched.
    let leases = lab.leases().expect("leases");
    assert_eq!(leases.len(), NODES, "leases: {leases:#?}");
    lab.assert_all_pairs_ping(&pods, "after the failed agents", CONVERGENCE);
}

// ---------------------------------------------------------------------------------------
// 4. The API server goes away for a while: traffic flows on, no peer is removed; when it is
// back, a new node's lease is picked up. A compacted history makes the agents re-list.

#[test]
fn kube_api_outage_keeps_the_dataplane_and_a_new_node_joins_after() {
    let (mut lab, pods) = converged_lab(kube_config(Dataplane::Kernel));
    let leases = lab.leases().expect("leases");
    let node_ips: Vec<Ipv4Addr> = (1..=NODES).map(|n| lab.node_ip(n)).collect();
    let peers_of = |node: usize| -> Vec<&Lease> {
        leases
            .iter()
            .filter(|l| l.public_ip != node_ips[node - 1])
            .collect()
    };
    let all_entries = |lab: &Lab| -> Vec<String> {
        let mut missing = Vec::new();
        for node in 1..=NODES {
            for lease in peers_of(node) {
                match peer_entries(lab, node, lease) {
                    Ok(entries) => missing.extend(
                        entries
                            .iter()
                            .filter(|e| !e.1)
                            .map(|e| format!("node {node}: {} of {}", e.0, lease.cidr())),
                    ),
                    Err(e) => missing.push(format!("node {node}: {e:#}")),
                }
            }
        }
        missing
    };
    assert_eq!(all_entries(&lab), Vec::<String>::new(), "before the outage");

    // Floods across all three nodes, 50 ms apart, for 12 s: the outage lies inside.
    let flows = [(1, 2), (2, 3), (3, 1)];
    let floods: Vec<(String, Flood)> = flows
        .iter()
        .map(|&(a, b)| {
            let (from, to) = (first_pod_on(&pods, a), first_pod_on(&pods, b));
            let what = format!("{} -> {}", from.name, to.name);
            (
                what,
                Flood::start(&from.ns, to.ip, 240, Duration::from_millis(50)),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let api = lab.api().expect("the API").clone();
    api.stop_listening().expect("stop listening");
    let outage = Instant::now();
    // From a node, the API server's address now refuses connections.
    let connect = weft_tests::icmp::in_netns(lab.node_ns(1), || {
        let api: std::net::SocketAddr = weft_tests::kube_lab::API_LISTEN.parse()?;
        Ok(std::net::TcpStream::connect_timeout(&api, Duration::from_secs(2)).is_ok())
    });
    assert!(
        !connect.expect("connect from node 1"),
        "the API server still accepts connections"
    );
    // Long enough for every agent's watch to fail and back off a few times.
    let mut checks = 0;
    while outage.elapsed() < Duration::from_secs(6) {
        let missing = all_entries(&lab);
        assert!(
            missing.is_empty(),
            "entries removed during the outage ({:?} in): {missing:?}",
            outage.elapsed()
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    for node in 1..=NODES {
        assert!(
            lab.agent_running(node),
            "node {node}'s agent exited during the outage:\n{}",
            lab.agent_log_tail(node, 20)
        );
    }
    api.clear_requests().expect("clear the request log");
    api.start_listening().expect("start listening");
    eprintln!(
        "API server unreachable for {:?} ({checks} checks of every entry)",
        outage.elapsed()
    );
    for (what, flood) in floods {
        let report = flood.wait().expect("flood");
        eprintln!("{what}: {report}");
        assert_eq!(
            report.lost(),
            0,
            "{what} lost packets while the API server was away: {report}"
        );
        assert_eq!(report.replies, 240, "{what}: {report}");
    }
    assert_eq!(all_entries(&lab), Vec::<String>::new(), "after the outage");

    // Every agent watches again (kube-rs backs off up to 30 s).
    for node in 1..=NODES {
        let user = user_of(&lab, node);
        wait_until(
            &format!("node {node}'s agent to list or watch the nodes again"),
            Duration::from_secs(40),
            || {
                Ok(api.requests()?.iter().any(|r| {
                    r.user.as_deref() == Some(user.as_str())
                        && (r.is("watch", "nodes") || r.is("list", "nodes"))
                        && r.code == 200
                }))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(node, 20)));
    }

    // A node that joins now is a peer of all.
    let new_node = lab.add_node().expect("a 4th node");
    let spawned = Instant::now();
    lab.start_agent(new_node).expect("the new agent gets ready");
    let new_pod = lab.add_pod(new_node).expect("a pod on the new node");
    let new_lease = lab.lease_of(new_node).expect("the new node's lease");
    wait_peer_entries(&lab, &[1, 2, 3], &new_lease, true, "program");
    let mut everyone = pods.clone();
    everyone.push(new_pod);
    lab.assert_all_pairs_ping(
        &everyone,
        "with the node that joined after the outage",
        CONVERGENCE,
    );
    eprintln!(
        "new node reachable {:?} after its agent's spawn",
        spawned.elapsed()
    );
}

/// A Node no agent runs on, annotated as flanneld annotates (its host does not exist:
/// only its entries in the dataplanes matter).
fn ghost_node(
    name: &str,
    ip: Ipv4Addr,
    pod_cidr: &str,
    mac: &str,
) -> k8s_openapi::api::core::v1::Node {
    let mut node = node_object(name, ip, Some(pod_cidr)).expect("Node");
    node.metadata.annotations = Some(
        serde_json::from_value(weft_tests::kube_lab::flanneld_vxlan_annotations(ip, 1, mac))
            .expect("annotations"),
    );
    node
}

/// Waits until each agent has made a successful `verb nodes` request (since the request
/// log was last cleared).
fn wait_each_agent_requests(lab: &Lab, verb: &str, timeout: Duration) {
    let api = lab.api().expect("the API");
    for node in 1..=NODES {
        let user = user_of(lab, node);
        wait_until(
            &format!("node {node}'s agent to {verb} the nodes"),
            timeout,
            || {
                Ok(api.requests()?.iter().any(|r| {
                    r.user.as_deref() == Some(user.as_str()) && r.is(verb, "nodes") && r.code == 200
                }))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: {:#?}\n{}",
                api.requests(),
                lab.agent_log_tail(node, 20)
            )
        });
    }
}

/// The value of `key` in a URL query string.
fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn kube_compacted_history_makes_the_agents_relist_and_converge() {
    let (lab, pods) = converged_lab(kube_config(Dataplane::Kernel));
    let api = lab.api().expect("the API").clone();
    let nodes: Vec<usize> = (1..=NODES).collect();

    // A Node appears while no agent can watch (every connection closed), then the history
    // is compacted: resuming a watch from the last version an agent saw answers 410 Gone,
    // and only a new list shows the ghost.
    api.stop_listening().expect("stop listening");
    let ghost = ghost_node(
        "ghost",
        Ipv4Addr::new(198, 18, 0, 99),
        "10.244.200.0/24",
        "0e:00:5e:aa:bb:cc",
    );
    api.create_node(&ghost).expect("the ghost Node");
    let compacted_at = api.resource_version().expect("resourceVersion");
    api.compact().expect("compact");
    api.clear_requests().expect("clear");
    api.start_listening().expect("start listening");
    wait_each_agent_requests(&lab, "list", Duration::from_secs(40));
    // Each re-list followed a watch that asked for a version the history had lost.
    let log = api.requests().expect("request log");
    for node in 1..=NODES {
        let user = user_of(&lab, node);
        let mine: Vec<&RequestRecord> = log
            .iter()
            .filter(|r| r.user.as_deref() == Some(user.as_str()))
            .collect();
        let first_list = mine.iter().position(|r| r.is("list", "nodes"));
        let stale_watch = mine.iter().position(|r| {
            r.is("watch", "nodes")
                && query_value(&r.query, "resourceVersion")
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v < compacted_at)
        });
        assert!(
            stale_watch.is_some() && stale_watch < first_list,
            "node {node}'s agent did not re-list after a watch from a compacted version: {mine:#?}"
        );
    }
    let lease = lab
        .leases()
        .expect("leases")
        .into_iter()
        .find(|l| l.key == "ghost")
        .expect("the ghost's lease");
    let took = wait_peer_entries(&lab, &nodes, &lease, true, "program");
    eprintln!(
        "history compacted at {compacted_at}: re-listed, the ghost is everywhere in {took:?}"
    );

    // Compacted again and every watch closed: the agents watch again and follow changes.
    api.clear_requests().expect("clear");
    api.compact().expect("compact");
    api.close_watches().expect("close watches");
    wait_each_agent_requests(&lab, "watch", Duration::from_secs(40));
    api.delete_node("ghost").expect("delete the ghost");
    wait_peer_entries(&lab, &nodes, &lease, false, "drop");
    lab.assert_all_pairs_ping(&pods, "after the re-lists", CONVERGENCE);
}

// ---------------------------------------------------------------------------------------
// 5. An agent restart keeps the VtepMAC, read back from the Node's annotation.

#[test]
fn kube_agent_restart_keeps_the_vtep_mac_from_the_annotation() {
    let (mut lab, pods) = converged_lab(kube_config(Dataplane::Kernel));
    let node = 2;
    let ns = lab.node_ns(node).to_string();
    let published = lab.lease_of(node).expect("lease");
    let mac = published.vtep_mac.clone().expect("a VtepMAC");
    assert_eq!(lab.link_mac(&ns, VXLAN_DEVICE).expect("flannel.1"), mac);

    lab.kill_agent(node);
    // Without flannel.1 (as after a reboot), only the annotation remembers the MAC.
    weft_tests::exec::ip(&ns, &format!("link del {VXLAN_DEVICE}")).expect("delete flannel.1");
    let took = lab.start_agent(node).expect("the agent restarts");
    eprintln!("agent restarted and ready in {took:?}");

    assert_eq!(
        lab.link_mac(&ns, VXLAN_DEVICE).expect("the new flannel.1"),
        mac,
        "flannel.1 came back with another MAC than the annotation's VtepMAC"
    );
    let after = lab.lease_of(node).expect("lease after the restart");
    assert_eq!(after, published, "the published lease changed");
    lab.assert_all_pairs_ping(&pods, "after the restart", CONVERGENCE);
}

// ---------------------------------------------------------------------------------------
// 6. Migration: a node still on flanneld (its kernel set up and its Node annotated exactly as
// flanneld does) and weft nodes are peers both ways; weft's annotations are flannel's; and
// weft then takes over that node without changing what its peers know.

/// The JSON "shape" of a value: objects by key, scalars by type.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

#[test]
fn kube_flanneld_node_and_weft_nodes_are_peers_and_weft_takes_it_over() {
    let mut lab = start_lab(LabConfig {
        nodes: 2,
        ..kube_config(Dataplane::Kernel)
    });
    let mut pods = lab.add_pods(PODS_PER_NODE).expect("pods on the weft nodes");
    let flannel_node = lab.add_node().expect("a node on flanneld");
    let flannel_mac = "0e:00:5e:fa:fa:03";
    let pod_cidr = lab.assigned_pod_cidr(flannel_node).expect("podCIDR");
    let subnet: Ipv4Addr = pod_cidr.trim_end_matches("/24").parse().expect("subnet");
    let flannel = PlainFlannelNode::setup(&mut lab, flannel_node, subnet, flannel_mac)
        .expect("the flanneld-style node is configured and annotated");
    // As flanneld would: entries for every peer its node watch shows (weft's annotations).
    assert_eq!(
        flannel.sync(&lab).expect("sync"),
        2,
        "weft leases seen by the flanneld node"
    );
    for _ in 0..PODS_PER_NODE {
        pods.push(flannel.add_pod(&mut lab).expect("pod on the flanneld node"));
    }
    lab.assert_all_pairs_ping(&pods, "weft and flanneld nodes", CONVERGENCE);
    let packet = lab
        .capture_vxlan(first_pod_on(&pods, 1), first_pod_on(&pods, flannel_node))
        .expect("VXLAN to the flanneld node");
    assert_eq!((packet.vni, packet.udp_dst_port), (1, 8472));
    assert_eq!(packet.inner_dst_mac, flannel_mac);

    // weft's annotations have flanneld's keys and JSON shapes.
    let flanneld = flannel_annotations(&lab.kube_node(flannel_node).expect("Node"));
    for weft_node in 1..=2 {
        let weft = flannel_annotations(&lab.kube_node(weft_node).expect("Node"));
        assert_eq!(
            weft.keys().collect::<Vec<_>>(),
            flanneld.keys().collect::<Vec<_>>(),
            "annotation keys of weft's node {weft_node} vs flanneld's"
        );
        for (key, value) in &weft {
            let theirs = &flanneld[key];
            let parse = |text: &str| {
                serde_json::from_str::<Value>(text).unwrap_or(Value::String(text.into()))
            };
            assert_eq!(
                shape(&parse(value)),
                shape(&parse(theirs)),
                "{key}: weft wrote {value:?}, flanneld writes {theirs:?}"
            );
        }
        assert_eq!(weft[KUBE_SUBNET_MANAGER], flanneld[KUBE_SUBNET_MANAGER]);
        assert_eq!(weft[BACKEND_TYPE], flanneld[BACKEND_TYPE]);
        assert!(weft[PUBLIC_IP].parse::<Ipv4Addr>().is_ok(), "{weft:?}");
        let condition = |index: usize| {
            let node = lab.kube_node(index).expect("Node");
            node_condition(&node, "NetworkUnavailable")
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        wait_until("weft's NetworkUnavailable condition", PROPAGATION, || {
            Ok(condition(weft_node) == condition(flannel_node))
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: weft {:?}, flanneld {:?}",
                condition(weft_node),
                condition(flannel_node)
            )
        });
    }

    // Migration of the node itself: weft replaces "flanneld" there, keeps its VtepMAC and
    // podCIDR, so the peers' entries stay valid.
    let before = lab.lease_of(flannel_node).expect("the flanneld lease");
    lab.start_agent(flannel_node)
        .expect("weft starts on the former flanneld node");
    assert_eq!(
        lab.link_mac(lab.node_ns(flannel_node), VXLAN_DEVICE)
            .expect("flannel.1"),
        flannel_mac,
        "weft changed the VtepMAC flanneld had published"
    );
    assert_eq!(
        lab.lease_of(flannel_node).expect("lease"),
        before,
        "the published lease changed"
    );
    lab.assert_all_pairs_ping(&pods, "after weft took over the flanneld node", CONVERGENCE);
}
