//! Driving an emulator that runs as a process (`weft-apiserver`): a Unix socket in its
//! state directory, one JSON request per line, one JSON answer per line. A Unix socket
//! is reachable from every network namespace, so the lab drives the emulator in the
//! fabric namespace from anywhere, synchronously, with [`ControlClient`].
//!
//! Requests: `{"op": "compact" | "close_watches" | "stop_listening" | "start_listening" |
//! "requests" | "clear_requests" | "nodes" | "resource_version" | "watchers"}`,
//! `{"op": "node" | "delete_node", "name": ...}`, `{"op": "create_node", "node": {...}}`,
//! `{"op": "create_nodes", "nodes": [...]}`,
//! `{"op": "patch_node", "name": ..., "patch": {...}}` (JSON merge patch).
//! Answers: `{"ok": <result>}` or `{"error": <Status or message>}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use super::{Emulator, RequestRecord, Status};

/// The control socket's file name in the emulator's state directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Serves the control protocol for `emulator` on the Unix socket `path` (replacing a
/// stale socket file) until the task is aborted.
pub async fn serve_control(emulator: Arc<Emulator>, path: &Path) -> Result<JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let emulator = emulator.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match serde_json::from_str::<Value>(&line) {
                        Ok(request) => match dispatch(&emulator, &request).await {
                            Ok(result) => json!({ "ok": result }),
                            Err(error) => json!({ "error": error }),
                        },
                        Err(e) => json!({ "error": format!("not JSON: {e}") }),
                    };
                    let mut bytes = answer.to_string().into_bytes();
                    bytes.push(b'\n');
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    }))
}

fn field<'a>(request: &'a Value, key: &str) -> Result<&'a Value, Value> {
    request
        .get(key)
        .ok_or_else(|| json!(format!("the request lacks {key:?}")))
}

fn name_of(request: &Value) -> Result<&str, Value> {
    field(request, "name")?
        .as_str()
        .ok_or_else(|| json!("\"name\" must be a string"))
}

fn status_error(status: Status) -> Value {
    serde_json::to_value(status).expect("a Status serializes")
}

fn node_json(node: &Node) -> Value {
    serde_json::to_value(node).expect("a Node serializes")
}

async fn dispatch(emulator: &Emulator, request: &Value) -> Result<Value, Value> {
    let op = field(request, "op")?.as_str().unwrap_or("");
    Ok(match op {
        "compact" => {
            emulator.compact();
            Value::Null
        }
        "close_watches" => {
            emulator.close_watches();
            Value::Null
        }
        "stop_listening" => {
            emulator.stop_listening().await;
            Value::Null
        }
        "start_listening" => {
            emulator
                .start_listening()
                .await
                .map_err(|e| json!(format!("{e:#}")))?;
            Value::Null
        }
        "requests" => serde_json::to_value(emulator.requests()).expect("records serialize"),
        "clear_requests" => {
            emulator.clear_requests();
            Value::Null
        }
        "nodes" => Value::Array(emulator.nodes().iter().map(node_json).collect()),
        "node" => emulator
            .node(name_of(request)?)
            .map_or(Value::Null, |n| node_json(&n)),
        "create_node" => {
            let node: Node = serde_json::from_value(field(request, "node")?.clone())
                .map_err(|e| json!(format!("\"node\" is no Node: {e}")))?;
            node_json(&emulator.create_node(&node).map_err(status_error)?)
        }
        "create_nodes" => {
            let nodes: Vec<Node> = serde_json::from_value(field(request, "nodes")?.clone())
                .map_err(|e| json!(format!("\"nodes\" is no list of Nodes: {e}")))?;
            for node in &nodes {
                emulator.create_node(node).map_err(status_error)?;
            }
            nodes.len().into()
        }
        "patch_node" => node_json(
            &emulator
                .patch_node(name_of(request)?, field(request, "patch")?)
                .map_err(status_error)?,
        ),
        "delete_node" => {
            emulator
                .delete_node(name_of(request)?)
                .map_err(status_error)?;
            Value::Null
        }
        "resource_version" => emulator.resource_version().into(),
        "watchers" => emulator.watcher_count().into(),
        other => return Err(json!(format!("unknown op {other:?}"))),
    })
}

/// The synchronous client of a `weft-apiserver` process's control socket.
#[derive(Debug, Clone)]
pub struct ControlClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ControlClient {
    /// The client of the emulator whose state directory (`--dir`) is `dir`.
    pub fn new(dir: &Path) -> Self {
        ControlClient {
            socket: dir.join(CONTROL_SOCKET),
            timeout: Duration::from_secs(15),
        }
    }

    /// Sends one request and returns the `ok` result.
    pub fn call(&self, request: &Value) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach the apiserver emulator's control socket {} (is weft-apiserver running?)",
                self.socket.display()
            )
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .context("no answer from the apiserver emulator's control socket")?;
        let mut answer: Value = serde_json::from_str(&answer)
            .with_context(|| format!("the control socket answered {answer:?}"))?;
        if let Some(error) = answer.get("error") {
            if let Ok(status) = serde_json::from_value::<Status>(error.clone()) {
                return Err(status.into());
            }
            bail!("apiserver emulator: {error}");
        }
        Ok(answer["ok"].take())
    }

    fn op(&self, op: &str) -> Result<Value> {
        self.call(&json!({ "op": op }))
    }

    /// See [`Emulator::compact`].
    pub fn compact(&self) -> Result<()> {
        self.op("compact").map(drop)
    }

    /// See [`Emulator::close_watches`].
    pub fn close_watches(&self) -> Result<()> {
        self.op("close_watches").map(drop)
    }

    /// See [`Emulator::stop_listening`].
    pub fn stop_listening(&self) -> Result<()> {
        self.op("stop_listening").map(drop)
    }

    pub fn start_listening(&self) -> Result<()> {
        self.op("start_listening").map(drop)
    }

    pub fn requests(&self) -> Result<Vec<RequestRecord>> {
        Ok(serde_json::from_value(self.op("requests")?)?)
    }

    pub fn clear_requests(&self) -> Result<()> {
        self.op("clear_requests").map(drop)
    }

    pub fn nodes(&self) -> Result<Vec<Node>> {
        Ok(serde_json::from_value(self.op("nodes")?)?)
    }

    pub fn node(&self, name: &str) -> Result<Option<Node>> {
        Ok(serde_json::from_value(
            self.call(&json!({"op": "node", "name": name}))?,
        )?)
    }

    /// See [`Emulator::create_node`]; a refusal is a [`Status`] error.
    pub fn create_node(&self, node: &Node) -> Result<Node> {
        Ok(serde_json::from_value(
            self.call(&json!({"op": "create_node", "node": node}))?,
        )?)
    }

    /// Creates many nodes in one request (for clusters of thousands); stops at the
    /// first refusal.
    pub fn create_nodes(&self, nodes: &[Node]) -> Result<usize> {
        let created = self.call(&json!({"op": "create_nodes", "nodes": nodes}))?;
        Ok(created.as_u64().context("create_nodes answered no count")? as usize)
    }

    /// See [`Emulator::patch_node`].
    pub fn patch_node(&self, name: &str, merge_patch: &Value) -> Result<Node> {
        Ok(serde_json::from_value(self.call(
            &json!({"op": "patch_node", "name": name, "patch": merge_patch}),
        )?)?)
    }

    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.call(&json!({"op": "delete_node", "name": name}))
            .map(drop)
    }

    pub fn resource_version(&self) -> Result<u64> {
        self.op("resource_version")?
            .as_u64()
            .context("resource_version is not a number")
    }

    /// Watches currently open.
    pub fn watchers(&self) -> Result<usize> {
        Ok(self.op("watchers")?.as_u64().context("not a number")? as usize)
    }
}
