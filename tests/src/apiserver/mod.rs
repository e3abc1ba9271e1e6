//! A Kubernetes API server emulator for weft's tests: Nodes (and the little else a
//! network agent touches), served over HTTPS the way kube-apiserver serves them, so that
//! an unmodified kube-rs client (and so `weft agent --kube-subnet-mgr`) talks to it with
//! nothing but a kubeconfig.
//!
//! What it follows: bearer-token users with RBAC rules (401/403 worded like
//! kube-apiserver's); one global resourceVersion; list with `limit`/`continue` over a
//! consistent snapshot; watch from a version with a bounded history (410 Expired beyond
//! it), synthetic ADDED events for an unset version, bookmarks, `timeoutSeconds`,
//! streaming lists (`sendInitialEvents`); strategic merge, JSON merge and JSON patches,
//! with the `nodes` / `nodes/status` split; metav1.Status errors throughout.
//!
//! Faults for tests: stop and restart listening, close every watch, compact the
//! history; and a log of every request (who did what, with which answer).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use weft_tests::apiserver::{Emulator, EmulatorConfig, User};
//! let emulator = Emulator::start(EmulatorConfig {
//!     users: vec![User::flannel("flannel-token")],
//!     ..Default::default()
//! })
//! .await?;
//! let client = emulator.client(weft_tests::apiserver::FLANNEL_USER).await?;
//! # Ok(()) }
//! ```
//!
//! As a process (`weft-apiserver`), the same emulator is driven through a Unix socket
//! with [`ControlClient`].

// Handlers return metav1.Status errors by value: they are the answers themselves, and an
// emulator's error path is not hot.
#![allow(clippy::result_large_err)]

mod control;
mod nodes;
mod patch;
mod selector;
mod server;
mod status;
mod store;
mod tls;
mod watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch as signal;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use control::{serve_control, ControlClient, CONTROL_SOCKET};
pub use status::{Status, StatusCause, StatusDetails};

use nodes::{lock, Scope};
use server::Shared;
use store::Store;

/// The user every emulator has, allowed everything.
pub const ADMIN: &str = "admin";
/// flannel's service account, as RBAC names it.
pub const FLANNEL_USER: &str = "system:serviceaccount:kube-flannel:flannel";
/// The CA certificate's file name in the directory of [`Emulator::write_files`].
pub const CA_FILE: &str = "ca.crt";

/// An RBAC rule of the core API group: these verbs on these resources ("*" for any;
/// a subresource is its own resource, e.g. "nodes/status", or "nodes/*").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub resources: Vec<String>,
}

impl Rule {
    pub fn new(verbs: &[&str], resources: &[&str]) -> Self {
        Rule {
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            resources: resources.iter().map(|r| r.to_string()).collect(),
        }
    }

    pub fn allows(&self, verb: &str, resource: &str) -> bool {
        let verb_ok = self.verbs.iter().any(|v| v == "*" || v == verb);
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || r == resource
                || r.strip_suffix("/*")
                    .is_some_and(|base| resource.split_once('/').is_some_and(|(b, _)| b == base))
        });
        verb_ok && resource_ok
    }
}

/// A user: the bearer token that authenticates it and what RBAC allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub token: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl User {
    pub fn new(name: &str, token: &str, rules: Vec<Rule>) -> Self {
        User {
            name: name.into(),
            token: token.into(),
            rules,
        }
    }

    /// [`ADMIN`], allowed every verb on every resource.
    pub fn admin(token: &str) -> Self {
        User::new(ADMIN, token, vec![Rule::new(&["*"], &["*"])])
    }

    /// flannel's service account with the ClusterRole of kube-flannel.yml: pods get,
    /// nodes get/list/watch, nodes/status patch.
    pub fn flannel(token: &str) -> Self {
        User::new(
            FLANNEL_USER,
            token,
            vec![
                Rule::new(&["get"], &["pods"]),
                Rule::new(&["get", "list", "watch"], &["nodes"]),
                Rule::new(&["patch"], &["nodes/status"]),
            ],
        )
    }

    pub fn can(&self, verb: &str, resource: &str) -> bool {
        self.rules.iter().any(|rule| rule.allows(verb, resource))
    }
}

/// One request as the emulator saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// The authenticated user (None: no or unknown token).
    pub user: Option<String>,
    /// The RBAC verb (get, list, watch, create, update, patch, delete, ...).
    pub verb: String,
    /// The RBAC resource with subresource ("nodes", "nodes/status"); empty for
    /// discovery and other non-resource paths.
    pub resource: String,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub content_type: Option<String>,
    pub user_agent: Option<String>,
    /// The HTTP status of the answer (200 for a watch that started).
    pub code: u16,
}

impl RequestRecord {
    pub fn is(&self, verb: &str, resource: &str) -> bool {
        self.verb == verb && self.resource == resource
    }
}

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// Users besides [`ADMIN`] (which is added with a random token unless listed).
    pub users: Vec<User>,
    /// Change events kept for watches that resume from a version (kube-apiserver's
    /// watch cache); older versions answer 410 Expired.
    pub history_limit: usize,
    /// Events a watcher may lag behind before the server closes its watch.
    pub watch_buffer: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (kube-apiserver:
    /// about a minute).
    pub bookmark_interval: Duration,
    /// A watch without `timeoutSeconds` ends after a random time in this range.
    pub watch_timeout: (Duration, Duration),
    /// More names or addresses for the serving certificate.
    pub extra_sans: Vec<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            users: Vec::new(),
            history_limit: 1000,
            watch_buffer: 10_000,
            bookmark_interval: Duration::from_secs(60),
            watch_timeout: (Duration::from_secs(300), Duration::from_secs(600)),
            extra_sans: Vec::new(),
        }
    }
}

struct Listening {
    shutdown: signal::Sender<bool>,
    task: JoinHandle<()>,
}

/// A running emulator. Needs a tokio runtime; everything stops when it is dropped.
pub struct Emulator {
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
    ca_pem: String,
    listening: tokio::sync::Mutex<Option<Listening>>,
}

/// The kubeconfig file of `user` in the directory of [`Emulator::write_files`]
/// (characters other than letters, digits, '-', '_' and '.' become '-').
pub fn kubeconfig_file_name(user: &str) -> String {
    let safe: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{safe}.kubeconfig")
}

/// A kube-rs client from kubeconfig text (as weft's agent builds its own).
pub async fn client_from_kubeconfig(yaml: &str) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml).context("invalid kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .context("kubeconfig")?;
    kube::Client::try_from(config).context("kube client")
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn to_node(value: &Value) -> Node {
    serde_json::from_value(value.clone()).expect("stored nodes are valid Nodes")
}

impl Emulator {
    /// Generates the PKI, binds `config.listen` and serves until dropped.
    pub async fn start(mut config: EmulatorConfig) -> Result<Emulator> {
        if !config.users.iter().any(|u| u.name == ADMIN) {
            config.users.push(User::admin(&random_token()));
        }
        let mut users_by_token = HashMap::new();
        for user in &config.users {
            if users_by_token
                .insert(user.token.clone(), user.clone())
                .is_some()
            {
                anyhow::bail!("two users have the same token (user {:?})", user.name);
            }
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let pki = tls::generate(addr, &config.extra_sans)?;
        let (close_watches, _) = signal::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(config.history_limit, config.watch_buffer)),
            config,
            users_by_token,
            log: Mutex::new(Default::default()),
            close_watches,
            server_address: addr.to_string(),
        });
        let emulator = Emulator {
            shared,
            acceptor: TlsAcceptor::from(pki.server_config),
            addr,
            ca_pem: pki.ca_pem,
            listening: tokio::sync::Mutex::new(None),
        };
        *emulator.listening.lock().await = Some(emulator.serve(listener));
        Ok(emulator)
    }

    fn serve(&self, listener: TcpListener) -> Listening {
        let (shutdown, stop) = signal::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            self.acceptor.clone(),
            self.shared.clone(),
            stop,
        ));
        Listening { shutdown, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://<addr>`, the server of the kubeconfigs.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.shared.users_by_token.values().find(|u| u.name == name)
    }

    /// The users, by name.
    pub fn users(&self) -> Vec<User> {
        let mut users: Vec<User> = self.shared.users_by_token.values().cloned().collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        users
    }

    /// A kubeconfig for `user`: the server URL, the CA (inline) and the user's token.
    pub fn kubeconfig(&self, user: &str) -> Result<String> {
        let user = self
            .user(user)
            .with_context(|| format!("the emulator has no user {user:?}"))?;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let context = format!("{}@weft-lab", user.name);
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "weft-lab", "cluster": {
                "server": self.url(), "certificate-authority-data": ca}}],
            "users": [{"name": user.name, "user": {"token": user.token}}],
            "contexts": [{"name": context, "context": {"cluster": "weft-lab", "user": user.name}}],
            "current-context": context,
        });
        Ok(serde_yaml::to_string(&config)?)
    }

    /// Writes `<dir>/ca.crt` and a kubeconfig per user (see [`kubeconfig_file_name`]).
    pub fn write_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ca = dir.join(CA_FILE);
        std::fs::write(&ca, &self.ca_pem)
            .with_context(|| format!("cannot write {}", ca.display()))?;
        let mut written = vec![ca];
        for user in self.users() {
            let path = dir.join(kubeconfig_file_name(&user.name));
            std::fs::write(&path, self.kubeconfig(&user.name)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }

    /// A kube-rs client authenticated as `user`, built from its kubeconfig.
    pub async fn client(&self, user: &str) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig(user)?).await
    }

    /// Creates a node like `POST /api/v1/nodes` (status included, as kubelet does).
    pub fn create_node(&self, node: &Node) -> Result<Node, Status> {
        let body = serde_json::to_value(node).expect("a Node serializes");
        Ok(to_node(
            &nodes::create(&self.shared.store, body, false)?.value,
        ))
    }

    /// Replaces node `name` by what `change` makes of it (spec, status and metadata);
    /// 409 Conflict if the node changed in between.
    pub fn update_node(&self, name: &str, change: impl FnOnce(&mut Node)) -> Result<Node, Status> {
        let mut node = self
            .node(name)
            .ok_or_else(|| Status::not_found(store::RESOURCE, name))?;
        change(&mut node);
        let body = serde_json::to_value(&node).expect("a Node serializes");
        Ok(to_node(
            &nodes::replace(&self.shared.store, name, Scope::All, body, false)?.value,
        ))
    }

    /// Applies a JSON merge patch to node `name` (spec, status and metadata).
    pub fn patch_node(&self, name: &str, merge_patch: &Value) -> Result<Node, Status> {
        let body = merge_patch.to_string();
        let stored = nodes::patch(
            &self.shared.store,
            name,
            Scope::All,
            patch::PatchType::Merge,
            body.as_bytes(),
            false,
        )?;
        Ok(to_node(&stored.value))
    }

    pub fn delete_node(&self, name: &str) -> Result<(), Status> {
        nodes::delete(&self.shared.store, name, &json!({}), false).map(|_| ())
    }

    pub fn node(&self, name: &str) -> Option<Node> {
        lock(&self.shared.store)
            .get(name)
            .map(|s| to_node(&s.value))
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> Vec<Node> {
        let (objects, _) = lock(&self.shared.store).current();
        objects.values().map(|s| to_node(&s.value)).collect()
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    /// Watches currently open.
    pub fn watcher_count(&self) -> usize {
        lock(&self.shared.store).watcher_count()
    }

    /// Drops the history: a watch or paged list from an older version gets 410 Expired.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Ends every open watch (cleanly, as at a server-side timeout).
    pub fn close_watches(&self) {
        self.shared.close_watches.send_modify(|n| *n += 1);
    }

    /// Closes the listening socket and every connection (watches included): clients
    /// get "connection refused" until [`Emulator::start_listening`].
    pub async fn stop_listening(&self) {
        if let Some(listening) = self.listening.lock().await.take() {
            let _ = listening.shutdown.send(true);
            let _ = listening.task.await;
        }
    }

    /// Listens again on the same address (after [`Emulator::stop_listening`]).
    pub async fn start_listening(&self) -> Result<()> {
        let mut listening = self.listening.lock().await;
        if listening.is_none() {
            let listener = TcpListener::bind(self.addr)
                .await
                .with_context(|| format!("cannot listen on {} again", self.addr))?;
            *listening = Some(self.serve(listener));
        }
        Ok(())
    }

    pub async fn is_listening(&self) -> bool {
        self.listening.lock().await.is_some()
    }

    /// Every request so far (at most the last 100,000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        let log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().cloned().collect()
    }

    pub fn clear_requests(&self) {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(listening) = self.listening.get_mut().take() {
            let _ = listening.shutdown.send(true);
            listening.task.abort();
        }
        self.close_watches();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: signal::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // Dropping a connection closes its socket and ends its watches.
                connections.shutdown().await;
                return;
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(serve_connection(tcp, acceptor.clone(), shared.clone()));
                }
                Err(e) => {
                    tracing::warn!("apiserver emulator: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
    else {
        return;
    };
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(server::handle(shared, request).await) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(tls), service)
        .await;
}
