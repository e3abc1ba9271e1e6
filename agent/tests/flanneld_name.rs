//! The `weft` binary installed under flanneld's name runs as the agent and takes Go-style
//! flags, so that unit files and wrappers written for flanneld work unchanged.

use std::process::Command;

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
