//! Node semantics of kube-apiserver's registry: defaulting and validation on create,
//! the split between the `nodes` and `nodes/status` endpoints, optimistic concurrency,
//! and pruning of unknown fields (by a round trip through the typed Node).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value};

use super::patch::{self, PatchType};
use super::status::Status;
use super::store::{object_name, Store, Stored, RESOURCE};

/// Which part of a node a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `/api/v1/nodes/{name}`: metadata and spec; status changes are dropped.
    Main,
    /// `/api/v1/nodes/{name}/status`: metadata and status; spec changes are dropped.
    Status,
    /// The emulator's own API (tests, control socket): everything.
    All,
}

impl Scope {
    /// The RBAC resource of a write to this scope.
    pub fn resource(self) -> &'static str {
        match self {
            Scope::Status => "nodes/status",
            Scope::Main | Scope::All => "nodes",
        }
    }
}

/// Locks the store; a panic elsewhere while it was held does not make it unusable.
pub(crate) fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn decode_error(e: impl std::fmt::Display) -> Status {
    Status::bad_request(format!(
        "Node in version \"v1\" cannot be handled as a Node: {e}"
    ))
}

/// Prunes fields a Node does not have and checks the types, like decoding into the Go
/// type does.
fn normalize(value: Value) -> Result<Value, Status> {
    let node: Node = serde_json::from_value(value).map_err(decode_error)?;
    serde_json::to_value(&node).map_err(decode_error)
}

/// A lowercase RFC 1123 subdomain, as node names must be.
fn is_dns_subdomain(name: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    match (addr.parse::<IpAddr>(), len.parse::<u8>()) {
        (Ok(IpAddr::V4(_)), Ok(len)) => len <= 32,
        (Ok(IpAddr::V6(_)), Ok(len)) => len <= 128,
        _ => false,
    }
}

fn str_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// spec.podCIDR and spec.podCIDRs default each other (podCIDRs[0] == podCIDR).
fn default_pod_cidrs(node: &mut Value) {
    let Some(spec) = node.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let single = spec
        .get("podCIDR")
        .and_then(Value::as_str)
        .map(str::to_string);
    let list = str_list(spec.get("podCIDRs"));
    match (single, list.first()) {
        (Some(single), None) if !single.is_empty() => {
            spec.insert("podCIDRs".into(), Value::Array(vec![single.into()]));
        }
        (None, Some(first)) => {
            spec.insert("podCIDR".into(), first.clone().into());
        }
        _ => {}
    }
}

/// Node validation that matters to a network agent: the name and the pod CIDRs.
fn validate(node: &Value, old: Option<&Value>) -> Result<(), Status> {
    let name = object_name(node);
    let mut causes: Vec<(String, String)> = Vec::new();
    if name.is_empty() {
        causes.push((
            "metadata.name".into(),
            "Required value: name or generateName is required".into(),
        ));
    } else if !is_dns_subdomain(name) {
        causes.push((
            "metadata.name".into(),
            format!(
                "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower \
                 case alphanumeric characters, '-' or '.', and must start and end with an \
                 alphanumeric character"
            ),
        ));
    }
    let cidrs = str_list(node.pointer("/spec/podCIDRs"));
    for (i, cidr) in cidrs.iter().enumerate() {
        if !is_cidr(cidr) {
            causes.push((
                format!("spec.podCIDRs[{i}]"),
                format!("Invalid value: \"{cidr}\": must be a valid CIDR"),
            ));
        }
    }
    if let (Some(single), Some(first)) = (
        node.pointer("/spec/podCIDR").and_then(Value::as_str),
        cidrs.first(),
    ) {
        if single != first {
            causes.push((
                "spec.podCIDR".into(),
                format!("Invalid value: \"{single}\": must equal spec.podCIDRs[0] ({first})"),
            ));
        }
    }
    if let Some(old) = old {
        let old_cidrs = str_list(old.pointer("/spec/podCIDRs"));
        if !old_cidrs.is_empty() && old_cidrs != cidrs {
            causes.push((
                "spec.podCIDRs".into(),
                "Forbidden: node updates may not change podCIDR except from \"\" to valid".into(),
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid(RESOURCE, name, &causes))
    }
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a Time serializes")
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn metadata_mut(node: &mut Value) -> &mut Map<String, Value> {
    let map = node.as_object_mut().expect("nodes are JSON objects");
    map.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .expect("normalized metadata is an object")
}

fn check_kind(body: &Value) -> Result<(), Status> {
    if !body.is_object() {
        return Err(decode_error("the body is not a JSON object"));
    }
    if let Some(kind) = body.get("kind").and_then(Value::as_str) {
        if kind != "Node" {
            return Err(Status::bad_request(format!(
                "the kind in the body ({kind}) does not match the kind of the endpoint (Node)"
            )));
        }
    }
    Ok(())
}

/// POST /api/v1/nodes: system fields are set (uid, creationTimestamp, a generated name
/// for generateName), the rest is validated and stored.
pub(crate) fn create(
    store: &Mutex<Store>,
    body: Value,
    dry_run: bool,
) -> Result<Arc<Stored>, Status> {
    check_kind(&body)?;
    let mut node = normalize(body)?;
    let metadata = metadata_mut(&mut node);
    let name = metadata.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        if let Some(prefix) = metadata.get("generateName").and_then(Value::as_str) {
            let suffix: String = (0..5)
                .map(|_| char::from(b"bcdfghjklmnpqrstvwxz2456789"[rand::random_range(0..27)]))
                .collect();
            let generated = format!("{prefix}{suffix}");
            metadata.insert("name".into(), generated.into());
        }
    }
    metadata.remove("resourceVersion");
    metadata.remove("namespace");
    metadata.remove("deletionTimestamp");
    metadata.insert("uid".into(), random_uid().into());
    metadata.insert("creationTimestamp".into(), now());
    default_pod_cidrs(&mut node);
    validate(&node, None)?;
    lock(store).create(node, dry_run)
}

/// The node a write to `scope` makes of `old` when the client sent `new`: the other
/// part is kept, system metadata is kept, a resourceVersion in `new` must be current.
fn merge_write(old: &Stored, new: Value, scope: Scope) -> Result<Value, Status> {
    check_kind(&new)?;
    let mut node = normalize(new)?;
    let name = object_name(&node);
    if !name.is_empty() && name != old.name {
        return Err(Status::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            old.name
        )));
    }
    if let Some(rv) = node
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        if !rv.is_empty() && rv != old.rv.to_string() {
            return Err(Status::stale_object(RESOURCE, &old.name));
        }
    }
    let old_metadata = old.value.get("metadata").cloned().unwrap_or_default();
    let metadata = metadata_mut(&mut node);
    for key in ["name", "uid", "creationTimestamp", "deletionTimestamp"] {
        match old_metadata.get(key) {
            Some(v) => metadata.insert(key.into(), v.clone()),
            None => metadata.remove(key),
        };
    }
    metadata.remove("namespace");
    let kept = match scope {
        Scope::Main => Some("status"),
        Scope::Status => Some("spec"),
        Scope::All => None,
    };
    if let Some(part) = kept {
        let map = node.as_object_mut().expect("normalized nodes are objects");
        match old.value.get(part) {
            Some(v) => map.insert(part.into(), v.clone()),
            None => map.remove(part),
        };
    }
    default_pod_cidrs(&mut node);
    validate(&node, Some(&old.value))?;
    Ok(node)
}

/// PATCH of node `name` (or its status) with a body of `kind`.
pub(crate) fn patch(
    store: &Mutex<Store>,
    name: &str,
    scope: Scope,
    kind: PatchType,
    body: &[u8],
    dry_run: bool,
) -> Result<Arc<Stored>, Status> {
    lock(store).update(name, dry_run, |old| {
        let patched = patch::apply(kind, &old.value, body, RESOURCE, name)?;
        merge_write(old, patched, scope)
    })
}

/// PUT of node `name` (or its status); also the emulator's direct updates.
pub(crate) fn replace(
    store: &Mutex<Store>,
    name: &str,
    scope: Scope,
    body: Value,
    dry_run: bool,
) -> Result<Arc<Stored>, Status> {
    lock(store).update(name, dry_run, |old| merge_write(old, body, scope))
}

/// DELETE of node `name`; `options` is a DeleteOptions body (preconditions honoured).
pub(crate) fn delete(
    store: &Mutex<Store>,
    name: &str,
    options: &Value,
    dry_run: bool,
) -> Result<Arc<Stored>, Status> {
    let want_rv = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let want_uid = options
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    lock(store).delete(name, dry_run, |current| {
        if let Some(rv) = want_rv {
            if rv != current.rv.to_string() {
                return Err(Status::conflict(
                    RESOURCE,
                    name,
                    &format!(
                        "the ResourceVersion in the precondition ({rv}) does not match the \
                         ResourceVersion in record ({}). The object might have been modified",
                        current.rv
                    ),
                ));
            }
        }
        if let Some(uid) = want_uid {
            let actual = current
                .value
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            if uid != actual {
                return Err(Status::conflict(
                    RESOURCE,
                    name,
                    &format!(
                        "the UID in the precondition ({uid}) does not match the UID in record \
                         ({actual}). The object might have been deleted and then recreated"
                    ),
                ));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store_with_node() -> Mutex<Store> {
        let store = Mutex::new(Store::new(100, 100));
        create(
            &store,
            json!({"metadata": {"name": "n1", "annotations": {"a": "1"}},
                   "spec": {"podCIDR": "10.244.1.0/24"},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            false,
        )
        .unwrap();
        store
    }

    #[test]
    fn create_sets_system_fields_and_defaults_pod_cidrs() {
        let store = store_with_node();
        let node = lock(&store).get("n1").unwrap();
        assert_eq!(node.value["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
        assert_eq!(node.value["metadata"]["uid"].as_str().unwrap().len(), 36);
        assert!(node.value["metadata"]["creationTimestamp"].is_string());
        let again = create(&store, json!({"metadata": {"name": "n1"}}), false).unwrap_err();
        assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));
        let bad = create(&store, json!({"metadata": {"name": "N_1"}}), false).unwrap_err();
        assert_eq!((bad.code, bad.reason.as_str()), (422, "Invalid"));
    }

    #[test]
    fn status_writes_keep_spec_and_main_writes_keep_status() {
        let store = store_with_node();
        let smp = PatchType::Strategic;
        let body = json!({"metadata": {"annotations": {"b": "2"}}, "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}})
        .to_string();
        let node = patch(&store, "n1", Scope::Status, smp, body.as_bytes(), false).unwrap();
        assert_eq!(
            node.value["metadata"]["annotations"],
            json!({"a": "1", "b": "2"})
        );
        assert!(node.value["spec"].get("unschedulable").is_none());
        assert_eq!(
            node.value["status"]["conditions"].as_array().unwrap().len(),
            2
        );
        let node = patch(&store, "n1", Scope::Main, smp, body.as_bytes(), false).unwrap();
        assert_eq!(node.value["spec"]["unschedulable"], true);
        assert_eq!(
            node.value["status"]["conditions"].as_array().unwrap().len(),
            2
        );
        let cidr = json!({"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}});
        let err = patch(
            &store,
            "n1",
            Scope::Main,
            smp,
            cidr.to_string().as_bytes(),
            false,
        )
        .unwrap_err();
        assert_eq!(err.code, 422, "{err}");
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let store = store_with_node();
        let rv = lock(&store).get("n1").unwrap().rv;
        let body =
            json!({"metadata": {"resourceVersion": (rv - 1).to_string(), "labels": {"x": "y"}}});
        let err = patch(
            &store,
            "n1",
            Scope::Main,
            PatchType::Merge,
            body.to_string().as_bytes(),
            false,
        )
        .unwrap_err();
        assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
        let body = json!({"metadata": {"resourceVersion": rv.to_string(), "labels": {"x": "y"}}});
        let node = patch(
            &store,
            "n1",
            Scope::Main,
            PatchType::Merge,
            body.to_string().as_bytes(),
            false,
        )
        .unwrap();
        assert_eq!(node.rv, rv + 1);
    }
}
