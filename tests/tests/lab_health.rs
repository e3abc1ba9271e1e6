//! /healthz, /readyz and /metrics scraped over the underlay from agents running in the lab,
//! as a kubelet probe or Prometheus would.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use weft_tests::icmp::in_netns;
use weft_tests::{wait_until, Backend, Dataplane, Lab, LabConfig};

const HEALTHZ_PORT: u16 = 8471;

/// One HTTP/1.1 GET from the fabric namespace; returns (status code, body).
fn get(lab: &Lab, node: Ipv4Addr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\n\r\n");
    let reply = in_netns(lab.fabric_ns(), move || {
        let addr = SocketAddr::from((node, HEALTHZ_PORT));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        anyhow::Ok(reply)
    })
    .unwrap_or_else(|e| panic!("GET http://{node}:{HEALTHZ_PORT}{path}: {e:#}"));
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first sample line of `metrics` that starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
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
    let node1 = lab.node_ip(1);

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
