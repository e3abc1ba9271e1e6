//! The `weft` command line, in the library so that tests (and deploy/weft.yml's checks)
//! parse exactly what the binary parses (`Cli::try_parse_from`).

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
}
