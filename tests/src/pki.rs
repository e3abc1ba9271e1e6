//! Certificates for etcd with TLS and client-certificate auth, made fresh per lab: a CA,
//! etcd's serving certificate for the fabric address, and client certificates, as PEM files
//! the way an operator's PKI hands them out (`ca.pem`, `client.pem`, `client-key.pem`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration as TimeDuration, OffsetDateTime};

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that signs etcd's and the clients' certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), what `--etcd-cafile` and etcd's `--trusted-ca-file` name.
    pub cert: PathBuf,
    dir: PathBuf,
}

/// The validity of a certificate made by [`Ca::client`].
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From a day ago to a year from now.
    Current,
    /// From ten days ago to yesterday.
    Expired,
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Ca> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate().context("cannot generate a CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::Current);
        let cert = params.self_signed(&key).context("cannot sign the CA")?;
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem())?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert: path,
            dir: dir.to_path_buf(),
        })
    }

    /// etcd's serving certificate, valid for `ips`, written as `<name>.pem`/`<name>-key.pem`.
    pub fn server(&self, name: &str, ips: &[&str]) -> Result<CertFiles> {
        let names: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, name);
        // clientAuth too: etcd's gateway dials etcd itself with this certificate.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(name, params, Validity::Current)
    }

    /// A client certificate (clientAuth) with common name `name`.
    pub fn client(&self, name: &str, validity: Validity) -> Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(name, params, validity)
    }

    fn sign(
        &self,
        name: &str,
        mut params: CertificateParams,
        validity: Validity,
    ) -> Result<CertFiles> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        set_validity(&mut params, validity);
        let key = KeyPair::generate().context("cannot generate a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("cannot sign {name}'s certificate"))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let now = OffsetDateTime::now_utc();
    let (from, to) = match validity {
        Validity::Current => (now - TimeDuration::days(1), now + TimeDuration::days(365)),
        Validity::Expired => (now - TimeDuration::days(10), now - TimeDuration::days(1)),
    };
    params.not_before = from;
    params.not_after = to;
}

/// The lab's etcd PKI: a CA, etcd's serving certificate and the nodes' client certificate.
pub struct EtcdPki {
    pub ca: Ca,
    pub server: CertFiles,
    pub client: CertFiles,
}

impl EtcdPki {
    /// Writes the files under `dir`; etcd serves `ip`.
    pub fn new(dir: &Path, ip: &str) -> Result<EtcdPki> {
        let ca = Ca::new(dir, "etcd-ca")?;
        let server = ca.server("etcd-server", &[ip, "127.0.0.1"])?;
        let client = ca.client("client", Validity::Current)?;
        Ok(EtcdPki { ca, server, client })
    }
}
