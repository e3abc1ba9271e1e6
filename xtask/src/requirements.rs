//! Everything outside the Rust toolchain that the build, the agent's tests, the lab and
//! the benchmark use, each with where it comes from. `cargo xtask setup` installs the
//! packages named here and then checks every entry, so a machine that lacks one fails
//! loudly at set-up, naming the file and its package, instead of minutes later in a
//! build script or a test. A unit test (`source_scan`) reads the sources for the
//! programs they start and fails if one is missing here.

use std::path::{Path, PathBuf};

use crate::ebpf::TOOLS_BIN;

/// What must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// An executable found on PATH or in the sbin directories (root's PATH has them).
    Program(&'static str),
    /// A file at an absolute path; a `*` in the last component matches any run of characters.
    File(&'static str),
    /// A CNI plugin in Debian's plugin directory ([`CNI_DIR`]).
    CniPlugin(&'static str),
}

/// Where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Debian package, installed by `apt-get`.
    Apt(&'static str),
    /// bpf-linker, built by `cargo install` against Debian's LLVM (see `setup`).
    BpfLinker,
}

#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    pub need: Need,
    pub source: Source,
    /// Who uses it, for the README and for the error message.
    pub used_by: &'static str,
}

/// Debian's CNI plugin directory (containernetworking-plugins).
pub const CNI_DIR: &str = "/usr/lib/cni";

/// Where `cargo xtask setup` installs bpf-linker.
pub fn bpf_linker_path() -> PathBuf {
    Path::new(TOOLS_BIN).join("bpf-linker")
}

const fn program(name: &'static str, package: &'static str, used_by: &'static str) -> Requirement {
    Requirement {
        need: Need::Program(name),
        source: Source::Apt(package),
        used_by,
    }
}

const fn file(path: &'static str, package: &'static str, used_by: &'static str) -> Requirement {
    Requirement {
        need: Need::File(path),
        source: Source::Apt(package),
        used_by,
    }
}

const fn cni(name: &'static str, used_by: &'static str) -> Requirement {
    Requirement {
        need: Need::CniPlugin(name),
        source: Source::Apt("containernetworking-plugins"),
        used_by,
    }
}

const BUILD: &str = "the build";
const EBPF_BUILD: &str = "the eBPF build (cargo xtask build-ebpf)";
const LAB: &str = "the namespace lab and the network tests";
const LOAD: &str = "the lab's load tests and cargo xtask bench";
const AGENT: &str = "the agent's firewall rules (--ip-masq, forward rules)";

/// The list. Programs the agent itself runs at run time (nft, iptables) are here too:
/// the tests run the agent.
pub const REQUIREMENTS: &[Requirement] = &[
    // The build: etcd-client's build script runs protoc on etcd's .proto files, which
    // import protobuf's well-known types.
    program("protoc", "protobuf-compiler", BUILD),
    file(
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
        BUILD,
    ),
    file(
        "/usr/include/google/protobuf/struct.proto",
        "libprotobuf-dev",
        BUILD,
    ),
    // The eBPF build: Debian's rustc with a prebuilt `core` for the BPF target, and
    // bpf-linker built against Debian's LLVM 22.
    file("/usr/bin/rustc", "rustc-web", EBPF_BUILD),
    file("/usr/bin/cargo", "cargo-web", EBPF_BUILD),
    file(
        "/usr/lib/rustlib/bpfel-unknown-none/lib/libcore-*.rlib",
        "libstd-rust-web-dev-bpf",
        EBPF_BUILD,
    ),
    file("/usr/lib/llvm-22/lib/libLLVM.so", "llvm-22-dev", EBPF_BUILD),
    Requirement {
        need: Need::File("/opt/weft-tools/bin/bpf-linker"),
        source: Source::BpfLinker,
        used_by: EBPF_BUILD,
    },
    program(
        "bpftool",
        "bpftool",
        "the eBPF tests (map and program inspection)",
    ),
    // The lab.
    program("ip", "iproute2", LAB),
    program("bridge", "iproute2", LAB),
    program("tc", "iproute2", LAB),
    program("ss", "iproute2", LOAD),
    program(
        "nstat",
        "iproute2",
        "cargo xtask bench (what the retransmits are)",
    ),
    program("sysctl", "procps", LAB),
    program("ping", "iputils-ping", LAB),
    program("tcpdump", "tcpdump", LAB),
    program("tshark", "tshark", "the VXLAN wire-format tests"),
    program("/usr/bin/etcd", "etcd-server", LAB),
    program("etcdctl", "etcd-client", LAB),
    cni("bridge", LAB),
    cni("host-local", LAB),
    cni("loopback", LAB),
    cni(
        "portmap",
        "the lab's hostPort pods (kube-flannel's conflist chains portmap)",
    ),
    cni(
        "bandwidth",
        "the lab's shaped pods (traffic control the fast path must not bypass)",
    ),
    program("nft", "nftables", AGENT),
    program("iptables", "iptables", AGENT),
    program("iptables-save", "iptables", AGENT),
    program("iptables-restore", "iptables", AGENT),
    program(
        "iptables-nft-save",
        "iptables",
        "the agent's check for policy rules in FORWARD",
    ),
    program(
        "iptables-legacy-save",
        "iptables",
        "the agent's check for policy rules in FORWARD",
    ),
    program("iperf3", "iperf3", LOAD),
    program("sockperf", "sockperf", LOAD),
    // Part of every Debian system; listed because the tests start them.
    program("sh", "dash", LAB),
    program("timeout", "coreutils", LAB),
    program(
        "sleep",
        "coreutils",
        "the agent's unit test of a firewall tool killed at its deadline",
    ),
    program("cat", "coreutils", LAB),
    program("head", "coreutils", LAB),
    program("grep", "grep", LAB),
    program(
        "date",
        "coreutils",
        "cargo xtask bench (the report's header)",
    ),
    program(
        "uname",
        "coreutils",
        "cargo xtask bench (the report's header)",
    ),
    program("mount", "mount", LAB),
    program("umount", "mount", LAB),
    program(
        "unshare",
        "util-linux",
        "the lab node run with flannel's default paths (a private mount namespace)",
    ),
    program(
        "ldd",
        "libc-bin",
        "the test that weft-cni links no shared library",
    ),
];

/// The Debian packages of [`REQUIREMENTS`], each once, in list order.
pub fn apt_packages() -> Vec<&'static str> {
    let mut packages = Vec::new();
    for requirement in REQUIREMENTS {
        if let Source::Apt(package) = requirement.source {
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    packages
}

impl Need {
    /// The program or file name the sources use for it.
    pub fn name(&self) -> &'static str {
        match self {
            Need::Program(name) | Need::File(name) | Need::CniPlugin(name) => name,
        }
    }

    /// Where it was found on this machine, if anywhere.
    pub fn locate(&self) -> Option<PathBuf> {
        match self {
            Need::Program(name) if name.starts_with('/') => executable(Path::new(name)),
            Need::Program(name) => search_path()
                .into_iter()
                .find_map(|dir| executable(&dir.join(name))),
            Need::File(pattern) => find_file(pattern),
            Need::CniPlugin(name) => executable(&Path::new(CNI_DIR).join(name)),
        }
    }
}

impl Source {
    /// What installs it, for messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Apt(package) => format!("Debian package {package}"),
            Source::BpfLinker => "cargo install bpf-linker (cargo xtask setup)".to_string(),
        }
    }
}

/// PATH, then the sbin directories (a non-root user's PATH often lacks them).
fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|known| known == Path::new(dir)) {
            dirs.push(dir.into());
        }
    }
    dirs
}

fn executable(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).ok()?;
    (metadata.is_file() && metadata.permissions().mode() & 0o111 != 0).then(|| path.to_path_buf())
}

/// `pattern` is an absolute path whose last component may hold one `*`.
fn find_file(pattern: &str) -> Option<PathBuf> {
    let path = Path::new(pattern);
    let name = path.file_name()?.to_str()?;
    let Some((prefix, suffix)) = name.split_once('*') else {
        return path.is_file().then(|| path.to_path_buf());
    };
    std::fs::read_dir(path.parent()?)
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|candidate| {
            candidate.is_file()
                && candidate
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| {
                        n.len() >= prefix.len() + suffix.len()
                            && n.starts_with(prefix)
                            && n.ends_with(suffix)
                    })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_names_something_and_each_package_once_in_the_apt_list() {
        let packages = apt_packages();
        let mut seen = std::collections::HashSet::new();
        for package in &packages {
            assert!(seen.insert(package), "{package} twice in apt_packages()");
        }
        for requirement in REQUIREMENTS {
            assert!(!requirement.need.name().is_empty());
            if let Source::Apt(package) = requirement.source {
                assert!(packages.contains(&package));
            }
        }
        assert!(packages.contains(&"libprotobuf-dev"));
    }

    #[test]
    fn a_wildcard_matches_inside_the_last_component_only() {
        let dir = std::env::temp_dir().join(format!("weft-xtask-glob-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libcore-abc.rlib"), b"").unwrap();
        let found = find_file(&format!("{}/libcore-*.rlib", dir.display()));
        let missing = find_file(&format!("{}/liballoc-*.rlib", dir.display()));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, Some(dir.join("libcore-abc.rlib")));
        assert_eq!(missing, None);
    }
}
