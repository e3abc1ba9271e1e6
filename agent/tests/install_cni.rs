//! `weft install-cni` and `weft mount-bpffs`, run as the DaemonSet's init containers run
//! them: the real binaries (`weft-cni` is found next to `weft`), into temporary directories.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WEFT_CNI: &str = env!("CARGO_BIN_EXE_weft-cni");

/// flannel's 10-flannel.conflist.
const CONFLIST: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    { "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
"#;

struct Node {
    _dir: tempfile::TempDir,
    plugin_dir: PathBuf,
    conf_dir: PathBuf,
    conflist: PathBuf,
}

impl Node {
    /// Host directories that do not exist yet (install-cni creates them) and a conflist.
    fn new(conflist: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let node = Node {
            plugin_dir: dir.path().join("opt/cni/bin"),
            conf_dir: dir.path().join("etc/cni/net.d"),
            conflist: dir.path().join("cni-conf.json"),
            _dir: dir,
        };
        fs::write(&node.conflist, conflist).unwrap();
        node
    }

    fn plugin(&self) -> PathBuf {
        self.plugin_dir.join("flannel")
    }

    fn installed_conflist(&self) -> PathBuf {
        self.conf_dir.join("10-flannel.conflist")
    }

    /// `weft install-cni` with the DaemonSet's arguments (and `extra`), under a umask that
    /// would strip the modes if install-cni relied on it.
    fn install(&self, extra: &[&str]) -> Output {
        let mut argv = vec![
            WEFT.to_string(),
            "install-cni".into(),
            format!("--plugin-dir={}", self.plugin_dir.display()),
            format!("--conf-dir={}", self.conf_dir.display()),
            format!("--conflist={}", self.conflist.display()),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Command::new("sh")
            .arg("-c")
            .arg("umask 077 && exec \"$@\"")
            .arg("sh")
            .args(&argv)
            .output()
            .unwrap()
    }

    /// Every entry of both directories (a leftover temporary file would show here).
    fn entries(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in [&self.plugin_dir, &self.conf_dir] {
            if let Ok(read) = fs::read_dir(dir) {
                for entry in read {
                    names.push(entry.unwrap().path().display().to_string());
                }
            }
        }
        names.sort();
        names
    }
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "install-cni failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn failure(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "expected a failure, got: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn inode(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

#[test]
fn installs_the_plugin_as_flannel_and_the_conflist() {
    let node = Node::new(CONFLIST);
    let out = stdout(&node.install(&[]));
    assert_eq!(
        out,
        format!(
            "weft install-cni: installed {}\nweft install-cni: installed {}\n",
            node.plugin().display(),
            node.installed_conflist().display()
        )
    );
    assert_eq!(
        fs::read(node.plugin()).unwrap(),
        fs::read(WEFT_CNI).unwrap()
    );
    assert_eq!(mode(&node.plugin()), 0o755);
    assert_eq!(
        fs::read_to_string(node.installed_conflist()).unwrap(),
        CONFLIST
    );
    assert_eq!(mode(&node.installed_conflist()), 0o644);
    assert_eq!(
        node.entries(),
        [
            node.installed_conflist().display().to_string(),
            node.plugin().display().to_string()
        ],
        "nothing but the two files (no temporary file left)"
    );

    // The installed file is a working CNI plugin.
    let version = Command::new(node.plugin())
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains("\"supportedVersions\""));
}

#[test]
fn reinstalling_is_idempotent_and_replaces_files_atomically() {
    let node = Node::new(CONFLIST);
    stdout(&node.install(&[]));
    let (plugin_inode, conflist_inode) = (inode(&node.plugin()), inode(&node.installed_conflist()));

    // Nothing changed: nothing is written.
    let out = stdout(&node.install(&[]));
    assert_eq!(
        out,
        format!(
            "weft install-cni: {} is up to date\nweft install-cni: {} is up to date\n",
            node.plugin().display(),
            node.installed_conflist().display()
        )
    );
    assert_eq!(inode(&node.plugin()), plugin_inode);
    assert_eq!(inode(&node.installed_conflist()), conflist_inode);

    // A new conflist replaces the old one by rename: a reader that opened the old file
    // keeps reading it whole, never a mix or a truncated file.
    let mut reader = fs::File::open(node.installed_conflist()).unwrap();
    let changed = CONFLIST.replace("\"isDefaultGateway\": true", "\"isDefaultGateway\": false");
    fs::write(&node.conflist, &changed).unwrap();
    let out = stdout(&node.install(&[]));
    assert!(
        out.contains(&format!("{} is up to date", node.plugin().display())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "installed {}",
            node.installed_conflist().display()
        )),
        "{out}"
    );
    let mut old = String::new();
    reader.read_to_string(&mut old).unwrap();
    assert_eq!(old, CONFLIST);
    assert_eq!(
        fs::read_to_string(node.installed_conflist()).unwrap(),
        changed
    );
    assert_ne!(inode(&node.installed_conflist()), conflist_inode);

    // A wrong mode is repaired; so is a plugin someone overwrote (e.g. flannel's own).
    fs::set_permissions(node.plugin(), fs::Permissions::from_mode(0o600)).unwrap();
    stdout(&node.install(&[]));
    assert_eq!(mode(&node.plugin()), 0o755);
    fs::write(node.plugin(), b"#!/bin/sh\nexit 1\n").unwrap();
    let out = stdout(&node.install(&[]));
    assert!(
        out.contains(&format!("installed {}", node.plugin().display())),
        "{out}"
    );
    assert_eq!(
        fs::read(node.plugin()).unwrap(),
        fs::read(WEFT_CNI).unwrap()
    );
    assert_eq!(node.entries().len(), 2, "{:?}", node.entries());
}

#[test]
fn other_names_and_plugin_source() {
    let node = Node::new(&CONFLIST.replace("\"flannel\"", "\"weft\""));
    let source = node.conflist.with_file_name("my-plugin");
    fs::write(&source, b"plugin bytes").unwrap();
    stdout(&node.install(&[
        "--plugin-name=weft",
        "--conf-name=05-weft.conflist",
        &format!("--plugin-src={}", source.display()),
    ]));
    assert_eq!(
        fs::read(node.plugin_dir.join("weft")).unwrap(),
        b"plugin bytes"
    );
    assert_eq!(mode(&node.plugin_dir.join("weft")), 0o755);
    assert!(node.conf_dir.join("05-weft.conflist").is_file());
}

#[test]
fn a_bad_conflist_is_refused_by_name_and_nothing_is_installed() {
    let cases = [
        ("{\"name\": \"cbr0\",", "not valid JSON"),
        (
            r#"{"name": "cbr0", "cniVersion": "0.3.1", "type": "flannel"}"#,
            "has no \"plugins\" list",
        ),
        (
            r#"{"name": "cbr0", "cniVersion": "0.3.1", "plugins": []}"#,
            "\"plugins\" list is empty",
        ),
        (
            r#"{"name": "cbr0", "cniVersion": "0.3.1", "plugins": [{"delegate": {}}]}"#,
            "plugins[0] has no string \"type\"",
        ),
        (
            r#"{"name": "cbr0", "cniVersion": "0.3.1", "plugins": [{"type": "bridge"}]}"#,
            "no entry of \"plugins\" has \"type\": \"flannel\"",
        ),
        (
            r#"{"name": "cbr0", "cniVersion": "0.3.1", "plugins": [{"type": "portmap"}, {"type": "flannel", "delegate": []}]}"#,
            "plugins[1] (type flannel): `delegate` must be a JSON object",
        ),
        (
            r#"{"name": "cbr0", "cniVersion": "0.2.0", "plugins": [{"type": "flannel"}]}"#,
            "0.3.0, 0.3.1, 0.4.0, 1.0.0",
        ),
    ];
    for (conflist, expected) in cases {
        let node = Node::new(conflist);
        let error = failure(&node.install(&[]));
        assert!(
            error.contains(&format!("--conflist {}", node.conflist.display()))
                && error.contains(expected),
            "{conflist}: {error}"
        );
        assert!(
            node.entries().is_empty(),
            "{conflist}: {:?}",
            node.entries()
        );
    }
}

#[test]
fn bad_arguments_name_the_flag() {
    let node = Node::new(CONFLIST);
    let error = failure(&node.install(&["--plugin-name=../flannel"]));
    assert!(error.contains("--plugin-name \"../flannel\""), "{error}");
    let error = failure(&node.install(&["--plugin-src=/nonexistent/weft-cni"]));
    assert!(
        error.contains("/nonexistent/weft-cni") && error.contains("--plugin-src"),
        "{error}"
    );
    fs::remove_file(&node.conflist).unwrap();
    let error = failure(&node.install(&[]));
    assert!(
        error.contains(&format!("--conflist {}", node.conflist.display())),
        "{error}"
    );
    assert!(node.entries().is_empty());
}

/// A bpffs mounted on a temporary directory, unmounted on every exit path.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mount() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a bpffs on {}",
            dir.path().display()
        );
        Bpffs { dir }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn mount_bpffs(dir: &Path) -> Output {
    Command::new(WEFT)
        .arg("mount-bpffs")
        .arg(format!("--bpf-dir={}", dir.display()))
        .env_remove("WEFT_BPF_DIR")
        .output()
        .unwrap()
}

#[test]
fn mount_bpffs_prepares_the_pin_directory() {
    let bpffs = Bpffs::mount();
    let pins = bpffs.dir.path().join("weft");
    let out = mount_bpffs(&pins);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pins.is_dir());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "weft mount-bpffs: {} is on a BPF filesystem; the agent pins its maps there\n",
            pins.display()
        )
    );
    // Idempotent.
    assert!(mount_bpffs(&pins).status.success());

    // Outside /sys/fs/bpf nothing is mounted: an ordinary directory is refused.
    let plain = tempfile::tempdir().unwrap();
    let error = failure(&mount_bpffs(&plain.path().join("weft")));
    assert!(
        error.contains("--bpf-dir") && error.contains("is not on a BPF filesystem"),
        "{error}"
    );
    assert!(!plain.path().join("weft").exists());
}
