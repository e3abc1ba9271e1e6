//! Building the eBPF object.
//!
//! The eBPF crate (`ebpf/`, its own workspace) targets `bpfel-unknown-none`, a
//! tier-3 target. Rustup's toolchains have no `core` for it (that would need
//! `-Z build-std` and `rust-src`), but Debian's rustc 1.96 ships a prebuilt one
//! (package `libstd-rust-web-dev-bpf`). So this build runs with:
//!
//! - `/usr/bin/cargo` and `RUSTC=/usr/bin/rustc` (Debian's), with every
//!   rustup/cargo variable inherited from the outer `cargo xtask` removed,
//! - `PATH=/opt/weft-tools/bin:/usr/bin:$PATH` so rustc finds `bpf-linker`,
//! - `RUSTC_BOOTSTRAP=aya_ebpf`: aya-ebpf needs `asm_experimental_arch`; the
//!   crate list limits unstable features to that one crate,
//! - target and rustflags from `ebpf/.cargo/config.toml`.

use std::{fs, path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, Result};

use crate::{execute, target_dir, workspace_root};

/// Where the built object is copied, relative to the workspace root. The agent
/// embeds this file (`include_bytes!`) and the tests load it. Rebuild it with
/// `cargo xtask build-ebpf`.
pub const OBJECT_PATH: &str = "target/bpf/weft.bpf.o";

/// Debian's cargo and rustc, which have the prebuilt `core` for the BPF target.
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// Where `cargo xtask setup` installs bpf-linker.
pub const TOOLS_BIN: &str = "/opt/weft-tools/bin";
/// Crates allowed to use unstable features on Debian's stable rustc.
const UNSTABLE_FEATURE_CRATES: &str = "aya_ebpf";
const TARGET: &str = "bpfel-unknown-none";
/// The `[[bin]]` name in ebpf/Cargo.toml.
const BIN_NAME: &str = "weft";

/// Builds `ebpf/` and copies the object to [`OBJECT_PATH`]; returns that path.
pub fn build() -> Result<PathBuf> {
    let started = Instant::now();
    let build_dir = target_dir().join("ebpf");
    let mut command = debian_cargo();
    command
        .current_dir(workspace_root().join("ebpf"))
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&build_dir)
        .env("RUSTC_BOOTSTRAP", UNSTABLE_FEATURE_CRATES);
    execute(&mut command).context(
        "building the eBPF programs failed; `cargo xtask setup` installs Debian's \
         rustc with the BPF target and bpf-linker",
    )?;

    let built = build_dir.join(TARGET).join("release").join(BIN_NAME);
    let object = workspace_root().join(OBJECT_PATH);
    let changed = install_if_changed(&built, &object)?;
    println!(
        "xtask: eBPF object {} ({}) in {:.1}s",
        object.display(),
        if changed { "updated" } else { "unchanged" },
        started.elapsed().as_secs_f64()
    );
    Ok(object)
}

/// Debian's cargo with a clean environment: nothing from rustup or from the
/// outer cargo (toolchain, target dir, rustflags, wrappers) may leak in.
pub fn debian_cargo() -> Command {
    let mut command = Command::new(DEBIAN_CARGO);
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str() {
            if leaks_into_nested_cargo(name) {
                command.env_remove(name);
            }
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    command
        .env("PATH", format!("{TOOLS_BIN}:/usr/bin:{path}"))
        .env("RUSTC", DEBIAN_RUSTC);
    command
}

fn leaks_into_nested_cargo(name: &str) -> bool {
    // Kept: where the registry cache lives and how to reach the network.
    let kept = name == "CARGO_HOME"
        || name.starts_with("CARGO_HTTP_")
        || name.starts_with("CARGO_NET_")
        || name.starts_with("CARGO_REGISTRIES_");
    !kept
        && (name.starts_with("CARGO")
            || name.starts_with("__CARGO")
            || name.starts_with("RUSTUP_")
            || name.starts_with("RUSTC")
            || name.starts_with("RUSTDOC")
            || name == "RUSTFLAGS")
}

/// Copies `from` to `to` unless `to` already holds the same bytes, so that an
/// unchanged object does not make cargo rebuild the crate that embeds it.
/// Writes through a temporary file and a rename: readers never see half a file.
fn install_if_changed(from: &PathBuf, to: &PathBuf) -> Result<bool> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if fs::read(to).is_ok_and(|current| current == bytes) {
        return Ok(false);
    }
    let dir = to.parent().expect("OBJECT_PATH has a parent directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = to.with_extension("o.partial");
    fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, to).with_context(|| format!("renaming to {}", to.display()))?;
    Ok(true)
}
