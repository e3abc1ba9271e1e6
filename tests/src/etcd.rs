//! A real etcd (/usr/bin/etcd) inside the fabric namespace, and etcdctl against it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::exec::{wait_until, Cmd};
use crate::process::{tail, NetnsProcess};

/// Address of the fabric bridge, where etcd serves clients.
pub const ETCD_ENDPOINT: &str = "http://198.18.0.254:2379";

pub struct Etcd {
    ns: String,
    process: NetnsProcess,
}

impl Etcd {
    /// Starts etcd in namespace `ns` (which holds 198.18.0.254 and a loopback that is up),
    /// data in `data_dir`, log in `log`, and waits until it reports healthy (at most 15 s).
    pub fn start(ns: &str, data_dir: &Path, log: &Path) -> Result<Self> {
        let peer = "http://127.0.0.1:2380";
        let args: Vec<String> = [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--listen-client-urls",
            ETCD_ENDPOINT,
            "--advertise-client-urls",
            ETCD_ENDPOINT,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            &format!("lab={peer}"),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = NetnsProcess::spawn("etcd", ns, &args, &[], log)?;
        let mut etcd = Etcd {
            ns: ns.to_string(),
            process,
        };
        let healthy = wait_until("etcd to report healthy", Duration::from_secs(15), || {
            if let Some(status) = etcd.process.exit_status() {
                anyhow::bail!("etcd exited ({status})");
            }
            Ok(etcd
                .ctl_with_timeout(&["endpoint", "health"], Duration::from_secs(3))
                .is_ok())
        });
        healthy.with_context(|| format!("etcd log tail:\n{}", tail(log, 20)))?;
        Ok(etcd)
    }

    /// Runs `etcdctl <args>` against the lab's etcd (v3 API) and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        self.ctl_with_timeout(args, Duration::from_secs(10))
    }

    fn ctl_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut line = vec![
            "etcdctl",
            "--endpoints",
            ETCD_ENDPOINT,
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "5s",
        ];
        line.extend_from_slice(args);
        Cmd::new(line)
            .netns(&self.ns)
            .env("ETCDCTL_API", "3")
            .timeout(timeout)
            .run()
    }

    pub fn log(&self) -> &Path {
        self.process.log()
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }
}
