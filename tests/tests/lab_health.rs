//! /healthz, /readyz and /metrics scraped over the underlay from agents running in the lab,
//! as a kubelet probe or Prometheus would.

use std::time::Duration;

use weft_tests::lab::metric as sample;
use weft_tests::{wait_until, Backend, Dataplane, Lab, LabConfig};

const HEALTHZ_PORT: u16 = 8471;

fn get(lab: &Lab, node: usize, path: &str) -> (u16, String) {
    lab.http_get(node, HEALTHZ_PORT, path)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn agents_answer_probes_and_export_metrics_in_the_lab() {
    let mut lab = Lab::start(LabConfig {
        nodes: 2,
        backend: Backend::Vxlan,
        dataplane: Dataplane::Bpf,
        extra_agent_args: vec![format!("--healthz-port={HEALTHZ_PORT}")],
        ..Default::default()
    })
    .expect("lab starts");
    let pods = lab.add_pods(1).expect("pods attach");
    let node1 = 1;

    let (status, body) = get(&lab, node1, "/healthz");
    assert_eq!(status, 200, "/healthz: {body}");
    assert_eq!(body.trim(), "ok");
    let (status, body) = get(&lab, node1, "/readyz");
    assert_eq!(status, 200, "/readyz: {body}");

    // Traffic through the programs shows up in the per-reason packet counters.
    wait_until("pods ping across nodes", Duration::from_secs(15), || {
        Ok(lab.ping(&pods[0], pods[1].ip))
    })
    .expect("pods ping");
    // Endpoints are learned from the first exchanges: keep pinging until both directions
    // went through the programs.
    let mut metrics = String::new();
    wait_until(
        "encap and decap counted on node 1",
        Duration::from_secs(15),
        || {
            lab.ping(&pods[0], pods[1].ip);
            let (status, body) = get(&lab, node1, "/metrics");
            assert_eq!(status, 200);
            metrics = body;
            let counted = |reason: &str| {
                sample(
                    &metrics,
                    &format!("weft_datapath_packets_total{{reason=\"{reason}\"}}"),
                )
                .unwrap_or(0.0)
            };
            Ok(counted("encap") >= 1.0 && counted("decap") >= 1.0)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{metrics}"));
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample line: {line:?}");
    }
    assert_eq!(sample(&metrics, "weft_ready "), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "weft_leases_known "),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_dataplane_info{mode=\"bpf\""),
        "{metrics}"
    );
    // Set at the first resync, which follows the first complete lease list.
    wait_until("the fast path's state on /metrics", Duration::from_secs(15), || {
        let (_, m) = get(&lab, node1, "/metrics");
        Ok(m.contains(
            "weft_fast_path_info{state=\"on\",reason=\"no netfilter rule filters forwarded pod traffic\"} 1",
        ))
    })
    .expect("weft_fast_path_info says the fast path is on, and why");

    // A lease change applied while running is timed.
    let third = lab.add_node().expect("third node");
    lab.start_agent(third).expect("third agent");
    wait_until(
        "node 1 applies the new lease",
        Duration::from_secs(10),
        || {
            let (_, m) = get(&lab, node1, "/metrics");
            Ok(sample(&m, "weft_leases_known ") == Some(2.0)
                && sample(&m, "weft_lease_apply_seconds_count").unwrap_or(0.0) >= 1.0)
        },
    )
    .expect("the new lease is counted and its apply time observed");
}

/// What systemd would receive on `NOTIFY_SOCKET` from a `Type=notify` weft unit.
#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("a read timeout");
    let mut lab = Lab::start(LabConfig {
        nodes: 1,
        backend: Backend::Vxlan,
        dataplane: Dataplane::Kernel,
        extra_agent_env: vec![
            ("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
        ],
        ..Default::default()
    })
    .expect("lab starts");
    let mut heard = Vec::new();
    let receive_until = |what: &str, heard: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        loop {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {what} within 20 s ({e}); heard {heard:#?}"));
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            heard.push(message.clone());
            if message.lines().any(|l| l == what) {
                return message;
            }
        }
    };
    let ready = receive_until("READY=1", &mut heard);
    assert!(
        ready.contains("STATUS=ready: lease 10.244.") && ready.contains("subnet.env written"),
        "{ready}"
    );
    assert!(
        heard.iter().any(|m| m.contains("STATUS=lease 10.244.")),
        "a status line while programming: {heard:#?}"
    );
    // READY=1 came once subnet.env exists: pods can be configured.
    assert!(lab
        .subnet_env(1)
        .expect("subnet.env")
        .contains_key("FLANNEL_SUBNET"));
    receive_until("WATCHDOG=1", &mut heard);
    lab.stop_agent(1);
    receive_until("STOPPING=1", &mut heard);
}

/// The programs' view of the agent: seconds since the config was refreshed, on node `index`.
fn refreshed_secs_ago(lab: &Lab, index: usize) -> f64 {
    let bpf_dir = lab.bpf_dir(index).to_string_lossy().into_owned();
    let weft = lab.binary("weft").unwrap().to_string_lossy().into_owned();
    let out = weft_tests::exec::Cmd::new([
        weft.as_str(),
        "bpf",
        "config",
        "--bpf-dir",
        &bpf_dir,
        "-o",
        "json",
    ])
    .netns(lab.node_ns(index))
    .timeout(Duration::from_secs(20))
    .run()
    .unwrap_or_else(|e| panic!("{e:#}"));
    let config: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    config["refreshed_secs_ago"]
        .as_f64()
        .unwrap_or_else(|| panic!("{config}"))
}

#[test]
fn a_hanging_firewall_tool_does_not_stop_the_heartbeat() {
    use std::os::unix::fs::PermissionsExt;
    // iptables hangs (as on a held xtables lock) once `stall` exists; every other run is
    // the real one.
    let fake = tempfile::tempdir().expect("a temp dir");
    let stall = fake.path().join("stall");
    let script = format!(
        "#!/bin/sh\nif [ -e {} ]; then sleep 120; fi\nPATH=${{PATH#*:}} exec iptables \"$@\"\n",
        stall.display()
    );
    let tool = fake.path().join("iptables");
    std::fs::write(&tool, script).unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut lab = Lab::start(LabConfig {
        nodes: 1,
        backend: Backend::Vxlan,
        dataplane: Dataplane::Bpf,
        // Stale after 6 s (a heartbeat every 2 s); the firewall repaired every second,
        // each repair stuck in iptables until its 10 s deadline.
        extra_agent_args: vec![
            "--bpf-stale-after=6".into(),
            "--iptables-resync=1".into(),
            "--firewall=iptables".into(),
        ],
        ..Default::default()
    })
    .expect("lab starts");
    lab.restart_agent_with_path_first(1, fake.path())
        .expect("the agent restarts with the fake iptables");
    std::fs::write(&stall, "").unwrap();
    // Until two stalled repairs were killed at their deadline (some 20 s), the refresh
    // never gets older than the stale window.
    let killed = "did not finish within 10 s: killed";
    let mut oldest: f64 = 0.0;
    weft_tests::wait_until(
        "two stalled iptables runs killed",
        Duration::from_secs(40),
        || {
            oldest = oldest.max(refreshed_secs_ago(&lab, 1));
            Ok(lab.agent_log_tail(1, 400).matches(killed).count() >= 2)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent_log_tail(1, 40)));
    let log = lab.agent_log_tail(1, 200);
    assert!(
        oldest < 4.0,
        "the config went {oldest:.1} s without a refresh:\n{log}"
    );
}
