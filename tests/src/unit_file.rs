//! A systemd unit's command lines as systemd runs them: the `EnvironmentFile`'s variables
//! substituted (`${VAR}` as one word, `$VAR` split on whitespace), so tests run the unit
//! and environment file shipped in deploy/systemd verbatim.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// The unit's `ExecStart` and `ExecStartPost` argv.
#[derive(Debug, Clone)]
pub struct UnitCommands {
    pub exec_start: Vec<String>,
    pub exec_start_post: Vec<String>,
}

/// Reads `unit` and `env_file`; `overrides` replace the file's values, as an operator edits them.
pub fn unit_commands(
    unit: &Path,
    env_file: &Path,
    overrides: &[(&str, &str)],
) -> Result<UnitCommands> {
    let unit_text =
        std::fs::read_to_string(unit).with_context(|| format!("reading {}", unit.display()))?;
    let env_text = std::fs::read_to_string(env_file)
        .with_context(|| format!("reading {}", env_file.display()))?;
    let mut vars: BTreeMap<String, String> = env_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect();
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    let line = |key: &str| -> Result<Vec<String>> {
        let text = unit_text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or_else(|| anyhow!("{} has no {key} line", unit.display()))?;
        let mut argv = Vec::new();
        for word in text.split_whitespace() {
            match word.strip_prefix('$').filter(|w| !w.starts_with('{')) {
                Some(name) => argv.extend(
                    vars.get(name)
                        .ok_or_else(|| anyhow!("${name} is not set"))?
                        .split_whitespace()
                        .map(str::to_string),
                ),
                None => {
                    let mut word = word.to_string();
                    for (k, v) in &vars {
                        word = word.replace(&format!("${{{k}}}"), v);
                    }
                    argv.push(word);
                }
            }
        }
        Ok(argv)
    };
    Ok(UnitCommands {
        exec_start: line("ExecStart=")?,
        exec_start_post: line("ExecStartPost=")?,
    })
}
