//! The plugin's network configuration (the conflist entry on stdin) and the delegate
//! configuration built from it and subnet.env, exactly as flannel's cni-plugin builds it.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::error::{code, CniError};
use crate::subnet_env::SubnetEnv;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// CNI spec versions this plugin speaks (and passes on to its delegate).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The conflist entry of type `flannel`, as the runtime passes it on stdin.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub name: String,
    pub cni_version: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    /// `recordsDir` (weft's): where ADD records the pod's interfaces and addresses for the
    /// agent (see [`super::record`]).
    pub records_dir: PathBuf,
    /// The user's delegate settings; validated when the delegate is built (ADD only,
    /// so that DEL still cleans up after a config that ADD rejected).
    pub delegate: Map<String, Value>,
    /// Top-level `ipam`: flannel uses it as the base of the delegate's IPAM.
    pub ipam: Option<Map<String, Value>>,
    pub runtime_config: Option<Value>,
    /// The result of ADD, which the runtime passes with CHECK (and chained plugins).
    pub prev_result: Option<Value>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_NETWORK_CONFIG, msg)
}

/// The `cniVersion` of a config, if it has a readable one: errors are reported in it.
pub fn peek_cni_version(stdin: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_owned)
}

pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "incompatible CNI versions: the network config has cniVersion {version:?}, this plugin supports {}; set cniVersion in the conflist to one of them",
            SUPPORTED_VERSIONS.join(", ")
        ),
    )
    .with_details(format!("config is {version:?}, plugin supports {SUPPORTED_VERSIONS:?}")))
}

/// Whether the spec version knows the CHECK command (0.4.0 and later).
pub fn allows_check(version: &str) -> bool {
    matches!(version, "0.4.0" | "1.0.0")
}

fn object_field(
    conf: &Map<String, Value>,
    field: &str,
) -> Result<Option<Map<String, Value>>, CniError> {
    match conf.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(other) => Err(invalid(format!(
            "`{field}` must be a JSON object, got {other}"
        ))),
    }
}

fn string_field(conf: &Map<String, Value>, field: &str) -> Result<Option<String>, CniError> {
    match conf.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("`{field}` must be a string, got {other}"))),
    }
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                "no network config on stdin: the container runtime passes the conflist's plugin entry there",
            ));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("the network config on stdin is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(conf) = value else {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                format!("the network config on stdin must be a JSON object, got {value}"),
            ));
        };
        let cni_version = string_field(&conf, "cniVersion")?.filter(|v| !v.is_empty()).ok_or_else(|| {
            invalid(format!(
                "`cniVersion` is missing from the network config; set it in the conflist (one of {})",
                SUPPORTED_VERSIONS.join(", ")
            ))
        })?;
        check_version(&cni_version)?;
        let name = string_field(&conf, "name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                invalid("`name` (the network name) is missing from the network config")
            })?;
        Ok(NetConf {
            name,
            cni_version,
            subnet_file: string_field(&conf, "subnetFile")?
                .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into())
                .into(),
            data_dir: string_field(&conf, "dataDir")?
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into())
                .into(),
            records_dir: string_field(&conf, "recordsDir")?
                .unwrap_or_else(|| super::record::DEFAULT_RECORDS_DIR.into())
                .into(),
            delegate: object_field(&conf, "delegate")?.unwrap_or_default(),
            ipam: object_field(&conf, "ipam")?,
            runtime_config: object_field(&conf, "runtimeConfig")?.map(Value::Object),
            prev_result: object_field(&conf, "prevResult")?.map(Value::Object),
        })
    }
}

/// Reads subnet.env; its absence means the node agent has not come up (yet).
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    match SubnetEnv::read(path) {
        Ok(Some(env)) => Ok(env),
        Ok(None) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "{} does not exist: is the weft agent (or flanneld) running on this node? check its logs (kubectl -n weft logs -l app=weft --field-selector spec.nodeName=<this node>, or kubectl -n kube-flannel logs -l app=flannel for flanneld)",
                path.display()
            ),
        )),
        Err(e) => Err(CniError::new(code::IO_FAILURE, format!("{e:#}"))),
    }
}

/// The delegate configuration: flannel's fill-in of the user's `delegate` object.
pub fn build_delegate(conf: &NetConf, env: &SubnetEnv) -> Result<Map<String, Value>, CniError> {
    let mut delegate = conf.delegate.clone();
    if delegate.get("type").is_some_and(|t| !t.is_string()) {
        return Err(invalid(
            "`delegate.type` must be a string (the delegate plugin's name, e.g. \"bridge\")",
        ));
    }
    for field in ["name", "ipam"] {
        if delegate.contains_key(field) {
            return Err(invalid(format!(
                "`delegate.{field}` must not be set: the plugin sets it (name = the network name, ipam = host-local on the node's subnet from subnet.env); remove it from the conflist"
            )));
        }
    }
    if let Some(runtime_config) = &conf.runtime_config {
        delegate.insert("runtimeConfig".into(), runtime_config.clone());
    }
    delegate.insert("name".into(), json!(conf.name));
    delegate.entry("type").or_insert(json!("bridge"));
    // When the agent does not masquerade pod traffic, the bridge plugin must.
    delegate.entry("ipMasq").or_insert(json!(!env.ipmasq));
    delegate.entry("mtu").or_insert(json!(env.mtu));
    if delegate["type"] == "bridge" {
        delegate.entry("isGateway").or_insert(json!(true));
    }
    delegate.insert("cniVersion".into(), json!(conf.cni_version));
    delegate.insert("ipam".into(), Value::Object(delegate_ipam(conf, env)?));
    Ok(delegate)
}

/// host-local (unless the top-level `ipam` names another type) on the node's subnet,
/// with a route to the whole flannel network after any routes the user listed.
fn delegate_ipam(conf: &NetConf, env: &SubnetEnv) -> Result<Map<String, Value>, CniError> {
    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert(json!("host-local"));
    ipam.insert(
        "ranges".into(),
        json!([[{ "subnet": env.subnet.to_string() }]]),
    );
    let mut routes = match ipam.remove("routes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(routes)) => routes,
        Some(other) => {
            return Err(invalid(format!(
                "`ipam.routes` must be a list of routes, got {other}"
            )))
        }
    };
    routes.push(json!({ "dst": env.network.to_string() }));
    ipam.insert("routes".into(), Value::Array(routes));
    Ok(ipam)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet_env(ipmasq: bool) -> SubnetEnv {
        SubnetEnv::parse(&format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={ipmasq}\n"
        ))
        .unwrap()
    }

    fn conf(json: Value) -> NetConf {
        NetConf::parse(json.to_string().as_bytes()).unwrap()
    }

    /// The plugin entry of flannel's 10-flannel.conflist, as libcni passes it.
    fn flannel_default_entry() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "name": "cbr0",
            "type": "flannel",
            "delegate": { "hairpinMode": true, "isDefaultGateway": true }
        })
    }

    #[test]
    fn defaults_match_flannel() {
        let conf = conf(flannel_default_entry());
        assert_eq!(conf.subnet_file, Path::new("/run/flannel/subnet.env"));
        assert_eq!(conf.data_dir, Path::new("/var/lib/cni/flannel"));
        assert_eq!(conf.ipam, None);
        assert_eq!(conf.runtime_config, None);
        let explicit = self::conf(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "flannel",
            "subnetFile": "/x/subnet.env", "dataDir": "/x/data"
        }));
        assert_eq!(explicit.subnet_file, Path::new("/x/subnet.env"));
        assert_eq!(explicit.data_dir, Path::new("/x/data"));
        assert!(explicit.delegate.is_empty());
    }

    #[test]
    fn fills_the_delegate_of_flannels_default_conflist() {
        let delegate = build_delegate(&conf(flannel_default_entry()), &subnet_env(true)).unwrap();
        assert_eq!(
            Value::Object(delegate),
            json!({
                "cniVersion": "0.3.1",
                "name": "cbr0",
                "type": "bridge",
                "hairpinMode": true,
                "isDefaultGateway": true,
                "isGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": "10.244.1.0/24" }]],
                    "routes": [{ "dst": "10.244.0.0/16" }]
                }
            })
        );
    }

    #[test]
    fn bridge_masquerades_when_the_agent_does_not() {
        let delegate = build_delegate(&conf(flannel_default_entry()), &subnet_env(false)).unwrap();
        assert_eq!(delegate["ipMasq"], json!(true));
    }

    #[test]
    fn user_settings_override_every_default() {
        let conf = conf(json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "type": "flannel",
            "delegate": {
                "type": "bridge", "bridge": "br-pods", "ipMasq": true, "mtu": 1400,
                "isGateway": false, "hairpinMode": false, "promiscMode": true
            },
            "ipam": { "type": "whereabouts", "routes": [{ "dst": "10.96.0.0/12" }], "dataDir": "/x" },
            "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] }
        }));
        let delegate = build_delegate(&conf, &subnet_env(true)).unwrap();
        assert_eq!(
            Value::Object(delegate),
            json!({
                "cniVersion": "1.0.0",
                "name": "pods",
                "type": "bridge",
                "bridge": "br-pods",
                "ipMasq": true,
                "mtu": 1400,
                "isGateway": false,
                "hairpinMode": false,
                "promiscMode": true,
                "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] },
                "ipam": {
                    "type": "whereabouts",
                    "dataDir": "/x",
                    "ranges": [[{ "subnet": "10.244.1.0/24" }]],
                    "routes": [{ "dst": "10.96.0.0/12" }, { "dst": "10.244.0.0/16" }]
                }
            })
        );
    }

    #[test]
    fn is_gateway_is_only_a_bridge_setting() {
        let conf = conf(json!({
            "cniVersion": "0.4.0", "name": "n", "type": "flannel", "delegate": { "type": "ipvlan", "master": "eth0" }
        }));
        let delegate = build_delegate(&conf, &subnet_env(true)).unwrap();
        assert_eq!(delegate["type"], json!("ipvlan"));
        assert_eq!(delegate["master"], json!("eth0"));
        assert!(!delegate.contains_key("isGateway"));
        assert_eq!(delegate["mtu"], json!(1450));
    }

    #[test]
    fn rejects_a_delegate_that_sets_name_or_ipam_or_a_bad_type() {
        for (delegate, expected) in [
            (json!({ "name": "mine" }), "`delegate.name` must not be set"),
            (
                json!({ "ipam": { "type": "host-local" } }),
                "`delegate.ipam` must not be set",
            ),
            (json!({ "type": 7 }), "`delegate.type` must be a string"),
        ] {
            let mut entry = flannel_default_entry();
            entry["delegate"] = delegate;
            let err = build_delegate(&conf(entry), &subnet_env(true)).unwrap_err();
            assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
            assert!(err.msg.contains(expected), "{}", err.msg);
        }
    }

    #[test]
    fn malformed_configs_name_the_problem() {
        let cases: &[(&str, u32, &str)] = &[
            ("", code::DECODE_FAILURE, "no network config on stdin"),
            (
                "{\"cniVersion\": \"1.0.0\",",
                code::DECODE_FAILURE,
                "not valid JSON: EOF while parsing",
            ),
            ("[1]", code::DECODE_FAILURE, "must be a JSON object"),
            (
                "{\"name\": \"n\"}",
                code::INVALID_NETWORK_CONFIG,
                "`cniVersion` is missing",
            ),
            (
                "{\"cniVersion\": \"0.2.0\", \"name\": \"n\"}",
                code::INCOMPATIBLE_VERSION,
                "0.3.0, 0.3.1, 0.4.0, 1.0.0",
            ),
            (
                "{\"cniVersion\": \"1.0.0\"}",
                code::INVALID_NETWORK_CONFIG,
                "`name` (the network name) is missing",
            ),
            (
                "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"delegate\": []}",
                code::INVALID_NETWORK_CONFIG,
                "`delegate` must be a JSON object",
            ),
            (
                "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"dataDir\": 5}",
                code::INVALID_NETWORK_CONFIG,
                "`dataDir` must be a string",
            ),
        ];
        for (stdin, expected_code, expected_msg) in cases {
            let err = NetConf::parse(stdin.as_bytes()).unwrap_err();
            assert_eq!(err.code, *expected_code, "{stdin}: {}", err.msg);
            assert!(err.msg.contains(expected_msg), "{stdin}: {}", err.msg);
        }
        let bad_routes =
            conf(json!({ "cniVersion": "1.0.0", "name": "n", "ipam": { "routes": "10.0.0.0/8" } }));
        let err = build_delegate(&bad_routes, &subnet_env(true)).unwrap_err();
        assert!(
            err.msg.contains("`ipam.routes` must be a list"),
            "{}",
            err.msg
        );
    }

    #[test]
    fn missing_subnet_env_says_the_agent_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let err = load_subnet_env(&path).unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert_eq!(
            err.msg,
            format!(
                "{} does not exist: is the weft agent (or flanneld) running on this node? check its logs (kubectl -n weft logs -l app=weft --field-selector spec.nodeName=<this node>, or kubectl -n kube-flannel logs -l app=flannel for flanneld)",
                path.display()
            )
        );
        std::fs::write(&path, "FLANNEL_NETWORK=10.244.0.0/16\n").unwrap();
        let err = load_subnet_env(&path).unwrap_err();
        assert!(
            err.msg.contains("is malformed") && err.msg.contains("FLANNEL_SUBNET is missing"),
            "{}",
            err.msg
        );
    }

    #[test]
    fn check_needs_spec_0_4_0() {
        assert!(!allows_check("0.3.0") && !allows_check("0.3.1"));
        assert!(allows_check("0.4.0") && allows_check("1.0.0"));
    }
}
