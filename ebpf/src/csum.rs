//! Internet checksums (RFC 1071) of the headers the programs write or change.
//! Headers are changed in a copy on the stack and written back with the rest
//! of the rewrite in one store, so the checksums are computed here rather
//! than patched in the packet by helpers.

use crate::parse::{Ipv4Hdr, IPV4_HLEN};

/// The checksum of an IPv4 header without options, whose `check` field is zero.
#[inline(always)]
pub fn ipv4_header(ip: &Ipv4Hdr) -> [u8; 2] {
    // SAFETY: Ipv4Hdr is IPV4_HLEN bytes of byte arrays, without padding.
    let bytes: [u8; IPV4_HLEN] = unsafe { core::mem::transmute(*ip) };
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_HLEN {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    (!fold(sum)).to_be_bytes()
}

/// Decrements the TTL of `ip`, as a router does, and updates its checksum
/// incrementally (RFC 1624, eqn. 3): the header may carry options, which
/// the copy does not hold, so the checksum cannot be recomputed from it.
///
/// TTL and checksum change together, so the one's-complement sum of the
/// whole packet stays the same and a CHECKSUM_COMPLETE skb->csum stays valid.
#[inline(always)]
pub fn dec_ttl(ip: &mut Ipv4Hdr) {
    // The checksum sees TTL as the high byte of the (TTL, protocol) word.
    let old = u16::from_be_bytes([ip.ttl, ip.protocol]);
    ip.ttl = ip.ttl.wrapping_sub(1);
    let new = u16::from_be_bytes([ip.ttl, ip.protocol]);
    let check = u16::from_be_bytes(ip.check);
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    ip.check = (!fold(sum)).to_be_bytes();
}

/// Folds a 32-bit one's-complement sum into 16 bits. Two rounds suffice for
/// sums of up to 65536 16-bit words.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
