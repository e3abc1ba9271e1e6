//! iptables: flannel's chains and rules, byte for byte, so flanneld's and weft's rules are
//! recognised by either: nat FLANNEL-POSTRTG (jumped to from POSTROUTING) and filter
//! FLANNEL-FWD (jumped to from FORWARD). Uses the `iptables` binary in PATH (on Debian the
//! nf_tables variant by default; the legacy one works the same).
//!
//! `ensure` lists the hook chain and weft's chain of each table (`iptables -S`, which is
//! cheap even with kube-proxy's thousands of rules elsewhere) and compares them with the
//! rendering, which is in iptables' own `-S` form. A table whose chain differs is rewritten
//! in one `iptables-restore --noflush` transaction: stale jumps deleted, chain flushed and
//! refilled, one jump appended.

use anyhow::{Context, Result};
use tracing::info;

use super::{run, run_ok, Firewall, MasqSpec, XTABLES_WAIT};

pub const NAME: &str = "iptables";

/// One chain weft owns and the built-in chain that jumps to it.
struct Chain {
    table: &'static str,
    hook: &'static str,
    name: &'static str,
    comment: &'static str,
}

pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";

const MASQ: Chain = Chain {
    table: "nat",
    hook: "POSTROUTING",
    name: MASQ_CHAIN,
    comment: "flanneld masq",
};
const FORWARD: Chain = Chain {
    table: "filter",
    hook: "FORWARD",
    name: FORWARD_CHAIN,
    comment: "flanneld forward",
};

/// kube-proxy marks packets it masquerades itself with this bit.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

impl Chain {
    /// A rule of this chain as `iptables -S` prints it (`what` = matches before the comment).
    fn rule(&self, what: &str, target: &str) -> String {
        let what = if what.is_empty() {
            String::new()
        } else {
            format!("{what} ")
        };
        format!(
            "-A {} {what}-m comment --comment \"{}\" -j {target}",
            self.name, self.comment
        )
    }

    fn jump(&self) -> String {
        format!(
            "-A {} -m comment --comment \"{}\" -j {}",
            self.hook, self.comment, self.name
        )
    }

    /// The rules wanted in this chain, or None when the chain must not exist.
    fn wanted_rules(&self, spec: &MasqSpec) -> Option<Vec<String>> {
        let (n, p) = (spec.network, spec.lease);
        if self.name == MASQ_CHAIN {
            if !spec.masquerade {
                return None;
            }
            let masquerade = if spec.random_fully {
                "MASQUERADE --random-fully"
            } else {
                "MASQUERADE"
            };
            let mut rules = vec![
                self.rule(&format!("-m mark --mark {KUBE_PROXY_MARK}"), "RETURN"),
                self.rule(&format!("-s {p} -d {n}"), "RETURN"),
                self.rule(&format!("-s {n} -d {p}"), "RETURN"),
                self.rule(&format!("! -s {n} -d {p}"), "RETURN"),
            ];
            for excluded in &spec.exclude {
                rules.push(self.rule(&format!("-s {n} -d {excluded}"), "RETURN"));
            }
            if let Some(bpf) = &spec.bpf_nat {
                let mark = format!("0x{:x}/0x{:x}", bpf.mark, bpf.mark);
                rules.push(self.rule(
                    &format!("-s {n} -o {} -m mark --mark {mark}", bpf.uplink),
                    "RETURN",
                ));
                // Ports can be given for port protocols only; ICMP keeps the kernel's.
                let (lo, hi) = bpf.ports;
                let random = if spec.random_fully {
                    " --random-fully"
                } else {
                    ""
                };
                for proto in ["tcp", "udp"] {
                    rules.push(self.rule(
                        &format!("-s {n} ! -d 224.0.0.0/4 -p {proto}"),
                        &format!("MASQUERADE --to-ports {lo}-{hi}{random}"),
                    ));
                }
            }
            rules.push(self.rule(&format!("-s {n} ! -d 224.0.0.0/4"), masquerade));
            rules.push(self.rule(&format!("! -s {n} -d {n}"), masquerade));
            Some(rules)
        } else {
            if !spec.forward_accept {
                return None;
            }
            Some(vec![
                self.rule(&format!("-s {n}"), "ACCEPT"),
                self.rule(&format!("-d {n}"), "ACCEPT"),
            ])
        }
    }

    fn wanted(&self, spec: Option<&MasqSpec>) -> Installed {
        match spec.and_then(|spec| self.wanted_rules(spec)) {
            Some(rules) => Installed {
                jumps: vec![self.jump()],
                rules: Some(rules),
            },
            None => Installed {
                jumps: Vec::new(),
                rules: None,
            },
        }
    }

    /// What iptables shows of this chain now.
    fn installed(&self) -> Result<Installed> {
        let hook = run_ok(
            "iptables",
            &["-w", XTABLES_WAIT, "-t", self.table, "-S", self.hook],
            None,
        )?;
        let jump_suffix = format!(" -j {}", self.name);
        let jumps = hook
            .lines()
            .filter(|line| line.ends_with(&jump_suffix))
            .map(str::to_owned)
            .collect();
        // Fails when the chain (or, with iptables-nft, the whole table) does not exist; the
        // hook listing above already showed iptables itself works.
        let chain = run(
            "iptables",
            &["-w", XTABLES_WAIT, "-t", self.table, "-S", self.name],
            None,
        )?;
        let rules = chain.status.success().then(|| {
            String::from_utf8_lossy(&chain.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .map(str::to_owned)
                .collect()
        });
        Ok(Installed { jumps, rules })
    }

    /// iptables-restore input turning `installed` into `wanted`.
    fn restore_script(&self, installed: &Installed, wanted: &Installed) -> String {
        let mut lines = vec![format!("*{}", self.table)];
        lines.extend(
            installed
                .jumps
                .iter()
                .map(|jump| jump.replacen("-A ", "-D ", 1)),
        );
        if wanted.rules.is_some() || installed.rules.is_some() {
            // With --noflush, declaring a chain creates it or empties it.
            lines.push(format!(":{} - [0:0]", self.name));
        }
        match &wanted.rules {
            Some(rules) => lines.extend(rules.iter().cloned()),
            None if installed.rules.is_some() => lines.push(format!("-X {}", self.name)),
            None => {}
        }
        lines.extend(wanted.jumps.iter().cloned());
        lines.push("COMMIT\n".into());
        lines.join("\n")
    }

    /// Makes the chain match `spec` (None: removes it). Returns whether it wrote.
    fn sync(&self, spec: Option<&MasqSpec>) -> Result<bool> {
        let installed = self.installed()?;
        let wanted = self.wanted(spec);
        if installed == wanted {
            return Ok(false);
        }
        if spec.is_some() && installed.rules.is_some() {
            info!(
                table = self.table,
                chain = self.name,
                "iptables chain differs from weft's rules; rewriting it"
            );
        }
        run_ok(
            "iptables-restore",
            &["-w", XTABLES_WAIT, "--noflush"],
            Some(&self.restore_script(&installed, &wanted)),
        )
        .with_context(|| {
            format!(
                "writing iptables chain {} in table {}",
                self.name, self.table
            )
        })?;
        Ok(true)
    }
}

/// The jumps to a chain from its hook, and its rules (None: the chain does not exist),
/// each line as `iptables -S` prints it.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    jumps: Vec<String>,
    rules: Option<Vec<String>>,
}

#[derive(Debug, Default)]
pub struct Iptables;

impl Iptables {
    pub fn new() -> Self {
        Self
    }

    /// `ensure`, returning whether it had to write.
    pub fn ensure_changed(&mut self, spec: &MasqSpec) -> Result<bool> {
        let masq = MASQ.sync(Some(spec))?;
        let forward = FORWARD.sync(Some(spec))?;
        Ok(masq || forward)
    }
}

impl Firewall for Iptables {
    fn name(&self) -> &'static str {
        NAME
    }

    fn ensure(&mut self, spec: &MasqSpec) -> Result<()> {
        self.ensure_changed(spec).map(drop)
    }

    fn remove(&mut self) -> Result<()> {
        MASQ.sync(None)?;
        FORWARD.sync(None)?;
        Ok(())
    }
}

/// Whether the `iptables` FORWARD chain's policy is DROP (false when iptables is missing).
pub fn forward_policy_drops() -> bool {
    run_ok(
        "iptables",
        &["-w", XTABLES_WAIT, "-t", "filter", "-S", "FORWARD"],
        None,
    )
    .is_ok_and(|rules| rules.lines().any(|l| l.trim() == "-P FORWARD DROP"))
}

/// Makes iptables' FLANNEL-FWD chain and its jump match `spec` (None: removes them), for
/// the nftables firewall on a host whose FORWARD policy drops.
pub fn sync_forward(spec: Option<&MasqSpec>) -> Result<()> {
    FORWARD.sync(spec).map(drop)
}

/// `Ok("iptables v1.8.9 (nf_tables)")` when iptables is installed, else why not.
pub fn probe() -> Result<String, String> {
    let version = run_ok("iptables", &["--version"], None).map_err(|e| format!("{e:#}"))?;
    run("iptables-restore", &["--version"], None).map_err(|e| format!("{e:#}"))?;
    Ok(version.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MasqSpec {
        MasqSpec {
            network: "10.244.0.0/16".parse().unwrap(),
            lease: "10.244.1.0/24".parse().unwrap(),
            masquerade: true,
            random_fully: false,
            forward_accept: true,
            exclude: Vec::new(),
            bpf_nat: None,
        }
    }

    #[test]
    fn rules_are_flannels() {
        let rules = MASQ.wanted_rules(&spec()).unwrap();
        assert_eq!(
            rules[3],
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN"
        );
        assert_eq!(
            rules[4],
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE"
        );
        assert_eq!(
            MASQ.jump(),
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"
        );
        assert_eq!(
            MASQ.wanted_rules(&MasqSpec {
                masquerade: false,
                ..spec()
            }),
            None
        );
    }

    #[test]
    fn restore_script_deletes_stale_jumps_and_the_unwanted_chain() {
        let installed = Installed {
            jumps: vec![MASQ.jump(), MASQ.jump()],
            rules: Some(vec![]),
        };
        let script = MASQ.restore_script(&installed, &MASQ.wanted(None));
        assert_eq!(
            script,
            "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             :FLANNEL-POSTRTG - [0:0]\n-X FLANNEL-POSTRTG\nCOMMIT\n"
        );
    }
}
