//! `cargo xtask setup`: install what the build and the tests need, skipping
//! what is already there (a no-op run takes well under a second).

use std::process::Command;

use anyhow::{Context, Result};

use crate::{
    ebpf::{debian_cargo, TOOLS_BIN},
    execute,
};

/// Debian packages: the BPF toolchain (Debian's rustc/cargo with a prebuilt
/// BPF `core`, LLVM 22 for bpf-linker, bpftool), the network tools the lab
/// drives, etcd, the CNI plugins, load generators, and protoc for etcd-client.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "clang-22",
    "bpftool",
    "libbpf-dev",
    "iproute2",
    "nftables",
    "iptables",
    "etcd-server",
    "etcd-client",
    "containernetworking-plugins",
    "iperf3",
    "sockperf",
    "tshark",
    "tcpdump",
    "ethtool",
    "iputils-ping",
    "netcat-openbsd",
    "protobuf-compiler",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLS_ROOT: &str = "/opt/weft-tools";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    install_apt_packages()?;
    install_bpf_linker()
}

fn install_apt_packages() -> Result<()> {
    let missing = missing_apt_packages()?;
    if missing.is_empty() {
        println!("xtask: apt packages: all {} installed", APT_PACKAGES.len());
        return Ok(());
    }
    println!("xtask: apt packages missing: {}", missing.join(" "));
    execute(as_root("apt-get").arg("update"))?;
    execute(
        as_root("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The packages of [`APT_PACKAGES`] that dpkg does not report as installed.
fn missing_apt_packages() -> Result<Vec<&'static str>> {
    // dpkg-query exits non-zero when it knows nothing of a package: only its
    // output matters.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(APT_PACKAGES)
        .output()
        .context("cannot run dpkg-query: `cargo xtask setup` needs a Debian system")?;
    let report = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = report
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect())
}

/// apt-get and friends need root; use sudo when not running as root.
fn as_root(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        command.args(["--preserve-env=DEBIAN_FRONTEND", program]);
        command
    }
}

/// bpf-linker links the eBPF crate; it is built against Debian's LLVM 22
/// (about two minutes on 2 cores), once.
fn install_bpf_linker() -> Result<()> {
    let linker = format!("{TOOLS_BIN}/bpf-linker");
    let installed = Command::new(&linker)
        .arg("--version")
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    if installed
        .split_whitespace()
        .any(|word| word == BPF_LINKER_VERSION)
    {
        println!("xtask: {linker} {BPF_LINKER_VERSION} installed");
        return Ok(());
    }
    println!("xtask: installing bpf-linker {BPF_LINKER_VERSION} into {TOOLS_ROOT}");
    execute(
        debian_cargo()
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .args(["--root", TOOLS_ROOT])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("installing bpf-linker (needs llvm-22-dev, from the apt step)")
}
