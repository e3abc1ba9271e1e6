//! weft's network-namespace lab: a fabric (underlay bridge, etcd, an external host),
//! nodes running `weft agent`, pods attached by the CNI plugin. Nothing is created in
//! the root network namespace; everything is removed when the [`Lab`] is dropped.
//!
//! ```no_run
//! use weft_tests::{Backend, Lab, LabConfig};
//! let mut lab = Lab::start(LabConfig { nodes: 3, backend: Backend::Vxlan, ..Default::default() })?;
//! let pods = lab.add_pods(2)?;
//! assert!(lab.ping(&pods[0], pods[5].ip));
//! # anyhow::Ok(())
//! ```

pub mod apiserver;
pub mod bpf;
pub mod chaos;
pub mod conn_rate;
pub mod cp_bench;
pub mod datapath;
pub mod echo;
pub mod etcd;
pub mod exec;
pub mod fuzz;
pub mod icmp;
pub mod kube_lab;
pub mod kube_proxy;
pub mod lab;
pub mod load;
pub mod nat_bench;
pub mod netns;
pub mod packet;
pub mod pki;
pub mod plain_flannel;
pub mod process;
pub mod traffic;
pub mod unit_file;
pub mod workload;

pub use bpf::{BpfCounters, TcFilter};
pub use exec::{wait_until, Cmd};
pub use icmp::{Flood, FloodReport, ProbeOutcome};
pub use lab::{
    Backend, Dataplane, KubeLabConfig, Lab, LabConfig, Lease, PingMatrix, Pod, PortMapping,
    SubnetManager, VxlanPacket, EXTERNAL_HOST, FABRIC_IP,
};
pub use plain_flannel::PlainFlannelNode;
pub use traffic::{IperfReport, TcpFlow, TcpFlowReport};
