//! Pod records: what the CNI ADD of a pod produced (its container, its interfaces and the
//! addresses they got). They are the agent's only source of which local pod owns which
//! address: the BPF `endpoints` map holds an address only on the veth a record gives it.
//!
//! One format (libcni's result cache, `cniCacheV1`), two writers:
//! - the container runtime: libcni (containerd, CRI-O) caches every ADD result in
//!   `/var/lib/cni/results/<network>-<containerID>-<ifname>` whatever the plugin (upstream
//!   flannel's included) and removes it at DEL;
//! - weft-cni: the same record in its `recordsDir` (default `/var/lib/cni/weft`) at ADD,
//!   removed at DEL, for runtimes that keep no cache.
//!
//! A pod cannot write either: they are files of the node, written by root.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::lease::MacAddr;

/// Where weft-cni writes its records unless the conflist's `recordsDir` says otherwise.
pub const DEFAULT_RECORDS_DIR: &str = "/var/lib/cni/weft";
/// Where libcni caches ADD results (its default cache dir, `/var/lib/cni`, + `results`).
pub const LIBCNI_RESULTS_DIR: &str = "/var/lib/cni/results";

/// What one record says about a pod's interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub container_id: String,
    pub if_name: String,
    /// IPv4 addresses of the result that belong to an interface in the container.
    pub ips: Vec<Ipv4Addr>,
    /// The MAC of that container interface, as the result gives it.
    pub pod_mac: Option<MacAddr>,
    /// The result's interfaces on the host (no `sandbox`): the bridge and the pod's veth.
    pub host_ifaces: BTreeSet<String>,
}

/// The record file's name, as libcni names its cache entries.
pub fn file_name(network: &str, container_id: &str, if_name: &str) -> String {
    // The container ID and ifname are validated; a network name is the user's.
    let network = network.replace('/', "_");
    format!("{network}-{container_id}-{if_name}")
}

/// The record of an ADD whose result is `result` (a CNI result of version 0.3.0 or later).
pub fn encode(network: &str, container_id: &str, if_name: &str, result: &Value) -> Vec<u8> {
    let record = json!({
        "kind": "cniCacheV1",
        "containerId": container_id,
        "ifName": if_name,
        "networkName": network,
        "result": result,
    });
    serde_json::to_vec(&record).expect("a JSON value serializes")
}

/// Reads a record (libcni's or weft-cni's). Err says why it is unusable.
pub fn parse(bytes: &[u8]) -> Result<PodRecord, String> {
    let record: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("is not valid JSON ({e})"))?;
    let text = |field: &str| {
        record
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("has no `{field}`"))
    };
    let container_id = text("containerId")?;
    let if_name = text("ifName")?;
    let result = record.get("result").ok_or("has no `result`")?;
    let interfaces: Vec<&Value> = result
        .get("interfaces")
        .and_then(Value::as_array)
        .map(|i| i.iter().collect())
        .unwrap_or_default();
    let in_sandbox = |iface: &Value| {
        iface
            .get("sandbox")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    let host_ifaces = interfaces
        .iter()
        .filter(|i| !in_sandbox(i))
        .filter_map(|i| i.get("name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    let mut ips = Vec::new();
    let mut pod_mac = None;
    for ip in result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // An address counts only with the container interface it was given to.
        let Some(iface) = ip
            .get("interface")
            .and_then(Value::as_u64)
            .and_then(|index| interfaces.get(usize::try_from(index).ok()?))
            .filter(|iface| in_sandbox(iface))
            .filter(|iface| iface.get("name").and_then(Value::as_str) == Some(if_name.as_str()))
        else {
            continue;
        };
        let Some(address) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let Ok(address) = address.split('/').next().unwrap_or_default().parse() else {
            continue; // IPv6, or not an address
        };
        ips.push(address);
        pod_mac = iface
            .get("mac")
            .and_then(Value::as_str)
            .and_then(|m| m.parse().ok());
    }
    Ok(PodRecord {
        container_id,
        if_name,
        ips,
        pod_mac,
        host_ifaces,
    })
}

/// The records in `dir` (missing: none), and for each file that is no usable record, its
/// path and why. Skips hidden files (weft-cni's temporary files).
pub fn read_dir(dir: &Path) -> Result<(Vec<PodRecord>, Vec<String>)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let (mut records, mut unusable) = (Vec::new(), Vec::new());
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            // Removed by a DEL since the listing; a directory is nothing of ours.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::IsADirectory) => continue,
            Err(e) => {
                unusable.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        match parse(&bytes) {
            Ok(record) => records.push(record),
            Err(why) => unusable.push(format!("{} {why}", path.display())),
        }
    }
    Ok((records, unusable))
}

/// A cheap fingerprint of what `dirs` hold (names and inodes): it changes when a record is
/// written (a rename gives a new inode) or removed.
pub fn fingerprint(dirs: &[impl AsRef<Path>]) -> Vec<(usize, std::ffi::OsString, u64)> {
    use std::os::unix::fs::DirEntryExt;
    let mut seen = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        seen.extend(entries.flatten().map(|e| (i, e.file_name(), e.ino())));
    }
    seen.sort();
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bridge plugin result (containernetworking/plugins 1.1.1, cniVersion 0.3.1).
    fn bridge_result() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "cni0", "mac": "4a:1b:00:00:00:01"},
                {"name": "veth1a2b3c4d", "mac": "4a:1b:00:00:00:02"},
                {"name": "eth0", "mac": "0a:58:0a:f4:01:02", "sandbox": "/var/run/netns/cni-1234"}
            ],
            "ips": [
                {"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
                {"version": "6", "interface": 2, "address": "fd00::2/64", "gateway": "fd00::1"}
            ],
            "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.1.1"}],
            "dns": {}
        })
    }

    #[test]
    fn reads_what_weft_cni_writes() {
        let bytes = encode("cbr0", "abc123", "eth0", &bridge_result());
        assert_eq!(
            parse(&bytes).unwrap(),
            PodRecord {
                container_id: "abc123".into(),
                if_name: "eth0".into(),
                ips: vec![Ipv4Addr::new(10, 244, 1, 2)],
                pod_mac: Some("0a:58:0a:f4:01:02".parse().unwrap()),
                host_ifaces: ["cni0".to_string(), "veth1a2b3c4d".to_string()].into(),
            }
        );
        assert_eq!(file_name("cbr0", "abc123", "eth0"), "cbr0-abc123-eth0");
        assert_eq!(file_name("a/b", "abc123", "eth0"), "a_b-abc123-eth0");
    }

    #[test]
    fn reads_libcni_cache_entries() {
        // As containerd's libcni writes them: more fields, the result in the list's version.
        let mut result = bridge_result();
        result["cniVersion"] = json!("1.0.0");
        for ip in result["ips"].as_array_mut().unwrap() {
            ip.as_object_mut().unwrap().remove("version");
        }
        let cached = json!({
            "kind": "cniCacheV1",
            "containerId": "0f1e2d",
            "config": "eyJjbmlWZXJzaW9uIjoiMS4wLjAifQ==",
            "ifName": "eth0",
            "networkName": "cbr0",
            "cniArgs": [["K8S_POD_NAME", "web-0"]],
            "capabilityArgs": {"portMappings": []},
            "result": result
        });
        let record = parse(cached.to_string().as_bytes()).unwrap();
        assert_eq!(record.container_id, "0f1e2d");
        assert_eq!(record.ips, [Ipv4Addr::new(10, 244, 1, 2)]);
        assert!(record.host_ifaces.contains("veth1a2b3c4d"));
    }

    #[test]
    fn an_address_counts_only_on_the_named_container_interface() {
        let mut result = bridge_result();
        result["ips"] = json!([
            {"interface": 1, "address": "10.244.1.3/24"},
            {"address": "10.244.1.4/24"},
            {"interface": 9, "address": "10.244.1.5/24"},
            {"interface": 2, "address": "not-an-address"},
            {"interface": 2, "address": "10.244.1.6/24"}
        ]);
        let record = parse(&encode("cbr0", "c", "eth0", &result)).unwrap();
        assert_eq!(record.ips, [Ipv4Addr::new(10, 244, 1, 6)]);
        // A record for another interface name of the container gives it nothing.
        let record = parse(&encode("cbr0", "c", "net1", &result)).unwrap();
        assert!(record.ips.is_empty());
        // A 0.2.0 result (ip4, no interfaces) gives no address: no endpoint.
        let old = json!({"ip4": {"ip": "10.244.1.7/24"}});
        assert!(parse(&encode("cbr0", "c", "eth0", &old))
            .unwrap()
            .ips
            .is_empty());
    }

    #[test]
    fn refuses_records_without_container_or_result() {
        assert!(parse(b"{").unwrap_err().contains("not valid JSON"));
        let no_id = json!({"ifName": "eth0", "result": bridge_result()});
        assert_eq!(
            parse(no_id.to_string().as_bytes()).unwrap_err(),
            "has no `containerId`"
        );
        let no_result = json!({"containerId": "c", "ifName": "eth0"});
        assert_eq!(
            parse(no_result.to_string().as_bytes()).unwrap_err(),
            "has no `result`"
        );
    }

    #[test]
    fn reads_a_directory_skipping_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert_eq!(read_dir(&missing).unwrap(), (vec![], vec![]));
        let before = fingerprint(&[dir.path()]);
        let good = encode("cbr0", "c1", "eth0", &bridge_result());
        std::fs::write(dir.path().join("cbr0-c1-eth0"), &good).unwrap();
        std::fs::write(dir.path().join(".cbr0-c2-eth0.7.tmp"), b"{").unwrap();
        std::fs::write(dir.path().join("broken"), b"{").unwrap();
        std::fs::create_dir(dir.path().join("subdir")).unwrap();
        let (records, unusable) = read_dir(dir.path()).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].container_id, "c1");
        assert_eq!(unusable.len(), 1, "{unusable:?}");
        assert!(
            unusable[0].contains("broken is not valid JSON"),
            "{unusable:?}"
        );
        assert_ne!(fingerprint(&[dir.path()]), before);
    }
}
