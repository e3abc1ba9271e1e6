//! The `weft` command line, in the library so that tests (and deploy/weft.yml's checks)
//! parse exactly what the binary parses (`Cli::try_parse_from`).

use std::ffi::OsString;
use std::path::Path;

use clap::{Parser, Subcommand};

use crate::config::AgentArgs;
use crate::install::{InstallCniArgs, MountBpffsArgs};

#[derive(Parser, Debug)]
#[command(
    name = "weft",
    version,
    propagate_version = true,
    about = "A flannel-compatible overlay network with an eBPF dataplane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent (flanneld's flags and FLANNELD_* variables).
    Agent(Box<AgentArgs>),
    /// Install the CNI plugin (as `flannel`) and the conflist on this node, atomically
    /// (the DaemonSet's init container; flannel's install-cni-plugin and install-cni).
    InstallCni(InstallCniArgs),
    /// Make sure a BPF filesystem is mounted at /sys/fs/bpf and the pin directory exists
    /// (the DaemonSet's privileged init container, so the agent needs no mount rights).
    MountBpffs(MountBpffsArgs),
    /// Generate Docker daemon options from subnet.env, as flannel's mk-docker-opts.sh
    /// (the binary answers to that name too).
    MkDockerOpts(crate::docker_opts::MkDockerOptsArgs),
    /// This node's network at a glance: the agent, the dataplane and why, the lease, peers
    /// and their path, pods learned, counters and what needs attention. Works while the
    /// agent is down (from subnet.env, the agent's record, the pinned maps, the routes).
    Status(crate::status::StatusArgs),
    /// The pinned BPF maps, decoded: leases, peers, endpoints, counters, config.
    Bpf(crate::status::BpfArgs),
}

/// The names weft answers to besides its own, and the command each stands for: installed
/// as `flanneld` it is the agent, as `mk-docker-opts.sh` the Docker options tool, so unit
/// files and wrappers written for flannel run it unchanged.
const ALIASES: [(&str, &str); 2] = [
    ("flanneld", "agent"),
    ("mk-docker-opts.sh", "mk-docker-opts"),
];

/// The command line as clap should see it: `weft agent ...` when called by an agent alias,
/// and Go flag-package spellings of the agent's flags (`-etcd-endpoints=x`,
/// `-etcd-prefix x`, `-ip-masq`) rewritten to their long form, as flanneld accepted them.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let called_as = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((_, command)) = ALIASES.iter().find(|(name, _)| *name == called_as) {
        args.insert(1, OsString::from(command));
    }
    if args.get(1).and_then(|a| a.to_str()) != Some("agent") {
        return args;
    }
    let command = <Cli as clap::CommandFactory>::command();
    let long_names: Vec<String> = command
        .find_subcommand("agent")
        .map(|agent| {
            agent
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::with_capacity(args.len());
    let mut rest = args.into_iter();
    out.extend(rest.by_ref().take(2));
    for arg in rest.by_ref() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            out.push(arg);
            break;
        }
        let go_style = text
            .strip_prefix('-')
            .filter(|flag| !flag.starts_with('-'))
            .map(|flag| flag.split_once('=').map_or(flag, |(name, _)| name))
            .is_some_and(|name| long_names.iter().any(|known| known == name));
        if go_style {
            out.push(OsString::from(format!("-{text}")));
        } else {
            out.push(arg);
        }
    }
    out.extend(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from)))
    }

    fn agent(args: &[&str]) -> crate::config::AgentArgs {
        match parse(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
        {
            Command::Agent(agent) => *agent,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn go_style_flags_are_accepted_as_flanneld_took_them() {
        let a = agent(&[
            "weft",
            "agent",
            "-etcd-endpoints=http://10.0.0.1:2379",
            "-etcd-prefix",
            "/atomic.io/network",
            "-ip-masq",
            "-iface=eth1",
            "--subnet-file=/tmp/subnet.env",
            "-healthz-port",
            "2401",
        ]);
        assert_eq!(a.etcd_endpoints, "http://10.0.0.1:2379");
        assert_eq!(a.etcd_prefix, "/atomic.io/network");
        assert!(a.ip_masq);
        assert_eq!(a.iface, ["eth1"]);
        assert_eq!(a.subnet_file, std::path::PathBuf::from("/tmp/subnet.env"));
        assert_eq!(a.healthz_port, 2401);
    }

    #[test]
    fn called_as_flanneld_it_is_the_agent() {
        // argv[0] as a unit file's ExecStart gives it (not a program this test starts).
        let argv0 = "/usr/bin/flanneld";
        let a = agent(&[argv0, "-etcd-prefix=/coreos.com/network"]);
        assert_eq!(a.etcd_prefix, "/coreos.com/network");
    }

    #[test]
    fn unknown_single_dash_flags_still_fail_with_clap_s_message() {
        let err = parse(&["weft", "agent", "-no-such-flag=1"]).unwrap_err();
        assert!(err.to_string().contains("unexpected argument"), "{err}");
        // A value that looks like a flag stays a value.
        let a = agent(&["weft", "agent", "-etcd-prefix=-ip-masq"]);
        assert_eq!(a.etcd_prefix, "-ip-masq");
        assert!(!a.ip_masq);
    }
}
