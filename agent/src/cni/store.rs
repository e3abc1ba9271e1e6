//! The delegate configs stored by ADD in dataDir, one file per container, for DEL and CHECK
//! (flannel's layout, so either plugin can clean up after the other).

use std::fs::{DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub fn conf_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Writes the config atomically (temp file, fsync, rename): mode 0600 in a 0700 directory,
/// as it may hold runtime data of the pod.
pub fn save(data_dir: &Path, container_id: &str, conf: &[u8]) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("creating the CNI dataDir {}", data_dir.display()))?;
    let path = conf_path(data_dir, container_id);
    let tmp = data_dir.join(format!(".{container_id}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(conf)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// The stored config; `None` when there is none (never added, or already deleted).
pub fn load(data_dir: &Path, container_id: &str) -> Result<Option<Vec<u8>>> {
    let path = conf_path(data_dir, container_id);
    match std::fs::read(&path) {
        Ok(conf) => Ok(Some(conf)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn remove(data_dir: &Path, container_id: &str) -> Result<()> {
    let path = conf_path(data_dir, container_id);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn saves_privately_loads_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("cni/flannel");
        assert_eq!(load(&data_dir, "abc").unwrap(), None);
        save(&data_dir, "abc", b"{\"type\":\"bridge\"}").unwrap();
        save(&data_dir, "abc", b"{\"type\":\"ptp\"}").unwrap();
        assert_eq!(mode(&data_dir), 0o700);
        assert_eq!(mode(&conf_path(&data_dir, "abc")), 0o600);
        assert_eq!(
            load(&data_dir, "abc").unwrap().as_deref(),
            Some(&b"{\"type\":\"ptp\"}"[..])
        );
        let names: Vec<_> = std::fs::read_dir(&data_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["abc"], "no temp file left behind");
        remove(&data_dir, "abc").unwrap();
        assert_eq!(load(&data_dir, "abc").unwrap(), None);
        remove(&data_dir, "abc").unwrap();
    }
}
