//! Traffic between pods, always bounded in time: iperf3 runs, and a TCP stream the
//! harness sends and verifies itself (every byte, in order) while something else happens.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::exec::{wait_until, Cmd};
use crate::icmp::{join_netns_thread, spawn_in_netns};
use crate::lab::{Lab, Pod};
use crate::process::{tail, NetnsProcess};

/// What an iperf3 client reported (`-J`).
#[derive(Debug, Clone)]
pub struct IperfReport {
    pub sent_bytes: u64,
    /// Bytes the server received, as it reported them to the client.
    pub received_bytes: u64,
    /// Receiver-side throughput.
    pub bits_per_second: f64,
    pub retransmits: u64,
    pub seconds: f64,
}

/// Port of iperf3 servers the lab starts.
pub const IPERF_PORT: u16 = 5201;

impl Lab {
    /// Runs iperf3 from `from` to `to` for `seconds` (a one-off server in `to`, the client
    /// in `from`, both bounded), with `client_args` added to the client (e.g. `-R`).
    pub fn iperf3(
        &self,
        from: &Pod,
        to: &Pod,
        seconds: u32,
        client_args: &[&str],
    ) -> Result<IperfReport> {
        self.iperf3_via(from, to, to.ip, seconds, client_args)
    }

    /// Like [`Lab::iperf3`], with the client connecting to `via` (a Service's ClusterIP
    /// whose endpoint is `to`) instead of `to`'s own address.
    pub fn iperf3_via(
        &self,
        from: &Pod,
        to: &Pod,
        via: Ipv4Addr,
        seconds: u32,
        client_args: &[&str],
    ) -> Result<IperfReport> {
        let port = IPERF_PORT.to_string();
        let log = self.dir().join(format!("iperf3-server-{}.log", to.name));
        let server_args: Vec<String> =
            ["iperf3", "-s", "-1", "-B", &to.ip.to_string(), "-p", &port]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let mut server = NetnsProcess::spawn(
            &format!("iperf3 server in {}", to.name),
            &to.ns,
            &server_args,
            &[],
            &log,
        )?;
        wait_listening(&to.ns, IPERF_PORT, Duration::from_secs(10), &mut server)
            .with_context(|| format!("iperf3 server log:\n{}", tail(&log, 10)))?;

        let mut line = vec![
            "iperf3".to_string(),
            "-c".into(),
            via.to_string(),
            "-p".into(),
            port,
            "-t".into(),
            seconds.to_string(),
            "-J".into(),
        ];
        line.extend(client_args.iter().map(|s| s.to_string()));
        let client = Cmd::new(line)
            .netns(&from.ns)
            .timeout(Duration::from_secs(u64::from(seconds) + 20));
        let out = client.output()?;
        // The one-off server ends with the test; it is killed on drop otherwise.
        let _ = wait_until("the iperf3 server to exit", Duration::from_secs(5), || {
            Ok(server.exit_status().is_some())
        });
        let report = parse_iperf3(&out.stdout).with_context(|| {
            format!(
                "`{}` ({}) printed no usable report; stderr: {}; server log:\n{}",
                client.display(),
                out.status,
                out.stderr.trim(),
                tail(&log, 10)
            )
        })?;
        Ok(report)
    }
}

/// Waits until something listens on TCP `port` in `ns` (`ss -ltn`), failing at once if
/// `process` exits.
fn wait_listening(
    ns: &str,
    port: u16,
    timeout: Duration,
    process: &mut NetnsProcess,
) -> Result<()> {
    let filter = format!("sport = :{port}");
    wait_until(
        &format!("a listener on port {port} in {ns}"),
        timeout,
        || {
            if let Some(status) = process.exit_status() {
                bail!("{} exited ({status})", process.name());
            }
            let out = Cmd::new(["ss", "-Hltn", &filter]).netns(ns).run()?;
            Ok(!out.trim().is_empty())
        },
    )
    .map(drop)
}

/// Parses the JSON of `iperf3 -c ... -J`.
pub fn parse_iperf3(json: &str) -> Result<IperfReport> {
    let value: Value = serde_json::from_str(json).context("not JSON")?;
    if let Some(error) = value["error"].as_str() {
        bail!("iperf3 failed: {error}");
    }
    let end = &value["end"];
    let number = |v: &Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("no {what} in the report's end section"))
    };
    Ok(IperfReport {
        sent_bytes: number(&end["sum_sent"]["bytes"], "sum_sent.bytes")? as u64,
        received_bytes: number(&end["sum_received"]["bytes"], "sum_received.bytes")? as u64,
        bits_per_second: number(
            &end["sum_received"]["bits_per_second"],
            "sum_received.bits_per_second",
        )?,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        seconds: number(&end["sum_received"]["seconds"], "sum_received.seconds")?,
    })
}

/// The outcome of a [`TcpFlow`].
#[derive(Debug, Clone)]
pub struct TcpFlowReport {
    pub sent: u64,
    pub received: u64,
    /// Whether every received byte was the one sent at its offset.
    pub intact: bool,
    /// The longest time the receiver waited for data (a stall in the path shows here).
    pub longest_stall: Duration,
    pub elapsed: Duration,
}

impl TcpFlowReport {
    /// All bytes arrived, intact.
    pub fn complete(&self) -> bool {
        self.intact && self.sent == self.received && self.sent > 0
    }
}

/// A TCP stream from one pod to another, sent at a fixed rate by a thread in the sender's
/// namespace and checked byte by byte by a thread in the receiver's.
pub struct TcpFlow {
    stop: Arc<AtomicBool>,
    from_ns: String,
    to_ns: String,
    sender: Option<JoinHandle<Result<u64>>>,
    receiver: Option<JoinHandle<Result<Received>>>,
    started: Instant,
}

struct Received {
    bytes: u64,
    intact: bool,
    longest_stall: Duration,
}

/// Byte `i` of a stream is `i % PATTERN_PERIOD` (a prime, so chunk edges never line up).
const PATTERN_PERIOD: usize = 251;
const CHUNK: usize = 64 * 1024;
/// Longest a read or write may block before the flow counts as broken.
const IO_LIMIT: Duration = Duration::from_secs(10);

fn pattern() -> Vec<u8> {
    (0..CHUNK + PATTERN_PERIOD)
        .map(|i| (i % PATTERN_PERIOD) as u8)
        .collect()
}

/// The pattern bytes from stream offset `offset` on (at most `CHUNK`).
fn pattern_at(pattern: &[u8], offset: u64, len: usize) -> &[u8] {
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    &pattern[start..start + len.min(CHUNK)]
}

impl TcpFlow {
    /// Connects `from` to `to` (on `to.ip:port`) and sends `rate` bytes per second until
    /// [`TcpFlow::finish`] or `max` has passed.
    pub fn start(from: &Pod, to: &Pod, port: u16, rate: u64, max: Duration) -> Result<TcpFlow> {
        let address = SocketAddr::from((to.ip, port));
        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = spawn_in_netns(&to.ns, move || receive_stream(address, ready_tx, max));
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => {}
            Err(_) => {
                let why = join_netns_thread(&to.ns, receiver)
                    .err()
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_default();
                bail!("the TCP receiver in {} did not start: {why}", to.name);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sender = spawn_in_netns(&from.ns, move || send_stream(address, rate, max, &flag));
        Ok(TcpFlow {
            stop,
            from_ns: from.ns.clone(),
            to_ns: to.ns.clone(),
            sender: Some(sender),
            receiver: Some(receiver),
            started: Instant::now(),
        })
    }

    /// Stops sending, waits until the receiver has read everything (or failed), and
    /// reports. An error means the connection broke or stalled for 10 s.
    pub fn finish(self) -> Result<TcpFlowReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.run_out()
    }

    /// Waits until the sender has sent for its `max` and the receiver has read everything
    /// (or either failed), and reports: a stream of a planned length.
    pub fn run_out(mut self) -> Result<TcpFlowReport> {
        let sender = self.sender.take().expect("finished once");
        let receiver = self.receiver.take().expect("finished once");
        let sent = join_netns_thread(&self.from_ns, sender).context("the TCP sender")?;
        let received = join_netns_thread(&self.to_ns, receiver).context("the TCP receiver")?;
        Ok(TcpFlowReport {
            sent,
            received: received.bytes,
            intact: received.intact,
            longest_stall: received.longest_stall,
            elapsed: self.started.elapsed(),
        })
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Both threads end by themselves within their I/O limits.
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

fn send_stream(address: SocketAddr, rate: u64, max: Duration, stop: &AtomicBool) -> Result<u64> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_write_timeout(Some(IO_LIMIT))?;
    let pattern = pattern();
    let start = Instant::now();
    let mut sent: u64 = 0;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < max {
        let allowed = (rate as f64 * start.elapsed().as_secs_f64()) as u64;
        if sent >= allowed {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let len = (allowed - sent).min(CHUNK as u64) as usize;
        let n = stream
            .write(pattern_at(&pattern, sent, len))
            .with_context(|| format!("sending to {address} after {sent} bytes"))?;
        sent += n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .with_context(|| format!("closing the stream to {address} after {sent} bytes"))?;
    Ok(sent)
}

fn receive_stream(address: SocketAddr, ready: mpsc::Sender<()>, max: Duration) -> Result<Received> {
    let listener = TcpListener::bind(address).with_context(|| format!("listening on {address}"))?;
    listener.set_nonblocking(true)?;
    let _ = ready.send(());
    let accept_deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < accept_deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e).context(format!("accepting on {address}")),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_LIMIT))?;
    let pattern = pattern();
    let deadline = Instant::now() + max + IO_LIMIT * 2;
    let mut buf = vec![0u8; CHUNK];
    let (mut bytes, mut intact, mut longest_stall) = (0u64, true, Duration::ZERO);
    let mut last_data = Instant::now();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).context(format!(
                    "receiving on {address} after {bytes} bytes (the stream stalled or broke)"
                ))
            }
        };
        longest_stall = longest_stall.max(last_data.elapsed());
        last_data = Instant::now();
        intact &= buf[..n] == *pattern_at(&pattern, bytes, n);
        bytes += n as u64;
        if Instant::now() > deadline {
            bail!("the stream on {address} ran past its bound ({bytes} bytes)");
        }
    }
    Ok(Received {
        bytes,
        intact,
        longest_stall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_slices_continue_across_chunks() {
        let pattern = pattern();
        let first = pattern_at(&pattern, 0, 1000).to_vec();
        let second = pattern_at(&pattern, 1000, 1000);
        let whole: Vec<u8> = (0..2000).map(|i| (i % PATTERN_PERIOD) as u8).collect();
        assert_eq!([first.as_slice(), second].concat(), whole);
        assert_eq!(pattern_at(&pattern, 250, CHUNK * 2).len(), CHUNK);
    }

    #[test]
    fn reads_an_iperf3_report() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bytes":1000,"retransmits":3,"seconds":3.0},
            "sum_received":{"bytes":990,"bits_per_second":2640.0,"seconds":3.0}}}"#;
        let report = parse_iperf3(json).unwrap();
        assert_eq!(
            (report.sent_bytes, report.received_bytes, report.retransmits),
            (1000, 990, 3)
        );
        assert!(
            parse_iperf3(r#"{"start":{},"end":{},"error":"unable to connect"}"#)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
    }
}

/// The kernel's TCP counters of namespace `ns` (`nstat -asz`: absolute values by name, history file untouched).
pub fn tcp_counters(ns: &str) -> Result<BTreeMap<String, u64>> {
    let out = Cmd::new(["nstat", "-asz", "--json"]).netns(ns).run()?;
    let json: serde_json::Value = serde_json::from_str(&out).context("nstat --json")?;
    let mut counters = BTreeMap::new();
    for (_, group) in json.as_object().into_iter().flatten() {
        for (name, value) in group.as_object().into_iter().flatten() {
            if let Some(n) = value.as_u64() {
                counters.insert(name.clone(), n);
            }
        }
    }
    Ok(counters)
}

/// What a TCP sender's retransmissions were, from its counters' growth (`nstat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retransmits {
    /// Segments sent again (TcpRetransSegs).
    pub segments: u64,
    /// Retransmissions the receiver reported as needless, with a D-SACK (TCPDSACKRecv):
    /// the original had arrived, late or reordered.
    pub spurious: u64,
    /// Times the sender detected reordering (TCPSACKReorder, TCPTSReorder, TCPRenoReorder).
    pub reordering: u64,
    /// Retransmission timeouts (TCPTimeouts): real loss, or a path that stalled.
    pub timeouts: u64,
    /// Retransmissions that were themselves lost (TCPLostRetransmit).
    pub lost_retransmits: u64,
}

impl Retransmits {
    /// The growth from `before` to `after`.
    pub fn between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Self {
        let grew = |name: &str| {
            after
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(name).copied().unwrap_or(0))
        };
        Retransmits {
            segments: grew("TcpRetransSegs"),
            spurious: grew("TcpExtTCPDSACKRecv"),
            reordering: grew("TcpExtTCPSACKReorder")
                + grew("TcpExtTCPTSReorder")
                + grew("TcpExtTCPRenoReorder"),
            timeouts: grew("TcpExtTCPTimeouts"),
            lost_retransmits: grew("TcpExtTCPLostRetransmit"),
        }
    }

    pub fn add(&mut self, other: Retransmits) {
        self.segments += other.segments;
        self.spurious += other.spurious;
        self.reordering += other.reordering;
        self.timeouts += other.timeouts;
        self.lost_retransmits += other.lost_retransmits;
    }
}
