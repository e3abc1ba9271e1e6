//! The Kubernetes API server emulator, driven by kube-rs exactly as weft's agent drives
//! a real apiserver: a client from a kubeconfig (HTTPS, CA, bearer token), `Api<Node>`
//! reads and patches, and kube-runtime's watcher. Runs in-process on 127.0.0.1 with an
//! ephemeral port (plus one test of the `weft-apiserver` process).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::json;
use weft_tests::apiserver::{
    client_from_kubeconfig, kubeconfig_file_name, ControlClient, Emulator, EmulatorConfig, Rule,
    User, ADMIN, CA_FILE, FLANNEL_USER,
};

/// Upper bound on waiting for any single event.
const EVENT_WAIT: Duration = Duration::from_secs(15);

fn node(name: &str, cidr: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".into(),
                name.into(),
            )])),
            annotations: Some(BTreeMap::from([("existing".into(), "kept".into())])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.into()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("KubeletReady".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

async fn start(config: EmulatorConfig) -> Emulator {
    Emulator::start(config)
        .await
        .expect("the emulator starts on 127.0.0.1")
}

async fn admin_nodes(emulator: &Emulator) -> Api<Node> {
    Api::all(emulator.client(ADMIN).await.expect("admin client"))
}

/// The kube-rs error's Status (panics on any other kind of error).
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next<S, T>(stream: &mut S, what: &str) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(EVENT_WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {EVENT_WAIT:?}"))
        .unwrap_or_else(|| panic!("the stream ended before {what}"))
}

fn name_of(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("")
}

/// Reads watcher events until `done` says so; returns them (errors as strings).
async fn collect_until<S>(
    stream: &mut S,
    what: &str,
    mut done: impl FnMut(&[Result<Event<Node>, String>]) -> bool,
) -> Vec<Result<Event<Node>, String>>
where
    S: Stream<Item = Result<Event<Node>, watcher::Error>> + Unpin,
{
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "{what}: gave up after 60 s; saw {seen:?}"
        );
        let event = next(stream, what).await.map_err(|e| e.to_string());
        seen.push(event);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_client_gets_and_lists_nodes_over_tls() {
    let emulator = start(EmulatorConfig::default()).await;
    for i in 1..=5 {
        emulator
            .create_node(&node(&format!("n{i}"), &format!("10.244.{i}.0/24")))
            .unwrap();
    }
    let client = emulator.client(ADMIN).await.unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
    let nodes: Api<Node> = Api::all(client);

    let n3 = nodes.get("n3").await.unwrap();
    assert_eq!(n3.spec.unwrap().pod_cidrs.unwrap(), ["10.244.3.0/24"]);
    assert!(n3.metadata.uid.is_some() && n3.metadata.creation_timestamp.is_some());
    let missing = api_error(nodes.get("n9").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "nodes \"n9\" not found");

    let all = nodes.list(&ListParams::default()).await.unwrap();
    let names: Vec<&str> = all.items.iter().map(name_of).collect();
    assert_eq!(names, ["n1", "n2", "n3", "n4", "n5"]);
    let list_rv = all.metadata.resource_version.unwrap();
    assert_eq!(list_rv, emulator.resource_version().to_string());

    // Pages of 2 over a consistent snapshot: a node created between pages is not in it.
    let first = nodes.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    emulator
        .create_node(&node("n0", "10.244.100.0/24"))
        .unwrap();
    let mut token = first.metadata.continue_;
    let mut paged: Vec<String> = first.items.iter().map(|n| name_of(n).to_string()).collect();
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = nodes
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(list_rv.as_str())
        );
        paged.extend(page.items.iter().map(|n| name_of(n).to_string()));
        token = page.metadata.continue_;
    }
    assert_eq!(paged, ["n1", "n2", "n3", "n4", "n5"]);

    let selected = nodes
        .list(&ListParams::default().labels("kubernetes.io/hostname in (n2,n4)"))
        .await
        .unwrap();
    assert_eq!(
        selected.items.iter().map(name_of).collect::<Vec<_>>(),
        ["n2", "n4"]
    );
    let by_field = nodes
        .list(&ListParams::default().fields("metadata.name=n0"))
        .await
        .unwrap();
    assert_eq!(by_field.items.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_client_creates_and_deletes_nodes() {
    let emulator = start(EmulatorConfig::default()).await;
    let nodes = admin_nodes(&emulator).await;
    let created = nodes
        .create(&PostParams::default(), &node("c1", "10.244.7.0/24"))
        .await
        .unwrap();
    assert_eq!(
        created.metadata.resource_version,
        Some(emulator.resource_version().to_string())
    );
    let again = api_error(
        nodes
            .create(&PostParams::default(), &node("c1", "10.244.7.0/24"))
            .await,
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));
    let invalid = api_error(
        nodes
            .create(&PostParams::default(), &node("Not_A_Name", "10.244.8.0/24"))
            .await,
    );
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(
        invalid
            .message
            .starts_with("Node \"Not_A_Name\" is invalid: metadata.name"),
        "{}",
        invalid.message
    );

    let deleted = nodes.delete("c1", &DeleteParams::default()).await.unwrap();
    let status = deleted.right().expect("deleting a node answers a Status");
    assert_eq!(status.details.unwrap().name, "c1");
    assert!(emulator.node("c1").is_none());
    let gone = api_error(nodes.delete("c1", &DeleteParams::default()).await);
    assert_eq!(gone.code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_initial_state_then_changes() {
    let emulator = start(EmulatorConfig::default()).await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    emulator.create_node(&node("b", "10.244.2.0/24")).unwrap();
    let nodes = admin_nodes(&emulator).await;
    let mut events = watcher::watcher(nodes.clone(), watcher::Config::default()).boxed();

    assert!(matches!(next(&mut events, "Init").await, Ok(Event::Init)));
    let mut initial = Vec::new();
    for _ in 0..2 {
        match next(&mut events, "InitApply").await {
            Ok(Event::InitApply(n)) => initial.push(name_of(&n).to_string()),
            other => panic!("expected InitApply, got {other:?}"),
        }
    }
    assert_eq!(initial, ["a", "b"]);
    assert!(matches!(
        next(&mut events, "InitDone").await,
        Ok(Event::InitDone)
    ));

    emulator.create_node(&node("c", "10.244.3.0/24")).unwrap();
    match next(&mut events, "Apply of c").await {
        Ok(Event::Apply(n)) => assert_eq!(name_of(&n), "c"),
        other => panic!("expected Apply(c), got {other:?}"),
    }
    nodes
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .unwrap();
    match next(&mut events, "Apply of a").await {
        Ok(Event::Apply(n)) => {
            assert_eq!(name_of(&n), "a");
            assert_eq!(n.metadata.annotations.unwrap()["x"], "y");
        }
        other => panic!("expected Apply(a), got {other:?}"),
    }
    emulator.delete_node("b").unwrap();
    match next(&mut events, "Delete of b").await {
        Ok(Event::Delete(n)) => {
            assert_eq!(name_of(&n), "b");
            assert_eq!(
                n.metadata.resource_version,
                Some(emulator.resource_version().to_string())
            );
        }
        other => panic!("expected Delete(b), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watcher_gets_initial_events_end() {
    let emulator = start(EmulatorConfig::default()).await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    let nodes = admin_nodes(&emulator).await;
    let mut events = watcher::watcher(nodes, watcher::Config::default().streaming_lists()).boxed();
    let seen = collect_until(&mut events, "InitDone", |seen| {
        matches!(seen.last(), Some(Ok(Event::InitDone)))
    })
    .await;
    assert!(
        matches!(&seen[..], [Ok(Event::Init), Ok(Event::InitApply(a)), Ok(Event::InitDone)] if name_of(a) == "a"),
        "{seen:?}"
    );
    let watches = emulator.requests();
    assert!(watches
        .iter()
        .any(|r| r.is("watch", "nodes") && r.query.contains("sendInitialEvents=true")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_arrive_only_when_asked() {
    let emulator = start(EmulatorConfig {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    let nodes = admin_nodes(&emulator).await;
    let rv = emulator.resource_version().to_string();

    let mut stream = nodes
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    emulator.create_node(&node("b", "10.244.2.0/24")).unwrap();
    match next(&mut stream, "ADDED b").await.unwrap() {
        WatchEvent::Added(n) => assert_eq!(name_of(&n), "b"),
        other => panic!("expected ADDED b, got {other:?}"),
    }
    match next(&mut stream, "a bookmark").await.unwrap() {
        WatchEvent::Bookmark(bookmark) => {
            assert_eq!(
                bookmark.metadata.resource_version,
                emulator.resource_version().to_string()
            )
        }
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }

    let mut quiet = nodes
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(EVENT_WAIT, quiet.next())
        .await
        .expect("the watch times out")
    {
        seen.push(event.unwrap());
    }
    assert!(
        matches!(&seen[..], [WatchEvent::Added(b)] if name_of(b) == "b"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_timeout_seconds_is_honoured() {
    let emulator = start(EmulatorConfig::default()).await;
    let nodes = admin_nodes(&emulator).await;
    let started = Instant::now();
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(end, Ok(None)),
        "the watch should end by itself: {end:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "a 1 s watch ended after {elapsed:?}"
    );
    let watch = emulator
        .requests()
        .into_iter()
        .find(|r| r.is("watch", "nodes"))
        .unwrap();
    assert!(watch.query.contains("timeoutSeconds=1"), "{watch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_compacted_version_gets_410_expired_event() {
    let emulator = start(EmulatorConfig::default()).await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    let old = emulator.resource_version();
    emulator
        .patch_node("a", &json!({"metadata": {"labels": {"v": "2"}}}))
        .unwrap();
    emulator.compact();
    let nodes = admin_nodes(&emulator).await;
    let mut stream = nodes
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    match next(&mut stream, "the ERROR event").await.unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!(
                    "too old resource version: {old} ({})",
                    emulator.resource_version()
                )
            );
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    assert!(
        next_or_end(&mut stream).await.is_none(),
        "the watch ends after the error"
    );
    // A paged list from before the compaction is gone too.
    let expired = api_error(
        nodes
            .list(
                &ListParams::default()
                    .limit(1)
                    .at(&old.to_string())
                    .matching(kube::api::VersionMatch::Exact),
            )
            .await,
    );
    assert_eq!((expired.code, expired.reason.as_str()), (410, "Expired"));
}

async fn next_or_end<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(EVENT_WAIT, stream.next())
        .await
        .expect("the stream ends in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_resumes_after_closed_watches_and_relists_after_compaction() {
    let emulator = start(EmulatorConfig::default()).await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    emulator.create_node(&node("b", "10.244.2.0/24")).unwrap();
    let nodes = admin_nodes(&emulator).await;
    let mut events = watcher::watcher(nodes, watcher::Config::default())
        .default_backoff()
        .boxed();
    collect_until(&mut events, "InitDone", |s| {
        matches!(s.last(), Some(Ok(Event::InitDone)))
    })
    .await;

    // Closed watches: the watcher resumes from its version, no re-list.
    emulator.close_watches();
    emulator.create_node(&node("c", "10.244.3.0/24")).unwrap();
    let seen = collect_until(
        &mut events,
        "Apply of c",
        |s| matches!(s.last(), Some(Ok(Event::Apply(n))) if name_of(n) == "c"),
    )
    .await;
    assert!(
        seen.iter().all(|e| matches!(e, Ok(Event::Apply(_)))),
        "resumed without re-list: {seen:?}"
    );

    // Unreachable while things change and history is compacted: the watcher's resume
    // gets 410, it re-lists and converges on the new state.
    emulator.stop_listening().await;
    emulator.delete_node("a").unwrap();
    emulator.create_node(&node("d", "10.244.4.0/24")).unwrap();
    emulator.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    emulator.start_listening().await.unwrap();
    let seen = collect_until(&mut events, "re-list", |s| {
        matches!(s.last(), Some(Ok(Event::InitDone)))
    })
    .await;
    assert!(
        seen.iter().any(
            |e| matches!(e, Err(m) if m.contains("410") || m.contains("too old resource version"))
        ),
        "the resume from a compacted version fails with 410: {seen:?}"
    );
    let init = seen
        .iter()
        .rposition(|e| matches!(e, Ok(Event::Init)))
        .expect("a re-list");
    let relisted: Vec<&str> = seen[init..]
        .iter()
        .filter_map(|e| match e {
            Ok(Event::InitApply(n)) => Some(name_of(n)),
            _ => None,
        })
        .collect();
    assert_eq!(relisted, ["b", "c", "d"]);
    let log = emulator.requests();
    assert!(log.iter().any(|r| r.is("watch", "nodes") && r.code == 200));
    assert!(
        log.iter().filter(|r| r.is("list", "nodes")).count() >= 2,
        "listed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_patches_node_status_strategically() {
    let emulator = start(EmulatorConfig {
        users: vec![User::flannel("flannel-token")],
        ..Default::default()
    })
    .await;
    emulator.create_node(&node("n1", "10.244.1.0/24")).unwrap();
    let nodes: Api<Node> = Api::all(emulator.client(FLANNEL_USER).await.unwrap());
    let patch = json!({
        "metadata": {"annotations": {
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"aa:bb:cc:dd:ee:ff\"}",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": "198.18.0.11"
        }},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False",
            "reason": "FlannelIsUp", "message": "Flannel is running on this node"}]}
    });
    let patched = nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let annotations = patched.metadata.annotations.unwrap();
    assert_eq!(annotations["existing"], "kept");
    assert_eq!(
        annotations["flannel.alpha.coreos.com/public-ip"],
        "198.18.0.11"
    );
    let conditions = patched.status.unwrap().conditions.unwrap();
    let types: Vec<&str> = conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Ready", "NetworkUnavailable"]);
    assert_eq!(conditions[1].reason.as_deref(), Some("FlannelIsUp"));

    // The same patch again changes nothing: no new version.
    let rv = emulator.resource_version();
    let same =
        json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "198.18.0.11"}}});
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Strategic(same))
        .await
        .unwrap();
    assert_eq!(emulator.resource_version(), rv);

    let log = emulator.requests();
    let status_patch = log
        .iter()
        .find(|r| r.is("patch", "nodes/status"))
        .expect("a nodes/status patch");
    assert_eq!(status_patch.user.as_deref(), Some(FLANNEL_USER));
    assert_eq!(status_patch.name.as_deref(), Some("n1"));
    assert_eq!(
        status_patch.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(status_patch.code, 200);

    // flannel's role has no patch on nodes itself.
    let denied = api_error(
        nodes
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
    );
    assert_eq!((denied.code, denied.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        denied.message,
        "nodes \"n1\" is forbidden: User \"system:serviceaccount:kube-flannel:flannel\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope"
    );
    let details = denied.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("n1", "nodes")
    );
    // pods get is allowed (and there are no pods); pods list is not.
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(emulator.client(FLANNEL_USER).await.unwrap(), "kube-flannel");
    assert_eq!(api_error(pods.get("kube-flannel-ds-x").await).code, 404);
    let list = api_error(pods.list(&ListParams::default()).await);
    assert_eq!(
        list.message,
        "pods is forbidden: User \"system:serviceaccount:kube-flannel:flannel\" cannot list resource \"pods\" in API group \"\" in the namespace \"kube-flannel\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_and_json_patches_respect_the_status_split() {
    let emulator = start(EmulatorConfig::default()).await;
    emulator.create_node(&node("n1", "10.244.1.0/24")).unwrap();
    let nodes = admin_nodes(&emulator).await;
    let patched = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"kubernetes.io/hostname": null, "role": "edge"}},
                "spec": {"unschedulable": true}, "status": {"conditions": []}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.labels.unwrap(),
        BTreeMap::from([("role".to_string(), "edge".to_string())])
    );
    assert_eq!(patched.spec.unwrap().unschedulable, Some(true));
    assert_eq!(
        patched.status.unwrap().conditions.unwrap().len(),
        1,
        "status is not written through nodes"
    );

    let json_patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/role", "value": "edge"},
        {"op": "add", "path": "/metadata/annotations/via", "value": "json-patch"},
        {"op": "add", "path": "/spec/unschedulable", "value": false}
    ]))
    .unwrap();
    let patched = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.annotations.unwrap()["via"], "json-patch");
    assert_eq!(
        patched.spec.unwrap().unschedulable,
        Some(true),
        "spec is not written through nodes/status"
    );

    let apply = api_error(
        nodes
            .patch(
                "n1",
                &PatchParams::apply("test"),
                &Patch::Apply(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await,
    );
    assert_eq!(
        (apply.code, apply.reason.as_str()),
        (415, "UnsupportedMediaType")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_resource_version_conflicts() {
    let emulator = start(EmulatorConfig::default()).await;
    let created = emulator.create_node(&node("n1", "10.244.1.0/24")).unwrap();
    let stale = created.metadata.resource_version.unwrap();
    emulator
        .patch_node("n1", &json!({"metadata": {"labels": {"moved": "on"}}}))
        .unwrap();
    let nodes = admin_nodes(&emulator).await;
    let patch = json!({"metadata": {"resourceVersion": stale, "annotations": {"late": "write"}}});
    let conflict = api_error(
        nodes
            .patch_status("n1", &PatchParams::default(), &Patch::Strategic(patch))
            .await,
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        conflict.message,
        "Operation cannot be fulfilled on nodes \"n1\": the object has been modified; please apply your changes to the latest version and try again"
    );
    let current = emulator.resource_version().to_string();
    let patch = json!({"metadata": {"resourceVersion": current, "annotations": {"late": "write"}}});
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_denies_with_kube_apiserver_wording_and_bad_tokens_get_401() {
    let reader = User::new(
        "reader",
        "reader-token",
        vec![Rule::new(&["get"], &["nodes"])],
    );
    let emulator = start(EmulatorConfig {
        users: vec![reader],
        ..Default::default()
    })
    .await;
    emulator.create_node(&node("n1", "10.244.1.0/24")).unwrap();
    let nodes: Api<Node> = Api::all(emulator.client("reader").await.unwrap());
    nodes.get("n1").await.unwrap();
    let list = api_error(nodes.list(&ListParams::default()).await);
    assert_eq!(list.code, 403);
    assert_eq!(
        list.message,
        "nodes is forbidden: User \"reader\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
    );
    let status = api_error(
        nodes
            .patch_status(
                "n1",
                &PatchParams::default(),
                &Patch::Strategic(json!({"metadata": {}})),
            )
            .await,
    );
    assert_eq!(
        status.message,
        "nodes \"n1\" is forbidden: User \"reader\" cannot patch resource \"nodes/status\" in API group \"\" at the cluster scope"
    );

    let bad = emulator
        .kubeconfig("reader")
        .unwrap()
        .replace("reader-token", "wrong-token");
    let intruder: Api<Node> = Api::all(client_from_kubeconfig(&bad).await.unwrap());
    let denied = api_error(intruder.get("n1").await);
    assert_eq!(
        (denied.code, denied.reason.as_str(), denied.message.as_str()),
        (401, "Unauthorized", "Unauthorized")
    );
    let log = emulator.requests();
    assert!(log.iter().any(|r| r.code == 401 && r.user.is_none()));
    assert!(log.iter().any(|r| r.code == 403
        && r.is("patch", "nodes/status")
        && r.user.as_deref() == Some("reader")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_nodes_list_fast_and_fan_out_to_watchers() {
    const NODES: usize = 5000;
    const WATCHERS: usize = 20;
    let emulator = start(EmulatorConfig::default()).await;
    let started = Instant::now();
    for i in 0..NODES {
        emulator
            .create_node(&node(
                &format!("node-{i:05}"),
                &format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
            ))
            .unwrap();
    }
    eprintln!("created {NODES} nodes in {:?}", started.elapsed());
    let client = emulator.client(ADMIN).await.unwrap();

    let started = Instant::now();
    let raw = client
        .request_text(
            hyper::Request::get("/api/v1/nodes")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let list_time = started.elapsed();
    eprintln!("list of {NODES} nodes ({} bytes): {list_time:?}", raw.len());
    assert!(
        list_time < Duration::from_millis(800),
        "listing {NODES} nodes took {list_time:?}"
    );
    let list: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), NODES);

    let nodes: Api<Node> = Api::all(client);
    let mut streams = Vec::new();
    for _ in 0..WATCHERS {
        let rv = emulator.resource_version().to_string();
        streams.push(
            nodes
                .watch(&WatchParams::default().timeout(60), &rv)
                .await
                .unwrap()
                .boxed(),
        );
    }
    let started = Instant::now();
    emulator
        .patch_node(
            "node-04999",
            &json!({"metadata": {"labels": {"touched": "yes"}}}),
        )
        .unwrap();
    for stream in &mut streams {
        match next(stream, "the modification").await.unwrap() {
            WatchEvent::Modified(n) => assert_eq!(name_of(&n), "node-04999"),
            other => panic!("expected MODIFIED, got {other:?}"),
        }
    }
    eprintln!(
        "one event to {WATCHERS} watchers in {:?}",
        started.elapsed()
    );

    // A watcher (paged list of 500) has the whole cluster quickly.
    let started = Instant::now();
    let mut events = watcher::watcher(nodes, watcher::Config::default()).boxed();
    let mut applied = 0;
    loop {
        match next(&mut events, "the initial list").await.unwrap() {
            Event::InitApply(_) => applied += 1,
            Event::InitDone => break,
            _ => {}
        }
    }
    eprintln!(
        "watcher initialised with {applied} nodes in {:?}",
        started.elapsed()
    );
    assert_eq!(applied, NODES);
    let pages = emulator
        .requests()
        .iter()
        .filter(|r| r.is("list", "nodes") && r.query.contains("limit=500"))
        .count();
    assert_eq!(pages, NODES / 500, "the watcher pages with limit=500");
}

/// Kills the child it holds (by its PID) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_apiserver_process_writes_kubeconfigs_and_obeys_its_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_weft-apiserver"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--flannel-token",
                "flannel-token",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("weft-apiserver starts"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .expect("weft-apiserver says ready within 20 s")
        .unwrap()
        .unwrap();
    assert!(line.starts_with("ready https://127.0.0.1:"), "{line:?}");
    assert!(dir.path().join(CA_FILE).exists());

    let control = ControlClient::new(dir.path());
    let control_thread = control.clone();
    let created = tokio::task::spawn_blocking(move || {
        control_thread.create_node(&node("p1", "10.244.1.0/24"))?;
        let more = [node("p2", "10.244.2.0/24"), node("p3", "10.244.3.0/24")];
        let created = control_thread.create_nodes(&more)?;
        control_thread.delete_node("p3")?;
        let refused = control_thread.create_node(&node("p1", "10.244.1.0/24"));
        anyhow::Ok((created, refused.unwrap_err().to_string()))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(created.0, 2);
    assert!(
        created.1.contains("nodes \"p1\" already exists"),
        "{}",
        created.1
    );
    let admin = std::fs::read_to_string(dir.path().join(kubeconfig_file_name(ADMIN))).unwrap();
    let flannel =
        std::fs::read_to_string(dir.path().join(kubeconfig_file_name(FLANNEL_USER))).unwrap();
    let admin_nodes: Api<Node> = Api::all(client_from_kubeconfig(&admin).await.unwrap());
    let flannel_nodes: Api<Node> = Api::all(client_from_kubeconfig(&flannel).await.unwrap());
    assert_eq!(
        admin_nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    flannel_nodes
        .patch_status(
            "p1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"f": "1"}}})),
        )
        .await
        .unwrap();

    let (log, seen) = tokio::task::spawn_blocking(move || {
        let log = control.requests()?;
        let seen = control.node("p1")?;
        control.stop_listening()?;
        anyhow::Ok((log, seen))
    })
    .await
    .unwrap()
    .unwrap();
    assert!(log
        .iter()
        .any(|r| r.is("patch", "nodes/status") && r.user.as_deref() == Some(FLANNEL_USER)));
    assert_eq!(seen.unwrap().metadata.annotations.unwrap()["f"], "1");
    let refused = admin_nodes.get("p1").await;
    assert!(refused.is_err(), "stopped listening, yet {refused:?}");
    let again = ControlClient::new(dir.path());
    tokio::task::spawn_blocking(move || again.start_listening())
        .await
        .unwrap()
        .unwrap();
    let back = admin_nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(back.iter().map(name_of).collect::<Vec<_>>(), ["p1", "p2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_watches_see_nodes_enter_and_leave() {
    let emulator = start(EmulatorConfig::default()).await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    emulator.create_node(&node("b", "10.244.2.0/24")).unwrap();
    let nodes = admin_nodes(&emulator).await;
    let rv = emulator.resource_version().to_string();
    let params = WatchParams::default().timeout(30);
    let mut edge = nodes
        .watch(&params.clone().labels("role=edge"), &rv)
        .await
        .unwrap()
        .boxed();
    let mut own = nodes
        .watch(&params.fields("metadata.name=b"), &rv)
        .await
        .unwrap()
        .boxed();

    emulator
        .patch_node("a", &json!({"metadata": {"labels": {"role": "edge"}}}))
        .unwrap();
    emulator
        .patch_node("b", &json!({"metadata": {"labels": {"other": "x"}}}))
        .unwrap();
    emulator
        .patch_node("a", &json!({"metadata": {"labels": {"role": null}}}))
        .unwrap();
    match next(&mut edge, "a entering").await.unwrap() {
        WatchEvent::Added(n) => assert_eq!(name_of(&n), "a"),
        other => panic!("expected ADDED a, got {other:?}"),
    }
    match next(&mut edge, "a leaving").await.unwrap() {
        WatchEvent::Deleted(n) => assert_eq!(name_of(&n), "a"),
        other => panic!("expected DELETED a, got {other:?}"),
    }
    match next(&mut own, "b changing").await.unwrap() {
        WatchEvent::Modified(n) => assert_eq!(name_of(&n), "b"),
        other => panic!("expected MODIFIED b, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_history_expires_old_versions() {
    let emulator = start(EmulatorConfig {
        history_limit: 5,
        ..Default::default()
    })
    .await;
    emulator.create_node(&node("a", "10.244.1.0/24")).unwrap();
    let old = emulator.resource_version();
    for i in 0..10 {
        emulator
            .patch_node(
                "a",
                &json!({"metadata": {"labels": {"step": i.to_string()}}}),
            )
            .unwrap();
    }
    let nodes = admin_nodes(&emulator).await;
    // The last 5 changes are kept: a watch from 5 versions back replays them.
    let recent = (emulator.resource_version() - 5).to_string();
    let mut replay = nodes
        .watch(&WatchParams::default().timeout(1), &recent)
        .await
        .unwrap()
        .boxed();
    let mut steps = Vec::new();
    while let Some(event) = next_or_end(&mut replay).await {
        if let WatchEvent::Modified(n) = event.unwrap() {
            steps.push(n.metadata.labels.unwrap()["step"].clone());
        }
    }
    assert_eq!(steps, ["5", "6", "7", "8", "9"]);
    let mut stale = nodes
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    match next(&mut stale, "the ERROR event").await.unwrap() {
        WatchEvent::Error(status) => assert_eq!(status.code, 410),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
}
