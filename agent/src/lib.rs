//! weft: a flannel-compatible overlay network agent.

pub mod agent;
pub mod backend;
pub mod bpf;
pub mod cli;
pub mod cni;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod docker_opts;
pub mod health;
pub mod iface;
pub mod inspect;
pub mod install;
pub mod lease;
pub mod masq;
pub mod metrics;
pub mod plan;
pub mod status;
pub mod subnet;
pub mod subnet_env;
pub mod systemd;
pub mod tool;
