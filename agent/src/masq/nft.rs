//! nftables: one table `ip flannel-ipv4` (the name flannel's nftables mode uses, so a node
//! migrating from flanneld keeps a single table) with chain `postrtg` (nat postrouting,
//! masquerade) and chain `forward` (filter forward, accept the pod network).
//!
//! Every write replaces the whole table in one `nft -f -` transaction, so there is never a
//! moment with half the rules. `ensure` lists the table (one `nft` run) and writes only when
//! the spec changed or the listing differs from the one read right after the last write.

use anyhow::{Context, Result};
use tracing::info;

use super::{iptables, run, run_ok, Firewall, MasqSpec};

pub const NAME: &str = "nftables";
/// Family and name of weft's (and flannel's) table.
pub const TABLE: &str = "ip flannel-ipv4";

#[derive(Debug, Default)]
pub struct Nftables {
    /// The spec last written and the table listing read right after (None: no table).
    applied: Option<(MasqSpec, Option<String>)>,
    /// Whether iptables' FORWARD got the forward rules too (its policy drops).
    iptables_forward: bool,
}

impl Nftables {
    pub fn new() -> Self {
        Self::default()
    }

    /// `ensure`, returning whether it had to write.
    pub fn ensure_changed(&mut self, spec: &MasqSpec) -> Result<bool> {
        let current = list_table()?;
        if let Some((applied_spec, listing)) = &self.applied {
            if applied_spec == spec && *listing == current {
                return Ok(false);
            }
        }
        if self.applied.is_some() {
            info!("nftables table {TABLE} differs from what weft wrote; re-creating it");
        }
        write(render(spec).as_deref(), current.is_some())?;
        self.applied = Some((spec.clone(), list_table()?));
        Ok(true)
    }
}

impl Firewall for Nftables {
    fn name(&self) -> &'static str {
        NAME
    }

    fn ensure(&mut self, spec: &MasqSpec) -> Result<()> {
        self.ensure_changed(spec)?;
        // An accept in weft's table does not overrule a drop in another table at the same
        // hook: where iptables' FORWARD drops by policy (Docker sets that), the forward
        // rules must be there too, or pod traffic between nodes dies in it.
        let iptables_drops = spec.forward_accept && iptables::forward_policy_drops();
        if iptables_drops != self.iptables_forward {
            if iptables_drops {
                info!(
                    "iptables' FORWARD policy is DROP: adding the forward rules there too ({})",
                    iptables::FORWARD_CHAIN
                );
            } else {
                info!(
                    "removing the forward rules from iptables' FORWARD: its policy no longer drops"
                );
            }
        }
        if iptables_drops || self.iptables_forward {
            iptables::sync_forward(iptables_drops.then_some(spec))?;
        }
        self.iptables_forward = iptables_drops;
        Ok(())
    }

    fn remove(&mut self) -> Result<()> {
        self.applied = None;
        if self.iptables_forward {
            iptables::sync_forward(None)?;
            self.iptables_forward = false;
        }
        write(None, true)
    }
}

/// `Ok("nft 1.0.6")` when nftables can be used here, else why not.
pub fn probe() -> Result<String, String> {
    let version = run_ok("nft", &["--version"], None).map_err(|e| format!("{e:#}"))?;
    // "nftables v1.0.6 (Lester Gooch #5)"
    let number = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_start_matches('v');
    run_ok("nft", &["list", "tables"], None).map_err(|e| format!("nftables is unusable: {e:#}"))?;
    Ok(format!("nft {number}"))
}

/// The table for `spec` in nft's syntax, or None when no rule is wanted.
pub fn render(spec: &MasqSpec) -> Option<String> {
    if !spec.masquerade && !spec.forward_accept {
        return None;
    }
    let (n, p) = (spec.network, spec.lease);
    let mut out = format!("table {TABLE} {{\n\tcomment \"rules for flannel-ipv4\"\n");
    if spec.masquerade {
        let masquerade = if spec.random_fully {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        out += &format!(
            "\tchain postrtg {{\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark & 0x00004000 == 0x00004000 return\n\
             \t\tip saddr {p} ip daddr {n} return\n\
             \t\tip saddr {n} ip daddr {p} return\n\
             \t\tip saddr != {n} ip daddr {p} return\n"
        );
        if !spec.exclude.is_empty() {
            let set: Vec<String> = spec.exclude.iter().map(|c| c.to_string()).collect();
            out += &format!(
                "\t\tip saddr {n} ip daddr {{ {} }} return\n",
                set.join(", ")
            );
        }
        if let Some(bpf) = &spec.bpf_nat {
            out += &format!(
                "\t\tip saddr {n} oifname \"{}\" meta mark & 0x{:08x} == 0x{:08x} return\n",
                bpf.uplink, bpf.mark, bpf.mark
            );
            // The fallback's own ports, for the protocols that have ports (nft wants the
            // match); ICMP keeps the kernel's choice of identifier.
            let (lo, hi) = bpf.ports;
            let flags = if spec.random_fully {
                " fully-random"
            } else {
                ""
            };
            out += &format!(
                "\t\tip saddr {n} ip daddr != 224.0.0.0/4 meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}{flags}\n"
            );
        }
        out += &format!(
            "\t\tip saddr {n} ip daddr != 224.0.0.0/4 {masquerade}\n\
             \t\tip saddr != {n} ip daddr {n} {masquerade}\n\
             \t}}\n"
        );
    }
    if spec.forward_accept {
        out += &format!(
            "\tchain forward {{\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tip saddr {n} accept\n\
             \t\tip daddr {n} accept\n\
             \t}}\n"
        );
    }
    out.push_str("}\n");
    Some(out)
}

/// Replaces the table by `table` (None: deletes it) in one transaction. Declaring the table
/// before deleting it makes the delete succeed whether or not it existed.
fn write(table: Option<&str>, exists: bool) -> Result<()> {
    if table.is_none() && !exists {
        return Ok(());
    }
    let script = format!(
        "table {TABLE}\ndelete table {TABLE}\n{}",
        table.unwrap_or("")
    );
    run_ok("nft", &["-f", "-"], Some(&script))
        .with_context(|| format!("writing nftables table {TABLE}"))?;
    Ok(())
}

/// `nft list table ip flannel-ipv4`, or None when the table does not exist.
fn list_table() -> Result<Option<String>> {
    let (family, name) = TABLE.split_once(' ').expect("TABLE is '<family> <name>'");
    let out = run("nft", &["list", "table", family, name], None)?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No such file or directory") {
        return Ok(None);
    }
    anyhow::bail!(
        "`nft list table {TABLE}` failed ({}): {}",
        out.status,
        stderr.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MasqSpec {
        MasqSpec {
            network: "10.244.0.0/16".parse().unwrap(),
            lease: "10.244.1.0/24".parse().unwrap(),
            masquerade: true,
            random_fully: true,
            forward_accept: true,
            exclude: Vec::new(),
            bpf_nat: None,
        }
    }

    #[test]
    fn bpf_nat_and_exclusions_shape_the_masquerade_rule() {
        let table = render(&MasqSpec {
            exclude: vec![
                "192.168.0.0/16".parse().unwrap(),
                "172.16.0.0/12".parse().unwrap(),
            ],
            bpf_nat: Some(super::super::BpfNatRule {
                uplink: "eth0".into(),
                mark: 0x800,
                ports: (1024, 60999),
            }),
            ..spec()
        })
        .unwrap();
        let exclude = "ip saddr 10.244.0.0/16 ip daddr { 192.168.0.0/16, 172.16.0.0/12 } return";
        let skip =
            "ip saddr 10.244.0.0/16 oifname \"eth0\" meta mark & 0x00000800 == 0x00000800 return";
        let fallback =
            "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 meta l4proto { tcp, udp } masquerade to :1024-60999 fully-random";
        let at = |line: &str| {
            table
                .find(line)
                .unwrap_or_else(|| panic!("{line:?} not in {table}"))
        };
        assert!(at(exclude) < at(skip) && at(skip) < at(fallback), "{table}");
    }

    #[test]
    fn render_follows_the_spec() {
        let full = render(&spec()).unwrap();
        assert!(
            full.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return"),
            "{full}"
        );
        assert!(full.contains("masquerade fully-random"), "{full}");
        assert!(full.contains("chain forward"), "{full}");
        let plain = render(&MasqSpec {
            random_fully: false,
            ..spec()
        })
        .unwrap();
        assert!(
            !plain.contains("fully-random") && plain.contains(" masquerade\n"),
            "{plain}"
        );
        let forward_only = render(&MasqSpec {
            masquerade: false,
            ..spec()
        })
        .unwrap();
        assert!(!forward_only.contains("postrtg") && forward_only.contains("chain forward"));
        assert_eq!(
            render(&MasqSpec {
                masquerade: false,
                forward_accept: false,
                ..spec()
            }),
            None
        );
    }
}
