//! weft-cni runs in the host's namespace from /opt/cni/bin, on whatever C library the host
//! has: the build `cargo xtask test` makes of it (target/static, glibc crt-static) must
//! need no shared library at all.

use std::path::PathBuf;
use std::process::Command;

fn static_plugin() -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/static")
        .join(triple)
        .join("release/weft-cni")
}

#[test]
fn the_cni_plugin_links_no_shared_library() {
    let plugin = static_plugin();
    assert!(
        plugin.is_file(),
        "{} is missing: `cargo xtask test` builds it (xtask's build_static_cni)",
        plugin.display()
    );
    let out = Command::new("ldd")
        .arg(&plugin)
        .output()
        .expect("running ldd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "ldd {}: {text}",
        plugin.display()
    );
    // And it still answers as a CNI plugin.
    let out = Command::new(&plugin)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("running the static plugin");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && version.contains("supportedVersions"),
        "{version}"
    );
}
