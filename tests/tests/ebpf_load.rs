//! The eBPF object built by `cargo xtask build-ebpf` loads into the kernel with
//! its BTF, attaches as a TC ingress classifier, and counts the packets that
//! cross it, all inside network namespaces this test creates.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::PerCpuArray,
    programs::{tc, SchedClassifier, TcAttachType},
    Ebpf,
};
use weft_common::{Counter, COUNTERS_MAP, PROG_FROM_POD};

const NAMESPACE_PREFIX: &str = "wt-ebl-";
const PINGS: u64 = 5;
const SENDER_ADDR: &str = "198.18.0.1";
const RECEIVER_ADDR: &str = "198.18.0.2";

fn object_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/weft.bpf.o")
}

#[test]
fn from_pod_loads_with_btf_and_counts_ingress_packets() -> Result<()> {
    let object = object_path();
    let bytes = std::fs::read(&object).with_context(|| {
        format!(
            "cannot read the eBPF object {}: run `cargo xtask build-ebpf` first",
            object.display()
        )
    })?;

    sweep_leftover_namespaces()?;
    let lab = Namespaces::create(["sender", "receiver"])?;
    let (sender, receiver) = (&lab.names[0], &lab.names[1]);
    // Born in the sender namespace, its peer directly in the receiver's.
    ip(&[
        "-n", sender, "link", "add", "veth-s", "type", "veth", "peer", "name", "veth-r", "netns",
        receiver,
    ])?;
    ip(&[
        "-n",
        sender,
        "addr",
        "add",
        &format!("{SENDER_ADDR}/24"),
        "dev",
        "veth-s",
    ])?;
    ip(&[
        "-n",
        receiver,
        "addr",
        "add",
        &format!("{RECEIVER_ADDR}/24"),
        "dev",
        "veth-r",
    ])?;
    ip(&["-n", sender, "link", "set", "veth-s", "up"])?;
    ip(&["-n", receiver, "link", "set", "veth-r", "up"])?;

    let receiver_netns = netns_file(receiver)?;
    let sender = sender.clone();
    // Loading, attaching and reading happen in a thread that entered the
    // receiver namespace: interface names and TC hooks resolve there.
    thread::spawn(move || -> Result<()> {
        enter_netns(&receiver_netns)?;
        let mut ebpf = Ebpf::load(&bytes).context("loading the eBPF object")?;

        let program: &mut SchedClassifier = ebpf
            .program_mut(PROG_FROM_POD)
            .with_context(|| format!("the object has no program {PROG_FROM_POD}"))?
            .try_into()?;
        program.load().context("the verifier rejected from_pod")?;
        let info = program.info()?;
        ensure!(
            info.btf_id().is_some(),
            "from_pod was loaded without BTF: the object lacks .BTF (bpf-linker --btf)"
        );
        // clsact is what pre-6.6 kernels attach to; newer ones use TCX.
        tc::qdisc_add_clsact("veth-r").context("adding clsact to veth-r")?;
        program
            .attach("veth-r", TcAttachType::Ingress)
            .context("attaching from_pod to veth-r ingress")?;

        let before = packets_seen(&ebpf)?;
        let ping = Command::new("ip")
            .args(["netns", "exec", &sender, "ping", "-n", "-q"])
            .args(["-c", &PINGS.to_string(), "-i", "0.2", "-w", "10"])
            .arg(RECEIVER_ADDR)
            .output()
            .context("running ping")?;
        ensure!(
            ping.status.success(),
            "ping across the classifier failed (it must pass packets): {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        let seen = packets_seen(&ebpf)? - before;
        ensure!(
            seen >= PINGS,
            "from_pod counted {seen} packets on veth-r ingress, expected at least {PINGS} echo requests"
        );
        Ok(())
    })
    .join()
    .expect("the namespace thread panicked")
}

/// The PacketsSeen counter summed over CPUs.
fn packets_seen(ebpf: &Ebpf) -> Result<u64> {
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map(COUNTERS_MAP)
            .with_context(|| format!("the object has no map {COUNTERS_MAP}"))?,
    )?;
    let per_cpu = counters.get(&Counter::PacketsSeen.index(), 0)?;
    Ok(per_cpu.iter().sum())
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn netns_file(name: &str) -> Result<File> {
    let path = format!("/run/netns/{name}");
    File::open(&path).with_context(|| format!("opening {path}"))
}

/// Moves the calling thread (and the processes it spawns) into `netns`.
fn enter_netns(netns: &File) -> Result<()> {
    // SAFETY: a plain syscall on a valid, open namespace file descriptor.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns into the test namespace");
    }
    Ok(())
}

/// Network namespaces named `wt-ebl-<pid>-<role>`, deleted on drop.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create<const N: usize>(roles: [&str; N]) -> Result<Self> {
        let mut namespaces = Namespaces { names: Vec::new() };
        for role in roles {
            let name = format!("{NAMESPACE_PREFIX}{}-{role}", std::process::id());
            ip(&["netns", "add", &name])?;
            namespaces.names.push(name);
        }
        Ok(namespaces)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            // Deleting the namespace also deletes its veth end and the program's hooks.
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Deletes namespaces of this test left by runs whose process is gone.
fn sweep_leftover_namespaces() -> Result<()> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(());
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            ip(&["netns", "del", &name])?;
        }
    }
    Ok(())
}
