//! Configuration: flanneld-compatible flags and net-conf.json.

pub mod flags;
pub mod netconf;

pub use flags::AgentArgs;
pub use netconf::{BackendConf, NetConf, NetConfError, VxlanConf};
