//! Wire headers and bounds-checked reads of them.
//!
//! Headers are `#[repr(C)]` structs of byte arrays (alignment 1, no padding),
//! with multi-byte fields kept in network order, so they can be read from
//! and written to the packet as they are.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = size_of::<EthHdr>();
/// ETH_P_IP, as it appears on the wire.
pub const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
/// An IPv4 header without options.
pub const IPV4_HLEN: usize = size_of::<Ipv4Hdr>();
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    /// Header length in bytes, options included (IHL counts 32-bit words).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.version_ihl & 0x0f) * 4
    }

    #[inline(always)]
    pub fn total_len(&self) -> u32 {
        u16::from_be_bytes(self.tot_len).into()
    }

    /// A fragment other than a whole datagram: more fragments follow, or the
    /// offset is not zero.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        // frag_off: 3 flag bits (reserved, DF, MF) and a 13-bit offset.
        u16::from_be_bytes(self.frag_off) & 0x3fff != 0
    }

    /// Whether the payload starts with the L4 header: a whole datagram or a
    /// first fragment (offset zero).
    #[inline(always)]
    pub fn carries_l4_header(&self) -> bool {
        u16::from_be_bytes(self.frag_off) & 0x1fff == 0
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    /// 0x08 (the I bit: the VNI is valid) and 3 reserved bytes.
    pub flags: [u8; 4],
    /// The 24-bit VNI followed by a reserved byte.
    pub vni: [u8; 4],
}

/// Copies the `T` at `offset` out of the packet, or `None` when the packet is
/// shorter. Reads go through the linear part of the skb (direct packet
/// access, bounds proven to the verifier by the explicit check); headers that
/// sit beyond it, as in some GRO-built skbs, are pulled in first.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    if let Some(value) = read_linear(ctx, offset) {
        return Some(value);
    }
    let end = offset + size_of::<T>();
    if ctx.len() as usize >= end && ctx.pull_data(end as u32).is_ok() {
        return read_linear(ctx, offset);
    }
    None
}

#[inline(always)]
fn read_linear<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the check above keeps the read inside the packet, and `T`
    // (a header of byte arrays) has alignment 1 and no invalid values.
    Some(unsafe { *(start as *const T) })
}

/// The ports of the TCP, UDP or SCTP header at `l4_off`, or an ICMP echo's identifier as
/// both (echoes are matched by it): what tells a flow apart beyond its addresses. `None`
/// for another ICMP type, another protocol, or a truncated header.
#[inline(always)]
pub fn ports(ctx: &TcContext, protocol: u8, l4_off: usize) -> Option<([u8; 2], [u8; 2])> {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let p: [u8; 4] = read(ctx, l4_off)?;
            Some(([p[0], p[1]], [p[2], p[3]]))
        }
        IPPROTO_ICMP => {
            // type, code, checksum, identifier
            let icmp: [u8; 6] = read(ctx, l4_off)?;
            let id = [icmp[4], icmp[5]];
            (icmp[0] == ICMP_ECHO_REQUEST || icmp[0] == ICMP_ECHO_REPLY).then_some((id, id))
        }
        _ => None,
    }
}

/// The IPv4 header of an Ethernet IPv4 frame; `None` for other frames and
/// for malformed ones: wrong version, header length below 20 or beyond the
/// total length, or a packet shorter than its total length. The kernel stack drops and counts those
/// itself, so the programs leave them to it rather than forward them.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Option<Ipv4Hdr> {
    let proto: [u8; 2] = read(ctx, ETH_HLEN - 2)?;
    if proto != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = read(ctx, ETH_HLEN)?;
    if ip.version_ihl >> 4 != 4 || ip.header_len() < IPV4_HLEN {
        return None;
    }
    let total_len = ip.total_len();
    if total_len < ip.header_len() as u32 || ETH_HLEN as u32 + total_len > ctx.len() {
        return None;
    }
    Some(ip)
}
