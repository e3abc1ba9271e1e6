//! The --ip-masq and forward rules, written by the real `nft` / `iptables` into network
//! namespaces each test creates (never the root namespace), read back with the same tools,
//! and one test that sends packets through them.
//!
//! Needs root. The firewall code runs in a thread that joined the test's namespace with
//! setns(2), so the `nft` / `iptables` processes it starts inherit that namespace.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft::masq::iptables::Iptables;
use weft::masq::nft::Nftables;
use weft::masq::{self, Firewall, FirewallChoice, MasqSpec};

const PREFIX: &str = "wt-mq-";

/// The namespaces of one test; dropping it deletes them (also when the test panics).
struct Lab {
    prefix: String,
    names: Vec<String>,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        sweep_stale_namespaces();
        Lab {
            prefix: format!("{PREFIX}{}-{tag}-", std::process::id()),
            names: Vec::new(),
        }
    }

    /// Creates namespace `<prefix><name>` with `lo` up and returns its full name.
    fn netns(&mut self, name: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        run_cmd("ip", &["netns", "add", &full]);
        self.names.push(full.clone());
        sh(&full, "ip link set lo up");
        full
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Deletes namespaces that earlier runs of this test binary left (their process is gone).
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn run_cmd(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command in namespace `ns`; panics when it fails. Returns stdout.
fn sh(ns: &str, cmd: &str) -> String {
    run_cmd("ip", &["netns", "exec", ns, "sh", "-c", cmd])
}

/// Runs `f` in a thread that joined namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).expect("open netns");
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

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

/// With BPF source NAT and an exclusion: the skip rule, the fallback's port ranges.
fn bpf_nat_spec() -> MasqSpec {
    MasqSpec {
        exclude: vec!["192.168.0.0/16".parse().unwrap()],
        bpf_nat: Some(masq::BpfNatRule {
            uplink: "eth0".into(),
            mark: weft_common::NAT_MARK,
            ports: (1024, 60999),
        }),
        ..spec()
    }
}

// ---------------------------------------------------------------- nftables

const NFT_POSTRTG: &str = "\tchain postrtg {
		comment \"chain to manage traffic masquerading by flannel\"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}
";

const NFT_FORWARD: &str = "\tchain forward {
		comment \"chain to accept flannel traffic\"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
";

fn nft_table(chains: &[&str]) -> String {
    format!(
        "table ip flannel-ipv4 {{\n\tcomment \"rules for flannel-ipv4\"\n{}}}\n",
        chains.join("\n")
    )
}

fn nft_listing(ns: &str) -> String {
    sh(ns, "nft list table ip flannel-ipv4")
}

fn nft_table_exists(ns: &str) -> bool {
    sh(ns, "nft list tables")
        .lines()
        .any(|line| line == "table ip flannel-ipv4")
}

/// The kernel's handle of the table: a re-created table gets a new one.
fn nft_table_handle(ns: &str) -> String {
    sh(ns, "nft -a list table ip flannel-ipv4 | head -n 1")
}

#[test]
fn nft_ensure_writes_flannels_table_once() {
    let mut lab = Lab::new("nft1");
    let node = lab.netns("node");
    let mut fw = Nftables::new();

    assert!(in_netns(&node, || fw.ensure_changed(&spec())).unwrap());
    assert_eq!(nft_listing(&node), nft_table(&[NFT_POSTRTG, NFT_FORWARD]));

    let handle = nft_table_handle(&node);
    assert!(
        !in_netns(&node, || fw.ensure_changed(&spec())).unwrap(),
        "second ensure rewrote the table"
    );
    assert_eq!(nft_table_handle(&node), handle, "table was re-created");
    assert_eq!(nft_listing(&node), nft_table(&[NFT_POSTRTG, NFT_FORWARD]));

    // A new process (fresh Firewall) rewrites once, then settles.
    let mut restarted = Nftables::new();
    assert!(in_netns(&node, || restarted.ensure_changed(&spec())).unwrap());
    assert!(!in_netns(&node, || restarted.ensure_changed(&spec())).unwrap());
    assert_eq!(nft_listing(&node), nft_table(&[NFT_POSTRTG, NFT_FORWARD]));
}

#[test]
fn nft_ensure_repairs_what_was_changed_by_hand() {
    let mut lab = Lab::new("nft2");
    let node = lab.netns("node");
    let mut fw = Nftables::new();
    let want = nft_table(&[NFT_POSTRTG, NFT_FORWARD]);
    in_netns(&node, || fw.ensure(&spec())).unwrap();

    let breakages = [
        // one masquerade rule deleted
        "nft delete rule ip flannel-ipv4 postrtg handle \
         $(nft -a list chain ip flannel-ipv4 postrtg | awk '/224.0.0.0/ {print $NF}')",
        // a rule added
        "nft insert rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 return",
        // a chain deleted
        "nft delete chain ip flannel-ipv4 forward",
        // the table deleted
        "nft delete table ip flannel-ipv4",
    ];
    for breakage in breakages {
        sh(&node, breakage);
        assert_ne!(
            sh(&node, "nft list ruleset"),
            want,
            "breakage had no effect: {breakage}"
        );
        assert!(
            in_netns(&node, || fw.ensure_changed(&spec())).unwrap(),
            "not repaired: {breakage}"
        );
        assert_eq!(nft_listing(&node), want, "after {breakage}");
    }
}

#[test]
fn nft_spec_changes_replace_the_rules() {
    let mut lab = Lab::new("nft3");
    let node = lab.netns("node");
    let mut fw = Nftables::new();
    in_netns(&node, || fw.ensure(&spec())).unwrap();

    // --ip-masq off: the masquerade chain goes, the forward chain stays.
    let no_masq = MasqSpec {
        masquerade: false,
        ..spec()
    };
    in_netns(&node, || fw.ensure(&no_masq)).unwrap();
    assert_eq!(nft_listing(&node), nft_table(&[NFT_FORWARD]));

    // --ip-masq-fully-random-disable
    let plain = MasqSpec {
        random_fully: false,
        ..spec()
    };
    in_netns(&node, || fw.ensure(&plain)).unwrap();
    let listing = nft_listing(&node);
    assert!(!listing.contains("fully-random"), "{listing}");
    assert_eq!(listing.matches(" masquerade\n").count(), 2, "{listing}");

    // A new lease: the lease rules follow.
    let moved = MasqSpec {
        lease: "10.244.7.0/24".parse().unwrap(),
        ..spec()
    };
    in_netns(&node, || fw.ensure(&moved)).unwrap();
    assert_eq!(
        nft_listing(&node),
        nft_table(&[
            &NFT_POSTRTG.replace("10.244.1.0", "10.244.7.0"),
            NFT_FORWARD
        ])
    );

    // Nothing wanted at all: no table.
    let nothing = MasqSpec {
        masquerade: false,
        forward_accept: false,
        ..spec()
    };
    assert!(in_netns(&node, || fw.ensure_changed(&nothing)).unwrap());
    assert!(!nft_table_exists(&node));
    assert!(!in_netns(&node, || fw.ensure_changed(&nothing)).unwrap());
}

#[test]
fn nft_remove_deletes_the_table() {
    let mut lab = Lab::new("nft4");
    let node = lab.netns("node");
    let mut fw = Nftables::new();
    in_netns(&node, || fw.ensure(&spec())).unwrap();
    sh(&node, "nft add table ip other");
    assert!(nft_table_exists(&node));

    in_netns(&node, || fw.remove()).unwrap();
    assert!(!nft_table_exists(&node));
    assert_eq!(
        sh(&node, "nft list tables"),
        "table ip other\n",
        "removed more than its table"
    );
    // Absent already: still fine.
    in_netns(&node, || fw.remove()).unwrap();
    // And ensure after remove writes it again.
    in_netns(&node, || fw.ensure(&spec())).unwrap();
    assert_eq!(nft_listing(&node), nft_table(&[NFT_POSTRTG, NFT_FORWARD]));
}

// ---------------------------------------------------------------- iptables

const IPT_NAT: &[&str] = &[
    ":FLANNEL-POSTRTG - [0:0]",
    "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
    "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
    "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
    "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
    "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
    "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
    "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
];

const IPT_FILTER: &[&str] = &[
    ":FLANNEL-FWD - [0:0]",
    "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
    "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
    "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
];

/// The lines of `iptables-save -t <table>` that mention flannel's chains, plus every rule
/// of the hook chains (so that stray rules show up too).
fn ipt_lines(ns: &str, table: &str) -> Vec<String> {
    sh(ns, &format!("iptables-save -t {table}"))
        .lines()
        .filter(|l| {
            l.contains("FLANNEL") || l.starts_with("-A POSTROUTING") || l.starts_with("-A FORWARD")
        })
        .map(str::to_owned)
        .collect()
}

fn assert_ipt(ns: &str, nat: &[&str], filter: &[&str]) {
    assert_eq!(ipt_lines(ns, "nat"), nat, "nat table");
    assert_eq!(ipt_lines(ns, "filter"), filter, "filter table");
}

#[test]
fn iptables_ensure_writes_flannels_chains_once() {
    let mut lab = Lab::new("ipt1");
    let node = lab.netns("node");
    let mut fw = Iptables::new();

    assert!(in_netns(&node, || fw.ensure_changed(&spec())).unwrap());
    assert_ipt(&node, IPT_NAT, IPT_FILTER);

    let before = sh(&node, "iptables-save | grep -v '^#'");
    assert!(
        !in_netns(&node, || fw.ensure_changed(&spec())).unwrap(),
        "second ensure rewrote rules"
    );
    assert_eq!(sh(&node, "iptables-save | grep -v '^#'"), before);
}

/// The rules for BPF source NAT are written as `iptables -S` prints them (else every
/// resync would rewrite them), and nft takes its syntax.
#[test]
fn bpf_nat_rules_are_accepted_and_settle_after_one_write() {
    let mut lab = Lab::new("bpfnat");
    let node = lab.netns("node");
    let mut ipt = Iptables::new();
    assert!(in_netns(&node, || ipt.ensure_changed(&bpf_nat_spec())).unwrap());
    assert!(
        !in_netns(&node, || ipt.ensure_changed(&bpf_nat_spec())).unwrap(),
        "second ensure rewrote rules: {}",
        sh(&node, "iptables -t nat -S FLANNEL-POSTRTG")
    );
    let rules = sh(&node, "iptables -t nat -S FLANNEL-POSTRTG");
    for expected in [
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 192.168.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -o eth0 -m mark --mark 0x800/0x800 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -p tcp -m comment --comment \"flanneld masq\" -j MASQUERADE --to-ports 1024-60999 --random-fully",
    ] {
        assert!(rules.lines().any(|l| l == expected), "{expected:?} not in:\n{rules}");
    }
    in_netns(&node, || ipt.remove()).unwrap();
    let mut nft = Nftables::new();
    assert!(in_netns(&node, || nft.ensure_changed(&bpf_nat_spec())).unwrap());
    assert!(!in_netns(&node, || nft.ensure_changed(&bpf_nat_spec())).unwrap());
    let listing = nft_listing(&node);
    assert!(
        listing.contains("masquerade to :1024-60999 fully-random")
            && listing.contains("meta mark & 0x00000800 == 0x00000800"),
        "{listing}"
    );
}

#[test]
fn iptables_ensure_repairs_what_was_changed_by_hand() {
    let mut lab = Lab::new("ipt2");
    let node = lab.netns("node");
    let mut fw = Iptables::new();
    in_netns(&node, || fw.ensure(&spec())).unwrap();

    let breakages = [
        // a masquerade rule deleted
        "iptables -w -t nat -D FLANNEL-POSTRTG 5",
        // a rule added to weft's chain
        "iptables -w -t nat -I FLANNEL-POSTRTG -j RETURN",
        // the jump deleted
        "iptables -w -t nat -D POSTROUTING -m comment --comment 'flanneld masq' -j FLANNEL-POSTRTG",
        // a second jump
        "iptables -w -t nat -A POSTROUTING -m comment --comment 'flanneld masq' -j FLANNEL-POSTRTG",
        // the forward chain deleted
        "iptables -w -D FORWARD -m comment --comment 'flanneld forward' -j FLANNEL-FWD && \
         iptables -w -F FLANNEL-FWD && iptables -w -X FLANNEL-FWD",
    ];
    for breakage in breakages {
        sh(&node, breakage);
        assert!(
            ipt_lines(&node, "nat") != IPT_NAT || ipt_lines(&node, "filter") != IPT_FILTER,
            "breakage had no effect: {breakage}"
        );
        assert!(
            in_netns(&node, || fw.ensure_changed(&spec())).unwrap(),
            "not repaired: {breakage}"
        );
        assert_ipt(&node, IPT_NAT, IPT_FILTER);
    }
}

#[test]
fn iptables_spec_changes_and_remove() {
    let mut lab = Lab::new("ipt3");
    let node = lab.netns("node");
    let mut fw = Iptables::new();
    // Someone else's rules in the same hook chains stay untouched.
    sh(&node, "iptables -w -t nat -A POSTROUTING -o eth9 -j ACCEPT && iptables -w -A FORWARD -i eth9 -j DROP");
    let other_nat = "-A POSTROUTING -o eth9 -j ACCEPT";
    let other_filter = "-A FORWARD -i eth9 -j DROP";
    in_netns(&node, || fw.ensure(&spec())).unwrap();
    let nat_full = [&IPT_NAT[..1], &[other_nat], &IPT_NAT[1..]].concat();
    let filter_full = [&IPT_FILTER[..1], &[other_filter], &IPT_FILTER[1..]].concat();
    assert_ipt(&node, &nat_full, &filter_full);

    // --ip-masq off: FLANNEL-POSTRTG and its jump go, FLANNEL-FWD stays.
    in_netns(&node, || {
        fw.ensure(&MasqSpec {
            masquerade: false,
            ..spec()
        })
    })
    .unwrap();
    assert_ipt(&node, &[other_nat], &filter_full);

    // --ip-masq-fully-random-disable
    in_netns(&node, || {
        fw.ensure(&MasqSpec {
            random_fully: false,
            ..spec()
        })
    })
    .unwrap();
    let nat = ipt_lines(&node, "nat");
    assert_eq!(
        nat.iter().filter(|l| l.ends_with("-j MASQUERADE")).count(),
        2,
        "{nat:#?}"
    );
    assert!(!nat.iter().any(|l| l.contains("random-fully")), "{nat:#?}");

    // --iptables-forward-rules=false
    in_netns(&node, || {
        fw.ensure(&MasqSpec {
            forward_accept: false,
            ..spec()
        })
    })
    .unwrap();
    assert_ipt(&node, &nat_full, &[other_filter]);

    in_netns(&node, || fw.remove()).unwrap();
    assert_ipt(&node, &[other_nat], &[other_filter]);
    in_netns(&node, || fw.remove()).unwrap();
}

// ---------------------------------------------------------------- selection and leftovers

#[test]
fn auto_selects_nftables_here_and_iptables_on_request() {
    let mut lab = Lab::new("sel");
    let node = lab.netns("node");
    in_netns(&node, || {
        let (fw, why) = masq::select_firewall(FirewallChoice::Auto, None).unwrap();
        assert_eq!(fw.name(), "nftables");
        assert!(
            why.starts_with("nftables (nft 1.0.") && why.ends_with(" usable)"),
            "{why}"
        );

        let (fw, why) = masq::select_firewall(FirewallChoice::Iptables, None).unwrap();
        assert_eq!(fw.name(), "iptables");
        assert!(why.contains("--firewall=iptables"), "{why}");

        let err = masq::select_firewall(FirewallChoice::Iptables, Some(true))
            .err()
            .expect("conflict accepted");
        assert!(err.to_string().contains("EnableNFTables"), "{err}");
    });
}

#[test]
fn leftovers_of_the_other_firewall_are_removed() {
    let mut lab = Lab::new("left");
    let node = lab.netns("node");
    in_netns(&node, || Iptables::new().ensure(&spec())).unwrap();
    in_netns(&node, || Nftables::new().ensure(&spec())).unwrap();

    in_netns(&node, || masq::remove_leftovers("nftables")).unwrap();
    assert_ipt(&node, &[], &[]);
    assert_eq!(nft_listing(&node), nft_table(&[NFT_POSTRTG, NFT_FORWARD]));

    in_netns(&node, masq::remove_all).unwrap();
    assert!(!nft_table_exists(&node));
}

// ---------------------------------------------------------------- traffic

/// Starts tcpdump for one ICMP echo request on `iface` in `ns`, runs `action`, and returns
/// the packet line tcpdump printed (empty when none came within its time limit).
fn capture_echo_request(ns: &str, iface: &str, action: impl FnOnce()) -> String {
    let mut tcpdump = Command::new("ip")
        .args([
            "netns", "exec", ns, "timeout", "8", "tcpdump", "-l", "-t", "-n", "-c", "1", "-i",
            iface,
        ])
        .arg("icmp[icmptype] == icmp-echo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    // tcpdump says "listening on ..." once it captures (or exits, closing stderr).
    let mut stderr = BufReader::new(tcpdump.stderr.take().unwrap());
    let mut said = String::new();
    for _ in 0..10 {
        if said.contains("listening on") || stderr.read_line(&mut said).unwrap() == 0 {
            break;
        }
    }
    assert!(said.contains("listening on"), "tcpdump in {ns}: {said}");
    action();
    let out = tcpdump.wait_with_output().expect("tcpdump");
    drop(stderr);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Echo requests from namespace `ns` to `dst` over a raw ICMP socket (no `ping` binary
/// needed): up to 3 tries, 1 s each. True when a reply came.
fn ping(ns: &str, dst: Ipv4Addr) -> bool {
    in_netns(ns, || {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: valid option value of the given size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let id = (std::process::id() as u16) ^ 0x5a5a;
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        for seq in 1..=3u16 {
            let mut echo = [8u8, 0, 0, 0, 0, 0, 0, 0, b'w', b'e', b'f', b't'];
            echo[4..6].copy_from_slice(&id.to_be_bytes());
            echo[6..8].copy_from_slice(&seq.to_be_bytes());
            let checksum = !echo.chunks(2).fold(0u32, |sum, pair| {
                let sum = sum + u32::from(u16::from_be_bytes([pair[0], pair[1]]));
                (sum & 0xffff) + (sum >> 16)
            }) as u16;
            echo[2..4].copy_from_slice(&checksum.to_be_bytes());
            // SAFETY: buffer and address valid for the lengths given. A failed send (no
            // route) is a lost echo, as with ping.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    echo.as_ptr().cast(),
                    echo.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut buf = [0u8; 1500];
            while Instant::now() < deadline {
                // SAFETY: buffer valid for its length; returns after SO_RCVTIMEO at most.
                let n = unsafe {
                    libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                let Ok(n) = usize::try_from(n) else { continue };
                // IPv4 header, then ICMP: echo reply (type 0) with our id and seq, from dst.
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                let from = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                if n >= ihl + 8
                    && from == dst
                    && buf[ihl] == 0
                    && buf[ihl + 4..ihl + 6] == id.to_be_bytes()
                    && buf[ihl + 6..ihl + 8] == seq.to_be_bytes()
                {
                    return true;
                }
            }
        }
        false
    })
}

const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

/// pod (10.244.1.2) -> node (lease 10.244.1.0/24, forwarding, masquerade via nftables) ->
/// ext (198.51.100.1, routes back only to the node's 198.18.0.1); pod2 (10.244.2.2) is a
/// pod of the cluster network elsewhere, also reached through node.
#[test]
fn nft_masquerade_hides_pods_from_outside_but_not_from_pods() {
    let mut lab = Lab::new("traf");
    let pod = lab.netns("pod");
    let pod2 = lab.netns("pod2");
    let node = lab.netns("node");
    let ext = lab.netns("ext");
    sh(
        &pod,
        &format!("ip link add eth0 type veth peer name vpod netns {node}"),
    );
    sh(
        &pod2,
        &format!("ip link add eth0 type veth peer name vpod2 netns {node}"),
    );
    sh(
        &ext,
        &format!("ip link add eth0 type veth peer name vext netns {node}"),
    );
    sh(&pod, "ip addr add 10.244.1.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.244.1.1");
    sh(&pod2, "ip addr add 10.244.2.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.244.2.1");
    sh(&ext, "ip addr add 198.18.0.254/24 dev eth0 && ip link set eth0 up && ip addr add 198.51.100.1/32 dev lo");
    sh(
        &node,
        "ip addr add 10.244.1.1/24 dev vpod && ip link set vpod up && \
         ip addr add 10.244.2.1/24 dev vpod2 && ip link set vpod2 up && \
         ip addr add 198.18.0.1/24 dev vext && ip link set vext up && \
         ip route add 198.51.100.1/32 via 198.18.0.254 && sysctl -qw net.ipv4.ip_forward=1",
    );

    // Without the rules the pod's address reaches ext, which has no route back.
    let mut reached = true;
    let seen = capture_echo_request(&ext, "eth0", || reached = ping(&pod, EXT));
    assert!(
        seen.starts_with("IP 10.244.1.2 > 198.51.100.1: ICMP echo request"),
        "{seen}"
    );
    assert!(!reached, "ext answered an unmasqueraded pod address");

    let mut fw = Nftables::new();
    in_netns(&node, || fw.ensure(&spec())).unwrap();

    let seen = capture_echo_request(&ext, "eth0", || reached = ping(&pod, EXT));
    assert!(
        seen.starts_with("IP 198.18.0.1 > 198.51.100.1: ICMP echo request"),
        "{seen}"
    );
    assert!(reached, "no reply from ext through the masquerade");

    let seen = capture_echo_request(&pod2, "eth0", || reached = ping(&pod, POD2));
    assert!(
        seen.starts_with("IP 10.244.1.2 > 10.244.2.2: ICMP echo request"),
        "{seen}"
    );
    assert!(reached, "pod to pod failed");
}
