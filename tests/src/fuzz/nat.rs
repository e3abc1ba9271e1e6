//! The fuzzer's NAT part: BPF source NAT (`--masquerade=bpf`) in the model, and the
//! sequences of frames that drive it through `from_pod`, `to_netdev` and `from_netdev`.
//!
//! The model keeps its own `nat` and `nat_reverse` tables and, for each frame, predicts
//! the verdict, every output byte (addresses, ports, and each checksum by its own
//! incremental arithmetic, RFC 1624) and both tables after the step, which the run reads
//! back from the kernel and compares entry by entry. Two things the model cannot know it
//! learns from the kernel and then checks:
//! - which port an allocation took (`bpf_get_prandom_u32` picks where the search starts):
//!   it must be one the rules allow (free toward that destination, or held by a finished
//!   flow), and the port ranges are at most `ALLOC_TRIES` wide, so every port is tried
//!   and whether the allocation fails is decided;
//! - the time a step ran at (`bpf_ktime_get_ns`): the run reads CLOCK_MONOTONIC before
//!   and after each BPF_PROG_TEST_RUN, and every timestamp a step writes must lie in that
//!   window (the model then adopts it). A rule that compares times (a touch after a
//!   second, a port reused 20 ms or 200 ms after a close, idle timeouts) is decided
//!   when it comes out the same at both ends of the window; otherwise the frame is
//!   "undecided", not compared, and the sequence starts over (counted in the report).
//!   Time moves on in steps of its own: the run shifts every timestamp in both tables
//!   back (25 ms to 121 s), as if that long had passed, in the model and in the kernel.

use std::collections::HashMap;

use weft_common::{NatEntry, NatKey, NAT_MARK, NAT_SEEN_CLOSE, NAT_SEEN_REPLY};

use super::{fold, Expected, Ip, Model, Rng};
use crate::datapath::*;

/// Ports tried for a new mapping (`nat.rs`): port ranges up to this wide are searched
/// whole.
pub const ALLOC_TRIES: u16 = 16;
/// A timestamp written by the current step: the kernel's value, read back, replaces it.
pub const NOW: u64 = u64::MAX;
const TOUCH_NS: u64 = 1_000_000_000;
const SECS: u64 = 1_000_000_000;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The time of one program run: between what CLOCK_MONOTONIC read before and after.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub earliest: u64,
    pub latest: u64,
}

/// A time comparison the window does not decide.
#[derive(Debug)]
pub struct Undecided;

impl Window {
    /// Whether more than `limit` ns passed since `last` at the step's time.
    fn idle_over(&self, last: u64, limit: u64) -> Result<bool, Undecided> {
        if last == NOW {
            return Ok(false);
        }
        let shortest = self.earliest.wrapping_sub(last);
        let longest = self.latest.wrapping_sub(last);
        if shortest > limit {
            Ok(true)
        } else if longest <= limit {
            Ok(false)
        } else {
            Err(Undecided)
        }
    }
}

/// BPF source NAT as the model keeps it: the settings and the tables.
#[derive(Clone, Debug, Default)]
pub struct Nat {
    /// `NAT_ENABLED` in the config.
    pub enabled: bool,
    /// `nat_port_min..=nat_port_max`.
    pub ports: (u16, u16),
    pub limit: u32,
    /// `nat`: a pod's flow → the node's address and port.
    pub out: HashMap<NatKey, NatEntry>,
    /// `nat_reverse`: its replies' key → the pod's address and port.
    pub back: HashMap<NatKey, NatEntry>,
    /// `nat_state`'s count of mappings.
    pub entries: u64,
    /// What the last step did, for the report.
    pub event: Option<Event>,
}

/// What a NAT step did beyond the plain rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Allocated,
    TookOver,
    Reopened,
    AllocFailed,
    IcmpError,
}

/// Which port of a flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    Source,
    Destination,
}

/// A kernel helper refused (out of the packet): the program drops the packet.
struct HelperFailed;

fn in_network(a: [u8; 4]) -> bool {
    a[..2] == POD_NETWORK[..2]
}

fn leaves_cluster(a: [u8; 4]) -> bool {
    !in_network(a) && a[0] & 0xf0 != 0xe0 && a[..3] != NAT_EXCLUDED[..3]
}

/// TCP/UDP ports, or an ICMP echo's identifier as both, when the frame holds them.
fn ports(f: &[u8], protocol: u8, l4: usize) -> Option<([u8; 2], [u8; 2])> {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            let p = f.get(l4..l4 + 4)?;
            Some(([p[0], p[1]], [p[2], p[3]]))
        }
        IPPROTO_ICMP => {
            let h = f.get(l4..l4 + 6)?;
            matches!(h[0], 0 | 8).then_some(([h[4], h[5]], [h[4], h[5]]))
        }
        _ => None,
    }
}

fn tcp_flags(f: &[u8], l4: usize) -> Option<u8> {
    f.get(l4 + 12..l4 + 14).map(|b| b[1])
}

fn icmp_type(f: &[u8], l4: usize) -> Option<u8> {
    f.get(l4..l4 + 2).map(|b| b[0])
}

fn opens_flow(f: &[u8], protocol: u8, l4: usize) -> bool {
    match protocol {
        IPPROTO_TCP => tcp_flags(f, l4).is_some_and(|x| x & (TCP_SYN | TCP_ACK) == TCP_SYN),
        IPPROTO_ICMP => icmp_type(f, l4) == Some(8),
        _ => true,
    }
}

fn closing(f: &[u8], protocol: u8, l4: usize) -> bool {
    protocol == IPPROTO_TCP && tcp_flags(f, l4).is_some_and(|x| x & (TCP_FIN | TCP_RST) != 0)
}

/// The key of the replies of flow `key` mapped to `port` on the node.
pub fn reply_key(key: &NatKey, port: [u8; 2]) -> NatKey {
    let src_port = if key.protocol == IPPROTO_ICMP {
        port
    } else {
        key.dst_port
    };
    NatKey::new(key.protocol, key.dst_ip, src_port, NODE_IP, port)
}

/// The pod flow a reply entry's replies belong to.
pub fn flow_of(reply: &NatKey, pod: &NatEntry) -> NatKey {
    let dst_port = if reply.protocol == IPPROTO_ICMP {
        pod.port
    } else {
        reply.src_port
    };
    NatKey::new(reply.protocol, pod.addr, pod.port, reply.src_ip, dst_port)
}

fn entry(addr: [u8; 4], port: [u8; 2]) -> NatEntry {
    NatEntry {
        addr,
        port,
        state: 0,
        _pad: 0,
        last_seen_ns: NOW,
    }
}

/// The checksum at `at` after the bytes `old` became `new` (RFC 1624 eqn. 3, word by
/// word), as an incremental update computes it.
fn csum_replace(f: &mut [u8], at: usize, old: &[u8], new: &[u8]) {
    let word = |b: &[u8], i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let check = u16::from_be_bytes([f[at], f[at + 1]]);
    let mut sum = u32::from(!check);
    for i in (0..old.len()).step_by(2) {
        sum += (!word(old, i) & 0xffff) + word(new, i);
    }
    let folded = fold(fold(sum).into());
    f[at..at + 2].copy_from_slice(&(!folded).to_be_bytes());
}

fn store(f: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), HelperFailed> {
    f.get_mut(at..at + bytes.len())
        .ok_or(HelperFailed)?
        .copy_from_slice(bytes);
    Ok(())
}

fn l3_replace(f: &mut [u8], at: usize, old: &[u8], new: &[u8]) -> Result<(), HelperFailed> {
    if at + 2 > f.len() {
        return Err(HelperFailed);
    }
    csum_replace(f, at, old, new);
    Ok(())
}

/// An L4 checksum update; `mangled_0`: a zero checksum (UDP: none) stays zero, and a
/// result of zero is written as 0xffff.
fn l4_replace(
    f: &mut [u8],
    at: usize,
    old: &[u8],
    new: &[u8],
    mangled_0: bool,
) -> Result<(), HelperFailed> {
    if at + 2 > f.len() {
        return Err(HelperFailed);
    }
    if mangled_0 && f[at..at + 2] == [0, 0] {
        return Ok(());
    }
    csum_replace(f, at, old, new);
    if mangled_0 && f[at..at + 2] == [0, 0] {
        f[at..at + 2].copy_from_slice(&[0xff, 0xff]);
    }
    Ok(())
}

/// The address (IP header offset `addr_off`) and the port `at` become `new`, with every
/// checksum, in the programs' order (a failure leaves what was done).
fn rewrite(
    f: &mut [u8],
    ip: &Ip,
    l4: usize,
    addr_off: usize,
    new: ([u8; 4], [u8; 2]),
    old_port: [u8; 2],
    at: At,
) -> Result<(), HelperFailed> {
    let old_addr = if addr_off == 12 { ip.saddr } else { ip.daddr };
    let port_off = match (ip.protocol, at) {
        (IPPROTO_ICMP, _) => l4 + 4,
        (_, At::Source) => l4,
        (_, At::Destination) => l4 + 2,
    };
    match ip.protocol {
        IPPROTO_TCP => {
            l4_replace(f, l4 + 16, &old_addr, &new.0, false)?;
            l4_replace(f, l4 + 16, &old_port, &new.1, false)?;
        }
        IPPROTO_UDP => {
            l4_replace(f, l4 + 6, &old_addr, &new.0, true)?;
            l4_replace(f, l4 + 6, &old_port, &new.1, true)?;
        }
        _ => l4_replace(f, l4 + 2, &old_port, &new.1, false)?,
    }
    store(f, port_off, &new.1)?;
    store(f, 14 + addr_off, &new.0)?;
    l3_replace(f, 24, &old_addr, &new.0)
}

fn verdict(f: Vec<u8>, done: Result<(), HelperFailed>) -> Expected {
    let action = if done.is_ok() {
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    };
    Expected {
        action,
        frame: f,
        open: None,
        mark: None,
    }
}

/// Whether a mapping's flow has ended (the programs' and the collector's rules).
fn finished(
    protocol: u8,
    out_state: u8,
    back_state: u8,
    last: u64,
    now: Window,
) -> Result<bool, Undecided> {
    let state = out_state | back_state;
    let limit = match protocol {
        IPPROTO_TCP if out_state & back_state & NAT_SEEN_CLOSE != 0 => 20_000_000,
        IPPROTO_TCP if state & NAT_SEEN_CLOSE != 0 => 200_000_000,
        IPPROTO_TCP if state & NAT_SEEN_REPLY != 0 => 432_000 * SECS,
        IPPROTO_TCP => 120 * SECS,
        IPPROTO_UDP if state & NAT_SEEN_REPLY != 0 => 120 * SECS,
        _ => 30 * SECS,
    };
    now.idle_over(last, limit)
}

/// A packet of a direction refreshes its timestamp (after a second) and records a close.
fn touch(e: &mut NatEntry, now: Window, close: bool) -> Result<(), Undecided> {
    if now.idle_over(e.last_seen_ns, TOUCH_NS)? {
        e.last_seen_ns = NOW;
    }
    if close && e.state & NAT_SEEN_CLOSE == 0 {
        e.state |= NAT_SEEN_CLOSE;
        e.last_seen_ns = NOW;
    }
    Ok(())
}

/// How an allocation may take a port.
#[derive(Clone, Copy)]
enum Free {
    Unused,
    /// From the finished flow with this key.
    FromFinished(NatKey),
}

impl Nat {
    pub fn new(ports: (u16, u16), limit: u32) -> Nat {
        assert!(ports.1 - ports.0 < ALLOC_TRIES, "a range searched whole");
        Nat {
            enabled: true,
            ports,
            limit,
            ..Nat::default()
        }
    }

    /// `from_pod`'s mark: `NAT_MARK` on a pod packet out of the pod network that these
    /// programs will translate, while the table has room (or the flow a mapping).
    pub fn mark(&self, f: &[u8]) -> u32 {
        let Some(ip) = Ip::parse(f) else {
            return 0;
        };
        if !self.enabled || ip.is_fragment() || !in_network(ip.saddr) || in_network(ip.daddr) {
            return 0;
        }
        let l4 = 14 + ip.header_len;
        let translatable = match ip.protocol {
            IPPROTO_TCP | IPPROTO_UDP => true,
            IPPROTO_ICMP => icmp_type(f, l4) == Some(8),
            _ => false,
        };
        if !translatable {
            return 0;
        }
        let mapped = ports(f, ip.protocol, l4).is_some_and(|(sport, dport)| {
            let key = NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport);
            self.out.contains_key(&key)
        });
        if !mapped && self.entries >= u64::from(self.limit) {
            return 0;
        }
        NAT_MARK
    }

    /// `to_netdev` on a frame the stack sends out of the uplink (`kernel`: the kernel's
    /// `nat` table after it, read only for the port an allocation took).
    pub fn to_netdev(
        &mut self,
        f: &[u8],
        now: Window,
        kernel: &[(NatKey, NatEntry)],
    ) -> Result<Expected, Undecided> {
        self.event = None;
        let Some(ip) = Ip::parse(f) else {
            return Ok(Expected::pass(f));
        };
        if !in_network(ip.saddr) || !leaves_cluster(ip.daddr) || !self.enabled {
            return Ok(Expected::pass(f));
        }
        let l4 = 14 + ip.header_len;
        let mut out = f.to_vec();
        if ip.frag_off & 0x1fff != 0 {
            // A later fragment: the address alone.
            out[26..30].copy_from_slice(&NODE_IP);
            csum_replace(&mut out, 24, &ip.saddr, &NODE_IP);
            return Ok(Expected::pass(&out));
        }
        let Some((sport, dport)) = ports(f, ip.protocol, l4) else {
            return Ok(Expected::pass(f));
        };
        let key = NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport);
        let chosen = kernel
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, e)| u16::from_be_bytes(e.port));
        let mapping = match self.out.get(&key).copied() {
            Some(mut mapped) => {
                let opening = ip.protocol == IPPROTO_TCP && opens_flow(f, ip.protocol, l4);
                touch(&mut mapped, now, closing(f, ip.protocol, l4))?;
                self.out.insert(key, mapped);
                if !opening || self.reopen(&key) {
                    self.out[&key]
                } else {
                    self.out.remove(&key);
                    match self.allocate(&key, now, chosen)? {
                        Some(mapping) => mapping,
                        None => return Ok(Expected::verdict(TC_ACT_SHOT, f)),
                    }
                }
            }
            None if !opens_flow(f, ip.protocol, l4) => return Ok(Expected::pass(f)),
            None => match self.allocate(&key, now, chosen)? {
                Some(mapping) => mapping,
                None => return Ok(Expected::verdict(TC_ACT_SHOT, f)),
            },
        };
        let done = rewrite(
            &mut out,
            &ip,
            l4,
            12,
            (mapping.addr, mapping.port),
            sport,
            At::Source,
        );
        Ok(verdict(out, done))
    }

    /// A SYN on a closed flow's mapping starts a new flow on it, if the port is still its.
    fn reopen(&mut self, key: &NatKey) -> bool {
        let mapped = self.out[key];
        let reply = reply_key(key, mapped.port);
        let Some(held) = self.back.get(&reply).copied() else {
            return false;
        };
        if held.addr != key.src_ip || held.port != key.src_port {
            return false;
        }
        if (mapped.state | held.state) & NAT_SEEN_CLOSE == 0 {
            return true;
        }
        // The claim is always new: one program runs at a time, and a holder's timestamp
        // never comes back.
        self.back.insert(
            reply,
            NatEntry {
                state: 0,
                last_seen_ns: NOW,
                ..held
            },
        );
        let mapped = self.out.get_mut(key).expect("the flow's mapping");
        mapped.state = 0;
        mapped.last_seen_ns = NOW;
        self.event = Some(Event::Reopened);
        true
    }

    /// A new mapping for `key`: any port the rules allow (the kernel's choice when it is
    /// one), `None` when there is none.
    fn allocate(
        &mut self,
        key: &NatKey,
        now: Window,
        chosen: Option<u16>,
    ) -> Result<Option<NatEntry>, Undecided> {
        let (min, max) = self.ports;
        if min == 0 || max < min {
            self.event = Some(Event::AllocFailed);
            return Ok(None);
        }
        let mut free = Vec::new();
        for port in min..=max {
            let reply = reply_key(key, port.to_be_bytes());
            let Some(held) = self.back.get(&reply) else {
                free.push((port, Free::Unused));
                continue;
            };
            let dst_port = if key.protocol == IPPROTO_ICMP {
                held.port
            } else {
                key.dst_port
            };
            let old = NatKey::new(key.protocol, held.addr, held.port, key.dst_ip, dst_port);
            let (out_state, last) = match self.out.get(&old) {
                Some(o) => (o.state, o.last_seen_ns.max(held.last_seen_ns)),
                None => (NAT_SEEN_CLOSE, held.last_seen_ns),
            };
            if finished(key.protocol, out_state, held.state, last, now)? {
                free.push((port, Free::FromFinished(old)));
            }
        }
        let Some(&(port, how)) = free
            .iter()
            .find(|(p, _)| Some(*p) == chosen)
            .or(free.first())
        else {
            self.event = Some(Event::AllocFailed);
            return Ok(None);
        };
        let mapping = entry(NODE_IP, port.to_be_bytes());
        let reply = reply_key(key, mapping.port);
        self.back.insert(reply, entry(key.src_ip, key.src_port));
        match how {
            Free::Unused => {
                self.entries += 1;
                self.event = Some(Event::Allocated);
            }
            Free::FromFinished(old) => {
                self.out.remove(&old);
                self.event = Some(Event::TookOver);
            }
        }
        self.out.insert(*key, mapping);
        Ok(Some(mapping))
    }

    /// `from_netdev`'s NAT part on a frame to the node: `None` when it is not a reply (or
    /// an ICMP error) of a translated flow.
    fn reverse(&mut self, f: &[u8], ip: &Ip, now: Window) -> Result<Option<Expected>, Undecided> {
        self.event = None;
        if self.ports.1 == 0 || ip.frag_off & 0x1fff != 0 {
            return Ok(None);
        }
        let l4 = 14 + ip.header_len;
        if ip.protocol == IPPROTO_ICMP {
            let Some(kind) = icmp_type(f, l4) else {
                return Ok(None);
            };
            if matches!(kind, 3 | 11 | 12) {
                return Ok(self.icmp_error(f, ip, l4));
            }
            if kind != 0 {
                return Ok(None);
            }
        }
        let Some((sport, dport)) = ports(f, ip.protocol, l4) else {
            return Ok(None);
        };
        let port = u16::from_be_bytes(dport);
        if port < self.ports.0 || port > self.ports.1 {
            return Ok(None);
        }
        let key = NatKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport);
        let Some(mut pod) = self.back.get(&key).copied() else {
            return Ok(None);
        };
        touch(&mut pod, now, closing(f, ip.protocol, l4))?;
        pod.state |= NAT_SEEN_REPLY;
        self.back.insert(key, pod);
        let mut out = f.to_vec();
        let done = rewrite(
            &mut out,
            ip,
            l4,
            16,
            (pod.addr, pod.port),
            dport,
            At::Destination,
        );
        Ok(Some(verdict(out, done)))
    }

    /// An ICMP error quoting a packet of a translated flow: the outer destination and the
    /// quoted source go back to the pod's; the quoted L4 checksum stays.
    fn icmp_error(&mut self, f: &[u8], ip: &Ip, l4: usize) -> Option<Expected> {
        let inner_off = l4 + 8;
        let inner = Ip::at(f, inner_off)?;
        if inner.saddr != ip.daddr || f[inner_off] >> 4 != 4 || inner.header_len < 20 {
            return None;
        }
        let inner_l4 = inner_off + inner.header_len;
        let (sport, dport) = ports(f, inner.protocol, inner_l4)?;
        let key = NatKey::new(inner.protocol, inner.daddr, dport, inner.saddr, sport);
        let pod = *self.back.get(&key)?;
        let mut out = f.to_vec();
        let port_off = if inner.protocol == IPPROTO_ICMP {
            inner_l4 + 4
        } else {
            inner_l4
        };
        let done = (|| {
            store(&mut out, inner_off + 12, &pod.addr)?;
            l3_replace(&mut out, inner_off + 10, &inner.saddr, &pod.addr)?;
            store(&mut out, port_off, &pod.port)?;
            l4_replace(&mut out, l4 + 2, &sport, &pod.port, false)?;
            store(&mut out, 30, &pod.addr)?;
            l3_replace(&mut out, 24, &ip.daddr, &pod.addr)
        })();
        self.event = Some(Event::IcmpError);
        Some(verdict(out, done))
    }

    /// Everything the tables must satisfy, whatever happened: each flow's mapping is on
    /// the node, in the range, and its port's replies go back to it; each reply key is
    /// some flow's (so no two flows share one, and no reply reaches another flow's pod).
    pub fn broken_invariant(&self) -> Option<String> {
        for (key, mapped) in &self.out {
            let port = u16::from_be_bytes(mapped.port);
            if mapped.addr != NODE_IP || port < self.ports.0 || port > self.ports.1 {
                return Some(format!("{key:?} mapped to {mapped:?}"));
            }
            let reply = reply_key(key, mapped.port);
            match self.back.get(&reply) {
                Some(pod) if flow_of(&reply, pod) == *key => {}
                other => return Some(format!("{key:?} → {mapped:?}: its replies go to {other:?}")),
            }
        }
        for (reply, pod) in &self.back {
            let flow = flow_of(reply, pod);
            match self.out.get(&flow) {
                Some(mapped) if reply_key(&flow, mapped.port) == *reply => {}
                other => {
                    return Some(format!(
                        "replies {reply:?} go to {pod:?}, whose flow maps to {other:?}"
                    ))
                }
            }
        }
        None
    }

    /// Time moves on by `ns`: every timestamp is that much older.
    pub fn age(&mut self, ns: u64) {
        for e in self.out.values_mut().chain(self.back.values_mut()) {
            e.last_seen_ns -= ns;
        }
    }

    /// The oldest timestamp (`u64::MAX` with none).
    pub fn oldest(&self) -> u64 {
        self.out
            .values()
            .chain(self.back.values())
            .map(|e| e.last_seen_ns)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Compares a table with the kernel's: the same keys and values, a timestamp this
    /// step wrote within `now` (and the same in every entry), which the model adopts.
    pub fn adopt(
        &mut self,
        reverse: bool,
        kernel: &[(NatKey, NatEntry)],
        now: Window,
        step_ns: &mut Option<u64>,
    ) -> Result<(), String> {
        let name = if reverse { "nat_reverse" } else { "nat" };
        let table = if reverse {
            &mut self.back
        } else {
            &mut self.out
        };
        if kernel.len() != table.len() {
            return Err(format!(
                "{name}: the kernel holds {} entries, the model {}",
                kernel.len(),
                table.len()
            ));
        }
        for (key, got) in kernel {
            let Some(want) = table.get_mut(key) else {
                return Err(format!(
                    "{name}: the kernel holds {key:?} → {got:?}, the model not"
                ));
            };
            let same = NatEntry {
                last_seen_ns: got.last_seen_ns,
                ..*want
            };
            let time_ok = if want.last_seen_ns == NOW {
                let t = got.last_seen_ns;
                t >= now.earliest && t <= now.latest && step_ns.is_none_or(|s| s == t)
            } else {
                want.last_seen_ns == got.last_seen_ns
            };
            if same != *got || !time_ok {
                return Err(format!(
                    "{name}: {key:?}: the kernel holds {got:?}, the model {want:?} (step between {} and {} ns)",
                    now.earliest, now.latest
                ));
            }
            if want.last_seen_ns == NOW {
                *step_ns = Some(got.last_seen_ns);
            }
            want.last_seen_ns = got.last_seen_ns;
        }
        Ok(())
    }
}

impl Model {
    /// `to_netdev` with BPF source NAT (the stack's own traffic passes).
    pub fn on_uplink_egress(
        &mut self,
        f: &[u8],
        now: Window,
        kernel: &[(NatKey, NatEntry)],
    ) -> Result<Expected, Undecided> {
        self.nat.to_netdev(f, now, kernel)
    }

    /// `from_netdev` with BPF source NAT: replies of translated flows first, then the rest.
    pub fn on_uplink_at(&mut self, f: &[u8], now: Window) -> Result<Expected, Undecided> {
        if let Some(ip) = Ip::parse(f).filter(|ip| ip.daddr == NODE_IP) {
            if let Some(want) = self.nat.reverse(f, &ip, now)? {
                return Ok(want);
            }
        }
        Ok(self.on_uplink(f))
    }

    /// `from_pod` with BPF source NAT: the verdict as without, and the mark.
    pub fn on_pod_veth_marked(&self, f: &[u8]) -> Expected {
        Expected {
            mark: Some(self.nat.mark(f)),
            ..self.on_pod_veth(f)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Checksums, computed whole (independent of the incremental arithmetic above)

/// Whether every checksum of a well-formed IPv4 frame holds: the header's, and the TCP,
/// UDP (unless zero) or ICMP one over the packet; of an ICMP error, also the quoted
/// header's.
pub fn checksums_hold(f: &[u8]) -> bool {
    let Some(ip) = Ip::parse(f) else {
        return true;
    };
    let end = 14 + ip.total_len;
    let l4 = 14 + ip.header_len;
    if checksum(&f[14..l4]) != 0 {
        return false;
    }
    let segment = &f[l4..end];
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            if ip.protocol == IPPROTO_UDP && segment.get(6..8) == Some(&[0, 0]) {
                return true;
            }
            let mut pseudo = [&ip.saddr[..], &ip.daddr, &[0, ip.protocol]].concat();
            pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
            checksum(&[pseudo, segment.to_vec()].concat()) == 0
        }
        IPPROTO_ICMP => {
            if checksum(segment) != 0 {
                return false;
            }
            match (segment.first(), Ip::at(segment, 8)) {
                (Some(3 | 11 | 12), Some(inner)) if segment.len() >= 8 + inner.header_len => {
                    checksum(&segment[8..8 + inner.header_len]) == 0
                }
                _ => true,
            }
        }
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------
// The generator

/// Outside destinations: two hosts, one excluded from NAT, a multicast group.
const OUTSIDE: [[u8; 4]; 4] = [
    [93, 184, 216, 34],
    [192, 0, 2, 80],
    [203, 0, 113, 5],
    [224, 0, 0, 251],
];
/// A router on the way, which answers with ICMP errors of its own.
const ROUTER: [u8; 4] = [192, 0, 2, 1];
const PODS: [[u8; 4]; 2] = [LOCAL_POD, OTHER_LOCAL_IP];

/// A flow a pod may open.
#[derive(Clone, Copy, Debug)]
struct Flow {
    protocol: u8,
    pod: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
}

/// A TCP segment, UDP datagram or ICMP echo with a valid checksum (UDP: sometimes none).
fn l4_packet(
    rng: &mut Rng,
    protocol: u8,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    kind: u8,
) -> Vec<u8> {
    let len = rng.below(24);
    let payload = rng.bytes(len);
    let (mut seg, check_at) = match protocol {
        IPPROTO_TCP => {
            let mut h = [&src.1.to_be_bytes()[..], &dst.1.to_be_bytes()].concat();
            h.extend_from_slice(&(rng.word() as u32).to_be_bytes());
            h.extend_from_slice(&(rng.word() as u32).to_be_bytes());
            h.extend_from_slice(&[0x50, kind, 0xfa, 0xf0, 0, 0, 0, 0]);
            (h, 16)
        }
        IPPROTO_UDP => {
            let len = (8 + payload.len()) as u16;
            let h = [
                &src.1.to_be_bytes()[..],
                &dst.1.to_be_bytes(),
                &len.to_be_bytes(),
                &[0, 0],
            ]
            .concat();
            (h, 6)
        }
        _ => {
            let id = if kind == 0 { dst.1 } else { src.1 };
            let h = [&[kind, 0, 0, 0][..], &id.to_be_bytes(), &[0, 1]].concat();
            (h, 2)
        }
    };
    seg.extend_from_slice(&payload);
    let sum = if protocol == IPPROTO_ICMP {
        checksum(&seg)
    } else {
        let mut pseudo = [&src.0[..], &dst.0, &[0, protocol]].concat();
        pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        let sum = checksum(&[pseudo, seg.clone()].concat());
        if protocol == IPPROTO_UDP && sum == 0 {
            0xffff
        } else {
            sum
        }
    };
    if !(protocol == IPPROTO_UDP && rng.chance(15)) {
        seg[check_at..check_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    seg
}

/// An IPv4 frame on the uplink's segment (between the node and its gateway, the peer).
fn frame_of(src: [u8; 4], dst: [u8; 4], protocol: u8, seg: &[u8]) -> Vec<u8> {
    let ip = ipv4(src, dst, 64, protocol, seg);
    let (to, from) = if src == NODE_IP || in_network(src) {
        (PEER_MAC, UPLINK_MAC)
    } else {
        (UPLINK_MAC, PEER_MAC)
    };
    ethernet(to, from, ETH_P_IP, &ip)
}

const TCP_FLAGS: [u8; 8] = [
    TCP_SYN,
    TCP_SYN,
    TCP_ACK,
    TCP_ACK | 0x08,
    TCP_FIN | TCP_ACK,
    TCP_RST,
    TCP_RST | TCP_ACK,
    TCP_SYN | TCP_FIN,
];

/// One NAT sequence's frames, made as it goes: it knows the flows it opened and the
/// translated packets the node sent, to answer them.
pub struct Scenario {
    flows: Vec<Flow>,
    /// Translated packets as they left (for replies' ICMP errors to quote).
    pub sent: Vec<Vec<u8>>,
}

/// One step of a sequence.
pub enum Step {
    /// A frame through a program: (program, frame, unmutated: its checksums hold).
    Frame(&'static str, Vec<u8>, bool),
    /// Time moves on by this many ns.
    Age(u64),
}

impl Scenario {
    pub fn new(rng: &mut Rng) -> Scenario {
        let flows = (0..2 + rng.below(7))
            .map(|_| Flow {
                protocol: rng.pick(&[IPPROTO_TCP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP]),
                pod: rng.pick(&PODS),
                sport: rng.pick(&[1000, 1001, 1002, 33000]),
                dst: if rng.chance(80) {
                    rng.pick(&OUTSIDE[..2])
                } else {
                    rng.pick(&OUTSIDE)
                },
                dport: rng.pick(&[80, 53, 443]),
            })
            .collect();
        Scenario {
            flows,
            sent: Vec::new(),
        }
    }

    /// The next step, given the model's tables (for replies to the ports it holds).
    pub fn step(&mut self, rng: &mut Rng, nat: &Nat) -> Step {
        let (program, f) = match rng.below(100) {
            0..=44 => {
                let flow = rng.pick(&self.flows);
                let kind = match flow.protocol {
                    IPPROTO_TCP => rng.pick(&TCP_FLAGS),
                    IPPROTO_ICMP if rng.chance(10) => 0,
                    _ => 8,
                };
                let seg = l4_packet(
                    rng,
                    flow.protocol,
                    (flow.pod, flow.sport),
                    (flow.dst, flow.dport),
                    kind,
                );
                let f = frame_of(flow.pod, flow.dst, flow.protocol, &seg);
                let program = if rng.chance(25) {
                    weft_common::PROG_FROM_POD
                } else {
                    weft_common::PROG_TO_NETDEV
                };
                (program, f)
            }
            45..=74 => (weft_common::PROG_FROM_NETDEV, self.reply(rng, nat)),
            75..=86 => (weft_common::PROG_FROM_NETDEV, self.icmp_error(rng)),
            87..=91 => self.node_own(rng),
            92..=93 => {
                // A later fragment of a pod's datagram.
                let flow = rng.pick(&self.flows);
                let mut ip = ipv4(flow.pod, flow.dst, 64, flow.protocol, &rng.bytes(16));
                ip[6..8].copy_from_slice(&0x0004u16.to_be_bytes());
                ip[10..12].copy_from_slice(&[0, 0]);
                let sum = checksum(&ip[..20]);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                let f = ethernet(PEER_MAC, UPLINK_MAC, ETH_P_IP, &ip);
                (weft_common::PROG_TO_NETDEV, f)
            }
            _ => {
                let age = rng.pick(&[
                    25_000_000,
                    25_000_000,
                    250_000_000,
                    1_500_000_000,
                    31 * SECS,
                    121 * SECS,
                ]);
                return Step::Age(age);
            }
        };
        if rng.chance(12) {
            return Step::Frame(program, super::mutate(rng, f), false);
        }
        Step::Frame(program, f, true)
    }

    /// A reply from a destination: to a port some flow holds, mostly, or to another.
    fn reply(&self, rng: &mut Rng, nat: &Nat) -> Vec<u8> {
        // In a fixed order: the same seed, the same picks.
        let mut held: Vec<_> = nat.back.keys().copied().collect();
        held.sort_by_key(|k| (k.protocol, k.src_ip, k.src_port, k.dst_ip, k.dst_port));
        let (protocol, src, sport, dport) = if !held.is_empty() && rng.chance(80) {
            let k = rng.pick(&held);
            let sport = if rng.chance(5) {
                rng.word() as u16
            } else {
                u16::from_be_bytes(k.src_port)
            };
            (k.protocol, k.src_ip, sport, u16::from_be_bytes(k.dst_port))
        } else {
            let flow = rng.pick(&self.flows);
            let port = if rng.chance(70) {
                nat.ports.0 + rng.below(usize::from(nat.ports.1 - nat.ports.0) + 1) as u16
            } else {
                rng.pick(&[40000, 61999, nat.ports.1.wrapping_add(1)])
            };
            (flow.protocol, flow.dst, flow.dport, port)
        };
        let kind = match protocol {
            IPPROTO_TCP => rng.pick(&[
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_ACK | 0x08,
                TCP_FIN | TCP_ACK,
                TCP_RST,
            ]),
            _ => 0,
        };
        let seg = l4_packet(rng, protocol, (src, sport), (NODE_IP, dport), kind);
        frame_of(src, NODE_IP, protocol, &seg)
    }

    /// An ICMP error about a packet the node sent: port unreachable, fragmentation needed,
    /// time exceeded, a parameter problem; from its destination or a router; quoting the
    /// header and 8 bytes, or the whole packet.
    fn icmp_error(&self, rng: &mut Rng) -> Vec<u8> {
        let quoted = match self.sent.len() {
            0 => {
                let flow = rng.pick(&self.flows);
                let seg = l4_packet(rng, flow.protocol, (NODE_IP, 61000), (flow.dst, 80), 8);
                frame_of(NODE_IP, flow.dst, flow.protocol, &seg)
            }
            n => self.sent[n - 1 - rng.below(n.min(4))].clone(),
        };
        let Some(ip) = Ip::parse(&quoted) else {
            return quoted;
        };
        let whole = &quoted[14..14 + ip.total_len];
        let quote = if rng.chance(50) {
            &whole[..whole.len().min(ip.header_len + 8)]
        } else {
            whole
        };
        let (kind, code, rest) = rng.pick(&[
            (3u8, 3u8, [0u8, 0, 0, 0]),
            (3, 4, [0, 0, 0x05, 0x78]),
            (11, 0, [0, 0, 0, 0]),
            (12, 0, [20, 0, 0, 0]),
        ]);
        let mut icmp = [&[kind, code, 0, 0][..], &rest, quote].concat();
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let from = if kind == 3 && code == 3 {
            ip.daddr
        } else {
            ROUTER
        };
        frame_of(from, NODE_IP, IPPROTO_ICMP, &icmp)
    }

    /// The node's own traffic: out of the uplink from its address, and answers to it.
    fn node_own(&self, rng: &mut Rng) -> (&'static str, Vec<u8>) {
        let flow = rng.pick(&self.flows);
        let port = rng.pick(&[40000, 61000, 61001]);
        if rng.chance(50) {
            let kind = rng.pick(&TCP_FLAGS);
            let seg = l4_packet(rng, flow.protocol, (NODE_IP, port), (flow.dst, 80), kind);
            let f = frame_of(NODE_IP, flow.dst, flow.protocol, &seg);
            (weft_common::PROG_TO_NETDEV, f)
        } else {
            let seg = l4_packet(rng, flow.protocol, (flow.dst, 80), (NODE_IP, port), TCP_ACK);
            let f = frame_of(flow.dst, NODE_IP, flow.protocol, &seg);
            (weft_common::PROG_FROM_NETDEV, f)
        }
    }
}
