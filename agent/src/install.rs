//! Node preparation, run by the DaemonSet's init containers (deploy/weft.yml):
//!
//! - `weft install-cni`: the CNI plugin (`weft-cni`, installed as `flannel`) into the CNI
//!   bin directory and the conflist into the CNI conf directory, as flannel's
//!   install-cni-plugin and install-cni containers do. Each file is replaced atomically
//!   (temporary file in the same directory, fsync, chmod, rename): the container runtime
//!   never runs a half-written plugin or reads a half-written conflist. Idempotent.
//! - `weft mount-bpffs`: bpffs at /sys/fs/bpf and the pin directory, so that the agent
//!   itself needs no right to mount.

use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::bpf::bpffs;

/// The binary `weft install-cni` installs unless `--plugin-src` names another.
pub const PLUGIN_BINARY: &str = "weft-cni";
const PLUGIN_MODE: u32 = 0o755;
const CONFLIST_MODE: u32 = 0o644;

#[derive(Args, Debug, Clone)]
pub struct InstallCniArgs {
    /// The container runtime's CNI plugin directory (host path).
    #[arg(long)]
    pub plugin_dir: PathBuf,

    /// The container runtime's CNI configuration directory (host path).
    #[arg(long)]
    pub conf_dir: PathBuf,

    /// The conflist to install (cni-conf.json of the weft ConfigMap).
    #[arg(long)]
    pub conflist: PathBuf,

    /// File name of the plugin in --plugin-dir: the `type` the conflist names.
    #[arg(long, default_value = "flannel")]
    pub plugin_name: String,

    /// File name of the conflist in --conf-dir.
    #[arg(long, default_value = "10-flannel.conflist")]
    pub conf_name: String,

    /// The plugin binary to install (default: `weft-cni` next to this `weft` executable).
    #[arg(long)]
    pub plugin_src: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct MountBpffsArgs {
    /// The pin directory the agent will use (its --bpf-dir). bpffs is mounted at
    /// /sys/fs/bpf if the directory is below it and nothing is mounted there.
    #[arg(long, env = "WEFT_BPF_DIR", default_value = crate::bpf::DEFAULT_BPF_DIR)]
    pub bpf_dir: PathBuf,
}

/// What `install-cni` did to one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub path: PathBuf,
    /// False when the file already had these contents and mode (nothing was written).
    pub changed: bool,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changed {
            write!(f, "installed {}", self.path.display())
        } else {
            write!(f, "{} is up to date", self.path.display())
        }
    }
}

/// Installs the plugin, then the conflist (so the runtime never sees a conflist naming a
/// plugin that is not there yet). Everything is checked before anything is written.
pub fn install_cni(args: &InstallCniArgs) -> Result<Vec<Installed>> {
    check_file_name("--plugin-name", &args.plugin_name)?;
    check_file_name("--conf-name", &args.conf_name)?;
    let plugin_src = match &args.plugin_src {
        Some(path) => path.clone(),
        None => default_plugin_src()?,
    };
    let plugin = fs::read(&plugin_src).with_context(|| {
        format!(
            "reading the CNI plugin {} (pass --plugin-src to install another file)",
            plugin_src.display()
        )
    })?;
    let conflist = fs::read(&args.conflist)
        .with_context(|| format!("--conflist {}: reading it", args.conflist.display()))?;
    validate_conflist(&args.conflist, &conflist, &args.plugin_name)?;

    Ok(vec![
        install_file(&args.plugin_dir, &args.plugin_name, &plugin, PLUGIN_MODE)?,
        install_file(&args.conf_dir, &args.conf_name, &conflist, CONFLIST_MODE)?,
    ])
}

/// `weft-cni` in the directory of the running executable (both ship in one image).
fn default_plugin_src() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running weft executable")?;
    let src = exe.with_file_name(PLUGIN_BINARY);
    if !src.is_file() {
        bail!(
            "{} does not exist: {PLUGIN_BINARY} is expected next to {}; pass --plugin-src <path of {PLUGIN_BINARY}>",
            src.display(),
            exe.display()
        );
    }
    Ok(src)
}

/// Names of files inside the target directories: nothing that could point elsewhere.
fn check_file_name(flag: &str, name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        bail!("{flag} {name:?}: give a plain file name (no '/')");
    }
    Ok(())
}

/// Checks that `contents` (read from `path`) is a CNI conflist the runtime can use and
/// that its entries of type `plugin_type` are configurations weft's plugin accepts, as
/// the runtime will pass them (with the list's `name` and `cniVersion`).
pub fn validate_conflist(path: &Path, contents: &[u8], plugin_type: &str) -> Result<()> {
    let fail = |why: String| -> Result<()> {
        bail!(
            "--conflist {}: {why} (it must be a CNI conflist: {{\"name\": \"cbr0\", \"cniVersion\": \"0.3.1\", \"plugins\": [{{\"type\": \"{plugin_type}\", ...}}]}})",
            path.display()
        )
    };
    let conflist: Value = match serde_json::from_slice(contents) {
        Ok(value) => value,
        Err(e) => return fail(format!("not valid JSON: {e}")),
    };
    let Some(plugins) = conflist.get("plugins").and_then(Value::as_array) else {
        return fail("has no \"plugins\" list".into());
    };
    if plugins.is_empty() {
        return fail("its \"plugins\" list is empty".into());
    }
    let mut uses_plugin = false;
    for (index, plugin) in plugins.iter().enumerate() {
        let Some(kind) = plugin.get("type").and_then(Value::as_str) else {
            return fail(format!("plugins[{index}] has no string \"type\""));
        };
        if kind != plugin_type {
            continue;
        }
        uses_plugin = true;
        let mut entry = plugin.clone();
        for field in ["name", "cniVersion"] {
            if let Some(value) = conflist.get(field) {
                entry[field] = value.clone();
            }
        }
        if let Err(e) = crate::cni::NetConf::parse(entry.to_string().as_bytes()) {
            return fail(format!("plugins[{index}] (type {plugin_type}): {}", e.msg));
        }
    }
    if !uses_plugin {
        return fail(format!(
            "no entry of \"plugins\" has \"type\": \"{plugin_type}\", so the runtime would never run the plugin installed as {plugin_type}; fix the type or --plugin-name"
        ));
    }
    Ok(())
}

/// Replaces `dir/name` with `contents` and `mode` atomically, unless it already has both.
fn install_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<Installed> {
    let path = dir.join(name);
    if has_contents(&path, contents, mode) {
        return Ok(Installed {
            path,
            changed: false,
        });
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Hidden and without a .conf/.conflist/.json extension: the runtime, which watches
    // the conf directory, never loads the temporary file.
    let temporary = dir.join(format!(".{name}.weft-tmp-{}", std::process::id()));
    let written = write_synced(&temporary, contents, mode)
        .and_then(|()| fs::rename(&temporary, &path))
        // The rename itself is durable once the directory is synced.
        .and_then(|()| File::open(dir)?.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&temporary);
        return Err(e).with_context(|| format!("installing {}", path.display()));
    }
    Ok(Installed {
        path,
        changed: true,
    })
}

fn has_contents(path: &Path, contents: &[u8], mode: u32) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| {
        meta.is_file()
            && meta.permissions().mode() & 0o7777 == mode
            && fs::read(path).is_ok_and(|existing| existing == contents)
    })
}

fn write_synced(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    // The umask may have cleared bits at creation.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.sync_all()
}

/// Mounts bpffs at /sys/fs/bpf if needed and creates the pin directory. Returns what the
/// node has now.
pub fn mount_bpffs(args: &MountBpffsArgs) -> Result<String> {
    bpffs::ensure_pin_dir(&args.bpf_dir)?;
    if !bpffs::is_bpffs(&args.bpf_dir)
        .with_context(|| format!("statfs {}", args.bpf_dir.display()))?
    {
        bail!(
            "--bpf-dir {}: still not on a BPF filesystem after mounting",
            args.bpf_dir.display()
        );
    }
    Ok(format!(
        "{} is on a BPF filesystem; the agent pins its maps there",
        args.bpf_dir.display()
    ))
}
