//! The health server (`--healthz-ip`, `--healthz-port`): `/healthz`, `/readyz`, `/metrics`.
//!
//! - `GET /healthz`: 200 `ok` while the process serves (flannel's meaning: a liveness probe),
//! - `GET /readyz`: 200 `ok` once the lease, the dataplane, subnet.env and every peer are in
//!   place, else 503 naming what is missing or failed,
//! - `GET /metrics`: the Prometheus text format 0.0.4 (see [`crate::metrics`]).
//!
//! Served by axum on hyper, one task per connection, with bounds on everything a client
//! controls: the time to send a request head and its size (hyper), the time to answer
//! (tower-http), and how many scrapes render at once. No connection limit: a client holding
//! many idle connections costs a socket each for a few seconds, and never keeps a probe from
//! being answered.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::{debug, info, warn};

use crate::metrics::AgentState;

/// Largest request head (request line and headers) accepted (hyper's smallest buffer).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head; an idle connection is closed after it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to produce an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection, response delivery included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Scrapes of /metrics rendered at once (each reads the BPF counters).
const CONCURRENT_SCRAPES: usize = 4;

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
    let task = tokio::spawn(accept_loop(listener, router(state)));
    Ok(HealthServer { local_addr, task })
}

fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(metrics).layer(ConcurrencyLimitLayer::new(CONCURRENT_SCRAPES)),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz or /metrics\n",
            )
        })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            ANSWER_TIMEOUT,
        ))
        .with_state(state)
}

async fn accept_loop(listener: TcpListener, app: Router) {
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
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BYTES)
                // A client that half-closes after its request still gets the answer.
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "health server: {e}"),
                Err(_) => debug!(%peer, "health server: connection open too long, closed"),
            }
        });
    }
}

async fn readyz(State(state): State<Arc<AgentState>>) -> Response {
    let missing = state.not_ready();
    if missing.is_empty() {
        "ok".into_response()
    } else {
        let body = format!("not ready: {}\n", missing.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<Arc<AgentState>>) -> Response {
    // Reading the BPF counters is a few syscalls: keep them off the executor.
    match tokio::task::spawn_blocking(move || state.render()).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            warn!("health server: rendering the metrics failed: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the metrics failed\n",
            )
                .into_response()
        }
    }
}
