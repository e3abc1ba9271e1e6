//! Differential fuzzing of `from_pod` and `from_netdev`: a reference model written from
//! the datapath's rules (not from its code) decides, for a frame and the test bed's maps
//! and routes ([`crate::datapath`]), the verdict and every byte of the output;
//! BPF_PROG_TEST_RUN must agree. The generator builds the frames such a node sees (pod
//! traffic to every kind of lease, VXLAN from peers and strangers, routed packets) and
//! then breaks them: VLAN tags, IPv4 options, fragments, every protocol, forged sources,
//! flipped bytes, odd and truncated lengths.
//!
//! The one byte range the model cannot know is the outer UDP source port of an
//! encapsulated packet (the kernel's flow hash, salted at boot): it is checked to lie in
//! the ephemeral range instead.
//!
//! Its NAT part ([`nat`]) runs sequences of frames through `from_pod`, `to_netdev` and
//! `from_netdev` with BPF source NAT on, the model keeping the mappings.

pub mod nat;

use std::fmt::Write as _;
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::Result;
use weft_common::{
    NatEntry, NatKey, LEASE_DIRECT, LEASE_VXLAN, PROG_FROM_NETDEV, PROG_FROM_POD, PROG_TO_NETDEV,
};

use crate::datapath::*;
use nat::{Event, Nat, Scenario, Step, Window};

// ---------------------------------------------------------------------------------------
// The model

/// What the model says a program does with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub action: u32,
    pub frame: Vec<u8>,
    /// Bytes of `frame` the model leaves open (the outer UDP source port).
    pub open: Option<Range<usize>>,
    /// `skb->mark` after the program, when the model says (`from_pod`'s NAT mark).
    pub mark: Option<u32>,
}

impl Expected {
    fn pass(frame: &[u8]) -> Self {
        Self::verdict(TC_ACT_UNSPEC, frame)
    }

    fn verdict(action: u32, frame: &[u8]) -> Self {
        Expected {
            action,
            frame: frame.to_vec(),
            open: None,
            mark: None,
        }
    }

    fn redirect(frame: Vec<u8>) -> Self {
        Expected {
            action: TC_ACT_REDIRECT,
            frame,
            open: None,
            mark: None,
        }
    }

    /// Whether the program's actual result agrees.
    pub fn matches(&self, action: u32, frame: &[u8]) -> bool {
        if action != self.action || frame.len() != self.frame.len() {
            return false;
        }
        match &self.open {
            None => frame == self.frame,
            Some(open) => {
                let port = u16::from_be_bytes([frame[open.start], frame[open.start + 1]]);
                SPORT_RANGE.contains(&port)
                    && frame[..open.start] == self.frame[..open.start]
                    && frame[open.end..] == self.frame[open.end..]
            }
        }
    }
}

/// An IPv4 header as the programs read it: no checks beyond the ones named in `parse`.
#[derive(Clone, Copy, Debug)]
struct Ip {
    header_len: usize,
    total_len: usize,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

impl Ip {
    /// The 20 bytes at `off`, unchecked (as a `read` of the header struct).
    fn at(f: &[u8], off: usize) -> Option<Ip> {
        let h = f.get(off..off + 20)?;
        Some(Ip {
            header_len: usize::from(h[0] & 0x0f) * 4,
            total_len: usize::from(u16::from_be_bytes([h[2], h[3]])),
            frag_off: u16::from_be_bytes([h[6], h[7]]),
            ttl: h[8],
            protocol: h[9],
            saddr: [h[12], h[13], h[14], h[15]],
            daddr: [h[16], h[17], h[18], h[19]],
        })
    }

    /// An Ethernet IPv4 frame's header, if it is one the stack would accept the shape of:
    /// version 4, a header of at least 20 bytes within the total length, the total length
    /// within the frame.
    fn parse(f: &[u8]) -> Option<Ip> {
        if f.get(12..14)? != ETH_P_IP.to_be_bytes() {
            return None;
        }
        let ip = Ip::at(f, 14)?;
        let valid = f[14] >> 4 == 4
            && ip.header_len >= 20
            && ip.total_len >= ip.header_len
            && 14 + ip.total_len <= f.len();
        valid.then_some(ip)
    }

    fn is_fragment(&self) -> bool {
        self.frag_off & 0x3fff != 0
    }
}

/// The lease holding `ip` in the bed's map: (node, mode).
fn lease(ip: [u8; 4]) -> Option<([u8; 4], u32)> {
    BED_LEASES
        .iter()
        .find(|(pod, _, _)| pod[..3] == ip[..3])
        .map(|(_, node, mode)| (*node, *mode))
}

/// The FIB of the bed's namespace for a forwarded packet to `dst`: the next hop and, when
/// its neighbour is resolved, the MACs; `None` when nothing forwards it.
/// Source and destination MAC of a resolved next hop.
type Macs = ([u8; 6], [u8; 6]);

fn fib(dst: [u8; 4]) -> Option<([u8; 4], Option<Macs>)> {
    let resolved = |hop: [u8; 4]| (hop == PEER_IP).then_some((UPLINK_MAC, PEER_MAC));
    let subnet = |pod: [u8; 4]| dst[..3] == pod[..3];
    if subnet(DIRECT_POD) {
        return Some((PEER_IP, resolved(PEER_IP)));
    }
    if subnet(UNRESOLVED_DIRECT_POD) {
        return Some((UNRESOLVED_PEER_IP, None));
    }
    let on_link = dst[..3] == NODE_IP[..3] && !matches!(dst[3], 0 | 11 | 255);
    on_link.then(|| (dst, resolved(dst)))
}

/// The connection key exists (not a fragment, ports or echo identifier readable).
fn has_flow_key(f: &[u8], ip: &Ip, l3_off: usize) -> bool {
    if ip.is_fragment() {
        return false;
    }
    let l4 = l3_off + ip.header_len;
    match ip.protocol {
        6 | 17 | 132 => f.len() >= l4 + 4,
        1 => f.len() >= l4 + 6 && matches!(f[l4], 0 | 8),
        _ => true,
    }
}

/// TTL decremented with the checksum updated incrementally (RFC 1624 eqn. 3), on the
/// 20 header bytes at `off`.
fn dec_ttl(f: &mut [u8], off: usize) {
    let old = u16::from_be_bytes([f[off + 8], f[off + 9]]);
    f[off + 8] = f[off + 8].wrapping_sub(1);
    let new = u16::from_be_bytes([f[off + 8], f[off + 9]]);
    let check = u16::from_be_bytes([f[off + 10], f[off + 11]]);
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    let folded = fold(fold(sum).into());
    f[off + 10..off + 12].copy_from_slice(&(!folded).to_be_bytes());
}

/// A 32-bit sum of 16-bit words folded to 16 bits (end-around carry, twice: the first
/// fold may carry again).
fn fold(sum: u32) -> u16 {
    let once = (sum & 0xffff) + (sum >> 16);
    ((once & 0xffff) + (once >> 16)) as u16
}

fn ip_checksum(header: &[u8]) -> [u8; 2] {
    let sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    (!fold(fold(sum).into())).to_be_bytes()
}

fn eth(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    [&dst[..], &src, &ETH_P_IP.to_be_bytes()].concat()
}

/// The datapath's rules, for the bed's maps with config `flags` and BPF source NAT `nat`
/// (its tables included).
pub struct Model {
    pub flags: u16,
    pub nat: Nat,
}

impl Model {
    fn fast_path_off(&self) -> bool {
        self.flags & weft_common::CONFIG_FAST_PATH_OFF != 0
    }

    /// `from_pod` on the local pod's veth.
    pub fn on_pod_veth(&self, f: &[u8]) -> Expected {
        let Some(ip) = Ip::parse(f) else {
            return Expected::pass(f);
        };
        let Some((node, mode)) = lease(ip.daddr).filter(|_| !self.fast_path_off()) else {
            return Expected::pass(f);
        };
        if ip.ttl <= 1 || ip.saddr != LOCAL_POD || !has_flow_key(f, &ip, 14) {
            return Expected::pass(f);
        }
        match mode {
            LEASE_VXLAN => {
                if ip.total_len > INNER_MTU as usize {
                    return Expected::pass(f);
                }
                let Some((_, macs)) = fib(node) else {
                    return Expected::pass(f);
                };
                let (src, dst) = macs.unwrap_or(([0; 6], [0; 6]));
                let ip_len = f.len() + 50 - 14;
                let mut outer = vec![0x45, 0];
                outer.extend_from_slice(&(ip_len as u16).to_be_bytes());
                outer.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
                outer.extend_from_slice(&NODE_IP);
                outer.extend_from_slice(&node);
                let check = ip_checksum(&outer);
                outer[10..12].copy_from_slice(&check);
                let mut inner = f.to_vec();
                dec_ttl(&mut inner, 14);
                let mut out = eth(dst, src);
                out.extend_from_slice(&outer);
                out.extend_from_slice(&[0, 0]); // source port: the flow hash's
                out.extend_from_slice(&VXLAN_PORT.to_be_bytes());
                out.extend_from_slice(&((ip_len - 20) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
                out.extend_from_slice(&(VNI << 8).to_be_bytes());
                out.extend_from_slice(&eth(PEER_VTEP_MAC, OWN_VTEP_MAC));
                out.extend_from_slice(&inner[14..]);
                Expected {
                    open: Some(34..36),
                    ..Expected::redirect(out)
                }
            }
            LEASE_DIRECT => {
                let Some((_, macs)) = fib(ip.daddr) else {
                    return Expected::pass(f);
                };
                let mut out = f.to_vec();
                dec_ttl(&mut out, 14);
                if let Some((src, dst)) = macs {
                    out[..14].copy_from_slice(&eth(dst, src));
                }
                Expected::redirect(out)
            }
            _ => Expected::pass(f),
        }
    }

    /// `from_netdev` on the uplink.
    pub fn on_uplink(&self, f: &[u8]) -> Expected {
        let Some(ip) = Ip::parse(f) else {
            return Expected::pass(f);
        };
        let l4 = 14 + ip.header_len;
        let first = ip.frag_off & 0x1fff == 0;
        if ip.protocol == 17 && first && ip.daddr == NODE_IP && f.len() >= l4 + 8 {
            let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
            if dport == VXLAN_PORT {
                return self.tunnel(f, &ip, l4 + 8);
            }
        }
        if self.fast_path_off() || ip.daddr != LOCAL_POD || ip.ttl <= 1 {
            return Expected::pass(f);
        }
        let Some((node, mode)) = lease(ip.saddr) else {
            return Expected::pass(f);
        };
        // Sent by the direct lease's node: the frame's source is its neighbour's MAC.
        let from_node = mode == LEASE_DIRECT
            && fib(ip.saddr).is_some_and(|(hop, macs)| {
                hop == node && macs.is_some_and(|(_, dst)| f[6..12] == dst)
            });
        if !from_node || !has_flow_key(f, &ip, 14) {
            return Expected::pass(f);
        }
        let mut out = f.to_vec();
        dec_ttl(&mut out, 14);
        out[..14].copy_from_slice(&eth(LOCAL_POD_MAC, LOCAL_POD_HOST_MAC));
        Expected::redirect(out)
    }

    fn tunnel(&self, f: &[u8], outer: &Ip, payload: usize) -> Expected {
        if outer.is_fragment() {
            return Expected::pass(f);
        }
        if f.len() < payload + 22 {
            return Expected::verdict(TC_ACT_SHOT, f);
        }
        let vni = u32::from_be_bytes([f[payload + 4], f[payload + 5], f[payload + 6], 0]) >> 8;
        if f[payload] & 0x08 == 0 || vni != VNI {
            return Expected::pass(f);
        }
        if !BED_PEERS.contains(&outer.saddr) {
            return Expected::verdict(TC_ACT_SHOT, f);
        }
        if f[payload + 20..payload + 22] != ETH_P_IP.to_be_bytes() {
            return Expected::pass(f);
        }
        let inner_off = payload + 22;
        let Some(inner) = Ip::at(f, inner_off) else {
            return Expected::verdict(TC_ACT_SHOT, f);
        };
        let from_sender = inner.saddr == outer.saddr
            || lease(inner.saddr).is_some_and(|(node, _)| node == outer.saddr);
        if !from_sender {
            let incomplete = self.flags & weft_common::CONFIG_LEASES_INCOMPLETE != 0;
            return if lease(inner.saddr).is_none() && incomplete {
                Expected::pass(f)
            } else {
                Expected::verdict(TC_ACT_SHOT, f)
            };
        }
        if self.fast_path_off() || inner.daddr != LOCAL_POD || !has_flow_key(f, &inner, inner_off) {
            return Expected::pass(f);
        }
        let mut out = eth(LOCAL_POD_MAC, LOCAL_POD_HOST_MAC);
        out.extend_from_slice(&f[inner_off..]);
        Expected::redirect(out)
    }
}

// ---------------------------------------------------------------------------------------
// The generator

/// xorshift64*: small, fast, reproducible from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn word(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.word() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.word() as u8).collect()
    }

    fn addr(&mut self) -> [u8; 4] {
        (self.word() as u32).to_be_bytes()
    }
}

/// An address of some interesting kind: in each lease, local, a peer, a stranger, random.
fn some_addr(rng: &mut Rng) -> [u8; 4] {
    let host = |rng: &mut Rng, net: [u8; 4]| [net[0], net[1], net[2], rng.word() as u8];
    match rng.below(12) {
        0 => host(rng, VXLAN_POD),
        1 => host(rng, DIRECT_POD),
        2 => host(rng, UNRESOLVED_VXLAN_POD),
        3 => host(rng, UNRESOLVED_DIRECT_POD),
        4 => host(rng, UNROUTABLE_POD),
        5 => LOCAL_POD,
        6 => OTHER_LOCAL_IP,
        7 => rng.pick(&[PEER_IP, UNRESOLVED_PEER_IP, UNROUTABLE_PEER_IP, STRANGER_IP]),
        8 => NODE_IP,
        9 => UNLEASED_POD,
        _ => rng.addr(),
    }
}

/// An L4 payload of a random protocol: (protocol, bytes).
fn l4(rng: &mut Rng, max: usize) -> (u8, Vec<u8>) {
    let len = rng.below(max.max(1) + 1);
    let protocol = rng.pick(&[
        IPPROTO_UDP,
        IPPROTO_UDP,
        IPPROTO_TCP,
        IPPROTO_ICMP,
        132,
        47,
        0,
    ]);
    let protocol = if protocol == 0 {
        rng.word() as u8
    } else {
        protocol
    };
    let mut payload = rng.bytes(len);
    if protocol == IPPROTO_ICMP && len > 0 && rng.chance(70) {
        payload[0] = rng.pick(&[0, 8, 3, 11]);
    }
    (protocol, payload)
}

/// An IPv4 packet with random options, fragment bits and TTL.
fn packet(rng: &mut Rng, src: [u8; 4], dst: [u8; 4], max: usize) -> Vec<u8> {
    let words = if rng.chance(15) { 1 + rng.below(10) } else { 0 };
    let options = rng.bytes(words * 4);
    let ttl = rng.pick(&[64, 64, 2, 1, 0, 255]);
    let (protocol, payload) = l4(rng, max.saturating_sub(20 + options.len()));
    let mut ip = ipv4_with_options(src, dst, ttl, protocol, &options, &payload);
    if rng.chance(10) {
        // More fragments, or a later fragment, or DF only.
        let frag = rng.pick(&[0x2000u16, 0x0010, 0x2001, 0x4000]);
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        let check = ip_checksum(&[&ip[..10], &[0, 0], &ip[12..20 + options.len()]].concat());
        ip[10..12].copy_from_slice(&check);
    }
    ip
}

/// What the local pod sends (sometimes from a forged source).
fn pod_frame(rng: &mut Rng) -> Vec<u8> {
    let src = if rng.chance(85) {
        LOCAL_POD
    } else {
        some_addr(rng)
    };
    let dst = some_addr(rng);
    let ip = packet(rng, src, dst, 1500 - 14);
    ethernet(GATEWAY_MAC, LOCAL_POD_MAC, ETH_P_IP, &ip)
}

/// What arrives on the uplink: VXLAN from peers and strangers, routed packets, others.
fn uplink_frame(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(60) {
        let outer_src = rng.pick(&[PEER_IP, PEER_IP, UNRESOLVED_PEER_IP, STRANGER_IP]);
        let inner_src = if rng.chance(60) {
            [VXLAN_POD[0], VXLAN_POD[1], VXLAN_POD[2], rng.word() as u8]
        } else {
            some_addr(rng)
        };
        let inner_dst = if rng.chance(60) {
            LOCAL_POD
        } else {
            some_addr(rng)
        };
        let inner = packet(rng, inner_src, inner_dst, 1400);
        let ethertype = if rng.chance(90) { ETH_P_IP } else { ETH_P_ARP };
        let inner = ethernet(OWN_VTEP_MAC, PEER_VTEP_MAC, ethertype, &inner);
        let vni = if rng.chance(90) {
            VNI
        } else {
            rng.word() as u32 & 0xff_ffff
        };
        let flags = if rng.chance(95) { 0x08 } else { 0 };
        let options = if rng.chance(10) {
            vec![1, 1, 1, 0]
        } else {
            Vec::new()
        };
        let mut frame = vxlan_frame(outer_src, flags, vni, &inner, &options);
        if rng.chance(5) {
            // To another address of the segment.
            frame[30..34].copy_from_slice(&[198, 18, 0, 77]);
            fix_ip_checksum(&mut frame);
        }
        frame
    } else {
        let src = some_addr(rng);
        let dst = if rng.chance(60) {
            LOCAL_POD
        } else {
            some_addr(rng)
        };
        let src_mac = if rng.chance(70) {
            PEER_MAC
        } else {
            [2, 0, 0, 0, 0, 0x99]
        };
        let ip = packet(rng, src, dst, 1500 - 14);
        ethernet(UPLINK_MAC, src_mac, ETH_P_IP, &ip)
    }
}

/// Breaks a valid frame the way the wire and hostile senders do.
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    if rng.chance(5) {
        // An 802.1Q tag: not IPv4 at offset 12 any more.
        f.splice(12..12, [0x81, 0x00, 0x00, rng.word() as u8]);
    }
    if rng.chance(15) {
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(f.len().min(96));
            f[at] = rng.word() as u8;
        }
    }
    if rng.chance(10) {
        f.truncate(14 + rng.below(f.len() - 13));
    } else if rng.chance(5) {
        // Padding after the IP packet, as short Ethernet frames carry.
        let extra = rng.below(20);
        f.extend(std::iter::repeat_n(0, extra));
    }
    f.truncate(1518);
    f
}

/// One frame for one program: (program, frame).
pub fn frame(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    let (program, f) = if rng.chance(50) {
        (PROG_FROM_POD, pod_frame(rng))
    } else {
        (PROG_FROM_NETDEV, uplink_frame(rng))
    };
    (program, mutate(rng, f))
}

// ---------------------------------------------------------------------------------------
// The run

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub frames: u64,
    /// Frames the kernel refused to run (too short to be a packet).
    pub refused: u64,
    pub redirected: u64,
    pub dropped: u64,
    pub passed: u64,
    /// Frames where the programs and the model disagree.
    pub disagreements: u64,
    /// The first few of them, described.
    pub mismatches: Vec<String>,
    pub elapsed: Duration,
    pub nat: NatReport,
}

/// What the NAT part of a run found (its frames are also counted in [`Report`]).
#[derive(Debug, Default)]
pub struct NatReport {
    pub frames: u64,
    pub sequences: u64,
    /// Pod packets translated out (`to_netdev`), replies and ICMP errors translated back.
    pub out: u64,
    pub back: u64,
    pub icmp_errors: u64,
    pub allocated: u64,
    pub took_over: u64,
    pub reopened: u64,
    pub alloc_failed: u64,
    pub marked: u64,
    /// Frames whose outcome hung on a time comparison the clock window left open: not
    /// compared, their sequence started over.
    pub undecided: u64,
    pub elapsed: Duration,
}

impl NatReport {
    pub fn summary(&self) -> String {
        format!(
            "NAT: {} frames in {} sequences, {:.1} s ({:.0} frames/s): {} translated out, {} \
             back ({} ICMP errors), {} ports allocated, {} taken over from finished flows, {} \
             reopened by a SYN, {} allocations failed (range full), {} marked by from_pod; {} \
             undecided by the clock",
            self.frames,
            self.sequences,
            self.elapsed.as_secs_f64(),
            self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.out,
            self.back,
            self.icmp_errors,
            self.allocated,
            self.took_over,
            self.reopened,
            self.alloc_failed,
            self.marked,
            self.undecided
        )
    }
}

impl Report {
    pub fn frames_per_second(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn summary(&self) -> String {
        let all = format!(
            "{} frames in {:.1} s ({:.0} frames/s): {} redirected, {} dropped, {} passed, {} \
             refused by the kernel (shorter than a packet); {} disagreements",
            self.frames,
            self.elapsed.as_secs_f64(),
            self.frames_per_second(),
            self.redirected,
            self.dropped,
            self.passed,
            self.refused,
            self.disagreements
        );
        if self.nat.frames == 0 {
            return all;
        }
        format!("{all}\n{}", self.nat.summary())
    }
}

/// Runs `frames` generated frames from `seed` through the programs in a fresh test bed,
/// once with every config flag combination the model knows, then `nat_frames` in NAT
/// sequences ([`run_nat`]), and compares each result with the model. Keeps the first
/// mismatches (hex dumps).
pub fn run(frames: u64, nat_frames: u64, seed: u64) -> Result<Report> {
    with_datapath(move |dp| {
        let mut rng = Rng::new(seed);
        let mut report = Report::default();
        let started = Instant::now();
        let flag_sets = [
            0,
            weft_common::CONFIG_FAST_PATH_OFF,
            weft_common::CONFIG_LEASES_INCOMPLETE,
        ];
        for (n, flags) in flag_sets.iter().enumerate() {
            dp.set_flags(*flags)?;
            let model = Model {
                flags: *flags,
                nat: Nat::default(),
            };
            let share = frames / flag_sets.len() as u64
                + u64::from(n == 0) * (frames % flag_sets.len() as u64);
            for _ in 0..share {
                let (program, f) = frame(&mut rng);
                let Some(out) = run_counted(dp, program, &f, &mut report)? else {
                    continue;
                };
                let want = if program == PROG_FROM_POD {
                    model.on_pod_veth(&f)
                } else {
                    model.on_uplink(&f)
                };
                if !want.matches(out.action, &out.frame) {
                    report.disagreements += 1;
                    if report.mismatches.len() < 10 {
                        let text = describe(program, *flags, &f, &want, out.action, &out.frame);
                        report.mismatches.push(text);
                    }
                }
            }
        }
        dp.set_flags(0)?;
        run_nat(dp, &mut rng, nat_frames, &mut report)?;
        dp.set_nat(None)?;
        report.elapsed = started.elapsed();
        Ok(report)
    })
}

/// Runs `program` on `f` and counts its verdict; `None` for a frame the kernel refuses.
fn run_counted(
    dp: &Datapath,
    program: &str,
    f: &[u8],
    report: &mut Report,
) -> Result<Option<Outcome>> {
    report.frames += 1;
    let out = match dp.run(program, f) {
        Ok(out) => out,
        // The kernel builds no skb shorter than an Ethernet header, and (newer
        // kernels) none of an IPv4 frame cut inside its IP header.
        Err(_) if f.len() < 34 => {
            report.refused += 1;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    match out.action {
        TC_ACT_REDIRECT => report.redirected += 1,
        TC_ACT_SHOT => report.dropped += 1,
        _ => report.passed += 1,
    }
    Ok(Some(out))
}

/// The NAT part: sequences of 8 to 63 steps, each on empty tables with a port range of 1,
/// 2, 4 or 16 ports and a table limit of 2 or 1000; after each frame the verdict, the
/// frame, `from_pod`'s mark, both tables, the count and the invariants are compared. A
/// disagreement ends its sequence.
pub fn run_nat(dp: &mut Datapath, rng: &mut Rng, frames: u64, report: &mut Report) -> Result<()> {
    let started = Instant::now();
    let mut model = Model {
        flags: 0,
        nat: Nat::default(),
    };
    while report.nat.frames < frames {
        let span = rng.pick(&[1u16, 2, 4, 16]);
        let ports = (61000, 61000 + span - 1);
        let limit = rng.pick(&[2, 1000]);
        dp.set_nat(Some((ports, limit)))?;
        model.nat = Nat::new(ports, limit);
        report.nat.sequences += 1;
        let mut scenario = Scenario::new(rng);
        let mut log = format!("sequence: ports {}-{}, limit {limit}\n", ports.0, ports.1);
        for _ in 0..8 + rng.below(56) {
            if report.nat.frames >= frames {
                break;
            }
            let (program, f, clean) = match scenario.step(rng, &model.nat) {
                Step::Age(ns) => {
                    // Timestamps count from boot: they stay above zero.
                    if model.nat.oldest() < 2 * ns {
                        continue;
                    }
                    model.nat.age(ns);
                    for (reverse, table) in [(false, &model.nat.out), (true, &model.nat.back)] {
                        for (key, entry) in table {
                            dp.set_nat_entry(reverse, *key, *entry)?;
                        }
                    }
                    let _ = writeln!(log, "  time moves on by {} ms", ns / 1_000_000);
                    continue;
                }
                Step::Frame(program, f, clean) => (program, f, clean),
            };
            report.nat.frames += 1;
            let earliest = monotonic_ns();
            let Some(out) = run_counted(dp, program, &f, report)? else {
                continue;
            };
            let now = Window {
                earliest,
                latest: monotonic_ns(),
            };
            let _ = writeln!(log, "  {program} {}", hex(&f));
            let kernel = (dp.nat_table(false)?, dp.nat_table(true)?);
            let want = match program {
                PROG_FROM_POD => Ok(model.on_pod_veth_marked(&f)),
                PROG_TO_NETDEV => {
                    // What it records for the stack is the flow part's, not NAT's.
                    dp.clear_stack_flows()?;
                    model.on_uplink_egress(&f, now, &kernel.0)
                }
                _ => model.on_uplink_at(&f, now),
            };
            let Ok(want) = want else {
                report.nat.undecided += 1;
                break;
            };
            let mut problem = None;
            if !want.matches(out.action, &out.frame) {
                problem = Some("verdict or frame".to_string());
            } else if want.mark.is_some_and(|m| m != out.mark) {
                problem = Some(format!("mark {:#x}, the model {:#x?}", out.mark, want.mark));
            } else if clean && nat::checksums_hold(&f) && !nat::checksums_hold(&out.frame) {
                problem = Some("a checksum no longer holds".to_string());
            } else if let Err(e) = compare_tables(dp, &kernel, &mut model.nat, now) {
                problem = Some(e);
            } else if let Some(broken) = model.nat.broken_invariant() {
                problem = Some(format!("invariant: {broken}"));
            }
            if let Some(problem) = problem {
                report.disagreements += 1;
                if report.mismatches.len() < 10 {
                    let text = describe(program, 0, &f, &want, out.action, &out.frame);
                    report
                        .mismatches
                        .push(format!("{log}NAT: {problem}\n{text}"));
                }
                break;
            }
            let translated = out.action == TC_ACT_UNSPEC && out.frame != f;
            match program {
                PROG_FROM_POD if out.mark != 0 => report.nat.marked += 1,
                PROG_TO_NETDEV if translated => {
                    report.nat.out += 1;
                    scenario.sent.push(out.frame.clone());
                }
                PROG_FROM_NETDEV if translated => report.nat.back += 1,
                _ => {}
            }
            match model.nat.event {
                Some(Event::Allocated) => report.nat.allocated += 1,
                Some(Event::TookOver) => report.nat.took_over += 1,
                Some(Event::Reopened) => report.nat.reopened += 1,
                Some(Event::AllocFailed) => report.nat.alloc_failed += 1,
                Some(Event::IcmpError) => report.nat.icmp_errors += 1,
                None => {}
            }
        }
    }
    report.nat.elapsed = started.elapsed();
    Ok(())
}

/// A NAT table as read from the kernel.
type NatTable = Vec<(NatKey, NatEntry)>;

/// Compares both NAT tables and the count with the kernel's, adopting the timestamps the
/// step wrote.
fn compare_tables(
    dp: &Datapath,
    kernel: &(NatTable, NatTable),
    nat: &mut Nat,
    now: Window,
) -> Result<(), String> {
    let mut step_ns = None;
    nat.adopt(false, &kernel.0, now, &mut step_ns)?;
    nat.adopt(true, &kernel.1, now, &mut step_ns)?;
    let count = dp.nat_count().map_err(|e| format!("{e:#}"))?;
    if count != nat.entries {
        return Err(format!(
            "nat_state counts {count} mappings, the model {}",
            nat.entries
        ));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn describe(
    program: &str,
    flags: u16,
    f: &[u8],
    want: &Expected,
    action: u32,
    got: &[u8],
) -> String {
    format!(
        "{program} (flags {flags}) on {} bytes {}\n  model: action {} {}\n  kernel: action {action} {}",
        f.len(),
        hex(f),
        want.action,
        hex(&want.frame),
        hex(got)
    )
}
