//! Errors the way the apiserver reports them: `metav1.Status` objects with the reason,
//! message and details that client libraries match on.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A `metav1.Status` (kind Status, apiVersion v1). Every error of the emulator is one;
/// as a Rust error its `Display` is the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub metadata: Value,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    pub code: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
    #[serde(
        default,
        rename = "retryAfterSeconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_seconds: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusCause {
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {})", self.message, self.code, self.reason)
    }
}

impl std::error::Error for Status {}

/// Details naming one object of `resource` (the plural, as the apiserver puts it in `kind`).
fn object_details(resource: &str, name: &str) -> Option<StatusDetails> {
    Some(StatusDetails {
        name: Some(name.to_string()),
        kind: Some(resource.to_string()),
        ..Default::default()
    })
}

/// The kind of the objects of `resource` ("nodes" -> "Node"), for Invalid errors.
pub(crate) fn kind_of(resource: &str) -> &'static str {
    match resource {
        "pods" => "Pod",
        _ => "Node",
    }
}

impl Status {
    fn failure(code: u16, reason: &str, message: String, details: Option<StatusDetails>) -> Self {
        Status {
            kind: "Status".into(),
            api_version: "v1".into(),
            metadata: Value::Object(Default::default()),
            status: "Failure".into(),
            message,
            reason: reason.into(),
            details,
            code,
        }
    }

    /// The answer to a successful DELETE of an object without finalizers.
    pub fn deleted(resource: &str, name: &str, uid: &str) -> Self {
        Status {
            status: "Success".into(),
            code: 200,
            reason: String::new(),
            details: Some(StatusDetails {
                uid: Some(uid.to_string()),
                ..object_details(resource, name).unwrap_or_default()
            }),
            ..Self::failure(200, "", String::new(), None)
        }
    }

    pub fn unauthorized() -> Self {
        Self::failure(401, "Unauthorized", "Unauthorized".into(), None)
    }

    /// RBAC's denial of `verb` on `resource` (with subresource, e.g. "nodes/status"),
    /// worded like kube-apiserver's.
    pub fn forbidden(
        user: &str,
        verb: &str,
        resource: &str,
        name: Option<&str>,
        namespace: Option<&str>,
    ) -> Self {
        let base = resource.split('/').next().unwrap_or(resource);
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        let why = format!(
            "User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"\" {scope}"
        );
        let message = match name {
            Some(name) => format!("{base} \"{name}\" is forbidden: {why}"),
            None => format!("{base} is forbidden: {why}"),
        };
        let details = StatusDetails {
            name: name.map(str::to_string),
            kind: Some(base.to_string()),
            ..Default::default()
        };
        Self::failure(403, "Forbidden", message, Some(details))
    }

    /// Denial of a non-resource URL (e.g. `/api` for a user without discovery rights).
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> Self {
        let message = format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\"");
        Self::failure(403, "Forbidden", message, Some(StatusDetails::default()))
    }

    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::failure(
            404,
            "NotFound",
            format!("{resource} \"{name}\" not found"),
            object_details(resource, name),
        )
    }

    /// A path the emulator does not serve.
    pub fn no_such_path() -> Self {
        Self::failure(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(StatusDetails::default()),
        )
    }

    pub fn already_exists(resource: &str, name: &str) -> Self {
        Self::failure(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
            object_details(resource, name),
        )
    }

    /// An optimistic-concurrency failure: the request carried a stale resourceVersion.
    pub fn conflict(resource: &str, name: &str, why: &str) -> Self {
        Self::failure(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
            object_details(resource, name),
        )
    }

    /// The object changed since the version the client based its write on.
    pub fn stale_object(resource: &str, name: &str) -> Self {
        Self::conflict(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 410 Gone, reason Expired: history the request needs was compacted away.
    pub fn expired(message: String) -> Self {
        Self::failure(410, "Expired", message, None)
    }

    /// A watch from a resourceVersion older than the retained history.
    pub fn too_old_resource_version(requested: u64, oldest: u64) -> Self {
        Self::expired(format!("too old resource version: {requested} ({oldest})"))
    }

    /// 422 Invalid with one cause per `(field, message)`.
    pub fn invalid(resource: &str, name: &str, causes: &[(String, String)]) -> Self {
        let kind = kind_of(resource);
        let texts: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let joined = match texts.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let details = StatusDetails {
            name: Some(name.to_string()),
            group: None,
            kind: Some(kind.to_string()),
            causes: causes
                .iter()
                .map(|(field, message)| StatusCause {
                    reason: cause_reason(message).into(),
                    message: message.clone(),
                    field: field.clone(),
                })
                .collect(),
            ..Default::default()
        };
        Self::failure(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {joined}"),
            Some(details),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::failure(400, "BadRequest", message.into(), None)
    }

    pub fn unsupported_media_type() -> Self {
        Self::failure(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/strategic-merge-patch+json"
                .into(),
            None,
        )
    }

    pub fn method_not_allowed(method: &str, what: &str) -> Self {
        Self::failure(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {what}"),
            Some(StatusDetails::default()),
        )
    }

    /// A read at a resourceVersion the store has not reached (kube-apiserver answers
    /// this after waiting 3 s for its cache).
    pub fn resource_version_too_large(requested: u64, current: u64) -> Self {
        let details = StatusDetails {
            causes: vec![StatusCause {
                reason: "ResourceVersionTooLarge".into(),
                message: "Too large resource version".into(),
                field: String::new(),
            }],
            retry_after_seconds: Some(1),
            ..Default::default()
        };
        Self::failure(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
            Some(details),
        )
    }

    pub fn request_entity_too_large(limit: usize) -> Self {
        Self::failure(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
            None,
        )
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Status serializes")
    }
}

/// The cause reason kube-apiserver's validation attaches to a message.
fn cause_reason(message: &str) -> &'static str {
    if message.starts_with("Required value") {
        "FieldValueRequired"
    } else if message.starts_with("Unsupported value") {
        "FieldValueNotSupported"
    } else if message.starts_with("Forbidden") {
        "FieldValueForbidden"
    } else {
        "FieldValueInvalid"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_matches_kube_apiserver_wording() {
        let status = Status::forbidden(
            "system:serviceaccount:kube-flannel:flannel",
            "patch",
            "nodes/status",
            Some("n1"),
            None,
        );
        let json: Value = serde_json::from_slice(&status.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message":"nodes \"n1\" is forbidden: User \"system:serviceaccount:kube-flannel:flannel\" cannot patch resource \"nodes/status\" in API group \"\" at the cluster scope",
                "reason":"Forbidden","details":{"name":"n1","kind":"nodes"},"code":403})
        );
    }
}
