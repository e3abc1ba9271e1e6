//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the `weft` binary.
//!
//! `aya::include_bytes_aligned!` needs a path known at compile time, so the object is
//! copied to `$OUT_DIR/weft.bpf.o`; an empty file there means "built without the object"
//! (the agent then says how to fix that when the BPF dataplane is asked for).
//! `WEFT_BPF_OBJECT=<path>` embeds another object instead of `<workspace>/target/bpf/weft.bpf.o`.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-env-changed=WEFT_BPF_OBJECT");
    let source = env::var_os("WEFT_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target/bpf/weft.bpf.o"));
    // A missing file makes cargo re-run this script on every build, so the object is
    // picked up as soon as `cargo xtask build-ebpf` has made it.
    println!("cargo:rerun-if-changed={}", source.display());

    let object = fs::read(&source).unwrap_or_default();
    let embedded = out_dir.join("weft.bpf.o");
    // Rewriting identical bytes would only make cargo rebuild the crate.
    if fs::read(&embedded).ok().as_deref() != Some(object.as_slice()) {
        fs::write(&embedded, &object).expect("writing the embedded eBPF object to OUT_DIR");
    }
    if object.is_empty() {
        println!(
            "cargo:warning=no eBPF object at {}: this weft has no BPF dataplane (run `cargo xtask build-ebpf` first)",
            source.display()
        );
    }
}
