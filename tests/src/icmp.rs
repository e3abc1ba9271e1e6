//! ICMP echo from inside a network namespace, without the `ping` binary (not installed on
//! every test machine): a fresh thread joins the namespace with setns(2) and uses a raw
//! ICMP socket, so timing is exact and nothing else is spawned. Besides plain pings:
//! sized probes with DF that report the ICMP error they get ([`probe`]), and a paced
//! flood that reports every lost echo ([`Flood`]).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const PAYLOAD_LEN: usize = 56;

/// Echo identifiers: raw sockets in one namespace see every ICMP reply, so concurrent
/// pings tell theirs apart by identifier.
static NEXT_ID: AtomicU16 = AtomicU16::new(0);

fn next_id() -> u16 {
    (std::process::id() as u16)
        .wrapping_mul(7919)
        .wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// Runs `work` on a new thread that has joined network namespace `ns` (a name under
/// /var/run/netns). The thread ends with `work`, so no other code runs in the namespace.
pub fn in_netns<T, F>(ns: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    join_netns_thread(ns, spawn_in_netns(ns, work))
}

/// Like [`in_netns`], but returns at once: join the handle (see [`join_netns_thread`]) for
/// the result. `work` must end by itself (bound it in time).
pub fn spawn_in_netns<T, F>(ns: &str, work: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({path}): {}", std::io::Error::last_os_error());
        }
        work()
    })
}

/// The result of a thread from [`spawn_in_netns`] (a panic becomes an error).
pub fn join_netns_thread<T>(ns: &str, handle: JoinHandle<Result<T>>) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
}

/// Sends up to `count` echo requests from namespace `ns` to `dst`, each waiting up to
/// `wait` for its reply (like `ping -c count -W wait`, stopping at the first reply).
/// Returns the round-trip time of the first reply, or None if none came.
pub fn ping(ns: &str, dst: Ipv4Addr, count: u32, wait: Duration) -> Result<Option<Duration>> {
    in_netns(ns, move || ping_here(dst, count, wait))
}

fn ping_here(dst: Ipv4Addr, count: u32, wait: Duration) -> Result<Option<Duration>> {
    let socket = raw_icmp_socket()?;
    let id = next_id();
    for seq in 1..=count as u16 {
        let sent = Instant::now();
        send_or_lose(&socket, dst, &echo_request(id, seq, PAYLOAD_LEN))?;
        let deadline = sent + wait;
        while let Some(packet) = receive(&socket, deadline)? {
            if parse(&packet) == Some(Icmp::EchoReply { from: dst, id, seq }) {
                return Ok(Some(sent.elapsed()));
            }
        }
    }
    Ok(None)
}

/// What came of one echo request sent by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The echo reply, after this round-trip time.
    Reply(Duration),
    /// An ICMP error about the request, sent by `from`.
    Error {
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        /// The next-hop MTU of a "fragmentation needed" (type 3 code 4), else 0.
        next_hop_mtu: u16,
    },
    /// The local stack refused to send it (with DF: larger than the route's MTU).
    NotSent(String),
    /// Nothing came back in time.
    NoAnswer,
}

impl ProbeOutcome {
    /// Whether this is ICMP "fragmentation needed" announcing `mtu`.
    pub fn is_frag_needed(&self, mtu: u16) -> bool {
        matches!(self, ProbeOutcome::Error { icmp_type: ICMP_DEST_UNREACH, code: ICMP_FRAG_NEEDED, next_hop_mtu, .. } if *next_hop_mtu == mtu)
    }
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_HEADER_LEN: usize = 8;

/// Sends one echo request with `payload_len` bytes of payload (the IP packet is 28 bytes
/// more) from namespace `ns` to `dst`, with the DF bit set if `dont_fragment` (ignoring any
/// path MTU the namespace learned, like `ping -M probe`), and reports what came back
/// within `wait`: the reply, an ICMP error about it, or nothing.
pub fn probe(
    ns: &str,
    dst: Ipv4Addr,
    payload_len: usize,
    dont_fragment: bool,
    wait: Duration,
) -> Result<ProbeOutcome> {
    in_netns(ns, move || {
        let socket = raw_icmp_socket()?;
        let mode = if dont_fragment {
            libc::IP_PMTUDISC_PROBE
        } else {
            libc::IP_PMTUDISC_DONT
        };
        set_int_option(&socket, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, mode)?;
        let (id, seq) = (next_id(), 1);
        let sent = Instant::now();
        if let Err(e) = send_to(&socket, dst, &echo_request(id, seq, payload_len)) {
            return Ok(ProbeOutcome::NotSent(e.to_string()));
        }
        while let Some(packet) = receive(&socket, sent + wait)? {
            match parse(&packet) {
                Some(Icmp::EchoReply {
                    from,
                    id: i,
                    seq: s,
                }) if from == dst && i == id && s == seq => {
                    return Ok(ProbeOutcome::Reply(sent.elapsed()));
                }
                Some(Icmp::Error {
                    from,
                    icmp_type,
                    code,
                    next_hop_mtu,
                    about,
                }) if about == (dst, id, seq) => {
                    return Ok(ProbeOutcome::Error {
                        from,
                        icmp_type,
                        code,
                        next_hop_mtu,
                    })
                }
                _ => {}
            }
        }
        Ok(ProbeOutcome::NoAnswer)
    })
}

/// The result of a [`Flood`].
#[derive(Debug, Clone)]
pub struct FloodReport {
    /// Echo requests handed to the socket (sequence numbers 1..=sent).
    pub sent: u16,
    pub replies: u16,
    /// Sequence numbers without a reply (failed sends included).
    pub missing: Vec<u16>,
    /// Sends the local stack refused, with the first error.
    pub send_errors: u32,
    pub first_send_error: Option<String>,
    pub max_rtt: Duration,
    /// From the first request to the end of the wait for the last reply.
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn lost(&self) -> usize {
        self.missing.len()
    }

    /// The missing sequence numbers as ranges, e.g. `"17-40, 99"`.
    pub fn missing_ranges(&self) -> String {
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for &seq in &self.missing {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == seq => *end = seq,
                _ => ranges.push((seq, seq)),
            }
        }
        ranges
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} echoes sent, {} replies, {} lost [{}], {} send errors{}, max RTT {:?}, {:?}",
            self.sent,
            self.replies,
            self.lost(),
            self.missing_ranges(),
            self.send_errors,
            self.first_send_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            self.max_rtt,
            self.elapsed
        )
    }
}

/// A bounded ping flood running in the background: echo requests at a fixed interval,
/// replies collected as they come, so that a gap in connectivity shows as missing
/// sequence numbers.
pub struct Flood {
    ns: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<FloodReport>>>,
}

/// How long a flood waits for the replies to its last requests.
const FLOOD_FINAL_WAIT: Duration = Duration::from_secs(1);

impl Flood {
    /// Starts sending `count` (at most 65535) echo requests from namespace `ns` to `dst`,
    /// one every `interval` (a late sender catches up), 56 bytes of payload each.
    pub fn start(ns: &str, dst: Ipv4Addr, count: u16, interval: Duration) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = spawn_in_netns(ns, move || flood_here(dst, count, interval, &flag));
        Flood {
            ns: ns.to_string(),
            stop,
            handle: Some(handle),
        }
    }

    /// Waits until every request was sent and answered (or given up on).
    pub fn wait(mut self) -> Result<FloodReport> {
        let handle = self.handle.take().expect("a flood is joined once");
        join_netns_thread(&self.ns, handle)
    }

    /// Stops sending now, then waits for the replies to what was sent.
    pub fn stop(self) -> Result<FloodReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Book-keeping of a flood: when each request left, which got a reply.
struct FloodState {
    dst: Ipv4Addr,
    id: u16,
    /// Send time of sequence number i + 1 (None: the send failed).
    sent_at: Vec<Option<Instant>>,
    replied: Vec<bool>,
    replies: u16,
    max_rtt: Duration,
}

impl FloodState {
    fn collect(&mut self, packet: &[u8]) {
        let Some(Icmp::EchoReply { from, id, seq }) = parse(packet) else {
            return;
        };
        let index = usize::from(seq);
        if from != self.dst || id != self.id || index == 0 || index > self.sent_at.len() {
            return;
        }
        if !std::mem::replace(&mut self.replied[index - 1], true) {
            self.replies += 1;
            if let Some(at) = self.sent_at[index - 1] {
                self.max_rtt = self.max_rtt.max(at.elapsed());
            }
        }
    }
}

fn flood_here(
    dst: Ipv4Addr,
    count: u16,
    interval: Duration,
    stop: &AtomicBool,
) -> Result<FloodReport> {
    let socket = raw_icmp_socket()?;
    // Room for every reply of a stall of several seconds.
    set_int_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20)?;
    let mut state = FloodState {
        dst,
        id: next_id(),
        sent_at: Vec::with_capacity(usize::from(count)),
        replied: vec![false; usize::from(count)],
        replies: 0,
        max_rtt: Duration::ZERO,
    };
    let (mut send_errors, mut first_send_error) = (0u32, None);
    let start = Instant::now();
    for seq in 1..=count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + interval * u32::from(seq - 1);
        while let Some(packet) = receive(&socket, due)? {
            state.collect(&packet);
        }
        match send_to(&socket, dst, &echo_request(state.id, seq, PAYLOAD_LEN)) {
            Ok(()) => state.sent_at.push(Some(Instant::now())),
            Err(e) => {
                send_errors += 1;
                first_send_error.get_or_insert_with(|| format!("seq {seq}: {e}"));
                state.sent_at.push(None);
            }
        }
    }
    let sent = state.sent_at.len() as u16;
    let deadline = Instant::now() + FLOOD_FINAL_WAIT;
    while state.replies < sent {
        match receive(&socket, deadline)? {
            Some(packet) => state.collect(&packet),
            None => break,
        }
    }
    let missing = (1..=sent)
        .filter(|&seq| !state.replied[usize::from(seq) - 1])
        .collect();
    Ok(FloodReport {
        sent,
        replies: state.replies,
        missing,
        send_errors,
        first_send_error,
        max_rtt: state.max_rtt,
        elapsed: start.elapsed(),
    })
}

fn raw_icmp_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if raw < 0 {
        bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh valid fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn set_int_option(socket: &OwnedFd, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: the option value is a valid int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {name}, {value}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// An echo request with `payload_len` bytes of payload, checksummed.
fn echo_request(id: u16, seq: u16, payload_len: usize) -> Vec<u8> {
    let mut packet = vec![0u8; ICMP_HEADER_LEN + payload_len];
    packet[0] = ICMP_ECHO_REQUEST;
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, byte) in packet[ICMP_HEADER_LEN..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

fn send_to(socket: &OwnedFd, dst: Ipv4Addr, packet: &[u8]) -> std::io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the buffer and address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends like `ping`: no route / unreachable loses the echo (the caller sees no reply).
fn send_or_lose(socket: &OwnedFd, dst: Ipv4Addr, packet: &[u8]) -> Result<()> {
    match send_to(socket, dst, packet) {
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)
            ) =>
        {
            bail!("sendto {dst}: {e}")
        }
        _ => Ok(()),
    }
}

/// The next ICMP packet (with its IP header) the socket receives before `deadline`.
fn receive(socket: &OwnedFd, deadline: Instant) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let timeout_ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pollfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll: {err}");
        }
        if ready == 0 {
            continue;
        }
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(Some(buf[..n as usize].to_vec()));
        }
    }
}

/// An ICMP message as a raw socket delivers it (IP header first).
#[derive(Debug, PartialEq, Eq)]
enum Icmp {
    EchoReply {
        from: Ipv4Addr,
        id: u16,
        seq: u16,
    },
    Error {
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        next_hop_mtu: u16,
        /// (destination, echo id, echo seq) of the echo request the error is about.
        about: (Ipv4Addr, u16, u16),
    },
}

const ICMP_ERROR_TYPES: [u8; 4] = [3, 4, 5, 11];

fn parse(packet: &[u8]) -> Option<Icmp> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    let from = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(header_len..header_len + ICMP_HEADER_LEN)?;
    let word = |at: usize| u16::from_be_bytes([icmp[at], icmp[at + 1]]);
    match icmp[0] {
        ICMP_ECHO_REPLY => Some(Icmp::EchoReply {
            from,
            id: word(4),
            seq: word(6),
        }),
        icmp_type if ICMP_ERROR_TYPES.contains(&icmp_type) => {
            // The error quotes the offending IP header and the first 8 bytes after it.
            let quoted = packet.get(header_len + ICMP_HEADER_LEN..)?;
            let quoted_header_len = usize::from(quoted.first()? & 0x0f) * 4;
            let dst = Ipv4Addr::new(
                *quoted.get(16)?,
                *quoted.get(17)?,
                *quoted.get(18)?,
                *quoted.get(19)?,
            );
            let echo = quoted.get(quoted_header_len..quoted_header_len + ICMP_HEADER_LEN)?;
            if echo[0] != ICMP_ECHO_REQUEST {
                return None;
            }
            Some(Icmp::Error {
                from,
                icmp_type,
                code: icmp[1],
                next_hop_mtu: if icmp_type == ICMP_DEST_UNREACH && icmp[1] == ICMP_FRAG_NEEDED {
                    word(6)
                } else {
                    0
                },
                about: (
                    dst,
                    u16::from_be_bytes([echo[4], echo[5]]),
                    u16::from_be_bytes([echo[6], echo[7]]),
                ),
            })
        }
        _ => None,
    }
}

pub(crate) fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_echo_request() {
        // Echo request id 1 seq 1, no payload: 0x0800 + 0x0001 + 0x0001 -> !0x0802.
        let packet = [8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(internet_checksum(&packet), !0x0802);
    }

    #[test]
    fn parses_echo_replies() {
        let mut packet = vec![0x45u8; 28];
        packet[12..16].copy_from_slice(&[10, 0, 0, 1]);
        packet[20] = ICMP_ECHO_REPLY;
        packet[24..26].copy_from_slice(&7u16.to_be_bytes());
        packet[26..28].copy_from_slice(&3u16.to_be_bytes());
        let from = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(
            parse(&packet),
            Some(Icmp::EchoReply {
                from,
                id: 7,
                seq: 3
            })
        );
        packet[20] = ICMP_ECHO_REQUEST;
        assert_eq!(parse(&packet), None);
        assert_eq!(parse(&packet[..24]), None);
    }

    #[test]
    fn parses_fragmentation_needed_about_an_echo() {
        // Outer IP (from the router 10.244.1.1), ICMP 3/4 with MTU 1450, then the quoted
        // IP header (to 10.244.2.2) and the first 8 bytes of the echo request.
        let mut packet = vec![0u8; 20 + 8 + 20 + 8];
        packet[0] = 0x45;
        packet[12..16].copy_from_slice(&[10, 244, 1, 1]);
        packet[20] = ICMP_DEST_UNREACH;
        packet[21] = ICMP_FRAG_NEEDED;
        packet[26..28].copy_from_slice(&1450u16.to_be_bytes());
        packet[28] = 0x45;
        packet[44..48].copy_from_slice(&[10, 244, 2, 2]);
        packet[48..56].copy_from_slice(&echo_request(0x1234, 1, 0));
        let from = Ipv4Addr::new(10, 244, 1, 1);
        let error = parse(&packet).expect("an ICMP error");
        assert_eq!(
            error,
            Icmp::Error {
                from,
                icmp_type: 3,
                code: 4,
                next_hop_mtu: 1450,
                about: (Ipv4Addr::new(10, 244, 2, 2), 0x1234, 1),
            }
        );
        let outcome = ProbeOutcome::Error {
            from,
            icmp_type: 3,
            code: 4,
            next_hop_mtu: 1450,
        };
        assert!(outcome.is_frag_needed(1450));
        assert!(!outcome.is_frag_needed(1400));
    }

    #[test]
    fn echo_requests_have_the_asked_size_and_a_valid_checksum() {
        let packet = echo_request(1, 2, 1422);
        assert_eq!(packet.len(), 1430);
        assert_eq!(internet_checksum(&packet), 0);
    }

    #[test]
    fn missing_sequence_numbers_print_as_ranges() {
        let report = FloodReport {
            sent: 100,
            replies: 95,
            missing: vec![3, 17, 18, 19, 40, 41],
            send_errors: 0,
            first_send_error: None,
            max_rtt: Duration::ZERO,
            elapsed: Duration::ZERO,
        };
        assert_eq!(report.missing_ranges(), "3, 17-19, 40-41");
        assert_eq!(report.lost(), 6);
    }
}
