//! The etcd subnet manager against a real etcd (/usr/bin/etcd), one private instance per test.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;
use weft::lease::{Lease, LeaseAttrs, LeaseEvent, LeaseWatchEvent};
use weft::subnet::etcd::{EtcdOptions, EtcdSubnetManager};
use weft::subnet::SubnetManager;
use weft::subnet_env::SubnetEnv;

const WAIT: Duration = Duration::from_secs(10);
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A private etcd on random loopback ports, killed (by PID) when dropped.
struct Etcd {
    child: Child,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl Etcd {
    async fn start() -> Etcd {
        Etcd::start_with(&[]).await
    }

    /// With more etcd flags.
    async fn start_with(extra: &[&str]) -> Etcd {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let mut last_log = String::new();
        // A port picked as free can be taken before etcd binds it: try a few times.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (client_port, peer_port) = free_ports();
            let endpoint = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
            let child = Command::new("/usr/bin/etcd")
                .args(["--name", "weft-test", "--data-dir"])
                .arg(dir.path().join("data"))
                .args([
                    "--listen-client-urls",
                    &endpoint,
                    "--advertise-client-urls",
                    &endpoint,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &format!("weft-test={peer}")])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting /usr/bin/etcd");
            let mut etcd = Etcd {
                child,
                dir,
                endpoint,
            };
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if etcd.child.try_wait().unwrap().is_some() {
                    break;
                }
                let answered = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut c = Client::connect([&etcd.endpoint], None).await?;
                    c.get("probe", None).await
                })
                .await;
                if matches!(answered, Ok(Ok(_))) {
                    return etcd;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            last_log =
                std::fs::read_to_string(etcd.dir.path().join("etcd.log")).unwrap_or_default();
        }
        panic!("etcd did not answer within {WAIT:?}; its log:\n{last_log}");
    }

    async fn client(&self) -> Client {
        Client::connect([&self.endpoint], None).await.unwrap()
    }

    fn options(&self, prefix: &str) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![self.endpoint.clone()],
            prefix: prefix.into(),
            subnet_file: self
                .dir
                .path()
                .join(format!("subnet-{}.env", rand::random::<u64>())),
            ..EtcdOptions::default()
        }
    }

    async fn manager(&self, prefix: &str) -> EtcdSubnetManager {
        EtcdSubnetManager::connect(self.options(prefix))
            .await
            .unwrap()
    }

    /// An etcd with `<prefix>/config` written.
    async fn configured(prefix: &str) -> Etcd {
        let etcd = Etcd::start().await;
        etcd.client()
            .await
            .put(format!("{prefix}/config"), CONFIG, None)
            .await
            .unwrap();
        etcd
    }
}

fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
    serde_json::from_value(serde_json::json!({
        "PublicIP": ip, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}
    }))
    .unwrap()
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

async fn get(client: &mut Client, key: &str) -> Option<etcd_client::KeyValue> {
    client.get(key, None).await.unwrap().kvs().first().cloned()
}

async fn revision(client: &mut Client) -> i64 {
    client
        .get("any", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

async fn next(rx: &mut mpsc::Receiver<LeaseWatchEvent>) -> LeaseWatchEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no lease event within 10 s")
        .expect("watch ended")
}

#[tokio::test]
async fn unreachable_etcd_names_the_flag_and_the_endpoint() {
    let (port, _) = free_ports();
    let opts = EtcdOptions {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        ..EtcdOptions::default()
    };
    let err = format!(
        "{:#}",
        EtcdSubnetManager::connect(opts)
            .await
            .err()
            .expect("connect must fail")
    );
    assert!(err.contains("--etcd-endpoints"), "{err}");
    assert!(err.contains(&format!("http://127.0.0.1:{port}")), "{err}");
}

/// `--etcd-username/--etcd-password` against an etcd with authentication enabled.
#[tokio::test]
async fn username_and_password_authenticate_to_etcd() {
    let prefix = "/coreos.com/network";
    // Tokens expire after 2 s idle (etcd's default is 5 min).
    let etcd = Etcd::start_with(&["--auth-token-ttl", "2"]).await;
    etcd.client()
        .await
        .put(format!("{prefix}/config"), CONFIG, None)
        .await
        .unwrap();
    let mut admin = etcd.client().await;
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("flannel", "s3cret", None).await.unwrap();
    admin.role_add("flannel").await.unwrap();
    admin
        .role_grant_permission(
            "flannel",
            etcd_client::Permission::read_write(prefix).with_prefix(),
        )
        .await
        .unwrap();
    admin.user_grant_role("flannel", "flannel").await.unwrap();
    admin.auth_enable().await.unwrap();

    let with_password = |password: &str| EtcdOptions {
        username: Some("flannel".into()),
        password: Some(password.into()),
        ..etcd.options(prefix)
    };
    let mgr = EtcdSubnetManager::connect(with_password("s3cret"))
        .await
        .expect("the right password connects");
    let conf = mgr.network_config().await.expect("the config is readable");
    assert_eq!(conf.network.to_string(), "10.244.0.0/16");
    // Idle past the token's TTL (the fault's length): the next request gets a new token.
    tokio::time::sleep(Duration::from_secs(3)).await;
    mgr.network_config()
        .await
        .expect("the config is readable after the token expired");

    let err = format!(
        "{:#}",
        EtcdSubnetManager::connect(with_password("wrong"))
            .await
            .err()
            .expect("a wrong password must fail")
    );
    assert!(
        err.contains("refused --etcd-username flannel with the given --etcd-password"),
        "{err}"
    );
    // Without credentials, etcd answers but refuses the read.
    let anonymous = EtcdSubnetManager::connect(etcd.options(prefix)).await;
    let refused = match anonymous {
        Ok(mgr) => format!("{:#}", mgr.network_config().await.unwrap_err()),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("requires authentication")
            && refused.contains("set --etcd-username and --etcd-password"),
        "{refused}"
    );
}

#[tokio::test]
async fn missing_config_names_the_key_and_an_etcdctl_command() {
    let etcd = Etcd::start().await;
    let mgr = etcd.manager("/kube-centos/network/").await;
    let err = format!("{:#}", mgr.network_config().await.unwrap_err());
    assert!(
        err.contains("/kube-centos/network/config is missing"),
        "{err}"
    );
    assert!(
        err.contains(r#"etcdctl put /kube-centos/network/config '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'"#),
        "{err}"
    );

    let mut client = etcd.client().await;
    client
        .put(
            "/kube-centos/network/config",
            r#"{"Network":"10.244.0.0/33"}"#,
            None,
        )
        .await
        .unwrap();
    let err = format!("{:#}", mgr.network_config().await.unwrap_err());
    assert!(
        err.contains("/kube-centos/network/config in etcd") && err.contains("Network"),
        "{err}"
    );

    client
        .put("/kube-centos/network/config", CONFIG, None)
        .await
        .unwrap();
    let conf = mgr.network_config().await.unwrap();
    assert_eq!(conf.network, net("10.244.0.0/16"));
    assert_eq!(conf.subnet_len, 24);
}

#[tokio::test]
async fn two_nodes_get_distinct_subnets_stored_as_flannel_leases() {
    let prefix = "/kube-centos/network";
    let etcd = Etcd::configured(prefix).await;
    let a = etcd.manager(prefix).await;
    let b = etcd.manager(prefix).await;
    let la = a
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:11"))
        .await
        .unwrap();
    let lb = b
        .acquire_lease(&attrs("198.18.0.12", "02:00:00:00:00:12"))
        .await
        .unwrap();
    assert_ne!(la.subnet, lb.subnet);
    for l in [&la, &lb] {
        assert_eq!(l.subnet.prefix(), 24);
        assert!(
            net("10.244.0.0/16").contains(l.subnet.network())
                && l.subnet.network() != Ipv4Addr::new(10, 244, 0, 0)
        );
    }
    let mut client = etcd.client().await;
    let key = format!("{prefix}/subnets/{}-24", la.subnet.network());
    let kv = get(&mut client, &key).await.expect("lease key");
    assert_eq!(
        kv.value_str().unwrap(),
        r#"{"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:11"}}"#
    );
    let all = client
        .get(
            format!("{prefix}/subnets/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(all.kvs().len(), 2);
    assert_eq!(
        b.previous_lease("198.18.0.11".parse().unwrap())
            .await
            .unwrap(),
        Some(la)
    );
    assert_eq!(
        b.previous_lease("198.18.0.99".parse().unwrap())
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_restarted_node_gets_its_subnet_back_with_new_attributes() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    let first = etcd
        .manager(prefix)
        .await
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:01"))
        .await
        .unwrap();
    let mut client = etcd.client().await;
    let first_key = format!("{prefix}/subnets/{}-24", first.subnet.network());
    let first_etcd_lease = get(&mut client, &first_key).await.unwrap().lease();
    let restarted = etcd.manager(prefix).await;
    let previous = restarted
        .previous_lease("198.18.0.11".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(previous, first);
    let again = restarted
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:02"))
        .await
        .unwrap();
    assert_eq!(again.subnet, first.subnet);
    let all = client
        .get(
            format!("{prefix}/subnets/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(
        all.kvs().len(),
        1,
        "the restart must not take a second subnet"
    );
    let stored: LeaseAttrs = serde_json::from_slice(all.kvs()[0].value()).unwrap();
    assert_eq!(
        stored.vxlan().unwrap().vtep_mac.to_string(),
        "02:00:00:00:00:02"
    );
    assert_ne!(all.kvs()[0].lease(), 0, "a reused lease keeps a TTL");
    let old = client
        .lease_time_to_live(first_etcd_lease, None)
        .await
        .unwrap();
    assert_eq!(old.ttl(), -1, "the etcd lease the key left is revoked");
}

#[tokio::test]
async fn subnet_from_subnet_env_is_honoured_when_free() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    let opts = etcd.options(prefix);
    SubnetEnv {
        network: net("10.244.0.0/16"),
        subnet: net("10.244.77.0/24"),
        mtu: 1450,
        ipmasq: true,
    }
    .write(&opts.subnet_file)
    .unwrap();
    let mgr = EtcdSubnetManager::connect(opts.clone()).await.unwrap();
    let lease = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:01"))
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.244.77.0/24"));

    // Another node (other IP) with the same subnet.env: the subnet is taken, it gets another.
    let other = EtcdSubnetManager::connect(opts).await.unwrap();
    let lease = other
        .acquire_lease(&attrs("198.18.0.12", "02:00:00:00:00:02"))
        .await
        .unwrap();
    assert_ne!(lease.subnet, net("10.244.77.0/24"));
}

#[tokio::test]
async fn ttl_less_reservation_is_reused_and_stays_ttl_less() {
    let prefix = "/kube-centos/network";
    let etcd = Etcd::configured(prefix).await;
    let mut client = etcd.client().await;
    let key = format!("{prefix}/subnets/10.244.5.0-24");
    client
        .put(key.as_str(), r#"{"PublicIP":"198.18.0.11"}"#, None)
        .await
        .unwrap();
    let mgr = Arc::new(etcd.manager(prefix).await);
    let lease = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:01"))
        .await
        .unwrap();
    assert_eq!(lease.subnet, net("10.244.5.0/24"));
    assert_eq!(mgr.own_etcd_lease(), Some(0));
    let kv = get(&mut client, &key).await.unwrap();
    assert_eq!(kv.lease(), 0, "a reservation must stay TTL-less");
    assert_eq!(
        serde_json::from_slice::<LeaseAttrs>(kv.value()).unwrap(),
        lease.attrs
    );

    // Running the watch (which renews leases) leaves it TTL-less too.
    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let mgr = mgr.clone();
        async move { mgr.watch_leases(lease, tx).await }
    });
    assert_eq!(next(&mut rx).await, LeaseWatchEvent::Snapshot(vec![]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(&mut client, &key).await.unwrap().lease(), 0);
    drop(rx);
    tokio::time::timeout(WAIT, watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn losing_the_version_zero_race_picks_another_subnet() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    let mgr = etcd.manager(prefix).await;
    let ours = attrs("198.18.0.11", "02:00:00:00:00:01");
    let plan = mgr.plan_acquisition(&ours).await.unwrap();
    let contested = plan.subnet();

    // Another node creates the chosen key between our listing and our transaction.
    let mut client = etcd.client().await;
    let key = format!("{prefix}/subnets/{}-24", contested.network());
    let theirs = r#"{"PublicIP":"198.18.0.12","BackendType":"vxlan"}"#;
    client.put(key.as_str(), theirs, None).await.unwrap();

    assert_eq!(
        mgr.commit_acquisition(&plan).await.unwrap(),
        None,
        "the transaction must lose"
    );
    assert_eq!(
        get(&mut client, &key).await.unwrap().value_str().unwrap(),
        theirs,
        "their lease must be untouched"
    );
    let lease = mgr.acquire_lease(&ours).await.unwrap();
    assert_ne!(lease.subnet, contested);
}

#[tokio::test]
async fn concurrent_nodes_in_a_tiny_range_all_get_distinct_subnets() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::start().await;
    // A /28 in /30s: exactly three subnets between SubnetMin and SubnetMax.
    etcd.client()
        .await
        .put(
            format!("{prefix}/config"),
            r#"{"Network":"10.244.0.0/28","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 1..=3 {
        let mgr = etcd.manager(prefix).await;
        tasks.push(tokio::spawn(async move {
            mgr.acquire_lease(&attrs(&format!("198.18.0.{i}"), "02:00:00:00:00:01"))
                .await
                .unwrap()
                .subnet
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(tokio::time::timeout(WAIT, t).await.unwrap().unwrap());
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            net("10.244.0.4/30"),
            net("10.244.0.8/30"),
            net("10.244.0.12/30")
        ]
    );

    let fourth = etcd.manager(prefix).await;
    let err = format!(
        "{:#}",
        fourth
            .acquire_lease(&attrs("198.18.0.4", "02:00:00:00:00:01"))
            .await
            .unwrap_err()
    );
    assert!(
        err.contains(
            "no free subnet between SubnetMin 10.244.0.4 and SubnetMax 10.244.0.12 (3 taken)"
        ) && err.contains("/coreos.com/network/subnets"),
        "{err}"
    );
}

#[tokio::test]
async fn lease_keys_live_24_hours_and_are_renewed_before_expiry() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    // A margin of 24 h minus 2 s renews two seconds after acquisition.
    let opts = EtcdOptions {
        renew_margin: Duration::from_secs(86_400 - 2),
        ..etcd.options(prefix)
    };
    let mgr = Arc::new(EtcdSubnetManager::connect(opts).await.unwrap());
    let lease = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:01"))
        .await
        .unwrap();
    let mut client = etcd.client().await;
    let key = format!("{prefix}/subnets/{}-24", lease.subnet.network());
    let first = get(&mut client, &key).await.unwrap().lease();
    assert_ne!(first, 0);
    assert_eq!(mgr.own_etcd_lease(), Some(first));
    let ttl = client.lease_time_to_live(first, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 86_400);
    assert!((86_300..=86_400).contains(&ttl.ttl()), "TTL {}", ttl.ttl());

    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let (mgr, lease) = (mgr.clone(), lease.clone());
        async move { mgr.watch_leases(lease, tx).await }
    });
    assert_eq!(next(&mut rx).await, LeaseWatchEvent::Snapshot(vec![]));
    let deadline = Instant::now() + WAIT;
    let renewed = loop {
        let current = get(&mut client, &key)
            .await
            .expect("the key must survive renewal")
            .lease();
        if current != first {
            break current;
        }
        assert!(
            Instant::now() < deadline,
            "the lease was not renewed within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(renewed, 0);
    let ttl = client.lease_time_to_live(renewed, None).await.unwrap();
    assert!(
        (86_300..=86_400).contains(&ttl.ttl()),
        "renewed TTL {}",
        ttl.ttl()
    );
    assert_eq!(
        client.lease_time_to_live(first, None).await.unwrap().ttl(),
        -1,
        "the old etcd lease is revoked"
    );
    assert_eq!(
        serde_json::from_slice::<LeaseAttrs>(get(&mut client, &key).await.unwrap().value())
            .unwrap(),
        lease.attrs
    );
    // Our own renewal is not reported as another node's lease, nor as a revocation.
    assert!(rx.try_recv().is_err());
    assert_eq!(mgr.own_etcd_lease(), Some(renewed));
    drop(rx);
    tokio::time::timeout(WAIT, watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn watch_reports_other_nodes_and_the_revocation_of_our_lease() {
    let prefix = "/kube-centos/network";
    let etcd = Etcd::configured(prefix).await;
    let mgr = Arc::new(etcd.manager(prefix).await);
    let own = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:11"))
        .await
        .unwrap();
    let peer = etcd
        .manager(prefix)
        .await
        .acquire_lease(&attrs("198.18.0.12", "02:00:00:00:00:12"))
        .await
        .unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let (mgr, own) = (mgr.clone(), own.clone());
        async move { mgr.watch_leases(own, tx).await }
    });
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Snapshot(vec![peer.clone()])
    );

    let mut client = etcd.client().await;
    let third_key = format!("{prefix}/subnets/10.244.200.0-24");
    let third = attrs("198.18.0.13", "02:00:00:00:00:13");
    client
        .put(format!("{prefix}/subnets/not-a-subnet"), "x", None)
        .await
        .unwrap();
    client
        .put(
            third_key.as_str(),
            serde_json::to_string(&third).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Added(Lease {
            subnet: net("10.244.200.0/24"),
            attrs: third
        }))
    );
    // A garbled value for a known key removes the peer: it no longer says where it is.
    client
        .put(third_key.as_str(), r#"{"PublicIP":"198.18.0.13","#, None)
        .await
        .unwrap();
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Removed(net("10.244.200.0/24")))
    );
    // Deleting it then changes nothing: the next event is the revocation below.
    client.delete(third_key.as_str(), None).await.unwrap();

    client
        .delete(
            format!("{prefix}/subnets/{}-24", own.subnet.network()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, LeaseWatchEvent::OwnLeaseRevoked);
    tokio::time::timeout(WAIT, watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn two_keys_of_one_subnet_yield_the_older_key_and_never_displace_ours() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    let mgr = Arc::new(etcd.manager(prefix).await);
    let own = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:11"))
        .await
        .unwrap();
    let mut client = etcd.client().await;
    let put = |key: String, ip: &str, mac: &str| {
        let mut client = client.clone();
        let value = serde_json::to_string(&attrs(ip, mac)).unwrap();
        async move { client.put(key, value, None).await.unwrap() }
    };
    // The older key's name sorts last, so a tie-break by key alone would pick the other.
    let older = format!("{prefix}/subnets/10.244.200.0-24&fc00::-64");
    let younger = format!("{prefix}/subnets/10.244.200.0-024");
    put(older.clone(), "198.18.0.12", "02:00:00:00:00:12").await;
    put(younger.clone(), "198.18.0.22", "02:00:00:00:00:22").await;
    // A dual-stack key for our own subnet, with another node's address.
    let own_dup = format!("{prefix}/subnets/{}-24&fc00::-64", own.subnet.network());
    put(own_dup.clone(), "198.18.0.21", "02:00:00:00:00:21").await;

    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let (mgr, own) = (mgr.clone(), own.clone());
        async move { mgr.watch_leases(own, tx).await }
    });
    let peer = |ip: &str, mac: &str| Lease {
        subnet: net("10.244.200.0/24"),
        attrs: attrs(ip, mac),
    };
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Snapshot(vec![peer("198.18.0.12", "02:00:00:00:00:12")])
    );
    // The younger key changing is no event, nor is a change of the duplicate of ours; the
    // older key going brings the younger one's lease in.
    put(younger.clone(), "198.18.0.23", "02:00:00:00:00:23").await;
    put(own_dup.clone(), "198.18.0.24", "02:00:00:00:00:24").await;
    client.delete(own_dup.as_str(), None).await.unwrap();
    client.delete(older.as_str(), None).await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Added(peer("198.18.0.23", "02:00:00:00:00:23")))
    );
    // Nothing came in between, and our lease stands: the next event is the last key going.
    client.delete(younger.as_str(), None).await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Removed(net("10.244.200.0/24")))
    );
    assert!(!watcher.is_finished());
    watcher.abort();
}

#[tokio::test]
async fn own_key_taken_by_another_public_ip_is_a_revocation() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    let mgr = Arc::new(etcd.manager(prefix).await);
    let own = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:11"))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let (mgr, own) = (mgr.clone(), own.clone());
        async move { mgr.watch_leases(own, tx).await }
    });
    assert_eq!(next(&mut rx).await, LeaseWatchEvent::Snapshot(vec![]));
    let key = format!("{prefix}/subnets/{}-24", own.subnet.network());
    let mut client = etcd.client().await;
    client
        .put(key, r#"{"PublicIP":"198.18.0.99"}"#, None)
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, LeaseWatchEvent::OwnLeaseRevoked);
    tokio::time::timeout(WAIT, watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn watch_from_a_compacted_revision_recovers_by_listing_again() {
    let prefix = "/coreos.com/network";
    let etcd = Etcd::configured(prefix).await;
    let mgr = Arc::new(etcd.manager(prefix).await);
    let own = mgr
        .acquire_lease(&attrs("198.18.0.11", "02:00:00:00:00:11"))
        .await
        .unwrap();
    let mut client = etcd.client().await;
    let old_revision = revision(&mut client).await;

    // Beyond the first 100 subnets, from which our own lease is picked at random.
    let peer_key = format!("{prefix}/subnets/10.244.209.0-24");
    let gone_key = format!("{prefix}/subnets/10.244.210.0-24");
    client
        .put(
            gone_key.as_str(),
            serde_json::to_string(&attrs("198.18.0.14", "02:00:00:00:00:14")).unwrap(),
            None,
        )
        .await
        .unwrap();
    for mac in 1..=5 {
        let value = serde_json::to_string(&attrs("198.18.0.12", &format!("02:00:00:00:01:0{mac}")))
            .unwrap();
        client.put(peer_key.as_str(), value, None).await.unwrap();
    }
    client.delete(gone_key.as_str(), None).await.unwrap();

    // Before compaction, resuming replays the history: no listing.
    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let (mgr, own) = (mgr.clone(), own.clone());
        async move { mgr.watch_others(&own, Some(old_revision + 1), &tx).await }
    });
    let gone = Lease {
        subnet: net("10.244.210.0/24"),
        attrs: attrs("198.18.0.14", "02:00:00:00:00:14"),
    };
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Added(gone))
    );
    drop(rx);
    tokio::time::timeout(WAIT, watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let now = revision(&mut client).await;
    client.compact(now, None).await.unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let watcher = tokio::spawn({
        let (mgr, own) = (mgr.clone(), own.clone());
        async move { mgr.watch_others(&own, Some(old_revision + 1), &tx).await }
    });
    let latest = Lease {
        subnet: net("10.244.209.0/24"),
        attrs: attrs("198.18.0.12", "02:00:00:00:01:05"),
    };
    assert_eq!(next(&mut rx).await, LeaseWatchEvent::Snapshot(vec![latest]));

    // And it watches again from the new listing.
    client.delete(peer_key.as_str(), None).await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        LeaseWatchEvent::Event(LeaseEvent::Removed(net("10.244.209.0/24")))
    );
    drop(rx);
    tokio::time::timeout(WAIT, watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
