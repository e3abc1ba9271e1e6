//! Masquerade for pod traffic leaving the cluster (`--ip-masq`) and the FORWARD accept
//! rules, with flannel's rule semantics, in nftables or iptables.
//!
//! The agent calls `ensure` with the full spec on every resync, also when `--ip-masq` is
//! off: `masquerade: false` removes masquerade rules an earlier run left, and
//! `forward_accept: false` removes the forward rules. Rules of the firewall that was *not*
//! selected (an earlier run with another choice, or flanneld in the other mode) are removed
//! by [`remove_leftovers`].

pub mod iptables;
pub mod nft;

use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;

/// What the rules must express (N = network, P = this node's lease subnet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqSpec {
    pub network: Ipv4Network,
    pub lease: Ipv4Network,
    /// Masquerade rules wanted (--ip-masq).
    pub masquerade: bool,
    /// `--random-fully` on MASQUERADE (off with --ip-masq-fully-random-disable).
    pub random_fully: bool,
    /// ACCEPT rules in FORWARD for the pod network (--iptables-forward-rules).
    pub forward_accept: bool,
    /// Destinations pod traffic reaches unmasqueraded (--masquerade-exclude).
    pub exclude: Vec<Ipv4Network>,
    /// Set when the BPF programs do the source NAT.
    pub bpf_nat: Option<BpfNatRule>,
}

/// `--masquerade`: who source-NATs pod traffic leaving the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MasqueradeChoice {
    /// The firewall's masquerade rule (nftables or iptables, as `--firewall` picks): the
    /// kernel's conntrack chooses every port, so no other NAT on the node can collide with
    /// it. BPF source NAT does not yet hold every invariant conntrack does (see the README's
    /// "Failure and attack"), so it is not the default.
    Auto,
    /// Experimental: the BPF programs (the firewall's rule stays as their fallback).
    Bpf,
    /// nftables' masquerade rule.
    Nftables,
    /// iptables' MASQUERADE rule.
    Iptables,
}

impl MasqueradeChoice {
    /// The firewall to use given `--firewall`: `--masquerade nftables|iptables` names one.
    pub fn firewall(self, firewall: FirewallChoice) -> Result<FirewallChoice> {
        let named = match self {
            MasqueradeChoice::Nftables => FirewallChoice::Nftables,
            MasqueradeChoice::Iptables => FirewallChoice::Iptables,
            _ => return Ok(firewall),
        };
        if firewall != FirewallChoice::Auto && firewall != named {
            bail!(
                "--masquerade={self:?} and --firewall={firewall:?} disagree: drop one, or make them name the same firewall"
            );
        }
        Ok(named)
    }
}

/// The BPF source NAT's share of the masquerade rule: packets `from_pod` marked for it
/// and leaving by the uplink are skipped; the rule's own translations take other ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfNatRule {
    pub uplink: String,
    pub mark: u32,
    /// Ports the rule's masquerade may take (the BPF table has the others).
    pub ports: (u16, u16),
}

/// One firewall implementation. `ensure` is idempotent and cheap when nothing changed;
/// it re-creates rules someone else removed. `remove` deletes everything weft added.
pub trait Firewall: Send {
    fn name(&self) -> &'static str;
    fn ensure(&mut self, spec: &MasqSpec) -> Result<()>;
    fn remove(&mut self) -> Result<()>;
}

/// Which firewall to program: nftables unless it is unusable here (no `nft`, or the
/// kernel refuses nf_tables) or the operator chose iptables. The reason is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FirewallChoice {
    /// nftables if usable, else iptables.
    Auto,
    Nftables,
    Iptables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nftables,
    Iptables,
}

/// Picks the firewall for `--firewall` (`choice`) and net-conf.json's `EnableNFTables`
/// (true requires nftables; false, as flannel reads it, means iptables under `auto`).
/// Returns it with a sentence for the log saying which and why.
pub fn select_firewall(
    choice: FirewallChoice,
    enable_nftables: Option<bool>,
) -> Result<(Box<dyn Firewall>, String)> {
    let (kind, reason) = decide(choice, enable_nftables, nft::probe(), iptables::probe())?;
    let firewall: Box<dyn Firewall> = match kind {
        Kind::Nftables => Box::new(nft::Nftables::new()),
        Kind::Iptables => Box::new(iptables::Iptables::new()),
    };
    Ok((firewall, reason))
}

/// The choice itself, given what the probes found (`Ok(version)` or `Err(why unusable)`).
fn decide(
    choice: FirewallChoice,
    enable_nftables: Option<bool>,
    nft: Result<String, String>,
    iptables: Result<String, String>,
) -> Result<(Kind, String)> {
    use FirewallChoice::*;
    if choice == Auto && enable_nftables == Some(false) {
        return match iptables {
            Ok(version) => Ok((
                Kind::Iptables,
                format!("iptables ({version}, EnableNFTables is false in net-conf.json)"),
            )),
            Err(why) => bail!(
                "EnableNFTables is false in net-conf.json, which means iptables, but {why}: \
                 install iptables, or set EnableNFTables to true (or remove it) to use nftables"
            ),
        };
    }
    let enable_nftables = enable_nftables == Some(true);
    match (choice, enable_nftables) {
        (Iptables, true) => bail!(
            "EnableNFTables is true in net-conf.json but --firewall=iptables was given: \
             set EnableNFTables to false or use --firewall=nftables (or auto)"
        ),
        (Nftables, _) | (Auto, true) => {
            let why_forced = if enable_nftables {
                "EnableNFTables in net-conf.json"
            } else {
                "--firewall=nftables"
            };
            match nft {
                Ok(version) => Ok((Kind::Nftables, format!("nftables ({version}, required by {why_forced})"))),
                Err(why) => bail!(
                    "{why_forced} requires nftables, but it is unusable here: {why}; install nftables \
                     (the nft command) or choose --firewall=iptables{}",
                    if enable_nftables { " with EnableNFTables false" } else { "" }
                ),
            }
        }
        (Iptables, false) => match iptables {
            Ok(version) => Ok((
                Kind::Iptables,
                format!("iptables ({version}, chosen by --firewall=iptables)"),
            )),
            Err(why) => bail!(
                "--firewall=iptables, but {why}: install iptables or choose --firewall=nftables"
            ),
        },
        (Auto, false) => match (nft, iptables) {
            (Ok(version), _) => Ok((Kind::Nftables, format!("nftables ({version} usable)"))),
            (Err(nft_why), Ok(version)) => Ok((
                Kind::Iptables,
                format!("iptables: {nft_why} (using {version})"),
            )),
            (Err(nft_why), Err(ipt_why)) => bail!(
                "no usable firewall for --ip-masq and the forward rules: {nft_why}, and {ipt_why}; \
                 install nftables (nft) or iptables"
            ),
        },
    }
}

/// Removes the rules of every firewall implementation except `active` (a `Firewall::name`),
/// e.g. iptables chains left by flanneld or an earlier weft run when nftables is now used.
/// Implementations whose tool is not installed are skipped.
pub fn remove_leftovers(active: &str) -> Result<()> {
    let mut others: Vec<Box<dyn Firewall>> = Vec::new();
    if active != nft::NAME && nft::probe().is_ok() {
        others.push(Box::new(nft::Nftables::new()));
    }
    if active != iptables::NAME && iptables::probe().is_ok() {
        others.push(Box::new(iptables::Iptables::new()));
    }
    for mut firewall in others {
        firewall
            .remove()
            .with_context(|| format!("removing leftover {} rules", firewall.name()))?;
    }
    Ok(())
}

/// Removes the rules of all implementations (both nftables and iptables).
pub fn remove_all() -> Result<()> {
    remove_leftovers("")
}

/// How long one firewall tool may run: `iptables -w` waits at most [`XTABLES_WAIT`] for
/// the xtables lock, with room for the work itself. Past it the tool is killed.
pub const FIREWALL_DEADLINE: Duration = Duration::from_secs(10);
/// `iptables -w <seconds>`: how long iptables waits for the xtables lock.
pub const XTABLES_WAIT: &str = "5";

/// Runs a firewall tool with `input` on stdin, killed past [`FIREWALL_DEADLINE`]. Err when
/// it cannot be started or does not finish in time (the error names the command).
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<Output> {
    Ok(crate::tool::run(program, args, input, FIREWALL_DEADLINE)?)
}

/// Like [`run`], and a non-zero exit is an error carrying the command and its stderr.
/// Returns stdout.
fn run_ok(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let out = run(program, args, input)?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use FirewallChoice::*;

    fn nft_ok() -> Result<String, String> {
        Ok("nft 1.0.6".into())
    }
    fn ipt_ok() -> Result<String, String> {
        Ok("iptables v1.8.9 (nf_tables)".into())
    }
    fn missing(tool: &str) -> Result<String, String> {
        Err(format!("{tool} not found in PATH"))
    }

    #[test]
    fn auto_prefers_nftables_and_says_so() {
        let (kind, why) = decide(Auto, None, nft_ok(), ipt_ok()).unwrap();
        assert_eq!(kind, Kind::Nftables);
        assert_eq!(why, "nftables (nft 1.0.6 usable)");
    }

    #[test]
    fn auto_falls_back_to_iptables_with_the_reason() {
        let (kind, why) = decide(Auto, None, missing("nft"), ipt_ok()).unwrap();
        assert_eq!(kind, Kind::Iptables);
        assert_eq!(
            why,
            "iptables: nft not found in PATH (using iptables v1.8.9 (nf_tables))"
        );
    }

    #[test]
    fn auto_without_any_tool_names_both() {
        let err = decide(Auto, None, missing("nft"), missing("iptables"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nft not found") && err.contains("iptables not found"),
            "{err}"
        );
    }

    #[test]
    fn nftables_choice_unusable_says_why_and_suggests_iptables() {
        let err = decide(Nftables, None, missing("nft"), ipt_ok())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--firewall=nftables") && err.contains("nft not found"),
            "{err}"
        );
        assert!(err.contains("--firewall=iptables"), "{err}");
    }

    #[test]
    fn enable_nftables_forces_nftables() {
        let (kind, why) = decide(Auto, Some(true), nft_ok(), ipt_ok()).unwrap();
        assert_eq!(kind, Kind::Nftables);
        assert!(why.contains("EnableNFTables"), "{why}");
        let err = decide(Auto, Some(true), missing("nft"), ipt_ok())
            .unwrap_err()
            .to_string();
        assert!(err.contains("EnableNFTables"), "{err}");
        let err = decide(Iptables, Some(true), nft_ok(), ipt_ok())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EnableNFTables") && err.contains("--firewall=iptables"),
            "{err}"
        );
    }

    #[test]
    fn enable_nftables_false_means_iptables_under_auto_as_in_flannel() {
        let (kind, why) = decide(Auto, Some(false), nft_ok(), ipt_ok()).unwrap();
        assert_eq!(kind, Kind::Iptables);
        assert!(why.contains("EnableNFTables is false"), "{why}");
        let err = decide(Auto, Some(false), nft_ok(), missing("iptables"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("install iptables") && err.contains("EnableNFTables"),
            "{err}"
        );
        // An explicit --firewall still decides.
        let (kind, _) = decide(Nftables, Some(false), nft_ok(), ipt_ok()).unwrap();
        assert_eq!(kind, Kind::Nftables);
    }

    #[test]
    fn iptables_choice_uses_iptables_even_when_nft_works() {
        let (kind, why) = decide(Iptables, None, nft_ok(), ipt_ok()).unwrap();
        assert_eq!(kind, Kind::Iptables);
        assert!(why.contains("--firewall=iptables"), "{why}");
        assert!(decide(Iptables, None, nft_ok(), missing("iptables")).is_err());
    }
}
