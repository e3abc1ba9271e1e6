//! ICMP echo from inside a network namespace, without the `ping` binary (not installed on
//! the test machines): a fresh thread joins the namespace with setns(2) and uses a raw
//! ICMP socket, so timing is exact and nothing else is spawned.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
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
    let path = format!("/var/run/netns/{ns}");
    let handle = std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({path}): {}", std::io::Error::last_os_error());
        }
        work()
    });
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
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if raw < 0 {
        bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh valid fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let id = next_id();
    for seq in 1..=count as u16 {
        let sent = Instant::now();
        send_echo(&socket, dst, id, seq)?;
        if wait_for_reply(&socket, dst, id, seq, sent + wait)? {
            return Ok(Some(sent.elapsed()));
        }
    }
    Ok(None)
}

fn send_echo(socket: &OwnedFd, dst: Ipv4Addr, id: u16, seq: u16) -> Result<()> {
    let mut packet = [0u8; 8 + PAYLOAD_LEN];
    packet[0] = ICMP_ECHO_REQUEST;
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, byte) in packet[8..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
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
        let err = std::io::Error::last_os_error();
        // No route / unreachable: the echo is lost, as with ping; the caller sees no reply.
        if matches!(
            err.raw_os_error(),
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)
        ) {
            return Ok(());
        }
        bail!("sendto {dst}: {err}");
    }
    Ok(())
}

/// Reads ICMP packets until the echo reply (`id`, `seq`) from `dst` arrives or `deadline`.
fn wait_for_reply(
    socket: &OwnedFd,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    deadline: Instant,
) -> Result<bool> {
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
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
        if n < 0 {
            continue;
        }
        if is_echo_reply(&buf[..n as usize], dst, id, seq) {
            return Ok(true);
        }
    }
}

/// A raw IPv4 socket delivers the IP header too.
fn is_echo_reply(packet: &[u8], dst: Ipv4Addr, id: u16, seq: u16) -> bool {
    if packet.len() < 20 {
        return false;
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let Some(icmp) = packet.get(header_len..header_len + 8) else {
        return false;
    };
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    source == dst
        && icmp[0] == ICMP_ECHO_REPLY
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

fn internet_checksum(data: &[u8]) -> u16 {
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
    fn recognises_only_the_matching_reply() {
        let mut packet = vec![0x45u8; 28];
        packet[12..16].copy_from_slice(&[10, 0, 0, 1]);
        packet[20] = ICMP_ECHO_REPLY;
        packet[24..26].copy_from_slice(&7u16.to_be_bytes());
        packet[26..28].copy_from_slice(&3u16.to_be_bytes());
        let from = Ipv4Addr::new(10, 0, 0, 1);
        assert!(is_echo_reply(&packet, from, 7, 3));
        assert!(!is_echo_reply(&packet, from, 8, 3));
        assert!(!is_echo_reply(&packet, from, 7, 4));
        assert!(!is_echo_reply(&packet, Ipv4Addr::new(10, 0, 0, 2), 7, 3));
    }
}
