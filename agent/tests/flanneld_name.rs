//! The `weft` binary installed under flanneld's name runs as the agent and takes Go-style
//! flags, so that unit files and wrappers written for flanneld work unchanged.

use std::process::Command;

use clap::Parser;

fn flanneld() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("flanneld");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weft"), &link).unwrap();
    (dir, link)
}

#[test]
fn installed_as_flanneld_it_is_the_agent_with_go_style_flags() {
    let (_dir, flanneld) = flanneld();
    let out = Command::new(&flanneld)
        .args(["-etcd-prefix=/atomic.io/network", "-ip-masq", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        help.contains("Usage: flanneld agent") || help.contains("--etcd-endpoints"),
        "{help}"
    );

    let out = Command::new(&flanneld)
        .arg("-no-such-flag=1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unexpected argument") && err.contains("Usage: flanneld agent"),
        "{err}"
    );
}

#[test]
fn installed_as_mk_docker_opts_sh_it_writes_dockers_options() {
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("mk-docker-opts.sh");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_weft"), &tool).unwrap();
    let subnet_env = dir.path().join("subnet.env");
    std::fs::write(
        &subnet_env,
        "FLANNEL_NETWORK=172.30.0.0/16\nFLANNEL_SUBNET=172.30.46.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let docker = dir.path().join("docker");
    // The packaged flanneld.service's ExecStartPost line, with our paths.
    let out = Command::new(&tool)
        .args(["-k", "DOCKER_NETWORK_OPTIONS", "-d"])
        .arg(&docker)
        .arg("-f")
        .arg(&subnet_env)
        .env_remove("DOCKER_NETWORK_OPTIONS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&docker).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=172.30.46.1/24\"\n\
         DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
         DOCKER_OPT_MTU=\"--mtu=1450\"\n\
         DOCKER_NETWORK_OPTIONS=\" --bip=172.30.46.1/24 --ip-masq=true --mtu=1450 \"\n"
    );
    // -i only, to /run/docker_opts.env's stand-in.
    let individual = dir.path().join("docker_opts.env");
    let out = Command::new(&tool)
        .arg("-i")
        .arg("-d")
        .arg(&individual)
        .arg("-f")
        .arg(&subnet_env)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&individual).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=172.30.46.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
    );
}

/// The unit's ExecStart line, with the environment file's values substituted as systemd
/// does (`${VAR}` whole, `$VAR` split on whitespace), parses as the agent's command line.
#[test]
fn the_systemd_units_exec_start_line_parses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let unit = std::fs::read_to_string(root.join("weft.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("Before=docker.service kubelet.service"));
    let commands = weft_tests::unit_file::unit_commands(
        &root.join("weft.service"),
        &root.join("flanneld.env"),
        &[("FLANNEL_OPTIONS", "-iface=eth0 -ip-masq -healthz-port=2401")],
    )
    .unwrap();
    let argv = commands.exec_start;
    let cli = weft::cli::Cli::try_parse_from(weft::cli::normalize_args(
        argv.iter().map(std::ffi::OsString::from),
    ))
    .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let weft::cli::Command::Agent(agent) = cli.command else {
        panic!("{argv:?} is not the agent");
    };
    assert_eq!(agent.etcd_endpoints, "http://127.0.0.1:2379");
    assert_eq!(agent.etcd_prefix, "/atomic.io/network");
    assert!(agent.ip_masq);
    assert_eq!(agent.healthz_port, 2401);
    let post = commands.exec_start_post.join(" ");
    let argv: Vec<&str> = post.split_whitespace().collect();
    let cli = weft::cli::Cli::try_parse_from(weft::cli::normalize_args(
        argv.iter().map(std::ffi::OsString::from),
    ))
    .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        matches!(cli.command, weft::cli::Command::MkDockerOpts(_)),
        "{argv:?}"
    );
}
