//! The etcd (v3 API) subnet manager, with flannel's key layout, so that weft and flanneld
//! nodes can share one etcd prefix:
//!
//! - `<prefix>/config`: the network configuration (net-conf.json's JSON);
//! - `<prefix>/subnets/10.244.1.0-24`: a node's lease, flannel's lease JSON, bound to an
//!   etcd lease with a 24 h TTL (a key without etcd lease is a reservation and never expires).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use super::alloc::{self, AllocInput, Choice};
use super::claims::Claims;
use super::etcd_tls::{self, EtcdTls, ProbeFailure, TlsFiles};
use super::SubnetManager;
use crate::config::NetConf;
use crate::lease::{parse_subnet_key, subnet_key, Lease, LeaseAttrs, LeaseWatchEvent};
use crate::subnet_env::SubnetEnv;

/// flannel's lease TTL.
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long to wait before retrying a failed renewal (flannel: one minute).
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// How many times acquisition re-lists and retries after losing a race for a key.
const ACQUIRE_ATTEMPTS: usize = 10;
/// How long connect waits for etcd to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of the delay between attempts to re-establish a failed watch.
const WATCH_BACKOFF_MIN: Duration = Duration::from_secs(1);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `http://host:port` (a bare `host:port` means http).
    pub endpoints: Vec<String>,
    /// Key prefix (`/coreos.com/network`).
    pub prefix: String,
    pub keyfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub cafile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// subnet.env of the previous run: its subnet is preferred when free.
    pub subnet_file: PathBuf,
    /// Renew the lease this long before it expires.
    pub renew_margin: Duration,
}

impl Default for EtcdOptions {
    /// flanneld's defaults.
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec![
                "http://127.0.0.1:4001".into(),
                "http://127.0.0.1:2379".into(),
            ],
            prefix: "/coreos.com/network".into(),
            keyfile: None,
            certfile: None,
            cafile: None,
            username: None,
            password: None,
            subnet_file: PathBuf::from("/run/flannel/subnet.env"),
            renew_margin: Duration::from_secs(60 * 60),
        }
    }
}

pub struct EtcdSubnetManager {
    client: Client,
    prefix: String,
    subnet_file: PathBuf,
    renew_margin: Duration,
    /// Our key once acquired; renewal updates its etcd lease.
    own_key: Arc<Mutex<Option<OwnKey>>>,
}

#[derive(Clone, Debug)]
struct OwnKey {
    subnet: Ipv4Network,
    /// The full key (a reused dual-stack key keeps its name).
    key: String,
    /// The etcd lease the key is bound to; 0 for a TTL-less reservation.
    etcd_lease: i64,
}

/// One key under `<prefix>/subnets/`.
#[derive(Clone, Debug)]
struct StoredLease {
    /// The full key: a dual-stack key keeps its IPv6 part.
    key: String,
    subnet: Ipv4Network,
    /// None when the value is not flannel's lease JSON.
    attrs: Option<LeaseAttrs>,
    /// The etcd lease the key is bound to; 0 for a reservation.
    etcd_lease: i64,
    mod_revision: i64,
    /// Orders two keys of one subnet (`10.244.1.0-24`, `10.244.1.0-24&fc00::-64`,
    /// `10.244.1.0-024`): the older key holds the subnet.
    create_revision: i64,
}

struct Listing {
    leases: Vec<StoredLease>,
    /// The store revision the listing reflects: a watch from `revision + 1` misses nothing.
    revision: i64,
}

/// What acquisition will write: chosen from one listing, committed in one transaction that
/// fails if the listing went stale.
#[derive(Clone, Debug)]
pub struct AcquirePlan {
    choice: Choice,
    key: String,
    value: String,
    /// Update an existing key (compare its mod revision) rather than create one (version 0).
    existing: Option<ExistingKey>,
    /// Our own leases that no longer fit the configuration, deleted in the same transaction.
    stale: Vec<(String, i64)>,
}

#[derive(Clone, Copy, Debug)]
struct ExistingKey {
    mod_revision: i64,
    /// 0 for a TTL-less reservation, which stays TTL-less.
    etcd_lease: i64,
}

impl AcquirePlan {
    pub fn choice(&self) -> Choice {
        self.choice
    }
    pub fn subnet(&self) -> Ipv4Network {
        self.choice.subnet()
    }
}

/// How a watch from a revision ended, short of an error.
enum WatchEnd {
    OwnLeaseRevoked,
    ReceiverGone,
    /// etcd canceled the watch (e.g. its start revision was compacted): re-list.
    Lost(String),
}

impl EtcdSubnetManager {
    pub async fn connect(opts: EtcdOptions) -> Result<Self> {
        if opts.renew_margin >= SUBNET_TTL {
            bail!(
                "--subnet-lease-renew-margin {} min is not shorter than the lease TTL (24 h): use less than 1440 minutes",
                opts.renew_margin.as_secs() / 60
            );
        }
        if opts.endpoints.is_empty() {
            bail!(
                "--etcd-endpoints is empty: give at least one endpoint, e.g. http://127.0.0.1:2379"
            );
        }
        let endpoints = opts
            .endpoints
            .iter()
            .map(|e| match e.trim() {
                e if e.starts_with("https://") || e.starts_with("http://") => Ok(e.to_string()),
                e if e.contains("://") => Err(anyhow!("--etcd-endpoints: {e} has an unknown scheme: write it like https://10.0.0.1:2379 or http://127.0.0.1:2379")),
                e => Ok(format!("http://{e}")),
            })
            .collect::<Result<Vec<_>>>()?;
        let tls_files = TlsFiles {
            cafile: opts.cafile.clone(),
            certfile: opts.certfile.clone(),
            keyfile: opts.keyfile.clone(),
        };
        let uses_tls = endpoints.iter().any(|e| e.starts_with("https://"));
        // Read and checked even for http endpoints, as flanneld does.
        let tls = if uses_tls || tls_files.any() {
            Some(EtcdTls::load(&tls_files, SystemTime::now())?)
        } else {
            None
        };
        if let Some(tls) = tls.as_ref().filter(|_| uses_tls) {
            // The first https endpoint that answers proves the files right; if none does,
            // a TLS failure is the error (anything else the regular connect reports).
            let mut tls_failure = None;
            for endpoint in endpoints.iter().filter(|e| e.starts_with("https://")) {
                match tls.probe(endpoint).await {
                    Ok(()) => {
                        tls_failure = None;
                        break;
                    }
                    Err(ProbeFailure::Tls(why)) => {
                        debug!(endpoint = %endpoint, "TLS probe: {why}");
                        tls_failure.get_or_insert(why);
                    }
                    Err(ProbeFailure::Other(why)) => {
                        debug!(endpoint = %endpoint, "TLS probe: {why}")
                    }
                    Err(ProbeFailure::Version) => {
                        debug!(endpoint = %endpoint, "TLS probe: no common TLS version")
                    }
                }
            }
            if let Some(why) = tls_failure {
                bail!("{why}");
            }
        }
        if tls_files.any() && !uses_tls {
            warn!("--etcd-cafile/--etcd-certfile/--etcd-keyfile are set but every --etcd-endpoints URL is http://: talking plain HTTP to etcd, as flanneld does; write https:// to use TLS");
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // HTTP/2 pings notice a dead etcd on an otherwise idle watch stream.
            .with_keep_alive(Duration::from_secs(30), Duration::from_secs(10))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls.filter(|_| uses_tls) {
            options = options.with_tls(tls.options());
        }
        match (&opts.username, &opts.password) {
            // etcd's tokens expire (5 min idle by default): fetch a new one when told.
            (Some(user), Some(password)) => {
                options = options
                    .with_user(user, password)
                    .with_auto_token_refresh(true)
            }
            (None, None) => {}
            (Some(_), None) => {
                bail!("--etcd-username is set without --etcd-password: set both or neither")
            }
            (None, Some(_)) => {
                bail!("--etcd-password is set without --etcd-username: set both or neither")
            }
        }
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        let joined = endpoints.join(",");
        let tls_hint = if uses_tls {
            ""
        } else {
            "; if etcd serves TLS, write https:// and give --etcd-cafile, --etcd-certfile and --etcd-keyfile"
        };
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow!(
                "cannot reach etcd at {joined} (--etcd-endpoints): {e}; check that etcd runs there and that the address is right{tls_hint}"
            )
        };
        let probe = async {
            let mut client = Client::connect(&endpoints, Some(options)).await?;
            client
                .get(
                    format!("{prefix}/config"),
                    Some(GetOptions::new().with_keys_only()),
                )
                .await?;
            Ok::<_, etcd_client::Error>(client)
        };
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                if let Some(why) = etcd_tls::explain(&e, &tls_files, &joined) {
                    bail!("{why} ({e})");
                }
                if let etcd_client::Error::GRpcStatus(status) = &e {
                    let message = status.message();
                    match &opts.username {
                        Some(user) if message.contains("authentication failed") => bail!(
                            "etcd at {joined} refused --etcd-username {user} with the given --etcd-password ({message}): check both against etcd's users (etcdctl user get {user})"
                        ),
                        None if message.contains("user name is empty") => bail!(
                            "etcd at {joined} requires authentication ({message}): set --etcd-username and --etcd-password (FLANNELD_ETCD_USERNAME, FLANNELD_ETCD_PASSWORD)"
                        ),
                        _ if message.contains("permission denied") => bail!(
                            "etcd at {joined} denies reading {prefix}/config ({message}): grant this user read-write on the prefix (etcdctl role grant-permission ROLE --prefix=true readwrite {prefix}/)"
                        ),
                        _ => {}
                    }
                }
                return Err(unreachable(&e));
            }
            Err(_) => {
                return Err(unreachable(&format!(
                    "no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
        };
        info!(endpoints = %endpoints.join(","), prefix = %prefix, "connected to etcd");
        Ok(EtcdSubnetManager {
            client,
            prefix,
            subnet_file: opts.subnet_file,
            renew_margin: opts.renew_margin,
            own_key: Arc::new(Mutex::new(None)),
        })
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// `<prefix>/subnets`, the directory of leases.
    fn subnets_dir(&self) -> String {
        format!("{}/subnets", self.prefix)
    }

    fn lease_key(&self, subnet: &Ipv4Network) -> String {
        format!("{}/{}", self.subnets_dir(), subnet_key(subnet))
    }

    /// The key of our lease `own`: the one acquired (a reused dual-stack key keeps its
    /// name), else the canonical one.
    fn key_of(&self, own: &Lease) -> String {
        self.own_key
            .lock()
            .unwrap()
            .clone()
            .filter(|k| k.subnet == own.subnet)
            .map_or_else(|| self.lease_key(&own.subnet), |k| k.key)
    }

    /// The etcd lease id our key is bound to, once acquired (0: a TTL-less reservation).
    pub fn own_etcd_lease(&self) -> Option<i64> {
        self.own_key.lock().unwrap().as_ref().map(|k| k.etcd_lease)
    }

    /// Parses one key under `<prefix>/subnets/`; None (and a warning) for foreign keys.
    fn parse_kv(&self, kv: &etcd_client::KeyValue) -> Option<StoredLease> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(subnet) = key
            .strip_prefix(&format!("{}/", self.subnets_dir()))
            .and_then(parse_subnet_key)
        else {
            warn!(%key, "ignoring a key under the subnets prefix that is not a lease (expected <prefix>/subnets/10.244.1.0-24)");
            return None;
        };
        let attrs = match serde_json::from_slice::<LeaseAttrs>(kv.value()) {
            Ok(attrs) => Some(attrs),
            Err(e) if !kv.value().is_empty() => {
                warn!(%key, error = %e, "lease value is not flannel's lease JSON: no peer is programmed for it, the subnet counts as taken");
                None
            }
            Err(_) => None,
        };
        Some(StoredLease {
            key,
            subnet,
            attrs,
            etcd_lease: kv.lease(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
    }

    async fn list(&self) -> Result<Listing> {
        let mut client = self.client.clone();
        let resp = client
            .get(
                format!("{}/", self.subnets_dir()),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .with_context(|| format!("listing leases under {}/ in etcd", self.subnets_dir()))?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .context("etcd answered without a revision")?;
        let leases = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.parse_kv(kv))
            .collect();
        Ok(Listing { leases, revision })
    }

    /// Lists leases and decides what acquisition would write, without writing.
    pub async fn plan_acquisition(&self, attrs: &LeaseAttrs) -> Result<AcquirePlan> {
        let conf = self.network_config().await?;
        let listing = self.list().await?;
        let previous_subnet = match SubnetEnv::read(&self.subnet_file) {
            Ok(env) => env.map(|env| env.subnet),
            Err(e) => {
                warn!(error = format!("{e:#}"), "ignoring the previous subnet.env");
                None
            }
        };
        let taken: BTreeSet<Ipv4Network> = listing.leases.iter().map(|l| l.subnet).collect();
        let parsed: BTreeMap<Ipv4Network, LeaseAttrs> = listing
            .leases
            .iter()
            .filter_map(|l| Some((l.subnet, l.attrs.clone()?)))
            .collect();
        let subnets_dir = self.subnets_dir();
        let input = AllocInput {
            conf: &conf,
            taken: &taken,
            leases: &parsed,
            public_ip: attrs.public_ip,
            vtep_mac: attrs.vxlan().map(|d| d.vtep_mac),
            previous_subnet,
            subnets_dir: &subnets_dir,
        };
        let allocation = alloc::choose_subnet(&input, &mut rand::rng())?;
        let stored = |subnet: Ipv4Network| listing.leases.iter().find(|l| l.subnet == subnet);
        let stale = allocation
            .incompatible_own
            .iter()
            .filter_map(|s| stored(*s))
            .map(|l| (l.key.clone(), l.mod_revision))
            .collect();
        let (key, existing) = match allocation.choice {
            Choice::Reuse(subnet) => {
                let l = stored(subnet).context("reused lease vanished from the listing")?;
                (
                    l.key.clone(),
                    Some(ExistingKey {
                        mod_revision: l.mod_revision,
                        etcd_lease: l.etcd_lease,
                    }),
                )
            }
            Choice::Previous(subnet) | Choice::Random(subnet) => (self.lease_key(&subnet), None),
        };
        Ok(AcquirePlan {
            choice: allocation.choice,
            key,
            value: serde_json::to_string(attrs)?,
            existing,
            stale,
        })
    }

    /// Writes a plan in one transaction. `Ok(None)` when the listing it was made from went
    /// stale (another node took the key meanwhile): plan again.
    pub async fn commit_acquisition(&self, plan: &AcquirePlan) -> Result<Option<Lease>> {
        let mut client = self.client.clone();
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for (key, mod_revision) in &plan.stale {
            info!(%key, "deleting our lease that no longer fits the network configuration");
            compares.push(Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                *mod_revision,
            ));
            ops.push(TxnOp::delete(key.as_str(), None));
        }
        let etcd_lease = match plan.existing {
            Some(ExistingKey { etcd_lease: 0, .. }) => 0,
            _ => client
                .lease_grant(SUBNET_TTL.as_secs() as i64, None)
                .await
                .context("granting an etcd lease")?
                .id(),
        };
        compares.push(match plan.existing {
            Some(existing) => {
                Compare::mod_revision(plan.key.as_str(), CompareOp::Equal, existing.mod_revision)
            }
            None => Compare::version(plan.key.as_str(), CompareOp::Equal, 0),
        });
        ops.push(TxnOp::put(
            plan.key.as_str(),
            plan.value.as_str(),
            Some(PutOptions::new().with_lease(etcd_lease)),
        ));
        let resp = client
            .txn(Txn::new().when(compares).and_then(ops))
            .await
            .with_context(|| format!("writing {}", plan.key))?;
        if !resp.succeeded() {
            if etcd_lease != 0 {
                // Best effort: an unused lease expires on its own anyway.
                let _ = client.lease_revoke(etcd_lease).await;
            }
            return Ok(None);
        }
        if let Some(ExistingKey {
            etcd_lease: old @ 1..,
            ..
        }) = plan.existing
        {
            // The key left its old etcd lease: let it go now rather than at its expiry.
            let _ = client.lease_revoke(old).await;
        }
        *self.own_key.lock().unwrap() = Some(OwnKey {
            subnet: plan.subnet(),
            key: plan.key.clone(),
            etcd_lease,
        });
        let attrs: LeaseAttrs = serde_json::from_str(&plan.value)?;
        Ok(Some(Lease {
            subnet: plan.subnet(),
            attrs,
        }))
    }

    /// Sends the other nodes' leases, as `watch_leases` does but without renewing our own:
    /// starts with a listing (`resume_from` None) or resumes a watch at revision
    /// `resume_from`; when etcd cancels the watch (compaction), it re-lists and sends a new
    /// snapshot.
    pub async fn watch_others(
        &self,
        own: &Lease,
        resume_from: Option<i64>,
        tx: &mpsc::Sender<LeaseWatchEvent>,
    ) -> Result<()> {
        let mut resume_from = resume_from;
        let mut backoff = WATCH_BACKOFF_MIN;
        let own_key = self.key_of(own);
        // Several keys can name one subnet; the older key holds it.
        let mut claims = Claims::new("key");
        loop {
            let start = match resume_from.take() {
                Some(revision) => revision,
                None => match self.list().await {
                    Ok(listing) => {
                        if !listing
                            .leases
                            .iter()
                            .any(|l| l.key == own_key && is_own(own, l))
                        {
                            warn!("our lease is gone from etcd");
                            let _ = tx.send(LeaseWatchEvent::OwnLeaseRevoked).await;
                            return Ok(());
                        }
                        let claimed = listing.leases.into_iter().filter_map(|l| {
                            if l.subnet == own.subnet {
                                if l.key != own_key {
                                    warn!(key = %l.key, "another key claims this node's subnet; ignoring it");
                                }
                                return None;
                            }
                            let lease = Lease {
                                subnet: l.subnet,
                                attrs: l.attrs?,
                            };
                            Some((l.key, l.create_revision, lease))
                        });
                        let others = claims.replace(claimed);
                        if tx.send(LeaseWatchEvent::Snapshot(others)).await.is_err() {
                            return Ok(());
                        }
                        listing.revision + 1
                    }
                    Err(e) => {
                        warn!(error = format!("{e:#}"), retry_in = ?backoff, "cannot list leases");
                        if !pause(&mut backoff, tx).await {
                            return Ok(());
                        }
                        continue;
                    }
                },
            };
            let mine = (own, own_key.as_str());
            match self
                .follow(mine, &mut claims, start, tx, &mut backoff)
                .await
            {
                Ok(WatchEnd::OwnLeaseRevoked) => {
                    warn!("our lease was deleted or taken over in etcd: Lease has been revoked");
                    let _ = tx.send(LeaseWatchEvent::OwnLeaseRevoked).await;
                    return Ok(());
                }
                Ok(WatchEnd::ReceiverGone) => return Ok(()),
                Ok(WatchEnd::Lost(reason)) => info!(%reason, "lease watch lost; listing again"),
                Err(e) => {
                    warn!(error = format!("{e:#}"), retry_in = ?backoff, "lease watch failed; listing again");
                    if !pause(&mut backoff, tx).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Watches `<prefix>/subnets/` from `start_revision`, forwarding events, until etcd
    /// cancels the watch, our lease goes, or the receiver does.
    async fn follow(
        &self,
        (own, own_key): (&Lease, &str),
        claims: &mut Claims<i64>,
        start_revision: i64,
        tx: &mpsc::Sender<LeaseWatchEvent>,
        backoff: &mut Duration,
    ) -> Result<WatchEnd> {
        let mut client = self.client.clone();
        let dir = format!("{}/", self.subnets_dir());
        let mut stream = client
            .watch(
                dir.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start_revision),
                ),
            )
            .await
            .with_context(|| format!("watching {dir} in etcd"))?;
        debug!(start_revision, "watching leases");
        loop {
            let resp = tokio::select! {
                resp = stream.message() => resp.context("reading the lease watch")?,
                _ = tx.closed() => return Ok(WatchEnd::ReceiverGone),
            };
            let Some(resp) = resp else {
                return Ok(WatchEnd::Lost("etcd closed the watch stream".into()));
            };
            if resp.compact_revision() > 0 {
                return Ok(WatchEnd::Lost(format!(
                    "revision {start_revision} was compacted (etcd keeps history from {})",
                    resp.compact_revision()
                )));
            }
            if resp.canceled() {
                return Ok(WatchEnd::Lost(format!(
                    "etcd canceled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            *backoff = WATCH_BACKOFF_MIN;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(stored) = self.parse_kv(kv) else {
                    continue;
                };
                let put = event.event_type() == EventType::Put;
                if stored.key == own_key {
                    // Our own renewal shows up as a put with our PublicIP.
                    if !(put && is_own(own, &stored)) {
                        return Ok(WatchEnd::OwnLeaseRevoked);
                    }
                    continue;
                }
                if stored.subnet == own.subnet {
                    // Another key for our subnet never displaces our lease.
                    if put {
                        warn!(key = %stored.key, "another key claims this node's subnet; ignoring it");
                    }
                    continue;
                }
                let claim = match (put, stored.attrs) {
                    (true, Some(attrs)) => Some((
                        stored.create_revision,
                        Lease {
                            subnet: stored.subnet,
                            attrs,
                        },
                    )),
                    // A garbled value (warned about in parse_kv) must not leave the
                    // previous peer programmed: the key no longer says where it is.
                    (true, None) | (false, _) => None,
                };
                for event in claims.set(&stored.key, claim) {
                    debug!(?event, "lease change");
                    if tx.send(LeaseWatchEvent::Event(event)).await.is_err() {
                        return Ok(WatchEnd::ReceiverGone);
                    }
                }
            }
        }
    }
}

/// Waits `backoff` and doubles it (bounded); false when the receiver went away meanwhile.
async fn pause(backoff: &mut Duration, tx: &mpsc::Sender<LeaseWatchEvent>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = tx.closed() => return false,
    }
    *backoff = (*backoff * 2).min(WATCH_BACKOFF_MAX);
    true
}

fn is_own(own: &Lease, stored: &StoredLease) -> bool {
    stored.subnet == own.subnet
        && stored
            .attrs
            .as_ref()
            .is_some_and(|a| a.public_ip == own.attrs.public_ip)
}

/// Keeps our key alive: flannel's renewal re-puts the key with a fresh 24 h etcd lease at
/// expiry minus the margin, retrying every minute on failure.
struct Renewer {
    client: Client,
    key: String,
    own: Lease,
    margin: Duration,
    own_key: Arc<Mutex<Option<OwnKey>>>,
}

enum Renewal {
    /// The key lives this long (before its next renewal).
    ExpiresIn(Duration),
    /// A TTL-less reservation: nothing to renew.
    Reservation,
    /// The key is gone or not ours; the watch reports that.
    NotOurs,
}

impl Renewer {
    async fn run(mut self) {
        let mut wait = match self.remaining_ttl().await {
            Ok(Renewal::ExpiresIn(ttl)) => self.wait_for(ttl),
            Ok(Renewal::Reservation) => {
                info!("lease is a TTL-less reservation: no renewal needed");
                return;
            }
            Ok(Renewal::NotOurs) => return,
            Err(e) => {
                warn!(error = format!("{e:#}"), retry_in = ?RENEW_RETRY, "cannot read the lease TTL");
                RENEW_RETRY
            }
        };
        loop {
            debug!(in_ = ?wait, "next lease renewal");
            tokio::time::sleep(wait).await;
            wait = match self.renew().await {
                Ok(Renewal::ExpiresIn(ttl)) => {
                    info!(ttl = ?ttl, "lease renewed");
                    self.wait_for(ttl)
                }
                Ok(Renewal::Reservation | Renewal::NotOurs) => return,
                Err(e) => {
                    warn!(error = format!("{e:#}"), retry_in = ?RENEW_RETRY, "lease renewal failed");
                    RENEW_RETRY
                }
            };
        }
    }

    fn wait_for(&self, ttl: Duration) -> Duration {
        ttl.saturating_sub(self.margin).max(Duration::from_secs(1))
    }

    /// The key's current state, if it is still ours.
    async fn current(&mut self) -> Result<Option<etcd_client::KeyValue>> {
        let resp = self
            .client
            .get(self.key.as_str(), None)
            .await
            .with_context(|| format!("reading {}", self.key))?;
        Ok(resp
            .kvs()
            .first()
            .filter(|kv| {
                serde_json::from_slice::<LeaseAttrs>(kv.value())
                    .is_ok_and(|a| a.public_ip == self.own.attrs.public_ip)
            })
            .cloned())
    }

    async fn remaining_ttl(&mut self) -> Result<Renewal> {
        let Some(kv) = self.current().await? else {
            return Ok(Renewal::NotOurs);
        };
        if kv.lease() == 0 {
            return Ok(Renewal::Reservation);
        }
        let ttl = self
            .client
            .lease_time_to_live(kv.lease(), None)
            .await
            .context("reading the etcd lease TTL")?
            .ttl();
        Ok(Renewal::ExpiresIn(Duration::from_secs(ttl.max(0) as u64)))
    }

    async fn renew(&mut self) -> Result<Renewal> {
        let Some(kv) = self.current().await? else {
            return Ok(Renewal::NotOurs);
        };
        if kv.lease() == 0 {
            return Ok(Renewal::Reservation);
        }
        let granted = self
            .client
            .lease_grant(SUBNET_TTL.as_secs() as i64, None)
            .await
            .context("granting an etcd lease")?;
        let value = serde_json::to_string(&self.own.attrs)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(
                self.key.as_str(),
                value,
                Some(PutOptions::new().with_lease(granted.id())),
            )]);
        if !self
            .client
            .txn(txn)
            .await
            .with_context(|| format!("writing {}", self.key))?
            .succeeded()
        {
            let _ = self.client.lease_revoke(granted.id()).await;
            bail!("{} changed while renewing", self.key);
        }
        if let Some(own) = self
            .own_key
            .lock()
            .unwrap()
            .as_mut()
            .filter(|k| k.key == self.key)
        {
            own.etcd_lease = granted.id();
        }
        // The old etcd lease no longer holds the key; let it go now rather than in a day.
        let _ = self.client.lease_revoke(kv.lease()).await;
        Ok(Renewal::ExpiresIn(Duration::from_secs(
            granted.ttl().max(0) as u64,
        )))
    }
}

/// Aborts a spawned task when dropped, so that the renewal stops with the watch.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait]
impl SubnetManager for EtcdSubnetManager {
    async fn network_config(&self) -> Result<NetConf> {
        let key = self.config_key();
        let mut client = self.client.clone();
        let resp = client
            .get(key.as_str(), None)
            .await
            .with_context(|| format!("reading {key} from etcd"))?;
        let Some(kv) = resp.kvs().first() else {
            bail!(
                "the network configuration {key} is missing in etcd (--etcd-prefix {}): write one, e.g. etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'",
                self.prefix
            );
        };
        let text = std::str::from_utf8(kv.value())
            .with_context(|| format!("{key} in etcd is not UTF-8 text"))?;
        let conf = NetConf::parse(text).with_context(|| format!("{key} in etcd"))?;
        Ok(conf)
    }

    async fn previous_lease(&self, public_ip: Ipv4Addr) -> Result<Option<Lease>> {
        Ok(self.list().await?.leases.into_iter().find_map(|l| {
            let attrs = l.attrs.filter(|a| a.public_ip == public_ip)?;
            Some(Lease {
                subnet: l.subnet,
                attrs,
            })
        }))
    }

    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> Result<Lease> {
        for attempt in 1..=ACQUIRE_ATTEMPTS {
            let plan = self.plan_acquisition(attrs).await?;
            let span = info_span!("lease", subnet = %plan.subnet());
            match self
                .commit_acquisition(&plan)
                .instrument(span.clone())
                .await?
            {
                Some(lease) => {
                    span.in_scope(
                        || info!(how = %plan.choice(), key = %plan.key, "lease acquired"),
                    );
                    return Ok(lease);
                }
                None => span.in_scope(|| {
                    info!(
                        attempt,
                        "another node changed the subnet meanwhile; choosing again"
                    )
                }),
            }
        }
        bail!(
            "could not acquire a subnet under {} after {ACQUIRE_ATTEMPTS} attempts: other nodes kept taking the chosen subnets",
            self.subnets_dir()
        )
    }

    async fn watch_leases(&self, own: Lease, tx: mpsc::Sender<LeaseWatchEvent>) -> Result<()> {
        let span = info_span!("lease", subnet = %own.subnet);
        let renewer = Renewer {
            client: self.client.clone(),
            key: self.key_of(&own),
            own: own.clone(),
            margin: self.renew_margin,
            own_key: self.own_key.clone(),
        };
        let _renewal = AbortOnDrop(tokio::spawn(renewer.run().instrument(span.clone())));
        self.watch_others(&own, None, &tx).instrument(span).await
    }
}
