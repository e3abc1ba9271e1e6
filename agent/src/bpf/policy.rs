//! Who else filters forwarded pod traffic on this node.
//!
//! The fast path hands pod packets across nodes past this node's FORWARD hook, so a rule
//! there never sees them: a NetworkPolicy engine that enforces in FORWARD (Calico's felix
//! in canal, kube-router) or an admin's own DROP would be bypassed in silence. This module
//! reads the node's netfilter (iptables' filter table in both its nf_tables and legacy
//! variants, and nftables base chains on the forward hook) and names every rule that could
//! filter forwarded traffic, apart from the known ones that cannot change the verdict of a
//! pod packet the fast path carries: kube-proxy's (KUBE-FORWARD drops only INVALID
//! conntrack states, which the fast path's packets never reach), flannel's and weft's own
//! forward-accept rules, and Docker's (they match its bridges only).

use std::process::Command;

use serde_json::Value;

/// iptables chains (jump targets from FORWARD) known not to filter pod traffic.
const KNOWN_CHAINS: &[&str] = &[
    "ACCEPT",
    "RETURN",
    "KUBE-FORWARD",
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-PROXY-FIREWALL",
    "KUBE-NODEPORTS",
    "FLANNEL-FWD",
];
/// nftables tables whose forward chains are known not to filter pod traffic (iptables-nft's
/// own `filter` tables are read through iptables-save instead).
const KNOWN_TABLES: &[(&str, &str)] = &[
    ("ip", "kube-proxy"),
    ("ip", "flannel-ipv4"),
    ("ip6", "flannel-ipv6"),
    ("ip", "filter"),
    ("ip6", "filter"),
];

/// The rules that could filter forwarded pod traffic, each described for the log (e.g.
/// `iptables (nf_tables): -A FORWARD -j cali-FORWARD`). Empty when there are none. Tools
/// that are not installed are skipped: their rules cannot exist.
pub fn forward_filters() -> Vec<String> {
    let mut found = Vec::new();
    let iptables = [
        ("nf_tables", output("iptables-nft-save", &["-t", "filter"])),
        ("legacy", output("iptables-legacy-save", &["-t", "filter"])),
    ];
    for (variant, save) in iptables {
        found.extend(
            iptables_forward_filters(&save.unwrap_or_default())
                .into_iter()
                .map(|rule| format!("iptables ({variant}): {rule}")),
        );
    }
    if let Some(text) = output("nft", &["-j", "list", "ruleset"]) {
        found.extend(nft_forward_filters(&text));
    }
    found
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The FORWARD rules of `iptables-save -t filter` output that could filter pod traffic.
pub fn iptables_forward_filters(save: &str) -> Vec<String> {
    save.lines()
        .filter(|line| line.starts_with("-A FORWARD "))
        .filter(|rule| {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let target = words
                .windows(2)
                .find(|w| w[0] == "-j" || w[0] == "-g")
                .map(|w| w[1]);
            // Docker's rules match its own bridges (`-o docker0`, DOCKER-* chains).
            let docker = target.is_some_and(|t| t.starts_with("DOCKER"))
                || words
                    .windows(2)
                    .any(|w| (w[0] == "-o" || w[0] == "-i") && w[1].starts_with("docker"));
            match target {
                None => false,
                Some(target) => !KNOWN_CHAINS.contains(&target) && !docker,
            }
        })
        .map(str::to_string)
        .collect()
}

/// The forward-hook base chains of `nft -j list ruleset` output, outside the known tables,
/// that hold rules or drop by policy.
pub fn nft_forward_filters(json: &str) -> Vec<String> {
    let Ok(ruleset) = serde_json::from_str::<Value>(json) else {
        return Vec::new();
    };
    let items = ruleset["nftables"].as_array().cloned().unwrap_or_default();
    let known = |family: &str, table: &str| KNOWN_TABLES.contains(&(family, table));
    let mut found = Vec::new();
    for item in &items {
        let chain = &item["chain"];
        if chain["hook"] != "forward" {
            continue;
        }
        let (family, table, name) = (
            chain["family"].as_str().unwrap_or_default(),
            chain["table"].as_str().unwrap_or_default(),
            chain["name"].as_str().unwrap_or_default(),
        );
        if known(family, table) {
            continue;
        }
        let rules = items
            .iter()
            .filter(|i| {
                let rule = &i["rule"];
                rule["family"] == family && rule["table"] == table && rule["chain"] == name
            })
            .count();
        if rules > 0 || chain["policy"] == "drop" {
            found.push(format!(
                "nftables: chain {family} {table} {name} (hook forward, {rules} rules, policy {})",
                chain["policy"].as_str().unwrap_or("accept")
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_flannel_and_docker_rules_are_not_policy() {
        let save = "*filter\n:FORWARD ACCEPT [0:0]\n\
            -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
            -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
            -A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
            -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
            -A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -j ACCEPT\n-A FORWARD -i docker0 ! -o docker0 -j ACCEPT\nCOMMIT\n";
        assert!(iptables_forward_filters(save).is_empty());
    }

    #[test]
    fn a_policy_engines_chain_or_an_admins_drop_is_named() {
        let save =
            "*filter\n-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD\n\
            -A FORWARD -j KUBE-FORWARD\n-A FORWARD -s 10.244.1.5/32 -j DROP\nCOMMIT\n";
        assert_eq!(
            iptables_forward_filters(save),
            [
                "-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD",
                "-A FORWARD -s 10.244.1.5/32 -j DROP"
            ]
        );
    }

    #[test]
    fn nft_forward_chains_outside_known_tables_count_when_they_can_drop() {
        let ruleset = r#"{"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "filter-forward", "hook": "forward", "policy": "accept"}},
            {"rule": {"family": "ip", "table": "kube-proxy", "chain": "filter-forward", "expr": []}},
            {"chain": {"family": "inet", "table": "filter", "name": "forward", "hook": "forward", "policy": "accept"}},
            {"chain": {"family": "inet", "table": "kube-router", "name": "forward", "hook": "forward", "policy": "accept"}},
            {"rule": {"family": "inet", "table": "kube-router", "chain": "forward", "expr": []}},
            {"chain": {"family": "inet", "table": "admin", "name": "fwd", "hook": "forward", "policy": "drop"}}
        ]}"#;
        assert_eq!(
            nft_forward_filters(ruleset),
            [
                "nftables: chain inet kube-router forward (hook forward, 1 rules, policy accept)",
                "nftables: chain inet admin fwd (hook forward, 0 rules, policy drop)"
            ]
        );
    }
}
