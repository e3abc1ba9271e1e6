//! Named network namespaces of the lab, their per-lab prefix and the sweep of leftovers.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Result;

use crate::exec::{run, Cmd};

/// Every lab namespace is named `wl<pid>-<n>-...`: the pid tells the sweep whether the
/// lab's process still runs, `<n>` keeps labs of one process apart.
const NAME_ROOT: &str = "wl";

/// Directory where host-local keeps its allocations, one directory per CNI network name.
pub const HOST_LOCAL_STATE: &str = "/var/lib/cni/networks";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix no other lab (of this or another process) uses.
pub fn unique_prefix() -> String {
    let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    format!("{NAME_ROOT}{}-{n}-", std::process::id())
}

pub fn add(name: &str) -> Result<()> {
    run(&["ip", "netns", "add", name]).map(drop)
}

/// Deletes namespace `name`; a namespace already gone is not an error.
pub fn delete(name: &str) -> Result<()> {
    let out = Cmd::new(["ip", "netns", "delete", name]).output()?;
    if out.status.success() || !exists(name) {
        return Ok(());
    }
    anyhow::bail!("ip netns delete {name}: {}", out.stderr.trim())
}

pub fn exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

/// Names of all named network namespaces.
pub fn list() -> Result<Vec<String>> {
    let out = run(&["ip", "netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// PIDs of the processes inside namespace `name`.
pub fn pids(name: &str) -> Vec<i32> {
    Cmd::new(["ip", "netns", "pids", name])
        .timeout(Duration::from_secs(5))
        .output()
        .map(|out| {
            out.stdout
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid a lab prefix or namespace name was made by, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_ROOT)?;
    let (pid, rest) = rest.split_once('-')?;
    let (counter, _) = rest.split_once('-')?;
    counter.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Prefix of a lab's temporary directory, so that the sweep recognises it too.
pub const TEMP_DIR_PREFIX: &str = "weft-";

/// Removes what labs of dead processes left behind (namespaces, the processes the lab
/// started in them, host-local state, temporary directories under `temp_base` and the
/// bpffs mounted in them) and
/// anything carrying `prefix`. Labs whose process still runs (concurrent tests) are not
/// touched.
pub fn sweep_leftovers(prefix: &str, temp_base: &Path) {
    let stale = |name: &str| {
        name.starts_with(prefix) || owner_pid(name).is_some_and(|pid| !process_alive(pid))
    };
    for name in list().unwrap_or_default().into_iter().filter(|n| stale(n)) {
        // Only processes a lab harness started live in lab namespaces.
        for pid in pids(&name) {
            // SAFETY: kill(2) on a pid found in our own lab namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = delete(&name);
    }
    let dirs = [
        (Path::new(HOST_LOCAL_STATE), ""),
        (temp_base, TEMP_DIR_PREFIX),
    ];
    for (base, dir_prefix) in dirs {
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.strip_prefix(dir_prefix).is_some_and(stale) {
                // A lab's bpffs first: removing files inside it would only unpin.
                for mount_point in crate::bpf::mounts_under(&entry.path()) {
                    crate::bpf::unmount(&mount_point);
                }
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_only_for_lab_names() {
        assert_eq!(owner_pid("wl1234-2-n1p1"), Some(1234));
        assert_eq!(owner_pid("wl1234-2-"), Some(1234));
        assert_eq!(owner_pid("wlan0"), None);
        assert_eq!(owner_pid("wl1234-x-n1"), None);
        assert_eq!(owner_pid("wt-foo-1-n1"), None);
    }

    #[test]
    fn prefixes_are_unique() {
        assert_ne!(unique_prefix(), unique_prefix());
        assert_eq!(owner_pid(&unique_prefix()), Some(std::process::id()));
    }
}
