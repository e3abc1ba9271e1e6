//! Hand-built packets: VXLAN payloads carrying a UDP datagram (what a host on the
//! underlay would send to inject traffic into a pod), and bounded UDP send/receive from
//! inside a namespace.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::icmp::{in_netns, internet_checksum, join_netns_thread, spawn_in_netns};

/// A MAC address from `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{text} is not a MAC address"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{text} is not a MAC address"))
}

/// The frame inside a VXLAN packet: Ethernet, IPv4, UDP, payload.
#[derive(Debug, Clone)]
pub struct InnerUdp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

const VXLAN_FLAG_VNI: u8 = 0x08;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;

/// The UDP payload of a VXLAN packet (RFC 7348): the VXLAN header with `vni`, then the
/// inner Ethernet frame carrying `inner` (IPv4 header checksummed, UDP checksum 0).
pub fn vxlan_payload(vni: u32, inner: &InnerUdp) -> Result<Vec<u8>> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (inner.src, inner.dst) else {
        bail!("the inner datagram must be IPv4");
    };
    let udp_len = 8 + inner.payload.len();
    let ip_len = 20 + udp_len;
    let mut out = Vec::with_capacity(8 + 14 + ip_len);
    out.extend_from_slice(&[VXLAN_FLAG_VNI, 0, 0, 0]);
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(&inner.dst_mac);
    out.extend_from_slice(&inner.src_mac);
    out.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let checksum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&inner.payload);
    Ok(out)
}

/// Sends `payload` `count` times, `interval` apart, as UDP datagrams from namespace `ns`
/// to `dst`. Returns how many the socket accepted.
pub fn send_udp(
    ns: &str,
    dst: SocketAddr,
    payload: Vec<u8>,
    count: u32,
    interval: Duration,
) -> Result<u32> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
        let mut sent = 0;
        for _ in 0..count {
            socket
                .send_to(&payload, dst)
                .with_context(|| format!("sending to {dst}"))?;
            sent += 1;
            std::thread::sleep(interval);
        }
        Ok(sent)
    })
}

/// Sends `payload` `count` times, `interval` apart, as UDP datagrams from namespace `ns`
/// whose IPv4 source is `src` whatever the namespace's addresses are (a raw socket writes
/// the header): what a host on the underlay forging another node's address sends.
pub fn send_forged_udp(
    ns: &str,
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
    count: u32,
    interval: Duration,
) -> Result<u32> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        bail!("forged datagrams are IPv4");
    };
    let udp_len = 8 + payload.len();
    let mut packet = vec![0u8; 20 + udp_len];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = IPPROTO_UDP;
    packet[12..16].copy_from_slice(&src.ip().octets());
    packet[16..20].copy_from_slice(&dst.ip().octets());
    let checksum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet[20..22].copy_from_slice(&src.port().to_be_bytes());
    packet[22..24].copy_from_slice(&dst.port().to_be_bytes());
    packet[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    packet[28..].copy_from_slice(&payload);
    in_netns(ns, move || {
        // SAFETY: plain socket(2) call; IPPROTO_RAW implies IP_HDRINCL.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a raw socket");
        }
        // SAFETY: `fd` was just opened and is owned here.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let mut sent = 0;
        for _ in 0..count {
            // SAFETY: the buffer and address outlive the call; sizes are theirs.
            let n = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error()).context(format!("sending to {dst}"));
            }
            sent += 1;
            std::thread::sleep(interval);
        }
        Ok(sent)
    })
}

/// A UDP socket bound in a namespace, collecting every datagram until a deadline.
pub struct UdpReceiver {
    ns: String,
    handle: Option<JoinHandle<Result<Vec<Vec<u8>>>>>,
}

impl UdpReceiver {
    /// Binds `bind` in namespace `ns` and collects datagrams for `duration`; returns once
    /// the socket is bound.
    pub fn start(ns: &str, bind: SocketAddr, duration: Duration) -> Result<UdpReceiver> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = spawn_in_netns(ns, move || {
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            let _ = ready_tx.send(());
            let deadline = Instant::now() + duration;
            let mut received = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(received);
                }
                socket.set_read_timeout(Some(left))?;
                match socket.recv_from(&mut buf) {
                    Ok((n, _)) => received.push(buf[..n].to_vec()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(e).context(format!("receiving on {bind}")),
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let why = join_netns_thread(ns, handle)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            bail!("the UDP receiver on {bind} in {ns} did not start: {why}");
        }
        Ok(UdpReceiver {
            ns: ns.to_string(),
            handle: Some(handle),
        })
    }

    /// Waits for the end of the collection time; returns every datagram received.
    pub fn finish(mut self) -> Result<Vec<Vec<u8>>> {
        let handle = self.handle.take().expect("finished once");
        join_netns_thread(&self.ns, handle)
    }
}

impl Drop for UdpReceiver {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_vxlan_payload_around_a_udp_datagram() {
        let inner = InnerUdp {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: parse_mac("0e:00:00:00:00:02").unwrap(),
            src: "10.244.9.9:4000".parse().unwrap(),
            dst: "10.244.2.2:9999".parse().unwrap(),
            payload: b"hello".to_vec(),
        };
        let out = vxlan_payload(1, &inner).unwrap();
        assert_eq!(out.len(), 8 + 14 + 20 + 8 + 5);
        assert_eq!(&out[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&out[8..14], &[0x0e, 0, 0, 0, 0, 2]);
        assert_eq!(&out[20..22], &[0x08, 0x00]);
        let ip = &out[22..42];
        assert_eq!(
            internet_checksum(ip),
            0,
            "the IPv4 header checksum is valid"
        );
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 33);
        assert_eq!(&out[42 + 2..42 + 4], &9999u16.to_be_bytes());
        assert_eq!(&out[50..], b"hello");
        assert!(parse_mac("0e:00:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
