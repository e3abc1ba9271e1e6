//! Running the delegate plugin (bridge by default) the way libcni runs plugins: found in
//! CNI_PATH, with this process's environment and CNI_COMMAND, config on stdin.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use super::error::{code, CniError};
use super::Command;

/// The executable for plugin `name` in the CNI_PATH directories, first match wins.
pub fn find_plugin(name: &str, cni_path: &[PathBuf]) -> Result<PathBuf, CniError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!("delegate type {name:?} is not a plugin name"),
        ));
    }
    cni_path
        .iter()
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                format!(
                    "failed to find the delegate plugin {name:?} in CNI_PATH {}: install the CNI plugins (containernetworking-plugins) there, or fix `delegate.type`",
                    std::env::join_paths(cni_path).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
                ),
            )
        })
}

/// Runs `plugin` for `command` with `conf` on stdin and returns its stdout. A failing
/// delegate's error result is passed on with its code, its message prefixed.
pub fn exec(plugin: &Path, command: Command, conf: &[u8]) -> Result<Vec<u8>, CniError> {
    let name = plugin
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let spawn_error = |e: std::io::Error| {
        CniError::new(
            code::INTERNAL,
            format!("running the delegate plugin {}: {e}", plugin.display()),
        )
    };
    let mut child = Process::new(plugin)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Fed from another thread: a plugin may write before it has read all of its input.
    let output = std::thread::scope(|scope| {
        let feeder = scope.spawn(move || stdin.write_all(conf));
        let output = child.wait_with_output();
        // A plugin that exits without reading its input breaks the pipe: its exit
        // status tells what happened.
        let _ = feeder.join();
        output
    })
    .map_err(spawn_error)?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    let verb = command.as_str();
    match serde_json::from_slice::<Value>(&output.stdout) {
        Ok(result) if result.get("msg").is_some_and(Value::is_string) => {
            let text = |field: &str| result.get(field).and_then(Value::as_str).unwrap_or_default().to_owned();
            let delegate_code = result.get("code").and_then(Value::as_u64).unwrap_or(code::INTERNAL.into());
            Err(CniError::new(
                u32::try_from(delegate_code).unwrap_or(code::INTERNAL),
                format!("delegate plugin {name} failed on {verb}: {}", text("msg")),
            )
            .with_details(text("details")))
        }
        _ => Err(CniError::new(
            code::INTERNAL,
            format!(
                "delegate plugin {name} failed on {verb} ({}) without an error result; its output: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim()
            ),
        )),
    }
}
