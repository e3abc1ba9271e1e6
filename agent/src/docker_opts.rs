//! `weft mk-docker-opts` (also answering to `mk-docker-opts.sh`): flannel's script that
//! turns subnet.env into Docker daemon options, with its flags and its exact output, so
//! that a packaged `flanneld.service` (`ExecStartPost=/usr/libexec/flannel/mk-docker-opts.sh
//! -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker`) works as written.
//!
//! Output: `DOCKER_OPT_BIP="--bip=<FLANNEL_SUBNET>"`, `DOCKER_OPT_IPMASQ="--ip-masq=<the
//! inverse of FLANNEL_IPMASQ>"` (Docker must not masquerade what flannel already does),
//! `DOCKER_OPT_MTU="--mtu=<FLANNEL_MTU>"`, one per line in name order (with any
//! `DOCKER_OPT_*` variable of the environment), then `<KEY>="<$KEY> <each value> "`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct MkDockerOptsArgs {
    /// Path to flannel env file.
    #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
    pub flannel_env: PathBuf,
    /// Path to Docker env file to write to.
    #[arg(short = 'd', default_value = "/run/docker_opts.env")]
    pub docker_env: PathBuf,
    /// Output each Docker option as individual var, e.g. DOCKER_OPT_MTU=1500.
    #[arg(short = 'i')]
    pub individual: bool,
    /// Output combined Docker options into the DOCKER_OPTS var.
    #[arg(short = 'c')]
    pub combined: bool,
    /// Do not output --ip-masq (useful for older Docker versions).
    #[arg(short = 'm')]
    pub no_ip_masq: bool,
    /// Set the combined options key to this value.
    #[arg(short = 'k', default_value = "DOCKER_OPTS")]
    pub key: String,
}

/// The KEY=VALUE lines of a shell env file (values unquoted as the shell would).
fn read_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let unquoted = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// The Docker env file for `flannel_env` (the subnet.env text, empty if there is none) and
/// `environment` (the caller's variables).
pub fn render(
    args: &MkDockerOptsArgs,
    flannel_env: &str,
    environment: &BTreeMap<String, String>,
) -> String {
    let (individual, combined) = match (args.individual, args.combined) {
        (false, false) => (true, true),
        other => other,
    };
    let mut vars = environment.clone();
    vars.extend(read_env(flannel_env));
    let mut opts: BTreeMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("DOCKER_OPT_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let nonempty = |key: &str| vars.get(key).filter(|v| !v.is_empty());
    if let Some(subnet) = nonempty("FLANNEL_SUBNET") {
        opts.insert("DOCKER_OPT_BIP".into(), format!("--bip={subnet}"));
    }
    if let Some(mtu) = nonempty("FLANNEL_MTU") {
        opts.insert("DOCKER_OPT_MTU".into(), format!("--mtu={mtu}"));
    }
    if !args.no_ip_masq {
        match vars.get("FLANNEL_IPMASQ").map(String::as_str) {
            Some("true") => {
                opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=false".into());
            }
            Some("false") => {
                opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=true".into());
            }
            _ => {}
        }
    }
    let mut out = String::new();
    let mut all = format!("{} ", vars.get(&args.key).map_or("", String::as_str));
    for (name, value) in &opts {
        if individual {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        all.push_str(value);
        all.push(' ');
    }
    if combined {
        out.push_str(&format!("{}=\"{all}\"\n", args.key));
    }
    out
}

/// Reads the flannel env file, writes the Docker env file (atomically); returns its path.
pub fn run(args: &MkDockerOptsArgs) -> Result<PathBuf> {
    let flannel_env = match std::fs::read_to_string(&args.flannel_env) {
        Ok(text) => text,
        // As the script: no subnet.env, no options (but say so).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "mk-docker-opts: {} does not exist (is the agent running? -f names another file): writing no options",
                args.flannel_env.display()
            );
            String::new()
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading {} (-f)", args.flannel_env.display()))
        }
    };
    let environment: BTreeMap<String, String> = std::env::vars().collect();
    let text = render(args, &flannel_env, &environment);
    write_atomically(&args.docker_env, &text)
        .with_context(|| format!("writing {} (-d)", args.docker_env.display()))?;
    Ok(args.docker_env.clone())
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp-weft");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBNET_ENV: &str = "FLANNEL_NETWORK=172.30.0.0/16\nFLANNEL_SUBNET=172.30.46.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    fn args(extra: &[&str]) -> MkDockerOptsArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: MkDockerOptsArgs,
        }
        let argv = std::iter::once("mk-docker-opts.sh").chain(extra.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn default_output_is_the_scripts_byte_for_byte() {
        let out = render(&args(&[]), SUBNET_ENV, &BTreeMap::new());
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=172.30.46.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\" --bip=172.30.46.1/24 --ip-masq=true --mtu=1450 \"\n"
        );
    }

    #[test]
    fn flags_select_what_is_written() {
        let env = SUBNET_ENV.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true");
        assert_eq!(
            render(&args(&["-i"]), &env, &BTreeMap::new()),
            "DOCKER_OPT_BIP=\"--bip=172.30.46.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
        );
        assert_eq!(
            render(
                &args(&["-c", "-m", "-k", "DOCKER_NETWORK_OPTIONS"]),
                &env,
                &BTreeMap::new()
            ),
            "DOCKER_NETWORK_OPTIONS=\" --bip=172.30.46.1/24 --mtu=1450 \"\n"
        );
        // The combined key's value in the environment comes first, as in the script.
        let environment: BTreeMap<String, String> =
            [("DOCKER_OPTS".to_string(), "--debug".to_string())]
                .into_iter()
                .collect();
        assert_eq!(
            render(&args(&["-c"]), &env, &environment),
            "DOCKER_OPTS=\"--debug --bip=172.30.46.1/24 --ip-masq=false --mtu=1450 \"\n"
        );
        // No subnet.env: nothing but an empty combined value.
        assert_eq!(
            render(&args(&[]), "", &BTreeMap::new()),
            "DOCKER_OPTS=\" \"\n"
        );
    }
}
