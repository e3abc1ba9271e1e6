//! The HTTP side: TLS connections, bearer-token authentication, RBAC, routing, and the
//! handlers of discovery, nodes (get, list, watch, create, patch, update, delete) and
//! pods (get and list of none).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::nodes::{self, lock, Scope};
use super::patch::PatchType;
use super::selector::Filter;
use super::status::Status;
use super::store::{event_line, Objects, Store, Unavailable, WatchFrom, RESOURCE};
use super::watch::{self, WatchOptions};
use super::{EmulatorConfig, RequestRecord, User};

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// kube-apiserver's limit on request bodies.
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How long a read at a future resourceVersion waits for the store to get there.
const TOO_LARGE_RV_WAIT: Duration = Duration::from_secs(3);
/// Request log entries kept (the oldest are dropped beyond).
const MAX_LOG: usize = 100_000;

/// State shared by the connections, the emulator's API and the control socket.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub config: EmulatorConfig,
    pub users_by_token: HashMap<String, User>,
    pub log: Mutex<VecDeque<RequestRecord>>,
    /// Bumped to end every open watch.
    pub close_watches: tokio::sync::watch::Sender<u64>,
    /// host:port clients reach the server at (for discovery).
    pub server_address: String,
}

impl Shared {
    pub fn record(&self, record: RequestRecord) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= MAX_LOG {
            log.pop_front();
        }
        log.push_back(record);
    }
}

/// What a path addresses.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Version,
    Health,
    ApiVersions,
    CoreResources,
    ApiGroups,
    Nodes {
        name: Option<String>,
        scope: Scope,
        /// Under `/api/v1/watch/`.
        watch_path: bool,
    },
    Pods {
        namespace: Option<String>,
        name: Option<String>,
    },
    Unknown,
}

fn route(path: &str) -> Target {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let name = |s: &str| Some(s.to_string());
    match segments.as_slice() {
        ["version"] => Target::Version,
        ["healthz" | "livez" | "readyz"] => Target::Health,
        ["api"] => Target::ApiVersions,
        ["api", "v1"] => Target::CoreResources,
        ["apis"] => Target::ApiGroups,
        ["api", "v1", "nodes"] => Target::Nodes {
            name: None,
            scope: Scope::Main,
            watch_path: false,
        },
        ["api", "v1", "nodes", n] => Target::Nodes {
            name: name(n),
            scope: Scope::Main,
            watch_path: false,
        },
        ["api", "v1", "nodes", n, "status"] => Target::Nodes {
            name: name(n),
            scope: Scope::Status,
            watch_path: false,
        },
        ["api", "v1", "watch", "nodes"] => Target::Nodes {
            name: None,
            scope: Scope::Main,
            watch_path: true,
        },
        ["api", "v1", "watch", "nodes", n] => Target::Nodes {
            name: name(n),
            scope: Scope::Main,
            watch_path: true,
        },
        ["api", "v1", "pods"] => Target::Pods {
            namespace: None,
            name: None,
        },
        ["api", "v1", "namespaces", ns, "pods"] => Target::Pods {
            namespace: name(ns),
            name: None,
        },
        ["api", "v1", "namespaces", ns, "pods", n] => Target::Pods {
            namespace: name(ns),
            name: name(n),
        },
        _ => Target::Unknown,
    }
}

fn is_true(value: Option<&String>) -> bool {
    matches!(value.map(String::as_str), Some("true" | "1" | "True"))
}

/// The RBAC verb of a request (kube-apiserver's RequestInfo rules).
fn verb(method: &Method, target: &Target, query: &HashMap<String, String>) -> &'static str {
    let (has_name, watch_path) = match target {
        Target::Nodes {
            name, watch_path, ..
        } => (name.is_some(), *watch_path),
        Target::Pods { name, .. } => (name.is_some(), false),
        _ => (false, false),
    };
    match *method {
        Method::GET | Method::HEAD if watch_path || is_true(query.get("watch")) => "watch",
        Method::GET | Method::HEAD if has_name => "get",
        Method::GET | Method::HEAD => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if has_name => "delete",
        Method::DELETE => "deletecollection",
        _ => "",
    }
}

fn resource_of(target: &Target) -> (&'static str, Option<&str>, Option<&str>) {
    match target {
        Target::Nodes { name, scope, .. } => (scope.resource(), name.as_deref(), None),
        Target::Pods { namespace, name } => ("pods", name.as_deref(), namespace.as_deref()),
        _ => ("", None, None),
    }
}

fn json_response(code: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn status_response(status: &Status) -> Response<Body> {
    let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, status.to_json())
}

/// A chunked body of one chunk (watch responses are chunked even when short).
fn one_chunk(bytes: Bytes) -> Body {
    StreamBody::new(futures::stream::iter([Ok::<_, Infallible>(Frame::data(
        bytes,
    ))]))
    .boxed_unsync()
}

fn authenticate<'a>(shared: &'a Shared, request: &Request<Incoming>) -> Option<&'a User> {
    let header = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    shared.users_by_token.get(token.trim())
}

/// Serves one request and logs it.
pub(crate) async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query_string = request.uri().query().unwrap_or("").to_string();
    let query: HashMap<String, String> = form_urlencoded::parse(query_string.as_bytes())
        .into_owned()
        .collect();
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(CONTENT_TYPE);
    let user_agent = header(USER_AGENT);
    let target = route(&path);
    let verb = verb(&method, &target, &query);
    let (resource, name, namespace) = resource_of(&target);
    let (resource, name, namespace) = (
        resource.to_string(),
        name.map(str::to_string),
        namespace.map(str::to_string),
    );
    let user = authenticate(&shared, &request).cloned();
    let response = match &user {
        None => status_response(&Status::unauthorized()),
        Some(user) => match serve(&shared, user, target, verb, &query, request).await {
            Ok(response) => response,
            Err(status) => status_response(&status),
        },
    };
    shared.record(RequestRecord {
        method: method.to_string(),
        path,
        query: query_string,
        user: user.map(|u| u.name),
        verb: verb.to_string(),
        resource,
        name,
        namespace,
        content_type,
        user_agent,
        code: response.status().as_u16(),
    });
    response
}

async fn serve(
    shared: &Arc<Shared>,
    user: &User,
    target: Target,
    verb: &'static str,
    query: &HashMap<String, String>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Status> {
    let ok = |body: Value| Ok(json_response(StatusCode::OK, body.to_string()));
    // Discovery, version and health are open to every authenticated user
    // (system:discovery, system:public-info-viewer).
    match &target {
        Target::Version => return ok(version()),
        Target::Health => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")).boxed_unsync());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(response);
        }
        Target::ApiVersions => return ok(api_versions(&shared.server_address)),
        Target::CoreResources => return ok(core_resources()),
        Target::ApiGroups => {
            return ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
        }
        Target::Unknown => return Err(Status::no_such_path()),
        Target::Nodes { .. } | Target::Pods { .. } => {}
    }
    let (resource, name, namespace) = resource_of(&target);
    if verb.is_empty() {
        return Err(Status::method_not_allowed(
            request.method().as_str(),
            resource,
        ));
    }
    if !user.can(verb, resource) {
        return Err(Status::forbidden(
            &user.name, verb, resource, name, namespace,
        ));
    }
    match target {
        Target::Nodes {
            name,
            scope,
            watch_path,
        } => serve_nodes(shared, name, scope, watch_path, verb, query, request).await,
        Target::Pods { name, .. } => serve_pods(shared, name, verb),
        _ => unreachable!("non-resource targets are answered above"),
    }
}

fn dry_run(query: &HashMap<String, String>) -> Result<bool, Status> {
    match query.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(Status::bad_request(format!(
            "Invalid dryRun value {other:?}: supported values are \"All\""
        ))),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Status> {
    Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|_| Status::request_entity_too_large(MAX_BODY))
}

fn parse_json(body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body).map_err(|e| {
        Status::bad_request(format!(
            "Node in version \"v1\" cannot be handled as a Node: {e}"
        ))
    })
}

async fn serve_nodes(
    shared: &Arc<Shared>,
    name: Option<String>,
    scope: Scope,
    watch_path: bool,
    verb: &str,
    query: &HashMap<String, String>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Status> {
    let object =
        |stored: Arc<super::store::Stored>, code| Ok(json_response(code, stored.json.clone()));
    let method = request.method().as_str().to_string();
    match (verb, name) {
        ("watch", name) => {
            let filter = match (&name, watch_path) {
                (Some(name), true) => Filter::name(name),
                _ => Filter::parse(
                    query.get("labelSelector").map(String::as_str),
                    query.get("fieldSelector").map(String::as_str),
                )?,
            };
            watch_nodes(shared, query, filter).await
        }
        ("list", None) => list_nodes(shared, query).await,
        ("get", Some(name)) => {
            let stored = lock(&shared.store)
                .get(&name)
                .ok_or_else(|| Status::not_found(RESOURCE, &name))?;
            object(stored, StatusCode::OK)
        }
        ("create", None) => {
            let dry = dry_run(query)?;
            let body = parse_json(&read_body(request).await?)?;
            object(
                nodes::create(&shared.store, body, dry)?,
                StatusCode::CREATED,
            )
        }
        ("patch", Some(name)) => {
            let dry = dry_run(query)?;
            let content_type = request
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let kind = PatchType::from_content_type(&content_type)
                .ok_or_else(Status::unsupported_media_type)?;
            let body = read_body(request).await?;
            object(
                nodes::patch(&shared.store, &name, scope, kind, &body, dry)?,
                StatusCode::OK,
            )
        }
        ("update", Some(name)) => {
            let dry = dry_run(query)?;
            let body = parse_json(&read_body(request).await?)?;
            object(
                nodes::replace(&shared.store, &name, scope, body, dry)?,
                StatusCode::OK,
            )
        }
        ("delete", Some(name)) if scope == Scope::Main => {
            let dry = dry_run(query)?;
            let body = read_body(request).await?;
            let options = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                serde_json::from_slice(&body)
                    .map_err(|e| Status::bad_request(format!("invalid DeleteOptions: {e}")))?
            };
            let deleted = nodes::delete(&shared.store, &name, &options, dry)?;
            let uid = deleted
                .value
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("");
            Ok(status_response(&Status::deleted(RESOURCE, &name, uid)))
        }
        (verb, _) => Err(Status::method_not_allowed(
            &method,
            &format!("{} (verb {verb})", scope.resource()),
        )),
    }
}

fn serve_pods(shared: &Shared, name: Option<String>, verb: &str) -> Result<Response<Body>, Status> {
    match (verb, name) {
        ("get", Some(name)) => Err(Status::not_found("pods", &name)),
        ("list", None) => {
            let rv = lock(&shared.store).resource_version();
            let body = json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": rv.to_string()}, "items": []});
            Ok(json_response(StatusCode::OK, body.to_string()))
        }
        (verb, _) => Err(Status::method_not_allowed(
            verb,
            "pods (the emulator stores no pods: only get and list are served)",
        )),
    }
}

fn parse_rv(value: &str) -> Result<u64, Status> {
    value.parse().map_err(|_| {
        Status::bad_request(format!(
            "resourceVersion: Invalid value: {value:?}: must be an unsigned integer"
        ))
    })
}

/// Continue tokens as kube-apiserver makes them: base64url of
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"<next key>"}`.
fn encode_continue(rv: u64, last_name: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_name}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), Status> {
    let invalid = || Status::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&raw).map_err(|_| invalid())?;
    if value["v"] != "meta.k8s.io/v1" {
        return Err(invalid());
    }
    let rv = value["rv"]
        .as_u64()
        .filter(|rv| *rv > 0)
        .ok_or_else(invalid)?;
    let start = value["start"].as_str().ok_or_else(invalid)?.to_string();
    Ok((rv, start))
}

/// Waits (at most 3 s, like kube-apiserver) for the store to reach version `rv`.
async fn wait_for_version(shared: &Shared, rv: u64) -> Result<(), Status> {
    let deadline = tokio::time::Instant::now() + TOO_LARGE_RV_WAIT;
    loop {
        let current = lock(&shared.store).resource_version();
        if current >= rv {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Status::resource_version_too_large(rv, current));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CONTINUE_TOO_OLD: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter, or use \
    the continue token in this response to retrieve the remainder of the results. Continuing \
    with the provided token results in an inconsistent list - objects that were created, \
    modified, or deleted between the time the first chunk was returned and now may show up in \
    the list.";

/// GET /api/v1/nodes with kube-apiserver's resourceVersion, resourceVersionMatch,
/// limit and continue semantics.
async fn list_nodes(
    shared: &Shared,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, Status> {
    let param = |key: &str| query.get(key).map(String::as_str).filter(|v| !v.is_empty());
    let filter = Filter::parse(param("labelSelector"), param("fieldSelector"))?;
    let mut limit = match param("limit") {
        Some(l) => match l.parse::<i64>() {
            Ok(l) if l > 0 => Some(l as usize),
            Ok(_) => None,
            Err(_) => return Err(Status::bad_request(format!("invalid limit {l:?}"))),
        },
        None => None,
    };
    let rv = param("resourceVersion");
    let rv_match = param("resourceVersionMatch");
    let continue_token = param("continue");
    if continue_token.is_some() && rv.is_some_and(|rv| rv != "0") {
        return Err(Status::bad_request(
            "specifying resource version is not allowed when using continue",
        ));
    }
    if rv_match.is_some() && rv.is_none() {
        return Err(Status::bad_request(
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if !matches!(rv_match, None | Some("NotOlderThan" | "Exact")) {
        return Err(Status::bad_request(format!(
            "resourceVersionMatch: Unsupported value: {:?}: supported values: \"Exact\", \"NotOlderThan\"",
            rv_match.unwrap_or_default()
        )));
    }
    if rv_match == Some("Exact") && rv == Some("0") {
        return Err(Status::bad_request(
            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
        ));
    }

    let (snapshot, at, start): (Arc<Objects>, u64, Option<String>) =
        if let Some(token) = continue_token {
            let (at, start) = decode_continue(token)?;
            let snapshot = lock(&shared.store).snapshot_at(at).map_err(|e| match e {
                Unavailable::Compacted { .. } => Status::expired(CONTINUE_TOO_OLD.into()),
                Unavailable::TooLarge { .. } => {
                    Status::bad_request(format!("continue key is not valid: {token:?}"))
                }
            })?;
            (snapshot, at, Some(start))
        } else {
            match (rv, rv_match) {
                (None, _) => {
                    let (objects, at) = lock(&shared.store).current();
                    (objects, at, None)
                }
                // "Any" version: served from the cache, where limit does not apply.
                (Some("0"), _) => {
                    limit = None;
                    let (objects, at) = lock(&shared.store).current();
                    (objects, at, None)
                }
                (Some(n), m) if m == Some("Exact") || (m.is_none() && limit.is_some()) => {
                    let n = parse_rv(n)?;
                    wait_for_version(shared, n).await?;
                    let snapshot = lock(&shared.store).snapshot_at(n).map_err(|e| match e {
                        Unavailable::Compacted { .. } => Status::expired(
                            "The resourceVersion for the provided list is too old.".into(),
                        ),
                        Unavailable::TooLarge { current } => {
                            Status::resource_version_too_large(n, current)
                        }
                    })?;
                    (snapshot, n, None)
                }
                (Some(n), _) => {
                    wait_for_version(shared, parse_rv(n)?).await?;
                    let (objects, at) = lock(&shared.store).current();
                    (objects, at, None)
                }
            }
        };

    let mut body = Vec::with_capacity(snapshot.len() * 1024 + 256);
    let mut items = 0usize;
    let mut last: Option<&str> = None;
    let mut more = false;
    let range = match &start {
        Some(start) => {
            snapshot.range::<str, _>((Bound::Included(start.as_str()), Bound::Unbounded))
        }
        None => snapshot.range::<str, _>((Bound::Unbounded, Bound::Unbounded)),
    };
    let mut range = range.peekable();
    body.extend_from_slice(b"[");
    while let Some((name, object)) = range.next() {
        if filter.matches(&object.value) {
            if items > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&object.bare);
            items += 1;
            last = Some(name);
        }
        if limit.is_some_and(|l| items == l) && range.peek().is_some() {
            more = true;
            break;
        }
    }
    body.extend_from_slice(b"]}");
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if more {
        if let Some(last) = last {
            metadata["continue"] = encode_continue(at, last).into();
            if filter.is_empty() {
                let remaining = snapshot
                    .range::<str, _>((Bound::Excluded(last), Bound::Unbounded))
                    .count();
                metadata["remainingItemCount"] = remaining.into();
            }
        }
    }
    let mut out =
        format!(r#"{{"kind":"NodeList","apiVersion":"v1","metadata":{metadata},"items":"#)
            .into_bytes();
    out.extend_from_slice(&body);
    Ok(json_response(StatusCode::OK, out))
}

/// A watch of nodes (`?watch=true` or `/watch/nodes`).
async fn watch_nodes(
    shared: &Arc<Shared>,
    query: &HashMap<String, String>,
    filter: Filter,
) -> Result<Response<Body>, Status> {
    let param = |key: &str| query.get(key).map(String::as_str).filter(|v| !v.is_empty());
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let send_initial = param("sendInitialEvents").map(|v| v == "true" || v == "1");
    let rv_match = param("resourceVersionMatch");
    let rv = param("resourceVersion");
    if send_initial.is_some() && rv_match != Some("NotOlderThan") {
        return Err(Status::bad_request(
            "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
        ));
    }
    if send_initial == Some(true) && !bookmarks {
        return Err(Status::bad_request(
            "sendInitialEvents requires setting allowWatchBookmarks to true",
        ));
    }
    if rv_match.is_some() && send_initial.is_none() {
        return Err(Status::bad_request(
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let timeout = match param("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| Status::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => {
            let (min, max) = shared.config.watch_timeout;
            if max > min {
                rand::random_range(min..=max)
            } else {
                min
            }
        }
    };
    let from = match (rv, send_initial) {
        (None | Some("0"), initial) => WatchFrom::Now {
            initial: initial.unwrap_or(true),
        },
        (Some(n), Some(true)) => {
            wait_for_version(shared, parse_rv(n)?).await?;
            WatchFrom::Now { initial: true }
        }
        (Some(n), _) => {
            let n = parse_rv(n)?;
            wait_for_version(shared, n).await?;
            WatchFrom::After(n)
        }
    };
    let registration = lock(&shared.store).watch(from);
    let body = match registration {
        Ok(registration) => watch::body(
            shared.clone(),
            registration,
            WatchOptions {
                filter,
                bookmarks,
                timeout,
                initial_events_end: send_initial == Some(true),
            },
        ),
        // kube-apiserver answers a watch from a compacted version with 200 and a single
        // ERROR event.
        Err(Unavailable::Compacted { oldest }) => {
            let requested = if let WatchFrom::After(n) = from { n } else { 0 };
            let status = Status::too_old_resource_version(requested, oldest);
            one_chunk(event_line("ERROR", &status.to_json()))
        }
        Err(Unavailable::TooLarge { current }) => {
            let requested = if let WatchFrom::After(n) = from { n } else { 0 };
            return Err(Status::resource_version_too_large(requested, current));
        }
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
        "minCompatibilityMajor": "1", "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0", "gitCommit": "weft-apiserver-emulator", "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc",
        "platform": "linux/amd64"
    })
}

fn api_versions(server_address: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]})
}

fn core_resources() -> Value {
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["no"]},
        {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node",
         "verbs": ["get", "patch", "update"]},
        {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
         "verbs": ["get", "list"], "shortNames": ["po"]}
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_verbs_follow_request_info_rules() {
        let q = |s: &str| -> HashMap<String, String> {
            form_urlencoded::parse(s.as_bytes()).into_owned().collect()
        };
        let status = route("/api/v1/nodes/n1/status");
        assert_eq!(resource_of(&status), ("nodes/status", Some("n1"), None));
        assert_eq!(verb(&Method::PATCH, &status, &q("")), "patch");
        let all = route("/api/v1/nodes");
        assert_eq!(verb(&Method::GET, &all, &q("watch=true")), "watch");
        assert_eq!(verb(&Method::GET, &all, &q("limit=5")), "list");
        assert_eq!(
            verb(&Method::GET, &route("/api/v1/watch/nodes/n1"), &q("")),
            "watch"
        );
        assert_eq!(
            resource_of(&route("/api/v1/namespaces/kube-flannel/pods/p")),
            ("pods", Some("p"), Some("kube-flannel"))
        );
        assert_eq!(route("/api/v1/services"), Target::Unknown);
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "n7");
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, "n7\u{0}".to_string())
        );
        assert_eq!(decode_continue("bm9wZQ").unwrap_err().code, 400);
    }
}
