//! The kernel's connection tracking table, read over netlink (ctnetlink): the state the
//! node's stack keeps for every connection it carries. Part of the kernel toolkit: it
//! imports nothing of weft above it.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// One direction of a connection as conntrack keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple4 {
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// TCP/UDP/SCTP ports; for ICMP the echo identifier in both; 0 for other protocols.
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry: the original direction (as its first packet came) and the reply
/// direction (as replies come, after NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub original: Tuple4,
    pub reply: Tuple4,
}

/// How long one receive may wait before the dump is given up (an error, never a partial
/// answer taken for the whole table).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every IPv4 entry of the calling thread's network namespace. Blocking; an error when
/// any part of the dump fails.
pub fn dump_ipv4() -> Result<Vec<Entry>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).context("opening a ctnetlink socket")?;
    socket.bind_auto().context("binding the ctnetlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the ctnetlink socket")?;
    set_receive_timeout(&socket, RECEIVE_TIMEOUT)?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .context("asking conntrack for its table")?;

    let mut entries = Vec::new();
    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .context("reading conntrack's table (ctnetlink)")?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(&receive[offset..size])
                .map_err(|e| anyhow!("a malformed ctnetlink message: {e}"))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(entries),
                NetlinkPayload::Error(e) => bail!("conntrack refused the dump: {e:?}"),
                NetlinkPayload::InnerMessage(inner) => {
                    if let NetfilterMessageInner::Conntrack(
                        ConntrackMessage::New(attrs) | ConntrackMessage::Get(attrs),
                    ) = inner.inner
                    {
                        if let Some(entry) = entry(&attrs) {
                            entries.push(entry);
                        }
                    }
                }
                _ => {}
            }
            if length == 0 {
                bail!("a ctnetlink message of length 0");
            }
            offset += length;
        }
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: setsockopt(2) on a socket this function's caller owns, with a timeval.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("setting the ctnetlink timeout");
    }
    Ok(())
}

fn entry(attrs: &[ConntrackAttribute]) -> Option<Entry> {
    let mut original = None;
    let mut reply = None;
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => original = tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(t),
            _ => {}
        }
    }
    Some(Entry {
        original: original?,
        reply: reply?,
    })
}

/// CTA_PROTO_ICMP_ID (linux/netfilter/nfnetlink_conntrack.h).
const CTA_PROTO_ICMP_ID: u16 = 4;

fn tuple(parts: &[Tuple]) -> Option<Tuple4> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut sport, mut dport, mut icmp_id) = (0, 0, None);
    for part in parts {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(IpAddr::V4(a)) => src = Some(*a),
                        IPTuple::DestinationAddress(IpAddr::V4(a)) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(p) => protocol = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(port) => sport = *port,
                        ProtoTuple::DestinationPort(port) => dport = *port,
                        ProtoTuple::Other(nla) if nla.kind() == CTA_PROTO_ICMP_ID => {
                            let mut id = [0u8; 2];
                            if nla.value_len() == 2 {
                                nla.emit_value(&mut id);
                                icmp_id = Some(u16::from_be_bytes(id));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = protocol?;
    if protocol == libc::IPPROTO_ICMP as u8 {
        let id = icmp_id.unwrap_or(0);
        (sport, dport) = (id, id);
    }
    Some(Tuple4 {
        protocol,
        src: src?,
        dst: dst?,
        sport,
        dport,
    })
}
