//! weft's TC filters: a `cls_bpf` filter in direct-action mode on the ingress or egress of a
//! clsact qdisc, at a fixed priority and handle, attached through netlink. Each program has
//! its one hook (`weft_common::ALL_PROGRAMS`).
//!
//! Netlink filters (unlike tcx links) stay attached when the agent exits, so traffic keeps
//! flowing while it restarts; the fixed priority and handle let the next run replace them
//! in place (one netlink request: there is no moment without a filter) and let cleanup find
//! exactly weft's filters.

use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use aya::programs::links::Link as _;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use futures::TryStreamExt;
use netlink_packet_route::tc::{
    TcAttribute, TcFilterBpfOption, TcHandle as NlTcHandle, TcMessage, TcOption,
};
use rtnetlink::Handle;

use weft_common::ALL_PROGRAMS;

use super::object;
use crate::backend::netlink::{self as nl, Link};

/// The priority (`pref` in `tc filter show`) of weft's filters: "we" in ASCII, below the
/// 49152 the kernel picks for filters added without one, so weft's run first.
pub const PRIORITY: u16 = 0x7765;
/// The handle of weft's filter at [`PRIORITY`].
pub const HANDLE: u32 = 1;
/// Whether a program runs on the TC egress (else ingress) hook.
fn is_egress(name: &str) -> bool {
    ALL_PROGRAMS
        .iter()
        .any(|(program, hook)| *program == name && hook.egress())
}

fn attach_type(egress: bool) -> TcAttachType {
    if egress {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

fn hook_name(egress: bool) -> &'static str {
    if egress {
        "egress"
    } else {
        "ingress"
    }
}

/// A weft filter found on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    /// The id of the program it runs.
    pub prog_id: Option<u32>,
}

fn filter_of(msg: &TcMessage) -> Option<Filter> {
    let priority = (msg.header.info >> 16) as u16;
    if priority != PRIORITY || u32::from(msg.header.handle) != HANDLE {
        return None;
    }
    let kind = msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(kind) => Some(kind.as_str()),
        _ => None,
    })?;
    if kind != "bpf" {
        return None;
    }
    let options = msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(options) => Some(options),
        _ => None,
    })?;
    let mut filter = Filter {
        name: String::new(),
        prog_id: None,
    };
    for option in options {
        match option {
            TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => filter.name = name.clone(),
            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = Some(*id),
            _ => {}
        }
    }
    ALL_PROGRAMS
        .iter()
        .any(|(name, _)| *name == filter.name)
        .then_some(filter)
}

async fn filters(handle: &Handle, ifindex: u32, ingress: bool) -> Result<Vec<TcMessage>> {
    let request = handle.traffic_filter(ifindex as i32).get();
    let request = if ingress {
        request.ingress()
    } else {
        request.egress()
    };
    match request.execute().try_collect().await {
        Ok(list) => Ok(list),
        // No clsact qdisc (or no interface any more): no filters.
        Err(e)
            if matches!(
                nl::errno(&e),
                Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(e).with_context(|| format!("listing the TC filters of interface #{ifindex}")),
    }
}

/// Another component's traffic control on interface `ifindex`, described for the log: a
/// qdisc other than `noqueue` and `clsact` (the bandwidth plugin's `tbf`, an `ingress`
/// qdisc), or a filter on clsact that is not weft's. `None` when there is none.
pub async fn foreign_tc(handle: &Handle, ifindex: u32) -> Result<Option<String>> {
    let qdiscs: Vec<TcMessage> = match handle
        .qdisc()
        .get()
        .index(ifindex as i32)
        .execute()
        .try_collect()
        .await
    {
        Ok(list) => list,
        Err(e) if matches!(nl::errno(&e), Some(libc::ENODEV | libc::ENOENT)) => Vec::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("listing the qdiscs of interface #{ifindex}"))
        }
    };
    for qdisc in qdiscs.iter().filter(|q| q.header.index == ifindex as i32) {
        let kind = qdisc.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(kind) => Some(kind.as_str()),
            _ => None,
        });
        match kind {
            Some("noqueue" | "clsact") | None => {}
            Some(kind) => return Ok(Some(format!("qdisc {kind}"))),
        }
    }
    for ingress in [true, false] {
        let others = filters(handle, ifindex, ingress)
            .await?
            .iter()
            // At weft's priority: its filter, or the entry the kernel lists before it.
            .filter(|f| (f.header.info >> 16) as u16 != PRIORITY)
            .filter_map(|f| {
                f.attributes.iter().find_map(|a| match a {
                    TcAttribute::Kind(kind) => Some(kind.clone()),
                    _ => None,
                })
            })
            .next();
        if let Some(kind) = others {
            return Ok(Some(format!("{kind} filter on {}", hook_name(!ingress))));
        }
    }
    Ok(None)
}

/// weft's filter on the TC ingress (or egress) of interface `ifindex`, if there is one.
pub async fn weft_filter(handle: &Handle, ifindex: u32, egress: bool) -> Result<Option<Filter>> {
    Ok(filters(handle, ifindex, !egress)
        .await?
        .iter()
        .find_map(filter_of))
}

/// How [`attach`] installed the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The filter an earlier run left was switched to this program in place.
    Replaced,
    /// There was no weft filter: one was created (with the clsact qdisc if needed).
    Created,
}

/// Attaches `program` to the TC ingress (or egress) of interface `ifname`: replaces weft's
/// filter there in place if there is one, else creates it. The filter stays when the agent
/// exits.
pub fn attach(program: &mut SchedClassifier, ifname: &str, egress: bool) -> Result<Attached> {
    let replaced = SchedClassifierLink::attached(
        ifname,
        attach_type(egress),
        PRIORITY,
        TcHandle::from(HANDLE),
        None,
    )
    .map_err(anyhow::Error::from)
    // On failure the link is consumed without detaching anything.
    .and_then(|existing| {
        program
            .attach_to_link(existing)
            .map_err(anyhow::Error::from)
    });
    let (id, how) = match replaced {
        Ok(id) => (id, Attached::Replaced),
        Err(replace_error) => {
            // Usually: no weft filter yet (ENOENT), or no clsact qdisc.
            let clsact = tc::qdisc_add_clsact(ifname);
            let options = NlOptions {
                priority: PRIORITY,
                handle: TcHandle::from(HANDLE),
                classid: None,
            };
            let id = program
                .attach_with_options(
                    ifname,
                    attach_type(egress),
                    TcAttachOptions::Netlink(options),
                )
                .map_err(|e| {
                    let clsact = match &clsact {
                        Err(tc::TcError::NetlinkError(n))
                            if n.raw_os_error() == Some(libc::EEXIST) =>
                        {
                            String::new()
                        }
                        Err(e) => format!("; adding the clsact qdisc failed: {e}"),
                        Ok(()) => String::new(),
                    };
                    anyhow!(
                        "attaching {} to the TC {} of {ifname} failed: {e}{clsact} \
                         (replacing weft's filter failed too: {replace_error:#})",
                        program_name(program),
                        hook_name(egress)
                    )
                })?;
            (id, Attached::Created)
        }
    };
    // aya detaches links when they are dropped: weft's filters must outlive the agent.
    let link = program
        .take_link(id)
        .context("taking the TC link out of aya")?;
    std::mem::forget(link);
    Ok(how)
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attached::Replaced => "replaced the filter of the previous run in place",
            Attached::Created => "new filter",
        })
    }
}

/// Attaches program `name` of `ebpf` to its TC hook on interface `ifindex` (`ifname`)
/// unless weft's filter there already runs this very program. Returns what was done.
pub async fn ensure_attached(
    handle: &Handle,
    ebpf: &Mutex<Ebpf>,
    name: &str,
    ifindex: u32,
    ifname: &str,
) -> Result<Option<Attached>> {
    let prog_id = {
        let mut ebpf = ebpf.lock().expect("the eBPF object lock is never poisoned");
        object::classifier(&mut ebpf, name)?.info()?.id()
    };
    let egress = is_egress(name);
    if let Some(filter) = weft_filter(handle, ifindex, egress).await? {
        if filter.name == name && filter.prog_id == Some(prog_id) {
            return Ok(None);
        }
    }
    let mut ebpf = ebpf.lock().expect("the eBPF object lock is never poisoned");
    attach(object::classifier(&mut ebpf, name)?, ifname, egress).map(Some)
}

fn program_name(program: &SchedClassifier) -> String {
    program
        .info()
        .ok()
        .and_then(|i| i.name_as_str().map(str::to_string))
        .unwrap_or_else(|| "the program".to_string())
}

/// Removes weft's filters from the ingress and egress of `link` (and the clsact qdisc if no
/// filter is left on it). Returns the names of the programs that were attached.
pub async fn detach(handle: &Handle, link: &Link) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for egress in [false, true] {
        let Some(filter) = weft_filter(handle, link.index, egress).await? else {
            continue;
        };
        SchedClassifierLink::attached(
            &link.name,
            attach_type(egress),
            PRIORITY,
            TcHandle::from(HANDLE),
            None,
        )
        .with_context(|| format!("looking up {}", link.name))?
        .detach()
        .with_context(|| {
            format!(
                "removing weft's TC filter {} from the {} of {}",
                filter.name,
                hook_name(egress),
                link.name
            )
        })?;
        removed.push(filter.name);
    }
    if !removed.is_empty()
        && filters(handle, link.index, true).await?.is_empty()
        && filters(handle, link.index, false).await?.is_empty()
    {
        remove_clsact(handle, link.index).await?;
    }
    Ok(removed)
}

/// Deletes the clsact qdisc of interface `ifindex` (fine if there is none).
async fn remove_clsact(handle: &Handle, ifindex: u32) -> Result<()> {
    let mut request = handle.qdisc().del(ifindex as i32);
    let msg = request.message_mut();
    msg.header.parent = NlTcHandle::CLSACT;
    msg.header.handle = NlTcHandle {
        major: 0xffff,
        minor: 0,
    };
    match request.execute().await {
        Err(e)
            if !matches!(
                nl::errno(&e),
                Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            Err(e).with_context(|| format!("deleting the clsact qdisc of interface #{ifindex}"))
        }
        _ => Ok(()),
    }
}

/// Removes weft's filters from every interface. Returns `(interface, program)` pairs.
pub async fn detach_everywhere(handle: &Handle) -> Result<Vec<(String, String)>> {
    let mut removed = Vec::new();
    for link in nl::links(handle).await? {
        for name in detach(handle, &link).await? {
            removed.push((link.name.clone(), name));
        }
    }
    Ok(removed)
}
