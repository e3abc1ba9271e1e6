//! The health server (`--healthz-ip`, `--healthz-port`): `/healthz`, `/readyz`, `/metrics`.
//!
//! - `GET /healthz`: 200 `ok` while the process serves (flannel's meaning: a liveness probe),
//! - `GET /readyz`: 200 `ok` once the lease, the dataplane and subnet.env are in place, else
//!   503 naming what is missing,
//! - `GET /metrics`: the Prometheus text format 0.0.4 (see [`crate::metrics`]).
//!
//! A minimal HTTP/1.1 server: one request per connection (`Connection: close`), headers
//! bounded in size and time, a bounded number of connections, so a slow or hostile client
//! costs a task and a socket for a few seconds and never the agent's event loop.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::metrics::AgentState;

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// A running health server. It stops with the runtime, or with [`HealthServer::stop`].
pub struct HealthServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HealthServer {
    /// The address it listens on (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Starts the server on `--healthz-ip`:`--healthz-port`; `None` when the port is 0 (off).
pub async fn start(
    ip: Ipv4Addr,
    port: u16,
    state: Arc<AgentState>,
) -> Result<Option<HealthServer>> {
    if port == 0 {
        return Ok(None);
    }
    serve(SocketAddrV4::new(ip, port).into(), state)
        .await
        .map(Some)
}

/// Binds `addr` and serves in a background task.
pub async fn serve(addr: SocketAddr, state: Arc<AgentState>) -> Result<HealthServer> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the health server to {addr} (--healthz-ip, --healthz-port): choose a free \
             --healthz-port, or 0 to turn the server off"
        )
    })?;
    let local_addr = listener.local_addr()?;
    info!(addr = %local_addr, "health server listening (/healthz, /readyz, /metrics)");
    let task = tokio::spawn(accept_loop(listener, state));
    Ok(HealthServer { local_addr, task })
}

async fn accept_loop(listener: TcpListener, state: Arc<AgentState>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!("health server: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "health server: too many connections, closing this one");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &state).await {
                debug!(%peer, "health server: {e:#}");
            }
            drop(slot);
        });
    }
}

/// A response: status, content type, body.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Extra header lines (each ending in CRLF).
    headers: &'static str,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            headers: "",
        }
    }
}

async fn handle(mut stream: TcpStream, state: &Arc<AgentState>) -> Result<()> {
    let (response, with_body) =
        match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
            Err(_elapsed) => (Response::text(408, "request timeout\n"), true),
            Ok(Err(e)) => return Err(e.context("reading the request")),
            Ok(Ok(None)) => return Ok(()), // closed without a request
            Ok(Ok(Some(Err(too_large)))) => (too_large, true),
            Ok(Ok(Some(Ok(head)))) => match parse_request_line(&head) {
                Ok((method, path)) => (route(method, path, state).await, method != "HEAD"),
                Err(malformed) => (malformed, true),
            },
        };
    tokio::time::timeout(WRITE_TIMEOUT, respond(&mut stream, response, with_body))
        .await
        .context("the client did not take the response in time")??;
    drain(&mut stream).await;
    Ok(())
}

/// Reads what the client still sends, briefly: closing a socket with unread input resets
/// the connection, and the reset can destroy the response before the client reads it.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Reads up to the end of the request head. `Ok(None)`: the client closed without sending
/// anything. `Err(response)` inside: the head is too large.
async fn read_head(stream: &mut TcpStream) -> Result<Option<Result<String, Response>>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            // A head cut short: answer what it asked if the request line is complete.
            return Ok(Some(Ok(String::from_utf8_lossy(&head).into_owned())));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Some(Ok(String::from_utf8_lossy(&head).into_owned())));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(Some(Err(Response::text(
                431,
                format!("request head larger than {MAX_REQUEST_BYTES} bytes\n"),
            ))));
        }
    }
}

/// Where the head ends: the first empty line (CRLF CRLF, or bare LF LF).
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `METHOD SP target SP HTTP/1.x` → (method, path without the query).
fn parse_request_line(head: &str) -> Result<(&str, &str), Response> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::text(400, "malformed request line\n"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(Response::text(400, "malformed request line\n"));
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Ok((method, path))
}

async fn route(method: &str, path: &str, state: &Arc<AgentState>) -> Response {
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !known {
        return Response::text(404, "not found: try /healthz, /readyz or /metrics\n");
    }
    if method != "GET" && method != "HEAD" {
        return Response {
            headers: "Allow: GET, HEAD\r\n",
            ..Response::text(405, "method not allowed: use GET\n")
        };
    }
    match path {
        "/healthz" => Response::text(200, "ok"),
        "/readyz" => {
            let missing = state.not_ready();
            if missing.is_empty() {
                Response::text(200, "ok")
            } else {
                Response::text(503, format!("not ready: {}\n", missing.join(", ")))
            }
        }
        _ => {
            // Reading the BPF counters is a few syscalls: keep them off the executor.
            let state = state.clone();
            match tokio::task::spawn_blocking(move || state.render()).await {
                Ok(text) => Response {
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    ..Response::text(200, text)
                },
                Err(e) => {
                    warn!("health server: rendering the metrics failed: {e}");
                    Response::text(500, "rendering the metrics failed\n")
                }
            }
        }
    }
}

async fn respond(stream: &mut TcpStream, response: Response, with_body: bool) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len(),
        response.headers,
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(response.body.as_bytes()).await?;
    }
    stream.shutdown().await?;
    Ok(())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a").ok(),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line("HEAD /healthz HTTP/1.0").ok(),
            Some(("HEAD", "/healthz"))
        );
        for bad in [
            "",
            "GET",
            "GET /healthz",
            "GET /healthz HTTP/2",
            "GET healthz HTTP/1.1",
            "GET  /healthz HTTP/1.1",
            "\u{0}\u{1} x y",
        ] {
            assert_eq!(
                parse_request_line(bad).err().map(|r| r.status),
                Some(400),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_head_ends_at_the_first_empty_line() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
            Some(20)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
