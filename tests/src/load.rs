//! sockperf TCP ping-pong between pods, for the benchmark (iperf3 runs are the harness's
//! [`Lab::iperf3`](crate::lab::Lab::iperf3)). The server runs in the server pod and is
//! stopped by PID when the run ends; the client is bounded in time.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::exec::{wait_until, Cmd};
use crate::lab::{Lab, Pod};
use crate::process::{tail, NetnsProcess};

/// Port of the sockperf servers.
pub const SOCKPERF_PORT: u16 = 11111;
/// Slack the client gets beyond its test duration (connect, warm-up, report).
const CLIENT_SLACK: Duration = Duration::from_secs(20);

/// One sockperf ping-pong run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingPong {
    /// Round trips (one request, one reply) per second over the measured period.
    pub rate: f64,
    /// Round-trip times in microseconds.
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl PingPong {
    /// Parses what `sockperf ping-pong --full-rtt` prints (stdout and stderr). The rate is
    /// `ReceivedMessages / RunTime` of the "[Valid Duration]" line: sockperf's measured
    /// period, without its warm-up. It matches 1e6 / avg-latency (one message in flight).
    pub fn parse(out: &str) -> Result<Self> {
        let text = strip_ansi(out);
        let valid = text
            .lines()
            .find(|l| l.contains("[Valid Duration]"))
            .context("sockperf printed no [Valid Duration] line")?;
        let run_time = field_after(valid, "RunTime=").context("no RunTime in [Valid Duration]")?;
        let received = field_after(valid, "ReceivedMessages=")
            .context("no ReceivedMessages in [Valid Duration]")?;
        if run_time <= 0.0 || received <= 0.0 {
            bail!("sockperf measured nothing: {valid}");
        }
        let avg_us = text
            .lines()
            .find_map(|l| field_after(l, "avg-rtt="))
            .or_else(|| text.lines().find_map(|l| field_after(l, "avg-latency=")))
            .context("sockperf printed no average")?;
        let percentile = |p: &str| {
            let marker = format!("percentile {p} =");
            text.lines()
                .find_map(|l| field_after(l, &marker))
                .with_context(|| format!("sockperf printed no {p} percentile"))
        };
        Ok(PingPong {
            rate: received / run_time,
            avg_us,
            p50_us: percentile("50.000")?,
            p99_us: percentile("99.000")?,
        })
    }
}

/// The number that follows `marker` in `line` (spaces skipped).
fn field_after(line: &str, marker: &str) -> Option<f64> {
    let rest = line.split_once(marker)?.1.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Removes terminal colour sequences (`ESC [ ... m`), which sockperf prints.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// TCP ping-pong for `seconds` from pod `from` to a sockperf server started in pod `to`.
pub fn sockperf(lab: &Lab, from: &Pod, to: &Pod, seconds: u32) -> Result<PingPong> {
    sockperf_via(lab, from, to, to.ip, seconds)
}

/// Like [`sockperf`], with the client connecting to `via` (a Service's ClusterIP whose
/// endpoint is `to`).
pub fn sockperf_via(
    lab: &Lab,
    from: &Pod,
    to: &Pod,
    via: std::net::Ipv4Addr,
    seconds: u32,
) -> Result<PingPong> {
    let ip = to.ip.to_string();
    let port = SOCKPERF_PORT.to_string();
    let log = lab.dir().join(format!("sockperf-server-{}.log", to.name));
    let server_args: Vec<String> = ["sockperf", "server", "--tcp", "-i", &ip, "-p", &port]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Stopped (SIGTERM, then SIGKILL) when dropped at the end of this function.
    let mut server = NetnsProcess::spawn(
        &format!("sockperf server in {}", to.name),
        &to.ns,
        &server_args,
        &[],
        &log,
    )?;
    let listening = format!("sport = :{SOCKPERF_PORT}");
    wait_until(
        &format!("sockperf to listen on {ip}:{port}"),
        Duration::from_secs(10),
        || {
            if let Some(status) = server.exit_status() {
                bail!("the sockperf server exited ({status})");
            }
            let out = Cmd::new(["ss", "-Hltn", &listening]).netns(&to.ns).run()?;
            Ok(!out.trim().is_empty())
        },
    )
    .with_context(|| format!("sockperf server log:\n{}", tail(&log, 10)))?;
    let client = Cmd::new([
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &via.to_string(),
        "-p",
        &port,
        "-t",
        &seconds.to_string(),
        "--full-rtt",
    ])
    .netns(&from.ns)
    .timeout(Duration::from_secs(u64::from(seconds)) + CLIENT_SLACK);
    let out = client.output()?;
    let all = format!("{}\n{}", out.stdout, out.stderr);
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}\nserver log:\n{}",
            client.display(),
            out.status,
            all.trim(),
            tail(&log, 10)
        );
    }
    PingPong::parse(&all)
        .with_context(|| format!("`{}` printed:\n{}", client.display(), all.trim()))
}

/// Median, minimum and maximum of `values` (not empty).
pub fn summary(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64, f64)> {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some((median, values[0], values[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Output of sockperf 3.7 with --full-rtt, colour sequences included.
    const SOCKPERF: &str = "\
sockperf: \u{1b}[2;35m== version #3.7-no.git == \u{1b}[0m
sockperf: [Total Run] RunTime=10.000 sec; Warm up time=400 msec; SentMessages=301000; ReceivedMessages=300999
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=9.550 sec; SentMessages=286500; ReceivedMessages=286500
sockperf: \u{1b}[2;35m====> avg-rtt=33.331 (std-dev=4.708)\u{1b}[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 33.331 usec
sockperf: \u{1b}[2;35mTotal 286500 observations\u{1b}[0m; each percentile contains 2865.00 observations
sockperf: ---> <MAX> observation = 1699.329
sockperf: ---> percentile 99.999 = 1467.456
sockperf: ---> percentile 99.000 =   52.489
sockperf: ---> percentile 90.000 =   37.475
sockperf: ---> percentile 50.000 =   31.531
sockperf: ---> <MIN> observation =   20.205
";

    #[test]
    fn parses_sockperf_ping_pong() {
        let pp = PingPong::parse(SOCKPERF).unwrap();
        assert!((pp.rate - 30_000.0).abs() < 1e-6, "{pp:?}");
        assert_eq!((pp.avg_us, pp.p50_us, pp.p99_us), (33.331, 31.531, 52.489));
        assert!(PingPong::parse("sockperf: ERROR: connect failed").is_err());
        let nothing = SOCKPERF.replace("ReceivedMessages=286500", "ReceivedMessages=0");
        assert!(PingPong::parse(&nothing).is_err());
    }

    #[test]
    fn strips_colour_sequences() {
        assert_eq!(strip_ansi("a\u{1b}[2;35mb\u{1b}[0mc"), "abc");
        assert_eq!(field_after("x avg-rtt=12.5 (std", "avg-rtt="), Some(12.5));
        assert_eq!(
            field_after("percentile 50.000 =   7.25", "percentile 50.000 ="),
            Some(7.25)
        );
    }
}
