//! The quick chaos scenarios (`weft_tests::chaos`) as tests: a fault on a node under a ping
//! flood and a TCP stream, repaired within the resync interval, the stream intact. The
//! slow ones (etcd restart, a 30 s API outage, uplink flap, the pod bridge) run in
//! `cargo xtask chaos`. Needs root and the binaries.

use std::time::Duration;

use weft_tests::chaos::{run_scenario, Fault, RESYNC_INTERVAL};

fn repaired_within_the_resync_interval(fault: Fault) {
    let outcome = run_scenario(fault).unwrap_or_else(|e| panic!("{fault:?}: {e:#}"));
    eprintln!("{}", outcome.row());
    let within = RESYNC_INTERVAL + Duration::from_secs(1);
    let after = outcome
        .repaired_after
        .unwrap_or_else(|| panic!("{fault:?} was not repaired: {}", outcome.row()));
    assert!(
        after <= within,
        "{fault:?} repaired only after {after:?}: {}",
        outcome.row()
    );
    assert!(
        outcome.stream_intact,
        "{fault:?} broke the TCP stream: {}",
        outcome.row()
    );
}

#[test]
fn a_deleted_vxlan_device_comes_back() {
    repaired_within_the_resync_interval(Fault::VxlanDeviceDeleted);
}

#[test]
fn deleted_tc_filters_come_back() {
    repaired_within_the_resync_interval(Fault::TcFilterDeleted);
}

#[test]
fn a_deleted_map_entry_comes_back() {
    repaired_within_the_resync_interval(Fault::MapEntryDeleted);
}

#[test]
fn an_agent_killed_during_lease_churn_converges_to_the_final_table() {
    repaired_within_the_resync_interval(Fault::AgentKilledDuringChurn);
}

#[test]
fn a_changed_node_ip_is_published_after_the_agent_restarts() {
    repaired_within_the_resync_interval(Fault::NodeIpChanged);
}
