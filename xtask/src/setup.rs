//! `cargo xtask setup`: install what the build and the tests need (the Debian packages
//! and bpf-linker of [`REQUIREMENTS`]), skipping what is already there, then check that
//! every entry of that list is present: a missing one fails set-up with its name and
//! its package. A no-op run takes well under a second.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{
    ebpf::debian_cargo,
    execute,
    requirements::{apt_packages, bpf_linker_path, REQUIREMENTS},
};

const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLS_ROOT: &str = "/opt/weft-tools";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    install_apt_packages()?;
    install_bpf_linker()?;
    check_requirements()
}

/// Looks for every entry of [`REQUIREMENTS`]; prints what it found where, and fails
/// naming each missing one with the package that provides it.
fn check_requirements() -> Result<()> {
    let mut missing = Vec::new();
    for requirement in REQUIREMENTS {
        let name = requirement.need.name();
        match requirement.need.locate() {
            Some(path) => println!("xtask: checked {name}: {}", path.display()),
            None => missing.push(format!(
                "  {name} (used by {}): install {}",
                requirement.used_by,
                requirement.source.describe()
            )),
        }
    }
    if !missing.is_empty() {
        bail!(
            "set-up is incomplete, {} of {} requirements are missing:\n{}\n\
             `cargo xtask setup` installs them; if it just did, the package no longer \
             provides the file: fix the list in xtask/src/requirements.rs",
            missing.len(),
            REQUIREMENTS.len(),
            missing.join("\n")
        );
    }
    println!("xtask: all {} requirements present", REQUIREMENTS.len());
    Ok(())
}

fn install_apt_packages() -> Result<()> {
    let packages = apt_packages();
    let missing = missing_apt_packages(&packages)?;
    if missing.is_empty() {
        println!("xtask: apt packages: all {} installed", packages.len());
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

/// The `packages` that dpkg does not report as installed.
fn missing_apt_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    // dpkg-query exits non-zero when it knows nothing of a package: only its
    // output matters.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .output()
        .context("cannot run dpkg-query: `cargo xtask setup` needs a Debian system")?;
    let report = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = report
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Ok(packages
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
    let linker = bpf_linker_path();
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
        println!("xtask: {} {BPF_LINKER_VERSION} installed", linker.display());
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
