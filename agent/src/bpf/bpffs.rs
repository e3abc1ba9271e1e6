//! The pin directory: a directory on a BPF filesystem, where the maps outlive the agent.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use weft_common::ALL_MAPS;

/// `BPF_FS_MAGIC` from linux/magic.h: the `f_type` statfs(2) reports for bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs conventionally lives, and where weft mounts it if it is missing.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Whether `path` (which must exist) is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, not everywhere
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// The deepest existing ancestor of `path` (itself if it exists).
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Makes sure `dir` exists on a bpffs. If it is under /sys/fs/bpf and nothing is mounted
/// there, mounts bpffs at /sys/fs/bpf first (as Cilium and Calico do).
pub fn ensure_pin_dir(dir: &Path) -> Result<()> {
    if !dir.is_absolute() {
        bail!(
            "--bpf-dir {}: give an absolute path on a BPF filesystem (default /sys/fs/bpf/weft)",
            dir.display()
        );
    }
    let anchor = existing_ancestor(dir);
    let on_bpffs = is_bpffs(&anchor).with_context(|| format!("statfs {}", anchor.display()))?;
    if !on_bpffs {
        let root = Path::new(BPFFS_ROOT);
        if dir.starts_with(root) && root.is_dir() && !is_bpffs(root).unwrap_or(false) {
            mount_bpffs(root)?;
            info!("mounted a BPF filesystem at {BPFFS_ROOT} (nothing was mounted there)");
        } else {
            bail!(
                "--bpf-dir {}: {} is not on a BPF filesystem; mount one there \
                 (`mount -t bpf bpf <dir>`) or choose a directory under {BPFFS_ROOT}",
                dir.display(),
                anchor.display()
            );
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--bpf-dir {}: creating the pin directory", dir.display()))
}

fn mount_bpffs(target: &Path) -> Result<()> {
    let target_c = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target_c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!(
                "mounting a BPF filesystem at {} (needed for --bpf-dir)",
                target.display()
            )
        });
    }
    Ok(())
}

/// The pin path of map `name`.
pub fn pin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Unpins one map (its programs keep using it until they are replaced). Fine if absent.
pub fn unpin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpinning {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Unpins every weft map under `dir` and removes the directory if that leaves it empty.
/// Returns whether anything was removed.
pub fn remove_pins(dir: &Path) -> Result<bool> {
    // Never delete files of the same names from an ordinary directory.
    if !dir.is_dir() || !is_bpffs(dir).unwrap_or(false) {
        return Ok(false);
    }
    let mut removed = false;
    for name in ALL_MAPS {
        let path = pin_path(dir, name);
        if path.exists() {
            unpin(&path)?;
            removed = true;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => removed = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(
            "left {} in place: {e} (it holds pins that are not weft's)",
            dir.display()
        ),
    }
    Ok(removed)
}
