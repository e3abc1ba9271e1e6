//! PATCH bodies: strategic merge patch (with Node's patch strategies), JSON merge patch
//! (RFC 7386) and JSON patch (RFC 6902).

use serde_json::{Map, Value};

use super::status::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Strategic,
    Merge,
    Json,
}

impl PatchType {
    /// The patch type of a Content-Type header (parameters such as charset ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            _ => None,
        }
    }
}

/// Applies `body` (a patch of `kind`) to `target`; `resource` and `name` word the errors.
pub fn apply(
    kind: PatchType,
    target: &Value,
    body: &[u8],
    resource: &str,
    name: &str,
) -> Result<Value, Status> {
    let mut result = target.clone();
    match kind {
        PatchType::Merge | PatchType::Strategic => {
            let patch: Value = serde_json::from_slice(body)
                .map_err(|e| Status::bad_request(format!("error decoding patch: {e}")))?;
            if !patch.is_object() {
                return Err(Status::bad_request(format!(
                    "error decoding patch: the patch must be a JSON object, got {}",
                    type_name(&patch)
                )));
            }
            if kind == PatchType::Merge {
                merge_patch(&mut result, &patch);
            } else {
                strategic_merge(&mut result, &patch, "").map_err(|e| {
                    Status::bad_request(format!("invalid strategic merge patch: {e}"))
                })?;
            }
        }
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| Status::bad_request(format!("error decoding patch: {e}")))?;
            json_patch::patch(&mut result, &patch)
                .map_err(|e| Status::invalid(resource, name, &[(String::new(), e.to_string())]))?;
        }
    }
    Ok(result)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// RFC 7386: objects merge recursively, null removes a member, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// How a list field merges in a strategic merge patch (the Go types' patchStrategy).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ListStrategy {
    Replace,
    /// A list of primitives merged as a set.
    MergePrimitives,
    /// A list of objects merged by the value of this key.
    MergeByKey(&'static str),
}

/// Node's patch strategies (k8s.io/api core/v1 types.go), by dotted path.
fn list_strategy(path: &str) -> ListStrategy {
    match path {
        "status.conditions" | "status.addresses" => ListStrategy::MergeByKey("type"),
        "metadata.ownerReferences" => ListStrategy::MergeByKey("uid"),
        "metadata.finalizers" | "spec.podCIDRs" => ListStrategy::MergePrimitives,
        _ => ListStrategy::Replace,
    }
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

const PATCH_DIRECTIVE: &str = "$patch";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const RETAIN_KEYS: &str = "$retainKeys";

/// Strategic merge of object `patch` into `target` (an object, or replaced by one) at
/// `path`. Supports `$patch: replace|delete|merge`, `$deleteFromPrimitiveList/<field>`,
/// `$retainKeys`, and accepts (without reordering) `$setElementOrder/<field>`.
fn strategic_merge(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let patch = patch
        .as_object()
        .ok_or_else(|| format!("{path}: expected an object"))?;
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    match patch.get(PATCH_DIRECTIVE).and_then(Value::as_str) {
        Some("replace") => {
            let mut replacement = Value::Object(Map::new());
            let rest: Map<String, Value> = patch
                .iter()
                .filter(|(k, _)| k.as_str() != PATCH_DIRECTIVE)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            strategic_merge(&mut replacement, &Value::Object(rest), path)?;
            *target = replacement;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("{path}: unknown patch type {other:?} in a map")),
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if key == PATCH_DIRECTIVE || key.starts_with(SET_ELEMENT_ORDER) || key == RETAIN_KEYS {
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
            let doomed = value
                .as_array()
                .ok_or_else(|| format!("{path}.{key}: expected a list"))?;
            if let Some(Value::Array(list)) = target.get_mut(field) {
                list.retain(|item| !doomed.contains(item));
            }
            continue;
        }
        let here = child_path(path, key);
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(map) => {
                if map.get(PATCH_DIRECTIVE).and_then(Value::as_str) == Some("delete") {
                    target.remove(key);
                } else {
                    let slot = target.entry(key.clone()).or_insert(Value::Null);
                    strategic_merge(slot, value, &here)?;
                }
            }
            Value::Array(items) => {
                let merged = match list_strategy(&here) {
                    ListStrategy::Replace => strip_directives(items),
                    ListStrategy::MergePrimitives => {
                        let mut list = existing_list(target.get(key));
                        for item in items {
                            if !list.contains(item) {
                                list.push(item.clone());
                            }
                        }
                        list
                    }
                    ListStrategy::MergeByKey(merge_key) => {
                        merge_by_key(existing_list(target.get(key)), items, merge_key, &here)?
                    }
                };
                target.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                target.insert(key.clone(), scalar.clone());
            }
        }
    }
    if let Some(Value::Array(keep)) = patch.get(RETAIN_KEYS) {
        target.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn existing_list(value: Option<&Value>) -> Vec<Value> {
    match value {
        Some(Value::Array(list)) => list.clone(),
        _ => Vec::new(),
    }
}

/// Items of a replaced list, merged onto nothing so that nulls and directives vanish.
fn strip_directives(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .map(|item| {
            if item.is_object() {
                let mut clean = Value::Object(Map::new());
                // Cannot fail: `item` is an object and a plain replace has no strategies.
                let _ = strategic_merge(&mut clean, item, "");
                clean
            } else {
                item.clone()
            }
        })
        .collect()
}

/// Merges list `patch` into `list` by `merge_key`: an item with the key of an existing
/// one is merged into it, `$patch: delete` removes it, `{"$patch": "replace"}` replaces
/// the whole list with the other items, new items are appended.
fn merge_by_key(
    mut list: Vec<Value>,
    patch: &[Value],
    merge_key: &str,
    path: &str,
) -> Result<Vec<Value>, String> {
    let replace = patch
        .iter()
        .any(|p| p.get(PATCH_DIRECTIVE).and_then(Value::as_str) == Some("replace"));
    if replace {
        list.clear();
    }
    for item in patch {
        let Some(map) = item.as_object() else {
            return Err(format!("{path}: expected a list of objects, got {item}"));
        };
        let directive = map.get(PATCH_DIRECTIVE).and_then(Value::as_str);
        if directive == Some("replace") {
            continue;
        }
        let key_value = map.get(merge_key).ok_or_else(|| {
            format!("{path}: map {item} does not contain declared merge key: {merge_key}")
        })?;
        let position = list
            .iter()
            .position(|x| x.get(merge_key) == Some(key_value));
        match (directive, position) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => strategic_merge(&mut list[i], item, path)?,
            (_, None) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge(&mut fresh, item, path)?;
                list.push(fresh);
            }
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        apply(
            PatchType::Strategic,
            &target,
            patch.to_string().as_bytes(),
            "nodes",
            "n1",
        )
        .unwrap()
    }

    #[test]
    fn strategic_merge_follows_node_patch_strategies() {
        let node = json!({
            "metadata": {"name": "n1", "annotations": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
            ]}
        });
        let out = smp(
            node,
            json!({
                "metadata": {"annotations": {"b": null, "c": "3"}, "finalizers": ["y"]},
                "spec": {"podCIDRs": ["fd00::/64"], "taints": []},
                "status": {"conditions": [
                    {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                    {"type": "Ready", "$patch": "delete"},
                    {"type": "Custom", "status": "True", "message": null}
                ]}
            }),
        );
        assert_eq!(out["metadata"]["annotations"], json!({"a": "1", "c": "3"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(
            out["spec"]["podCIDRs"],
            json!(["10.244.1.0/24", "fd00::/64"])
        );
        assert_eq!(out["spec"]["taints"], json!([]));
        assert_eq!(
            out["status"]["conditions"],
            json!([
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                {"type": "Custom", "status": "True"}
            ])
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let node = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "1.1.1.1"}]}});
        let out = smp(
            node.clone(),
            json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}},
                "status": {"addresses": [{"$patch": "replace"}, {"type": "Hostname", "address": "h"}]}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"c": "3"}));
        assert_eq!(
            out["status"]["addresses"],
            json!([{"type": "Hostname", "address": "h"}])
        );
        let no_key = json!({"status": {"addresses": [{"address": "x"}]}});
        let err = apply(
            PatchType::Strategic,
            &node,
            no_key.to_string().as_bytes(),
            "nodes",
            "n1",
        )
        .unwrap_err();
        assert_eq!(err.code, 400);
        assert!(err.message.contains("merge key: type"), "{}", err.message);
    }

    #[test]
    fn merge_patch_replaces_lists_and_deletes_nulls() {
        let node = json!({"metadata": {"annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [{"type": "Ready"}]}});
        let patch = json!({"metadata": {"annotations": {"a": null}}, "status": {"conditions": []}});
        let out = apply(
            PatchType::Merge,
            &node,
            patch.to_string().as_bytes(),
            "nodes",
            "n1",
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"annotations": {"b": "2"}}, "status": {"conditions": []}})
        );
    }

    #[test]
    fn json_patch_applies_operations() {
        let node = json!({"metadata": {"labels": {"a": "1"}}});
        let patch = json!([{"op": "add", "path": "/metadata/labels/b", "value": "2"},
            {"op": "test", "path": "/metadata/labels/a", "value": "1"}]);
        let out = apply(
            PatchType::Json,
            &node,
            patch.to_string().as_bytes(),
            "nodes",
            "n1",
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        let failing = json!([{"op": "test", "path": "/metadata/labels/a", "value": "9"}]);
        let err = apply(
            PatchType::Json,
            &node,
            failing.to_string().as_bytes(),
            "nodes",
            "n1",
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
    }
}
