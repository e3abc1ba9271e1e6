//! The flannel-compatible CNI plugin (flannel-io/cni-plugin semantics).
//!
//! Installed as `flannel` it serves an existing `10-flannel.conflist` unchanged: it reads
//! the node's subnet from subnet.env, fills in a delegate config (bridge + host-local by
//! default), stores it in dataDir for DEL and CHECK, and runs the delegate plugin.
//! The binary (`weft-cni`) only wires the process environment, stdin and stdout to [`run`].

mod delegate;
mod error;
pub mod netconf;
pub mod record;
mod store;

use std::io::Read;
use std::path::PathBuf;

use serde_json::{json, Value};

pub use error::{code, CniError};
pub use netconf::{build_delegate, load_subnet_env, NetConf, SUPPORTED_VERSIONS};

/// The spec version of results that no network config asked for (VERSION, early errors).
pub const LATEST_VERSION: &str = "1.0.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }

    fn parse(value: Option<String>) -> Result<Command, CniError> {
        let invalid = |msg: String| CniError::new(code::INVALID_ENVIRONMENT, msg);
        match value.as_deref() {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("VERSION") => Ok(Command::Version),
            None | Some("") => Err(invalid(
                "CNI_COMMAND is not set: this is a CNI plugin, run by the container runtime with CNI_COMMAND=ADD, DEL, CHECK or VERSION".into(),
            )),
            Some(other) => Err(invalid(format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION"))),
        }
    }
}

/// The CNI_* environment of an ADD, DEL or CHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub cni_path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads and validates the variables the command needs (as the reference skel does:
    /// CNI_NETNS is optional for DEL). `env` looks a variable up.
    pub fn from_env(
        command: Command,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Invocation, CniError> {
        let get = |name: &str| env(name).filter(|v| !v.is_empty());
        let mut missing = Vec::new();
        let mut required = |name: &'static str, needed: bool| {
            let value = get(name);
            if value.is_none() && needed {
                missing.push(name);
            }
            value.unwrap_or_default()
        };
        let container_id = required("CNI_CONTAINERID", true);
        let netns = required("CNI_NETNS", command != Command::Del);
        let ifname = required("CNI_IFNAME", true);
        let cni_path = required("CNI_PATH", true);
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!(
                    "required environment variables {} are missing for {}",
                    missing.join(", "),
                    command.as_str()
                ),
            ));
        }
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;
        Ok(Invocation {
            command,
            container_id,
            netns,
            ifname,
            cni_path: std::env::split_paths(&cni_path)
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
        })
    }
}

/// The container ID names a file in dataDir: the spec's character set keeps it inside.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Ok(());
    }
    Err(CniError::new(
        code::INVALID_ENVIRONMENT,
        format!("CNI_CONTAINERID {id:?} has invalid characters (allowed: letters, digits, _ . -, starting with a letter or digit)"),
    ))
}

fn validate_ifname(name: &str) -> Result<(), CniError> {
    let valid = name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        return Ok(());
    }
    Err(CniError::new(
        code::INVALID_ENVIRONMENT,
        format!("CNI_IFNAME {name:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)"),
    ))
}

/// VERSION's answer.
pub fn version_info() -> String {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// What the process prints on stdout, and whether it succeeded (exit code 0, else 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// One plugin invocation: `env` looks up the process environment, `stdin` is read for
/// every command but VERSION.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let mut error_version = LATEST_VERSION.to_owned();
    let result = (|| {
        let command = Command::parse(env("CNI_COMMAND"))?;
        if command == Command::Version {
            return Ok(version_info());
        }
        let mut input = Vec::new();
        stdin.read_to_end(&mut input).map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("reading the network config from stdin: {e}"),
            )
        })?;
        if let Some(version) = netconf::peek_cni_version(&input) {
            error_version = version;
        }
        let conf = NetConf::parse(&input)?;
        let invocation = Invocation::from_env(command, &env)?;
        match command {
            Command::Add => add(&invocation, &conf),
            Command::Del => del(&invocation, &conf).map(|()| String::new()),
            Command::Check => check(&invocation, &conf).map(|()| String::new()),
            Command::Version => unreachable!("answered above"),
        }
    })();
    match result {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&error_version),
            success: false,
        },
    }
}

fn io_failure(e: anyhow::Error) -> CniError {
    CniError::new(code::IO_FAILURE, format!("{e:#}"))
}

/// ADD: build the delegate config, store it, run the delegate and pass its result on
/// (the delegate answers in the requested cniVersion, so no conversion is needed).
pub fn add(invocation: &Invocation, conf: &NetConf) -> Result<String, CniError> {
    let env = load_subnet_env(&conf.subnet_file)?;
    let delegate_conf = build_delegate(conf, &env)?;
    let plugin = delegate::find_plugin(
        delegate_conf["type"].as_str().unwrap_or_default(),
        &invocation.cni_path,
    )?;
    let bytes = serde_json::to_vec(&delegate_conf).expect("a JSON map serializes");
    // Stored before the delegate runs: after a failed ADD the runtime calls DEL, which
    // needs it to undo what the delegate did.
    store::save(&conf.data_dir, &invocation.container_id, &bytes).map_err(io_failure)?;
    let result = delegate::exec(&plugin, Command::Add, &bytes)?;
    // What the agent may install as this pod's endpoint; without it the pod's traffic
    // takes the kernel path. A failed ADD is undone by the runtime's DEL.
    if let Ok(parsed) = serde_json::from_slice::<Value>(&result) {
        let (network, id, ifname) = (&conf.name, &invocation.container_id, &invocation.ifname);
        let name = record::file_name(network, id, ifname);
        let bytes = record::encode(network, id, ifname, &parsed);
        store::save(&conf.records_dir, &name, &bytes).map_err(io_failure)?;
    }
    Ok(String::from_utf8_lossy(&result).into_owned())
}

/// A stored delegate config and its plugin name; Err says why it is unusable.
fn parse_stored(bytes: &[u8]) -> Result<(Value, String), String> {
    let stored: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("is not valid JSON ({e})"))?;
    let plugin_type = stored
        .get("type")
        .and_then(Value::as_str)
        .ok_or("has no string `type`")?;
    let plugin_type = plugin_type.to_owned();
    Ok((stored, plugin_type))
}

/// DEL: run the delegate's DEL with the stored config, then forget it. Idempotent: with
/// no stored config there is nothing to undo.
pub fn del(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let (data_dir, id) = (&conf.data_dir, &invocation.container_id);
    // First: the agent stops delivering to the pod before its address can be reused.
    let record = record::file_name(&conf.name, id, &invocation.ifname);
    store::remove(&conf.records_dir, &record).map_err(io_failure)?;
    let Some(bytes) = store::load(data_dir, id).map_err(io_failure)? else {
        return Ok(());
    };
    match parse_stored(&bytes) {
        Ok((_, plugin_type)) => {
            let plugin = delegate::find_plugin(&plugin_type, &invocation.cni_path)?;
            delegate::exec(&plugin, Command::Del, &bytes)?;
        }
        // As flannel does: failing would leave the pod stuck terminating, since the runtime
        // retries DEL forever. The netns goes with the pod; the address may leak.
        Err(why) => eprintln!(
            "weft-cni: the stored delegate config {} {why}; skipping the delegate's DEL: the pod's address may stay reserved in /var/lib/cni/networks/{}",
            store::conf_path(data_dir, id).display(),
            conf.name
        ),
    }
    store::remove(data_dir, id).map_err(io_failure)
}

/// CHECK: run the delegate's CHECK with the stored config and the runtime's prevResult.
pub fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    if !netconf::allows_check(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} does not allow CHECK (it needs 0.4.0 or later)",
                conf.cni_version
            ),
        ));
    }
    let path = store::conf_path(&conf.data_dir, &invocation.container_id);
    let Some(bytes) = store::load(&conf.data_dir, &invocation.container_id).map_err(io_failure)?
    else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "{} does not exist: ADD did not run for this container on this node",
                path.display()
            ),
        ));
    };
    let (mut stored, plugin_type) = parse_stored(&bytes).map_err(|why| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("the stored delegate config {} {why}", path.display()),
        )
    })?;
    if let Some(prev_result) = &conf.prev_result {
        let mut prev_result = prev_result.clone();
        explicit_route_gateways(&mut prev_result);
        stored["prevResult"] = prev_result;
    }
    let plugin = delegate::find_plugin(&plugin_type, &invocation.cni_path)?;
    delegate::exec(&plugin, Command::Check, stored.to_string().as_bytes())?;
    Ok(())
}

/// Sets `gw` on result routes that have none to the gateway they were installed through
/// (ipam.ConfigureIface uses the first gateway of the route's family). The bridge plugin's
/// CHECK before containernetworking/plugins v1.3.0 (#887) looked for such routes without a
/// gateway and failed on flannel's route to the cluster network.
fn explicit_route_gateways(result: &mut Value) {
    let first_gateway = |ipv6: bool| {
        result.get("ips")?.as_array()?.iter().find_map(|ip| {
            let gateway = ip.get("gateway")?.as_str()?;
            (gateway.contains(':') == ipv6).then(|| gateway.to_owned())
        })
    };
    let gateways = [first_gateway(false), first_gateway(true)];
    let Some(routes) = result.get_mut("routes").and_then(Value::as_array_mut) else {
        return;
    };
    for route in routes.iter_mut().filter(|r| r.get("gw").is_none()) {
        let ipv6 = route
            .get("dst")
            .and_then(Value::as_str)
            .is_some_and(|d| d.contains(':'));
        if let Some(gateway) = &gateways[usize::from(ipv6)] {
            route["gw"] = json!(gateway);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> Outcome {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        run(|k| vars.get(k).cloned(), &mut stdin.as_bytes())
    }

    fn error_of(outcome: &Outcome) -> Value {
        assert!(
            !outcome.success,
            "expected a failure, got {}",
            outcome.stdout
        );
        serde_json::from_str(&outcome.stdout).unwrap()
    }

    #[test]
    fn version_lists_the_supported_spec_versions() {
        let expected =
            r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#;
        assert_eq!(version_info(), expected);
        // VERSION does not wait for stdin: a reader that fails proves it is never read.
        struct Unreadable;
        impl Read for Unreadable {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("stdin must not be read"))
            }
        }
        let outcome = run(
            |k| (k == "CNI_COMMAND").then(|| "VERSION".to_string()),
            &mut Unreadable,
        );
        assert_eq!(
            outcome,
            Outcome {
                stdout: expected.into(),
                success: true
            }
        );
    }

    #[test]
    fn errors_are_cni_error_results() {
        let error = error_of(&run_with(&[], ""));
        assert_eq!(error["code"], 4);
        assert_eq!(error["cniVersion"], "1.0.0");
        assert!(error["msg"]
            .as_str()
            .unwrap()
            .contains("CNI_COMMAND is not set"));
        assert!(error_of(&run_with(&[("CNI_COMMAND", "GC")], ""))["msg"]
            .as_str()
            .unwrap()
            .contains("\"GC\""));

        let error = error_of(&run_with(
            &[("CNI_COMMAND", "ADD")],
            "{\"cniVersion\":\"0.3.1\",\"name\":",
        ));
        assert_eq!(error["code"], 6);
        assert!(error["msg"]
            .as_str()
            .unwrap()
            .starts_with("the network config on stdin is not valid JSON"));

        let error = error_of(&run_with(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"0.2.0","name":"n"}"#,
        ));
        assert_eq!(error["code"], 1);
        assert_eq!(error["cniVersion"], "0.2.0");
        assert!(error["details"]
            .as_str()
            .unwrap()
            .contains("plugin supports"));
    }

    #[test]
    fn required_environment_is_checked_per_command() {
        let stdin = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel"}"#;
        let error = error_of(&run_with(
            &[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")],
            stdin,
        ));
        assert_eq!(error["code"], 4);
        assert_eq!(error["cniVersion"], "0.3.1");
        assert_eq!(
            error["msg"],
            "required environment variables CNI_CONTAINERID, CNI_NETNS, CNI_PATH are missing for ADD"
        );
        let base = [
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        for (id, ifname, expected) in [
            (
                "../../etc/passwd",
                "eth0",
                "CNI_CONTAINERID \"../../etc/passwd\" has invalid characters",
            ),
            (
                "-abc",
                "eth0",
                "CNI_CONTAINERID \"-abc\" has invalid characters",
            ),
            (
                "abc",
                "a-very-long-interface-name",
                "is not a valid interface name",
            ),
            ("abc", "eth/0", "is not a valid interface name"),
        ] {
            let mut vars = base.to_vec();
            vars.extend([
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", ifname),
            ]);
            let error = error_of(&run_with(&vars, stdin));
            assert!(error["msg"].as_str().unwrap().contains(expected), "{error}");
        }
        let inv = Invocation::from_env(Command::Del, |k| match k {
            "CNI_CONTAINERID" => Some("c1".into()),
            "CNI_IFNAME" => Some("eth0".into()),
            "CNI_PATH" => Some("/a::/b".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(inv.netns, "", "DEL works without a netns");
        assert_eq!(inv.cni_path, [PathBuf::from("/a"), PathBuf::from("/b")]);
    }

    fn invocation_vars<'a>(command: &'a str, cni_path: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/pod"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", cni_path),
        ]
    }

    #[test]
    fn add_without_subnet_env_asks_to_retry_and_names_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let subnet_file = dir.path().join("subnet.env");
        let stdin = json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": subnet_file, "dataDir": dir.path().join("data")
        });
        let error = error_of(&run_with(
            &invocation_vars("ADD", "/usr/lib/cni"),
            &stdin.to_string(),
        ));
        assert_eq!(error["code"], 11);
        let msg = error["msg"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!(
                "{} does not exist: is the weft agent (or flanneld) running",
                subnet_file.display()
            )),
            "{msg}"
        );
        assert!(
            !dir.path().join("data").exists(),
            "nothing stored for a failed ADD"
        );
    }

    #[test]
    fn add_with_a_missing_delegate_plugin_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let subnet_file = dir.path().join("subnet.env");
        std::fs::write(&subnet_file, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
        let stdin = json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "delegate": { "type": "no-such-plugin" },
            "subnetFile": subnet_file, "dataDir": dir.path().join("data")
        });
        let empty_bin = dir.path().join("bin");
        std::fs::create_dir(&empty_bin).unwrap();
        let error = error_of(&run_with(
            &invocation_vars("ADD", empty_bin.to_str().unwrap()),
            &stdin.to_string(),
        ));
        let msg = error["msg"].as_str().unwrap();
        assert!(
            msg.contains("failed to find the delegate plugin \"no-such-plugin\" in CNI_PATH"),
            "{msg}"
        );
        assert!(!dir.path().join("data/c0ffee").exists());
    }

    #[test]
    fn del_without_stored_config_succeeds_and_check_fails() {
        let dir = tempfile::tempdir().unwrap();
        let stdin = json!({ "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "dataDir": dir.path() });
        let outcome = run_with(&invocation_vars("DEL", "/nonexistent"), &stdin.to_string());
        assert_eq!(
            outcome,
            Outcome {
                stdout: String::new(),
                success: true
            }
        );
        // A config ADD would reject must not block the cleanup either.
        let rejected = json!({ "cniVersion": "1.0.0", "name": "cbr0", "delegate": { "name": "x" }, "dataDir": dir.path() });
        assert!(
            run_with(
                &invocation_vars("DEL", "/nonexistent"),
                &rejected.to_string()
            )
            .success
        );

        let error = error_of(&run_with(
            &invocation_vars("CHECK", "/nonexistent"),
            &stdin.to_string(),
        ));
        assert_eq!(error["code"], 3);
        let old = json!({ "cniVersion": "0.3.1", "name": "cbr0", "type": "flannel", "dataDir": dir.path() });
        let error = error_of(&run_with(
            &invocation_vars("CHECK", "/nonexistent"),
            &old.to_string(),
        ));
        assert_eq!(error["code"], 1);
        assert!(error["msg"]
            .as_str()
            .unwrap()
            .contains("does not allow CHECK"));
    }

    #[test]
    fn corrupt_stored_config_does_not_block_del() {
        let dir = tempfile::tempdir().unwrap();
        store::save(dir.path(), "c0ffee", b"{not json").unwrap();
        let stdin = json!({ "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "dataDir": dir.path() });
        let error = error_of(&run_with(
            &invocation_vars("CHECK", "/usr/lib/cni"),
            &stdin.to_string(),
        ));
        let msg = error["msg"].as_str().unwrap();
        assert!(
            msg.ends_with("c0ffee is not valid JSON (key must be a string at line 1 column 2)"),
            "{msg}"
        );
        let outcome = run_with(&invocation_vars("DEL", "/usr/lib/cni"), &stdin.to_string());
        assert_eq!(
            outcome,
            Outcome {
                stdout: String::new(),
                success: true
            }
        );
        assert_eq!(store::load(dir.path(), "c0ffee").unwrap(), None);
    }

    #[test]
    fn check_makes_route_gateways_explicit() {
        let mut result = json!({
            "cniVersion": "1.0.0",
            "ips": [
                { "address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2 },
                { "address": "fd00:1::2/64", "gateway": "fd00:1::1", "interface": 2 }
            ],
            "routes": [
                { "dst": "10.244.0.0/16" },
                { "dst": "0.0.0.0/0", "gw": "10.244.1.254" },
                { "dst": "fd00::/48" }
            ]
        });
        explicit_route_gateways(&mut result);
        assert_eq!(
            result["routes"],
            json!([
                { "dst": "10.244.0.0/16", "gw": "10.244.1.1" },
                { "dst": "0.0.0.0/0", "gw": "10.244.1.254" },
                { "dst": "fd00::/48", "gw": "fd00:1::1" }
            ])
        );
        let mut no_gateway =
            json!({ "ips": [{ "address": "10.0.0.2/24" }], "routes": [{ "dst": "10.1.0.0/16" }] });
        explicit_route_gateways(&mut no_gateway);
        assert_eq!(no_gateway["routes"], json!([{ "dst": "10.1.0.0/16" }]));
    }
}
