//! Forwarding decisions from the kernel's own FIB and neighbour table, so that
//! the routes and ARP entries the agent (or the admin) installs stay the
//! single source of truth for where packets leave the node.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext,
};

use crate::parse::{EthHdr, Ipv4Hdr, ETH_HLEN, ETH_P_IP};

/// AF_INET from linux/socket.h: the family of `bpf_fib_lookup` and `bpf_redir_neigh`.
const AF_INET: u8 = 2;

/// Where the FIB sends a packet.
#[derive(Clone, Copy)]
pub struct Nexthop {
    /// The egress interface.
    pub ifindex: u32,
    /// The next hop's IPv4 address: the gateway, or the destination itself when on-link.
    pub ip: [u8; 4],
    /// Source and destination MACs when the neighbour is resolved; `None`
    /// when it is not, and `redirect` lets the kernel resolve it.
    pub macs: Option<Macs>,
}

#[derive(Clone, Copy)]
pub struct Macs {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

/// Looks up the route from `src` to `dst` as if the packet had arrived on
/// `ifindex`. Any result other than "forward" (local, blackhole, unreachable,
/// forwarding disabled, too big for the egress MTU) yields `None`: the caller
/// leaves the packet to the kernel, which answers with the right ICMP error.
///
/// `tot_len` stays 0 so that the kernel checks the egress MTU against the
/// skb itself, which is GSO-aware.
#[inline(always)]
pub fn lookup(ctx: &TcContext, src: [u8; 4], dst: [u8; 4], ifindex: u32) -> Option<Nexthop> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its "no options" value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);

    // SAFETY: `params` is a valid, writable bpf_fib_lookup of the size given.
    let ret = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let macs = match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Some(Macs {
            src: params.smac,
            dst: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => None,
        _ => return None,
    };
    Some(Nexthop {
        ifindex: params.ifindex,
        // The kernel replaces the destination with the gateway of the route
        // (if it has one): the address whose neighbour entry is needed.
        // SAFETY: the union member matches `family`.
        ip: unsafe { params.__bindgen_anon_4.ipv4_dst }.to_ne_bytes(),
        macs,
    })
}

/// Writes a forwarded frame's new Ethernet addresses (when known; otherwise
/// `bpf_redirect_neigh` writes them) and its changed IPv4 header, in one store.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, macs: Option<Macs>, ip: &Ipv4Hdr) -> Result<(), i64> {
    let Some(macs) = macs else {
        return ctx.store(ETH_HLEN, ip, 0);
    };
    let headers = FrameHeaders {
        eth: EthHdr {
            dst: macs.dst,
            src: macs.src,
            proto: ETH_P_IP,
        },
        ip: *ip,
    };
    ctx.store(0, &headers, 0)
}

/// The Ethernet and IPv4 headers at the start of a frame.
#[repr(C)]
#[derive(Clone, Copy)]
struct FrameHeaders {
    eth: EthHdr,
    ip: Ipv4Hdr,
}

/// Sends the packet out of `hop.ifindex`. With the neighbour resolved the
/// caller has already written the MACs and `bpf_redirect` transmits; without,
/// `bpf_redirect_neigh` lets the kernel resolve the next hop (ARP) and fill in
/// the Ethernet header, which makes the first packets to a new peer work too.
///
/// Returns the helper's verdict: TC_ACT_REDIRECT, or TC_ACT_SHOT if it refused.
#[inline(always)]
pub fn redirect(hop: &Nexthop) -> i64 {
    if hop.macs.is_some() {
        // SAFETY: a helper call with plain integer arguments.
        return unsafe { bpf_redirect(hop.ifindex, 0) };
    }
    // SAFETY: bpf_redir_neigh is plain data; all-zero is a valid value.
    let mut neigh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    neigh.nh_family = AF_INET.into();
    neigh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(hop.ip);
    // SAFETY: `neigh` is a valid bpf_redir_neigh of the size given.
    unsafe {
        bpf_redirect_neigh(
            hop.ifindex,
            &mut neigh,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }
}
