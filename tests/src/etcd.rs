//! A real etcd (/usr/bin/etcd) inside the fabric namespace, and etcdctl against it;
//! optionally serving TLS only and requiring client certificates signed by the lab's CA.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::exec::{wait_until, Cmd};
use crate::pki::EtcdPki;
use crate::process::{tail, NetnsProcess};

/// Address of the fabric bridge, where etcd serves clients.
pub const ETCD_ENDPOINT: &str = "http://198.18.0.254:2379";
/// The same with TLS.
pub const ETCD_TLS_ENDPOINT: &str = "https://198.18.0.254:2379";

/// etcd's TLS files: its CA (also the one that signs clients), its serving certificate,
/// and a client certificate for etcdctl.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: std::path::PathBuf,
    pub server: crate::pki::CertFiles,
    pub client: crate::pki::CertFiles,
}

impl From<&EtcdPki> for EtcdTlsFiles {
    fn from(pki: &EtcdPki) -> Self {
        EtcdTlsFiles {
            ca: pki.ca.cert.clone(),
            server: pki.server.clone(),
            client: pki.client.clone(),
        }
    }
}

pub struct Etcd {
    ns: String,
    process: NetnsProcess,
    tls: Option<EtcdTlsFiles>,
}

impl Etcd {
    /// Starts etcd in namespace `ns` (which holds 198.18.0.254 and a loopback that is up),
    /// data in `data_dir`, log in `log`, and waits until it reports healthy (at most 15 s).
    /// With `tls`, it serves https only and requires client certificates signed by the CA.
    pub fn start(ns: &str, data_dir: &Path, log: &Path, tls: Option<EtcdTlsFiles>) -> Result<Self> {
        let peer = "http://127.0.0.1:2380";
        let endpoint = if tls.is_some() {
            ETCD_TLS_ENDPOINT
        } else {
            ETCD_ENDPOINT
        };
        let mut args: Vec<String> = [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &data_dir.to_string_lossy(),
            "--listen-client-urls",
            endpoint,
            "--advertise-client-urls",
            endpoint,
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
        if let Some(tls) = &tls {
            for (flag, path) in [
                ("--cert-file", &tls.server.cert),
                ("--key-file", &tls.server.key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.push(flag.to_string());
                args.push(path.to_string_lossy().into_owned());
            }
            args.push("--client-cert-auth".to_string());
        }
        let process = NetnsProcess::spawn("etcd", ns, &args, &[], log)?;
        let mut etcd = Etcd {
            ns: ns.to_string(),
            process,
            tls,
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
        let mut line: Vec<String> = [
            "etcdctl",
            "--endpoints",
            self.endpoint(),
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cacert", &tls.ca),
                ("--cert", &tls.client.cert),
                ("--key", &tls.client.key),
            ] {
                line.push(flag.to_string());
                line.push(path.to_string_lossy().into_owned());
            }
        }
        line.extend(args.iter().map(|s| s.to_string()));
        Cmd::new(line)
            .netns(&self.ns)
            .env("ETCDCTL_API", "3")
            .timeout(timeout)
            .run()
    }

    /// The URL clients use (`https://` with TLS).
    pub fn endpoint(&self) -> &'static str {
        if self.tls.is_some() {
            ETCD_TLS_ENDPOINT
        } else {
            ETCD_ENDPOINT
        }
    }

    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    pub fn log(&self) -> &Path {
        self.process.log()
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }
}
