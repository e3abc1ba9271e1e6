//! TLS to etcd with flanneld's `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile`.
//!
//! The files are read and checked before the first connection, so that a file that cannot
//! be read, holds no PEM, has expired or does not match its key is named with its fix
//! rather than surfacing as a handshake failure. What only the handshake can tell (etcd's
//! certificate not signed by our CA, etcd refusing our certificate) is translated from
//! the TLS error into the flag to change.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Result};
use etcd_client::{Certificate, Identity, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, InconsistentKeys};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The TLS flags as given.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
}

impl TlsFiles {
    pub fn any(&self) -> bool {
        self.cafile.is_some() || self.certfile.is_some() || self.keyfile.is_some()
    }
}

fn read(flag: &str, path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        anyhow!(
            "cannot read {flag} {}: {e}; give the path of {what}, readable by the user the agent runs as",
            path.display()
        )
    })
}

/// The TLS files, read and checked.
pub struct EtcdTls {
    files: TlsFiles,
    ca_pem: Option<Vec<u8>>,
    /// The client certificate chain and key (PEM).
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Why a direct TLS probe of one endpoint failed.
pub enum ProbeFailure {
    /// A TLS problem, explained with the flag to fix.
    Tls(String),
    /// The server does not speak the TLS versions offered.
    Version,
    /// Anything else (etcd not listening, no route): the regular connect reports it.
    Other(String),
}

/// How long the direct probe may take per endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdTls {
    /// Reads and checks the files named by the flags, at time `now`.
    pub fn load(files: &TlsFiles, now: SystemTime) -> Result<EtcdTls> {
        let mut ca_pem = None;
        if let Some(path) = &files.cafile {
            let pem = read(
                "--etcd-cafile",
                path,
                "the PEM file of the CA that signed etcd's server certificate",
            )?;
            let certs = parse_certs(&pem).map_err(|e| {
                anyhow!("--etcd-cafile {}: {e}; give the PEM file of the CA that signed etcd's server certificate", path.display())
            })?;
            if certs.is_empty() {
                bail!(
                    "--etcd-cafile {} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give the CA that signed etcd's server certificate",
                    path.display()
                );
            }
            ca_pem = Some(pem);
        }
        let identity = match (&files.certfile, &files.keyfile) {
            (None, None) => None,
            (Some(_), None) => bail!(
                "--etcd-certfile is set without --etcd-keyfile: give both the client certificate and its private key, or neither"
            ),
            (None, Some(_)) => bail!(
                "--etcd-keyfile is set without --etcd-certfile: give both the client certificate and its private key, or neither"
            ),
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read(
                    "--etcd-certfile",
                    cert_path,
                    "the PEM file of this node's etcd client certificate",
                )?;
                let key_pem = read(
                    "--etcd-keyfile",
                    key_path,
                    "the PEM file of the client certificate's private key",
                )?;
                check_identity(cert_path, &cert_pem, key_path, &key_pem, now)?;
                Some((cert_pem, key_pem))
            }
        };
        Ok(EtcdTls {
            files: files.clone(),
            ca_pem,
            identity,
        })
    }

    /// The settings for etcd-client's channel.
    pub fn options(&self) -> TlsOptions {
        let mut tls = TlsOptions::new();
        tls = match &self.ca_pem {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            // As flanneld: without a CA file, the host's trust store.
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }

    /// The same settings for a direct rustls connection, limited to `versions`.
    fn rustls_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_pem {
            Some(pem) => {
                for cert in parse_certs(pem)? {
                    roots.add(cert)?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(parse_certs(cert)?, PrivateKeyDer::from_pem_slice(key)?)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Connects to `endpoint` (https) directly and asks for `/version` over HTTP/2, so that
    /// a TLS failure surfaces with its cause: etcd-client's balanced channel only retries
    /// and never says why. TLS 1.2 first: there the server judges our certificate inside
    /// the handshake, whereas TLS 1.3 reports it after, racing our first write.
    pub async fn probe(&self, endpoint: &str) -> std::result::Result<(), ProbeFailure> {
        let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
        let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let first = self.probe_with(endpoint, tls12).await;
        match &first {
            // etcd without TLS 1.2 (etcd's --tls-min-version=TLS1.3).
            Err(ProbeFailure::Other(_)) | Err(ProbeFailure::Version) => {
                self.probe_with(endpoint, tls13).await
            }
            _ => first,
        }
    }

    async fn probe_with(
        &self,
        endpoint: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> std::result::Result<(), ProbeFailure> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe_inner(endpoint, versions)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeFailure::Other(format!(
                "no answer within {PROBE_TIMEOUT:?}"
            ))),
        }
    }

    async fn probe_inner(
        &self,
        endpoint: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> std::result::Result<(), ProbeFailure> {
        let other = |e: &dyn std::fmt::Display| ProbeFailure::Other(e.to_string());
        let uri: hyper::Uri = endpoint.parse().map_err(|e| other(&e))?;
        let host = uri
            .host()
            .ok_or_else(|| ProbeFailure::Other(format!("{endpoint} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(2379);
        let config = self.rustls_config(versions).map_err(|e| other(&e))?;
        let server_name = ServerName::try_from(host.clone()).map_err(|e| other(&e))?;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| other(&e))?;
        let classify = |e: &(dyn StdError + 'static)| {
            if rustls_error(e).is_some_and(|e| {
                matches!(
                    e,
                    rustls::Error::AlertReceived(AlertDescription::ProtocolVersion)
                        | rustls::Error::PeerIncompatible(_)
                )
            }) {
                return ProbeFailure::Version;
            }
            match explain(e, &self.files, endpoint) {
                Some(why) => ProbeFailure::Tls(why),
                None => ProbeFailure::Other(e.to_string()),
            }
        };
        let tls = TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| classify(&e))?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .map_err(|e| classify(&e))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(format!(
            "https://{}/version",
            uri.authority().map(|a| a.as_str()).unwrap_or(&host)
        ))
        .body(String::new())
        .map_err(|e| other(&e))?;
        let answer = sender.send_request(request).await;
        driver.abort();
        answer.map(|_| ()).map_err(|e| classify(&e))
    }
}

fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("not a readable PEM file ({e})"))
}

/// The client certificate is current, meant for clients, and `key` is its private key.
fn check_identity(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    now: SystemTime,
) -> Result<()> {
    let certfile = cert_path.display();
    let keyfile = key_path.display();
    let chain = parse_certs(cert_pem)
        .map_err(|e| anyhow!("--etcd-certfile {certfile}: {e}; give the PEM client certificate"))?;
    let Some(leaf) = chain.first() else {
        bail!("--etcd-certfile {certfile} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give this node's etcd client certificate");
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        anyhow!("--etcd-certfile {certfile}: the first certificate does not parse ({e}); give this node's etcd client certificate")
    })?;
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let validity = cert.validity();
    if now_secs > validity.not_after.timestamp() {
        bail!(
            "--etcd-certfile {certfile}: the client certificate ({}) expired on {}; etcd refuses it: issue a new one from the CA etcd trusts (its --trusted-ca-file)",
            cert.subject(),
            validity.not_after
        );
    }
    if now_secs < validity.not_before.timestamp() {
        bail!(
            "--etcd-certfile {certfile}: the client certificate ({}) is not valid before {}; check this host's clock, or issue one valid now",
            cert.subject(),
            validity.not_before
        );
    }
    if let Ok(Some(usage)) = cert.extended_key_usage() {
        if !usage.value.client_auth && !usage.value.any {
            bail!(
                "--etcd-certfile {certfile}: the certificate ({}) is not for clients (its extended key usage lacks clientAuth); etcd refuses it: issue one with clientAuth",
                cert.subject()
            );
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        anyhow!("--etcd-keyfile {keyfile} holds no usable PEM private key ({e}); give the unencrypted private key (PKCS#8, PKCS#1 or SEC1) of --etcd-certfile {certfile}")
    })?;
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => bail!(
            "--etcd-keyfile {keyfile} is not the private key of the certificate in --etcd-certfile {certfile}: give the key the certificate was issued for"
        ),
        Err(e) => bail!("--etcd-keyfile {keyfile}: {e}; give an RSA, ECDSA or Ed25519 private key in PEM"),
    }
}

/// What a failed connection to https endpoints means for the user, when the cause is TLS:
/// the rustls error anywhere in `err`'s chain, translated into the flag to fix.
pub fn explain(
    err: &(dyn StdError + 'static),
    files: &TlsFiles,
    endpoints: &str,
) -> Option<String> {
    let tls_error = rustls_error(err)?;
    let ca = match &files.cafile {
        Some(path) => format!("the CA in --etcd-cafile {}", path.display()),
        None => "the host's trusted CAs (no --etcd-cafile given)".to_string(),
    };
    let client = match &files.certfile {
        Some(path) => format!(
            "the client certificate in --etcd-certfile {}",
            path.display()
        ),
        None => "no client certificate (--etcd-certfile not given)".to_string(),
    };
    Some(match tls_error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => format!(
            "etcd's server certificate at {endpoints} is not signed by {ca}: give the CA that signed etcd's certificate (etcd's --cert-file) in --etcd-cafile"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "etcd's server certificate is not valid for the host in --etcd-endpoints {endpoints}: use a name or address the certificate lists (its subjectAltName), or reissue it with this one"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("etcd's server certificate at {endpoints} has expired: renew etcd's certificate (etcd's --cert-file)"),
        rustls::Error::InvalidCertificate(e) => format!(
            "etcd's server certificate at {endpoints} is refused ({e:?}) when checked against {ca}: check etcd's --cert-file and --etcd-cafile"
        ),
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::HandshakeFailure,
        ) if files.certfile.is_none() => format!(
            "etcd at {endpoints} requires a client certificate and got none: set --etcd-certfile and --etcd-keyfile (FLANNELD_ETCD_CERTFILE, FLANNELD_ETCD_KEYFILE)"
        ),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate),
        ) => format!(
            "etcd at {endpoints} refused {client} (TLS alert {alert:?}): the certificate must be current and signed by the CA etcd trusts (etcd's --trusted-ca-file)"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "etcd at {endpoints} does not answer TLS: if it serves plain HTTP, write http:// in --etcd-endpoints"
        ),
        other => format!("TLS to etcd at {endpoints} failed: {other}"),
    })
}

/// The rustls error anywhere in `err`'s chain, also inside an io::Error.
fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    chain(err).find_map(|e| {
        e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |e| {
        let e: &'a (dyn StdError + 'static) = *e;
        e.source()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(files: TlsFiles) -> String {
        EtcdTls::load(&files, SystemTime::now())
            .err()
            .expect("loading must fail")
            .to_string()
    }

    #[test]
    fn certfile_and_keyfile_go_together() {
        let err = load_error(TlsFiles {
            certfile: Some("/etc/etcd/client.pem".into()),
            ..Default::default()
        });
        assert!(
            err.contains("--etcd-certfile is set without --etcd-keyfile"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = load_error(TlsFiles {
            cafile: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        });
        assert!(
            err.contains("cannot read --etcd-cafile /nonexistent/ca.pem")
                && err.contains("No such file"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_without_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = load_error(TlsFiles {
            cafile: Some(path.clone()),
            ..Default::default()
        });
        assert!(err.contains("holds no PEM certificate"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
