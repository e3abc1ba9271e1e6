//! etcd with TLS and client-certificate auth, as most etcd clusters that hold flannel's
//! config are run: a node started from the packaged unit's command lines verbatim (TLS
//! flags included) next to a node started the DaemonSet's way, and the mistakes users make
//! with certificates, each named with its fix.

use std::path::Path;
use std::time::Duration;

use weft_tests::exec::Cmd;
use weft_tests::pki::{Ca, CertFiles, Validity};
use weft_tests::unit_file::unit_commands;
use weft_tests::{wait_until, Dataplane, Lab, LabConfig};

const HEALTHZ_PORT: u16 = 2401;

fn deploy_systemd() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

#[test]
fn a_node_from_the_unit_file_and_a_daemonset_node_share_a_tls_etcd() {
    let mut lab = Lab::start(LabConfig {
        nodes: 2,
        etcd_tls: true,
        dataplane: Dataplane::Bpf,
        start_agents: false,
        ..Default::default()
    })
    .expect("lab starts");
    let pki = lab.etcd_pki().unwrap();
    // /etc/sysconfig/flanneld as an operator fills it in, flanneld.sh's flags in
    // FLANNEL_OPTIONS (Go style, as flanneld-start passes them, and GNU style mixed).
    let options = format!(
        "-etcd-cafile={} -etcd-certfile={} -etcd-keyfile={} -iface=eth0 -public-ip={} \
         --subnet-file=./subnet.env --healthz-port={HEALTHZ_PORT}",
        pki.ca.cert.display(),
        pki.client.cert.display(),
        pki.client.key.display(),
        lab.node_ip(1),
    );
    let endpoint = lab.etcd_endpoint().unwrap();
    let commands = unit_commands(
        &deploy_systemd().join("weft.service"),
        &deploy_systemd().join("flanneld.env"),
        &[
            ("FLANNEL_ETCD_ENDPOINTS", endpoint),
            ("FLANNEL_ETCD_PREFIX", "/coreos.com/network"),
            ("FLANNEL_OPTIONS", &options),
        ],
    )
    .expect("the unit's command lines");
    // The unit's programs, installed under flannel's names.
    let installed = |argv: &[String]| -> Vec<String> {
        let mut argv = argv.to_vec();
        let name = Path::new(&argv[0]).file_name().unwrap().to_string_lossy();
        argv[0] = lab.weft_as(&name).unwrap().to_string_lossy().into_owned();
        lab.host_paths_command(1, &argv)
    };
    let exec_start = installed(&commands.exec_start);
    let exec_start_post = installed(&commands.exec_start_post);

    let env = vec![("RUST_LOG".to_string(), "info".to_string())];
    let (_, before) = lab
        .spawn_agent_command(1, exec_start, env)
        .expect("ExecStart runs");
    lab.wait_agent_ready(1, before)
        .expect("the unit's node takes a lease over TLS");
    // ExecStartPost, as systemd runs it once the unit is ready.
    let post = Cmd::new(exec_start_post)
        .netns(lab.node_ns(1))
        .timeout(Duration::from_secs(10))
        .run();
    post.expect("mk-docker-opts.sh runs");
    // The DaemonSet's way: `weft agent` with its flags, the TLS files given as the
    // FLANNELD_* variables a manifest sets from a Secret.
    let pki = lab.etcd_pki().unwrap();
    let tls_env = [
        ("FLANNELD_ETCD_CAFILE", &pki.ca.cert),
        ("FLANNELD_ETCD_CERTFILE", &pki.client.cert),
        ("FLANNELD_ETCD_KEYFILE", &pki.client.key),
    ];
    let mut env: Vec<(String, String)> = tls_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string_lossy().into_owned()))
        .collect();
    env.push(("RUST_LOG".into(), "info".into()));
    let mut args = lab.agent_args(2).unwrap();
    for flag in ["--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"] {
        args = with(&args, flag, None);
    }
    let (_, before) = lab.spawn_agent_command(2, args, env).unwrap();
    lab.wait_agent_ready(2, before)
        .expect("the DaemonSet-style node takes a lease over TLS");

    let env1 = lab.subnet_env(1).unwrap();
    let subnet1 = env1["FLANNEL_SUBNET"].clone();
    let docker = std::fs::read_to_string(lab.node(1).dir.join("docker")).unwrap();
    assert!(
        docker.contains(&format!("DOCKER_NETWORK_OPTIONS=\" --bip={subnet1}")),
        "/run/flannel/docker:\n{docker}"
    );
    // Both leases are in the TLS etcd, the first with the public IP given by flag.
    let leases = lab.leases().unwrap();
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(
        leases.iter().any(|l| l.public_ip == lab.node_ip(1)
            && l.cidr().rsplit_once('.').map(|p| p.0) == subnet1.rsplit_once('.').map(|p| p.0)),
        "{leases:?}, node 1 has {subnet1}"
    );

    let a = lab.add_pod(1).unwrap();
    let b = lab.add_pod(2).unwrap();
    wait_until(
        "pods ping across the two nodes",
        Duration::from_secs(20),
        || Ok(lab.ping(&a, b.ip) && lab.ping(&b, a.ip)),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.diagnostics()));
    let (status, body) = lab.http_get(1, HEALTHZ_PORT, "/healthz").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
}

/// Runs node 1's agent with `args` and returns what it printed; it must fail within 30 s.
fn fails_with(lab: &Lab, args: &[String]) -> String {
    let out = Cmd::new(args.to_vec())
        .netns(lab.node_ns(1))
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{args:?} should fail at once, got {}:\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stderr
}

/// `args` with the value of `flag` replaced (or the flag and value removed for None).
fn with(args: &[String], flag: &str, value: Option<&Path>) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == flag {
            if let Some(value) = value {
                out.push(flag.to_string());
                out.push(value.to_string_lossy().into_owned());
            }
            i += 2;
        } else {
            out.push(args[i].clone());
            i += 1;
        }
    }
    out
}

/// `args` with another client certificate and its key.
fn with_client(args: &[String], client: &CertFiles) -> Vec<String> {
    let args = with(args, "--etcd-certfile", Some(&client.cert));
    with(&args, "--etcd-keyfile", Some(&client.key))
}

#[test]
fn certificate_mistakes_are_named_with_their_fix() {
    let lab = Lab::start(LabConfig {
        nodes: 1,
        etcd_tls: true,
        dataplane: Dataplane::Kernel,
        start_agents: false,
        ..Default::default()
    })
    .expect("lab starts");
    let pki = lab.etcd_pki().unwrap();
    let args = lab.agent_args(1).unwrap();
    let dir = lab.dir().join("mistakes");
    let other_ca = Ca::new(&dir, "other-ca").unwrap();
    let stranger = other_ca.client("stranger", Validity::Current).unwrap();
    let expired = pki.ca.client("expired", Validity::Expired).unwrap();
    let second = pki.ca.client("second", Validity::Current).unwrap();
    let (cafile, certfile, keyfile) = ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile");

    // The CA of another PKI: etcd's certificate does not verify.
    let err = fails_with(&lab, &with(&args, cafile, Some(&other_ca.cert)));
    assert!(
        err.contains("etcd's server certificate")
            && err.contains("is not signed by the CA in --etcd-cafile")
            && err.contains(&other_ca.cert.display().to_string()),
        "{err}"
    );
    // An expired client certificate: named before etcd refuses it.
    let err = fails_with(&lab, &with_client(&args, &expired));
    assert!(
        err.contains(&format!("--etcd-certfile {}", expired.cert.display()))
            && err.contains("expired on")
            && err.contains("issue a new one"),
        "{err}"
    );
    // A certificate with another certificate's key.
    let err = fails_with(&lab, &with(&args, keyfile, Some(&second.key)));
    assert!(
        err.contains(&format!(
            "--etcd-keyfile {} is not the private key of the certificate in --etcd-certfile {}",
            second.key.display(),
            pki.client.cert.display()
        )),
        "{err}"
    );
    // A client certificate etcd does not trust: refused in the handshake.
    let err = fails_with(&lab, &with_client(&args, &stranger));
    assert!(
        err.contains("refused the client certificate in --etcd-certfile")
            && err.contains(&stranger.cert.display().to_string())
            && err.contains("--trusted-ca-file"),
        "{err}"
    );
    // No client certificate at all.
    let err = fails_with(&lab, &with(&with(&args, certfile, None), keyfile, None));
    assert!(
        err.contains("requires a client certificate") && err.contains("--etcd-certfile"),
        "{err}"
    );
    // A key file that cannot be read.
    let missing = dir.join("client-key.pem");
    let err = fails_with(&lab, &with(&args, keyfile, Some(&missing)));
    assert!(
        err.contains(&format!("cannot read --etcd-keyfile {}", missing.display()))
            && err.contains("No such file"),
        "{err}"
    );
    // Plain http to a TLS-only etcd.
    let plain: Vec<String> = args
        .iter()
        .map(|a| a.replace("https://", "http://"))
        .collect();
    let err = fails_with(&lab, &with(&plain, cafile, None));
    assert!(
        err.contains("cannot reach etcd") && err.contains("if etcd serves TLS, write https://"),
        "{err}"
    );
}
