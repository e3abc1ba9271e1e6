//! Who else filters forwarded pod traffic on this node.
//!
//! The fast path hands pod packets across nodes past this node's netfilter hooks, so a
//! rule there never sees them: a NetworkPolicy engine that enforces in FORWARD (Calico's
//! felix in canal, kube-router), in raw/mangle PREROUTING, on the pod bridge, or an admin's
//! own DROP would be bypassed in silence. This module reads the node's netfilter and names
//! every rule that could filter forwarded pod traffic:
//!
//! - iptables (`iptables-nft-save` and `iptables-legacy-save`, all tables): the raw, mangle,
//!   filter and security tables' PREROUTING, FORWARD and POSTROUTING rules that drop, reject,
//!   queue, or jump to a chain that does (followed), or to a target it does not know;
//! - nftables (`nft -j list ruleset`): the base chains on the hooks forwarded IPv4 pod
//!   packets pass (ip and inet: prerouting, ingress, forward, postrouting; bridge, for
//!   bridged pod traffic with br_netfilter: every hook; netdev: ingress and egress) that
//!   drop by policy or hold a rule that drops, rejects, queues or jumps to a chain that
//!   does. Chains of type nat are left out (NAT is the stack's, and the fast path leaves
//!   NATed flows to it); so is the ip6 family (the pod network is IPv4, whose packets
//!   never pass ip6 hooks).
//!
//! Known not to change the verdict of a pod packet the fast path carries: kube-proxy's
//! (KUBE-FORWARD drops only INVALID conntrack states, which the fast path's packets never
//! reach; its nftables table `ip kube-proxy` rejects only Service traffic, which the fast
//! path leaves to the stack), flannel's and weft's own forward-accept rules (FLANNEL-FWD,
//! table `ip flannel-ipv4`), and Docker's (they match its bridges only).
//!
//! iptables-nft keeps its rules in nftables tables (`ip filter`, `ip raw`, ...) under
//! iptables' built-in chain names (FORWARD, PREROUTING, ...). Those chains are read through
//! iptables-nft-save, which renders them as iptables rules (a native nft match it cannot
//! render is left out of the rule, so the rule reads broader: it still counts), and are
//! skipped in nft's listing; any other base chain in those tables (`nft add chain ip filter
//! policy { type filter hook forward ... }`) is read from nft's listing. Where
//! iptables-nft-save is missing, nft's listing covers those tables too (a stricter reading:
//! kube-proxy's jumps count there, and the fast path stays off).
//!
//! The probe fails closed: a tool that cannot be run, runs past its deadline, exits
//! non-zero or prints what cannot be parsed makes the result undecided, which switches the
//! fast path off under `--dataplane=auto`. A missing tool is no failure only where that
//! proves there are no rules of its kind: iptables-legacy-save is needed only when the
//! kernel has legacy tables (/proc/net/ip_tables_names), iptables-nft-save is replaced by
//! nft's listing; but nftables rules exist in the kernel whoever wrote them, so without a
//! working `nft -j` the probe cannot decide.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::Value;

use crate::tool::{self, RunError};

/// How long one tool of the probe may run before it is killed (and the probe fails).
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// iptables chains (jump targets from FORWARD) known not to filter pod traffic.
const KNOWN_CHAINS: &[&str] = &[
    "KUBE-FORWARD",
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-PROXY-FIREWALL",
    "KUBE-NODEPORTS",
    "FLANNEL-FWD",
];
/// iptables targets that never drop a packet (or queue it elsewhere).
const BENIGN_TARGETS: &[&str] = &[
    "ACCEPT",
    "RETURN",
    "MARK",
    "CONNMARK",
    "CT",
    "NOTRACK",
    "TOS",
    "DSCP",
    "TCPMSS",
    "CHECKSUM",
    "TTL",
    "LOG",
    "NFLOG",
    "CLASSIFY",
    "SECMARK",
    "CONNSECMARK",
    "TRACE",
];
/// iptables tables whose PREROUTING/FORWARD/POSTROUTING can drop (nat only translates).
const IPTABLES_TABLES: &[&str] = &["raw", "mangle", "filter", "security"];
/// The built-in chains forwarded packets pass.
const IPTABLES_HOOKS: &[&str] = &["PREROUTING", "FORWARD", "POSTROUTING"];
/// What iptables-nft names its tables and built-in chains in nftables.
const IPTABLES_NFT_TABLES: &[&str] = &["raw", "mangle", "filter", "security", "nat"];
const IPTABLES_BUILTIN_CHAINS: &[&str] =
    &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
/// nftables tables known not to filter pod traffic.
const KNOWN_TABLES: &[(&str, &str)] = &[("ip", "kube-proxy"), ("ip", "flannel-ipv4")];

/// A tool the probe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    IptablesNftSave,
    IptablesLegacySave,
    Nft,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::IptablesNftSave, Tool::IptablesLegacySave, Tool::Nft];

    pub fn name(self) -> &'static str {
        match self {
            Tool::IptablesNftSave => "iptables-nft-save",
            Tool::IptablesLegacySave => "iptables-legacy-save",
            Tool::Nft => "nft",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Tool::IptablesNftSave | Tool::IptablesLegacySave => &[],
            Tool::Nft => &["-j", "list", "ruleset"],
        }
    }

    /// What the operator can do when this tool fails.
    fn fix(self) -> &'static str {
        match self {
            Tool::IptablesNftSave => {
                "make iptables-nft-save work in the agent's image (iptables 1.8 or later), or remove it so that nft's listing is read instead"
            }
            Tool::IptablesLegacySave => {
                "install iptables-legacy-save in the agent's image (the kernel has legacy iptables tables)"
            }
            Tool::Nft => {
                "install nftables with JSON support (`nft -j list ruleset` must work) in the agent's image"
            }
        }
    }
}

/// Why a tool of the probe gave no answer (the label of weft_policy_probe_failures_total).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not installed, where that leaves rules unread.
    Missing,
    /// Could not be started.
    Spawn,
    /// Exited non-zero.
    Exit,
    /// Ran past [`PROBE_DEADLINE`] (killed).
    Timeout,
    /// Printed what the probe cannot parse.
    Parse,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Missing,
        Reason::Spawn,
        Reason::Exit,
        Reason::Timeout,
        Reason::Parse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Spawn => "spawn",
            Reason::Exit => "exit",
            Reason::Timeout => "timeout",
            Reason::Parse => "parse",
        }
    }
}

/// One tool that gave no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFailure {
    pub tool: Tool,
    pub reason: Reason,
    pub error: String,
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}); fix: {}",
            self.error,
            self.reason.name(),
            self.tool.fix()
        )
    }
}

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Every hook was read: nothing filters forwarded pod traffic.
    None,
    /// Rules that could filter forwarded pod traffic, each described for the log (e.g.
    /// `iptables (nf_tables): -A FORWARD -j cali-FORWARD`).
    Found(Vec<String>),
    /// Some hooks could not be read; `found` holds what the others showed.
    Undecided {
        failures: Vec<ProbeFailure>,
        found: Vec<String>,
    },
}

/// Failures per tool and reason since the start (weft_policy_probe_failures_total).
static FAILURES: [[AtomicU64; Reason::ALL.len()]; Tool::ALL.len()] =
    [const { [const { AtomicU64::new(0) }; Reason::ALL.len()] }; Tool::ALL.len()];
/// Whether the last probe could not decide (weft_policy_probe_undecided).
static UNDECIDED: AtomicBool = AtomicBool::new(false);

/// The probe's failures so far: (tool, reason, count) for every pair.
pub fn failure_counts() -> Vec<(Tool, Reason, u64)> {
    Tool::ALL
        .iter()
        .enumerate()
        .flat_map(|(t, &tool)| {
            Reason::ALL
                .iter()
                .enumerate()
                .map(move |(r, &reason)| (tool, reason, FAILURES[t][r].load(Relaxed)))
        })
        .collect()
}

/// Whether the last probe could not decide.
pub fn last_undecided() -> bool {
    UNDECIDED.load(Relaxed)
}

/// Reads the node's netfilter with the tools in PATH (each killed past [`PROBE_DEADLINE`]).
/// Blocks: call it off the async runtime.
pub fn probe() -> Probe {
    let probe = probe_with(&|tool| run_tool(tool), legacy_tables());
    let failures = match &probe {
        Probe::Undecided { failures, .. } => failures.as_slice(),
        _ => &[],
    };
    for f in failures {
        let t = Tool::ALL.iter().position(|&t| t == f.tool).unwrap_or(0);
        let r = Reason::ALL.iter().position(|&r| r == f.reason).unwrap_or(0);
        FAILURES[t][r].fetch_add(1, Relaxed);
    }
    UNDECIDED.store(!failures.is_empty(), Relaxed);
    probe
}

/// The names of the kernel's legacy iptables tables in this network namespace (empty:
/// none, so there are no legacy rules to read).
fn legacy_tables() -> Vec<String> {
    std::fs::read_to_string("/proc/net/ip_tables_names")
        .map(|names| names.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// What one tool printed: Ok(stdout), Err((reason, error)) with NotFound as `Missing`.
type ToolOutput = Result<String, (Reason, String)>;

fn run_tool(tool: Tool) -> ToolOutput {
    let args = tool.args();
    let command = format!("{} {}", tool.name(), args.join(" "));
    match tool::run(tool.name(), args, None, PROBE_DEADLINE) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err((
            Reason::Exit,
            format!(
                "`{}` failed ({}): {}",
                command.trim_end(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
        Err(e @ RunError::NotFound { .. }) => Err((Reason::Missing, e.to_string())),
        Err(e @ RunError::Timeout { .. }) => Err((Reason::Timeout, e.to_string())),
        Err(e) => Err((Reason::Spawn, e.to_string())),
    }
}

/// The probe, given how to run each tool and the kernel's legacy table names.
pub fn probe_with(run: &dyn Fn(Tool) -> ToolOutput, legacy: Vec<String>) -> Probe {
    let mut found = Vec::new();
    let mut failures = Vec::new();
    let mut fail = |tool: Tool, (reason, error): (Reason, String)| {
        failures.push(ProbeFailure {
            tool,
            reason,
            error,
        })
    };
    // iptables-nft: its tables are in nft's listing too; read here, skipped there.
    let nft_save_read = match run(Tool::IptablesNftSave) {
        Ok(save) => match iptables_filters(&save) {
            Ok(rules) => {
                found.extend(
                    rules
                        .into_iter()
                        .map(|r| format!("iptables (nf_tables): {r}")),
                );
                true
            }
            Err(e) => {
                fail(Tool::IptablesNftSave, (Reason::Parse, e));
                false
            }
        },
        Err((Reason::Missing, _)) => false,
        Err(e) => {
            fail(Tool::IptablesNftSave, e);
            // nft's listing still has those tables: read them there.
            false
        }
    };
    if !legacy.is_empty() {
        match run(Tool::IptablesLegacySave) {
            Ok(save) => match iptables_filters(&save) {
                Ok(rules) => {
                    found.extend(rules.into_iter().map(|r| format!("iptables (legacy): {r}")))
                }
                Err(e) => fail(Tool::IptablesLegacySave, (Reason::Parse, e)),
            },
            Err((reason, error)) => fail(
                Tool::IptablesLegacySave,
                (
                    reason,
                    format!(
                        "{error}: the kernel has legacy iptables tables ({}) that cannot be read",
                        legacy.join(", ")
                    ),
                ),
            ),
        }
    }
    match run(Tool::Nft) {
        Ok(json) => match nft_filters(&json, nft_save_read) {
            Ok(chains) => found.extend(chains),
            Err(e) => fail(Tool::Nft, (Reason::Parse, e)),
        },
        Err((Reason::Missing, error)) => fail(
            Tool::Nft,
            (
                Reason::Missing,
                format!("{error}: nftables rules in the kernel cannot be read"),
            ),
        ),
        Err(e) => fail(Tool::Nft, e),
    }
    match (failures.is_empty(), found.is_empty()) {
        (false, _) => Probe::Undecided { failures, found },
        (true, true) => Probe::None,
        (true, false) => Probe::Found(found),
    }
}

/// An iptables chain and its rules (`-A ...` lines).
type Chain = (String, Vec<String>);

/// The rules of `iptables-save` output (all tables) that could filter forwarded pod
/// traffic, as `[-t TABLE ]-A CHAIN ...`. Err when the output is not iptables-save's.
pub fn iptables_filters(save: &str) -> Result<Vec<String>, String> {
    let mut tables: Vec<(String, Vec<Chain>)> = Vec::new();
    for line in save.lines().map(str::trim) {
        if line.is_empty() || line == "COMMIT" {
            continue;
        }
        if line.starts_with('#') {
            // iptables-nft-save: "# Table `filter' is incompatible, use 'nft' tool."
            if line.contains("incompatible") && !line.contains("base-chains") {
                return Err(format!("iptables-save says: {line}"));
            }
            continue;
        }
        if let Some(table) = line.strip_prefix('*') {
            tables.push((table.to_string(), Vec::new()));
            continue;
        }
        let Some((_, chains)) = tables.last_mut() else {
            return Err(format!("a line outside any table: {line:?}"));
        };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            chains.push((name.to_string(), Vec::new()));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            match chains.iter_mut().find(|(name, _)| name == chain) {
                Some((_, rules)) => rules.push(line.to_string()),
                None => chains.push((chain.to_string(), vec![line.to_string()])),
            }
        } else {
            return Err(format!("not an iptables-save line: {line:?}"));
        }
    }
    let mut found = Vec::new();
    for (table, chains) in &tables {
        if !IPTABLES_TABLES.contains(&table.as_str()) {
            continue;
        }
        let rules_of = |chain: &str| {
            chains
                .iter()
                .find(|(name, _)| name == chain)
                .map(|(_, rules)| rules.as_slice())
        };
        for hook in IPTABLES_HOOKS {
            for rule in rules_of(hook).unwrap_or_default() {
                let mut seen = BTreeSet::new();
                if iptables_rule_filters(rule, &rules_of, &mut seen) {
                    found.push(if table == "filter" {
                        rule.clone()
                    } else {
                        format!("-t {table} {rule}")
                    });
                }
            }
        }
    }
    Ok(found)
}

/// Whether one iptables rule can drop a packet: by its target, or by a chain it jumps to.
fn iptables_rule_filters<'a>(
    rule: &str,
    rules_of: &dyn Fn(&str) -> Option<&'a [String]>,
    seen: &mut BTreeSet<String>,
) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let Some(target) = words
        .windows(2)
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1])
    else {
        return false;
    };
    // Docker's rules match its own bridges (`-o docker0`, DOCKER-* chains).
    let docker = target.starts_with("DOCKER")
        || words
            .windows(2)
            .any(|w| (w[0] == "-o" || w[0] == "-i") && w[1].starts_with("docker"));
    if docker || KNOWN_CHAINS.contains(&target) || BENIGN_TARGETS.contains(&target) {
        return false;
    }
    match rules_of(target) {
        // A chain of this table: filters if any of its rules does (each chain once).
        Some(rules) => {
            seen.insert(target.to_string())
                && rules
                    .iter()
                    .any(|r| iptables_rule_filters(r, rules_of, seen))
        }
        // DROP, REJECT, NFQUEUE, TPROXY, or a target this list does not know.
        None => true,
    }
}

/// The base chains of `nft -j list ruleset` output on the hooks forwarded IPv4 pod traffic
/// passes, outside the known tables, that drop by policy or hold a rule that can drop.
/// `iptables_read`: iptables-nft's built-in chains were read through iptables-nft-save.
/// Err when the output is not nft's JSON.
pub fn nft_filters(json: &str, iptables_read: bool) -> Result<Vec<String>, String> {
    let ruleset: Value = serde_json::from_str(json)
        .map_err(|e| format!("`nft -j list ruleset` printed no JSON: {e}"))?;
    let items = ruleset["nftables"]
        .as_array()
        .ok_or("`nft -j list ruleset` printed JSON without an \"nftables\" array")?;
    let mut found = Vec::new();
    for chain in items.iter().map(|i| &i["chain"]).filter(|c| c.is_object()) {
        let text = |key: &str| chain[key].as_str().unwrap_or_default();
        let (family, table, name, hook) =
            (text("family"), text("table"), text("name"), text("hook"));
        let hooks: &[&str] = match family {
            "ip" | "inet" => &["prerouting", "ingress", "forward", "postrouting"],
            "bridge" => &["prerouting", "input", "forward", "output", "postrouting"],
            "netdev" => &["ingress", "egress"],
            _ => &[],
        };
        if !hooks.contains(&hook)
            || text("type") == "nat"
            || KNOWN_TABLES.contains(&(family, table))
        {
            continue;
        }
        let iptables_nft = family == "ip"
            && IPTABLES_NFT_TABLES.contains(&table)
            && IPTABLES_BUILTIN_CHAINS.contains(&name);
        if iptables_read && iptables_nft {
            continue;
        }
        let rules = nft_rules(items, family, table, name);
        let dropping = rules
            .iter()
            .filter(|r| nft_expr_filters(r, items, family, table, &mut BTreeSet::new()))
            .count();
        let policy = chain["policy"].as_str().unwrap_or("accept");
        if dropping > 0 || policy == "drop" {
            let device = chain["dev"]
                .as_str()
                .map(|d| format!(" device {d}"))
                .unwrap_or_default();
            found.push(format!(
                "nftables: chain {family} {table} {name} (hook {hook}{device}, {dropping} of {} rules can drop, policy {policy})",
                rules.len()
            ));
        }
    }
    Ok(found)
}

/// The `expr` arrays of the rules of one chain.
fn nft_rules<'a>(items: &'a [Value], family: &str, table: &str, chain: &str) -> Vec<&'a Value> {
    items
        .iter()
        .map(|i| &i["rule"])
        .filter(|r| r["family"] == family && r["table"] == table && r["chain"] == chain)
        .map(|r| &r["expr"])
        .collect()
}

/// Whether an nft expression (a rule's `expr`, or part of it) can drop a packet: a drop,
/// reject or queue verdict anywhere in it (verdict maps too), a jump or goto to a chain
/// that can, a named verdict map (its elements are not followed), or an iptables target
/// (`xt`) that is not known to be benign.
fn nft_expr_filters(
    expr: &Value,
    items: &[Value],
    family: &str,
    table: &str,
    seen: &mut BTreeSet<String>,
) -> bool {
    match expr {
        Value::Array(parts) => parts
            .iter()
            .any(|p| nft_expr_filters(p, items, family, table, seen)),
        Value::Object(map) => map.iter().any(|(key, value)| match key.as_str() {
            "drop" | "reject" | "queue" => true,
            "jump" | "goto" => {
                let target = value["target"].as_str().unwrap_or_default();
                seen.insert(target.to_string())
                    && nft_rules(items, family, table, target)
                        .iter()
                        .any(|r| nft_expr_filters(r, items, family, table, seen))
            }
            "vmap" if value["data"].as_str().is_some_and(|d| d.starts_with('@')) => true,
            "xt" if value["type"] == "target" => {
                !BENIGN_TARGETS.contains(&value["name"].as_str().unwrap_or_default())
            }
            _ => nft_expr_filters(value, items, family, table, seen),
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node as kube-proxy (iptables mode), flannel and Docker leave it, through
    /// iptables-nft-save: nothing there filters pod traffic.
    const KUBE_NODE_SAVE: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n\
        *mangle\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n\
        *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-FORWARD - [0:0]\n:FLANNEL-FWD - [0:0]\n:DOCKER-USER - [0:0]\n\
        -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
        -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
        -A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
        -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
        -A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -j ACCEPT\n-A FORWARD -i docker0 ! -o docker0 -j ACCEPT\n\
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
        -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\nCOMMIT\n\
        *nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
        -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A KUBE-POSTROUTING -j MASQUERADE --random-fully\nCOMMIT\n";

    /// `nft -j list ruleset` on the same node, plus kube-proxy's nftables table and
    /// weft's own.
    const KUBE_NODE_NFT: &str = r#"{"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "filter", "handle": 1}},
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "filter", "name": "KUBE-FORWARD", "handle": 1}},
        {"rule": {"family": "ip", "table": "filter", "chain": "KUBE-FORWARD", "handle": 4, "expr": [{"xt": {"type": "match", "name": "conntrack"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}},
        {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 3, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "KUBE-FORWARD"}}]}},
        {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "filter-forward", "handle": 3, "type": "filter", "hook": "forward", "prio": -110, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "service-endpoints-check", "handle": 4}},
        {"rule": {"family": "ip", "table": "kube-proxy", "chain": "filter-forward", "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"jump": {"target": "service-endpoints-check"}}]}},
        {"rule": {"family": "ip", "table": "kube-proxy", "chain": "service-endpoints-check", "expr": [{"reject": null}]}},
        {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "flannel-ipv4", "chain": "forward", "expr": [{"accept": null}]}},
        {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "postrtg", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"chain": {"family": "ip6", "table": "firewalld", "name": "fwd", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "x", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "x", "name": "marks", "handle": 2, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "x", "chain": "marks", "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}, {"accept": null}]}}
    ]}"#;

    /// `nft -j list ruleset` with one more table.
    fn with(extra: &str) -> String {
        KUBE_NODE_NFT.replace("\n    ]}", &format!(",\n{extra}\n    ]}}"))
    }

    fn tools(save: &str, nft: Result<String, (Reason, String)>) -> impl Fn(Tool) -> ToolOutput {
        let save = save.to_string();
        move |tool| match tool {
            Tool::IptablesNftSave => Ok(save.clone()),
            Tool::IptablesLegacySave => Ok(String::new()),
            Tool::Nft => nft.clone(),
        }
    }

    #[test]
    fn kube_proxy_flannel_and_docker_rules_are_not_policy() {
        assert_eq!(
            iptables_filters(KUBE_NODE_SAVE).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            nft_filters(KUBE_NODE_NFT, true).unwrap(),
            Vec::<String>::new()
        );
        let probe = probe_with(&tools(KUBE_NODE_SAVE, Ok(KUBE_NODE_NFT.into())), Vec::new());
        assert_eq!(probe, Probe::None);
    }

    #[test]
    fn a_policy_engines_chain_or_an_admins_drop_is_named() {
        let save =
            "*filter\n:cali-FORWARD - [0:0]\n:ok - [0:0]\n-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD\n\
            -A FORWARD -j KUBE-FORWARD\n-A FORWARD -j ok\n-A FORWARD -s 10.244.1.5/32 -j DROP\n\
            -A cali-FORWARD -s 10.244.1.2/32 -d 10.244.2.2/32 -j DROP\n-A ok -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            iptables_filters(save).unwrap(),
            [
                "-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD",
                "-A FORWARD -s 10.244.1.5/32 -j DROP"
            ]
        );
    }

    #[test]
    fn raw_and_mangle_drops_and_unknown_targets_count_marks_do_not() {
        let save = "*raw\n:PREROUTING ACCEPT [0:0]\n:cali-PREROUTING - [0:0]\n\
            -A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING\n\
            -A cali-PREROUTING -m mark --mark 0x40000/0x40000 -j DROP\nCOMMIT\n\
            *mangle\n:PREROUTING ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
            -A PREROUTING -i eth0 -j MARK --set-xmark 0x1/0x1\n-A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu\n\
            -A PREROUTING -p tcp -j TPROXY --on-port 15001\n-A POSTROUTING -j unknown-chain\nCOMMIT\n\
            *security\n:FORWARD ACCEPT [0:0]\n-A FORWARD -j NFQUEUE --queue-num 1\nCOMMIT\n";
        assert_eq!(
            iptables_filters(save).unwrap(),
            [
                "-t raw -A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING",
                "-t mangle -A PREROUTING -p tcp -j TPROXY --on-port 15001",
                "-t mangle -A POSTROUTING -j unknown-chain",
                "-t security -A FORWARD -j NFQUEUE --queue-num 1",
            ]
        );
    }

    #[test]
    fn a_native_nft_drop_in_iptables_own_filter_table_is_read_from_nft() {
        // `nft add chain ip filter policy { type filter hook forward priority 0; }`: a base
        // chain iptables-nft-save does not show (it warns about incompatible base chains).
        let nft = with(
            r#"{"chain": {"family": "ip", "table": "filter", "name": "policy", "handle": 9, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "filter", "chain": "policy", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.244.1.2"}}, {"drop": null}]}}"#,
        );
        let save = format!(
            "# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.\n{KUBE_NODE_SAVE}"
        );
        assert_eq!(
            probe_with(&tools(&save, Ok(nft)), Vec::new()),
            Probe::Found(vec![
                "nftables: chain ip filter policy (hook forward, 1 of 1 rules can drop, policy accept)".into()
            ])
        );
    }

    #[test]
    fn every_hook_forwarded_pod_traffic_passes_is_read() {
        let nft = with(
            r#"{"chain": {"family": "inet", "table": "kube-router", "name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
            {"chain": {"family": "inet", "table": "kube-router", "name": "pod-fw", "handle": 7}},
            {"rule": {"family": "inet", "table": "kube-router", "chain": "forward", "expr": [{"jump": {"target": "pod-fw"}}]}},
            {"rule": {"family": "inet", "table": "kube-router", "chain": "pod-fw", "expr": [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}},
            {"chain": {"family": "inet", "table": "admin", "name": "fwd", "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "ip", "table": "raw", "name": "pre", "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "raw", "chain": "pre", "expr": [{"vmap": {"key": {"payload": {"protocol": "ip", "field": "saddr"}}, "data": {"set": [["10.244.1.2", {"drop": null}]]}}}]}},
            {"chain": {"family": "ip", "table": "m", "name": "post", "type": "filter", "hook": "postrouting", "prio": -150, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "m", "chain": "post", "expr": [{"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@blocked"}}]}},
            {"chain": {"family": "bridge", "table": "pods", "name": "pre", "type": "filter", "hook": "prerouting", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "bridge", "table": "pods", "chain": "pre", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.244.1.2"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}},
            {"chain": {"family": "bridge", "table": "filter", "name": "FORWARD", "type": "filter", "hook": "forward", "prio": -200, "policy": "drop"}},
            {"chain": {"family": "netdev", "table": "edge", "name": "in", "type": "filter", "hook": "ingress", "dev": "eth0", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "netdev", "table": "edge", "chain": "in", "expr": [{"queue": {"num": 1}}]}},
            {"chain": {"family": "netdev", "table": "edge", "name": "out", "type": "filter", "hook": "egress", "dev": "cni0", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "netdev", "table": "edge", "chain": "out", "expr": [{"xt": {"type": "target", "name": "REJECT"}}]}},
            {"chain": {"family": "netdev", "table": "edge", "name": "count", "type": "filter", "hook": "ingress", "dev": "cni0", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "netdev", "table": "edge", "chain": "count", "expr": [{"counter": null}]}}"#,
        );
        assert_eq!(
            nft_filters(&nft, true).unwrap(),
            [
                "nftables: chain inet kube-router forward (hook forward, 1 of 1 rules can drop, policy accept)",
                "nftables: chain inet admin fwd (hook forward, 0 of 0 rules can drop, policy drop)",
                "nftables: chain ip raw pre (hook prerouting, 1 of 1 rules can drop, policy accept)",
                "nftables: chain ip m post (hook postrouting, 1 of 1 rules can drop, policy accept)",
                "nftables: chain bridge pods pre (hook prerouting, 1 of 1 rules can drop, policy accept)",
                "nftables: chain bridge filter FORWARD (hook forward, 0 of 0 rules can drop, policy drop)",
                "nftables: chain netdev edge in (hook ingress device eth0, 1 of 1 rules can drop, policy accept)",
                "nftables: chain netdev edge out (hook egress device cni0, 1 of 1 rules can drop, policy accept)",
            ]
        );
    }

    #[test]
    fn without_iptables_nft_save_its_tables_are_read_from_nft() {
        let missing = |tool| match tool {
            Tool::IptablesNftSave => Err((
                Reason::Missing,
                "iptables-nft-save not found in PATH".into(),
            )),
            Tool::IptablesLegacySave => unreachable!("no legacy tables"),
            Tool::Nft => Ok(KUBE_NODE_NFT.to_string()),
        };
        // Stricter: kube-proxy's jump to KUBE-FORWARD (which drops INVALID) counts there.
        assert_eq!(
            probe_with(&missing, Vec::new()),
            Probe::Found(vec![
                "nftables: chain ip filter FORWARD (hook forward, 1 of 1 rules can drop, policy accept)".into()
            ])
        );
    }

    #[test]
    fn nft_without_json_leaves_the_probe_undecided() {
        let nft = Err((
            Reason::Exit,
            "`nft -j list ruleset` failed (exit status: 1): Error: JSON support not compiled-in"
                .to_string(),
        ));
        let Probe::Undecided { failures, found } =
            probe_with(&tools(KUBE_NODE_SAVE, nft), Vec::new())
        else {
            panic!("decided without nft");
        };
        assert!(found.is_empty());
        assert_eq!(failures.len(), 1);
        assert_eq!(
            (failures[0].tool, failures[0].reason),
            (Tool::Nft, Reason::Exit)
        );
        assert_eq!(
            failures[0].to_string(),
            "`nft -j list ruleset` failed (exit status: 1): Error: JSON support not compiled-in (exit); \
             fix: install nftables with JSON support (`nft -j list ruleset` must work) in the agent's image"
        );
        // Unparsable output, and no nft at all, are failures too.
        for (nft, reason) in [
            (Ok("Error: not json".to_string()), Reason::Parse),
            (
                Err((Reason::Missing, "nft not found in PATH".to_string())),
                Reason::Missing,
            ),
            (
                Err((
                    Reason::Timeout,
                    "`nft -j list ruleset` did not finish within 5 s: killed".to_string(),
                )),
                Reason::Timeout,
            ),
        ] {
            match probe_with(&tools(KUBE_NODE_SAVE, nft), Vec::new()) {
                Probe::Undecided { failures, .. } => assert_eq!(failures[0].reason, reason),
                other => panic!("{reason:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn legacy_tables_need_iptables_legacy_save_and_garbage_is_no_answer() {
        let no_legacy_tool = |tool| match tool {
            Tool::IptablesLegacySave => Err((
                Reason::Missing,
                "iptables-legacy-save not found in PATH".into(),
            )),
            Tool::IptablesNftSave => Ok(KUBE_NODE_SAVE.to_string()),
            Tool::Nft => Ok(KUBE_NODE_NFT.to_string()),
        };
        // No legacy tables in the kernel: nothing to read, no failure.
        assert_eq!(probe_with(&no_legacy_tool, Vec::new()), Probe::None);
        match probe_with(&no_legacy_tool, vec!["filter".into()]) {
            Probe::Undecided { failures, .. } => {
                assert_eq!(failures[0].tool, Tool::IptablesLegacySave);
                assert!(
                    failures[0]
                        .error
                        .contains("legacy iptables tables (filter)"),
                    "{}",
                    failures[0]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(iptables_filters("-A FORWARD -j DROP\n").is_err());
        assert!(iptables_filters("*filter\nsomething else\n").is_err());
        assert!(iptables_filters("# Table `filter' is incompatible, use 'nft' tool.\n").is_err());
        assert!(nft_filters("{}", true).is_err());
    }
}
