//! The Kubernetes API server emulator as a process, for the lab (which runs it in its
//! fabric namespace on 198.18.0.254:6443):
//!
//!     weft-apiserver --listen 198.18.0.254:6443 --dir STATE [--users users.json]
//!
//! writes STATE/ca.crt and STATE/<user>.kubeconfig for every user (always `admin`,
//! allowed everything), listens on STATE/control.sock for the lab's commands
//! (`weft_tests::apiserver::ControlClient`), prints "ready <url>" on stdout once it
//! serves, and serves until killed. users.json: `[{"name": ..., "token": ...,
//! "rules": [{"verbs": ["get"], "resources": ["nodes"]}]}]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use weft_tests::apiserver::{serve_control, Emulator, EmulatorConfig, User, CONTROL_SOCKET};

#[derive(Debug, Parser)]
#[command(
    name = "weft-apiserver",
    about = "A Kubernetes API server emulator (nodes) for weft's lab"
)]
struct Args {
    /// Address and port to serve HTTPS on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// State directory: ca.crt, one kubeconfig per user, control.sock.
    #[arg(long)]
    dir: PathBuf,
    /// JSON file with the users besides admin: [{"name", "token", "rules": [{"verbs", "resources"}]}].
    #[arg(long)]
    users: Option<PathBuf>,
    /// Add flannel's service account (kube-flannel.yml's ClusterRole) with this token.
    #[arg(long)]
    flannel_token: Option<String>,
    /// Change events kept for watches that resume from a resourceVersion.
    #[arg(long, default_value_t = 1000)]
    history: usize,
    /// Events a watcher may lag behind before its watch is closed.
    #[arg(long, default_value_t = 10_000)]
    watch_buffer: usize,
    /// Milliseconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 60_000)]
    bookmark_interval_ms: u64,
    /// A watch without timeoutSeconds ends after a random time between these (seconds).
    #[arg(long, default_value_t = 300)]
    min_watch_timeout: u64,
    #[arg(long, default_value_t = 600)]
    max_watch_timeout: u64,
    /// More names or addresses for the serving certificate (repeatable).
    #[arg(long)]
    san: Vec<String>,
}

fn read_users(args: &Args) -> Result<Vec<User>> {
    let mut users: Vec<User> = match &args.users {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--users: cannot read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "--users {}: expected [{{\"name\": ..., \"token\": ..., \"rules\": [{{\"verbs\": [...], \"resources\": [...]}}]}}]",
                    path.display()
                )
            })?
        }
        None => Vec::new(),
    };
    if let Some(token) = &args.flannel_token {
        users.push(User::flannel(token));
    }
    Ok(users)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = EmulatorConfig {
        listen: args.listen,
        users: read_users(&args)?,
        history_limit: args.history,
        watch_buffer: args.watch_buffer,
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms.max(1)),
        watch_timeout: (
            Duration::from_secs(args.min_watch_timeout),
            Duration::from_secs(args.max_watch_timeout.max(args.min_watch_timeout)),
        ),
        extra_sans: args.san.clone(),
    };
    let emulator = Arc::new(Emulator::start(config).await?);
    emulator.write_files(&args.dir)?;
    let socket = args.dir.join(CONTROL_SOCKET);
    let control = serve_control(emulator.clone(), &socket).await?;
    println!("ready {}", emulator.url());
    tracing::info!(
        "serving on {}, state in {}",
        emulator.url(),
        args.dir.display()
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    control.abort();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
