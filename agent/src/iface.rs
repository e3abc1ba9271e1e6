//! Choosing the external interface: the one that carries traffic between nodes.
//!
//! flanneld's rules: `--iface` entries (names or IPs) are tried in order, then
//! `--iface-regex` entries (matched against IPs first, then names); only when neither flag
//! is given, `--iface-can-reach` picks the interface of the route to that address, and
//! without it the default route's interface is used.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use regex::Regex;

use crate::backend::netlink::{self, Link};

/// The interface inter-node traffic uses, and the address peers reach this node at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtIface {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address (the VXLAN `local` address).
    pub addr: Ipv4Addr,
    /// The address published in the lease (`--public-ip`, else `addr`).
    pub public_ip: Ipv4Addr,
    pub mtu: u32,
}

/// The flags that choose the external interface (flanneld's names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceSelection {
    /// `--iface`: interface names or IPs, tried in order.
    pub iface: Vec<String>,
    /// `--iface-regex`: patterns matched against IPs, then names; tried in order.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`: use the interface of the route to this address.
    pub iface_can_reach: Option<Ipv4Addr>,
    /// `--public-ip`: the address to publish instead of the interface's.
    pub public_ip: Option<Ipv4Addr>,
}

/// An interface with its usable IPv4 addresses, preferred first.
struct Candidate {
    link: Link,
    addrs: Vec<Ipv4Addr>,
}

impl Candidate {
    fn describe(&self) -> String {
        match self.addrs.first() {
            Some(ip) => format!("{} ({ip})", self.link.name),
            None => self.link.name.clone(),
        }
    }
}

/// Finds the external interface as flanneld does (see the module docs).
pub async fn select_ext_iface(
    handle: &rtnetlink::Handle,
    args: &IfaceSelection,
) -> Result<ExtIface> {
    let candidates = inventory(handle).await?;
    let (chosen, addr) = if !args.iface.is_empty() || !args.iface_regex.is_empty() {
        explicit_choice(&candidates, args)?
    } else if let Some(target) = args.iface_can_reach {
        let lookup = netlink::route_get(handle, target)
            .await
            .with_context(|| format!("--iface-can-reach {target}: no route to it; add one or choose the interface with --iface"))?;
        let index = lookup.oif.with_context(|| {
            format!("--iface-can-reach {target}: the route to it has no output interface")
        })?;
        let chosen = by_index(&candidates, index)?;
        let addr = match lookup.prefsrc {
            Some(src) => src,
            None => first_addr(
                chosen,
                &format!("the route to {target} (--iface-can-reach)"),
            )?,
        };
        (chosen, addr)
    } else {
        let index = default_route_iface(handle).await?;
        let chosen = by_index(&candidates, index)?;
        (chosen, first_addr(chosen, "the default route")?)
    };
    if chosen.link.mtu == 0 {
        bail!("cannot determine the MTU of interface {}", chosen.link.name);
    }
    Ok(ExtIface {
        name: chosen.link.name.clone(),
        index: chosen.link.index,
        addr,
        public_ip: args.public_ip.unwrap_or(addr),
        mtu: chosen.link.mtu,
    })
}

/// Every interface with its usable IPv4 addresses: global unicast first, then link-local
/// (flannel's preference); loopback addresses are never usable.
async fn inventory(handle: &rtnetlink::Handle) -> Result<Vec<Candidate>> {
    let links = netlink::links(handle).await?;
    let addrs = netlink::ipv4_addrs(handle, None).await?;
    Ok(links
        .into_iter()
        .map(|link| {
            let mine = || {
                addrs
                    .iter()
                    .filter(|a| a.index == link.index)
                    .map(|a| a.net.ip())
            };
            let global = mine().filter(|ip| is_global_unicast(*ip));
            let link_local = mine().filter(|ip| ip.is_link_local());
            let addrs = global.chain(link_local).collect();
            Candidate { link, addrs }
        })
        .collect())
}

/// Go's `IP.IsGlobalUnicast` for IPv4 (private ranges count as global).
fn is_global_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified())
}

fn by_index(candidates: &[Candidate], index: u32) -> Result<&Candidate> {
    candidates
        .iter()
        .find(|c| c.link.index == index)
        .with_context(|| {
            format!("interface #{index} disappeared while choosing the external interface")
        })
}

fn first_addr(chosen: &Candidate, why: &str) -> Result<Ipv4Addr> {
    chosen.addrs.first().copied().with_context(|| {
        format!(
            "interface {} (chosen by {why}) has no IPv4 address: give it one, or choose another interface with --iface",
            chosen.link.name
        )
    })
}

/// `--iface` entries in order, then `--iface-regex` entries in order; the first usable
/// match wins. The error lists why each entry failed and what interfaces exist.
fn explicit_choice<'a>(
    candidates: &'a [Candidate],
    args: &IfaceSelection,
) -> Result<(&'a Candidate, Ipv4Addr)> {
    let mut failures = Vec::new();
    for entry in &args.iface {
        match by_name_or_ip(candidates, entry) {
            Ok(found) => return Ok(found),
            Err(why) => failures.push(format!("--iface {entry}: {why}")),
        }
    }
    for pattern in &args.iface_regex {
        let re = Regex::new(pattern).with_context(|| {
            format!("--iface-regex {pattern:?} is not a valid regular expression")
        })?;
        match by_regex(candidates, &re) {
            Ok(found) => return Ok(found),
            Err(why) => failures.push(format!("--iface-regex {pattern}: {why}")),
        }
    }
    let available: Vec<String> = candidates.iter().map(Candidate::describe).collect();
    bail!(
        "no interface given by --iface/--iface-regex is usable ({}); interfaces here: {}",
        failures.join("; "),
        available.join(", ")
    )
}

fn by_name_or_ip<'a>(
    candidates: &'a [Candidate],
    entry: &str,
) -> Result<(&'a Candidate, Ipv4Addr), String> {
    if let Ok(ip) = entry.parse::<Ipv4Addr>() {
        return candidates
            .iter()
            .find(|c| c.addrs.contains(&ip))
            .map(|c| (c, ip))
            .ok_or_else(|| "no interface has this address".to_string());
    }
    let c = candidates
        .iter()
        .find(|c| c.link.name == entry)
        .ok_or_else(|| "no interface has this name".to_string())?;
    let ip = c
        .addrs
        .first()
        .copied()
        .ok_or_else(|| format!("interface {entry} has no IPv4 address"))?;
    Ok((c, ip))
}

fn by_regex<'a>(
    candidates: &'a [Candidate],
    re: &Regex,
) -> Result<(&'a Candidate, Ipv4Addr), String> {
    for c in candidates {
        if let Some(ip) = c.addrs.iter().find(|ip| re.is_match(&ip.to_string())) {
            return Ok((c, *ip));
        }
    }
    let named: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| re.is_match(&c.link.name))
        .collect();
    if let Some(c) = named.iter().find(|c| !c.addrs.is_empty()) {
        return Ok((c, c.addrs[0]));
    }
    if named.is_empty() {
        Err("matches no interface name or IPv4 address".into())
    } else {
        let names: Vec<&str> = named.iter().map(|c| c.link.name.as_str()).collect();
        Err(format!(
            "matches only interfaces without an IPv4 address ({})",
            names.join(", ")
        ))
    }
}

/// The output interface of the default route of the main table (the lowest metric wins).
async fn default_route_iface(handle: &rtnetlink::Handle) -> Result<u32> {
    let routes = netlink::routes(handle).await?;
    let default = routes
        .iter()
        .filter(|r| r.dst.prefix() == 0)
        .min_by_key(|r| r.metric);
    let Some(default) = default else {
        bail!(
            "no default route, so weft cannot tell which interface carries traffic between nodes: \
             choose it with --iface <name or IP>, --iface-regex <pattern> or --iface-can-reach <another node's IP> \
             (and --public-ip <address> if other nodes must reach this one at another address)"
        );
    };
    default
        .oif
        .context("the default route has no output interface: choose the interface with --iface")
}
