//! The health server over real TCP on loopback (127.0.0.1, port chosen by the kernel),
//! scraped with a plain client that writes raw requests: what kubelet probes and
//! Prometheus see.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use weft::health::{self, HealthServer, MAX_REQUEST_BYTES, READ_TIMEOUT};
use weft::metrics::{AgentState, DataplaneInfo, PeerHealth, ReadyPart};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `raw` as is and reads the reply until the server closes.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        stream.write_all(raw).await.expect("sending the request");
        // Half-close: a head without its final empty line ends here.
        stream.shutdown().await.expect("closing the sending side");
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .expect("reading the reply");
        parse_reply(&reply, !raw.starts_with(b"HEAD "))
    })
    .await
    .expect("the server answered in time")
}

/// `with_body`: false for the reply to HEAD (a Content-Length, no body).
fn parse_reply(reply: &[u8], with_body: bool) -> Reply {
    let text = String::from_utf8(reply.to_vec()).expect("a UTF-8 reply");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let reply = Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    };
    let length: usize = reply.header("Content-Length").unwrap().parse().unwrap();
    let expected = if with_body { length } else { 0 };
    assert_eq!(expected, reply.body.len(), "Content-Length of {head}");
    reply
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: weft\r\nUser-Agent: test\r\n\r\n").as_bytes(),
    )
    .await
}

async fn server(state: &Arc<AgentState>) -> HealthServer {
    health::serve((Ipv4Addr::LOCALHOST, 0).into(), state.clone())
        .await
        .expect("serving on 127.0.0.1:0")
}

#[tokio::test]
async fn healthz_answers_and_readyz_waits_for_lease_dataplane_and_subnet_env() {
    let state = Arc::new(AgentState::new());
    let server = server(&state).await;
    let addr = server.local_addr();

    let healthz = get(addr, "/healthz").await;
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok"));

    let readyz = get(addr, "/readyz").await;
    assert_eq!(readyz.status, 503, "{}", readyz.body);
    for missing in ["lease", "dataplane", "subnet.env"] {
        assert!(
            readyz.body.contains(missing),
            "{missing} not named: {}",
            readyz.body
        );
    }

    state.set_ready(ReadyPart::Lease, true);
    state.set_ready(ReadyPart::Dataplane, true);
    let readyz = get(addr, "/readyz").await;
    assert_eq!(readyz.status, 503);
    assert!(
        readyz.body.contains("subnet.env")
            && !readyz.body.contains("lease")
            && !readyz.body.contains("dataplane"),
        "only subnet.env is missing: {}",
        readyz.body
    );

    state.set_ready(ReadyPart::SubnetEnv, true);
    let readyz = get(addr, "/readyz").await;
    assert_eq!(
        (readyz.status, readyz.body.as_str()),
        (503, "not ready: peers not all programmed\n")
    );

    // A failed resync is not ready, and says why; nor is a full BPF map.
    state.set_peer_health(PeerHealth {
        resync_error: Some("vxlan resync: programming 10.244.7.0/24: refused".into()),
        ..PeerHealth::default()
    });
    let readyz = get(addr, "/readyz").await;
    assert_eq!(
        (readyz.status, readyz.body.as_str()),
        (
            503,
            "not ready: last resync failed: vxlan resync: programming 10.244.7.0/24: refused\n"
        )
    );
    state.set_peer_health(PeerHealth {
        overflow: vec![("leases", 3)],
        ..PeerHealth::default()
    });
    let readyz = get(addr, "/readyz").await;
    assert!(
        readyz.status == 503
            && readyz
                .body
                .contains("BPF map leases full (3 peers on the kernel path)"),
        "{}",
        readyz.body
    );
    state.set_peer_health(PeerHealth::default());
    let readyz = get(addr, "/readyz").await;
    assert_eq!((readyz.status, readyz.body.as_str()), (200, "ok"));
    // Probes with a query string (and HEAD) get the same answer.
    assert_eq!(get(addr, "/readyz?verbose").await.status, 200);
    let head = exchange(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        (head.status, head.header("Content-Length")),
        (200, Some("2"))
    );
    server.stop();
}

/// A sample line: `name{label="value",...} value`, label values escaped.
fn sample_line() -> Regex {
    let label = r#"[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*""#;
    Regex::new(&format!(
        r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{{label}(?:,{label})*\}})? (\S+)$"
    ))
    .unwrap()
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let state = Arc::new(AgentState::new());
    state.set_ready(ReadyPart::Lease, true);
    state.set_leases_known(7);
    state.set_dataplane(DataplaneInfo::from_selection(
        "kernel (BPF unavailable: the \"verifier\" said\nno \\o/)",
        std::path::Path::new("/sys/fs/bpf/weft"),
    ));
    for micros in [80, 400, 1_500, 30_000] {
        state.observe_lease_apply(Duration::from_micros(micros));
    }
    let server = server(&state).await;

    let reply = get(server.local_addr(), "/metrics").await;
    assert_eq!(reply.status, 200);
    let content_type = reply.header("Content-Type").unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );

    let line_format = sample_line();
    let mut samples = std::collections::BTreeMap::new();
    for line in reply.body.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let parsed = line_format
            .captures(line)
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value = &parsed[2];
        assert!(
            value.parse::<f64>().is_ok(),
            "value of {line:?} is not a number"
        );
        assert!(parsed[1].starts_with("weft_"), "{line}");
        samples.insert(
            line.rsplit_once(' ').unwrap().0.to_string(),
            value.to_string(),
        );
    }
    let value = |series: &str| samples.get(series).map(String::as_str);
    assert_eq!(value("weft_ready"), Some("0"));
    assert_eq!(
        value(r#"weft_ready_condition{condition="lease"}"#),
        Some("1")
    );
    assert_eq!(value("weft_leases_known"), Some("7"));
    assert_eq!(
        value(
            r#"weft_dataplane_info{mode="kernel",reason="BPF unavailable: the \"verifier\" said\nno \\o/"}"#
        ),
        Some("1")
    );
    assert_eq!(
        value(r#"weft_lease_apply_seconds_bucket{le="0.0001"}"#),
        Some("1")
    );
    assert_eq!(
        value(r#"weft_lease_apply_seconds_bucket{le="0.0025"}"#),
        Some("3")
    );
    assert_eq!(
        value(r#"weft_lease_apply_seconds_bucket{le="+Inf"}"#),
        Some("4")
    );
    assert_eq!(value("weft_lease_apply_seconds_count"), Some("4"));
    // Kernel mode: no datapath counters to read.
    assert!(!reply.body.contains("weft_datapath_packets_total"));
    server.stop();
}

#[tokio::test]
async fn wrong_paths_methods_and_garbage_get_errors_and_the_server_keeps_serving() {
    let state = Arc::new(AgentState::new());
    let server = server(&state).await;
    let addr = server.local_addr();

    assert_eq!(get(addr, "/").await.status, 404);
    assert_eq!(get(addr, "/healthz/extra").await.status, 404);
    assert_eq!(get(addr, "/../etc/passwd").await.status, 404);
    let post = exchange(addr, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(post.status, 405);
    let allow = post.header("Allow").unwrap_or_default().replace(' ', "");
    assert_eq!(allow, "GET,HEAD");

    let garbage = exchange(addr, b"\x00\x01\x02 \xff\xfe garbage\r\n\r\n").await;
    assert_eq!(garbage.status, 400);

    // A head that never ends is cut off at the limit.
    let endless = format!(
        "GET /metrics HTTP/1.1\r\nX-Junk: {}",
        "a".repeat(4 * MAX_REQUEST_BYTES)
    );
    assert_eq!(exchange(addr, endless.as_bytes()).await.status, 431);

    // Connections that send nothing (or close at once) do not stop others being served,
    // and are closed after the read timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    drop(TcpStream::connect(addr).await.unwrap());
    assert_eq!(get(addr, "/healthz").await.status, 200);
    let started = Instant::now();
    let mut reply = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, idle.read_to_end(&mut reply))
        .await
        .expect("the server closed the idle connection in time")
        .unwrap();
    assert!(started.elapsed() <= READ_TIMEOUT + Duration::from_secs(2));

    assert_eq!(get(addr, "/healthz").await.status, 200, "still serving");
    server.stop();
}

#[tokio::test]
async fn many_idle_and_slow_clients_never_starve_the_probes() {
    let state = Arc::new(AgentState::new());
    let server = server(&state).await;
    let addr = server.local_addr();
    // More idle connections than any fixed connection limit a small server would set,
    // and slow clients that dribble a head one byte at a time.
    let mut held = Vec::new();
    for _ in 0..400 {
        held.push(TcpStream::connect(addr).await.expect("an idle connection"));
    }
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    for round in 0..5 {
        let started = Instant::now();
        let healthz = get(addr, "/healthz").await;
        assert_eq!(healthz.status, 200, "round {round}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {round}: /healthz took {:?} with {} connections held",
            started.elapsed(),
            held.len() + slow.len()
        );
        for stream in &mut slow {
            let _ = stream.write_all(b"a").await;
        }
    }
    drop((held, slow));
    server.stop();
}

#[tokio::test]
async fn a_port_in_use_names_the_flag_and_port_zero_is_off() {
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let state = Arc::new(AgentState::new());
    let error = match health::start(Ipv4Addr::LOCALHOST, port, state.clone()).await {
        Ok(_) => panic!("bound a port that is in use"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("--healthz-port") && error.contains(&port.to_string()),
        "{error}"
    );
    assert!(health::start(Ipv4Addr::LOCALHOST, 0, state)
        .await
        .unwrap()
        .is_none());
}
